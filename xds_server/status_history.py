"""The status page's charts: KV in use per endpoint and admissions per model over the last minutes.

The control plane samples its ext_proc replicas every SAMPLE_INTERVAL_S (status_page.py) and keeps the
last WINDOW_S of samples here, in memory and bounded: the page gets the history from the control plane
and loses nothing on reload, while a restarted control plane starts a fresh one (a status page needs no
durable history; Prometheus has that). Pure: samples come in with their time.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kvgate.catalog import Catalog
from xds_server.status import ReplicaReport

SAMPLE_INTERVAL_S = 5.0
# Long enough to see a burst and what followed it; 120 points a line, drawn as they are.
WINDOW_S = 600.0
# Fractions to 0.01 %: finer is noise on a chart, and the JSON stays small with many endpoints.
FRACTION_DIGITS = 4


@dataclass(frozen=True)
class KvUse:
    """One endpoint (its KV pool's totals) at one sample, as fractions of the capacity the replicas hold."""

    reserved: float
    used: float  # reserved plus the engine's use the reservations do not explain: what admission counts


@dataclass(frozen=True)
class Sample:
    time: float  # Unix seconds
    kv: Mapping[tuple[str, str], KvUse]  # (model, endpoint); absent when no replica reported it
    admitted: Mapping[str, int]  # model -> requests since the previous sample
    refused: Mapping[str, int]


def kv_use(models: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], KvUse]:
    """KV use of every endpoint some replica reported with a capacity, from status.model_statuses."""
    out: dict[tuple[str, str], KvUse] = {}
    for model in models:
        for ep in model["endpoints"]:
            capacity = ep["capacity_bytes"]
            if ep["replicas"] and capacity > 0:
                out[(model["name"], ep["address"])] = KvUse(
                    round(ep["reserved_bytes"] / capacity, FRACTION_DIGITS),
                    round((ep["reserved_bytes"] + ep["excess_bytes"]) / capacity, FRACTION_DIGITS))
    return out


def _increase(now: int, before: int) -> int:
    # Lower than before: the replica restarted under the same node id and counts from zero again.
    return now - before if now >= before else now


class DecisionDeltas:
    """Each replica's admitted and refused totals (`decisions` in its /status.json, from ext_proc/metrics.py
    Decisions.totals) turned into what happened since the previous sample, per model, summed over the
    replicas. Differences are taken per replica: a replica leaving must not make the fleet's sum go
    backwards."""

    def __init__(self) -> None:
        self._last: dict[str, Mapping[str, Mapping[str, int]]] = {}  # node id -> model -> totals

    def step(self, reports: Iterable[ReplicaReport]) -> tuple[dict[str, int], dict[str, int]]:
        """(admitted, refused) per model since the last step. A replica seen for the first time only sets
        its baseline (its totals so far are not this interval's); one that did not answer keeps its last
        totals, so its requests show in the interval it answers again."""
        admitted: dict[str, int] = {}
        refused: dict[str, int] = {}
        connected = set()
        for report in reports:
            connected.add(report.node_id)
            totals = (report.status or {}).get("decisions")
            if not isinstance(totals, Mapping):
                continue
            before = self._last.get(report.node_id)
            self._last[report.node_id] = totals
            if before is None:
                continue
            for model, counts in totals.items():
                then = before.get(model, {})
                for key, into in (("admitted", admitted), ("refused", refused)):
                    into[model] = into.get(model, 0) + _increase(int(counts.get(key, 0)), int(then.get(key, 0)))
        for gone in self._last.keys() - connected:  # bounded by the replicas connected now
            del self._last[gone]
        return admitted, refused


class History:
    """The last `window_s` of samples, oldest first: a ring of at most window_s / interval_s + 1."""

    def __init__(self, window_s: float = WINDOW_S, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.window_s = window_s
        self.interval_s = interval_s
        self._samples: deque[Sample] = deque(maxlen=math.ceil(window_s / interval_s) + 1)

    def add(self, sample: Sample) -> None:
        self._samples.append(sample)
        # Samples late by a slow fetch do not stretch the window past window_s.
        while self._samples[0].time < sample.time - self.window_s:
            self._samples.popleft()

    def __len__(self) -> int:
        return len(self._samples)

    def to_json(self, catalog: Catalog) -> dict[str, Any]:
        """`/history.json`: the sample times, and per model of the catalog (in its order) one value per
        time: requests admitted and refused in the interval ending then, and per endpoint the KV
        reserved and used as fractions of capacity (null where no replica reported the endpoint)."""
        samples = list(self._samples)

        def kv(model: str, address: str, field: str) -> list[float | None]:
            return [getattr(u, field) if (u := s.kv.get((model, address))) else None for s in samples]

        return {"interval_s": self.interval_s, "window_s": self.window_s,
                "times": [s.time for s in samples],
                "models": [{"name": m.name,
                            "admitted": [s.admitted.get(m.name, 0) for s in samples],
                            "refused": [s.refused.get(m.name, 0) for s in samples],
                            "endpoints": [{"address": str(a), "reserved": kv(m.name, str(a), "reserved"),
                                           "used": kv(m.name, str(a), "used")} for a in m.addresses()]}
                           for m in catalog.models]}
