"""The data paths bench/spike compares, each started fresh with its own engine (the simulator or vLLM,
bench/spike_engines.py: identical, from the same catalog entry) and stopped on exit:

- envoy: Envoy alone, routing straight to the engine (envoy/bench-baseline.yaml, as bench/overhead).
- shedding: the same Envoy with the ext_proc filter kvgate uses, calling bench/spike_shedding.py.
- kvgate: a whole kvgate.cli.gateway.Gateway (xds_server, ext_proc, Envoy) serving the catalog.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.cpu import SELF
from bench.spike_engines import HOST, Engine, status, wait
from bench.targets import render_baseline
from kvgate.catalog import Address, Catalog
from kvgate.cli.envoy_bootstrap import envoy_binary
from kvgate.cli.gateway import Gateway, probe
from kvgate.cli.processes import Supervisor, free_port
from xds_server.render.resources import ext_proc_cluster, ext_proc_filter
from xds_server.settings import GatewaySettings

ENVOY, SHEDDING, KVGATE = "envoy", "shedding", "kvgate"


@dataclass(frozen=True)
class Setup:
    name: str  # as --setups names it
    label: str  # as the tables and plots name it
    path: str  # ENVOY, SHEDDING or KVGATE
    burst: bool


SETUPS = {s.name: s for s in (
    Setup("envoy", "(1) Envoy only", ENVOY, burst=True),
    Setup("shedding", "(2) shedding (GIE-like)", SHEDDING, burst=True),
    Setup("kvgate", "(3) kvgate", KVGATE, burst=True),
    Setup("kvgate-noburst", "kvgate, no burst", KVGATE, burst=False),
    Setup("envoy-noburst", "Envoy only, no burst", ENVOY, burst=False),
)}


@dataclass(frozen=True)
class Target:
    url: str  # where the load goes: http://host:port
    engine_metrics_url: str
    ledger_metrics_url: str | None  # kvgate's ext_proc metrics; None for the other set-ups
    pids: dict[str, int]  # role -> pid of every process a request goes through, this client included


def _role(child_name: str) -> str:
    """Process roles by child name, alike in every set-up (the comparator is the ext_proc role)."""
    for prefix, role in (("sim", "sim"), ("vllm", "vllm"), ("envoy", "envoy"), ("ext_proc", "ext_proc"),
                         ("shedder", "ext_proc"), ("xds_server", "xds_server")):
        if child_name.startswith(prefix):
            return role
    return child_name


def _pids(supervisor: Supervisor) -> dict[str, int]:
    return {"client": SELF, **{_role(c.name): c.proc.pid for c in supervisor.children}}


def with_ext_proc(envoy_config: str, ext_proc: Address) -> str:
    """The static Envoy config with kvgate's own ext_proc filter (and cluster) in front of the router,
    pointing at `ext_proc`: the same filter settings as the gateway's, so only the decisions differ."""
    settings = GatewaySettings(ext_proc=(ext_proc,))
    config = yaml.safe_load(envoy_config)
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                f["typed_config"]["http_filters"].insert(0, ext_proc_filter(settings))
    config["static_resources"]["clusters"].append(ext_proc_cluster(settings))
    return yaml.safe_dump(config, sort_keys=False)


def _static(path: str, catalog: Catalog, engine: Address, metrics_url: str, run_dir: Path,
            supervisor: Supervisor, kind: Engine) -> Target:
    listen, admin = free_port(), free_port()
    # The baseline also routes gRPC to a Triton engine; none here, so that unused route points at the
    # same engine.
    config = render_baseline(listen_port=listen, admin_port=admin, openai=engine,
                             triton=Address(host=engine.host, port=engine.port, grpc_port=engine.port))
    if path == SHEDDING:
        shedder = Address(host=HOST, port=free_port())
        supervisor.start("shedder", [sys.executable, "-m", "bench.spike_shedding", "--port", str(shedder.port),
                                     "--engine-metrics", metrics_url, "--kv-metric", kind.metrics.kv_utilization,
                                     "--waiting-metric", kind.metrics.waiting])
        config = with_ext_proc(config, shedder)
    (run_dir / "envoy.yaml").write_text(config)
    supervisor.start("envoy", [envoy_binary(), "-c", str(run_dir / "envoy.yaml"), "--log-level", "warn",
                               "--disable-hot-restart"])
    url = f"http://{HOST}:{listen}"
    # A one-token request through the whole path (for shedding: once it has scraped the engine).
    wait(supervisor, lambda: status(*probe(url, catalog.models[0])) == 200, path)
    return Target(url, metrics_url, None, _pids(supervisor))


@contextmanager
def started(path: str, catalog: Catalog, run_dir: Path, kind: Engine) -> Iterator[Target]:
    """One data path to the catalog's (single) model, with a fresh engine behind it, ready for traffic.
    The catalog's `sim` endpoint stands for that engine."""
    run_dir.mkdir(parents=True, exist_ok=True)
    model = catalog.models[0]
    supervisor = Supervisor(run_dir)
    try:
        with kind.started(model, run_dir, supervisor) as engine:
            metrics_url = f"http://{engine}{kind.metrics.path}"
            if path != KVGATE:
                yield _static(path, catalog, engine, metrics_url, run_dir, supervisor, kind)
                return
            gateway = Gateway(catalog.with_endpoints({model.name: [engine]}), run_dir=run_dir / "gateway",
                              port=free_port())
            gateway.start()  # ready: a request went through to the engine; stops everything if it fails
            try:
                yield Target(gateway.url, metrics_url, gateway.ext_proc_metrics_url,
                             {**_pids(supervisor), **_pids(gateway.supervisor)})
            finally:
                gateway.stop()
    finally:
        supervisor.stop_all()
