"""How many ext_proc workers a catalog's budgets allow (kvgate/cli/workers.py)."""

from __future__ import annotations

from kvgate.catalog import parse_catalog
from kvgate.cli.workers import split_budget_errors


def catalog(budget: str, context: int = 2048) -> dict:
    return {"models": [
        {"name": "big", "endpoints": ["127.0.0.1:9000"], "max_context_tokens": context, "max_output_tokens": 64,
         "kv": {"bytes_per_token": 65536, "budget_per_endpoint": budget}},
        {"name": "small", "endpoints": ["127.0.0.1:9001"], "max_context_tokens": 256, "max_output_tokens": 64,
         "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "1GiB"}}]}


def test_workers_are_allowed_while_each_share_holds_one_full_context_request() -> None:
    cat = parse_catalog(catalog("384MiB"))  # three full-context requests of 128 MiB
    assert split_budget_errors(cat, 1) == split_budget_errors(cat, 3) == []
    (error,) = split_budget_errors(cat, 4)
    assert error.startswith("model 'big': one max_context_tokens request reserves 134217728 B")
    assert "1/4 of its KV budget per endpoint (402653184 B)" in error and error.endswith("at most 3 workers can each hold one")


def test_whole_blocks_count() -> None:
    # 2,050 tokens are 129 blocks of 16: a budget of exactly two 2,050-token requests by tokens is not two by blocks.
    cat = parse_catalog(catalog(str(2 * 2050 * 65536), context=2050))
    assert split_budget_errors(cat, 1) == []
    assert split_budget_errors(cat, 2)[0].endswith("at most 1 worker can each hold one")
