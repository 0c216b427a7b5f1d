"""Built-in resources against a fake homeserver (StubTreq): decoding, forms, forwarding, errors."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from twisted.internet import defer, task
from twisted.python.failure import Failure

from comatrix.coap.message import Peer, Request, Response
from comatrix.coap.numbers import Code, ContentFormat, OptionNumber
from comatrix.config import build_config
from comatrix.credentials import Credentials
from comatrix.errors import error_response
from comatrix.interfaces import PluginContext
from comatrix.plugins import accounts, clock, rooms
from support.fake_homeserver import FakeHomeserver

TOKEN = ("good-token".encode(),)


@pytest.fixture
def homeserver() -> FakeHomeserver:
    return FakeHomeserver()


def context(homeserver: FakeHomeserver, devices: list[dict[str, Any]] | None = None) -> PluginContext:
    config = build_config({"devices": devices or []})
    matrix = homeserver.matrix_client()
    clock_ = task.Clock()
    clock_.advance(1_700_000_000)
    return PluginContext(config=config, matrix=matrix, credentials=Credentials(config.devices, matrix),
                         state={}, reactor=clock_)


def render(resource: Any, request: Request) -> Response:
    """Render and pass failures through the gateway's error adapter, as the CoAP layer does."""
    results: list[Response] = []
    d = resource.render(request)
    d.addErrback(lambda failure: error_response(failure))
    d.addCallback(results.append)
    assert results, "the stubbed homeserver answers synchronously"
    return results[0]


def req(method: Code, payload: Any = None, *, options: dict[int, tuple[bytes, ...]] | None = None,
        content_format: int | None = ContentFormat.CBOR, query: tuple[str, ...] = (),
        host: str = "2001:db8::5", accept: int | None = None) -> Request:
    raw = payload if isinstance(payload, bytes) else (cbor2.dumps(payload) if payload is not None else b"")
    return Request(method=method, path=("x",), payload=raw, query=query,
                   content_format=content_format if raw else None, accept=accept,
                   options=options or {}, peer=Peer(host, 5683))


def test_send_clean_form_with_txn_id(homeserver: FakeHomeserver) -> None:
    resource = rooms.send.build(context(homeserver))
    response = render(resource, req(Code.POST, {"room_id": "!r", "txn_id": "t1", "body": "hi"},
                                    options={256: TOKEN}))
    assert response.code == Code.CHANGED and response.content_format == ContentFormat.CBOR
    assert cbor2.loads(response.payload) == {"event_id": "$event0"}
    method, path, body, auth = homeserver.requests[-1]
    assert (method, path) == ("PUT", "/_matrix/client/v3/rooms/!r/send/m.room.message/t1")
    assert body == {"msgtype": "m.text", "body": "hi"} and auth == "Bearer good-token"


def test_send_original_form_ignores_proxy_host(homeserver: FakeHomeserver) -> None:
    resource = rooms.send.build(context(homeserver))
    options = {256: (b"Bearer good-token",),
               OptionNumber.PROXY_URI: (b"coap://evil.example/9/!r/m.room.message/42",)}
    response = render(resource, req(Code.PUT, {"msgtype": "m.notice", "body": "x"}, options=options))
    assert response.code == Code.CHANGED
    assert homeserver.requests[-1][1] == "/_matrix/client/v3/rooms/!r/send/m.room.message/42"


def test_send_same_txn_twice_gives_same_event(homeserver: FakeHomeserver) -> None:
    resource = rooms.send.build(context(homeserver))
    body = {"room_id": "#lab:hs.test", "txn_id": "same", "body": "once"}
    first = render(resource, req(Code.POST, body, options={256: TOKEN}))
    second = render(resource, req(Code.POST, body, options={256: TOKEN}))
    assert first.payload == second.payload


@pytest.mark.parametrize("payload, content_format, code, diagnostic", [
    (b"\xff\x00", ContentFormat.CBOR, Code.BAD_REQUEST, b"malformed CBOR"),
    ({"room_id": "!r"}, ContentFormat.CBOR, Code.BAD_REQUEST, b"missing body"),
    ({"room_id": "!r", "body": 5}, ContentFormat.CBOR, Code.BAD_REQUEST, b"body must be a text string"),
    ({"room_id": 7, "body": "x"}, ContentFormat.CBOR, Code.BAD_REQUEST, b"room_id must be a text string"),
    ({"body": "x"}, ContentFormat.CBOR, Code.BAD_REQUEST, b"missing room_id"),
    ({"room_id": "!r", "body": "x", "msgtype": "m.image"}, ContentFormat.CBOR, Code.BAD_REQUEST, b"msgtype"),
    (b'{"body": "x"}', ContentFormat.JSON, Code.UNSUPPORTED_CONTENT_FORMAT, b"expected application/cbor (60)"),
])
def test_bad_send_bodies_never_reach_the_homeserver(homeserver: FakeHomeserver, payload: Any,
                                                     content_format: int, code: Code,
                                                     diagnostic: bytes) -> None:
    resource = rooms.send.build(context(homeserver))
    response = render(resource, req(Code.POST, payload, options={256: TOKEN}, content_format=content_format))
    assert response.code == code and response.payload.startswith(diagnostic)
    assert homeserver.requests == []


def test_no_token_and_no_device_entry_is_401(homeserver: FakeHomeserver) -> None:
    resource = rooms.send.build(context(homeserver))
    response = render(resource, req(Code.POST, {"room_id": "!r", "body": "x"}))
    assert (response.code, response.payload) == (Code.UNAUTHORIZED, b"no credentials")
    assert homeserver.requests == []


def test_configured_device_credentials_log_in_once(homeserver: FakeHomeserver) -> None:
    devices = [{"address": "2001:db8::/64", "user": "@d:hs.test", "password": "pw"}]
    resource = rooms.send.build(context(homeserver, devices))
    for txn in ("a", "b"):
        response = render(resource, req(Code.POST, {"room_id": "!r", "txn_id": txn, "body": "x"}))
        assert response.code == Code.CHANGED
    assert [path for _, path, _, _ in homeserver.requests].count("/_matrix/client/v3/login") == 1
    assert homeserver.requests[-1][3] == "Bearer tok-from-login"


def test_proxy_uri_for_another_operation_is_refused(homeserver: FakeHomeserver) -> None:
    resource = rooms.join.build(context(homeserver))
    response = render(resource, req(Code.POST, options={256: TOKEN, OptionNumber.PROXY_URI: (b"/9/!r/t/1",)}))
    assert response.code == Code.BAD_REQUEST and homeserver.requests == []


def test_join_by_proxy_uri_code(homeserver: FakeHomeserver) -> None:
    resource = rooms.join.build(context(homeserver))
    response = render(resource, req(Code.POST, options={256: TOKEN, OptionNumber.PROXY_URI: (b"/K/!room",)}))
    assert cbor2.loads(response.payload) == {"room_id": "!room"}


def test_getmsg_empty_room_is_404_then_latest_message(homeserver: FakeHomeserver) -> None:
    ctx = context(homeserver)
    getmsg = rooms.getmsg.build(ctx)
    response = render(getmsg, req(Code.GET, options={256: TOKEN}, query=("room=!r",)))
    assert (response.code, response.payload) == (Code.NOT_FOUND, b"no message")
    render(rooms.send.build(ctx), req(Code.POST, {"room_id": "!r", "txn_id": "1", "body": "hello"},
                                      options={256: TOKEN}))
    response = render(getmsg, req(Code.GET, options={256: TOKEN, OptionNumber.PROXY_URI: (b"/E/!r",)}))
    assert response.code == Code.CONTENT
    assert cbor2.loads(response.payload) == {"sender": "@d:hs.test", "body": "hello", "event_id": "$event0",
                                             "origin_server_ts": 1}


def test_dead_token_is_401(homeserver: FakeHomeserver) -> None:
    resource = rooms.getmsg.build(context(homeserver))
    response = render(resource, req(Code.GET, options={256: (b"dead",)}, query=("room=!r",)))
    assert (response.code, response.payload) == (Code.UNAUTHORIZED, b"M_UNKNOWN_TOKEN")


def test_login_accepts_original_and_short_forms(homeserver: FakeHomeserver) -> None:
    resource = accounts.login.build(context(homeserver))
    original = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "d"}, "password": "pw"}
    for body in (original, {"user": "d", "password": "pw"}):
        response = render(resource, req(Code.POST, body))
        assert response.code == Code.CHANGED
        assert cbor2.loads(response.payload) == {"access_token": "tok-from-login", "user_id": "@d:hs.test",
                                                 "device_id": "DEV"}
    assert homeserver.requests[-1][2]["identifier"] == {"type": "m.id.user", "user": "d"}


def test_time_text_and_cbor_and_406(homeserver: FakeHomeserver) -> None:
    resource = clock.time.build(context(homeserver))
    assert render(resource, req(Code.GET)).payload == b"1700000000"
    cbor_answer = render(resource, req(Code.GET, accept=ContentFormat.CBOR))
    assert cbor2.loads(cbor_answer.payload) == 1700000000
    assert render(resource, req(Code.GET, accept=ContentFormat.JSON)).code == Code.NOT_ACCEPTABLE


def test_wrong_method_is_405(homeserver: FakeHomeserver) -> None:
    response = render(rooms.getmsg.build(context(homeserver)), req(Code.DELETE))
    assert response.code == Code.METHOD_NOT_ALLOWED


@pytest.mark.parametrize("raw", [b"has space", b"tab\tin", b"\xff\xfe", b"Bearer ", b"x" * 2000])
def test_malformed_tokens_are_401_and_not_forwarded(homeserver: FakeHomeserver, raw: bytes) -> None:
    resource = rooms.getmsg.build(context(homeserver))
    response = render(resource, req(Code.GET, options={256: (raw,)}, query=("room=!r",)))
    assert response.code == Code.UNAUTHORIZED
    assert homeserver.requests == []
