"""Built-in resources against the in-memory fake homeserver (StubTreq): forms, forwarding, errors."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest

from comatrix.coap.message import Peer, Request, Response
from comatrix.coap.numbers import Code, ContentFormat, OptionNumber
from comatrix.coap.testing import Harness
from comatrix.discovery import build_site
from comatrix.errors import error_response
from comatrix.plugins import accounts, clock, rooms
from support.world import World


@pytest.fixture
def world() -> World:
    return World()


def render(resource: Any, request: Request) -> Response:
    """Render and pass failures through the gateway's error adapter, as the CoAP layer does."""
    results: list[Response] = []
    d = resource.render(request)
    d.addErrback(error_response)
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


def test_send_clean_form_with_txn_id(world: World) -> None:
    resource = rooms.send.build(world.context())
    response = render(resource, req(Code.POST, {"room_id": world.room, "txn_id": "t1", "body": "hi"},
                                    options=world.auth))
    assert response.code == Code.CHANGED and response.content_format == ContentFormat.CBOR
    event_id = cbor2.loads(response.payload)["event_id"]
    forwarded = world.homeserver.requests[-1]
    assert (forwarded.method, forwarded.path[3:]) == ("PUT", ("rooms", world.room, "send", "m.room.message", "t1"))
    assert forwarded.body == {"msgtype": "m.text", "body": "hi"}
    assert forwarded.headers[b"Authorization"] == [f"Bearer {world.token}".encode()]
    assert world.homeserver.rooms[world.room][-1]["event_id"] == event_id


def test_send_original_form_ignores_proxy_host(world: World) -> None:
    resource = rooms.send.build(world.context())
    options = {256: (f"Bearer {world.token}".encode(),),
               OptionNumber.PROXY_URI: (f"coap://evil.example/9/{world.room}/m.room.message/42".encode(),)}
    response = render(resource, req(Code.PUT, {"msgtype": "m.notice", "body": "x"}, options=options))
    assert response.code == Code.CHANGED
    assert world.paths()[-1] == ("rooms", world.room, "send", "m.room.message", "42")


def test_send_same_txn_twice_gives_same_event(world: World) -> None:
    resource = rooms.send.build(world.context())
    body = {"room_id": world.alias, "txn_id": "same", "body": "once"}
    first = render(resource, req(Code.POST, body, options=world.auth))
    second = render(resource, req(Code.POST, body, options=world.auth))
    assert first.code == Code.CHANGED and first.payload == second.payload


@pytest.mark.parametrize("payload, content_format, code, diagnostic", [
    (b"\xff\x00", ContentFormat.CBOR, Code.BAD_REQUEST, b"malformed CBOR"),
    ({"room_id": "!r"}, ContentFormat.CBOR, Code.BAD_REQUEST, b"missing body"),
    ({"room_id": "!r", "body": 5}, ContentFormat.CBOR, Code.BAD_REQUEST, b"body must be a text string"),
    ({"room_id": 7, "body": "x"}, ContentFormat.CBOR, Code.BAD_REQUEST, b"room_id must be a text string"),
    ({"body": "x"}, ContentFormat.CBOR, Code.BAD_REQUEST, b"missing room_id"),
    ({"room_id": "!r", "body": "x", "msgtype": "m.image"}, ContentFormat.CBOR, Code.BAD_REQUEST, b"msgtype"),
    (b'{"body": "x"}', ContentFormat.JSON, Code.UNSUPPORTED_CONTENT_FORMAT, b"expected application/cbor (60)"),
])
def test_bad_send_bodies_never_reach_the_homeserver(world: World, payload: Any, content_format: int,
                                                     code: Code, diagnostic: bytes) -> None:
    resource = rooms.send.build(world.context())
    response = render(resource, req(Code.POST, payload, options=world.auth, content_format=content_format))
    assert response.code == code and response.payload.startswith(diagnostic)
    assert world.homeserver.requests == []


def test_no_token_and_no_device_entry_is_401(world: World) -> None:
    resource = rooms.send.build(world.context())
    response = render(resource, req(Code.POST, {"room_id": world.room, "body": "x"}))
    assert (response.code, response.payload) == (Code.UNAUTHORIZED, b"no credentials")
    assert world.homeserver.requests == []


def test_configured_device_credentials_log_in_once(world: World) -> None:
    devices = [{"address": "2001:db8::/64", "user": world.user_id, "password": "pw"}]
    resource = rooms.send.build(world.context(devices))
    for txn in ("a", "b"):
        response = render(resource, req(Code.POST, {"room_id": world.room, "txn_id": txn, "body": "x"}))
        assert response.code == Code.CHANGED
    assert len(world.homeserver.calls("login")) == 1


def test_devices_sharing_a_configured_entry_do_not_swallow_each_others_sends(world: World) -> None:
    # Both sensors seed their counters from /time: the same txn_id from two addresses is two
    # messages; the same one again from one address is a retry (one event).
    devices = [{"address": "2001:db8::/64", "user": world.user_id, "password": "pw"}]
    resource = rooms.send.build(world.context(devices))
    event_ids = []
    for host, text in (("2001:db8::1", "from one"), ("2001:db8::2", "from two"), ("2001:db8::1", "from one")):
        body = {"room_id": world.room, "txn_id": "1700000001", "body": text}
        response = render(resource, req(Code.POST, body, host=host))
        assert response.code == Code.CHANGED
        event_ids.append(cbor2.loads(response.payload)["event_id"])
    assert event_ids[0] != event_ids[1] and event_ids[0] == event_ids[2]
    bodies = [event["content"]["body"] for event in world.homeserver.rooms[world.room]
              if event["type"] == "m.room.message"]
    assert bodies == ["from one", "from two"]


def test_a_device_with_its_own_token_keeps_its_txn_id_as_it_is(world: World) -> None:
    resource = rooms.send.build(world.context())
    render(resource, req(Code.POST, {"room_id": world.room, "txn_id": "t-own", "body": "x"}, options=world.auth))
    assert any(key[-1] == "t-own" for key in world.homeserver.txns)


def test_proxy_uri_for_another_operation_is_refused(world: World) -> None:
    resource = rooms.join.build(world.context())
    options = {**world.auth, OptionNumber.PROXY_URI: (b"/9/!r/t/1",)}
    response = render(resource, req(Code.POST, options=options))
    assert response.code == Code.BAD_REQUEST and world.homeserver.requests == []


def test_join_by_proxy_uri_code(world: World) -> None:
    resource = rooms.join.build(world.context())
    options = {**world.auth, OptionNumber.PROXY_URI: (f"/K/{world.room}".encode(),)}
    response = render(resource, req(Code.POST, options=options))
    assert cbor2.loads(response.payload) == {"room_id": world.room}


def test_getmsg_empty_room_is_404_then_latest_message(world: World) -> None:
    context = world.context()
    getmsg = rooms.getmsg.build(context)
    response = render(getmsg, req(Code.GET, options=world.auth, query=(f"room={world.room}",)))
    assert (response.code, response.payload) == (Code.NOT_FOUND, b"no message")
    render(rooms.send.build(context), req(Code.POST, {"room_id": world.room, "txn_id": "1", "body": "hello"},
                                          options=world.auth))
    options = {**world.auth, OptionNumber.PROXY_URI: (f"/E/{world.room}".encode(),)}
    response = render(getmsg, req(Code.GET, options=options))
    assert response.code == Code.CONTENT
    # The original form is answered as the original gateway answered it: sender and body, no more.
    assert response.payload == cbor2.dumps({"sender": world.user_id, "body": "hello"})
    clean = render(getmsg, req(Code.GET, options=world.auth, query=(f"room={world.room}",)))
    latest = world.homeserver.rooms[world.room][-1]
    assert cbor2.loads(clean.payload) == {"sender": world.user_id, "body": "hello", "event_id": latest["event_id"],
                                          "origin_server_ts": latest["origin_server_ts"]}


def test_dead_token_is_401(world: World) -> None:
    resource = rooms.getmsg.build(world.context())
    response = render(resource, req(Code.GET, options={256: (b"dead",)}, query=(f"room={world.room}",)))
    assert (response.code, response.payload.partition(b":")[0]) == (Code.UNAUTHORIZED, b"M_UNKNOWN_TOKEN")


def test_login_accepts_original_and_short_forms(world: World) -> None:
    resource = accounts.login.build(world.context())
    original = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "d"}, "password": "pw"}
    for body in (original, {"user": "d", "password": "pw"}):
        response = render(resource, req(Code.POST, body))
        assert response.code == Code.CHANGED
        assert set(cbor2.loads(response.payload)) == {"access_token", "user_id", "device_id"}
    assert world.homeserver.calls("login")[-1].body["identifier"] == {"type": "m.id.user", "user": "d"}


def test_time_text_and_cbor_and_406(world: World) -> None:
    resource = clock.time.build(world.context())
    assert render(resource, req(Code.GET)).payload == b"1700000000"
    cbor_answer = render(resource, req(Code.GET, accept=ContentFormat.CBOR))
    assert cbor2.loads(cbor_answer.payload) == 1700000000
    assert render(resource, req(Code.GET, accept=ContentFormat.JSON)).code == Code.NOT_ACCEPTABLE
    # An original CoMatrix client's Proxy-Uri is harmless here: /time answers from the clock.
    proxied = req(Code.GET, options={int(OptionNumber.PROXY_URI): (b"coap://[::1]/_matrix/client/r0/x",)})
    assert render(resource, proxied).payload == b"1700000000"


def test_wrong_method_is_405(world: World) -> None:
    response = render(rooms.getmsg.build(world.context()), req(Code.DELETE))
    assert response.code == Code.METHOD_NOT_ALLOWED


@pytest.mark.parametrize("raw", [b"has space", b"tab\tin", b"\xff\xfe", b"Bearer ", b"x" * 2000])
def test_malformed_tokens_are_401_and_not_forwarded(world: World, raw: bytes) -> None:
    resource = rooms.getmsg.build(world.context())
    response = render(resource, req(Code.GET, options={256: (raw,)}, query=(f"room={world.room}",)))
    assert response.code == Code.UNAUTHORIZED
    assert world.homeserver.requests == []


def test_a_plugin_resource_may_take_proxy_uri_itself(world: World) -> None:
    from comatrix.resources import MatrixResource

    class Forwarding(MatrixResource):
        accepts_proxy_uri = True  # reads the Proxy-Uri itself; no original-form path codes

        def render_GET(self, request: Request) -> Response:
            return Response(payload=(request.proxy_uri or "").encode())

    proxied = req(Code.GET, options={int(OptionNumber.PROXY_URI): (b"coap://elsewhere/x",)})
    assert render(Forwarding(world.context()), proxied).payload == b"coap://elsewhere/x"
    assert render(rooms.getmsg.build(world.context()), proxied).code == Code.BAD_REQUEST  # its own check


def test_a_devices_entry_retry_from_a_new_source_port_is_the_same_send(world: World) -> None:
    # A sensor that reboots (or a NAT that rebinds) retries its send from the same host but a new
    # UDP port, with the same Message ID, token and txn_id.  For the CoAP layer that is a new
    # exchange (endpoints differ: RFC 7252 §4.5), so the resource runs again; the address-scoped
    # txn id keys on the host only, so Matrix sees the same txnId: one event, the same event_id.
    devices = [{"address": "2001:db8::/64", "user": world.user_id, "password": "pw"}]
    harness = Harness(build_site([rooms.send], world.context(devices), error_response))
    body = cbor2.dumps({"room_id": world.room, "txn_id": "1700000002", "body": "once"})
    replies = []
    for port in (5683, 49152, 61000):
        [reply] = harness.send(Code.POST, ("send",), mid=0x4242, token=b"\x07\x07", payload=body,
                               options=[(OptionNumber.CONTENT_FORMAT, bytes([ContentFormat.CBOR]))],
                               peer=("2001:db8::1", port))
        assert reply.code == Code.CHANGED, reply
        replies.append(cbor2.loads(reply.payload)["event_id"])
    assert len(set(replies)) == 1
    assert [event["content"]["body"] for event in world.homeserver.rooms[world.room]
            if event["type"] == "m.room.message"] == ["once"]
    assert len(world.homeserver.calls("login")) == 1  # the entry's one login serves every port
    sends = [seen for seen in world.homeserver.requests if seen.method == "PUT"]
    assert len(sends) == 3 and len({seen.path for seen in sends}) == 1  # three exchanges, one txnId
