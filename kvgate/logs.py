"""structlog set-up shared by every process: JSON lines for machines, console for a terminal."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(component: str, *, json: bool | None = None, level: str = "info") -> structlog.typing.FilteringBoundLogger:
    """Configure once per process and return the component's logger (logs go to stderr)."""
    use_json = (not sys.stderr.isatty()) if json is None else json
    renderer = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    return structlog.get_logger(component=component)
