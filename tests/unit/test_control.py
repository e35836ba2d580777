"""xds_server/control.py: catalog changes are validated whole, and a refused one changes nothing."""

from __future__ import annotations

import pytest
import yaml

from envoy.config.route.v3.route_pb2 import RouteConfiguration
from kvgate.catalog import Address, CatalogError, parse_catalog
from kvgate.v1.policy_pb2 import BudgetShares
from xds_server.control import Controller, models_from_yaml, render
from xds_server.render.resources import pending_route, unrouted_routes
from xds_server.server import XdsServer
from xds_server.settings import GatewaySettings
from xds_server.resource_types import BUDGET_SHARES, CLUSTER, ENDPOINT, POLICY, ROUTE
from xds_server.snapshot import Snapshot

SETTINGS = GatewaySettings()


def model(name: str, **overrides: object) -> dict:
    return {"name": name, "endpoints": ["10.0.0.1:8000"], "max_context_tokens": 4096,
            "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "1GiB"}, **overrides}


def controller() -> Controller:
    catalog = parse_catalog({"models": [model("a")]})
    return Controller(XdsServer(render(catalog, SETTINGS)), catalog, SETTINGS)


def served_policies(c: Controller) -> list[str]:
    return sorted(c.server.cache.snapshot.get(POLICY).items)


@pytest.mark.asyncio
async def test_apply_adds_and_replaces_by_name_and_publishes() -> None:
    c = controller()
    assert await c.apply(yaml.safe_dump([model("b")]))
    assert served_policies(c) == ["a", "b"]
    assert await c.apply(yaml.safe_dump({"models": [model("a", max_output_tokens=7)]}))
    assert c.catalog.model("a").max_output_tokens == 7 and served_policies(c) == ["a", "b"]
    assert not await c.apply(yaml.safe_dump([model("a", max_output_tokens=7)]))  # nothing new


@pytest.mark.asyncio
@pytest.mark.parametrize("change", [
    yaml.safe_dump([model("a", max_context_tokens=-1)]),
    yaml.safe_dump([model("c", endpoints=["sim"])]),  # nobody here can start an engine
    "models: [",
    "42",
])
async def test_a_refused_change_leaves_catalog_and_snapshot_alone(change: str) -> None:
    c = controller()
    before_catalog, before_version = c.catalog, c.server.cache.snapshot.version
    with pytest.raises(CatalogError):
        await c.apply(change)
    assert c.catalog is before_catalog and c.server.cache.snapshot.version == before_version


@pytest.mark.asyncio
@pytest.mark.parametrize("document, where", [
    (yaml.safe_dump([model("b"), model("c", kv={"bytes_per_token": 1024, "budget_per_endpoint": "1KiB"})]),
     "model 'c' ([1]): Value error, kv.budget_per_endpoint"),
    (yaml.safe_dump({"models": [model("c", max_context_tokens=0)]}), "model 'c' (models[0]): max_context_tokens"),
])
async def test_an_applied_models_error_names_its_place_in_the_applied_document(document: str, where: str) -> None:
    c = controller()
    for name in "defg":  # served models before the applied ones: they must not shift the positions
        await c.apply(yaml.safe_dump([model(name)]))
    with pytest.raises(CatalogError) as e:
        await c.apply(document)
    assert [p for p in e.value.problems if p.startswith(where)], e.value.problems
    assert "models[5]" not in str(e.value) and "models[6]" not in str(e.value)


@pytest.mark.asyncio
async def test_applied_models_are_checked_against_the_served_priority_classes() -> None:
    catalog = parse_catalog({"models": [model("a")], "priority_classes": [{"name": "gold", "max_wait_s": 1}]})
    c = Controller(XdsServer(render(catalog, SETTINGS)), catalog, SETTINGS)
    assert await c.apply(yaml.safe_dump([model("b", priority_class="gold")]))
    with pytest.raises(CatalogError, match="'silver' is not a priority class"):
        await c.apply(yaml.safe_dump([model("c", priority_class="silver")]))


@pytest.mark.asyncio
async def test_remove() -> None:
    c = controller()
    await c.apply(yaml.safe_dump([model("b")]))
    assert await c.remove("b")
    assert served_policies(c) == ["a"]
    with pytest.raises(CatalogError, match="not in the catalog"):
        await c.remove("b")
    with pytest.raises(CatalogError):
        await c.remove("a")  # a catalog needs at least one model


def test_models_from_yaml_takes_a_list_or_a_catalog() -> None:
    assert models_from_yaml("- {name: x}") == [{"name": "x"}]
    assert models_from_yaml("models: [{name: y}]") == [{"name": "y"}]
    with pytest.raises(CatalogError):
        models_from_yaml("models: []")


def spy_on_publish(c: Controller) -> list[Snapshot]:
    published: list[Snapshot] = []
    real_publish = c.server.publish

    async def spy(snapshot: Snapshot) -> bool:
        published.append(snapshot)
        return await real_publish(snapshot)

    c.server.publish = spy  # type: ignore[method-assign]
    return published


def route_names(snapshot: Snapshot) -> set[str]:
    """The routes that depend on the catalog (not the ones for requests ext_proc never routed)."""
    config = RouteConfiguration.FromString(snapshot.get(ROUTE).items["kvgate_routes"].value)
    unrouted = {r["name"] for r in [pending_route(), *unrouted_routes()]}
    return {r.name for vh in config.virtual_hosts for r in vh.routes} - unrouted


@pytest.mark.asyncio
async def test_removing_a_model_keeps_its_cluster_until_routes_no_longer_use_it() -> None:
    c = controller()
    await c.apply(yaml.safe_dump([model("b")]))
    published = spy_on_publish(c)
    assert await c.remove("b")
    refuse, bridge, final = published
    # ext_proc refuses b (its policy gone) while every route still carries what it admitted before.
    assert set(refuse.get(POLICY).items) == {"a"} and "b" in route_names(refuse)
    b_cluster = c.catalog.model("a").cluster_name.replace("/a", "/b")
    assert b_cluster in bridge.get(CLUSTER).items and b_cluster in bridge.get(ENDPOINT).items
    assert route_names(bridge) == route_names(final) == {"a", "models_list", "model a", "unknown model"}
    assert bridge.get(ROUTE).version == final.get(ROUTE).version
    assert b_cluster not in final.get(CLUSTER).items and b_cluster not in final.get(ENDPOINT).items
    assert c.server.cache.snapshot is final


@pytest.mark.asyncio
async def test_adding_a_model_sends_its_cluster_before_the_routes_that_use_it() -> None:
    c = controller()
    before = c.server.cache.snapshot
    published = spy_on_publish(c)
    await c.apply(yaml.safe_dump([model("b")]))
    make, routes, final = published
    b_cluster = "kvgate_model/b"
    assert b_cluster in make.get(CLUSTER).items and b_cluster in make.get(ENDPOINT).items
    assert route_names(make) == route_names(before) == {"a", "models_list", "model a", "unknown model"}
    # ext_proc admits b only once every Envoy has its route.
    assert make.get(POLICY).version == routes.get(POLICY).version == before.get(POLICY).version
    assert route_names(routes) == route_names(final)
    assert set(final.get(POLICY).items) == {"a", "b"}
    assert route_names(final) == {"a", "b", "models_list", "model a", "model b", "unknown model"}


@pytest.mark.asyncio
async def test_a_change_without_cluster_changes_is_one_publish() -> None:
    c = controller()
    published = spy_on_publish(c)
    await c.apply(yaml.safe_dump([model("a", max_output_tokens=9)]))
    assert len(published) == 1


# --- budget shares: in every snapshot, whichever change comes ------------------------------------

GROUPED = GatewaySettings(group_listen=(("kvgate-envoy-1", Address(host="127.0.0.1", port=8081)),))


def grouped_controller() -> Controller:
    catalog = parse_catalog({"models": [model("a")]})
    return Controller(XdsServer(render(catalog, GROUPED)), catalog, GROUPED)


def shares_in(snapshot: Snapshot) -> dict[str, float]:
    (packed,) = snapshot.get(BUDGET_SHARES).items.values()
    return dict(BudgetShares.FromString(packed.value).fraction)


def every_variant(snapshot: Snapshot) -> list[Snapshot]:
    return [snapshot, *snapshot.groups.values()]


def test_a_rendered_catalog_has_the_budget_not_divided_yet() -> None:
    snapshot = render(parse_catalog({"models": [model("a")]}), GROUPED)
    assert all(shares_in(s) == {} for s in every_variant(snapshot))


@pytest.mark.asyncio
async def test_a_catalog_change_keeps_the_shares_in_every_snapshot_it_publishes() -> None:
    c = grouped_controller()
    version = await c.set_shares({"ext-proc-0": 0.5, "ext-proc-1": 0.5})
    await c.apply(yaml.safe_dump([model("b")]))  # adds a cluster and a policy: three publishes
    published = spy_on_publish(c)
    await c.remove("b")  # drops one: the policy, the routes, then the cluster
    await c.apply(yaml.safe_dump([model("a", max_output_tokens=9)]))
    assert len(published) == 4
    for snapshot in published:
        assert {s.get(BUDGET_SHARES).version for s in every_variant(snapshot)} == {version}
        assert all(shares_in(s) == {"ext-proc-0": 0.5, "ext-proc-1": 0.5} for s in every_variant(snapshot))


@pytest.mark.asyncio
async def test_a_shares_change_keeps_the_catalogs_resources() -> None:
    c = grouped_controller()
    await c.apply(yaml.safe_dump([model("b")]))
    before = c.server.cache.snapshot
    published = spy_on_publish(c)
    await c.set_shares({"ext-proc-0": 1.0})
    (after,) = published
    for old, new in zip(every_variant(before), every_variant(after), strict=True):
        assert {t: r.version for t, r in new.by_type.items() if t != BUDGET_SHARES} == {
            t: r.version for t, r in old.by_type.items() if t != BUDGET_SHARES}
        assert shares_in(new) == {"ext-proc-0": 1.0}
    assert after.groups.keys() == before.groups.keys() and after.version != before.version


@pytest.mark.asyncio
async def test_shares_versions_come_from_their_content() -> None:
    c, other = controller(), grouped_controller()
    half = {"ext-proc-0": 0.5, "ext-proc-1": 0.5}
    version = await c.set_shares(half)
    assert await other.set_shares(dict(reversed(half.items()))) == version  # another control plane, same shares
    assert await c.set_shares({"ext-proc-0": 1.0}) != version
    assert await c.set_shares(half) == version
    published = spy_on_publish(c)
    served = c.server.cache.snapshot
    await c.set_shares(half)  # the same again: nothing new to push
    assert c.server.cache.snapshot is served and published[0].version == served.version
