"""Render a catalog into Envoy resources, as plain dicts in Envoy's own YAML/JSON shape.

Pure functions: build.py parses the dicts into protobuf (protos.py) and packs them into the snapshot,
which `kvgate check` prints. Reading top to bottom follows Envoy's ADS order: clusters, endpoints,
listeners, routes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

# Registers the CEL filter's type, which protos.parse meets in the local reply mappers.
from kvgate.catalog import Address, Catalog, Model, Timeouts, is_ip_address
from kvgate.openai_models import MODELS_PATH, ModelCard, model_list, model_object
from kvgate.triton_index import REPOSITORY_INDEX_PATH, index_json
from kvgate.wire import (ADMISSION_ATTRIBUTES, ANTHROPIC_MESSAGES_PATH, ANTHROPIC_PATHS, BINARY_HEADER,
                         DECISION_NAMESPACE, MAX_TOKENS_HEADER, OPENAI_PATHS, TRITON_CALL_PATH, TRITON_GRPC_SERVICE,
                         anthropic_error_type)
from kvgate.tls import envoy_upstream_tls
from xds_server.settings import GatewaySettings

LISTENER_NAME = "kvgate_http"
ROUTE_CONFIG_NAME = "kvgate_routes"
EXT_PROC_CLUSTER = "kvgate_ext_proc"
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"

_ADS = {"ads": {}, "resource_api_version": "V3"}
_GRPC = {"name": "content-type", "string_match": {"prefix": "application/grpc"}}
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
# Envoy first takes the host ext_proc reserved KV on (its decision's `upstream`, the address in this
# cluster, when it differs from the engine's `endpoint`); a host that is not there or not healthy
# (health checks, outlier detection) falls back to balancing. Clients without override_host (grpc's
# xDS client) skip to the plain policies.
_OVERRIDE = _lb_policy("override_host", "envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost")
_OVERRIDE["typed_extension_config"]["typed_config"].update({
    "override_host_sources": [{"metadata": {"key": DECISION_NAMESPACE, "path": [{"key": key}]}}
                              for key in ("upstream", "endpoint")],
    "fallback_policy": {"policies": _BALANCED}})
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
            # One exchange per request: the headers go on without waiting, and what ext_proc needs of
            # them comes with the body as attributes; the buffer filter after this one holds the
            # headers until the body's answer routed the request (docs/architecture.md, "The request
            # path"). Routes that need the headers themselves (lookups, gRPC streams) ask for them.
            "processing_mode": {
                "request_header_mode": "SKIP",
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
            "request_attributes": list(ADMISSION_ATTRIBUTES),
            # Envoy drops dynamic metadata from ext_proc in namespaces not listed here.
            "metadata_options": {"receiving_namespaces": {"untyped": [DECISION_NAMESPACE]}},
        },
    }


# Before ext_proc: a body ext_proc rewrites would no longer match the client's content-length (Envoy
# answers 500 for that), and with the headers already on their way the answer cannot set a new one.
_NO_CONTENT_LENGTH = {"name": "envoy.filters.http.header_mutation", "typed_config": {
    "@type": _T + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
    "mutations": {"request_mutations": [{"remove": "content-length"}]}}}
BUFFER_FILTER = "envoy.filters.http.buffer"
# A gRPC stream's body never ends: it must not wait in the buffer filter.
_UNBUFFERED = {BUFFER_FILTER: {"@type": _T + "envoy.extensions.filters.http.buffer.v3.BufferPerRoute", "disabled": True}}


def buffer_filter(settings: GatewaySettings) -> dict[str, Any]:
    """After ext_proc: holds the headers until the body is through (so the route chosen from ext_proc's
    answer is the one they take) and sets content-length to the body as it then is."""
    return {"name": BUFFER_FILTER, "typed_config": {
        "@type": _T + "envoy.extensions.filters.http.buffer.v3.Buffer", "max_request_bytes": settings.max_request_bytes}}


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


# --- Envoy's own replies ---------------------------------------------------------------------
# Envoy answers some requests itself (local replies): ext_proc unreachable or too slow, no engine
# able to take the request, a timeout, a body over the limit. The listener's local_reply_config puts
# each into the client's convention (docs/architecture.md, "Envoy's own replies"), by its response
# flags and details as Envoy 1.40 sets them (tests/integration/test_envoy_replies.py). ext_proc's
# refusals (details `kvgate_<code>`) and the routes' direct responses (`direct_response`) are local
# replies too: no mapper matches them, so they pass unchanged.

@dataclass(frozen=True)
class LocalReply:
    """One kind of Envoy's own replies, as the client gets it."""

    code: str  # kvgate's error code
    status: int | None  # the HTTP status; None: Envoy's own
    grpc_status: int | None  # gRPC clients' status; None: Envoy's mapping of the HTTP status
    message: str  # may quote Envoy's own text as %LOCAL_REPLY_BODY%
    when: dict[str, Any]  # the access-log filter that selects Envoy's replies of this kind
    type_: str = "server_error"  # OpenAI's error type
    retry_after_s: int | None = None


def _cel(expression: str) -> dict[str, Any]:
    return {"extension_filter": {"name": "envoy.access_loggers.extension_filters.cel", "typed_config": {
        "@type": _T + "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter", "expression": expression}}}


def _details_start(prefix: str) -> dict[str, Any]:
    return _cel(f"response.code_details.startsWith('{prefix}')")


def _flags(*flags: str) -> dict[str, Any]:
    return {"response_flag_filter": {"flags": list(flags)}}


_UNAVAILABLE, _DEADLINE_EXCEEDED, _RESOURCE_EXHAUSTED = 14, 4, 8


def local_replies(settings: GatewaySettings) -> list[LocalReply]:
    """First match wins."""
    return [
        # ext_proc unreachable (gRPC_error_14), too slow (per-message_timeout_exceeded) or failing:
        # Envoy's 500 or 504, though no engine was involved and a retry soon may well succeed.
        LocalReply("gateway_unavailable", 503, _UNAVAILABLE,
                   "The gateway's admission service is unavailable; the request was not sent to any engine. "
                   "Retry shortly.", _details_start("ext_proc_error"), "service_unavailable", retry_after_s=1),
        LocalReply("body_too_large", 413, _RESOURCE_EXHAUSTED,
                   f"The request body is over the gateway's limit of {settings.max_request_bytes} bytes.",
                   _cel("response.code_details == 'request_payload_too_large'"), "invalid_request_error"),
        LocalReply("engine_timeout", 504, _DEADLINE_EXCEEDED,
                   "The engine did not finish the response within the model's request timeout "
                   "(timeouts.request_s).", _flags("UT")),
        LocalReply("engine_idle_timeout", 504, _DEADLINE_EXCEEDED,
                   "Nothing was sent or received on this request for longer than the model's idle timeout "
                   "(timeouts.idle_s).", _flags("SI")),
        # Admitted, but routed on routes older than the model (pending_route below): retry at once.
        LocalReply("model_not_ready", 503, _UNAVAILABLE,
                   "The model was being added as this request arrived, and the gateway's routes for it were not "
                   "in place yet; the request was not sent to any engine. Retry it.",
                   _cel("response.code_details == 'cluster_not_found'"), "service_unavailable", retry_after_s=1),
        # No healthy engine, connect failure, reset or closed before the response began, overflow, a
        # cluster not there (yet): the same code ext_proc gives when it sees every engine down.
        LocalReply("engine_unavailable", 503, _UNAVAILABLE,
                   "No engine of this model could take the request (unreachable, or failed before answering). "
                   "Retry shortly.", _flags("UH", "UF", "UC", "UR", "URX", "UO", "NC", "LR"),
                   "service_unavailable", retry_after_s=1),
        # Anything else Envoy answers itself, with its status and its own words.
        LocalReply("gateway_error", None, None, "%LOCAL_REPLY_BODY%",
                   _cel("!response.code_details.startsWith('kvgate_') && response.code_details != 'direct_response'")),
    ]


# How a request's convention shows in its headers, most specific first (as in ext_proc/apis.py).
_CONVENTIONS: list[tuple[str, dict[str, Any] | None]] = [
    ("grpc", {"header_filter": {"header": _GRPC}}),
    ("triton", {"header_filter": {"header": {"name": ":path", "string_match": {"prefix": "/v2"}}}}),
    ("anthropic", {"header_filter": {"header": {"name": ":path",
                                                "string_match": {"prefix": ANTHROPIC_MESSAGES_PATH}}}}),
    ("openai", None)]


def _mapper(reply: LocalReply, convention: str, selects: dict[str, Any] | None) -> dict[str, Any]:
    headers = []
    if convention == "grpc":
        # Envoy sends a gRPC request's local reply as trailers-only, the body as grpc-message; its
        # own status mapping makes a 504 UNAVAILABLE and a 413 UNKNOWN, unless grpc-status is set.
        body = {"text_format_source": {"inline_string": reply.message}}
        if reply.grpc_status is not None:
            headers.append({"key": "grpc-status", "value": str(reply.grpc_status)})
    elif convention == "anthropic":
        # Anthropic's shape, as ext_proc's anthropic_protocol gives it; Envoy's own status (None) is
        # a server error there.
        body = {"json_format": {"type": "error", "error": {
            "type": anthropic_error_type(reply.status or 500), "message": reply.message,
            "details": {"error_code": reply.code}}}, "content_type": "application/json"}
    else:
        error: Any = reply.message if convention == "triton" else {
            "message": reply.message, "type": reply.type_, "param": None, "code": reply.code}
        body = {"json_format": {"error": error}, "content_type": "application/json"}
    if reply.retry_after_s is not None:
        key = "grpc-retry-pushback-ms" if convention == "grpc" else "retry-after"
        value = reply.retry_after_s * 1000 if convention == "grpc" else reply.retry_after_s
        headers.append({"key": key, "value": str(value)})
    when = reply.when if selects is None else {"and_filter": {"filters": [reply.when, selects]}}
    return {"filter": when, **({"status_code": reply.status} if reply.status else {}),
            "body_format_override": body,
            **({"headers_to_add": [{"header": h, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"} for h in headers]}
               if headers else {})}


def local_reply_config(settings: GatewaySettings) -> dict[str, Any]:
    return {"mappers": [_mapper(reply, convention, selects)
                        for reply in local_replies(settings) for convention, selects in _CONVENTIONS]}


def _hcm(stat_prefix: str, route_config_name: str, filters: list[dict[str, Any]]) -> dict[str, Any]:
    return {"@type": _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix, "rds": {"route_config_name": route_config_name, "config_source": _ADS},
            "http_filters": [*filters, _ROUTER]}


_ROUTER = {"name": "envoy.filters.http.router",
           "typed_config": {"@type": _T + "envoy.extensions.filters.http.router.v3.Router"}}


def listener(settings: GatewaySettings) -> dict[str, Any]:
    hcm = {
        **_hcm("kvgate", ROUTE_CONFIG_NAME, [_NO_CONTENT_LENGTH, ext_proc_filter(settings), buffer_filter(settings)]),
        "codec_type": "AUTO",  # HTTP/1.1 and HTTP/2 (h2c) on one port
        # HTTP/2 buffers per stream up to its window: the same cap as HTTP/1.1's buffer limit.
        "http2_protocol_options": {"initial_stream_window_size": max(65535, settings.max_request_bytes)},
        "access_log": [access_log(settings)],
        # Clients can quote the id that every log line about their request carries.
        "always_set_request_id_in_response": True,
        "local_reply_config": local_reply_config(settings),
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

def _cards(catalog: Catalog) -> list[ModelCard]:
    """The models the OpenAI API reaches (Triton models answer Triton's own calls)."""
    return [ModelCard(m.name, m.max_context_tokens, m.max_output_tokens) for m in catalog.models if m.protocol == "openai"]


def models_list_body(catalog: Catalog) -> bytes:
    """GET /v1/models, answered by Envoy itself (by ext_proc, per tenant, when the catalog has tenants)."""
    return model_list(_cards(catalog))


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


def _to_cluster(cluster: str, model: Model | None = None) -> dict[str, Any]:
    # `timeout` runs from the end of the request to the end of the response, streams included;
    # `idle_timeout` restarts at every byte either way (and replaces the listener's 5 min stream
    # idle timeout once ext_proc has routed the request). Server-wide calls get the defaults.
    timeouts = model.timeouts if model is not None else Timeouts()
    action: dict[str, Any] = {"cluster": cluster, "timeout": _duration(timeouts.request_s),
                              "idle_timeout": _duration(timeouts.idle_s), "retry_policy": _RETRY}
    if model is not None and model.engine_model != model.name:
        # Triton HTTP names the model in the path: rewrite the gateway's name to the engine's.
        action["regex_rewrite"] = {"pattern": {"regex": f"^/v2/models/{re.escape(model.name)}(/|$)"},
                                   "substitution": f"/v2/models/{model.engine_model}\\1"}
    return action


# ext_proc's decision names the clamp it applied; Envoy copies it to the response, so telling the client
# costs no extra ext_proc round trip.
_ECHO_MAX_TOKENS = [{"header": {"key": MAX_TOKENS_HEADER, "value": f"%DYNAMIC_METADATA({DECISION_NAMESPACE}:max_tokens)%"},
                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]


def model_routes(model: Model) -> list[dict[str, Any]]:
    """Routes on the model ext_proc's decision names (its dynamic metadata, which no client can
    forge); gRPC goes to the HTTP/2 cluster, a gRPC stream without the buffer filter."""
    by_model = [{"filter": DECISION_NAMESPACE, "path": [{"key": "model"}], "value": {"string_match": {"exact": model.name}}}]
    routes = []
    if model.protocol == "triton":
        grpc = _to_cluster(model.grpc_cluster_name, model)
        routes += [{"name": f"{model.name} grpc stream", "route": grpc, "response_headers_to_add": _ECHO_MAX_TOKENS,
                    "match": {"path": TRITON_GRPC_SERVICE + "ModelStreamInfer", "headers": [_GRPC],
                              "dynamic_metadata": by_model},
                    "typed_per_filter_config": _UNBUFFERED},
                   {"name": f"{model.name} grpc", "route": grpc, "response_headers_to_add": _ECHO_MAX_TOKENS,
                    "match": {"prefix": "/", "headers": [_GRPC], "dynamic_metadata": by_model}}]
    routes.append({"name": model.name, "match": {"prefix": "/", "dynamic_metadata": by_model},
                   "route": _to_cluster(model.cluster_name, model), "response_headers_to_add": _ECHO_MAX_TOKENS})
    return routes


def triton_routes(catalog: Catalog) -> list[dict[str, Any]]:
    """What Triton clients read without running inference, answered without ext_proc."""
    triton = [m for m in catalog.models if m.protocol == "triton"]
    if not triton:
        return []
    lookup = _lookup_filter(catalog)
    # Health stays open: load balancers in front of the gateway probe it without keys.
    health = [{"name": f"triton {p}", "match": {"path": p, "headers": [_GET]}, **_direct(200, b"", ext_proc=_NO_EXT_PROC)}
              for p in ("/v2/health/live", "/v2/health/ready")]
    # Server-level calls (GET /v2; ServerLive, ServerReady, ServerMetadata) name no model: the first
    # Triton engine answers them, as the server it is.
    server_metadata = {"name": "triton server metadata", "match": {"path": "/v2", "headers": [_GET]},
                       "route": _to_cluster(triton[0].cluster_name), "typed_per_filter_config": lookup}
    server_rpcs = {"name": "triton grpc server", "match": {"prefix": TRITON_GRPC_SERVICE + "Server"},
                   "route": _to_cluster(triton[0].grpc_cluster_name), "typed_per_filter_config": lookup}
    # The repository index lists the catalog's Triton models (kvgate/triton_index.py): Envoy answers it
    # over HTTP (ext_proc, for a tenant), ext_proc's own gRPC server over gRPC.
    index = [{"name": "triton repository index", "match": {"path": REPOSITORY_INDEX_PATH, "headers": [_POST]},
              **_direct(200, index_json(m.name for m in triton), ext_proc=lookup)},
             {"name": "triton grpc repository index", "match": {"path": TRITON_GRPC_SERVICE + "RepositoryIndex"},
              "route": {"cluster": EXT_PROC_CLUSTER, "timeout": "5s"}, "typed_per_filter_config": lookup}]
    # Model readiness and metadata over HTTP: routed by the model in the path.
    model_gets = [{"name": f"{m.name} metadata",
                   "match": {"path_separated_prefix": f"/v2/models/{m.name}", "headers": [_GET]},
                   "route": _to_cluster(m.cluster_name, m), "typed_per_filter_config": lookup}
                  for m in triton]
    return health + [server_metadata, server_rpcs] + index + model_gets


def stream_routes(catalog: Catalog) -> list[dict[str, Any]]:
    """ModelStreamInfer is a bidi stream: a BUFFERED body never ends. Its first route switches
    ext_proc to STREAMED body mode; with send_body_without_waiting_for_header_response the first
    message reaches ext_proc before it answers the headers, so that message can name the model and
    the route cache clear lands on the model's gRPC route. (Envoy 1.40 accepts GRPC body mode, but
    holds the body until the headers are answered, so it cannot route by the first message.)"""
    if not any(m.protocol == "triton" for m in catalog.models):
        return []
    # The responses too, chunk by chunk: each request on the stream is released at its last response
    # (ext_proc/stream_exchange.py). This route's mode is the one the whole exchange keeps: Envoy reads
    # the per-route override when the headers arrive, before the route cache is cleared.
    grpc_mode = {EXT_PROC_FILTER: {
        "@type": _T + "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
        "overrides": {"processing_mode": {
            "request_header_mode": "SEND", "request_body_mode": "STREAMED", "response_header_mode": "SKIP",
            "response_body_mode": "STREAMED", "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"}}}}
    # Reached only when ext_proc routed nothing, which it never does without refusing.
    return [{"name": "triton grpc stream", "match": {"path": TRITON_GRPC_SERVICE + "ModelStreamInfer"},
             **_direct(404, NO_ROUTE_BODY, ext_proc={**grpc_mode, **_UNBUFFERED})}]


NO_ROUTE_BODY = orjson.dumps({"error": {
    "message": "no model route for this request", "type": "invalid_request_error",
    "param": None, "code": "not_found"}})


_POST = {"name": ":method", "string_match": {"exact": "POST"}}
_ADMITS = ("The gateway admits the OpenAI API, Triton's generate and KServe v2 infer over HTTP, and Triton's "
           "gRPC inference.")


def _openai_error(status: int, code: str, message: str) -> dict[str, Any]:
    return _direct(status, orjson.dumps({"error": {"message": message, "type": "invalid_request_error",
                                                   "param": None, "code": code}}), ext_proc=None)


def _triton_error(status: int, message: str) -> dict[str, Any]:
    return _direct(status, orjson.dumps({"error": message}), ext_proc=None)


def _anthropic_error(status: int, code: str, message: str) -> dict[str, Any]:
    """As ext_proc's anthropic_protocol.error_body says it."""
    return _direct(status, orjson.dumps({"type": "error", "error": {
        "type": anthropic_error_type(status), "message": message, "details": {"error_code": code}}}), ext_proc=None)


def _bodiless(path: str, error: Any) -> list[dict[str, Any]]:
    """A call that takes a body, sent without one (400) or by another method (405), in its convention."""
    return [{"name": f"{path} without a body", "match": {"path": path, "headers": [_POST]},
             **error(400, "invalid_request", "request body is empty")},
            {"name": f"{path} by another method", "match": {"path": path},
             **error(405, "method_not_allowed", f"{path} takes POST")}]


# A cluster that never exists: routing to it is Envoy's 503 cluster_not_found, which local_replies
# turns into model_not_ready in the client's convention.
_ROUTE_PENDING_CLUSTER = "kvgate_route_pending"


def pending_route() -> dict[str, Any]:
    """A request ext_proc admitted for a model none of its routes names. Envoy snaps a request's routes
    when its headers arrive; ext_proc gets a new model's policy only once every Envoy has ACKed the
    model's routes (control.py), but a request already in flight then still holds the routes it began
    with (found under load: 280 of them over 50 adds to ten Envoys, answered 400 "request body is
    empty" by the bodiless route). It gets a retryable 503 instead; its reservation goes with its end."""
    decided = [{"filter": DECISION_NAMESPACE, "path": [{"key": "model"}], "value": {"present_match": True}}]
    return {"name": "admitted, route pending", "match": {"prefix": "/", "dynamic_metadata": decided},
            "route": {"cluster": _ROUTE_PENDING_CLUSTER}}


def unrouted_routes() -> list[dict[str, Any]]:
    """Where a request ends that ext_proc did not route: it is called with a request's body, so these
    answer the ones without one (a POST with an empty body, a GET to an inference call, an unknown URL)
    in the convention of the path. A request with a body starts on one of these too, and leaves it when
    ext_proc's answer names its model. They keep the filter's ext_proc mode: with a body, it is called."""
    routes = [r for path in OPENAI_PATHS for r in _bodiless(path, _openai_error)]
    routes += [r for path in ANTHROPIC_PATHS for r in _bodiless(path, _anthropic_error)]
    # Anything else under Anthropic's messages path (batches...): its 404, in its shape.
    routes.append({"name": "unknown anthropic url", "match": {"path_separated_prefix": ANTHROPIC_MESSAGES_PATH},
                   **_anthropic_error(404, "unknown_url", f"Unknown request URL. {_ADMITS}")})
    triton = {"safe_regex": {"regex": TRITON_CALL_PATH}}
    # KServe's binary-tensor extension: a clamp that changes the JSON part's length must change the
    # Inference-Header-Content-Length header too, which an answer to the body alone cannot. So these
    # take two exchanges, the headers held until the body's answer (ext_proc's original mode).
    binary = {**_triton_error(400, "request body is empty"),
              "typed_per_filter_config": {EXT_PROC_FILTER: {
                  "@type": _T + "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                  "overrides": {"processing_mode": {"request_header_mode": "SEND", "request_body_mode": "BUFFERED",
                                                    "response_header_mode": "SKIP", "response_body_mode": "NONE",
                                                    "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"}}}}}
    routes += [{"name": "kserve binary call", "match": {**triton, "headers": [
                    _POST, {"name": BINARY_HEADER, "present_match": True}]}, **binary},
               {"name": "triton call without a body", "match": {**triton, "headers": [_POST]},
                **_triton_error(400, "request body is empty")},
               {"name": "triton call by another method", "match": triton,
                **_triton_error(405, "Triton's generate and infer calls take POST")},
               {"name": "unknown triton url", "match": {"prefix": "/v2"},
                **_triton_error(404, f"Unknown request URL. {_ADMITS}")},
               {"name": "unknown url", "match": {"prefix": "/"},
                **_openai_error(404, "unknown_url", f"Unknown request URL. {_ADMITS}")}]
    return routes


def model_lookup_routes(catalog: Catalog) -> list[dict[str, Any]]:
    """GET /v1/models and /v1/models/{id}, answered by Envoy (with tenants, ext_proc answers them from
    the tenant's list: it sees their headers)."""
    lookup = _lookup_filter(catalog)
    unknown = orjson.dumps({"error": {"message": "The model does not exist.", "type": "invalid_request_error",
                                      "param": "model", "code": "model_not_found"}})
    return [{"name": "models_list", "match": {"path": MODELS_PATH, "headers": [_GET]},
             **_direct(200, models_list_body(catalog), ext_proc=lookup)},
            *({"name": f"model {c.name}", "match": {"path": f"{MODELS_PATH}/{c.name}", "headers": [_GET]},
               **_direct(200, model_object(c), ext_proc=lookup)} for c in _cards(catalog)),
            {"name": "unknown model", "match": {"prefix": f"{MODELS_PATH}/", "headers": [_GET]},
             **_direct(404, unknown, ext_proc=lookup)}]


def route_configuration(catalog: Catalog, settings: GatewaySettings) -> dict[str, Any]:
    return {
        "name": ROUTE_CONFIG_NAME,
        "virtual_hosts": [{
            "name": "kvgate",
            "domains": ["*"],
            "routes": [*model_lookup_routes(catalog), *triton_routes(catalog),
                       *(r for m in catalog.models for r in model_routes(m)),
                       *stream_routes(catalog), pending_route(), *unrouted_routes()],
        }],
    }
