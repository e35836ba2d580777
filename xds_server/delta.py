"""One incremental (Delta) ADS stream as a pure state machine, beside sotw.py's state of the world.

The client says what it subscribes to (wildcard or names) and, on reconnect, which resource
versions it already has; each response carries only resources that changed for it, plus the names
it should drop. Resource versions are hashes of their content, computed once when the snapshot is
built (snapshot.py), not per stream. A NACKed resource version counts as sent, so it is not sent
again until it changes (no resend loop). After a cluster changes, its endpoints are sent again even
if unchanged, or Envoy's re-created cluster would warm forever.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource
from xds_server.acks import AckState, Nack
from xds_server.resource_types import CLUSTER, CONTROL_PLANE_ID, ENDPOINT, PUSH_ORDER, WILDCARD_TYPES
from xds_server.snapshot import Snapshot


@dataclass
class DeltaTypeState(AckState):  # its versions are the system versions of our responses
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    known: dict[str, str] = field(default_factory=dict)  # name -> version the client has (or refused)


@dataclass
class DeltaStream:
    snapshot: Snapshot
    types: dict[str, DeltaTypeState] = field(default_factory=dict)
    nacks: list[Nack] = field(default_factory=list)
    _nonce: int = 0

    def on_request(self, req: DeltaDiscoveryRequest) -> tuple[list[DeltaDiscoveryResponse], Nack | None]:
        first = req.type_url not in self.types
        state = self.types.setdefault(req.type_url, DeltaTypeState())
        nack = None
        if req.response_nonce and req.response_nonce == state.sent_nonce:
            nack = state.reply(req.type_url, req.error_detail if req.HasField("error_detail") else None,
                               state.sent_version or "")
            if nack:
                self.nacks.append(nack)
        if first:
            state.known = dict(req.initial_resource_versions)
            # Legacy wildcard: a first request for a wildcard type that names nothing.
            state.wildcard = req.type_url in WILDCARD_TYPES and not req.resource_names_subscribe
        subscribe, unsubscribe = set(req.resource_names_subscribe), set(req.resource_names_unsubscribe)
        state.wildcard = (state.wildcard or "*" in subscribe) and "*" not in unsubscribe
        state.names = (state.names | subscribe) - unsubscribe - {"*"}
        for name in unsubscribe:
            state.known.pop(name, None)
        response = self._diff(req.type_url, always=first)
        return ([response] if response else []), nack

    def on_snapshot(self, snapshot: Snapshot) -> list[DeltaDiscoveryResponse]:
        old, self.snapshot = self.snapshot, snapshot
        endpoints = self.types.get(ENDPOINT)
        if endpoints is not None:
            before = old.get(CLUSTER).versions
            changed_clusters = {n for n, v in snapshot.get(CLUSTER).versions.items() if before.get(n) != v}
            for name in changed_clusters:
                endpoints.known.pop(name, None)
        out = []
        for type_url in PUSH_ORDER:
            if type_url in self.types and (response := self._diff(type_url)):
                out.append(response)
        return out

    def _diff(self, type_url: str, always: bool = False) -> DeltaDiscoveryResponse | None:
        state = self.types[type_url]
        res = self.snapshot.get(type_url)
        wanted = {n: a for n, a in res.items.items() if state.wildcard or n in state.names}
        changed = [Resource(name=n, version=v, resource=a) for n, a in wanted.items()
                   if state.known.get(n) != (v := res.versions[n])]
        removed = sorted(n for n in state.known if n not in wanted)
        if not (changed or removed or always):
            return None
        for r in changed:
            state.known[r.name] = r.version
        for name in removed:
            del state.known[name]
        self._nonce += 1
        state.sent_nonce, state.sent_version = str(self._nonce), res.version
        return DeltaDiscoveryResponse(system_version_info=res.version, resources=changed, type_url=type_url,
                                      removed_resources=removed, nonce=state.sent_nonce,
                                      control_plane={"identifier": CONTROL_PLANE_ID})
