"""python -m engines.sim: serve the simulator until SIGTERM/SIGINT (exit status 0)."""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiohttp import web

from engines.sim.config import SimConfig, add_arguments, from_args
from engines.sim.http_common import SHUTDOWN_TIMEOUT_S
from engines.sim.openai_server import create_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m engines.sim",
        description="CPU simulator of trtllm-serve (--protocol openai) or of Triton with "
        "the TensorRT-LLM backend (--protocol triton: HTTP on --port, gRPC on --grpc-port)",
    )
    add_arguments(parser)
    try:
        config = from_args(parser.parse_args(argv))
    except ValueError as e:
        parser.error(str(e))
    if config.protocol == "triton":
        asyncio.run(_serve_triton(config))
        return
    # run_app turns SIGTERM/SIGINT into a graceful stop and returns, so the exit status is 0.
    web.run_app(
        create_app(config),
        host=config.host,
        port=config.port,
        print=None,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )


async def _serve_triton(config: SimConfig) -> None:
    """Both fronts in this loop until SIGTERM or SIGINT, then a clean stop."""
    # Imported here: only this personality needs tritonclient (and its numpy) and grpc.
    from engines.sim.triton_server import TritonServer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = TritonServer(config)
    try:
        await server.start()
        await stop.wait()
    finally:
        await server.stop()


if __name__ == "__main__":
    main()
