"""`python -m bench.xds`: the control plane's speed and cost.

(a) Propagation: from an admin API change (a model added or removed, a max_output_tokens clamp
changed) until every one of N real Envoys (each its own node group and listener) and ext_proc of one
gateway serve it, seen by probing each Envoy's data path (bench/xds_propagation.py).
(b) ADS fan-out: from one admin API change until N ModelPolicy subscribers (like ext_proc replicas)
have all ACKed it, with xds_server's CPU and memory (bench/xds_fanout.py, bench/xds_fleet.py).

Timings are from a shared, noisy machine: read them with the machine and the load average printed
with them.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from bench import xds_fanout, xds_propagation
from bench.machine import describe
from bench.xds_report import Settings, XdsReport, render, to_json
from kvgate.cli.envoy_bootstrap import envoy_binary

# Default run ~2 minutes on 2 cores.
DEFAULTS = {"changes": 100, "envoys": 10, "fanout_changes": 10, "clients": [100, 1000], "per_channel": 50,
            "poll_ms": 2.0}
QUICK = {"changes": 10, "envoys": 3, "fanout_changes": 3, "clients": [100]}


def _counts(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"values must be positive: {text!r}")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.xds", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--changes", type=int, help="propagation: add/remove changes, alternating, each followed by "
                                               "a clamp change (default: %(default)s; 0: skip)")
    p.add_argument("--envoys", type=int, help="propagation: Envoys, each probed until it shows every change "
                                              "(default: %(default)s)")
    p.add_argument("--clients", type=_counts, help="fan-out: subscriber counts, comma-separated; '' to skip "
                                                   "(default: %(default)s)")
    p.add_argument("--fanout-changes", type=int, help="fan-out: changes per subscriber count (default: %(default)s)")
    p.add_argument("--per-channel", type=int, help="fan-out: streams per gRPC channel (default: %(default)s)")
    p.add_argument("--poll-ms", type=float, help="propagation: least ms between probe starts (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help=f"a smoke run (~30 s): {QUICK} unless given")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(**DEFAULTS)
    # --quick only changes the defaults, so flags given with it still win.
    if p.parse_args(argv).quick:
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    if args.changes < 0 or min(args.envoys, args.fanout_changes, args.per_channel) < 1 or args.poll_ms < 0:
        p.error("--changes must be >= 0, --envoys, --fanout-changes and --per-channel >= 1, --poll-ms >= 0")
    if not args.changes and not args.clients:
        p.error("nothing to measure: give --changes or --clients")
    return args


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> XdsReport:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    load_before = Path("/proc/loadavg").read_text().strip()
    machine = describe(envoy_binary())
    run_dir = Path(tempfile.mkdtemp(prefix="kvgate-bench-xds-"))
    try:
        propagation = (xds_propagation.run(run_dir / "gateway", args.changes, args.poll_ms / 1000, args.envoys,
                                           progress=_progress) if args.changes else None)
        fanout = [xds_fanout.run(n, args.fanout_changes, args.per_channel, run_dir / f"fanout-{n}",
                                 progress=_progress) for n in args.clients]
    except BaseException:
        print(f"process logs kept in {run_dir}", file=sys.stderr)
        raise
    report = XdsReport(command=shlex.join([sys.executable, "-m", "bench.xds", *argv]), machine=machine,
                       load_before=load_before,
                       settings=Settings(changes=args.changes, envoys=args.envoys,
                                         fanout_changes=args.fanout_changes, clients=args.clients,
                                         per_channel=args.per_channel, poll_ms=args.poll_ms),
                       propagation=propagation, fanout=fanout)
    if report.errors:
        print(f"process logs kept in {run_dir}", file=sys.stderr)
    else:
        shutil.rmtree(run_dir)
    print(to_json(report) if args.json else render(report))
    return report


if __name__ == "__main__":
    sys.exit(1 if main().errors else 0)
