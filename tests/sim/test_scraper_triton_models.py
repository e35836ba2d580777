"""EngineScraper on a Triton metrics page of several models, served over a real socket: the pages of
pools told apart or not, a named model missing, and the warning about summing given once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from ext_proc.scraper import EngineScraper, Target

REAL_PAGE = (Path(__file__).parents[1] / "unit" / "data" / "triton_2.51_trtllm_repository_busy.txt").read_text()
# A second TensorRT-LLM engine in the same Triton, using 10 of its 100 blocks.
SECOND_ENGINE = "".join(
    f'nv_trt_llm_kv_cache_block_metrics{{kv_cache_block_type="{k}",model="mistral_trtllm",version="1"}} {v}\n'
    for k, v in (("used", 10), ("free", 90), ("max", 100), ("tokens_per", 16)))


@pytest_asyncio.fixture
async def page_url() -> AsyncIterator[str]:
    """The real Triton page with a second engine's series in it, as a Triton of two engines serves it."""
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=REAL_PAGE.replace("# HELP nv_trt_llm_request_metrics",
                                                   SECOND_ENGINE + "# HELP nv_trt_llm_request_metrics"))

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}/metrics"
    await server.close()


@pytest.mark.asyncio
async def test_each_pool_reads_its_model_and_an_unnamed_one_sums_with_one_warning(page_url: str) -> None:
    scraper = EngineScraper(interval_s=0.5)
    scraper.set_targets({"llama": Target(page_url, "tensorrt_llm"), "mistral": Target(page_url, "mistral_trtllm"),
                         "unnamed": Target(page_url), "typo": Target(page_url, "tensorrt-llm")})
    try:
        with capture_logs() as logs:
            for _ in range(3):
                await scraper.scrape_once()
    finally:
        await scraper.close()
    loads = {key: s.load for key in ("llama", "mistral", "unnamed", "typo") if (s := scraper.sample(key))}
    assert (loads["llama"].kv_used_blocks, loads["llama"].kv_max_blocks) == (21, 64)  # type: ignore[union-attr]
    assert (loads["mistral"].kv_used_blocks, loads["mistral"].kv_max_blocks) == (10, 100)  # type: ignore[union-attr]
    # Never blind: the two engines together (the BLS's zeros are no engine), and said once.
    assert (loads["unnamed"].kv_used_blocks, loads["unnamed"].kv_max_blocks) == (31, 164)  # type: ignore[union-attr]
    summed = [e for e in logs if e["event"] == "engine_scraper.summed_models"]
    assert [(e["key"], e["models"]) for e in summed] == [("unnamed", ["mistral_trtllm", "tensorrt_llm"])]
    # A model named but missing: up without numbers (a sample of none, not a stale engine), and logged once.
    typo = scraper.sample("typo")
    assert typo is not None and typo.load is None
    failing = [e for e in logs if e["event"] == "engine_scraper.failing"]
    assert [(e["key"], "no model 'tensorrt-llm'" in e["error"]) for e in failing] == [("typo", True)]
