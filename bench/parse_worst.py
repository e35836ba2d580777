"""`python -m bench.parse_worst`: how long ext_proc takes to decide the worst bodies we can build for each
API within Envoy's 4 MiB limit: parse (ext_proc/apis.py's parser for the API) and plan (the prompt
bound and the KV bytes, admission.plan without a tokenizer), or the ProtocolError that refuses it.

Bodies: the normal ones (a 2 KB chat, the baseline; 200 KB prompts), then the hostile ones: many
elements, deep nesting, many keys, many tiny strings, huge strings, duplicate keys, long unicode,
escapes. Each is timed on its own (the best of --repeat runs) and as a ratio to the 2 KB chat of the
same run: the machines here are shared and noisy, and only same-run comparisons mean much. The goal:
every body decided in under 10 ms (docs/architecture.md, "The request path").
"""

from __future__ import annotations

import argparse
import json
import shlex
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import orjson
from tritonclient.grpc import service_pb2

from ext_proc import admission, apis
from ext_proc.policy import EndpointPolicy, Policy
from ext_proc.request import MAX_JSON_CONTAINERS, MAX_JSON_VALUES, ProtocolError
from ext_proc.triton_grpc import frame
from kvgate.wire import TRITON_GRPC_SERVICE

LIMIT = 4 * 2**20  # Envoy's max_request_bytes for the gateway
GOAL_MS = 10.0
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
GENERATE, INFER = "/v2/models/m/generate", "/v2/models/m/infer"
MODEL_INFER = TRITON_GRPC_SERVICE + "ModelInfer"
STREAM = TRITON_GRPC_SERVICE + "ModelStreamInfer"
POLICY = Policy(name="m", protocol="openai", backend_model="m", max_context_tokens=1 << 30, max_output_tokens=1024,
                kv_bytes_per_token=1, tokens_per_block=16, endpoints=(EndpointPolicy("e:1", 1 << 62, "", ""),),
                estimate_bytes_per_token=1.0, estimate_per_message=8, estimate_per_request=8)
TEXT = ("The gateway admits a request by the KV-cache bytes it can claim: prompt and output tokens, "
        "times bytes per token, times sequences. It clamps max_tokens to what fits: {\"a\": [1, 2]}, 3:4.\n")


@dataclass(frozen=True)
class Body:
    name: str
    path: str
    raw: bytes
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = "application/json"


def text(size: int, unit: str = TEXT) -> str:
    return (unit * (size // len(unit) + 1))[:size]


def fit(make: Callable[[int], bytes], limit: int = LIMIT) -> bytes:
    """The largest body `make(n)` builds within `limit` bytes (n found by doubling, then bisection)."""
    lo, hi = 1, 2
    while len(make(hi)) <= limit:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(make(mid)) <= limit else (lo, mid)
    return make(lo)


def chat(content: str | list, n: int = 1, **fields: object) -> bytes:
    messages = [{"role": "user", "content": content}] * n
    return orjson.dumps({"model": "m", "messages": messages, "max_tokens": 16, **fields})


def openai_bodies() -> Iterator[Body]:
    sdk = text(200_000)
    yield Body("chat 200 KB prompt (openai SDK: compact)", CHAT, chat(sdk))
    spaced = json.dumps({"model": "m", "messages": [{"role": "user", "content": sdk}], "max_tokens": 16}).encode()
    yield Body("chat 200 KB prompt (json.dumps: spaces)", CHAT, spaced)
    yield Body("chat 200 KB CJK prompt (ensure_ascii: \\u escapes)", CHAT,
               json.dumps({"model": "m", "messages": [{"role": "user", "content": text(35_000, "你好世界")}]})
               .encode())
    yield Body("chat one 4 MiB prompt", CHAT, fit(lambda n: chat(text(n))))
    yield Body("chat 4 MiB of commas and brackets in a string", CHAT, fit(lambda n: chat(text(n, ",[{"))))
    yield Body("chat 4 MiB of escaped quotes, commas", CHAT, fit(lambda n: chat(text(n, '",'))))
    yield Body("chat 4 MiB of backslash runs and commas", CHAT, fit(lambda n: chat(text(n, "\\\\\\,"))))
    yield Body("chat 4 MiB of \\n escapes", CHAT, fit(lambda n: chat("\n" * n)))
    yield Body("chat 4 MiB CJK as \\u escapes", CHAT,
               fit(lambda n: json.dumps({"model": "m", "messages": [{"role": "user", "content": "你" * n}]}).encode()))
    yield Body("chat 10,000 messages (the cap)", CHAT, chat("hi", 10_000))
    yield Body("chat 10,001 messages", CHAT, chat("hi", 10_001))
    yield Body("chat messages filling 4 MiB", CHAT, fit(lambda n: chat("", n)))
    yield Body("chat content parts filling 4 MiB", CHAT, fit(lambda n: chat([{"type": "text", "text": ""}] * n)))
    yield Body("chat tool schema nested 240 levels", CHAT, chat("hi")[:-1] + b',"tools":[' + nested(240) + b"]}")
    yield Body("chat nested 1,000 levels", CHAT, chat("hi")[:-1] + b',"metadata":' + nested(1000) + b"}")
    yield Body("completions 2,048 prompts (the cap)", COMPLETIONS,
               orjson.dumps({"model": "m", "prompt": ["x" * 100] * 2048}))
    yield Body("completions empty prompts filling 4 MiB", COMPLETIONS,
               fit(lambda n: orjson.dumps({"model": "m", "prompt": [""] * n})))
    yield Body(f"completions {MAX_JSON_VALUES - 16:,} token ids", COMPLETIONS,
               orjson.dumps({"model": "m", "prompt": [128_000] * (MAX_JSON_VALUES - 16)}))
    yield Body("completions token ids filling 4 MiB", COMPLETIONS,
               fit(lambda n: orjson.dumps({"model": "m", "prompt": [1] * n})))
    yield Body("completions token-id lists filling 4 MiB", COMPLETIONS,
               fit(lambda n: orjson.dumps({"model": "m", "prompt": [[1]] * n})))
    yield Body("completions empty arrays filling 4 MiB", COMPLETIONS,
               fit(lambda n: orjson.dumps({"model": "m", "prompt": "x", "x": [[]] * n})))
    yield Body("completions empty objects filling 4 MiB", COMPLETIONS,
               fit(lambda n: orjson.dumps({"model": "m", "prompt": "x", "x": [{}] * n})))
    yield Body("completions many keys filling 4 MiB", COMPLETIONS,
               fit(lambda n: orjson.dumps({"model": "m", "prompt": "x", **{str(i): 0 for i in range(n)}})))
    yield from duplicate_bodies()


def nested(depth: int) -> bytes:
    return b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)


def values_body(n: int, tail: bytes) -> bytes:
    return b'{"model":"m","prompt":"x","x":[' + b",".join([b"1"] * n) + b"]," + tail + b"}"


def objects_body(n: int, tail: bytes) -> bytes:
    return b'{"model":"m","prompt":"x","x":[' + b",".join([b'{"b":1}'] * n) + b"]," + tail + b"}"


def duplicate_bodies() -> Iterator[Body]:
    """A repeated key, or a false alarm of the fast check (a literal \\u003a), at the structure caps: the
    exact check's worst."""
    dup, alarm = b'"x":1', b'"y":"\\\\u003a"'
    for name, tail in (("a duplicate key", dup), ("a false alarm (literal \\\\u003a)", alarm)):
        yield Body(f"completions {MAX_JSON_VALUES - 64:,} values and {name}", COMPLETIONS,
                   values_body(MAX_JSON_VALUES - 64, tail))
        yield Body(f"completions {MAX_JSON_CONTAINERS - 64:,} objects and {name}", COMPLETIONS,
                   objects_body(MAX_JSON_CONTAINERS - 64, tail))
    yield Body("chat 4 MiB prompt and a duplicate key", CHAT,
               fit(lambda n: chat(text(n))[:-1] + b',"max_tokens":100000}'))
    yield Body("chat 100 duplicate keys in 100 messages", CHAT,
               chat("hi", 100).replace(b'"content":"hi"', b'"content":"hi","content":"' + b"x" * 1000 + b'"'))


def generate_bodies() -> Iterator[Body]:
    yield Body("generate 200 KB prompt", GENERATE, orjson.dumps({"text_input": text(200_000), "max_tokens": 16}))
    yield Body("generate one 4 MiB prompt", GENERATE, fit(lambda n: orjson.dumps({"text_input": text(n)})))
    yield Body("generate 100 KB prompt, duplicate text_input and max_tokens", GENERATE,
               b'{"text_input":"' + b"x" * 100_000 + b'","text_input":"hi","max_tokens":100000,"max_tokens":10}')
    yield Body("generate many keys filling 4 MiB", GENERATE,
               fit(lambda n: orjson.dumps({"text_input": "x", **{str(i): 0 for i in range(n)}})))
    yield Body("generate 4 MiB of \\u escapes", GENERATE,
               fit(lambda n: json.dumps({"text_input": "\u00e9" * n}).encode()))


def tensor(name: str, datatype: str, shape: list[int], **spec: object) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape, **spec}


def kserve_bodies() -> Iterator[Body]:
    yield Body("infer JSON 2,048 prompts (the cap)", INFER,
               orjson.dumps({"inputs": [tensor("text_input", "BYTES", [2048, 1], data=[["x" * 100]] * 2048)]}))
    yield Body("infer JSON empty strings filling 4 MiB", INFER, fit(lambda n: orjson.dumps(
        {"inputs": [tensor("text_input", "BYTES", [n, 1], data=[""] * n)]})))
    yield Body("infer JSON data nested 32 levels", INFER, orjson.dumps(
        {"inputs": [tensor("text_input", "BYTES", [1] * 32, data=nested_list("x", 32))]}))
    yield Body("infer JSON data nested 500 levels", INFER, orjson.dumps(
        {"inputs": [tensor("text_input", "BYTES", [1], data="x")]})[:-6] + b"[" * 500 + b'"x"' + b"]" * 500 + b"}]}")
    yield Body("infer JSON 256 inputs (the cap)", INFER, orjson.dumps({"inputs": [
        tensor("text_input", "BYTES", [1], data=["x"]),
        *(tensor(f"in{i}", "FP32", [1], data=[0.5]) for i in range(255))]}))
    yield Body("infer JSON inputs filling 4 MiB", INFER, fit(lambda n: orjson.dumps(
        {"inputs": [tensor("text_input", "BYTES", [1], data=["x"]), *({"name": str(i)} for i in range(n))]})))
    yield Body("infer JSON shape of 200,000 dimensions", INFER, orjson.dumps(
        {"inputs": [tensor("text_input", "BYTES", [1] * 200_000, data=["x"])]}))
    yield Body("infer binary 2,048 prompts (the cap)", INFER, *binary([b"x" * 100] * 2048))
    yield Body("infer binary one 4 MiB prompt", INFER, *binary([b"x" * (LIMIT - 200)]))
    yield Body("infer binary empty BYTES filling 4 MiB (shape says so)", INFER, *binary([b""] * ((LIMIT - 200) // 4)))
    yield Body("infer binary empty BYTES filling 4 MiB (shape [1, 1])", INFER,
               *binary([b""] * ((LIMIT - 200) // 4), shape=[1, 1]))
    yield Body("infer binary max_tokens INT32 filling 4 MiB", INFER, *binary(
        [b"x"], limits=(LIMIT - 300) // 4))
    yield Body("infer binary JSON header with a duplicate key", INFER,
               *binary([b"x" * 1000], extra=b',"inputs":[]'))


def nested_list(value: object, depth: int) -> object:
    for _ in range(depth):
        value = [value]
    return value


def binary(prompts: list[bytes], shape: list[int] | None = None, limits: int = 0,
           extra: bytes = b"") -> tuple[bytes, tuple[tuple[str, str], ...]]:
    raw = b"".join(struct.pack("<I", len(p)) + p for p in prompts)
    specs = [tensor("text_input", "BYTES", shape or [len(prompts), 1], parameters={"binary_data_size": len(raw)})]
    tail = raw
    if limits:
        ints = struct.pack(f"<{limits}i", *[16] * limits)
        specs.append(tensor("max_tokens", "INT32", [limits, 1], parameters={"binary_data_size": len(ints)}))
        tail += ints
    header = orjson.dumps({"inputs": specs})[:-1] + extra + b"}"
    return header + tail, (("inference-header-content-length", str(len(header))),)


def grpc_bodies() -> Iterator[Body]:
    def infer(**fields: object) -> service_pb2.ModelInferRequest:
        return service_pb2.ModelInferRequest(model_name="m", **fields)

    def text_input(prompts: list[bytes], shape: list[int] | None = None) -> object:
        t = service_pb2.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES",
                                                            shape=shape or [len(prompts), 1])
        t.contents.bytes_contents.extend(prompts)
        return t

    def raw_prompt(size: int) -> service_pb2.ModelInferRequest:
        t = service_pb2.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1, 1])
        return infer(inputs=[t], raw_input_contents=[struct.pack("<I", size) + b"x" * size])

    yield Body("ModelInfer 200 KB prompt (raw_input_contents)", MODEL_INFER,
               frame(raw_prompt(200_000).SerializeToString()))
    yield Body("ModelInfer 2,048 prompts in contents (the cap)", MODEL_INFER,
               frame(infer(inputs=[text_input([b"x" * 100] * 2048)]).SerializeToString()))
    big = (LIMIT - 100) // 2
    yield Body("ModelInfer empty inputs filling 4 MiB", MODEL_INFER,
               frame(b"\x0a\x01m" + b"\x2a\x00" * big))
    yield Body("ModelInfer empty bytes_contents filling 4 MiB", MODEL_INFER,
               frame(infer(inputs=[text_input([b""] * big, shape=[1, 1])]).SerializeToString()))
    yield Body("ModelInfer shape of 4M packed dimensions", MODEL_INFER,
               frame(infer(inputs=[text_input([b"x"], shape=[1] * (LIMIT - 100))]).SerializeToString()))
    params = infer(inputs=[text_input([b"x"])])
    for i in range(150_000):
        params.parameters[str(i)].int64_param = 1
    yield Body("ModelInfer 150,000 parameters", MODEL_INFER, frame(params.SerializeToString()))
    yield Body("ModelInfer model_name repeated filling 4 MiB", MODEL_INFER,
               frame(infer(inputs=[text_input([b"x"])]).SerializeToString() + b"\x0a\x01m" * ((LIMIT - 100) // 3)))
    yield Body("ModelInfer empty raw_input_contents filling 4 MiB", MODEL_INFER,
               frame(infer(inputs=[text_input([b"x"])]).SerializeToString() + b"\x3a\x00" * big))
    yield Body("ModelStreamInfer message: empty inputs filling 4 MiB", STREAM, b"\x0a\x01m" + b"\x2a\x00" * big,
               content_type="application/grpc")
    yield Body("ModelStreamInfer message: 2,048 prompts", STREAM,
               infer(inputs=[text_input([b"x" * 100] * 2048)]).SerializeToString(), content_type="application/grpc")


def all_bodies() -> list[Body]:
    bodies = [*openai_bodies(), *generate_bodies(), *kserve_bodies(), *grpc_bodies()]
    out = []
    for b in bodies:
        grpc = b.path.startswith(TRITON_GRPC_SERVICE)
        out.append(Body(b.name, b.path, b.raw, b.headers, "application/grpc" if grpc else b.content_type))
    return out


def decide(body: Body) -> str:
    call = apis.match(body.path, body.content_type)
    assert call is not None, body.path
    try:
        parsed = call.api.parse(call.model, dict(body.headers), body.raw)
    except ProtocolError as e:
        return f"400 {str(e)[:70]}"
    planned = admission.plan(parsed.request, POLICY, None)
    if isinstance(planned, admission.Refusal):
        return f"{planned.status} {planned.message[:70]}"
    return f"admitted: {len(parsed.request.prompts) or len(parsed.request.exact_prompt_tokens)} prompt(s)"


def best_ms(run: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def floor_ms(body: Body, repeat: int) -> float | None:
    """orjson.loads of the body's JSON alone: what no JSON parse of it can go below."""
    if body.content_type.startswith("application/grpc"):
        return None
    declared = dict(body.headers).get("inference-header-content-length")
    part = body.raw[:int(declared)] if declared else body.raw

    def parse() -> None:
        try:
            orjson.loads(part)
        except orjson.JSONDecodeError:
            pass
    return best_ms(parse, repeat)


def timed(body: Body, repeat: int) -> tuple[float, str]:
    outcome = decide(body)
    return best_ms(lambda: decide(body), repeat), outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs of each body; the best counts")
    parser.add_argument("--only", default="", help="bodies whose name contains this")
    args = parser.parse_args(argv)
    baseline = Body("chat 2 KB (baseline)", CHAT, chat(text(2000)), content_type="application/json")
    base_ms, _ = timed(baseline, max(args.repeat, 200))
    print(f"$ {shlex.join([sys.executable.rsplit('/', 1)[-1], '-m', 'bench.parse_worst', *(argv or sys.argv[1:])])}")
    print(f"baseline: {baseline.name} {len(baseline.raw):,} bytes, {base_ms * 1000:.1f} us\n")
    print("ms: to decide it (parse and plan); orjson: orjson.loads of its JSON alone, the floor; "
          "x 2KB: ms over the baseline's\n")
    print(f"{'body':<62} {'bytes':>10} {'ms':>7} {'orjson':>7} {'x 2KB':>6}  outcome")
    over = 0
    for body in all_bodies():
        if args.only not in body.name:
            continue
        assert len(body.raw) <= LIMIT, (body.name, len(body.raw))
        ms, outcome = timed(body, args.repeat)
        floor = floor_ms(body, args.repeat)
        over += ms > GOAL_MS
        flag = " !" if ms > GOAL_MS else ""
        shown = "" if floor is None else f"{floor:.2f}"
        print(f"{body.name:<62} {len(body.raw):>10,} {ms:>7.2f} {shown:>7} {ms / base_ms:>6.0f}  {outcome}{flag}")
    print(f"\n{over} bodies over the {GOAL_MS:.0f} ms goal (marked !)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
