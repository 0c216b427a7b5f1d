"""Loggers for CoMatrix modules, with one adjustable minimum level (``--log-level``).

Every module gets its logger from `get_logger(__name__)`.  Events below the
configured level are dropped before they reach twistd's observers, so DEBUG
lines cost little on a busy border router and never fill the journal.
"""

from __future__ import annotations

from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate, Logger,
                            globalLogPublisher)

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
          "error": LogLevel.error, "critical": LogLevel.critical}

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])


def get_logger(namespace: str) -> Logger:
    return Logger(namespace=namespace, observer=_observer)


def set_level(level: str) -> None:
    """Set the minimum level of CoMatrix's own log events ("debug" ... "critical")."""
    _predicate.setLogLevelForNamespace(None, LEVELS[level])  # type: ignore[arg-type]
    _predicate.defaultLogLevel = LEVELS[level]
