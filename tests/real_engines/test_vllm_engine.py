"""The real vLLM on the tiny Llama, without the gateway: what it answers, how it counts prompt tokens,
what its metrics say about its KV cache, and how it reads odd request bodies. The gateway's admission
and its tests build on these facts, so each is pinned here against the real engine.

Every request that counts tokens sets ignore_eos: random weights can emit an end token at any step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from tokenizers import Tokenizer

from engines.real.vllm import VllmServer
from tests.real_engines.vllm_fixture import SETUP_TIMEOUT_S

pytestmark = pytest.mark.timeout(SETUP_TIMEOUT_S)

IGNORE_EOS = {"ignore_eos": True}
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is a KV cache?"}]


@pytest.fixture
def client(vllm_engine: VllmServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=vllm_engine.openai_url, api_key="unused", max_retries=0, timeout=300) as c:
        yield c


@pytest.fixture
def http(vllm_engine: VllmServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=vllm_engine.url, timeout=300) as c:
        yield c


@pytest.fixture
def tokenizer(vllm_engine: VllmServer) -> Tokenizer:
    return Tokenizer.from_file(str(vllm_engine.model.tokenizer_json))


@pytest.fixture
def tokenizer_config(vllm_engine: VllmServer) -> dict[str, Any]:
    return json.loads(vllm_engine.model.tokenizer_config.read_text())


def render_chat(config: dict[str, Any], messages: list[dict[str, str]]) -> str:
    # The environment transformers renders chat templates in.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(config["chat_template"]).render(
        messages=messages, add_generation_prompt=True, bos_token=config["bos_token"], eos_token=config["eos_token"])


def scrape(http: httpx.Client) -> list[Sample]:
    return [s for family in text_string_to_metric_families(http.get("/metrics").text) for s in family.samples]


def metric(http: httpx.Client, name: str) -> float:
    """The value of the one sample of `name` (this server has one engine and one model)."""
    [value] = [s.value for s in scrape(http) if s.name == name]
    return value


def post_raw(http: httpx.Client, path: str, body: str) -> httpx.Response:
    """A body exactly as written (duplicate keys, odd types), which no JSON encoder would produce."""
    return http.post(path, content=body, headers={"content-type": "application/json"})


def chat_body(model: str, fields: str, content: str = '"hi"') -> str:
    return (f'{{"model": "{model}", "messages": [{{"role": "user", "content": {content}}}], '
            f'"ignore_eos": true, {fields}}}')


def _stat(p: Path) -> list[str]:
    """A process's /proc stat fields after its name (state, ppid, pgrp, session, ...); [] once it ended."""
    try:
        return p.joinpath("stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def test_every_vllm_process_yields_the_cpu(vllm_engine: VllmServer) -> None:
    """The server, its engine core and its worker run at the server's niceness, and so does their
    session's scheduling group where the kernel has autogroups (without it, a session's nice ranks its
    threads only among themselves)."""
    session = [f for p in Path("/proc").iterdir() if p.name.isdigit()
               and (f := _stat(p)) and f[3] == str(vllm_engine.pid)]
    assert len(session) >= 3, session
    assert {int(f[16]) for f in session} == {vllm_engine.nice} == {10}
    autogroup = Path(f"/proc/{vllm_engine.pid}/autogroup")
    if autogroup.exists():
        assert autogroup.read_text().split()[-1] == "10"


def test_chat_completion(client: openai.OpenAI, vllm_engine: VllmServer) -> None:
    reply = client.chat.completions.create(model=vllm_engine.model_name, messages=MESSAGES, max_tokens=5,
                                           extra_body=IGNORE_EOS)
    assert reply.model == vllm_engine.model_name
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 5


def test_completion_prompt_is_counted_with_the_bos_vllm_adds(client: openai.OpenAI, tokenizer: Tokenizer,
                                                             vllm_engine: VllmServer) -> None:
    prompt = "Admission by the KV-cache bytes a request can claim."
    reply = client.completions.create(model=vllm_engine.model_name, prompt=prompt, max_tokens=4, extra_body=IGNORE_EOS)
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 4
    # A completions prompt is tokenized with special tokens: tokenizer.json's post-processor adds BOS.
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt).ids)
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False).ids) + 1


def test_completion_token_ids_prompt_gets_no_bos(client: openai.OpenAI, vllm_engine: VllmServer) -> None:
    reply = client.completions.create(model=vllm_engine.model_name, prompt=[100, 200, 300], max_tokens=2,
                                      extra_body=IGNORE_EOS)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == 3


def test_streaming_chat_ends_with_usage(client: openai.OpenAI, vllm_engine: VllmServer) -> None:
    stream = client.chat.completions.create(model=vllm_engine.model_name, messages=MESSAGES, max_tokens=6,
                                            stream=True, stream_options={"include_usage": True}, extra_body=IGNORE_EOS)
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 6


def test_chat_prompt_tokens_equal_the_rendered_template_count(client: openai.OpenAI, http: httpx.Client,
                                                              tokenizer: Tokenizer, tokenizer_config: dict[str, Any],
                                                              vllm_engine: VllmServer) -> None:
    rendered = render_chat(tokenizer_config, MESSAGES)
    bos = tokenizer_config["bos_token"]
    assert rendered.startswith(bos) and rendered.count(bos) == 1
    ids = tokenizer.encode(rendered, add_special_tokens=False).ids
    reply = client.chat.completions.create(model=vllm_engine.model_name, messages=MESSAGES, max_tokens=1,
                                           extra_body=IGNORE_EOS)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(ids)
    # The template writes the BOS and vLLM adds none to a chat prompt: a count with the tokenizer's
    # default (special tokens added) is one too many.
    assert len(tokenizer.encode(rendered).ids) == len(ids) + 1
    # /tokenize renders the same template into the same ids.
    tokenized = http.post("/tokenize", json={"model": vllm_engine.model_name, "messages": MESSAGES}).json()
    assert tokenized["tokens"] == ids and tokenized["count"] == len(ids)


def test_metrics_are_present_and_parse(http: httpx.Client, vllm_engine: VllmServer) -> None:
    samples = scrape(http)
    names = {s.name for s in samples}
    for name in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:num_requests_waiting_by_reason", "vllm:num_preemptions_total",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:cache_config_info"):
        assert name in names, name
    assert "vllm:gpu_cache_usage_perc" not in names
    reasons = {s.labels["reason"] for s in samples if s.name == "vllm:num_requests_waiting_by_reason"}
    assert reasons == {"capacity", "deferred"}
    usage = [s for s in samples if s.name == "vllm:kv_cache_usage_perc"]
    assert [s.labels["model_name"] for s in usage] == [vllm_engine.model_name]
    assert 0.0 <= usage[0].value <= 1.0


def test_cache_config_info_reports_the_cache_asked_for(http: httpx.Client, vllm_engine: VllmServer) -> None:
    [info] = [s.labels for s in scrape(http) if s.name == "vllm:cache_config_info"]
    assert info["block_size"] == str(vllm_engine.block_size) == "32"
    assert info["num_gpu_blocks"] == str(vllm_engine.num_blocks)
    assert info["kv_cache_size_tokens"] == str(vllm_engine.num_blocks * vllm_engine.block_size)
    assert info["enable_prefix_caching"] == "True"


def wait_until_idle(http: httpx.Client, bound_s: float = 30.0) -> float:
    """kv_cache_usage_perc once no request holds a block (the gauge is set by the engine's next stats)."""
    deadline = time.monotonic() + bound_s
    while (usage := metric(http, "vllm:kv_cache_usage_perc")) != 0.0 and time.monotonic() < deadline:
        time.sleep(0.2)
    return usage


def test_prefix_cache_is_on_and_cached_blocks_count_as_free(client: openai.OpenAI, http: httpx.Client,
                                                             tokenizer: Tokenizer,
                                                             vllm_engine: VllmServer) -> None:
    prompt = " ".join(f"prefix{i}" for i in range(40))
    tokens = len(tokenizer.encode(prompt).ids)
    assert tokens > 2 * vllm_engine.block_size

    queries = metric(http, "vllm:prefix_cache_queries_total")
    client.completions.create(model=vllm_engine.model_name, prompt=prompt, max_tokens=1)
    assert metric(http, "vllm:prefix_cache_queries_total") - queries == tokens
    # The finished request's blocks stay cached, yet the usage gauge counts them as free...
    assert wait_until_idle(http) == 0.0
    hits = metric(http, "vllm:prefix_cache_hits_total")
    client.completions.create(model=vllm_engine.model_name, prompt=prompt, max_tokens=1)
    # ...and the same prompt again finds every full block but the one holding its last token, which
    # must be computed to sample from.
    expected = (tokens - 1) // vllm_engine.block_size * vllm_engine.block_size
    assert metric(http, "vllm:prefix_cache_hits_total") - hits == expected


def test_an_overcommitted_cache_preempts_and_fails_nothing(http: httpx.Client, vllm_engine: VllmServer) -> None:
    # 8 requests of ~490 tokens, 16 blocks each, on a cache of 31 usable blocks: blocks are taken as tokens
    # are generated, not for prompt + max_tokens up front, so requests admitted together outgrow the cache
    # and vLLM preempts (recomputes) some rather than fail any.
    max_tokens = vllm_engine.max_model_len - 52
    preemptions = metric(http, "vllm:num_preemptions_total")

    def one(_: int) -> tuple[int, dict[str, int]]:
        reply = http.post("/v1/chat/completions", json={"model": vllm_engine.model_name, "messages": MESSAGES,
                                                        "max_tokens": max_tokens, **IGNORE_EOS})
        return reply.status_code, reply.json().get("usage")

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(one, range(8)))
    assert [status for status, _ in replies] == [200] * 8
    assert [usage["completion_tokens"] for _, usage in replies] == [max_tokens] * 8
    assert metric(http, "vllm:num_preemptions_total") > preemptions
    assert wait_until_idle(http) == 0.0


def test_max_tokens_above_max_model_len_is_refused(http: httpx.Client, vllm_engine: VllmServer) -> None:
    reply = post_raw(http, "/v1/chat/completions",
                     chat_body(vllm_engine.model_name, f'"max_tokens": {vllm_engine.max_model_len + 1}'))
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "max_tokens"


def test_prompt_plus_max_tokens_over_max_model_len_is_silently_shortened(client: openai.OpenAI,
                                                                         vllm_engine: VllmServer) -> None:
    reply = client.chat.completions.create(model=vllm_engine.model_name, messages=MESSAGES,
                                           max_tokens=vllm_engine.max_model_len, extra_body=IGNORE_EOS)
    assert reply.usage is not None
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == vllm_engine.max_model_len - reply.usage.prompt_tokens


@pytest.mark.parametrize(("fields", "completion_tokens"), [
    ('"max_tokens": 100, "max_tokens": 5', 5),
    ('"max_tokens": 5, "max_tokens": 9', 9),
    # max_completion_tokens wins over max_tokens, in either order.
    ('"max_completion_tokens": 4, "max_tokens": 9', 4),
    ('"max_tokens": 9, "max_completion_tokens": 4', 4),
])
def test_duplicate_keys_the_last_one_wins(http: httpx.Client, vllm_engine: VllmServer, fields: str,
                                          completion_tokens: int) -> None:
    reply = post_raw(http, "/v1/chat/completions", chat_body(vllm_engine.model_name, fields))
    assert reply.status_code == 200
    assert reply.json()["usage"]["completion_tokens"] == completion_tokens


@pytest.mark.parametrize(("fields", "completion_tokens"), [
    ('"max_tokens": "7"', 7),
    ('"max_tokens": 7.0', 7),
    ('"max_tokens": true', 1),
])
def test_lax_max_tokens_types_are_coerced(http: httpx.Client, vllm_engine: VllmServer, fields: str,
                                          completion_tokens: int) -> None:
    reply = post_raw(http, "/v1/chat/completions", chat_body(vllm_engine.model_name, fields))
    assert reply.status_code == 200
    assert reply.json()["usage"]["completion_tokens"] == completion_tokens


@pytest.mark.parametrize(("fields", "content"), [
    ('"max_tokens": 7.5', '"hi"'),
    ('"max_tokens": 0', '"hi"'),
    ('"max_tokens": 2, "stream": "maybe"', '"hi"'),
    ('"max_tokens": 2', "42"),
    ('"max_tokens": 2', "null"),
])
def test_wrong_types_are_refused(http: httpx.Client, vllm_engine: VllmServer, fields: str,
                                 content: str) -> None:
    reply = post_raw(http, "/v1/chat/completions", chat_body(vllm_engine.model_name, fields, content))
    assert reply.status_code == 400
    assert "error" in reply.json()


@pytest.mark.parametrize(("stream", "streamed"), [('"yes"', True), ('"true"', True), ("1", True),
                                                  ('"no"', False), ("0", False)])
def test_lax_stream_flags_are_coerced(http: httpx.Client, vllm_engine: VllmServer, stream: str,
                                      streamed: bool) -> None:
    reply = post_raw(http, "/v1/chat/completions",
                     chat_body(vllm_engine.model_name, f'"max_tokens": 2, "stream": {stream}'))
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream") is streamed


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "/v1/responses", {"input": "hi", "max_output_tokens": 3}, 200),
    ("POST", "/v1/messages", {"max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}, 200),
    ("POST", "/v1/messages/count_tokens", {"messages": [{"role": "user", "content": "hi"}]}, 200),
    ("POST", "/tokenize", {"prompt": "hi"}, 200),
    ("POST", "/detokenize", {"tokens": [100, 200]}, 200),
    ("GET", "/version", None, 200),
    # A generate-only model serves no embeddings; nor does vLLM serve one model by id.
    ("POST", "/v1/embeddings", {"input": "hi"}, 404),
    ("GET", "/v1/models/{model}", None, 404),
])
def test_endpoints(http: httpx.Client, vllm_engine: VllmServer, method: str, path: str,
                   body: dict[str, object] | None, status: int) -> None:
    name = vllm_engine.model_name
    json_body = None if body is None else {"model": name, **body}
    reply = http.request(method, path.format(model=name), json=json_body)
    assert reply.status_code == status, reply.text


def test_anthropic_messages_counts_like_chat(http: httpx.Client, vllm_engine: VllmServer) -> None:
    messages = [{"role": "user", "content": "What is a KV cache?"}]
    body = {"model": vllm_engine.model_name, "messages": messages}
    chat = http.post("/v1/chat/completions", json={**body, "max_tokens": 2, **IGNORE_EOS}).json()
    counted = http.post("/v1/messages/count_tokens", json=body).json()
    assert counted["input_tokens"] == chat["usage"]["prompt_tokens"]
