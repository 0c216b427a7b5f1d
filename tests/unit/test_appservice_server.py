"""The application-service API the homeserver calls (`comatrix.appservice.server`), over real HTTP.

`AppserviceResource` is served by twisted.web on a loopback port and called
with treq, as Synapse would: the ``hs_token`` is checked (none: 401, wrong:
403), transactions reach the event stream once per txnId, the user and room
queries answer for the namespace, and anything else is refused with the
Matrix error shape.  The stream keeps its state in a real `Store` file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web import server

from comatrix.appservice import server as appservice_server
from comatrix.appservice.server import AppserviceResource
from comatrix.appservice.stream import EventStream
from comatrix.matrix.responses import Event
from comatrix.store import Store

HS_TOKEN = "hs-token-for-the-tests-0123456789"
DEVICE_USER = "@comatrix_sensor01:test.local"
ROOM = "!" + "r" * 43


def event(number: int, room: str = ROOM) -> dict[str, Any]:
    return {"event_id": f"$event{number}", "type": "m.room.message", "sender": "@alice:test.local",
            "origin_server_ts": 1_700_000_000_000 + number, "room_id": room,
            "content": {"msgtype": "m.text", "body": f"message {number}"}}


class Api:
    """The resource on 127.0.0.1, a recording stream listener, and a way to call it."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = Store(str(tmp_path / "state.sqlite3"))
        self.stream = EventStream(self.store, reactor)
        self.received: list[tuple[str, list[str]]] = []
        self.stream.subscribe(self.listener)
        resource = AppserviceResource(HS_TOKEN, self.stream, lambda user_id: user_id == DEVICE_USER)
        self.port = reactor.listenTCP(0, server.Site(resource), interface="127.0.0.1")
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"

    def listener(self, room_id: str, events: Sequence[Event]) -> None:
        self.received.append((room_id, [e.event_id for e in events]))

    async def call(self, method: str, path: str, body: Any = None, *, token: str | None = HS_TOKEN,
                   raw: bytes | None = None) -> tuple[int, Any]:
        headers = {"Authorization": [f"Bearer {token}"]} if token is not None else {}
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        response = await treq.request(method, self.base + path, headers=headers, data=data, persistent=False)
        content = await response.content()
        assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
        return response.code, json.loads(content)

    async def close(self) -> None:
        await self.port.stopListening()
        self.store.close()


@pytest_twisted.ensureDeferred
async def test_the_hs_token_is_required_and_checked(tmp_path: Path) -> None:
    api = Api(tmp_path)
    logged: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        logged.append(formatEvent(event) + repr(event))
    globalLogPublisher.addObserver(observer)
    try:
        transaction = {"events": [event(1)]}
        assert await api.call("PUT", "/_matrix/app/v1/transactions/1", transaction, token=None) == (
            401, {"errcode": "M_UNAUTHORIZED", "error": "missing hs_token"})
        code, body = await api.call("PUT", "/_matrix/app/v1/transactions/1", transaction, token="wrong")
        assert (code, body["errcode"]) == (403, "M_FORBIDDEN")
        code, body = await api.call("PUT", "/_matrix/app/v1/transactions/1", transaction, token=HS_TOKEN + "x")
        assert (code, body["errcode"]) == (403, "M_FORBIDDEN")
        # Checked before anything else, even on unknown paths: nothing about the API leaks.
        assert (await api.call("GET", "/nowhere", token=None))[0] == 401
        assert (await api.call("POST", "/_matrix/app/v1/ping", {}, token="wrong"))[0] == 403
        assert api.received == [] and await api.store.last_appservice_transaction() is None
        # The token in another scheme is not a bearer token.
        response = await treq.request("POST", api.base + "/_matrix/app/v1/ping", data=b"{}", persistent=False,
                                      headers={"Authorization": [f"Basic {HS_TOKEN}"]})
        await response.content()
        assert response.code == 403
        assert await api.call("POST", "/_matrix/app/v1/ping", {}) == (200, {})
        warnings = [line for line in logged if "wrong hs_token" in line]
        assert len(warnings) == 4  # each refused token is logged, by peer only
        assert not any(HS_TOKEN in line or "Bearer wrong" in line for line in logged)
    finally:
        globalLogPublisher.removeObserver(observer)
        await api.close()


@pytest_twisted.ensureDeferred
async def test_a_transaction_reaches_the_stream_once_per_txn_id(tmp_path: Path) -> None:
    api = Api(tmp_path)
    try:
        transaction = {"events": [event(1), event(2)], "ephemeral": []}
        assert await api.call("PUT", "/_matrix/app/v1/transactions/17", transaction) == (200, {})
        assert api.received == [(ROOM, ["$event1", "$event2"])]
        assert await api.store.last_appservice_transaction() == "17"
        # Synapse retries a transaction it did not see answered: the same txnId, the same events.
        assert await api.call("PUT", "/_matrix/app/v1/transactions/17", transaction) == (200, {})
        assert api.received == [(ROOM, ["$event1", "$event2"])]
        assert api.stream.transactions == 1 and api.stream.delivered == 2
        assert await api.call("PUT", "/_matrix/app/v1/transactions/18", {"events": [event(3)]}) == (200, {})
        assert api.received[1:] == [(ROOM, ["$event3"])]
        assert await api.store.last_appservice_transaction() == "18"
    finally:
        await api.close()


@pytest_twisted.ensureDeferred
async def test_a_body_that_is_not_a_transaction_is_400_and_handles_nothing(tmp_path: Path) -> None:
    api = Api(tmp_path)
    try:
        path = "/_matrix/app/v1/transactions/5"
        code, body = await api.call("PUT", path, raw=b"{not json")
        assert (code, body["errcode"]) == (400, "M_NOT_JSON")
        for bad in ([], {"events": {}}, {"events": "x"}, {}, "events"):
            code, body = await api.call("PUT", path, bad)
            assert (code, body["errcode"]) == (400, "M_BAD_JSON"), bad
        assert api.received == [] and await api.store.last_appservice_transaction() is None
        # The refused txnId was not recorded: its good retry is handled.
        assert await api.call("PUT", path, {"events": [event(1)]}) == (200, {})
        assert api.received == [(ROOM, ["$event1"])]
    finally:
        await api.close()


@pytest_twisted.ensureDeferred
async def test_user_and_room_queries_ping_and_unknown_endpoints(tmp_path: Path) -> None:
    api = Api(tmp_path)
    try:
        assert await api.call("GET", "/_matrix/app/v1/users/%40comatrix_sensor01%3Atest.local") == (200, {})
        code, body = await api.call("GET", "/_matrix/app/v1/users/%40comatrix_other%3Atest.local")
        assert (code, body["errcode"]) == (404, "M_NOT_FOUND")
        code, body = await api.call("GET", "/_matrix/app/v1/rooms/%23lab%3Atest.local")
        assert (code, body["errcode"]) == (404, "M_NOT_FOUND")
        assert await api.call("POST", "/_matrix/app/v1/ping", {"transaction_id": "t1"}) == (200, {})
        for method, path in (("GET", "/_matrix/app/v1/thirdparty/protocol/x"), ("GET", "/_matrix/app/v1"),
                             ("GET", "/_matrix/client/v3/sync"), ("PUT", "/transactions/1"),
                             ("GET", "/_matrix/app/v1/users"), ("PUT", "/_matrix/app/v1/transactions/"),
                             ("PUT", "/_matrix/app/v1/transactions/1/2")):
            code, body = await api.call(method, path, {"events": []} if method == "PUT" else None)
            assert (code, body["errcode"]) == (404, "M_UNRECOGNIZED"), path
        for method, path in (("GET", "/_matrix/app/v1/transactions/1"), ("POST", "/_matrix/app/v1/users/x"),
                             ("GET", "/_matrix/app/v1/ping"), ("DELETE", "/_matrix/app/v1/rooms/x")):
            code, body = await api.call(method, path)
            assert (code, body["errcode"]) == (405, "M_UNRECOGNIZED"), (method, path)
        assert api.received == [] and await api.store.last_appservice_transaction() is None
    finally:
        await api.close()


@pytest_twisted.ensureDeferred
async def test_a_transaction_the_store_cannot_record_is_500_and_handled_again_on_retry(tmp_path: Path) -> None:
    api = Api(tmp_path)
    try:
        finish = api.store.finish_appservice_transaction

        async def broken(*args: Any, **kwargs: Any) -> None:
            raise OSError("disk full")
        api.store.finish_appservice_transaction = broken  # type: ignore[method-assign]
        code, body = await api.call("PUT", "/_matrix/app/v1/transactions/9", {"events": [event(1)]})
        assert (code, body["errcode"]) == (500, "M_UNKNOWN") and "disk" not in body["error"]
        api.store.finish_appservice_transaction = finish  # type: ignore[method-assign]
        # Not recorded: Synapse's retry is handled (listeners may see the event again, never lose it).
        assert await api.call("PUT", "/_matrix/app/v1/transactions/9", {"events": [event(1)]}) == (200, {})
        assert await api.store.last_appservice_transaction() == "9"
        assert api.received[-1] == (ROOM, ["$event1"])
    finally:
        await api.close()


@pytest_twisted.ensureDeferred
async def test_an_oversized_transaction_is_413_and_a_path_that_is_not_utf8_is_400(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(appservice_server, "MAX_TRANSACTION_BYTES", 300)
    api = Api(tmp_path)
    try:
        code, body = await api.call("PUT", "/_matrix/app/v1/transactions/1", {"events": [event(1), event(2)]})
        assert (code, body["errcode"]) == (413, "M_TOO_LARGE")
        assert api.received == [] and await api.store.last_appservice_transaction() is None
        assert await api.call("PUT", "/_matrix/app/v1/transactions/1", {"events": [event(1)]}) == (200, {})
        code, body = await api.call("GET", "/_matrix/app/v1/users/%40caf%E9%3Atest.local")
        assert (code, body["errcode"]) == (400, "M_INVALID_PARAM")
    finally:
        await api.close()
