"""What the cache serves: every resource of every type, packed as protobuf Any and versioned by content.

Each resource's version is computed once, when its Resources are built: delta streams send and compare
those, and a type's version (what state-of-the-world streams send) hashes its names and contents.
Content-derived versions mean a restarted control plane, or a second replica, with the same catalog
gives the same versions, so reconnecting clients see no churn (docs/architecture.md, "Live changes").

Catalog-free: the renderer (xds_server/render/) builds these; streams and the cache only read them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

from google.protobuf import any_pb2, message

from xds_server.resource_types import CLUSTER, ENDPOINT, POLICY


def resource_version(packed_value: bytes) -> str:
    """One resource's version: a hash of its serialized content."""
    return hashlib.sha256(packed_value).hexdigest()[:16]


@dataclass(frozen=True)
class Resources:
    """All resources of one type, by name, with one version for the set and one per resource. Built
    with `of` or `packed`, which compute the versions; `Resources(version="")` is the empty set."""

    version: str
    items: dict[str, any_pb2.Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)  # name -> resource_version of its content

    @classmethod
    def of(cls, named: dict[str, message.Message]) -> Resources:
        packed = {}
        for name, msg in named.items():
            packed[name] = any_pb2.Any()
            packed[name].Pack(msg, deterministic=True)
        return cls.packed(packed)

    @classmethod
    def packed(cls, items: dict[str, any_pb2.Any]) -> Resources:
        """From resources already packed: the versions of each and of the set, computed here once."""
        ordered = dict(sorted(items.items()))
        digest = hashlib.sha256()
        for name, any_msg in ordered.items():
            digest.update(name.encode() + b"\0" + any_msg.value + b"\0")
        return cls(version=digest.hexdigest()[:16], items=ordered,
                   versions={name: resource_version(any_msg.value) for name, any_msg in ordered.items()})

    def select(self, names: frozenset[str] | None) -> list[any_pb2.Any]:
        """The resources a subscription asked for (None: all); names not here yet are left out."""
        if names is None:
            return list(self.items.values())
        return [self.items[n] for n in sorted(names) if n in self.items]


@dataclass(frozen=True)
class Snapshot:
    by_type: dict[str, Resources]
    # Node groups (node.cluster) served a variant of this snapshot, e.g. another listener address.
    groups: dict[str, Snapshot] = field(default_factory=dict)

    def get(self, type_url: str) -> Resources:
        return self.by_type.get(type_url) or Resources(version="")

    def for_group(self, group: str) -> Snapshot:
        return self.groups.get(group, self)

    def with_types(self, replaced: dict[str, Resources]) -> Snapshot:
        """This snapshot with these types' resources replaced, in every group's variant too."""
        return Snapshot(by_type={**self.by_type, **replaced},
                        groups={g: v.with_types(replaced) for g, v in self.groups.items()})

    def keeping_clusters_of(self, old: Snapshot) -> Snapshot:
        """This snapshot, plus the clusters (and their endpoints) of `old` that it drops: served
        until every Envoy has routes that no longer use them (make before break)."""
        def merged(type_url: str) -> Resources:
            return Resources.packed({**old.get(type_url).items, **self.get(type_url).items})
        return self.with_types({CLUSTER: merged(CLUSTER), ENDPOINT: merged(ENDPOINT)})

    def with_policies_only(self, names: set[str]) -> Snapshot:
        """This snapshot serving only the named models' policies: while routes change, ext_proc admits
        only what both the old and the new routes can carry."""
        items = self.get(POLICY).items
        return self.with_types({POLICY: Resources.packed({n: items[n] for n in names if n in items})})

    def clusters_added_since(self, old: Snapshot) -> set[str]:
        """Clusters this snapshot has that `old` has not."""
        return set(self.get(CLUSTER).items) - set(old.get(CLUSTER).items)

    def clusters_dropped_since(self, old: Snapshot) -> set[str]:
        """Clusters of `old` that this snapshot no longer has."""
        return old.clusters_added_since(self)

    @cached_property
    def version(self) -> str:
        parts = [r.version for r in self.by_type.values()] + [f"{g}={v.version}" for g, v in sorted(self.groups.items())]
        return hashlib.sha256("".join(parts).encode()).hexdigest()[:16]
