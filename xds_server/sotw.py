"""One state-of-the-world ADS stream as a pure state machine: requests and snapshots in, responses out.

The rules (docs/architecture.md, "The control plane"): responses go out in PUSH_ORDER; ignore requests
carrying a stale nonce; a NACK (error_detail set) is recorded and the rejected version is not sent
again until the config changes; names a client asked for that don't exist yet are remembered and
served when they appear; after a cluster change the endpoints are re-sent even if unchanged, or
Envoy's re-created clusters would warm forever.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
from xds_server.acks import AckState, Nack
from xds_server.resource_types import CLUSTER, CONTROL_PLANE_ID, ENDPOINT, PUSH_ORDER, WILDCARD_TYPES
from xds_server.snapshot import Snapshot


@dataclass
class TypeState(AckState):
    names: frozenset[str] | None = None  # None: wildcard


@dataclass
class SotwStream:
    snapshot: Snapshot
    types: dict[str, TypeState] = field(default_factory=dict)
    nacks: list[Nack] = field(default_factory=list)
    _nonce: int = 0

    def on_request(self, req: DiscoveryRequest) -> tuple[list[DiscoveryResponse], Nack | None]:
        """Handle one client request; also returns the NACK it carried, for the caller to log."""
        state = self.types.setdefault(req.type_url, TypeState())
        first = state.sent_version is None
        if not first and req.response_nonce and req.response_nonce != state.sent_nonce:
            return [], None  # answers a response we have since superseded
        nack = None
        if req.HasField("error_detail") or req.response_nonce:
            nack = state.reply(req.type_url, req.error_detail if req.HasField("error_detail") else None,
                               req.version_info)
            if nack:
                self.nacks.append(nack)
        names = self._requested_names(req)
        names_changed = names != state.names
        state.names = names
        version = self.snapshot.get(req.type_url).version
        # Behind, unless what it lacks is the version it rejected: that is held until the config changes.
        behind = req.version_info != version and state.nacked_version != version
        if first and req.version_info and not behind:
            # A client back after a control-plane restart already has this version: nothing to send.
            state.sent_version = state.acked_version = version
            return [], nack
        if first or names_changed or behind:
            return [self._respond(req.type_url)], nack
        return [], nack

    def on_snapshot(self, snapshot: Snapshot) -> list[DiscoveryResponse]:
        """Push, in ADS order, every subscribed type whose version changed."""
        old, self.snapshot = self.snapshot, snapshot
        clusters_changed = old.get(CLUSTER).version != snapshot.get(CLUSTER).version
        out = []
        for type_url in PUSH_ORDER:
            state = self.types.get(type_url)
            if state is None or state.sent_version is None:
                continue
            changed = snapshot.get(type_url).version != state.sent_version
            if changed or (type_url == ENDPOINT and clusters_changed):
                out.append(self._respond(type_url))
        return out

    @staticmethod
    def _requested_names(req: DiscoveryRequest) -> frozenset[str] | None:
        names = frozenset(req.resource_names)
        if req.type_url in WILDCARD_TYPES and (not names or "*" in names):
            return None
        return names

    def _respond(self, type_url: str) -> DiscoveryResponse:
        state = self.types[type_url]
        res = self.snapshot.get(type_url)
        self._nonce += 1
        state.sent_version, state.sent_nonce = res.version, str(self._nonce)
        if state.nacked_version != res.version:
            state.nacked_version = None
        return DiscoveryResponse(version_info=res.version, resources=res.select(state.names),
                                 type_url=type_url, nonce=state.sent_nonce,
                                 control_plane={"identifier": CONTROL_PLANE_ID})
