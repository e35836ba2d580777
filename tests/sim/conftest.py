"""In-process simulator servers on free 127.0.0.1 ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import openai
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer

from engines.sim import SimConfig, create_app

from .helpers import Sim, StartSim
from .triton_helpers import TritonSim


@pytest_asyncio.fixture
async def start_sim() -> AsyncIterator[StartSim]:
    """Starts zero-latency simulators (SimConfig overrides as kwargs); closes all after the test.

    TestServer serves with handler_cancellation=True, like `python -m engines.sim`.
    """
    sims: list[Sim] = []

    async def start(**overrides: object) -> Sim:
        server = TestServer(create_app(SimConfig.zero_latency(**overrides)), host="127.0.0.1")
        await server.start_server()
        url = f"http://127.0.0.1:{server.port}"
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        sims.append(Sim(server, url, client))
        return sims[-1]

    yield start
    for sim in sims:
        await sim.client.close()
        await sim.server.close()


@pytest.fixture
def start_triton() -> Iterator[Callable[..., TritonSim]]:
    """Starts in-process Triton simulators (SimConfig overrides as kwargs); stops all after."""
    sims: list[TritonSim] = []

    def start(**overrides: object) -> TritonSim:
        sims.append(TritonSim(**overrides))
        return sims[-1]

    yield start
    for sim in sims:
        sim.close()
