"""ext_proc/embeddings.py: embeddings are admitted for the KV their prefill holds, and nothing more; and
ext_proc/routed_calls.py: tokenizer calls routed by model, nothing reserved."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from ext_proc import routed_calls
from ext_proc.admission import Plan, plan
from ext_proc.embeddings import MAX_INPUTS, parse_request
from ext_proc.request import ModelOnly, ProtocolError
from kvgate.kv_math import reservation_bytes
from tests.unit.test_admission import BLOCK, BPT, policy


def parse(**fields: Any) -> ModelOnly:
    return parse_request(orjson.dumps({"model": "m", **fields}))


def refused(**fields: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        parse(**fields)
    return e.value


@pytest.mark.parametrize("value,prompts,token_ids", [
    ("one text", (("one text",),), ()),
    (["a", "bb"], (("a",), ("bb",)), ()),
    ([1, 2, 3], (), (3,)),
    ([[1, 2], [3]], (), (2, 1)),
])
def test_every_form_of_input(value: Any, prompts: Any, token_ids: Any) -> None:
    req = parse(input=value, encoding_format="float", dimensions=8).request
    assert (req.prompts, req.exact_prompt_tokens, req.prompt_param) == (prompts, token_ids, "input")


@pytest.mark.parametrize("field", ["messages", "input"])
def test_a_conversation_is_bounded_by_its_json(field: str) -> None:
    """vLLM's chat embeddings: the conversation's JSON holds every text its template renders."""
    conversation = [{"role": "system", "content": "Embed."}, {"role": "user", "content": "KV cache"}]
    req = parse(**{field: conversation}).request
    assert req.prompts == ((orjson.dumps(conversation).decode(),),)
    assert req.messages == 2
    batch = parse(**{field: [conversation, conversation[1:]]}).request
    assert len(batch.prompts) == 2 and batch.messages == 2


def test_the_reservation_is_the_prefill_on_vllm_and_one_token_more_on_trtllm() -> None:
    req = parse(input=["x" * 100, "y" * 40]).request
    for engine, extra in [("vllm", 0), ("trtllm", 1)]:
        planned = plan(req, policy(engine=engine), None)
        assert isinstance(planned, Plan)
        assert planned.max_tokens == 1
        assert planned.nbytes == sum(reservation_bytes(n + extra, BLOCK, BPT) for n in (100, 40))


def test_an_input_longer_than_the_context_is_refused_as_vllm_would() -> None:
    refusal = plan(parse(input=list(range(1000))).request, policy(), None)
    assert not isinstance(refusal, Plan)
    assert (refusal.code, refusal.param) == ("context_length_exceeded", "input")


@pytest.mark.parametrize("fields,param", [
    ({}, "input"),
    ({"input": 3}, "input"),
    ({"input": []}, "input"),
    ({"input": ["a", 1]}, "input"),
    ({"input": [True, 2]}, "input"),
    ({"input": [[1], ["a"]]}, "input"),
    ({"input": "x", "model": ""}, "model"),
    ({"messages": "hello"}, "messages"),
    ({"input": ["a"] * (MAX_INPUTS + 1)}, "input"),
])
def test_malformed_input_is_refused_by_name(fields: dict[str, Any], param: str) -> None:
    assert refused(**fields).param == param


def test_the_rewrite_renames_the_model_and_never_adds_an_output_limit() -> None:
    parsed = parse(input="x", dimensions=8)
    rewrite = parsed.rewrite(1, "engine")
    assert rewrite is not None
    assert orjson.loads(rewrite.body) == {"model": "engine", "input": "x", "dimensions": 8}
    assert parsed.rewrite(1, "m") is None


# --- tokenizer calls --------------------------------------------------------------------------------

@pytest.mark.parametrize("body", [{"model": "m", "prompt": "x"}, {"model": "m", "tokens": [1, 2]},
                                  {"model": "m", "messages": [{"role": "user", "content": "x"}]}])
def test_tokenizer_calls_name_their_model_and_reserve_nothing(body: dict[str, Any]) -> None:
    parsed = routed_calls.parse(None, {}, orjson.dumps(body))
    assert (parsed.request.model, parsed.request.admit) == ("m", False)
    rewrite = parsed.rewrite(None, "engine")
    assert rewrite is not None and orjson.loads(rewrite.body) == {**body, "model": "engine"}


@pytest.mark.parametrize("raw,param", [(b'{"prompt": "x"}', "model"), (b'{"model": 3}', "model"),
                                       (b'{"model": "m", "model": "n"}', "model"), (b"[]", None)])
def test_tokenizer_calls_need_a_model_to_be_routed(raw: bytes, param: str | None) -> None:
    with pytest.raises(ProtocolError) as e:
        routed_calls.parse(None, {}, raw)
    assert e.value.param == param
