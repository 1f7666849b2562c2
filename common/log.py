"""structlog, set up once per process: a console renderer on a terminal, JSON lines otherwise.

Every event is bound with the process's role and worker id (and, where the caller binds it, the
weights version): `log = get_logger(); log.info("lease", lease_id=3)`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import structlog

LogFormat = Literal["auto", "console", "json"]


def setup_logging(role: str, worker_id: str = "", fmt: LogFormat = "auto", level: str = "info", stream: Any = None) -> None:
    """Configure structlog (and stdlib logging, so library logs share the format) for this process."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty()) if fmt == "console" else structlog.processors.JSONRenderer()
    lvl = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(role=role, worker_id=worker_id)
    logging.basicConfig(level=max(lvl, logging.WARNING), stream=stream, format="%(levelname)s %(name)s: %(message)s")


def get_logger(**bound: Any) -> Any:
    """A lazy logger: modules create theirs at import time, before `setup_logging` runs, and it
    must still take the configuration set up later (structlog resolves the proxy on first use)."""
    return structlog.get_logger(**bound)
