"""structlog set-up: JSON lines under systemd (or when asked), readable console otherwise."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    """Call once from a process's main(). `json=None` picks JSON when stderr is not a TTY
    or when running under systemd (JOURNAL_STREAM is set)."""
    if json is None:
        json = bool(os.environ.get("JOURNAL_STREAM")) or not sys.stderr.isatty()
    lvl = getattr(logging, level.upper(), logging.INFO)
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Quiet the libraries that log through stdlib logging at INFO.
    logging.basicConfig(level=max(lvl, logging.WARNING), stream=sys.stderr)


def get_logger(component: str, **fields: object) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger().bind(component=component, **fields)  # type: ignore[no-any-return]
