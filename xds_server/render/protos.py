"""Envoy resources from the dicts resources.py renders: parsed into their protobuf type, with every
nested Any re-packed deterministically, so one catalog gives the same bytes (and versions) in every
process."""

from __future__ import annotations

from typing import Any, TypeVar

from google.protobuf import any_pb2, json_format, message, symbol_database

# Importing the modules registers their types, which ParseDict needs to resolve "@type".
from envoy.extensions.access_loggers.file.v3 import file_pb2  # noqa: F401
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2  # noqa: F401
from envoy.extensions.access_loggers.stream.v3 import stream_pb2  # noqa: F401
from envoy.extensions.filters.http.buffer.v3 import buffer_pb2  # noqa: F401
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2  # noqa: F401
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2  # noqa: F401
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2  # noqa: F401
from envoy.extensions.load_balancing_policies.override_host.v3 import override_host_pb2  # noqa: F401
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401

M = TypeVar("M", bound=message.Message)


def parse(cls: type[M], data: dict[str, Any]) -> M:
    """`data` as a `cls`; raises (json_format.ParseError, a ValueError) if it is not one."""
    msg = json_format.ParseDict(data, cls())
    _repack_anys(msg)
    return msg


def _repack_anys(msg: message.Message) -> None:
    """ParseDict serializes nested Any (typed_config) at parse time, maps in whatever order the
    process happens to hold them: re-pack each deterministically, or the same catalog would hash to
    another version in another process and reconnecting Envoys would be re-sent everything."""
    for field, value in msg.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].type != field.TYPE_MESSAGE:
                continue
            items = list(value.values())
        else:
            items = list(value) if field.is_repeated else [value]
        for item in items:
            if isinstance(item, any_pb2.Any):
                inner = symbol_database.Default().GetSymbol(item.TypeName())()
                item.Unpack(inner)
                _repack_anys(inner)
                item.Pack(inner, type_url_prefix=item.type_url.rsplit("/", 1)[0] + "/", deterministic=True)
            else:
                _repack_anys(item)
