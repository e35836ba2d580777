"""ext_proc tokens, admission and policy: prompt estimate, clamp, KV bytes, reservation, refusals."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest

from kvgate.kv_math import reservation_bytes
from ext_proc import tokens
from ext_proc.admission import Plan, Refusal, admit, busy, choose, plan
from ext_proc.ledger import Ledger, Reservation
from ext_proc.openai_protocol import CHAT_PATH, COMPLETIONS_PATH, parse_request
from ext_proc.request import LLMRequest
from ext_proc.policy import EndpointPolicy, Policy
from kvgate.v1 import policy_pb2

BPT = 10  # KV bytes per token
BLOCK = 16


def policy(**overrides: Any) -> Policy:
    """Context 1000, clamp 100, 16-token blocks, 10 B/token; the estimate is 1 token per byte, no overhead."""
    fields: dict[str, Any] = dict(name="m", protocol="openai", backend_model="m", max_context_tokens=1000, max_output_tokens=100, kv_bytes_per_token=BPT,
                                  tokens_per_block=BLOCK, endpoints=(EndpointPolicy("e:1", 10**6, "", ""),),
                                  estimate_bytes_per_token=1.0, estimate_per_message=0, estimate_per_request=0)
    if "budget_bytes" in overrides:
        overrides["endpoints"] = (EndpointPolicy("e:1", overrides.pop("budget_bytes"), "", ""),)
    fields.update(overrides)
    return Policy(**fields)


def completion(prompt: Any, **fields: Any) -> LLMRequest:
    return parse_request(COMPLETIONS_PATH, orjson.dumps({"model": "m", "prompt": prompt, **fields})).request


def chat(content: str, **fields: Any) -> LLMRequest:
    return parse_request(CHAT_PATH, orjson.dumps({"model": "m", "messages": [{"role": "u", "content": content}],
                                                  **fields})).request


def ids(n: int) -> list[int]:
    """A prompt of exactly n tokens, sent as token ids."""
    return list(range(n))


def planned(req: LLMRequest, pol: Policy | None = None) -> Plan:
    out = plan(req, pol or policy(), None)
    assert isinstance(out, Plan), out
    return out


def refused(req: LLMRequest, pol: Policy | None = None) -> Refusal:
    out = plan(req, pol or policy(), None)
    assert isinstance(out, Refusal), out
    return out


def proto_policy(**overrides: Any) -> policy_pb2.ModelPolicy:
    p = policy_pb2.ModelPolicy(
        name="m", protocol="openai", max_context_tokens=1000, max_output_tokens=100, kv_bytes_per_token=BPT,
        tokens_per_block=BLOCK,
        endpoints=[policy_pb2.Endpoint(address="a:1", kv_budget_bytes=300),
                   policy_pb2.Endpoint(address="b:2", kv_budget_bytes=700)],
        prompt_estimate=policy_pb2.PromptEstimate(bytes_per_token=1.0, per_message_tokens=8, per_request_tokens=4))
    for k, v in overrides.items():
        if v is None:
            p.ClearField(k)
        else:
            setattr(p, k, v)
    return p


# --- tokens.prompt_tokens --------------------------------------------------------------------

def test_token_ids_are_counted_exactly() -> None:
    pol = policy(estimate_per_message=8, estimate_per_request=8)
    assert tokens.prompt_tokens(completion([ids(5), ids(9)]), pol, None) == (5, 9)


def test_estimate_rounds_bytes_up_and_adds_overhead() -> None:
    pol = policy(estimate_bytes_per_token=4.0, estimate_per_message=0, estimate_per_request=3)
    assert tokens.prompt_tokens(completion(["x" * 10, "x" * 12]), pol, None) == (3 + 3, 3 + 3)


def test_estimate_per_message_overhead_for_chat() -> None:
    pol = policy(estimate_per_message=8, estimate_per_request=5)
    req = chat("hello")
    assert tokens.prompt_tokens(req, pol, None) == (req.prompt_bytes[0] + 8 + 5,)


def test_estimate_counts_utf8_bytes() -> None:
    assert tokens.prompt_tokens(completion("你好"), policy(), None) == (6,)


# --- plan: the clamp -------------------------------------------------------------------------

@pytest.mark.parametrize(("prompt_tokens", "requested", "expected"), [
    (10, 50, 50),      # the client's own limit
    (10, 500, 100),    # the model's max_output_tokens
    (950, 80, 50),     # the context left after the prompt
    (950, None, 50),   # no max_tokens: the clamp
    (10, None, 100),
    (999, None, 1),    # exactly one token of room
])
def test_clamp_is_the_min_of_requested_output_limit_and_room(prompt_tokens: int, requested: int | None,
                                                            expected: int) -> None:
    fields = {} if requested is None else {"max_tokens": requested}
    assert planned(completion(ids(prompt_tokens), **fields)).max_tokens == expected


def test_clamp_uses_the_longest_prompt() -> None:
    p = planned(completion([ids(100), ids(960), ids(5)]))
    assert p.max_tokens == 40
    assert p.prompt_tokens == 960


def test_chat_clamp_uses_max_completion_tokens() -> None:
    assert planned(chat("hi", max_completion_tokens=7, max_tokens=90)).max_tokens == 7


def test_plan_reports_the_estimated_prompt() -> None:
    req = chat("hello world")
    pol = policy(estimate_per_message=8, estimate_per_request=8)
    assert planned(req, pol).prompt_tokens == tokens.prompt_tokens(req, pol, None)[0]


# --- plan: context refusals ------------------------------------------------------------------

@pytest.mark.parametrize("prompt_tokens", [1000, 1001, 5000])
def test_prompt_without_room_is_context_length_exceeded(prompt_tokens: int) -> None:
    r = refused(completion(ids(prompt_tokens)))
    assert (r.status, r.code, r.type_, r.param) == (400, "context_length_exceeded", "invalid_request_error", "prompt")
    assert "1000" in r.message


def test_chat_context_refusal_names_messages() -> None:
    r = refused(chat("x" * 1000))
    assert (r.status, r.code, r.param) == (400, "context_length_exceeded", "messages")


def test_context_refusal_counts_estimate_overhead() -> None:
    req = chat("x" * 900)
    tight = policy(max_context_tokens=req.prompt_bytes[0] + 16)
    assert planned(req, tight).max_tokens == 16  # without overhead: 16 tokens of room
    with_overhead = dataclasses.replace(tight, estimate_per_message=8, estimate_per_request=8)
    assert refused(req, with_overhead).code == "context_length_exceeded"


def test_one_overlong_prompt_of_many_refuses_the_request() -> None:
    assert refused(completion([ids(10), ids(1000)])).code == "context_length_exceeded"


def test_context_refusal_has_no_retry_after() -> None:
    assert refused(completion(ids(1000))).retry_after is None


# --- plan: KV bytes --------------------------------------------------------------------------

def test_nbytes_is_whole_blocks() -> None:
    # 10 prompt + 20 output = 30 tokens -> 2 blocks of 16 -> 32 tokens x 10 B
    assert planned(completion(ids(10), max_tokens=20)).nbytes == 2 * BLOCK * BPT


def test_nbytes_at_an_exact_block_boundary() -> None:
    assert planned(completion(ids(12), max_tokens=20)).nbytes == 2 * BLOCK * BPT
    assert planned(completion(ids(13), max_tokens=20)).nbytes == 3 * BLOCK * BPT


def test_vllm_nbytes_leave_out_the_last_token() -> None:
    """vLLM never writes the KV of the token it samples last: 13 + 20 tokens take 2 blocks of 16 there,
    3 in TensorRT-LLM's reservation."""
    assert planned(completion(ids(13), max_tokens=20), policy(engine="vllm")).nbytes == 2 * BLOCK * BPT
    assert planned(completion(ids(14), max_tokens=20), policy(engine="vllm")).nbytes == 3 * BLOCK * BPT


def test_nbytes_sums_prompts_and_multiplies_by_n() -> None:
    p = planned(completion([ids(10), ids(40)], max_tokens=20, n=3))
    per_prompt = reservation_bytes(30, BLOCK, BPT) + reservation_bytes(60, BLOCK, BPT)
    assert per_prompt == (2 + 4) * BLOCK * BPT
    assert p.nbytes == 3 * per_prompt


def test_nbytes_uses_the_clamped_output() -> None:
    p = planned(completion(ids(10), max_tokens=5000))
    assert p.nbytes == reservation_bytes(10 + 100, BLOCK, BPT)


def test_nbytes_for_chat_uses_the_estimate() -> None:
    pol = policy(estimate_per_message=8, estimate_per_request=8)
    req = chat("hello", max_tokens=10)
    assert planned(req, pol).nbytes == reservation_bytes(tokens.prompt_tokens(req, pol, None)[0] + 10, BLOCK, BPT)


# --- plan: larger than the whole budget ------------------------------------------------------

def test_n_beyond_the_whole_budget_is_request_too_large() -> None:
    one = planned(completion(ids(10), max_tokens=20)).nbytes
    pol = policy(budget_bytes=4 * one)
    assert planned(completion(ids(10), max_tokens=20, n=4), pol).nbytes == 4 * one
    r = refused(completion(ids(10), max_tokens=20, n=5), pol)
    assert (r.status, r.code, r.type_) == (400, "request_too_large", "invalid_request_error")
    assert r.retry_after is None


def test_prompts_beyond_the_whole_budget_is_request_too_large() -> None:
    one = planned(completion(ids(10), max_tokens=20)).nbytes
    pol = policy(budget_bytes=2 * one)
    assert refused(completion([ids(10)] * 3, max_tokens=20), pol).code == "request_too_large"


# --- admit: which endpoint, and when nothing fits ---------------------------------------------

def ledger(capacity: int, name: str = "e:1", reserved: int = 0) -> Ledger:
    lg = Ledger("m", name, budget=capacity)
    if reserved:
        assert lg.try_reserve(reserved, 0.0, 900.0) is not None
    return lg


def test_admit_reserves_the_planned_bytes() -> None:
    p = planned(completion(ids(10), max_tokens=20))
    lg = ledger(10 * p.nbytes)
    r = admit(p, policy(), [lg], now=100.0, ttl_s=900.0)
    assert isinstance(r, Reservation)
    assert (r.ledger, r.nbytes, r.started, r.expires) == (lg, p.nbytes, 100.0, 1000.0)
    assert lg.reserved == p.nbytes


def test_admit_fills_to_capacity_then_does_not_fit() -> None:
    p = planned(completion(ids(10), max_tokens=20))
    lg = ledger(3 * p.nbytes)
    held = [admit(p, policy(), [lg], now=0.0, ttl_s=900.0) for _ in range(3)]
    assert all(isinstance(h, Reservation) for h in held)
    assert admit(p, policy(), [lg], now=0.5, ttl_s=900.0) is None
    assert lg.reserved == 3 * p.nbytes
    r = busy(p, policy(), [lg], now=0.5)
    assert (r.status, r.code, r.type_) == (429, "rate_limit_exceeded", "rate_limit_error")
    assert r.retry_after is not None and 1 <= r.retry_after <= 60


def test_admit_again_after_release() -> None:
    p = planned(completion(ids(10), max_tokens=20))
    lg = ledger(p.nbytes)
    first = admit(p, policy(), [lg], now=0.0, ttl_s=900.0)
    assert admit(p, policy(), [lg], now=1.0, ttl_s=900.0) is None
    assert isinstance(first, Reservation) and lg.release(first, now=2.0)
    assert isinstance(admit(p, policy(), [lg], now=3.0, ttl_s=900.0), Reservation)


def test_choose_takes_the_most_headroom() -> None:
    p = planned(completion(ids(10), max_tokens=20))
    a, b, c = ledger(1000, "a:1", reserved=100), ledger(2000, "b:1", reserved=1500), ledger(1000, "c:1")
    assert choose([a, b, c], p, policy(), 0.0) is c  # 1000 free, against 900 and 500


def test_choose_breaks_ties_by_fewest_in_flight_then_order() -> None:
    p = planned(completion(ids(10), max_tokens=20))
    busy_one = ledger(2000, "a:1", reserved=1000)  # 1000 free, one in flight
    idle_one, idle_two = ledger(1000, "b:1"), ledger(1000, "c:1")  # 1000 free, none in flight
    assert choose([busy_one, idle_one, idle_two], p, policy(), 0.0) is idle_one


def test_choose_skips_endpoints_it_does_not_fit_and_blind_ones() -> None:
    p = planned(completion(ids(10), max_tokens=20))
    small, blind = ledger(p.nbytes - 1, "a:1"), ledger(10 * p.nbytes, "b:1")
    blind.blind = True
    assert choose([small, blind], p, policy(), 0.0) is None
    blind.blind = False
    assert choose([small, blind], p, policy(), 0.0) is blind


def test_choose_prefers_the_expected_prefix_hit_over_a_little_more_headroom() -> None:
    p = planned(completion(ids(10), max_tokens=20))
    cached, empty = ledger(1000, "a:1", reserved=200), ledger(1000, "b:1")
    assert choose([cached, empty], p, policy(), 0.0) is empty
    assert choose([cached, empty], p, policy(), 0.0, hits={"a:1": 0.9}) is cached
    # A longer hit elsewhere wins over a shorter one at equal headroom.
    other = ledger(1000, "c:1", reserved=200)
    assert choose([cached, other], p, policy(), 0.0, hits={"a:1": 0.3, "c:1": 0.6}) is other


def test_choose_gives_up_a_hit_on_an_endpoint_half_a_cache_fuller() -> None:
    """A whole-prompt hit is worth HEADROOM_WEIGHT (2) times the free share: half a cache of imbalance."""
    p = planned(completion(ids(10), max_tokens=20))
    for reserved, expected in ((400, "a:1"), (600, "b:1")):
        cached, empty = ledger(1000, "a:1", reserved=reserved), ledger(1000, "b:1")
        assert choose([cached, empty], p, policy(), 0.0, hits={"a:1": 1.0}).endpoint == expected


def test_a_prefix_hit_never_admits_what_does_not_fit() -> None:
    p = planned(completion(ids(10), max_tokens=20))
    full = ledger(10 * p.nbytes, "a:1", reserved=9 * p.nbytes + 1)
    assert choose([full], p, policy(), 0.0, hits={"a:1": 1.0}) is None
    roomy = ledger(10 * p.nbytes, "b:1")
    assert choose([full, roomy], p, policy(), 0.0, hits={"a:1": 1.0}) is roomy
    assert admit(p, policy(), [full], 0.0, 900.0, hits={"a:1": 1.0}) is None


def test_a_prefix_hit_on_an_overflow_endpoint_does_not_beat_a_primary() -> None:
    pol = policy(endpoints=(EndpointPolicy("a:1", 1000, "", ""), EndpointPolicy("b:1", 1000, "", "", priority=1)))
    p = planned(completion(ids(10), max_tokens=20), pol)
    primary, overflow = ledger(1000, "a:1", reserved=600), ledger(1000, "b:1")
    assert choose([primary, overflow], p, pol, 0.0, hits={"b:1": 1.0}) is primary


def long_policy(**overrides: Any) -> Policy:
    """Long: above 10% of a 10,000 B endpoint; together at most half of it while short requests are around."""
    return policy(long_request_threshold=0.1, long_requests_max_share=0.5,
                  endpoints=(EndpointPolicy("e:1", 10_000, "", ""),), **overrides)


def test_long_requests_share_at_most_their_cap_but_one_alone_may_exceed_it() -> None:
    pol = long_policy()
    long_one = planned(completion(ids(10), max_tokens=90), pol)  # 112 tokens -> 1120 B > 10% of 10000
    short = planned(completion(ids(10), max_tokens=6), pol)
    assert long_one.long and long_one.nbytes == 1120 and not short.long
    lg = ledger(10_000)
    assert isinstance(admit(short, pol, [lg], 0.0, 900.0), Reservation)  # short traffic: the cap applies
    held = [admit(long_one, pol, [lg], 0.0, 900.0) for _ in range(4)]  # 4480 B <= 5000
    assert all(isinstance(h, Reservation) for h in held)
    assert admit(long_one, pol, [lg], 0.0, 900.0) is None  # 5600 B of long requests > 5000
    assert isinstance(admit(short, pol, [lg], 0.0, 900.0), Reservation)
    huge = planned(completion(ids(10), max_tokens=90, n=6), pol)  # 6720 B: above the cap on its own
    empty = ledger(10_000, "f:1")
    assert isinstance(admit(short, pol, [empty], 0.0, 900.0), Reservation)
    assert isinstance(admit(huge, pol, [empty], 0.0, 900.0), Reservation)


def test_with_no_short_traffic_long_requests_may_fill_the_endpoint() -> None:
    pol = long_policy()
    long_one = planned(completion(ids(10), max_tokens=90), pol)
    lg = ledger(10_000)
    held = [admit(long_one, pol, [lg], 0.0, 900.0) for _ in range(8)]  # 8960 B: the cap would stop at 4
    assert all(isinstance(h, Reservation) for h in held)
    assert admit(long_one, pol, [lg], 0.0, 900.0) is None  # 10080 B: the budget itself is the limit


def test_the_cap_protects_short_requests_for_a_window_after_the_last_one() -> None:
    pol = long_policy(long_requests_short_window_s=60.0)
    long_one = planned(completion(ids(10), max_tokens=90), pol)
    short = planned(completion(ids(10), max_tokens=6), pol)
    lg = ledger(10_000)
    s = admit(short, pol, [lg], 0.0, 900.0)
    assert isinstance(s, Reservation) and lg.release(s, now=10.0)  # the last short request ends at 10 s
    assert all(isinstance(admit(long_one, pol, [lg], 20.0, 900.0), Reservation) for _ in range(4))
    assert admit(long_one, pol, [lg], 69.9, 900.0) is None  # within 60 s of it: capped at half
    assert isinstance(admit(long_one, pol, [lg], 70.0, 900.0), Reservation)  # no short traffic any more


def test_larger_than_this_replicas_share_is_request_too_large() -> None:
    p = planned(completion(ids(10), max_tokens=20))
    lg = ledger(p.nbytes)
    lg.share = 0.5
    r = admit(p, policy(), [lg], 0.0, 900.0)
    assert isinstance(r, Refusal) and (r.status, r.code) == (400, "request_too_large")
    lg.share = 0.0  # no share yet: wait for one rather than refuse
    assert admit(p, policy(), [lg], 0.0, 900.0) is None


# --- Policy.from_proto -----------------------------------------------------------------------

def test_from_proto_copies_fields_and_endpoints() -> None:
    pol = Policy.from_proto(proto_policy())
    assert pol == Policy(name="m", protocol="openai", backend_model="m", max_context_tokens=1000, max_output_tokens=100, kv_bytes_per_token=BPT,
                         tokens_per_block=BLOCK, endpoints=(EndpointPolicy("a:1", 300, "", ""),
                                                            EndpointPolicy("b:2", 700, "", "")),
                         estimate_bytes_per_token=1.0, estimate_per_message=8, estimate_per_request=4)
    assert pol.largest_budget == 700


@pytest.mark.parametrize("field", ["name", "max_context_tokens", "max_output_tokens", "kv_bytes_per_token",
                                   "tokens_per_block", "endpoints", "prompt_estimate"])
def test_from_proto_rejects_a_policy_lacking_a_field(field: str) -> None:
    with pytest.raises(ValueError):
        Policy.from_proto(proto_policy(**{field: None}))


def test_from_proto_rejects_zero_bytes_per_token_estimate() -> None:
    p = proto_policy()
    p.prompt_estimate.bytes_per_token = 0.0
    with pytest.raises(ValueError):
        Policy.from_proto(p)


def test_policy_from_proto_plans_like_the_catalog_says() -> None:
    pol = Policy.from_proto(proto_policy())
    assert planned(completion(ids(10), max_tokens=20), pol).nbytes == 2 * BLOCK * BPT


def test_when_no_engine_can_be_seen_the_refusal_is_503_not_429() -> None:
    p = planned(completion(ids(10), max_tokens=20))
    lgs = [ledger(10 * p.nbytes, "a:1"), ledger(10 * p.nbytes, "b:1")]
    for lg in lgs:
        lg.blind = True
    r = busy(p, policy(metrics_stale_after_s=5.0), lgs, now=0.0)
    assert (r.status, r.code, r.retry_after) == (503, "engine_unavailable", 5)
    lgs[1].blind = False
    assert busy(p, policy(), lgs, now=0.0).status == 429  # one engine seen, and full: a real 429
