"""The admin API (proto/kvgate/v1/admin.proto): catalog changes through the Controller, and the
fleet as the ADS server sees it."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass

import grpc

from kvgate.catalog import CatalogError
from kvgate.v1 import admin_pb2, admin_pb2_grpc
from xds_server.control import Controller
from xds_server.server import Client
from kvgate.budget_shares import share_of
from kvgate.wire import EXT_PROC_GROUP


def node_status(client: Client, last_nack: admin_pb2.Nack | None, budget_share: float | None) -> admin_pb2.NodeStatus:
    return admin_pb2.NodeStatus(
        id=client.node_id, group=client.cluster, connected_since_unix=client.connected_at,
        acked_versions={t: s.acked_version for t, s in client.stream.types.items() if s.acked_version},
        last_nack=last_nack, budget_share=budget_share)


def fleet_status(controller: Controller) -> admin_pb2.GetStatusResponse:
    """Every connected node as the ADS server sees it: `kvgate status` and the status page show this."""
    ads = controller.server.servicer
    last_nacks = {node: admin_pb2.Nack(type_url=n.type_url, version=n.version, error_detail=n.message)
                  for node, n in ads.last_nacks.items()}
    shares = controller.shares.select(None)

    def share(c: Client) -> float | None:
        return (share_of(shares, c.node_id) or 0.0) if c.cluster == EXT_PROC_GROUP else None

    nodes = sorted((node_status(c, last_nacks.get(c.node_id), share(c)) for c in ads.clients.values()),
                   key=lambda n: (n.group, n.id))
    return admin_pb2.GetStatusResponse(version=controller.server.cache.snapshot.version, nodes=nodes)


@dataclass
class AdminServicer(admin_pb2_grpc.AdminServicer):
    controller: Controller

    async def ListModels(self, request: admin_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.ListModelsResponse:
        return admin_pb2.ListModelsResponse(catalog_yaml=self.controller.catalog.to_yaml(), version=self._version())

    async def ApplyModels(self, request: admin_pb2.ApplyModelsRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.ChangeResponse:
        return await self._change(self.controller.apply(request.models_yaml), context)

    async def RemoveModel(self, request: admin_pb2.RemoveModelRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.ChangeResponse:
        return await self._change(self.controller.remove(request.name), context)

    async def GetStatus(self, request: admin_pb2.GetStatusRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.GetStatusResponse:
        return fleet_status(self.controller)

    async def _change(self, change: Awaitable[bool], context: grpc.aio.ServicerContext) -> admin_pb2.ChangeResponse:
        try:
            changed = await change
        except CatalogError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return admin_pb2.ChangeResponse(version=self._version(), changed=changed)

    def _version(self) -> str:
        return self.controller.server.cache.snapshot.version
