"""The engines bench/prefix puts behind its set-ups, fresh (cold caches) for each set-up, and the set-ups
in front of them:

  sim    4 simulated vLLM engines (engines/sim, vLLM flavour, prefix caching on, one prefill lane each so
         that prefill is the engine's bottleneck as on a GPU)
  vllm   2 real vLLM replicas on the CPU (engines/real/vllm.py, the tiny random-weight Llama; vLLM's
         prefix caching is on by default), started as bench/spike starts one (bench/spike_engines.py)

  least-request   Envoy alone, its LEAST_REQUEST balancer over the engines (no kvgate)
  headroom        kvgate, `routing: headroom`: the endpoint with the most KV headroom
  prefix          kvgate, `routing: prefix` (the default): expected prefix hit and headroom
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.spike_engines import SIM as SPIKE_SIM
from bench.spike_engines import VLLM as SPIKE_VLLM
from bench.spike_engines import status, wait
from engines.real.vllm import DEFAULT_MODEL_DIR, SERVED_MODEL_NAME, build_model, install
from kvgate.catalog import Address, parse_catalog
from kvgate.cli.envoy_bootstrap import envoy_binary
from kvgate.cli.gateway import Gateway, probe
from kvgate.cli.processes import Supervisor, free_port

HOST = "127.0.0.1"
SETUPS = ("least-request", "headroom", "prefix")
HITS, QUERIES = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"


@dataclass(frozen=True)
class Engines:
    """Each simulated engine: a GPU-like prefill (~10,000 tokens/s, one prefill at a time) and decode."""

    count: int = 4
    kv_blocks: int = 4096  # 16-token blocks: 65,536 tokens each
    tokens_per_block: int = 16
    ttft_base_ms: float = 10.0
    ttft_per_token_ms: float = 0.1
    itl_ms: float = 10.0
    batch_slowdown: float = 0.01


# Each real vLLM replica: 240 blocks of 32 tokens (7,680 tokens; vLLM keeps one block aside) and 2,048
# tokens of context, as bench/spike's vLLM. The tiny Llama's KV is 512 bytes per token (2 layers x 2 KV
# heads x 32 x K and V x 2 bytes), read from its config.json.
VLLM_BLOCKS = 240
VLLM_BLOCK_TOKENS = 32
VLLM_CONTEXT = 2048


@dataclass(frozen=True)
class Fleet:
    """The engines of every set-up: how many, how to start them, and what the workload sends them."""

    name: str  # as --engine names it
    count: int
    model: str
    exhaustion: str  # the engines' counter of KV exhaustion
    exhaustion_label: str  # as the table names it
    body_fields: dict[str, Any]  # added to every request
    catalog: Callable[[str], dict[str, Any]]  # routing -> the catalog, with `sim` endpoints for the engines
    plot_name: str

    def prepare(self) -> None:
        """What the engines need before anything is timed (a no-op once done)."""
        if self.name == "vllm":
            build_model(DEFAULT_MODEL_DIR, install())


SIM_MODEL = "shared-prefix"


def sim_catalog(routing: str, e: Engines = Engines()) -> dict[str, Any]:
    """The model over the simulated engines; its budget is exactly each engine's cache (vLLM's null block
    aside, which ext_proc reads from the engine). No tokenizer: prompts are bounded at 4 bytes per token
    (the simulator's words average ~6.5 bytes with their space: the bound stays above its count)."""
    return {"models": [{
        "name": SIM_MODEL, "engine": "vllm", "routing": routing, "max_context_tokens": 65536, "max_output_tokens": 1024,
        "tokens_per_block": e.tokens_per_block, "endpoints": ["sim"] * e.count,
        "kv": {"bytes_per_token": 1024, "budget_per_endpoint": e.kv_blocks * e.tokens_per_block * 1024},
        "prompt_estimate": {"bytes_per_token": 4.0},
    }], "priority_classes": [{"name": "default", "max_wait_s": 30}]}


def vllm_catalog(routing: str) -> dict[str, Any]:
    """The tiny Llama over the replicas: its tokenizer and chat template (prompts counted exactly), each
    replica's whole cache as its budget (ext_proc reads vLLM's null block from the engine)."""
    return {"models": [{
        "name": SERVED_MODEL_NAME, "engine": "vllm", "routing": routing, "max_context_tokens": VLLM_CONTEXT,
        "max_output_tokens": 256, "tokens_per_block": VLLM_BLOCK_TOKENS, "endpoints": ["sim"] * 2,
        "tokenizer": str(DEFAULT_MODEL_DIR / "tokenizer.json"),
        "kv": {"config_json": str(DEFAULT_MODEL_DIR / "config.json"),
               "budget_per_endpoint": VLLM_BLOCKS * VLLM_BLOCK_TOKENS * 512},
    }], "priority_classes": [{"name": "default", "max_wait_s": 30}]}


SIM = Fleet("sim", Engines().count, SIM_MODEL, SPIKE_SIM.metrics.exhaustion, "KV exhaustion", {}, sim_catalog,
            "prefix-ttft.png")
# The tiny Llama's random weights end a generation at any step: every request asks for all its tokens.
VLLM = Fleet("vllm", 2, SERVED_MODEL_NAME, SPIKE_VLLM.metrics.exhaustion, "preemptions", {"ignore_eos": True},
             vllm_catalog, "prefix-vllm-ttft.png")
FLEETS = {f.name: f for f in (SIM, VLLM)}


def _sim_argv(e: Engines, port: int) -> list[str]:
    return [sys.executable, "-m", "engines.sim", "--flavor", "vllm", "--prefix-caching", "--prefill-lanes", "1",
            "--host", HOST, "--port", str(port), "--model", SIM_MODEL, "--kv-blocks", str(e.kv_blocks),
            "--tokens-per-block", str(e.tokens_per_block), "--ttft-base-ms", str(e.ttft_base_ms),
            "--ttft-per-token-ms", str(e.ttft_per_token_ms), "--itl-ms", str(e.itl_ms),
            "--batch-slowdown", str(e.batch_slowdown)]


def _ready(supervisor: Supervisor, url: str, model: str, what: str) -> None:
    # The gateway's own probe prompt: vLLM 0.32's CPU worker died (SIGILL) on its first request with the
    # prompt "x" or "hello" on an AMX machine (docs/benchmarks.md, "Prefix-cache-aware routing").
    body = {"model": model, "prompt": "kvgate probe", "max_tokens": 1}
    wait(supervisor, lambda: status(f"{url}/v1/completions", body) == 200, what)


@contextmanager
def _engines(fleet: Fleet, run_dir: Path, supervisor: Supervisor) -> Iterator[list[Address]]:
    if fleet.name == "sim":
        e = Engines()
        engines = [Address(host=HOST, port=free_port()) for _ in range(e.count)]
        for i, a in enumerate(engines):
            supervisor.start(f"sim-{i}", _sim_argv(e, a.port))
        for a in engines:
            _ready(supervisor, f"http://{a}", fleet.model, str(a))
        yield engines
        return
    model = parse_catalog(fleet.catalog("prefix")).models[0]
    with ExitStack() as stack:
        yield [stack.enter_context(SPIKE_VLLM.started(model, run_dir / f"replica-{i}", supervisor))
               for i in range(fleet.count)]


def _envoy_least_request(listen: int, admin: int, engines: list[Address]) -> dict[str, Any]:
    endpoints = [{"endpoint": {"address": {"socket_address": {"address": a.host, "port_value": a.port}}}}
                 for a in engines]
    return {
        "admin": {"address": {"socket_address": {"address": HOST, "port_value": admin}}},
        "static_resources": {
            "listeners": [{"name": "http", "address": {"socket_address": {"address": HOST, "port_value": listen}},
                           "filter_chains": [{"filters": [{
                               "name": "envoy.filters.network.http_connection_manager",
                               "typed_config": {
                                   "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                            "http_connection_manager.v3.HttpConnectionManager",
                                   "stat_prefix": "http",
                                   "route_config": {"virtual_hosts": [{
                                       "name": "all", "domains": ["*"],
                                       "routes": [{"match": {"prefix": "/"},
                                                   "route": {"cluster": "engines", "timeout": "300s"}}]}]},
                                   "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                                       "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                               }}]}]}],
            "clusters": [{"name": "engines", "type": "STATIC", "connect_timeout": "1s", "lb_policy": "LEAST_REQUEST",
                          "circuit_breakers": {"thresholds": [{"max_requests": 100000, "max_pending_requests": 100000,
                                                                "max_connections": 100000}]},
                          "load_assignment": {"cluster_name": "engines", "endpoints": [{"lb_endpoints": endpoints}]}}],
        },
    }


@contextmanager
def started(setup: str, fleet: Fleet, run_dir: Path) -> Iterator[tuple[str, list[Address]]]:
    """Fresh engines and the set-up in front of them: (the URL the load goes to, the engines)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor(run_dir)
    try:
        with _engines(fleet, run_dir, supervisor) as engines:
            if setup == "least-request":
                listen, admin = free_port(), free_port()
                (run_dir / "envoy.yaml").write_text(yaml.safe_dump(_envoy_least_request(listen, admin, engines)))
                supervisor.start("envoy", [envoy_binary(), "-c", str(run_dir / "envoy.yaml"), "--log-level", "warn",
                                           "--disable-hot-restart"])
                url = f"http://{HOST}:{listen}"
                _ready(supervisor, url, fleet.model, "envoy")
                yield url, engines
                return
            cat = parse_catalog(fleet.catalog("headroom" if setup == "headroom" else "prefix"))
            cat = cat.with_endpoints({fleet.model: engines})
            gateway = Gateway(cat, run_dir=run_dir / "gateway", port=free_port())
            gateway.start()
            try:
                wait(supervisor, lambda: status(*probe(gateway.url, cat.models[0])) == 200, "gateway")
                # ext_proc counts an engine it has not read yet as full: none may start out of the running.
                wait(supervisor, lambda: _sees(gateway.ext_proc_metrics_url) == len(engines), "kvgate's engine metrics")
                yield gateway.url, engines
            finally:
                gateway.stop()
    finally:
        supervisor.stop_all()


def _sees(ext_proc_metrics_url: str) -> int:
    """How many engines ext_proc has fresh metrics of (kvgate_kv_engine_blind 0)."""
    try:
        with urllib.request.urlopen(ext_proc_metrics_url, timeout=2) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return 0
    return sum(1 for family in text_string_to_metric_families(text) if family.name == "kvgate_kv_engine_blind"
               for sample in family.samples if sample.value == 0)


async def engine_counters(fleet: Fleet, engines: list[Address]) -> list[dict[str, float]]:
    """Each engine's prefix-cache hits and queries (in tokens) and KV exhaustion."""
    out = []
    async with aiohttp.ClientSession() as session:
        for a in engines:
            counters = dict.fromkeys((HITS, QUERIES, fleet.exhaustion), 0.0)
            async with session.get(f"http://{a}/metrics") as r:
                for line in (await r.text()).splitlines():
                    name = line.split("{", 1)[0].split(" ", 1)[0]
                    if name in counters:
                        counters[name] += float(line.rsplit(" ", 1)[1])
            out.append(counters)
    return out
