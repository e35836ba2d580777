"""The whole gateway (xds_server, ext_proc, Envoy) in front of the real vLLM: what clients see through it
with the openai SDK, checked against vLLM's own accounting. Prompt tokens counted by ext_proc equal
vLLM's usage.prompt_tokens; the clamp is what vLLM generates; reservations fill vLLM's cache without a
single preemption, where vLLM alone preempts; refusals come in OpenAI's shape; ext_proc reads vLLM's
metrics (its cache size, its KV use, its prompt-token counter).

Requests that count tokens set ignore_eos: random weights can emit an end token at any step.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from engines.real.vllm import VllmServer
from kvgate.cli.gateway import Gateway
from tests.integration.conftest import ledger_metrics, reserved, wait_for
from tests.real_engines.test_vllm_engine import metric
from tests.real_engines.vllm_fixture import SETUP_TIMEOUT_S
from tests.real_engines.vllm_gateway_fixture import BLOCK, KV_BYTES_PER_TOKEN, MAX_OUTPUT, MODEL, PATIENT, SIM_MODEL

pytestmark = pytest.mark.timeout(SETUP_TIMEOUT_S)

IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture
def gateway(vllm_gateway: Gateway) -> Gateway:
    """The session's gateway, once the previous test's requests have all been released: tests count on
    the whole budget (a release lands moments after its client has the answer)."""
    wait_for(lambda: reserved(vllm_gateway, MODEL) == reserved(vllm_gateway, SIM_MODEL) == 0,
             "the previous test's reservations to be released", timeout_s=30)
    return vllm_gateway


@pytest.fixture
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=300) as c:
        yield c


@pytest.fixture
def engine_http(vllm_engine: VllmServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=vllm_engine.url, timeout=300) as c:
        yield c


def logged_decision(gw: Gateway, request_id: str) -> dict[str, Any]:
    """ext_proc's decision about the request Envoy named `request_id` (its x-request-id, which Envoy also
    sets on the response), from Envoy's access log."""
    found: list[dict[str, Any]] = []

    def logged() -> bool:
        lines = [json.loads(line) for line in gw.access_log_path.read_text().splitlines()]
        found[:] = [e["kvgate"] for e in lines if e.get("request_id") == request_id and e.get("kvgate")]
        return bool(found)

    wait_for(logged, f"the access log line of {request_id}")
    return found[0]


def decision(gw: Gateway, response_id: str) -> dict[str, Any]:
    """vLLM names its completions after the x-request-id Envoy sends it (chatcmpl-<id>, cmpl-<id>)."""
    return logged_decision(gw, response_id.split("-", 1)[1])


def counted(gw: Gateway, response_id: str) -> int:
    d = decision(gw, response_id)
    assert d["decision"] == "admitted" and d["prompt_counted"] is True, d
    return int(d["prompt_tokens"])


CHATS = {
    "system and user": [{"role": "system", "content": "You are terse."},
                        {"role": "user", "content": "What is a KV cache?"}],
    "content parts": [{"role": "user", "content": [{"type": "text", "text": "Two parts,"},
                                                   {"type": "text", "text": " joined by a newline."}]}],
    "earlier turns": [{"role": "system", "content": "  Padded system prompt.  "},
                      {"role": "user", "content": "First question?"},
                      {"role": "assistant", "content": "First answer."},
                      {"role": "user", "content": "And the second, in UTF-8: héllo 你好 🚀"}],
    "special tokens in content": [{"role": "user", "content": "<|eot_id|>text<|start_header_id|>"}],
    "developer role": [{"role": "developer", "content": "Follow the house style."},
                       {"role": "user", "content": "hi"}],
    "tool call and result": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Rain."}],
}


@pytest.mark.parametrize("name", CHATS)
def test_chat_prompt_tokens_equal_vllm_usage(client: openai.OpenAI, gateway: Gateway, name: str) -> None:
    reply = client.chat.completions.create(model="tiny-llama", messages=CHATS[name], max_tokens=2,
                                           extra_body=IGNORE_EOS)
    assert reply.usage is not None
    assert counted(gateway, reply.id) == reply.usage.prompt_tokens


def test_chat_with_template_fields_counts_what_vllm_renders(client: openai.OpenAI, gateway: Gateway) -> None:
    """continue_final_message drops the generation prompt and cuts the final message open."""
    messages = [{"role": "user", "content": "Complete this:"}, {"role": "assistant", "content": "The cache holds"}]
    reply = client.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=2,
        extra_body={**IGNORE_EOS, "continue_final_message": True, "add_generation_prompt": False})
    assert reply.usage is not None
    assert counted(gateway, reply.id) == reply.usage.prompt_tokens


@pytest.mark.parametrize("prompt", ["Admission by the KV-cache bytes a request can claim.", "<|eot_id|> x"])
def test_completion_prompt_tokens_equal_vllm_usage(client: openai.OpenAI, gateway: Gateway, prompt: str) -> None:
    """A completions prompt gets the BOS the tokenizer adds; vLLM counts it too."""
    reply = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=2, extra_body=IGNORE_EOS)
    assert reply.usage is not None
    assert counted(gateway, reply.id) == reply.usage.prompt_tokens


def test_token_id_prompt_is_counted_as_sent(client: openai.OpenAI, gateway: Gateway) -> None:
    reply = client.completions.create(model="tiny-llama", prompt=[100, 200, 300, 400], max_tokens=2,
                                      extra_body=IGNORE_EOS)
    assert reply.usage is not None and reply.usage.prompt_tokens == 4
    assert counted(gateway, reply.id) == 4


def test_streaming_chat_through_the_gateway(client: openai.OpenAI, gateway: Gateway) -> None:
    stream = client.chat.completions.create(model="tiny-llama", messages=CHATS["system and user"], max_tokens=6,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body=IGNORE_EOS)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 6
    assert counted(gateway, chunks[0].id) == usage.prompt_tokens


@pytest.mark.parametrize(("content", "asked"), [("hi", 5000), ("hi", None), ("word " * 40, 5000), ("hi", 7)])
def test_the_clamp_is_what_vllm_generates(client: openai.OpenAI, gateway: Gateway, vllm_engine: VllmServer,
                                          content: str, asked: int | None) -> None:
    """max_tokens above the model's limit, absent (vLLM alone would fill the context), more than the
    context leaves after the prompt, or within both: kvgate writes its limit into the body, and vLLM
    generates exactly that many tokens."""
    reply = client.chat.completions.with_raw_response.create(
        model="tiny-llama", messages=[{"role": "user", "content": content}], extra_body=IGNORE_EOS,
        **({"max_tokens": asked} if asked is not None else {}))
    completion = reply.parse()
    assert completion.usage is not None
    prompt = completion.usage.prompt_tokens
    expected = min(asked or MAX_OUTPUT, MAX_OUTPUT, vllm_engine.max_model_len - prompt)
    assert int(reply.headers["x-kvgate-max-tokens"]) == completion.usage.completion_tokens == expected
    assert completion.choices[0].finish_reason == "length"
    assert counted(gateway, completion.id) == prompt


def test_a_prompt_longer_than_the_context_is_refused_by_the_gateway(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "x " * 600}],
                                       max_tokens=2)
    assert e.value.code == "context_length_exceeded"
    assert "512" in e.value.message


def test_the_budget_is_the_cache_vllm_reports(gateway: Gateway, vllm_engine: VllmServer) -> None:
    """The catalog says 32 blocks; vLLM's cache_config_info says 32 of which one is its null block: the
    ledger holds the 31 sequences can use."""
    usable = (vllm_engine.num_blocks - 1) * BLOCK * KV_BYTES_PER_TOKEN
    wait_for(lambda: ledger_metrics(gateway)[("kvgate_kv_budget_bytes", "tiny-llama")] == usable,
             "the budget from vLLM's cache_config_info")
    assert ledger_metrics(gateway)[("kvgate_kv_engine_blind", "tiny-llama")] == 0


def test_reconciliation_sees_vllm_kv_use_the_gateway_did_not_admit(gateway: Gateway,
                                                                   engine_http: httpx.Client) -> None:
    """Requests sent to vLLM around the gateway hold blocks no reservation explains: ext_proc counts
    them against the budget while vLLM holds them, and not after."""
    excess = lambda: ledger_metrics(gateway)[("kvgate_kv_engine_excess_bytes", "tiny-llama")]  # noqa: E731
    seen = threading.Event()

    def around_the_gateway(i: int) -> None:
        while not seen.is_set():  # different prompts: nothing shared in the prefix cache
            engine_http.post("/v1/completions", json={"model": "tiny-llama", "prompt": f"around {i} " * 40,
                                                      "max_tokens": 300, **IGNORE_EOS})

    # Four at once: vLLM's metrics are served between its steps, by a process that competes for the
    # same two cores; with one short request at a time a scrape could keep landing after it.
    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(around_the_gateway, i) for i in range(4)]
        try:
            wait_for(lambda: excess() > 0, "ext_proc to see vLLM's blocks in use", timeout_s=120)
        finally:
            seen.set()
        for r in running:
            r.result()
    wait_for(lambda: excess() == 0, "the excess to go once vLLM is idle", timeout_s=30)


def test_prompt_gap_metric_shows_exact_counts(gateway: Gateway, client: openai.OpenAI) -> None:
    """What ext_proc admitted and what vLLM's prompt_tokens_total counted grow by the same tokens, and the
    gap gauge, over a window of only such traffic, is 0."""
    def counters() -> tuple[float, float] | None:
        m = ledger_metrics(gateway)
        engine = m.get(("kvgate_engine_prompt_tokens_total", "tiny-llama"))
        return None if engine is None else (m[("kvgate_prompt_tokens_admitted_total", "tiny-llama")], engine)

    wait_for(lambda: counters() is not None, "ext_proc to read vLLM's prompt-token counter")
    admitted0, engine0 = counters()  # type: ignore[misc]
    for messages in CHATS.values():
        client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=1)
    admitted = counters()[0] - admitted0  # type: ignore[index]
    assert admitted > 0
    wait_for(lambda: counters()[1] - engine0 == admitted,  # type: ignore[index]
             f"vLLM to report the {admitted} prompt tokens ext_proc admitted")


class Peak:
    """The highest value of one gauge seen while it runs: a thread reads the one line it needs, as often
    as the server answers."""

    def __init__(self, url: str, name: str, **labels: str):
        self.url, self.peak, self.samples, self._stop = url, 0.0, 0, threading.Event()
        self._line = re.compile("^" + re.escape(name) + r"(\{[^}]*\})? (\S+)$", re.MULTILINE)
        self._labels = [f'{k}="{v}"' for k, v in labels.items()]  # those the series has, among others
        self._thread = threading.Thread(target=self._sample)

    def _sample(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self._stop.is_set():
                found = next((m for m in self._line.finditer(http.get(self.url).text)
                              if all(label in (m[1] or "") for label in self._labels)), None)
                assert found is not None, f"{self.url} publishes the series"
                self.peak, self.samples = max(self.peak, float(found[2])), self.samples + 1
                time.sleep(0.005)

    def __enter__(self) -> Peak:
        self._thread.start()
        wait_for(lambda: self.samples > 0, f"a first sample of {self.url}")  # its connection is open
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def flood(send: Callable[[int], int], n: int) -> list[int]:
    """`n` requests at once (released together), their statuses."""
    start = threading.Barrier(n)

    def one(i: int) -> int:
        start.wait()
        return send(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def flood_chat(i: int, max_tokens: int, words: int = 0, model: str = MODEL) -> dict[str, Any]:
    # Each its own first block: no prefix shared, so blocks in use are what the reservations say. With
    # i < 40 (requests 10 to 49) the prompts have the same number of tokens.
    return {"model": model, "max_tokens": max_tokens, **IGNORE_EOS,
            "messages": [{"role": "system", "content": f"Request {i + 10} of the flood."},
                         {"role": "user", "content": "Write a long answer to this: " + "word " * words}]}


@pytest.mark.parametrize("model", [MODEL, SIM_MODEL])
def test_a_flood_fills_the_cache_without_a_preemption(gateway: Gateway, vllm_engine: VllmServer, model: str) -> None:
    """28 chats at once whose prompts fill 5 blocks and which grow to 6 (prompt + max_tokens - 1 = 192
    tokens), 168 blocks in all on a cache of 31: through kvgate five at a time hold 30 blocks, the rest
    wait in its queue, and nothing is preempted. The simulated vLLM goes through the same. (vLLM alone
    preempts under such floods: test_vllm_engine.py.)

    kvgate's part is to hand out the whole budget at once: its reservations, held for the requests'
    whole lives, must reach the 30 blocks (the old one-long-request-at-a-time cap allowed 6). How full
    vLLM's cache then gets is not asserted: each wave lasts ~0.2 s, and vLLM's gauge, sampled, can miss
    it (an earlier version required 70% and once saw 19%, while its clients were also slow to send).
    With this test's one client, three runs saw the gauge peak at 81-97% and vLLM's own
    request_inference_time_seconds put 1.6-3.6 requests running at once on average over the flood
    (2026-12-05). Small requests like these sent straight to vLLM preempt in some runs and not in
    others, so the contrast is left to test_vllm_engine.py's larger ones."""
    engine_url = vllm_engine.url if model == MODEL else f"http://{gateway.sims[SIM_MODEL][0]}"
    prompt = counted(gateway, httpx.post(gateway.url + "/v1/chat/completions",
                                         json=flood_chat(0, 1, 32, model), timeout=60).json()["id"])
    assert 4 * BLOCK < prompt <= 5 * BLOCK
    max_tokens = 6 * BLOCK + 1 - prompt

    # One client for all: httpx.post makes a client per call, whose set-up (~10 ms of CPU each) spread
    # the flood's sends so that sometimes no more than two were in kvgate at once.
    clients = httpx.Client(base_url=gateway.url, headers=PATIENT, timeout=120, limits=httpx.Limits(max_connections=28))

    def through_kvgate(i: int) -> int:  # prompts not in vLLM's prefix cache: each its own first block
        return clients.post("/v1/chat/completions", json=flood_chat(12 + i, max_tokens, 32, model)).status_code

    with clients, httpx.Client(base_url=engine_url, timeout=300) as engine:
        # ext_proc counts the blocks of other tests' traffic against the budget until it sees them go.
        wait_for(lambda: ledger_metrics(gateway)[("kvgate_kv_engine_excess_bytes", model)] == 0,
                 "ext_proc to see the engine idle", timeout_s=30)
        before = metric(engine, "vllm:num_preemptions_total")
        with Peak(gateway.ext_proc_metrics_url, "kvgate_kv_reserved_bytes", endpoint=engine_url[7:], model=model) \
                as reserved:
            assert flood(through_kvgate, 28) == [200] * 28
        assert metric(engine, "vllm:num_preemptions_total") == before
    assert reserved.peak == 30 * BLOCK * KV_BYTES_PER_TOKEN, f"kvgate reserved at most {reserved.peak} bytes"


def test_what_does_not_fit_is_refused_in_openai_shape(gateway: Gateway, engine_http: httpx.Client,
                                                      vllm_engine: VllmServer) -> None:
    """Requests of 16 blocks (two would need 32 of the 31): one runs, the others, in a class that may not
    wait, get 429 with Retry-After, which the openai SDK raises as RateLimitError."""
    errors: list[openai.RateLimitError] = []
    prompt = counted(gateway, httpx.post(gateway.url + "/v1/chat/completions",
                                         json=flood_chat(0, 1), timeout=60).json()["id"])

    def one(i: int) -> int:
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
            try:
                body = flood_chat(i, vllm_engine.max_model_len - prompt)
                c.chat.completions.create(model=body["model"], messages=body["messages"],
                                          max_tokens=body["max_tokens"], extra_body=IGNORE_EOS)
            except openai.RateLimitError as e:
                errors.append(e)
                return 429
            return 200

    before = metric(engine_http, "vllm:num_preemptions_total")
    statuses = flood(one, 4)
    assert 200 in statuses and 429 in statuses, statuses
    e = errors[0]
    assert e.code == "rate_limit_exceeded" and e.type == "rate_limit_error"
    assert 1 <= int(e.response.headers["retry-after"]) <= 60
    assert metric(engine_http, "vllm:num_preemptions_total") == before

