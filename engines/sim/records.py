"""The received requests the simulator keeps for tests (served at /sim/requests)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

Record = dict[str, Any]
Records = deque[Record]


def new_records(limit: int) -> Records:
    """A bounded log: once full, the oldest record makes room for the newest."""
    return deque(maxlen=limit)


def record(records: Records, path: str, headers: Iterable[tuple[str, Any]], body: Any) -> None:
    """Appends `{"path", "headers", "body"}`; header names are lower-cased, and
    values that are not text (gRPC `-bin` metadata) are left out."""
    records.append(
        {
            "path": path,
            "headers": {k.lower(): v for k, v in headers if isinstance(v, str)},
            "body": body,
        }
    )
