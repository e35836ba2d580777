"""The pure parts of the Triton personality: tensor codec and the ensemble's validation."""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from engines.sim.triton_model import (
    TritonError,
    call_from_generate,
    call_from_tensors,
    check_model,
    model_metadata,
)
from engines.sim.triton_tensors import (
    HEADER_LENGTH,
    Tensor,
    TensorError,
    as_values,
    decode_grpc_inputs,
    decode_http_request,
    encode_grpc_outputs,
    encode_http_response,
    serialize_raw,
    wants_binary,
)

from .triton_helpers import llm_inputs


def http_body(binary: bool, **kwargs: object) -> tuple[bytes, str | None]:
    """A request body exactly as tritonclient.http builds it."""
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        llm_inputs(httpclient, binary_data=binary, **kwargs)  # type: ignore[arg-type]
    )
    return body, None if json_size is None else str(json_size)


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_http_bodies_decode_alike(binary: bool) -> None:
    body, header_length = http_body(
        binary, text="Hello, KV", max_tokens=17, stream=True, stop_words=["a b", "c"]
    )
    assert (header_length is not None) == binary
    decoded = decode_http_request(body, header_length)
    assert as_values(decoded.inputs) == {
        "text_input": "Hello, KV", "max_tokens": 17, "stream": True, "stop_words": ["a b", "c"],
    }  # fmt: skip
    assert [(t.name, t.datatype, t.shape) for t in decoded.inputs][:2] == [
        ("text_input", "BYTES", (1, 1)),
        ("max_tokens", "INT32", (1, 1)),
    ]
    call = call_from_tensors("ensemble", decoded.inputs)
    assert call.stream and call.gen.max_tokens == 17 and call.gen.stop == ("a b", "c")
    assert call.gen.prompt_tokens == 3 and call.gen.key == "Hello, KV"


def test_binary_extension_by_hand() -> None:
    text = serialize_raw("BYTES", [b"hi", b"there"])
    assert text == struct.pack("<I", 2) + b"hi" + struct.pack("<I", 5) + b"there"
    assert text == serialize_byte_tensor(np.array([b"hi", b"there"], dtype=object)).item()
    header = {
        "inputs": [
            {"name": "text_input", "datatype": "BYTES", "shape": [1, 2],
             "parameters": {"binary_data_size": len(text)}},
            {"name": "max_tokens", "datatype": "INT32", "shape": [1, 1], "data": [[5]]},
            {"name": "stream", "datatype": "BOOL", "shape": [1, 1],
             "parameters": {"binary_data_size": 1}},
        ]
    }  # fmt: skip
    json_part = orjson.dumps(header)
    decoded = decode_http_request(json_part + text + b"\x01", str(len(json_part)))
    assert as_values(decoded.inputs) == {
        "text_input": ["hi", "there"], "max_tokens": 5, "stream": True,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("body", "header_length", "message"),
    [
        (b"{", None, "failed to parse"),
        (b"[]", None, "JSON object"),
        (b'{"inputs": 3}', None, "'inputs' array"),
        (b'{"inputs": [{"name": "x", "datatype": "STRING", "shape": [1], "data": ["a"]}]}',
         None, "invalid datatype"),
        (b'{"inputs": [{"name": "x", "datatype": "INT32", "shape": [1, 2], "data": [1]}]}',
         None, "unexpected number of elements"),
        (b'{"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [1.5]}]}',
         None, "must be integers"),
        (b'{"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [3000000000]}]}',
         None, "out of range"),
        (b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [1]}]}',
         None, "must be strings"),
        (b'{"inputs": [{"name": "x", "datatype": "INT32", "shape": [-1], "data": []}]}',
         None, "non-negative"),
        (b'{"inputs": [{"name": "x", "datatype": "INT32", "shape": [1]}]}', None, "neither"),
        (b'{"inputs": [{"name": "x", "datatype": "INT32", "shape": [1],'
         b' "parameters": {"binary_data_size": 4}}]}\x01\x00', "101", "unexpected end"),
        (b'{"inputs": [{"name": "x", "datatype": "INT32", "shape": [1],'
         b' "parameters": {"binary_data_size": 2}}]}\x01\x00', "101", "unexpected size"),
        (b'{"inputs": []}xx', "14", "additional input data"),
        (b'{"inputs": []}', "99", "exceeds"),
    ],
)  # fmt: skip
def test_malformed_http_requests(body: bytes, header_length: str | None, message: str) -> None:
    with pytest.raises(TensorError, match=message):
        decode_http_request(body, header_length)


def grpc_request(raw: bool) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="ensemble", id="r1")
    specs = [("text_input", "BYTES", [1, 1]), ("max_tokens", "INT32", [1, 1]),
             ("stream", "BOOL", [1, 1])]  # fmt: skip
    for name, datatype, shape in specs:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
    if raw:
        request.raw_input_contents.extend(
            [struct.pack("<I", 5) + b"hello", struct.pack("<i", 9), b"\x00"]
        )
    else:
        request.inputs[0].contents.bytes_contents.append(b"hello")
        request.inputs[1].contents.int_contents.append(9)
        request.inputs[2].contents.bool_contents.append(False)
    return request


@pytest.mark.parametrize("raw", [True, False])
def test_grpc_inputs_raw_or_typed_contents(raw: bool) -> None:
    inputs = decode_grpc_inputs(grpc_request(raw))
    assert as_values(inputs) == {"text_input": "hello", "max_tokens": 9, "stream": False}


def test_malformed_grpc_requests() -> None:
    request = grpc_request(raw=True)
    del request.raw_input_contents[2]
    with pytest.raises(TensorError, match="raw_input_contents must hold every input"):
        decode_grpc_inputs(request)
    request = grpc_request(raw=True)
    request.raw_input_contents[1] = b"\x01\x00"
    with pytest.raises(TensorError, match="unexpected size 2"):
        decode_grpc_inputs(request)
    request = grpc_request(raw=True)
    request.raw_input_contents[0] = struct.pack("<I", 9) + b"short"
    with pytest.raises(TensorError, match="truncated"):
        decode_grpc_inputs(request)
    request = grpc_request(raw=False)
    request.inputs[1].contents.int_contents.append(1)
    with pytest.raises(TensorError, match="unexpected number of elements"):
        decode_grpc_inputs(request)


def test_http_response_json_and_binary() -> None:
    tensor = Tensor("text_output", "BYTES", (1, 1), ("héllo".encode(),))
    body, header_length = encode_http_response("ensemble", "1", "id7", [(tensor, False)])
    assert header_length is None
    assert orjson.loads(body) == {
        "model_name": "ensemble", "model_version": "1", "id": "id7",
        "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [1, 1],
                     "data": ["héllo"]}],
    }  # fmt: skip
    body, header_length = encode_http_response("ensemble", "1", None, [(tensor, True)])
    assert header_length is not None
    result = httpclient.InferenceServerClient.parse_response_body(body, header_length=header_length)
    assert result.as_numpy("text_output").tolist() == [["héllo".encode()]]


def test_binary_output_choice() -> None:
    assert wants_binary({"parameters": {"binary_data_output": True}}, {})
    assert not wants_binary({"parameters": {"binary_data_output": True}}, {"binary_data": False})
    assert wants_binary({}, {"binary_data": True})
    assert not wants_binary({}, {})


def test_grpc_outputs_are_raw_contents() -> None:
    outputs, raw = encode_grpc_outputs([Tensor("text_output", "BYTES", (1, 1), (b"abc",))])
    assert (outputs[0].name, outputs[0].datatype, list(outputs[0].shape)) == (
        "text_output", "BYTES", [1, 1],
    )  # fmt: skip
    assert deserialize_bytes_tensor(raw[0]).tolist() == [b"abc"]


def tensors(**overrides: Tensor | None) -> list[Tensor]:
    base: dict[str, Tensor | None] = {
        "text_input": Tensor("text_input", "BYTES", (1, 1), (b"hi",)),
        "max_tokens": Tensor("max_tokens", "INT32", (1, 1), (3,)),
    }
    return [t for t in {**base, **overrides}.values() if t is not None]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"text_input": None}, r"missing required input\(s\) \['text_input'\]"),
        ({"max_tokens": None}, r"missing required input\(s\) \['max_tokens'\]"),
        ({"max_tokens": Tensor("max_tokens", "FP32", (1, 1), (3.0,))},
         "data-type is 'FP32', but model 'ensemble' expects 'INT32'"),
        ({"max_tokens": Tensor("max_tokens", "INT32", (1,), (3,))}, "unexpected shape"),
        ({"max_tokens": Tensor("max_tokens", "INT32", (1, 2), (3, 4))}, "one element"),
        ({"max_tokens": Tensor("max_tokens", "INT32", (1, 1), (0,))}, "at least 1"),
        ({"text_input": Tensor("text_input", "BYTES", (2, 1), (b"a", b"b"))}, "batch size 1"),
        ({"foo": Tensor("foo", "INT32", (1, 1), (1,))}, "unexpected inference input 'foo'"),
    ],
)  # fmt: skip
def test_ensemble_input_validation(overrides: dict[str, Tensor | None], message: str) -> None:
    with pytest.raises(TritonError, match=message) as excinfo:
        call_from_tensors("ensemble", tensors(**overrides))
    assert excinfo.value.kind == TritonError.INVALID


def test_optional_sampling_inputs_are_accepted() -> None:
    extra = Tensor("temperature", "FP32", (1, 1), (0.5,))
    assert call_from_tensors("ensemble", tensors(temperature=extra)).gen.max_tokens == 3


def test_generate_bodies() -> None:
    call = call_from_generate(
        "ensemble",
        {"text_input": "a b", "max_tokens": 4, "stop_words": "", "bad_words": "",
         "pad_id": 2, "stream": True, "some_parameter": {"x": 1}},
    )  # fmt: skip
    assert (call.gen.max_tokens, call.gen.stop, call.stream) == (4, (), True)
    assert call_from_generate("ensemble", {"text_input": "a", "max_tokens": 1}).stream is False
    for bad in ({"max_tokens": 3}, {"text_input": "a", "max_tokens": 2.5},
                {"text_input": 1, "max_tokens": 2}, {"text_input": "a", "max_tokens": True},
                {"text_input": "a", "max_tokens": 2, "stop_words": [1]}, []):  # fmt: skip
        with pytest.raises(TritonError):
            call_from_generate("ensemble", bad)


def test_model_checks_and_metadata() -> None:
    check_model("ensemble", "ensemble", "1")
    check_model("ensemble", "ensemble", "")
    for name, version in (("other", ""), ("ensemble", "2")):
        with pytest.raises(TritonError, match="Request for unknown model") as excinfo:
            check_model("ensemble", name, version)
        assert excinfo.value.kind == TritonError.NOT_FOUND
    metadata = model_metadata("ensemble")
    assert metadata["platform"] == "ensemble" and metadata["versions"] == ["1"]
    inputs = {i["name"]: (i["datatype"], i["shape"]) for i in metadata["inputs"]}
    assert inputs["text_input"] == ("BYTES", [-1, -1])
    assert inputs["max_tokens"] == ("INT32", [-1, -1])
    assert inputs["stream"] == ("BOOL", [-1, -1])
    assert inputs["stop_words"] == ("BYTES", [-1, -1])
    assert metadata["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": [-1, -1]}]


def test_header_length_constant_matches_tritonclient() -> None:
    assert HEADER_LENGTH == "Inference-Header-Content-Length"
