"""A small client of the control plane's admin API, for the `kvgate models` and `kvgate status` commands."""

from __future__ import annotations

import grpc

from kvgate.v1 import admin_pb2, admin_pb2_grpc

DEFAULT_SERVER = "127.0.0.1:18000"  # `kvgate up`'s control-plane port


class AdminError(RuntimeError):
    pass


def _call(server: str, method: str, request: object, timeout_s: float = 10.0) -> object:
    with grpc.insecure_channel(server) as channel:
        try:
            return getattr(admin_pb2_grpc.AdminStub(channel), method)(request, timeout=timeout_s)
        except grpc.RpcError as e:
            raise AdminError(f"{e.code().name}: {e.details()}") from None


def list_models(server: str) -> admin_pb2.ListModelsResponse:
    return _call(server, "ListModels", admin_pb2.ListModelsRequest())


def apply_models(server: str, models_yaml: str) -> admin_pb2.ChangeResponse:
    return _call(server, "ApplyModels", admin_pb2.ApplyModelsRequest(models_yaml=models_yaml))


def remove_model(server: str, name: str) -> admin_pb2.ChangeResponse:
    return _call(server, "RemoveModel", admin_pb2.RemoveModelRequest(name=name))


def status(server: str) -> admin_pb2.GetStatusResponse:
    return _call(server, "GetStatus", admin_pb2.GetStatusRequest())
