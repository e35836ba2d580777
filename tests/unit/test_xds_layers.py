"""The control plane's layers (xds_server/__init__.py): the stream state machines, the ACK waits, the
cache and the ADS server know resource types only as type URLs and snapshots as packed bytes, so
importing them loads neither the catalog nor the renderer nor Envoy's resource types; and the renderer
knows nothing of the transport."""

from __future__ import annotations

import subprocess
import sys

from tests.unit.test_import_shape import ROOT, imports_of

# What both the renderer and the transport use.
SHARED = ("xds_server.resource_types", "xds_server.snapshot")
TRANSPORT = ("xds_server.cache", "xds_server.acks", "xds_server.sotw", "xds_server.delta", "xds_server.server")
# The catalog and its validation stack, the renderer, and the Envoy resource types only it parses into.
NOT_LOADED = ("kvgate.catalog", "pydantic", "yaml", "xds_server.render", "xds_server.control",
              "envoy.config.cluster.v3.cluster_pb2", "envoy.config.endpoint.v3.endpoint_pb2",
              "envoy.config.listener.v3.listener_pb2", "envoy.config.route.v3.route_pb2")


def test_the_streams_and_the_cache_load_no_catalog_and_no_renderer() -> None:
    probe = (f"import sys, {', '.join(SHARED + TRANSPORT)}; "
             f"print(sorted(m for m in {NOT_LOADED!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_the_renderer_imports_no_transport() -> None:
    for path in sorted((ROOT / "xds_server" / "render").glob("*.py")):
        assert not imports_of(path) & {*TRANSPORT, "xds_server.control"}, path
