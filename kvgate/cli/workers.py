"""How many ext_proc processes `kvgate up` runs (`--ext-proc-workers`), and what that costs.

Every ext_proc process is one replica of the control plane's fleet: Envoy spreads requests over them
(least-request over their ports, one gRPC stream per request), and each admits from its share, 1/N,
of every endpoint's KV budget (xds_server/shares.py), so that together they never hand out more than
the budget. A request must fit one share: N processes shrink the largest request the gateway can admit
to budget / N. `kvgate up` refuses a number of workers under which some model's full-context request
no longer fits, rather than turn those requests into request_too_large at run time.

More workers only pay where there are cores for them: on 2 cores, Envoy and one ext_proc already use
both under load (docs/benchmarks.md, "More ext_proc processes"), hence the default of one.
"""

from __future__ import annotations

from kvgate.catalog import Catalog

DEFAULT_WORKERS = 1


def split_budget_errors(catalog: Catalog, workers: int) -> list[str]:
    """One line per model whose full-context request would not fit 1/workers of its endpoint budget
    (as the catalog gives it; a budget an engine reports later is not known here)."""
    out = []
    for m in catalog.models:
        share = m.kv_budget_bytes // workers
        if share < m.full_context_bytes:
            fits = m.kv_budget_bytes // m.full_context_bytes
            out.append(f"model {m.name!r}: one max_context_tokens request reserves {m.full_context_bytes} B, "
                       f"more than 1/{workers} of its KV budget per endpoint ({m.kv_budget_bytes} B); "
                       f"at most {fits} worker{'s' if fits != 1 else ''} can each hold one")
    return out
