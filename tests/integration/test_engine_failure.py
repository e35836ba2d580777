"""An engine that dies: the request fails in the client's convention and its reservation comes back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kvgate.catalog import parse_catalog
from kvgate.cli.gateway import Gateway
from tests.integration.conftest import reserved, start_gateway, wait_for

CATALOG = {"models": [{"name": "doomed", "endpoints": ["sim"], "max_context_tokens": 2048, "max_output_tokens": 64,
                       "kv": {"bytes_per_token": 4096, "budget_per_endpoint": "64MiB"},
                       "sim": {"ttft_base_ms": 1, "itl_ms": 20}}]}


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    gw = start_gateway(parse_catalog(CATALOG), tmp_path)
    yield gw
    gw.stop()


def test_engine_killed_mid_stream_and_before_a_request(gateway: Gateway) -> None:
    (engine,) = [c for c in gateway.supervisor.children if c.name.startswith("sim-")]
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{gateway.url}/v1/completions",
                         json={"model": "doomed", "prompt": "hi", "max_tokens": 64, "stream": True}) as resp:
            chunks = resp.iter_raw()
            next(chunks)
            wait_for(lambda: reserved(gateway, "doomed") > 0, what="the reservation")
            engine.proc.kill()
            with pytest.raises(httpx.HTTPError):
                for _ in chunks:  # the stream is cut before [DONE]
                    pass
        wait_for(lambda: reserved(gateway, "doomed") == 0, what="release after the engine died")

        dead = http.post(f"{gateway.url}/v1/completions", json={"model": "doomed", "prompt": "hi", "max_tokens": 4})
        assert dead.status_code == 503
        wait_for(lambda: reserved(gateway, "doomed") == 0, what="release after a failed connect")
