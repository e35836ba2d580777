"""Observability through the real gateway: Envoy's access log carries ext_proc's decision (dynamic
metadata, also on immediate responses) and the request id, ext_proc's JSON log carries the same id,
and the overhead histogram leaves out the time a request waited for KV budget."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvgate.cli.gateway import Gateway
from kvgate.wire import PRIORITY_HEADER
from tests.integration.conftest import reserved, wait_for

# On org/tiny (640 KiB) a 300-byte prompt with 128 output tokens reserves 27 blocks (442 KiB): two
# do not fit, and its engine takes about 3 s (25 ms a token) to answer one.
LONG = {"model": "org/tiny", "prompt": "a" * 300, "max_tokens": 128}


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a log file (ext_proc's log also holds the odd plain line from libraries)."""
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.startswith("{")]


def access_entries(gw: Gateway, *request_ids: str) -> dict[str, dict[str, Any]]:
    """The access log entry of each request id, waiting for Envoy's flush (every second here)."""
    found: dict[str, dict[str, Any]] = {}

    def all_logged() -> bool:
        found.update((e["request_id"], e) for e in json_lines(gw.access_log_path) if e["request_id"] in request_ids)
        return len(found) == len(request_ids)

    wait_for(all_logged, "the access log entries", timeout_s=15)
    return found


def metric(gw: Gateway, name: str, **labels: str) -> float:
    """A sample from ext_proc's /metrics, summed over the label values not given."""
    families = text_string_to_metric_families(httpx.get(gw.ext_proc_metrics_url).text)
    return sum(s.value for f in families for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


def test_the_access_log_carries_each_decision_and_its_request_id(gateway: Gateway) -> None:
    with httpx.Client(base_url=gateway.url, timeout=30) as c:
        admitted = c.post("/v1/completions", json={"model": "fast", "prompt": "hello", "max_tokens": 1000})
        too_long = c.post("/v1/completions", json={"model": "fast", "prompt": "x" * 5000, "max_tokens": 10})
        unknown = c.post("/v1/nothing", json={})
    assert (admitted.status_code, too_long.status_code, unknown.status_code) == (200, 400, 404)
    ids = [r.headers["x-request-id"] for r in (admitted, too_long, unknown)]  # Envoy tells the client
    logged = access_entries(gateway, *ids)

    ok = logged[ids[0]]
    assert ok["status"] == 200
    decided = ok["kvgate"]
    assert (decided["decision"], decided["model"]) == ("admitted", "fast")
    assert (decided["max_tokens"], decided["requested_max_tokens"]) == (256, 1000)  # clamped to the model's
    assert decided["endpoint"] == ok["upstream_host"]  # the engine ext_proc reserved on is the one used
    assert int(ok["ext_proc_body_us"]) > 0  # Envoy's own timing of the ext_proc round trip

    # Refusals are immediate responses: their metadata reaches the log too (Envoy 1.40), from the
    # body phase and from the headers phase alike.
    refused = logged[ids[1]]
    assert (refused["status"], refused["upstream_host"]) == (400, None)
    assert refused["kvgate"] == {"decision": "context_length_exceeded", "model": "fast"}
    assert refused["details"] == "kvgate_context_length_exceeded"
    assert logged[ids[2]]["kvgate"] == {"decision": "unknown_url"}

    assert metric(gateway, "kvgate_admission_clamps_total", model="fast", limit="max_output_tokens") >= 1
    assert metric(gateway, "gen_ai_server_request_duration_seconds_count", gen_ai_request_model="fast",
                  error_type="context_length_exceeded") >= 1


def test_a_busy_refusal_is_logged_with_its_request_id_and_a_wait_is_not_overhead(gateway: Gateway) -> None:
    holder = threading.Thread(target=httpx.post, args=(f"{gateway.url}/v1/completions",), kwargs={"json": LONG,
                                                                                               "timeout": 30})
    holder.start()
    wait_for(lambda: reserved(gateway, "org/tiny") > 0, "the first long request to hold its budget")
    with httpx.Client(base_url=gateway.url, timeout=30) as c:
        busy = c.post("/v1/completions", json=LONG)
        waited = c.post("/v1/completions", json=LONG, headers={PRIORITY_HEADER: "patient"})
    holder.join()
    assert (busy.status_code, waited.status_code) == (429, 200)

    busy_id = busy.headers["x-request-id"]
    about_busy = [e for e in json_lines(gateway.run_dir / "ext_proc-0.log") if e.get("request_id") == busy_id]
    assert [e["event"] for e in about_busy] == ["admission.refused"]

    logged = access_entries(gateway, busy_id, waited.headers["x-request-id"])
    assert (logged[busy_id]["status"], logged[busy_id]["kvgate"]["decision"]) == (429, "rate_limit_exceeded")
    entry = logged[waited.headers["x-request-id"]]
    assert entry["kvgate"]["decision"] == "admitted"
    assert entry["kvgate"]["priority_class"] == "patient"
    waited_s = entry["kvgate"]["waited_ms"] / 1000
    assert waited_s > 0.5  # it waited for the first request to end
    # Every body message of this module together took less than that one wait: the wait is excluded.
    assert metric(gateway, "kvgate_ext_proc_processing_seconds_sum", phase="body") < waited_s


def test_envoy_exposes_the_ext_proc_counters_the_dashboard_reads_and_a_request_is_one_message(
        gateway: Gateway) -> None:
    from tests.unit.test_dashboard import ENVOY_EXT_PROC_METRICS

    def envoy(name: str) -> float:
        # As Prometheus stores it: the family's name (prometheus_client's parser adds _total to samples).
        families = text_string_to_metric_families(httpx.get(f"{gateway.admin_url}/stats/prometheus").text)
        values = [s.value for f in families if f.name == name for s in f.samples
                  if s.labels.get("envoy_http_conn_manager_prefix") == "kvgate"]
        assert values, f"Envoy exposes no {name}"
        return sum(values)

    for name in ENVOY_EXT_PROC_METRICS:
        envoy(name)
    streams, sent = envoy("envoy_http_ext_proc_streams_started"), envoy("envoy_http_ext_proc_stream_msgs_sent")
    httpx.post(f"{gateway.url}/v1/completions", json={"model": "fast", "prompt": "hi", "max_tokens": 2})
    assert envoy("envoy_http_ext_proc_streams_started") - streams == 1
    assert envoy("envoy_http_ext_proc_stream_msgs_sent") - sent == 1  # the body, the headers as its attributes
