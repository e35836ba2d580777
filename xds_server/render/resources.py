"""Render a catalog into Envoy resources, as plain dicts in Envoy's own YAML/JSON shape.

Pure functions: build.py parses the dicts into protobuf (protos.py) and packs them into the snapshot,
which `kvgate check` prints. Reading top to bottom follows Envoy's ADS order: clusters, endpoints,
listeners, routes.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from kvgate import __version__
from kvgate.catalog import Address, Catalog, Model, is_ip_address
from kvgate.wire import DECISION_NAMESPACE, ENDPOINT_HEADER, MAX_TOKENS_HEADER, MODEL_HEADER, TRITON_GRPC_SERVICE
from kvgate.tls import envoy_upstream_tls
from xds_server.settings import GatewaySettings

LISTENER_NAME = "kvgate_http"
ROUTE_CONFIG_NAME = "kvgate_routes"
EXT_PROC_CLUSTER = "kvgate_ext_proc"
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"

_ADS = {"ads": {}, "resource_api_version": "V3"}
_T = "type.googleapis.com/"


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def _socket(addr: Address) -> dict[str, Any]:
    return {"socket_address": {"address": addr.host, "port_value": addr.port}}


def _lb_endpoints(addrs: list[Address] | tuple[Address, ...],
                  health_ports: list[int] | None = None) -> list[dict[str, Any]]:
    """One group per failover level (Envoy sends traffic to a level when the ones above are
    unhealthy). `health_ports`: where each endpoint's health is checked, if not on its own port."""
    ports = health_ports or [None] * len(addrs)

    def endpoint(a: Address, port: int | None) -> dict[str, Any]:
        return {"address": _socket(a), **({"health_check_config": {"port_value": port}} if port else {})}

    # grpc's xDS client ignores endpoint groups without a locality and a locality weight.
    return [{"locality": {"region": "local"}, "load_balancing_weight": 1, "priority": level,
             "lb_endpoints": [{"endpoint": endpoint(a, p)} for a, p in zip(addrs, ports) if a.priority == level]}
            for level in sorted({a.priority for a in addrs})]


def _circuit_breakers(limit: int) -> dict[str, Any]:
    # The retry budget bounds retries to a fifth of the requests in flight: a dead engine's requests
    # retried elsewhere, never a retry storm.
    return {"thresholds": [{"max_connections": limit, "max_pending_requests": limit, "max_requests": limit,
                            "retry_budget": {"budget_percent": {"value": 20.0}, "min_retry_concurrency": 3}}]}


# --- CDS -------------------------------------------------------------------------------------

def ext_proc_cluster(settings: GatewaySettings) -> dict[str, Any]:
    named = any(not is_ip_address(a.host) for a in settings.ext_proc)
    return {
        "name": EXT_PROC_CLUSTER,
        # Replicas named by DNS (a compose service, a headless Kubernetes service) are resolved by
        # Envoy; STATIC clusters take IPs only.
        "type": "STRICT_DNS" if named else "STATIC",
        **({"dns_lookup_family": "V4_ONLY"} if named else {}),
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "typed_extension_protocol_options": _http2(),
        "circuit_breakers": _circuit_breakers(settings.ext_proc_max_requests),
        "load_assignment": {"cluster_name": EXT_PROC_CLUSTER, "endpoints": _lb_endpoints(settings.ext_proc)},
        **({"transport_socket": envoy_upstream_tls(settings.ext_proc_tls, settings.ext_proc_tls_server_name)}
           if settings.ext_proc_tls else {}),
    }


def _http2() -> dict[str, Any]:
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}


def _lb_policy(name: str, message: str) -> dict[str, Any]:
    return {"typed_extension_config": {"name": f"envoy.load_balancing_policies.{name}",
                                       "typed_config": {"@type": _T + message}}}


# Least-request, or round-robin for clients without it (grpc's xDS client refuses lb_policy
# LEAST_REQUEST): each client takes the first policy of the list it supports.
_BALANCED = [
    _lb_policy("least_request", "envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest"),
    _lb_policy("round_robin", "envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin")]
# Envoy first takes the host ext_proc reserved KV on (its header); a host that is not there or not
# healthy (health checks, outlier detection) falls back to balancing. Clients without override_host
# (grpc's xDS client) skip to the plain policies.
_OVERRIDE = _lb_policy("override_host", "envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost")
_OVERRIDE["typed_extension_config"]["typed_config"].update({
    "override_host_sources": [{"header": ENDPOINT_HEADER}], "fallback_policy": {"policies": _BALANCED}})
_MODEL_LB = {"policies": [_OVERRIDE, *_BALANCED]}


def _health_check(model: Model, settings: GatewaySettings) -> dict[str, Any]:
    """The engine's own readiness endpoint, over HTTP/1.1 even for the gRPC cluster (its endpoints
    name the HTTP port for health checks)."""
    path = "/v2/health/ready" if model.protocol == "triton" else "/health"
    interval = _duration(settings.health_check_interval_s)
    return {"timeout": interval, "interval": interval, "no_traffic_interval": interval,
            "unhealthy_threshold": 2, "healthy_threshold": 1,
            "http_health_check": {"path": path, "codec_client_type": "HTTP1"}}


# Engines that fail requests (connect failures, resets, 5xx) are ejected for a while; at most half
# of a model's engines at once, so an overload does not empty the cluster.
_OUTLIER_DETECTION = {"consecutive_5xx": 5, "consecutive_gateway_failure": 3, "consecutive_local_origin_failure": 2,
                      "split_external_local_origin_errors": True, "interval": "2s", "base_ejection_time": "10s",
                      "max_ejection_percent": 50}


def _eds_cluster(name: str, settings: GatewaySettings, *, http2: bool = False) -> dict[str, Any]:
    cluster = {
        "name": name,
        "type": "EDS",
        "eds_cluster_config": {"eds_config": _ADS},
        "connect_timeout": "2s",
        "load_balancing_policy": _MODEL_LB,
        # Admission, not Envoy's queue, protects the engine: don't let the breaker refuse first.
        "circuit_breakers": _circuit_breakers(settings.ext_proc_max_requests),
    }
    if http2:
        cluster["typed_extension_protocol_options"] = _http2()
    return cluster


def model_clusters(model: Model, settings: GatewaySettings) -> list[dict[str, Any]]:
    """HTTP/1.1 to the engine's HTTP port; a Triton model also gets an HTTP/2 cluster for gRPC."""
    clusters = [_eds_cluster(model.cluster_name, settings)]
    if model.protocol == "triton":
        clusters.append(_eds_cluster(model.grpc_cluster_name, settings, http2=True))
    failover = {"health_checks": [_health_check(model, settings)], "outlier_detection": _OUTLIER_DETECTION}
    return [{**c, **failover} for c in clusters]


def clusters(catalog: Catalog, settings: GatewaySettings) -> list[dict[str, Any]]:
    return [ext_proc_cluster(settings)] + [c for m in catalog.models for c in model_clusters(m, settings)]


# --- EDS -------------------------------------------------------------------------------------

def endpoints(catalog: Catalog) -> list[dict[str, Any]]:
    out = []
    for m in catalog.models:
        out.append({"cluster_name": m.cluster_name, "endpoints": _lb_endpoints(m.addresses())})
        if m.protocol == "triton":
            out.append({"cluster_name": m.grpc_cluster_name,
                        "endpoints": _lb_endpoints([a.grpc() for a in m.addresses()], [a.port for a in m.addresses()])})
    return out


# --- LDS -------------------------------------------------------------------------------------

def ext_proc_filter(settings: GatewaySettings) -> dict[str, Any]:
    return {
        "name": EXT_PROC_FILTER,
        "typed_config": {
            "@type": _T + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": EXT_PROC_CLUSTER}},
            # Fail closed: a request that was not admitted must never reach an engine.
            "failure_mode_allow": False,
            "message_timeout": _duration(settings.ext_proc_message_timeout_s),
            # ext_proc may extend one wait up to this: a gRPC stream's headers wait for its first message.
            "max_message_timeout": _duration(settings.stream_first_message_timeout_s),
            "processing_mode": {
                "request_header_mode": "SEND",
                # BUFFERED: the whole JSON body in one message, and the stream stays open until the
                # request ends, which is when ext_proc releases the reservation.
                "request_body_mode": "BUFFERED",
                "response_header_mode": "SKIP",
                "response_body_mode": "NONE",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            },
            # For gRPC streams (the ModelStreamInfer route's STREAMED body mode, stream_routes): the
            # first message must reach ext_proc before it answers the headers, since that message
            # names the model. No effect on BUFFERED bodies.
            "send_body_without_waiting_for_header_response": True,
            # Envoy drops dynamic metadata from ext_proc in namespaces not listed here.
            "metadata_options": {"receiving_namespaces": {"untyped": [DECISION_NAMESPACE]}},
        },
    }


# One JSON line per request. `kvgate` is ext_proc's decision as it sent it (dynamic metadata); the
# ext_proc_*_us fields are Envoy's own timing of each ext_proc round trip (the filter's filter state),
# gRPC transport included, unlike ext_proc's kvgate_ext_proc_processing_seconds.
ACCESS_LOG_FORMAT = {
    "start_time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "status": "%RESPONSE_CODE%",
    "grpc_status": "%GRPC_STATUS_NUMBER%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "flags": "%RESPONSE_FLAGS%",
    "duration_ms": "%DURATION%",
    "upstream_ms": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "listener": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "client": "%DOWNSTREAM_REMOTE_ADDRESS%",
    DECISION_NAMESPACE: f"%DYNAMIC_METADATA({DECISION_NAMESPACE})%",
    "ext_proc_headers_us": f"%FILTER_STATE({EXT_PROC_FILTER}:FIELD:request_header_latency_us)%",
    "ext_proc_body_us": f"%FILTER_STATE({EXT_PROC_FILTER}:FIELD:request_body_total_latency_us)%",
}


def access_log(settings: GatewaySettings) -> dict[str, Any]:
    log_format = {"json_format": ACCESS_LOG_FORMAT}
    if settings.access_log_path is None:
        return {"name": "envoy.access_loggers.stdout", "typed_config": {
            "@type": _T + "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog", "log_format": log_format}}
    return {"name": "envoy.access_loggers.file", "typed_config": {
        "@type": _T + "envoy.extensions.access_loggers.file.v3.FileAccessLog", "path": settings.access_log_path,
        "log_format": log_format}}


def _hcm(stat_prefix: str, route_config_name: str, filters: list[dict[str, Any]]) -> dict[str, Any]:
    return {"@type": _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix, "rds": {"route_config_name": route_config_name, "config_source": _ADS},
            "http_filters": [*filters, _ROUTER]}


_ROUTER = {"name": "envoy.filters.http.router",
           "typed_config": {"@type": _T + "envoy.extensions.filters.http.router.v3.Router"}}


def listener(settings: GatewaySettings) -> dict[str, Any]:
    hcm = {
        **_hcm("kvgate", ROUTE_CONFIG_NAME, [ext_proc_filter(settings)]),
        "codec_type": "AUTO",  # HTTP/1.1 and HTTP/2 (h2c) on one port
        # HTTP/2 buffers per stream up to its window: the same cap as HTTP/1.1's buffer limit.
        "http2_protocol_options": {"initial_stream_window_size": max(65535, settings.max_request_bytes)},
        "access_log": [access_log(settings)],
        # Clients can quote the id that every log line about their request carries.
        "always_set_request_id_in_response": True,
    }
    return {
        "name": LISTENER_NAME,
        "address": _socket(settings.listen),
        # Caps what Envoy buffers per HTTP/1.1 request, so bodies over it get Envoy's own 413.
        "per_connection_buffer_limit_bytes": settings.max_request_bytes,
        "filter_chains": [{"filters": [
            {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }


def proxyless_listeners(catalog: Catalog) -> list[dict[str, Any]]:
    """What grpc's xds:///<model> resolver asks for: an API listener named after the model."""
    return [{"name": m.name, "api_listener": {"api_listener": _hcm(m.name, f"proxyless/{m.name}", [])}}
            for m in catalog.models if m.protocol == "triton"]


def proxyless_routes(catalog: Catalog) -> list[dict[str, Any]]:
    return [{"name": f"proxyless/{m.name}", "virtual_hosts": [{
        "name": m.name, "domains": ["*"], "routes": [{"match": {"prefix": ""}, "route": {"cluster": m.grpc_cluster_name}}]}]}
        for m in catalog.models if m.protocol == "triton"]


# --- RDS -------------------------------------------------------------------------------------

def models_list_body(catalog: Catalog) -> bytes:
    """GET /v1/models, answered by Envoy itself; max_model_len is vLLM's field for the context.
    Only models the OpenAI API reaches are listed (Triton models answer Triton's own calls)."""
    return orjson.dumps({"object": "list", "data": [
        {"id": m.name, "object": "model", "created": 0, "owned_by": "kvgate",
         "max_model_len": m.max_context_tokens, "max_output_tokens": m.max_output_tokens}
        for m in catalog.models if m.protocol == "openai"]})


_NO_EXT_PROC = {EXT_PROC_FILTER: {"@type": _T + "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                                   "disabled": True}}
# With tenants, what Envoy answers without admission (models list, Triton metadata) still needs a key:
# ext_proc sees those requests' headers only.
_HEADERS_ONLY = {EXT_PROC_FILTER: {"@type": _T + "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                                   "overrides": {"processing_mode": {
                                       "request_header_mode": "SEND", "request_body_mode": "NONE",
                                       "response_header_mode": "SKIP", "response_body_mode": "NONE"}}}}


def _lookup_filter(catalog: Catalog) -> dict[str, Any]:
    return _HEADERS_ONLY if catalog.tenants else _NO_EXT_PROC


_GET = {"name": ":method", "string_match": {"exact": "GET"}}
_GRPC = {"name": "content-type", "string_match": {"prefix": "application/grpc"}}


def _direct(status: int, body: bytes, *, ext_proc: dict[str, Any] | None) -> dict[str, Any]:
    """A response Envoy gives itself; `ext_proc` is the route's ext_proc override (None: the filter's)."""
    route: dict[str, Any] = {
        "direct_response": {"status": status, "body": {"inline_string": body.decode()}},
        "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
    }
    if ext_proc is not None:
        route["typed_per_filter_config"] = ext_proc
    return route


# Retried only where no engine has started on the request: no connection, refused or reset before it
# was sent, or a 503 before the first byte. Another engine is tried (ext_proc's choice is the first).
_RETRY = {"retry_on": "connect-failure,refused-stream,reset-before-request,retriable-status-codes",
          "retriable_status_codes": [503], "num_retries": 2, "host_selection_retry_max_attempts": 3,
          "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
              "@type": _T + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}]}


def _to_cluster(cluster: str, settings: GatewaySettings, model: Model | None = None) -> dict[str, Any]:
    action: dict[str, Any] = {"cluster": cluster, "timeout": _duration(settings.upstream_timeout_s),
                              "retry_policy": _RETRY}
    if model is not None and model.engine_model != model.name:
        # Triton HTTP names the model in the path: rewrite the gateway's name to the engine's.
        action["regex_rewrite"] = {"pattern": {"regex": f"^/v2/models/{re.escape(model.name)}(/|$)"},
                                   "substitution": f"/v2/models/{model.engine_model}\\1"}
    return action


def model_routes(model: Model, settings: GatewaySettings) -> list[dict[str, Any]]:
    """Routes on the header ext_proc sets after admission; gRPC goes to the HTTP/2 cluster."""
    # ext_proc puts the applied clamp on the request; Envoy copies it to the response, so telling
    # the client costs no extra ext_proc round trip.
    echo = [{"header": {"key": MAX_TOKENS_HEADER, "value": f"%REQ({MAX_TOKENS_HEADER})%"},
             "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
    by_model = {"name": MODEL_HEADER, "string_match": {"exact": model.name}}
    routes = []
    if model.protocol == "triton":
        routes.append({"name": f"{model.name} grpc", "match": {"prefix": "/", "headers": [by_model, _GRPC]},
                       "route": _to_cluster(model.grpc_cluster_name, settings), "response_headers_to_add": echo})
    routes.append({"name": model.name, "match": {"prefix": "/", "headers": [by_model]},
                   "route": _to_cluster(model.cluster_name, settings, model), "response_headers_to_add": echo})
    return routes


def triton_routes(catalog: Catalog, settings: GatewaySettings) -> list[dict[str, Any]]:
    """What Triton clients read without running inference, answered without ext_proc."""
    triton = [m for m in catalog.models if m.protocol == "triton"]
    if not triton:
        return []
    lookup = _lookup_filter(catalog)
    # Health stays open: load balancers in front of the gateway probe it without keys.
    health = [{"name": f"triton {p}", "match": {"path": p, "headers": [_GET]}, **_direct(200, b"", ext_proc=_NO_EXT_PROC)}
              for p in ("/v2/health/live", "/v2/health/ready")]
    server_metadata = {"name": "triton server metadata", "match": {"path": "/v2", "headers": [_GET]},
                       **_direct(200, orjson.dumps({"name": "kvgate", "version": __version__, "extensions": []}),
                                 ext_proc=lookup)}
    # Server-level gRPC calls (ServerLive, ServerReady, ServerMetadata) name no model: the first
    # Triton engine answers them.
    server_rpcs = {"name": "triton grpc server", "match": {"prefix": TRITON_GRPC_SERVICE + "Server"},
                   "route": _to_cluster(triton[0].grpc_cluster_name, settings), "typed_per_filter_config": lookup}
    # Model readiness and metadata over HTTP: routed by the model in the path.
    model_gets = [{"name": f"{m.name} metadata",
                   "match": {"path_separated_prefix": f"/v2/models/{m.name}", "headers": [_GET]},
                   "route": _to_cluster(m.cluster_name, settings, m), "typed_per_filter_config": lookup}
                  for m in triton]
    return health + [server_metadata, server_rpcs] + model_gets


def stream_routes(catalog: Catalog) -> list[dict[str, Any]]:
    """ModelStreamInfer is a bidi stream: a BUFFERED body never ends. Its first route switches
    ext_proc to STREAMED body mode; with send_body_without_waiting_for_header_response the first
    message reaches ext_proc before it answers the headers, so that message can name the model and
    the route cache clear lands on the model's gRPC route. (Envoy 1.40 accepts GRPC body mode, but
    holds the body until the headers are answered, so it cannot route by the first message.)"""
    if not any(m.protocol == "triton" for m in catalog.models):
        return []
    grpc_mode = {EXT_PROC_FILTER: {
        "@type": _T + "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
        "overrides": {"processing_mode": {
            "request_header_mode": "SEND", "request_body_mode": "STREAMED", "response_header_mode": "SKIP",
            "response_body_mode": "NONE", "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"}}}}
    # Reached only when ext_proc routed nothing, which it never does without refusing.
    return [{"name": "triton grpc stream", "match": {"path": TRITON_GRPC_SERVICE + "ModelStreamInfer"},
             **_direct(404, NO_ROUTE_BODY, ext_proc=grpc_mode)}]


NO_ROUTE_BODY = orjson.dumps({"error": {
    "message": "no model route for this request", "type": "invalid_request_error",
    "param": None, "code": "not_found"}})


def route_configuration(catalog: Catalog, settings: GatewaySettings) -> dict[str, Any]:
    models_route = {"name": "models_list", "match": {"path": "/v1/models", "headers": [_GET]},
                    **_direct(200, models_list_body(catalog), ext_proc=_lookup_filter(catalog))}
    # Reached only by a request ext_proc let through without a model, which it never should.
    fallback = {"name": "no_model", "match": {"prefix": "/"}, **_direct(404, NO_ROUTE_BODY, ext_proc=None)}
    return {
        "name": ROUTE_CONFIG_NAME,
        "virtual_hosts": [{
            "name": "kvgate",
            "domains": ["*"],
            "routes": [models_route, *triton_routes(catalog, settings),
                       *(r for m in catalog.models for r in model_routes(m, settings)),
                       *stream_routes(catalog), fallback],
        }],
    }
