"""A second, independent xDS client: grpc-python's own xds:/// resolver gets its listener, routes,
cluster and endpoints from our control plane (stricter than Envoy: named LDS and CDS, localities),
and its calls reach the engine."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
import pytest

from kvgate.catalog import Address, parse_catalog
from kvgate.cli.processes import Supervisor, free_port
from xds_server.server import XdsServer
from xds_server.settings import GatewaySettings
from xds_server.render.build import build_snapshot
from xds_server.resource_types import CLUSTER, ENDPOINT, LISTENER, ROUTE

CLIENT = """
import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
with grpc.insecure_channel("xds:///llama-tri") as channel:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=20).live
    assert stub.ModelReady(service_pb2.ModelReadyRequest(name="ensemble"), timeout=20).ready
print("ok")
"""


@pytest.mark.asyncio
async def test_grpc_xds_client_resolves_and_calls_through_our_control_plane(tmp_path: Path) -> None:
    procs = Supervisor(tmp_path)
    engine = Address(host="127.0.0.1", port=free_port(), grpc_port=free_port())
    procs.start("sim", [sys.executable, "-m", "engines.sim", "--protocol", "triton", "--model", "ensemble",
                        "--port", str(engine.port), "--grpc-port", str(engine.grpc_port)])
    catalog = parse_catalog({"models": [{
        "name": "llama-tri", "protocol": "triton", "backend_model": "ensemble", "max_context_tokens": 2048,
        "endpoints": [{"host": engine.host, "port": engine.port, "grpc_port": engine.grpc_port}],
        "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "64MiB"}}]})
    settings = GatewaySettings(listen=Address(host="127.0.0.1", port=free_port()), proxyless_group="kvgate-grpc")
    server = XdsServer(build_snapshot(catalog, settings))
    port = await server.start("127.0.0.1", 0)
    bootstrap = tmp_path / "bootstrap.json"
    bootstrap.write_text(json.dumps({
        "xds_servers": [{"server_uri": f"127.0.0.1:{port}", "channel_creds": [{"type": "insecure"}],
                         "server_features": ["xds_v3"]}],
        "node": {"id": "grpc-client-0", "cluster": "kvgate-grpc", "locality": {}}}))
    try:
        deadline = time.monotonic() + 20
        while not _ready(engine):
            assert time.monotonic() < deadline, "engine never came up"
            await asyncio.sleep(0.05)
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, env={"GRPC_XDS_BOOTSTRAP": str(bootstrap), "PATH": "/usr/bin:/bin"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(client.communicate(), 60)
        assert client.returncode == 0 and out.decode().strip() == "ok", err.decode()[-3000:]
        # It fetched each resource type (named LDS/CDS, as grpc does) and accepted every one.
        assert all(server.servicer.responses_sent[t] >= 1 for t in (LISTENER, ROUTE, CLUSTER, ENDPOINT))
        assert server.servicer.nacks == []
    finally:
        procs.stop_all()
        await server.stop(0)


def _ready(addr: Address) -> bool:
    try:
        return httpx.get(f"http://{addr}/v2/health/ready").status_code == 200
    except httpx.HTTPError:
        return False
