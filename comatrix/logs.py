"""Loggers for CoMatrix modules, with one adjustable minimum level (``--log-level``).

Every module gets its logger from `get_logger(__name__)`.  Events below the
configured level are dropped before an event dictionary is even built, so
DEBUG lines cost one comparison on a busy border router and never fill the
journal.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import LogLevel, Logger, globalLogPublisher

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
          "error": LogLevel.error, "critical": LogLevel.critical}

_RANK = {level: rank for rank, level in enumerate(LEVELS.values())}
_minimum_rank = _RANK[LEVELS["info"]]


class _LevelledLogger(Logger):
    """A `Logger` that returns at once for events below the configured level."""

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        if _RANK.get(level, len(_RANK)) < _minimum_rank:
            return
        super().emit(level, format, **kwargs)


def get_logger(namespace: str) -> Logger:
    return _LevelledLogger(namespace=namespace, observer=globalLogPublisher)


def enabled(level: str) -> bool:
    """Whether events at ``level`` are published now: a line whose values cost something to
    compute (the access log) asks first."""
    return _RANK[LEVELS[level]] >= _minimum_rank


def set_level(level: str) -> None:
    """Set the minimum level of CoMatrix's own log events ("debug" ... "critical")."""
    global _minimum_rank
    _minimum_rank = _RANK[LEVELS[level]]
