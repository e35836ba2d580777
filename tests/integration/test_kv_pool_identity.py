"""Two catalog names on one engine share its KV pool, through the real Envoy and ext_proc (issue 11:
an ensemble and a BLS, or two aliases, each got the whole budget: 1.97x the pool admitted at once).

`alpha` is served by a simulated engine of 64 blocks; `beta` and `gamma` are added on that same engine
through the admin API. Requests of 9 blocks each, by every mix of names, are held open (streams whose
headers came back) until all have been answered: 7 fit, never more.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import pytest
import yaml

from kvgate.catalog import parse_catalog
from kvgate.cli import admin_client
from kvgate.cli.gateway import Gateway
from tests.integration.conftest import ledger_metrics, start_gateway, wait_for

BLOCK, BPT, POOL_BLOCKS = 16, 1024, 64
ALPHA = {"name": "alpha", "endpoints": ["sim"], "max_context_tokens": 512, "max_output_tokens": 200,
         "tokens_per_block": BLOCK, "kv": {"bytes_per_token": BPT, "budget_per_endpoint": POOL_BLOCKS * BLOCK * BPT},
         "long_requests": {"max_share": 1.0},  # every request here is "long" (9 of 64 blocks): no cap
         # Slow enough that nothing finishes while the test holds it (200 tokens x 100 ms).
         "sim": {"ttft_base_ms": 0, "ttft_per_token_ms": 0, "itl_ms": 100, "batch_slowdown": 0}}
# "hi" is bounded at 2 + 8 tokens without a tokenizer; with 134 output tokens: 144 tokens, 9 blocks.
MAX_TOKENS = 134
FITTING = POOL_BLOCKS // 9


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(parse_catalog({"models": [ALPHA], "priority_classes": [{"name": "now", "max_wait_s": 0}]}),
                       tmp_path_factory.mktemp("pools"))
    try:
        engine = str(gw.sims["alpha"][0])
        aliases = [{k: v for k, v in ALPHA.items() if k != "sim"} | {"name": name, "backend_model": "alpha",
                                                                      "endpoints": [engine]}
                   for name in ("beta", "gamma")]
        admin_client.apply_models(gw.admin_address, yaml.safe_dump(aliases))
        wait_for(lambda: all(_complete(gw, n).status_code == 200 for n in ("beta", "gamma")), "the aliases served",
                 timeout_s=30)
        yield gw
    finally:
        gw.stop()


def _complete(gw: Gateway, model: str) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1}, timeout=30)


def _pool_bytes(gw: Gateway, metric: str) -> dict[str, float]:
    return {m: ledger_metrics(gw).get((metric, m), 0.0) for m in ("alpha", "beta", "gamma")}


@pytest.mark.parametrize("names", [("alpha", "beta"), ("beta", "gamma", "alpha"), ("gamma",)])
def test_any_mix_of_names_admits_at_most_the_pool(gateway: Gateway, names: tuple[str, ...]) -> None:
    wait_for(lambda: set(_pool_bytes(gateway, "kvgate_kv_reserved_bytes").values()) == {0.0}, "an empty pool")
    statuses: list[tuple[str, int]] = []
    with httpx.Client(base_url=gateway.url, timeout=30) as client, ExitStack() as held:
        for i in range(2 * FITTING + 4):
            name = names[i % len(names)]
            response = held.enter_context(client.stream("POST", "/v1/completions", json={
                "model": name, "prompt": "hi", "max_tokens": MAX_TOKENS, "stream": True}))
            statuses.append((name, response.status_code))
        admitted = [name for name, status in statuses if status == 200]
        assert len(admitted) == FITTING, statuses
        assert {status for _, status in statuses} == {200, 429}
        assert set(admitted) == set(names)  # the budget went to every name, in arrival order
        # Every name's ledger is the pool's: the same bytes whichever name is asked.
        reserved = _pool_bytes(gateway, "kvgate_kv_reserved_bytes")
        assert set(reserved.values()) == {FITTING * 9 * BLOCK * BPT}
    # The streams closed: their reservations go back, whichever name they were taken by.
    wait_for(lambda: set(_pool_bytes(gateway, "kvgate_kv_reserved_bytes").values()) == {0.0}, "the pool released",
             timeout_s=30)
