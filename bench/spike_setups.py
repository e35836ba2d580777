"""The data paths bench/spike compares, each started fresh with its own simulated engine (identical
config: kvgate.cli.gateway.sim_argv of the same catalog entry) and stopped on exit:

- envoy: Envoy alone, routing straight to the engine (envoy/bench-baseline.yaml, as bench/overhead).
- shedding: the same Envoy with the ext_proc filter kvgate uses, calling bench/spike_shedding.py.
- kvgate: a whole kvgate.cli.gateway.Gateway (xds_server, ext_proc, Envoy) serving the catalog.
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

from bench.cpu import SELF
from bench.targets import render_baseline
from kvgate.catalog import Address, Catalog, Model
from kvgate.cli.envoy_bootstrap import envoy_binary
from kvgate.cli.gateway import Gateway, NotReady, health_url, probe, sim_argv
from kvgate.cli.processes import Supervisor, free_port
from xds_server.render.resources import ext_proc_cluster, ext_proc_filter
from xds_server.settings import GatewaySettings

HOST = "127.0.0.1"
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
    for prefix, role in (("sim", "sim"), ("envoy", "envoy"), ("ext_proc", "ext_proc"), ("shedder", "ext_proc"),
                         ("xds_server", "xds_server")):
        if child_name.startswith(prefix):
            return role
    return child_name


def _pids(supervisor: Supervisor) -> dict[str, int]:
    return {"client": SELF, **{_role(c.name): c.proc.pid for c in supervisor.children}}


def _status(url: str, body: dict[str, Any] | None = None) -> int:
    """HTTP status of one GET (or POST of `body`); 0 when nothing answered."""
    data = orjson.dumps(body) if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


def _wait(supervisor: Supervisor, ready: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        supervisor.check()
        if time.monotonic() > deadline:
            raise NotReady(f"{what} not ready after {timeout_s} s (logs in {supervisor.log_dir})")
        time.sleep(0.05)


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


def _engine_metrics(engine: Address) -> str:
    return f"http://{engine}/prometheus/metrics"


@contextmanager
def _static(path: str, model: Model, run_dir: Path) -> Iterator[Target]:
    supervisor = Supervisor(run_dir)
    try:
        engine = Address(host=HOST, port=free_port())
        supervisor.start("sim", sim_argv(model, engine))
        _wait(supervisor, lambda: _status(health_url(model, engine)) == 200, "simulated engine")
        listen, admin = free_port(), free_port()
        # The baseline also routes gRPC to a Triton engine; none here, so that unused route points at
        # the same engine.
        config = render_baseline(listen_port=listen, admin_port=admin, openai=engine,
                                 triton=Address(host=engine.host, port=engine.port, grpc_port=engine.port))
        if path == SHEDDING:
            shedder = Address(host=HOST, port=free_port())
            supervisor.start("shedder", [sys.executable, "-m", "bench.spike_shedding", "--port", str(shedder.port),
                                         "--engine-metrics", _engine_metrics(engine)])
            config = with_ext_proc(config, shedder)
        (run_dir / "envoy.yaml").write_text(config)
        supervisor.start("envoy", [envoy_binary(), "-c", str(run_dir / "envoy.yaml"), "--log-level", "warn",
                                   "--disable-hot-restart"])
        url = f"http://{HOST}:{listen}"
        # A one-token request through the whole path (for shedding: once it has scraped the engine).
        _wait(supervisor, lambda: _status(*probe(url, model)) == 200, path)
        yield Target(url, _engine_metrics(engine), None, _pids(supervisor))
    finally:
        supervisor.stop_all()


@contextmanager
def _kvgate(catalog: Catalog, run_dir: Path) -> Iterator[Target]:
    gateway = Gateway(catalog, run_dir=run_dir, port=free_port())
    gateway.start()  # ready: a request went through to the engine; stops everything if it fails
    try:
        (engine,) = gateway.sims[catalog.models[0].name]
        yield Target(gateway.url, _engine_metrics(engine), gateway.ext_proc_metrics_url, _pids(gateway.supervisor))
    finally:
        gateway.stop()


@contextmanager
def started(path: str, catalog: Catalog, run_dir: Path) -> Iterator[Target]:
    """One data path to the catalog's (single) model, ready for traffic."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if path == KVGATE:
        with _kvgate(catalog, run_dir) as target:
            yield target
    else:
        with _static(path, catalog.models[0], run_dir) as target:
            yield target
