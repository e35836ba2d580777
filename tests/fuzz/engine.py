"""A small deterministic mutation fuzzer: the suite's fixed-seed runs, and long runs where atheris is
not installed. Each input is a corpus entry (or an input kept earlier) mutated a few times: bytes
flipped, set, inserted, deleted, chunks duplicated or spliced from another entry, JSON and protobuf
tokens inserted. An input is kept for further mutation when it ends in an outcome not seen before (a
result, or a ProtocolError message of a new kind): a coarse stand-in for coverage.
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ext_proc.request import ProtocolError

CORPUS = Path(__file__).parent / "corpus"
# Tokens the parsers branch on: JSON syntax and escapes, numbers at the edges, protobuf tags and lengths.
TOKENS = [b'"', b"\\", b"{", b"}", b"[", b"]", b":", b",", b"\\u003a", b"\\u0000", b"\\ud800", b"\\\\", b'\\"',
          b"null", b"true", b"false", b"0", b"-1", b"1e400", b"18446744073709551616", b"9" * 30, b"1.5",
          b'"max_tokens":', b'"text_input":', b'"n":', b'"best_of":', b'"content":', b'"type":"text"',
          b'"binary_data_size":', b'"shape":[', b'"data":[', b'"datatype":"BYTES"', b'"INT32"',
          b"\x00", b"\xff", b"\xc3", b"\x80", b"\x0a", b"\x12", b"\x1a", b"\x22", b"\x2a", b"\x3a", b"\x08",
          b"\xff\xff\xff\xff\x0f", b"\x00\x00\x00\x01", b"\x01\x00\x00\x00", b"\x00\x00\x10\x00\x00"]
PER_INPUT_S = 1.0  # longer than this for one input is a hang


def corpus(name: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((CORPUS / name).iterdir()) if p.is_file()]


_VALUES = [0, 1, -1, 7, 2**31, 2**63, 2**64, 1.5, True, False, None, "", "x", "\u0000", "é" * 3, ":", [], {}, [1],
           ["a"], [[1]], [{}], {"type": "text", "text": 42}, {"type": "text", "text": "t"}, {"a": [1, {"b": None}]}]
_KEYS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "n", "best_of", "stream", "content",
         "role", "type", "text", "text_input", "inputs", "name", "datatype", "shape", "data", "parameters",
         "binary_data_size", "chat_template", "chat_template_kwargs", "documents", "suffix", "tools",
         # Responses, Anthropic's Messages, embeddings, tokenize
         "input", "instructions", "max_output_tokens", "previous_response_id", "background", "call_id", "arguments",
         "output", "status", "reasoning", "system", "thinking", "budget_tokens", "input_schema", "tool_use_id",
         "tokens"]


def _nodes(tree: object, out: list[tuple[object, object]]) -> list[tuple[object, object]]:
    """(container, key or index) of every value below `tree`."""
    stack = [tree]
    while stack and len(out) < 500:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            out.append((node, k))
            stack.append(v)
    return out


def mutate_json(data: bytes, rng: random.Random) -> bytes | None:
    """A structural mutation of a JSON body: a value replaced, a key added or dropped, a key repeated,
    then written compact, spaced, or ASCII-escaped. None when the input is not JSON."""
    try:
        tree = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(tree, (dict, list)):
        return None
    places = _nodes(tree, [])
    for _ in range(rng.choice((1, 1, 2, 3))):
        if not places:
            break
        node, key = rng.choice(places)
        op = rng.randrange(4)
        if op == 0:
            node[key] = copy.deepcopy(rng.choice(_VALUES))  # type: ignore[index]
        elif op == 1 and isinstance(node, dict):
            node[rng.choice(_KEYS)] = copy.deepcopy(rng.choice(_VALUES + [node[key]]))
        elif op == 2 and isinstance(node, dict):
            del node[key]
            places = _nodes(tree, [])
        elif op == 3 and isinstance(node, list):
            node.extend([node[key]] * rng.choice((1, 2, 100)))  # type: ignore[index]
    text = json.dumps(tree, ensure_ascii=rng.random() < 0.3,
                      separators=rng.choice(((",", ":"), (", ", ": ")))).encode(errors="surrogatepass")
    if rng.random() < 0.2:  # a key sent twice: as the first key of some object, again
        at = text.find(b'{"', rng.randrange(len(text)))
        end = text.find(b",", at)
        if at >= 0 and end > at:
            text = text[:end] + b"," + text[at + 1:end] + text[end:]
    return text


def mutate(data: bytes, rng: random.Random, pool: list[bytes]) -> bytes:
    if rng.random() < 0.5:
        structured = mutate_json(data, rng)
        if structured is not None:
            return structured
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 5))):
        pos = rng.randrange(len(buf) + 1)
        op = rng.randrange(8)
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op == 2:
            buf[pos:pos] = rng.choice(TOKENS)
        elif op == 3 and buf:
            del buf[pos:pos + rng.randint(1, 16)]
        elif op == 4 and buf:  # duplicate a chunk: repeated keys, repeated fields
            start = rng.randrange(len(buf))
            chunk = buf[start:start + rng.randint(1, 64)]
            buf[pos:pos] = chunk * rng.choice((1, 2, 50))
        elif op == 5:  # splice from another input
            other = rng.choice(pool)
            if other:
                start = rng.randrange(len(other))
                buf[pos:pos] = other[start:start + rng.randint(1, 256)]
        elif op == 6:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 7 and len(buf) > 1:  # cut
            buf = buf[:pos] if rng.random() < 0.5 else buf[pos:]
    return bytes(buf)


def _time(target: Callable[[bytes], str], data: bytes) -> float:
    started = time.perf_counter()
    try:
        target(data)
    except Exception:  # noqa: BLE001 - timed only; the first run recorded what it raised
        pass
    return time.perf_counter() - started


@dataclass
class Report:
    target: str
    inputs: int = 0
    seconds: float = 0.0
    slowest_s: float = 0.0
    kept: int = 0
    crashes: list[tuple[bytes, str]] = field(default_factory=list)
    hangs: list[tuple[bytes, float]] = field(default_factory=list)

    def __str__(self) -> str:
        rate = self.inputs / self.seconds if self.seconds else 0.0
        return (f"{self.target}: {self.inputs} inputs in {self.seconds:.1f} s ({rate:.0f}/s), slowest "
                f"{self.slowest_s * 1000:.1f} ms, {len(self.crashes)} crashes, {len(self.hangs)} hangs, "
                f"{self.kept} inputs kept")


def run(target: Callable[[bytes], str], name: str, seeds: list[bytes], runs: int, seed: int = 0,
        stop_on_crash: bool = False) -> Report:
    rng = random.Random(seed)
    pool = list(seeds) or [b""]
    seen: set[str] = set()
    report = Report(name)
    started = time.perf_counter()
    for i in range(runs):
        data = pool[i] if i < len(seeds) else mutate(rng.choice(pool), rng, pool)
        t0 = time.perf_counter()
        try:
            outcome = target(data)
        except ProtocolError as e:  # a target lets one through only when it is a finding of its own
            outcome = "ProtocolError escaped"
            report.crashes.append((data, f"ProtocolError escaped the target: {e}"))
        except Exception as e:  # noqa: BLE001 - every other exception is a finding
            outcome = f"crash {type(e).__name__}"
            report.crashes.append((data, f"{type(e).__name__}: {e}"))
        took = time.perf_counter() - t0
        if took > PER_INPUT_S:  # a shared machine stalls now and then: slow again, or not a hang
            took = min(took, *(_time(target, data) for _ in range(2)))
        report.slowest_s = max(report.slowest_s, took)
        if took > PER_INPUT_S:
            report.hangs.append((data, took))
        if outcome not in seen or (len(pool) < 2000 and rng.random() < 0.001):
            seen.add(outcome)
            pool.append(data)
            report.kept += 1
        if stop_on_crash and report.crashes:
            break
        report.inputs += 1
    report.seconds = time.perf_counter() - started
    return report
