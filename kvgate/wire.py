"""Every name the gateway's processes agree on over the wire: one module, so that ext_proc and
xds_server share these without importing each other.

Envoy, ext_proc and xds_server each see the same strings from a different side: ext_proc sets the
headers and the dynamic metadata that the routes and the access log xds_server renders read; ext_proc
subscribes to the resource types xds_server serves, and reports itself in node metadata.
"""

from __future__ import annotations

# --- Headers --------------------------------------------------------------------------------------
# Set by ext_proc on an admitted request: a header mutation must come with a route-cache clear, or
# Envoy ignores the clear (the routes match the decision's metadata, not this).
MODEL_HEADER = "x-kvgate-model"
# The max_tokens ext_proc applied, on the response for the client.
MAX_TOKENS_HEADER = "x-kvgate-max-tokens"
# Sent by clients: the priority class a request waits in when it does not fit yet.
PRIORITY_HEADER = "x-kvgate-priority"

# Sent by clients: where an API key may be (OpenAI SDKs and curl: `Authorization: Bearer KEY`; Azure-
# style SDKs: `api-key`; tritonclient: whatever headers its caller gives it).
API_KEY_HEADERS = ("authorization", "api-key", "x-api-key")
# KServe's binary-tensor extension: the length of the JSON part that precedes the raw tensors.
BINARY_HEADER = "inference-header-content-length"
# Every request header ext_proc reads, besides the path and method.
ADMISSION_HEADERS = ("content-type", "content-encoding", "x-request-id", PRIORITY_HEADER, BINARY_HEADER,
                     *API_KEY_HEADERS)


def header_attribute(name: str) -> str:
    """The CEL expression Envoy evaluates to send header `name` to ext_proc as a request attribute.
    Attributes travel as protobuf strings, which must be UTF-8: a value with any byte outside printable
    ASCII would make the whole message unreadable, so it is sent as "\ufffd" instead (no API key, class
    name or content type is anything but ASCII)."""
    value = f"request.headers['{name}']"
    return f"{value}.matches('^[ -~]*$') ? {value} : '\ufffd'"


# With one exchange per request, Envoy sends what ext_proc needs of the headers as attributes of the
# body message, keyed by these expressions; the value is the header name ext_proc reads it as.
ADMISSION_ATTRIBUTES = {
    "request.method": ":method",
    "request.path.matches('^[ -~]*$') ? request.path : '\ufffd'": ":path",
    **{header_attribute(name): name for name in ADMISSION_HEADERS},
}

# --- Envoy dynamic metadata -----------------------------------------------------------------------
# The namespace ext_proc writes its decision into; the ext_proc filter must list it in
# metadata_options.receiving_namespaces, and the access log prints %DYNAMIC_METADATA(kvgate)%. The
# routes match its `model`, the clusters' override_host policy picks its `upstream` (else `endpoint`),
# and responses carry its `max_tokens` back in MAX_TOKENS_HEADER.
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

# --- What the gateway admits ----------------------------------------------------------------------
# The OpenAI API's calls that generate, and the Responses API's.
OPENAI_CHAT_PATH = "/v1/chat/completions"
OPENAI_COMPLETIONS_PATH = "/v1/completions"
OPENAI_RESPONSES_PATH = "/v1/responses"
# Embeddings: admitted for the KV their prefill takes (docs/clients/embeddings-tokenize.md).
OPENAI_EMBEDDINGS_PATH = "/v1/embeddings"
# vLLM's tokenizer calls: routed to the model's engine by the body's model, nothing reserved.
TOKENIZE_PATH = "/tokenize"
DETOKENIZE_PATH = "/detokenize"
# Every POST whose body ext_proc parses in OpenAI's convention (Envoy answers a bodiless one).
OPENAI_PATHS = (OPENAI_CHAT_PATH, OPENAI_COMPLETIONS_PATH, OPENAI_RESPONSES_PATH, OPENAI_EMBEDDINGS_PATH,
                TOKENIZE_PATH, DETOKENIZE_PATH)
# Anthropic's Messages API (vLLM serves it), errors in Anthropic's shape: messages are admitted, token
# counts routed to the model's engine. Everything under the messages path is in that convention.
ANTHROPIC_MESSAGES_PATH = "/v1/messages"
ANTHROPIC_COUNT_TOKENS_PATH = "/v1/messages/count_tokens"
ANTHROPIC_PATHS = (ANTHROPIC_MESSAGES_PATH, ANTHROPIC_COUNT_TOKENS_PATH)
# Triton's generate, generate_stream and KServe infer calls, the model (and version) in the path.
TRITON_CALL_PATH = r"^/v2/models/(?P<model>.+?)(?:/versions/[^/]+)?/(?P<op>generate|generate_stream|infer)$"
TRITON_GRPC_SERVICE = "/inference.GRPCInferenceService/"


# --- Anthropic's errors ---------------------------------------------------------------------------
# Anthropic's error `type` for each HTTP status (its API's errors page), for ext_proc's refusals and
# Envoy's own answers on those paths alike. The status stays the gateway's: a full KV budget is 429
# rate_limit_error as over every other API, not Anthropic's 529 overloaded_error (which the anthropic
# SDK retries the same way, and which no HTTP tooling between client and gateway knows); a 503 (no
# engine reachable, gateway starting) is overloaded_error, the type Anthropic's clients read as "busy".
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         500: "api_error", 503: "overloaded_error", 504: "timeout_error"}


def anthropic_error_type(status: int) -> str:
    """Anthropic's error type for `status`; a status it names none for gets its class's general type, as
    Anthropic's API gives it."""
    return ANTHROPIC_ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
