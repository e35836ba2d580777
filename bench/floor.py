"""`python -m bench.floor`: what kvgate adds over Envoy alone when the engine costs nothing.

Both set-ups route to the same upstream, an Envoy that answers every request itself, and take turns
under each load from wrk (a C load generator: a Python one on two cores would cost more than the
gateway it measures). What differs between them is only kvgate: ext_proc's exchange with Envoy, and
its decision. Same-run ratios only: the machines here are shared and noisy.

    python -m bench.floor                                  # a 2.4 KB chat at 1, 8 and 64 connections
    python -m bench.floor --body-kb 220 --concurrency 20,50,100,150   # long prompts (RAG, agents)
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from string import Template

import orjson

from bench import cpu, wrk
from bench.machine import Machine, describe
from bench.targets import render_baseline
from kvgate.catalog import Address, parse_catalog
from kvgate.cli.envoy_bootstrap import ENVOY_CONFIG_DIR, envoy_binary
from kvgate.cli.gateway import Gateway
from kvgate.cli.processes import Supervisor, free_port

MODEL = "floor"
MAX_REQUEST_BYTES = 4 * 2**20


def chat_body(kb: float) -> bytes:
    """An OpenAI chat of about `kb` KB: a system prompt and a user turn of ordinary English."""
    sentence = "The gateway reserves the KV cache a request can claim before the engine sees it. "
    words = sentence * max(1, int(kb * 1000 / len(sentence)))
    return orjson.dumps({"model": MODEL, "max_tokens": 64, "messages": [
        {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
        {"role": "user", "content": words}]})


def catalog(upstream: Address) -> dict:
    # A budget no load here comes near: admission always admits, never waits or refuses. No tokenizer:
    # prompts are bounded from their bytes; and no engine metrics, since the upstream has none.
    return {"models": [{"name": MODEL, "endpoints": [str(upstream)], "max_context_tokens": 262144,
                        "max_output_tokens": 64, "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "64GiB"},
                        "engine_metrics": {"scrape": False}}]}


@dataclass(frozen=True)
class SetUp:
    name: str
    url: str
    pids: dict[str, int]  # role -> pid, for CPU accounting


@dataclass
class Side:
    """One set-up under one load, all rounds together."""

    requests: int = 0
    seconds: float = 0.0
    errors: int = 0
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)

    def add(self, r: wrk.WrkResult, cpu_s: dict[str, float]) -> None:
        self.requests += r.requests
        self.seconds += r.duration_s
        self.errors += r.errors
        self.p50_ms.append(r.p50_ms)
        self.p99_ms.append(r.p99_ms)
        for role, s in cpu_s.items():
            self.cpu_s[role] = self.cpu_s.get(role, 0.0) + s

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def summary(self) -> dict:
        """Medians over rounds of each round's percentile; CPU ms per request by process."""
        median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        return {"requests": self.requests, "errors": self.errors, "rps": round(self.rps, 1),
                "p50_ms": median(self.p50_ms), "p99_ms": median(self.p99_ms),
                "cpu_ms_per_request": {r: round(1000 * s / self.requests, 3) for r, s in self.cpu_s.items()}
                if self.requests else {}}


@contextmanager
def started(run_dir: Path, ext_proc_workers: int = 1) -> Iterator[tuple[SetUp, SetUp]]:
    """(Envoy alone, kvgate with that many ext_proc processes), both in front of one fast upstream;
    everything stopped on exit."""
    procs = Supervisor(run_dir)
    gateway: Gateway | None = None
    try:
        upstream = Address(host="127.0.0.1", port=free_port())
        config = run_dir / "upstream.yaml"
        config.write_text(Template((ENVOY_CONFIG_DIR / "bench-fast-upstream.yaml").read_text()).substitute(
            listen_port=upstream.port, admin_port=free_port(), max_request_bytes=MAX_REQUEST_BYTES))
        up = procs.start("upstream", [envoy_binary(), "-c", str(config), "--log-level", "warn", "--disable-hot-restart",
                                      "--concurrency", "1"])
        port = free_port()
        baseline_config = run_dir / "baseline.yaml"
        baseline_config.write_text(render_baseline(listen_port=port, admin_port=free_port(), openai=upstream,
                                                   triton=Address(host="127.0.0.1", port=upstream.port,
                                                                  grpc_port=upstream.port),
                                                   max_request_bytes=MAX_REQUEST_BYTES))
        alone = procs.start("envoy-alone", [envoy_binary(), "-c", str(baseline_config), "--log-level", "warn",
                                            "--disable-hot-restart"])
        gateway = Gateway(parse_catalog(catalog(upstream)), run_dir=run_dir / "gateway", port=free_port(),
                          max_request_bytes=MAX_REQUEST_BYTES, extra_ext_procs=ext_proc_workers - 1)
        gateway.start()
        ext_procs = {c.name: c.proc.pid for c in gateway.supervisor.children if c.name.startswith("ext_proc")}
        sides = (SetUp("envoy alone", f"http://127.0.0.1:{port}/v1/chat/completions",
                       {"envoy": alone.proc.pid, "upstream": up.proc.pid}),
                 SetUp("kvgate", f"{gateway.url}/v1/chat/completions",
                       {"envoy": gateway.supervisor.get("envoy-0").proc.pid,  # type: ignore[union-attr]
                        **ext_procs, "upstream": up.proc.pid}))
        for side in sides:  # both answer before anything is measured
            deadline = time.monotonic() + 30
            while wrk.run(side.url, chat_body(1), 1, 1).errors:
                assert time.monotonic() < deadline, f"{side.name} never answered (logs in {run_dir})"
        yield sides
    finally:
        if gateway is not None:
            gateway.stop()
        procs.stop_all()


def measure(sides: tuple[SetUp, SetUp], body: bytes, concurrency: list[int], seconds: int,
            rounds: int) -> dict[int, dict[str, Side]]:
    out = {c: {s.name: Side() for s in sides} for c in concurrency}
    for round_ in range(rounds):
        for c in concurrency:
            # Who goes first alternates, so drift on the machine weighs on both alike.
            for side in sides if round_ % 2 == 0 else sides[::-1]:
                before = cpu.snapshot(side.pids)
                result = wrk.run(side.url, body, c, seconds, threads=min(2, c))
                out[c][side.name].add(result, cpu.spent(before, cpu.snapshot(side.pids)))
                print(f"round {round_ + 1}/{rounds}  c={c:<4} {side.name:12} {result.throughput_rps:8.0f} req/s  "
                      f"p50 {result.p50_ms:7.3f} ms  p99 {result.p99_ms:7.3f} ms  errors {result.errors}",
                      file=sys.stderr, flush=True)
    return out


def report(results: dict[int, dict[str, Side]], machine: Machine, command: str, body_bytes: int,
           load_before: float) -> str:
    lines = [f"# bench/floor: {machine.date}, {machine.nproc} cores ({machine.cpu_model}), Envoy {machine.envoy}, "
             f"load average before the run {load_before:.2f}",
             f"command: {command}", f"request body: {body_bytes} bytes", "",
             "| connections | Envoy alone req/s | kvgate req/s | ratio | Envoy alone p50 / p99 ms | "
             "kvgate p50 / p99 ms | added p50 / p99 ms | kvgate CPU ms/request |",
             "|---|---|---|---|---|---|---|---|"]
    for c, sides in results.items():
        alone, gate = sides["envoy alone"].summary(), sides["kvgate"].summary()
        cpu_ms = ", ".join(f"{role} {ms:.3f}" for role, ms in gate["cpu_ms_per_request"].items())
        ratio = gate["rps"] / alone["rps"] if alone["rps"] else float("nan")
        lines.append(f"| {c} | {alone['rps']:.0f} | {gate['rps']:.0f} | {ratio:.2f}x | "
                     f"{alone['p50_ms']:.3f} / {alone['p99_ms']:.3f} | {gate['p50_ms']:.3f} / {gate['p99_ms']:.3f} | "
                     f"+{gate['p50_ms'] - alone['p50_ms']:.3f} / +{gate['p99_ms'] - alone['p99_ms']:.3f} | {cpu_ms} |")
    errors = sum(s.errors for sides in results.values() for s in sides.values())
    lines.append(f"\nerrors: {errors}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,8,64", help="wrk connections, comma-separated (default: %(default)s)")
    p.add_argument("--body-kb", type=float, default=2.4, help="size of the chat body (default: %(default)s)")
    p.add_argument("--seconds", type=int, default=5, help="per set-up, load and round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="default: %(default)s")
    p.add_argument("--ext-proc-workers", type=int, default=1,
                   help="ext_proc processes, as `kvgate up --ext-proc-workers` (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not args.concurrency or min(args.concurrency) < 1 or args.seconds <= 0 or args.rounds < 1 \
            or args.ext_proc_workers < 1:
        p.error("need connections >= 1, --seconds > 0, --rounds >= 1, --ext-proc-workers >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    machine, load_before = describe(envoy_binary()), os.getloadavg()[0]
    command = shlex.join([sys.executable, "-m", "bench.floor", *argv])
    body = chat_body(args.body_kb)
    run_dir = Path(tempfile.mkdtemp(prefix="kvgate-floor-"))
    try:
        with started(run_dir, args.ext_proc_workers) as sides:
            results = measure(sides, body, args.concurrency, args.seconds, args.rounds)
    except BaseException:
        print(f"process logs kept in {run_dir}", file=sys.stderr)
        raise
    shutil.rmtree(run_dir)
    data = {"command": command, "machine": asdict(machine), "load_average_before": load_before, "body_bytes": len(body),
            "results": {str(c): {n: s.summary() for n, s in sides.items()} for c, sides in results.items()}}
    print(orjson.dumps(data).decode() if args.json else report(results, machine, command, len(body), load_before))
    return data


if __name__ == "__main__":
    main()
