"""Three real Envoys (three node groups, three listeners) and two ext_proc replicas on one control
plane: every change reaches every one of them."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import yaml

from kvgate.cli import admin_client
from kvgate.catalog import parse_catalog
from kvgate.cli.gateway import Gateway
from tests.integration.conftest import ALPHA, alias_of_alpha, start_gateway, wait_for



@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(parse_catalog({"models": [ALPHA]}), tmp_path_factory.mktemp("fleet"),
                       extra_envoys=2, extra_ext_procs=1)
    yield gw
    gw.stop()


def clamp_everywhere(gw: Gateway, model: str) -> set[str | int]:
    """What each Envoy says of `model`: its clamp header, or the status when refused."""
    out: set[str | int] = set()
    for envoy in gw.envoys:
        for _ in range(4):  # Envoy spreads requests over both ext_proc replicas
            r = httpx.post(f"{envoy.url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 999})
            out.add(r.headers.get("x-kvgate-max-tokens", r.status_code))
    return out



def test_three_envoys_and_two_ext_procs_are_connected(fleet: Gateway) -> None:
    nodes = {n.id: n.group for n in admin_client.status(fleet.admin_address).nodes}
    assert nodes == {"envoy-0": "kvgate-envoy", "envoy-1": "kvgate-envoy-1", "envoy-2": "kvgate-envoy-2",
                     "ext-proc-0": "kvgate-ext-proc", "ext-proc-1": "kvgate-ext-proc"}
    assert len({e.port for e in fleet.envoys}) == 3
    assert clamp_everywhere(fleet, "alpha") == {"64"}


def test_add_change_and_remove_reach_every_envoy_and_ext_proc(fleet: Gateway) -> None:
    beta = alias_of_alpha(fleet, "beta")
    admin_client.apply_models(fleet.admin_address, yaml.safe_dump([beta]))
    wait_for(lambda: clamp_everywhere(fleet, "beta") == {"64"}, "beta served by every Envoy")
    admin_client.apply_models(fleet.admin_address, yaml.safe_dump([{**beta, "max_output_tokens": 9}]))
    wait_for(lambda: clamp_everywhere(fleet, "beta") == {"9"}, "the new clamp everywhere")
    admin_client.remove_model(fleet.admin_address, "beta")
    wait_for(lambda: clamp_everywhere(fleet, "beta") == {404}, "beta gone everywhere")
    assert clamp_everywhere(fleet, "alpha") == {"64"}


def test_every_node_acks_the_served_versions(fleet: Gateway) -> None:
    status = admin_client.status(fleet.admin_address)
    by_group_kind: dict[str, set[str]] = {}
    for n in status.nodes:
        by_group_kind.setdefault("envoy" if n.id.startswith("envoy") else "ext_proc", set()).update(
            f"{t}={v}" for t, v in n.acked_versions.items() if not t.endswith("Listener"))
    # Apart from each group's own listener, every Envoy ACKed the same versions; likewise ext_proc
    # (its tenants, policies and budget shares).
    assert len(by_group_kind["envoy"]) == 3 and len(by_group_kind["ext_proc"]) == 3
