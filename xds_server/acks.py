"""What clients answered to our responses, and waiting for their answers.

AckState is one client's answer per type, kept by both stream state machines (sotw.py, delta.py).
AckWaits is the ADS server's waits for every client to answer a version (make before break, budget
shares): the server tells it whenever a stream's state changes (a request handled, a push, a
disconnect) and it re-checks that one client against each wait, so a wait ends the moment the last
answer is recorded, with no polling and no walk over every client per answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

from google.rpc.status_pb2 import Status


@dataclass
class Nack:
    type_url: str
    version: str
    message: str


@dataclass
class AckState:
    """What one client has done with our responses of one type; shared by SotW and Delta streams."""

    sent_version: str | None = None
    sent_nonce: str = ""
    acked_version: str = ""
    nacked_version: str | None = None

    def reply(self, type_url: str, error_detail: Status | None, acked_version: str) -> Nack | None:
        """Record the client's answer to our last response: a NACK (returned) or an ACK."""
        if error_detail is not None:
            self.nacked_version = self.sent_version
            return Nack(type_url, self.sent_version or "", error_detail.message)
        self.acked_version = acked_version
        return None


def unanswered(types: Mapping[str, AckState], type_url: str, version: str) -> bool:
    """Whether a client with these per-type states subscribes to `type_url` and has neither ACKed
    nor NACKed `version` (a NACKed version it will not take: waiting longer helps nobody)."""
    state = types.get(type_url)
    return state is not None and version not in (state.acked_version, state.nacked_version)


@dataclass(eq=False)
class _Wait:
    type_url: str
    version: str
    pending: set[Hashable]  # the clients still to answer
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def update(self, client: Hashable, types: Mapping[str, AckState] | None) -> None:
        if types is not None and unanswered(types, self.type_url, self.version):
            self.pending.add(client)  # e.g. a client that subscribed after the wait began
        else:
            self.pending.discard(client)
        if not self.pending:
            self.done.set()


@dataclass
class AckWaits:
    _waits: set[_Wait] = field(default_factory=set)

    def changed(self, client: Hashable, types: Mapping[str, AckState] | None) -> None:
        """A client's stream state changed; `types` None: it disconnected."""
        for wait in self._waits:
            wait.update(client, types)

    async def wait(self, type_url: str, version: str, pending: set[Hashable], timeout_s: float) -> bool:
        """Until every client in `pending` (those that have not answered `version` of `type_url` yet)
        and any that subscribes meanwhile has answered it or disconnected. False on timeout."""
        if not pending:
            return True
        wait = _Wait(type_url, version, set(pending))
        self._waits.add(wait)
        try:
            async with asyncio.timeout(timeout_s):
                await wait.done.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self._waits.discard(wait)
