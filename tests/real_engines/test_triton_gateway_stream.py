"""ModelStreamInfer through the gateway to the real Triton (decoupled models): each request on a
long-lived stream gives its reservation back at its last response, and one refused mid-stream gets its
own error while the stream goes on."""

from __future__ import annotations

import grpc
import tritonclient.grpc as tgrpc
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from kvgate.cli.gateway import Gateway
from tests.integration.conftest import reserved
from tests.integration.conftest import wait_for
from tests.integration.test_grpc_stream_release import Results, final, inputs, sequential_stream, stream_request
from tests.real_engines.triton_fixture import TOKENS_PER_BLOCK
from tests.real_engines.triton_gateway_fixture import BLS, BUDGET, KV_BYTES_PER_TOKEN, MODEL

MAX_TOKENS = 16  # as measured: 28 of these, each finished, filled this budget when held to the stream's end
REQUESTS = 60


def test_sequential_requests_on_one_stream_never_fill_the_budget(triton_gateway: Gateway) -> None:
    assert REQUESTS * 2 * TOKENS_PER_BLOCK * KV_BYTES_PER_TOKEN > BUDGET  # had they all been held
    sequential_stream(triton_gateway, MODEL, REQUESTS, MAX_TOKENS, decoupled_every=1)


def test_request_refused_mid_stream_is_answered_by_triton_for_its_id(triton_gateway: Gateway) -> None:
    """The stand-in goes to the real Triton, which echoes its id in an error; the gateway's text
    replaces Triton's, and the stream serves the next request."""
    sent = [stream_request(MODEL, "a"), stream_request("nope", "b"), stream_request(MODEL, "c")]
    with grpc.insecure_channel(triton_gateway.url.removeprefix("http://")) as channel:
        call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(sent), timeout=60)
        answers = []
        while {a.infer_response.id for a in answers if a.error_message or final(a.infer_response)} != {"a", "b", "c"}:
            answers.append(next(call))
        call.cancel()
    errors = {a.infer_response.id: a.error_message for a in answers if a.error_message}
    assert errors == {"b": "The model 'nope' does not exist. (request id 'b')"}
    assert reserved(triton_gateway, MODEL) == 0


def test_bls_requests_ending_with_a_bare_final_flag_are_released(triton_gateway: Gateway) -> None:
    """TensorRT-LLM's BLS model (and the fixture's) streams a request's tokens, then sends its final
    flag alone, which Triton shows a client only as an empty final response the client must ask for.
    This client does not: it sees its tokens and nothing more, while the gateway (which asks for it)
    releases each request at that flag."""
    assert REQUESTS * 2 * TOKENS_PER_BLOCK * KV_BYTES_PER_TOKEN > BUDGET  # had they all been held
    results = Results()
    with tgrpc.InferenceServerClient(triton_gateway.url.removeprefix("http://")) as client:
        client.start_stream(callback=results)
        try:
            for i in range(REQUESTS):
                client.async_stream_infer(BLS, inputs(f"request {i}", 4, stream=True), request_id=str(i))
                mine = results.wait(4 * (i + 1))[4 * i:]
                assert not [r for r in mine if isinstance(r, InferenceServerException)], mine
                assert [r.get_response().id for r in mine] == [str(i)] * 4
                assert not [r for r in mine if final(r.get_response())]  # the end is never shown
                wait_for(lambda: reserved(triton_gateway, BLS) == 0, f"request {i} released at its final flag")
        finally:
            client.stop_stream()
    assert len(results.items) == 4 * REQUESTS  # no empty final response reached the client
