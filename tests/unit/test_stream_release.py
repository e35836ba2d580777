"""A ModelStreamInfer stream's requests released one by one at their last responses
(ext_proc/stream_exchange.py), driven through the ExternalProcessor handler with real ext_proc protos."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from tritonclient.grpc import service_pb2

from envoy.service.ext_proc.v3.external_processor_pb2 import HttpBody, ProcessingRequest, ProcessingResponse
from ext_proc import triton_grpc
from ext_proc.server import ExtProcServicer
from tests.unit.test_ext_proc_servicer import chunk, grpc_headers, reserved_of, stream_servicer


def request(request_id: str, max_tokens: int = 5, model: str = "t", empty_final: bool = False) -> bytes:
    msg = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    if empty_final:
        msg.parameters[triton_grpc.EMPTY_FINAL].bool_param = True
    msg.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(b"hello")
    msg.inputs.add(name="max_tokens", datatype="INT32", shape=[1, 1]).contents.int_contents.append(max_tokens)
    return triton_grpc.frame(msg.SerializeToString())


def response(request_id: str, final: bool, error: str = "", text: bytes | None = b"w0") -> bytes:
    """One streamed response: a token of text (None: the empty final response, a flag alone)."""
    msg = service_pb2.ModelStreamInferResponse(error_message=error)
    msg.infer_response.id = request_id
    if text is not None and not error:
        msg.infer_response.outputs.add(name="text_output", datatype="BYTES", shape=[1])
        msg.infer_response.raw_output_contents.append(text)
    msg.infer_response.parameters[triton_grpc.FINAL_RESPONSE].bool_param = final
    return triton_grpc.frame(msg.SerializeToString())


def response_chunk(data: bytes) -> ProcessingRequest:
    return ProcessingRequest(response_body=HttpBody(body=data))


class Stream:
    """One ext_proc stream, fed a message at a time: each answer is read before the next goes in."""

    def __init__(self, s: ExtProcServicer) -> None:
        self.incoming: asyncio.Queue[ProcessingRequest | None] = asyncio.Queue()
        self.answers = s.Process(self._feed(), None)  # type: ignore[arg-type]

    async def _feed(self) -> AsyncIterator[ProcessingRequest]:
        while (msg := await self.incoming.get()) is not None:
            yield msg

    async def send(self, msg: ProcessingRequest, answers: int = 1) -> list[ProcessingResponse]:
        await self.incoming.put(msg)
        # A bound on a wrong count of answers, which would wait forever (not a synchronisation).
        return [await asyncio.wait_for(anext(self.answers), 10) for _ in range(answers)]

    async def end(self) -> None:
        await self.incoming.put(None)
        assert [r async for r in self.answers] == []


def sent_upstream(reply: ProcessingResponse) -> list[service_pb2.ModelInferRequest]:
    return [service_pb2.ModelInferRequest.FromString(m)
            for m in triton_grpc.deframe(reply.request_body.response.body_mutation.body)]


@pytest.mark.asyncio
async def test_each_request_is_released_at_its_last_response() -> None:
    s = stream_servicer()
    stream = Stream(s)
    await stream.send(grpc_headers())  # wait longer: no message yet
    _, routed = await stream.send(chunk(request("a") + request("")), answers=2)  # headers, body
    a, given = sent_upstream(routed)
    assert a.id == "a" and given.id.startswith("kvgate-")
    both = reserved_of(s, "t")
    (passed,) = await stream.send(response_chunk(response("a", final=False)))
    assert not passed.response_body.HasField("response")  # untouched: nothing to change in it
    assert reserved_of(s, "t") == both
    last_of_a = response("a", final=True)
    (held,) = await stream.send(response_chunk(last_of_a[:7]))
    assert held.response_body.response.body_mutation.clear_body  # a frame still arriving
    (whole,) = await stream.send(response_chunk(last_of_a[7:]))
    assert whole.response_body.response.body_mutation.body == last_of_a
    assert 0 < reserved_of(s, "t") < both
    (cleared,) = await stream.send(response_chunk(response(given.id, final=True)))
    (answer,) = triton_grpc.deframe(cleared.response_body.response.body_mutation.body)
    assert service_pb2.ModelStreamInferResponse.FromString(answer).infer_response.id == ""  # as the client sent it
    assert reserved_of(s, "t") == 0
    await stream.end()


@pytest.mark.asyncio
async def test_refused_request_goes_upstream_as_a_stand_in_answered_with_the_refusal() -> None:
    s = stream_servicer()
    stream = Stream(s)
    await stream.send(grpc_headers())
    await stream.send(chunk(request("a")), answers=2)
    (stand_in_reply,) = await stream.send(chunk(request("b", model="other")))
    (stand_in,) = sent_upstream(stand_in_reply)
    assert (stand_in.model_name, stand_in.id, list(stand_in.inputs)) == (triton_grpc.REFUSED_MODEL, "b", [])
    unknown = f"Request for unknown model: '{triton_grpc.REFUSED_MODEL}' is not found"
    (error_reply,) = await stream.send(response_chunk(response("b", final=False, error=unknown)))
    (error,) = triton_grpc.deframe(error_reply.response_body.response.body_mutation.body)
    told = service_pb2.ModelStreamInferResponse.FromString(error)
    assert told.error_message == "The model 'other' does not exist. (request id 'b')"
    assert (told.infer_response.id, told.infer_response.model_name) == ("b", "other")
    assert reserved_of(s, "t") > 0  # "a" is still in flight
    await stream.end()
    assert reserved_of(s, "t") == 0  # released with the stream


@pytest.mark.asyncio
async def test_the_empty_final_response_ends_a_request_and_reaches_only_clients_that_asked() -> None:
    """A model may send its final flag alone (TensorRT-LLM's BLS does): Triton shows that only as an
    empty final response, which the gateway asks for, reads to release the request, and keeps from a
    client that did not ask for it."""
    s = stream_servicer()
    stream = Stream(s)
    await stream.send(grpc_headers())
    _, routed = await stream.send(chunk(request("a") + request("b", empty_final=True)), answers=2)
    assert [triton_grpc.asks_empty_final(m) for m in sent_upstream(routed)] == [True, True]
    both = reserved_of(s, "t")
    await stream.send(response_chunk(response("a", final=False)))
    (hidden,) = await stream.send(response_chunk(response("a", final=True, text=None)))
    assert hidden.response_body.response.body_mutation.clear_body  # the client never sees it
    assert 0 < reserved_of(s, "t") < both
    (shown,) = await stream.send(response_chunk(response("b", final=True, text=None)))
    assert not shown.response_body.HasField("response")  # "b" asked for it: as Triton sent it
    assert reserved_of(s, "t") == 0
    await stream.end()
