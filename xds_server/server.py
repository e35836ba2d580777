"""The ADS gRPC server: one stream state machine (sotw.py or delta.py) per connected client, fed by its
requests and the cache's snapshot changes; every change to a stream's state is told to the ACK waits
(acks.py)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from google.protobuf import json_format

from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DiscoveryRequest
from kvgate import tls
from kvgate.wire import EXT_PROC_GROUP
from xds_server.acks import AckWaits, Nack, unanswered
from xds_server.cache import SnapshotCache
from xds_server.delta import DeltaStream
from xds_server.resource_types import PUSH_ORDER
from xds_server.snapshot import Snapshot
from xds_server.sotw import SotwStream

_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


# How many NACKs the server keeps: the last ones, and the last of this many nodes.
MAX_NACKS = 100
MAX_NACK_NODES = 1000
OTHER_TYPES = "other"


def type_label(type_url: str) -> str:
    """A type URL as a metric label: ours, or "other" (a client may ask for any type URL, and each
    would be a new time series)."""
    return type_url if type_url in PUSH_ORDER else OTHER_TYPES


# Either protocol's stream state: the same on_request/on_snapshot/types interface.
Stream = SotwStream | DeltaStream


@dataclass
class Client:
    """A connected xDS client, as `kvgate status` will show it."""

    node_id: str
    cluster: str
    connected_at: float
    stream: Stream
    metadata: dict[str, Any] = field(default_factory=dict)  # node.metadata, as JSON


@dataclass
class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    cache: SnapshotCache
    log: structlog.typing.FilteringBoundLogger = field(default_factory=lambda: structlog.get_logger(component="xds"))
    clients: dict[int, Client] = field(default_factory=dict)
    # The last NACKs (node id, NACK), oldest first, and each node's last (what `kvgate status` shows),
    # both bounded: a client that NACKs forever must not grow the server.
    nacks: list[tuple[str, Nack]] = field(default_factory=list)
    last_nacks: dict[str, Nack] = field(default_factory=dict)
    # Responses written and NACKs received, by type URL (type_label: what a client asks for is not a
    # label value): what a resend loop would inflate.
    responses_sent: Counter[str] = field(default_factory=Counter)
    nacks_received: Counter[str] = field(default_factory=Counter)
    # Set whenever a client of this group connects or disconnects (the ShareKeeper clears it).
    member_group: str = EXT_PROC_GROUP
    membership: asyncio.Event = field(default_factory=asyncio.Event)
    # Told of every change to a stream's state: what XdsServer.wait_acked waits on.
    acks: AckWaits = field(default_factory=AckWaits)

    def record_nack(self, node_id: str, nack: Nack) -> None:
        self.nacks.append((node_id, nack))
        del self.nacks[:-MAX_NACKS]
        self.last_nacks.pop(node_id, None)  # re-inserted last: the oldest node goes first
        self.last_nacks[node_id] = nack
        while len(self.last_nacks) > MAX_NACK_NODES:
            del self.last_nacks[next(iter(self.last_nacks))]
        self.nacks_received[type_label(nack.type_url)] += 1

    def members(self) -> list[Client]:
        return [c for c in self.clients.values() if c.cluster == self.member_group]

    def unanswered(self, type_url: str, version: str) -> dict[int, Client]:
        """Clients subscribed to `type_url` that have neither ACKed nor NACKed `version`, by key."""
        return {k: c for k, c in self.clients.items() if unanswered(c.stream.types, type_url, version)}

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[DiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> None:
        await self._serve(request_iterator, context, SotwStream)

    async def DeltaAggregatedResources(
        self, request_iterator: AsyncIterator[DeltaDiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> None:
        await self._serve(request_iterator, context, DeltaStream)

    async def _serve(self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext,
                     make_stream: Callable[[Snapshot], Stream]) -> None:
        """One client's stream, either protocol: requests in, snapshot changes in, responses out."""
        requests = aiter(request_iterator)
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            return
        # The node comes with the first request only; its group picks the snapshot variant.
        group = first.node.cluster
        stream = make_stream(self.cache.snapshot.for_group(group))
        key = id(stream)
        client = self.clients[key] = Client(first.node.id, group, time.time(), stream,
                                            json_format.MessageToDict(first.node.metadata))
        self.log.info("xds.connected", node=client.node_id, cluster=group)
        self._membership_changed(group)
        outbox: asyncio.Queue[Any] = asyncio.Queue()
        self._handle(first, key, client, outbox)
        tasks = [asyncio.create_task(self._read(requests, key, client, outbox)),
                 asyncio.create_task(self._watch(key, client, outbox))]
        try:
            while (response := await outbox.get()) is not None:
                await context.write(response)
                self.responses_sent[type_label(response.type_url)] += 1
                self.log.debug("xds.push", type_url=response.type_url, nonce=response.nonce,
                               resources=len(response.resources))
        finally:
            for t in tasks:
                t.cancel()
            self.clients.pop(key, None)
            self.acks.changed(key, None)
            self.log.info("xds.disconnected", node=client.node_id, cluster=group)
            self._membership_changed(group)

    def _membership_changed(self, group: str) -> None:
        if group == self.member_group:
            self.membership.set()

    def _handle(self, req: Any, key: int, client: Client, outbox: asyncio.Queue[Any]) -> None:
        responses, nack = client.stream.on_request(req)
        self.acks.changed(key, client.stream.types)
        if nack:
            self.record_nack(client.node_id, nack)
            self.log.warning("xds.nack", node=client.node_id, type_url=nack.type_url,
                             version=nack.version, error_detail=nack.message)
        for r in responses:
            outbox.put_nowait(r)

    async def _read(self, requests: AsyncIterator[Any], key: int, client: Client,
                    outbox: asyncio.Queue[Any]) -> None:
        try:
            async for req in requests:
                self._handle(req, key, client, outbox)
        finally:
            outbox.put_nowait(None)

    async def _watch(self, key: int, client: Client, outbox: asyncio.Queue[Any]) -> None:
        seen = self.cache.snapshot
        while True:
            seen = await self.cache.wait_newer(seen)
            responses = client.stream.on_snapshot(seen.for_group(client.cluster))
            self.acks.changed(key, client.stream.types)  # a push may forget a NACK (sotw.py)
            for r in responses:
                outbox.put_nowait(r)


class XdsServer:
    """Owns the gRPC server and the cache; `publish` pushes a new snapshot to every stream."""

    def __init__(self, snapshot: Snapshot, log: structlog.typing.FilteringBoundLogger | None = None):
        self.cache = SnapshotCache(snapshot)
        self.servicer = AdsServicer(self.cache, **({"log": log} if log else {}))
        # Public so other services (the admin API) can share the port.
        self.grpc = grpc.aio.server(options=_KEEPALIVE)
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.servicer, self.grpc)

    async def start(self, host: str, port: int, tls_files: tls.TlsFiles | None = None) -> int:
        """Listen for ADS and the admin API, over TLS if `tls_files` (mutual TLS if it has a CA)."""
        bound = tls.bind(self.grpc, f"{host}:{port}", tls_files)
        if not bound:
            raise OSError(f"cannot bind xDS server to {host}:{port}")
        await self.grpc.start()
        return bound

    async def publish(self, snapshot: Snapshot) -> bool:
        return await self.cache.set(snapshot)

    def unsettled(self, type_url: str, version: str) -> list[Client]:
        """Clients subscribed to `type_url` that have neither ACKed nor NACKed `version`."""
        return list(self.servicer.unanswered(type_url, version).values())

    async def wait_acked(self, type_url: str, version: str, timeout_s: float) -> bool:
        """Wait until every client subscribed to `type_url` ACKed `version` (or NACKed it: it will
        not take it, waiting longer helps nobody), or disconnected. False on timeout. Woken by each
        answer as the server records it (acks.py), not by polling."""
        pending = set(self.servicer.unanswered(type_url, version))
        return await self.servicer.acks.wait(type_url, version, pending, timeout_s)

    async def stop(self, grace: float = 1.0) -> None:
        await self.grpc.stop(grace)

    async def wait(self) -> None:
        await self.grpc.wait_for_termination()
