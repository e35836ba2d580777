"""`python -m bench.stream_release`: what watching a ModelStreamInfer stream's responses costs per
streamed response (ext_proc/stream_exchange.py releases each request at its last response).

One run, two set-ups over the same zero-latency simulated Triton (bench/targets.py): the gateway,
whose stream route sends every response chunk through ext_proc, and Envoy alone, whose responses
nobody watches. On one long-lived stream each set-up serves requests back to back, each answered
either once (`stream` false) or once per token (`stream` true: MAX_OUTPUT_TOKENS responses). The
per-request costs (admission, the request's round trip) are the same in both shapes, so the gateway's
extra time per request, with many responses less with one, divided by the extra responses, is the
cost of watching one response. Set-ups and shapes take turns, round after round, on a noisy machine.
"""

from __future__ import annotations

import argparse
import queue
import shlex
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bench.targets import MAX_OUTPUT_TOKENS, TRITON_MODEL, Target, started

FINAL = "triton_final_response"


def stream_request(decoupled: bool) -> service_pb2.ModelInferRequest:
    """A short prompt; `decoupled`: a response per generated token."""
    msg = service_pb2.ModelInferRequest(model_name=TRITON_MODEL)
    text = b"Tell me about KV caches."
    for name, datatype, raw in (("text_input", "BYTES", struct.pack("<I", len(text)) + text),
                                ("max_tokens", "INT32", struct.pack("<i", MAX_OUTPUT_TOKENS)),
                                ("stream", "BOOL", bytes([decoupled]))):
        msg.inputs.add(name=name, datatype=datatype, shape=[1, 1])
        msg.raw_input_contents.append(raw)
    return msg


@dataclass(frozen=True)
class Sample:
    seconds_per_request: float
    responses_per_request: float


def one_stream(target: Target, decoupled: bool, requests: int) -> Sample:
    """`requests` requests on one stream, each sent when the previous one's last response arrived."""
    outgoing: queue.Queue[service_pb2.ModelInferRequest | None] = queue.Queue()
    message = stream_request(decoupled)
    responses = 0
    with grpc.insecure_channel(target.listener) as channel:
        call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(outgoing.get, None))
        started = time.perf_counter()
        for _ in range(requests):
            outgoing.put(message)
            for response in call:
                if response.error_message:
                    raise RuntimeError(f"{target.name}: {response.error_message}")
                responses += 1
                if response.infer_response.parameters[FINAL].bool_param:
                    break
        elapsed = time.perf_counter() - started
        outgoing.put(None)
        call.cancel()
    return Sample(elapsed / requests, responses / requests)


def _ready(target: Target) -> bool:
    try:
        one_stream(target, decoupled=False, requests=1)
        return True
    except grpc.RpcError:
        return False


def rounds(targets: tuple[Target, Target], requests: int, count: int) -> Iterator[tuple[str, bool, Sample]]:
    for r in range(count):
        order = targets if r % 2 == 0 else targets[::-1]
        for decoupled in (False, True):
            for target in order:
                yield target.name, decoupled, one_stream(target, decoupled, requests)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.stream_release", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=300, help="requests per stream (default 300)")
    p.add_argument("--rounds", type=int, default=5, help="streams per set-up and shape (default 5)")
    args = p.parse_args(argv)
    run_dir = Path(tempfile.mkdtemp(prefix="kvgate-bench-stream-"))
    try:
        with started(run_dir, ready=_ready) as targets:
            samples = list(rounds(targets, args.requests, args.rounds))
    except BaseException:
        print(f"process logs kept in {run_dir}", file=sys.stderr)
        raise
    shutil.rmtree(run_dir)
    per_request = {(name, d): median(s.seconds_per_request for n, dd, s in samples if (n, dd) == (name, d))
                   for name, d, _ in samples}
    responses = {d: median(s.responses_per_request for _, dd, s in samples if dd == d) for d in (False, True)}
    print(f"command: {shlex.join([sys.executable, '-m', 'bench.stream_release', *argv])}")
    print(f"{args.requests} sequential requests per stream, {args.rounds} streams per set-up and shape; medians")
    for d in (False, True):
        print(f"  {responses[d]:4.1f} responses per request: Envoy alone {per_request['baseline', d] * 1e3:7.3f} ms, "
              f"gateway {per_request['gateway', d] * 1e3:7.3f} ms per request "
              f"(ratio {per_request['gateway', d] / per_request['baseline', d]:.2f})")
    extra = {d: per_request["gateway", d] - per_request["baseline", d] for d in (False, True)}
    per_response = (extra[True] - extra[False]) / (responses[True] - responses[False])
    baseline_response = (per_request["baseline", True] - per_request["baseline", False]) / (
        responses[True] - responses[False])
    print(f"  watching one streamed response: +{per_response * 1e6:.0f} us; one streamed response through "
          f"Envoy alone: {baseline_response * 1e6:.0f} us (ratio with watching "
          f"{(baseline_response + per_response) / baseline_response:.2f})")


if __name__ == "__main__":
    main()
