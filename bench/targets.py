"""The two set-ups under test, started together and sharing one zero-latency simulated engine:
Envoy alone (the baseline) and the kvgate gateway (Envoy + xds_server + Python ext_proc)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from string import Template

from bench.cpu import SELF
from kvgate.catalog import Address, parse_catalog
from kvgate.envoy_bootstrap import ENVOY_CONFIG_DIR, envoy_binary
from kvgate.gateway import Gateway, NotReady
from kvgate.processes import Supervisor, free_port
from xds_server.settings import GatewaySettings

MODEL = "bench-model"
CHAT_PATH = "/v1/chat/completions"
MAX_OUTPUT_TOKENS = 16
CATALOG = {"models": [{
    "name": MODEL, "endpoints": ["sim"], "max_context_tokens": 4096, "max_output_tokens": MAX_OUTPUT_TOKENS,
    # A budget no benchmark load comes near: admission must always admit, never queue or refuse.
    "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "16GiB"},
    "sim": {"ttft_base_ms": 0, "ttft_per_token_ms": 0, "itl_ms": 0, "batch_slowdown": 0},
}]}


@dataclass(frozen=True)
class Target:
    name: str
    url: str  # where the load goes: the chat completions URL
    pids: dict[str, int]  # role -> pid of every process a request goes through, for CPU accounting


def render_baseline(*, listen_port: int, admin_port: int, upstream: Address,
                    max_request_bytes: int = GatewaySettings.max_request_bytes) -> str:
    text = (ENVOY_CONFIG_DIR / "bench-baseline.yaml").read_text()
    return Template(text).substitute(listen_port=listen_port, admin_port=admin_port, upstream_host=upstream.host,
                                     upstream_port=upstream.port, max_request_bytes=max_request_bytes)


def _status(url: str, body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return resp.status, resp.read().strip()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def _wait_ready(supervisor: Supervisor, admin_url: str, url: str, probe: bytes, timeout_s: float = 30.0) -> None:
    """Envoy LIVE (config loaded), then one request answered 200 by the engine behind it."""
    deadline = time.monotonic() + timeout_s
    while _status(f"{admin_url}/ready") != (200, b"LIVE") or _status(url, probe)[0] != 200:
        supervisor.check()
        if time.monotonic() > deadline:
            raise NotReady(f"baseline Envoy not ready after {timeout_s} s (logs in {supervisor.log_dir})")
        time.sleep(0.05)


def _pid(supervisor: Supervisor, prefix: str) -> int:
    return next(c.proc.pid for c in supervisor.children if c.name.startswith(prefix))


@contextmanager
def started(run_dir: Path, probe: bytes) -> Iterator[tuple[Target, Target]]:
    """(baseline, gateway), both answering `probe` with a 200; every process is stopped on exit."""
    gateway = Gateway(parse_catalog(CATALOG), run_dir=run_dir / "gateway", port=free_port())
    (run_dir / "baseline").mkdir(parents=True, exist_ok=True)
    baseline = Supervisor(run_dir / "baseline")
    try:
        gateway.start()
        engine = gateway.sims[MODEL][0]
        listen_port, admin_port = free_port(), free_port()
        config = run_dir / "baseline" / "envoy.yaml"
        config.write_text(render_baseline(listen_port=listen_port, admin_port=admin_port, upstream=engine))
        envoy = baseline.start("envoy-baseline", [envoy_binary(), "-c", str(config), "--log-level", "warn",
                                                  "--disable-hot-restart"])
        baseline_url = f"http://127.0.0.1:{listen_port}{CHAT_PATH}"
        _wait_ready(baseline, f"http://127.0.0.1:{admin_port}", baseline_url, probe)
        sim = _pid(gateway.supervisor, "sim-")
        yield (Target("baseline", baseline_url, {"client": SELF, "envoy": envoy.proc.pid, "sim": sim}),
               Target("gateway", gateway.url + CHAT_PATH,
                      {"client": SELF, "envoy": _pid(gateway.supervisor, "envoy"),
                       "ext_proc": _pid(gateway.supervisor, "ext_proc"), "sim": sim}))
    finally:
        baseline.stop_all()
        gateway.stop()
