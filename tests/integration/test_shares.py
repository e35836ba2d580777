"""Budget shares across real ext_proc processes: two replicas hold half of every budget each, a killed
one's half goes to the other at once, and a third one joins without the replicas ever holding more
than the whole between them (make before break)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvgate.cli import admin_client
from kvgate.catalog import parse_catalog
from kvgate.cli.gateway import Gateway
from kvgate.cli.processes import free_port
from tests.integration.conftest import ALPHA, start_gateway, wait_for
from kvgate.wire import BUDGET_SHARES_TYPE_URL, EXT_PROC_GROUP

BUDGET = 256 * 2**20  # ALPHA's one endpoint
# One client, its connections kept: sampling must be fast to catch a moment that is milliseconds long.
HTTP = httpx.Client(timeout=1.0)


def share(metrics_port: int) -> float:
    """The replica's part of alpha's budget, from its ledgers; 0 while it has none (or no metrics
    yet: it subscribes only after serving them)."""
    try:
        text = HTTP.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    except httpx.HTTPError:
        return 0.0
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "kvgate_kv_budget_bytes" and s.labels.get("model") == "alpha") / BUDGET


def published_shares(gw: Gateway) -> list[dict[str, float]]:
    lines = (gw.run_dir / "xds_server.log").read_text().splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    return [e["shares"] for e in events if e.get("event") == "shares.published"]


def start_replica(gw: Gateway, node_id: str) -> int:
    """Another ext_proc process, started as Gateway starts its own; returns its metrics port."""
    metrics_port = free_port()
    gw.supervisor.start(node_id, [sys.executable, "-m", "ext_proc", "--port", str(free_port()),
                                  "--xds", gw.admin_address, "--node-id", node_id,
                                  "--metrics-port", str(metrics_port)])
    return metrics_port


def test_replicas_share_the_budget_and_divide_it_again_as_they_come_and_go(tmp_path: Path) -> None:
    gw = start_gateway(parse_catalog({"models": [ALPHA]}), tmp_path, extra_ext_procs=1)
    try:
        (_, first), (_, second) = gw.ext_procs
        wait_for(lambda: (share(first), share(second)) == (0.5, 0.5), "half each")

        gw.supervisor.get("ext_proc-1").proc.kill()
        killed_at = time.monotonic()
        wait_for(lambda: share(first) == 1.0, "the survivor holds it all", timeout_s=2.0)
        assert time.monotonic() - killed_at < 2.0

        third = start_replica(gw, "ext-proc-2")
        sums: list[float] = []
        deadline = time.monotonic() + 15
        while (now := (share(third), share(first))) != (0.5, 0.5):
            # The newcomer is read first: its share only goes up and the survivor's only down, so
            # the survivor read later holds at most what it held then. A sum above 1 here was one.
            sums.append(sum(now))
            assert sums[-1] <= 1.0, f"the replicas held {now} of the budget"
            assert time.monotonic() < deadline, f"never half each; last {now}"
        assert len(sums) > 20  # sampled while it happened

        # The control plane lowered the survivor before it gave the newcomer anything.
        assert published_shares(gw)[-2:] == [{"ext-proc-0": 0.5, "ext-proc-2": 0.0},
                                             {"ext-proc-0": 0.5, "ext-proc-2": 0.5}]
        nodes = {n.id: n for n in admin_client.status(gw.admin_address).nodes if n.group == EXT_PROC_GROUP}
        assert nodes.keys() == {"ext-proc-0", "ext-proc-2"}
        assert len({n.acked_versions[BUDGET_SHARES_TYPE_URL] for n in nodes.values()}) == 1
    finally:
        gw.stop()
