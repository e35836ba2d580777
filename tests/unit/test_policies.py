"""The prompt and admission parts of a catalog model, through its ModelPolicy (xds_server/render/policies.py)
to the Policy ext_proc plans with (ext_proc/policy.py): the chat template, the engine's KV rules, the
long-request window."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ext_proc.policy import Policy
from kvgate.catalog import CatalogError, parse_catalog
from tests.unit.test_catalog import catalog_dict, model_dict
from xds_server.render.policies import model_policy


def policy_of(tmp_path: Path, **fields: Any) -> Policy:
    cat = parse_catalog(catalog_dict(model_dict(**fields)), base_dir=tmp_path)
    return Policy.from_proto(model_policy(cat.models[0], cat))


@pytest.fixture
def model_files(tmp_path: Path) -> Path:
    (tmp_path / "tokenizer.json").write_text('{"model": {}}')
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ bos_token }}{{ messages | length }}",
                                                                "bos_token": "<s>"}))
    return tmp_path


def test_the_template_beside_the_tokenizer_reaches_ext_proc(model_files: Path) -> None:
    pol = policy_of(model_files, tokenizer="tokenizer.json")
    assert pol.chat_template is not None
    assert pol.chat_template.render({"messages": [{"role": "user", "content": "x"}] * 3}) == "<s>3"
    assert pol.chat_template.source.origin == str(model_files / "tokenizer_config.json")


def test_an_explicit_chat_template_file(model_files: Path) -> None:
    (model_files / "other.jinja").write_text("other")
    pol = policy_of(model_files, tokenizer="tokenizer.json", chat_template="other.jinja")
    assert pol.chat_template is not None and pol.chat_template.render({"messages": []}) == "other"


def test_without_a_tokenizer_there_is_no_template(model_files: Path) -> None:
    assert policy_of(model_files).chat_template is None


@pytest.mark.parametrize(("fields", "needle"), [
    ({"chat_template": "other.jinja"}, "chat_template needs a tokenizer"),
    ({"tokenizer": "tokenizer.json", "chat_template": "missing.jinja"}, "is not a file"),
    ({"tokenizer": "tokenizer.json", "chat_template": "broken.jinja"}, "broken.jinja, line 1"),
])
def test_a_template_that_cannot_be_used_is_refused_by_the_catalog(model_files: Path, fields: dict[str, Any],
                                                                  needle: str) -> None:
    (model_files / "other.jinja").write_text("x")
    (model_files / "broken.jinja").write_text("{% for %}")
    with pytest.raises(CatalogError) as e:
        parse_catalog(catalog_dict(model_dict(**fields)), base_dir=model_files)
    assert needle in str(e.value)


def test_vllm_sequences_hold_one_token_less_and_publish_metrics_at_slash_metrics(tmp_path: Path) -> None:
    vllm = policy_of(tmp_path, engine="vllm", endpoints=["10.0.0.1:8000"])
    trtllm = policy_of(tmp_path, endpoints=["10.0.0.1:8000"])
    assert (vllm.sequence_tokens(33, 460), trtllm.sequence_tokens(33, 460)) == (492, 493)
    assert vllm.endpoints[0].metrics_url == "http://10.0.0.1:8000/metrics"
    assert trtllm.endpoints[0].metrics_url == "http://10.0.0.1:8000/prometheus/metrics"
    with pytest.raises(CatalogError):
        parse_catalog(catalog_dict(model_dict(engine="sglang")))


def test_the_long_request_window(tmp_path: Path) -> None:
    assert policy_of(tmp_path).long_requests_short_window_s == 60.0
    assert policy_of(tmp_path, long_requests={"short_window_s": 0}).long_requests_short_window_s == 0.0
