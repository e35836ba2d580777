"""One long-lived ModelStreamInfer stream through the real Envoy to the simulated Triton: each request
gives its KV reservation back at its last response, a request refused mid-stream gets its own error
and the stream goes on, and a cancelled stream releases what it holds."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from kvgate.catalog import parse_catalog
from kvgate.cli.gateway import Gateway
from tests.integration.conftest import reserved, sim_requests, start_gateway, wait_for

FAST, SLOW = "quick-tri", "slow-tri"
_SHAPE = {"protocol": "triton", "backend_model": "ensemble", "endpoints": ["sim"], "max_context_tokens": 64,
          "max_output_tokens": 48, "tokens_per_block": 16,
          # Room for four one-block requests at once: a stream holding its finished requests fills it.
          "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "64KiB"}}
CATALOG = {"models": [
    {"name": FAST, **_SHAPE, "sim": {"ttft_base_ms": 0, "ttft_per_token_ms": 0, "itl_ms": 0, "batch_slowdown": 0}},
    {"name": SLOW, **_SHAPE, "sim": {"ttft_base_ms": 1, "ttft_per_token_ms": 0, "itl_ms": 50, "batch_slowdown": 0}},
], "priority_classes": [{"name": "interactive", "max_wait_s": 0}]}
FINAL = "triton_final_response"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(parse_catalog(CATALOG), Path(tmp_path_factory.mktemp("grpc-stream")))
    yield gw
    gw.stop()


def inputs(text: str, max_tokens: int, stream: bool = False) -> list[tgrpc.InferInput]:
    values = {"text_input": ("BYTES", np.array([[text.encode()]], dtype=object)),
              "max_tokens": ("INT32", np.array([[max_tokens]], dtype=np.int32)),
              "stream": ("BOOL", np.array([[stream]], dtype=bool))}
    out = []
    for name, (datatype, value) in values.items():
        tensor = tgrpc.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(value)
        out.append(tensor)
    return out


class Results:
    """A tritonclient stream's callback: every result or error, in arrival order."""

    def __init__(self) -> None:
        self.items: list[tgrpc.InferResult | InferenceServerException] = []
        self._arrived = threading.Condition()

    def __call__(self, result: tgrpc.InferResult | None, error: InferenceServerException | None) -> None:
        with self._arrived:
            self.items.append(error or result)
            self._arrived.notify_all()

    def wait(self, count: int, timeout_s: float = 30) -> list[tgrpc.InferResult | InferenceServerException]:
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.items) >= count, timeout_s):
                raise AssertionError(f"{len(self.items)} of {count} results after {timeout_s} s")
            return list(self.items)


def final(response: service_pb2.ModelInferResponse) -> bool:
    """A request's last response: Triton flags those of a decoupled model, a model that is not
    decoupled sends one."""
    return FINAL not in response.parameters or response.parameters[FINAL].bool_param


def last(item: tgrpc.InferResult | InferenceServerException) -> bool:
    return isinstance(item, InferenceServerException) or final(item.get_response())


def text(result: tgrpc.InferResult) -> str:
    return result.as_numpy("text_output").reshape(-1)[0].decode()


def sequential_stream(gw: Gateway, model: str, count: int, max_tokens: int, decoupled_every: int) -> None:
    """`count` requests on one tritonclient stream, each sent after the previous one's last response,
    with nothing held in between: every `decoupled_every`-th one is decoupled (a response per token),
    every other one has no id (the gateway gives it one, and the client must never see it)."""
    results = Results()
    seen = 0
    with tgrpc.InferenceServerClient(gw.url.removeprefix("http://")) as client:
        client.start_stream(callback=results)
        try:
            for i in range(count):
                assert reserved(gw, model) == 0, f"request {i}: something is still held"
                request_id = str(i) if i % 2 else ""
                decoupled = i % decoupled_every == 0
                client.async_stream_infer(model, inputs(f"request {i}", max_tokens, decoupled), request_id=request_id)
                while True:
                    seen += 1
                    item = results.wait(seen)[seen - 1]
                    assert not isinstance(item, InferenceServerException), f"request {i}: {item}"
                    assert item.get_response().id == request_id
                    if last(item):
                        break
        finally:
            client.stop_stream()
    assert reserved(gw, model) == 0


def test_thousand_sequential_requests_on_one_stream_hold_only_the_one_in_flight(gateway: Gateway) -> None:
    """Without per-request release the fifth request would find the budget full."""
    sequential_stream(gateway, FAST, 1000, max_tokens=8, decoupled_every=3)


def test_request_refused_mid_stream_gets_its_error_and_the_next_one_runs(gateway: Gateway) -> None:
    marker = uuid.uuid4().hex
    results = Results()
    with tgrpc.InferenceServerClient(gateway.url.removeprefix("http://")) as client:
        client.start_stream(callback=results)
        try:
            client.async_stream_infer(SLOW, inputs(f"{marker} holder", 40), request_id="holder")
            wait_for(lambda: reserved(gateway, SLOW) > 0, what="the holder's reservation")
            client.async_stream_infer(SLOW, inputs(f"{marker} too much", 40), request_id="too-much")
            (refused,) = results.wait(1)  # before the holder's answer: it does not wait behind it
            assert isinstance(refused, InferenceServerException)
            assert "KV-cache budget" in refused.message() and "'too-much'" in refused.message()
            holder = results.wait(2)[1]
            assert not isinstance(holder, InferenceServerException) and text(holder)
            assert reserved(gateway, SLOW) == 0
            client.async_stream_infer(SLOW, inputs(f"{marker} next", 5), request_id="next")
            after = results.wait(3)[2]
            assert not isinstance(after, InferenceServerException) and after.get_response().id == "next"
        finally:
            client.stop_stream()
    ran = [r["body"]["inputs"]["text_input"] for r in sim_requests(gateway, SLOW) if marker in str(r["body"])]
    assert ran == [f"{marker} holder", f"{marker} next"]


def stream_request(model: str, request_id: str, max_tokens: int = 3) -> service_pb2.ModelInferRequest:
    message = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    prompt = f"raw {request_id}".encode()
    message.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1])
    message.raw_input_contents.append(len(prompt).to_bytes(4, "little") + prompt)
    message.inputs.add(name="max_tokens", datatype="INT32", shape=[1, 1])
    message.raw_input_contents.append(max_tokens.to_bytes(4, "little"))
    return message


@pytest.mark.parametrize(("model", "error"), [
    (SLOW, f"this stream serves model '{FAST}', not '{SLOW}'"),
    ("nope", "The model 'nope' does not exist."),
])
def test_refusal_on_the_wire_names_the_request_and_its_model(gateway: Gateway, model: str, error: str) -> None:
    """What tritonclient hides: the refusal is a ModelStreamInferResponse for the refused id, in
    order with the others (the client may send an id more than once)."""
    sent = [stream_request(FAST, "a"), stream_request(model, "b"), stream_request(FAST, "a"), stream_request("", "")]
    with grpc.insecure_channel(gateway.url.removeprefix("http://")) as channel:
        call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(sent), timeout=30)
        answers = [next(call) for _ in sent]
        call.cancel()
    by_id = {}
    for a in answers:
        by_id.setdefault(a.infer_response.id, []).append(a)
    assert [a.error_message for a in by_id["a"]] == ["", ""]
    (refused,) = by_id["b"]
    assert refused.error_message == f"{error} (request id 'b')"
    assert refused.infer_response.model_name == model
    (no_id,) = by_id[""]
    assert no_id.error_message.startswith("model_name is required")
    wait_for(lambda: reserved(gateway, FAST) == 0, what="every reservation released")


def test_cancelled_stream_releases_what_it_holds(gateway: Gateway) -> None:
    results = Results()
    with tgrpc.InferenceServerClient(gateway.url.removeprefix("http://")) as client:
        client.start_stream(callback=results)
        try:
            for i in range(2):
                client.async_stream_infer(SLOW, inputs(f"long {i}", 20, stream=True), request_id=str(i))
            wait_for(lambda: reserved(gateway, SLOW) > 0 and len(results.items) > 2, what="both running")
        finally:
            client.stop_stream(cancel_requests=True)
    wait_for(lambda: reserved(gateway, SLOW) == 0, what="release at the stream's end")
