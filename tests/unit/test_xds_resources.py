"""xds_server resources, policies and snapshot: what Envoy and ext_proc receive for a catalog.

Checked on the protobuf messages of build_snapshot (what goes on the wire), not on the dicts.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, TypeVar

import orjson
import pytest
from google.protobuf import json_format, message

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.extensions.filters.http.ext_proc.v3.ext_proc_pb2 import ExternalProcessor, ExtProcPerRoute
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (
    HttpConnectionManager,
)
from envoy.extensions.load_balancing_policies.override_host.v3.override_host_pb2 import OverrideHost
from envoy.extensions.upstreams.http.v3.http_protocol_options_pb2 import HttpProtocolOptions
from kvgate.catalog import Address, Catalog, CatalogError, bundled_catalog_path, load_catalog, parse_catalog
from kvgate.wire import (ADMISSION_ATTRIBUTES, BINARY_HEADER, DECISION_NAMESPACE, anthropic_error_type,
                         header_attribute)
from kvgate.v1.policy_pb2 import ModelPolicy
from xds_server.render import policies, resources
from xds_server.settings import GatewaySettings
from xds_server.render.build import build_snapshot
from xds_server.resource_types import CLUSTER, ENDPOINT, LISTENER, POLICY, PUSH_ORDER, ROUTE
from xds_server.snapshot import Snapshot

M = TypeVar("M", bound=message.Message)
SETTINGS = GatewaySettings()
GiB = 2**30


def model(name: str, *endpoints: str, **overrides: Any) -> dict[str, Any]:
    m: dict[str, Any] = {"name": name, "endpoints": list(endpoints), "max_context_tokens": 8192,
                         "max_output_tokens": 1024, "tokens_per_block": 32,
                         "kv": {"bytes_per_token": 131072, "budget_per_endpoint": "2GiB"}}
    m.update(overrides)
    return m


def catalog(alpha: dict[str, Any] | None = None, *extra: dict[str, Any]) -> Catalog:
    """Two models: alpha on two engines, beta on one (override alpha's fields with `alpha`)."""
    return parse_catalog({"models": [
        model("alpha", "10.0.0.1:8000", "10.0.0.2:8000", **(alpha or {})),
        model("beta", "10.0.0.5:9000", max_context_tokens=32768, max_output_tokens=2048,
              kv={"bytes_per_token": 131072, "budget_per_endpoint": "8GiB"}),
        *extra]})


def snapshot(alpha: dict[str, Any] | None = None, settings: GatewaySettings = SETTINGS) -> Snapshot:
    return build_snapshot(catalog(alpha), settings)


def resources_of(snap: Snapshot, type_url: str, cls: type[M]) -> dict[str, M]:
    out = {}
    for name, packed in snap.get(type_url).items.items():
        msg = cls()
        assert packed.Unpack(msg), f"{name} is not a {cls.__name__}"
        out[name] = msg
    return out


def only(snap: Snapshot, type_url: str, cls: type[M]) -> M:
    (msg,) = resources_of(snap, type_url, cls).values()
    return msg


def hcm(snap: Snapshot) -> HttpConnectionManager:
    (chain,) = only(snap, LISTENER, Listener).filter_chains
    (network_filter,) = chain.filters
    out = HttpConnectionManager()
    assert network_filter.typed_config.Unpack(out)
    return out


def ext_proc_config(snap: Snapshot) -> ExternalProcessor:
    (http_filter,) = [f for f in hcm(snap).http_filters if f.name == resources.EXT_PROC_FILTER]
    out = ExternalProcessor()
    assert http_filter.typed_config.Unpack(out)
    return out


def routes(snap: Snapshot) -> dict[str, Any]:
    (vhost,) = only(snap, ROUTE, RouteConfiguration).virtual_hosts
    return {r.name: r for r in vhost.routes}


def models_route(snap: Snapshot) -> Any:
    (route,) = [r for r in routes(snap).values() if r.match.path == "/v1/models"]
    return route


def versions(snap: Snapshot) -> dict[str, str]:
    return {t: snap.get(t).version for t in PUSH_ORDER}


def changed_types(a: Snapshot, b: Snapshot) -> set[str]:
    return {t for t in PUSH_ORDER if a.get(t).version != b.get(t).version}


# --- ext_proc filter and its cluster ---------------------------------------------------------

def test_ext_proc_gets_one_message_per_request_the_body_with_the_headers_it_reads() -> None:
    cfg = ext_proc_config(snapshot())
    assert cfg.processing_mode.request_body_mode == ProcessingMode.BUFFERED
    assert cfg.processing_mode.request_header_mode == ProcessingMode.SKIP
    assert list(cfg.request_attributes) == list(ADMISSION_ATTRIBUTES)
    assert set(ADMISSION_ATTRIBUTES.values()) >= {":path", ":method", "authorization", BINARY_HEADER}


def test_a_header_that_is_not_printable_ascii_reaches_ext_proc_as_a_replacement_character() -> None:
    """Attributes are protobuf strings: raw bytes that are not UTF-8 would make the whole message
    unreadable to ext_proc. Each header is sent only when printable ASCII, else as U+FFFD."""
    expression = header_attribute("authorization")
    assert expression == ("request.headers['authorization'].matches('^[ -~]*$') ? "
                          "request.headers['authorization'] : '\ufffd'")


def test_ext_proc_filter_fails_closed() -> None:
    cfg = ext_proc_config(snapshot())
    assert cfg.failure_mode_allow is False


def test_ext_proc_message_timeout_above_envoy_default() -> None:
    cfg = ext_proc_config(snapshot())
    assert cfg.HasField("message_timeout")
    assert cfg.message_timeout.ToTimedelta() > timedelta(milliseconds=200)


def test_ext_proc_filter_talks_to_the_ext_proc_cluster() -> None:
    cfg = ext_proc_config(snapshot())
    assert cfg.grpc_service.envoy_grpc.cluster_name == resources.EXT_PROC_CLUSTER


def test_content_length_goes_before_ext_proc_and_the_buffer_holds_the_headers_after_it() -> None:
    names = [f.name for f in hcm(snapshot()).http_filters]
    assert names == ["envoy.filters.http.header_mutation", resources.EXT_PROC_FILTER, resources.BUFFER_FILTER,
                     "envoy.filters.http.router"]


def test_listener_uses_rds_over_ads_and_listens_where_told() -> None:
    snap = snapshot(settings=GatewaySettings(listen=Address(host="1.2.3.4", port=5)))
    listener = only(snap, LISTENER, Listener)
    assert listener.address.socket_address.address == "1.2.3.4"
    assert listener.address.socket_address.port_value == 5
    rds = hcm(snap).rds
    assert rds.route_config_name == resources.ROUTE_CONFIG_NAME
    assert rds.config_source.HasField("ads")


def ext_proc_cluster(snap: Snapshot) -> Cluster:
    return resources_of(snap, CLUSTER, Cluster)[resources.EXT_PROC_CLUSTER]


def test_ext_proc_cluster_circuit_breaker_above_1024() -> None:
    thresholds = ext_proc_cluster(snapshot()).circuit_breakers.thresholds
    assert thresholds
    assert all(t.max_requests.value > 1024 for t in thresholds)
    assert all(t.max_pending_requests.value > 1024 for t in thresholds)


def test_ext_proc_cluster_speaks_http2() -> None:
    options = ext_proc_cluster(snapshot()).typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    parsed = HttpProtocolOptions()
    assert options.Unpack(parsed)
    assert parsed.explicit_http_config.HasField("http2_protocol_options")


def test_ext_proc_cluster_points_at_the_ext_proc_servers() -> None:
    lbs = ext_proc_cluster(snapshot()).load_assignment.endpoints
    addrs = [(e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
             for group in lbs for e in group.lb_endpoints]
    assert addrs == [(a.host, a.port) for a in SETTINGS.ext_proc]


# --- CDS / EDS -------------------------------------------------------------------------------

def test_one_eds_cluster_per_model() -> None:
    clusters = resources_of(snapshot(), CLUSTER, Cluster)
    cat = catalog()
    assert set(clusters) == {resources.EXT_PROC_CLUSTER} | {m.cluster_name for m in cat.models}
    for m in cat.models:
        c = clusters[m.cluster_name]
        assert c.type == Cluster.EDS
        assert c.eds_cluster_config.eds_config.HasField("ads")


def test_one_load_assignment_per_model_with_its_endpoints() -> None:
    cat = catalog()
    assignments = resources_of(snapshot(), ENDPOINT, ClusterLoadAssignment)
    assert set(assignments) == {m.cluster_name for m in cat.models}
    for m in cat.models:
        cla = assignments[m.cluster_name]
        assert cla.cluster_name == m.cluster_name
        got = [f"{e.endpoint.address.socket_address.address}:{e.endpoint.address.socket_address.port_value}"
               for group in cla.endpoints for e in group.lb_endpoints]
        assert got == [str(a) for a in m.addresses()]


def test_every_endpoint_group_has_a_locality() -> None:
    for cla in resources_of(snapshot(), ENDPOINT, ClusterLoadAssignment).values():
        assert cla.endpoints
        assert all(group.HasField("locality") for group in cla.endpoints)


def test_unresolved_sim_cannot_be_rendered() -> None:
    cat = parse_catalog({"models": [model("alpha", "sim")]})
    with pytest.raises(CatalogError):
        build_snapshot(cat, SETTINGS)


# --- RDS -------------------------------------------------------------------------------------

def test_each_model_routed_by_the_model_ext_procs_decision_names() -> None:
    by_cluster, pending = {}, []
    for r in routes(snapshot()).values():
        for m in r.match.dynamic_metadata:
            assert (m.filter, [k.key for k in m.path]) == (DECISION_NAMESPACE, ["model"])
            if m.value.HasField("present_match"):
                pending.append(r.route.cluster)
            else:
                by_cluster[m.value.string_match.exact] = r.route.cluster
    assert by_cluster == {m.name: m.cluster_name for m in catalog().models}
    # A model ext_proc admitted that no route names yet (a request in flight as it was added): a
    # cluster that never exists, so Envoy's cluster_not_found, which the local replies map.
    assert pending == [resources.pending_route()["route"]["cluster"]]
    assert pending[0] not in resources_of(snapshot(), CLUSTER, Cluster)


def test_an_admitted_request_on_routes_older_than_its_model_gets_a_retryable_503() -> None:
    (reply,) = [r for r in resources.local_replies(SETTINGS) if r.code == "model_not_ready"]
    assert (reply.status, reply.grpc_status, reply.retry_after_s) == (503, 14, 1)
    assert "cluster_not_found" in reply.when["extension_filter"]["typed_config"]["expression"]


def test_model_routes_keep_ext_proc() -> None:
    for m in catalog().models:
        assert resources.EXT_PROC_FILTER not in routes(snapshot())[m.name].typed_per_filter_config


def test_models_list_is_a_direct_response_for_get() -> None:
    route = models_route(snapshot())
    assert route.direct_response.status == 200
    assert [(h.name, h.string_match.exact) for h in route.match.headers] == [(":method", "GET")]


def test_models_list_body_lists_limits() -> None:
    body = orjson.loads(models_route(snapshot()).direct_response.body.inline_string)
    listed = {d["id"]: (d["max_model_len"], d["max_output_tokens"]) for d in body["data"]}
    assert listed == {m.name: (m.max_context_tokens, m.max_output_tokens) for m in catalog().models}
    assert listed["beta"] == (32768, 2048)


def test_models_list_disables_ext_proc() -> None:
    per_filter = models_route(snapshot()).typed_per_filter_config
    cfg = ExtProcPerRoute()
    assert per_filter[resources.EXT_PROC_FILTER].Unpack(cfg)
    assert cfg.disabled is True


def test_models_list_body_helper_matches_catalog() -> None:
    body = orjson.loads(resources.models_list_body(catalog()))
    assert [d["id"] for d in body["data"]] == ["alpha", "beta"]


TRITON = model("gamma", {"host": "10.0.0.9", "port": 8000, "grpc_port": 8001}, protocol="triton",
               backend_model="ensemble")


def test_models_list_leaves_out_triton_models() -> None:
    body = orjson.loads(resources.models_list_body(catalog(None, TRITON)))
    assert [d["id"] for d in body["data"]] == ["alpha", "beta"]


def test_triton_model_gets_grpc_cluster_endpoints_and_renaming_routes() -> None:
    snap = build_snapshot(catalog(None, TRITON), SETTINGS)
    gamma = parse_catalog({"models": [TRITON]}).models[0]
    assert gamma.grpc_cluster_name in snap.get(CLUSTER).items
    cla = ClusterLoadAssignment.FromString(snap.get(ENDPOINT).items[gamma.grpc_cluster_name].value)
    assert [e.endpoint.address.socket_address.port_value for e in cla.endpoints[0].lb_endpoints] == [8001]
    stream_route, grpc_route, http_route = [r for r in resources.model_routes(gamma)]
    for r in (stream_route, grpc_route):
        assert r["route"]["cluster"] == gamma.grpc_cluster_name
        assert {"name": "content-type", "string_match": {"prefix": "application/grpc"}} in r["match"]["headers"]
    # A bidi stream never ends its body: the buffer filter must let it through.
    assert stream_route["typed_per_filter_config"][resources.BUFFER_FILTER]["disabled"] is True
    assert resources.BUFFER_FILTER not in grpc_route.get("typed_per_filter_config", {})
    assert http_route["route"]["regex_rewrite"]["substitution"] == "/v2/models/ensemble\\1"


# --- policies --------------------------------------------------------------------------------

def test_policies_carry_kv_math_and_budgets() -> None:
    pols = resources_of(snapshot(), POLICY, ModelPolicy)
    alpha = pols["alpha"]
    assert alpha.kv_bytes_per_token == 131072
    assert alpha.tokens_per_block == 32
    assert (alpha.max_context_tokens, alpha.max_output_tokens) == (8192, 1024)
    assert [(e.address, e.kv_budget_bytes) for e in alpha.endpoints] == [
        ("10.0.0.1:8000", 2 * GiB), ("10.0.0.2:8000", 2 * GiB)]


def test_policies_carry_endpoint_addresses_metrics_classes_and_long_request_rule() -> None:
    cat = parse_catalog({"models": [
        model("alpha", "10.0.0.1:8000", priority_class="batch", long_requests={"threshold": 0.25, "max_share": 0.6},
              engine_metrics={"interval_s": 0.5, "stale_after_s": 2}),
        model("tri", {"host": "10.0.0.3", "port": 8000, "grpc_port": 8001}, protocol="triton",
              engine_metrics={"scrape": False})],
        "priority_classes": [{"name": "interactive", "max_wait_s": 2.5}, {"name": "batch", "max_wait_s": 30}]})
    pols = {p.name: p for p in policies.policies(cat)}
    alpha, tri = pols["alpha"], pols["tri"]
    assert [(c.name, c.max_wait_ms) for c in alpha.priority_classes] == [("interactive", 2500), ("batch", 30000)]
    assert (alpha.default_priority_class, tri.default_priority_class) == ("batch", "interactive")
    assert (alpha.long_request_threshold, alpha.long_requests_max_share) == (0.25, 0.6)
    assert (alpha.engine_metrics.interval_ms, alpha.engine_metrics.stale_after_ms) == (500, 2000)
    assert not tri.HasField("engine_metrics")  # not scraped: the ledger alone counts
    assert alpha.endpoints[0].metrics_url == "http://10.0.0.1:8000/prometheus/metrics"
    (endpoint,) = tri.endpoints
    assert (endpoint.address, endpoint.grpc_address, endpoint.metrics_url) == (
        "10.0.0.3:8000", "10.0.0.3:8001", "http://10.0.0.3:8002/metrics")  # Triton's own metrics port
    assert not alpha.HasField("tokenizer")


def test_policy_per_model_with_protocol_and_estimate() -> None:
    pols = {p.name: p for p in policies.policies(catalog())}
    assert set(pols) == {"alpha", "beta"}
    beta = pols["beta"]
    assert beta.protocol == "openai"
    assert [e.address for e in beta.endpoints] == ["10.0.0.5:9000"]
    assert beta.prompt_estimate.bytes_per_token == 1.0
    assert beta.prompt_estimate.per_message_tokens == 8


def test_policy_for_bundled_shape_uses_config_json_bytes() -> None:
    cat = load_catalog(bundled_catalog_path())
    cat = cat.with_endpoints({m.name: [Address(host="127.0.0.1", port=18001 + i)] for i, m in enumerate(cat.models)})
    assert [p.kv_bytes_per_token for p in policies.policies(cat)] == [131072] * 3
    assert [p.endpoints[0].kv_budget_bytes for p in policies.policies(cat)] == [20 * GiB, 21 * GiB, 20 * GiB]


# --- versions --------------------------------------------------------------------------------

def test_versions_are_deterministic() -> None:
    a, b = snapshot(), snapshot()
    assert versions(a) == versions(b)
    assert a.version == b.version
    assert all(versions(a).values())


def test_versions_differ_between_types() -> None:
    assert len(set(versions(snapshot()).values())) == len(PUSH_ORDER)


def test_max_output_change_touches_routes_and_policies_only() -> None:
    assert changed_types(snapshot(), snapshot({"max_output_tokens": 512})) == {ROUTE, POLICY}


def test_endpoint_change_touches_endpoints_and_policies_only() -> None:
    moved = {"endpoints": ["10.0.0.1:8000", "10.0.0.3:8000"]}
    assert changed_types(snapshot(), snapshot(moved)) == {ENDPOINT, POLICY}


def test_budget_change_touches_policies_only() -> None:
    bigger = {"kv": {"bytes_per_token": 131072, "budget_per_endpoint": "3GiB"}}
    assert changed_types(snapshot(), snapshot(bigger)) == {POLICY}


def test_new_model_touches_clusters_endpoints_routes_policies() -> None:
    a = build_snapshot(catalog(), SETTINGS)
    b = build_snapshot(catalog(None, model("gamma", "10.0.0.9:8000")), SETTINGS)
    assert changed_types(a, b) == {CLUSTER, ENDPOINT, ROUTE, POLICY}


def test_listen_change_touches_listener_only() -> None:
    moved = GatewaySettings(listen=Address(host="0.0.0.0", port=8081))
    assert changed_types(snapshot(), snapshot(settings=moved)) == {LISTENER}


def test_snapshot_version_follows_content() -> None:
    assert snapshot().version != snapshot({"max_output_tokens": 512}).version


def test_select_leaves_out_unknown_names() -> None:
    res = snapshot().get(ENDPOINT)
    picked = res.select(frozenset({"kvgate_model/alpha", "kvgate_model/nope"}))
    assert len(picked) == 1
    assert len(res.select(None)) == 2


def test_unknown_type_has_empty_resources() -> None:
    res = snapshot().get("type.googleapis.com/nope")
    assert res.version == "" and res.items == {}


def test_node_groups_get_their_own_listener_and_share_everything_else() -> None:
    other = Address(host="127.0.0.1", port=9191)
    snap = build_snapshot(catalog(), GatewaySettings(group_listen=(("edge-b", other),)))
    variant = snap.for_group("edge-b")
    assert snap.for_group("anyone-else") is snap
    (listener,) = [Listener.FromString(a.value) for a in variant.get(LISTENER).items.values()]
    assert listener.address.socket_address.port_value == 9191
    assert variant.get(LISTENER).version != snap.get(LISTENER).version
    for t in (CLUSTER, ENDPOINT, ROUTE, POLICY):
        assert variant.get(t).version == snap.get(t).version
    assert snap.version != build_snapshot(catalog(), SETTINGS).version  # the group is part of the version


def test_model_clusters_offer_override_host_then_least_request_then_round_robin_and_weighted_localities() -> None:
    snap = build_snapshot(catalog(None, TRITON), SETTINGS)
    for name, packed in snap.get(CLUSTER).items.items():
        if name == resources.EXT_PROC_CLUSTER:
            continue
        cluster = Cluster.FromString(packed.value)
        policies = cluster.load_balancing_policy.policies
        assert [p.typed_extension_config.name.rsplit(".", 1)[1] for p in policies] == [
            "override_host", "least_request", "round_robin"]
        override = OverrideHost()
        policies[0].typed_extension_config.typed_config.Unpack(override)
        # The host ext_proc reserved on, else the same balancing as clients without override_host.
        assert [(s.metadata.key, [k.key for k in s.metadata.path]) for s in override.override_host_sources] == [
            (DECISION_NAMESPACE, ["upstream"]), (DECISION_NAMESPACE, ["endpoint"])]
        assert override.fallback_policy.policies == policies[1:]
    for packed in snap.get(ENDPOINT).items.values():
        cla = ClusterLoadAssignment.FromString(packed.value)
        assert all(g.load_balancing_weight.value == 1 and g.locality.region for g in cla.endpoints)


def test_proxyless_group_gets_api_listeners_named_after_triton_models() -> None:
    snap = build_snapshot(catalog(None, TRITON), GatewaySettings(proxyless_group="grpc-clients"))
    (api,) = [Listener.FromString(a.value) for a in snap.for_group("grpc-clients").get(LISTENER).items.values()]
    assert api.name == "gamma" and api.HasField("api_listener")
    assert "proxyless/gamma" in snap.get(ROUTE).items
    assert "proxyless/gamma" not in build_snapshot(catalog(None, TRITON), SETTINGS).get(ROUTE).items


# --- failover ----------------------------------------------------------------------------------

def test_model_clusters_health_check_the_engines_own_endpoint_and_eject_failing_ones() -> None:
    snap = build_snapshot(catalog(None, TRITON), SETTINGS)
    clusters = resources_of(snap, CLUSTER, Cluster)
    paths = {name: c.health_checks[0].http_health_check.path for name, c in clusters.items()
             if name != resources.EXT_PROC_CLUSTER}
    assert paths["kvgate_model/alpha"] == "/health"
    assert paths["kvgate_model/gamma"] == paths["kvgate_model/gamma/grpc"] == "/v2/health/ready"
    grpc = clusters["kvgate_model/gamma/grpc"]
    assert grpc.health_checks[0].http_health_check.codec_client_type == 0  # HTTP1, on the HTTP port
    assert grpc.outlier_detection.consecutive_local_origin_failure.value == 2
    assert grpc.circuit_breakers.thresholds[0].retry_budget.budget_percent.value == 20.0


def test_grpc_cluster_endpoints_are_health_checked_on_the_http_port() -> None:
    snap = build_snapshot(catalog(None, TRITON), SETTINGS)
    cla = resources_of(snap, ENDPOINT, ClusterLoadAssignment)["kvgate_model/gamma/grpc"]
    (group,) = cla.endpoints
    (ep,) = group.lb_endpoints
    assert (ep.endpoint.address.socket_address.port_value, ep.endpoint.health_check_config.port_value) == (8001, 8000)


def test_endpoint_priorities_become_failover_levels() -> None:
    cat = parse_catalog({"models": [model("alpha", {"host": "10.0.0.1", "port": 8000},
                                          {"host": "10.0.0.2", "port": 8000, "priority": 1},
                                          {"host": "10.0.0.3", "port": 8000})]})
    cla = resources_of(build_snapshot(cat, SETTINGS), ENDPOINT, ClusterLoadAssignment)["kvgate_model/alpha"]
    assert [(g.priority, [e.endpoint.address.socket_address.address for e in g.lb_endpoints]) for g in cla.endpoints] == [
        (0, ["10.0.0.1", "10.0.0.3"]), (1, ["10.0.0.2"])]
    assert [e.priority for e in policies.policies(cat)[0].endpoints] == [0, 1, 0]
    with pytest.raises(CatalogError, match="without gaps"):
        parse_catalog({"models": [model("alpha", {"host": "10.0.0.1", "port": 8000, "priority": 2})]})


def test_model_routes_retry_only_before_an_engine_started_and_elsewhere() -> None:
    (config,) = resources_of(snapshot(), ROUTE, RouteConfiguration).values()
    retried = [r.route.retry_policy for vh in config.virtual_hosts for r in vh.routes
               if r.route.cluster.startswith("kvgate_model/")]
    assert retried
    for policy in retried:
        assert set(policy.retry_on.split(",")) == {"connect-failure", "refused-stream", "reset-before-request",
                                                   "retriable-status-codes"}
        assert list(policy.retriable_status_codes) == [503] and policy.num_retries.value == 2
        assert [p.name for p in policy.retry_host_predicate] == ["envoy.retry_host_predicates.previous_hosts"]


def test_the_same_catalog_gives_the_same_versions_in_another_process() -> None:
    """Nested typed configs (access log formats are maps) serialize in per-process order unless
    re-packed: a restarted control plane would then re-send every Envoy its listener."""
    import subprocess
    import sys

    script = ("from kvgate.catalog import load_catalog, bundled_catalog_path, Address\n"
              "from xds_server.render.build import build_snapshot\n"
              "from xds_server.settings import GatewaySettings\n"
              "c = load_catalog(bundled_catalog_path())\n"
              "c = c.with_endpoints({m.name: [Address(host='127.0.0.1', port=9000 + i, grpc_port=9100 + i "
              "if m.protocol == 'triton' else None)] for i, m in enumerate(c.models)})\n"
              "s = build_snapshot(c, GatewaySettings())\n"
              "print(' '.join(s.get(t).version for t in sorted(s.by_type)))\n")
    versions = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                               timeout=60).stdout for _ in range(3)}
    assert len(versions) == 1, versions


def test_ext_proc_replicas_named_by_dns_get_a_strict_dns_cluster() -> None:
    by_ip = resources.ext_proc_cluster(GatewaySettings())
    named = resources.ext_proc_cluster(GatewaySettings(ext_proc=(Address(host="ext_proc", port=9002),)))
    assert (by_ip["type"], named["type"], named["dns_lookup_family"]) == ("STATIC", "STRICT_DNS", "V4_ONLY")
    assert json_format.ParseDict(named, Cluster()).type == Cluster.STRICT_DNS  # a valid Cluster


# --- timeouts and Envoy's own replies --------------------------------------------------------

def test_model_routes_carry_the_models_timeouts() -> None:
    snap = snapshot({"timeouts": {"request_s": 30, "idle_s": 4.5}})
    timeouts = {r.name: (r.route.timeout.ToTimedelta(), r.route.idle_timeout.ToTimedelta())
                for r in routes(snap).values() if r.route.cluster.startswith("kvgate_model/")}
    assert timeouts == {"alpha": (timedelta(seconds=30), timedelta(seconds=4.5)),
                        "beta": (timedelta(seconds=600), timedelta(seconds=120))}


def test_envoys_own_replies_get_a_mapper_per_kind_and_convention_and_no_default_body() -> None:
    config = hcm(snapshot()).local_reply_config
    # No catch-all body format: ext_proc's refusals and the direct responses keep theirs.
    assert not config.HasField("body_format")
    kinds = resources.local_replies(SETTINGS)
    assert [r.code for r in kinds] == ["gateway_unavailable", "body_too_large", "engine_timeout",
                                       "engine_idle_timeout", "model_not_ready", "engine_unavailable", "gateway_error"]
    assert len(config.mappers) == 4 * len(kinds)
    for reply, (grpc, triton, anthropic, openai) in zip(kinds, zip(*[iter(config.mappers)] * 4)):
        assert [f.header_filter.header.name for f in grpc.filter.and_filter.filters[1:]] == ["content-type"]
        assert [f.header_filter.header.name for f in triton.filter.and_filter.filters[1:]] == [":path"]
        (by_path,) = anthropic.filter.and_filter.filters[1:]
        assert by_path.header_filter.header.string_match.prefix == "/v1/messages"
        anthropic_body = json_format.MessageToDict(anthropic.body_format_override.json_format)
        assert anthropic_body == {"type": "error", "error": {
            "type": anthropic_error_type(reply.status or 500), "message": reply.message,
            "details": {"error_code": reply.code}}}
        assert anthropic.status_code.value == (reply.status or 0)
        assert not openai.filter.HasField("and_filter")  # the rest: the OpenAI API
        openai_body = json_format.MessageToDict(openai.body_format_override.json_format)
        assert openai_body == {"error": {"message": reply.message, "type": reply.type_, "param": None,
                                         "code": reply.code}}
        assert json_format.MessageToDict(triton.body_format_override.json_format) == {"error": reply.message}
        assert grpc.body_format_override.text_format_source.inline_string == reply.message
        assert openai.status_code.value == triton.status_code.value == grpc.status_code.value == (reply.status or 0)
        grpc_headers = {h.header.key: h.header.value for h in grpc.headers_to_add}
        assert grpc_headers.get("grpc-status") == (str(reply.grpc_status) if reply.grpc_status else None)
        for m in (openai, triton, anthropic):
            headers = {h.header.key: h.header.value for h in m.headers_to_add}
            assert headers.get("retry-after") == (str(reply.retry_after_s) if reply.retry_after_s else None)


def test_ext_proc_failures_are_503_to_retry_and_timeouts_504() -> None:
    by_code = {r.code: r for r in resources.local_replies(SETTINGS)}
    assert (by_code["gateway_unavailable"].status, by_code["gateway_unavailable"].retry_after_s) == (503, 1)
    assert by_code["engine_unavailable"].status == 503 and by_code["engine_unavailable"].grpc_status == 14
    assert {by_code[c].status for c in ("engine_timeout", "engine_idle_timeout")} == {504}
    assert {by_code[c].grpc_status for c in ("engine_timeout", "engine_idle_timeout")} == {4}  # DEADLINE_EXCEEDED
    assert str(SETTINGS.max_request_bytes) in by_code["body_too_large"].message


def test_the_catch_all_leaves_ext_procs_refusals_and_direct_responses_alone() -> None:
    (catch_all,) = [r for r in resources.local_replies(SETTINGS) if r.code == "gateway_error"]
    expression = catch_all.when["extension_filter"]["typed_config"]["expression"]
    assert "!response.code_details.startsWith('kvgate_')" in expression
    assert "response.code_details != 'direct_response'" in expression
