"""xds_server/acks.py: waits for every client's answer, woken by each answer as it is recorded; and
the ADS server (xds_server/server.py) telling the waits of requests, pushes and disconnects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
from google.rpc.status_pb2 import Status
from kvgate.catalog import parse_catalog
from xds_server.acks import AckState, AckWaits, unanswered
from xds_server.render.build import build_snapshot
from xds_server.resource_types import CLUSTER, POLICY
from xds_server.server import XdsServer
from xds_server.settings import GatewaySettings

# --- AckWaits, alone ---------------------------------------------------------------------------------


def sent(version: str, acked: str = "") -> dict[str, AckState]:
    return {CLUSTER: AckState(sent_version=version, acked_version=acked)}


def test_unanswered_means_subscribed_and_neither_acked_nor_nacked() -> None:
    assert unanswered(sent("v2", acked="v1"), CLUSTER, "v2")
    assert not unanswered(sent("v2", acked="v2"), CLUSTER, "v2")
    assert not unanswered({CLUSTER: AckState(sent_version="v2", nacked_version="v2")}, CLUSTER, "v2")
    assert not unanswered(sent("v2"), POLICY, "v2")  # not subscribed to it


async def waiting(waits: AckWaits, *pending: str) -> asyncio.Task[bool]:
    """A wait for version v2 of CLUSTER, begun."""
    task = asyncio.create_task(waits.wait(CLUSTER, "v2", set(pending), timeout_s=5))
    await asyncio.sleep(0)
    return task


def ack_v2(waits: AckWaits, client: str, types: dict[str, AckState]) -> None:
    types[CLUSTER].acked_version = "v2"
    waits.changed(client, types)


async def still_waiting(task: asyncio.Task[bool]) -> bool:
    await asyncio.sleep(0)
    return not task.done()


@pytest.mark.asyncio
async def test_a_wait_ends_once_every_client_acked_nacked_or_left() -> None:
    waits = AckWaits()
    a, b = sent("v2", acked="v1"), sent("v2", acked="v1")
    task = await waiting(waits, "a", "b", "gone")
    ack_v2(waits, "a", a)
    b[CLUSTER].reply(CLUSTER, Status(message="no"), "v1")  # a NACK answers too
    waits.changed("b", b)
    assert await still_waiting(task)
    waits.changed("gone", None)  # the stream ended
    assert await asyncio.wait_for(task, 1) is True


@pytest.mark.asyncio
async def test_a_client_that_subscribes_meanwhile_is_waited_for_too() -> None:
    waits = AckWaits()
    task = await waiting(waits, "a")
    newcomer = sent("v2")
    waits.changed("new", newcomer)
    ack_v2(waits, "a", sent("v2"))
    assert await still_waiting(task)
    ack_v2(waits, "new", newcomer)
    assert await asyncio.wait_for(task, 1) is True


@pytest.mark.asyncio
async def test_a_wait_times_out_false_and_nothing_pending_is_true_at_once() -> None:
    waits = AckWaits()
    assert await waits.wait(CLUSTER, "v2", {"mute"}, timeout_s=0.05) is False
    assert await waits.wait(CLUSTER, "v2", set(), timeout_s=0) is True


# --- through the ADS server, with a stream fed by hand --------------------------------------------------

SETTINGS = GatewaySettings()


def catalog(*names: str) -> Any:
    return parse_catalog({"models": [{"name": n, "endpoints": ["10.0.0.1:8000"], "max_context_tokens": 4096,
                                      "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "1GiB"}}
                                     for n in names]})


class Context:
    """What AdsServicer needs of grpc.aio's context: somewhere to write responses."""

    def __init__(self) -> None:
        self.written: asyncio.Queue[DiscoveryResponse] = asyncio.Queue()

    async def write(self, response: DiscoveryResponse) -> None:
        await self.written.put(response)


async def from_queue(requests: asyncio.Queue[DiscoveryRequest | None]) -> AsyncIterator[DiscoveryRequest]:
    while (r := await requests.get()) is not None:
        yield r


async def waiting_for_a_push(server: XdsServer) -> tuple[asyncio.Queue[DiscoveryRequest | None], DiscoveryResponse,
                                                         asyncio.Task[bool], asyncio.Task[None]]:
    """A stream that subscribed to CLUSTER and ACKed it; then a new snapshot is pushed to it and a
    wait_acked for its clusters begins. Returns the stream's requests, the push, the wait, the stream."""
    requests: asyncio.Queue[DiscoveryRequest | None] = asyncio.Queue()
    context = Context()
    stream = asyncio.create_task(server.servicer.StreamAggregatedResources(from_queue(requests), context))  # type: ignore[arg-type]
    await requests.put(DiscoveryRequest(node=Node(id="envoy", cluster="g"), type_url=CLUSTER))
    await requests.put(ack(await asyncio.wait_for(context.written.get(), 5)))
    new = build_snapshot(catalog("a", "b"), SETTINGS)
    await server.publish(new)
    pushed = await asyncio.wait_for(context.written.get(), 5)
    wait = asyncio.create_task(server.wait_acked(CLUSTER, new.get(CLUSTER).version, timeout_s=5))
    await asyncio.sleep(0.05)
    assert not wait.done() and [c.node_id for c in server.unsettled(CLUSTER, pushed.version_info)] == ["envoy"]
    return requests, pushed, wait, stream


def ack(resp: DiscoveryResponse) -> DiscoveryRequest:
    return DiscoveryRequest(type_url=resp.type_url, version_info=resp.version_info, response_nonce=resp.nonce)


@pytest.mark.asyncio
async def test_wait_acked_returns_on_the_ack_the_server_records() -> None:
    server = XdsServer(build_snapshot(catalog("a"), SETTINGS))
    requests, pushed, wait, stream = await waiting_for_a_push(server)
    await requests.put(ack(pushed))
    assert await asyncio.wait_for(wait, 1) is True
    assert server.unsettled(CLUSTER, pushed.version_info) == []
    await requests.put(None)
    await asyncio.wait_for(stream, 5)


@pytest.mark.asyncio
async def test_wait_acked_returns_when_the_last_unanswered_client_disconnects() -> None:
    server = XdsServer(build_snapshot(catalog("a"), SETTINGS))
    requests, _, wait, stream = await waiting_for_a_push(server)
    await requests.put(None)  # the stream ends without an answer
    assert await asyncio.wait_for(wait, 1) is True
    await asyncio.wait_for(stream, 5)
    assert server.servicer.clients == {}
