"""The prefix index: chained block hashes of prompts, per endpoint, with LRU aging and a bound."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ext_proc import apis, decision
from ext_proc.decision import Admit, Expect, Found, Planned
from ext_proc.ledger import Ledgers
from ext_proc.openai_protocol import CHAT_PATH, parse_request
from ext_proc.policy import EndpointPolicy, Policy
from ext_proc.prefix_index import CHARS_PER_TOKEN, PrefixIndex, PromptBlocks, block_tokens, prompt_blocks
from ext_proc.state import AdmissionState
from kvgate.catalog import CatalogError, parse_catalog
from tests.unit.test_catalog import catalog_dict, model_dict
from xds_server.render.policies import model_policy

TPB = 16  # vLLM's block: index blocks of 64 tokens, 256 characters
SIZE = block_tokens(TPB) * CHARS_PER_TOKEN
SYSTEM = "s" * (3 * SIZE)  # three whole blocks


def blocks(*pieces: str) -> PromptBlocks:
    return prompt_blocks(pieces, TPB)


def test_index_blocks_are_whole_engine_blocks_of_at_least_64_tokens() -> None:
    assert (block_tokens(16), block_tokens(32), block_tokens(48), block_tokens(128)) == (64, 64, 96, 128)


def test_only_whole_blocks_are_hashed_and_chained() -> None:
    b = blocks("x" * (2 * SIZE + SIZE // 2))
    assert len(b.hashes) == 2 and b.chars == 2 * SIZE + SIZE // 2
    # Chained: the same second block after a different first one is another block.
    assert blocks("a" * SIZE + "x" * SIZE).hashes[1] != blocks("b" * SIZE + "x" * SIZE).hashes[1]
    assert blocks("x" * (SIZE - 1)).hashes == ()


def test_pieces_are_kept_apart() -> None:
    assert blocks("a" * SIZE, "b" * SIZE).hashes != blocks("a" * (SIZE + 1), "b" * (SIZE - 1)).hashes


def test_expected_hit_is_the_leading_blocks_routed_to_that_endpoint() -> None:
    index = PrefixIndex()
    first = blocks(SYSTEM, "question one " * 100)
    index.record("m", "a:1", first, 1000)
    again = blocks(SYSTEM, "question two " * 100)  # shares the system prompt's three blocks, then differs
    assert index.cached("m", "a:1", again) == 3
    assert index.cached("m", "b:1", again) == 0
    assert index.cached("other-model", "a:1", again) == 0
    assert index.cached("m", "a:1", first) == len(first.hashes)
    hits = index.expected_hits("m", ["a:1", "b:1"], again)
    assert hits.keys() == {"a:1"} and hits["a:1"] == pytest.approx(3 * SIZE / again.chars)


def test_a_block_without_its_prefix_is_no_hit() -> None:
    index = PrefixIndex()
    index.record("m", "a:1", blocks("a" * SIZE + "x" * SIZE), 1)
    assert index.cached("m", "a:1", blocks("b" * SIZE + "x" * SIZE)) == 0


def test_the_bound_evicts_the_least_recently_routed_and_keeps_whole_prefixes() -> None:
    index = PrefixIndex(max_entries=6)
    old = blocks("o" * (4 * SIZE))
    index.record("m", "a:1", old, 1)
    hot = blocks("h" * (4 * SIZE))
    index.record("m", "a:1", hot, 1)
    assert len(index) == 6
    # The old prompt lost its two trailing blocks (recorded first), not its leading ones.
    assert index.cached("m", "a:1", old) == 2
    assert index.cached("m", "a:1", hot) == 4
    # Routing the old prompt's prefix again refreshes it: now the hot one ages out from its tail.
    index.record("m", "a:1", blocks("o" * (2 * SIZE)), 1)
    index.record("m", "a:1", blocks("n" * (2 * SIZE)), 1)
    assert (index.cached("m", "a:1", old), index.cached("m", "a:1", hot)) == (2, 2)
    assert len(index) == 6


def test_a_lookup_does_not_refresh() -> None:
    index = PrefixIndex(max_entries=2)
    first = blocks("f" * (2 * SIZE))
    index.record("m", "a:1", first, 1)
    assert index.cached("m", "a:1", first) == 2
    index.record("m", "a:1", blocks("g" * SIZE), 1)
    assert index.cached("m", "a:1", first) == 1


def test_the_bound_must_hold_something() -> None:
    with pytest.raises(ValueError):
        PrefixIndex(max_entries=0)


def chat_body(user: str) -> bytes:
    return orjson.dumps({"model": "m", "max_tokens": 10,
                         "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]})


def test_a_chat_shares_its_system_prompt_with_the_next_users_chat() -> None:
    def chat(user: str) -> PromptBlocks:
        return prompt_blocks(parse_request(CHAT_PATH, chat_body(user)).request.prompts[0], TPB)

    index = PrefixIndex()
    index.record("m", "a:1", chat("hello " * 200), 1)
    assert index.cached("m", "a:1", chat("something else " * 100)) == 3


def test_the_decision_routes_a_shared_prefix_where_it_went_before() -> None:
    """Through decision.plan and first_try: a chat follows an earlier one's system prompt, though the
    other endpoint has a little more headroom; without the index it would not."""
    endpoints = tuple(EndpointPolicy(a, 10**7, "", "") for a in ("a:1", "b:1"))
    policy = Policy(name="m", protocol="openai", backend_model="m", max_context_tokens=10**5, max_output_tokens=100,
                    kv_bytes_per_token=10, tokens_per_block=TPB, endpoints=endpoints, estimate_bytes_per_token=4.0,
                    estimate_per_message=0, estimate_per_request=0)
    table = AdmissionState(Ledgers())
    table.tenants.replace([])
    table.replace([policy])
    call = apis.match(CHAT_PATH, "application/json")
    assert call is not None
    index = PrefixIndex()

    def route(user: str, prefixes: PrefixIndex | None) -> str:
        found = decision.parse(table, Expect(call, None), {}, chat_body(user))
        assert isinstance(found, Found)
        planned = decision.plan(table, found, None, {})
        assert isinstance(planned, Planned) and planned.prefix.hashes
        admitted = decision.first_try(table, planned, 0, 0.0, 900.0, grpc=False, prefixes=prefixes)
        assert isinstance(admitted, Admit)
        if prefixes is not None:
            prefixes.record("m", admitted.reservation.ledger.endpoint, planned.prefix, planned.plan.prompt_tokens_total)
        return admitted.reservation.ledger.endpoint

    assert route("first user " * 50, index) == "a:1"
    # On headroom alone: the emptier one, then (equal) the first in the catalog.
    assert [route("second user " * 50, None), route("third user " * 50, None)] == ["b:1", "a:1"]
    # a:1 now holds two reservations and b:1 one, but a:1 has the system prompt.
    assert route("fourth user " * 50, index) == "a:1"


def test_the_expected_hit_tokens_are_a_counter_per_endpoint() -> None:
    index = PrefixIndex()
    prompt = blocks("p" * (4 * SIZE))
    index.record("m", "a:1", prompt, 1000)  # nothing there yet: no hit
    index.record("m", "a:1", prompt, 1000)  # all of it there
    index.record("m", "a:1", blocks(""), 1000)  # no whole block: not counted
    registry = CollectorRegistry()
    registry.register(index)
    text = generate_latest(registry).decode()
    assert 'kvgate_prefix_expected_hit_tokens_total{endpoint="a:1",model="m"} 1000.0' in text


def test_the_catalog_routing_switch_reaches_the_decision(tmp_path: Path) -> None:
    """`routing` in the catalog, through the ModelPolicy, to a plan with (prefix) or without (headroom)
    block hashes; anything else is refused by the catalog."""
    def planned_blocks(routing: str | None) -> PromptBlocks:
        fields = {"endpoints": [{"host": "127.0.0.1", "port": p} for p in (9001, 9002)]}
        cat = parse_catalog(catalog_dict(model_dict(**fields, **({"routing": routing} if routing else {}))),
                            base_dir=tmp_path)
        policy = dataclasses.replace(Policy.from_proto(model_policy(cat.models[0], cat)), name="m")
        table = AdmissionState(Ledgers())
        table.tenants.replace([])
        table.replace([policy])
        call = apis.match(CHAT_PATH, "application/json")
        assert call is not None
        found = decision.parse(table, Expect(call, None), {}, chat_body("hi"))
        assert isinstance(found, Found)
        planned = decision.plan(table, found, None, {})
        assert isinstance(planned, Planned)
        return planned.prefix

    assert len(planned_blocks(None).hashes) == 3 and planned_blocks("prefix").hashes
    assert planned_blocks("headroom").hashes == ()
    with pytest.raises(CatalogError, match="routing"):
        planned_blocks("random")
