"""ext_proc/tokenizer.py and ext_proc/tokens.py: exact counts with a model's tokenizer.json (one trained
here on the repo's docs), the LRU cache, the per-(path, sha256) registry and its fallbacks, and the
upper bound the counts must never exceed."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs
from tokenizers import AddedToken, Encoding, Tokenizer, pre_tokenizers, processors

from ext_proc import kserve, tokenizer as tokenizer_module, tokens
from ext_proc.openai_protocol import CHAT_PATH, COMPLETIONS_PATH, parse_request
from ext_proc.policy import Policy
from ext_proc.request import LLMRequest
from ext_proc.tokenizer import TokenCounter, Tokenizers, TokenizerError, load_counter
from engines.real import tiny_tokenizer
from kvgate.chat_template import ChatTemplate, TemplateSource
from tests.unit.test_chat_template import LLAMA3

# Text of the kinds a gateway sees; the bound must hold for each.
SAMPLES = {
    "english": "The gateway admits a request only when the KV-cache bytes it may claim fit the budget.",
    "code": "def plan(req: LLMRequest) -> Plan:\n    return max(tokens.prompt_tokens(req), default=0)  # why\n",
    "json": '{"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}',
    "cjk": "大型语言模型的推理网关在请求到达引擎之前估计提示的令牌数。日本語のテキストも。한국어 문장.",
    "emoji": "Ship it 🚀🚀🔥 — ok 👍🏽 👨‍👩‍👧‍👦 ✅",
    "whitespace": "\n\n\t  trailing   spaces   \r\n",
    "digits": "3.14159265358979323846 1234567890 0xDEADBEEF",
    "empty": "",
}


@pytest.fixture(scope="module")
def reference() -> Tokenizer:
    """The trained tokenizer the counts are checked against (a separate object from the counter's)."""
    return tiny_tokenizer.load()


@pytest.fixture
def counter() -> TokenCounter:
    return TokenCounter(tiny_tokenizer.load())


def n_tokens(tok: Tokenizer, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False).ids)


def policy(path: str = "", sha256: str = "", name: str = "m", **overrides: Any) -> Policy:
    fields: dict[str, Any] = dict(
        name=name, protocol="openai", backend_model=name, max_context_tokens=100_000, max_output_tokens=100,
        kv_bytes_per_token=10, tokens_per_block=16, endpoints=(), estimate_bytes_per_token=1.0,
        estimate_per_message=0, estimate_per_request=0, tokenizer_path=path, tokenizer_sha256=sha256)
    return Policy(**{**fields, **overrides})


def chat(*contents: str, **fields: Any) -> LLMRequest:
    messages = [{"role": "user" if i % 2 else "system", "content": c} for i, c in enumerate(contents)]
    return parse_request(CHAT_PATH, orjson.dumps({"model": "m", "messages": messages, **fields})).request


def completion(prompt: Any) -> LLMRequest:
    return parse_request(COMPLETIONS_PATH, orjson.dumps({"model": "m", "prompt": prompt})).request


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Recording:
    """The counter's tokenizer, noting every batch it is asked to encode."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.batches: list[list[str]] = []

    def encode_batch_fast(self, texts: Sequence[str], add_special_tokens: bool) -> list[Encoding]:
        self.batches.append(list(texts))
        return self.tok.encode_batch_fast(texts, add_special_tokens=add_special_tokens)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tok, name)


def recording_counter(cache_entries: int = 100) -> tuple[TokenCounter, Recording]:
    rec = Recording(tiny_tokenizer.load())
    return TokenCounter(rec, cache_entries), rec  # type: ignore[arg-type]


# --- TokenCounter: counts --------------------------------------------------------------------

@pytest.mark.parametrize("kind", SAMPLES)
def test_count_matches_the_tokenizers_own_encode(kind: str, counter: TokenCounter, reference: Tokenizer) -> None:
    assert counter.count([SAMPLES[kind]]) == [n_tokens(reference, SAMPLES[kind])]


def test_count_of_many_texts_in_one_call_keeps_their_order(counter: TokenCounter, reference: Tokenizer) -> None:
    texts = list(SAMPLES.values()) * 2
    assert counter.count(texts) == [n_tokens(reference, t) for t in texts]


def test_count_of_repo_text_is_well_below_its_bytes(counter: TokenCounter) -> None:
    """The tokenizer really learned the docs: English markdown takes several bytes per token."""
    text = (tiny_tokenizer.REPO / "docs" / "architecture.md").read_text()
    [n] = counter.count([text])
    assert 0 < n < len(text.encode()) / 2.5


@pytest.mark.parametrize("kind", SAMPLES)
def test_byte_bound_is_never_below_the_exact_count(kind: str, counter: TokenCounter) -> None:
    text = SAMPLES[kind] * 3
    assert counter.count([text])[0] <= len(text.encode())
    req = completion(text)
    assert tokens.prompt_tokens(req, policy(), counter) <= tokens.prompt_tokens(req, policy(), None)


def with_bos(tok: Tokenizer) -> Tokenizer:
    """The tokenizer adding <s> to every text encoded with special tokens, as Llama's do."""
    tok.add_special_tokens(["<s>"])
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    return tok


def test_special_tokens_are_not_counted_per_piece(reference: Tokenizer) -> None:
    """A tokenizer.json that adds BOS to every encode: the BOS is the template's (per_request_tokens),
    so a chat of three messages must not count three of them."""
    tok = with_bos(tiny_tokenizer.load())
    assert len(tok.encode("hello").ids) == n_tokens(reference, "hello") + 1
    counter = TokenCounter(tok)
    assert counter.count(["hello", "world"]) == [n_tokens(reference, "hello"), n_tokens(reference, "world")]


def test_truncation_and_padding_in_the_file_are_ignored(tmp_path: Path, reference: Tokenizer) -> None:
    tok = tiny_tokenizer.load()
    tok.enable_truncation(max_length=4)
    tok.enable_padding(length=64)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    counter = load_counter(str(path), sha(path))
    long, short = SAMPLES["english"], "hi"
    assert counter.count([long, short]) == [n_tokens(reference, long), n_tokens(reference, short)]
    assert n_tokens(reference, long) > 4


# --- TokenCounter: the cache -----------------------------------------------------------------

def test_second_count_of_a_text_is_a_cache_hit() -> None:
    counter, rec = recording_counter()
    first = counter.count(["system prompt", "question one"])
    assert counter.count(["system prompt", "question two"])[0] == first[0]
    assert rec.batches == [["system prompt", "question one"], ["question two"]]
    assert (counter.hits, counter.misses) == (1, 3)


def test_a_text_twice_in_one_call_is_encoded_once() -> None:
    counter, rec = recording_counter()
    out = counter.count(["same", "other", "same"])
    assert out[0] == out[2]
    assert rec.batches == [["same", "other"]]


def test_all_hits_encode_nothing() -> None:
    counter, rec = recording_counter()
    counter.count(["a b c", "d e f"])
    counter.count(["d e f", "a b c"])
    assert len(rec.batches) == 1
    assert counter.hits == 2


def test_cache_is_bounded_and_evicts_the_least_recently_used() -> None:
    counter, rec = recording_counter(cache_entries=2)
    counter.count(["a"])
    counter.count(["b"])
    counter.count(["a"])  # a is now the most recent
    counter.count(["c"])  # evicts b
    rec.batches.clear()
    counter.count(["a"])
    counter.count(["c"])
    assert rec.batches == []
    counter.count(["b"])
    assert rec.batches == [["b"]]


def test_counts_stay_right_when_one_call_overflows_the_cache(reference: Tokenizer) -> None:
    counter, _ = recording_counter(cache_entries=1)
    texts = [SAMPLES["english"], SAMPLES["code"], SAMPLES["cjk"]]
    assert counter.count(texts) == [n_tokens(reference, t) for t in texts]


def test_cache_needs_an_entry() -> None:
    with pytest.raises(ValueError):
        TokenCounter(tiny_tokenizer.load(), cache_entries=0)


@pytest.mark.asyncio
async def test_prefetch_encodes_off_the_event_loop_then_count_hits() -> None:
    counter, rec = recording_counter()
    threads: list[threading.Thread] = []
    encode = rec.encode_batch_fast

    def noting_thread(texts: Sequence[str], add_special_tokens: bool) -> list[Encoding]:
        threads.append(threading.current_thread())
        return encode(texts, add_special_tokens)

    rec.encode_batch_fast = noting_thread  # type: ignore[method-assign]
    await counter.prefetch(["long document", "system prompt"])
    assert threads and threads[0] is not threading.main_thread()
    counter.count(["system prompt", "long document"])
    assert len(rec.batches) == 1
    assert counter.hits == 2


# --- prompt_tokens ---------------------------------------------------------------------------

def test_chat_count_is_the_contents_plus_the_template_overhead(counter: TokenCounter, reference: Tokenizer) -> None:
    contents = ("You are terse.", "What is KV cache?", "Memory.", "How big per token?")
    req = chat(*contents)
    exact = sum(n_tokens(reference, c) for c in contents)
    assert tokens.prompt_tokens(req, policy(), counter) == (exact,)
    pol = policy(estimate_per_message=7, estimate_per_request=3)
    assert tokens.prompt_tokens(req, pol, counter) == (exact + 7 * 4 + 3,)


def test_chat_count_includes_tool_schemas(counter: TokenCounter, reference: Tokenizer) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    req = chat("hi", tools=[tool])
    assert tokens.prompt_tokens(req, policy(), counter) == (
        n_tokens(reference, "hi") + n_tokens(reference, orjson.dumps([tool]).decode()),)


def test_completion_batch_is_counted_per_prompt(counter: TokenCounter, reference: Tokenizer) -> None:
    """With a tokenizer, a completion prompt is its text: the template estimate is for chats."""
    prompts = [SAMPLES["english"], SAMPLES["cjk"], SAMPLES["english"]]
    pol = policy(estimate_per_request=2)
    assert tokens.prompt_tokens(completion(prompts), pol, counter) == tuple(n_tokens(reference, p) for p in prompts)


def test_completion_prompt_gets_the_specials_the_tokenizer_adds(reference: Tokenizer) -> None:
    """Engines encode a completions prompt with special tokens: Llama 3's tokenizer.json adds a BOS."""
    counter = TokenCounter(with_bos(tiny_tokenizer.load()))
    assert counter.specials_added == 1
    assert tokens.prompt_tokens(completion("hello"), policy(), counter) == (n_tokens(reference, "hello") + 1,)


def test_token_ids_are_counted_as_given_with_or_without_a_counter(counter: TokenCounter) -> None:
    req = completion([[1, 2, 3], [4]])
    assert tokens.prompt_tokens(req, policy(estimate_per_request=8), counter) == (3, 1)
    assert tokens.prompt_tokens(req, policy(estimate_per_request=8), None) == (3, 1)


def test_without_a_counter_the_bound_is_bytes_plus_overhead() -> None:
    req = chat("héllo", "你好")
    pol = policy(estimate_bytes_per_token=2.0, estimate_per_message=8, estimate_per_request=5)
    assert req.prompt_bytes == (6 + 6,)
    assert tokens.prompt_tokens(req, pol, None) == (6 + 8 * 2 + 5,)


def test_chat_bound_is_never_below_the_exact_count(counter: TokenCounter) -> None:
    req = chat(*SAMPLES.values(), tools=[{"type": "function", "function": {"name": "f"}}])
    pol = policy(estimate_per_message=8, estimate_per_request=8)
    assert tokens.prompt_tokens(req, pol, counter)[0] <= tokens.prompt_tokens(req, pol, None)[0]


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"ok \xe4\xbd", b"\xed\xa0\x80", b"\xc0\xaf\x80\x80",
                                 b"\xf0\x9f\x98", "héllo".encode() + b"\x80" * 20])
def test_invalid_utf8_bound_covers_the_raw_bytes_and_the_count(raw: bytes, counter: TokenCounter) -> None:
    req = kserve.text_request("m", [kserve.text(raw)], None)
    bound = tokens.prompt_tokens(req, policy(), None)[0]
    assert bound >= len(raw)  # an engine tokenizing the bytes themselves: at most one token each
    assert bound >= tokens.prompt_tokens(req, policy(), counter)[0]


# --- Tokenizers: the registry ----------------------------------------------------------------

@pytest.fixture
def tok_file(tmp_path: Path) -> Path:
    return tiny_tokenizer.write_tokenizer(tmp_path)


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, threading.Thread]]:
    """Every load_counter call the registry makes: the path, and the thread it ran on."""
    calls: list[tuple[str, threading.Thread]] = []
    real = tokenizer_module.load_counter

    def noting(path: str, sha256: str, cache_entries: int) -> TokenCounter:
        calls.append((path, threading.current_thread()))
        return real(path, sha256, cache_entries)

    monkeypatch.setattr(tokenizer_module, "load_counter", noting)
    return calls


@pytest.mark.asyncio
async def test_update_loads_the_named_tokenizer(tok_file: Path, reference: Tokenizer) -> None:
    reg = Tokenizers()
    pol = policy(str(tok_file), sha(tok_file))
    assert reg.counter_for(pol) is None  # not loaded yet: the bound
    await reg.update([pol, policy(name="plain")])
    counter = reg.counter_for(pol)
    assert counter is not None
    assert counter.count([SAMPLES["code"]]) == [n_tokens(reference, SAMPLES["code"])]
    assert reg.counter_for(policy(name="plain")) is None


@pytest.mark.asyncio
async def test_same_tokenizer_is_not_reloaded_and_is_shared(tok_file: Path, loads: list[Any]) -> None:
    reg = Tokenizers()
    a, b = policy(str(tok_file), sha(tok_file), "a"), policy(str(tok_file), sha(tok_file), "b")
    await reg.update([a, b])
    first = reg.counter_for(a)
    await reg.update([a, b, policy(name="c")])
    assert [path for path, _ in loads] == [str(tok_file)]
    assert first is not None and reg.counter_for(a) is first and reg.counter_for(b) is first


@pytest.mark.asyncio
async def test_load_runs_off_the_event_loop(tok_file: Path, loads: list[Any]) -> None:
    await Tokenizers().update([policy(str(tok_file), sha(tok_file))])
    assert len(loads) == 1 and loads[0][1] is not threading.current_thread()


async def unusable(pol: Policy) -> str:
    """Updates a registry with the policy; asserts it fell back to the bound with one error logged, and
    returns the logged error."""
    reg = Tokenizers()
    with capture_logs() as logs:
        await reg.update([pol])
    assert reg.counter_for(pol) is None
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [(e["event"], e["path"], e["models"]) for e in errors] == [
        ("tokenizer.unusable", pol.tokenizer_path, [pol.name])]
    return errors[0]["error"]


@pytest.mark.asyncio
async def test_sha256_mismatch_falls_back_to_the_bound(tok_file: Path) -> None:
    pol = policy(str(tok_file), "0" * 64)
    assert "sha256" in await unusable(pol)
    req = chat("hello there")
    assert tokens.prompt_tokens(req, pol, None) == (len(b"hello there"),)


@pytest.mark.asyncio
async def test_missing_file_falls_back(tmp_path: Path) -> None:
    assert "cannot read" in await unusable(policy(str(tmp_path / "absent.json"), "ab" * 32))


@pytest.mark.asyncio
async def test_malformed_file_falls_back(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text('{"not": "a tokenizer"}')
    assert "tokenizer.json" in await unusable(policy(str(path), sha(path)))


@pytest.mark.asyncio
async def test_policy_without_sha256_is_not_trusted(tok_file: Path) -> None:
    assert "no sha256" in await unusable(policy(str(tok_file), ""))


@pytest.mark.asyncio
async def test_failed_load_is_retried_at_the_next_update(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    expected = hashlib.sha256(tiny_tokenizer.trained_json().encode()).hexdigest()
    reg = Tokenizers()
    pol = policy(str(path), expected)
    with capture_logs():
        await reg.update([pol])
    assert reg.counter_for(pol) is None
    tiny_tokenizer.write_tokenizer(tmp_path)
    await reg.update([pol])
    assert reg.counter_for(pol) is not None


@pytest.mark.asyncio
async def test_sha256_is_compared_without_case(tok_file: Path) -> None:
    reg = Tokenizers()
    pol = policy(str(tok_file), sha(tok_file).upper())
    await reg.update([pol])
    assert reg.counter_for(pol) is not None


@pytest.mark.asyncio
async def test_tokenizer_no_policy_names_is_dropped(tok_file: Path) -> None:
    reg = Tokenizers()
    pol = policy(str(tok_file), sha(tok_file))
    await reg.update([pol])
    await reg.update([policy(name="other")])
    assert reg.counter_for(pol) is None


@pytest.mark.asyncio
async def test_concurrent_updates_load_once(tok_file: Path, loads: list[Any]) -> None:
    reg = Tokenizers()
    pol = policy(str(tok_file), sha(tok_file))
    await asyncio.gather(reg.update([pol]), reg.update([pol]))
    assert [path for path, _ in loads] == [str(tok_file)]


def test_load_counter_raises_tokenizer_error_for_a_mismatch(tok_file: Path) -> None:
    with pytest.raises(TokenizerError):
        load_counter(str(tok_file), "f" * 64)


@pytest.mark.asyncio
async def test_prefetching_a_requests_pieces_leaves_prompt_tokens_nothing_to_encode(reference: Tokenizer) -> None:
    counter, rec = recording_counter()
    req = chat("You are terse.", "What is KV cache?", tools=[{"type": "function", "function": {"name": "f"}}])
    await counter.prefetch(tokens.texts(req, policy(), counter).flat)
    encoded = len(rec.batches)
    expected = sum(n_tokens(reference, p) for p in tokens.texts(req, policy(), counter).flat)
    assert tokens.prompt_tokens(req, policy(), counter) == (expected,)
    assert len(rec.batches) == encoded == 1


# --- chat templates: the rendered prompt, counted in segments -------------------------------------

MARKUP = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def llama3_tokenizer() -> Tokenizer:
    tok = tiny_tokenizer.load()
    tok.add_special_tokens(MARKUP)
    return tok


def templated(**overrides: Any) -> Policy:
    source = TemplateSource(LLAMA3, (("bos_token", "<|begin_of_text|>"),))
    return policy(chat_template=ChatTemplate(source), **overrides)


def test_a_rendered_chat_counts_exactly_as_the_whole_text_encodes() -> None:
    tok = llama3_tokenizer()
    counter = TokenCounter(llama3_tokenizer())
    req = chat(*SAMPLES.values())
    rendered = templated().chat_template.render(req.chat)  # type: ignore[union-attr]
    assert tokens.prompt_tokens(req, templated(), counter) == (len(tok.encode(rendered, add_special_tokens=False)),)


@pytest.mark.parametrize("text", ["<|eot_id|>", "a<|eot_id|><|eot_id|>b", "x <|start_header_id|> y", "",
                                  "<|begin_of_text|>plain", "no markup at all"])
def test_split_finds_the_added_tokens_the_tokenizer_finds(text: str) -> None:
    tok = llama3_tokenizer()
    counter = TokenCounter(llama3_tokenizer())
    specials, pieces = counter.split(text)
    assert specials + sum(counter.count(pieces)) == len(tok.encode(text, add_special_tokens=False).ids)
    assert "" not in pieces


def test_split_absorbs_the_whitespace_a_stripping_token_claims() -> None:
    tok = tiny_tokenizer.load()
    tok.add_special_tokens([AddedToken("<sep>", lstrip=True, rstrip=True)])
    counter = TokenCounter(tok)
    text = "one  <sep>\n two"
    assert counter.split(text) == (1, ["one", "two"])
    assert 1 + sum(counter.count(["one", "two"])) == len(tok.encode(text, add_special_tokens=False).ids)


def test_a_tokenizer_that_cannot_be_cut_at_its_tokens_counts_the_whole_text() -> None:
    normalized = tiny_tokenizer.load()
    normalized.add_tokens([AddedToken("<x>", normalized=True)])
    assert TokenCounter(normalized).split("a<x>b") == (0, ["a<x>b"])
    first_only = tiny_tokenizer.load()
    first_only.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    assert TokenCounter(first_only).split("a b") == (0, ["a b"])


def test_the_next_turn_encodes_only_its_new_message() -> None:
    """Special tokens around every message: each message's text is its own cached piece."""
    counter, rec = recording_counter()
    counter.tokenizer.add_special_tokens(MARKUP)
    counter = TokenCounter(counter.tokenizer, 100)
    rec.batches.clear()
    tokens.prompt_tokens(chat("You are terse.", "What is KV cache?"), templated(), counter)
    tokens.prompt_tokens(chat("You are terse.", "What is KV cache?", "Memory.", "How big per token?"),
                         templated(), counter)
    # Role names, each message's "\n\n" + text, the generation prompt's "\n\n"; then the two new messages.
    assert rec.batches[0] == ["system", "\n\nYou are terse.", "user", "\n\nWhat is KV cache?", "assistant", "\n\n"]
    assert rec.batches[1] == ["\n\nMemory.", "\n\nHow big per token?"]


def test_a_chat_the_template_cannot_render_falls_back_to_the_estimate(reference: Tokenizer) -> None:
    counter = TokenCounter(llama3_tokenizer())
    req = chat("hi", "there")
    failing = policy(chat_template=ChatTemplate(TemplateSource("{{ raise_exception('no') }}")),
                     estimate_per_message=8, estimate_per_request=5)
    assert tokens.prompt_tokens(req, failing, counter) == (n_tokens(reference, "hi") + n_tokens(reference, "there")
                                                          + 8 * 2 + 5,)


def test_add_special_tokens_adds_the_bos_on_top_of_the_template() -> None:
    counter = TokenCounter(with_bos(llama3_tokenizer()))
    plain = tokens.prompt_tokens(chat("hi"), templated(), counter)[0]
    assert tokens.prompt_tokens(chat("hi", add_special_tokens=True), templated(), counter) == (plain + 1,)
