"""Holds the current snapshot and wakes every stream when it changes."""

from __future__ import annotations

import asyncio

from xds_server.snapshot import Snapshot


class SnapshotCache:
    def __init__(self, snapshot: Snapshot):
        self._snapshot = snapshot
        self._changed = asyncio.Condition()

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    async def set(self, snapshot: Snapshot) -> bool:
        """Publish; returns False (and wakes nobody) when nothing changed."""
        if snapshot.version == self._snapshot.version:
            return False
        async with self._changed:
            self._snapshot = snapshot
            self._changed.notify_all()
        return True

    async def wait_newer(self, seen: Snapshot) -> Snapshot:
        async with self._changed:
            await self._changed.wait_for(lambda: self._snapshot is not seen)
            return self._snapshot
