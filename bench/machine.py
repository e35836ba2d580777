"""What a benchmark ran on: numbers from a shared, noisy machine mean little without it."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path


@dataclass(frozen=True)
class Machine:
    date: str
    nproc: int
    cpu_model: str
    memory_gib: float
    python: str
    envoy: str


def _cpuinfo_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)  # the kernel counts kB
    return 0.0


def _envoy_version(binary: str) -> str:
    # "<path>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL": keep what follows "version:".
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    return out.partition("version:")[2].strip() or "unknown"


def describe(envoy_binary: str) -> Machine:
    return Machine(
        date=datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
        # The cores this process may use, as `nproc` counts them.
        nproc=len(os.sched_getaffinity(0)),
        cpu_model=_cpuinfo_model(),
        memory_gib=_memory_gib(),
        python=platform.python_version(),
        envoy=_envoy_version(envoy_binary),
    )
