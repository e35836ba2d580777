"""The engines bench/spike puts behind its set-ups: the CPU simulator of trtllm-serve, or a real vLLM on
the CPU (engines/real/vllm.py). Each set-up gets a fresh one, started from the catalog's model entry,
so every set-up meets the same engine; and each engine's names for what it says about its KV cache.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.spike_metrics import SIM_METRICS, VLLM_METRICS, EngineMetrics
from engines.real.vllm import DEFAULT_MODEL_DIR, VllmServer, build_model, install
from kvgate.catalog import Address, Model
from kvgate.cli.gateway import NotReady, health_url, sim_argv
from kvgate.cli.processes import Supervisor, free_port
from kvgate.kv_math import blocks_for

HOST = "127.0.0.1"
# vLLM runs at most this many sequences at once; above what the benchmark's cache holds, like the
# simulator's batch limit (256), so that only KV blocks limit it.
VLLM_MAX_NUM_SEQS = 64


@dataclass(frozen=True)
class Engine:
    name: str  # as --engine names it
    metrics: EngineMetrics
    exhaustion: str  # what its exhaustion counter counts, as tables name it
    plot_name: str

    @contextmanager
    def started(self, model: Model, run_dir: Path, supervisor: Supervisor) -> Iterator[Address]:
        """A fresh engine for the catalog's model, ready for traffic, stopped on exit."""
        if self.name == "vllm":
            with _vllm(model, run_dir) as address:
                yield address
            return
        address = Address(host=HOST, port=free_port())
        supervisor.start("sim", sim_argv(model, address))
        wait(supervisor, lambda: status(health_url(model, address)) == 200, "simulated engine")
        yield address


def status(url: str, body: dict[str, Any] | None = None) -> int:
    """HTTP status of one GET (or POST of `body`); 0 when nothing answered."""
    data = orjson.dumps(body) if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


def wait(supervisor: Supervisor, ready: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        supervisor.check()
        if time.monotonic() > deadline:
            raise NotReady(f"{what} not ready after {timeout_s} s (logs in {supervisor.log_dir})")
        time.sleep(0.05)


@contextmanager
def _vllm(model: Model, run_dir: Path) -> Iterator[Address]:
    """vLLM serving the tiny Llama with exactly the catalog's cache: its budget in blocks of its
    tokens_per_block (vLLM keeps one of them aside), and its context."""
    venv = install()
    server = VllmServer(build_model(DEFAULT_MODEL_DIR, venv), run_dir / "vllm", venv,
                        num_blocks=blocks_for(model.kv_budget_bytes, model.block_tokens * model.kv_bytes_per_token),
                        block_size=model.block_tokens, max_model_len=model.max_context_tokens,
                        max_num_seqs=VLLM_MAX_NUM_SEQS)
    with server:
        yield Address(host=HOST, port=server.port)


SIM = Engine("sim", SIM_METRICS, "KV exhaustion events", "spike-latency.png")
VLLM = Engine("vllm", VLLM_METRICS, "preemptions", "spike-vllm-latency.png")
ENGINES = {e.name: e for e in (SIM, VLLM)}
