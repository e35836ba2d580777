"""bench/spike's picture: for each set-up, steady-traffic TTFT and ITL over the run, the burst, and
the engine's KV utilisation, in one PNG (a row of two panels per set-up)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)

from bench.spike_client import DONE, REFUSED  # noqa: E402
from bench.spike_report import Run  # noqa: E402
from bench.spike_scenario import BURST, STEADY, Scenario  # noqa: E402

DPI = 80


def _ttft_panel(ax: plt.Axes, run: Run, s: Scenario) -> None:
    steady = [r for r in run.requests if r.kind == STEADY]
    floor, ceiling = 0.01, s.give_up_s * 1.5  # where refusals and requests without a token are drawn
    good = [r for r in steady if r.slo_met]
    late = [r for r in steady if r.ttft_s is not None and not r.slo_met]
    refused = [r for r in steady if r.outcome == REFUSED]
    never = [r for r in steady if r.ttft_s is None and r.outcome != REFUSED]
    ax.scatter([r.due_s for r in good], [r.ttft_s for r in good], s=10, c="tab:green", label="steady, met SLO")
    ax.scatter([r.due_s for r in late], [r.ttft_s for r in late], s=10, c="tab:orange", label="steady, missed SLO")
    ax.scatter([r.due_s for r in refused], [floor] * len(refused), s=18, marker="x", c="tab:red",
               label="steady, refused")
    ax.scatter([r.due_s for r in never], [ceiling] * len(never), s=18, marker="^", c="black",
               label="steady, no token (gave up / cut)")
    ax.axhline(s.slo_ttft_s, color="grey", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_ylim(floor / 1.5, ceiling * 1.5)
    ax.set_ylabel("TTFT s")
    twin = ax.twinx()
    t = [x.t_s for x in run.samples]
    twin.plot(t, [x.kv_utilization for x in run.samples], c="tab:blue", lw=1, label="engine KV utilisation")
    if any(x.ledger_fraction is not None for x in run.samples):
        twin.plot(t, [x.ledger_fraction for x in run.samples], c="tab:purple", lw=1, ls="--",
                  label="kvgate reserved / budget")
    twin.set_ylim(0, 1.05)
    twin.set_ylabel("KV used")


def _itl_panel(ax: plt.Axes, run: Run, s: Scenario) -> None:
    done = [r for r in run.requests if r.kind == STEADY and r.outcome == DONE and r.mean_itl_s is not None]
    ax.scatter([r.due_s for r in done], [1000 * r.mean_itl_s for r in done], s=10, c="tab:green",
               label="steady, mean ITL")
    ax.scatter([r.due_s for r in done], [1000 * (r.p99_gap_s or 0) for r in done], s=6, c="tab:grey",
               label="steady, p99 gap")
    ax.axhline(1000 * s.slo_itl_s, color="grey", lw=0.8, ls=":")
    ax.set_ylim(0, max(1000 * s.slo_itl_s * 1.5, *(1000 * (r.p99_gap_s or 0) * 1.1 for r in done)))
    ax.set_ylabel("ms")


def _burst_marks(ax: plt.Axes, run: Run, s: Scenario) -> None:
    if not run.setup.burst:
        return
    ax.axvspan(s.burst_start_s, s.burst_start_s + s.burst_window_s, color="tab:red", alpha=0.12)
    for r in run.requests:
        if r.kind == BURST:
            ax.axvline(r.due_s, color="tab:red", lw=0.6, ls="-" if r.outcome != REFUSED else ":")


def plot(runs: Sequence[Run], s: Scenario, path: Path) -> Path:
    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 2.4 * len(runs) + 0.8), sharex=True, squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]})
    for (ttft, itl), run in zip(axes, runs):
        _ttft_panel(ttft, run, s)
        _itl_panel(itl, run, s)
        for ax in (ttft, itl):
            _burst_marks(ax, run, s)
        ttft.set_title(f"{run.setup.label}: steady TTFT (log) and engine KV", fontsize=9, loc="left")
        itl.set_title(f"{run.setup.label}: steady inter-token latency", fontsize=9, loc="left")
    for ax in axes[-1]:
        ax.set_xlabel("request due at, s from start")
    handles, labels = [], []
    for ax in fig.axes:  # one entry per label, from whichever panel drew it
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False,
               title="red band and lines: the burst (dotted line: a refused burst request)", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
