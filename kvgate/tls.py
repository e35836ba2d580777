"""TLS and mutual TLS for kvgate's own gRPC connections: xDS and the admin API (xds_server), ext_proc's
ExternalProcessor server, ext_proc's ADS channel, and Envoy's two upstream clusters to them.

One shape for every side: `TlsFiles(cert, key, ca)`, PEM file paths.
- A server presents cert/key; `ca` set means mutual TLS: every client must present a certificate
  signed by it.
- A client verifies the server against `ca`; cert/key, if set, are its own certificate for a server
  that requires one.

Files are read when credentials are built (at start): rotating a certificate means restarting the
process. The Envoy pieces are rendered as paths only, since Envoy reads them itself (and may see a
different filesystem than the process rendering them).
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

UPSTREAM_TLS_CONTEXT = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
# The name generated test certificates carry (and the SNI Envoy sends): the services listen on loopback.
DEFAULT_SERVER_NAME = "localhost"

ChannelOptions = Sequence[tuple[str, Any]]


class TlsError(ValueError):
    pass


@dataclass(frozen=True)
class TlsFiles:
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    def __post_init__(self) -> None:
        # Half a key pair is always a mistake: say so before anything listens or dials.
        if (self.cert is None) != (self.key is None):
            raise TlsError("a certificate and its private key go together (set both or neither)")


@dataclass(frozen=True)
class TlsBundle:
    """The files for a whole gateway on one host: one CA signs every certificate, xds_server and
    ext_proc share the server certificate, and every client (Envoy, ext_proc's ADS channel, the
    admin CLI) presents the client one. Without a client certificate the servers take any client."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path | None = None
    client_key: Path | None = None
    # The name clients check the server certificate for (a DNS or IP subject alt name).
    server_name: str = DEFAULT_SERVER_NAME

    @property
    def mutual(self) -> bool:
        return self.client_cert is not None

    @property
    def server(self) -> TlsFiles:
        return TlsFiles(self.server_cert, self.server_key, self.ca if self.mutual else None)

    @property
    def client(self) -> TlsFiles:
        return TlsFiles(self.client_cert, self.client_key, self.ca)


def describe(files: TlsFiles | None, *, server: bool) -> str:
    """For logs and status lines: "plaintext", "TLS" or "mutual TLS"."""
    if files is None:
        return "plaintext"
    mutual = files.ca is not None if server else files.cert is not None
    return "mutual TLS" if mutual else "TLS"


# --- gRPC ------------------------------------------------------------------------------------------

def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TlsError(f"cannot read {path}: {e.strerror}") from None


def readable(files: TlsFiles | None) -> TlsFiles | None:
    """`files`, once each can be read: a process that reads its files later (on every reconnect)
    fails at start, not in a background task."""
    for path in (files.cert, files.key, files.ca) if files else ():
        _read(path)
    return files


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    if files.cert is None:
        raise TlsError("a TLS server needs a certificate and key")
    ca = _read(files.ca)
    return grpc.ssl_server_credentials([(_read(files.key), _read(files.cert))], root_certificates=ca,
                                       require_client_auth=ca is not None)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    if files.ca is None:
        # grpc would fall back to the system's roots; kvgate's servers are signed by a private CA.
        raise TlsError("a TLS client needs the CA that signed the server's certificate")
    return grpc.ssl_channel_credentials(root_certificates=_read(files.ca), private_key=_read(files.key),
                                        certificate_chain=_read(files.cert))


def bind(server: grpc.aio.Server, address: str, files: TlsFiles | None) -> int:
    """Add a listening port, TLS if `files`: the bound port, 0 if it could not bind."""
    if files is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(files))


def aio_channel(target: str, files: TlsFiles | None, options: ChannelOptions = ()) -> grpc.aio.Channel:
    if files is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, channel_credentials(files), options=options)


def channel(target: str, files: TlsFiles | None, options: ChannelOptions = ()) -> grpc.Channel:
    """The blocking kind, for the admin CLI."""
    if files is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, channel_credentials(files), options=options)


# --- command-line flags ----------------------------------------------------------------------------
# Servers: --tls-cert --tls-key [--tls-client-ca]. Clients: --PREFIX-ca [--PREFIX-cert --PREFIX-key].

def add_server_flags(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group(f"TLS for {what} (default: plaintext)")
    g.add_argument("--tls-cert", type=Path, help="PEM certificate chain to serve; with --tls-key turns TLS on")
    g.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    g.add_argument("--tls-client-ca", type=Path,
                   help="require client certificates signed by this PEM CA (mutual TLS)")


def add_client_flags(p: argparse.ArgumentParser, prefix: str, what: str) -> None:
    g = p.add_argument_group(f"TLS for {what} (default: plaintext)")
    g.add_argument(f"--{prefix}-ca", type=Path, help=f"PEM CA that signed {what}'s certificate; turns TLS on")
    g.add_argument(f"--{prefix}-cert", type=Path, help="PEM client certificate to present (mutual TLS)")
    g.add_argument(f"--{prefix}-key", type=Path, help=f"PEM private key of --{prefix}-cert")


def server_files(args: argparse.Namespace) -> TlsFiles | None:
    """The server flags' files, None for plaintext; raises TlsError if they do not make sense."""
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise TlsError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        return None
    return _files(args.tls_cert, args.tls_key, args.tls_client_ca, "--tls-cert/--tls-key")


def client_files(args: argparse.Namespace, prefix: str) -> TlsFiles | None:
    dest = prefix.replace("-", "_")
    return client_tls(*(getattr(args, f"{dest}_{part}") for part in ("ca", "cert", "key")), flags=f"--{prefix}-")


def client_tls(ca: Path | None, cert: Path | None, key: Path | None, *, flags: str = "--") -> TlsFiles | None:
    """A client's files from its options (named `{flags}ca` etc. in errors); None for plaintext."""
    if ca is None:
        if cert is not None or key is not None:
            raise TlsError(f"{flags}cert/{flags}key need {flags}ca (mutual TLS is TLS first)")
        return None
    return _files(cert, key, ca, f"{flags}cert/{flags}key")


def _files(cert: Path | None, key: Path | None, ca: Path | None, flags: str) -> TlsFiles:
    try:
        return TlsFiles(cert, key, ca)
    except TlsError:
        raise TlsError(f"{flags}: set both or neither") from None


def server_flags(files: TlsFiles | None) -> list[str]:
    """The argv that `server_files` reads back as `files`."""
    return _flags({"--tls-cert": files.cert, "--tls-key": files.key, "--tls-client-ca": files.ca} if files else {})


def client_flags(files: TlsFiles | None, prefix: str) -> list[str]:
    """The argv that `client_files(args, prefix)` reads back as `files`."""
    return _flags({f"--{prefix}-ca": files.ca, f"--{prefix}-cert": files.cert, f"--{prefix}-key": files.key}
                  if files else {})


def _flags(values: dict[str, Path | None]) -> list[str]:
    return [a for flag, path in values.items() if path is not None for a in (flag, str(path))]


# --- Envoy -----------------------------------------------------------------------------------------

def envoy_upstream_tls(files: TlsFiles, server_name: str = DEFAULT_SERVER_NAME) -> dict[str, Any]:
    """An Envoy cluster's `transport_socket` to a kvgate gRPC server: the server certificate checked
    against `files.ca` and `server_name`, and Envoy's own certificate presented when `files` has one."""
    if files.ca is None:
        # Envoy without a trusted CA encrypts but verifies nothing: refuse rather than pretend.
        raise TlsError("Envoy needs the CA that signed the server's certificate")
    try:
        ipaddress.ip_address(server_name)
        san_type, sni = "IP_ADDRESS", {}  # SNI carries host names only
    except ValueError:
        san_type, sni = "DNS", {"sni": server_name}
    common: dict[str, Any] = {
        # Both servers are gRPC: HTTP/2, which grpc servers expect to be negotiated by ALPN.
        "alpn_protocols": ["h2"],
        "validation_context": {
            "trusted_ca": {"filename": str(files.ca)},
            # Without a SAN matcher Envoy accepts any certificate the CA signed, for any name.
            "match_typed_subject_alt_names": [{"san_type": san_type, "matcher": {"exact": server_name}}],
        },
    }
    if files.cert is not None:
        common["tls_certificates"] = [{"certificate_chain": {"filename": str(files.cert)},
                                       "private_key": {"filename": str(files.key)}}]
    return {"name": "envoy.transport_sockets.tls",
            "typed_config": {"@type": UPSTREAM_TLS_CONTEXT, **sni, "common_tls_context": common}}
