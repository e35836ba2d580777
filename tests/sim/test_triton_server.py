"""The Triton personality against the real clients: tritonclient.grpc, tritonclient.http,
and plain HTTP for the generate extension."""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from .triton_helpers import (
    MODEL,
    TritonSim,
    llm_inputs,
    prometheus_samples,
    text_of,
    trt_llm_metric,
    wait_until,
)

StartTriton = Callable[..., TritonSim]
INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    raw = response.read()
    events = raw.split(b"\n\n")
    assert events[-1] == b""  # every event is terminated
    assert all(e.startswith(b"data: ") for e in events[:-1])
    return [orjson.loads(e[len(b"data: ") :]) for e in events[:-1]]


class StreamCollector:
    """tritonclient.grpc stream callbacks, as (result, error) pairs in arrival order."""

    def __init__(self) -> None:
        self.items: queue.Queue[tuple[Any, Any]] = queue.Queue()

    def __call__(self, result: Any, error: Any) -> None:
        self.items.put((result, error))

    def drain(self) -> list[tuple[Any, Any]]:
        out = []
        while not self.items.empty():
            out.append(self.items.get())
        return out


def is_final(result: Any) -> bool:
    return result.get_response().parameters["triton_final_response"].bool_param


def test_health_and_metadata(start_triton: StartTriton) -> None:
    sim = start_triton()
    grpc_client, http_client = sim.grpc_client(), sim.http_client()
    try:
        for client in (grpc_client, http_client):
            assert client.is_server_live() and client.is_server_ready()
            assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
            assert not client.is_model_ready("other")
            assert not client.is_model_ready(MODEL, "2")
        metadata = http_client.get_model_metadata(MODEL)
        assert (metadata["name"], metadata["versions"], metadata["platform"]) == (
            MODEL, ["1"], "ensemble",
        )  # fmt: skip
        inputs = {i["name"]: (i["datatype"], i["shape"]) for i in metadata["inputs"]}
        assert inputs["text_input"] == ("BYTES", [-1, -1])
        assert inputs["max_tokens"] == ("INT32", [-1, -1])
        assert inputs["stream"] == ("BOOL", [-1, -1])
        assert inputs["stop_words"] == ("BYTES", [-1, -1])
        assert metadata["outputs"] == [
            {"name": "text_output", "datatype": "BYTES", "shape": [-1, -1]}
        ]
        grpc_metadata = grpc_client.get_model_metadata(MODEL)
        assert (grpc_metadata.name, grpc_metadata.platform) == (MODEL, "ensemble")
        assert [(i.name, i.datatype, list(i.shape)) for i in grpc_metadata.inputs] == [
            (i["name"], i["datatype"], i["shape"]) for i in metadata["inputs"]
        ]

        server = http_client.get_server_metadata()
        assert (server["name"], server["version"]) == ("triton", "2.41.0")
        assert "binary_tensor_data" in server["extensions"]
        assert grpc_client.get_server_metadata().version == "2.41.0"

        config = http_client.get_model_config(MODEL)
        assert config["name"] == MODEL and config["model_transaction_policy"] == {"decoupled": True}
        assert config["max_batch_size"] == 256
        grpc_config = grpc_client.get_model_config(MODEL).config
        assert grpc_config.name == MODEL and grpc_config.model_transaction_policy.decoupled

        assert sim.http.get(f"/v2/models/{MODEL}/versions/1").json()["name"] == MODEL
        assert sim.http.get(f"/v2/models/{MODEL}/versions/1/ready").status_code == 200
        assert sim.http.get("/v2/health/live").content == b""
        missing = sim.http.get("/v2/models/other/config")
        assert missing.status_code == 404
        assert missing.json() == {"error": "Request for unknown model: 'other' is not found"}
    finally:
        grpc_client.close()
        http_client.close()


def test_grpc_infer_and_its_record(start_triton: StartTriton) -> None:
    sim = start_triton()
    client = sim.grpc_client()
    try:
        result = client.infer(
            MODEL,
            llm_inputs(grpcclient, "What is a KV block?", 7),
            request_id="req-1",
            headers={"x-trace-id": "t1"},
        )
    finally:
        client.close()
    assert len(text_of(result).split()) == 7
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (MODEL, "1", "req-1")
    output = response.outputs[0]
    assert (output.name, output.datatype, list(output.shape)) == ("text_output", "BYTES", [1, 1])
    (rec,) = sim.records()
    assert rec["path"] == INFER and rec["headers"]["x-trace-id"] == "t1"
    assert rec["body"] == {
        "model_name": MODEL, "inputs": {"text_input": "What is a KV block?", "max_tokens": 7},
    }  # fmt: skip
    assert sim.state()["completed"] == 1 and sim.state()["kv_blocks_used"] == 0


def test_grpc_stream_serves_several_requests(start_triton: StartTriton) -> None:
    sim = start_triton(itl_ms=1.0)
    client = sim.grpc_client()
    collector = StreamCollector()
    try:
        whole = text_of(client.infer(MODEL, llm_inputs(grpcclient, "p", 5)))
        client.start_stream(callback=collector)
        send = client.async_stream_infer
        send(MODEL, llm_inputs(grpcclient, "p", 5, stream=True), request_id="a")
        send(MODEL, llm_inputs(grpcclient, "q", 3, stream=True), request_id="b")
        send(MODEL, llm_inputs(grpcclient, "r", 4, stream=False), request_id="c")
        # A bad request is answered in-band and does not end the stream.
        send(MODEL, llm_inputs(grpcclient, "s", 4)[1:], request_id="d")
        send("other", llm_inputs(grpcclient, "s", 4), request_id="e")
        send(MODEL, llm_inputs(grpcclient, "t", 2, stream=True), request_id="f")
        client.stop_stream()  # half-closes, then waits for every answer
    finally:
        client.close()
    items = collector.drain()
    errors = {error.message() for result, error in items if error is not None}
    assert len(errors) == 2
    assert any("missing required input(s) ['text_input']" in e for e in errors)
    assert "Request for unknown model: 'other' is not found" in errors
    by_id: dict[str, list[Any]] = {}
    for result, error in items:
        if error is None:
            by_id.setdefault(result.get_response().id, []).append(result)
    assert sorted(by_id) == ["a", "b", "c", "f"]
    assert [len(by_id[i]) for i in "abcf"] == [5, 3, 1, 2]  # one response per token
    for results in by_id.values():
        assert [is_final(r) for r in results] == [False] * (len(results) - 1) + [True]
    assert "".join(text_of(r) for r in by_id["a"]) == whole  # same prompt, same text
    assert all(len(text_of(r).split()) == 1 for r in by_id["a"] + by_id["b"])
    assert len(text_of(by_id["c"][0]).split()) == 4
    records = [r for r in sim.records() if r["path"] == STREAM_INFER]
    assert len(records) == 6
    assert {r["body"]["inputs"]["text_input"] for r in records if r["body"]["inputs"].get(
        "text_input")} == {"p", "q", "r", "s", "t"}  # fmt: skip
    assert sim.state()["kv_blocks_used"] == 0


def test_grpc_stream_asked_for_an_empty_final_response_flags_its_last_one(start_triton: StartTriton) -> None:
    sim = start_triton()
    client = sim.grpc_client()
    collector = StreamCollector()
    try:
        client.start_stream(callback=collector)
        client.async_stream_infer(
            MODEL,
            llm_inputs(grpcclient, "p", 3, stream=True),
            request_id="x",
            enable_empty_final_response=True,
        )
        client.stop_stream()
    finally:
        client.close()
    # As on the real Triton: the model flags its last response, so there is no empty one to send.
    results = [result for result, error in collector.drain() if error is None]
    assert [is_final(r) for r in results] == [False, False, True]
    assert all(len(text_of(r).split()) == 1 for r in results)


def test_http_infer_binary_and_json(start_triton: StartTriton) -> None:
    sim = start_triton()
    client = sim.http_client()
    try:
        binary = client.infer(MODEL, llm_inputs(httpclient, "hello there", 6))
        json = client.infer(
            MODEL,
            llm_inputs(httpclient, "hello there", 6, binary_data=False),
            outputs=[httpclient.InferRequestedOutput("text_output", binary_data=False)],
            request_id="j1",
        )
    finally:
        client.close()
    assert len(text_of(binary).split()) == 6
    assert text_of(binary) == json.as_numpy("text_output").reshape(-1)[0]  # JSON gives str
    output = binary.get_response()["outputs"][0]
    assert (output["datatype"], output["shape"]) == ("BYTES", [1, 1])
    assert "binary_data_size" in output["parameters"]
    json_response = json.get_response()
    assert json_response["id"] == "j1" and json_response["model_name"] == MODEL
    assert json_response["outputs"][0]["data"] == [text_of(binary)]
    records = sim.records()
    assert [r["path"] for r in records] == [f"/v2/models/{MODEL}/infer"] * 2
    assert "inference-header-content-length" in records[0]["headers"]
    assert "inference-header-content-length" not in records[1]["headers"]
    expected = {"model_name": MODEL, "inputs": {"text_input": "hello there", "max_tokens": 6}}
    assert [r["body"] for r in records] == [expected, expected]


def test_generate_and_generate_stream(start_triton: StartTriton) -> None:
    sim = start_triton()
    body = {"text_input": "tell me", "max_tokens": 8, "bad_words": "", "stop_words": ""}
    reply = sim.http.post(f"/v2/models/{MODEL}/generate", json=body)
    assert reply.status_code == 200
    data = reply.json()
    assert (data["model_name"], data["model_version"]) == (MODEL, "1")
    assert len(data["text_output"].split()) == 8

    url = f"/v2/models/{MODEL}/generate_stream"
    with sim.http.stream("POST", url, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert len(events) == 8  # one per token, and no [DONE]
    assert all(e.keys() == {"model_name", "model_version", "text_output"} for e in events)
    assert "".join(e["text_output"] for e in events) == data["text_output"]

    with sim.http.stream("POST", url, json=body) as response:  # no stream input
        assert [e["text_output"] for e in sse_events(response)] == [data["text_output"]]

    versioned = sim.http.post(f"/v2/models/{MODEL}/versions/1/generate", json=body)
    assert versioned.json() == data
    records = sim.records()
    assert records[0] == {
        "path": f"/v2/models/{MODEL}/generate",
        "headers": records[0]["headers"],
        "body": body,
    }
    assert records[1]["body"] == {**body, "stream": True}
    assert records[1]["path"] == url


def test_stop_words_cut_the_text(start_triton: StartTriton) -> None:
    sim = start_triton()
    generate = f"/v2/models/{MODEL}/generate"
    full = sim.http.post(generate, json={"text_input": "p", "max_tokens": 30}).json()["text_output"]
    stop = full.split(" ")[4]
    cut = full[: full.find(stop)]
    reply = sim.http.post(
        generate, json={"text_input": "p", "max_tokens": 30, "stop_words": [stop]}
    )
    assert reply.json()["text_output"] == cut
    client = sim.grpc_client()
    try:
        result = client.infer(MODEL, llm_inputs(grpcclient, "p", 30, stop_words=["zzz", stop]))
    finally:
        client.close()
    assert text_of(result) == cut


def test_http_errors(start_triton: StartTriton) -> None:
    sim = start_triton()
    client = sim.http_client()
    try:
        with pytest.raises(InferenceServerException) as missing:
            client.infer(MODEL, llm_inputs(httpclient, "x", 3)[1:])
        assert missing.value.status() == "400"
        assert "missing required input(s) ['text_input']" in missing.value.message()

        wrong = httpclient.InferInput("max_tokens", [1, 1], "FP32")
        wrong.set_data_from_numpy(np.array([[3.0]], dtype=np.float32))
        with pytest.raises(InferenceServerException) as dtype:
            client.infer(MODEL, [llm_inputs(httpclient, "x", 3)[0], wrong])
        assert dtype.value.status() == "400"
        assert "data-type is 'FP32', but model 'ensemble' expects 'INT32'" in dtype.value.message()

        with pytest.raises(InferenceServerException) as unknown:
            client.infer("other", llm_inputs(httpclient, "x", 3))
        assert unknown.value.status() == "404"
        assert unknown.value.message() == "Request for unknown model: 'other' is not found"
    finally:
        client.close()
    # the FP32 value is recorded as it arrived
    assert sim.records()[1]["body"]["inputs"] == {"text_input": "x", "max_tokens": 3.0}

    generate = f"/v2/models/{MODEL}/generate"
    for body, status, message in (
        (b"{not json", 400, "failed to parse"),
        (orjson.dumps({"max_tokens": 3}), 400, "missing required input(s) ['text_input']"),
        (orjson.dumps({"text_input": "x", "max_tokens": 2.5}), 400, "max_tokens"),
        (orjson.dumps({"text_input": "x", "max_tokens": 0}), 400, "at least 1"),
    ):
        reply = sim.http.post(generate, content=body)
        assert reply.status_code == status and message in reply.json()["error"], body
    reply = sim.http.post("/v2/models/other/generate_stream", json={"text_input": "x"})
    assert reply.status_code == 404 and "unknown model" in reply.json()["error"]
    raw = sim.http.post(
        f"/v2/models/{MODEL}/infer", content=b"{}", headers={"Inference-Header-Content-Length": "9"}
    )
    assert raw.status_code == 400 and raw.json()["error"]
    assert sim.records()[-1]["body"]["inputs"] is None  # recorded, with why it was refused
    huge = sim.http.post(generate, json={"text_input": "x", "max_tokens": 10**6})
    assert huge.status_code == 400 and "exceed the KV cache" in huge.json()["error"]


def test_grpc_errors(start_triton: StartTriton) -> None:
    sim = start_triton()
    client = sim.grpc_client()
    try:
        with pytest.raises(InferenceServerException) as missing:
            client.infer(MODEL, llm_inputs(grpcclient, "x", 3)[1:])
        assert missing.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)

        wrong = grpcclient.InferInput("max_tokens", [1, 1], "FP32")
        wrong.set_data_from_numpy(np.array([[3.0]], dtype=np.float32))
        with pytest.raises(InferenceServerException) as dtype:
            client.infer(MODEL, [llm_inputs(grpcclient, "x", 3)[0], wrong])
        assert dtype.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
        assert "expects 'INT32'" in dtype.value.message()

        for call, message in (
            (
                lambda: client.infer("other", llm_inputs(grpcclient, "x", 3)),
                "Request for unknown model: 'other' is not found",
            ),
            (
                lambda: client.get_model_metadata("other"),
                "Request for unknown model: 'other' is not found",
            ),
            (
                lambda: client.get_model_config(MODEL, "2"),
                f"Request for unknown model: '{MODEL}' version 2 is not found",
            ),
        ):
            with pytest.raises(InferenceServerException) as unknown:
                call()
            assert unknown.value.status() == str(grpc.StatusCode.NOT_FOUND)
            assert unknown.value.message() == message
        with pytest.raises(InferenceServerException) as unimplemented:
            client.get_inference_statistics(MODEL)
        assert unimplemented.value.status() == str(grpc.StatusCode.UNIMPLEMENTED)
    finally:
        client.close()
    assert [r["path"] for r in sim.records()] == [INFER] * 3


def test_metrics(start_triton: StartTriton) -> None:
    sim = start_triton(kv_blocks=64, tokens_per_block=16, max_batch=8)
    sim.http.post(f"/v2/models/{MODEL}/generate", json={"text_input": "a b", "max_tokens": 3})
    reply = sim.http.get("/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    samples = prometheus_samples(reply.text)

    def block(kind: str) -> float:
        return trt_llm_metric(
            samples, "nv_trt_llm_kv_cache_block_metrics", kv_cache_block_type=kind
        )

    def request(kind: str) -> float:
        return trt_llm_metric(samples, "nv_trt_llm_request_metrics", request_type=kind)

    assert (block("max"), block("free"), block("used"), block("tokens_per"), block("fraction")) == (
        64, 64, 0, 16, 0,
    )  # fmt: skip
    assert [request(k) for k in ("waiting", "scheduled", "active", "max", "context")] == [
        0, 0, 0, 8, 0,
    ]  # fmt: skip
    assert samples[("kvgate_sim_kv_exhaustion_events_total", frozenset())] == 0


def test_one_engine_serves_both_fronts(start_triton: StartTriton) -> None:
    """A gRPC stream's blocks show over HTTP; cancelling the stream frees them."""
    sim = start_triton(kv_blocks=64, tokens_per_block=16, itl_ms=20.0)
    client = sim.grpc_client()
    collector = StreamCollector()
    try:
        client.start_stream(callback=collector)
        client.async_stream_infer(MODEL, llm_inputs(grpcclient, "long", 900, stream=True))
        wait_until(lambda: not collector.items.empty())
        state = sim.state()  # over HTTP, while gRPC holds the blocks
        assert state["running"] == 1 and state["kv_blocks_used"] == 57  # ceil(901 / 16)
        samples = prometheus_samples(sim.http.get("/metrics").text)
        blocks = "nv_trt_llm_kv_cache_block_metrics"
        assert trt_llm_metric(samples, blocks, kv_cache_block_type="used") == 57
        requests = "nv_trt_llm_request_metrics"
        assert trt_llm_metric(samples, requests, request_type="active") == 1
        client.stop_stream(cancel_requests=True)  # the client goes away mid-generation
        wait_until(lambda: sim.state()["kv_blocks_used"] == 0 and sim.state()["running"] == 0)
        assert sim.state()["completed"] == 0
    finally:
        client.close()


def test_disconnects_free_blocks(start_triton: StartTriton) -> None:
    sim = start_triton(itl_ms=20.0)

    def freed() -> bool:
        state = sim.state()
        return state["kv_blocks_used"] == 0 and state["running"] == 0

    # HTTP: generate_stream dropped after the first event.
    url = f"/v2/models/{MODEL}/generate_stream"
    with httpx.Client(base_url=sim.http_url) as http, http.stream(
        "POST", url, json={"text_input": "long", "max_tokens": 1000, "stream": True}
    ) as response:
        lines = response.iter_lines()  # held: dropping the iterator closes the response
        assert next(lines).startswith("data: ")
        assert sim.state()["kv_blocks_used"] > 0
    wait_until(freed)

    # gRPC unary: the client gives up (deadline), the server cancels the generation.
    client = sim.grpc_client()
    try:
        with pytest.raises(InferenceServerException) as timeout:
            client.infer(MODEL, llm_inputs(grpcclient, "long", 1000), client_timeout=0.3)
        assert timeout.value.status() == str(grpc.StatusCode.DEADLINE_EXCEEDED)
        wait_until(freed)
    finally:
        client.close()
    assert sim.state()["completed"] == 0


def test_fail_mode_reports_unavailable(start_triton: StartTriton) -> None:
    sim = start_triton(kv_blocks=32, on_full="fail", itl_ms=20.0)
    hold = {"text_input": "long", "max_tokens": 1000, "stream": True}
    url = f"/v2/models/{MODEL}/generate_stream"
    with httpx.Client(base_url=sim.http_url) as http, http.stream("POST", url, json=hold) as held:
        lines = held.iter_lines()  # held: dropping the iterator closes the response
        next(lines)
        small = {"text_input": "x", "max_tokens": 100}
        reply = sim.http.post(f"/v2/models/{MODEL}/generate", json=small)
        assert reply.status_code == 503 and "no capacity" in reply.json()["error"]
        client = sim.grpc_client()
        collector = StreamCollector()
        try:
            with pytest.raises(InferenceServerException) as unavailable:
                client.infer(MODEL, llm_inputs(grpcclient, "x", 100))
            assert unavailable.value.status() == str(grpc.StatusCode.UNAVAILABLE)
            client.start_stream(callback=collector)
            client.async_stream_infer(MODEL, llm_inputs(grpcclient, "x", 100, stream=True))
            client.stop_stream()
        finally:
            client.close()
        ((result, error),) = collector.drain()
        assert result is None and "no capacity" in str(error)
