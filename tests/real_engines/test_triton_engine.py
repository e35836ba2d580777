"""The real Triton 2.51 on the TensorRT-LLM-shaped repository, without the gateway: what it answers
through each protocol, that its three models share the engine's one KV pool, that an over-committed
pool makes requests wait rather than fail, what its metrics page and request record say. The gateway
and its tests build on these facts, so each is pinned here against the real server.

No assertion is on time: a wait has a generous bound that only turns a hang into a failure.
"""

from __future__ import annotations

import json
import math
import queue
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from engines.real.triton import ENGINE, MODELS, TRITON_VERSION
from tests.real_engines.triton_fixture import MAX_BATCH, POOL_BLOCKS, TOKENS_PER_BLOCK, TritonEngine

BOUND_S = 60.0  # how long a wait may take before it counts as a hang
HOLDER_TOKENS = 450  # 9 s at the fixture's 20 ms a token: requests that hold blocks until cancelled


def words(n: int) -> str:
    """The text the engine generates for max_tokens=n."""
    return " ".join(f"w{i}" for i in range(n))


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not condition():
        assert time.monotonic() < deadline, f"still not {what} after {BOUND_S} s"
        time.sleep(0.05)


def metric(engine: TritonEngine, name: str, **labels: str) -> float:
    """The one sample of the metrics page named `name` whose labels include `labels`."""
    text = httpx.get(engine.server.metrics_url).text
    found = [s.value for family in text_string_to_metric_families(text) for s in family.samples
             if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


def used_blocks(engine: TritonEngine) -> float:
    return metric(engine, "nv_trt_llm_kv_cache_block_metrics", model=ENGINE, kv_cache_block_type="used")


def blocks_for(engine: TritonEngine, prompt: str, max_tokens: int) -> int:
    tokens = len(Tokenizer.from_file(str(engine.tokenizer_json)).encode(prompt, add_special_tokens=False).ids)
    return math.ceil((tokens + max_tokens) / TOKENS_PER_BLOCK)


def record_of(engine: TritonEngine, prompt: str) -> dict[str, Any]:
    (record,) = [r for r in engine.records() if r["prompt"] == prompt]
    return record


def grpc_inputs(prompt: str, max_tokens: int, stream: bool) -> list[grpcclient.InferInput]:
    text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
    tokens = grpcclient.InferInput("max_tokens", [1, 1], "INT32")
    tokens.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
    streaming = grpcclient.InferInput("stream", [1, 1], "BOOL")
    streaming.set_data_from_numpy(np.array([[stream]], dtype=bool))
    return [text, tokens, streaming]


def http_inputs(prompt: str, max_tokens: int) -> list[httpclient.InferInput]:
    text = httpclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
    tokens = httpclient.InferInput("max_tokens", [1, 1], "INT32")
    tokens.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
    return [text, tokens]


def kserve_body(prompt: str, max_tokens: int) -> dict[str, Any]:
    return {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1, 1], "data": [prompt]},
                       {"name": "max_tokens", "datatype": "INT32", "shape": [1, 1], "data": [max_tokens]}]}


@pytest.fixture
def http(triton_engine: TritonEngine) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=triton_engine.server.http_url, timeout=BOUND_S) as c:
        yield c


@pytest.fixture
def grpc_client(triton_engine: TritonEngine) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(triton_engine.server.grpc_address)
    yield client
    client.close()


class Stream:
    """A tritonclient gRPC stream whose results are gathered per request id."""

    def __init__(self, client: grpcclient.InferenceServerClient) -> None:
        self.results: queue.Queue[tuple[grpcclient.InferResult | None, InferenceServerException | None]] = (
            queue.Queue())
        client.start_stream(callback=lambda result, error: self.results.put((result, error)))

    def texts_until_final(self, ids: set[str]) -> dict[str, list[str]]:
        """Each request's texts, in order, until every one of `ids` has had its final response."""
        texts: dict[str, list[str]] = {i: [] for i in ids}
        pending = set(ids)
        while pending:
            result, error = self.results.get(timeout=BOUND_S)
            assert error is None and result is not None, error
            response = result.get_response()
            output = result.as_numpy("text_output")  # None: an empty final response
            texts[response.id].extend(() if output is None else (t.decode() for t in output.flatten()))
            if response.parameters["triton_final_response"].bool_param:
                pending.remove(response.id)
        return texts


# --- what the server says about itself ------------------------------------------------------------


def test_server_metadata_and_repository_index(triton_engine: TritonEngine, http: httpx.Client,
                                              grpc_client: grpcclient.InferenceServerClient) -> None:
    server = http.get("/v2").json()
    assert (server["name"], server["version"]) == ("triton", TRITON_VERSION)
    assert "model_repository" in server["extensions"]
    assert grpc_client.get_server_metadata().version == TRITON_VERSION

    index = http.post("/v2/repository/index").json()
    assert sorted(index, key=lambda m: m["name"]) == [{"name": m, "version": "1", "state": "READY"}
                                                      for m in sorted(MODELS)]
    assert sorted(m.name for m in grpc_client.get_model_repository_index().models) == sorted(MODELS)

    metadata = http.get("/v2/models/ensemble").json()
    assert metadata["platform"] == "ensemble"
    assert {i["name"]: (i["datatype"], i["shape"]) for i in metadata["inputs"]} == {
        "text_input": ("BYTES", [-1, 1]), "max_tokens": ("INT32", [-1, 1]), "stream": ("BOOL", [-1, 1])}
    assert metadata["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": [-1, -1]}]
    # The ensemble's config has no transaction policy, yet Triton reports it decoupled, as its step is.
    config = http.get("/v2/models/ensemble/config").json()
    assert config["model_transaction_policy"] == {"decoupled": True}
    assert config["ensemble_scheduling"]["step"][0]["model_name"] == ENGINE
    engine_config = http.get(f"/v2/models/{ENGINE}/config").json()
    assert engine_config["parameters"]["pool_blocks"] == {"string_value": str(POOL_BLOCKS)}
    assert engine_config["max_batch_size"] == MAX_BATCH


# --- HTTP: generate, generate_stream, infer ---------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_generate_answers_once(http: httpx.Client, model: str) -> None:
    answer = http.post(f"/v2/models/{model}/generate", json={"text_input": "Hello", "max_tokens": 3})
    assert answer.status_code == 200, answer.text
    assert answer.json()["text_output"] == words(3)
    # Triton's generate takes arrays for a model's [1] inputs too.
    arrays = http.post(f"/v2/models/{model}/generate", json={"text_input": ["Hello"], "max_tokens": [4]})
    assert arrays.json()["text_output"] == words(4)


@pytest.mark.parametrize("model", MODELS)
def test_generate_stream_sends_one_event_per_token(http: httpx.Client, model: str) -> None:
    answer = http.post(f"/v2/models/{model}/generate_stream",
                       json={"text_input": "Hello", "max_tokens": 4, "stream": True})
    assert answer.status_code == 200
    events = [json.loads(line.removeprefix("data: ")) for line in answer.text.splitlines() if line]
    assert [e["text_output"] for e in events] == ["w0", " w1", " w2", " w3"]
    assert {e["model_name"] for e in events} == {model}


def test_generate_refuses_more_than_one_response_with_status_200(http: httpx.Client) -> None:
    answer = http.post(f"/v2/models/{ENGINE}/generate", json={"text_input": "Hello", "max_tokens": 3, "stream": True})
    # Not a 4xx: Triton answers 200, with the error only in the body.
    assert answer.status_code == 200
    assert "expects model to produce exactly 1 response" in answer.json()["error"]


def test_generate_reads_odd_bodies_as_triton_does(http: httpx.Client) -> None:
    def post(body: str, model: str = ENGINE) -> httpx.Response:
        return http.post(f"/v2/models/{model}/generate", content=body)

    # A duplicate key is two inputs of one name, not "first (or last) wins".
    duplicate = post('{"text_input": "Hello", "max_tokens": 2, "max_tokens": 5}')
    assert duplicate.status_code == 400
    assert "input 'max_tokens' already exists in request" in duplicate.json()["error"]
    for wrong in ('"5"', "2.5", "true", "null"):
        answer = post('{"text_input": "Hello", "max_tokens": %s}' % wrong)
        assert answer.status_code == 500
        assert "Unable to parse 'data'" in answer.json()["error"]
    two = post('{"text_input": "Hello", "max_tokens": [1, 2]}')
    assert two.status_code == 400 and "batch size does not match" in two.json()["error"]
    # INT32 wraps: 2^31 arrives as -2^31.
    wrapped = post('{"text_input": "Hello", "max_tokens": 2147483648}')
    assert wrapped.json()["error"] == "max_tokens must be at least 1, got -2147483648"
    bad = post('{"text_input": "Hello",')
    assert bad.status_code == 500 and bad.json()["error"].startswith("failed to parse the request JSON buffer")
    unknown = post('{"text_input": "Hello", "max_tokens": 2}', model="nope")
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "Request for unknown model: 'nope' is not found"}


@pytest.mark.parametrize("model", MODELS)
def test_decoupled_models_refuse_unary_infer(triton_engine: TritonEngine, http: httpx.Client,
                                             grpc_client: grpcclient.InferenceServerClient, model: str) -> None:
    answer = http.post(f"/v2/models/{model}/infer", json=kserve_body("Hello", 2))
    assert answer.status_code == 501
    assert answer.json() == {"error": "HTTP end point doesn't support models with decoupled transaction policy"}
    with httpclient.InferenceServerClient(triton_engine.server.http_url.removeprefix("http://")) as client:
        with pytest.raises(InferenceServerException, match="decoupled transaction policy"):
            client.infer(model, http_inputs("Hello", 2))
    with pytest.raises(InferenceServerException) as refused:
        grpc_client.infer(model, grpc_inputs("Hello", 2, stream=False))
    assert refused.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "ModelInfer RPC doesn't support models with decoupled transaction policy" in refused.value.message()


# --- gRPC streams ---------------------------------------------------------------------------------


def test_grpc_stream_carries_several_requests(grpc_client: grpcclient.InferenceServerClient) -> None:
    stream = Stream(grpc_client)
    try:
        grpc_client.async_stream_infer(ENGINE, grpc_inputs("one", 3, stream=True), request_id="r1")
        grpc_client.async_stream_infer("ensemble", grpc_inputs("two", 2, stream=False), request_id="r2")
        # BLS sends its final flag alone (as TensorRT-LLM's): the client sees it only when it asks.
        grpc_client.async_stream_infer("tensorrt_llm_bls", grpc_inputs("three", 2, stream=True), request_id="r3",
                                       enable_empty_final_response=True)
        texts = stream.texts_until_final({"r1", "r2", "r3"})
    finally:
        grpc_client.stop_stream()
    # The others end with their last data response, marked triton_final_response.
    assert texts == {"r1": ["w0", " w1", " w2"], "r2": [words(2)], "r3": ["w0", " w1"]}


def test_grpc_stream_reports_one_request_error_and_goes_on(triton_engine: TritonEngine) -> None:
    too_long = "x" * (POOL_BLOCKS * TOKENS_PER_BLOCK)

    def request(model: str, prompt: str, request_id: str) -> service_pb2.ModelInferRequest:
        message = service_pb2.ModelInferRequest(model_name=model, id=request_id)
        message.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1])
        message.raw_input_contents.append(struct.pack("<I", len(prompt)) + prompt.encode())
        message.inputs.add(name="max_tokens", datatype="INT32", shape=[1, 1])
        message.raw_input_contents.append(struct.pack("<i", 2))
        return message

    sent = [request(ENGINE, too_long, "big"), request("nope", "Hello", "unknown"),
            request("ensemble", too_long, "big-ensemble"), request(ENGINE, "Hello", "ok")]
    with grpc.insecure_channel(triton_engine.server.grpc_address) as channel:
        call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(sent), timeout=BOUND_S)
        answers = [next(call) for _ in sent]
        call.cancel()
    by_id = {a.infer_response.id: a for a in answers}
    assert "KV blocks" in by_id["big"].error_message
    assert by_id["big"].infer_response.parameters["triton_final_response"].bool_param
    assert by_id["unknown"].error_message == "Request for unknown model: 'nope' is not found"
    assert by_id["big-ensemble"].error_message.startswith("in ensemble 'ensemble', ")
    assert by_id["ok"].error_message == ""
    assert by_id["ok"].infer_response.raw_output_contents[0][4:].decode() == words(2)


# --- one KV pool, owned by tensorrt_llm -----------------------------------------------------------


def test_pool_is_shared_by_ensemble_and_bls(triton_engine: TritonEngine,
                                            grpc_client: grpcclient.InferenceServerClient) -> None:
    wait_for(lambda: used_blocks(triton_engine) == 0, "idle")
    prompts = {"ensemble": "A short prompt through the ensemble.",
               "tensorrt_llm_bls": "A longer prompt, through the BLS model, that claims a few more blocks of the pool."}
    max_tokens = 150  # long enough to look at the pool while both run
    expected = sum(blocks_for(triton_engine, p, max_tokens) for p in prompts.values())
    assert expected <= POOL_BLOCKS
    stream = Stream(grpc_client)
    try:
        for model, prompt in prompts.items():
            grpc_client.async_stream_infer(model, grpc_inputs(prompt, max_tokens, stream=True), request_id=model,
                                           enable_empty_final_response=True)
        wait_for(lambda: used_blocks(triton_engine) == expected, f"using {expected} blocks")
        # Only the engine describes the pool: the BLS model's series stay at zero.
        assert metric(triton_engine, "nv_trt_llm_kv_cache_block_metrics", model="tensorrt_llm_bls",
                      kv_cache_block_type="used") == 0
        texts = stream.texts_until_final(set(prompts))
    finally:
        grpc_client.stop_stream()
    assert {model: "".join(t) for model, t in texts.items()} == dict.fromkeys(prompts, words(max_tokens))
    wait_for(lambda: used_blocks(triton_engine) == 0, "all blocks back")


def test_overcommitted_pool_makes_requests_wait_not_fail(triton_engine: TritonEngine,
                                                         grpc_client: grpcclient.InferenceServerClient,
                                                         http: httpx.Client) -> None:
    wait_for(lambda: used_blocks(triton_engine) == 0, "idle")
    waited_before = metric(triton_engine, "kvgate_test_requests_waited_total", model=ENGINE)
    # Two streams hold most of the pool until they are cancelled (they would run for ~9 s) ...
    holders = [f"holder {i}: hold the pool" for i in range(2)]
    held = sum(blocks_for(triton_engine, h, HOLDER_TOKENS) for h in holders)
    assert held <= POOL_BLOCKS
    # ... and two requests that each need more than what is left must wait for them.
    waiters = []
    for i in range(2):
        waiter = f"waiter {i}:"
        while blocks_for(triton_engine, waiter, 4) <= POOL_BLOCKS - held:
            waiter += " needs more blocks than are free"
        waiters.append(waiter)
    assert sum(blocks_for(triton_engine, w, 4) for w in waiters) <= POOL_BLOCKS
    grpc_client.start_stream(callback=lambda result, error: None)
    answers: dict[str, httpx.Response] = {}
    threads = [threading.Thread(target=lambda w=w: answers.update(
        {w: http.post("/v2/models/ensemble/generate", json={"text_input": w, "max_tokens": 4})})) for w in waiters]
    try:
        for holder in holders:
            grpc_client.async_stream_infer(ENGINE, grpc_inputs(holder, HOLDER_TOKENS, stream=True), request_id=holder)
        wait_for(lambda: used_blocks(triton_engine) == held, f"holding {held} blocks")
        for thread in threads:
            thread.start()
        wait_for(lambda: metric(triton_engine, "nv_trt_llm_request_metrics", model=ENGINE,
                                request_type="waiting") == 2, "two requests waiting")
    finally:
        grpc_client.stop_stream(cancel_requests=True)  # the holders' blocks return
        for thread in threads:
            thread.join(BOUND_S)
    assert {w: (a.status_code, a.json()["text_output"]) for w, a in answers.items()} == dict.fromkeys(
        waiters, (200, words(4)))
    assert metric(triton_engine, "kvgate_test_requests_waited_total", model=ENGINE) == waited_before + 2
    assert all(record_of(triton_engine, w)["waited"] for w in waiters)
    wait_for(lambda: [r["outcome"] for r in triton_engine.records() if r["prompt"] in holders] == ["cancelled"] * 2,
             "the holders recorded as cancelled")
    assert metric(triton_engine, "kvgate_test_peak_used_blocks", model=ENGINE) <= POOL_BLOCKS


def test_a_cancelled_stream_frees_blocks_only_of_direct_requests(triton_engine: TritonEngine,
                                                                 grpc_client: grpcclient.InferenceServerClient) -> None:
    wait_for(lambda: used_blocks(triton_engine) == 0, "idle")
    prompts = {model: f"cancel me through {model} ({time.time_ns()})" for model in MODELS}
    max_tokens = 100
    grpc_client.start_stream(callback=lambda result, error: None)
    try:
        for model, prompt in prompts.items():
            grpc_client.async_stream_infer(model, grpc_inputs(prompt, max_tokens, stream=True), request_id=model,
                                           enable_empty_final_response=True)
        expected = sum(blocks_for(triton_engine, p, max_tokens) for p in prompts.values())
        wait_for(lambda: used_blocks(triton_engine) == expected, "all three running")
    finally:
        grpc_client.stop_stream(cancel_requests=True)
    wait_for(lambda: all(r["prompt"] in prompts.values() for r in triton_engine.records()[-3:]), "all three recorded")
    outcomes = {model: (record_of(triton_engine, p)["outcome"], record_of(triton_engine, p)["generated"] == max_tokens)
                for model, p in prompts.items()}
    # Triton 2.51 passes a cancellation on to the model a request names, not through an ensemble; and a
    # Python model cannot cancel its BLS requests. Those two run to their end, holding their blocks.
    assert outcomes == {ENGINE: ("cancelled", False), "ensemble": ("finished", True),
                        "tensorrt_llm_bls": ("finished", True)}


def test_sequence_larger_than_the_pool_is_refused(triton_engine: TritonEngine, http: httpx.Client) -> None:
    prompt = "y" * (POOL_BLOCKS * TOKENS_PER_BLOCK)
    refused_before = metric(triton_engine, "kvgate_test_requests_refused_total", model=ENGINE)
    answer = http.post("/v2/models/tensorrt_llm_bls/generate", json={"text_input": prompt, "max_tokens": 1})
    assert answer.status_code == 400
    needed = blocks_for(triton_engine, prompt, 1)
    assert answer.json()["error"].startswith(f"the sequence needs {needed} KV blocks")
    assert metric(triton_engine, "kvgate_test_requests_refused_total", model=ENGINE) == refused_before + 1
    assert record_of(triton_engine, prompt)["outcome"] == "refused"


# --- metrics page and request record --------------------------------------------------------------


def test_metrics_page_has_several_models_with_zeros_for_non_owners(triton_engine: TritonEngine) -> None:
    text = httpx.get(triton_engine.server.metrics_url).text
    blocks = {(s.labels["model"], s.labels["kv_cache_block_type"]): s.value
              for family in text_string_to_metric_families(text) if family.name == "nv_trt_llm_kv_cache_block_metrics"
              for s in family.samples}
    types = ("max", "free", "used", "tokens_per", "fraction")
    assert {m for m, _ in blocks} == {ENGINE, "tensorrt_llm_bls"}
    assert all(blocks["tensorrt_llm_bls", t] == 0 for t in types)
    assert blocks[ENGINE, "max"] == POOL_BLOCKS and blocks[ENGINE, "tokens_per"] == TOKENS_PER_BLOCK
    assert blocks[ENGINE, "used"] + blocks[ENGINE, "free"] == POOL_BLOCKS
    assert metric(triton_engine, "nv_trt_llm_request_metrics", model=ENGINE, request_type="max") == MAX_BATCH
    assert 'model="ensemble"' not in "".join(line for line in text.splitlines() if line.startswith("nv_trt_llm"))


def test_record_shows_what_ran(triton_engine: TritonEngine, http: httpx.Client) -> None:
    prompt = f"Count these tokens with the tiny tokenizer, please ({time.time_ns()})."
    answer = http.post("/v2/models/ensemble/generate", json={"id": "rec-1", "text_input": prompt, "max_tokens": 5})
    assert answer.json() == {"id": "rec-1", "model_name": "ensemble", "model_version": "1", "sequence_end": False,
                             "sequence_id": 0, "sequence_start": False, "text_output": words(5)}
    record = record_of(triton_engine, prompt)
    tokens = len(Tokenizer.from_file(str(triton_engine.tokenizer_json)).encode(prompt, add_special_tokens=False).ids)
    assert tokens < len(prompt.encode())  # counted by the tokenizer, not by bytes
    # The ensemble passes the client's request id on to its step.
    assert {k: record[k] for k in ("request_id", "prompt_tokens", "max_tokens", "stream", "blocks", "generated",
                                   "outcome", "waited")} == {
        "request_id": "rec-1", "prompt_tokens": tokens, "max_tokens": 5, "stream": False,
        "blocks": math.ceil((tokens + 5) / TOKENS_PER_BLOCK), "generated": 5, "outcome": "finished", "waited": False}


# --- models that are not decoupled: unary infer -------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_unary_infer_over_grpc_and_http(triton_unary_engine: TritonEngine, model: str) -> None:
    server = triton_unary_engine.server
    grpc_client = grpcclient.InferenceServerClient(server.grpc_address)
    try:
        result = grpc_client.infer(model, grpc_inputs("Hello", 3, stream=False), request_id="u1")
    finally:
        grpc_client.close()
    assert result.as_numpy("text_output").tolist() == [[words(3).encode()]]
    assert result.get_response().id == "u1"
    with httpclient.InferenceServerClient(server.http_url.removeprefix("http://")) as client:
        assert client.infer(model, http_inputs("Hello", 2)).as_numpy("text_output").tolist() == [[words(2).encode()]]
    answer = httpx.post(f"{server.http_url}/v2/models/{model}/infer", json=kserve_body("Hello", 1))
    assert answer.json()["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": [1, 1], "data": ["w0"]}]


def test_unary_models_refuse_to_stream(triton_unary_engine: TritonEngine) -> None:
    answer = httpx.post(f"{triton_unary_engine.server.http_url}/v2/models/ensemble/generate",
                        json={"text_input": "Hello", "max_tokens": 2, "stream": True})
    assert answer.status_code == 400
    assert answer.json()["error"] == (
        "in ensemble 'ensemble', streaming needs a decoupled model; this tensorrt_llm is not decoupled")


def test_kserve_json_takes_the_first_of_duplicate_keys(triton_unary_engine: TritonEngine) -> None:
    def infer(body: str) -> httpx.Response:
        return httpx.post(f"{triton_unary_engine.server.http_url}/v2/models/{ENGINE}/infer", content=body)

    def tensors(prompt: str, max_tokens: str) -> str:
        return ('[{"name": "text_input", "datatype": "BYTES", "shape": [1, 1], "data": ["%s"]},'
                ' {"name": "max_tokens", "datatype": "INT32", "shape": [1, 1], "data": %s}]' % (prompt, max_tokens))

    def output(answer: httpx.Response) -> str:
        assert answer.status_code == 200, answer.text
        return answer.json()["outputs"][0]["data"][0]

    first, second = f"first inputs {time.time_ns()}", f"second inputs {time.time_ns()}"
    assert output(infer('{"inputs": %s, "inputs": %s}' % (tensors(first, "[2]"), tensors(second, "[4]")))) == words(2)
    assert [r["prompt"] for r in triton_unary_engine.records() if r["prompt"] in (first, second)] == [first]
    nested = tensors("nested", "[2], \"data\": [4]")
    assert output(infer('{"inputs": %s}' % nested)) == words(2)
    # Two tensors of one name are an error, as in generate.
    both = ('{"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1, 1], "data": ["x"]},'
            ' {"name": "max_tokens", "datatype": "INT32", "shape": [1, 1], "data": [2]},'
            ' {"name": "max_tokens", "datatype": "INT32", "shape": [1, 1], "data": [5]}]}')
    assert infer(both).json() == {"error": "[request id: <id_unknown>] input 'max_tokens' already exists in request"}
    assert infer('{"id": "a", "id": "b", "inputs": %s}' % tensors("ids", "[1]")).json()["id"] == "a"
