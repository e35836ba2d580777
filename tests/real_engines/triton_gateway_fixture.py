"""A whole gateway in front of the real Triton (triton_fixture.py, decoupled models), once per test
session: the `ensemble` and `tensorrt_llm_bls` models over the engine's gRPC and HTTP ports, its budget the engine's whole KV
pool. The engine's own KV metrics are not scraped: this gateway tests the request path (the ledger is
then what admission alone reserved, which is what the tests read).

tests/real_engines/conftest.py offers it to every test module there.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvgate.catalog import parse_catalog
from kvgate.cli.gateway import Gateway
from tests.integration.conftest import start_gateway
from tests.real_engines.triton_fixture import POOL_BLOCKS, TOKENS_PER_BLOCK, TritonEngine

MODEL = "ensemble"
BLS = "tensorrt_llm_bls"  # the same engine's pool, through TensorRT-LLM's other front model
KV_BYTES_PER_TOKEN = 1024
BUDGET = POOL_BLOCKS * TOKENS_PER_BLOCK * KV_BYTES_PER_TOKEN


@pytest.fixture(scope="session")
def triton_gateway(triton_engine: TritonEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    server = triton_engine.server
    catalog = parse_catalog({
        "models": [{"name": name, "protocol": "triton", "tokenizer": str(triton_engine.tokenizer_json),
                    "endpoints": [{"host": server.host, "port": server.http_port, "grpc_port": server.grpc_port}],
                    "max_context_tokens": 256, "max_output_tokens": 128, "tokens_per_block": TOKENS_PER_BLOCK,
                    "kv": {"bytes_per_token": KV_BYTES_PER_TOKEN, "budget_per_endpoint": BUDGET},
                    "engine_metrics": {"scrape": False}} for name in (MODEL, BLS)],
        "priority_classes": [{"name": "interactive", "max_wait_s": 0}],
    })
    gw = start_gateway(catalog, tmp_path_factory.mktemp("triton-gw"))
    yield gw
    gw.stop()
