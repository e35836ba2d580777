"""Per-endpoint budgets through the real Envoy: ext_proc picks the engine with the most KV headroom and
Envoy's override_host policy sends the request there; the engines' own metrics correct the ledgers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kvgate.catalog import parse_catalog
from kvgate.cli.gateway import Gateway
from tests.integration.conftest import ledger_metrics, reserved, start_gateway, wait_for

# Two engines of 64 blocks x 16 tokens x 1 KiB; slow decoding, so streams held open stay on the engine.
CATALOG = {"models": [{
    "name": "pair", "endpoints": ["sim", "sim"], "max_context_tokens": 1024, "max_output_tokens": 512,
    "tokens_per_block": 16, "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "1MiB"},
    "engine_metrics": {"interval_s": 0.2, "stale_after_s": 1.2},
    "long_requests": {"max_share": 1.0},
    "sim": {"ttft_base_ms": 1, "ttft_per_token_ms": 0, "itl_ms": 50, "batch_slowdown": 0}}],
    "priority_classes": [{"name": "interactive", "max_wait_s": 0}]}


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    gw = start_gateway(parse_catalog(CATALOG), tmp_path)
    yield gw
    gw.stop()


def engine_url(gw: Gateway, i: int) -> str:
    addr = gw.sims["pair"][i]
    return f"http://{addr.host}:{addr.port}"


def received(gw: Gateway, i: int) -> list[str]:
    """Prompts engine i received."""
    return [r["body"]["prompt"] for r in httpx.get(f"{engine_url(gw, i)}/sim/requests").json()]


def hold(http: httpx.Client, url: str, prompt: str, max_tokens: int) -> httpx.Response:
    """A streamed completion left unread: it holds its reservation (and its engine's blocks)."""
    resp = http.send(http.build_request("POST", f"{url}/v1/completions", json={
        "model": "pair", "prompt": prompt, "max_tokens": max_tokens, "stream": True}), stream=True)
    assert resp.status_code == 200
    return resp


def test_requests_go_to_the_engine_with_the_most_headroom_not_the_fewest_requests(gateway: Gateway) -> None:
    with httpx.Client(timeout=30) as http:
        # big: 8 + 8 + 500 tokens = 33 blocks on engine 0 (both empty: the first in catalog order).
        held = [hold(http, gateway.url, "big", 500)]
        wait_for(lambda: "big" in received(gateway, 0), what="big on engine 0")
        # Two small ones (1 block each) go to engine 1, which has more room; it now runs two requests.
        held += [hold(http, gateway.url, f"small-{i}", 1) for i in range(2)]
        wait_for(lambda: {"small-0", "small-1"} <= set(received(gateway, 1)), what="the small ones on engine 1")
        # Least-request alone would pick engine 0 (one request against two); KV headroom picks engine 1.
        probe = http.post(f"{gateway.url}/v1/completions", json={"model": "pair", "prompt": "probe", "max_tokens": 1})
        assert probe.status_code == 200
        assert "probe" in received(gateway, 1) and "probe" not in received(gateway, 0)
        for r in held:
            r.close()
    wait_for(lambda: reserved(gateway, "pair") == 0, what="every reservation released")


def test_engine_use_the_ledger_does_not_explain_counts_against_the_budget(gateway: Gateway) -> None:
    with httpx.Client(timeout=30) as http:
        # Another client of engine 0, behind the gateway's back: 40 of its 64 blocks.
        direct = http.send(http.build_request("POST", f"{engine_url(gateway, 0)}/v1/completions", json={
            "model": "pair", "prompt": "x", "max_tokens": 630, "stream": True}), stream=True)
        wait_for(lambda: ledger_metrics(gateway).get(("kvgate_kv_engine_excess_bytes", "pair"), 0) >= 40 * 16 * 1024,
                 what="the excess to be seen")
        # 33 blocks fit engine 1 only; a second such request fits nowhere (engine 0 has 24 blocks free).
        first = hold(http, gateway.url, "first", 500)
        wait_for(lambda: "first" in received(gateway, 1), what="first on engine 1")
        second = http.post(f"{gateway.url}/v1/completions", json={"model": "pair", "prompt": "second", "max_tokens": 500})
        assert second.status_code == 429
        direct.close()
        first.close()
    wait_for(lambda: ledger_metrics(gateway).get(("kvgate_kv_engine_excess_bytes", "pair"), 0) == 0,
             what="the excess to go once the engine frees it")


def test_an_engine_whose_metrics_go_stale_counts_as_full(gateway: Gateway) -> None:
    (engine_1,) = [c for c in gateway.supervisor.children if c.name == "sim-pair-1"]
    engine_1.proc.kill()
    wait_for(lambda: ledger_metrics(gateway).get(("kvgate_kv_engine_blind", "pair")) == 1, what="engine 1 blind",
             timeout_s=5)
    with httpx.Client(timeout=30) as http:
        for i in range(3):  # all to engine 0, never to the dead one (which would be a 503)
            resp = http.post(f"{gateway.url}/v1/completions", json={"model": "pair", "prompt": f"p{i}", "max_tokens": 1})
            assert resp.status_code == 200
    assert {"p0", "p1", "p2"} <= set(received(gateway, 0))
