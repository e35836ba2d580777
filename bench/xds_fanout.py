"""ADS fan-out: one xds_server process (`python -m xds_server --no-watch`, measured alone) and N
ModelPolicy streams from one client process (bench/xds_fleet.py); how long one admin API change takes
until every stream has ACKed it, and what the streams cost xds_server in CPU and memory.

Each N gets a fresh xds_server, so its memory before the clients connect is a clean baseline. The
changes alternate between adding and removing a second model (both change the ModelPolicy set). The
engine addresses in the catalog are never dialled: xds_server only renders them.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import yaml

from bench.cpu import cpu_seconds
from bench.xds_report import Fanout, Stats
from kvgate.cli import admin_client
from kvgate.cli.processes import Supervisor, free_port

CATALOG = {"models": [{"name": "alpha", "endpoints": ["127.0.0.1:9"], "max_context_tokens": 2048,
                       "max_output_tokens": 64, "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "16GiB"}}]}
ADDED = {**CATALOG["models"][0], "name": "beta", "backend_model": "alpha"}
SETTLE_S = 0.25  # after the last ACK, before reading CPU: the server still reads the ACKs
CONNECT_TIMEOUT_S = 120.0
REPO_ROOT = Path(__file__).resolve().parents[1]  # where `-m bench.xds_fleet` resolves, from any cwd
CHANGE_TIMEOUT_S = 60.0


def memory_mib(pid: int, field: str = "VmRSS") -> float:
    """A memory line of /proc/<pid>/status (the kernel counts kB), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class FleetProcess:
    """bench.xds_fleet as a child: its JSON events arrive on a queue, read by a thread."""

    def __init__(self, target: str, clients: int, per_channel: int, log: IO[bytes]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.xds_fleet", "--target", target, "--clients", str(clients),
             "--per-channel", str(per_channel)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO_ROOT)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            self.events.put(json.loads(line))
        self.events.put({"event": "exited"})

    def next(self, wanted: str, timeout_s: float) -> dict[str, Any]:
        """The next `wanted` event; raises on a stream error, an early exit or a timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no '{wanted}' from the client fleet after {timeout_s:g} s") from None
            if event["event"] == wanted:
                return event
            if event["event"] in ("error", "exited"):
                raise RuntimeError(f"client fleet: {event}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin
                self.proc.stdin.write("stop\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def _wait_serving(server: str, supervisor: Supervisor, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        supervisor.check()
        try:
            admin_client.list_models(server)
            return
        except admin_client.AdminError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def run(clients: int, changes: int, per_channel: int, run_dir: Path,
        progress: Callable[[str], None] = lambda _: None) -> Fanout:
    run_dir.mkdir(parents=True, exist_ok=True)
    catalog = run_dir / "catalog.yaml"
    catalog.write_text(yaml.safe_dump(CATALOG))
    port = free_port()
    server = f"127.0.0.1:{port}"
    supervisor = Supervisor(run_dir)
    xds = supervisor.start("xds_server", [sys.executable, "-m", "xds_server", "--catalog", str(catalog),
                                          "--port", str(port), "--no-watch", "--http-port", "0"])
    pid = xds.proc.pid
    errors: list[str] = []
    all_acked, first_acked, admin_s, server_cpu, client_cpu = [], [], [], [], []
    connect_s = connect_cpu = rss_before = rss_connected = rss_after = hwm = float("nan")
    channels = -(-clients // per_channel)
    fleet = None
    try:
        _wait_serving(server, supervisor)
        time.sleep(0.2)
        rss_before = memory_mib(pid)
        cpu0 = cpu_seconds(pid)
        with open(run_dir / f"fleet-{clients}.log", "ab") as log:
            fleet = FleetProcess(server, clients, per_channel, log)
        started = fleet.next("started", CONNECT_TIMEOUT_S)
        ready = fleet.next("ready", CONNECT_TIMEOUT_S)
        connect_s = ready["last_s"] - started["at"]
        connect_cpu = cpu_seconds(pid) - cpu0
        time.sleep(0.5)
        rss_connected = memory_mib(pid)
        progress(f"fan-out {clients}: all connected in {connect_s:.2f} s, xds_server RSS {rss_connected:.1f} MiB")
        for i in range(changes):
            before = (cpu_seconds(pid), cpu_seconds(fleet.proc.pid))
            t0 = time.monotonic()
            if i % 2 == 0:
                admin_client.apply_models(server, yaml.safe_dump([ADDED]))
            else:
                admin_client.remove_model(server, ADDED["name"])
            admin_s.append(time.monotonic() - t0)
            acked = fleet.next("acked", CHANGE_TIMEOUT_S)
            all_acked.append(acked["last_s"] - t0)
            first_acked.append(acked["first_s"] - t0)
            time.sleep(SETTLE_S)
            server_cpu.append(cpu_seconds(pid) - before[0])
            client_cpu.append(cpu_seconds(fleet.proc.pid) - before[1])
            progress(f"fan-out {clients}: change {i + 1}/{changes}: all ACKed in {1000 * all_acked[-1]:.1f} ms")
        rss_after, hwm = memory_mib(pid), memory_mib(pid, "VmHWM")
    except (RuntimeError, TimeoutError, OSError, admin_client.AdminError) as e:
        errors.append(f"fan-out {clients}: {e}")
    finally:
        if fleet:
            fleet.stop()
        supervisor.stop_all()

    def per_change_ms(seconds: list[float]) -> float:
        return 1000 * sum(seconds) / len(seconds) if seconds else float("nan")

    return Fanout(clients=clients, channels=channels, changes=len(all_acked), connect_s=connect_s,
                  all_acked=Stats.of(all_acked), first_acked=Stats.of(first_acked), admin=Stats.of(admin_s),
                  server_cpu_ms_per_change=per_change_ms(server_cpu),
                  client_cpu_ms_per_change=per_change_ms(client_cpu),
                  server_cpu_connect_s=connect_cpu, rss_before_mib=rss_before, rss_connected_mib=rss_connected,
                  rss_after_mib=rss_after, hwm_mib=hwm, errors=errors)
