"""Header names the gateway's parts agree on (ext_proc sets them, Envoy routes and echoes them)."""

# Set by ext_proc on an admitted request; the routes match it to pick the model's cluster.
MODEL_HEADER = "x-kvgate-model"
# The max_tokens ext_proc applied; Envoy copies it onto the response for the client.
MAX_TOKENS_HEADER = "x-kvgate-max-tokens"
# Set by ext_proc: the engine ("host:port") it reserved KV on; Envoy's override_host policy picks it.
ENDPOINT_HEADER = "x-kvgate-endpoint"
# Sent by clients: the priority class a request waits in when it does not fit yet.
PRIORITY_HEADER = "x-kvgate-priority"
