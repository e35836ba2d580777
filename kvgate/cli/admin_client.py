"""A small client of the control plane's admin API, for the `kvgate models` and `kvgate status` commands."""

from __future__ import annotations

import grpc

from kvgate import tls
from kvgate.v1 import admin_pb2, admin_pb2_grpc

DEFAULT_SERVER = "127.0.0.1:18000"  # `kvgate up`'s control-plane port


class AdminError(RuntimeError):
    pass


# Every call takes `tls_files`: None for plaintext, else the CA that signed the control plane's
# certificate and, for mutual TLS, this client's certificate and key.

def _call(server: str, method: str, request: object, timeout_s: float = 10.0,
          tls_files: tls.TlsFiles | None = None) -> object:
    try:
        with tls.channel(server, tls_files) as channel:
            return getattr(admin_pb2_grpc.AdminStub(channel), method)(request, timeout=timeout_s)
    except grpc.RpcError as e:
        raise AdminError(f"{e.code().name}: {e.details()}") from None
    except tls.TlsError as e:
        raise AdminError(str(e)) from None


def list_models(server: str, tls_files: tls.TlsFiles | None = None) -> admin_pb2.ListModelsResponse:
    return _call(server, "ListModels", admin_pb2.ListModelsRequest(), tls_files=tls_files)


def apply_models(server: str, models_yaml: str, tls_files: tls.TlsFiles | None = None) -> admin_pb2.ChangeResponse:
    return _call(server, "ApplyModels", admin_pb2.ApplyModelsRequest(models_yaml=models_yaml), tls_files=tls_files)


def remove_model(server: str, name: str, tls_files: tls.TlsFiles | None = None) -> admin_pb2.ChangeResponse:
    return _call(server, "RemoveModel", admin_pb2.RemoveModelRequest(name=name), tls_files=tls_files)


def status(server: str, tls_files: tls.TlsFiles | None = None) -> admin_pb2.GetStatusResponse:
    return _call(server, "GetStatus", admin_pb2.GetStatusRequest(), tls_files=tls_files)
