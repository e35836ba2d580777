"""bench/prefix runs end to end in its quick mode: three set-ups through the real Envoy (and kvgate's
xds_server and ext_proc for two of them) over simulated vLLM engines with prefix caching, and draws
its plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.prefix import QUICK_WORKLOAD, SETUPS, main
from bench.prefix_engines import SIM


def test_quick_run_routes_shared_prefixes_to_their_caches(capsys: pytest.CaptureFixture[str],
                                                          tmp_path: Path) -> None:
    results = main(["--quick", "--plots", str(tmp_path)])
    by_setup = {r.setup: r for r in results}
    assert list(by_setup) == list(SETUPS)
    turns = QUICK_WORKLOAD.users * QUICK_WORKLOAD.chats * QUICK_WORKLOAD.turns
    for r in results:
        assert (len(r.ttft_s), r.failed) == (turns, 0), r.setup
        assert r.queries > 0 and 0 <= r.hits <= r.queries
    # Prefix routing sends each chat where its system prompt (and earlier turns) are cached: the engines
    # report more of the prompts found in their caches than with headroom alone.
    assert by_setup["prefix"].hit_rate > by_setup["headroom"].hit_rate
    assert "Ratios against least-request" in capsys.readouterr().out
    png = (tmp_path / SIM.plot_name).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
