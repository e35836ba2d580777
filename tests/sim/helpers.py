"""Helpers shared by the simulator's server tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import openai
from aiohttp.test_utils import TestServer

from engines.sim import SimConfig

MODEL = SimConfig().model


@dataclass(frozen=True)
class Sim:
    """A running in-process simulator and an OpenAI SDK client pointed at it."""

    server: TestServer
    url: str
    client: openai.AsyncOpenAI


StartSim = Callable[..., Awaitable[Sim]]


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)
