"""An ADS subscriber: ext_proc gets its resources (ModelPolicy, BudgetShares) from xds_server the way
Envoy gets clusters.

State of the world, one wildcard subscription per type on one stream; each type is ACKed or NACKed
(with error_detail) on its own, answering the nonce of that type's response. A NACKed set is not
applied: the last good one stays, also while the control plane is away. Reconnects with capped,
jittered backoff, telling the control plane each type's accepted version so it sends nothing new.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import structlog
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.ads_pb2_grpc import AggregatedDiscoveryServiceStub
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
from google.rpc.status_pb2 import Status
from kvgate import tls

_CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 15_000), ("grpc.keepalive_timeout_ms", 5_000),
                    ("grpc.keepalive_permit_without_calls", 1)]


@dataclass
class Subscription:
    type_url: str
    # Applies a full set of resources; raising ValueError NACKs it and keeps the previous set.
    apply: Callable[[list[any_pb2.Any]], None]
    accepted_version: str = ""


@dataclass
class AdsSubscriber:
    target: str
    # Sent as it is when each stream opens: its metadata may change between reconnects.
    node: Node
    subscriptions: list[Subscription]
    log: structlog.typing.FilteringBoundLogger = field(
        default_factory=lambda: structlog.get_logger(component="xds_client"))
    max_backoff_s: float = 5.0
    # TLS to the control plane (None: plaintext); a client certificate in it for mutual TLS.
    tls_files: tls.TlsFiles | None = None
    _backoff_s: float = 0.1

    def subscription(self, type_url: str) -> Subscription | None:
        return next((s for s in self.subscriptions if s.type_url == type_url), None)

    async def run(self) -> None:
        while True:
            try:
                await self._stream()
            except grpc.aio.AioRpcError as e:
                self.log.warning("xds_client.disconnected", target=self.target, code=e.code().name,
                                 retry_in_s=round(self._backoff_s, 2))
            except Exception:  # noqa: BLE001  a bug must not end the subscription: the stream restarts
                self.log.exception("xds_client.failed", target=self.target, retry_in_s=round(self._backoff_s, 2))
            await asyncio.sleep(self._backoff_s * random.uniform(0.5, 1.0))
            self._backoff_s = min(self.max_backoff_s, self._backoff_s * 2)

    async def _stream(self) -> None:
        async with tls.aio_channel(self.target, self.tls_files, _CHANNEL_OPTIONS) as channel:
            call = AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
            for i, sub in enumerate(self.subscriptions):
                # The server reads the node from a stream's first request only, as Envoy sends it.
                await call.write(DiscoveryRequest(node=self.node if i == 0 else None, type_url=sub.type_url,
                                                  version_info=sub.accepted_version))
            async for resp in call:
                self._backoff_s = 0.1  # the control plane answered: reconnect quickly next time
                sub = self.subscription(resp.type_url)
                if sub is None:
                    self.log.warning("xds_client.unexpected_type", type_url=resp.type_url)
                    continue
                await call.write(self._answer(sub, resp))

    def _answer(self, sub: Subscription, resp: DiscoveryResponse) -> DiscoveryRequest:
        """Apply one response; the ACK (or NACK, keeping the accepted version) that answers it."""
        reply = DiscoveryRequest(type_url=sub.type_url, response_nonce=resp.nonce)
        try:
            sub.apply(list(resp.resources))
            sub.accepted_version = resp.version_info
            self.log.info("xds_client.applied", type_url=sub.type_url, version=resp.version_info,
                          resources=len(resp.resources))
        except (ValueError, DecodeError) as e:  # a resource that does not decode is NACKed like a bad one
            reply.error_detail.CopyFrom(Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=str(e)))
            self.log.warning("xds_client.nack", type_url=sub.type_url, version=resp.version_info, error=str(e))
        reply.version_info = sub.accepted_version
        return reply
