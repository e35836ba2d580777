"""`python -m ext_proc --xds HOST:PORT`: the admission service Envoy calls for every LLM request."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any
from typing import TypeVar

import grpc
from aiohttp import web
from google.protobuf import any_pb2
from google.protobuf.message import Message
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from tritonclient.grpc import service_pb2_grpc

from envoy.config.core.v3.base_pb2 import Node
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from ext_proc.ledger import Ledgers
from ext_proc.metrics import registry_for
from ext_proc.policy import Policy
from ext_proc.prompt_gap import PromptGap
from ext_proc.reconcile import Reconciler
from ext_proc.repository_index import RepositoryIndexService
from ext_proc.scraper import EngineScraper
from ext_proc.server import ExtProcServicer
from ext_proc.state import AdmissionState
from ext_proc.status import replica_status
from ext_proc.xds_client import AdsSubscriber, Subscription
from kvgate import logs, tls
from kvgate.v1 import policy_pb2
from kvgate.budget_shares import share_of
from kvgate.wire import (BUDGET_SHARES_TYPE_URL, EXT_PROC_GROUP, HELD_SHARE_KEY, POLICY_TYPE_URL, STATUS_URL_KEY,
                         TENANT_TYPE_URL)

# Until the control plane gives it a share a replica admits nothing: the budget may all be held by others.
INITIAL_SHARE = 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ext_proc", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9002)
    p.add_argument("--xds", default="127.0.0.1:18000", help="xds_server address (host:port)")
    p.add_argument("--node-id", default="ext-proc-0")
    p.add_argument("--metrics-port", type=int, default=9102, help="Prometheus /metrics (0: off)")
    p.add_argument("--max-message-bytes", type=int, default=8 * 2**20,
                   help="largest request body accepted from Envoy (keep above Envoy's buffer limit)")
    p.add_argument("--max-waiting", type=int, default=1000,
                   help="requests that may wait for KV budget per model; beyond it they are refused at once")
    tls.add_server_flags(p, "the ExternalProcessor server Envoy calls")
    tls.add_client_flags(p, "xds", "the ADS channel to xds_server")
    args = p.parse_args(argv)
    try:
        args.tls, args.xds_tls = tls.readable(tls.server_files(args)), tls.readable(tls.client_files(args, "xds"))
    except tls.TlsError as e:
        p.error(str(e))
    return args


M = TypeVar("M", bound=Message)


def unpack_all(resources: list[any_pb2.Any], cls: type[M]) -> list[M]:
    """The resources as `cls`; anything else raises ValueError, which NACKs the update."""
    out = []
    for packed in resources:
        msg = cls()
        if not packed.Unpack(msg):
            raise ValueError(f"unexpected resource type {packed.type_url}")
        out.append(msg)
    return out


def policies_from(resources: list[any_pb2.Any]) -> list[Policy]:
    return [Policy.from_proto(msg) for msg in unpack_all(resources, policy_pb2.ModelPolicy)]


def apply_share(table: AdmissionState, node: Node, resources: list) -> None:
    """Take this replica's share of every budget; none yet (the budget not divided): keep what is held."""
    fraction = share_of(resources, node.id)
    if fraction is None:
        return
    table.set_share(fraction)
    # Sent when the stream reconnects: a restarted control plane divides from what replicas hold.
    node.metadata[HELD_SHARE_KEY] = fraction


def status_url(host: str, port: int) -> str:
    """Where the control plane fetches this replica's /status.json: a wildcard bind is reached by name."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/status.json"


async def serve_metrics(registry: CollectorRegistry, host: str, port: int,
                        status: Callable[[], dict[str, Any]]) -> web.AppRunner:
    """Prometheus /metrics, and /status.json for the control plane's status page."""
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status_json(_: web.Request) -> web.Response:
        return web.json_response(status(), headers={"Cache-Control": "no-store"})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status.json", status_json)
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
    ledgers = Ledgers(share=INITIAL_SHARE)
    table = AdmissionState(ledgers, max_waiting=args.max_waiting)
    registry, decisions = registry_for(ledgers, table.queue_lengths)
    gap = PromptGap()
    registry.register(gap)
    servicer = ExtProcServicer(table, decisions, log=log, prompt_gap=gap)
    registry.register(servicer.prefixes)
    reconciler = Reconciler(table, EngineScraper(log=log), prompt_gap=gap)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", args.max_message_bytes),
                                      ("grpc.max_send_message_length", args.max_message_bytes)])
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(RepositoryIndexService(table), server)
    if not tls.bind(server, f"{args.host}:{args.port}", args.tls):
        print(f"cannot bind {args.host}:{args.port}", file=sys.stderr)
        return 2
    await server.start()
    runner = await serve_metrics(registry, args.host, args.metrics_port, lambda: replica_status(
        args.node_id, ledgers, table.queue_lengths(), servicer.refusals, servicer.decisions.totals(),
        time.time())) if args.metrics_port else None
    # The status URL tells the control plane where this replica's live numbers are.
    node = Node(id=args.node_id, cluster=EXT_PROC_GROUP, metadata={
        HELD_SHARE_KEY: INITIAL_SHARE,
        **({STATUS_URL_KEY: status_url(args.host, args.metrics_port)} if args.metrics_port else {})})
    subscriber = AdsSubscriber(args.xds, node, [
        Subscription(TENANT_TYPE_URL, lambda res: table.tenants.replace(unpack_all(res, policy_pb2.Tenant))),
        Subscription(POLICY_TYPE_URL, lambda res: table.replace(policies_from(res))),
        Subscription(BUDGET_SHARES_TYPE_URL, lambda res: apply_share(table, node, res)),
    ], log=log, tls_files=args.xds_tls)
    tasks = [asyncio.create_task(subscriber.run()), asyncio.create_task(sweep(servicer)),
             asyncio.create_task(reconciler.run())]
    log.info("ext_proc.serving", port=args.port, xds=args.xds, metrics_port=args.metrics_port,
             tls=tls.describe(args.tls, server=True), xds_tls=tls.describe(args.xds_tls, server=False))
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
