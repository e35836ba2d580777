"""What one ext_proc replica knows, as the control plane updates it: the policies, each endpoint's
ledger and wait queue, the tokenizers, the tenants and their rate limits, and this replica's share.

ADS updates (ext_proc/__main__.py) replace parts of it; the exchanges read it and take budget from it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from ext_proc.ledger import Ledger, Ledgers, Reservation
from ext_proc.policy import Policy
from ext_proc.ratelimit import RateLimits
from ext_proc.tenants import TenantTable
from ext_proc.tokenizer import Tokenizers
from ext_proc.waitqueue import WaitingBytes, WaitQueue


@dataclass
class AdmissionState:
    """Current policies by model name, their ledgers and wait queues; `loaded` stays False until the
    first xDS update arrives."""

    ledgers: Ledgers
    policies: dict[str, Policy] = field(default_factory=dict)
    loaded: bool = False
    max_waiting: int = 1000  # per model; beyond it a request that does not fit is refused at once
    queues: dict[str, WaitQueue[Reservation]] = field(default_factory=dict)
    waiting_bytes: WaitingBytes = field(default_factory=WaitingBytes)  # bodies held by every queue
    tokenizers: Tokenizers = field(default_factory=Tokenizers)
    tenants: TenantTable = field(default_factory=TenantTable)
    limits: RateLimits = field(default_factory=RateLimits)
    _loading: asyncio.Task[None] | None = None
    # Model -> the models drawing on a pool with it (itself included): budget one frees, all may use.
    _mates: dict[str, frozenset[str]] = field(default_factory=dict)

    def replace(self, policies: list[Policy]) -> None:
        drawing = [(p, e) for p in policies for e in p.endpoints]
        # Models on one pool agree on its budget (the catalog checks it); if they ever do not, the
        # smallest holds, so that no name's policy admits beyond its own.
        budgets: dict[str, int] = {}
        for _, e in drawing:
            budgets[e.pool] = min(budgets.get(e.pool, e.budget_bytes), e.budget_bytes)
        scraped = {e.pool for p, e in drawing if p.metrics_interval_s}
        mates: dict[str, set[str]] = {}
        for p, e in drawing:
            ledger = self.ledgers.set_budget(p.name, e.address, budgets[e.pool], e.pool)
            if e.pool not in scraped:  # not scraped (any more): the ledger alone counts
                ledger.blind, ledger.excess = False, 0
            mates.setdefault(e.pool, set()).add(p.name)
        self.ledgers.retain({(p.name, e.address) for p, e in drawing})
        self._mates = {p.name: frozenset(m for e in p.endpoints for m in mates[e.pool]) for p in policies}
        self.policies = {p.name: p for p in policies}
        # The same queue for a model that stays: its waiters sleep on it (an empty one too, since a
        # request may be on its way into it).
        self.queues = {p.name: self.queues[p.name] if p.name in self.queues else
                       WaitQueue(self.max_waiting, self.waiting_bytes) for p in policies}
        self.loaded = True
        self.wake_all()
        # Until a tokenizer is loaded (off the event loop) its model's prompts are bounded, not counted.
        with contextlib.suppress(RuntimeError):  # no running loop: unit tests that load none
            self._loading = asyncio.get_running_loop().create_task(self.tokenizers.update(policies))

    @property
    def ready(self) -> bool:
        """Both policies and tenants heard from the control plane: admitting before that could let
        through a request without a key, or refuse one for want of a model."""
        return self.loaded and self.tenants.loaded

    def set_share(self, fraction: float) -> None:
        """This replica's part of every endpoint's budget (and of every tenant's rate limits), as the
        control plane divides it."""
        self.ledgers.set_share(fraction)
        self.limits.share = fraction
        self.wake_all()

    def ledgers_of(self, policy: Policy) -> list[Ledger]:
        return self.ledgers.of_model(policy.name, [e.address for e in policy.endpoints])

    def current_ledgers(self, model: str) -> list[Ledger]:
        """The model's ledgers as the latest policy has them (none if it was removed): what a request
        that waited must be admitted on, whatever changed while it waited."""
        policy = self.policies.get(model)
        return self.ledgers_of(policy) if policy is not None else []

    def headroom(self, model: str) -> int:
        """The most KV bytes any endpoint of the model has free now."""
        return max((lg.headroom for lg in self.current_ledgers(model)), default=0)

    def queue_lengths(self) -> dict[str, int]:
        return {m: len(q) for m, q in self.queues.items()}

    def wake(self, model: str) -> None:
        """Budget of `model` may have freed up: offer it to the requests waiting for it, and for every
        model that shares a KV pool with it."""
        for mate in sorted(self._mates.get(model, {model})):
            self._wake_one(mate)

    def wake_all(self) -> None:
        for model in self.queues:
            self._wake_one(model)

    def _wake_one(self, model: str) -> None:
        queue = self.queues.get(model)
        if queue is not None:
            queue.wake(lambda: self.headroom(model))
