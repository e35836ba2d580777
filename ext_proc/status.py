"""What one ext_proc replica shows the status page (its `/status.json`, beside `/metrics`): ledgers,
wait queues, its budget share, its recent refusals and how many requests it admitted and refused, as
plain JSON-able data.

The live KV numbers exist only in the replicas; the control plane fetches this from each of them and
merges it (xds_server/status.py). Pure apart from the wall clock a refusal is stamped with.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ext_proc.admission import Refusal
from ext_proc.ledger import Ledger, Ledgers

# Enough to see what just went wrong; the page shows the newest first.
REFUSALS_KEPT = 50
# Some messages quote what the client sent (an unknown URL): a status page needs the gist, not all of it.
MESSAGE_CHARS = 240


@dataclass(frozen=True)
class RefusalRecord:
    time: float  # Unix seconds, not monotonic: the control plane merges several replicas' refusals by time
    model: str  # "" when the request named no known model (unknown URL, unknown model)
    status: int
    code: str
    message: str
    request_id: str | None


class RecentRefusals:
    """The last `keep` refusals of this replica, oldest first; older ones fall off."""

    def __init__(self, keep: int = REFUSALS_KEPT, clock: Callable[[], float] = time.time):
        self._items: deque[RefusalRecord] = deque(maxlen=keep)
        self._clock = clock

    def record(self, model: str, refusal: Refusal, request_id: str | None) -> None:
        self._items.append(RefusalRecord(self._clock(), model, refusal.status, refusal.code,
                                         refusal.message[:MESSAGE_CHARS], request_id))

    def __iter__(self) -> Iterator[RefusalRecord]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)


def ledger_status(ledger: Ledger) -> dict[str, Any]:
    return {"model": ledger.model, "endpoint": ledger.endpoint, "reserved": ledger.reserved,
            "capacity": ledger.capacity, "budget": ledger.budget, "excess": ledger.excess,
            "blind": ledger.blind, "active": ledger.active}


def replica_status(node_id: str, ledgers: Ledgers, queue_lengths: Mapping[str, int],
                   refusals: Iterable[RefusalRecord], decisions: Mapping[str, Mapping[str, int]],
                   now: float) -> dict[str, Any]:
    """This replica's `/status.json`; `decisions` as metrics.Decisions.totals gives them."""
    return {"node_id": node_id, "time": now, "share": ledgers.share,
            "ledgers": [ledger_status(lg) for lg in ledgers.all()],
            "queues": dict(sorted(queue_lengths.items())),
            "refusals": [asdict(r) for r in refusals],
            "decisions": dict(decisions)}
