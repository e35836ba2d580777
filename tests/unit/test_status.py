"""The status page's data: one replica's snapshot (ext_proc/status.py), the control plane's merge of
them (xds_server/status.py), the charts' history (xds_server/status_history.py), its Prometheus
metrics (xds_server/metrics.py) and how it fetches replicas that fail (xds_server/status_page.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from itertools import count
from typing import Any

import aiohttp
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
import pytest
import pytest_asyncio
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ext_proc import sinks
from ext_proc.admission import Refusal
from ext_proc.decision import Admit, Refuse
from ext_proc.decision_metadata import PASSED, DecisionRecord
from ext_proc.ledger import Ledger, Ledgers
from ext_proc.metrics import Decisions
from ext_proc.status import MESSAGE_CHARS, RecentRefusals, replica_status
from kvgate.catalog import parse_catalog
from kvgate.cli.processes import free_port
from xds_server.cache import SnapshotCache
from xds_server.control import render
from xds_server.metrics import registry_for
from xds_server.admin import fleet_status
from xds_server.control import Controller
from xds_server.server import MAX_NACK_NODES, MAX_NACKS, OTHER_TYPES, AdsServicer, Client, XdsServer
from xds_server.sotw import SotwStream
from xds_server.settings import GatewaySettings
from xds_server.acks import Nack
from xds_server.resource_types import CLUSTER, ENDPOINT
from kvgate.wire import STATUS_URL_KEY
from xds_server.status import DOWN, UNKNOWN, UP, ReplicaReport, aggregate, model_statuses, status_url_of
from xds_server.status_history import DecisionDeltas, History, KvUse, Sample, kv_use
from xds_server.status_page import fetch_report

GIB = 2**30
CATALOG = parse_catalog({"models": [
    {"name": "m", "endpoints": ["10.0.0.1:8000", {"host": "10.0.0.2", "port": 8000, "priority": 1}],
     "max_context_tokens": 4096, "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "1GiB"}},
    {"name": "n", "endpoints": ["10.0.0.3:8000"], "max_context_tokens": 4096,
     "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "1GiB"}},
]})
FLEET = {"version": "v1", "nodes": [{"id": "envoy-0", "group": "kvgate-envoy"}]}


def clock(start: float = 1000.0) -> Iterator[float]:
    return (start + i for i in count())


# --- one replica -----------------------------------------------------------------------------

def test_recent_refusals_keep_the_newest_oldest_first_with_short_messages() -> None:
    times = clock()
    recent = RecentRefusals(keep=3, clock=lambda: next(times))
    for i in range(5):
        recent.record("m", Refusal(429, "rate_limit_exceeded", "x" * 1000), f"req-{i}")
    assert [r.request_id for r in recent] == ["req-2", "req-3", "req-4"]
    assert [r.time for r in recent] == [1002.0, 1003.0, 1004.0]
    assert all(len(r.message) == MESSAGE_CHARS for r in recent)


def test_replica_status_is_json_with_every_ledger_its_queues_and_refusals() -> None:
    ledgers = Ledgers(share=0.5)
    held = ledgers.set_budget("m", "10.0.0.1:8000", 1000)
    assert held.try_reserve(300, now=0.0, ttl_s=900.0) is not None
    ledgers.set_budget("m", "10.0.0.2:8000", 1000).blind = True
    recent = RecentRefusals(clock=lambda: 5.0)
    recent.record("", Refusal(404, "unknown_url", "no such URL"), None)
    status = replica_status("ext-proc-0", ledgers, {"m": 2}, recent, {"m": {"admitted": 1, "refused": 0}}, now=7.0)
    assert json.loads(json.dumps(status)) == status  # nothing that JSON cannot carry
    assert status["node_id"] == "ext-proc-0" and status["share"] == 0.5 and status["queues"] == {"m": 2}
    assert status["ledgers"] == [
        {"model": "m", "endpoint": "10.0.0.1:8000", "reserved": 300, "capacity": 500, "budget": 1000,
         "excess": 0, "blind": False, "active": 1},
        {"model": "m", "endpoint": "10.0.0.2:8000", "reserved": 0, "capacity": 500, "budget": 1000,
         "excess": 0, "blind": True, "active": 0}]
    assert status["refusals"] == [{"time": 5.0, "model": "", "status": 404, "code": "unknown_url",
                                   "message": "no such URL", "request_id": None}]
    assert status["decisions"] == {"m": {"admitted": 1, "refused": 0}}


def test_decision_totals_count_admitted_and_refused_per_model_from_the_outcome_counter() -> None:
    decisions = Decisions(CollectorRegistry())
    sink = sinks.metrics(decisions)
    reservation = Ledger("m", "10.0.0.1:8000", budget=1000).try_reserve(10, now=0.0, ttl_s=1.0)
    assert reservation is not None
    for _ in range(2):
        sink(sinks.Decided(Admit("m", 8, None, None, reservation),
                           DecisionRecord(model="m", prompt_tokens=3, max_tokens=8), None))
    sink(sinks.Decided(Refuse("m", Refusal(429, "rate_limit_exceeded", "full")), DecisionRecord(), None))
    sink(sinks.Decided(Refuse("", Refusal(404, "unknown_url", "no")), DecisionRecord(), None))
    sink(sinks.Finished(DecisionRecord(model="m"), 1.0))  # the end of a request is no decision
    decisions.record("m", PASSED)  # routed without a reservation: neither
    assert decisions.totals() == {"": {"admitted": 0, "refused": 1}, "m": {"admitted": 2, "refused": 1}}


# --- the control plane's merge ---------------------------------------------------------------

def ledger(model: str, endpoint: str, reserved: int = 0, capacity: int = GIB // 2, excess: int = 0,
           blind: bool = False, active: int = 0) -> dict[str, Any]:
    return {"model": model, "endpoint": endpoint, "reserved": reserved, "capacity": capacity, "budget": GIB,
            "excess": excess, "blind": blind, "active": active}


def report(node_id: str, ledgers: list[dict[str, Any]], refusals: Sequence[dict[str, Any]] = (),
           queues: dict[str, int] | None = None) -> ReplicaReport:
    return ReplicaReport(node_id, f"http://{node_id}/status.json", {
        "node_id": node_id, "time": 1.0, "share": 0.5, "ledgers": ledgers, "queues": queues or {},
        "refusals": list(refusals)})


def refusal(t: float, code: str = "rate_limit_exceeded") -> dict[str, Any]:
    return {"time": t, "model": "m", "status": 429, "code": code, "message": "", "request_id": None}


def endpoints(status: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(m["name"], e["address"]): e for m in status["models"] for e in m["endpoints"]}


def test_every_catalog_endpoint_is_listed_with_its_numbers_summed_over_replicas() -> None:
    status = aggregate(CATALOG, FLEET, [
        report("a", [ledger("m", "10.0.0.1:8000", reserved=100, excess=5, active=1),
                     ledger("m", "10.0.0.2:8000")], queues={"m": 1}),
        report("b", [ledger("m", "10.0.0.1:8000", reserved=200, active=2),
                     ledger("m", "10.0.0.2:8000", blind=True)], queues={"m": 2}),
    ], now=9.0)
    assert [m["name"] for m in status["models"]] == ["m", "n"]
    by = endpoints(status)
    first = by[("m", "10.0.0.1:8000")]
    assert first == {"address": "10.0.0.1:8000", "priority": 0, "budget_bytes": GIB, "health": UP,
                     "reserved_bytes": 300, "capacity_bytes": GIB, "excess_bytes": 5, "reservations": 3,
                     "replicas": 2, "blind_replicas": []}
    # One replica that sees the engine's metrics stale counts it full: the endpoint is down.
    assert by[("m", "10.0.0.2:8000")]["health"] == DOWN
    assert by[("m", "10.0.0.2:8000")]["blind_replicas"] == ["b"]
    assert by[("m", "10.0.0.2:8000")]["priority"] == 1
    # Nobody reports it (no policy loaded yet, or no replica): not known to be up.
    assert by[("n", "10.0.0.3:8000")]["health"] == UNKNOWN
    assert status["models"][0]["waiting"] == 3 and status["models"][1]["waiting"] == 0
    assert status["version"] == "v1" and status["nodes"] == FLEET["nodes"] and status["time"] == 9.0


def test_a_replica_that_failed_is_named_and_counts_nowhere() -> None:
    status = aggregate(CATALOG, FLEET, [
        report("a", [ledger("m", "10.0.0.1:8000", reserved=100)]),
        ReplicaReport("b", "http://b/status.json", None, "no answer within 0.5 s"),
    ], now=0.0)
    assert endpoints(status)[("m", "10.0.0.1:8000")]["reserved_bytes"] == 100
    assert endpoints(status)[("m", "10.0.0.1:8000")]["replicas"] == 1
    assert status["replicas"] == [
        {"node_id": "a", "url": "http://a/status.json", "ok": True, "error": None, "share": 0.5, "time": 1.0},
        {"node_id": "b", "url": "http://b/status.json", "ok": False, "error": "no answer within 0.5 s",
         "share": None, "time": None}]


def test_refusals_of_all_replicas_newest_first_with_their_replica_and_capped() -> None:
    status = aggregate(CATALOG, FLEET, [
        report("a", [], [refusal(1.0), refusal(3.0, "invalid_priority_class")]),
        report("b", [], [refusal(2.0)] + [refusal(0.5)] * 60),
    ], now=0.0)
    refusals = status["refusals"]
    assert [(r["time"], r["replica"]) for r in refusals[:3]] == [(3.0, "a"), (2.0, "b"), (1.0, "a")]
    assert refusals[0]["code"] == "invalid_priority_class"
    assert len(refusals) == 50


# --- the charts' history ---------------------------------------------------------------------

def counted(node_id: str, **totals: tuple[int, int]) -> ReplicaReport:
    """A replica reporting (admitted, refused) totals per model."""
    return ReplicaReport(node_id, f"http://{node_id}/status.json", {"decisions": {
        m: {"admitted": a, "refused": r} for m, (a, r) in totals.items()}})


def test_kv_use_is_reserved_and_reserved_plus_excess_over_the_capacity_of_reported_endpoints() -> None:
    models = model_statuses(CATALOG, [
        report("a", [ledger("m", "10.0.0.1:8000", reserved=GIB // 8, excess=GIB // 8)]),
        report("b", [ledger("m", "10.0.0.1:8000", reserved=GIB // 8), ledger("m", "10.0.0.2:8000", capacity=0)]),
    ])
    # Two replicas with half the budget each: 2/8 reserved of 1 GiB, 3/8 with the excess; an endpoint
    # with no capacity (no share yet) and one nobody reports have no point.
    assert kv_use(models) == {("m", "10.0.0.1:8000"): KvUse(0.25, 0.375)}


def test_decisions_per_interval_are_increases_per_replica_summed() -> None:
    deltas = DecisionDeltas()
    # First sight: a baseline, whatever the replica counted before is not this interval's.
    assert deltas.step([counted("a", m=(10, 1)), counted("b", m=(5, 0))]) == ({}, {})
    assert deltas.step([counted("a", m=(13, 1), n=(1, 2)), counted("b", m=(6, 4))]) == (
        {"m": 4, "n": 1}, {"m": 4, "n": 2})
    # b did not answer: its requests show once it does, nothing is lost or counted twice.
    failed = ReplicaReport("b", "http://b/status.json", None, "no answer within 0.5 s")
    assert deltas.step([counted("a", m=(13, 1), n=(1, 2)), failed]) == ({"m": 0, "n": 0}, {"m": 0, "n": 0})
    assert deltas.step([counted("a", m=(13, 1), n=(1, 2)), counted("b", m=(8, 4))]) == (
        {"m": 2, "n": 0}, {"m": 0, "n": 0})
    # a restarted under its node id (totals went down): it counts from zero again.
    assert deltas.step([counted("a", m=(3, 0)), counted("b", m=(8, 4))]) == ({"m": 3}, {"m": 0})


def test_a_replica_that_left_is_forgotten_and_a_baseline_again_when_it_returns() -> None:
    deltas = DecisionDeltas()
    deltas.step([counted("a", m=(1, 0)), counted("b", m=(1, 0))])
    # b left: the fleet's count does not go backwards by b's totals.
    assert deltas.step([counted("a", m=(2, 0))]) == ({"m": 1}, {"m": 0})
    assert deltas.step([counted("a", m=(2, 0)), counted("b", m=(50, 0))]) == ({"m": 0}, {"m": 0})


def sample(t: float, reserved: float | None = None, admitted: int = 0) -> Sample:
    kv = {} if reserved is None else {("m", "10.0.0.1:8000"): KvUse(reserved, reserved + 0.5)}
    return Sample(t, kv, {"m": admitted}, {"n": 1})


def test_history_keeps_the_window_in_a_bounded_ring() -> None:
    history = History(window_s=60.0, interval_s=10.0)
    for t in range(0, 200, 10):
        history.add(sample(float(t)))
    assert len(history) == 7 and history.to_json(CATALOG)["times"] == [130.0, 140.0, 150.0, 160.0, 170.0, 180.0, 190.0]
    # Late samples (a slow fetch) do not stretch it past the window, however few they are.
    history.add(sample(300.0))
    assert history.to_json(CATALOG)["times"] == [300.0]


def test_history_json_has_one_value_per_time_for_each_model_and_endpoint_of_the_catalog() -> None:
    history = History(window_s=60.0, interval_s=10.0)
    history.add(sample(10.0, reserved=0.25, admitted=3))
    history.add(sample(20.0))  # nobody reported the endpoint: a gap in its line
    history.add(sample(30.0, reserved=0.0))
    got = history.to_json(CATALOG)
    assert json.loads(json.dumps(got)) == got
    assert (got["interval_s"], got["window_s"], got["times"]) == (10.0, 60.0, [10.0, 20.0, 30.0])
    assert [m["name"] for m in got["models"]] == ["m", "n"]
    m, n = got["models"]
    assert (m["admitted"], m["refused"], n["admitted"], n["refused"]) == ([3, 0, 0], [0, 0, 0], [0, 0, 0], [1, 1, 1])
    assert m["endpoints"] == [
        {"address": "10.0.0.1:8000", "reserved": [0.25, None, 0.0], "used": [0.75, None, 0.5]},
        {"address": "10.0.0.2:8000", "reserved": [None] * 3, "used": [None] * 3}]


@pytest.mark.parametrize(("metadata", "url"), [
    ({STATUS_URL_KEY: "http://127.0.0.1:9102/status.json"}, "http://127.0.0.1:9102/status.json"),
    ({}, None),  # an Envoy, or an ext_proc without a metrics port
    ({STATUS_URL_KEY: "file:///etc/passwd"}, None),  # the control plane fetches it: HTTP only
    ({STATUS_URL_KEY: 7}, None),
])
def test_status_url_from_node_metadata(metadata: dict[str, Any], url: str | None) -> None:
    assert status_url_of(metadata) == url


# --- the control plane's Prometheus metrics --------------------------------------------------

def test_xds_metrics_count_pushes_and_nacks_by_type_and_nodes_by_group() -> None:
    ads = AdsServicer(SnapshotCache(render(CATALOG, GatewaySettings())))
    ads.responses_sent.update({CLUSTER: 3, ENDPOINT: 2})
    ads.record_nack("envoy-0", Nack(CLUSTER, "v1", "bad"))
    ads.record_nack("envoy-1", Nack(CLUSTER, "v2", "bad"))
    for i, group in enumerate(["kvgate-envoy", "kvgate-envoy", "kvgate-ext-proc"]):
        ads.clients[i] = Client(f"node-{i}", group, 0.0, stream=None)  # type: ignore[arg-type]
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(generate_latest(registry_for(ads)).decode())
               for s in f.samples}
    assert samples[("kvgate_xds_pushes_total", (("type_url", CLUSTER),))] == 3
    assert samples[("kvgate_xds_pushes_total", (("type_url", ENDPOINT),))] == 2
    assert samples[("kvgate_xds_nacks_total", (("type_url", CLUSTER),))] == 2
    assert samples[("kvgate_xds_connected_nodes", (("group", "kvgate-envoy"),))] == 2
    assert samples[("kvgate_xds_connected_nodes", (("group", "kvgate-ext-proc"),))] == 1


@pytest.mark.asyncio
async def test_nacks_are_bounded_and_unknown_type_urls_are_one_label() -> None:
    ads = AdsServicer(SnapshotCache(render(CATALOG, GatewaySettings())))
    requests: asyncio.Queue[DiscoveryRequest | None] = asyncio.Queue()
    written: asyncio.Queue[DiscoveryResponse] = asyncio.Queue()

    class Context:
        async def write(self, response: DiscoveryResponse) -> None:
            await written.put(response)

    async def from_queue() -> AsyncIterator[DiscoveryRequest]:
        while (r := await requests.get()) is not None:
            yield r

    stream = asyncio.create_task(ads.StreamAggregatedResources(from_queue(), Context()))  # type: ignore[arg-type]
    await requests.put(DiscoveryRequest(node=Node(id="envoy-0", cluster="g"), type_url=CLUSTER))
    for i in range(3):  # a client may ask for any type URL: each is answered, none is a label
        await requests.put(DiscoveryRequest(type_url=f"type.googleapis.com/made.up.Type{i}"))
    answers = [await asyncio.wait_for(written.get(), 5) for _ in range(4)]
    # One node NACKing over and over, then many nodes once each.
    for i in range(MAX_NACKS + 10):
        ads.record_nack("envoy-0", Nack(CLUSTER, f"v{i}", "bad"))
    for i in range(MAX_NACK_NODES + 5):
        ads.record_nack(f"node-{i}", Nack(ENDPOINT, "v", "bad"))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(generate_latest(registry_for(ads)).decode())
               for s in f.samples}
    assert [a.type_url for a in answers[1:]] == [f"type.googleapis.com/made.up.Type{i}" for i in range(3)]
    assert {labels for name, labels in samples if name == "kvgate_xds_pushes_total"} == {
        (("type_url", CLUSTER),), (("type_url", OTHER_TYPES),)}
    assert samples[("kvgate_xds_pushes_total", (("type_url", OTHER_TYPES),))] == 3
    # Counted whole, kept bounded.
    assert samples[("kvgate_xds_nacks_total", (("type_url", CLUSTER),))] == MAX_NACKS + 10
    assert samples[("kvgate_xds_nacks_total", (("type_url", ENDPOINT),))] == MAX_NACK_NODES + 5
    assert len(ads.nacks) == MAX_NACKS and ads.nacks[-1][0] == f"node-{MAX_NACK_NODES + 4}"
    assert len(ads.last_nacks) == MAX_NACK_NODES and "envoy-0" not in ads.last_nacks
    ads.record_nack("node-999", Nack(CLUSTER, "v9", "worse"))  # the newest NACK of a node is kept
    assert ads.last_nacks["node-999"].version == "v9"
    await requests.put(None)
    await asyncio.wait_for(stream, 5)


@pytest.mark.asyncio
async def test_status_shows_each_connected_nodes_last_nack() -> None:
    controller = Controller(XdsServer(render(CATALOG, GatewaySettings())), CATALOG, GatewaySettings())
    ads = controller.server.servicer
    ads.record_nack("envoy-0", Nack(CLUSTER, "v1", "bad"))
    ads.record_nack("envoy-1", Nack(CLUSTER, "v1", "bad"))
    ads.record_nack("envoy-0", Nack(ENDPOINT, "v2", "worse"))
    ads.clients[0] = Client("envoy-0", "kvgate-envoy", 0.0, stream=SotwStream(ads.cache.snapshot))
    (node,) = fleet_status(controller).nodes
    assert (node.id, node.last_nack.type_url, node.last_nack.error_detail) == ("envoy-0", ENDPOINT, "worse")


# --- fetching a replica's report -------------------------------------------------------------

@pytest_asyncio.fixture
async def replica() -> AsyncIterator[str]:
    """A fake replica: /ok answers, /slow does not in time, /text is not JSON, /list is not an object."""
    def answer(response: web.Response, delay_s: float = 0.0) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(_: web.Request) -> web.Response:
            await asyncio.sleep(delay_s)
            return response
        return handler

    app = web.Application()
    app.router.add_get("/ok", answer(web.json_response({"node_id": "a"})))
    app.router.add_get("/slow", answer(web.json_response({}), delay_s=1.0))
    app.router.add_get("/text", answer(web.Response(text="hello")))
    app.router.add_get("/list", answer(web.json_response([1])))
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()  # waits for a /slow still being answered


@pytest.mark.asyncio
@pytest.mark.parametrize(("path", "error"), [
    ("/ok", None),
    ("/slow", "no answer within 0.2 s"),
    ("/text", "ContentTypeError"),
    ("/list", "not a JSON object"),
    ("/missing", "ClientResponseError: 404"),
])
async def test_fetch_report_says_why_a_replica_failed(replica: str, path: str, error: str | None) -> None:
    async with aiohttp.ClientSession() as session:
        got = await fetch_report(session, "a", replica + path, timeout_s=0.2)
    assert got.node_id == "a" and got.url == replica + path
    if error is None:
        assert got.status == {"node_id": "a"} and got.error is None
    else:
        assert got.status is None and got.error.startswith(error)
