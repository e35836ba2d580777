"""The status page's data (`/status.json`): the catalog and the connected nodes, as the control plane
knows them, merged with what each ext_proc replica reports about its ledgers (ext_proc/status.py).
Pure: status_page.py fetches the replicas' reports and serves what this returns.

Each replica holds its share of every endpoint's budget, so an endpoint's numbers are sums over the
replicas; it is down when any replica sees its engine metrics stale (that replica counts it full).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kvgate.catalog import Catalog, Model
from kvgate.wire import STATUS_URL_KEY

# Newest first, across replicas: about one screen.
REFUSALS_SHOWN = 50

UP, DOWN, UNKNOWN = "up", "down", "unknown"


def status_url_of(metadata: Mapping[str, Any]) -> str | None:
    """STATUS_URL_KEY of a node's metadata, when it is an HTTP URL (the control plane fetches it)."""
    url = metadata.get(STATUS_URL_KEY)
    return url if isinstance(url, str) and url.startswith(("http://", "https://")) else None


@dataclass(frozen=True)
class ReplicaReport:
    """One replica's /status.json as fetched, or why it could not be."""

    node_id: str
    url: str
    status: Mapping[str, Any] | None
    error: str | None = None


def _endpoint_status(address: str, budget: int, priority: int,
                     ledgers: list[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """One endpoint: its ledger in every replica that reported one, summed."""
    blind = sorted(node for node, lg in ledgers if lg.get("blind"))
    health = UNKNOWN if not ledgers else DOWN if blind else UP

    def total(key: str) -> int:
        return sum(int(lg.get(key, 0)) for _, lg in ledgers)

    return {"address": address, "priority": priority, "budget_bytes": budget, "health": health,
            "reserved_bytes": total("reserved"), "capacity_bytes": total("capacity"),
            "excess_bytes": total("excess"), "reservations": total("active"),
            "replicas": len(ledgers), "blind_replicas": blind}


def _model_status(model: Model, ledgers: Mapping[tuple[str, str], list[tuple[str, Mapping[str, Any]]]],
                  waiting: int) -> dict[str, Any]:
    return {"name": model.name, "protocol": model.protocol, "max_context_tokens": model.max_context_tokens,
            "max_output_tokens": model.max_output_tokens, "waiting": waiting,
            "endpoints": [_endpoint_status(str(a), model.kv_budget_bytes, a.priority,
                                           ledgers.get((model.name, str(a)), []))
                          for a in model.addresses()]}


def _replica_summary(r: ReplicaReport) -> dict[str, Any]:
    s = r.status or {}
    return {"node_id": r.node_id, "url": r.url, "ok": r.status is not None, "error": r.error,
            "share": s.get("share"), "time": s.get("time")}


def model_statuses(catalog: Catalog, reports: Iterable[ReplicaReport]) -> list[dict[str, Any]]:
    """Every catalog model with its endpoints' ledgers summed over the replicas that reported."""
    ledgers: dict[tuple[str, str], list[tuple[str, Mapping[str, Any]]]] = {}
    waiting: dict[str, int] = {}
    for r in reports:
        if r.status is None:
            continue
        for lg in r.status.get("ledgers", []):
            ledgers.setdefault((lg.get("model"), lg.get("endpoint")), []).append((r.node_id, lg))
        for model, n in r.status.get("queues", {}).items():
            waiting[model] = waiting.get(model, 0) + int(n)
    return [_model_status(m, ledgers, waiting.get(m.name, 0)) for m in catalog.models]


def aggregate(catalog: Catalog, fleet: Mapping[str, Any], reports: Iterable[ReplicaReport],
              now: float) -> dict[str, Any]:
    """The status page's JSON. `fleet` is GetStatus (admin.fleet_status) as a dict: `version` and
    `nodes`. A replica that could not be fetched is listed with its error and counts nowhere else."""
    reports = list(reports)
    refusals = [{**r, "replica": rep.node_id} for rep in reports if rep.status is not None
                for r in rep.status.get("refusals", [])]
    refusals.sort(key=lambda r: r.get("time", 0.0), reverse=True)
    return {"time": now, "version": fleet.get("version", ""),
            "models": model_statuses(catalog, reports),
            "refusals": refusals[:REFUSALS_SHOWN],
            "replicas": sorted((_replica_summary(r) for r in reports), key=lambda r: r["node_id"]),
            "nodes": list(fleet.get("nodes", []))}
