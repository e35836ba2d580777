"""ext_proc/triton_grpc.py: gRPC framing, ModelInfer in both tensor styles (`contents` and
`raw_input_contents`, as tritonclient.grpc sends), and the lookups that only name a model."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2
from tritonclient.utils import deserialize_bytes_tensor

from ext_proc.kserve import MAX_TOKENS, TEXT_INPUT
from ext_proc.request import ProtocolError
from ext_proc.triton_grpc import (
    LOOKUP_METHODS,
    MAX_PACKED_VARINTS,
    MAX_WIRE_FIELDS,
    CompressedMessage,
    InferRequest,
    deframe,
    frame,
    lookup_parser,
    parse_infer,
    parse_stream_message,
)

try:  # tritonclient's own request builder (internal): the exact message tritonclient.grpc sends
    from tritonclient.grpc._utils import _get_inference_request
except ImportError:  # pragma: no cover - other tritonclient versions
    _get_inference_request = None

MODEL = "llama"
ENGINE = "ensemble"


# --- builders ----------------------------------------------------------------------------------

def raw_bytes(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


def contents_request(prompts: list[bytes], max_tokens: list[int] | None = None, *, model: str = MODEL,
                     dtype: str = "INT32") -> service_pb2.ModelInferRequest:
    """Tensors in `contents` (bytes_contents, int_contents / int64_contents)."""
    msg = service_pb2.ModelInferRequest(model_name=model, id="req-1")
    t = msg.inputs.add(name=TEXT_INPUT, datatype="BYTES", shape=[len(prompts), 1])
    t.contents.bytes_contents.extend(prompts)
    if max_tokens is not None:
        m = msg.inputs.add(name=MAX_TOKENS, datatype=dtype, shape=[len(max_tokens), 1])
        (m.contents.int64_contents if dtype == "INT64" else m.contents.int_contents).extend(max_tokens)
    return msg


def raw_request(prompts: list[bytes], max_tokens: list[int] | None = None, *, model: str = MODEL,
                dtype: str = "INT32") -> service_pb2.ModelInferRequest:
    """Tensors in raw_input_contents, built by tritonclient.grpc itself when its builder is there."""
    t = grpcclient.InferInput(TEXT_INPUT, [len(prompts), 1], "BYTES")
    t.set_data_from_numpy(np.array([[p] for p in prompts], dtype=object))
    inputs = [t]
    if max_tokens is not None:
        m = grpcclient.InferInput(MAX_TOKENS, [len(max_tokens), 1], dtype)
        m.set_data_from_numpy(np.array([[v] for v in max_tokens], dtype=np.int64 if dtype == "INT64" else np.int32))
        inputs.append(m)
    if _get_inference_request is not None:
        return _get_inference_request(model_name=model, inputs=inputs, model_version="", request_id="req-1",
                                      outputs=None, sequence_id=0, sequence_start=False, sequence_end=False,
                                      priority=0, timeout=None, parameters=None)
    msg = service_pb2.ModelInferRequest(model_name=model, id="req-1")
    for i in inputs:
        msg.inputs.append(i._get_tensor())
        msg.raw_input_contents.append(i._get_content())
    return msg


def wire(msg: Message) -> bytes:
    return frame(msg.SerializeToString())


def parse(msg: service_pb2.ModelInferRequest) -> InferRequest:
    return parse_infer(None, {}, wire(msg))


def parse_error(body: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        parse_infer(None, {}, body)
    return e.value


def rewritten(req: InferRequest, max_tokens: int | None, engine: str = ENGINE) -> service_pb2.ModelInferRequest:
    rw = req.rewrite(max_tokens, engine)
    assert rw is not None
    assert rw.headers == ()
    (message,) = deframe(rw.body)
    return service_pb2.ModelInferRequest.FromString(message)


def tensor(msg: service_pb2.ModelInferRequest, name: str) -> tuple[int, service_pb2.ModelInferRequest.InferInputTensor]:
    return next((i, t) for i, t in enumerate(msg.inputs) if t.name == name)


# --- framing -----------------------------------------------------------------------------------

def test_frame_is_flag_then_big_endian_length() -> None:
    assert frame(b"abc") == b"\x00\x00\x00\x00\x03abc"


def test_deframe_one_message() -> None:
    assert deframe(frame(b"hello")) == [b"hello"]


def test_deframe_two_messages() -> None:
    assert deframe(frame(b"one") + frame(b"")) == [b"one", b""]


def test_deframe_empty_body() -> None:
    assert deframe(b"") == []


def test_deframe_long_length_is_big_endian() -> None:
    payload = b"x" * 300
    body = frame(payload)
    assert body[1:5] == b"\x00\x00\x01\x2c"
    assert deframe(body) == [payload]


@pytest.mark.parametrize("body", [b"\x00\x00\x00", frame(b"ok") + b"\x00\x00"])
def test_deframe_truncated_header(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="frame header"):
        deframe(body)


@pytest.mark.parametrize("body", [frame(b"hello")[:-1], b"\x00\x00\x00\x00\x10short"])
def test_deframe_truncated_message(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="truncated gRPC message"):
        deframe(body)


def test_deframe_compressed_flag() -> None:
    with pytest.raises(CompressedMessage):
        deframe(b"\x01\x00\x00\x00\x02hi")


def test_compressed_message_is_a_protocol_error() -> None:
    assert issubclass(CompressedMessage, ProtocolError)
    with pytest.raises(ProtocolError, match="compressed"):
        parse_infer(None, {}, b"\x01" + wire(contents_request([b"hi"]))[1:])


# --- ModelInfer: parse -------------------------------------------------------------------------

@pytest.mark.parametrize("build", [contents_request, raw_request])
def test_parse_reads_model_prompt_and_max_tokens(build) -> None:  # noqa: ANN001
    req = parse(build(["héllo".encode()], [5000])).request
    assert req.model == MODEL
    assert req.prompts == (("héllo",),)
    assert req.prompt_bytes == (6,)
    assert req.prompt_param == TEXT_INPUT
    assert req.requested_max_tokens == 5000
    assert req.admit


@pytest.mark.parametrize("build", [contents_request, raw_request])
def test_parse_batch(build) -> None:  # noqa: ANN001
    req = parse(build([b"a", b"bcd"], [10, 30])).request
    assert req.prompts == (("a",), ("bcd",))
    assert req.prompt_bytes == (1, 3)
    assert req.requested_max_tokens == 30


@pytest.mark.parametrize("build", [contents_request, raw_request])
def test_parse_invalid_utf8_is_replaced_and_never_counts_fewer_bytes(build) -> None:  # noqa: ANN001
    raw = b"\xf0\x9f\x98 \xc0"  # an emoji cut short, then a byte that never starts UTF-8
    req = parse(build([raw])).request
    assert req.prompts == (("\ufffd \ufffd",),)
    assert req.prompt_bytes == (7,)
    assert req.prompt_bytes[0] >= len(raw)


@pytest.mark.parametrize("build", [contents_request, raw_request])
def test_parse_without_max_tokens(build) -> None:  # noqa: ANN001
    assert parse(build([b"hi"])).request.requested_max_tokens is None


@pytest.mark.parametrize("build", [contents_request, raw_request])
def test_parse_int64_max_tokens(build) -> None:  # noqa: ANN001
    assert parse(build([b"hi"], [77], dtype="INT64")).request.requested_max_tokens == 77


def test_parse_model_from_body_not_argument() -> None:
    assert parse_infer("ignored", {}, wire(contents_request([b"hi"]))).request.model == MODEL


def test_raw_request_is_really_raw() -> None:
    msg = raw_request([b"hi"], [5000])
    assert list(msg.raw_input_contents) == [raw_bytes(b"hi"), struct.pack("<i", 5000)]
    assert not msg.inputs[0].HasField("contents")


def test_missing_model_name() -> None:
    e = parse_error(wire(contents_request([b"hi"], model="")))
    assert e.param == "model_name"


@pytest.mark.parametrize("build", [contents_request, raw_request])
def test_missing_text_input(build) -> None:  # noqa: ANN001
    msg = build([b"hi"], [5])
    del msg.inputs[0]
    if msg.raw_input_contents:
        del msg.raw_input_contents[0]
    assert parse_error(wire(msg)).param == TEXT_INPUT


def test_text_input_wrong_dtype() -> None:
    msg = contents_request([b"hi"])
    msg.inputs[0].datatype = "INT32"
    e = parse_error(wire(msg))
    assert e.param == TEXT_INPUT and "BYTES" in str(e)


@pytest.mark.parametrize("build", [contents_request, raw_request])
def test_max_tokens_fp32(build) -> None:  # noqa: ANN001
    msg = build([b"hi"], [5])
    msg.inputs[1].datatype = "FP32"
    e = parse_error(wire(msg))
    assert e.param == MAX_TOKENS and "FP32" in str(e)


def test_max_tokens_int32_values_in_wrong_contents_field() -> None:
    msg = contents_request([b"hi"], [5])
    msg.inputs[1].contents.ClearField("int_contents")
    msg.inputs[1].contents.fp32_contents.append(5.0)
    assert parse_error(wire(msg)).param == MAX_TOKENS


@pytest.mark.parametrize("build", [contents_request, raw_request])
def test_max_tokens_zero(build) -> None:  # noqa: ANN001
    assert parse_error(wire(build([b"hi"], [0]))).param == MAX_TOKENS


def test_text_count_vs_shape() -> None:
    msg = contents_request([b"a", b"b"])
    msg.inputs[0].shape[:] = [1, 1]
    assert parse_error(wire(msg)).param == TEXT_INPUT


def test_empty_text_tensor() -> None:
    msg = contents_request([b"a"])
    msg.inputs[0].shape[:] = [0, 1]
    msg.inputs[0].contents.ClearField("bytes_contents")
    assert parse_error(wire(msg)).param == TEXT_INPUT


def test_max_tokens_count_vs_shape() -> None:
    msg = contents_request([b"a"], [5])
    msg.inputs[1].shape[:] = [2, 1]
    assert parse_error(wire(msg)).param == MAX_TOKENS


def test_negative_shape() -> None:
    msg = contents_request([b"a"])
    msg.inputs[0].shape[:] = [-1, 1]
    assert parse_error(wire(msg)).param == TEXT_INPUT


def test_raw_truncated_bytes_element() -> None:
    msg = raw_request([b"hello"])
    msg.raw_input_contents[0] = msg.raw_input_contents[0][:-1]
    assert parse_error(wire(msg)).param == TEXT_INPUT


def test_raw_max_tokens_partial_int() -> None:
    msg = raw_request([b"hi"], [5])
    msg.raw_input_contents[1] = b"\x05\x00\x00"
    assert parse_error(wire(msg)).param == MAX_TOKENS


@pytest.mark.parametrize("change", ["drop", "extra"])
def test_raw_contents_count_must_match_inputs(change: str) -> None:
    msg = raw_request([b"hi"], [5])
    if change == "drop":
        del msg.raw_input_contents[1]
    else:
        msg.raw_input_contents.append(b"\x00" * 4)
    assert "raw_input_contents" in str(parse_error(wire(msg)))


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x01\xff", b"\x2a\x80"])
def test_malformed_protobuf(garbage: bytes) -> None:
    e = parse_error(frame(garbage))
    assert "malformed ModelInferRequest" in str(e)


def test_two_messages_for_unary_call() -> None:
    body = wire(contents_request([b"hi"]))
    assert "one message" in str(parse_error(body + body))


def test_empty_body() -> None:
    assert "one message" in str(parse_error(b""))


# --- ModelInfer: rewrite -----------------------------------------------------------------------

@pytest.mark.parametrize("build", [contents_request, raw_request])
def test_rewrite_none_when_nothing_changes(build) -> None:  # noqa: ANN001
    req = parse(build([b"hi"], [50], model=ENGINE))
    assert req.rewrite(100, ENGINE) is None
    assert req.rewrite(50, ENGINE) is None
    assert req.rewrite(None, ENGINE) is None


@pytest.mark.parametrize("build", [contents_request, raw_request])
def test_rewrite_sets_engine_model_only(build) -> None:  # noqa: ANN001
    original = build([b"hi"], [50])
    out = rewritten(parse(original), 100)
    assert out.model_name == ENGINE
    out.model_name = MODEL
    assert out == original


def test_rewrite_model_only_with_max_tokens_none() -> None:
    out = rewritten(parse(contents_request([b"hi"], [5000])), None)
    assert out.model_name == ENGINE
    assert list(tensor(out, MAX_TOKENS)[1].contents.int_contents) == [5000]


def test_rewrite_clamps_contents_style() -> None:
    out = rewritten(parse(contents_request([b"a", b"b"], [50, 5000])), 100)
    _, t = tensor(out, MAX_TOKENS)
    assert list(t.contents.int_contents) == [50, 100]
    assert len(out.raw_input_contents) == 0
    assert out.id == "req-1"
    assert list(out.inputs[0].contents.bytes_contents) == [b"a", b"b"]


def test_rewrite_clamps_contents_style_int64() -> None:
    out = rewritten(parse(contents_request([b"a"], [5000], dtype="INT64")), 100)
    _, t = tensor(out, MAX_TOKENS)
    assert t.datatype == "INT64"
    assert list(t.contents.int64_contents) == [100]
    assert list(t.contents.int_contents) == []


def test_rewrite_clamps_raw_style() -> None:
    original = raw_request([b"a", b"b"], [50, 5000])
    out = rewritten(parse(original), 100)
    i, t = tensor(out, MAX_TOKENS)
    assert not t.HasField("contents")
    assert np.frombuffer(out.raw_input_contents[i], dtype=np.int32).tolist() == [50, 100]
    assert out.raw_input_contents[0] == original.raw_input_contents[0]
    assert deserialize_bytes_tensor(out.raw_input_contents[0]).tolist() == [b"a", b"b"]


def test_rewrite_clamps_raw_style_int64() -> None:
    out = rewritten(parse(raw_request([b"a"], [5000], dtype="INT64")), 100)
    i, _ = tensor(out, MAX_TOKENS)
    assert np.frombuffer(out.raw_input_contents[i], dtype=np.int64).tolist() == [100]


def test_rewrite_adds_max_tokens_contents_style() -> None:
    out = rewritten(parse(contents_request([b"a", b"b", b"c"])), 64)
    _, t = tensor(out, MAX_TOKENS)
    assert t.datatype == "INT32"
    assert list(t.shape) == [3, 1]
    assert list(t.contents.int_contents) == [64, 64, 64]
    assert len(out.raw_input_contents) == 0


def test_rewrite_adds_max_tokens_raw_style() -> None:
    out = rewritten(parse(raw_request([b"a", b"b"])), 64)
    i, t = tensor(out, MAX_TOKENS)
    assert (t.datatype, list(t.shape)) == ("INT32", [2, 1])
    assert not t.HasField("contents")
    assert len(out.raw_input_contents) == len(out.inputs) == 2
    assert np.frombuffer(out.raw_input_contents[i], dtype=np.int32).tolist() == [64, 64]


@pytest.mark.parametrize("build", [contents_request, raw_request])
@pytest.mark.parametrize("max_tokens", [[5000], None])
def test_rewrite_round_trips_through_parse(build, max_tokens: list[int] | None) -> None:  # noqa: ANN001
    req = parse(build([b"hey"], max_tokens))
    rw = req.rewrite(100, ENGINE)
    assert rw is not None
    again = parse_infer(None, {}, rw.body).request
    assert again.model == ENGINE
    assert again.prompt_bytes == (3,)
    assert again.requested_max_tokens == 100


# --- lookups -----------------------------------------------------------------------------------

LOOKUP_CLASSES = {"ModelReady": service_pb2.ModelReadyRequest, "ModelMetadata": service_pb2.ModelMetadataRequest,
                  "ModelConfig": service_pb2.ModelConfigRequest,
                  "ModelStatistics": service_pb2.ModelStatisticsRequest}


def test_lookup_methods() -> None:
    assert LOOKUP_METHODS == frozenset(LOOKUP_CLASSES)


@pytest.mark.parametrize("method", sorted(LOOKUP_CLASSES))
def test_lookup_reads_name_and_does_not_admit(method: str) -> None:
    req = lookup_parser(method)(None, {}, wire(LOOKUP_CLASSES[method](name=MODEL, version="1"))).request
    assert req.model == MODEL
    assert req.admit is False


@pytest.mark.parametrize("method", ["ModelReady", "ModelMetadata"])
def test_lookup_rewrite_renames_to_engine(method: str) -> None:
    cls = LOOKUP_CLASSES[method]
    rw = lookup_parser(method)(None, {}, wire(cls(name=MODEL, version="1"))).rewrite(None, ENGINE)
    assert rw is not None
    (message,) = deframe(rw.body)
    assert cls.FromString(message) == cls(name=ENGINE, version="1")


@pytest.mark.parametrize("method", ["ModelReady", "ModelMetadata"])
def test_lookup_rewrite_none_when_engine_name_same(method: str) -> None:
    parsed = lookup_parser(method)(None, {}, wire(LOOKUP_CLASSES[method](name=ENGINE)))
    assert parsed.rewrite(None, ENGINE) is None
    assert parsed.rewrite(100, ENGINE) is None


def test_lookup_missing_name() -> None:
    with pytest.raises(ProtocolError) as e:
        lookup_parser("ModelReady")(None, {}, wire(service_pb2.ModelReadyRequest(version="1")))
    assert e.value.param == "name"


def test_lookup_malformed() -> None:
    with pytest.raises(ProtocolError, match="malformed ModelMetadataRequest"):
        lookup_parser("ModelMetadata")(None, {}, frame(b"\xff\xff\xff"))


def test_lookup_unknown_method() -> None:
    with pytest.raises(KeyError):
        lookup_parser("ModelInfer")


# --- what Triton would read differently, and caps before upb builds anything ----------------------

def test_duplicate_input_names_are_refused_naming_the_input() -> None:
    msg = contents_request([b"hi"], [5])
    msg.inputs.add(name=MAX_TOKENS, datatype="INT32", shape=[1, 1]).contents.int_contents.append(100000)
    e = parse_error(wire(msg))
    assert e.param == "inputs" and f"'{MAX_TOKENS}' appears twice" in str(e)


def test_contents_beside_raw_input_contents_is_refused() -> None:
    msg = raw_request([b"hi"], [5])
    msg.inputs[1].contents.int_contents.append(100000)
    assert parse_error(wire(msg)).param == MAX_TOKENS


def test_repeated_scalar_field_is_last_wins_as_everywhere() -> None:
    """Protobuf's rule in every runtime (Triton's C++ one too): no differential to refuse."""
    body = frame(contents_request([b"hi"]).SerializeToString() + service_pb2.ModelInferRequest(
        model_name="other").SerializeToString())
    assert parse_infer(None, {}, body).request.model == "other"


def _padded(extra: bytes) -> bytes:
    return frame(contents_request([b"hi"], [5]).SerializeToString() + extra)


@pytest.mark.parametrize(("extra", "says"), [
    (b"\x2a\x00" * (MAX_WIRE_FIELDS + 1), "fields"),  # empty inputs
    (b"\x3a\x00" * (MAX_WIRE_FIELDS + 1), "fields"),  # empty raw_input_contents
    (b"\x0a\x01m" * (MAX_WIRE_FIELDS + 1), "fields"),  # model_name again and again
    (b"\x22\x00" * (MAX_WIRE_FIELDS + 1), "fields"),  # empty parameters entries
])
def test_messages_of_many_tiny_fields_are_refused_before_decoding(extra: bytes, says: str) -> None:
    assert says in str(parse_error(_padded(extra)))


def test_packed_integers_over_the_cap_are_refused() -> None:
    msg = contents_request([b"hi"])
    msg.inputs[0].shape[:] = [1] * (MAX_PACKED_VARINTS + 1)
    assert "packed integers" in str(parse_error(wire(msg)))


def test_groups_are_malformed() -> None:
    assert "wire type" in str(parse_error(_padded(b"\x0b" + b"\x00" * 3000)))


def test_scan_accepts_what_upb_accepts() -> None:
    msg = contents_request([b"x" * 100] * 2048, [5] * 2048)
    msg.parameters["p"].string_param = "v" * 5000
    assert len(parse(msg).request.prompts) == 2048


def test_text_input_over_the_batch_cap_is_refused() -> None:
    assert parse_error(wire(contents_request([b""] * 2049))).param == TEXT_INPUT


def test_contents_past_the_shape_are_refused_before_copying() -> None:
    msg = contents_request([b""] * 1000)
    msg.inputs[0].shape[:] = [1, 1]
    assert "its shape says 1" in str(parse_error(wire(msg)))


def test_shape_rank_cap() -> None:
    msg = contents_request([b"hi"])
    msg.inputs[0].shape[:] = [1] * 33
    assert parse_error(wire(msg)).param == TEXT_INPUT


def test_inputs_cap() -> None:
    msg = contents_request([b"hi"])
    for i in range(256):
        msg.inputs.add(name=f"x{i}", datatype="FP32", shape=[1])
    assert parse_error(wire(msg)).param == "inputs"


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_content_encoding_is_refused_like_compressed_messages(encoding: str) -> None:
    body = wire(contents_request([b"hi"]))
    with pytest.raises(CompressedMessage):
        parse_infer(None, {"content-encoding": encoding}, body)
    with pytest.raises(CompressedMessage):
        parse_stream_message(None, {"content-encoding": encoding}, contents_request([b"hi"]).SerializeToString())
    with pytest.raises(CompressedMessage):
        lookup_parser("ModelReady")(None, {"content-encoding": encoding}, wire(service_pb2.ModelReadyRequest(name="m")))
