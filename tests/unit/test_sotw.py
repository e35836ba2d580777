"""xds_server/sotw.py: one state-of-the-world ADS stream, requests and snapshots in, responses out."""

from __future__ import annotations

from functools import cache

from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
from kvgate.catalog import Address, parse_catalog
from xds_server.settings import GatewaySettings
from xds_server.render.build import budget_shares, build_snapshot
from xds_server.resource_types import (
    BUDGET_SHARES, CLUSTER, CONTROL_PLANE_ID, ENDPOINT, LISTENER, POLICY, PUSH_ORDER, ROUTE,
)
from xds_server.snapshot import Snapshot
from xds_server.sotw import SotwStream

ALPHA = "kvgate_model/alpha"
BETA = "kvgate_model/beta"


def _model(name: str, endpoint: str, max_output_tokens: int) -> dict:
    return {"name": name, "endpoints": [endpoint], "max_context_tokens": 4096,
            "max_output_tokens": max_output_tokens,
            "kv": {"bytes_per_token": 1000, "budget_per_endpoint": "1GiB"}}


@cache
def snap(models: tuple[str, ...] = ("alpha",), *, endpoint: str = "10.0.0.1:8000", max_output_tokens: int = 1024,
         listen_port: int = 8080, ext_proc_max_requests: int = 100_000) -> Snapshot:
    """A snapshot of `models` (each on `endpoint`); cached, so equal arguments give the same object."""
    cat = parse_catalog({"models": [_model(m, endpoint, max_output_tokens) for m in models]})
    settings = GatewaySettings(listen=Address(host="127.0.0.1", port=listen_port),
                               ext_proc_max_requests=ext_proc_max_requests)
    return build_snapshot(cat, settings)


def req(type_url: str, *names: str, version: str = "", nonce: str = "", error: str | None = None) -> DiscoveryRequest:
    r = DiscoveryRequest(type_url=type_url, resource_names=list(names), version_info=version, response_nonce=nonce)
    if error is not None:
        r.error_detail.code = 3
        r.error_detail.message = error
    return r


def ack(resp: DiscoveryResponse, *names: str) -> DiscoveryRequest:
    return req(resp.type_url, *names, version=resp.version_info, nonce=resp.nonce)


def nack(resp: DiscoveryResponse, previous_version: str = "", *names: str) -> DiscoveryRequest:
    return req(resp.type_url, *names, version=previous_version, nonce=resp.nonce, error="rejected")


def first(stream: SotwStream, type_url: str, *names: str) -> DiscoveryResponse:
    """Subscribe and ACK; returns the response that was ACKed."""
    (resp,), _ = stream.on_request(req(type_url, *names))
    out, _ = stream.on_request(ack(resp, *names))
    assert out == []
    return resp


def subscribed(snapshot: Snapshot, names: tuple[str, ...] = (ALPHA,)) -> SotwStream:
    """A stream that subscribed to (and ACKed) every type, Envoy-style: EDS and RDS by name."""
    stream = SotwStream(snapshot)
    first(stream, CLUSTER)
    first(stream, ENDPOINT, *names)
    first(stream, LISTENER)
    first(stream, ROUTE, "kvgate_routes")
    first(stream, POLICY)
    return stream


def resource_count(resp: DiscoveryResponse) -> int:
    return len(resp.resources)


# --- request / ACK / stale nonce -------------------------------------------------------------

def test_first_request_gets_version_and_nonce() -> None:
    stream = SotwStream(snap())
    responses, nack_seen = stream.on_request(req(CLUSTER))
    (resp,) = responses
    assert nack_seen is None
    assert resp.type_url == CLUSTER
    assert resp.version_info == snap().get(CLUSTER).version
    assert resp.nonce
    assert resp.control_plane.identifier == CONTROL_PLANE_ID


def test_ack_gets_no_response() -> None:
    stream = SotwStream(snap())
    (resp,), _ = stream.on_request(req(LISTENER))
    out, nack_seen = stream.on_request(ack(resp))
    assert out == [] and nack_seen is None
    assert stream.types[LISTENER].acked_version == resp.version_info


def test_nonces_are_unique() -> None:
    stream = SotwStream(snap())
    nonces = [stream.on_request(req(t))[0][0].nonce for t in PUSH_ORDER]
    assert len(set(nonces)) == len(nonces)


def test_stale_nonce_is_ignored() -> None:
    stream = SotwStream(snap())
    old = first(stream, CLUSTER)
    (new,) = stream.on_snapshot(snap(("alpha", "beta")))
    assert new.nonce != old.nonce
    out, nack_seen = stream.on_request(ack(old))
    assert out == [] and nack_seen is None
    assert stream.types[CLUSTER].acked_version == old.version_info  # the stale ACK changed nothing


def test_stale_nack_is_ignored() -> None:
    stream = SotwStream(snap())
    old = first(stream, CLUSTER)
    stream.on_snapshot(snap(("alpha", "beta")))
    out, nack_seen = stream.on_request(nack(old, old.version_info))
    assert out == [] and nack_seen is None
    assert stream.nacks == []


def test_unknown_nonce_is_ignored() -> None:
    stream = SotwStream(snap())
    first(stream, CLUSTER)
    out, _ = stream.on_request(req(CLUSTER, version="whatever", nonce="not-a-nonce-we-sent"))
    assert out == []


# --- NACK ------------------------------------------------------------------------------------

def test_nack_recorded_and_not_answered() -> None:
    stream = SotwStream(snap())
    (resp,), _ = stream.on_request(req(CLUSTER))
    out, nack_seen = stream.on_request(nack(resp))
    assert out == []
    assert nack_seen is not None
    assert stream.nacks == [nack_seen]
    assert (nack_seen.type_url, nack_seen.version, nack_seen.message) == (CLUSTER, resp.version_info, "rejected")


def test_nack_not_resent_for_the_same_snapshot() -> None:
    stream = SotwStream(snap())
    (resp,), _ = stream.on_request(req(CLUSTER))
    stream.on_request(nack(resp))
    assert stream.on_snapshot(snap()) == []


def test_nack_not_resent_for_an_equal_rebuilt_snapshot() -> None:
    stream = SotwStream(snap())
    (resp,), _ = stream.on_request(req(CLUSTER))
    stream.on_request(nack(resp))
    rebuilt = build_snapshot(parse_catalog({"models": [_model("alpha", "10.0.0.1:8000", 1024)]}), GatewaySettings())
    assert rebuilt is not snap() and rebuilt.version == snap().version
    assert stream.on_snapshot(rebuilt) == []


def test_nack_then_changed_snapshot_sends_the_new_version() -> None:
    stream = SotwStream(snap())
    (resp,), _ = stream.on_request(req(CLUSTER))
    stream.on_request(nack(resp))
    changed = snap(("alpha", "beta"))
    (pushed,) = stream.on_snapshot(changed)
    assert pushed.type_url == CLUSTER
    assert pushed.version_info == changed.get(CLUSTER).version != resp.version_info


def test_nack_after_ack_keeps_the_previous_version_held() -> None:
    stream = SotwStream(snap())
    good = first(stream, ROUTE, "kvgate_routes")
    (bad,) = stream.on_snapshot(snap(max_output_tokens=512))
    out, nack_seen = stream.on_request(nack(bad, good.version_info, "kvgate_routes"))
    assert out == []
    assert nack_seen is not None and nack_seen.version == bad.version_info
    assert stream.on_snapshot(snap(max_output_tokens=512)) == []
    (fixed,) = stream.on_snapshot(snap(max_output_tokens=256))
    assert fixed.version_info == snap(max_output_tokens=256).get(ROUTE).version


# --- names that don't exist yet --------------------------------------------------------------

def test_eds_names_answered_with_what_exists() -> None:
    stream = SotwStream(snap())
    (resp,), _ = stream.on_request(req(ENDPOINT, ALPHA, BETA))
    assert resource_count(resp) == 1


def test_eds_names_served_once_they_appear() -> None:
    stream = SotwStream(snap())
    first(stream, ENDPOINT, ALPHA, BETA)
    pushed = stream.on_snapshot(snap(("alpha", "beta")))
    (eds,) = [r for r in pushed if r.type_url == ENDPOINT]
    assert resource_count(eds) == 2


def test_eds_new_names_get_an_answer() -> None:
    stream = SotwStream(snap(("alpha", "beta")))
    first(stream, ENDPOINT, ALPHA)
    (resp,), _ = stream.on_request(req(ENDPOINT, ALPHA, BETA, version=snap(("alpha", "beta")).get(ENDPOINT).version,
                                       nonce=stream.types[ENDPOINT].sent_nonce))
    assert resource_count(resp) == 2


def test_eds_subscription_only_gets_its_names() -> None:
    stream = SotwStream(snap(("alpha", "beta")))
    (resp,), _ = stream.on_request(req(ENDPOINT, BETA))
    assert resource_count(resp) == 1


# --- pushes on a new snapshot ----------------------------------------------------------------

def test_push_order_cds_eds_lds_rds() -> None:
    stream = subscribed(snap())
    pushed = stream.on_snapshot(snap(("alpha", "beta"), endpoint="10.0.0.2:8000", listen_port=8081))
    assert [r.type_url for r in pushed] == [CLUSTER, ENDPOINT, LISTENER, ROUTE, POLICY]


def test_push_only_changed_types() -> None:
    stream = subscribed(snap())
    pushed = stream.on_snapshot(snap(max_output_tokens=512))
    assert [r.type_url for r in pushed] == [ROUTE, POLICY]


def test_eds_resent_after_cds_change_even_when_unchanged() -> None:
    before, after = snap(), snap(ext_proc_max_requests=50_000)
    assert before.get(ENDPOINT).version == after.get(ENDPOINT).version
    assert before.get(CLUSTER).version != after.get(CLUSTER).version
    stream = subscribed(before)
    pushed = stream.on_snapshot(after)
    assert [r.type_url for r in pushed] == [CLUSTER, ENDPOINT]
    assert pushed[1].version_info == before.get(ENDPOINT).version
    assert resource_count(pushed[1]) == 1


def test_no_push_for_the_same_snapshot() -> None:
    stream = subscribed(snap())
    assert stream.on_snapshot(snap()) == []


def test_no_push_for_types_never_requested() -> None:
    stream = SotwStream(snap())
    first(stream, ROUTE, "kvgate_routes")
    pushed = stream.on_snapshot(snap(("alpha", "beta")))
    assert [r.type_url for r in pushed] == [ROUTE]


def with_shares(snapshot: Snapshot, **fractions: float) -> Snapshot:
    return snapshot.with_types({BUDGET_SHARES: budget_shares(fractions)})


def test_budget_shares_go_only_to_the_streams_that_subscribed() -> None:
    envoy = subscribed(snap())  # every Envoy type, not BudgetShares
    ext_proc = SotwStream(snap())
    first(ext_proc, POLICY)
    first(ext_proc, BUDGET_SHARES)
    divided = with_shares(snap(), a=0.5, b=0.5)
    assert envoy.on_snapshot(divided) == []
    (pushed,) = ext_proc.on_snapshot(divided)
    assert pushed.type_url == BUDGET_SHARES and pushed.version_info == divided.get(BUDGET_SHARES).version
    assert len(pushed.resources) == 1  # a wildcard subscription


def test_a_catalog_change_with_the_same_shares_pushes_no_shares() -> None:
    stream = SotwStream(with_shares(snap(), a=1.0))
    first(stream, POLICY)
    first(stream, BUDGET_SHARES)
    (pol,) = stream.on_snapshot(with_shares(snap(max_output_tokens=512), a=1.0))
    assert pol.type_url == POLICY


def test_pushed_response_acked_then_quiet() -> None:
    stream = subscribed(snap())
    (rds, pol) = stream.on_snapshot(snap(max_output_tokens=512))
    assert stream.on_request(ack(rds, "kvgate_routes"))[0] == []
    assert stream.on_request(ack(pol))[0] == []


# --- wildcards -------------------------------------------------------------------------------

def test_wildcard_types_return_everything_for_empty_names() -> None:
    s = snap(("alpha", "beta"))
    stream = SotwStream(s)
    for type_url in (CLUSTER, LISTENER, POLICY):
        (resp,), _ = stream.on_request(req(type_url))
        assert resource_count(resp) == len(s.get(type_url).items) > 0


def test_wildcard_cds_counts_ext_proc_and_model_clusters() -> None:
    (resp,), _ = SotwStream(snap(("alpha", "beta"))).on_request(req(CLUSTER))
    assert resource_count(resp) == 3


def test_wildcard_star_means_all() -> None:
    (resp,), _ = SotwStream(snap(("alpha", "beta"))).on_request(req(POLICY, "*"))
    assert resource_count(resp) == 2


def test_wildcard_type_with_names_returns_only_those() -> None:
    """grpc-python's xDS client asks for named LDS/CDS resources."""
    (resp,), _ = SotwStream(snap(("alpha", "beta"))).on_request(req(CLUSTER, ALPHA))
    assert resource_count(resp) == 1


# --- a client reconnecting after a control-plane restart --------------------------------------

def test_a_client_that_already_has_the_version_is_not_sent_it_again() -> None:
    snap = build_snapshot(CATALOG_FOR_RECONNECT, GatewaySettings())
    stream = SotwStream(snap)
    version = snap.get(CLUSTER).version
    # What Envoy sends on a new stream: its current version, and a nonce of the old server's.
    out, _ = stream.on_request(DiscoveryRequest(type_url=CLUSTER, version_info=version, response_nonce="17"))
    assert out == []
    assert stream.types[CLUSTER].acked_version == version
    # Later changes are pushed as usual.
    changed = build_snapshot(parse_catalog({"models": [{**MODEL_FOR_RECONNECT, "name": "other"}]}), GatewaySettings())
    (pushed,) = [r for r in stream.on_snapshot(changed) if r.type_url == CLUSTER]
    assert pushed.version_info == changed.get(CLUSTER).version


def test_a_client_behind_after_a_restart_gets_the_new_version() -> None:
    snap = build_snapshot(CATALOG_FOR_RECONNECT, GatewaySettings())
    stream = SotwStream(snap)
    out, _ = stream.on_request(DiscoveryRequest(type_url=CLUSTER, version_info="old", response_nonce="17"))
    assert [r.version_info for r in out] == [snap.get(CLUSTER).version]


MODEL_FOR_RECONNECT = {"name": "m", "endpoints": ["10.0.0.1:8000"], "max_context_tokens": 4096,
                       "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "1GiB"}}
CATALOG_FOR_RECONNECT = parse_catalog({"models": [MODEL_FOR_RECONNECT]})
