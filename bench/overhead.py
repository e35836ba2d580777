"""`python -m bench.overhead`: the latency and throughput kvgate's admission (Envoy + Python ext_proc)
adds over Envoy alone, on the same zero-latency simulated engines, measured in one run, for OpenAI
chat over HTTP and Triton's ModelInfer over gRPC.

Machines here are shared and noisy, so only same-run comparisons mean anything: both set-ups run side
by side and take turns under each load. The load generator shares the machine too; the baseline's
numbers include its cost, which is what keeps it visible.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from bench import cpu
from bench.loadgen import Load, PhaseResult, run_phase, send_one
from bench.machine import describe
from bench.protocols import PROTOCOLS, Protocol
from bench.report import Comparison, Report, Settings, Side, render, to_json
from bench.targets import MAX_OUTPUT_TOKENS, Target, started
from kvgate.cli.envoy_bootstrap import envoy_binary

# Default run ~3 minutes on 2 cores: 2 protocols x 5 loads x 2 set-ups x 2 rounds x 4 s, plus start-up.
# No 400 req/s: on 2 cores the gateway tops out near 400 req/s even closed loop, and an open loop
# at or above capacity measures only its own queue.
DEFAULTS = {"duration": 3.5, "warmup": 0.5, "rates": [50.0, 100.0, 200.0], "concurrency": [8, 32], "rounds": 2,
            "protocols": list(PROTOCOLS)}
QUICK = {"duration": 2.0, "rates": [50.0, 200.0], "concurrency": [8], "rounds": 1}


def _numbers(kind: type[float] | type[int]) -> Callable[[str], list[float]]:
    def parse(text: str) -> list[float]:
        values = [kind(v) for v in text.split(",") if v.strip()]
        if any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"values must be positive: {text!r}")
        return values
    return parse


def _protocols(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(PROTOCOLS)}: {text!r}")
    return list(dict.fromkeys(names))  # repeated names measured once


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocols", type=_protocols, help=f"comma-separated, of {', '.join(PROTOCOLS)} "
                                                        "(default: all)")
    p.add_argument("--duration", type=float, help="measured seconds per set-up, protocol, load and round "
                                                  "(default: %(default)s)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds before each phase (default: %(default)s)")
    p.add_argument("--rates", type=_numbers(float), help="open-loop req/s, comma-separated; '' for none "
                                                         "(default: %(default)s)")
    p.add_argument("--concurrency", type=_numbers(int), help="closed-loop concurrencies, comma-separated; '' for "
                                                             "none (default: %(default)s)")
    p.add_argument("--rounds", type=int, help="times each set-up runs each load, alternating (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK} unless given")
    p.add_argument("--profile", action="store_true", help="also report CPU ms per request of each process")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(**DEFAULTS)
    # --quick only changes the defaults, so flags given with it still win.
    if p.parse_args(argv).quick:
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    if not (args.rates or args.concurrency):
        p.error("nothing to measure: give --rates or --concurrency")
    if args.duration <= 0 or args.warmup < 0 or args.rounds < 1:
        p.error("--duration must be > 0, --warmup >= 0 and --rounds >= 1")
    return args


def measure(targets: tuple[Target, Target], protocols: list[Protocol], loads: list[Load],
            args: argparse.Namespace) -> list[Comparison]:
    keys = [(p.name, load) for p in protocols for load in loads]
    results = {(key, t.name): PhaseResult() for key in keys for t in targets}
    cpu_s: dict[tuple[tuple[str, Load], str], Counter[str]] = {key: Counter() for key in results}
    for round_ in range(args.rounds):
        for protocol, load in itertools.product(protocols, loads):
            # Swap who goes first every round, so drift on the machine weighs on both alike.
            for target in targets if round_ % 2 == 0 else targets[::-1]:
                key = ((protocol.name, load), target.name)
                pids = target.pids_for(protocol.model)
                before = cpu.snapshot(pids) if args.profile else {}
                phase = run_phase(protocol.client, target.listener, protocol.request, load, args.duration, args.warmup)
                if args.profile:
                    cpu_s[key].update(cpu.spent(before, cpu.snapshot(pids)))
                results[key] += phase
                print(f"round {round_ + 1}/{args.rounds}  {protocol.name:6}  {load.label:>16}  {target.name:8}  "
                      f"{phase.throughput_rps:6.0f} req/s  p50 {phase.percentile_ms(0.5):6.2f} ms  "
                      f"p99 {phase.percentile_ms(0.99):6.2f} ms  errors {sum(phase.errors.values())}",
                      file=sys.stderr, flush=True)
    baseline, gateway = (t.name for t in targets)
    return [Comparison.of(*key, Side.of(results[key, baseline], cpu_s[key, baseline]),
                          Side.of(results[key, gateway], cpu_s[key, gateway])) for key in keys]


def _answers_all(protocols: list[Protocol]) -> Callable[[Target], bool]:
    """Readiness: one request of each protocol succeeds."""
    return lambda target: all(send_one(p.client, target.listener, p.request) is None for p in protocols)


def main(argv: list[str] | None = None) -> Report:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    machine = describe(envoy_binary())
    protocols = [PROTOCOLS[name] for name in args.protocols]
    loads = [Load(rate=r) for r in args.rates] + [Load(concurrency=c) for c in args.concurrency]
    run_dir = Path(tempfile.mkdtemp(prefix="kvgate-bench-"))
    try:
        with started(run_dir, ready=_answers_all(protocols)) as targets:
            comparisons = measure(targets, protocols, loads, args)
    except BaseException:
        print(f"process logs kept in {run_dir}", file=sys.stderr)
        raise
    shutil.rmtree(run_dir)
    report = Report(command=shlex.join([sys.executable, "-m", "bench.overhead", *argv]), machine=machine,
                    settings=Settings(duration_s=args.duration, warmup_s=args.warmup, rounds=args.rounds,
                                      requests={p.name: p.description for p in protocols},
                                      request_bytes={p.name: len(p.request) for p in protocols},
                                      max_tokens=MAX_OUTPUT_TOKENS, profile=args.profile),
                    comparisons=comparisons)
    print(to_json(report) if args.json else render(report))
    return report


if __name__ == "__main__":
    sys.exit(1 if main().errors else 0)
