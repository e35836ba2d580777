"""Triton's clients (tritonclient gRPC and HTTP, plain HTTP generate) through the real Envoy: routed by
model, clamped, admitted against the KV budget, refused in each client's own convention."""

from __future__ import annotations

import struct
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from kvgate.catalog import parse_catalog
from kvgate.cli.gateway import Gateway
from tests.integration.conftest import reserved, sim_requests, start_gateway, wait_for

MODEL = "llama-tri"  # the gateway's name; the engine calls it `ensemble`
CATALOG = {"models": [
    {"name": MODEL, "protocol": "triton", "backend_model": "ensemble", "endpoints": ["sim"],
     "max_context_tokens": 512, "max_output_tokens": 128, "tokens_per_block": 16,
     "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "640KiB"},
     "sim": {"ttft_base_ms": 1, "ttft_per_token_ms": 0, "itl_ms": 25, "batch_slowdown": 0}},
    {"name": "chatty", "endpoints": ["sim"], "max_context_tokens": 1024, "max_output_tokens": 16,
     "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "16MiB"},
     "sim": {"ttft_base_ms": 0, "ttft_per_token_ms": 0, "itl_ms": 0, "batch_slowdown": 0}},
],
    # A request that does not fit is refused at once, not after waiting for budget.
    "priority_classes": [{"name": "interactive", "max_wait_s": 0}]}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(parse_catalog(CATALOG), Path(tmp_path_factory.mktemp("triton")))
    yield gw
    gw.stop()


def host(gw: Gateway) -> str:
    return gw.url.removeprefix("http://")


def tensors(module, text: str, max_tokens: np.ndarray | None) -> list:  # noqa: ANN001
    inputs = [module.InferInput("text_input", [1, 1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([[text.encode()]], dtype=object))
    if max_tokens is not None:
        limit = module.InferInput("max_tokens", list(max_tokens.shape), "INT32" if max_tokens.dtype == np.int32
                                  else "FP32")
        limit.set_data_from_numpy(max_tokens)
        inputs.append(limit)
    return inputs


def limit(n: int) -> np.ndarray:
    return np.array([[n]], dtype=np.int32)


def engine_saw(gw: Gateway, marker: str) -> list[dict]:
    return [r for r in sim_requests(gw, MODEL) if marker in str(r["body"])]


def words(result) -> list[str]:  # noqa: ANN001
    return result.as_numpy("text_output").reshape(-1)[0].decode().split()


def test_grpc_infer_is_routed_renamed_and_clamped(gateway: Gateway) -> None:
    marker = uuid.uuid4().hex
    with tgrpc.InferenceServerClient(host(gateway)) as client:
        result = client.infer(MODEL, tensors(tgrpc, marker, limit(5000)))
    assert len(words(result)) == 128
    (seen,) = engine_saw(gateway, marker)
    assert seen["path"].endswith("/ModelInfer")
    assert seen["body"]["model_name"] == "ensemble" and seen["body"]["inputs"]["max_tokens"] == 128


@pytest.mark.parametrize("binary", [True, False])
def test_http_infer_binary_and_json_is_clamped(gateway: Gateway, binary: bool) -> None:
    marker = uuid.uuid4().hex
    with thttp.InferenceServerClient(host(gateway)) as client:
        inputs = tensors(thttp, marker, None)
        inputs[0].set_data_from_numpy(np.array([[marker.encode()]], dtype=object), binary_data=binary)
        result = client.infer(MODEL, inputs)  # no max_tokens: the gateway adds the clamp
    assert len(words(result)) == 128
    (seen,) = engine_saw(gateway, marker)
    assert seen["path"] == "/v2/models/ensemble/infer"
    assert seen["body"]["inputs"]["max_tokens"] == 128


def test_http_infer_keeps_a_limit_below_the_clamp(gateway: Gateway) -> None:
    marker = uuid.uuid4().hex
    with thttp.InferenceServerClient(host(gateway)) as client:
        result = client.infer(MODEL, tensors(thttp, marker, limit(7)))
    assert len(words(result)) == 7


def test_generate_and_generate_stream_over_plain_http(gateway: Gateway) -> None:
    marker = uuid.uuid4().hex
    resp = httpx.post(f"{gateway.url}/v2/models/{MODEL}/generate", json={"text_input": marker, "max_tokens": 999},
                      timeout=30)  # 128 tokens from the simulator: seconds on a loaded machine
    assert resp.status_code == 200 and resp.headers["x-kvgate-max-tokens"] == "128"
    assert len(resp.json()["text_output"].split()) == 128
    with httpx.stream("POST", f"{gateway.url}/v2/models/{MODEL}/generate_stream",
                      json={"text_input": marker, "max_tokens": 3, "stream": True}, timeout=30) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert len(events) == 3
    # Arrays, as Triton takes them too: clamped element by element, still an array.
    arrays = httpx.post(f"{gateway.url}/v2/models/{MODEL}/generate",
                        json={"text_input": [marker], "max_tokens": [999]}, timeout=30)
    assert arrays.status_code == 200 and arrays.headers["x-kvgate-max-tokens"] == "128"
    seen = engine_saw(gateway, marker)
    assert [s["body"]["max_tokens"] for s in seen] == [128, 3, [128]]


def test_health_and_metadata_through_the_gateway(gateway: Gateway) -> None:
    with thttp.InferenceServerClient(host(gateway)) as h, tgrpc.InferenceServerClient(host(gateway)) as g:
        assert h.is_server_live() and h.is_server_ready() and h.is_model_ready(MODEL)
        assert g.is_server_live() and g.is_server_ready() and g.is_model_ready(MODEL)
        assert h.get_model_metadata(MODEL)["name"] == "ensemble"
        assert not h.is_model_ready("no-such-model")
        with pytest.raises(InferenceServerException) as e:
            g.is_model_ready("no-such-model")
        assert "NOT_FOUND" in str(e.value.status())
        # The server-level answers are the engine's (the simulator's), the index the catalog's names.
        assert h.get_server_metadata()["name"] == g.get_server_metadata().name == "triton"
        names = sorted(m["name"] for m in h.get_model_repository_index())
        assert names == sorted(m.name for m in g.get_model_repository_index().models) == sorted(
            m["name"] for m in CATALOG["models"] if m.get("protocol") == "triton")


@pytest.mark.parametrize(("inputs", "what"), [
    (lambda m: tensors(m, "x", np.array([[5.0]], dtype=np.float32)), "max_tokens"),
    (lambda m: tensors(m, "x", limit(5))[1:], "text_input"),
])
def test_bad_tensors_are_invalid_argument_and_400(gateway: Gateway, inputs, what: str) -> None:  # noqa: ANN001
    with tgrpc.InferenceServerClient(host(gateway)) as client, pytest.raises(InferenceServerException) as e:
        client.infer(MODEL, inputs(tgrpc))
    assert "INVALID_ARGUMENT" in str(e.value.status()) and what in e.value.message()
    with thttp.InferenceServerClient(host(gateway)) as client, pytest.raises(InferenceServerException) as e:
        client.infer(MODEL, inputs(thttp))
    assert e.value.status() == "400" and what in e.value.message()


def test_unknown_model_is_not_found_in_both_conventions(gateway: Gateway) -> None:
    with tgrpc.InferenceServerClient(host(gateway)) as client, pytest.raises(InferenceServerException) as e:
        client.infer("gpt-9", tensors(tgrpc, "x", limit(5)))
    assert "NOT_FOUND" in str(e.value.status())
    resp = httpx.post(f"{gateway.url}/v2/models/gpt-9/generate", json={"text_input": "x", "max_tokens": 5})
    assert resp.status_code == 404 and "gpt-9" in resp.json()["error"]
    # An OpenAI request for a Triton model is told which API serves it.
    resp = httpx.post(f"{gateway.url}/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert resp.status_code == 404 and "triton" in resp.json()["error"]["message"]


def raw_grpc(gw: Gateway, body: bytes) -> httpx.Response:
    with httpx.Client(http1=False, http2=True) as h2:
        return h2.post(f"{gw.url}/inference.GRPCInferenceService/ModelInfer", content=body,
                       headers={"content-type": "application/grpc", "te": "trailers"})


@pytest.mark.parametrize("body", [
    struct.pack(">BI", 0, 12) + b"\xff" * 12,  # not a protobuf
    struct.pack(">BI", 0, 100) + b"\x0a\x03abc",  # frame says 100 bytes, 5 arrive
    struct.pack(">BI", 1, 3) + b"abc",  # compressed
])
def test_broken_grpc_frames_get_a_grpc_status(gateway: Gateway, body: bytes) -> None:
    resp = raw_grpc(gateway, body)
    assert resp.status_code == 200
    assert resp.headers["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert resp.headers["grpc-message"]


def _hold_budget(gw: Gateway) -> httpx.Response:
    """A streamed generate holding 448 KiB of the 640 KiB budget until read to the end."""
    req = httpx.Request("POST", f"{gw.url}/v2/models/{MODEL}/generate_stream",
                        json={"text_input": "p" * 300, "max_tokens": 128, "stream": True})
    resp = httpx.Client(timeout=30).send(req, stream=True)
    assert resp.status_code == 200
    wait_for(lambda: reserved(gw, MODEL) == 448 * 1024, what="the first reservation")
    return resp


def test_over_budget_is_resource_exhausted_and_429_then_released(gateway: Gateway) -> None:
    holder = _hold_budget(gateway)
    with tgrpc.InferenceServerClient(host(gateway)) as client, pytest.raises(InferenceServerException) as e:
        client.infer(MODEL, tensors(tgrpc, "q" * 300, limit(128)))
    assert "RESOURCE_EXHAUSTED" in str(e.value.status())
    resp = httpx.post(f"{gateway.url}/v2/models/{MODEL}/generate", json={"text_input": "q" * 300, "max_tokens": 128})
    assert resp.status_code == 429 and 1 <= int(resp.headers["retry-after"]) <= 60 and resp.json()["error"]
    holder.read()
    holder.close()
    wait_for(lambda: reserved(gateway, MODEL) == 0, what="release after completion")


def stream_results(gw: Gateway, requests: list[tuple[str, int]], *, one_by_one: bool = False,
                   timeout_s: float = 20) -> list:
    """Send each (text, max_tokens) on one ModelStreamInfer stream (one_by_one: each after the
    previous one's result); collect results until all arrived or an error ended the stream."""
    results: list = []
    arrived = threading.Condition()

    def callback(result, error) -> None:  # noqa: ANN001
        with arrived:
            results.append(error or result)
            arrived.notify_all()

    def wait(count: int) -> None:
        with arrived:
            arrived.wait_for(lambda: len(results) >= count or any(
                isinstance(r, InferenceServerException) for r in results), timeout_s)

    with tgrpc.InferenceServerClient(host(gw)) as client:
        client.start_stream(callback=callback)
        for i, (text, n) in enumerate(requests):
            client.async_stream_infer(MODEL, tensors(tgrpc, text, limit(n)), request_id=str(i))
            if one_by_one:
                wait(i + 1)
        wait(len(requests))
        client.stop_stream()
    return results


def test_stream_infer_clamps_and_routes_every_message(gateway: Gateway) -> None:
    marker = uuid.uuid4().hex
    results = stream_results(gateway, [(f"{marker} a", 5), (f"{marker} b", 4000), (f"{marker} c", 2)])
    assert not [r for r in results if isinstance(r, InferenceServerException)]
    assert sorted(len(words(r)) for r in results) == [2, 5, 128]
    seen = engine_saw(gateway, marker)
    assert sorted(s["body"]["inputs"]["max_tokens"] for s in seen) == [2, 5, 128]
    assert {s["body"]["model_name"] for s in seen} == {"ensemble"}
    wait_for(lambda: reserved(gateway, MODEL) == 0, what="release at stream end")


def test_stream_opened_over_budget_gets_resource_exhausted(gateway: Gateway) -> None:
    marker = uuid.uuid4().hex
    holder = _hold_budget(gateway)
    (error,) = stream_results(gateway, [(f"{marker} " + "q" * 300, 128)])
    assert isinstance(error, InferenceServerException)
    assert "RESOURCE_EXHAUSTED" in str(error.status()) and "KV-cache budget" in error.message()
    assert engine_saw(gateway, marker) == []
    holder.read()
    holder.close()
    wait_for(lambda: reserved(gateway, MODEL) == 0, what="every reservation released")


def test_message_over_budget_mid_stream_gets_its_own_error(gateway: Gateway) -> None:
    """After the first message the stream is routed: a refusal is that request's error on the stream
    (tests/integration/test_grpc_stream_release.py has the rest). The message before went through;
    the one over budget never reaches the engine."""
    marker = uuid.uuid4().hex
    holder = _hold_budget(gateway)
    results = stream_results(gateway, [(f"{marker} fits", 5), (f"{marker} " + "q" * 300, 128)], one_by_one=True)
    assert len(words(results[0])) == 5
    assert isinstance(results[1], InferenceServerException) and "KV-cache budget" in results[1].message()
    assert [s["body"]["inputs"]["text_input"] for s in engine_saw(gateway, marker)] == [f"{marker} fits"]
    holder.read()
    holder.close()
    wait_for(lambda: reserved(gateway, MODEL) == 0, what="every reservation released")


def test_stream_may_wait_before_its_first_message(gateway: Gateway) -> None:
    """ext_proc answers a stream's headers only once the first message names the model; it asks
    Envoy to wait longer than the 2 s message timeout meanwhile."""
    results: list = []
    with tgrpc.InferenceServerClient(host(gateway)) as client:
        client.start_stream(callback=lambda result, error: results.append(error or result))
        time.sleep(3)
        client.async_stream_infer(MODEL, tensors(tgrpc, "late", limit(3)))
        wait_for(lambda: bool(results), what="the stream's result")
        client.stop_stream()
    assert len(words(results[0])) == 3
