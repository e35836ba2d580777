"""Budget shares: the fraction of every endpoint's KV budget each ext_proc replica may hand out, so that
N replicas together never admit more than the engine holds. Pure: control.py's ShareKeeper publishes
what this computes and waits for the ACKs between steps.

The resource (proto/kvgate/v1/policy.proto BudgetShares) maps node ids to fractions. A replica not
listed holds nothing. An empty map means "not divided yet": a replica keeps what it holds. That is
what a control plane serves until its first division, so one restarted under load does not take
every replica's budget away while they reconnect (ShareKeeper never publishes an empty map).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kvgate.wire import HELD_SHARE_KEY

Shares = dict[str, float]  # node id -> fraction of every endpoint's budget


@dataclass(frozen=True)
class Member:
    """One connected ext_proc stream."""

    node_id: str
    reported: float  # the share it said it held when it connected


def reported_share(metadata: Mapping[str, Any]) -> float:
    """HELD_SHARE_KEY of a node's metadata; a node that does not say holds nothing (a fresh start)."""
    value = metadata.get(HELD_SHARE_KEY, 0.0)
    return min(1.0, max(0.0, float(value))) if isinstance(value, int | float) else 0.0


def equal_shares(node_ids: Iterable[str]) -> Shares:
    """1/N each for N streams. Two processes with one node id share one entry and both apply it, so
    counting streams, not ids, keeps the sum over processes at most 1."""
    ids = list(node_ids)
    return {n: 1.0 / len(ids) for n in ids}


def duplicate_ids(node_ids: Iterable[str]) -> list[str]:
    return sorted(n for n, count in Counter(node_ids).items() if count > 1)


def held(members: Iterable[Member], published: Mapping[str, float] | None) -> Shares:
    """What each connected replica may hold: its entry in what this control plane published last
    (replicas apply every response, and each step is ACKed before the next), or, before the first
    division, what it reported. A replica that left holds nothing: its share is free at once."""
    out: Shares = {}
    for m in members:
        value = m.reported if published is None else published.get(m.node_id, 0.0)
        out[m.node_id] = max(out.get(m.node_id, 0.0), value)
    return out


def steps(holding: Mapping[str, float], target: Mapping[str, float]) -> list[Shares]:
    """The shares to publish in turn, each once every replica has ACKed the one before.

    When no replica's share goes down, the target at once: while the replicas move, each holds its
    old share or its new, larger one, so never more than the target's sum. Otherwise make before
    break: first the shares that go down do while the others stay where they are, and only once all
    replicas have that do the others go up (a joining replica goes from 0 to 1/N last)."""
    if all(target.get(n, 0.0) >= h for n, h in holding.items()):
        return [dict(target)]
    lowered = {n: min(holding.get(n, 0.0), f) for n, f in target.items()}
    return [lowered, dict(target)]


def all_holders_back(reported: Iterable[float]) -> bool:
    """Before a control plane's first division: whether the connected replicas hold the whole budget
    between them (every holder has reconnected after a restart) or nothing at all (a fresh start).
    Dividing earlier could give away a share that a replica still reconnecting holds."""
    values = list(reported)
    return bool(values) and (sum(values) >= 1.0 - 1e-9 or not any(values))
