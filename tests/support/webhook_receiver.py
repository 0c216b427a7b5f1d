"""A webhook receiver for tests: a real twisted.web server on 127.0.0.1, answering as scripted.

Every POST is recorded (headers, body) and answered with the next scripted
status; ``HANG`` leaves the request unanswered (a receiver that is too slow),
an empty script answers 200.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from twisted.internet import reactor as default_reactor, task
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

__all__ = ["HANG", "Received", "WebhookReceiver", "eventually", "pause"]

HANG = -1


@dataclasses.dataclass(frozen=True)
class Received:
    headers: dict[bytes, bytes]
    body: bytes


class WebhookReceiver(Resource):
    isLeaf = True

    def __init__(self, statuses: list[int] | None = None) -> None:
        super().__init__()
        self.statuses = list(statuses or [])
        self.received: list[Received] = []
        self._port: Any = None
        self._hanging: list[Request] = []

    def render_POST(self, request: Request) -> bytes | int:
        assert request.content is not None
        headers = {name.lower(): values[0] for name, values in request.requestHeaders.getAllRawHeaders()}
        self.received.append(Received(headers, request.content.read()))
        status = self.statuses.pop(0) if self.statuses else 200
        if status == HANG:
            self._hanging.append(request)
            return NOT_DONE_YET
        request.setResponseCode(status)
        return b"{}"

    def listen(self) -> str:
        """Start listening on a free loopback port; the URL to subscribe."""
        self._port = default_reactor.listenTCP(0, Site(self), interface="127.0.0.1")  # type: ignore[attr-defined]
        return f"http://127.0.0.1:{self._port.getHost().port}/hook"

    async def close(self) -> None:
        for request in self._hanging:
            if request.channel is not None:
                request.channel.transport.abortConnection()  # type: ignore[union-attr]
        if self._port is not None:
            await self._port.stopListening()


async def eventually(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait (polling the real reactor) until ``condition()`` holds; fail after ``seconds``."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await task.deferLater(default_reactor, 0.01, lambda: None)
    assert condition(), "condition not met in time"


async def pause(seconds: float) -> None:
    await task.deferLater(default_reactor, seconds, lambda: None)
