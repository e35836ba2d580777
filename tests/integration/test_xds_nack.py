"""A config Envoy rejects is NACKed, logged with Envoy's error, and not re-sent until it changes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from google.protobuf import json_format
from structlog.testing import capture_logs

from envoy.config.cluster.v3 import cluster_pb2
from kvgate.catalog import Address, parse_catalog
from kvgate.cli.envoy_bootstrap import envoy_binary, render_bootstrap
from kvgate.cli.processes import Supervisor, free_port
from xds_server.server import XdsServer
from xds_server.settings import GatewaySettings
from xds_server.render.build import build_snapshot
from xds_server.resource_types import CLUSTER
from xds_server.snapshot import Resources, Snapshot

CATALOG = parse_catalog({"models": [{
    "name": "m", "endpoints": ["127.0.0.1:9"], "max_context_tokens": 2048,
    "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "16MiB"}}]})


def with_invalid_cluster(snapshot: Snapshot) -> Snapshot:
    """The same snapshot plus a cluster that fails Envoy's validation (connect_timeout must be > 0)."""
    bad = json_format.ParseDict({"name": "broken", "type": "STATIC", "connect_timeout": "-1s"},
                                cluster_pb2.Cluster())
    clusters = {name: cluster_pb2.Cluster.FromString(a.value) for name, a in snapshot.get(CLUSTER).items.items()}
    return Snapshot(by_type={**snapshot.by_type, CLUSTER: Resources.of({**clusters, "broken": bad})})


async def wait_until(predicate, timeout_s: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_nack_is_logged_once_and_not_resent_in_a_loop(tmp_path: Path) -> None:
    good = build_snapshot(CATALOG, GatewaySettings(listen=Address(host="127.0.0.1", port=free_port())))
    server = XdsServer(with_invalid_cluster(good))
    xds_port = await server.start("127.0.0.1", 0)
    admin_port = free_port()
    bootstrap = tmp_path / "envoy.yaml"
    bootstrap.write_text(render_bootstrap(node_id="nack-test", node_cluster="kvgate-envoy", admin_port=admin_port,
                                          xds=Address(host="127.0.0.1", port=xds_port)))
    procs = Supervisor(tmp_path)
    try:
        with capture_logs() as logs:
            procs.start("envoy", [envoy_binary(), "-c", str(bootstrap), "--disable-hot-restart", "-l", "warn"])
            await wait_until(lambda: server.servicer.nacks, 20, "Envoy's NACK")
            sent_after_nack = server.servicer.responses_sent[CLUSTER]
            await asyncio.sleep(2.0)  # a resend loop would show within milliseconds
            assert server.servicer.responses_sent[CLUSTER] == sent_after_nack == 1
            assert len(server.servicer.nacks) == 1
            node, nack = server.servicer.nacks[0]
            assert node == "nack-test" and nack.type_url == CLUSTER and "duration" in nack.message
            logged = [e for e in logs if e["event"] == "xds.nack"]
            assert len(logged) == 1 and logged[0]["error_detail"] == nack.message

            # A corrected config goes out at once, is ACKed, and Envoy finishes starting.
            assert await server.publish(good)
            stream = next(iter(server.servicer.clients.values())).stream
            await wait_until(lambda: stream.types[CLUSTER].acked_version == good.get(CLUSTER).version, 20, "ACK")
            async with httpx.AsyncClient() as http:
                async def live() -> bool:
                    return (await http.get(f"http://127.0.0.1:{admin_port}/ready")).text.strip() == "LIVE"
                deadline = time.monotonic() + 20
                while not await live():
                    assert time.monotonic() < deadline, "Envoy never went LIVE"
                    await asyncio.sleep(0.1)
        assert len(server.servicer.nacks) == 1
    finally:
        procs.stop_all()
        await server.stop(0)
