"""bench/prefix's picture: each set-up's TTFT distribution (a CDF, log scale) beside the engines' own
prefix-cache hit rate and the throughput, in one PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)

from bench.prefix import Result, Workload  # noqa: E402
from bench.prefix_engines import Fleet  # noqa: E402

DPI = 80
COLOURS = {"least-request": "tab:grey", "headroom": "tab:blue", "prefix": "tab:green"}
LABELS = {"least-request": "least-request (Envoy alone)", "headroom": "kvgate, headroom",
          "prefix": "kvgate, prefix + headroom"}


def _cdf_panel(ax: plt.Axes, results: Sequence[Result]) -> None:
    for r in results:
        xs = sorted(1000 * t for t in r.ttft_s)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        colour = COLOURS.get(r.setup)
        ax.step(xs, ys, where="post", c=colour, lw=1.5,
                label=f"{LABELS.get(r.setup, r.setup)}: p50 {r.ttft_ms(0.5):.0f} ms, p99 {r.ttft_ms(0.99):.0f} ms")
        ax.axvline(r.ttft_ms(0.5), c=colour, lw=0.8, ls=":")
    ax.axhline(0.5, c="black", lw=0.5, ls=":")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("TTFT ms (log); dotted: p50")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT distribution (streamed, to the first token)", fontsize=9, loc="left")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, which="both", lw=0.3, alpha=0.5)


def _hits_panel(ax: plt.Axes, results: Sequence[Result]) -> None:
    base = results[0]
    names = [r.setup for r in results]
    bars = ax.bar(names, [100 * r.hit_rate for r in results], color=[COLOURS.get(n, "tab:grey") for n in names])
    for bar, r in zip(bars, results):
        ratio = f" ({r.throughput / base.throughput:.2f}x)" if base.throughput and r is not base else ""
        ax.annotate(f"{r.hit_rate:.0%}\n{r.throughput:.1f} req/s{ratio}", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 119)
    ax.set_ylabel("engines' prefix-cache hit rate %")
    ax.set_title("hit rate (vllm:prefix_cache_hits / queries) and req/s", fontsize=9, loc="left")
    ax.tick_params(axis="x", labelsize=8)


def _time_panel(ax: plt.Axes, results: Sequence[Result]) -> None:
    for r in results:
        ax.scatter(r.sent_s, [1000 * t for t in r.ttft_s], s=8, c=COLOURS.get(r.setup), alpha=0.7,
                   label=LABELS.get(r.setup, r.setup))
    ax.set_yscale("log")
    ax.set_xlabel("request sent at, s from the set-up's start")
    ax.set_ylabel("TTFT ms (log)")
    ax.set_title("TTFT over each set-up's run", fontsize=9, loc="left")
    ax.legend(fontsize=8, loc="upper right", markerscale=2)
    ax.grid(True, which="major", lw=0.3, alpha=0.5)


def plot(results: Sequence[Result], fleet: Fleet, w: Workload, path: Path) -> Path:
    fig = plt.figure(figsize=(12, 7))
    grid = fig.add_gridspec(2, 2, width_ratios=[3, 2], height_ratios=[4, 3])
    _cdf_panel(fig.add_subplot(grid[0, 0]), results)
    _hits_panel(fig.add_subplot(grid[0, 1]), results)
    _time_panel(fig.add_subplot(grid[1, :]), results)
    engines = "simulated vLLM engines" if fleet.name == "sim" else "real vLLM replicas (CPU, tiny Llama)"
    fig.suptitle(f"bench/prefix: {fleet.count} {engines}; {w.users} users x {w.chats} chats x {w.turns} turns, "
                 f"{w.system_prompts} system prompts, {w.documents} documents", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
