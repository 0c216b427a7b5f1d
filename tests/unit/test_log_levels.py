"""comatrix.logs: events below the configured level are dropped before any observer sees them."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
from twisted.logger import globalLogPublisher

from comatrix import logs


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "comatrix.test_log_levels":
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(observer)
        logs.set_level("info")


@pytest.mark.parametrize("level, expected", [
    ("debug", ["debug", "info", "warn", "error"]),
    ("info", ["info", "warn", "error"]),
    ("warn", ["warn", "error"]),
    ("error", ["error"]),
])
def test_only_events_at_or_above_the_level_are_published(events: list[dict[str, Any]], level: str,
                                                        expected: list[str]) -> None:
    log = logs.get_logger("comatrix.test_log_levels")
    logs.set_level(level)
    log.debug("d")
    log.info("i")
    log.warn("w")
    log.error("e")
    assert [event["log_level"].name for event in events] == expected
