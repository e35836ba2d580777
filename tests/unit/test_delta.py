"""xds_server/delta.py: the incremental ADS stream as a pure state machine."""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest
from google.rpc.status_pb2 import Status
from kvgate.catalog import parse_catalog
from xds_server.delta import DeltaStream
from xds_server.settings import GatewaySettings
from xds_server.render.build import build_snapshot
from xds_server.resource_types import CLUSTER, ENDPOINT
from xds_server.snapshot import Resources, Snapshot, resource_version


def model(name: str, **overrides: Any) -> dict[str, Any]:
    return {"name": name, "endpoints": ["10.0.0.1:8000"], "max_context_tokens": 4096,
            "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "1GiB"}, **overrides}


def snap(*models: dict[str, Any]) -> Snapshot:
    return build_snapshot(parse_catalog({"models": list(models) or [model("a")]}), GatewaySettings())


def req(type_url: str, **fields: Any) -> DeltaDiscoveryRequest:
    return DeltaDiscoveryRequest(type_url=type_url, **fields)


def test_wildcard_first_request_gets_everything_with_resource_versions() -> None:
    s = snap(model("a"), model("b"))
    (resp,), _ = DeltaStream(s).on_request(req(CLUSTER))
    assert sorted(r.name for r in resp.resources) == sorted(s.get(CLUSTER).items)
    assert all(r.version == resource_version(r.resource.value) for r in resp.resources)
    assert resp.system_version_info == s.get(CLUSTER).version


def test_reconnect_with_known_versions_is_sent_nothing_new() -> None:
    s = snap()
    known = {n: resource_version(a.value) for n, a in s.get(CLUSTER).items.items()}
    (resp,), _ = DeltaStream(s).on_request(req(CLUSTER, initial_resource_versions=known))
    assert list(resp.resources) == [] and list(resp.removed_resources) == []


def test_changes_are_diffs_and_removals_are_named() -> None:
    stream = DeltaStream(snap(model("a"), model("b")))
    stream.on_request(req(CLUSTER))
    (resp,) = stream.on_snapshot(snap(model("a", max_output_tokens=9)))
    assert list(resp.removed_resources) == ["kvgate_model/b"]
    assert [r.name for r in resp.resources] == []  # a's cluster did not change
    assert stream.on_snapshot(snap(model("a", max_output_tokens=9))) == []


def test_named_subscription_is_remembered_until_the_resource_exists() -> None:
    stream = DeltaStream(snap(model("a")))
    (resp,), _ = stream.on_request(req(ENDPOINT, resource_names_subscribe=["kvgate_model/b"]))
    assert list(resp.resources) == []
    pushed = [r for r in stream.on_snapshot(snap(model("a"), model("b"))) if r.type_url == ENDPOINT]
    assert [r.name for r in pushed[0].resources] == ["kvgate_model/b"]


def test_a_nack_is_recorded_and_the_refused_version_not_resent() -> None:
    stream = DeltaStream(snap())
    (resp,), _ = stream.on_request(req(CLUSTER))
    out, nack = stream.on_request(req(CLUSTER, response_nonce=resp.nonce, error_detail=Status(message="bad")))
    assert out == [] and nack is not None and nack.message == "bad"
    assert stream.types[CLUSTER].nacked_version == resp.system_version_info
    assert stream.on_snapshot(snap()) == []


def test_endpoints_are_resent_after_their_cluster_changes() -> None:
    before = snap(model("a"))
    clusters = {n: Cluster.FromString(a.value) for n, a in before.get(CLUSTER).items.items()}
    clusters["kvgate_model/a"].connect_timeout.seconds = 7  # the cluster changes, its endpoints don't
    after = Snapshot({**before.by_type, CLUSTER: Resources.of(clusters)})
    stream = DeltaStream(before)
    stream.on_request(req(CLUSTER))
    stream.on_request(req(ENDPOINT, resource_names_subscribe=["kvgate_model/a"]))
    pushed = {r.type_url: r for r in stream.on_snapshot(after)}
    assert [r.name for r in pushed[CLUSTER].resources] == ["kvgate_model/a"]
    assert [r.name for r in pushed[ENDPOINT].resources] == ["kvgate_model/a"]
