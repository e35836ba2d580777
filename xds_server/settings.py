"""Gateway-wide settings: where things listen, and the data-path limits that are not per model."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvgate.catalog import Address
from kvgate.tls import DEFAULT_SERVER_NAME, TlsFiles


@dataclass(frozen=True)
class GatewaySettings:
    listen: Address = field(default_factory=lambda: Address(host="127.0.0.1", port=8080))
    ext_proc: tuple[Address, ...] = (Address(host="127.0.0.1", port=9002),)
    # TLS from Envoy to ext_proc (None: plaintext): the CA that signed ext_proc's certificate and
    # Envoy's own certificate for mutual TLS, as paths on Envoy's filesystem; and the name
    # ext_proc's certificate must carry.
    ext_proc_tls: TlsFiles | None = None
    ext_proc_tls_server_name: str = DEFAULT_SERVER_NAME
    # (node group, listen address): Envoys whose node.cluster is the group bind there instead.
    group_listen: tuple[tuple[str, Address], ...] = ()
    # Node group of proxyless gRPC clients (grpc's xds:/// resolver): served an API listener per
    # Triton model, named after it, routing straight to its engines' gRPC ports (no admission).
    proxyless_group: str | None = None
    # Largest request body Envoy buffers for ext_proc; bigger bodies get Envoy's own 413.
    max_request_bytes: int = 4 * 2**20
    # ext_proc answers in well under a millisecond, but a GC pause must not become a 504
    # (Envoy's default is 200 ms).
    ext_proc_message_timeout_s: float = 2.0
    # How long a gRPC stream may wait for its first message, which ext_proc needs to route it.
    stream_first_message_timeout_s: float = 60.0
    # Envoy's active health checks of the engines (and, with no traffic, as often).
    health_check_interval_s: float = 1.0
    # Far above Envoy's default 1024: every in-flight LLM request holds one ext_proc stream.
    ext_proc_max_requests: int = 100_000
    # Envoy's JSON access log, one line per request with ext_proc's decision; None: Envoy's stdout.
    access_log_path: str | None = None
