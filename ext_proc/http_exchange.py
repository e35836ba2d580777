"""A request whose body arrives whole (every HTTP API, and unary gRPC): parse, count, plan, charge,
reserve (or wait for budget in the model's queue), then one answer that admits or refuses it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingResponse
from ext_proc import decision, responses, tokens
from ext_proc.apis import Convention
from ext_proc.decision import Admit, Found, Pass, Planned, Refuse, Wait
from ext_proc.admission import Refusal
from ext_proc.exchange import Exchange
from ext_proc.ledger import Reservation


async def on_body(ex: Exchange, raw: bytes) -> AsyncIterator[ProcessingResponse]:
    assert ex.expect is not None  # a refused call ends at its headers
    gate, state = ex.gate, ex.gate.table
    found = decision.parse(state, ex.expect, ex.headers, raw)
    if isinstance(found, Pass):
        ex.passed(found)
        yield responses.admit(found.model, found.rewrite)
        return
    if isinstance(found, Refuse):
        yield ex.refuse(found)
        return
    await _count_off_loop(ex, found)
    planned = decision.plan(state, found, ex.expect.tenant, ex.headers)
    if isinstance(planned, Planned):
        ex.planned(planned)
        planned = decision.charge(state, planned, ex.expect.tenant, gate.clock())
    if isinstance(planned, Refuse):
        yield ex.refuse(planned)
        return
    grpc = ex.convention is Convention.GRPC
    outcome = decision.first_try(state, planned, len(raw), gate.clock(), gate.reservation_ttl_s, grpc, gate.prefixes)
    if isinstance(outcome, Wait):
        if outcome.needs_longer_timeout:  # Envoy would give up after its message timeout: say how long
            yield responses.wait_longer(outcome.seconds + 1)
        outcome = await _wait(ex, planned, outcome, len(raw), grpc)
    if isinstance(outcome, Refuse):
        yield ex.refuse(outcome)
        return
    ex.admitted(outcome)
    gate.prefixes.record(outcome.model, outcome.reservation.ledger.endpoint, planned.prefix,
                         planned.plan.prompt_tokens_total)
    yield responses.admit(outcome.model, outcome.rewrite)


async def _wait(ex: Exchange, planned: Planned, wait: Wait, body_bytes: int, grpc: bool) -> Admit | Refuse:
    """Wait in the model's queue. The model's ledgers are looked up at every try, not once: a policy
    pushed meanwhile may have moved, resized or removed its endpoints."""
    gate, state, model = ex.gate, ex.gate.table, planned.policy.name

    def attempt() -> Reservation | Refusal | None:
        return decision.try_reserve(planned, state.current_ledgers(model), gate.clock(), gate.reservation_ttl_s,
                                    gate.prefixes)

    started = gate.clock()
    try:
        held = await wait.queue.wait(wait.rank, attempt, wait.seconds, release=gate.release,
                                     need=planned.plan.nbytes, body_bytes=body_bytes)
    except asyncio.CancelledError:  # the client left while waiting: it never ran
        decision.refund(state, planned, gate.clock())
        raise
    ex.record.waited_s = gate.clock() - started
    gate.decisions.waited(model, ex.record.waited_s, held is not None)
    return decision.settle(state, planned, held, state.current_ledgers(model), gate.clock(), grpc)


async def _count_off_loop(ex: Exchange, found: Found) -> None:
    """Tokenizing a long new prompt takes milliseconds (about 1 ms per KB): do it in a thread, so the
    event loop keeps serving other requests, and let the plan read the counts from the cache. Short
    prompts are counted inline: the thread hop costs more than they do."""
    counter = ex.gate.table.tokenizers.counter_for(found.policy)
    if counter is None or found.parsed.request.exact_prompt_tokens:
        return
    pieces = tokens.texts(found.parsed.request, found.policy, counter).flat
    if sum(map(len, pieces)) > ex.gate.inline_count_chars:
        await counter.prefetch(pieces)
