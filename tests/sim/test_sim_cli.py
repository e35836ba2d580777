from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import openai
import tritonclient.grpc as grpcclient

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read() if process.stderr else b""
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.05)
    raise AssertionError(f"{url} not healthy within {timeout}s")


def test_module_serves_and_exits_cleanly_on_sigterm() -> None:
    port = free_port()
    command = [sys.executable, "-m", "engines.sim", "--port", str(port), "--model", "cli-model"]
    command += ["--ttft-base-ms", "0", "--itl-ms", "0", "--kv-blocks", "64"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url + "/health", process)
        with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
            reply = client.chat.completions.create(
                model="cli-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
        assert reply.usage.completion_tokens == 3
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=10)
        assert process.returncode == 0, stderr
        assert stdout == b""  # no banner, no access log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_triton_protocol_serves_http_and_grpc_and_exits_cleanly_on_sigterm() -> None:
    http_port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "engines.sim", "--protocol", "triton", "--model", "ensemble"]
    command += ["--port", str(http_port), "--grpc-port", str(grpc_port)]
    command += ["--ttft-base-ms", "0", "--itl-ms", "0", "--kv-blocks", "64"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{http_port}"
        wait_healthy(url + "/v2/health/ready", process)
        reply = httpx.post(
            url + "/v2/models/ensemble/generate", json={"text_input": "hi", "max_tokens": 3}
        )
        assert reply.status_code == 200 and len(reply.json()["text_output"].split()) == 3

        text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"hi"]], dtype=object))
        max_tokens = grpcclient.InferInput("max_tokens", [1, 1], "INT32")
        max_tokens.set_data_from_numpy(np.array([[4]], dtype=np.int32))
        with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            result = client.infer("ensemble", [text, max_tokens])
        assert len(result.as_numpy("text_output")[0][0].split()) == 4

        # One engine and one record log behind both fronts.
        paths = [r["path"] for r in httpx.get(url + "/sim/requests").json()]
        assert paths == [
            "/v2/models/ensemble/generate",
            "/inference.GRPCInferenceService/ModelInfer",
        ]
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=10)
        assert process.returncode == 0, stderr
        assert stdout == b""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_triton_protocol_requires_a_grpc_port() -> None:
    command = [sys.executable, "-m", "engines.sim", "--protocol", "triton", "--port", "0"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, timeout=30)
    assert done.returncode == 2
    assert b"--grpc-port is required with --protocol triton" in done.stderr
