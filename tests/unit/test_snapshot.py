"""xds_server/snapshot.py: resources versioned by content once, when they are built; snapshots compared
by their clusters for make before break."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DiscoveryRequest
from kvgate.catalog import parse_catalog
from xds_server.delta import DeltaStream
from xds_server.render.build import build_snapshot
from xds_server.resource_types import CLUSTER, ENDPOINT, PUSH_ORDER
from xds_server.settings import GatewaySettings
from xds_server.snapshot import Resources, Snapshot, resource_version
from xds_server.sotw import SotwStream


def snap(*names: str, **overrides: Any) -> Snapshot:
    return build_snapshot(parse_catalog({"models": [
        {"name": n, "endpoints": ["10.0.0.1:8000"], "max_context_tokens": 4096,
         "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "1GiB"}, **overrides} for n in names]}),
        GatewaySettings())


def test_every_resource_has_the_version_of_its_content() -> None:
    s = snap("a", "b")
    for type_url in PUSH_ORDER:
        res = s.get(type_url)
        assert res.versions == {n: resource_version(a.value) for n, a in res.items.items()}
    assert Resources(version="").versions == {}


def test_a_set_version_follows_names_and_contents_only() -> None:
    res = snap("a", "b").get(CLUSTER)
    assert Resources.packed(dict(reversed(res.items.items()))).version == res.version
    renamed = {f"x{n}": a for n, a in res.items.items()}
    assert Resources.packed(renamed).version != res.version


def test_added_and_dropped_clusters_compare_the_new_snapshot_with_the_old() -> None:
    old, new = snap("a", "b"), snap("a", "c")
    assert new.clusters_added_since(old) == {"kvgate_model/c"}
    assert new.clusters_dropped_since(old) == {"kvgate_model/b"}
    assert new.clusters_added_since(new) == set() == new.clusters_dropped_since(new)


def test_keeping_clusters_versions_the_merged_resources() -> None:
    bridge = snap("a").keeping_clusters_of(snap("a", "b"))
    for type_url in (CLUSTER, ENDPOINT):
        res = bridge.get(type_url)
        assert "kvgate_model/b" in res.items
        assert res.versions == {n: resource_version(a.value) for n, a in res.items.items()}
        assert res.version == Resources.packed(res.items).version


def test_the_streams_hash_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Versions are computed when the snapshot is built; a stream only compares them."""
    before, after = snap("a", "b"), snap("a", "c", max_output_tokens=9)
    delta, sotw = DeltaStream(before), SotwStream(before)
    hashed: list[bytes] = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda data=b"": hashed.append(data) or real(data))
    for type_url in PUSH_ORDER:
        delta.on_request(DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=["*"]))
        sotw.on_request(DiscoveryRequest(type_url=type_url))
    assert delta.on_snapshot(after) and sotw.on_snapshot(after)
    assert hashed == []
