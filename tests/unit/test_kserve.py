"""ext_proc/kserve.py: raw BYTES/INT tensors, max_tokens checks, shapes and clamping (docs/reference.md)."""

from __future__ import annotations

import struct

import pytest

from ext_proc import kserve
from ext_proc.kserve import MAX_TOKENS, TEXT_INPUT
from ext_proc.request import ProtocolError


def raw_bytes(*items: bytes) -> bytes:
    """BYTES elements as Triton sends them raw: 4-byte little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


def protocol_error(fn, *args) -> ProtocolError:  # noqa: ANN001
    with pytest.raises(ProtocolError) as e:
        fn(*args)
    return e.value


# --- decode_raw_bytes --------------------------------------------------------------------------

def test_decode_raw_bytes_one_element() -> None:
    assert kserve.decode_raw_bytes(b"\x02\x00\x00\x00hi", TEXT_INPUT) == [b"hi"]


def test_decode_raw_bytes_several_elements_and_empty_one() -> None:
    assert kserve.decode_raw_bytes(raw_bytes(b"ab", b"", "é".encode()), TEXT_INPUT) == [b"ab", b"", "é".encode()]


def test_decode_raw_bytes_empty_input_has_no_elements() -> None:
    assert kserve.decode_raw_bytes(b"", TEXT_INPUT) == []


def test_decode_raw_bytes_length_is_little_endian() -> None:
    payload = b"x" * 258
    assert kserve.decode_raw_bytes(b"\x02\x01\x00\x00" + payload, TEXT_INPUT) == [payload]


@pytest.mark.parametrize("raw", [
    b"\x02\x00\x00",  # truncated length prefix
    b"\x05\x00\x00\x00hi",  # length says 5, 2 arrived
    raw_bytes(b"ok") + b"\x01\x00",  # second element's prefix cut short
    raw_bytes(b"ok") + b"\x03\x00\x00\x00ab",  # second element's data cut short
])
def test_decode_raw_bytes_truncated_is_protocol_error(raw: bytes) -> None:
    e = protocol_error(kserve.decode_raw_bytes, raw, TEXT_INPUT)
    assert "truncated" in str(e)
    assert e.param == TEXT_INPUT


# --- raw INT32 / INT64 -------------------------------------------------------------------------

def test_decode_raw_int32() -> None:
    assert kserve.decode_raw_ints(struct.pack("<ii", 5000, -3), "INT32") == [5000, -3]


def test_decode_raw_int64() -> None:
    assert kserve.decode_raw_ints(struct.pack("<q", 2**40), "INT64") == [2**40]


def test_encode_raw_int32_is_little_endian_4_bytes_each() -> None:
    assert kserve.encode_raw_ints([5000, 1], "INT32") == b"\x88\x13\x00\x00\x01\x00\x00\x00"


def test_encode_raw_int64_is_8_bytes_each() -> None:
    assert kserve.encode_raw_ints([7], "INT64") == b"\x07" + b"\x00" * 7


@pytest.mark.parametrize("dtype", ["INT32", "INT64"])
def test_raw_ints_round_trip(dtype: str) -> None:
    values = [1, 100, 2**31 - 1]
    assert kserve.decode_raw_ints(kserve.encode_raw_ints(values, dtype), dtype) == values


@pytest.mark.parametrize("raw,dtype", [(b"\x01\x00\x00", "INT32"), (b"\x01\x00\x00\x00", "INT64")])
def test_decode_raw_ints_partial_element_is_protocol_error(raw: bytes, dtype: str) -> None:
    e = protocol_error(kserve.decode_raw_ints, raw, dtype)
    assert e.param == MAX_TOKENS
    assert dtype in str(e)


@pytest.mark.parametrize("dtype", ["FP32", "UINT32", "BYTES", "int32", ""])
def test_wrong_dtype_names_max_tokens(dtype: str) -> None:
    for fn, arg in ((kserve.decode_raw_ints, b"\x00" * 8), (kserve.encode_raw_ints, [1])):
        e = protocol_error(fn, arg, dtype)
        assert e.param == MAX_TOKENS
        assert MAX_TOKENS in str(e) and "INT32" in str(e)


def test_int_format_accepts_int32_and_int64_only() -> None:
    assert kserve.int_format("INT32") == "<i"
    assert kserve.int_format("INT64") == "<q"
    assert protocol_error(kserve.int_format, "FP32").param == MAX_TOKENS


# --- check_max_tokens --------------------------------------------------------------------------

def test_check_max_tokens_accepts_positive_ints_matching_count() -> None:
    assert kserve.check_max_tokens((5, 1), 2) == [5, 1]


@pytest.mark.parametrize("values,count", [([5], 2), ([5, 6], 1), ([], 1)])
def test_check_max_tokens_count_must_match_shape(values: list[int], count: int) -> None:
    e = protocol_error(kserve.check_max_tokens, values, count)
    assert e.param == MAX_TOKENS
    assert "shape" in str(e)


def test_check_max_tokens_empty_tensor_is_error() -> None:
    e = protocol_error(kserve.check_max_tokens, [], 0)
    assert e.param == MAX_TOKENS
    assert "empty" in str(e)


@pytest.mark.parametrize("bad", [0, -1, True, False, 1.0, "5", None])
def test_check_max_tokens_rejects_non_positive_or_non_int(bad: object) -> None:
    e = protocol_error(kserve.check_max_tokens, [10, bad], 2)
    assert e.param == MAX_TOKENS
    assert "at least 1" in str(e)


# --- elements ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,count", [([1, 1], 1), ([2, 1], 2), ((3, 4), 12), ([0, 1], 0), ([], 1)])
def test_elements_is_product_of_shape(shape: list[int], count: int) -> None:
    assert kserve.elements(shape, TEXT_INPUT) == count


@pytest.mark.parametrize("shape", [None, "1,1", 3, [1, -1], [1.0, 1], [True, 1], [1, "1"], {"a": 1}])
def test_elements_rejects_invalid_shape(shape: object) -> None:
    e = protocol_error(kserve.elements, shape, "some_input")
    assert e.param == "some_input"
    assert "shape" in str(e)


# --- clamped and the missing-input error --------------------------------------------------------

def test_clamped_caps_each_value_and_keeps_smaller_ones() -> None:
    assert kserve.clamped([5000, 10, 100], 100) == [100, 10, 100]


def test_clamped_keeps_length_and_order() -> None:
    assert kserve.clamped([3, 2, 1], 2) == [2, 2, 1]


def test_missing_text_input_names_the_input() -> None:
    e = kserve.missing_text_input()
    assert isinstance(e, ProtocolError)
    assert e.param == TEXT_INPUT
    assert TEXT_INPUT in str(e) and "BYTES" in str(e)


# --- text and text_request: what token counting sees -------------------------------------------

def test_text_decodes_utf8() -> None:
    assert kserve.text("héllo 你好 🚀".encode()) == "héllo 你好 🚀"


@pytest.mark.parametrize(("raw", "expected"), [
    (b"\xff", "\ufffd"),                 # never starts UTF-8
    (b"\xe4\xbd", "\ufffd"),             # a 3-byte character cut short: one replacement
    (b"\xed\xa0\x80", "\ufffd" * 3),     # an encoded surrogate
    (b"a\x80b", "a\ufffdb"),             # a stray continuation byte
])
def test_text_replaces_invalid_utf8(raw: bytes, expected: str) -> None:
    assert kserve.text(raw) == expected


def test_text_never_has_fewer_utf8_bytes_than_were_sent() -> None:
    """What the upper bound relies on: every invalid run of 1-3 bytes becomes the 3-byte U+FFFD."""
    blobs = [bytes([a, b, c]) for a in range(0x80, 0x100, 3) for b in range(0, 0x100, 5) for c in (0x41, 0x80, 0xbf)]
    blobs += [b"ok" + b[:n] for b in blobs[::50] for n in (1, 2)]
    assert all(len(kserve.text(b).encode()) >= len(b) for b in blobs)


def test_text_request_one_prompt_per_element() -> None:
    req = kserve.text_request("m", ["a", "bc"], [10, 30])
    assert (req.model, req.prompts, req.prompt_param) == ("m", (("a",), ("bc",)), TEXT_INPUT)
    assert req.requested_max_tokens == 30  # the largest: the rewrite clamps each element
    assert kserve.text_request("m", ["a"], None).requested_max_tokens is None


# --- caps ------------------------------------------------------------------------------------------

def test_decode_raw_bytes_stops_past_the_limit() -> None:
    assert kserve.decode_raw_bytes(raw_bytes(b"a", b"b"), TEXT_INPUT, 2) == [b"a", b"b"]
    e = protocol_error(kserve.decode_raw_bytes, raw_bytes(*[b""] * 1000), TEXT_INPUT, 2)
    assert e.param == TEXT_INPUT and "more than the 2" in str(e)


def test_decode_raw_ints_refuses_more_than_the_limit() -> None:
    raw = kserve.encode_raw_ints([1] * 3, "INT32")
    assert kserve.decode_raw_ints(raw, "INT32", 3) == [1, 1, 1]
    assert protocol_error(kserve.decode_raw_ints, raw, "INT32", 2).param == MAX_TOKENS


def test_shape_rank_cap() -> None:
    assert kserve.elements([1] * kserve.MAX_RANK, TEXT_INPUT) == 1
    e = protocol_error(kserve.elements, [1] * 100_000, TEXT_INPUT)
    assert e.param == TEXT_INPUT and len(str(e)) < 200  # the shape is not printed whole


def test_batch_elements_cap() -> None:
    assert kserve.batch_elements([kserve.MAX_BATCH, 1], TEXT_INPUT) == kserve.MAX_BATCH
    assert protocol_error(kserve.batch_elements, [2**40, 2**40], TEXT_INPUT).param == TEXT_INPUT


def test_check_max_tokens_cap() -> None:
    n = kserve.MAX_BATCH + 1
    assert protocol_error(kserve.check_max_tokens, [1] * n, n).param == MAX_TOKENS
