"""ext_proc/triton_http.py: Triton's generate extension and KServe v2 infer (JSON tensors and the binary
extension, as tritonclient.http sends them)."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import deserialize_bytes_tensor

from ext_proc.kserve import MAX_BATCH, MAX_TENSORS, MAX_TOKENS, TEXT_INPUT
from ext_proc.request import ProtocolError, UnsupportedMediaType
from ext_proc.triton_http import BINARY_HEADER, GenerateRequest, InferRequest, parse_generate, parse_infer

MODEL = "llama"


# --- builders ----------------------------------------------------------------------------------

def generate(**fields: Any) -> GenerateRequest:
    return parse_generate(MODEL, {}, orjson.dumps(fields))


def raw_bytes(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


def int32(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}i", *values)


def text(*prompts: str, shape: list[int] | None = None, nested: bool = True) -> dict[str, Any]:
    data: list[Any] = [[p] for p in prompts] if nested else list(prompts)
    return {"name": TEXT_INPUT, "datatype": "BYTES", "shape": shape or [len(prompts), 1], "data": data}


def limit(*values: int, dtype: str = "INT32", shape: list[int] | None = None) -> dict[str, Any]:
    return {"name": MAX_TOKENS, "datatype": dtype, "shape": shape or [len(values), 1], "data": [[v] for v in values]}


def json_infer(*inputs: dict[str, Any], **extra: Any) -> InferRequest:
    return parse_infer(MODEL, {}, orjson.dumps({"inputs": list(inputs), **extra}))


def binary_spec(name: str, datatype: str, shape: list[int], raw: bytes) -> tuple[dict[str, Any], bytes]:
    """An input the way tritonclient.http sends binary data: parameters.binary_data_size, no data."""
    return {"name": name, "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": len(raw)}}, raw


def binary_body(*inputs: dict[str, Any] | tuple[dict[str, Any], bytes],
                **extra: Any) -> tuple[bytes, dict[str, str], int]:
    """JSON header, then the raw bytes of the binary inputs in input order; the header names its length."""
    specs = [i[0] if isinstance(i, tuple) else i for i in inputs]
    tail = b"".join(i[1] for i in inputs if isinstance(i, tuple))
    header = orjson.dumps({"inputs": specs, **extra})
    return header + tail, {BINARY_HEADER: str(len(header))}, len(header)


def bin_text(*prompts: bytes) -> tuple[dict[str, Any], bytes]:
    return binary_spec(TEXT_INPUT, "BYTES", [len(prompts), 1], raw_bytes(*prompts))


def bin_limit(*values: int) -> tuple[dict[str, Any], bytes]:
    return binary_spec(MAX_TOKENS, "INT32", [len(values), 1], int32(*values))


def parse_binary(*inputs: dict[str, Any] | tuple[dict[str, Any], bytes]) -> tuple[InferRequest, bytes, int]:
    body, headers, json_size = binary_body(*inputs)
    return parse_infer(MODEL, headers, body), body, json_size


def infer_error(body: bytes, headers: dict[str, str] | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        parse_infer(MODEL, headers or {}, body)
    return e.value


def reparse(req: InferRequest, max_tokens: int, headers: dict[str, str] | None = None) -> tuple[InferRequest, Any]:
    """Rewrite, then parse the new body with the request's headers as the rewrite leaves them."""
    rw = req.rewrite(max_tokens, MODEL)
    assert rw is not None
    return parse_infer(MODEL, {**(headers or {}), **dict(rw.headers)}, rw.body), rw


def tc_inputs(prompts: list[bytes], max_tokens: list[int] | None, *, text_binary: bool = True,
              limit_binary: bool = True) -> list[httpclient.InferInput]:
    t = httpclient.InferInput(TEXT_INPUT, [len(prompts), 1], "BYTES")
    t.set_data_from_numpy(np.array([[p] for p in prompts], dtype=object), binary_data=text_binary)
    out = [t]
    if max_tokens is not None:
        m = httpclient.InferInput(MAX_TOKENS, [len(max_tokens), 1], "INT32")
        m.set_data_from_numpy(np.array([[v] for v in max_tokens], dtype=np.int32), binary_data=limit_binary)
        out.append(m)
    return out


def tritonclient_body(prompts: list[bytes], max_tokens: list[int] | None, **binary: bool) -> tuple[bytes, dict[str, str]]:
    """A REAL tritonclient.http request body and the inference-header-content-length it would send."""
    body, json_size = httpclient.InferenceServerClient.generate_request_body(tc_inputs(prompts, max_tokens, **binary))
    return body, ({} if json_size is None else {BINARY_HEADER: str(json_size)})


def split_tail(body: bytes, json_size: int) -> tuple[dict[str, Any], bytes]:
    return orjson.loads(body[:json_size]), body[json_size:]


# --- generate / generate_stream ----------------------------------------------------------------

def test_generate_reads_prompt_and_max_tokens() -> None:
    req = generate(text_input="héllo", max_tokens=20).request
    assert req.model == MODEL
    assert req.prompts == (("héllo",),)
    assert req.prompt_bytes == (len("héllo".encode()),)
    assert req.prompt_param == TEXT_INPUT
    assert req.requested_max_tokens == 20


def test_generate_max_tokens_optional() -> None:
    assert generate(text_input="hi").request.requested_max_tokens is None


def test_generate_model_none_becomes_empty() -> None:
    assert parse_generate(None, {}, b'{"text_input": "x"}').request.model == ""


def test_generate_missing_text_input() -> None:
    with pytest.raises(ProtocolError) as e:
        generate(max_tokens=5)
    assert e.value.param == TEXT_INPUT
    assert "required" in str(e.value)


@pytest.mark.parametrize("value", [5, {"a": "b"}, True, [], ["hi", 5], [["hi"], [{}]]])
def test_generate_text_input_must_be_string(value: Any) -> None:
    with pytest.raises(ProtocolError) as e:
        generate(text_input=value)
    assert e.value.param == TEXT_INPUT
    assert "string" in str(e.value)


@pytest.mark.parametrize("value", [0, -3, 1.5, "10", True, [0], [10, 10], [], [[True]]])
def test_generate_bad_max_tokens(value: Any) -> None:
    with pytest.raises(ProtocolError) as e:
        generate(text_input="hi", max_tokens=value)
    assert e.value.param == MAX_TOKENS


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"text"'])
def test_generate_invalid_json(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_generate(MODEL, {}, raw)


def test_generate_rewrite_none_when_max_tokens_none() -> None:
    assert generate(text_input="hi", max_tokens=500).rewrite(None, MODEL) is None


def test_generate_rewrite_none_when_unchanged() -> None:
    assert generate(text_input="hi", max_tokens=64).rewrite(64, MODEL) is None


def test_generate_rewrite_sets_max_tokens_and_keeps_other_fields() -> None:
    rw = generate(text_input="hi", max_tokens=5000, temperature=0.5, stream=False).rewrite(100, "engine")
    assert rw is not None
    assert orjson.loads(rw.body) == {"text_input": "hi", "max_tokens": 100, "temperature": 0.5, "stream": False}
    assert rw.headers == ()


def test_generate_rewrite_adds_max_tokens_when_absent() -> None:
    rw = generate(text_input="hi").rewrite(42, MODEL)
    assert rw is not None
    assert orjson.loads(rw.body) == {"text_input": "hi", "max_tokens": 42}


def test_generate_takes_arrays_as_triton_does() -> None:
    """Triton reads an array (nested or not) as the input's elements: one prompt per text element, with
    as many max_tokens elements."""
    req = generate(text_input=["hi"], max_tokens=[[7]]).request
    assert (req.prompts, req.requested_max_tokens) == ((("hi",),), 7)
    batch = generate(text_input=["a", "b"], max_tokens=[3, 9]).request
    assert (batch.prompts, batch.requested_max_tokens) == ((("a",), ("b",)), 9)


@pytest.mark.parametrize(("fields", "clamp", "written"), [
    ({"text_input": ["hi"], "max_tokens": [[5000]]}, 100, [100]),
    ({"text_input": ["a", "b"], "max_tokens": [50, 5000]}, 100, [50, 100]),
    ({"text_input": ["a", "b"]}, 100, [100, 100]),
    ({"text_input": ["a"]}, 100, 100),
])
def test_generate_rewrite_keeps_arrays_arrays(fields: dict[str, Any], clamp: int, written: Any) -> None:
    rw = generate(**fields).rewrite(clamp, MODEL)
    assert rw is not None and orjson.loads(rw.body)["max_tokens"] == written


def test_generate_rewrite_none_when_every_element_fits() -> None:
    assert generate(text_input=["a", "b"], max_tokens=[5, 6]).rewrite(6, MODEL) is None


# --- infer: JSON tensors -----------------------------------------------------------------------

def test_infer_json_nested_data() -> None:
    req = json_infer(text("hello"), limit(30)).request
    assert req.model == MODEL
    assert req.prompt_bytes == (5,)
    assert req.prompt_param == TEXT_INPUT
    assert req.requested_max_tokens == 30


def test_infer_json_flat_data() -> None:
    req = json_infer(text("héllo", nested=False)).request
    assert req.prompt_bytes == (6,)
    assert req.requested_max_tokens is None


def test_infer_json_batch_of_two_prompts() -> None:
    req = json_infer(text("a", "bcd"), limit(10, 20)).request
    assert req.prompts == (("a",), ("bcd",))
    assert req.prompt_bytes == (1, 3)
    assert req.requested_max_tokens == 20


def test_infer_int64_max_tokens_accepted() -> None:
    assert json_infer(text("a"), limit(7, dtype="INT64")).request.requested_max_tokens == 7


def test_infer_other_inputs_ignored() -> None:
    temp = {"name": "temperature", "datatype": "FP32", "shape": [1, 1], "data": [[0.7]]}
    assert json_infer(temp, text("abc")).request.prompt_bytes == (3,)


def test_infer_missing_text_input() -> None:
    e = infer_error(orjson.dumps({"inputs": [limit(5)]}))
    assert e.param == TEXT_INPUT


def test_infer_text_input_wrong_dtype() -> None:
    e = infer_error(orjson.dumps({"inputs": [{**text("hi"), "datatype": "INT32"}]}))
    assert e.param == TEXT_INPUT
    assert "BYTES" in str(e)


def test_infer_text_input_non_string_data() -> None:
    e = infer_error(orjson.dumps({"inputs": [{**text("hi"), "data": [[5]]}]}))
    assert e.param == TEXT_INPUT


def test_infer_max_tokens_fp32_is_error_naming_max_tokens() -> None:
    e = infer_error(orjson.dumps({"inputs": [text("hi"), limit(5, dtype="FP32")]}))
    assert e.param == MAX_TOKENS
    assert "INT32" in str(e) and "FP32" in str(e)


def test_infer_text_shape_data_count_mismatch() -> None:
    e = infer_error(orjson.dumps({"inputs": [text("a", "b", shape=[1, 1])]}))
    assert e.param == TEXT_INPUT


def test_infer_max_tokens_shape_data_count_mismatch() -> None:
    e = infer_error(orjson.dumps({"inputs": [text("a"), limit(5, 6, shape=[1, 1])]}))
    assert e.param == MAX_TOKENS


def test_infer_empty_text_tensor_is_error() -> None:
    e = infer_error(orjson.dumps({"inputs": [{**text("a"), "shape": [0, 1], "data": []}]}))
    assert e.param == TEXT_INPUT


@pytest.mark.parametrize("value", [0, -1])
def test_infer_max_tokens_must_be_positive(value: int) -> None:
    assert infer_error(orjson.dumps({"inputs": [text("a"), limit(value)]})).param == MAX_TOKENS


@pytest.mark.parametrize("inputs", [None, {"name": TEXT_INPUT}, "text_input", 5])
def test_infer_inputs_not_a_list(inputs: Any) -> None:
    body = {"inputs": inputs} if inputs is not None else {}
    assert infer_error(orjson.dumps(body)).param == "inputs"


@pytest.mark.parametrize("entry", [5, "text_input", {"datatype": "BYTES"}, {"name": 7}])
def test_infer_input_must_be_named_object(entry: Any) -> None:
    assert infer_error(orjson.dumps({"inputs": [text("a"), entry]})).param == "inputs"


@pytest.mark.parametrize("raw", [b"{oops", b"", b"[]"])
def test_infer_invalid_json(raw: bytes) -> None:
    infer_error(raw)


def test_infer_json_rewrite_none_when_max_tokens_none() -> None:
    assert json_infer(text("a"), limit(5000)).rewrite(None, MODEL) is None


def test_infer_json_rewrite_none_within_limit() -> None:
    assert json_infer(text("a", "b"), limit(10, 20)).rewrite(20, MODEL) is None


def test_infer_json_rewrite_clamps_every_element() -> None:
    again, rw = reparse(json_infer(text("a", "b"), limit(10, 5000)), 100)
    assert rw.headers == ()  # no binary extension, no header to fix
    spec = next(i for i in orjson.loads(rw.body)["inputs"] if i["name"] == MAX_TOKENS)
    assert np.array(spec["data"]).ravel().tolist() == [10, 100]
    assert spec["datatype"] == "INT32" and spec["shape"] == [2, 1]
    assert again.request.requested_max_tokens == 100
    assert again.request.prompt_bytes == (1, 1)


def test_infer_json_rewrite_keeps_other_fields() -> None:
    req = json_infer(text("a"), limit(5000), id="req-1", parameters={"binary_data_output": True})
    rw = req.rewrite(100, MODEL)
    assert rw is not None
    out = orjson.loads(rw.body)
    assert out["id"] == "req-1"
    assert out["parameters"] == {"binary_data_output": True}
    assert out["inputs"][0] == text("a")


def test_infer_json_rewrite_adds_max_tokens_with_batch_shape() -> None:
    rw = json_infer(text("a", "bb", "ccc")).rewrite(64, MODEL)
    assert rw is not None and rw.headers == ()
    added = orjson.loads(rw.body)["inputs"][-1]
    assert added == {"name": MAX_TOKENS, "datatype": "INT32", "shape": [3, 1], "data": [64, 64, 64]}


# --- infer: binary extension -------------------------------------------------------------------

def test_binary_prompt_bytes_read_from_raw_bytes() -> None:
    req, _, _ = parse_binary(bin_text(b"hello", "wörld".encode()))
    assert req.binary
    assert req.request.prompts == (("hello",), ("wörld",))
    assert req.request.prompt_bytes == (5, 6)
    assert req.request.requested_max_tokens is None


def test_binary_max_tokens_read_from_raw_int32() -> None:
    req, _, _ = parse_binary(bin_text(b"hi"), bin_limit(5000))
    assert req.request.requested_max_tokens == 5000


def test_binary_max_tokens_int64() -> None:
    req, _, _ = parse_binary(bin_text(b"hi"), binary_spec(MAX_TOKENS, "INT64", [1, 1], struct.pack("<q", 77)))
    assert req.request.requested_max_tokens == 77


def test_binary_max_tokens_rewrite_changes_only_the_raw_bytes() -> None:
    req, body, json_size = parse_binary(bin_text(b"hi"), bin_limit(5000))
    rw = req.rewrite(100, MODEL)
    assert rw is not None
    assert rw.headers == ()  # the JSON header keeps its length: no new inference-header-content-length
    assert len(rw.body) == len(body)
    assert rw.body[:json_size] == body[:json_size]
    assert rw.body[:-4] == body[:-4]
    assert rw.body[-4:] == int32(100)


def test_binary_max_tokens_rewrite_batch_clamps_each() -> None:
    req, body, json_size = parse_binary(bin_text(b"a", b"b"), bin_limit(50, 5000))
    again, rw = reparse(req, 100, {BINARY_HEADER: str(json_size)})
    assert rw.body[:json_size] == body[:json_size]
    assert rw.body[-8:] == int32(50, 100)
    assert again.request.requested_max_tokens == 100


def test_binary_max_tokens_before_text_rewrite_keeps_order() -> None:
    req, body, json_size = parse_binary(bin_limit(5000), bin_text(b"hi"))
    rw = req.rewrite(10, MODEL)
    assert rw is not None and rw.headers == ()
    assert rw.body == body[:json_size] + int32(10) + raw_bytes(b"hi")


def test_binary_max_tokens_within_limit_no_rewrite() -> None:
    req, _, _ = parse_binary(bin_text(b"hi"), bin_limit(64))
    assert req.rewrite(64, MODEL) is None
    assert req.rewrite(1000, MODEL) is None
    assert req.rewrite(None, MODEL) is None


def test_json_max_tokens_with_binary_text_rewrites_header_and_length() -> None:
    req, body, json_size = parse_binary(bin_text(b"hello"), limit(5000))
    rw = req.rewrite(100, MODEL)
    assert rw is not None
    new_header = dict(rw.headers)[BINARY_HEADER]
    header, tail = split_tail(rw.body, int(new_header))
    assert tail == body[json_size:] == raw_bytes(b"hello")
    assert header["inputs"][1]["data"] == [100]
    assert header["inputs"][0] == bin_text(b"hello")[0]
    again = parse_infer(MODEL, {BINARY_HEADER: new_header}, rw.body)
    assert again.request.requested_max_tokens == 100
    assert again.request.prompt_bytes == (5,)


def test_json_max_tokens_with_binary_text_within_limit_no_rewrite() -> None:
    req, _, _ = parse_binary(bin_text(b"hello"), limit(10))
    assert req.rewrite(10, MODEL) is None


def test_binary_missing_max_tokens_added_as_json_int32() -> None:
    req, body, json_size = parse_binary(bin_text(b"a", b"bc"))
    rw = req.rewrite(32, MODEL)
    assert rw is not None
    new_size = int(dict(rw.headers)[BINARY_HEADER])
    header, tail = split_tail(rw.body, new_size)
    assert new_size != json_size
    assert tail == body[json_size:]
    assert header["inputs"][-1] == {"name": MAX_TOKENS, "datatype": "INT32", "shape": [2, 1], "data": [32, 32]}
    again = parse_infer(MODEL, {BINARY_HEADER: str(new_size)}, rw.body)
    assert again.request.requested_max_tokens == 32
    assert again.request.prompt_bytes == (1, 2)


def test_binary_other_inputs_kept_in_order_through_rewrite() -> None:
    temp = binary_spec("temperature", "FP32", [1, 1], struct.pack("<f", 0.5))
    req, body, json_size = parse_binary(temp, bin_text(b"hi"), limit(5000))
    rw = req.rewrite(7, MODEL)
    assert rw is not None
    _, tail = split_tail(rw.body, int(dict(rw.headers)[BINARY_HEADER]))
    assert tail == body[json_size:] == struct.pack("<f", 0.5) + raw_bytes(b"hi")


def test_binary_header_larger_than_body() -> None:
    body, _, _ = binary_body(bin_text(b"hi"))
    e = infer_error(body, {BINARY_HEADER: str(len(body) + 1)})
    assert BINARY_HEADER in str(e)


@pytest.mark.parametrize("value", ["abc", "-5", "", " 12", "1e3"])
def test_binary_header_not_a_number(value: str) -> None:
    body, _, _ = binary_body(bin_text(b"hi"))
    assert BINARY_HEADER in str(infer_error(body, {BINARY_HEADER: value}))


def test_binary_data_size_running_past_body() -> None:
    body, headers, _ = binary_body(bin_text(b"hi"))
    e = infer_error(body[:-1], headers)
    assert e.param == TEXT_INPUT
    assert "binary_data_size" in str(e)


def test_binary_data_size_without_binary_header() -> None:
    body, _, _ = binary_body(bin_text(b"hi"))
    # Without inference-header-content-length the whole body must be JSON: it is not.
    infer_error(body, {})


def test_binary_data_size_declared_but_body_is_json_only() -> None:
    spec, _ = bin_text(b"hi")
    header = orjson.dumps({"inputs": [spec]})
    assert infer_error(header, {}).param == TEXT_INPUT


def test_binary_trailing_bytes_belong_to_no_input() -> None:
    body, headers, _ = binary_body(bin_text(b"hi"))
    e = infer_error(body + b"xx", headers)
    assert "2 bytes" in str(e)


def test_binary_text_input_truncated_element() -> None:
    spec, _ = binary_spec(TEXT_INPUT, "BYTES", [1, 1], b"\x09\x00\x00\x00hi")
    body, headers, _ = binary_body((spec, b"\x09\x00\x00\x00hi"))
    assert infer_error(body, headers).param == TEXT_INPUT


def test_binary_text_input_count_vs_shape() -> None:
    spec, raw = bin_text(b"a", b"b")
    body, headers, _ = binary_body(({**spec, "shape": [1, 1]}, raw))
    assert infer_error(body, headers).param == TEXT_INPUT


def test_binary_max_tokens_fp32() -> None:
    body, headers, _ = binary_body(bin_text(b"a"), binary_spec(MAX_TOKENS, "FP32", [1, 1], struct.pack("<f", 5.0)))
    assert infer_error(body, headers).param == MAX_TOKENS


def test_binary_max_tokens_partial_int() -> None:
    body, headers, _ = binary_body(bin_text(b"a"), binary_spec(MAX_TOKENS, "INT32", [1, 1], b"\x01\x00\x00"))
    assert infer_error(body, headers).param == MAX_TOKENS


def test_binary_max_tokens_zero() -> None:
    body, headers, _ = binary_body(bin_text(b"a"), bin_limit(0))
    assert infer_error(body, headers).param == MAX_TOKENS


# Bugs: the binary-extension parameters come from the client and must fail as ProtocolError (400),
# not as TypeError/AttributeError/ValueError (the servicer only catches ProtocolError: the stream dies, 500).

@pytest.mark.parametrize("size", ["6", 6.0, [6], {"n": 6}])
def test_binary_data_size_not_an_integer_is_protocol_error(size: Any) -> None:
    spec, raw = bin_text(b"hi")
    body, headers, _ = binary_body(({**spec, "parameters": {"binary_data_size": size}}, raw))
    assert infer_error(body, headers).param == TEXT_INPUT


def test_binary_data_size_negative_is_protocol_error() -> None:
    """A negative size moves the read position backwards: bytes get read twice and the rewrite
    re-emits them, corrupting the body sent upstream."""
    stream = binary_spec("stream", "BOOL", [1, 1], b"")[0]
    stream["parameters"]["binary_data_size"] = -1
    temp = binary_spec("temperature", "FP32", [1, 1], b"")[0]
    temp["parameters"]["binary_data_size"] = 1
    body, headers, _ = binary_body(bin_text(b"hi"), (stream, b""), (temp, b""))
    infer_error(body, headers)


@pytest.mark.parametrize("params", ["binary", [1], 5])
def test_input_parameters_not_an_object_is_protocol_error(params: Any) -> None:
    infer_error(orjson.dumps({"inputs": [{**text("hi"), "parameters": params}]}))


def test_binary_header_non_ascii_digit_is_protocol_error() -> None:
    body, _, _ = binary_body(bin_text(b"hi"))
    infer_error(body, {BINARY_HEADER: "²"})  # str.isdigit() is True for it; int() is not


def test_binary_invalid_utf8_is_replaced_and_never_counts_fewer_bytes() -> None:
    """Invalid UTF-8 is the engine's business, not a parse error; its text has U+FFFD for each
    invalid run, whose 3 bytes keep the bound at or above what was sent (a lone byte counts 3)."""
    raw = b"ok \xff\xe4\xbd"  # a stray byte, then a CJK character cut short
    req, _, _ = parse_binary(bin_text(raw, b"fine"))
    assert req.request.prompts == (("ok \ufffd\ufffd",), ("fine",))
    assert req.request.prompt_bytes == (3 + 3 + 3, 4)
    assert req.request.prompt_bytes[0] >= len(raw)


def test_tritonclient_non_utf8_text_parsed() -> None:
    body, headers = tritonclient_body([b"\x80\x81abc"], [10])
    req = parse_infer(MODEL, headers, body).request
    assert req.prompts == (("\ufffd\ufffdabc",),)
    assert req.prompt_bytes[0] >= len(b"\x80\x81abc")


# --- real tritonclient.http bodies -------------------------------------------------------------

def test_tritonclient_binary_body_parsed() -> None:
    body, headers = tritonclient_body([b"hi"], [5000])
    assert BINARY_HEADER in headers
    req = parse_infer(MODEL, headers, body)
    assert req.binary
    assert req.request.prompt_bytes == (2,)
    assert req.request.requested_max_tokens == 5000


def test_tritonclient_json_body_parsed() -> None:
    body, headers = tritonclient_body([b"hi"], [5000], text_binary=False, limit_binary=False)
    assert headers == {}
    req = parse_infer(MODEL, headers, body)
    assert not req.binary
    assert req.request.prompt_bytes == (2,)
    assert req.request.requested_max_tokens == 5000


def test_tritonclient_binary_rewrite_decodes_with_tritonclient_helpers() -> None:
    body, headers = tritonclient_body([b"hi", b"there"], [5000, 20])
    json_size = int(headers[BINARY_HEADER])
    rw = parse_infer(MODEL, headers, body).rewrite(100, MODEL)
    assert rw is not None and rw.headers == ()
    header, tail = split_tail(rw.body, json_size)
    assert rw.body[:json_size] == body[:json_size]
    sizes = [i["parameters"]["binary_data_size"] for i in header["inputs"]]
    text_raw, limit_raw = tail[:sizes[0]], tail[sizes[0]:sizes[0] + sizes[1]]
    assert deserialize_bytes_tensor(text_raw).tolist() == [b"hi", b"there"]
    assert np.frombuffer(limit_raw, dtype=np.int32).tolist() == [100, 20]


def test_tritonclient_json_rewrite_round_trip() -> None:
    body, headers = tritonclient_body([b"hi"], [5000], text_binary=False, limit_binary=False)
    again, rw = reparse(parse_infer(MODEL, headers, body), 100)
    assert rw.headers == ()
    assert orjson.loads(rw.body)["parameters"] == {"binary_data_output": True}
    assert again.request.requested_max_tokens == 100
    assert again.request.prompt_bytes == (2,)


def test_tritonclient_binary_text_json_limit_rewrite_round_trip() -> None:
    body, headers = tritonclient_body([b"hello"], [5000], limit_binary=False)
    json_size = int(headers[BINARY_HEADER])
    again, rw = reparse(parse_infer(MODEL, headers, body), 100, headers)
    new_size = int(dict(rw.headers)[BINARY_HEADER])
    assert rw.body[new_size:] == body[json_size:]
    assert deserialize_bytes_tensor(rw.body[new_size:]).tolist() == [b"hello"]
    assert again.request.requested_max_tokens == 100


def test_tritonclient_no_max_tokens_rewrite_adds_it() -> None:
    body, headers = tritonclient_body([b"a", b"b"], None)
    json_size = int(headers[BINARY_HEADER])
    again, rw = reparse(parse_infer(MODEL, headers, body), 64, headers)
    new_size = int(dict(rw.headers)[BINARY_HEADER])
    assert rw.body[new_size:] == body[json_size:]
    assert again.request.requested_max_tokens == 64
    assert again.tensors[MAX_TOKENS].spec["shape"] == [2, 1]


def test_tritonclient_within_limit_no_rewrite() -> None:
    body, headers = tritonclient_body([b"hi"], [50])
    assert parse_infer(MODEL, headers, body).rewrite(100, MODEL) is None


# --- duplicate keys, names Triton would read differently -----------------------------------------

def test_generate_duplicate_keys_are_refused() -> None:
    """Triton's reader takes the first of two keys, orjson the last: 2 bytes and 10 tokens admitted,
    100 KB and 100,000 tokens run."""
    raw = b'{"text_input":"' + b"x" * 100_000 + b'","text_input":"hi","max_tokens":100000,"max_tokens":10}'
    with pytest.raises(ProtocolError) as e:
        parse_generate(MODEL, {}, raw)
    assert e.value.param == TEXT_INPUT and "twice" in str(e.value)


def test_infer_duplicate_key_inside_a_tensor_is_refused() -> None:
    raw = orjson.dumps({"inputs": [text("a"), limit(10)]}).replace(b'"data":[[10]]', b'"data":[[10]],"data":[[100000]]')
    assert infer_error(raw).param == "data"


def test_binary_json_header_duplicate_key_is_refused() -> None:
    spec, raw = bin_limit(10)
    twice = {**spec, "parameters": {"binary_data_size": 4}}
    body, headers, _ = binary_body(bin_text(b"hi"), (twice, raw))
    body = body.replace(b'"binary_data_size":4}', b'"binary_data_size":4,"binary_data_size":0}')
    headers = {BINARY_HEADER: str(int(headers[BINARY_HEADER]) + len(b',"binary_data_size":0'))}
    assert infer_error(body, headers).param == "binary_data_size"


def test_generate_field_with_nul_is_refused() -> None:
    """"max_tokens\\u0000" is an unknown field to the gateway; C strings would read it as max_tokens."""
    with pytest.raises(ProtocolError) as e:
        parse_generate(MODEL, {}, b'{"text_input":"hi","max_tokens\\u0000":100000}')
    assert "NUL" in str(e.value)


def test_infer_input_name_with_nul_is_refused() -> None:
    assert "NUL" in str(infer_error(orjson.dumps({"inputs": [text("a"), {**limit(5), "name": "max_tokens\x00"}]})))


def test_binary_input_with_data_too_is_refused() -> None:
    """Which would the engine read: the JSON data or the binary? Refused, not guessed."""
    spec, raw = bin_limit(10)
    body, headers, _ = binary_body(bin_text(b"hi"), ({**spec, "data": [[100000]]}, raw))
    assert infer_error(body, headers).param == MAX_TOKENS


# --- things that raised something else than ProtocolError (a 500) --------------------------------

def test_data_nested_deep_is_refused_without_recursion() -> None:
    """_flat recursed: 500 levels of data (~1 KB) hit the recursion limit."""
    data = b'"x"'
    for _ in range(200):
        data = b"[" + data + b"]"
    raw = b'{"inputs":[{"name":"text_input","datatype":"BYTES","shape":[1],"data":' + data + b"}]}"
    e = infer_error(raw)
    assert e.param == TEXT_INPUT and "deeper" in str(e)


def test_json_nested_past_the_serializer_limit_is_refused() -> None:
    raw = b'{"inputs":[' + orjson.dumps(text("a")) + b'],"x":' + b"[" * 400 + b"]" * 400 + b"}"
    assert "deeper" in str(infer_error(raw))


def test_binary_header_with_thousands_of_digits_is_protocol_error() -> None:
    """int() refuses strings over 4300 digits with ValueError."""
    body, _, _ = binary_body(bin_text(b"hi"))
    assert BINARY_HEADER in str(infer_error(body, {BINARY_HEADER: "9" * 5000}))


@pytest.mark.parametrize("datatype", [["INT32"], {"a": 1}, 32, None])
def test_max_tokens_datatype_not_a_string_is_protocol_error(datatype: Any) -> None:
    """A list as datatype was looked up in a dict: TypeError (unhashable)."""
    assert infer_error(orjson.dumps({"inputs": [text("a"), {**limit(5), "datatype": datatype}]})).param == MAX_TOKENS


# --- caps, checked before anything is decoded ----------------------------------------------------

def test_binary_shape_over_the_batch_cap_is_refused_before_decoding() -> None:
    spec, raw = bin_text(*[b""] * (MAX_BATCH + 1))
    body, headers, _ = binary_body((spec, raw))
    e = infer_error(body, headers)
    assert e.param == TEXT_INPUT and str(MAX_BATCH) in str(e)


def test_binary_elements_past_the_shape_stop_the_decoding() -> None:
    spec, raw = bin_text(*[b""] * 100_000)
    body, headers, _ = binary_body(({**spec, "shape": [1, 1]}, raw))
    assert "more than the 1 elements" in str(infer_error(body, headers))


def test_json_data_past_the_shape_is_refused() -> None:
    assert "more than the 1 elements" in str(infer_error(orjson.dumps({"inputs": [text("a", "b", shape=[1, 1])]})))


def test_batch_at_the_cap_is_admitted() -> None:
    assert len(json_infer(text(*["x"] * MAX_BATCH)).request.prompts) == MAX_BATCH
    req, _, _ = parse_binary(bin_text(*[b"y"] * MAX_BATCH), bin_limit(*[5] * MAX_BATCH))
    assert len(req.request.prompts) == MAX_BATCH


def test_max_tokens_elements_over_the_cap_are_refused() -> None:
    body, headers, _ = binary_body(bin_text(b"a"), bin_limit(*[1] * (MAX_BATCH + 1)))
    assert infer_error(body, headers).param == MAX_TOKENS


def test_inputs_over_the_cap_are_refused() -> None:
    inputs = [text("a")] + [{"name": f"x{i}", "datatype": "FP32", "shape": [1], "data": [0.5]}
                            for i in range(MAX_TENSORS)]
    assert infer_error(orjson.dumps({"inputs": inputs})).param == "inputs"


def test_long_shape_is_refused_with_a_short_message() -> None:
    e = infer_error(orjson.dumps({"inputs": [text("a", shape=[1] * 100_000)]}))
    assert e.param == TEXT_INPUT and len(str(e)) < 200


# --- Content-Encoding ----------------------------------------------------------------------------

@pytest.mark.parametrize("parse", [parse_generate, parse_infer])
def test_compressed_bodies_are_refused_415(parse) -> None:  # noqa: ANN001
    with pytest.raises(UnsupportedMediaType):
        parse(MODEL, {"content-encoding": "gzip"}, orjson.dumps({"text_input": "hi", "inputs": [text("a")]}))
