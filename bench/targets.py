"""The two set-ups under test, started together and sharing zero-latency simulated engines: Envoy
alone (the baseline) and the kvgate gateway (Envoy + xds_server + Python ext_proc). Both serve an
OpenAI model over HTTP and a Triton model over gRPC, on one listener each."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from bench.cpu import SELF
from kvgate.catalog import Address, parse_catalog
from kvgate.cli.envoy_bootstrap import ENVOY_CONFIG_DIR, envoy_binary
from kvgate.cli.gateway import Gateway, NotReady
from kvgate.cli.processes import Supervisor, free_port
from xds_server.settings import GatewaySettings

OPENAI_MODEL = "bench-model"
# The TensorRT-LLM ensemble's usual name, served under that same name: a backend_model that differs
# from the gateway's name makes ext_proc rewrite model_name in every ModelInferRequest.
TRITON_MODEL = "ensemble"
MAX_OUTPUT_TOKENS = 16


def _model(name: str, **fields: str) -> dict[str, Any]:
    return {
        "name": name, **fields, "endpoints": ["sim"], "max_context_tokens": 4096,
        "max_output_tokens": MAX_OUTPUT_TOKENS,
        # A budget no benchmark load comes near: admission must always admit, never queue or refuse.
        "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "16GiB"},
        "sim": {"ttft_base_ms": 0, "ttft_per_token_ms": 0, "itl_ms": 0, "batch_slowdown": 0},
    }


CATALOG = {"models": [_model(OPENAI_MODEL),
                      _model(TRITON_MODEL, protocol="triton", backend_model=TRITON_MODEL)]}


@dataclass(frozen=True)
class Target:
    name: str
    listener: str  # "host:port" where the load goes; HTTP/1.1 and h2c alike
    pids: dict[str, int]  # role -> pid of every process a request goes through, but the engine
    engines: dict[str, int]  # model -> pid of its simulated engine

    def pids_for(self, model: str) -> dict[str, int]:
        """Every process a request for `model` goes through, by role, for CPU accounting."""
        return {**self.pids, "sim": self.engines[model]}


def render_baseline(*, listen_port: int, admin_port: int, openai: Address, triton: Address,
                    max_request_bytes: int = GatewaySettings.max_request_bytes) -> str:
    text = (ENVOY_CONFIG_DIR / "bench-baseline.yaml").read_text()
    return Template(text).substitute(
        listen_port=listen_port, admin_port=admin_port, max_request_bytes=max_request_bytes,
        # As xds_server/render/resources.py sizes the gateway's HTTP/2 stream window.
        http2_stream_window=max(65535, max_request_bytes),
        engine_host=openai.host, engine_port=openai.port, triton_host=triton.host, triton_grpc_port=triton.grpc_port)


def _live(admin_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{admin_url}/ready", timeout=2) as resp:
            return resp.status == 200 and resp.read().strip() == b"LIVE"
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _wait_ready(supervisor: Supervisor, admin_url: str, target: Target, ready: Callable[[Target], bool],
                timeout_s: float = 30.0) -> None:
    """Envoy LIVE (config loaded), then `ready`: requests answered by the engines behind it."""
    deadline = time.monotonic() + timeout_s
    while not (_live(admin_url) and ready(target)):
        supervisor.check()
        if time.monotonic() > deadline:
            raise NotReady(f"{target.name} not ready after {timeout_s} s (logs in {supervisor.log_dir})")
        time.sleep(0.05)


def _pid(supervisor: Supervisor, prefix: str) -> int:
    return next(c.proc.pid for c in supervisor.children if c.name.startswith(prefix))


@contextmanager
def started(run_dir: Path, ready: Callable[[Target], bool]) -> Iterator[tuple[Target, Target]]:
    """(baseline, gateway), both `ready`; every process is stopped on exit."""
    gateway = Gateway(parse_catalog(CATALOG), run_dir=run_dir / "gateway", port=free_port())
    (run_dir / "baseline").mkdir(parents=True, exist_ok=True)
    baseline = Supervisor(run_dir / "baseline")
    try:
        gateway.start()
        listen_port, admin_port = free_port(), free_port()
        config = run_dir / "baseline" / "envoy.yaml"
        config.write_text(render_baseline(listen_port=listen_port, admin_port=admin_port,
                                          openai=gateway.sims[OPENAI_MODEL][0], triton=gateway.sims[TRITON_MODEL][0]))
        envoy = baseline.start("envoy-baseline", [envoy_binary(), "-c", str(config), "--log-level", "warn",
                                                  "--disable-hot-restart"])
        # The gateway names its engines sim-<model>-<index>.
        engines = {m: _pid(gateway.supervisor, f"sim-{m}-") for m in (OPENAI_MODEL, TRITON_MODEL)}
        targets = (Target("baseline", f"127.0.0.1:{listen_port}", {"client": SELF, "envoy": envoy.proc.pid}, engines),
                   Target("gateway", f"{gateway.host}:{gateway.port}",
                          {"client": SELF, "envoy": _pid(gateway.supervisor, "envoy-0"),
                           "ext_proc": _pid(gateway.supervisor, "ext_proc-0")}, engines))
        _wait_ready(baseline, f"http://127.0.0.1:{admin_port}", targets[0], ready)
        _wait_ready(gateway.supervisor, gateway.admin_url, targets[1], ready)
        yield targets
    finally:
        baseline.stop_all()
        gateway.stop()
