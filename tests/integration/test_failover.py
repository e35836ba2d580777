"""An engine dies under load: only the requests it was running fail. Envoy's health checks, outlier
detection and connect-failure retries move traffic to the engine left, and ext_proc stops choosing
the dead one once its metrics go stale."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kvgate.catalog import parse_catalog
from kvgate.cli.gateway import Gateway
from tests.integration.conftest import ledger_metrics, reserved, start_gateway, wait_for

CATALOG = {"models": [{
    "name": "ha", "endpoints": ["sim", "sim"], "max_context_tokens": 2048, "max_output_tokens": 64,
    "kv": {"bytes_per_token": 4096, "budget_per_endpoint": "256MiB"},
    "engine_metrics": {"interval_s": 0.2, "stale_after_s": 1.2},
    "sim": {"ttft_base_ms": 2, "ttft_per_token_ms": 0, "itl_ms": 5, "batch_slowdown": 0}}]}
CLIENTS = 4


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    gw = start_gateway(parse_catalog(CATALOG), tmp_path)
    yield gw
    gw.stop()


def test_engine_killed_under_load_fails_only_what_it_was_running(gateway: Gateway) -> None:
    (doomed,) = [c for c in gateway.supervisor.children if c.name == "sim-ha-1"]
    outcomes: list[tuple[float, int]] = []  # (start time, status; 0: transport error)
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    status = http.post(f"{gateway.url}/v1/completions",
                                       json={"model": "ha", "prompt": "hi", "max_tokens": 20}).status_code
                except httpx.HTTPError:
                    status = 0
                outcomes.append((started, status))

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    wait_for(lambda: sum(1 for _, s in outcomes if s == 200) >= 40, what="traffic on both engines")
    killed_at = time.monotonic()
    doomed.proc.kill()
    wait_for(lambda: sum(1 for started, _ in outcomes if started > killed_at + 2.0) >= 40, what="traffic after the kill",
             timeout_s=30)
    stop.set()
    for t in threads:
        t.join()

    failed = [(started, s) for started, s in outcomes if s != 200]
    after = [s for started, s in outcomes if started > killed_at]
    # At most the requests running on the dead engine when it died: one per client.
    assert len(failed) <= CLIENTS, failed
    # Every request started after the kill was served: retried elsewhere or sent elsewhere.
    assert all(started <= killed_at for started, _ in failed), failed
    assert len(after) >= 40 and after.count(200) == len(after)
    metrics = ledger_metrics(gateway)
    assert metrics[("kvgate_kv_engine_blind", "ha")] == 1  # the dead engine counts as full
    wait_for(lambda: reserved(gateway, "ha") == 0, what="every reservation released")
