"""An ADS subscriber: ext_proc gets its ModelPolicy resources from xds_server the way Envoy gets clusters.

State of the world, one wildcard subscription; ACK what applies, NACK (with error_detail) what doesn't,
keep the last good set while the control plane is away, reconnect with capped, jittered backoff.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import structlog
from google.protobuf import any_pb2

from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.ads_pb2_grpc import AggregatedDiscoveryServiceStub
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest
from google.rpc.status_pb2 import Status

_CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 15_000), ("grpc.keepalive_timeout_ms", 5_000),
                    ("grpc.keepalive_permit_without_calls", 1)]


@dataclass
class AdsSubscriber:
    target: str
    node: Node
    type_url: str
    # Applies a full set of resources; raising ValueError NACKs it and keeps the previous set.
    apply: Callable[[list[any_pb2.Any]], None]
    log: structlog.typing.FilteringBoundLogger = field(
        default_factory=lambda: structlog.get_logger(component="xds_client"))
    accepted_version: str = ""
    max_backoff_s: float = 5.0
    _backoff_s: float = 0.1

    async def run(self) -> None:
        while True:
            try:
                await self._stream()
            except grpc.aio.AioRpcError as e:
                self.log.warning("xds_client.disconnected", target=self.target, code=e.code().name,
                                 retry_in_s=round(self._backoff_s, 2))
            await asyncio.sleep(self._backoff_s * random.uniform(0.5, 1.0))
            self._backoff_s = min(self.max_backoff_s, self._backoff_s * 2)

    async def _stream(self) -> None:
        async with grpc.aio.insecure_channel(self.target, options=_CHANNEL_OPTIONS) as channel:
            call = AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
            await call.write(DiscoveryRequest(node=self.node, type_url=self.type_url,
                                              version_info=self.accepted_version))
            async for resp in call:
                self._backoff_s = 0.1  # the control plane answered: reconnect quickly next time
                ack = DiscoveryRequest(type_url=self.type_url, response_nonce=resp.nonce)
                try:
                    self.apply(list(resp.resources))
                    self.accepted_version = resp.version_info
                    self.log.info("xds_client.applied", version=resp.version_info, resources=len(resp.resources))
                except ValueError as e:
                    ack.error_detail.CopyFrom(Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=str(e)))
                    self.log.warning("xds_client.nack", version=resp.version_info, error=str(e))
                ack.version_info = self.accepted_version
                await call.write(ack)
