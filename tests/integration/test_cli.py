"""`kvgate up` and `kvgate check` as a user runs them: real processes, real signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from kvgate.catalog import bundled_catalog_path
from kvgate.cli.processes import free_port
from tests.integration.conftest import wait_for

KVGATE = [sys.executable, "-m", "kvgate.cli"]


def children_of(pid: int) -> set[int]:
    """Every live descendant of `pid`, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return not Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def start_up(args: list[str], tmp_path: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([*KVGATE, "up", "--run-dir", str(tmp_path / "run"), *args],
                            stdout=subprocess.PIPE, stderr=open(tmp_path / "stderr.txt", "w"), text=True)
    deadline = time.monotonic() + 90
    assert proc.stdout is not None
    for line in proc.stdout:  # the first stdout line is printed only once the gateway is ready
        if line.startswith("kvgate ready: "):
            return proc, line.split()[2]
        assert time.monotonic() < deadline
    proc.kill()
    raise AssertionError(f"kvgate up never got ready: {(tmp_path / 'stderr.txt').read_text()}")


def stop_and_check_no_orphans(proc: subprocess.Popen[str], sig: int) -> None:
    kids = children_of(proc.pid)
    assert len(kids) >= 4  # engines, xds_server, ext_proc, envoy
    proc.send_signal(sig)
    proc.wait(timeout=20)
    deadline = time.monotonic() + 10
    while any(alive(k) for k in kids):
        assert time.monotonic() < deadline, f"orphans left: {[k for k in kids if alive(k)]}"
        time.sleep(0.05)


def test_up_with_no_catalog_serves_the_bundled_models_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    proc, url = start_up(["--port", str(free_port())], tmp_path)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        bundled = yaml.safe_load(bundled_catalog_path().read_text())["models"]
        openai_models = {m["name"] for m in bundled if m.get("protocol", "openai") == "openai"}
        assert {m.id for m in client.models.list().data} == openai_models
        for m in bundled:
            if m.get("protocol") == "triton":
                resp = httpx.post(f"{url}/v2/models/{m['name']}/generate", json={"text_input": "Say hi", "max_tokens": 4})
                assert len(resp.json()["text_output"].split()) == 4
                continue
            stream = client.chat.completions.create(
                model=m["name"], messages=[{"role": "user", "content": "Say hi"}], max_tokens=4, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).split()
        stop_and_check_no_orphans(proc, signal.SIGINT)
        assert "kvgate stopped" in (tmp_path / "stderr.txt").read_text()
    finally:
        proc.kill()


def test_up_serves_another_catalog_and_stops_on_sigterm(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": [{
        "name": "solo", "endpoints": ["sim", "sim"], "max_context_tokens": 2048, "max_output_tokens": 64,
        "kv": {"bytes_per_token": 65536, "budget_per_endpoint": "1GiB"}}]}))
    proc, url = start_up(["--catalog", str(catalog), "--port", str(free_port())], tmp_path)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        resp = client.completions.with_raw_response.create(model="solo", prompt="hi", max_tokens=1000)
        assert resp.headers["x-kvgate-max-tokens"] == "64"
        assert resp.parse().usage.completion_tokens == 64
        stop_and_check_no_orphans(proc, signal.SIGTERM)
    finally:
        proc.kill()


def test_up_serves_each_save_of_its_catalog_and_refuses_a_broken_one(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.yaml"
    solo = {"name": "solo", "endpoints": ["sim"], "max_context_tokens": 2048, "max_output_tokens": 64,
            "kv": {"bytes_per_token": 65536, "budget_per_endpoint": "1GiB"}}
    catalog.write_text(yaml.safe_dump({"models": [solo]}))
    proc, url = start_up(["--catalog", str(catalog), "--port", str(free_port()), "--xds-port", str(free_port())],
                         tmp_path)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)

        def serves(model: str, clamp: str) -> bool:
            try:
                raw = client.completions.with_raw_response.create(model=model, prompt="hi", max_tokens=500)
            except openai.NotFoundError:
                return False
            return raw.headers["x-kvgate-max-tokens"] == clamp

        catalog.write_text(yaml.safe_dump({"models": [solo, {**solo, "name": "duo", "max_output_tokens": 32}]}))
        wait_for(lambda: serves("duo", "32"), "a model added to the file, on a new engine", timeout_s=30)
        catalog.write_text("models: [ {name: solo")
        wait_for(lambda: "catalog change refused" in (tmp_path / "stderr.txt").read_text(), "the refusal",
                 timeout_s=30)
        assert serves("duo", "32")  # the broken save changed nothing
        catalog.write_text(yaml.safe_dump({"models": [{**solo, "max_output_tokens": 16}]}))
        wait_for(lambda: serves("solo", "16") and not serves("duo", "32"), "the next valid save", timeout_s=30)
        stop_and_check_no_orphans(proc, signal.SIGTERM)
    finally:
        proc.kill()



def test_up_with_two_ext_proc_workers_splits_each_budget_and_refuses_more_than_fit(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.yaml"
    # One full-context request is 2048 x 64 KiB = 128 MiB: the budget holds two, so two workers can each hold one.
    catalog.write_text(yaml.safe_dump({"models": [{
        "name": "solo", "endpoints": ["sim"], "max_context_tokens": 2048, "max_output_tokens": 64,
        "kv": {"bytes_per_token": 65536, "budget_per_endpoint": "256MiB"}}]}))
    refused = subprocess.run([*KVGATE, "up", "--catalog", str(catalog), "--ext-proc-workers", "3"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "model 'solo'" in refused.stderr and "at most 2 workers" in refused.stderr, refused.stderr

    status_port = free_port()
    proc, url = start_up(["--catalog", str(catalog), "--port", str(free_port()), "--xds-port", str(free_port()),
                          "--status-port", str(status_port), "--ext-proc-workers", "2"], tmp_path)
    try:
        workers = [k for k in children_of(proc.pid)
                   if b"ext_proc" in Path(f"/proc/{k}/cmdline").read_bytes().split(b"\0")]
        assert len(workers) == 2

        def shares() -> list[float]:
            replicas = httpx.get(f"http://127.0.0.1:{status_port}/status.json").json()["replicas"]
            return sorted(r["share"] or 0 for r in replicas)

        wait_for(lambda: shares() == [0.5, 0.5], "each worker holding half of every budget")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        for _ in range(8):
            raw = client.completions.with_raw_response.create(model="solo", prompt="hi", max_tokens=1000)
            assert raw.headers["x-kvgate-max-tokens"] == "64"
        stop_and_check_no_orphans(proc, signal.SIGTERM)
    finally:
        proc.kill()


def test_up_refuses_an_invalid_catalog_naming_model_and_field(tmp_path: Path) -> None:
    catalog = tmp_path / "bad.yaml"
    catalog.write_text(yaml.safe_dump({"models": [{"name": "m1", "endpoints": ["nowhere"],
                                                   "max_context_tokens": 100, "kv": {"budget_per_endpoint": "1GiB"}}]}))
    result = subprocess.run([*KVGATE, "up", "--catalog", str(catalog)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "model 'm1' (models[0]): endpoints.0" in result.stderr
    assert "model 'm1' (models[0]): kv" in result.stderr


def test_up_says_when_its_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([*KVGATE, "up", "--port", str(port), "--run-dir", str(tmp_path)],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"127.0.0.1:{port} is already in use" in result.stderr


def test_check_prints_every_resource_type_in_ads_order() -> None:
    result = subprocess.run([*KVGATE, "check", str(bundled_catalog_path())], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    docs = list(yaml.safe_load_all(result.stdout))
    assert [d["type_url"].rsplit(".", 1)[1] for d in docs] == [
        "Cluster", "ClusterLoadAssignment", "Listener", "RouteConfiguration", "Tenant", "ModelPolicy"]
    assert docs[4]["resources"] == []  # no tenants: an open gateway
    policies = {p["name"]: p for p in docs[-1]["resources"]}
    assert policies["llama-3-8b"]["kv_bytes_per_token"] == str(128 * 1024)


@pytest.mark.parametrize("content", ["models: [", "models: []", "{}"])
def test_check_refuses_broken_catalogs(tmp_path: Path, content: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(content)
    result = subprocess.run([*KVGATE, "check", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "invalid catalog" in result.stderr
