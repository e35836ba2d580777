"""The resource types this control plane serves: Envoy's and kvgate's own (proto/kvgate/v1), their ADS
push order, and which are wildcard. Only strings: the stream state machines and the cache need nothing
else of a type (docs/architecture.md, "The control plane")."""

from __future__ import annotations

from kvgate import wire

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

# Every response names the control plane that sent it (DiscoveryResponse.control_plane.identifier).
CONTROL_PLANE_ID = "kvgate-xds"
