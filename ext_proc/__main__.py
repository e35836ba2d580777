"""`python -m ext_proc --xds HOST:PORT`: the admission service Envoy calls for every LLM request."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from envoy.config.core.v3.base_pb2 import Node
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from ext_proc.ledger import Ledgers
from ext_proc.metrics import registry_for
from ext_proc.policy import Policy
from ext_proc.server import ExtProcServicer, PolicyTable
from ext_proc.xds_client import AdsSubscriber
from kvgate import logs
from kvgate.v1 import policy_pb2
from xds_server.policies import POLICY_TYPE_URL

NODE_CLUSTER = "kvgate-ext-proc"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ext_proc", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9002)
    p.add_argument("--xds", default="127.0.0.1:18000", help="xds_server address (host:port)")
    p.add_argument("--node-id", default="ext-proc-0")
    p.add_argument("--metrics-port", type=int, default=9102, help="Prometheus /metrics (0: off)")
    p.add_argument("--max-message-bytes", type=int, default=8 * 2**20,
                   help="largest request body accepted from Envoy (keep above Envoy's buffer limit)")
    return p.parse_args(argv)


def policies_from(resources: list) -> list[Policy]:
    out = []
    for packed in resources:
        msg = policy_pb2.ModelPolicy()
        if not packed.Unpack(msg):
            raise ValueError(f"unexpected resource type {packed.type_url}")
        out.append(Policy.from_proto(msg))
    return out


async def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> web.AppRunner:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def sweep(servicer: ExtProcServicer, every_s: float = 5.0) -> None:
    while True:
        await asyncio.sleep(every_s)
        servicer.expire()


async def run(args: argparse.Namespace) -> int:
    log = logs.configure("ext_proc")
    ledgers = Ledgers()
    table = PolicyTable(ledgers)
    registry, decisions = registry_for(ledgers)
    servicer = ExtProcServicer(table, decisions, log=log)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", args.max_message_bytes),
                                      ("grpc.max_send_message_length", args.max_message_bytes)])
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    if not server.add_insecure_port(f"{args.host}:{args.port}"):
        print(f"cannot bind {args.host}:{args.port}", file=sys.stderr)
        return 2
    await server.start()
    runner = await serve_metrics(registry, args.host, args.metrics_port) if args.metrics_port else None
    subscriber = AdsSubscriber(args.xds, Node(id=args.node_id, cluster=NODE_CLUSTER), POLICY_TYPE_URL,
                               lambda res: table.replace(policies_from(res)), log=log)
    tasks = [asyncio.create_task(subscriber.run()), asyncio.create_task(sweep(servicer))]
    log.info("ext_proc.serving", port=args.port, xds=args.xds, metrics_port=args.metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for t in tasks:
        t.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*tasks)
    if runner:
        await runner.cleanup()
    await server.stop(1.0)
    return 0


def main() -> None:
    sys.exit(asyncio.run(run(parse_args())))


if __name__ == "__main__":
    main()
