"""Budget shares: the pure division (xds_server/shares.py), and in one process a real control plane
(XdsServer, Controller, ShareKeeper on 127.0.0.1) with ext_proc's AdsSubscriber replicas."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import pytest
import pytest_asyncio
from google.protobuf import any_pb2
from structlog.testing import capture_logs

from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.ads_pb2_grpc import AggregatedDiscoveryServiceStub
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest
from ext_proc.__main__ import apply_share
from ext_proc.xds_client import AdsSubscriber, Subscription
from kvgate.catalog import parse_catalog
from kvgate.v1 import policy_pb2
from xds_server.control import Controller, ShareKeeper, render
from xds_server.server import XdsServer
from xds_server.settings import GatewaySettings
from kvgate.budget_shares import share_of
from kvgate.wire import EXT_PROC_GROUP, HELD_SHARE_KEY
from xds_server.shares import Member, all_holders_back, duplicate_ids, equal_shares, held, reported_share, steps
from xds_server.resource_types import BUDGET_SHARES, POLICY

# --- the division, pure ------------------------------------------------------------------------

def test_equal_shares_count_streams_not_ids() -> None:
    assert equal_shares(["a", "b", "c"]) == {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    # Two processes named "a" both apply a's entry: 1/3 + 1/3 + b's 1/3.
    streams = ["a", "a", "b"]
    shares = equal_shares(streams)
    assert shares == {"a": 1 / 3, "b": 1 / 3}
    assert sum(shares[n] for n in streams) == pytest.approx(1.0)
    assert duplicate_ids(streams) == ["a"] and duplicate_ids(["a", "b"]) == []


def test_a_join_lowers_the_others_first_and_raises_the_newcomer_last() -> None:
    target = equal_shares(["a", "b", "c"])
    lowered, final = steps({"a": 0.5, "b": 0.5, "c": 0.0}, target)
    assert lowered == {"a": 1 / 3, "b": 1 / 3, "c": 0.0}
    assert final == target


def test_a_leave_raises_the_others_at_once() -> None:
    # c has left: it is not among the replicas that hold anything.
    assert steps({"a": 1 / 3, "b": 1 / 3}, equal_shares(["a", "b"])) == [{"a": 0.5, "b": 0.5}]


def test_a_first_division_of_a_fresh_fleet_is_one_step() -> None:
    assert steps({"a": 0.0, "b": 0.0}, equal_shares(["a", "b"])) == [{"a": 0.5, "b": 0.5}]


def test_a_join_and_a_leave_in_one_burst() -> None:
    lowered, final = steps({"a": 1 / 3, "b": 1 / 3}, equal_shares(["a", "b", "d", "e"]))  # c left, d and e came
    assert lowered == {"a": 0.25, "b": 0.25, "d": 0.0, "e": 0.0} and final == equal_shares("abde")


def peak_while_moving(start: dict[str, float], published: list[dict[str, float]]) -> float:
    """The most the replicas can hold together while going from `start` through each step: during a
    step a replica may still hold its previous share or already its new one (absent: 0)."""
    peak, current = sum(start.values()), start
    for step in published:
        names = current.keys() | step.keys()
        peak = max(peak, sum(max(current.get(n, 0.0), step.get(n, 0.0)) for n in names))
        current = step
    return peak


def test_no_membership_change_ever_lets_the_replicas_hold_more_than_the_budget() -> None:
    rng = random.Random(7)
    names = [f"r{i}" for i in range(8)]
    for _ in range(2000):
        before = rng.sample(names, rng.randint(1, 8))
        holding = equal_shares(before)
        if rng.random() < 0.3:  # or caught between the two steps of an earlier change
            holding = steps(holding, equal_shares(rng.sample(names, rng.randint(1, 8))))[0]
        after = rng.sample(names, rng.randint(1, 8))
        still_there = {n: f for n, f in holding.items() if n in after}  # those who left hold nothing
        published = steps(still_there, equal_shares(after))
        assert peak_while_moving(still_there, published) <= 1.0 + 1e-9
        assert published[-1] == equal_shares(after)


def test_held_is_what_was_published_or_before_that_what_replicas_reported() -> None:
    members = [Member("a", 0.5), Member("a", 0.25), Member("b", 0.5), Member("c", 0.0)]
    assert held(members, None) == {"a": 0.5, "b": 0.5, "c": 0.0}
    assert held(members, {"a": 1 / 3, "b": 1 / 3, "gone": 1 / 3}) == {"a": 1 / 3, "b": 1 / 3, "c": 0.0}


def test_a_restarted_control_plane_divides_once_every_holder_is_back_or_nobody_holds_anything() -> None:
    assert all_holders_back([0.5, 0.5]) and all_holders_back([0.1] * 10)
    assert all_holders_back([0.0, 0.0])  # a fresh start
    assert not all_holders_back([0.5])  # the other half is held by a replica still reconnecting
    assert not all_holders_back([])


def test_reported_share_from_node_metadata() -> None:
    assert reported_share({HELD_SHARE_KEY: 0.5}) == 0.5
    assert reported_share({}) == 0.0
    assert reported_share({HELD_SHARE_KEY: "lots"}) == 0.0
    assert reported_share({HELD_SHARE_KEY: 7}) == 1.0


def packed(msg: policy_pb2.BudgetShares | policy_pb2.ModelPolicy) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def test_share_of_a_response() -> None:
    shares = packed(policy_pb2.BudgetShares(fraction={"a": 0.5, "b": 0.5}))
    assert share_of([shares], "a") == 0.5
    assert share_of([shares], "c") == 0.0  # not listed: holds nothing
    assert share_of([], "a") is None  # not divided yet: keep what is held
    assert share_of([packed(policy_pb2.BudgetShares())], "a") is None
    for bad in ([shares, shares], [packed(policy_pb2.ModelPolicy(name="x"))],
                [packed(policy_pb2.BudgetShares(fraction={"a": 1.5}))],
                [packed(policy_pb2.BudgetShares(fraction={"a": 0.75, "b": 0.75}))]):
        with pytest.raises(ValueError):
            share_of(bad, "a")


# --- a real control plane and replicas, in this process ----------------------------------------

CATALOG = parse_catalog({"models": [{"name": "m", "endpoints": ["10.0.0.1:8000"], "max_context_tokens": 4096,
                                     "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "1GiB"}}]})
SETTINGS = GatewaySettings()


@dataclass
class ControlPlane:
    server: XdsServer
    controller: Controller
    keeper: ShareKeeper
    port: int
    published: list[dict[str, float]] = field(default_factory=list)  # every set_shares, in order
    _task: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, port: int = 0, run_keeper: bool = True, **keeper: float) -> ControlPlane:
        server = XdsServer(render(CATALOG, SETTINGS))
        controller = Controller(server, CATALOG, SETTINGS)
        cp = cls(server, controller, ShareKeeper(controller, **{"debounce_s": 0.01, **keeper}),
                 await server.start("127.0.0.1", port))
        real_set_shares = controller.set_shares

        async def spy(fractions: dict[str, float]) -> str:
            cp.published.append(dict(fractions))
            return await real_set_shares(fractions)

        controller.set_shares = spy  # type: ignore[method-assign]
        if run_keeper:
            cp.run_keeper()
        return cp

    def run_keeper(self) -> None:
        self._task = asyncio.create_task(self.keeper.run())

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.server.stop(0)


@dataclass
class _Table:
    """What apply_share needs of ext_proc's AdmissionState; records every share the replica takes."""

    fleet: Fleet
    key: int

    def set_share(self, fraction: float) -> None:
        self.fleet.took(self.key, fraction)


@dataclass
class Fleet:
    """ext_proc replicas (AdsSubscriber + ext_proc's apply_share) in this process. The event loop
    orders every apply, so `peak` is exactly the most they ever held together."""

    target: str
    holding: dict[int, float] = field(default_factory=dict)
    history: list[tuple[int, float]] = field(default_factory=list)
    peak: float = 0.0
    subscribers: dict[int, AdsSubscriber] = field(default_factory=dict)
    _tasks: dict[int, asyncio.Task[None]] = field(default_factory=dict)

    def took(self, key: int, fraction: float) -> None:
        self.holding[key] = fraction
        self.history.append((key, fraction))
        self.peak = max(self.peak, sum(self.holding.values()))

    def start(self, node_id: str) -> int:
        key = len(self.subscribers)
        node = Node(id=node_id, cluster=EXT_PROC_GROUP, metadata={HELD_SHARE_KEY: 0.0})
        self.holding[key] = 0.0
        table = _Table(self, key)
        # Reconnects within 0.2 s: what these tests check is the control plane's division, and a
        # replica's own backoff (up to 5 s after repeated failures while a control plane restarts)
        # would only make them wait longer than their deadlines on a busy machine.
        self.subscribers[key] = AdsSubscriber(self.target, node, [
            Subscription(POLICY, lambda res: None),
            Subscription(BUDGET_SHARES, lambda res: apply_share(table, node, res)),  # type: ignore[arg-type]
        ], max_backoff_s=0.2)
        self._tasks[key] = asyncio.create_task(self.subscribers[key].run())
        return key

    async def kill(self, key: int) -> None:
        """The process dies: its stream ends (it holds nothing any more)."""
        self._tasks.pop(key).cancel()
        self.holding.pop(key)
        await asyncio.sleep(0)

    async def stop(self) -> None:
        for key in list(self._tasks):
            await self.kill(key)


async def until(predicate: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


@pytest_asyncio.fixture
async def cp() -> AsyncIterator[ControlPlane]:
    plane = await ControlPlane.start()
    yield plane
    await plane.stop()


@pytest_asyncio.fixture
async def fleet(cp: ControlPlane) -> AsyncIterator[Fleet]:
    f = Fleet(cp.target)
    yield f
    await f.stop()


@pytest.mark.asyncio
async def test_replicas_joining_and_leaving_never_hold_more_than_the_budget(cp: ControlPlane, fleet: Fleet) -> None:
    a = fleet.start("a")
    await until(lambda: fleet.holding == {a: 1.0}, "a alone holds everything")
    b = fleet.start("b")
    await until(lambda: fleet.holding == {a: 0.5, b: 0.5}, "a and b hold half each")
    assert cp.published == [{"a": 1.0}, {"a": 0.5, "b": 0.0}, {"a": 0.5, "b": 0.5}]  # make before break
    c = fleet.start("c")
    await until(lambda: set(fleet.holding.values()) == {1 / 3}, "thirds")
    await fleet.kill(b)
    await until(lambda: fleet.holding == {a: 0.5, c: 0.5}, "b's third re-divided at once")
    assert cp.published[-3:] == [{"a": 1 / 3, "b": 1 / 3, "c": 0.0}, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3},
                                 {"a": 0.5, "c": 0.5}]  # the join in two steps, the leave in one
    assert fleet.peak <= 1.0 + 1e-9


@pytest.mark.asyncio
async def test_a_burst_of_joins_is_one_division() -> None:
    """Ten replicas connected by the time the keeper looks: one division, not ten. The keeper starts
    once all ten streams are up (on a busy machine they may take longer than any debounce to
    connect, and then two divisions are right)."""
    cp = await ControlPlane.start(run_keeper=False)
    fleet = Fleet(cp.target)
    try:
        for i in range(10):
            fleet.start(f"r{i}")
        await until(lambda: len(cp.server.servicer.members()) == 10, "ten streams")
        cp.run_keeper()
        await until(lambda: set(fleet.holding.values()) == {0.1}, "a tenth each")
        assert cp.published == [{f"r{i}": 0.1 for i in range(10)}]
        assert fleet.peak <= 1.0 + 1e-9
    finally:
        await fleet.stop()
        await cp.stop()


@pytest.mark.asyncio
async def test_two_replicas_with_one_node_id_end_up_holding_at_most_the_budget(cp: ControlPlane, fleet: Fleet) -> None:
    with capture_logs() as logs:
        fleet.start("a")
        await until(lambda: fleet.holding == {0: 1.0}, "a")
        fleet.start("a")
        fleet.start("b")
        await until(lambda: set(fleet.holding.values()) == {1 / 3}, "a third for each process")
    assert any(e["event"] == "shares.duplicate_node_id" and e["nodes"] == ["a"] for e in logs)
    # Not make before break, though: the second "a" may take a's entry (1.0) as it connects, before
    # the division (the resource is by node id). The warning is the remedy: one id per replica.


@pytest.mark.asyncio
async def test_a_replica_that_never_acks_delays_a_join_by_the_timeout_only(cp: ControlPlane, fleet: Fleet) -> None:
    cp.keeper.ack_timeout_s = 0.3
    a = fleet.start("a")
    await until(lambda: fleet.holding == {a: 1.0}, "a")
    async with grpc.aio.insecure_channel(cp.target) as channel:  # subscribes, then never answers
        mute = AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        await mute.write(DiscoveryRequest(node=Node(id="mute", cluster=EXT_PROC_GROUP), type_url=BUDGET_SHARES))
        with capture_logs() as logs:
            await until(lambda: fleet.holding == {a: 0.5}, "a lowered to make room for mute")
            await until(lambda: cp.published[-1] == {"a": 0.5, "mute": 0.5}, "mute's share, after the timeout")
        mute.cancel()
    assert any(e["event"] == "shares.ack_timeout" and e["nodes"] == ["mute"] for e in logs)
    await until(lambda: fleet.holding == {a: 1.0}, "mute gone: a holds everything again")


@pytest.mark.asyncio
async def test_a_restarted_control_plane_takes_no_share_away(cp: ControlPlane, fleet: Fleet) -> None:
    a, b = fleet.start("a"), fleet.start("b")
    await until(lambda: fleet.holding == {a: 0.5, b: 0.5}, "halves")
    shares_version = cp.server.cache.snapshot.get(BUDGET_SHARES).version
    history_before = len(fleet.history)
    await cp.stop()
    # The same port, a grace far longer than this test: only "every holder is back" can end it.
    restarted = await ControlPlane.start(cp.port, startup_grace_s=60.0)
    try:
        await until(lambda: restarted.published == [{"a": 0.5, "b": 0.5}], "the same division, from what they hold")
        await until(lambda: restarted.server.unsettled(BUDGET_SHARES, shares_version) == []
                    and len(restarted.server.servicer.clients) == 2, "both ACKed it")
        assert restarted.server.cache.snapshot.get(BUDGET_SHARES).version == shares_version
        assert all(f == 0.5 for _, f in fleet.history[history_before:])  # never 0 meanwhile
        # Each type's accepted version went with the reconnect: the policies were not sent again.
        assert restarted.server.servicer.responses_sent[POLICY] == 0
    finally:
        await restarted.stop()


@pytest.mark.asyncio
async def test_a_restarted_control_plane_waits_for_a_holder_that_does_not_come_back_until_the_grace_ends(
        cp: ControlPlane, fleet: Fleet) -> None:
    a, b = fleet.start("a"), fleet.start("b")
    await until(lambda: fleet.holding == {a: 0.5, b: 0.5}, "halves")
    await cp.stop()
    await fleet.kill(b)  # gone while the control plane was away: nobody can tell it from a slow one
    restarted = await ControlPlane.start(cp.port, startup_grace_s=0.5)
    started = asyncio.get_running_loop().time()
    try:
        await until(lambda: fleet.holding == {a: 1.0}, "b's half re-divided once the grace is over")
        assert asyncio.get_running_loop().time() - started >= 0.45
        assert restarted.published == [{"a": 1.0}]
    finally:
        await restarted.stop()


@pytest.mark.asyncio
async def test_each_type_is_acked_or_nacked_on_its_own(cp: ControlPlane) -> None:
    await cp.controller.set_shares({"n": 1.0})
    applied: list[int] = []

    def refuse(_: list[any_pb2.Any]) -> None:
        raise ValueError("not today")

    # Not an ext_proc node: the ShareKeeper leaves the shares to this test.
    sub = AdsSubscriber(cp.target, Node(id="n", cluster="kvgate-test"), [
        Subscription(POLICY, lambda res: applied.append(len(res))), Subscription(BUDGET_SHARES, refuse)])
    task = asyncio.create_task(sub.run())
    try:
        snapshot = cp.server.cache.snapshot
        policy_version, shares_version = snapshot.get(POLICY).version, snapshot.get(BUDGET_SHARES).version

        def stream_states() -> tuple[str, str | None, str]:
            (client,) = cp.server.servicer.clients.values()
            p, s = client.stream.types[POLICY], client.stream.types[BUDGET_SHARES]
            return p.acked_version, s.nacked_version, s.acked_version

        await until(lambda: len(cp.server.servicer.clients) == 1 and len(
            next(iter(cp.server.servicer.clients.values())).stream.types) == 2 and stream_states()[1] is not None,
            "the NACK")
        assert stream_states() == (policy_version, shares_version, "")
        assert applied == [1] and [(n, x.type_url) for n, x in cp.server.servicer.nacks] == [("n", BUDGET_SHARES)]
        assert sub.subscription(POLICY).accepted_version == policy_version  # type: ignore[union-attr]
        assert sub.subscription(BUDGET_SHARES).accepted_version == ""  # type: ignore[union-attr]

        sub.subscription(BUDGET_SHARES).apply = lambda res: None  # type: ignore[union-attr]
        new_version = await cp.controller.set_shares({"n": 0.5})
        assert await cp.server.wait_acked(BUDGET_SHARES, new_version, timeout_s=5)
        assert stream_states()[0] == policy_version and applied == [1]  # the policies were not sent again
    finally:
        task.cancel()
