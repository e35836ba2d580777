"""Every name the gateway's processes agree on over the wire: one module, so that ext_proc and
xds_server share these without importing each other.

Envoy, ext_proc and xds_server each see the same strings from a different side: ext_proc sets the
headers and the dynamic metadata that the routes and the access log xds_server renders read; ext_proc
subscribes to the resource types xds_server serves, and reports itself in node metadata.
"""

from __future__ import annotations

# --- Headers --------------------------------------------------------------------------------------
# Set by ext_proc on an admitted request; the routes match it to pick the model's cluster.
MODEL_HEADER = "x-kvgate-model"
# The max_tokens ext_proc applied; Envoy copies it onto the response for the client.
MAX_TOKENS_HEADER = "x-kvgate-max-tokens"
# Set by ext_proc: the engine ("host:port") it reserved KV on; Envoy's override_host policy picks it.
ENDPOINT_HEADER = "x-kvgate-endpoint"
# Sent by clients: the priority class a request waits in when it does not fit yet.
PRIORITY_HEADER = "x-kvgate-priority"

# --- Envoy dynamic metadata -----------------------------------------------------------------------
# The namespace ext_proc writes its decision into; the ext_proc filter must list it in
# metadata_options.receiving_namespaces, and the access log prints %DYNAMIC_METADATA(kvgate)%.
DECISION_NAMESPACE = "kvgate"

# --- xDS resource types (kvgate's own, served beside Envoy's) ---------------------------------------
POLICY_TYPE_URL = "type.googleapis.com/kvgate.v1.ModelPolicy"
TENANT_TYPE_URL = "type.googleapis.com/kvgate.v1.Tenant"
BUDGET_SHARES_TYPE_URL = "type.googleapis.com/kvgate.v1.BudgetShares"
# The one BudgetShares resource's name.
BUDGET_SHARES_NAME = "budget-shares"

# --- Nodes ----------------------------------------------------------------------------------------
# node.cluster of every ext_proc replica: the control plane divides budgets among this group's streams.
EXT_PROC_GROUP = "kvgate-ext-proc"
# Node metadata (a number): the share a replica holds when it (re)connects. A restarted control
# plane divides from what the replicas hold, not from nothing.
HELD_SHARE_KEY = "kvgate.held_share"
# Node metadata (a string): where an ext_proc replica serves its /status.json. The control plane
# learns its replicas from their ADS streams, so nothing else has to list them.
STATUS_URL_KEY = "kvgate.status_url"

# --- Triton's gRPC service ------------------------------------------------------------------------
TRITON_GRPC_SERVICE = "/inference.GRPCInferenceService/"
