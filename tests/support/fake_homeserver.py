"""A tiny in-memory stand-in for a homeserver, for unit tests through treq's StubTreq only.

It records every request so tests can assert what (and whether anything) was
forwarded.  Integration tests use a real Synapse instead.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

from treq.testing import StubTreq
from twisted.web.resource import Resource
from twisted.web.server import Request as WebRequest

from comatrix.matrix.client import MatrixClient
from comatrix.matrix.transport import MatrixTransport

BASE_URL = "http://hs.test"


class FakeHomeserver(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, str, dict[str, Any] | None, str | None]] = []
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.sent: dict[tuple[str, str], str] = {}
        self.aliases: dict[str, str] = {"#lab:hs.test": "!lab"}

    def render(self, request: WebRequest) -> bytes:
        path = unquote(request.path.decode())
        body = json.loads(request.content.read() or b"null")
        auth = request.getHeader("authorization")
        self.requests.append((request.method.decode(), path, body, auth))
        segments = path.split("/")[4:]  # after /_matrix/client/v3
        request.setHeader("content-type", "application/json")
        status, answer = self.answer(request.method.decode(), segments, body, auth)
        request.setResponseCode(status)
        return json.dumps(answer).encode()

    def answer(self, method: str, segments: list[str], body: Any, auth: str | None) -> tuple[int, Any]:
        if segments[:1] == ["login"]:
            return 200, {"user_id": "@d:hs.test", "access_token": "tok-from-login", "device_id": "DEV"}
        if auth != "Bearer good-token" and auth != "Bearer tok-from-login":
            return 401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Unknown token"}
        if segments[:2] == ["directory", "room"]:
            room = self.aliases.get(segments[2])
            return (200, {"room_id": room, "servers": []}) if room else (404, {"errcode": "M_NOT_FOUND"})
        if segments[:1] == ["rooms"] and segments[2:3] == ["send"]:
            key = (segments[1], segments[4])
            event_id = self.sent.setdefault(key, f"$event{len(self.sent)}")
            self.events.setdefault(segments[1], []).append({
                "event_id": event_id, "type": segments[3], "sender": "@d:hs.test",
                "origin_server_ts": 1, "content": body})
            return 200, {"event_id": event_id}
        if segments[:1] == ["rooms"] and segments[2:3] == ["messages"]:
            chunk = [e for e in reversed(self.events.get(segments[1], []))][:1]
            return 200, {"chunk": chunk, "start": "s"}
        if segments[:1] == ["join"]:
            return 200, {"room_id": self.aliases.get(segments[1], segments[1])}
        return 404, {"errcode": "M_UNRECOGNIZED"}

    def matrix_client(self) -> MatrixClient:
        transport = MatrixTransport(BASE_URL, http_client=StubTreq(self))
        return MatrixClient(transport)
