"""The real Triton (triton_fixture.py) behind a gateway that serves two of its models, `ensemble` and
`tensorrt_llm_bls`, over the one KV pool of `tensorrt_llm` (issue 11), with the engine's own metrics
read as the catalog's defaults read them:

- the metrics page has KV series for two models, the BLS's all zeros: the engine is read, not blind;
- the two names share one budget: any mix of them admits at most the pool.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import pytest

from kvgate.catalog import parse_catalog
from kvgate.cli.gateway import Gateway
from tests.integration.conftest import ledger_metrics, start_gateway, wait_for
from tests.real_engines.triton_fixture import POOL_BLOCKS, TOKENS_PER_BLOCK, TritonEngine

BPT = 1024
NAMES = ("llama", "llama-bls")
# 500 output tokens hold a request ~10 s at the fixture's 20 ms a token; with a prompt of a few tokens,
# 32 blocks: a pool of 64 holds 2 of them at once (each name having the pool's budget: 4).
MAX_TOKENS = 500


@pytest.fixture(scope="module")
def pool_gateway(triton_engine: TritonEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    server = triton_engine.server
    endpoint = {"host": server.host, "port": server.http_port, "grpc_port": server.grpc_port,
                "metrics_port": server.metrics_port}
    catalog = parse_catalog({
        "models": [{"name": name, "protocol": "triton", "backend_model": backend, "endpoints": [endpoint],
                    "tokenizer": str(triton_engine.tokenizer_json), "max_context_tokens": 1024,
                    "max_output_tokens": 512, "tokens_per_block": TOKENS_PER_BLOCK,
                    "kv": {"bytes_per_token": BPT, "budget_per_endpoint": POOL_BLOCKS * TOKENS_PER_BLOCK * BPT},
                    "long_requests": {"max_share": 1.0}}
                   for name, backend in zip(NAMES, ("ensemble", "tensorrt_llm_bls"), strict=True)],
        "priority_classes": [{"name": "now", "max_wait_s": 0}],
    })
    gw = start_gateway(catalog, tmp_path_factory.mktemp("triton-pool-gw"))
    yield gw
    gw.stop()


def _metric(gw: Gateway, name: str) -> dict[str, float]:
    values = ledger_metrics(gw)
    return {m: values.get((name, m), -1.0) for m in NAMES}


def test_the_engines_own_use_is_read_from_the_pools_owner(pool_gateway: Gateway, triton_engine: TritonEngine) -> None:
    """A request sent to Triton around the gateway holds blocks only the engine's metrics can tell:
    they show as excess on both names (one pool), so the page of two models was read."""
    with httpx.Client(base_url=triton_engine.server.http_url, timeout=60) as engine, engine.stream(
            "POST", "/v2/models/ensemble/generate_stream",
            json={"text_input": "around the gateway", "max_tokens": MAX_TOKENS, "stream": True}) as held:
        assert held.status_code == 200
        wait_for(lambda: min(_metric(pool_gateway, "kvgate_kv_engine_excess_bytes").values()) > 0,
                 "the engine's use seen on both names", timeout_s=8)
        excess = _metric(pool_gateway, "kvgate_kv_engine_excess_bytes")
        assert excess["llama"] == excess["llama-bls"]
        assert _metric(pool_gateway, "kvgate_kv_engine_blind") == {"llama": 0.0, "llama-bls": 0.0}
    wait_for(lambda: set(_metric(pool_gateway, "kvgate_kv_engine_excess_bytes").values()) == {0.0},
             "the engine's use gone", timeout_s=30)


def test_both_names_together_admit_at_most_the_pool(pool_gateway: Gateway) -> None:
    wait_for(lambda: set(_metric(pool_gateway, "kvgate_kv_reserved_bytes").values()) == {0.0}, "an empty pool",
             timeout_s=30)
    statuses: list[tuple[str, int]] = []
    with httpx.Client(base_url=pool_gateway.url, timeout=60) as client, ExitStack() as held:
        for i in range(6):
            name = NAMES[i % 2]
            response = held.enter_context(client.stream("POST", f"/v2/models/{name}/generate_stream", json={
                "text_input": f"request {i} of a pool", "max_tokens": MAX_TOKENS, "stream": True}))
            statuses.append((name, response.status_code))
        assert [s for _, s in statuses] == [200, 200, 429, 429, 429, 429], statuses
        reserved = _metric(pool_gateway, "kvgate_kv_reserved_bytes")
        assert reserved["llama"] == reserved["llama-bls"] <= POOL_BLOCKS * TOKENS_PER_BLOCK * BPT
