"""A real Triton (engines/real/triton.py) serving the TensorRT-LLM-shaped repository, once per test session:
`triton_engine` with decoupled (streaming) models, `triton_unary_engine` with models that are not
decoupled (Triton's unary infer works for those). Both count prompt tokens with the tiny tokenizer.

tests/real_engines/conftest.py offers both to every test module there. Setup on a fresh machine: install ~15 s (a no-op afterwards), start ~2.5 s.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from engines.real.tiny_tokenizer import write_tokenizer
from engines.real.triton import TritonServer, install, read_records, write_repository

POOL_BLOCKS = 64
TOKENS_PER_BLOCK = 16
INTER_TOKEN_MS = 20.0
MAX_BATCH = 8


@dataclass(frozen=True)
class TritonEngine:
    server: TritonServer
    tokenizer_json: Path
    record_dir: Path

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.record_dir)


def _serve(base: Path, decoupled: bool) -> Iterator[TritonEngine]:
    tokenizer = write_tokenizer(base)
    records = base / "records"
    repository = write_repository(base / "models", POOL_BLOCKS, TOKENS_PER_BLOCK, inter_token_ms=INTER_TOKEN_MS,
                                  max_batch=MAX_BATCH, decoupled=decoupled, tokenizer_json=tokenizer,
                                  record_dir=records)
    server = TritonServer(install(), repository, base / "logs")
    server.start()
    try:
        yield TritonEngine(server, tokenizer, records)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def triton_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonEngine]:
    yield from _serve(tmp_path_factory.mktemp("triton"), decoupled=True)


@pytest.fixture(scope="session")
def triton_unary_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonEngine]:
    yield from _serve(tmp_path_factory.mktemp("triton-unary"), decoupled=False)
