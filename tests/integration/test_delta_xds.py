"""Envoy on incremental (Delta) ADS: the same gateway, every change sent as a diff."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import yaml

from kvgate.cli import admin_client
from kvgate.catalog import parse_catalog
from kvgate.cli.gateway import Gateway
from tests.integration.conftest import ALPHA, alias_of_alpha, envoy_stat, start_gateway, wait_for



@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(parse_catalog({"models": [ALPHA]}), tmp_path_factory.mktemp("delta"), delta_xds=True)
    yield gw
    gw.stop()


def answer(gw: Gateway, model: str) -> str | int:
    r = httpx.post(f"{gw.url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 999})
    return r.headers.get("x-kvgate-max-tokens", r.status_code)




def test_delta_envoy_serves_and_follows_changes(gateway: Gateway) -> None:
    assert answer(gateway, "alpha") == "64"
    beta = alias_of_alpha(gateway, "beta")
    admin_client.apply_models(gateway.admin_address, yaml.safe_dump([beta]))
    wait_for(lambda: answer(gateway, "beta") == "64", "beta added")
    admin_client.apply_models(gateway.admin_address, yaml.safe_dump([{**beta, "max_output_tokens": 7}]))
    wait_for(lambda: answer(gateway, "beta") == "7", "the new clamp")
    admin_client.remove_model(gateway.admin_address, "beta")
    wait_for(lambda: answer(gateway, "beta") == 404, "beta removed")
    assert answer(gateway, "alpha") == "64"
    status = {n.id: n for n in admin_client.status(gateway.admin_address).nodes}
    assert len(status["envoy-0"].acked_versions) == 4 and not status["envoy-0"].HasField("last_nack")
    # Delta really is in use: Envoy counts its delta subscription updates.
    assert envoy_stat(gateway, "cluster_manager.cds.update_success") >= 3
