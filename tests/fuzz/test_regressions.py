"""Inputs that once escaped as something other than a ProtocolError (a 500 with a traceback), or were
admitted though the engine would run something else, found by reading and fuzzing; one test each.
The parsers' own behaviour is tested in tests/unit; here: the header reader and whole-input properties."""

from __future__ import annotations

import pytest

from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3.external_processor_pb2 import HttpHeaders
from ext_proc.exchange import read_headers
from ext_proc.request import UnsupportedMediaType, identity_encoding
from ext_proc.tenants import TenantTable, Unauthenticated
from kvgate.api_keys import key_hash
from kvgate.v1 import policy_pb2
from tests.fuzz.targets import TARGETS


def headers(*pairs: tuple[str, bytes]) -> dict[str, str]:
    return read_headers(HttpHeaders(headers=HeaderMap(headers=[HeaderValue(key=k, raw_value=v) for k, v in pairs])))


def test_header_value_that_is_not_utf8_is_read_with_replacement() -> None:
    """raw_value.decode() raised UnicodeDecodeError: a 500 instead of a 401."""
    got = headers(("authorization", b"Bearer \xff\xfe"), (":path", b"/v1/\xc3"))
    assert got == {"authorization": "Bearer \ufffd\ufffd", ":path": "/v1/\ufffd"}


def test_key_with_invalid_bytes_does_not_authenticate() -> None:
    key = "kvg-0123456789"
    table = TenantTable()
    table.replace([policy_pb2.Tenant(name="t", api_key_sha256=[key_hash(key)], models=["*"])])
    assert table.authenticate(headers(("authorization", f"Bearer {key}".encode()))) is not None
    for sent in (b"Bearer kvg-0123456789\xff", b"Bearer \xff\xfe", b"\x80"):
        assert isinstance(table.authenticate(headers(("authorization", sent))), Unauthenticated)


def test_repeated_headers_keep_every_value() -> None:
    """Last-wins hid a second value: `gzip` before `identity`, or a second header length."""
    got = headers(("content-encoding", b"gzip"), ("content-encoding", b"identity"),
                  ("inference-header-content-length", b"10"), ("inference-header-content-length", b"20"))
    assert got == {"content-encoding": "gzip,identity", "inference-header-content-length": "10,20"}
    with pytest.raises(UnsupportedMediaType):
        identity_encoding(got)


def test_content_encoding_is_read() -> None:
    assert headers(("content-encoding", b"br"), ("x-other", b"1")) == {"content-encoding": "br"}


@pytest.mark.parametrize(("target", "data"), [
    # Rewritten with orjson, which writes at most 254 levels: TypeError, a 500.
    ("openai_chat", b'{"model":"m","messages":[{"role":"user","content":"x"}],"x":' + b"[" * 300 + b"]" * 300 + b"}"),
    # _flat recursed once per level of data.
    ("kserve_json", b'{"inputs":[{"name":"text_input","datatype":"BYTES","shape":[1],"data":'
     + b"[" * 240 + b'"x"' + b"]" * 240 + b"}]}"),
    # A list as datatype: a dict lookup raised TypeError (unhashable).
    ("kserve_json", b'{"inputs":[{"name":"text_input","datatype":"BYTES","shape":[1],"data":["x"]},'
     b'{"name":"max_tokens","datatype":["INT32"],"shape":[1],"data":[5]}]}'),
    # int() of more than 4300 digits raises ValueError.
    ("kserve_binary", b"9" * 5000 + b'\n{"inputs":[]}'),
    # The header reader on bytes that are not UTF-8.
    ("headers", b"\x04Bearer \xff\xfe\n\x00/v1/chat/completions\xff"),
])
def test_found_inputs_hold_the_property(target: str, data: bytes) -> None:
    assert TARGETS[target].run(data).startswith(("refused", "not authenticated", "authenticated"))


def test_a_tool_result_whose_text_is_not_a_string_is_estimated() -> None:
    """str.join raised TypeError building the chat vLLM would render (found by atheris in 2,507 inputs)."""
    body = (b'{"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "tool_result", '
            b'"tool_use_id": "t1", "content": [{"type": "text", "text": ["not", "a", "string"]}]}]}]}')
    assert TARGETS["anthropic_messages"].run(body) == "parsed"
