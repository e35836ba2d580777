"""`python -m xds_server --catalog FILE`: serve a catalog over ADS until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from kvgate import logs, tls
from kvgate.catalog import Address, CatalogError, load_catalog, parse_endpoint
from kvgate.v1 import admin_pb2_grpc
from xds_server.admin import AdminServicer
from xds_server.control import Controller, ShareKeeper, render
from xds_server.server import XdsServer
from xds_server.settings import GatewaySettings
from xds_server.status_page import serve_http
from xds_server.watch import watch_catalog


def _group_listen(value: str) -> tuple[str, Address]:
    group, sep, addr = value.partition("=")
    if not sep or not group:
        raise argparse.ArgumentTypeError(f"{value!r} is not GROUP=HOST:PORT")
    return group, parse_endpoint(addr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="xds_server", description=__doc__)
    p.add_argument("--catalog", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=18000, help="ADS port")
    p.add_argument("--http-port", type=int, default=18080,
                   help="the status page (/), /status.json and Prometheus /metrics, on --host (0: off)")
    p.add_argument("--listen", type=parse_endpoint, default="127.0.0.1:8080",
                   help="address Envoy's listener binds (host:port)")
    p.add_argument("--ext-proc", type=parse_endpoint, action="append",
                   help="ext_proc replica address (repeatable; default 127.0.0.1:9002)")
    p.add_argument("--group-listen", type=_group_listen, action="append", default=[], metavar="GROUP=HOST:PORT",
                   help="Envoys whose node.cluster is GROUP bind their listener here (repeatable)")
    p.add_argument("--proxyless-group", default=None, metavar="GROUP",
                   help="node group of proxyless gRPC clients (xds:///<triton model>), served API listeners")
    p.add_argument("--max-request-bytes", type=int, default=GatewaySettings.max_request_bytes)
    p.add_argument("--access-log", default=None, metavar="PATH",
                   help="file Envoy appends its JSON access log to (default: Envoy's stdout)")
    p.add_argument("--watch", action=argparse.BooleanOptionalAction, default=True,
                   help="serve the catalog file again whenever it changes")
    tls.add_server_flags(p, "ADS and the admin API")
    # Rendered into Envoy's ext_proc cluster: paths as Envoy sees them, not read here.
    tls.add_client_flags(p, "ext-proc-tls", "Envoy's connections to ext_proc")
    p.add_argument("--ext-proc-tls-server-name", default=tls.DEFAULT_SERVER_NAME,
                   help="name (DNS or IP subject alt name) Envoy requires in ext_proc's certificate")
    args = p.parse_args(argv)
    try:
        args.tls, args.ext_proc_tls = tls.readable(tls.server_files(args)), tls.client_files(args, "ext-proc-tls")
    except tls.TlsError as e:
        p.error(str(e))
    return args


async def run(args: argparse.Namespace) -> int:
    log = logs.configure("xds_server")
    try:
        catalog = load_catalog(args.catalog)
        settings = GatewaySettings(listen=args.listen, max_request_bytes=args.max_request_bytes,
                                   group_listen=tuple(args.group_listen), proxyless_group=args.proxyless_group,
                                   access_log_path=args.access_log,
                                   ext_proc_tls=args.ext_proc_tls, ext_proc_tls_server_name=args.ext_proc_tls_server_name,
                                   **({"ext_proc": tuple(args.ext_proc)} if args.ext_proc else {}))
        snapshot = render(catalog, settings)
    except CatalogError as e:
        print(e, file=sys.stderr)
        return 2
    server = XdsServer(snapshot, log)
    controller = Controller(server, catalog, settings)
    admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(controller), server.grpc)
    port = await server.start(args.host, args.port, args.tls)
    http = await serve_http(controller, args.host, args.http_port) if args.http_port else None
    log.info("xds.serving", port=port, tls=tls.describe(args.tls, server=True), http_port=args.http_port,
             ext_proc_tls=tls.describe(args.ext_proc_tls, server=False), version=snapshot.version,
             models=[m.name for m in catalog.models])
    tasks = [asyncio.create_task(ShareKeeper(controller, log=log).run())]
    if args.watch:
        tasks.append(asyncio.create_task(watch_catalog(args.catalog, controller, log)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for t in tasks:
        t.cancel()
    if http:
        await http.cleanup()
    await server.stop()
    return 0


def main() -> None:
    sys.exit(asyncio.run(run(parse_args())))


if __name__ == "__main__":
    main()
