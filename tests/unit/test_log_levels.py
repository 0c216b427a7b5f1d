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


@pytest.mark.parametrize("level", ["debug", "info", "warn", "error"])
def test_enabled_says_which_levels_are_published(events: list[dict[str, Any]], level: str) -> None:
    logs.set_level(level)
    order = ["debug", "info", "warn", "error", "critical"]
    assert [name for name in order if logs.enabled(name)] == order[order.index(level):]


def test_the_access_log_line_is_not_built_below_its_level() -> None:
    # On a router set to "warn" the access log costs one comparison per request, not its values.
    from comatrix.coap.message import Peer, Request, Response
    from comatrix.coap.numbers import Code
    from comatrix.tap import _log_request

    class Unprintable(Peer):
        def __str__(self) -> str:
            raise AssertionError("the line was built")

    request = Request(method=Code.POST, path=("send",), peer=Unprintable("127.0.0.1", 5683))
    logs.set_level("warn")
    try:
        _log_request(request, Response(code=Code.CHANGED), 1.0)
    finally:
        logs.set_level("info")
    with pytest.raises(AssertionError):
        _log_request(request, Response(code=Code.CHANGED), 1.0)
