"""A short, deterministic run of every fuzz target (tests/fuzz/targets.py): fixed seed, a few thousand
inputs each, a few seconds in all. Long runs: `python -m tests.fuzz` (tests/fuzz/__main__.py)."""

from __future__ import annotations

import pytest

from tests.fuzz import engine
from tests.fuzz.__main__ import TARGET_NAMES
from tests.fuzz.targets import TARGETS

RUNS = 1500


def test_the_runner_lists_every_target() -> None:
    assert sorted(TARGET_NAMES) == sorted(TARGETS)


@pytest.mark.parametrize("name", sorted(set(TARGETS) - {"grpc_frames", "headers"}))
def test_every_seed_is_accepted(name: str) -> None:
    """The corpus holds valid requests (the framing and header seeds hold refusals too): what the
    mutations start from reaches past the first refusal."""
    target = TARGETS[name]
    outcomes = [target.run(seed).split(" / ")[-1] for seed in engine.corpus(target.corpus)]
    assert outcomes and all(o == "parsed" for o in outcomes), outcomes


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_target_briefly(name: str) -> None:
    target = TARGETS[name]
    report = engine.run(target.run, name, engine.corpus(target.corpus), RUNS, seed=1)
    assert report.inputs == RUNS
    assert not report.crashes, [(data[:200], why) for data, why in report.crashes[:3]]
    assert not report.hangs, [(data[:200], took) for data, took in report.hangs[:3]]
