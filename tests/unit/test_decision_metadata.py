"""The decision ext_proc sends Envoy (dynamic metadata), the per-request metrics read from the same
record, and the request id on log lines: driven through the servicer with real ext_proc protos."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import structlog
from google.protobuf import json_format
from prometheus_client import CollectorRegistry

from envoy.config.core.v3.base_pb2 import HeaderValue
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse
from ext_proc.decision_metadata import CLAMPED_BY_CONTEXT, CLAMPED_BY_MODEL, DecisionRecord, clamp_limit
from ext_proc.ledger import Ledgers
from ext_proc.metrics import GEN_AI_PROVIDER, Decisions
from ext_proc.server import ExtProcServicer
from ext_proc.state import AdmissionState
from kvgate.wire import PRIORITY_HEADER
from tests.unit.test_ext_proc_servicer import POLICY, body, feed, headers, run
from kvgate.wire import DECISION_NAMESPACE

# Two requests of 300 prompt + 100 output tokens (4,000 bytes each) do not fit POLICY's 6,400.
BIG = {"model": "m", "prompt": "a" * 300, "max_tokens": 100}


@pytest.mark.parametrize(("requested", "granted", "model_max", "limit"), [
    (None, 100, 100, None),  # no max_tokens asked: the default is no clamp
    (50, 50, 100, None),
    (500, 100, 100, CLAMPED_BY_MODEL),
    (500, 40, 100, CLAMPED_BY_CONTEXT),  # the prompt left 40 tokens of context
])
def test_clamp_limit_names_what_lowered_max_tokens(requested: int | None, granted: int, model_max: int,
                                                   limit: str | None) -> None:
    assert clamp_limit(requested, granted, model_max) == limit


def observed() -> tuple[ExtProcServicer, CollectorRegistry]:
    table = AdmissionState(Ledgers())
    table.tenants.replace([])  # an open gateway
    table.replace([dataclasses.replace(POLICY, priority_classes=(("default", 0.0), ("patient", 10.0)))])
    registry = CollectorRegistry()
    return ExtProcServicer(table, Decisions(registry)), registry


def decision_of(reply: object) -> dict:
    return json_format.MessageToDict(reply.dynamic_metadata)[DECISION_NAMESPACE]  # type: ignore[attr-defined]


def with_header(msg: ProcessingRequest, key: str, value: str) -> ProcessingRequest:
    msg.request_headers.headers.headers.append(HeaderValue(key=key, raw_value=value.encode()))
    return msg


def gen_ai_labels(operation: str, model: str, **extra: str) -> dict[str, str]:
    return {"gen_ai_operation_name": operation, "gen_ai_provider_name": GEN_AI_PROVIDER,
            "gen_ai_request_model": model, **extra}


@pytest.mark.asyncio
async def test_an_admitted_request_carries_its_decision_and_is_counted() -> None:
    s, registry = observed()
    replies = await run(s, headers(), body({"model": "m", "prompt": "x" * 60, "max_tokens": 500}))
    assert not replies[0].HasField("dynamic_metadata")  # nothing decided at the headers
    # 60 prompt + 100 granted tokens = 10 blocks of 16 tokens at 10 bytes each.
    assert decision_of(replies[1]) == {"decision": "admitted", "model": "m", "priority_class": "default",
                                       "endpoint": "e:1", "prompt_tokens": 60, "max_tokens": 100,
                                       "requested_max_tokens": 500, "reserved_bytes": 1600}
    value = registry.get_sample_value
    assert value("kvgate_admission_decisions_total", {"model": "m", "outcome": "admitted"}) == 1
    assert value("kvgate_admission_clamps_total", {"model": "m", "limit": CLAMPED_BY_MODEL}) == 1
    assert value("kvgate_admission_tokens_sum", {"model": "m", "token_type": "input"}) == 60
    assert value("kvgate_admission_tokens_sum", {"model": "m", "token_type": "output"}) == 100
    assert value("kvgate_ext_proc_processing_seconds_count", {"phase": "headers"}) == 1
    assert value("kvgate_ext_proc_processing_seconds_count", {"phase": "body"}) == 1
    assert value("gen_ai_server_request_duration_seconds_count",
                 gen_ai_labels("text_completion", "m", error_type="")) == 1
    # A prompt bounded from its bytes is no token count: GenAI's usage metric stays silent.
    assert value("gen_ai_client_token_usage_count",
                 gen_ai_labels("text_completion", "m", gen_ai_token_type="input")) is None


@pytest.mark.asyncio
async def test_counted_prompts_are_gen_ai_token_usage_and_chat_is_its_own_operation() -> None:
    s, registry = observed()
    (_, admitted) = await run(s, headers(), body({"model": "m", "prompt": [1, 2, 3, 4, 5], "max_tokens": 10}))
    assert decision_of(admitted)["prompt_counted"] is True
    assert registry.get_sample_value("gen_ai_client_token_usage_sum",
                                     gen_ai_labels("text_completion", "m", gen_ai_token_type="input")) == 5
    await run(s, headers("/v1/chat/completions"), body({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
    assert registry.get_sample_value("gen_ai_server_request_duration_seconds_count",
                                     gen_ai_labels("chat", "m", error_type="")) == 1


@pytest.mark.asyncio
async def test_a_refusal_carries_its_code_on_the_immediate_response() -> None:
    s, registry = observed()
    (_, refused) = await run(s, headers(), body({"model": "nope", "prompt": "hi"}))
    assert refused.immediate_response.status.code == 404
    assert decision_of(refused) == {"decision": "model_not_found"}  # the client's name stays out
    assert registry.get_sample_value("gen_ai_server_request_duration_seconds_count",
                                     gen_ai_labels("text_completion", "", error_type="model_not_found")) == 1


@pytest.mark.asyncio
async def test_an_unknown_url_is_refused_at_the_headers_and_is_no_gen_ai_operation() -> None:
    s, registry = observed()
    (refused,) = await run(s, headers("/v1/audio/speech"))
    assert decision_of(refused) == {"decision": "unknown_url"}
    assert registry.get_sample_value("kvgate_ext_proc_processing_seconds_count", {"phase": "headers"}) == 1
    durations = [m for m in registry.collect() if m.name == "gen_ai_server_request_duration_seconds"]
    assert [sample for m in durations for sample in m.samples] == []


@pytest.mark.asyncio
async def test_processing_time_leaves_out_the_wait_for_budget() -> None:
    s, registry = observed()
    holder = s.Process(feed(headers(), body(BIG)), None)
    await holder.__anext__()
    await holder.__anext__()

    async def patient() -> list:
        return await run(s, with_header(headers(), PRIORITY_HEADER, "patient"), body({**BIG, "prompt": "b" * 300}))

    waiter = asyncio.create_task(patient())
    while not len(s.table.queues["m"]):  # until it waits: the 0.3 s below are all waiting
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.3)
    await holder.aclose()  # releases the budget the waiter needs
    replies = await waiter
    assert replies[1].HasField("override_message_timeout") and not replies[1].HasField("dynamic_metadata")
    decided = decision_of(replies[-1])
    assert decided["decision"] == "admitted" and decided["waited_ms"] >= 300
    value = registry.get_sample_value
    assert value("kvgate_admission_queue_wait_seconds_sum", {"model": "m", "admitted": "true"}) >= 0.3
    assert value("kvgate_ext_proc_processing_seconds_count", {"phase": "body"}) == 2
    # Both body messages together took far less than the wait alone (generous: a loaded machine).
    assert value("kvgate_ext_proc_processing_seconds_sum", {"phase": "body"}) < 0.15


@pytest.mark.asyncio
async def test_log_lines_about_a_request_carry_its_request_id_until_its_stream_ends() -> None:
    s, _ = observed()
    s.table.ledgers.set_share(0.0)  # nothing fits: the request is refused busy, which is logged
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        (_, refused) = await run(s, with_header(headers(), "x-request-id", "rid-1"), body(BIG))
    assert refused.immediate_response.status.code == 429
    assert "admission.refused" in [e["event"] for e in logs]
    assert all(e.get("request_id") == "rid-1" for e in logs)
    assert "request_id" not in structlog.contextvars.get_contextvars()  # unbound at stream end


def test_a_later_decision_on_a_stream_clears_the_fields_it_lacks() -> None:
    # Envoy merges each message's metadata into what it holds, key by key (a gRPC stream sends several).
    record = DecisionRecord(requested_max_tokens=4000, clamped_by=CLAMPED_BY_MODEL, max_tokens=128)
    record.refused("m", "first")
    first = ProcessingResponse()
    record.attach(first)
    assert decision_of(first)["requested_max_tokens"] == 4000
    record.clamped_by, record.max_tokens = "", 2
    record.refused("m", "second")
    second = ProcessingResponse()
    record.attach(second)
    assert decision_of(second) == {"decision": "second", "model": "m", "max_tokens": 2, "requested_max_tokens": None}
    again = ProcessingResponse()
    record.attach(again)  # nothing new decided: nothing sent
    assert not again.HasField("dynamic_metadata")
