"""Every reply Envoy makes itself reaches the client in its convention (OpenAI JSON, Triton's
`{"error": "..."}`, a gRPC status), while ext_proc's refusals and the routes' direct responses, local
replies too, come through unchanged. The failures are real: ext_proc stalled and killed, engines
stopped and killed, a body over the limit (docs/architecture.md, "Envoy's own replies")."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from tritonclient.utils import InferenceServerException

from kvgate.catalog import parse_catalog
from kvgate.cli.gateway import Gateway
from tests.integration.conftest import start_gateway, wait_for

FAST = {"ttft_base_ms": 1, "ttft_per_token_ms": 0, "itl_ms": 1, "batch_slowdown": 0}
# Never scraped: ext_proc keeps admitting to these whatever their engines do, so Envoy meets the failure.
UNWATCHED = {"engine_metrics": {"scrape": False}}


def model(name: str, protocol: str = "openai", **fields: Any) -> dict[str, Any]:
    return {"name": name, "protocol": protocol, "endpoints": ["sim"], "max_context_tokens": 2048,
            "max_output_tokens": 64, "kv": {"bytes_per_token": 4096, "budget_per_endpoint": "64MiB"}, "sim": FAST,
            **fields}


CATALOG = {"models": [
    model("a"), model("t", "triton"),
    model("ut", timeouts={"request_s": 1.5}, **UNWATCHED),  # the whole response: Envoy's UT
    model("tut", "triton", timeouts={"request_s": 1.5}, **UNWATCHED),
    model("si", timeouts={"idle_s": 1}, **UNWATCHED),  # silence: Envoy's SI
    # Watched (its metrics stale 1.5 s after its engine dies), with the catalog's default wait for budget.
    model("gone", engine_metrics={"interval_s": 0.5, "stale_after_s": 1.5}),
]}
MAX_REQUEST_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(parse_catalog(CATALOG), tmp_path_factory.mktemp("replies"), max_request_bytes=MAX_REQUEST_BYTES)
    yield gw
    gw.stop()


# --- one request in each convention, and what its error must look like -------------------------------

def complete(gw: Gateway, model_name: str, *, stream: bool = False, prompt: str = "hi") -> httpx.Response:
    body = {"model": model_name, "prompt": prompt, "max_tokens": 4, "stream": stream}
    return httpx.post(f"{gw.url}/v1/completions", json=body, timeout=30)


def generate(gw: Gateway, model_name: str, text: str = "hi") -> httpx.Response:
    return httpx.post(f"{gw.url}/v2/models/{model_name}/generate", json={"text_input": text, "max_tokens": 4},
                      timeout=30)


def grpc_infer(gw: Gateway, model_name: str, text: str = "hi") -> InferenceServerException | None:
    """One ModelInfer through the gateway: None if it succeeded, else the client's error."""
    inputs = [tgrpc.InferInput("text_input", [1, 1], "BYTES"), tgrpc.InferInput("max_tokens", [1, 1], "INT32")]
    inputs[0].set_data_from_numpy(np.array([[text.encode()]], dtype=object))
    inputs[1].set_data_from_numpy(np.array([[4]], dtype=np.int32))
    with tgrpc.InferenceServerClient(gw.url.removeprefix("http://")) as client:
        try:
            client.infer(model_name, inputs, client_timeout=30)
        except InferenceServerException as e:
            return e
    return None


def message(gw: Gateway, model_name: str) -> httpx.Response:
    """Anthropic's Messages API, as its SDK sends it."""
    return httpx.post(f"{gw.url}/v1/messages", headers={"anthropic-version": "2023-06-01"}, timeout=30,
                      json={"model": model_name, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})


def anthropic_error(resp: httpx.Response, status: int, type_: str, code: str) -> str:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert body["type"] == "error" and body["error"]["type"] == type_, body
    assert body["error"]["details"] == {"error_code": code} and body["error"]["message"], body
    return body["error"]["message"]


def openai_error(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code and error["message"], error
    return error


def triton_error(resp: httpx.Response, status: int) -> str:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    return body["error"]


def grpc_error(error: InferenceServerException | None, status: str) -> str:
    assert error is not None and error.status() == f"StatusCode.{status}", error
    assert error.message() and "%" not in error.message(), error.message()  # readable, not percent-encoded
    return error.message()


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    return call(), time.monotonic() - started


def engine(gw: Gateway, model_name: str) -> int:
    child = gw.supervisor.get(f"sim-{model_name}-0")
    assert child is not None
    return child.proc.pid


# --- what must not change ------------------------------------------------------------------------

def test_ext_procs_refusals_and_envoys_direct_responses_are_unchanged(gateway: Gateway) -> None:
    listed = httpx.get(f"{gateway.url}/v1/models")
    assert listed.status_code == 200 and {m["id"] for m in listed.json()["data"]} == {"a", "ut", "si", "gone"}
    health = httpx.get(f"{gateway.url}/v2/health/ready")
    assert health.status_code == 200 and health.content == b""
    error = openai_error(complete(gateway, "nope"), 404, "model_not_found")
    assert error == {"message": "The model 'nope' does not exist.", "type": "invalid_request_error",
                     "param": "model", "code": "model_not_found"}
    assert triton_error(generate(gateway, "nope"), 404) == "The model 'nope' does not exist."
    assert grpc_error(grpc_infer(gateway, "nope"), "NOT_FOUND") == "The model 'nope' does not exist."
    unknown_url = httpx.post(f"{gateway.url}/v1/audio/speech", json={"model": "a", "input": "x"})
    assert openai_error(unknown_url, 404, "unknown_url")


# --- Envoy's own replies -------------------------------------------------------------------------

def test_a_body_over_the_limit_is_413_in_each_convention(gateway: Gateway) -> None:
    big = "x" * MAX_REQUEST_BYTES
    assert str(MAX_REQUEST_BYTES) in openai_error(complete(gateway, "a", prompt=big), 413, "body_too_large")["message"]
    assert str(MAX_REQUEST_BYTES) in triton_error(generate(gateway, "t", big), 413)
    assert str(MAX_REQUEST_BYTES) in grpc_error(grpc_infer(gateway, "t", big), "RESOURCE_EXHAUSTED")
    too_big = httpx.post(f"{gateway.url}/v1/messages", headers={"anthropic-version": "2023-06-01"}, timeout=30,
                         json={"model": "a", "max_tokens": 4, "messages": [{"role": "user", "content": big}]})
    assert str(MAX_REQUEST_BYTES) in anthropic_error(too_big, 413, "request_too_large", "body_too_large")


def test_a_stalled_engine_is_a_504_after_the_models_timeout_in_each_convention(gateway: Gateway) -> None:
    stalled = [engine(gateway, m) for m in ("ut", "tut", "si")]
    calls: dict[str, Callable[[], Any]] = {
        "openai": lambda: complete(gateway, "ut"), "openai stream": lambda: complete(gateway, "ut", stream=True),
        "triton": lambda: generate(gateway, "tut"), "grpc": lambda: grpc_infer(gateway, "tut"),
        "openai idle": lambda: complete(gateway, "si"),
        "openai idle stream": lambda: complete(gateway, "si", stream=True)}
    results: dict[str, tuple[Any, float]] = {}
    threads = [threading.Thread(target=lambda k=k, c=c: results.__setitem__(k, timed(c))) for k, c in calls.items()]
    for pid in stalled:
        os.kill(pid, signal.SIGSTOP)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for pid in stalled:
            os.kill(pid, signal.SIGCONT)
    for key in ("openai", "openai stream"):
        openai_error(results[key][0], 504, "engine_timeout")
    assert "request timeout" in triton_error(results["triton"][0], 504)
    assert "request timeout" in grpc_error(results["grpc"][0], "DEADLINE_EXCEEDED")
    for key in ("openai idle", "openai idle stream"):
        openai_error(results[key][0], 504, "engine_idle_timeout")
    # Each ended at its model's timeout (1.5 s for the whole response, 1 s of silence), not at 600 s.
    for key, (_, took) in results.items():
        assert 0.9 < took < 10, (key, took)
    assert complete(gateway, "ut").status_code == 200  # and the engine serves again once it runs


def test_a_dead_engine_is_503_engine_unavailable_in_each_convention_and_others_are_served(gateway: Gateway) -> None:
    try:
        for m in ("ut", "tut"):
            os.kill(engine(gateway, m), signal.SIGKILL)
        for _ in range(3):  # connection refused, retried, then answered: at once, every time
            (resp, took) = timed(lambda: complete(gateway, "ut"))
            error = openai_error(resp, 503, "engine_unavailable")
            assert error["type"] == "service_unavailable" and resp.headers["retry-after"] == "1" and took < 2
            assert "engine" in triton_error(generate(gateway, "tut"), 503)
            assert "engine" in grpc_error(grpc_infer(gateway, "tut"), "UNAVAILABLE")
            assert "engine" in anthropic_error(message(gateway, "ut"), 503, "overloaded_error", "engine_unavailable")
            assert complete(gateway, "a").status_code == 200 and generate(gateway, "t").status_code == 200
    finally:
        for m in ("ut", "tut"):
            gateway.supervisor.restart(f"sim-{m}-0")
    wait_for(lambda: complete(gateway, "ut").status_code == 200, "the restarted engine serving", timeout_s=30)


def test_a_model_whose_every_engine_is_dead_is_answered_at_once(gateway: Gateway) -> None:
    os.kill(engine(gateway, "gone"), signal.SIGKILL)
    try:
        killed = time.monotonic()
        while time.monotonic() < killed + 3.5:  # past the moment its metrics go stale
            resp, took = timed(lambda: complete(gateway, "gone"))
            openai_error(resp, 503, "engine_unavailable")
            assert took < 1, took
            assert complete(gateway, "a").status_code == 200
    finally:
        gateway.supervisor.restart("sim-gone-0")


def test_ext_proc_stalled_or_down_is_503_gateway_unavailable_never_500(gateway: Gateway) -> None:
    ext_proc = gateway.supervisor.get("ext_proc-0")
    assert ext_proc is not None
    os.kill(ext_proc.proc.pid, signal.SIGSTOP)
    try:  # past Envoy's message timeout (2 s)
        resp, took = timed(lambda: complete(gateway, "a"))
    finally:
        os.kill(ext_proc.proc.pid, signal.SIGCONT)
    error = openai_error(resp, 503, "gateway_unavailable")
    assert error["type"] == "service_unavailable" and resp.headers["retry-after"] == "1" and took < 10

    ext_proc.proc.kill()
    ext_proc.proc.wait()
    try:
        openai_error(complete(gateway, "a"), 503, "gateway_unavailable")
        assert "admission" in triton_error(generate(gateway, "t"), 503)
        assert "admission" in grpc_error(grpc_infer(gateway, "t"), "UNAVAILABLE")
        # What Envoy answers without ext_proc still works.
        assert httpx.get(f"{gateway.url}/v1/models").status_code == 200
    finally:
        gateway.supervisor.restart("ext_proc-0")
    wait_for(lambda: complete(gateway, "a").status_code == 200, "ext_proc back", timeout_s=30)
