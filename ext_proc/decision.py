"""The decision about one request, step by step, each step returning a typed outcome. No gRPC and no
I/O: the rules over the admission state (ext_proc/state.py), unit-tested as plain functions.

    authenticate(...) -> Tenant | None | Refuse     the caller's key
    match_call(...)  -> Call | Lookup | Refuse      which API the path and content-type name
    check_call(...)  -> Refuse | None               its method; a body must follow
    parse(...)       -> Found | Pass | Refuse       the body: which model, may the tenant call it
    plan(...)        -> Planned | Refuse            priority class, prompt tokens, clamp, KV bytes
    charge(...)      -> Planned | Refuse            the tenant's rate limits
    first_try(...)   -> Admit | Refuse | Wait       reserve now, or wait for budget in the model's queue
    settle(...)      -> Admit | Refuse              what a reservation attempt (or wait) came to

The exchanges (http_exchange.py, stream_exchange.py) run the steps, do the waiting and the thread
hops, and turn outcomes into Envoy's messages (responses.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from ext_proc import admission, apis
from ext_proc.admission import Plan, Refusal
from ext_proc.ledger import Ledger, Reservation
from ext_proc.policy import Policy
from ext_proc.prefix_index import NO_BLOCKS, PrefixIndex, PromptBlocks, prompt_blocks
from ext_proc.ratelimit import Charge, OverLimit
from ext_proc.request import Parsed, ProtocolError, Rewrite
from ext_proc.state import AdmissionState
from ext_proc.tenants import Tenant, Unauthenticated
from ext_proc.waitqueue import WaitQueue
from kvgate.openai_models import MODELS_PATH, ModelCard, model_list, model_object
from kvgate.triton_index import REPOSITORY_INDEX_PATH, index_json
from kvgate.wire import PRIORITY_HEADER


# --- Outcomes -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Refuse:
    model: str  # "" when the request named no model of the catalog: clients choose those names
    refusal: Refusal
    headroom: tuple[int, ...] = ()  # each endpoint's, when budget was what it lacked (for the log)


@dataclass(frozen=True)
class Expect:
    """The headers are fine: the body decides."""

    call: apis.Call
    tenant: Tenant | None  # None: the gateway is open


@dataclass(frozen=True)
class Lookup:
    """Answered or routed by Envoy without admission (models list, metadata): only the key is checked."""


@dataclass(frozen=True)
class Answer:
    """A lookup ext_proc answers itself: the tenant's view of the catalog."""

    body: bytes


@dataclass(frozen=True)
class Pass:
    """A call that only names a model (Triton's ModelReady...): routed to it, nothing reserved."""

    model: str
    rewrite: Rewrite | None


@dataclass(frozen=True)
class Found:
    policy: Policy
    parsed: Parsed


@dataclass(frozen=True)
class Planned:
    """A parsed request with its plan, before any budget is taken."""

    policy: Policy
    parsed: Parsed
    plan: Plan
    priority_class: str
    counted: bool  # prompt tokens counted with the model's tokenizer, not bounded
    charge: Charge | None = None  # taken from the tenant's rate limits; refunded if refused later
    prefix: PromptBlocks = NO_BLOCKS  # its first prompt's block hashes, for prefix-aware routing


@dataclass(frozen=True)
class Admit:
    model: str
    max_tokens: int
    rewrite: Rewrite | None
    upstream: str | None  # the host Envoy's override_host policy must pick
    reservation: Reservation


# Envoy ends a finished request's ext_proc stream (its release) moments after the client has the
# answer, on another connection than the client's next request, which may be decided first on a busy
# machine. So a request that does not fit while reservations are held waits this long for one to end
# even when its class may not wait: a client sending one request after another must not be refused
# for budget its previous request no longer holds.
RELEASE_GRACE_S = 0.1


@dataclass(frozen=True)
class Wait:
    """Nothing fits now: wait this long in the model's queue (the class's max_wait_s, or the release grace)."""

    seconds: float
    queue: WaitQueue[Reservation]
    rank: int

    @property
    def needs_longer_timeout(self) -> bool:
        """Longer than the release grace: Envoy, whose message timeout is seconds, must be told."""
        return self.seconds > RELEASE_GRACE_S


NOT_LOADED = Refusal(503, "policies_not_loaded", "The gateway has not received its model policies yet.",
                     type_="service_unavailable", retry_after=1)
UNKNOWN_URL = ("The gateway admits the OpenAI API, Triton's generate and KServe v2 infer over HTTP, "
               "and Triton's gRPC inference.")


# --- Steps ----------------------------------------------------------------------------------------

def authenticate(state: AdmissionState, headers: Mapping[str, str]) -> Tenant | None | Refuse:
    """The caller's tenant (None: the gateway is open), checked before any body is read, and before
    an unknown URL is even told apart."""
    if not state.ready:
        return Refuse("", NOT_LOADED)
    caller = state.tenants.authenticate(headers)
    if isinstance(caller, Unauthenticated):
        return Refuse("", Refusal(401, "invalid_api_key", caller.message))
    return caller


def match_call(headers: Mapping[str, str], path: str) -> apis.Call | Lookup | Refuse:
    content_type = headers.get("content-type", "")
    call = apis.match(path, content_type)
    if call is not None:
        return call
    if apis.is_lookup(headers.get(":method", ""), path, content_type):
        return Lookup()
    return Refuse("", Refusal(404, "unknown_url", f"Unknown request URL: {path}. {UNKNOWN_URL}"))


def lookup(state: AdmissionState, tenant: Tenant | None, path: str) -> Lookup | Answer | Refuse:
    """A lookup as the caller may see it: an open gateway's are Envoy's to answer; a tenant sees only
    the models it may call (the models list and objects answered here, another model's Triton
    metadata refused)."""
    if tenant is None:
        return Lookup()
    if path == MODELS_PATH:
        return Answer(model_list(_card(p) for p in state.policies.values() if p.protocol == "openai"
                                 and tenant.may_call(p.name)))
    if path.startswith(f"{MODELS_PATH}/"):
        policy = state.policies.get(path[len(MODELS_PATH) + 1:])
        if policy is None or policy.protocol != "openai" or not tenant.may_call(policy.name):
            return Refuse("", Refusal(404, "model_not_found", "The model does not exist.", param="model"))
        return Answer(model_object(_card(policy)))
    if path == REPOSITORY_INDEX_PATH:
        return Answer(index_json(triton_models(state, tenant)))
    model = _triton_model_in(state, path)
    if model is not None and not tenant.may_call(model):
        return Refuse(model, Refusal(403, "permission_denied", f"Tenant {tenant.name!r} may not call model {model!r}."))
    return Lookup()


def triton_models(state: AdmissionState, tenant: Tenant | None) -> list[str]:
    """The Triton models the caller may call (all of them on an open gateway)."""
    return sorted(p.name for p in state.policies.values()
                  if p.protocol == "triton" and (tenant is None or tenant.may_call(p.name)))


def _card(policy: Policy) -> ModelCard:
    return ModelCard(policy.name, policy.max_context_tokens, policy.max_output_tokens)


def _triton_model_in(state: AdmissionState, path: str) -> str | None:
    """The model a Triton metadata path (/v2/models/<name>[/...]) names; names may hold slashes."""
    rest = path.removeprefix("/v2/models/")
    if rest == path:
        return None
    return next((name for name in state.policies if rest == name or rest.startswith(f"{name}/")), None)


def check_call(call: apis.Call, method: str, path: str, body_follows: bool) -> Refuse | None:
    if method != "POST":
        return Refuse("", Refusal(405, "method_not_allowed", f"{path} takes POST"))
    if not body_follows:
        return Refuse("", Refusal(400, "invalid_request", "request body is empty"))
    return None


def _not_found(model: str, policy: Policy | None) -> str:
    if policy is None:
        return f"The model {model!r} does not exist."
    return f"The model {model!r} is served over the {policy.protocol} protocol; use that API for it."


def parse(state: AdmissionState, expect: Expect, headers: Mapping[str, str], raw: bytes) -> Found | Pass | Refuse:
    """Parse and find the policy: a request to plan, a lookup to pass on, or the refusal."""
    call, tenant = expect.call, expect.tenant
    try:
        parsed = call.api.parse(call.model, headers, raw)
    except ProtocolError as e:
        return Refuse("", Refusal(e.status, e.code, str(e), param=e.param))
    llm = parsed.request
    policy = state.policies.get(llm.model)
    if policy is not None and tenant is not None and not tenant.may_call(policy.name):
        return Refuse(policy.name, Refusal(403, "permission_denied",
                                           f"Tenant {tenant.name!r} may not call model {policy.name!r}.", param="model"))
    if policy is None or policy.protocol != call.api.protocol:
        # Unknown names stay out of the metric labels: clients choose them.
        return Refuse("", Refusal(404, "model_not_found", _not_found(llm.model, policy), param="model"))
    if not llm.admit:
        return Pass(policy.name, parsed.rewrite(None, policy.backend_model))
    return Found(policy, parsed)


def priority_class(policy: Policy, tenant: Tenant | None, asked: str | None) -> str | Refuse:
    """The class a request waits in: asked for in its header, else its tenant's, else the model's
    default; a tenant's class is the highest its requests may ask for."""
    chosen = asked or (tenant and tenant.priority_class) or policy.default_priority_class
    ceiling = tenant.priority_class if tenant else ""
    if ceiling and policy.max_wait_s(chosen) is not None and policy.rank(chosen) < policy.rank(ceiling):
        chosen = ceiling
    if policy.max_wait_s(chosen) is None:
        return Refuse(policy.name, Refusal(
            400, "invalid_priority_class", f"{PRIORITY_HEADER} {chosen!r} is not a priority class of model "
            f"{policy.name!r}: use one of {', '.join(n for n, _ in policy.priority_classes)}", param=PRIORITY_HEADER))
    return chosen


def plan(state: AdmissionState, found: Found, tenant: Tenant | None, headers: Mapping[str, str]) -> Planned | Refuse:
    policy = found.policy
    chosen = priority_class(policy, tenant, headers.get(PRIORITY_HEADER))
    if isinstance(chosen, Refuse):
        return chosen
    counter = state.tokenizers.counter_for(policy)
    planned = admission.plan(found.parsed.request, policy, counter)
    if isinstance(planned, Refusal):
        return Refuse(policy.name, planned)
    return Planned(policy, found.parsed, planned, chosen, counted=counter is not None,
                   prefix=_prefix(found.parsed.request.prompts, policy))


def _prefix(prompts: tuple[tuple[str, ...], ...], policy: Policy) -> PromptBlocks:
    """The first prompt's blocks (a batch's prompts mostly share theirs), when there is a choice to make."""
    if policy.routing != "prefix" or len(policy.endpoints) < 2 or not prompts:
        return NO_BLOCKS
    return prompt_blocks(prompts[0], policy.tokens_per_block)


def charge(state: AdmissionState, planned: Planned, tenant: Tenant | None, now: float) -> Planned | Refuse:
    """Charge the tenant's rate limits for what the request may use."""
    # With no share yet (a replica just joined) the request waits for one; its limit would be 0.
    if tenant is None or state.limits.share <= 0:
        return planned
    taken = state.limits.charge(tenant, planned.plan.tokens, now)
    if isinstance(taken, OverLimit):
        needs = 1 if taken.what == "requests" else planned.plan.tokens
        return Refuse(planned.policy.name, Refusal(
            429, "rate_limit_exceeded", f"Rate limit reached for tenant {tenant.name!r} on {taken.what} per minute: "
            f"limit {taken.limit} on this gateway replica, this request needs {needs}.",
            type_=taken.what, retry_after=taken.retry_after))
    return replace(planned, charge=taken)


def refund(state: AdmissionState, planned: Planned, now: float) -> None:
    """The request never ran: the tenant gets its tokens back."""
    if planned.charge is not None:
        state.limits.refund(planned.charge, now)


def try_reserve(planned: Planned, ledgers: list[Ledger], now: float, ttl_s: float,
                prefixes: PrefixIndex | None = None) -> Reservation | Refusal | None:
    """Reserve on the endpoint admission chooses, with the prompt's expected prefix hits when given
    where prefixes were routed (None: on headroom alone)."""
    hits = None if prefixes is None else prefixes.expected_hits(
        planned.policy.name, (lg.endpoint for lg in ledgers), planned.prefix)
    return admission.admit(planned.plan, planned.policy, ledgers, now, ttl_s, hits)


def first_try(state: AdmissionState, planned: Planned, body_bytes: int, now: float, ttl_s: float,
              grpc: bool, prefixes: PrefixIndex | None = None) -> Admit | Refuse | Wait:
    """Reserve now; or, when nothing fits, wait if the request's class may (or a release may be on its
    way: RELEASE_GRACE_S) and its queue has room for one more waiter and its body."""
    ledgers = state.ledgers_of(planned.policy)
    held = try_reserve(planned, ledgers, now, ttl_s, prefixes)
    wait_s = planned.policy.max_wait_s(planned.priority_class) or 0.0
    if held is None and any(lg.active for lg in ledgers):
        wait_s = max(wait_s, RELEASE_GRACE_S)
    queue = state.queues.get(planned.policy.name)
    # No engine of the model can be seen (every one's metrics stale): waiting would only delay the 503.
    blind = bool(ledgers) and all(lg.blind for lg in ledgers)
    if held is None and wait_s > 0 and not blind and queue is not None and queue.has_room(body_bytes):
        return Wait(wait_s, queue, planned.policy.rank(planned.priority_class))
    return settle(state, planned, held, ledgers, now, grpc)


def settle(state: AdmissionState, planned: Planned, held: Reservation | Refusal | None, ledgers: list[Ledger],
           now: float, grpc: bool) -> Admit | Refuse:
    """Admitted (with the endpoint reserved on), or the refusal; None means it never fitted. The
    endpoint and engine names come from the latest policy: it may have changed while a request waited."""
    policy = state.policies.get(planned.policy.name, planned.policy)
    headroom: tuple[int, ...] = ()
    if held is None:
        held = admission.busy(planned.plan, policy, ledgers, now)
        headroom = tuple(lg.headroom for lg in ledgers)
    if isinstance(held, Refusal):
        refund(state, planned, now)
        return Refuse(policy.name, held, headroom)
    endpoint = policy.endpoint(held.ledger.endpoint)
    max_tokens = planned.plan.max_tokens
    return Admit(policy.name, max_tokens, planned.parsed.rewrite(max_tokens, policy.backend_model),
                 endpoint.upstream(grpc=grpc) if endpoint else None, held)
