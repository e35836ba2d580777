"""A real vLLM (engines/real/vllm.py) serving the tiny Llama, once per test session.

tests/real_engines/conftest.py offers it to every test module there.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engines.real.vllm import DEFAULT_MODEL_DIR, VllmServer, build_model, install

# The session fixture's setup counts toward the pytest-timeout of the first test that uses it: installing
# on a fresh machine takes ~2.5 min (a no-op once .ci/run or an earlier session did it), building the model
# ~7 s (cached in .real-engines/), starting the server ~40 s; a busy 2-core machine can double each.
# Modules that use the fixture mark themselves with this timeout instead of the suite's 120 s.
SETUP_TIMEOUT_S = 600


@pytest.fixture(scope="session")
def vllm_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    venv = install()
    server = VllmServer(build_model(DEFAULT_MODEL_DIR, venv), tmp_path_factory.mktemp("vllm"), venv)
    server.start()
    try:
        yield server
    finally:
        server.stop()
