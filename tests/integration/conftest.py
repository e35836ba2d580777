"""One real gateway (Envoy + xds_server + ext_proc + simulated engines) shared by a test module."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvgate.catalog import Catalog, parse_catalog
from kvgate.cli.gateway import Gateway
from kvgate.cli.processes import free_port

# Two models: `fast` has room to spare; `tiny` has a budget for one long request at a time and a
# slow engine, so reservations are held long enough to observe.
TEST_CATALOG = {
    "models": [
        {"name": "fast", "endpoints": ["sim"], "max_context_tokens": 4096, "max_output_tokens": 256,
         "kv": {"bytes_per_token": 131072, "budget_per_endpoint": "2GiB"},
         "sim": {"ttft_base_ms": 1, "ttft_per_token_ms": 0, "itl_ms": 1, "batch_slowdown": 0}},
        {"name": "org/tiny", "endpoints": ["sim"], "max_context_tokens": 512, "max_output_tokens": 128,
         "tokens_per_block": 16,
         "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "640KiB"},
         "sim": {"ttft_base_ms": 5, "ttft_per_token_ms": 0, "itl_ms": 25, "batch_slowdown": 0}},
    ],
    # By default a request that does not fit is refused at once; "patient" ones wait for budget.
    "priority_classes": [{"name": "interactive", "max_wait_s": 0}, {"name": "patient", "max_wait_s": 10}],
}
# Bodies over this get Envoy's own 413.
MAX_REQUEST_BYTES = 256 * 1024


def start_gateway(catalog: Catalog, run_dir: Path, **kwargs: object) -> Gateway:
    gw = Gateway(catalog, run_dir=run_dir, port=free_port(), **kwargs)
    gw.start(timeout_s=60)
    return gw


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(parse_catalog(TEST_CATALOG), tmp_path_factory.mktemp("gw"),
                       max_request_bytes=MAX_REQUEST_BYTES)
    yield gw
    gw.stop()


def ledger_metrics(gw: Gateway) -> dict[tuple[str, str], float]:
    """(metric, model) -> value summed over the model's endpoints, from ext_proc's Prometheus endpoint."""
    text = httpx.get(gw.ext_proc_metrics_url, timeout=30).text  # a busy machine can hold ext_proc seconds
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, s.labels.get("model", ""))
            out[key] = out.get(key, 0.0) + s.value
    return out


def wait_for(predicate: Callable[[], bool], what: str = "condition", timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def reserved(gw: Gateway, model: str) -> float:
    return ledger_metrics(gw)[("kvgate_kv_reserved_bytes", model)]


def sim_url(gw: Gateway, model: str) -> str:
    addr = gw.sims[model][0]
    return f"http://{addr.host}:{addr.port}"


def sim_requests(gw: Gateway, model: str) -> list[dict]:
    return httpx.get(f"{sim_url(gw, model)}/sim/requests").json()


# A one-engine model for the control-plane tests, with an engine that answers at once.
ALPHA = {"name": "alpha", "endpoints": ["sim"], "max_context_tokens": 2048, "max_output_tokens": 64,
         "kv": {"bytes_per_token": 4096, "budget_per_endpoint": "256MiB"},
         "sim": {"ttft_base_ms": 0, "ttft_per_token_ms": 0, "itl_ms": 0, "batch_slowdown": 0}}


def alias_of_alpha(gw: Gateway, name: str, **overrides: object) -> dict:
    """Another model on alpha's engine (which knows only `alpha`, hence backend_model)."""
    model = {**ALPHA, "name": name, "backend_model": "alpha", "endpoints": [str(gw.sims["alpha"][0])], **overrides}
    model.pop("sim")
    return model


def envoy_stat(gw: Gateway, name: str) -> int:
    text = httpx.get(f"{gw.admin_url}/stats", params={"filter": f"^{name}$"}).text
    return int(text.split(":")[1]) if ":" in text else 0
