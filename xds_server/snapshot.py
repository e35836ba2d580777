"""A snapshot: every resource of every type, packed as protobuf Any and versioned by content.

Content-derived versions mean a restarted control plane, or a second replica, with the same catalog
gives the same versions, so reconnecting clients see no churn.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

from google.protobuf import any_pb2, json_format, message, symbol_database

# Importing the modules registers their types, which ParseDict needs to resolve "@type".
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2  # noqa: F401
from envoy.extensions.access_loggers.stream.v3 import stream_pb2  # noqa: F401
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2  # noqa: F401
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2  # noqa: F401
from envoy.extensions.load_balancing_policies.override_host.v3 import override_host_pb2  # noqa: F401
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from kvgate.catalog import Address, Catalog
from kvgate import wire
from kvgate import budget_shares as budget_shares_resource
from xds_server import policies, resources
from xds_server.settings import GatewaySettings

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
POLICY = wire.POLICY_TYPE_URL
BUDGET_SHARES = wire.BUDGET_SHARES_TYPE_URL
TENANT = wire.TENANT_TYPE_URL

# ADS push order: a cluster before its endpoints, both before the listener and routes that use them.
# ext_proc's types last: a new model's policy, then the shares that size its ledgers.
PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE, TENANT, POLICY, BUDGET_SHARES)

# Types whose clients subscribe to everything (an empty name list means "all").
WILDCARD_TYPES = frozenset({CLUSTER, LISTENER, TENANT, POLICY, BUDGET_SHARES})


@dataclass(frozen=True)
class Resources:
    """All resources of one type, by name, with one version for the set."""

    version: str
    items: dict[str, any_pb2.Any] = field(default_factory=dict)

    @classmethod
    def of(cls, named: dict[str, message.Message]) -> Resources:
        packed = {}
        for name, msg in named.items():
            packed[name] = any_pb2.Any()
            packed[name].Pack(msg, deterministic=True)
        return cls.packed(packed)

    @classmethod
    def packed(cls, items: dict[str, any_pb2.Any]) -> Resources:
        """From resources already packed; the version is a hash of names and contents."""
        ordered = dict(sorted(items.items()))
        digest = hashlib.sha256()
        for name, any_msg in ordered.items():
            digest.update(name.encode() + b"\0" + any_msg.value + b"\0")
        return cls(version=digest.hexdigest()[:16], items=ordered)

    def select(self, names: frozenset[str] | None) -> list[any_pb2.Any]:
        """The resources a subscription asked for (None: all); names not here yet are left out."""
        if names is None:
            return list(self.items.values())
        return [self.items[n] for n in sorted(names) if n in self.items]


@dataclass(frozen=True)
class Snapshot:
    by_type: dict[str, Resources]
    # Node groups (node.cluster) served a variant of this snapshot, e.g. another listener address.
    groups: dict[str, Snapshot] = field(default_factory=dict)

    def get(self, type_url: str) -> Resources:
        return self.by_type.get(type_url) or Resources(version="")

    def for_group(self, group: str) -> Snapshot:
        return self.groups.get(group, self)

    def with_types(self, replaced: dict[str, Resources]) -> Snapshot:
        """This snapshot with these types' resources replaced, in every group's variant too."""
        return Snapshot(by_type={**self.by_type, **replaced},
                        groups={g: v.with_types(replaced) for g, v in self.groups.items()})

    def keeping_clusters_of(self, old: Snapshot) -> Snapshot:
        """This snapshot, plus the clusters (and their endpoints) of `old` that it drops: served
        until every Envoy has routes that no longer use them (make before break)."""
        def merged(type_url: str) -> Resources:
            return Resources.packed({**old.get(type_url).items, **self.get(type_url).items})
        return self.with_types({CLUSTER: merged(CLUSTER), ENDPOINT: merged(ENDPOINT)})

    def stale_clusters(self, old: Snapshot) -> set[str]:
        """Clusters of `old` that this snapshot no longer has."""
        return set(old.get(CLUSTER).items) - set(self.get(CLUSTER).items)

    @property
    def version(self) -> str:
        parts = [r.version for r in self.by_type.values()] + [f"{g}={v.version}" for g, v in sorted(self.groups.items())]
        return hashlib.sha256("".join(parts).encode()).hexdigest()[:16]


def _parse(cls: type[message.Message], data: dict[str, Any]) -> message.Message:
    msg = json_format.ParseDict(data, cls())
    _repack_anys(msg)
    return msg


def _repack_anys(msg: message.Message) -> None:
    """ParseDict serializes nested Any (typed_config) at parse time, maps in whatever order the
    process happens to hold them: re-pack each deterministically, or the same catalog would hash to
    another version in another process and reconnecting Envoys would be re-sent everything."""
    for field, value in msg.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].type != field.TYPE_MESSAGE:
                continue
            items = list(value.values())
        else:
            items = list(value) if field.is_repeated else [value]
        for item in items:
            if isinstance(item, any_pb2.Any):
                inner = symbol_database.Default().GetSymbol(item.TypeName())()
                item.Unpack(inner)
                _repack_anys(inner)
                item.Pack(inner, type_url_prefix=item.type_url.rsplit("/", 1)[0] + "/", deterministic=True)
            else:
                _repack_anys(item)


def budget_shares(fractions: dict[str, float]) -> Resources:
    return Resources.of({wire.BUDGET_SHARES_NAME: budget_shares_resource.encode(fractions)})


def build_snapshot(catalog: Catalog, settings: GatewaySettings) -> Snapshot:
    """Render the whole catalog; raises if any rendered resource fails to parse as its type. The
    budget shares are not the catalog's: the ones here say "not divided yet" (shares.py), and the
    Controller replaces them with the ones it serves."""
    cluster_list = [_parse(cluster_pb2.Cluster, c) for c in resources.clusters(catalog, settings)]
    endpoint_list = [_parse(endpoint_pb2.ClusterLoadAssignment, e) for e in resources.endpoints(catalog)]
    route_dicts = [resources.route_configuration(catalog, settings)]
    if settings.proxyless_group:
        route_dicts += resources.proxyless_routes(catalog)
    route_list = [_parse(route_pb2.RouteConfiguration, r) for r in route_dicts]
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
        api = [_parse(listener_pb2.Listener, ls) for ls in resources.proxyless_listeners(catalog)]
        groups[settings.proxyless_group] = Snapshot({**by_type, LISTENER: Resources.of({ls.name: ls for ls in api})})
    return Snapshot(by_type=by_type, groups=groups)


def _listeners(settings: GatewaySettings, listen: Address) -> Resources:
    msg = _parse(listener_pb2.Listener, resources.listener(replace(settings, listen=listen)))
    return Resources.of({msg.name: msg})
