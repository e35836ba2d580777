"""Changes to the served catalog, from the file watcher or the admin API: each one is validated as a
whole catalog and rendered before anything is published, so a refused change touches nothing."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import yaml

from kvgate.catalog import Catalog, CatalogError, parse_catalog
from xds_server.server import XdsServer
from xds_server.settings import GatewaySettings
from xds_server.snapshot import CLUSTER, ENDPOINT, ROUTE, Snapshot, build_snapshot


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


def models_from_yaml(text: str) -> list[dict[str, Any]]:
    try:
        data = yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as e:
        raise CatalogError([f"not YAML: {e}"]) from None
    models = data.get("models") if isinstance(data, dict) else data
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) for m in models):
        raise CatalogError(["expected a list of models, or a mapping with `models:`"])
    return models


@dataclass
class Controller:
    server: XdsServer
    catalog: Catalog
    settings: GatewaySettings
    # How long a cluster removal waits for every Envoy to ACK routes that no longer use it.
    bridge_timeout_s: float = 5.0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def replace(self, catalog: Catalog) -> bool:
        """Serve `catalog` instead; False when it renders to what is already served."""
        async with self._lock:
            return await self._serve(catalog)

    async def apply(self, models_yaml: str) -> bool:
        """Add or replace models by name."""
        incoming = models_from_yaml(models_yaml)
        names = {m.get("name") for m in incoming}
        async with self._lock:
            kept = [m for m in self.catalog.to_data()["models"] if m["name"] not in names]
            return await self._serve(parse_catalog({"models": kept + incoming}))

    async def remove(self, name: str) -> bool:
        async with self._lock:
            if self.catalog.model(name) is None:
                raise CatalogError([f"model {name!r} is not in the catalog"])
            kept = [m for m in self.catalog.to_data()["models"] if m["name"] != name]
            return await self._serve(parse_catalog({"models": kept}))

    async def _serve(self, catalog: Catalog) -> bool:
        snapshot = render(catalog, self.settings)  # raises before anything changes
        self.catalog = catalog
        served = self.server.cache.snapshot
        changed = snapshot.version != served.version
        # Make before break: Envoy routes to a cluster it has not warmed with a 503, and drops
        # requests still routed to a cluster it was told to remove. So new clusters (and their
        # endpoints) go out first, under the routes being served; then the new routes, with the
        # old clusters kept; the old clusters go last. Each step waits for every client's ACK.
        if served.stale_clusters(snapshot):  # clusters the new snapshot adds
            make = served.keeping_clusters_of(snapshot)
            await self.server.publish(make)
            for type_url in (CLUSTER, ENDPOINT):
                await self.server.wait_acked(type_url, make.get(type_url).version, timeout_s=self.bridge_timeout_s)
        if snapshot.stale_clusters(served):  # clusters it drops
            bridge = snapshot.keeping_clusters_of(served)
            await self.server.publish(bridge)
            await self.server.wait_acked(ROUTE, bridge.get(ROUTE).version, timeout_s=self.bridge_timeout_s)
        await self.server.publish(snapshot)
        return changed
