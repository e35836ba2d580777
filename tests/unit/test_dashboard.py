"""docs/grafana/kvgate-dashboard.json: well-formed for Grafana, and every metric and label its queries
name is one the gateway exposes, so renaming a metric (or a label) breaks this test, not the dashboard."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from ext_proc.decision_metadata import ADMITTED, CLAMPED_BY_MODEL, DecisionRecord
from ext_proc.ledger import Ledgers
from ext_proc.metrics import registry_for

DASHBOARD = Path(__file__).parents[2] / "docs" / "grafana" / "kvgate-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# xds_server's metrics (its HTTP port), with their labels: the names agreed with that server's owner.
XDS_METRICS = {"kvgate_xds_pushes_total": {"type_url"}, "kvgate_xds_nacks_total": {"type_url"},
               "kvgate_xds_connected_nodes": {"group"}}
# Envoy's own ext_proc filter counters (its /stats/prometheus), as Envoy 1.40 names them;
# tests/integration/test_observability.py checks the real Envoy exposes each of them.
ENVOY_EXT_PROC_METRICS = {f"envoy_http_ext_proc_{name}": {"envoy_http_conn_manager_prefix"} for name in (
    "streams_started", "streams_failed", "stream_msgs_sent", "immediate_responses_sent", "message_timeouts",
    "spurious_msgs_received", "clear_route_cache_ignored")}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}
# PromQL words that look like names: functions are told apart by their "(", these are not.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}

_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
_NAME = re.compile(r"\b[A-Za-z_:][\w:]*\b(?!\s*\()")


def exposed_metrics() -> dict[str, set[str]]:
    """Every sample name ext_proc's registry exposes, with its labels, after one of each event."""
    ledgers = Ledgers()
    ledgers.set_budget("m", "e:1", 1000)
    registry, decisions = registry_for(ledgers, lambda: {"m": 0})
    d = DecisionRecord(operation="chat", model="m", prompt_tokens=10, prompt_counted=True, max_tokens=5,
                       clamped_by=CLAMPED_BY_MODEL, decision=ADMITTED)
    decisions.admitted(d)
    decisions.waited("m", 0.5, True)
    decisions.processed("body", 0.001)
    decisions.finished(d, 1.0)
    out: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    return load()["panels"]


def queries() -> list[str]:
    return [t["expr"] for p in panels() for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The metric names of a PromQL expression: what is left once label matchers, ranges, strings and
    grouping clauses are gone, minus function names (followed by "(") and keywords."""
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", "", _GROUPING.sub("", expr))
    return {n for n in _NAME.findall(bare) if n not in KEYWORDS and not n[0].isdigit()}


def test_the_dashboard_is_grafana_json_with_a_prometheus_datasource_variable() -> None:
    dash = load()
    assert 39 <= dash["schemaVersion"] < 42
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    assert variables["model"]["datasource"] == DATASOURCE


def test_every_panel_has_a_unique_id_and_queries_through_the_variable() -> None:
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids))
    for p in panels():
        if p["type"] == "row":  # layout only: rows query nothing
            continue
        assert p["datasource"] == DATASOURCE, p["title"]
        assert p["targets"], p["title"]
        assert all(t["datasource"] == DATASOURCE and t["expr"] for t in p["targets"]), p["title"]


def test_panels_do_not_overlap_on_the_24_column_grid() -> None:
    taken: set[tuple[int, int]] = set()
    for p in panels():
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, p["title"]
        taken |= cells


def test_metric_names_are_found_in_queries() -> None:
    # The parser the next test relies on: names only, not functions, labels, ranges or strings.
    expr = ('histogram_quantile(0.99, sum by (le, phase) (rate(a_bucket{model=~"$model", x="y"}[$__rate_interval])))'
            " / on (instance) b_total")
    assert metric_names(expr) == {"a_bucket", "b_total"}


@pytest.mark.parametrize("expr", queries())
def test_every_metric_and_label_a_query_names_is_exposed(expr: str) -> None:
    exposed = {**exposed_metrics(), **XDS_METRICS, **ENVOY_EXT_PROC_METRICS}
    names = metric_names(expr)
    assert names, f"no metric in {expr!r}"
    assert names <= exposed.keys(), f"not exposed: {names - exposed.keys()}"
    for name, matchers in _SELECTOR.findall(expr):
        assert set(_MATCHER_LABEL.findall(matchers)) <= exposed[name] | TARGET_LABELS, expr
    labels = set().union(*(exposed[n] for n in names)) | TARGET_LABELS
    for grouping in _GROUPING.findall(expr):
        assert {g.strip() for g in grouping.split(",") if g.strip()} <= labels, expr
