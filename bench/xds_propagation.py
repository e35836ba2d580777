"""Propagation: how long a catalog change made through the admin API takes to show in the data path of
every Envoy of one real gateway (N Envoys, each its own node group and listener, + xds_server +
ext_proc + a simulated engine).

While the admin call runs (in a thread), one probe thread per Envoy sends one tiny completion at a time
through its Envoy, starting one at most every `poll_s`, until the answer shows the change and then
`confirm` more answers do too. The change is seen when the last Envoy shows it. Three kinds of change,
interleaved (add, clamp, remove, clamp, ...):

- add: a second model `beta` (pointing at `alpha`'s engine, `backend_model: alpha`): old state 404,
  new 200. Needs Envoy's new cluster and route AND ext_proc's new policy.
- remove: `beta` again: old 200, new 404. Either Envoy or ext_proc alone makes it 404.
- clamp: `alpha`'s max_output_tokens between two values: the x-kvgate-max-tokens response header
  shows it. Only ext_proc's ModelPolicy changes; Envoy is sent nothing.
"""

from __future__ import annotations

import http.client
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.xds_report import ChangeKind, Propagation, Stats
from kvgate.cli import admin_client
from kvgate.catalog import parse_catalog
from kvgate.cli.gateway import Gateway
from kvgate.wire import MAX_TOKENS_HEADER
from kvgate.cli.processes import free_port

BASE, ADDED = "alpha", "beta"
CLAMPS = (7, 8)  # alpha's max_output_tokens, alternating
PROBE_MAX_TOKENS = 16  # above both clamps, so the header shows the clamp
BASE_MODEL = {"name": BASE, "endpoints": ["sim"], "max_context_tokens": 2048, "max_output_tokens": CLAMPS[0],
              "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "16GiB"},
              "sim": {"ttft_base_ms": 0, "ttft_per_token_ms": 0, "itl_ms": 0, "batch_slowdown": 0}}
DESCRIPTIONS = {
    "add": f"apply_models adds `{ADDED}`; new state: HTTP 200 for `{ADDED}` (was 404)",
    "remove": f"remove_model `{ADDED}`; new state: HTTP 404 (was 200)",
    "clamp": f"apply_models changes `{BASE}`'s max_output_tokens ({CLAMPS[0]} <-> {CLAMPS[1]}); new state: "
             f"{MAX_TOKENS_HEADER} shows the new value",
}
TIMEOUT_S = 10.0
PAUSE_S = 0.1  # between changes, so each starts on a quiet gateway


class Prober:
    """POST /v1/completions over one keep-alive HTTP/1.1 connection: (status, x-kvgate-max-tokens)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.conn: http.client.HTTPConnection | None = None

    def __call__(self, model: str) -> tuple[int, str | None]:
        body = json.dumps({"model": model, "prompt": "hi", "max_tokens": PROBE_MAX_TOKENS})
        for attempt in (1, 2):  # one retry on a fresh connection: the old one may have been closed
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
            try:
                self.conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
                resp = self.conn.getresponse()
                resp.read()
                return resp.status, resp.getheader(MAX_TOKENS_HEADER)
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
        return 0, None

    def close(self) -> None:
        if self.conn:
            self.conn.close()


@dataclass
class Sample:
    kind: str
    observed_s: float = float("nan")  # the last Envoy to show the change
    envoy0_s: float = float("nan")  # the first Envoy (the gateway's own listener)
    before_s: float = 0.0
    admin_s: float = float("nan")
    other: Counter[str] = field(default_factory=Counter)
    flaps: int = 0
    error: str | None = None


@dataclass
class Probing:
    gaps_s: list[float] = field(default_factory=list)
    rtts_s: list[float] = field(default_factory=list)


def measure_change(kind: str, change: Callable[[], Any], model: str, probes: Sequence[Prober],
                   state: Callable[[int, str | None], str], poll_s: float, confirm: int, probing: Probing,
                   pool: ThreadPoolExecutor) -> Sample:
    """Run `change` while every Envoy is probed in its own thread; the change is seen when the last
    Envoy shows it. `state` names an answer "old", "new" or anything else (counted, not the new state).
    `pool` needs a worker for the admin call and one per probe."""
    def timed() -> float:
        start = time.monotonic()
        change()
        return time.monotonic() - start

    t0 = time.monotonic()
    admin = pool.submit(timed)
    per_envoy = list(pool.map(lambda p: _watch(kind, lambda: p(model), state, t0, admin, poll_s, confirm, probing),
                              probes))
    first = per_envoy[0]
    return Sample(kind, observed_s=max(s.observed_s for s in per_envoy), envoy0_s=first.observed_s,
                  before_s=max(s.before_s for s in per_envoy), admin_s=first.admin_s,
                  other=sum((s.other for s in per_envoy), Counter()), flaps=sum(s.flaps for s in per_envoy),
                  error=next((f"envoy-{i}: {s.error}" for i, s in enumerate(per_envoy) if s.error), None))


def _watch(kind: str, probe: Callable[[], tuple[int, str | None]], state: Callable[[int, str | None], str],
           t0: float, admin: Future[float], poll_s: float, confirm: int, probing: Probing) -> Sample:
    """Probe one Envoy from `t0` until it shows the new state and `confirm` more answers agree."""
    sample = Sample(kind)
    first_new, seen_new, last_send = None, 0, None
    while True:
        sent = time.monotonic()
        if last_send is not None:
            probing.gaps_s.append(sent - last_send)
        last_send = sent
        status, header = probe()
        received = time.monotonic()
        probing.rtts_s.append(received - sent)
        answer = state(status, header)
        if answer == "new":
            if first_new is None:
                first_new = received
            seen_new += 1
        else:
            if first_new is not None:
                sample.flaps += 1
                first_new, seen_new = None, 0
            sample.before_s = sent - t0
            if answer != "old":
                sample.other[answer] += 1
        if seen_new > confirm and admin.done():
            break
        if received - t0 > TIMEOUT_S:
            sample.error = f"{kind}: no stable new state after {TIMEOUT_S:g} s (last answer: {answer})"
            break
        time.sleep(max(0.0, sent + poll_s - time.monotonic()))
    try:
        sample.admin_s = admin.result(timeout=TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - any failure of the admin call is the benchmark's error
        sample.error = f"{kind}: admin call failed: {e}"
    if first_new is not None and sample.error is None:
        sample.observed_s = first_new - t0
    return sample


def _http_state(want_new: int, want_old: int) -> Callable[[int, str | None], str]:
    return lambda status, _: "new" if status == want_new else "old" if status == want_old else f"HTTP {status}"


def _clamp_state(new: int, old: int) -> Callable[[int, str | None], str]:
    def state(status: int, header: str | None) -> str:
        if status != 200:
            return f"HTTP {status}"
        return "new" if header == str(new) else "old" if header == str(old) else f"header {header}"
    return state


def run(run_dir: Path, changes: int, poll_s: float, envoys: int = 1, confirm: int = 5,
        progress: Callable[[str], None] = lambda _: None) -> Propagation:
    gw = Gateway(parse_catalog({"models": [BASE_MODEL]}), run_dir=run_dir, port=free_port(), extra_envoys=envoys - 1)
    gw.start()
    probes = [Prober(e.host, e.port) for e in gw.envoys]
    samples: list[Sample] = []
    probing = Probing()
    try:
        server = gw.admin_address
        base = next(m for m in yaml.safe_load(admin_client.list_models(server).catalog_yaml)["models"]
                    if m["name"] == BASE)
        added = {**{k: v for k, v in base.items() if k != "sim"}, "name": ADDED, "backend_model": BASE}
        clamp = CLAMPS[0]
        with ThreadPoolExecutor(1 + len(probes)) as pool:
            for i in range(changes):
                if i % 2 == 0:
                    s = measure_change("add", lambda: admin_client.apply_models(server, yaml.safe_dump([added])),
                                       ADDED, probes, _http_state(200, 404), poll_s, confirm, probing, pool)
                else:
                    s = measure_change("remove", lambda: admin_client.remove_model(server, ADDED),
                                       ADDED, probes, _http_state(404, 200), poll_s, confirm, probing, pool)
                samples.append(s)
                time.sleep(PAUSE_S)
                old, clamp = clamp, CLAMPS[1] if clamp == CLAMPS[0] else CLAMPS[0]
                changed = {**base, "max_output_tokens": clamp}
                samples.append(measure_change(
                    "clamp", lambda: admin_client.apply_models(server, yaml.safe_dump([changed])),
                    BASE, probes, _clamp_state(clamp, old), poll_s, confirm, probing, pool))
                time.sleep(PAUSE_S)
                progress(f"propagation {i + 1}/{changes}: {s.kind} {1000 * s.observed_s:.1f} ms, "
                         f"clamp {1000 * samples[-1].observed_s:.1f} ms")
                if s.error or samples[-1].error:
                    break  # the gateway is in an unknown state: stop here, report what was measured
    finally:
        for probe in probes:
            probe.close()
        gw.stop()
    return summarize(samples, poll_s, len(probes), probing)


def summarize(samples: list[Sample], poll_s: float, envoys: int, probing: Probing) -> Propagation:
    kinds = []
    for kind in ("add", "remove", "clamp"):
        of_kind = [s for s in samples if s.kind == kind]
        ok = [s for s in of_kind if s.error is None]
        other: Counter[str] = sum((s.other for s in of_kind), Counter())
        kinds.append(ChangeKind(kind=kind, description=DESCRIPTIONS[kind],
                                observed=Stats.of([s.observed_s for s in ok]),
                                envoy0=Stats.of([s.envoy0_s for s in ok]),
                                before=Stats.of([s.before_s for s in ok]),
                                admin=Stats.of([s.admin_s for s in ok]),
                                after_admin=Stats.of([s.observed_s - s.admin_s for s in ok]), other_answers=dict(other),
                                flaps=sum(s.flaps for s in of_kind), errors=sum(s.error is not None for s in of_kind)))
    return Propagation(envoys=envoys, poll_ms=1000 * poll_s, probe_gap=Stats.of(probing.gaps_s),
                       probe_rtt=Stats.of(probing.rtts_s),
                       kinds=kinds, all_changes=Stats.of([s.observed_s for s in samples if s.error is None]),
                       errors=[s.error for s in samples if s.error])
