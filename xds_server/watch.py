"""Serve the catalog file as it changes: every save is validated and published, or refused and logged
while the running config stays as it was."""

from __future__ import annotations

from pathlib import Path

import structlog
import watchfiles

from kvgate.catalog import CatalogError, load_catalog
from xds_server.control import Controller


async def watch_catalog(path: Path, controller: Controller, log: structlog.typing.FilteringBoundLogger) -> None:
    path = path.resolve()
    # Watch the folder, not the file: editors save by writing a new file and renaming it over the old.
    changes = watchfiles.awatch(path.parent, watch_filter=lambda _change, p: Path(p) == path,
                                debounce=50, step=10)
    async for _ in changes:
        try:
            changed = await controller.replace(load_catalog(path))
        except CatalogError as e:
            log.error("catalog.refused", path=str(path), problems=e.problems)
            continue
        log.info("catalog.applied" if changed else "catalog.unchanged", path=str(path),
                 version=controller.server.cache.snapshot.version)
