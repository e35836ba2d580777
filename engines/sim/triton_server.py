"""The Triton personality: its HTTP and gRPC fronts on one engine, in one event loop."""

from __future__ import annotations

import grpc
from aiohttp import web

from engines.sim.config import SimConfig
from engines.sim.engine import SimEngine
from engines.sim.http_common import SHUTDOWN_TIMEOUT_S
from engines.sim.records import Records, new_records
from engines.sim.triton_grpc import TritonGrpcService, add_to_server
from engines.sim.triton_http import create_triton_app



class TritonServer:
    """Both fronts sharing one SimEngine (KV cache, scheduler, counters) and one
    record log. Port 0 binds any free port; the bound ports are known after start()."""

    def __init__(self, config: SimConfig) -> None:
        if config.grpc_port is None:
            raise ValueError("the triton protocol needs a gRPC port")
        self.config = config
        self.engine = SimEngine(config)
        self.records: Records = new_records(config.record_limit)
        self.http_port = config.port
        self.grpc_port = config.grpc_port
        self._runner: web.AppRunner | None = None
        self._grpc: grpc.aio.Server | None = None

    async def start(self) -> None:
        app = create_triton_app(self.config, self.engine, self.records)
        # handler_cancellation: a client that disconnects frees its KV blocks.
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, self.config.host, self.config.port)
        await site.start()
        self.http_port = runner.addresses[0][1]

        server = grpc.aio.server()
        add_to_server(TritonGrpcService(self.config, self.engine, self.records), server)
        self.grpc_port = server.add_insecure_port(f"{self.config.host}:{self.config.grpc_port}")
        if self.grpc_port == 0:
            raise OSError(f"cannot bind gRPC to {self.config.host}:{self.config.grpc_port}")
        self._grpc = server
        await server.start()

    async def stop(self) -> None:
        """Stops both fronts; calls still running are cancelled after a short grace."""
        if self._grpc is not None:
            await self._grpc.stop(SHUTDOWN_TIMEOUT_S)
            self._grpc = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
