"""The spike benchmark runs end to end in its quick mode. Its numbers are checked for presence and
consistency, never against the issue's goals: those belong in docs/benchmarks.md, not in assertions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from bench.spike import QUICK_SETUPS, main, parse_args
from bench.spike_client import DONE, REFUSED
from bench.spike_metrics import VLLM_METRICS, parse
from bench.spike_scenario import (BURST, QUICK, STEADY, VLLM_BLOCKS, VLLM_SEED, Scenario, build_plan, catalog,
                                  vllm_catalog, without_burst)
from bench.spike_setups import with_ext_proc
from bench.spike_shedding import EngineState, Thresholds, saturation
from kvgate.catalog import Address, parse_catalog


def test_quick_run_reports_every_setup_with_sane_fields(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    report = main(["--quick", "--json", "--plots", str(tmp_path)])

    assert [x.name for x in report.summaries] == QUICK_SETUPS
    for x in report.summaries:
        assert x.steady_measured > 0
        assert x.burst_sent == (QUICK.burst_count if x.burst else 0)
        assert x.refused_burst + x.burst_gave_up + x.burst_done + x.burst_cut <= x.burst_sent
        assert x.refused_steady + x.failed_steady <= x.steady_measured
        assert 0 <= x.goodput_rps <= x.steady_measured / (QUICK.window[1] - QUICK.window[0])
        assert x.exhaustion_events >= 0
        assert x.ttft_p50_ms > 0 and not math.isnan(x.ttft_p50_ms)
        assert {"client", "envoy", "sim"} <= set(x.cpu_s)
    # Requests that finished streamed every token they asked for.
    for run in report.runs:
        for r in run.requests:
            if r.outcome == DONE:
                assert r.tokens == r.max_tokens and r.ttft_s is not None and r.ttft_s > 0
            if r.outcome == REFUSED:
                assert r.status in (429, 503) and r.tokens == 0
    assert [g.met is not None for g in report.goals] == [True] * 4
    printed = json.loads(capsys.readouterr().out)
    assert [x["name"] for x in printed["summaries"]] == QUICK_SETUPS
    assert printed["command"].endswith(f"-m bench.spike --quick --json --plots {tmp_path}")
    assert (tmp_path / "spike-latency.png").read_bytes().startswith(b"\x89PNG")


def test_repeated_runs_are_pooled_per_setup(capsys: pytest.CaptureFixture[str]) -> None:
    """Two rounds of one set-up: one summary over both runs' requests, goodput still per second of one
    window, and the report says so."""
    once = main(["--quick", "--setups", "kvgate-noburst"])
    twice = main(["--quick", "--setups", "kvgate-noburst", "--repeat", "2"])
    (x,), (run,) = twice.summaries, twice.runs
    assert x.steady_measured == 2 * once.summaries[0].steady_measured
    assert run.repeats == 2 and len(run.requests) == 2 * len(once.runs[0].requests)
    assert 0 < x.goodput_rps <= x.steady_measured / (2 * (QUICK.window[1] - QUICK.window[0]))
    assert x.capacity_wait_s >= 0
    assert "Each set-up ran 2 times" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parse_args(["--repeat", "0"])


def test_steady_traffic_is_the_same_with_and_without_the_burst() -> None:
    plan = build_plan(Scenario())
    steady = without_burst(plan)
    assert [p.kind for p in steady] == [STEADY] * len(steady)
    assert sum(p.kind == BURST for p in plan) == Scenario().burst_count
    # The burst's seeded stream is apart from the steady one: fewer bursts, the same steady requests.
    assert [(p.due_s, p.body) for p in without_burst(build_plan(Scenario(burst_count=2)))] == \
        [(p.due_s, p.body) for p in steady]


def test_catalog_sizes_the_engine_as_the_issue_asks_and_takes_extra_fields() -> None:
    plan = build_plan(Scenario())
    model = parse_catalog(catalog(plan, {"sim": {"seed": 7}})).models[0]
    assert model.kv.budget_per_endpoint // (model.kv_bytes_per_token * model.block_tokens) == 512
    assert model.max_output_tokens >= 4000 and model.sim.seed == 7 and model.sim.itl_ms == 10
    # The calibrated estimate stays an upper bound on the simulator's count.
    assert all(p.content_bytes_per_token >= model.prompt_estimate.bytes_per_token for p in plan)


def test_shedding_follows_the_saturation_detector_rules() -> None:
    t = Thresholds()
    fresh = EngineState(kv_utilization=0.5, waiting=0, scraped_at=10.0)
    assert saturation(fresh, 10.1, t) is None
    assert saturation(fresh, 10.3, t) == "shed_stale_metrics"
    assert saturation(EngineState(0.8, 0, 10.0), 10.0, t) == "shed_kv_utilization"
    assert saturation(EngineState(0.1, 5, 10.0), 10.0, t) == "shed_queue_depth"
    assert saturation(EngineState(), 0.0, t) == "shed_stale_metrics"


def test_shedding_envoy_differs_from_the_baseline_only_by_the_ext_proc_filter() -> None:
    base = {"static_resources": {
        "listeners": [{"filter_chains": [{"filters": [{"typed_config": {"http_filters": [{"name": "router"}]}}]}]}],
        "clusters": [{"name": "engine"}]}}
    config = yaml.safe_load(with_ext_proc(yaml.safe_dump(base), Address(host="127.0.0.1", port=9)))
    filters = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert [f["name"] for f in filters["http_filters"]] == ["envoy.filters.http.ext_proc", "router"]
    assert [c["name"] for c in config["static_resources"]["clusters"]] == ["engine", "kvgate_ext_proc"]


def test_args() -> None:
    assert parse_args([]).setups == ["envoy", "shedding", "kvgate", "kvgate-noburst", "envoy-noburst"]
    assert parse_args(["--quick"]).setups == QUICK_SETUPS
    assert parse_args(["--burst-header", "x-kvgate-priority=low"]).burst_header == [("x-kvgate-priority", "low")]
    with pytest.raises(SystemExit):
        parse_args(["--setups", "kvgate,nginx"])
    with pytest.raises(SystemExit):
        parse_args(["--kvgate-catalog-extra", "[1]"])


def test_the_vllm_catalog_gives_the_engine_the_scenarios_cache(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "num_attention_heads": 4,
                                                      "num_key_value_heads": 2, "hidden_size": 128, "head_dim": 32,
                                                      "torch_dtype": "bfloat16"}))
    (tmp_path / "tokenizer.json").write_text("{}")
    model = parse_catalog(vllm_catalog(tmp_path, VLLM_SEED, {"long_requests": {"max_share": 0.4}})).models[0]
    assert model.engine == "vllm" and model.kv_bytes_per_token == 512
    assert model.kv_budget_bytes // (512 * model.block_tokens) == VLLM_BLOCKS
    assert model.max_output_tokens >= VLLM_SEED.burst_output_tokens and model.long_requests.max_share == 0.4


def test_engine_metrics_select_labels() -> None:
    text = """# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 3.0
vllm:num_requests_waiting_by_reason{engine="0",reason="deferred"} 2.0
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{engine="0"} 7.0
vllm:num_preemptions_created{engine="0"} 1.7e+09
"""
    assert parse(text, [VLLM_METRICS.capacity_waiting, VLLM_METRICS.exhaustion, "vllm:num_requests_waiting_by_reason"]) \
        == {VLLM_METRICS.capacity_waiting: 3.0, VLLM_METRICS.exhaustion: 7.0, "vllm:num_requests_waiting_by_reason": 5.0}
