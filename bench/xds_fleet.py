"""`python -m bench.xds_fleet --target HOST:PORT --clients N`: N lightweight ADS clients in one asyncio
process, each subscribed to ModelPolicy the way ext_proc's AdsSubscriber is (same node/type/ACK
messages) and ACKing every response, and nothing else: no policy is unpacked or applied.

Streams share channels, `--per-channel` streams each, every channel on its own TCP connection (a
local subchannel pool; channels to one target otherwise share one connection, and a server may cap
the streams of one connection). It reports on stdout, one JSON line per event, with times from
time.monotonic() (CLOCK_MONOTONIC, the same clock in every process of the machine):

- {"event": "ready", ...}: every stream has ACKed the first response (one version for all);
- {"event": "acked", "version": V, "first_s": T, "last_s": T}: every stream has ACKed V, T being when
  the first and the last of those ACKs were handed to gRPC;
- {"event": "error", ...}: a stream ended (streams are not reconnected: any end is an error);
- {"event": "done", "errors": N}: after stdin closed or said "stop".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc

from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.ads_pb2_grpc import AggregatedDiscoveryServiceStub
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest
from kvgate.wire import POLICY_TYPE_URL

NODE_CLUSTER = "kvgate-bench-fleet"
_OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def emit(**event: object) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


@dataclass
class Fleet:
    """Counts, per version, the streams whose latest ACK is that version; reports when all have one."""

    size: int
    acked: dict[int, str] = field(default_factory=dict)  # stream -> version of its latest ACK
    count: Counter[str] = field(default_factory=Counter)
    first_s: dict[str, float] = field(default_factory=dict)  # version -> first ACK of this transition
    complete: str | None = None  # the version every stream last ACKed
    errors: int = 0

    def on_ack(self, stream: int, version: str, at: float) -> None:
        previous = self.acked.get(stream)
        if previous == version:
            return
        if previous is not None:
            self.count[previous] -= 1
        self.acked[stream] = version
        self.count[version] += 1
        if self.count[version] == 1:
            self.first_s[version] = at
        if self.count[version] == self.size and version != self.complete:
            emit(event="ready" if self.complete is None else "acked",
                 version=version, first_s=self.first_s[version], last_s=at)
            self.complete = version


async def subscribe(stub: AggregatedDiscoveryServiceStub, index: int, fleet: Fleet) -> None:
    try:
        call = stub.StreamAggregatedResources()
        await call.write(DiscoveryRequest(node=Node(id=f"bench-{index}", cluster=NODE_CLUSTER),
                                          type_url=POLICY_TYPE_URL))
        async for resp in call:
            await call.write(DiscoveryRequest(type_url=POLICY_TYPE_URL, response_nonce=resp.nonce,
                                              version_info=resp.version_info))
            fleet.on_ack(index, resp.version_info, time.monotonic())
        fleet.errors += 1
        emit(event="error", stream=index, error="the server ended the stream")
    except grpc.aio.AioRpcError as e:
        fleet.errors += 1
        emit(event="error", stream=index, error=f"{e.code().name}: {e.details()}")


async def run(args: argparse.Namespace) -> int:
    fleet = Fleet(args.clients)
    channels = [grpc.aio.insecure_channel(args.target, options=_OWN_CONNECTION)
                for _ in range(-(-args.clients // args.per_channel))]
    stubs = [AggregatedDiscoveryServiceStub(c) for c in channels]
    emit(event="started", at=time.monotonic(), channels=len(channels))
    tasks = [asyncio.create_task(subscribe(stubs[i // args.per_channel], i, fleet)) for i in range(args.clients)]
    # Until stdin says stop (or closes: the parent is gone).
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in channels:
        await c.close()
    emit(event="done", errors=fleet.errors)
    return 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.xds_fleet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="xds_server host:port")
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--per-channel", type=int, default=50, help="streams per channel (TCP connection)")
    args = p.parse_args(argv)
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
