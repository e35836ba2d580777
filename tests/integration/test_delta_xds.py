"""Envoy on incremental (Delta) ADS: the same gateway, every change sent as a diff."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
import yaml

from kvgate import admin_client
from kvgate.catalog import parse_catalog
from kvgate.gateway import Gateway
from tests.integration.conftest import start_gateway

ALPHA = {"name": "alpha", "endpoints": ["sim"], "max_context_tokens": 2048, "max_output_tokens": 64,
         "kv": {"bytes_per_token": 4096, "budget_per_endpoint": "256MiB"},
         "sim": {"ttft_base_ms": 0, "ttft_per_token_ms": 0, "itl_ms": 0, "batch_slowdown": 0}}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(parse_catalog({"models": [ALPHA]}), tmp_path_factory.mktemp("delta"), delta_xds=True)
    yield gw
    gw.stop()


def answer(gw: Gateway, model: str) -> str | int:
    r = httpx.post(f"{gw.url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 999})
    return r.headers.get("x-kvgate-max-tokens", r.status_code)


def eventually(check, what: str, timeout_s: float = 10.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"never saw: {what}"
        time.sleep(0.02)


def envoy_stat(gw: Gateway, name: str) -> int:
    text = httpx.get(f"{gw.admin_url}/stats", params={"filter": f"^{name}$"}).text
    return int(text.split(":")[1]) if ":" in text else 0


def test_delta_envoy_serves_and_follows_changes(gateway: Gateway) -> None:
    assert answer(gateway, "alpha") == "64"
    beta = {**ALPHA, "name": "beta", "backend_model": "alpha", "endpoints": [str(gateway.sims["alpha"][0])]}
    beta.pop("sim")
    admin_client.apply_models(gateway.admin_address, yaml.safe_dump([beta]))
    eventually(lambda: answer(gateway, "beta") == "64", "beta added")
    admin_client.apply_models(gateway.admin_address, yaml.safe_dump([{**beta, "max_output_tokens": 7}]))
    eventually(lambda: answer(gateway, "beta") == "7", "the new clamp")
    admin_client.remove_model(gateway.admin_address, "beta")
    eventually(lambda: answer(gateway, "beta") == 404, "beta removed")
    assert answer(gateway, "alpha") == "64"
    status = {n.id: n for n in admin_client.status(gateway.admin_address).nodes}
    assert len(status["envoy-0"].acked_versions) == 4 and not status["envoy-0"].HasField("last_nack")
    # Delta really is in use: Envoy counts its delta subscription updates.
    assert envoy_stat(gateway, "cluster_manager.cds.update_success") >= 3
