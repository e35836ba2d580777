"""The ExternalProcessor stream handler, driven with real ext_proc protos and no sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import AsyncIterator

import orjson
import pytest
from google.protobuf import json_format
from prometheus_client import CollectorRegistry

from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3.external_processor_pb2 import HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse
from ext_proc.exchange import EXT_PROC_ATTRIBUTES
from ext_proc import decision, triton_grpc
from ext_proc.ledger import Ledgers
from ext_proc.metrics import Decisions
from ext_proc.policy import EndpointPolicy, Policy
from ext_proc.server import ExtProcServicer
from ext_proc.state import AdmissionState
from ext_proc.tenants import TenantTable
from kvgate.api_keys import key_hash
from kvgate.v1 import policy_pb2
from kvgate.wire import ADMISSION_ATTRIBUTES, DECISION_NAMESPACE, MODEL_HEADER, PRIORITY_HEADER
from engines.real.tiny_tokenizer import load as load_tokenizer
from engines.real.tiny_tokenizer import write_tokenizer
from tritonclient.grpc import service_pb2

POLICY = Policy(name="m", protocol="openai", backend_model="m", max_context_tokens=1024, max_output_tokens=100, kv_bytes_per_token=10,
                tokens_per_block=16, endpoints=(EndpointPolicy("e:1", 10 * 16 * 40, "", ""),), estimate_bytes_per_token=1.0,
                estimate_per_message=0, estimate_per_request=0)


def servicer(loaded: bool = True) -> ExtProcServicer:
    table = AdmissionState(Ledgers())
    table.tenants.replace([])  # heard from the control plane: no tenants, an open gateway
    if loaded:
        table.replace([POLICY])
    return ExtProcServicer(table, Decisions(CollectorRegistry()), clock=lambda: 0.0)


def headers(path: str = "/v1/completions", method: str = "POST", end: bool = False) -> ProcessingRequest:
    hs = [HeaderValue(key=":path", raw_value=path.encode()), HeaderValue(key=":method", raw_value=method.encode())]
    return ProcessingRequest(request_headers=HttpHeaders(headers=HeaderMap(headers=hs), end_of_stream=end))


def body(payload: dict) -> ProcessingRequest:
    return ProcessingRequest(request_body=HttpBody(body=orjson.dumps(payload), end_of_stream=True))


async def feed(*msgs: ProcessingRequest) -> AsyncIterator[ProcessingRequest]:
    for m in msgs:
        yield m


async def run(s: ExtProcServicer, *msgs: ProcessingRequest) -> list:
    return [r async for r in s.Process(feed(*msgs), None)]  # type: ignore[arg-type]


def set_headers(resp) -> dict[str, str]:  # noqa: ANN001
    return {h.header.key: h.header.raw_value.decode()
            for h in resp.request_body.response.header_mutation.set_headers}


def reserved(s: ExtProcServicer) -> int:
    ledger = s.table.ledgers.get("m", "e:1")
    assert ledger is not None
    return ledger.reserved


@pytest.mark.asyncio
async def test_admitted_request_is_routed_clamped_and_released_at_stream_end() -> None:
    s = servicer()
    gen = s.Process(feed(headers(), body({"model": "m", "prompt": "x" * 60, "max_tokens": 500})), None)
    first = await gen.__anext__()
    assert first.HasField("request_headers")
    admitted = await gen.__anext__()
    common = admitted.request_body.response
    new_body = orjson.loads(common.body_mutation.body)
    assert common.clear_route_cache
    assert set_headers(admitted) == {MODEL_HEADER: "m", "content-length": str(len(common.body_mutation.body))}
    decided = decision_of(admitted)  # what the routes, override_host and the response header read
    assert (decided["model"], decided["endpoint"], decided["max_tokens"]) == ("m", "e:1", 100)
    assert new_body == {"model": "m", "prompt": "x" * 60, "max_tokens": 100}
    assert reserved(s) == 10 * 16 * 10  # 160 tokens -> 10 blocks of 16
    with pytest.raises(StopAsyncIteration):
        await gen.__anext__()  # Envoy half-closed: the request is over
    assert reserved(s) == 0


@pytest.mark.asyncio
async def test_cancelled_stream_releases_its_reservation() -> None:
    s = servicer()
    gen = s.Process(feed(headers(), body({"model": "m", "prompt": "hi", "max_tokens": 10})), None)
    await gen.__anext__()
    await gen.__anext__()
    assert reserved(s) > 0
    await gen.aclose()  # what grpc.aio does when Envoy resets the stream
    assert reserved(s) == 0


@pytest.mark.asyncio
async def test_unchanged_body_is_not_rewritten() -> None:
    (_, admitted) = await run(servicer(), headers(), body({"model": "m", "prompt": "hi", "max_tokens": 100}))
    assert not admitted.request_body.response.HasField("body_mutation")
    assert "content-length" not in set_headers(admitted)


@pytest.mark.asyncio
async def test_before_policies_arrive_requests_get_503_with_retry_after() -> None:
    (refused,) = await run(servicer(loaded=False), headers())  # refused at the headers: no body is read
    imm = refused.immediate_response
    assert imm.status.code == 503
    assert {h.header.key: h.header.raw_value for h in imm.headers.set_headers}["retry-after"] == b"1"


@pytest.mark.asyncio
async def test_before_tenants_arrive_requests_get_503_even_with_policies() -> None:
    s = servicer()
    s.table.tenants = TenantTable()  # policies heard, tenants not yet: a key could not be checked
    (refused,) = await run(s, headers())
    assert refused.immediate_response.status.code == 503


# --- tenants: keys, allowed models, rate limits -------------------------------------------------

KEY = "sk-test-0123456789"


def tenant(name: str = "team-a", models: tuple[str, ...] = ("*",), rpm: int = 0, tpm: int = 0,
           key: str = KEY) -> policy_pb2.Tenant:
    return policy_pb2.Tenant(name=name, api_key_sha256=[hashlib.sha256(key.encode()).hexdigest()], models=list(models),
                             requests_per_minute=rpm, tokens_per_minute=tpm)


def keyed(msg: ProcessingRequest, key: str | None = KEY, header: str = "authorization") -> ProcessingRequest:
    if key is not None:
        value = f"Bearer {key}" if header == "authorization" else key
        msg.request_headers.headers.headers.add(key=header, raw_value=value.encode())
    return msg


def guarded(*tenants: policy_pb2.Tenant) -> ExtProcServicer:
    s = servicer()
    s.table.tenants.replace(list(tenants or [tenant()]))
    return s


@pytest.mark.asyncio
@pytest.mark.parametrize(("key", "header"), [(KEY, "authorization"), (KEY, "api-key"), (KEY, "x-api-key")])
async def test_a_tenants_key_is_admitted_in_any_usual_header(key: str, header: str) -> None:
    (_, admitted) = await run(guarded(), keyed(headers(), key, header), body({"model": "m", "prompt": "hi"}))
    assert admitted.HasField("request_body")


@pytest.mark.asyncio
@pytest.mark.parametrize("key", [None, "sk-wrong"])
async def test_no_key_or_a_wrong_one_is_401_at_the_headers(key: str | None) -> None:
    (refused,) = await run(guarded(), keyed(headers(), key))
    assert refused.immediate_response.status.code == 401
    assert orjson.loads(refused.immediate_response.body)["error"]["code"] == "invalid_api_key"


@pytest.mark.asyncio
async def test_two_different_keys_are_refused_and_the_same_key_twice_is_not() -> None:
    """With a key in two headers, the first found won silently: which one did the client mean, and
    which one would the engine read? Two different keys are a 401; one key sent twice is fine."""
    other = "sk-someone-else"
    s = guarded(tenant(), policy_pb2.Tenant(name="other", api_key_sha256=[key_hash(other)], models=["*"]))
    (refused,) = await run(s, keyed(keyed(headers(), KEY), other, "x-api-key"))
    assert refused.immediate_response.status.code == 401
    assert "Two different API keys" in orjson.loads(refused.immediate_response.body)["error"]["message"]
    (_, admitted) = await run(s, keyed(keyed(headers(), KEY), KEY, "api-key"), body({"model": "m", "prompt": "hi"}))
    assert admitted.HasField("request_body")


@pytest.mark.asyncio
async def test_grpc_callers_get_unauthenticated_and_permission_denied() -> None:
    s = guarded(tenant(models=("m",)))
    s.table.replace([POLICY, dataclasses.replace(POLICY, name="t", protocol="triton")])
    (refused,) = await run(s, keyed(grpc_unary_headers(), None))
    assert refused.immediate_response.grpc_status.status == 16  # UNAUTHENTICATED
    msg = service_pb2.ModelInferRequest(model_name="t")
    msg.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(b"hi")
    replies = await run(s, keyed(grpc_unary_headers()), ProcessingRequest(request_body=HttpBody(
        body=triton_grpc.frame(msg.SerializeToString()), end_of_stream=True)))
    assert replies[-1].immediate_response.grpc_status.status == 7  # PERMISSION_DENIED


@pytest.mark.asyncio
async def test_a_model_outside_the_tenants_list_is_403() -> None:
    (_, refused) = await run(guarded(tenant(models=("other",))), keyed(headers()), body({"model": "m", "prompt": "hi"}))
    assert refused.immediate_response.status.code == 403


@pytest.mark.asyncio
async def test_lookups_need_a_key() -> None:
    s = guarded()
    s.table.replace([POLICY, dataclasses.replace(POLICY, name="t", protocol="triton")])
    (refused,) = await run(s, keyed(headers("/v1/models", method="GET"), None))
    assert refused.immediate_response.status.code == 401
    (passed,) = await run(s, keyed(headers("/v2/models/t/ready", method="GET")))
    assert passed.HasField("request_headers")  # Envoy routes it to the engine


@pytest.mark.asyncio
async def test_a_tenant_lists_and_reads_only_its_own_models() -> None:
    other = dataclasses.replace(POLICY, name="other")
    s = guarded(tenant(models=("m",)))
    s.table.replace([POLICY, other])
    (listed,) = await run(s, keyed(headers("/v1/models", method="GET")))
    assert listed.immediate_response.status.code == 200
    assert [m["id"] for m in orjson.loads(listed.immediate_response.body)["data"]] == ["m"]
    (mine,) = await run(s, keyed(headers("/v1/models/m", method="GET")))
    assert orjson.loads(mine.immediate_response.body)["id"] == "m"
    (hidden,) = await run(s, keyed(headers("/v1/models/other", method="GET")))
    assert hidden.immediate_response.status.code == 404


@pytest.mark.asyncio
async def test_a_tenants_triton_metadata_lookups_are_limited_to_its_models() -> None:
    s = guarded(tenant(models=("m",)))
    s.table.replace([POLICY, dataclasses.replace(POLICY, name="org/t", protocol="triton")])
    for path in ("/v2/models/org/t", "/v2/models/org/t/config", "/v2/models/org/t/versions/1/ready"):
        (refused,) = await run(s, keyed(headers(path, method="GET")))
        assert refused.immediate_response.status.code == 403, path


@pytest.mark.asyncio
async def test_tokens_per_minute_are_charged_at_admission_and_refunded_when_refused() -> None:
    s = guarded(tenant(tpm=300))
    first = s.Process(feed(keyed(headers()), body({"model": "m", "prompt": "x" * 100, "max_tokens": 100})), None)
    await first.__anext__()
    assert (await first.__anext__()).HasField("request_body")  # 200 tokens of 300
    (_, over) = await run(s, keyed(headers()), body({"model": "m", "prompt": "y" * 100, "max_tokens": 100}))
    imm = over.immediate_response
    assert imm.status.code == 429
    error = orjson.loads(imm.body)["error"]
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "tokens")
    assert 1 <= int({h.header.key: h.header.raw_value for h in imm.headers.set_headers}["retry-after"]) <= 60
    # A request refused for KV budget after its charge gets it back: 100 tokens fit the 100 left.
    s.table.ledgers.set_share(0.0)  # no budget at all, and the class does not wait
    (_, busy) = await run(s, keyed(headers()), body({"model": "m", "prompt": "z" * 50, "max_tokens": 50}))
    assert busy.immediate_response.status.code == 429
    assert orjson.loads(busy.immediate_response.body)["error"]["type"] == "rate_limit_error"
    s.table.ledgers.set_share(1.0)
    (_, ok) = await run(s, keyed(headers()), body({"model": "m", "prompt": "z" * 50, "max_tokens": 50}))
    assert ok.HasField("request_body")
    await first.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize(("msg", "status"), [
    (headers("/v1/audio/speech"), 404),
    (headers(method="GET"), 405),
    (headers(end=True), 400),
])
async def test_refused_at_the_headers(msg: ProcessingRequest, status: int) -> None:
    (refused,) = await run(servicer(), msg)
    assert refused.immediate_response.status.code == status
    assert orjson.loads(refused.immediate_response.body)["error"]["message"]


@pytest.mark.asyncio
async def test_budget_full_is_429_and_nothing_is_held_for_the_refused() -> None:
    s = servicer()
    holder = s.Process(feed(headers(), body({"model": "m", "prompt": "a" * 300, "max_tokens": 100})), None)
    await holder.__anext__()
    await holder.__anext__()
    held = reserved(s)
    (_, refused) = await run(s, headers(), body({"model": "m", "prompt": "b" * 300, "max_tokens": 100}))
    assert refused.immediate_response.status.code == 429
    assert reserved(s) == held
    await holder.aclose()
    assert reserved(s) == 0


@pytest.mark.asyncio
async def test_a_release_on_its_way_is_waited_for_by_a_class_that_may_not_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget is held by a request whose stream end has not arrived yet: the next request, whose class
    refuses at once, waits the release grace (made long here: no timing in the test) without asking Envoy
    for a longer timeout, and is admitted when the release lands."""
    monkeypatch.setattr(decision, "RELEASE_GRACE_S", 30.0)
    s = servicer()
    holder = s.Process(feed(headers(), body({"model": "m", "prompt": "a" * 300, "max_tokens": 100})), None)
    await holder.__anext__()
    await holder.__anext__()
    held = reserved(s)
    following = s.Process(feed(headers(), body({"model": "m", "prompt": "b" * 300, "max_tokens": 100})), None)
    await following.__anext__()
    answer = asyncio.ensure_future(following.__anext__())
    while not len(s.table.queues["m"]):
        await asyncio.sleep(0)
    await holder.aclose()
    admitted = await answer
    assert admitted.WhichOneof("response") == "request_body" and reserved(s) == held
    await following.aclose()
    assert reserved(s) == 0


def test_ttl_backstop_releases_what_outlived_its_deadline() -> None:
    now = [0.0]
    s = servicer()
    s.clock = lambda: now[0]
    ledger = s.table.ledgers.get("m", "e:1")
    assert ledger is not None
    ledger.try_reserve(100, now=0.0, ttl_s=s.reservation_ttl_s)
    now[0] = s.reservation_ttl_s - 1
    assert s.expire() == 0
    now[0] = s.reservation_ttl_s + 1
    assert s.expire() == 1 and ledger.reserved == 0


# --- gRPC streams ---------------------------------------------------------------------------

def stream_servicer() -> ExtProcServicer:
    table = AdmissionState(Ledgers())
    table.tenants.replace([])  # heard from the control plane: no tenants, an open gateway
    table.replace([Policy(name="t", protocol="triton", backend_model="ensemble", max_context_tokens=1024,
                          max_output_tokens=100, kv_bytes_per_token=10, tokens_per_block=16,
                          endpoints=(EndpointPolicy("t:1", 10**6, "t:2", ""),), estimate_bytes_per_token=1.0,
                          estimate_per_message=0,
                          estimate_per_request=0)])
    return ExtProcServicer(table, Decisions(CollectorRegistry()), clock=lambda: 0.0)


def infer_frame(text: bytes, max_tokens: int) -> bytes:
    msg = service_pb2.ModelInferRequest(model_name="t")
    msg.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(text)
    msg.inputs.add(name="max_tokens", datatype="INT32", shape=[1, 1]).contents.int_contents.append(max_tokens)
    return triton_grpc.frame(msg.SerializeToString())


def grpc_headers() -> ProcessingRequest:
    hs = [HeaderValue(key=":path", raw_value=b"/inference.GRPCInferenceService/ModelStreamInfer"),
          HeaderValue(key=":method", raw_value=b"POST"), HeaderValue(key="content-type", raw_value=b"application/grpc")]
    return ProcessingRequest(request_headers=HttpHeaders(headers=HeaderMap(headers=hs)))


def chunk(data: bytes) -> ProcessingRequest:
    return ProcessingRequest(request_body=HttpBody(body=data))


@pytest.mark.asyncio
async def test_stream_is_routed_by_its_first_message_even_split_across_chunks() -> None:
    s = stream_servicer()
    first, second = infer_frame(b"hello", 5000), infer_frame(b"again", 7)
    gen = s.Process(feed(grpc_headers(), chunk(first[:3]), chunk(first[3:] + second[:10]), chunk(second[10:])), None)
    replies = [r async for r in gen]
    kinds = [r.WhichOneof("response") or "override_message_timeout" for r in replies]
    # wait longer; (first chunk held); headers routed; both held chunks answered; the last chunk.
    assert kinds == ["override_message_timeout", "request_headers", "request_body", "request_body", "request_body"]
    assert replies[0].override_message_timeout.seconds == 60
    routed = replies[1].request_headers.response
    assert routed.clear_route_cache
    assert [(h.header.key, h.header.raw_value) for h in routed.header_mutation.set_headers] == [(MODEL_HEADER, b"t")]
    decided = decision_of(replies[1])
    assert (decided["model"], decided["upstream"]) == ("t", "t:2")  # the engine's gRPC port: the stream is gRPC
    bodies = [r.request_body.response.body_mutation for r in replies[2:]]
    assert bodies[0].clear_body
    sent = [service_pb2.ModelInferRequest.FromString(m) for b in bodies[1:] for m in triton_grpc.deframe(b.body)]
    assert [(m.model_name, m.inputs[1].contents.int_contents[0]) for m in sent] == [("ensemble", 100), ("ensemble", 7)]
    assert reserved_of(s, "t") == 0  # the stream ended: both reservations released


@pytest.mark.asyncio
async def test_stream_ending_inside_a_frame_is_invalid_argument() -> None:
    s = stream_servicer()
    frame = infer_frame(b"hello", 5)
    last = ProcessingRequest(request_body=HttpBody(body=frame[:-2], end_of_stream=True))
    replies = [r async for r in s.Process(feed(grpc_headers(), last), None)]
    assert replies[-1].immediate_response.grpc_status.status == 3


def reserved_of(s: ExtProcServicer, model: str) -> int:
    return sum(lg.reserved for lg in s.table.ledgers.all() if lg.model == model)


# --- endpoints and waiting ------------------------------------------------------------------

TWO_ENDPOINTS = dataclasses.replace(
    POLICY, endpoints=(EndpointPolicy("a:1", 10 * 16 * 40, "", ""), EndpointPolicy("b:1", 10 * 16 * 40, "", "")),
    priority_classes=(("interactive", 5.0), ("batch", 0.3)), default_priority_class="interactive")


def waiting_servicer() -> ExtProcServicer:
    table = AdmissionState(Ledgers())
    table.tenants.replace([])  # heard from the control plane: no tenants, an open gateway
    table.replace([TWO_ENDPOINTS])
    return ExtProcServicer(table, Decisions(CollectorRegistry()))


def prompt_body(tokens: int) -> ProcessingRequest:
    """A completion claiming `tokens` prompt tokens (1 per byte) plus 100 output tokens."""
    return body({"model": "m", "prompt": "x" * tokens, "max_tokens": 100})


async def admitted_to(s: ExtProcServicer, *msgs: ProcessingRequest) -> tuple[AsyncIterator, str]:
    """Opens a request and returns (its still-open stream, the endpoint it was sent to)."""
    gen = s.Process(feed(*msgs), None)
    await gen.__anext__()
    reply = await gen.__anext__()
    return gen, decision_of(reply)["endpoint"]


@pytest.mark.asyncio
async def test_requests_go_to_the_endpoint_with_most_headroom() -> None:
    s = waiting_servicer()
    big, first = await admitted_to(s, headers(), prompt_body(300))  # 400 tokens of 640 per endpoint
    small, second = await admitted_to(s, headers(), prompt_body(60))
    third_gen, third = await admitted_to(s, headers(), prompt_body(60))
    assert (first, second, third) == ("a:1", "b:1", "b:1")  # b has more room until it fills
    for g in (big, small, third_gen):
        await g.aclose()


@pytest.mark.asyncio
async def test_a_request_that_does_not_fit_waits_then_gets_the_freed_budget() -> None:
    s = waiting_servicer()
    holders = [(await admitted_to(s, headers(), prompt_body(460)))[0] for _ in range(2)]  # both endpoints full
    waiter = s.Process(feed(headers(), prompt_body(460)), None)
    await waiter.__anext__()
    extend = await waiter.__anext__()  # Envoy is told to wait longer than its message timeout
    assert extend.override_message_timeout.seconds == 6
    pending = asyncio.ensure_future(waiter.__anext__())
    await asyncio.sleep(0.05)
    assert not pending.done()
    await holders[1].aclose()  # the request on one endpoint ends
    admitted = await asyncio.wait_for(pending, 1.0)
    assert decision_of(admitted)["endpoint"] in ("a:1", "b:1")
    await waiter.aclose()
    await holders[0].aclose()
    assert sum(lg.reserved for lg in s.table.ledgers.all()) == 0


@pytest.mark.asyncio
async def test_waiting_ends_in_429_at_the_class_deadline() -> None:
    s = waiting_servicer()
    holders = [(await admitted_to(s, headers(), prompt_body(460)))[0] for _ in range(2)]
    batch = headers()
    batch.request_headers.headers.headers.add(key=PRIORITY_HEADER, raw_value=b"batch")
    replies = await run(s, batch, prompt_body(460))
    assert replies[1].override_message_timeout.seconds == 1
    assert replies[2].immediate_response.status.code == 429
    for g in holders:
        await g.aclose()


@pytest.mark.asyncio
async def test_unknown_priority_class_is_400() -> None:
    s = waiting_servicer()
    h = headers()
    h.request_headers.headers.headers.add(key=PRIORITY_HEADER, raw_value=b"vip")
    (_, refused) = await run(s, h, prompt_body(10))
    assert refused.immediate_response.status.code == 400
    assert PRIORITY_HEADER in orjson.loads(refused.immediate_response.body)["error"]["message"]


# --- the model's own tokenizer ----------------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.parametrize("words", [20, 600])  # counted inline; long enough to be counted in a thread
async def test_prompts_are_counted_with_the_models_tokenizer(tmp_path, words: int) -> None:  # noqa: ANN001
    path = write_tokenizer(tmp_path)
    policy = dataclasses.replace(POLICY, tokenizer_path=str(path),
                                 tokenizer_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                                 endpoints=(EndpointPolicy("e:1", 10**9, "", ""),))
    table = AdmissionState(Ledgers())
    table.tenants.replace([])  # heard from the control plane: no tenants, an open gateway
    table.replace([policy])
    await table.tokenizers.update([policy])
    s = ExtProcServicer(table, Decisions(CollectorRegistry()), clock=lambda: 0.0, inline_count_chars=1024)
    prompt = " ".join(["the gateway admits requests by their KV bytes"] * (words // 8))
    exact = len(load_tokenizer().encode(prompt, add_special_tokens=False).ids)
    assert exact < len(prompt.encode())  # so the byte bound and the exact count differ
    gen = s.Process(feed(headers(), body({"model": "m", "prompt": prompt, "max_tokens": 10})), None)
    await gen.__anext__()
    await gen.__anext__()
    (ledger,) = s.table.ledgers.all()
    assert ledger.reserved == -(-(exact + 10) // 16) * 16 * 10  # whole 16-token blocks of 10 B
    await gen.aclose()


def grpc_unary_headers() -> ProcessingRequest:
    hs = [HeaderValue(key=":path", raw_value=b"/inference.GRPCInferenceService/ModelInfer"),
          HeaderValue(key=":method", raw_value=b"POST"), HeaderValue(key="content-type", raw_value=b"application/grpc")]
    return ProcessingRequest(request_headers=HttpHeaders(headers=HeaderMap(headers=hs)))


@pytest.mark.asyncio
async def test_a_client_leaving_while_queued_gets_its_tokens_back() -> None:
    s = guarded(tenant(tpm=1200))
    s.table.replace([dataclasses.replace(POLICY, priority_classes=(("interactive", 5.0),),
                                         default_priority_class="interactive")])
    holder = s.Process(feed(keyed(headers()), prompt_body(460)), None)  # fills the one endpoint
    await holder.__anext__()
    await holder.__anext__()
    waiter = s.Process(feed(keyed(headers()), prompt_body(460)), None)
    await waiter.__anext__()
    await waiter.__anext__()  # told Envoy to wait longer: it is queued, charged 560 tokens
    pending = asyncio.ensure_future(waiter.__anext__())
    await asyncio.sleep(0.05)
    pending.cancel()  # the client goes away
    with pytest.raises(asyncio.CancelledError):
        await pending
    await holder.aclose()
    # 1200 - 560 (holder) = 640 left only if the waiter's 560 came back (else 80).
    (_, ok) = await run(s, keyed(headers()), prompt_body(340))
    assert ok.HasField("request_body")


@pytest.mark.asyncio
async def test_a_tenants_class_is_the_highest_it_may_ask_for() -> None:
    pinned = tenant()
    pinned.priority_class = "batch"
    s = guarded(pinned)
    s.table.replace([TWO_ENDPOINTS])
    holders = [(await admitted_to(s, keyed(headers()), prompt_body(460)))[0] for _ in range(2)]
    asks_more = keyed(headers())
    asks_more.request_headers.headers.headers.add(key=PRIORITY_HEADER, raw_value=b"interactive")
    replies = await run(s, asks_more, prompt_body(460))
    assert replies[1].override_message_timeout.seconds == 1  # batch's 0.3 s wait, not interactive's 5 s
    assert replies[2].immediate_response.status.code == 429
    for g in holders:
        await g.aclose()


@pytest.mark.asyncio
async def test_a_replica_without_a_share_yet_does_not_refuse_on_rate_limits() -> None:
    s = guarded(tenant(rpm=5))
    s.table.set_share(0.0)
    (_, reply) = await run(s, keyed(headers()), body({"model": "m", "prompt": "hi"}))
    assert reply.immediate_response.status.code != 429 or b"per minute" not in reply.immediate_response.body


@pytest.mark.asyncio
async def test_a_policy_push_just_before_a_request_starts_waiting_does_not_lose_its_wake_up() -> None:
    """The request has been told to wait (its queue was empty), and a push of the same policies comes
    before it sleeps in the queue: it must still be woken when budget frees up, not time out with
    headroom free."""
    s = waiting_servicer()
    holders = [(await admitted_to(s, headers(), prompt_body(460)))[0] for _ in range(2)]
    waiter = s.Process(feed(headers(), prompt_body(460)), None)
    await waiter.__anext__()
    await waiter.__anext__()  # told to wait longer: its decision to wait is taken
    s.table.replace([TWO_ENDPOINTS])  # an xDS push while it is between deciding and sleeping
    pending = asyncio.ensure_future(waiter.__anext__())
    await asyncio.sleep(0.05)
    await holders[1].aclose()
    admitted = await asyncio.wait_for(pending, 1.0)  # within the wake-up, not at the 5 s deadline
    assert decision_of(admitted)["endpoint"] in ("a:1", "b:1")
    await waiter.aclose()
    await holders[0].aclose()


@pytest.mark.asyncio
async def test_a_waiter_is_admitted_on_the_endpoints_the_latest_policy_names() -> None:
    """Both endpoints full; while a request waits, the catalog moves the model to a new engine: it
    gets that engine, not the full ledgers it saw when it started waiting."""
    s = waiting_servicer()
    holders = [(await admitted_to(s, headers(), prompt_body(460)))[0] for _ in range(2)]
    waiter = s.Process(feed(headers(), prompt_body(460)), None)
    await waiter.__anext__()
    await waiter.__anext__()
    pending = asyncio.ensure_future(waiter.__anext__())
    await asyncio.sleep(0.05)
    moved = dataclasses.replace(TWO_ENDPOINTS, endpoints=(EndpointPolicy("c:1", 10 * 16 * 40, "", ""),))
    s.table.replace([moved])
    admitted = await asyncio.wait_for(pending, 1.0)
    assert decision_of(admitted)["endpoint"] == "c:1"
    await waiter.aclose()
    for g in holders:
        await g.aclose()
    assert sum(lg.reserved for lg in s.table.ledgers.all()) == 0


@pytest.mark.asyncio
async def test_waiting_bodies_are_bounded_by_bytes() -> None:
    """While waiters hold request bodies up to the replica's limit, one more is refused at once
    instead of waiting."""
    s = waiting_servicer()
    s.table.waiting_bytes.limit = 1000
    holders = [(await admitted_to(s, headers(), prompt_body(460)))[0] for _ in range(2)]
    first = asyncio.ensure_future(run(s, headers(), prompt_body(460)))  # ~500 body bytes: it waits
    await asyncio.sleep(0.05)
    assert len(s.table.queues["m"]) == 1
    padded = body({"model": "m", "prompt": "x" * 460, "max_tokens": 100, "user": "u" * 600})
    (_, refused) = await run(s, headers(), padded)  # would make ~1600 bytes: no room
    assert refused.immediate_response.status.code == 429 and len(s.table.queues["m"]) == 1
    first.cancel()
    for g in holders:
        await g.aclose()


@pytest.mark.asyncio
async def test_a_bug_while_deciding_is_refused_in_the_clients_convention(monkeypatch: pytest.MonkeyPatch) -> None:
    """The last resort: whatever raises while a request is decided, the client gets an error in its own
    convention (not a bare 500 from Envoy), nothing is reserved, and the process goes on serving."""
    s = servicer()

    def broken(*_: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("ext_proc.decision.plan", broken)
    (_, refused) = await run(s, headers(), body({"model": "m", "prompt": "hi"}))
    assert refused.immediate_response.status.code == 500
    assert orjson.loads(refused.immediate_response.body)["error"]["code"] == "internal_error"
    assert reserved(s) == 0
    monkeypatch.undo()
    (_, admitted) = await run(s, headers(), body({"model": "m", "prompt": "hi"}))
    assert admitted.HasField("request_body")


# --- one exchange per request: the body first, the headers it needs as attributes ------------------

def one_message(payload: bytes, path: str = "/v1/completions", **headers: str) -> ProcessingRequest:
    """What Envoy sends with request headers skipped: the body, and the headers as the CEL attributes
    xds_server asked for (kvgate.wire.ADMISSION_ATTRIBUTES)."""
    by_name = {name: expression for expression, name in ADMISSION_ATTRIBUTES.items()}
    msg = ProcessingRequest(request_body=HttpBody(body=payload, end_of_stream=True))
    msg.attributes[EXT_PROC_ATTRIBUTES].update({by_name[":path"]: path, by_name[":method"]: "POST",
                                                **{by_name[k.replace("_", "-")]: v for k, v in headers.items()}})
    return msg


def decision_of(reply: ProcessingResponse) -> dict:
    return json_format.MessageToDict(reply.dynamic_metadata)[DECISION_NAMESPACE]


@pytest.mark.asyncio
async def test_one_message_admits_with_the_route_in_the_decision_metadata() -> None:
    """The routes match the decision's model, override_host picks its endpoint, and the response echoes
    its max_tokens: the body's answer carries all three."""
    s = servicer()
    (admitted,) = await run(s, one_message(orjson.dumps({"model": "m", "prompt": "hello", "max_tokens": 500})))
    decided = decision_of(admitted)
    assert (decided["decision"], decided["model"], decided["endpoint"], decided["max_tokens"]) == ("admitted", "m", "e:1", 100)
    assert admitted.request_body.response.clear_route_cache
    assert orjson.loads(admitted.request_body.response.body_mutation.body)["max_tokens"] == 100
    assert reserved(s) == 0  # the stream ended: released


@pytest.mark.asyncio
async def test_one_message_checks_the_key_from_its_attributes() -> None:
    s = guarded()
    good = {"model": "m", "prompt": "hi"}
    (admitted,) = await run(s, one_message(orjson.dumps(good), authorization=f"Bearer {KEY}"))
    assert decision_of(admitted)["decision"] == "admitted"
    for bad in ({}, {"authorization": "Bearer nope"}, {"authorization": "\ufffd"}):  # U+FFFD: it was not ASCII
        (refused,) = await run(s, one_message(orjson.dumps(good), **bad))
        assert refused.immediate_response.status.code == 401


@pytest.mark.asyncio
async def test_one_message_to_an_unknown_url_is_refused_in_its_convention() -> None:
    (refused,) = await run(servicer(), one_message(b"{}", path="/v2/nothing"))
    assert refused.immediate_response.status.code == 404
    assert "error" in orjson.loads(refused.immediate_response.body)  # Triton's {"error": "..."}


@pytest.mark.asyncio
async def test_a_grpc_call_names_its_upstream_when_the_engines_grpc_port_is_not_its_address() -> None:
    s = stream_servicer()
    (admitted,) = await run(s, one_message(infer_frame(b"hi", 5), path="/inference.GRPCInferenceService/ModelInfer",
                                           content_type="application/grpc"))
    decided = decision_of(admitted)
    assert (decided["endpoint"], decided["upstream"]) == ("t:1", "t:2")
