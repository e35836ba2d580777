"""Render a catalog into Envoy resources, as plain dicts in Envoy's own YAML/JSON shape.

Pure functions: the dicts are what `kvgate check` prints and what snapshot.py packs into protobuf.
Reading top to bottom follows Envoy's ADS order: clusters, endpoints, listener, routes.
"""

from __future__ import annotations

from typing import Any

import orjson

from kvgate.catalog import Address, Catalog, Model
from kvgate.headers import MAX_TOKENS_HEADER, MODEL_HEADER
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


def _lb_endpoints(addrs: list[Address] | tuple[Address, ...]) -> list[dict[str, Any]]:
    # grpc-python's xDS client requires a locality on every endpoint group.
    return [{"locality": {"region": "local"},
             "lb_endpoints": [{"endpoint": {"address": _socket(a)}} for a in addrs]}]


def _circuit_breakers(limit: int) -> dict[str, Any]:
    return {"thresholds": [{"max_connections": limit, "max_pending_requests": limit,
                            "max_requests": limit, "max_retries": 3}]}


# --- CDS -------------------------------------------------------------------------------------

def ext_proc_cluster(settings: GatewaySettings) -> dict[str, Any]:
    return {
        "name": EXT_PROC_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "circuit_breakers": _circuit_breakers(settings.ext_proc_max_requests),
        "load_assignment": {"cluster_name": EXT_PROC_CLUSTER, "endpoints": _lb_endpoints(settings.ext_proc)},
    }


def model_cluster(model: Model, settings: GatewaySettings) -> dict[str, Any]:
    return {
        "name": model.cluster_name,
        "type": "EDS",
        "eds_cluster_config": {"eds_config": _ADS},
        "connect_timeout": "2s",
        "lb_policy": "LEAST_REQUEST",
        # Admission, not Envoy's queue, protects the engine: don't let the breaker refuse first.
        "circuit_breakers": _circuit_breakers(settings.ext_proc_max_requests),
    }


def clusters(catalog: Catalog, settings: GatewaySettings) -> list[dict[str, Any]]:
    return [ext_proc_cluster(settings)] + [model_cluster(m, settings) for m in catalog.models]


# --- EDS -------------------------------------------------------------------------------------

def endpoints(catalog: Catalog) -> list[dict[str, Any]]:
    return [{"cluster_name": m.cluster_name, "endpoints": _lb_endpoints(m.addresses())} for m in catalog.models]


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
            # Lets ext_proc skip the body of requests it refuses at the headers.
            "allow_mode_override": True,
        },
    }


def listener(settings: GatewaySettings) -> dict[str, Any]:
    hcm = {
        "@type": _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "kvgate",
        "codec_type": "AUTO",  # HTTP/1.1 and HTTP/2 (h2c) on one port
        # HTTP/2 buffers per stream up to its window: the same cap as HTTP/1.1's buffer limit.
        "http2_protocol_options": {"initial_stream_window_size": max(65535, settings.max_request_bytes)},
        "rds": {"route_config_name": ROUTE_CONFIG_NAME, "config_source": _ADS},
        "http_filters": [
            ext_proc_filter(settings),
            {"name": "envoy.filters.http.router",
             "typed_config": {"@type": _T + "envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    return {
        "name": LISTENER_NAME,
        "address": _socket(settings.listen),
        # Caps what Envoy buffers per HTTP/1.1 request, so bodies over it get Envoy's own 413.
        "per_connection_buffer_limit_bytes": settings.max_request_bytes,
        "filter_chains": [{"filters": [
            {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }


# --- RDS -------------------------------------------------------------------------------------

def models_list_body(catalog: Catalog) -> bytes:
    """GET /v1/models, answered by Envoy itself; max_model_len is vLLM's field for the context."""
    return orjson.dumps({"object": "list", "data": [
        {"id": m.name, "object": "model", "created": 0, "owned_by": "kvgate",
         "max_model_len": m.max_context_tokens, "max_output_tokens": m.max_output_tokens}
        for m in catalog.models]})


def _json_response(status: int, body: bytes, *, skip_ext_proc: bool) -> dict[str, Any]:
    route: dict[str, Any] = {
        "direct_response": {"status": status, "body": {"inline_string": body.decode()}},
        "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
    }
    if skip_ext_proc:
        route["typed_per_filter_config"] = {EXT_PROC_FILTER: {
            "@type": _T + "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute", "disabled": True}}
    return route


def model_route(model: Model, settings: GatewaySettings) -> dict[str, Any]:
    return {
        "name": model.name,
        "match": {"prefix": "/", "headers": [{"name": MODEL_HEADER, "string_match": {"exact": model.name}}]},
        "route": {"cluster": model.cluster_name, "timeout": _duration(settings.upstream_timeout_s)},
        # ext_proc puts the applied clamp on the request; Envoy copies it to the response, so telling
        # the client costs no extra ext_proc round trip.
        "response_headers_to_add": [{
            "header": {"key": MAX_TOKENS_HEADER, "value": f"%REQ({MAX_TOKENS_HEADER})%"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
    }


NO_ROUTE_BODY = orjson.dumps({"error": {
    "message": "no model route for this request", "type": "invalid_request_error",
    "param": None, "code": "not_found"}})


def route_configuration(catalog: Catalog, settings: GatewaySettings) -> dict[str, Any]:
    models_route = {"name": "models_list",
                    "match": {"path": "/v1/models",
                              "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
                    **_json_response(200, models_list_body(catalog), skip_ext_proc=True)}
    # Reached only by a request ext_proc let through without a model, which it never should.
    fallback = {"name": "no_model", "match": {"prefix": "/"}, **_json_response(404, NO_ROUTE_BODY, skip_ext_proc=False)}
    return {
        "name": ROUTE_CONFIG_NAME,
        "virtual_hosts": [{
            "name": "kvgate",
            "domains": ["*"],
            "routes": [models_route] + [model_route(m, settings) for m in catalog.models] + [fallback],
        }],
    }
