"""python -m engines.sim: serve the simulator until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse

from aiohttp import web

from engines.sim.config import add_arguments, from_args
from engines.sim.openai_server import create_app

# Open streams get this long to finish on shutdown; a simulator need not drain politely.
SHUTDOWN_TIMEOUT_S = 0.25


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m engines.sim", description="CPU simulator of trtllm-serve"
    )
    add_arguments(parser)
    try:
        config = from_args(parser.parse_args(argv))
    except ValueError as e:
        parser.error(str(e))
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


if __name__ == "__main__":
    main()
