"""KV pool identity (issue 11): one budget per engine KV pool, whatever names the catalog gives it.

From the catalog (which models share a pool, and what they must agree on) through the ModelPolicy to
ext_proc's state, where any mix of names admits at most the pool, and to the reconciler, which sets
the engine's use against the whole pool.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from ext_proc.admission import Plan, admit
from ext_proc.engine_metrics import EngineLoad
from ext_proc.ledger import Ledgers, Reservation
from ext_proc.policy import Policy
from ext_proc.reconcile import Reconciler, scraped_pools
from ext_proc.scraper import Sample, Target
from ext_proc.state import AdmissionState
from kvgate.catalog import Catalog, CatalogError, parse_catalog
from tests.unit.test_reconcile import FixedScraper
from xds_server.render.policies import model_policy

TRITON = {"host": "10.0.0.6", "port": 8000, "grpc_port": 8001}
BLOCK, BPT, POOL_BLOCKS = 16, 1024, 64
BUDGET = POOL_BLOCKS * BLOCK * BPT


def triton(name: str, backend: str, **overrides: Any) -> dict[str, Any]:
    return {"name": name, "protocol": "triton", "backend_model": backend, "endpoints": [TRITON],
            "max_context_tokens": 256, "max_output_tokens": 128, "tokens_per_block": BLOCK,
            "kv": {"bytes_per_token": BPT, "budget_per_endpoint": BUDGET}, **overrides}


# The deployment: an ensemble and a BLS over one TensorRT-LLM engine, and an alias.
SHARED = [triton("llama", "ensemble"), triton("llama-bls", "tensorrt_llm_bls"), triton("llama-alias", "ensemble")]


def policies(catalog: Catalog) -> list[Policy]:
    return [Policy.from_proto(model_policy(m, catalog)) for m in catalog.models]


def problem(models: list[dict[str, Any]]) -> str:
    with pytest.raises(CatalogError) as e:
        parse_catalog({"models": models})
    assert len(e.value.problems) == 1
    return e.value.problems[0]


# --- the catalog ----------------------------------------------------------------------------------

def test_models_at_one_address_share_its_pool_without_saying_so() -> None:
    ps = policies(parse_catalog({"models": SHARED}))
    assert {e.pool for p in ps for e in p.endpoints} == {"10.0.0.6:8000"}


def test_named_pools_at_one_address_are_separate() -> None:
    """A Triton serving two TensorRT-LLM engines: two pools, each read from its own engine model."""
    cat = parse_catalog({"models": [
        triton("llama", "ensemble", kv={"bytes_per_token": BPT, "budget_per_endpoint": BUDGET, "pool": "llama"},
               engine_metrics={"model": "tensorrt_llm"}),
        triton("mistral", "mistral_ensemble", kv={"bytes_per_token": 2048, "budget_per_endpoint": BUDGET * 2,
                                                  "pool": "mistral"}, engine_metrics={"model": "mistral_trtllm"})]})
    ps = policies(cat)
    assert [(p.endpoints[0].pool, p.metrics_model) for p in ps] == [
        ("10.0.0.6:8000/llama", "tensorrt_llm"), ("10.0.0.6:8000/mistral", "mistral_trtllm")]
    assert cat.to_data()["models"][0]["kv"]["pool"] == "llama"  # round-trips


@pytest.mark.parametrize(("change", "named"), [
    ({"kv": {"bytes_per_token": BPT, "budget_per_endpoint": BUDGET // 2}}, "KV budget"),
    ({"kv": {"bytes_per_token": 2 * BPT, "budget_per_endpoint": BUDGET}}, "KV bytes per token"),
    ({"tokens_per_block": 32}, "tokens_per_block"),
    ({"engine_metrics": {"interval_s": 2, "stale_after_s": 5}}, "engine_metrics"),
    ({"engine_metrics": {"model": "tensorrt_llm_bls"}}, "engine_metrics"),
    ({"endpoints": [{**TRITON, "metrics_port": 9002}]}, "metrics URL"),
])
def test_models_sharing_a_pool_must_agree_on_it(change: dict[str, Any], named: str) -> None:
    message = problem([SHARED[0], {**SHARED[1], **change}])
    assert "models 'llama' and 'llama-bls' share the KV pool at 10.0.0.6:8000 but differ in " + named in message


def test_an_unnamed_pool_beside_named_ones_is_refused_naming_both_models() -> None:
    message = problem([triton("llama", "ensemble", kv={"bytes_per_token": BPT, "budget_per_endpoint": BUDGET,
                                                       "pool": "llama"}, engine_metrics={"model": "tensorrt_llm"}),
                       SHARED[1]])
    assert "models 'llama' and 'llama-bls' are served at 10.0.0.6:8000; 'llama' names KV pool 'llama'" in message


def test_separate_pools_at_one_address_need_separate_metrics() -> None:
    def named(name: str, pool: str, metrics: dict[str, Any]) -> dict[str, Any]:
        return triton(name, name, kv={"bytes_per_token": BPT, "budget_per_endpoint": BUDGET, "pool": pool},
                      engine_metrics=metrics)
    assert "engine_metrics.model must say whose metrics describe pool 'b'" in problem(
        [named("a", "a", {"model": "trt_a"}), named("b", "b", {})])
    assert "models 'a' and 'b' read engine model 'trt' at 10.0.0.6:8000 for different KV pools" in problem(
        [named("a", "a", {"model": "trt"}), named("b", "b", {"model": "trt"})])
    parse_catalog({"models": [named("a", "a", {"model": "trt_a"}), named("b", "b", {"scrape": False})]})


def test_engine_metrics_model_is_for_triton_only() -> None:
    with pytest.raises(CatalogError, match="engine_metrics.model is for triton models only"):
        parse_catalog({"models": [{"name": "m", "endpoints": ["10.0.0.1:8000"], "max_context_tokens": 256,
                                   "max_output_tokens": 16, "kv": {"bytes_per_token": 1, "budget_per_endpoint": 4096},
                                   "engine_metrics": {"model": "x"}}]})


# --- ext_proc's state -----------------------------------------------------------------------------

def state_of(models: list[dict[str, Any]]) -> AdmissionState:
    state = AdmissionState(Ledgers())
    state.replace(policies(parse_catalog({"models": models})))
    return state


@pytest.mark.parametrize("names", [("llama",), ("llama", "llama-bls"), ("llama-bls", "llama-alias", "llama"),
                                   ("llama-alias", "llama-alias", "llama-bls")])
def test_any_mix_of_names_admits_at_most_the_pool(names: tuple[str, ...]) -> None:
    """The issue's 1.97x: 9-block requests by two names filled 64 blocks twice over."""
    state = state_of(SHARED)
    one = Plan(max_tokens=128, prompt_tokens=16, nbytes=9 * BLOCK * BPT, long=False, tokens=144)
    admitted = []
    for name in itertools.islice(itertools.cycle(names), 40):
        held = admit(one, state.policies[name], state.current_ledgers(name), 0.0, 900.0)
        if held is not None:
            assert isinstance(held, Reservation), held
            admitted.append(held)
    assert len(admitted) == POOL_BLOCKS // 9  # 7, whichever names
    assert sum(r.nbytes for r in admitted) <= BUDGET
    assert {r.ledger.model for r in admitted} == set(names)  # each still counted under its own name


def test_budget_freed_by_one_name_wakes_the_others_waiters() -> None:
    state = state_of(SHARED)
    ledger = state.current_ledgers("llama")[0]
    held = ledger.try_reserve(BUDGET, 0.0, 900.0)
    assert held is not None
    woken: list[str] = []
    for name in ("llama-bls", "llama-alias"):
        state.queues[name].wake = lambda headroom=None, name=name: woken.append(name)  # type: ignore[method-assign]
    ledger.release(held, 1.0)
    state.wake("llama")
    assert woken == ["llama-alias", "llama-bls"]


def test_a_model_removed_from_a_shared_pool_leaves_the_others_their_budget() -> None:
    state = state_of(SHARED)
    held = state.current_ledgers("llama-bls")[0].try_reserve(BUDGET // 2, 0.0, 900.0)
    state.replace(policies(parse_catalog({"models": [SHARED[0]]})))
    assert state.headroom("llama") == BUDGET // 2  # the removed name's request is still on the engine
    assert held is not None and held.ledger.release(held, 1.0)
    assert state.headroom("llama") == BUDGET


# --- the reconciler -------------------------------------------------------------------------------

def test_one_pool_is_scraped_once_for_all_its_names_with_the_model_whose_series_count() -> None:
    ps = policies(parse_catalog({"models": [
        {**m, "engine_metrics": {"model": "tensorrt_llm"}} for m in SHARED]}))
    [pool] = scraped_pools(ps)
    assert (pool.key, pool.models) == ("10.0.0.6:8000", ("llama", "llama-bls", "llama-alias"))
    assert pool.target == Target("http://10.0.0.6:8002/metrics", "tensorrt_llm")


def test_the_engines_use_is_set_against_every_name_on_the_pool() -> None:
    """The third name of the issue counted the others' use as its own "excess": no name has any now."""
    state = state_of(SHARED)
    scraper = FixedScraper()
    rec = Reconciler(state, scraper, clock=lambda: 100.0)
    for name in ("llama", "llama-bls"):
        assert state.current_ledgers(name)[0].try_reserve(20 * BLOCK * BPT, 99.0, 900.0) is not None
    scraper.samples["10.0.0.6:8000"] = Sample(EngineLoad(kv_used_fraction=42 / 64, kv_used_blocks=42,
                                                         kv_max_blocks=64, tokens_per_block=BLOCK, running=2,
                                                         waiting=0), taken_at=99.5)
    rec.step()
    alias = state.current_ledgers("llama-alias")[0]
    assert (alias.excess, alias.reserved, alias.headroom) == (2 * BLOCK * BPT, 40 * BLOCK * BPT, 22 * BLOCK * BPT)
