"""The pure parts of watching a ModelStreamInfer stream (ext_proc/triton_grpc.py): ids set and taken
back by appending to the serialized message, and which response ends its request."""

from __future__ import annotations

import pytest
from tritonclient.grpc import service_pb2

from ext_proc import triton_grpc
from ext_proc.triton_grpc import FINAL_RESPONSE, REFUSED_MODEL


def _request() -> service_pb2.ModelInferRequest:
    msg = service_pb2.ModelInferRequest(model_name="ensemble")
    msg.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1])
    msg.raw_input_contents.append(b"\x02\x00\x00\x00hi")
    return msg


@pytest.mark.parametrize("request_id", ["kvgate-0123456789ab-1", "x" * 300])  # a one- and a two-byte length
def test_with_id_sets_the_id_and_keeps_the_rest(request_id: str) -> None:
    tagged = service_pb2.ModelInferRequest.FromString(triton_grpc.with_id(_request().SerializeToString(), request_id))
    assert tagged.id == request_id
    tagged.id = ""
    assert tagged == _request()


def _response(final: bool | None, request_id: str = "kvgate-1", error: str = "") -> service_pb2.ModelStreamInferResponse:
    msg = service_pb2.ModelStreamInferResponse(error_message=error)
    msg.infer_response.id = request_id
    msg.infer_response.model_name = "ensemble"
    msg.infer_response.raw_output_contents.append(b"\x05\x00\x00\x00hello")
    if final is not None:
        msg.infer_response.parameters[FINAL_RESPONSE].bool_param = final
    return msg


def test_without_id_clears_only_the_id() -> None:
    cleared = service_pb2.ModelStreamInferResponse.FromString(triton_grpc.without_id(_response(True).SerializeToString()))
    assert cleared == _response(True, request_id="")


@pytest.mark.parametrize(("final", "error", "last"), [
    (False, "", False),  # a decoupled model's response, more to come
    (True, "", True),  # its last one
    (None, "", True),  # a response without the flag: the request's only one
    (False, "model failed", True),  # an error ends the request whatever the flag says
])
def test_which_response_ends_its_request(final: bool | None, error: str, last: bool) -> None:
    read = triton_grpc.read_stream_response(_response(final, "7", error).SerializeToString())
    assert (read.request_id, read.last) == ("7", last)


def test_a_refused_request_becomes_a_stand_in_and_its_error_the_refusal() -> None:
    (stand_in,) = triton_grpc.deframe(triton_grpc.refused_request("b"))
    assert service_pb2.ModelInferRequest.FromString(stand_in) == service_pb2.ModelInferRequest(
        model_name=REFUSED_MODEL, id="b")
    triton = service_pb2.ModelStreamInferResponse(error_message=f"Request for unknown model: '{REFUSED_MODEL}' is not found")
    triton.infer_response.id = "b"
    error = triton_grpc.read_stream_response(triton.SerializeToString()).with_error("no budget", "llama")
    assert service_pb2.ModelStreamInferResponse.FromString(error) == service_pb2.ModelStreamInferResponse(
        error_message="no budget", infer_response=service_pb2.ModelInferResponse(id="b", model_name="llama"))


def test_an_unreadable_refused_message_has_no_id() -> None:
    assert triton_grpc.read_stream_request(b"\xff" * 12) == service_pb2.ModelInferRequest()
