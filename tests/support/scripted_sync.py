"""A scripted stand-in for the gateway's long-poll transport, for unit tests of /sync loops.

`ScriptedSync` is handed to `comatrix.longpoll.LongPoller` (or as
``Msc3079Service(long_poll=...)``) in place of a `MatrixTransport`: every
request is recorded with the clock's time and its query, and takes the next
scripted outcome -- a JSON body (answered 200), an exception (the call fails
with it), or None / nothing left (the call hangs, like a long-poll, until the
test answers it with `answer` or it is cancelled).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task

__all__ = ["ScriptedSync"]


class ScriptedSync:
    base_url = "https://hs.test.local"

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        #: (clock time, query as a dict) of every request, in order.
        self.calls: list[tuple[float, dict[str, str]]] = []
        self.outcomes: list[Any] = []
        #: The hanging calls, oldest first.
        self.waiting: list[defer.Deferred[tuple[int, dict[str, Any]]]] = []

    def request(self, req: Any) -> "defer.Deferred[tuple[int, dict[str, Any]]]":
        self.calls.append((self.clock.seconds(), dict(req.query)))
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome is None:
            d: defer.Deferred[tuple[int, dict[str, Any]]] = defer.Deferred(self._cancelled)
            self.waiting.append(d)
            return d
        if isinstance(outcome, Exception):
            return defer.fail(outcome)
        return defer.succeed((200, outcome))

    def _cancelled(self, d: "defer.Deferred[Any]") -> None:
        self.waiting.remove(d)

    def answer(self, body: Any) -> None:
        """The oldest hanging call gets ``body`` (200), or fails with it if it is an exception."""
        d = self.waiting.pop(0)
        if isinstance(body, Exception):
            d.errback(body)
        else:
            d.callback((200, body))

    def close(self) -> "defer.Deferred[None]":
        return defer.succeed(None)

    def since(self) -> list[str | None]:
        """The ``since`` of every request so far."""
        return [query.get("since") for _, query in self.calls]
