"""wrk (Debian's `wrk`, a C load generator) driven from Python: a closed loop of POSTs at a fixed
number of connections. A Python load generator on two cores costs more CPU than the gateway it
measures; wrk costs a few microseconds a request, so the floor under kvgate's overhead shows."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

# wrk calls done() once at the end: one line the parser below reads, whatever else wrk prints.
_SCRIPT = """
wrk.method = "POST"
local f = io.open(os.getenv("KVGATE_WRK_BODY"), "rb")
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("KVGATE_WRK %d %d %d %d %.1f %.1f %.1f %.1f\\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean))
end
"""


class WrkMissing(RuntimeError):
    pass


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    socket_errors: int  # connect, read, write errors and timeouts
    non_2xx: int  # answers with a status outside 200-399
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float

    @property
    def throughput_rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def errors(self) -> int:
        return self.socket_errors + self.non_2xx


def parse(output: str) -> WrkResult:
    for line in output.splitlines():
        if line.startswith("KVGATE_WRK "):
            requests, duration_us, socket_errors, non_2xx, p50, p90, p99, mean = line.split()[1:]
            return WrkResult(int(requests), int(duration_us) / 1e6, int(socket_errors), int(non_2xx),
                             float(p50) / 1000, float(p90) / 1000, float(p99) / 1000, float(mean) / 1000)
    raise ValueError(f"no result line in wrk's output:\n{output}")


def run(url: str, body: bytes, connections: int, duration_s: int, threads: int = 1) -> WrkResult:
    """POST `body` to `url` over `connections` connections for `duration_s` seconds (wrk takes whole ones)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise WrkMissing("wrk is not installed (Debian: apt-get install wrk)")
    with tempfile.TemporaryDirectory(prefix="kvgate-wrk-") as tmp:
        script, body_file = Path(tmp) / "post.lua", Path(tmp) / "body"
        script.write_text(_SCRIPT)
        body_file.write_bytes(body)
        out = subprocess.run([wrk, f"-t{min(threads, connections)}", f"-c{connections}", f"-d{duration_s}s",
                              "--timeout", "10s", "-s", str(script), url],
                             capture_output=True, text=True, check=True, env={"KVGATE_WRK_BODY": str(body_file)},
                             timeout=duration_s + 30)
    return parse(out.stdout)
