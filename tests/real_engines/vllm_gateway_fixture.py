"""A whole gateway in front of the real vLLM (vllm_fixture.py), once per test session, with a second
model on a simulated vLLM of the same shape (engines/sim's vLLM flavor: same tokenizer, cache and
context) so that the two can be compared request for request.

tests/real_engines/conftest.py offers it to every test module there.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engines.real.vllm import VllmServer
from kvgate.catalog import parse_catalog
from kvgate.cli.gateway import Gateway
from tests.integration.conftest import start_gateway

MODEL, SIM_MODEL = "tiny-llama", "tiny-sim"
MAX_OUTPUT = 480
BLOCK = 32
KV_BYTES_PER_TOKEN = 512  # the tiny Llama: 2 layers x 2 KV heads x 32 x (K and V) x 2 bytes
PATIENT = {"x-kvgate-priority": "patient"}


@pytest.fixture(scope="session")
def vllm_gateway(vllm_engine: VllmServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    model = vllm_engine.model
    shape = {
        "engine": "vllm", "max_context_tokens": vllm_engine.max_model_len, "max_output_tokens": MAX_OUTPUT,
        "tokens_per_block": BLOCK, "tokenizer": str(model.tokenizer_json),
        # The whole cache as a catalog would naively state it: vLLM holds one block aside.
        "kv": {"config_json": str(model.path / "config.json"),
               "budget_per_endpoint": vllm_engine.num_blocks * BLOCK * KV_BYTES_PER_TOKEN},
        "engine_metrics": {"interval_s": 0.5, "stale_after_s": 3},
        # Other tests' short requests must not keep the floods of these tests under the long-request cap.
        "long_requests": {"short_window_s": 0},
    }
    catalog = parse_catalog({
        "models": [{"name": MODEL, "endpoints": [f"127.0.0.1:{vllm_engine.port}"], **shape},
                   # Slower than this vLLM's few ms per token, so that twelve requests sent at once
                   # overlap in the simulator however the threads sending them are scheduled.
                   {"name": SIM_MODEL, "endpoints": ["sim"], **shape,
                    "sim": {"ttft_base_ms": 5, "ttft_per_token_ms": 0.02, "itl_ms": 10, "batch_slowdown": 0.05}}],
        "priority_classes": [{"name": "interactive", "max_wait_s": 0}, {"name": "patient", "max_wait_s": 55}],
    })
    gw = start_gateway(catalog, tmp_path_factory.mktemp("vllm-gw"))
    yield gw
    gw.stop()
