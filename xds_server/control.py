"""Changes to the served snapshot. Catalog changes, from the file watcher or the admin API: each one
is validated as a whole catalog and rendered before anything is published, so a refused change
touches nothing. Budget shares, from ext_proc replicas joining and leaving (ShareKeeper). One lock
orders both, and every snapshot carries the other's current resources."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
import yaml

from kvgate.catalog import Catalog, CatalogError, parse_catalog
from xds_server import shares
from xds_server.render.build import budget_shares, build_snapshot
from xds_server.resource_types import BUDGET_SHARES, CLUSTER, ENDPOINT, POLICY, ROUTE
from xds_server.server import XdsServer
from xds_server.settings import GatewaySettings
from xds_server.snapshot import Resources, Snapshot


def render(catalog: Catalog, settings: GatewaySettings) -> Snapshot:
    """The snapshot for a catalog; rendering errors (e.g. an unstarted `sim`) refuse the catalog."""
    try:
        return build_snapshot(catalog, settings)
    except CatalogError:
        raise
    except ValueError as e:
        raise CatalogError([str(e)]) from None


# libyaml's loader when PyYAML has it: the admin call is on every API change's path.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def applied_models(text: str) -> tuple[list[dict[str, Any]], str]:
    """The models of an applied document, and where they sit in it: `models`, or "" for a bare list."""
    try:
        data = yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as e:
        raise CatalogError([f"not YAML: {e}"]) from None
    models = data.get("models") if isinstance(data, dict) else data
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) for m in models):
        raise CatalogError(["expected a list of models, or a mapping with `models:`"])
    return models, "models" if isinstance(data, dict) else ""


def models_from_yaml(text: str) -> list[dict[str, Any]]:
    return applied_models(text)[0]


@dataclass
class Controller:
    server: XdsServer
    catalog: Catalog
    settings: GatewaySettings
    # How long a cluster removal waits for every Envoy to ACK routes that no longer use it.
    bridge_timeout_s: float = 5.0
    # The budget shares served with every catalog; the ShareKeeper sets them.
    shares: Resources = field(default_factory=lambda: budget_shares({}))
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def replace(self, catalog: Catalog) -> bool:
        """Serve `catalog` instead; False when it renders to what is already served."""
        async with self._lock:
            return await self._serve(catalog)

    async def apply(self, models_yaml: str) -> bool:
        """Add or replace models by name. The applied models are validated first on their own (with
        the served catalog's priority classes), so that an error names a model where the user wrote
        it, not where it would sit in the served catalog; then the whole resulting catalog."""
        incoming, models_at = applied_models(models_yaml)
        names = {m.get("name") for m in incoming}
        async with self._lock:
            settings = {k: v for k, v in self.catalog.to_data().items() if k not in ("models", "tenants")}
            parse_catalog({**settings, "models": incoming}, models_at=models_at)
            return await self._serve(self._with_models(
                [m for m in self.catalog.to_data()["models"] if m["name"] not in names] + incoming))

    async def remove(self, name: str) -> bool:
        async with self._lock:
            if self.catalog.model(name) is None:
                raise CatalogError([f"model {name!r} is not in the catalog"])
            return await self._serve(self._with_models(
                [m for m in self.catalog.to_data()["models"] if m["name"] != name]))

    async def set_shares(self, fractions: Mapping[str, float]) -> str:
        """Serve these budget shares, with the catalog's resources as they are; returns their version."""
        async with self._lock:
            self.shares = budget_shares(dict(fractions))
            await self.server.publish(self._with_shares(self.server.cache.snapshot))
        return self.shares.version

    def _with_shares(self, snapshot: Snapshot) -> Snapshot:
        return snapshot.with_types({BUDGET_SHARES: self.shares})

    def _with_models(self, models: list[dict[str, Any]]) -> Catalog:
        """The served catalog with another model list; its other settings (priority classes) kept."""
        return parse_catalog({**self.catalog.to_data(), "models": models})

    async def _step(self, snapshot: Snapshot, *acked: str) -> None:
        await self.server.publish(snapshot)
        for type_url in acked:
            await self.server.wait_acked(type_url, snapshot.get(type_url).version, timeout_s=self.bridge_timeout_s)

    async def _serve(self, catalog: Catalog) -> bool:
        snapshot = self._with_shares(render(catalog, self.settings))  # raises before anything changes
        self.catalog = catalog
        served = self.server.cache.snapshot
        changed = snapshot.version != served.version
        # Make before break: Envoy routes to a cluster it has not warmed with a 503, and drops
        # requests still routed to a cluster it was told to remove. So new clusters (and their
        # endpoints) go out first, under the routes being served; then the new routes, with the
        # old clusters kept; the old clusters go last. Each step waits for every client's ACK.
        # ext_proc's policies follow the routes' life the same way: a model ext_proc admits always has
        # its route, else the admitted request would end on a route for requests nobody routed. So a
        # removed model's policy goes before its route (ext_proc refuses it, 404), an added one's
        # comes after its route.
        kept = set(served.get(POLICY).items) & set(snapshot.get(POLICY).items)
        if snapshot.clusters_added_since(served):
            make = served.keeping_clusters_of(snapshot)
            await self._step(make, CLUSTER, ENDPOINT)
        if set(served.get(POLICY).items) - kept:
            await self._step(self.server.cache.snapshot.with_policies_only(kept), POLICY)
        if snapshot.clusters_dropped_since(served) or set(snapshot.get(POLICY).items) - kept:
            await self._step(snapshot.keeping_clusters_of(served).with_policies_only(kept), ROUTE)
        await self.server.publish(snapshot)
        return changed


@dataclass
class ShareKeeper:
    """Divides every endpoint's budget among the connected ext_proc replicas (shares.py), again
    whenever one joins or leaves: each step is published through the Controller and ACKed by every
    replica before the next."""

    controller: Controller
    # A burst of joins (a fleet starting) becomes one division.
    debounce_s: float = 0.05
    # A replica that neither ACKs nor NACKs a step by then is logged and passed over.
    ack_timeout_s: float = 5.0
    # The longest a new control plane waits, before its first division, for replicas that held
    # shares to reconnect (above ext_proc's 5 s reconnect backoff).
    startup_grace_s: float = 6.0
    log: structlog.typing.FilteringBoundLogger = field(
        default_factory=lambda: structlog.get_logger(component="shares"))
    # What was published last; None until the first division.
    published: shares.Shares | None = None

    async def run(self) -> None:
        servicer = self.controller.server.servicer
        loop = asyncio.get_running_loop()
        grace_ends = loop.time() + self.startup_grace_s
        while True:
            in_grace = self.published is None and loop.time() < grace_ends
            try:
                await asyncio.wait_for(servicer.membership.wait(), grace_ends - loop.time() if in_grace else None)
            except TimeoutError:
                pass  # the startup grace is over: divide among the replicas that are back
            await asyncio.sleep(self.debounce_s)
            servicer.membership.clear()
            members = [shares.Member(c.node_id, shares.reported_share(c.metadata)) for c in servicer.members()]
            if (self.published is None and loop.time() < grace_ends
                    and not shares.all_holders_back(m.reported for m in members)):
                continue
            await self.divide(members)

    async def divide(self, members: list[shares.Member]) -> None:
        """Publish, step by step, equal shares for these connected replicas."""
        ids = [m.node_id for m in members]
        if not ids:
            return  # nobody to apply an empty map, which would mean "not divided yet" (shares.py)
        if duplicated := shares.duplicate_ids(ids):
            self.log.warning("shares.duplicate_node_id", nodes=duplicated,
                             detail="replicas with one node id share one entry; give each its own --node-id")
        for step in shares.steps(shares.held(members, self.published), shares.equal_shares(ids)):
            if step == self.published:
                continue  # served and ACKed already
            version = await self.controller.set_shares(step)
            self.published = step
            self.log.info("shares.published", version=version, shares=step)
            if not await self.controller.server.wait_acked(BUDGET_SHARES, version, self.ack_timeout_s):
                late = sorted(c.node_id for c in self.controller.server.unsettled(BUDGET_SHARES, version))
                self.log.warning("shares.ack_timeout", version=version, nodes=late, timeout_s=self.ack_timeout_s)
