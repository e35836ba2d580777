"""A catalog's whole snapshot: every type rendered, parsed, packed and versioned, with the variants of
the node groups that differ (docs/architecture.md, "The control plane" and "Live changes")."""

from __future__ import annotations

from dataclasses import replace

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from kvgate import budget_shares as budget_shares_resource
from kvgate import wire
from kvgate.catalog import Address, Catalog
from xds_server.render import policies, resources
from xds_server.render.protos import parse
from xds_server.resource_types import BUDGET_SHARES, CLUSTER, ENDPOINT, LISTENER, POLICY, ROUTE, TENANT
from xds_server.settings import GatewaySettings
from xds_server.snapshot import Resources, Snapshot


def budget_shares(fractions: dict[str, float]) -> Resources:
    return Resources.of({wire.BUDGET_SHARES_NAME: budget_shares_resource.encode(fractions)})


def build_snapshot(catalog: Catalog, settings: GatewaySettings) -> Snapshot:
    """Render the whole catalog; raises if any rendered resource fails to parse as its type. The
    budget shares are not the catalog's: the ones here say "not divided yet" (shares.py), and the
    Controller replaces them with the ones it serves."""
    cluster_list = [parse(Cluster, c) for c in resources.clusters(catalog, settings)]
    endpoint_list = [parse(ClusterLoadAssignment, e) for e in resources.endpoints(catalog)]
    route_dicts = [resources.route_configuration(catalog, settings)]
    if settings.proxyless_group:
        route_dicts += resources.proxyless_routes(catalog)
    route_list = [parse(RouteConfiguration, r) for r in route_dicts]
    by_type = {
        CLUSTER: Resources.of({c.name: c for c in cluster_list}),
        ENDPOINT: Resources.of({e.cluster_name: e for e in endpoint_list}),
        LISTENER: _listeners(settings, settings.listen),
        ROUTE: Resources.of({r.name: r for r in route_list}),
        POLICY: Resources.of({p.name: p for p in policies.policies(catalog)}),
        TENANT: Resources.of({t.name: t for t in policies.tenants(catalog)}),
        BUDGET_SHARES: budget_shares({}),
    }
    # Envoy fleets that differ only in where their listener binds (several Envoys on one host).
    groups = {group: Snapshot({**by_type, LISTENER: _listeners(settings, addr)}) for group, addr in settings.group_listen}
    if settings.proxyless_group:
        api = [parse(Listener, ls) for ls in resources.proxyless_listeners(catalog)]
        groups[settings.proxyless_group] = Snapshot({**by_type, LISTENER: Resources.of({ls.name: ls for ls in api})})
    return Snapshot(by_type=by_type, groups=groups)


def _listeners(settings: GatewaySettings, listen: Address) -> Resources:
    msg = parse(Listener, resources.listener(replace(settings, listen=listen)))
    return Resources.of({msg.name: msg})
