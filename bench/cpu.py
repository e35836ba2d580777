"""CPU time of processes, from /proc: what a request costs each part, whoever is waiting on whom."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
SELF = 0  # stands for this process, measured with time.process_time (finer than clock ticks)


def cpu_seconds(pid: int) -> float:
    """User + system time of every thread of `pid`."""
    if pid == SELF:
        return time.process_time()
    # The command name (field 2) may hold spaces; the fields after its closing paren are fixed.
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / _TICKS_PER_S


def snapshot(pids: Mapping[str, int]) -> dict[str, float]:
    return {role: cpu_seconds(pid) for role, pid in pids.items()}


def spent(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    return {role: after[role] - before[role] for role in before}
