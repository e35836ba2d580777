"""ext_proc/decision.py: each step of the admission decision as a plain function over the admission
state, its outcome typed (Admit, Refuse, Wait, Pass...), with no gRPC and no Envoy message in sight;
and ext_proc/sinks.py, where the outcomes go."""

from __future__ import annotations

import dataclasses

import orjson
import pytest
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2

from ext_proc import apis, decision, sinks
from ext_proc.admission import Refusal
from ext_proc.decision import Admit, Expect, Found, Lookup, Pass, Planned, Refuse, Wait
from ext_proc.decision_metadata import DecisionRecord
from ext_proc.ledger import Ledgers
from ext_proc.metrics import Decisions
from ext_proc.policy import EndpointPolicy, Policy
from ext_proc.state import AdmissionState
from ext_proc.status import RecentRefusals
from ext_proc.tenants import Tenant
from kvgate.api_keys import key_hash
from kvgate.v1 import policy_pb2
from kvgate.wire import PRIORITY_HEADER

BLOCK = 10 * 16  # bytes of one 16-token block at 10 bytes per token
POLICY = Policy(name="m", protocol="openai", backend_model="engine-m", max_context_tokens=1024, max_output_tokens=100,
                kv_bytes_per_token=10, tokens_per_block=16, endpoints=(EndpointPolicy("e:1", 40 * BLOCK, "", ""),),
                estimate_bytes_per_token=1.0, estimate_per_message=0, estimate_per_request=0,
                priority_classes=(("interactive", 0.0), ("patient", 5.0)), default_priority_class="interactive")
COMPLETIONS = apis.match("/v1/completions", "application/json")


def state(*policies: Policy, tenants: list[policy_pb2.Tenant] | None = None) -> AdmissionState:
    s = AdmissionState(Ledgers())
    s.tenants.replace(tenants or [])
    s.replace(list(policies or [POLICY]))
    return s


def expect(tenant: Tenant | None = None) -> Expect:
    assert COMPLETIONS is not None
    return Expect(COMPLETIONS, tenant)


def completion(prompt_tokens: int, max_tokens: int = 100, model: str = "m") -> bytes:
    return orjson.dumps({"model": model, "prompt": "x" * prompt_tokens, "max_tokens": max_tokens})


def planned_for(s: AdmissionState, raw: bytes, headers: dict[str, str] | None = None,
                tenant: Tenant | None = None) -> Planned:
    found = decision.parse(s, expect(tenant), headers or {}, raw)
    assert isinstance(found, Found)
    planned = decision.plan(s, found, tenant, headers or {})
    assert isinstance(planned, Planned)
    return planned


# --- headers ------------------------------------------------------------------------------------

def test_nothing_is_admitted_before_the_control_plane_is_heard() -> None:
    s = AdmissionState(Ledgers())
    outcome = decision.authenticate(s, {})
    assert isinstance(outcome, Refuse) and outcome.refusal.status == 503 and outcome.refusal.retry_after == 1


def test_an_open_gateway_has_no_tenant_and_a_guarded_one_wants_a_key() -> None:
    assert decision.authenticate(state(), {}) is None
    guarded = state(tenants=[policy_pb2.Tenant(name="t", api_key_sha256=[key_hash("k")], models=["m"])])
    refused = decision.authenticate(guarded, {})
    assert isinstance(refused, Refuse) and refused.refusal.code == "invalid_api_key"
    tenant = decision.authenticate(guarded, {"authorization": "Bearer k"})
    assert isinstance(tenant, Tenant) and tenant.name == "t"


@pytest.mark.parametrize(("path", "method", "outcome"), [
    ("/v1/models", "GET", Lookup),
    ("/v1/nothing", "POST", Refuse),
    ("/v1/completions", "POST", apis.Call),
])
def test_the_path_names_a_call_a_lookup_or_nothing(path: str, method: str, outcome: type) -> None:
    found = decision.match_call({":method": method, "content-type": "application/json"}, path)
    assert isinstance(found, outcome)
    if isinstance(found, Refuse):
        assert found.refusal.status == 404 and found.refusal.code == "unknown_url"


def test_a_call_takes_post_and_a_body() -> None:
    assert COMPLETIONS is not None
    wrong_method = decision.check_call(COMPLETIONS, "GET", "/v1/completions", body_follows=True)
    assert wrong_method is not None and wrong_method.refusal.status == 405
    empty = decision.check_call(COMPLETIONS, "POST", "/v1/completions", body_follows=False)
    assert empty is not None and empty.refusal.code == "invalid_request"
    assert decision.check_call(COMPLETIONS, "POST", "/v1/completions", body_follows=True) is None


# --- body ---------------------------------------------------------------------------------------

def test_malformed_bodies_and_unknown_models_are_refused_without_a_model_label() -> None:
    bad = decision.parse(state(), expect(), {}, b"{not json")
    assert isinstance(bad, Refuse) and bad.model == "" and bad.refusal.status == 400
    unknown = decision.parse(state(), expect(), {}, completion(5, model="who"))
    assert isinstance(unknown, Refuse) and unknown.model == "" and unknown.refusal.code == "model_not_found"


def test_a_tenant_may_call_only_its_models() -> None:
    tenant = Tenant("t", frozenset({"other"}), 0, 0, "")
    refused = decision.parse(state(), expect(tenant), {}, completion(5))
    assert isinstance(refused, Refuse) and refused.refusal.status == 403 and refused.model == "m"


def test_a_lookup_passes_renamed_to_the_engines_model() -> None:
    triton = dataclasses.replace(POLICY, name="t", protocol="triton", backend_model="ensemble")
    call = apis.match("/inference.GRPCInferenceService/ModelReady", "application/grpc")
    assert call is not None
    msg = service_pb2.ModelReadyRequest(name="t").SerializeToString()
    outcome = decision.parse(state(triton), Expect(call, None), {}, b"\0" + len(msg).to_bytes(4, "big") + msg)
    assert isinstance(outcome, Pass) and outcome.model == "t" and outcome.rewrite is not None
    assert b"ensemble" in outcome.rewrite.body


def test_the_plan_clamps_and_sizes_the_reservation() -> None:
    planned = planned_for(state(), completion(20, max_tokens=5000))
    assert planned.plan.max_tokens == 100  # the model's output cap
    assert planned.plan.nbytes == 8 * BLOCK  # ceil(120 / 16) blocks
    assert planned.priority_class == "interactive" and not planned.counted


def test_an_unknown_priority_class_is_the_clients_error() -> None:
    s = state()
    found = decision.parse(s, expect(), {}, completion(5))
    assert isinstance(found, Found)
    refused = decision.plan(s, found, None, {PRIORITY_HEADER: "vip"})
    assert isinstance(refused, Refuse) and refused.refusal.code == "invalid_priority_class"


def test_a_tenants_class_caps_the_one_it_asks_for() -> None:
    tenant = Tenant("t", frozenset({"*"}), 0, 0, "patient")
    assert decision.priority_class(POLICY, tenant, "interactive") == "patient"
    assert decision.priority_class(POLICY, None, "patient") == "patient"


def test_a_prompt_that_leaves_no_room_is_refused() -> None:
    s = state()
    found = decision.parse(s, expect(), {}, completion(1024))
    assert isinstance(found, Found)
    refused = decision.plan(s, found, None, {})
    assert isinstance(refused, Refuse) and refused.refusal.code == "context_length_exceeded"


def test_a_charge_over_the_tenants_limit_is_refused_and_a_later_refusal_refunds() -> None:
    s = state()
    s.limits.share = 1.0
    tenant = Tenant("t", frozenset({"*"}), 0, 150, "")
    planned = planned_for(s, completion(20), tenant=tenant)  # 120 tokens
    charged = decision.charge(s, planned, tenant, now=0.0)
    assert isinstance(charged, Planned) and charged.charge is not None
    over = decision.charge(s, planned, tenant, now=0.0)
    assert isinstance(over, Refuse) and over.refusal.status == 429 and over.refusal.type_ == "tokens"
    decision.refund(s, charged, now=0.0)
    assert isinstance(decision.charge(s, planned, tenant, now=0.0), Planned)


# --- reserving ----------------------------------------------------------------------------------

def test_a_request_that_fits_is_admitted_on_its_endpoint() -> None:
    s = state()
    outcome = decision.first_try(s, planned_for(s, completion(20)), body_bytes=100, now=0.0, ttl_s=60, grpc=False)
    assert isinstance(outcome, Admit)
    assert (outcome.model, outcome.max_tokens, outcome.upstream) == ("m", 100, "e:1")
    assert outcome.reservation.nbytes == 8 * BLOCK == s.ledgers.get("m", "e:1").reserved  # type: ignore[union-attr]
    assert outcome.rewrite is not None and orjson.loads(outcome.rewrite.body)["model"] == "engine-m"


def test_a_request_that_does_not_fit_waits_only_if_its_class_may() -> None:
    """With the budget taken by use the reservations do not explain (nothing will be released)."""
    s = state()
    s.ledgers.get("m", "e:1").excess = 35 * BLOCK  # type: ignore[union-attr]
    refused = decision.first_try(s, planned_for(s, completion(20)), body_bytes=100, now=0.0, ttl_s=60, grpc=False)
    assert isinstance(refused, Refuse) and refused.refusal.status == 429 and refused.headroom == (5 * BLOCK,)
    waits = decision.first_try(s, planned_for(s, completion(20), {PRIORITY_HEADER: "patient"}), body_bytes=100,
                               now=0.0, ttl_s=60, grpc=False)
    assert isinstance(waits, Wait) and waits.seconds == 5.0 and waits.rank == 1


def test_while_reservations_are_held_a_class_that_may_not_wait_gets_the_release_grace() -> None:
    """A release may be on its way (the previous request of the same client, ended but not yet told)."""
    s = state()
    s.ledgers.get("m", "e:1").try_reserve(35 * BLOCK, 0.0, 60)  # type: ignore[union-attr]
    waits = decision.first_try(s, planned_for(s, completion(20)), body_bytes=100, now=0.0, ttl_s=60, grpc=False)
    assert isinstance(waits, Wait) and waits.seconds == decision.RELEASE_GRACE_S and waits.rank == 0
    patient = decision.first_try(s, planned_for(s, completion(20), {PRIORITY_HEADER: "patient"}), body_bytes=100,
                                 now=0.0, ttl_s=60, grpc=False)
    assert isinstance(patient, Wait) and patient.seconds == 5.0


def test_settling_a_wait_that_found_nothing_refunds_the_tenant() -> None:
    s = state()
    s.limits.share = 1.0
    tenant = Tenant("t", frozenset({"*"}), 0, 150, "")
    charged = decision.charge(s, planned_for(s, completion(20), tenant=tenant), tenant, now=0.0)
    assert isinstance(charged, Planned)
    refused = decision.settle(s, charged, None, s.ledgers_of(POLICY), now=0.0, grpc=False)
    assert isinstance(refused, Refuse) and refused.refusal.code == "rate_limit_exceeded"
    assert isinstance(decision.charge(s, charged, tenant, now=0.0), Planned)  # the tokens came back


# --- sinks --------------------------------------------------------------------------------------

def test_every_sink_sees_every_event_in_order() -> None:
    seen: list[tuple[str, object]] = []
    chain = sinks.Sinks([lambda e: seen.append(("a", e)), lambda e: seen.append(("b", e))])
    event = sinks.Finished(DecisionRecord(), 1.0)
    chain(event)
    assert seen == [("a", event), ("b", event)] and len(chain) == 2


def test_refusals_reach_the_status_page_and_only_busy_ones_the_log() -> None:
    refusals, logged = RecentRefusals(), []

    class Log:
        def info(self, event: str, **kw: object) -> None:
            logged.append((event, kw))

    chain = sinks.Sinks([sinks.recent_refusals(refusals), sinks.busy_log(Log())])  # type: ignore[arg-type]
    client_error = Refuse("", Refusal(400, "invalid_request", "bad"))
    busy = Refuse("m", Refusal(429, "rate_limit_exceeded", "full"), headroom=(3, 0))
    for outcome in (client_error, busy):
        chain(sinks.Decided(outcome, DecisionRecord(reserved_bytes=9), "req-1"))
    assert [(r.code, r.request_id) for r in refusals] == [("invalid_request", "req-1"), ("rate_limit_exceeded", "req-1")]
    assert logged == [("admission.refused", {"model": "m", "wanted": 9, "headroom": [3, 0]})]


def test_the_metrics_sink_counts_outcomes_by_model_and_code() -> None:
    registry = CollectorRegistry()
    sink = sinks.metrics(Decisions(registry))
    sink(sinks.Decided(Refuse("m", Refusal(429, "rate_limit_exceeded", "full")), DecisionRecord(), None))
    assert registry.get_sample_value("kvgate_admission_decisions_total",
                                     {"model": "m", "outcome": "rate_limit_exceeded"}) == 1.0
