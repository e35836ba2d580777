"""The one call of Triton's gRPC service the gateway answers itself: RepositoryIndex, the catalog's
Triton models the caller may call (kvgate/triton_index.py says why ext_proc, not Envoy). Envoy routes
that path to this server; the caller's key was checked on the way (a lookup), and is read again here
for the tenant's list.
"""

from __future__ import annotations

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from ext_proc import decision
from ext_proc.decision import Refuse
from ext_proc.responses import grpc_code
from ext_proc.state import AdmissionState
from kvgate.triton_index import READY


class RepositoryIndexService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: AdmissionState):
        self.state = state

    async def RepositoryIndex(self, request: service_pb2.RepositoryIndexRequest,  # noqa: N802 (gRPC's name)
                              context: grpc.aio.ServicerContext) -> service_pb2.RepositoryIndexResponse:
        caller = decision.authenticate(self.state, {k: v for k, v in context.invocation_metadata() or ()
                                                    if isinstance(v, str)})
        if isinstance(caller, Refuse):
            code = grpc_code(caller.refusal)
            await context.abort(next(s for s in grpc.StatusCode if s.value[0] == code), caller.refusal.message)
        names = decision.triton_models(self.state, caller)  # type: ignore[arg-type] (abort raises)
        return service_pb2.RepositoryIndexResponse(models=[
            service_pb2.RepositoryIndexResponse.ModelIndex(name=name, state=READY) for name in names])
