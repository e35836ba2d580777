"""Leak-proofing: every way a request can end gives its KV reservation back, promptly.

A real gateway (simulated engines, xds_server, two ext_proc replicas, one real Envoy) takes thousands
of requests from a seeded random mix: completed and refused ones, malformed ones, clients that abort
before the response, mid-stream, right after sending, mid-body or while waiting for budget, engines
that reset the connection (the simulator's x-sim-reset-after-chunks hook), and Triton gRPC calls and
streams cancelled halfway. Then clients leave ext_proc's wait queue; Envoy is killed (and, separately,
terminated) and restarted with requests in flight; and the ext_proc replicas stall (SIGSTOP) so that
Envoy cancels their streams before they read them.

After each, every replica's ledger (kvgate_kv_reserved_bytes and kvgate_kv_reservations, summed over
all series), its wait queue and every engine's KV blocks are back to zero within a few seconds. The
backstops must not be what released them: the TTL sweep (900 s; logs `ledger.expired`) and the
engine-metric reconciliation, which releases old reservations on an idle engine within seconds
(logs `reconcile.released_idle`) and would otherwise hide a leak.

HTTP clients here are raw sockets, so an abort happens exactly where the test says; every request
kind must have been exercised a minimum number of times, so the test cannot pass on an idle gateway.
"""

from __future__ import annotations

import asyncio
import collections
import random
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import httpx
import orjson
import pytest
from google.protobuf.message import Message
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2

from engines.sim.http_common import RESET_AFTER_HEADER
from kvgate.catalog import parse_catalog
from kvgate.cli.gateway import Gateway
from tests.integration.conftest import sim_url, start_gateway

ROOMY, SCARCE, SLOW, QUEUED, TRI = "roomy", "scarce", "slow", "queued", "tri"
ROOMY_MAX_OUTPUT = 24
PRIORITY_HEADER = "x-kvgate-priority"
# A request that does not fit waits up to its class's max_wait_s for budget, then gets 429.
PRIORITY_CLASSES = [{"name": "wait", "max_wait_s": 1}, {"name": "now", "max_wait_s": 0},
                    {"name": "patient", "max_wait_s": 20}]
CATALOG = {"priority_classes": PRIORITY_CLASSES, "models": [
    # Room for everything the mix sends at once, so any refusal here is a bug; a generation takes
    # ~100 ms (24 tokens x 4 ms), long enough to abort before it ends.
    {"name": ROOMY, "endpoints": ["sim"], "max_context_tokens": 1024, "max_output_tokens": ROOMY_MAX_OUTPUT,
     "tokens_per_block": 16, "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "64MiB"},
     "sim": {"ttft_base_ms": 2, "ttft_per_token_ms": 0, "itl_ms": 4, "batch_slowdown": 0}},
    # Each replica holds half of the 16 blocks: one request of the mix (7 blocks) fills it for ~260 ms,
    # and the others wait (class `wait`) or get 429 at once (class `now`).
    {"name": SCARCE, "endpoints": ["sim"], "max_context_tokens": 128, "max_output_tokens": 64,
     "tokens_per_block": 16, "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "256KiB"},
     "sim": {"ttft_base_ms": 2, "ttft_per_token_ms": 0, "itl_ms": 4, "batch_slowdown": 0}},
    # Streams of several seconds, in flight when Envoy goes down.
    {"name": SLOW, "endpoints": ["sim"], "max_context_tokens": 1024, "max_output_tokens": 512,
     "tokens_per_block": 16, "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "64MiB"},
     "sim": {"ttft_base_ms": 2, "ttft_per_token_ms": 0, "itl_ms": 20, "batch_slowdown": 0}},
    # Half of 1 MiB per replica: one 256-token request (17 blocks, 272 KiB) fills it for ~10 s.
    {"name": QUEUED, "endpoints": ["sim"], "max_context_tokens": 512, "max_output_tokens": 256,
     "tokens_per_block": 16, "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "1MiB"},
     "sim": {"ttft_base_ms": 2, "ttft_per_token_ms": 0, "itl_ms": 40, "batch_slowdown": 0}},
    {"name": TRI, "protocol": "triton", "backend_model": "ensemble", "endpoints": ["sim"],
     "max_context_tokens": 1024, "max_output_tokens": 512, "tokens_per_block": 16,
     "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "64MiB"},
     "sim": {"ttft_base_ms": 2, "ttft_per_token_ms": 0, "itl_ms": 8, "batch_slowdown": 0}},
]}

SEED = 20240611
REQUESTS = 2000
CONCURRENCY = 32
# Reservations must be back this fast: the TTL backstop (900 s) cannot be what released them.
RELEASE_TIMEOUT_S = 5.0
# No request of the mix takes over ~1 s (a wait for budget); one that takes this long is stuck.
REQUEST_TIMEOUT_S = 10.0
# The mix takes 15-30 s here; past this it stops, and the requests it did not run fail the test.
MIX_DEADLINE_S = 60.0
# Bodies over this get Envoy's own 413 (small, so the mix can send some cheaply).
MAX_REQUEST_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(parse_catalog(CATALOG), tmp_path_factory.mktemp("leaks"), extra_ext_procs=1,
                       max_request_bytes=MAX_REQUEST_BYTES)
    yield gw
    gw.stop()


# --- what the gateway and the engines hold ------------------------------------------------------


def metric_total(text: str, name: str) -> float:
    """Sum over every series of `name`: the labels may change (an `endpoint` label is coming)."""
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def admitted(text: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "kvgate_admission_decisions_total" and s.labels.get("outcome") == "admitted")


async def replica_metrics(http: httpx.AsyncClient, gw: Gateway) -> list[str]:
    """Every ext_proc replica's Prometheus text."""
    return [(await http.get(f"http://127.0.0.1:{port}/metrics")).text for _, port in gw.ext_procs]


@dataclass(frozen=True)
class Held:
    reserved_bytes: tuple[float, ...]  # per ext_proc replica
    reservations: tuple[float, ...]
    waiting: tuple[float, ...]  # requests in the replica's wait queue
    engines: dict[str, dict]  # model -> its engine's /sim/state

    @property
    def nothing(self) -> bool:
        return (not any(self.reserved_bytes) and not any(self.reservations) and not any(self.waiting)
                and all(s["kv_blocks_used"] == 0 and s["running"] == 0 and s["waiting"] == 0
                        for s in self.engines.values()))


async def held(http: httpx.AsyncClient, gw: Gateway) -> Held:
    texts = await replica_metrics(http, gw)
    engines = {m: (await http.get(f"{sim_url(gw, m)}/sim/state")).json() for m in gw.sims}
    return Held(*(tuple(metric_total(t, name) for t in texts) for name in (
        "kvgate_kv_reserved_bytes", "kvgate_kv_reservations", "kvgate_admission_queue_waiting")), engines)


async def wait_until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


async def assert_all_released(gw: Gateway) -> None:
    async with httpx.AsyncClient(timeout=5) as http:
        last: list[Held] = []

        async def released() -> bool:
            last[:] = [await held(http, gw)]
            return last[0].nothing

        try:
            await wait_until(released, "every reservation and KV block to be released", RELEASE_TIMEOUT_S)
        except AssertionError as e:
            raise AssertionError(f"{e}; still held: {last[0]}") from None
    backstops = [line for line in new_log_lines(gw, "ext_proc")
                 if "ledger.expired" in line or "reconcile.released_idle" in line]
    assert backstops == [], "a backstop released reservations that the stream end should have"


_log_offsets: dict[str, int] = {}


def new_log_lines(gw: Gateway, prefix: str) -> list[str]:
    """Lines the processes named `prefix`* logged since the last call: each test answers for its own."""
    lines = []
    for path in sorted(gw.run_dir.glob(f"{prefix}*.log")):
        with path.open("rb") as f:
            f.seek(_log_offsets.get(str(path), 0))
            data = f.read()
        _log_offsets[str(path)] = _log_offsets.get(str(path), 0) + len(data)
        lines += data.decode(errors="replace").splitlines()
    return lines


# --- a raw HTTP/1.1 client, to abort at an exact point ----------------------------------------


@dataclass
class Reply:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = False  # the whole response arrived (content-length, or the last chunk)
    error: str | None = None

    @property
    def json(self) -> dict:
        return orjson.loads(self.body)

    @property
    def events(self) -> int:
        return self.body.count(b"data: ")


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, gw: Gateway) -> Conn:
        envoy = gw.envoys[0]
        return cls(*await asyncio.open_connection(envoy.host, envoy.port))

    async def send(self, path: str, body: bytes, headers: dict[str, str] | None = None, *,
                   body_part: int | None = None) -> None:
        """The request with `connection: close`; only `body_part` bytes of the body when given."""
        head = {"host": "kvgate", "content-type": "application/json", "content-length": str(len(body)),
                "connection": "close", **(headers or {})}
        lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
        self.writer.write(f"POST {path} HTTP/1.1\r\n{lines}\r\n".encode() + body[:body_part])
        await self.writer.drain()

    async def reply(self, *, until_events: int | None = None) -> Reply:
        """Read the response; with `until_events`, stop once that many SSE events arrived."""
        r = Reply()
        try:
            head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            r.status = int(head[0].split()[1])
            r.headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
            if r.headers.get("transfer-encoding") == "chunked":
                while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                    r.body += (await self.reader.readexactly(size + 2))[:-2]
                    if until_events is not None and r.events >= until_events:
                        return r
                await self.reader.readuntil(b"\r\n")
            else:
                r.body = await self.reader.readexactly(int(r.headers.get("content-length", "0")))
            r.complete = True
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            r.error = type(e).__name__
        return r

    def abort(self, rst: bool) -> None:
        """Go away: an RST (a killed client) or a FIN (a client that closes its socket)."""
        if rst:
            self.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                            struct.pack("ii", 1, 0))
            self.writer.transport.abort()
        else:
            self.writer.close()

    def close(self) -> None:
        self.writer.transport.abort()


# --- the request kinds of the mix ------------------------------------------------------------


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(["kv", "cache", "block", "token", "leak", "envoy", "gate"]) for _ in range(n))


def openai_body(rng: random.Random, model: str, *, stream: bool, max_tokens: int | None) -> tuple[str, dict]:
    """A completion or a chat, with one of the limit keys (or none) and a random prompt."""
    prompt = words(rng, rng.randint(1, 40))
    limits = {} if max_tokens is None else {rng.choice(["max_tokens", "max_completion_tokens"]): max_tokens}
    if rng.random() < 0.5:
        return "/v1/completions", {"model": model, "prompt": prompt, "stream": stream,
                                   **({"max_tokens": max_tokens} if max_tokens is not None else {})}
    extra = {"stream_options": {"include_usage": True}} if stream and rng.random() < 0.5 else {}
    return "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": prompt}],
                                    "stream": stream, **limits, **extra}


def roomy_limit(rng: random.Random) -> int | None:
    """A small limit mostly; sometimes none or a huge one, which the gateway clamps."""
    return rng.choice([rng.randint(1, ROOMY_MAX_OUTPUT)] * 4 + [None, 100_000])


async def exchange(gw: Gateway, path: str, body: dict | bytes, headers: dict[str, str] | None = None) -> Reply:
    conn = await Conn.open(gw)
    try:
        await conn.send(path, body if isinstance(body, bytes) else orjson.dumps(body), headers)
        return await conn.reply()
    finally:
        conn.close()


def describe(r: Reply) -> str:
    return f"unexpected: {r.status} complete={r.complete} error={r.error} body={r.body[:200]!r}"


async def completed(gw: Gateway, rng: random.Random, stream: bool) -> str:
    limit = roomy_limit(rng)
    path, body = openai_body(rng, ROOMY, stream=stream, max_tokens=limit)
    r = await exchange(gw, path, body)
    if r.status != 200 or not r.complete:
        return describe(r)
    if stream:
        return "ok" if r.body.rstrip().endswith(b"data: [DONE]") else describe(r)
    wanted = ROOMY_MAX_OUTPUT if limit is None else min(limit, ROOMY_MAX_OUTPUT)
    return "ok" if r.json["usage"]["completion_tokens"] == wanted else describe(r)


async def abort_unless_answered(conn: Conn, rng: random.Random, timeout_s: float) -> str:
    """The client goes away (RST or FIN) unless the gateway answers within `timeout_s`."""
    try:
        first = await asyncio.wait_for(conn.reader.read(1), timeout=timeout_s)
    except TimeoutError:
        conn.abort(rst=rng.random() < 0.5)
        return "aborted"
    conn.close()
    return "answered first" if first else "closed by the gateway"


async def abort_before_response(gw: Gateway, rng: random.Random) -> str:
    # Non-streaming: the engine answers after the whole ~100 ms generation; abort well before.
    path, body = openai_body(rng, ROOMY, stream=False, max_tokens=ROOMY_MAX_OUTPUT)
    conn = await Conn.open(gw)
    await conn.send(path, orjson.dumps(body))
    return await abort_unless_answered(conn, rng, rng.uniform(0.003, 0.04))


async def abort_mid_stream(gw: Gateway, rng: random.Random) -> str:
    path, body = openai_body(rng, ROOMY, stream=True, max_tokens=ROOMY_MAX_OUTPUT)
    conn = await Conn.open(gw)
    await conn.send(path, orjson.dumps(body))
    r = await conn.reply(until_events=rng.randint(1, 4))
    conn.abort(rst=rng.random() < 0.5)
    return "aborted" if r.status == 200 and not r.complete and not r.error else describe(r)


async def abort_after_send(gw: Gateway, rng: random.Random) -> str:
    # Gone while Envoy reads the request or ext_proc decides on it.
    path, body = openai_body(rng, rng.choice([ROOMY, SCARCE]), stream=rng.random() < 0.5, max_tokens=None)
    conn = await Conn.open(gw)
    await conn.send(path, orjson.dumps(body))
    conn.abort(rst=rng.random() < 0.5)
    return "aborted"


async def abort_mid_body(gw: Gateway, rng: random.Random) -> str:
    # Envoy buffers the body for ext_proc, which has seen only the headers when the client goes.
    path, body = openai_body(rng, ROOMY, stream=False, max_tokens=8)
    raw = orjson.dumps(body)
    conn = await Conn.open(gw)
    await conn.send(path, raw, body_part=len(raw) // 2)
    await asyncio.sleep(rng.uniform(0, 0.02))
    conn.abort(rst=rng.random() < 0.5)
    return "aborted"


def scarce_body(stream: bool) -> dict:
    # 40 bytes of prompt + 8 + 64 output = 112 tokens = 7 blocks: one fits in a replica's 8 blocks.
    return {"model": SCARCE, "prompt": "s" * 40, "max_tokens": 64, "stream": stream}


async def scarce(gw: Gateway, rng: random.Random) -> str:
    stream = rng.random() < 0.5
    r = await exchange(gw, "/v1/completions", scarce_body(stream), {PRIORITY_HEADER: rng.choice(["now", "wait"])})
    if r.status == 429 and r.complete:
        ok = r.json["error"]["code"] == "rate_limit_exceeded" and 1 <= int(r.headers["retry-after"]) <= 60
        return "429" if ok else describe(r)
    if r.status == 200 and r.complete and (not stream or r.body.rstrip().endswith(b"data: [DONE]")):
        return "ok"
    return describe(r)


async def abort_while_waiting(gw: Gateway, rng: random.Random) -> str:
    # Often in ext_proc's wait queue when the client goes: the scarce model is mostly full.
    conn = await Conn.open(gw)
    await conn.send("/v1/completions", orjson.dumps(scarce_body(rng.random() < 0.5)), {PRIORITY_HEADER: "wait"})
    return await abort_unless_answered(conn, rng, rng.uniform(0.05, 0.4))


async def refused(gw: Gateway, rng: random.Random) -> str:
    """Refused before any reservation: by admission (too long for the context, malformed, unknown model)
    or by Envoy itself (a body over its buffer limit: ext_proc sees only the headers)."""
    kind = rng.choice(["too long", "not json", "bad type", "unknown model", "empty", "too big", "bad priority"])
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"

    def prompt(text: str) -> dict:
        return {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}

    body: dict | bytes = {
        "too long": {"model": ROOMY, **prompt("y" * 1100)},  # 1024-token context, 1 token per byte at most
        "not json": b"{not json" + rng.randbytes(8).hex().encode(),
        "bad type": {"model": ROOMY, **prompt("x"), "max_tokens": rng.choice(["7", -3, True])},
        "unknown model": {"model": "gpt-9", **prompt("x")},
        "empty": b"",
        "too big": {"model": ROOMY, **prompt("b" * (MAX_REQUEST_BYTES + 1024))},
        "bad priority": {"model": ROOMY, **prompt("x")},
    }[kind]
    r = await exchange(gw, path, body, {PRIORITY_HEADER: "vip"} if kind == "bad priority" else None)
    if kind == "too big":
        return "413" if r.status == 413 and r.complete else describe(r)
    wanted = 404 if kind == "unknown model" else 400
    if r.status == wanted and r.complete and r.json["error"]["type"] == "invalid_request_error":
        return str(wanted)
    return describe(r)


async def upstream_reset(gw: Gateway, rng: random.Random) -> str:
    """The engine resets the connection: before the response (Envoy answers 503) or after a few
    events of a stream (Envoy cuts the client's response short)."""
    after = rng.choice([0, 0, 1, 2, 3])
    path, body = openai_body(rng, ROOMY, stream=after > 0 or rng.random() < 0.5, max_tokens=ROOMY_MAX_OUTPUT)
    r = await exchange(gw, path, body, {RESET_AFTER_HEADER: str(after)})
    if r.status == 503 and r.complete:
        return "503"
    if r.status == 200 and not r.complete and b"[DONE]" not in r.body:
        return "cut short"
    return describe(r)


async def triton_http_abort(gw: Gateway, rng: random.Random) -> str:
    conn = await Conn.open(gw)
    await conn.send(f"/v2/models/{TRI}/generate_stream",
                    orjson.dumps({"text_input": words(rng, 5), "max_tokens": 24, "stream": True}))
    r = await conn.reply(until_events=rng.randint(1, 3))
    conn.abort(rst=rng.random() < 0.5)
    return "aborted" if r.status == 200 and not r.complete and not r.error else describe(r)


class GrpcCall:
    """One gRPC call on its own HTTP/2 connection, spoken with the pure-Python h2 library.

    Not grpcio: once gRPC's C core has run in this process, a fork with a preexec_fn (the Supervisor's,
    when Envoy restarts below) may crash the child before it execs (in a trial here: 6 forks in 30
    with calls in flight, 1 in 40 after they ended; none with GRPC_ENABLE_FORK_SUPPORT=0). Raw HTTP/2
    also makes a cancel exactly what a gRPC client sends: RST_STREAM, the connection staying up."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 conn: h2.connection.H2Connection, stream_id: int):
        self.reader, self.writer, self.conn, self.stream_id = reader, writer, conn, stream_id
        self.buffer = b""
        self.headers: dict[str, str] = {}
        self.trailers: dict[str, str] = {}
        self.ended = False

    @classmethod
    async def open(cls, gw: Gateway, method: str) -> GrpcCall:
        envoy = gw.envoys[0]
        reader, writer = await asyncio.open_connection(envoy.host, envoy.port)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, [(":method", "POST"), (":scheme", "http"), (":authority", "kvgate"),
                                      (":path", f"/inference.GRPCInferenceService/{method}"),
                                      ("content-type", "application/grpc"), ("te", "trailers")])
        call = cls(reader, writer, conn, stream_id)
        await call._flush()
        return call

    async def _flush(self) -> None:
        if data := self.conn.data_to_send():
            self.writer.write(data)
            await self.writer.drain()

    async def send(self, message: Message, *, last: bool = False) -> None:
        data = message.SerializeToString()
        self.conn.send_data(self.stream_id, struct.pack(">BI", 0, len(data)) + data, end_stream=last)
        await self._flush()

    async def read(self) -> bytes | None:
        """The next response message; None once the response ended or the connection broke."""
        while True:
            if len(self.buffer) >= 5:
                (length,) = struct.unpack_from(">I", self.buffer, 1)
                if len(self.buffer) >= 5 + length:
                    message, self.buffer = self.buffer[5:5 + length], self.buffer[5 + length:]
                    return message
            if self.ended:
                return None
            try:
                data = await self.reader.read(65536)
            except ConnectionError:
                data = b""
            if not data:
                self.ended = True
                continue
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    self.headers = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    self.buffer += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.TrailersReceived):
                    self.trailers = dict(event.headers)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset,
                                        h2.events.ConnectionTerminated)):
                    self.ended = True
            try:
                await self._flush()
            except ConnectionError:
                self.ended = True

    @property
    def status(self) -> int | None:
        """grpc-status from the trailers (or a trailers-only response); None if the call never finished."""
        value = self.trailers.get("grpc-status", self.headers.get("grpc-status"))
        return None if value is None else int(value)

    async def cancel(self) -> None:
        """What a gRPC client's cancel does: RST_STREAM(CANCEL), the connection staying up."""
        self.conn.reset_stream(self.stream_id, h2.errors.ErrorCodes.CANCEL)
        await self._flush()

    def close(self) -> None:
        self.writer.transport.abort()


def infer_request(text: str, max_tokens: int, *, stream: bool | None = None,
                  id_: str = "") -> service_pb2.ModelInferRequest:
    """The TensorRT-LLM ensemble's inputs, as tritonclient sends them (raw contents)."""
    req = service_pb2.ModelInferRequest(model_name=TRI, id=id_)
    data = text.encode()
    tensors = [("text_input", "BYTES", struct.pack("<I", len(data)) + data),
               ("max_tokens", "INT32", struct.pack("<i", max_tokens))]
    if stream is not None:
        tensors.append(("stream", "BOOL", bytes([stream])))
    for name, datatype, raw in tensors:
        req.inputs.add(name=name, datatype=datatype, shape=[1, 1])
        req.raw_input_contents.append(raw)
    return req


def output_words(resp: service_pb2.ModelInferResponse) -> int:
    raw = resp.raw_output_contents[0]
    return len(raw[4:4 + struct.unpack_from("<I", raw)[0]].split())


def stream_response(raw: bytes) -> service_pb2.ModelStreamInferResponse:
    return service_pb2.ModelStreamInferResponse.FromString(raw)


OK, CANCELLED = 0, 1  # gRPC status codes


async def grpc_infer(gw: Gateway, rng: random.Random) -> str:
    n = rng.randint(1, 8)
    call = await GrpcCall.open(gw, "ModelInfer")
    try:
        await call.send(infer_request(words(rng, 5), n), last=True)
        raw = await call.read()
        if raw is None or await call.read() is not None or call.status != OK:
            return f"unexpected: status {call.status}, headers {call.headers}"
        got = output_words(service_pb2.ModelInferResponse.FromString(raw))
        return "ok" if got == n else f"unexpected: {got} words, not {n}"
    finally:
        call.close()


async def grpc_infer_cancel(gw: Gateway, rng: random.Random) -> str:
    # 16 tokens x 8 ms: cancel well before the answer.
    call = await GrpcCall.open(gw, "ModelInfer")
    try:
        await call.send(infer_request(words(rng, 5), 16), last=True)
        answer = asyncio.ensure_future(call.read())
        done, _ = await asyncio.wait({answer}, timeout=rng.uniform(0.003, 0.06))
        if done:
            return "answered first"
        answer.cancel()
        await call.cancel()
        return "cancelled"
    finally:
        call.close()


async def grpc_stream(gw: Gateway, rng: random.Random) -> str:
    """A ModelStreamInfer with a few requests, half-closed and read to its end."""
    call = await GrpcCall.open(gw, "ModelStreamInfer")
    try:
        sizes = {str(i): rng.randint(1, 6) for i in range(rng.randint(1, 3))}
        for i, (id_, n) in enumerate(sizes.items()):
            await call.send(infer_request(words(rng, 4), n, id_=id_), last=i == len(sizes) - 1)
        got = {}
        while (raw := await call.read()) is not None:
            msg = stream_response(raw)
            if msg.error_message:
                return f"unexpected: {msg.error_message}"
            got[msg.infer_response.id] = output_words(msg.infer_response)
        return "ok" if got == sizes and call.status == OK else f"unexpected: {got} vs {sizes}, {call.status}"
    finally:
        call.close()


async def grpc_stream_cancel(gw: Gateway, rng: random.Random) -> str:
    """Decoupled generations (a response per token) on one stream, cancelled after a few responses."""
    call = await GrpcCall.open(gw, "ModelStreamInfer")
    try:
        for i in range(rng.randint(1, 2)):
            await call.send(infer_request(words(rng, 4), 24, stream=True, id_=str(i)))
        for _ in range(rng.randint(1, 3)):
            raw = await call.read()
            if raw is None or stream_response(raw).error_message:
                return f"unexpected: {raw!r}, status {call.status}"
        await call.cancel()
        return "cancelled"
    finally:
        call.close()


async def grpc_stream_refused(gw: Gateway, rng: random.Random) -> str:
    """A stream whose first message is admitted and answering when its second one is refused (prompt
    over the context): the refusal is that request's error and the stream goes on; it is then
    cancelled, and the first message's reservation goes with it."""
    call = await GrpcCall.open(gw, "ModelStreamInfer")
    try:
        await call.send(infer_request(words(rng, 4), 24, stream=True, id_="admitted"))
        raw = await call.read()
        if raw is None or stream_response(raw).error_message:
            return f"unexpected: {raw!r}, status {call.status}"
        await call.send(infer_request("z" * 1100, 8, id_="refused"))
        while (raw := await call.read()) is not None:
            msg = stream_response(raw)
            if msg.infer_response.id == "refused":
                return "refused alone" if msg.error_message else "unexpected: the refused message was run"
        return f"unexpected: the stream ended, status {call.status}"
    finally:
        call.close()


Kind = Callable[[Gateway, random.Random], Awaitable[str]]

# kind: (share of the mix, the outcomes it may have, (the outcome that must occur, at least how often))
KINDS: dict[str, tuple[Kind, float, set[str], tuple[str, int]]] = {
    "completion": (lambda m, r: completed(m, r, stream=False), 14, {"ok"}, ("ok", 150)),
    "stream": (lambda m, r: completed(m, r, stream=True), 14, {"ok"}, ("ok", 150)),
    "abort before response": (abort_before_response, 9, {"aborted", "answered first"}, ("aborted", 100)),
    "abort mid-stream": (abort_mid_stream, 9, {"aborted"}, ("aborted", 100)),
    "abort after send": (abort_after_send, 7, {"aborted"}, ("aborted", 80)),
    "abort mid-body": (abort_mid_body, 4, {"aborted"}, ("aborted", 40)),
    "scarce": (scarce, 8, {"ok", "429"}, ("429", 30)),
    "abort while waiting": (abort_while_waiting, 3, {"aborted", "answered first"}, ("aborted", 30)),
    "refused": (refused, 8, {"400", "404", "413"}, ("400", 80)),
    "upstream reset": (upstream_reset, 8, {"503", "cut short"}, ("cut short", 30)),
    "triton http abort": (triton_http_abort, 2, {"aborted"}, ("aborted", 20)),
    "grpc infer": (grpc_infer, 3, {"ok"}, ("ok", 30)),
    "grpc infer cancel": (grpc_infer_cancel, 5, {"cancelled", "answered first"}, ("cancelled", 50)),
    "grpc stream": (grpc_stream, 2, {"ok"}, ("ok", 20)),
    "grpc stream cancel": (grpc_stream_cancel, 5, {"cancelled"}, ("cancelled", 50)),
    "grpc stream refused": (grpc_stream_refused, 2, {"refused alone"}, ("refused alone", 20)),
}


async def run_one(kind: str, gw: Gateway, seed: int) -> str:
    try:
        return await asyncio.wait_for(KINDS[kind][0](gw, random.Random(seed)), REQUEST_TIMEOUT_S)
    except Exception as e:  # recorded as an outcome, reported with the request's seed
        return f"unexpected: {e!r}"


@pytest.mark.asyncio
async def test_thousands_of_requests_ended_every_way_release_everything(gateway: Gateway) -> None:
    rng = random.Random(SEED)
    kinds = list(KINDS)
    plan = [(kind, rng.getrandbits(32)) for kind in rng.choices(kinds, [KINDS[k][1] for k in kinds], k=REQUESTS)]
    outcomes = ["not run: the mix passed its deadline"] * len(plan)
    pending = collections.deque(enumerate(plan))
    peak = [0.0]
    deadline = time.monotonic() + MIX_DEADLINE_S

    async def worker() -> None:
        while pending and time.monotonic() < deadline:
            i, (kind, seed) = pending.popleft()
            outcomes[i] = await run_one(kind, gateway, seed)

    async def watch() -> None:
        # Proof that the ledger metric moves under this load, so its return to zero means something.
        async with httpx.AsyncClient(timeout=5) as http:
            while pending and time.monotonic() < deadline:
                peak[0] = max(peak[0], sum((await held(http, gateway)).reserved_bytes))
                await asyncio.sleep(0.2)

    started = time.monotonic()
    await asyncio.gather(watch(), *(worker() for _ in range(CONCURRENCY)))
    elapsed = time.monotonic() - started

    counts = collections.Counter(zip((k for k, _ in plan), outcomes))
    print(f"\n{len(plan)} requests in {elapsed:.1f} s; peak reserved {peak[0]:.0f} B")
    for (kind, outcome), n in sorted(counts.items()):
        print(f"  {kind:22} {outcome:16} {n}")
    # Leaks first: a leak is what usually makes other requests fail (queued behind leaked blocks).
    await assert_all_released(gateway)
    wrong = [(i, kind, seed, outcome) for i, ((kind, seed), outcome) in enumerate(zip(plan, outcomes))
             if outcome not in KINDS[kind][2]]
    assert wrong == [], f"{len(wrong)} requests ended unexpectedly (index, kind, seed, outcome): {wrong[:10]}"
    for kind, (_, _, _, (outcome, at_least)) in KINDS.items():
        assert counts[kind, outcome] >= at_least, f"{kind!r} ended {outcome!r} only {counts[kind, outcome]} times"
    assert peak[0] > 0


# --- clients leave ext_proc's wait queue -------------------------------------------------------


async def queued_request(gw: Gateway, priority: str) -> Conn:
    """A 256-token stream on the queued model, sent."""
    conn = await Conn.open(gw)
    await conn.send("/v1/completions", orjson.dumps({"model": QUEUED, "prompt": "hold", "max_tokens": 256,
                                                     "stream": True}), {PRIORITY_HEADER: priority})
    return conn


@pytest.mark.asyncio
async def test_requests_that_leave_while_waiting_for_budget_are_released(gateway: Gateway) -> None:
    """Both replicas' budgets of the queued model are held; requests wait for it in ext_proc's queue;
    half of their clients go away, and their places in the queue go with them (Envoy cancels the
    ext_proc stream of a waiting request). When the budget frees up, the others get it."""
    await assert_all_released(gateway)
    async with httpx.AsyncClient(timeout=5) as http:
        async def per_replica(name: str) -> list[float]:
            return [metric_total(t, name) for t in await replica_metrics(http, gateway)]

        async def admissions() -> float:
            return sum(admitted(t) for t in await replica_metrics(http, gateway))

        admitted_before = await admissions()
        # Envoy picks the replica: send holders (class `now`: refused at once by a full replica) until
        # each replica holds one, which takes all of its half of the budget.
        holders: list[Conn] = []
        attempts = 0
        while min(await per_replica("kvgate_kv_reservations")) < 1:
            assert attempts < 20, "Envoy never sent a holder to one of the replicas"
            attempts += 1
            conn = await queued_request(gateway, "now")
            first = await conn.reply(until_events=1)
            if first.status == 200:
                holders.append(conn)
            else:
                assert first.status == 429, describe(first)
                conn.close()
        assert await per_replica("kvgate_kv_reservations") == [1, 1]

        conns = [await queued_request(gateway, "patient") for _ in range(8)]
        replies = [asyncio.create_task(c.reply(until_events=1)) for c in conns]
        try:
            async def queued(n: int) -> bool:
                return sum(await per_replica("kvgate_admission_queue_waiting")) == n

            await wait_until(lambda: queued(8), "8 requests waiting for budget", 10)
            for i, (conn, reply) in enumerate(zip(conns[:4], replies[:4])):
                reply.cancel()
                conn.abort(rst=i % 2 == 0)
            # Before any budget frees up: a request that left must not wait for it, nor get it.
            await wait_until(lambda: queued(4), "the requests that left to leave the queue", RELEASE_TIMEOUT_S)
            for conn in holders:
                conn.abort(rst=True)

            async def stay(conn: Conn, reply: asyncio.Task[Reply]) -> Reply:
                first = await reply
                conn.abort(rst=False)  # the budget goes on to the next one waiting
                return first

            firsts = await asyncio.wait_for(asyncio.gather(*(stay(c, r) for c, r in zip(conns[4:], replies[4:]))), 15)
        finally:
            for conn, reply in zip(conns, replies):
                reply.cancel()
                conn.close()
        assert [(r.status, r.events >= 1) for r in firsts] == [(200, True)] * 4, [describe(r) for r in firsts]
        assert await admissions() - admitted_before == len(holders) + 4  # none of those that left
    await assert_all_released(gateway)


# --- Envoy goes down with requests in flight ----------------------------------------------------


async def until_cut(conn: Conn) -> str:
    """Read what remains of a response: 'cut' if it ends without completing."""
    rest = b""
    try:
        while data := await conn.reader.read(65536):
            rest += data
    except ConnectionError:
        pass
    finally:
        conn.close()
    return "completed" if b"[DONE]" in rest or b'"usage"' in rest else "cut"


async def http_in_flight(gw: Gateway, *, stream: bool, started: asyncio.Event | None) -> str:
    """A several-second generation on the slow engine; a stream sets `started` at its first event."""
    conn = await Conn.open(gw)
    await conn.send("/v1/completions", orjson.dumps({"model": SLOW, "prompt": "hold on", "max_tokens": 300,
                                                     "stream": stream}))
    if stream:
        first = await conn.reply(until_events=1)
        if first.status != 200 or first.complete:
            conn.close()
            return describe(first)
        assert started is not None
        started.set()
    return await until_cut(conn)


async def grpc_in_flight(gw: Gateway, *, stream: bool, started: asyncio.Event | None) -> str:
    """A several-second Triton generation: a unary ModelInfer, or a decoupled ModelStreamInfer that
    sets `started` at its first response. 'cut' if it ends without an OK status."""
    call = await GrpcCall.open(gw, "ModelStreamInfer" if stream else "ModelInfer")
    try:
        await call.send(infer_request("hold on", 400, stream=stream or None), last=not stream)
        if stream:
            if await call.read() is None:
                return f"unexpected: no first response, status {call.status}"
            assert started is not None
            started.set()
        while await call.read() is not None:
            pass
        return "cut" if call.status != OK else "completed"
    finally:
        call.close()


async def envoy_serves(gw: Gateway) -> bool:
    try:
        r = await exchange(gw, "/v1/completions", {"model": ROOMY, "prompt": "back?", "max_tokens": 1})
    except OSError:
        return False
    return r.status == 200 and r.complete


@pytest.mark.asyncio
@pytest.mark.parametrize("kill", [True, False], ids=["SIGKILL", "SIGTERM"])
async def test_envoy_restart_with_requests_in_flight_releases_everything(gateway: Gateway, kill: bool) -> None:
    await assert_all_released(gateway)  # nothing left over: below, every reservation is one of ours
    streams = [asyncio.Event() for _ in range(12)]
    holders = [asyncio.create_task(http_in_flight(gateway, stream=True, started=e)) for e in streams[:8]]
    holders += [asyncio.create_task(grpc_in_flight(gateway, stream=True, started=e)) for e in streams[8:]]
    # Admitted but not answered yet: the whole response comes at the end of the generation.
    holders += [asyncio.create_task(http_in_flight(gateway, stream=False, started=None)) for _ in range(4)]
    holders += [asyncio.create_task(grpc_in_flight(gateway, stream=False, started=None)) for _ in range(4)]
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            for e in streams:
                await asyncio.wait_for(e.wait(), 10)

            async def all_admitted() -> bool:
                return sum((await held(http, gateway)).reservations) == len(holders)

            # Exactly one reservation per request in flight: what the restart below must give back.
            await wait_until(all_admitted, "every request in flight to hold its reservation", 10)
        # In this thread, not a worker thread: the Supervisor's children get SIGTERM when the thread that
        # started them exits (PR_SET_PDEATHSIG is per thread), and asyncio's worker threads do exit.
        gateway.supervisor.restart("envoy-0", kill=kill)
        ends = await asyncio.wait_for(asyncio.gather(*holders), 15)
    finally:
        for t in holders:
            t.cancel()
    assert ends == ["cut"] * len(holders)
    await assert_all_released(gateway)
    await wait_until(lambda: envoy_serves(gateway), "the new Envoy to serve", 30)
    await assert_all_released(gateway)


# --- Envoy cancels ext_proc streams while ext_proc is stalled -----------------------------------


@pytest.mark.asyncio
async def test_streams_cancelled_while_ext_proc_is_stalled_are_released(gateway: Gateway) -> None:
    """Both replicas stop (SIGSTOP, like a long GC pause or a CPU-starved pod). Envoy gives up on some
    requests after its 2 s message timeout; the clients of others go away first. Either way Envoy
    cancels the ext_proc stream while the request's messages still wait, unread, in ext_proc's
    socket: when ext_proc wakes up it may admit a request whose stream is already gone."""
    await assert_all_released(gateway)
    replicas = [gateway.supervisor.get(f"ext_proc-{i}").proc for i in range(len(gateway.ext_procs))]
    async with httpx.AsyncClient(timeout=5) as http:
        admitted_before = sum(admitted(t) for t in await replica_metrics(http, gateway))

    async def patient(rng: random.Random) -> str:
        path, body = openai_body(rng, ROOMY, stream=rng.random() < 0.5, max_tokens=4)
        r = await exchange(gateway, path, body)
        return str(r.status) if r.complete else describe(r)

    async def impatient(rng: random.Random) -> str:
        path, body = openai_body(rng, ROOMY, stream=rng.random() < 0.5, max_tokens=4)
        conn = await Conn.open(gateway)
        await conn.send(path, orjson.dumps(body))
        try:
            await asyncio.wait_for(conn.reader.read(1), 0.5)
        except TimeoutError:
            conn.abort(rst=rng.random() < 0.5)
            return "aborted"
        conn.close()
        return "answered"

    rng = random.Random(SEED)
    for p in replicas:
        p.send_signal(signal.SIGSTOP)
    try:
        ends = await asyncio.wait_for(asyncio.gather(*(patient(random.Random(rng.random())) for _ in range(10)),
                                                     *(impatient(random.Random(rng.random())) for _ in range(10))),
                                      15)
    finally:
        for p in replicas:
            p.send_signal(signal.SIGCONT)
    # Envoy's message timeout (2 s) for the patient (a 503 gateway_unavailable, docs/architecture.md,
    # "Envoy's own replies"), and the impatient gone before it.
    assert collections.Counter(ends) == {"503": 10, "aborted": 10}
    await assert_all_released(gateway)
    async with httpx.AsyncClient(timeout=5) as http:
        admitted_after = sum(admitted(t) for t in await replica_metrics(http, gateway))
    # For the record (either way is right): grpc drops a stream whose reset it reads with its messages.
    print(f"\nadmitted by ext_proc after it woke up: {admitted_after - admitted_before:.0f}")
