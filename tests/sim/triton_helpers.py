"""An in-process Triton simulator for the real (blocking) tritonclient clients.

tritonclient's clients block, so the simulator's event loop runs in a thread of
its own and the tests stay synchronous.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import httpx
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from prometheus_client.parser import text_string_to_metric_families

from engines.sim.config import SimConfig
from engines.sim.triton_server import TritonServer

MODEL = "ensemble"
T = TypeVar("T")


class TritonSim:
    """Both fronts on 127.0.0.1, free ports, zero latency unless overridden."""

    def __init__(self, **overrides: Any) -> None:
        config = SimConfig.zero_latency(
            **{"protocol": "triton", "model": MODEL, "port": 0, "grpc_port": 0, **overrides}
        )
        self.server = TritonServer(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._run(self.server.start())
        self.http_url = f"http://127.0.0.1:{self.server.http_port}"
        self.http_host = f"127.0.0.1:{self.server.http_port}"
        self.grpc_host = f"127.0.0.1:{self.server.grpc_port}"
        self.http = httpx.Client(base_url=self.http_url, timeout=10)

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    def close(self) -> None:
        self.http.close()
        self._run(self.server.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def state(self) -> dict[str, Any]:
        return self.http.get("/sim/state").raise_for_status().json()

    def records(self) -> list[dict[str, Any]]:
        return self.http.get("/sim/requests").raise_for_status().json()

    def grpc_client(self) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(self.grpc_host)

    def http_client(self) -> httpclient.InferenceServerClient:
        return httpclient.InferenceServerClient(self.http_host)


def llm_inputs(
    module: Any,
    text: str,
    max_tokens: int,
    stream: bool | None = None,
    stop_words: list[str] | None = None,
    binary_data: bool = True,
) -> list[Any]:
    """The TensorRT-LLM ensemble's inputs for tritonclient.grpc or tritonclient.http."""
    http = {"binary_data": binary_data} if module is httpclient else {}

    def tensor(name: str, datatype: str, value: np.ndarray) -> Any:
        infer_input = module.InferInput(name, list(value.shape), datatype)
        infer_input.set_data_from_numpy(value, **http)
        return infer_input

    inputs = [
        tensor("text_input", "BYTES", np.array([[text.encode()]], dtype=object)),
        tensor("max_tokens", "INT32", np.array([[max_tokens]], dtype=np.int32)),
    ]
    if stream is not None:
        inputs.append(tensor("stream", "BOOL", np.array([[stream]], dtype=bool)))
    if stop_words is not None:
        words = np.array([[w.encode() for w in stop_words]], dtype=object)
        inputs.append(tensor("stop_words", "BYTES", words))
    return inputs


def text_of(result: Any) -> str:
    """text_output of a tritonclient InferResult."""
    return result.as_numpy("text_output").reshape(-1)[0].decode()


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.02)


def prometheus_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, its labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def trt_llm_metric(samples: dict[Any, float], family: str, **labels: str) -> float:
    """A sample of the TensorRT-LLM backend's families, labelled model=tensorrt_llm, version=1."""
    key = frozenset({"model": "tensorrt_llm", "version": "1", **labels}.items())
    return samples[(family, key)]
