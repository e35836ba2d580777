"""`python -m bench.spike`: the sequence-length spike. Steady short requests at a rate the engine serves
comfortably, then a burst of requests asking for 4,000 output tokens, through three set-ups one after
the other, each with a fresh simulated engine of the same size (Llama-2-7B fp16 on a 40 GB GPU: 8 GiB
of KV, about 16 concurrent 1,000-token requests), or with `--engine vllm` a fresh real vLLM on the CPU
(engines/real/vllm.py) with the scenario scaled to it (bench/spike_scenario.py, VLLM_SEED):

  envoy           (1) Envoy only, no admission
  shedding        (2) shedding by scraped KV utilisation and queue depth, as the Gateway API Inference
                      Extension does (KV >= 0.8 or >= 5 waiting -> 429)
  kvgate          (3) kvgate
  kvgate-noburst  kvgate with the same steady traffic and no burst: the baseline of the goals
  envoy-noburst   Envoy only, no burst

Simulated engines run in real time (one simulated second is one second), so a run takes about as
long as its traffic: ~6 minutes for all five by default, ~35 s with --quick. vLLM adds its start
(~40 s on 2 cores) to every set-up.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
from tokenizers import Tokenizer

from bench import cpu
from bench.machine import describe
from bench.spike_client import run_load
from bench.spike_engines import ENGINES, SIM, Engine
from bench.spike_metrics import EngineSample, fetch, sample_engine
from bench.spike_report import (Run, RequestResult, SpikeReport, goals, pooled, render, summarize, to_json,
                                with_ratios)
from bench.spike_scenario import (BURST, QUICK, STEADY, VLLM_FIELDS, VLLM_MODEL, VLLM_QUICK, VLLM_SEED, Planned,
                                  Scenario, build_plan, catalog, vllm_catalog, without_burst)
from bench.spike_setups import SETUPS, Setup, Target, started
from engines.real.vllm import DEFAULT_MODEL_DIR, build_model, install
from kvgate.catalog import parse_catalog
from kvgate.chat_template import ChatTemplate, read_template
from kvgate.cli.envoy_bootstrap import envoy_binary

QUICK_SETUPS = ["envoy", "shedding", "kvgate", "kvgate-noburst"]
SAMPLE_EVERY_S = 0.25
# The first request is due this long after the clock starts, so it is not late already.
_START_SLACK_S = 0.2


def _setups(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETUPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(SETUPS)}: {text!r}")
    return list(dict.fromkeys(names))


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE: {text!r}")
    return name.strip().lower(), value.strip()


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.spike", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", type=_setups, help=f"comma-separated, run in this order (default: all: "
                                                  f"{','.join(SETUPS)}; with --quick: {','.join(QUICK_SETUPS)})")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny traffic, numbers mean nothing")
    p.add_argument("--engine", choices=ENGINES, default=SIM.name,
                   help="the simulator, or a real vLLM on the CPU with the scenario scaled to it (default: %(default)s)")
    d = Scenario()
    p.add_argument("--seed", type=int, help=f"seed of arrivals and prompts (default: {d.seed})")
    p.add_argument("--steady-rate", type=float, help=f"steady req/s (default: {d.steady_rate:g})")
    p.add_argument("--burst-count", type=int, help=f"requests in the burst (default: {d.burst_count})")
    p.add_argument("--duration", type=float, help=f"seconds of steady arrivals (default: {d.duration_s:g})")
    p.add_argument("--kvgate-catalog-extra", type=_json_object, default={}, metavar="JSON",
                   help="merged into the model's catalog entry, e.g. "
                        "'{\"prompt_estimate\": {\"bytes_per_token\": 1.0}}' (every set-up's engine is started "
                        "from this entry too)")
    p.add_argument("--steady-header", type=_header, action="append", default=[], metavar="NAME=VALUE",
                   help="sent with every steady request, in every set-up (e.g. x-kvgate-priority=high)")
    p.add_argument("--burst-header", type=_header, action="append", default=[], metavar="NAME=VALUE",
                   help="sent with every burst request, in every set-up")
    p.add_argument("--plots", type=Path, metavar="DIR",
                   help=f"write {', '.join(e.plot_name for e in ENGINES.values())} (by engine) there (e.g. docs)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run the set-ups N times, in rounds, and pool each set-up's requests: a steadier p99 "
                        "(the plot shows the first round)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = p.parse_args(argv)
    args.setups = args.setups or (QUICK_SETUPS if args.quick else list(SETUPS))
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def scenario_of(args: argparse.Namespace) -> Scenario:
    base = (VLLM_QUICK if args.quick else VLLM_SEED) if args.engine == "vllm" else QUICK if args.quick else Scenario()
    given = {"seed": args.seed, "steady_rate": args.steady_rate, "burst_count": args.burst_count,
             "duration_s": args.duration}
    s = replace(base, **{k: v for k, v in given.items() if v is not None})
    if s.duration_s <= s.burst_start_s + s.burst_window_s or s.steady_rate <= 0 or s.burst_count < 0:
        raise SystemExit("the burst must end before the steady arrivals do, with a positive rate")
    return s


async def _drive(target: Target, engine: Engine, plan: list[Planned], s: Scenario,
                 headers: Mapping[str, Mapping[str, str]]) -> tuple[list[RequestResult], list[EngineSample], int]:
    """The traffic of one run, with the engine sampled throughout; the engine's exhaustion counter is
    read before and after."""
    loop = asyncio.get_running_loop()
    counter = engine.metrics.exhaustion
    async with aiohttp.ClientSession() as session:
        before = (await fetch(session, target.engine_metrics_url, [counter]))[counter]
        samples: list[EngineSample] = []
        t0 = loop.time() + _START_SLACK_S
        sampler = asyncio.create_task(sample_engine(session, engine.metrics, target.engine_metrics_url,
                                                    target.ledger_metrics_url, t0, SAMPLE_EVERY_S, samples))
        try:
            recordings = await run_load(target.url, plan, headers, t0, s.give_up_s,
                                        stop_at=t0 + s.duration_s + s.drain_s)
        finally:
            sampler.cancel()
        after = (await fetch(session, target.engine_metrics_url, [counter]))[counter]
    return [RequestResult.of(r, s) for r in recordings], samples, int(after - before)


def measure(setup: Setup, engine: Engine, catalog_data: dict[str, Any], plan: list[Planned], s: Scenario,
            headers: Mapping[str, Mapping[str, str]], run_dir: Path) -> Run:
    started_at = time.monotonic()
    with started(setup.path, parse_catalog(catalog_data), run_dir / setup.name, engine) as target:
        before = cpu.snapshot(target.pids)
        # Objects alive now never need collecting again: frozen, full collections during the run stay
        # short (the client's own GC pauses would otherwise land in some set-up's latencies).
        gc.collect()
        gc.freeze()
        try:
            requests, samples, exhaustion = asyncio.run(
                _drive(target, engine, plan if setup.burst else without_burst(plan), s, headers))
        finally:
            gc.unfreeze()
        cpu_s = cpu.spent(before, cpu.snapshot(target.pids))
    return Run(setup, requests, samples, exhaustion, cpu_s, time.monotonic() - started_at)


def vllm_chat_tokens() -> Callable[[Sequence[dict[str, str]]], int]:
    """vLLM's count of a chat's prompt tokens: the tiny Llama's template rendered, then tokenized."""
    template = read_template(DEFAULT_MODEL_DIR / "tokenizer.json")
    assert template is not None
    chat, tokenizer = ChatTemplate(template), Tokenizer.from_file(str(DEFAULT_MODEL_DIR / "tokenizer.json"))
    return lambda messages: len(tokenizer.encode(chat.render({"messages": list(messages)}),
                                                 add_special_tokens=False).ids)


def plan_and_catalog(engine: Engine, s: Scenario, extra: dict[str, Any]) -> tuple[list[Planned], dict[str, Any]]:
    if engine.name == "vllm":
        build_model(DEFAULT_MODEL_DIR, install())  # before anything is timed; a no-op once done
        return build_plan(s, VLLM_MODEL, vllm_chat_tokens(), VLLM_FIELDS), vllm_catalog(DEFAULT_MODEL_DIR, s, extra)
    plan = build_plan(s)
    return plan, catalog(plan, extra)


def _progress(run: Run, s: Scenario) -> str:
    x = summarize(run, s)
    return (f"{run.setup.label:26} TTFT p50/p99 {x.ttft_p50_ms:8.1f} / {x.ttft_p99_ms:8.1f} ms  goodput "
            f"{x.goodput_rps:.3f} req/s  exhaustion {x.exhaustion_events}  refused steady/burst "
            f"{x.refused_steady}/{x.refused_burst}  failed {x.failed_steady}  ({run.wall_s:.0f} s)")


def main(argv: list[str] | None = None) -> SpikeReport:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started_at = time.monotonic()
    loadavg = Path("/proc/loadavg").read_text().strip()
    machine = describe(envoy_binary())
    s = scenario_of(args)
    engine = ENGINES[args.engine]
    plan, catalog_data = plan_and_catalog(engine, s, args.kvgate_catalog_extra)
    headers = {STEADY: dict(args.steady_header), BURST: dict(args.burst_header)}
    run_dir = Path(tempfile.mkdtemp(prefix="kvgate-spike-"))
    runs: list[Run] = []
    try:
        for _ in range(args.repeat):
            for name in args.setups:
                runs.append(measure(SETUPS[name], engine, catalog_data, plan, s, headers, run_dir))
                print(_progress(runs[-1], s), file=sys.stderr, flush=True)
    except BaseException:
        print(f"process logs kept in {run_dir}", file=sys.stderr)
        raise
    shutil.rmtree(run_dir)
    by_setup = [pooled([r for r in runs if r.setup.name == name]) for name in args.setups]
    summaries = with_ratios([summarize(r, s) for r in by_setup])
    report = SpikeReport(command=shlex.join([sys.executable, "-m", "bench.spike", *argv]), engine=engine.name,
                         exhaustion=engine.exhaustion, machine=machine, loadavg_before=loadavg, scenario=s,
                         catalog=catalog_data, summaries=summaries, goals=goals(summaries, engine.exhaustion),
                         runs=by_setup, wall_s=time.monotonic() - started_at, repeats=args.repeat)
    if args.plots:
        from bench.spike_plot import plot  # matplotlib only when a plot is asked for

        print(f"plot: {plot(runs[:len(args.setups)], s, args.plots / engine.plot_name)}", file=sys.stderr)
    print(to_json(report) if args.json else render(report))
    return report


if __name__ == "__main__":
    main()
