"""The simulated vLLM (engines/sim's vLLM flavor) against the real vLLM, through the same gateway: the
same requests must give the same usage, the same admission decisions and reservations, and the same
cache read from the engine. (The floods, on both, are in test_vllm_gateway.py.) Where the two are
known to differ, and why it does not matter here, is in docs/benchmarks.md, "Simulator and vLLM side
by side"."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from kvgate.cli.gateway import Gateway
from tests.integration.conftest import ledger_metrics, wait_for
from tests.real_engines.test_vllm_gateway import CHATS, IGNORE_EOS, decision
from tests.real_engines.vllm_fixture import SETUP_TIMEOUT_S
from tests.real_engines.vllm_gateway_fixture import MODEL, SIM_MODEL

pytestmark = pytest.mark.timeout(SETUP_TIMEOUT_S)

SEQUENCE: list[tuple[str, dict[str, Any]]] = [
    *(("/v1/chat/completions", {"messages": messages, "max_tokens": 3}) for messages in CHATS.values()),
    ("/v1/chat/completions", {"messages": CHATS["system and user"]}),  # the clamp's default
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 40}], "max_tokens": 5000}),
    ("/v1/completions", {"prompt": "Admission by the KV-cache bytes a request can claim.", "max_tokens": 4}),
    ("/v1/completions", {"prompt": "x " * 600, "max_tokens": 4}),  # longer than the context: refused
]


def send(gw: Gateway, path: str, body: dict[str, Any], model: str) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """Status, usage, and ext_proc's decision (from the access log)."""
    reply = httpx.post(gw.url + path, json={**body, "model": model, **IGNORE_EOS}, timeout=120)
    if reply.status_code != 200:
        return reply.status_code, {}, {"refused": reply.json()["error"]["code"]}
    usage = reply.json()["usage"]
    d = decision(gw, reply.json()["id"])
    return 200, {k: usage[k] for k in ("prompt_tokens", "completion_tokens")}, {
        k: d[k] for k in ("prompt_tokens", "max_tokens", "reserved_bytes")}


@pytest.mark.parametrize(("path", "body"), SEQUENCE, ids=[f"{i}" for i in range(len(SEQUENCE))])
def test_usage_and_admission_agree(vllm_gateway: Gateway, path: str, body: dict[str, Any]) -> None:
    real, sim = send(vllm_gateway, path, body, MODEL), send(vllm_gateway, path, body, SIM_MODEL)
    assert real == sim
    status, usage, decided = real
    if status == 200:  # and ext_proc counted what both engines counted
        assert usage["prompt_tokens"] == decided["prompt_tokens"]
        assert usage["completion_tokens"] == decided["max_tokens"]


def test_both_engines_report_the_same_cache(vllm_gateway: Gateway) -> None:
    """Each publishes vllm:cache_config_info; ext_proc holds the 31 usable blocks of the 32 for both."""
    budgets = lambda: [ledger_metrics(vllm_gateway)[("kvgate_kv_budget_bytes", m)] for m in (MODEL, SIM_MODEL)]  # noqa: E731
    wait_for(lambda: len(set(budgets())) == 1 and budgets()[0] < vllm_gateway.catalog.models[0].kv_budget_bytes,
             "both budgets read from the engines")
