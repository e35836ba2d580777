from __future__ import annotations

import argparse
import random

import pytest

from engines.sim.config import SimConfig, add_arguments, from_args
from engines.sim.kv_cache import PagedKVCache
from engines.sim.latency import LatencyModel
from engines.sim.text import (
    CHAT_TOKENS_PER_MESSAGE,
    VOCAB,
    StopScanner,
    count_chat_tokens,
    count_prompt_tokens,
    generate_words,
)


def test_blocks_for_rounds_up() -> None:
    kv = PagedKVCache(10, 32)
    assert [kv.blocks_for(t) for t in (0, 1, 32, 33, 64, 65)] == [0, 1, 1, 2, 2, 3]


def test_allocate_and_free_track_usage() -> None:
    kv = PagedKVCache(4, 8)
    assert kv.try_allocate("a", 17)  # 3 blocks
    assert (kv.used_blocks, kv.free_blocks, kv.utilization) == (3, 1, 0.75)
    assert not kv.try_allocate("b", 9)  # needs 2, only 1 free: nothing is taken
    assert kv.used_blocks == 3
    assert kv.try_allocate("c", 8)
    assert kv.free_blocks == 0
    assert kv.free("a") == 3
    assert kv.free("a") == 0  # double free is harmless
    assert kv.used_blocks == 1


def test_allocate_twice_for_one_request_is_an_error() -> None:
    kv = PagedKVCache(4, 8)
    kv.try_allocate("a", 1)
    with pytest.raises(ValueError):
        kv.try_allocate("a", 1)


def test_latency_model() -> None:
    model = LatencyModel(ttft_base_ms=10, ttft_per_token_ms=0.5, itl_ms=20, batch_slowdown=0.1)
    assert model.ttft(100) == pytest.approx(0.060)
    assert model.itl(1) == pytest.approx(0.020)
    assert model.itl(5) == pytest.approx(0.020 * 1.4)
    assert model.itl(0) == model.itl(1)


def test_words_are_deterministic_per_seed_and_key() -> None:
    def take(seed: int, key: str) -> list[str]:
        words = generate_words(seed, key)
        return [next(words) for _ in range(40)]

    assert take(0, "prompt") == take(0, "prompt")
    assert take(0, "prompt") != take(1, "prompt")
    assert take(0, "prompt") != take(0, "other prompt")
    assert set(take(3, "x")) <= set(VOCAB)
    assert 25 <= len(VOCAB) <= 35


def test_prompt_token_count_is_below_byte_bound() -> None:
    text = "Hello, world! KV-cache blocks are 32 tokens."
    assert count_prompt_tokens(text) == 12
    assert count_prompt_tokens(text) < len(text.encode())
    assert count_prompt_tokens("") == 0
    assert count_chat_tokens(["Hello, world!", "hi"]) == 4 + 1 + 2 * CHAT_TOKENS_PER_MESSAGE


def test_stop_spanning_pieces_is_never_released() -> None:
    scanner = StopScanner(["cat sat"])
    released = []
    for piece in ("the", " cat", " sat", " down"):
        text, stopped = scanner.feed(piece)
        released.append(text)
        if stopped:
            break
    assert stopped
    assert "".join(released) == "the "
    assert "cat" not in "".join(released)


def test_stop_scanner_matches_truncating_the_whole_text() -> None:
    rng = random.Random(7)
    for _ in range(300):
        words = [rng.choice(VOCAB[:6]) for _ in range(12)]
        stops = [
            " ".join(rng.sample(VOCAB[:6], rng.randint(1, 2))) for _ in range(rng.randint(0, 2))
        ]
        full = " ".join(words)
        hits = [i for i in (full.find(s) for s in stops) if i >= 0]
        scanner = StopScanner(stops)
        out, stopped = "", False
        for i, word in enumerate(words):
            text, stopped = scanner.feed(word if i == 0 else " " + word)
            out += text
            if stopped:
                break
        else:
            out += scanner.flush()
        assert stopped == bool(hits)
        assert out == (full[: min(hits)] if hits else full)


def test_config_from_cli_args_and_validation() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = from_args(
        parser.parse_args(["--kv-blocks", "7", "--on-full", "fail", "--itl-ms", "2.5"])
    )
    assert (config.kv_blocks, config.on_full, config.itl_ms, config.tokens_per_block) == (
        7,
        "fail",
        2.5,
        32,
    )
    fast = SimConfig.zero_latency(kv_blocks=3)
    assert (fast.ttft_base_ms, fast.ttft_per_token_ms, fast.itl_ms, fast.kv_blocks) == (0, 0, 0, 3)
    with pytest.raises(ValueError):
        SimConfig(on_full="drop")
    with pytest.raises(ValueError):
        SimConfig(kv_blocks=0)


def test_protocol_flags() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert from_args(parser.parse_args([])).protocol == "openai"
    assert from_args(parser.parse_args([])).grpc_port is None
    triton = from_args(parser.parse_args(["--protocol", "triton", "--grpc-port", "9001"]))
    assert (triton.protocol, triton.grpc_port) == ("triton", 9001)
    with pytest.raises(ValueError, match="--grpc-port is required"):
        from_args(parser.parse_args(["--protocol", "triton"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--protocol", "kserve"])
    with pytest.raises(ValueError):
        SimConfig(grpc_port=70000)
