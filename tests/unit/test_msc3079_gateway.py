"""MSC3079 through the real CoAP layer (Harness) against an in-memory homeserver (StubTreq).

Sticky option 256/257 per peer, body translation both ways, status mapping,
/versions, and /sync long-poll and Observe loops (CON pushes, ACK pacing,
deregistration, RST, the loop bound).
"""

from __future__ import annotations

import json
from urllib.parse import unquote
from typing import Any

import cbor2
import pytest
from treq.testing import StubTreq
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.server import Request as WebRequest

from comatrix.coap import wire
from comatrix.coap.numbers import Code, ContentFormat, MessageType, OptionNumber
from comatrix.coap.server import CoapSettings, Site
from comatrix.coap.testing import Harness, option
from comatrix.config import build_config
from comatrix.credentials import Credentials
from comatrix.errors import error_response
from comatrix.interfaces import PluginContext
from comatrix.matrix.client import MatrixClient
from comatrix.matrix.transport import MatrixTransport
from comatrix.msc3079.service import LOW_BANDWIDTH, Msc3079Service
from comatrix.plugins import msc3079 as plugins

TOKEN, VERSION = 256, 257
CBOR = ContentFormat.CBOR
PEER, OTHER = ("2001:db8::7", 5683), ("2001:db8::8", 5683)
BASE = "http://hs.test"


class Homeserver(Resource):
    """Records requests; answers from ``answers[(method, path)]`` or a few built-in endpoints."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, str, dict[str, list[str]], Any, str | None]] = []
        self.answers: dict[tuple[str, str], tuple[int, Any, dict[str, str]]] = {}
        self.batch = 0
        self.events: list[dict[str, Any]] = []
        self.hanging: list[tuple[WebRequest, int]] = []

    def render(self, request: WebRequest) -> Any:
        method = request.method.decode()
        path = unquote(request.path.decode())
        query = {k.decode(): [v.decode() for v in vs] for k, vs in request.args.items()}
        raw = request.content.read()
        body = json.loads(raw) if raw else None
        self.requests.append((method, path, query, body, request.getHeader("authorization")))
        request.setHeader("content-type", "application/json")
        if (method, path) in self.answers:
            status, answer, headers = self.answers[(method, path)]
            request.setResponseCode(status)
            for name, value in headers.items():
                request.setHeader(name, value)
            return json.dumps(answer).encode()
        if path == "/_matrix/client/versions":
            return json.dumps({"versions": ["v1.11"], "unstable_features": {"x": True}}).encode()
        if path == "/_matrix/client/v3/sync":
            since = int(query.get("since", ["0"])[0].lstrip("s") or 0)
            if since >= self.batch and query.get("timeout", ["0"])[0] != "0":
                self.hanging.append((request, since))
                return NOT_DONE_YET
            return json.dumps(self.sync_answer(since)).encode()
        return json.dumps({"event_id": "$e1", "room_id": "!r"}).encode()

    def sync_answer(self, since: int) -> dict[str, Any]:
        fresh = self.events[since:]
        rooms = {"join": {"!r": {"timeline": {"events": fresh}}}} if fresh else {"join": {}}
        return {"next_batch": f"s{self.batch}", "rooms": rooms}

    def add_event(self, body: str) -> None:
        self.events.append({"type": "m.room.message", "content": {"msgtype": "m.text", "body": body}})
        self.batch = len(self.events)
        hanging, self.hanging = self.hanging, []
        for request, since in hanging:
            request.write(json.dumps(self.sync_answer(since)).encode())
            request.finish()


class Setup:
    def __init__(self, settings: dict[str, Any] | None = None, devices: list[dict[str, Any]] | None = None,
                 *, allow_registration: bool = False, **top: Any) -> None:
        self.hs = Homeserver()
        self.stub = StubTreq(self.hs)
        self.site = Site(error_response)
        self.h = Harness(self.site, CoapSettings(), understood_options=frozenset({TOKEN, VERSION}))
        clock = self.h.clock
        config = build_config({"devices": devices or [], "plugins": {"msc3079": settings or {}},
                               "allow_registration": allow_registration, **top})
        matrix = MatrixClient(MatrixTransport(BASE, http_client=self.stub, reactor=clock), reactor=clock)
        context = PluginContext(config=config, matrix=matrix, credentials=Credentials(config.devices, matrix),
                                state={}, reactor=clock)
        self.service = context.state["msc3079"] = Msc3079Service(
            context, long_poll=MatrixTransport(BASE, http_client=self.stub, reactor=clock, timeout=70))
        for path, resource in plugins.msc3079.build_routes(context):
            self.site.put(path, resource)

    def send(self, code: int, path: tuple[str, ...], body: Any = None, *, options: Any = (),
             peer: Any = PEER, **kwargs: Any) -> wire.Datagram:
        payload = cbor2.dumps(body) if body is not None else b""
        opts = list(options)
        if payload:
            opts.append((OptionNumber.CONTENT_FORMAT, bytes([CBOR])))
        replies = self.h.send(code, path, options=opts, payload=payload, peer=peer, **kwargs)
        self.stub.flush()
        replies += self.h.replies()
        assert len(replies) == 1, replies
        return replies[0]


def answer(reply: wire.Datagram) -> Any:
    return cbor2.loads(reply.payload)


def test_send_with_token_and_integer_keys() -> None:
    s = Setup()
    reply = s.send(Code.PUT, ("9", "!room", "m.room.message", "txn1"), {28: "m.text", 27: "hi"},
                   options=[(TOKEN, b"syt_secret")])
    method, path, _query, body, auth = s.hs.requests[-1]
    assert (method, path, body, auth) == ("PUT", "/_matrix/client/v3/rooms/!room/send/m.room.message/txn1",
                                          {"msgtype": "m.text", "body": "hi"}, "Bearer syt_secret")
    assert reply.code == Code.CHANGED and option(reply, OptionNumber.CONTENT_FORMAT) == bytes([CBOR])
    # Integer keys in the request: version 1 is assumed for the answer.
    assert answer(reply) == {1: "$e1", 5: "!r"}


def test_token_is_sticky_per_peer_latest_wins_and_expires() -> None:
    s = Setup({"sticky_idle_timeout": 100})
    s.send(Code.GET, ("_matrix", "client", "r0", "joined_rooms"), options=[(TOKEN, b"Bearer tok-1")])
    s.send(Code.GET, ("_matrix", "client", "r0", "joined_rooms"))
    assert [r[4] for r in s.hs.requests] == ["Bearer tok-1", "Bearer tok-1"]
    assert s.hs.requests[-1][1] == "/_matrix/client/v3/joined_rooms"
    s.send(Code.GET, ("_matrix", "client", "v3", "joined_rooms"), peer=OTHER)
    assert s.hs.requests[-1][4] is None  # another peer does not inherit it
    s.send(Code.GET, ("_matrix", "client", "v3", "joined_rooms"), options=[(TOKEN, b"tok-2")])
    s.send(Code.GET, ("_matrix", "client", "v3", "joined_rooms"))
    assert s.hs.requests[-1][4] == "Bearer tok-2"
    s.h.advance(99)
    s.send(Code.GET, ("_matrix", "client", "v3", "joined_rooms"))  # activity refreshes the lifetime
    s.h.advance(99)
    s.send(Code.GET, ("_matrix", "client", "v3", "joined_rooms"))
    assert s.hs.requests[-1][4] == "Bearer tok-2"
    s.h.advance(101)
    s.send(Code.GET, ("_matrix", "client", "v3", "joined_rooms"))
    assert s.hs.requests[-1][4] is None


def test_sticky_table_is_bounded() -> None:
    s = Setup({"max_peers": 2})
    for port in (1, 2, 3):
        s.send(Code.GET, ("_matrix", "client", "v3", "joined_rooms"), options=[(TOKEN, b"t%d" % port)],
               peer=("2001:db8::9", port))
    assert len(s.service.peers) == 2
    s.send(Code.GET, ("_matrix", "client", "v3", "joined_rooms"), peer=("2001:db8::9", 1))
    assert s.hs.requests[-1][4] is None


def test_sticky_token_not_sent_to_login_or_register_and_dropped_on_logout() -> None:
    s = Setup()
    s.send(Code.POST, ("3",), options=[(TOKEN, b"tok")])
    assert s.hs.requests[-1][:2] == ("POST", "/_matrix/client/v3/logout") and s.hs.requests[-1][4] == "Bearer tok"
    s.send(Code.GET, ("_matrix", "client", "v3", "joined_rooms"))
    assert s.hs.requests[-1][4] is None  # logged out: no longer sticky
    s.send(Code.GET, ("_matrix", "client", "v3", "joined_rooms"), options=[(TOKEN, b"tok2")])
    s.send(Code.POST, ("_matrix", "client", "r0", "login"), {"type": "m.login.password"})
    assert s.hs.requests[-1][1:2] == ("/_matrix/client/v3/login",) and s.hs.requests[-1][4] is None


def test_key_table_version_is_sticky_and_negotiated() -> None:
    s = Setup()
    path = ("_matrix", "client", "v3", "joined_rooms")
    assert answer(s.send(Code.GET, path)) == {"event_id": "$e1", "room_id": "!r"}  # absent: names
    assert answer(s.send(Code.GET, path, options=[(VERSION, b"\x01")])) == {1: "$e1", 5: "!r"}
    assert answer(s.send(Code.GET, path)) == {1: "$e1", 5: "!r"}  # sticky
    assert answer(s.send(Code.GET, path, options=[(VERSION, b"")])) == {"event_id": "$e1", "room_id": "!r"}
    assert answer(s.send(Code.GET, path, options=[(VERSION, b"\x09")])) == {1: "$e1", 5: "!r"}  # newer: v1
    assert s.send(Code.GET, path, options=[(VERSION, b"\x00" * 5)]).code == Code.BAD_OPTION
    assert answer(s.send(Code.GET, path, peer=OTHER)) == {"event_id": "$e1", "room_id": "!r"}


def test_json_on_request() -> None:
    s = Setup()
    replies = s.h.send(Code.POST, ("G",), payload=b'{"name":"x"}', peer=PEER,
                       options=[(OptionNumber.CONTENT_FORMAT, bytes([ContentFormat.JSON]))])
    assert s.hs.requests[-1][3] == {"name": "x"}
    assert option(replies[0], OptionNumber.CONTENT_FORMAT) == bytes([ContentFormat.JSON])
    assert json.loads(replies[0].payload) == {"event_id": "$e1", "room_id": "!r"}


@pytest.mark.parametrize("body, diagnostic", [({500: 1}, b"unknown integer key 500"),
                                              ([1, 2], b"body must be a CBOR map")])
def test_bad_bodies_are_not_forwarded(body: Any, diagnostic: bytes) -> None:
    s = Setup()
    reply = s.send(Code.POST, ("G",), body)
    assert (reply.code, reply.payload) == (Code.BAD_REQUEST, diagnostic) and not s.hs.requests


def test_unknown_paths_media_and_other_apis_are_refused() -> None:
    s = Setup()
    for path in [("_matrix", "media", "v3", "upload"), ("_matrix", "federation", "v1", "version"), ("9", "!r")]:
        assert s.send(Code.GET, path).code == Code.NOT_FOUND
    assert s.send(Code.GET, ("_matrix", "media", "v3", "upload")).payload == b"media is HTTP only"
    assert not s.hs.requests


def test_status_mapping_and_error_payloads() -> None:
    s = Setup()
    path = "/_matrix/client/v3/rooms/!r/send/m.room.message/t"
    s.hs.answers[("PUT", path)] = (429, {"errcode": "M_LIMIT_EXCEEDED", "error": "Too many requests",
                                         "retry_after_ms": 2500}, {})
    reply = s.send(Code.PUT, ("9", "!r", "m.room.message", "t"), {27: "x"}, options=[(TOKEN, b"tok")])
    assert reply.code == Code.TOO_MANY_REQUESTS and option(reply, OptionNumber.MAX_AGE) == b"\x03"
    assert answer(reply) == {102: "M_LIMIT_EXCEEDED", 103: "Too many requests"}
    s.hs.answers[("GET", "/_matrix/client/v3/rooms/!r/state")] = (403, {"errcode": "M_FORBIDDEN"}, {})
    reply = s.send(Code.GET, ("B", "!r"))
    assert reply.code == Code.FORBIDDEN and answer(reply) == {102: "M_FORBIDDEN"}
    s.hs.answers[("DELETE", "/_matrix/client/v3/devices/D")] = (200, {}, {})
    assert s.send(Code.DELETE, ("e", "D")).code == Code.DELETED
    s.hs.answers[("GET", "/_matrix/client/v3/devices")] = (502, "<html>", {})
    reply = s.send(Code.GET, ("d",))
    assert (reply.code, reply.payload) == (Code.BAD_GATEWAY, b"HTTP 502")
    assert s.send(Code.FETCH, ("d",)).code == Code.METHOD_NOT_ALLOWED


def test_versions_advertise_low_bandwidth() -> None:
    s = Setup(dtls_port=5684)
    body = answer(s.send(Code.GET, ("0",)))
    assert body["unstable_features"] == {"x": True, LOW_BANDWIDTH: True}
    assert body[LOW_BANDWIDTH] == {"dtls": 5684, "cbor_enum_version": 1, "coap_enum_version": 1, "observe": 1}
    assert s.hs.requests[-1][1] == "/_matrix/client/versions"
    assert answer(s.send(Code.GET, ("_matrix", "client", "versions"), options=[(VERSION, b"\x01")]))[100] == ["v1.11"]


def test_sync_long_poll_passes_a_capped_timeout() -> None:
    s = Setup({"max_long_poll": 20})
    s.hs.batch = 1
    s.hs.events = [{"type": "m.room.message", "content": {"body": "old"}}]
    reply = s.send(Code.GET, ("7",), query=["timeout=90000", "since=s0"], options=[(TOKEN, b"tok")])
    assert s.hs.requests[-1][2] == {"timeout": ["20000"], "since": ["s0"]}
    assert reply.code == Code.CONTENT and answer(reply)["next_batch"] == "s1"


def test_sync_long_poll_deadline_is_timeout_plus_margin() -> None:
    s = Setup({"http_margin": 5})
    replies = s.h.send(Code.GET, ("7",), query=["timeout=10000", "since=s0"], options=[(TOKEN, b"tok")])
    s.stub.flush()
    assert [r.code for r in replies + s.h.replies()] == []  # hanging: nothing yet (the ACK comes later)
    replies = s.h.advance(1)
    assert [r.mtype for r in replies] == [MessageType.ACK] and replies[0].code == 0
    replies = s.h.advance(13.5)
    assert replies == []
    replies = s.h.advance(1)
    assert [r.code for r in replies] == [Code.GATEWAY_TIMEOUT]


def observe(s: Setup, token: bytes = b"\x42", peer: Any = PEER) -> wire.Datagram:
    replies = s.h.send(Code.GET, ("7",), token=token, peer=peer,
                       options=[(OptionNumber.OBSERVE, b""), (TOKEN, b"tok"), (VERSION, b"\x01")])
    s.stub.flush()
    replies += s.h.replies()
    assert len(replies) == 1
    s.h.advance(0)  # the loop starts after the registration answer
    s.stub.flush()
    return replies[0]


def test_sync_observe_pushes_each_batch_as_con_and_waits_for_the_ack() -> None:
    s = Setup()
    first = observe(s)
    assert first.code == Code.CONTENT and option(first, OptionNumber.OBSERVE) is not None
    assert answer(first)[19] == "s0"
    assert s.hs.requests[-1][2]["since"] == ["s0"] and s.hs.requests[-1][2]["timeout"] == ["30000"]
    s.hs.add_event("hello")
    s.stub.flush()
    pushed = s.h.replies()
    assert [(p.mtype, p.code) for p in pushed] == [(MessageType.CON, Code.CONTENT)]
    body = answer(pushed[0])
    assert body[19] == "s1" and body[23][24]["!r"][12][13][0][3] == {28: "m.text", 27: "hello"}
    requests = len(s.hs.requests)
    s.h.advance(1)
    assert len(s.hs.requests) == requests  # no new /sync before the client acknowledged the push
    s.h.send_raw(wire.empty(MessageType.ACK, pushed[0].mid), PEER)
    s.stub.flush()
    assert len(s.hs.requests) == requests + 1 and s.hs.requests[-1][2]["since"] == ["s1"]
    assert len(s.service.loops) == 1
    # Deregistration (GET with Observe=1) ends the loop.
    s.h.send(Code.GET, ("7",), token=b"\x42", peer=PEER, options=[(OptionNumber.OBSERVE, b"\x01")], query=["timeout=0"])
    s.stub.flush()
    assert s.service.loops == {}


def test_sync_observe_loop_ends_on_rst_and_on_give_up() -> None:
    s = Setup()
    observe(s)
    s.hs.add_event("one")
    s.stub.flush()
    pushed = s.h.replies()
    s.h.send_raw(wire.empty(MessageType.RST, pushed[0].mid), PEER)
    assert s.service.loops == {}
    observe(s, token=b"\x43")
    s.hs.add_event("two")
    s.stub.flush()
    assert len(s.h.replies()) == 1
    for _ in range(6):
        s.h.advance(60)  # every retransmission unanswered
    assert s.service.loops == {} and s.h.server.observer_count() == 0


def test_sync_observe_error_ends_the_observation_with_an_error_notification() -> None:
    s = Setup()
    observe(s)
    s.hs.answers[("GET", "/_matrix/client/v3/sync")] = (401, {"errcode": "M_UNKNOWN_TOKEN", "error": "gone"}, {})
    s.hs.add_event("one")  # releases the hanging poll; the next one gets 401
    s.stub.flush()
    pushed = s.h.replies()
    error = s.h.send_raw(wire.empty(MessageType.ACK, pushed[0].mid), PEER)
    s.stub.flush()
    error += s.h.replies()
    assert [p.code for p in error] == [Code.UNAUTHORIZED] and answer(error[0]) == {102: "M_UNKNOWN_TOKEN",
                                                                                 103: "gone"}
    assert s.service.loops == {} and s.h.server.observer_count() == 0


def test_sync_loops_are_bounded() -> None:
    s = Setup({"max_sync_loops": 1})
    observe(s)
    replies = s.h.send(Code.GET, ("7",), token=b"\x99", peer=OTHER,
                       options=[(OptionNumber.OBSERVE, b""), (TOKEN, b"tok")])
    assert [r.code for r in replies] == [Code.SERVICE_UNAVAILABLE] and option(replies[0], OptionNumber.MAX_AGE)
    assert len(s.service.loops) == 1 and s.h.server.observer_count() == 1
    s.service.shutdown()
    assert s.service.loops == {}


def test_devices_sharing_a_configured_entry_get_txn_ids_of_their_own() -> None:
    s = Setup(devices=[{"address": "2001:db8::/64", "user": "@d:hs", "password": "pw"}])
    s.hs.answers[("POST", "/_matrix/client/v3/login")] = (
        200, {"access_token": "syt_shared", "user_id": "@d:hs", "device_id": "COMATRIXD"}, {})
    sent = []
    for host in ("2001:db8::1", "2001:db8::2", "2001:db8::1"):
        reply = s.send(Code.PUT, ("9", "!room", "m.room.message", "17"), {28: "m.text", 27: "hi"},
                       peer=(host, 5683))
        assert reply.code == Code.CHANGED
        method, path, _query, _body, auth = s.hs.requests[-1]
        assert (method, auth) == ("PUT", "Bearer syt_shared")
        sent.append(path.rsplit("/", 1)[1])
    # One Matrix device for the whole entry: each address's "17" is its own txn id, and the
    # same address retrying keeps its own (Matrix then returns the first event).
    assert sent[0] != sent[1] and sent[0] == sent[2] and all(txn.endswith(".17") for txn in sent)


REGISTER_PATHS = [("4",), ("_matrix", "client", "r0", "register"), ("_matrix", "client", "v3", "register"),
                  ("_matrix", "client", "unstable", "register")]


@pytest.mark.parametrize("path", REGISTER_PATHS)
def test_register_paths_are_refused_while_registration_is_closed(path: tuple[str, ...]) -> None:
    body = {"username": "newdev", "password": "pw", "auth": {"type": "m.login.dummy"}}
    closed = Setup()
    reply = closed.send(Code.POST, path, body)
    assert (reply.code, reply.payload) == (Code.FORBIDDEN, b"registration closed")
    assert closed.hs.requests == []
    opened = Setup(allow_registration=True)
    assert opened.send(Code.POST, path, body).code == Code.CHANGED
    assert [r[:2] for r in opened.hs.requests] == [("POST", "/_matrix/client/v3/register")]


LOGOUT_ALL = ("_matrix", "client", "v3", "logout", "all")
SHARED = {"address": "2001:db8::/64", "access_token": "syt_shared"}
PUSHER = {"kind": "http", "app_id": "a", "pushkey": "k", "app_display_name": "A",
          "device_display_name": "D", "lang": "en", "data": {"url": "https://p.example/_matrix/push/v1/notify"}}


def test_shared_credentials_get_device_operations_only() -> None:
    s = Setup(devices=[SHARED])
    assert s.send(Code.PUT, ("9", "!room", "m.room.message", "t1"), {"body": "hi"}).code == Code.CHANGED
    assert s.send(Code.GET, ("7",)).code == Code.CONTENT
    assert s.send(Code.GET, ("E", "!room")).code == Code.CONTENT
    forwarded = len(s.hs.requests)
    for path, body in ((("l",), PUSHER), (LOGOUT_ALL, None), (("G",), {"name": "x"}), (("k",), None),
                       (("_matrix", "client", "v3", "user", "@d:hs", "openid", "request_token"), {})):
        reply = s.send(Code.GET if path == ("k",) else Code.POST, path, body)
        assert (reply.code, reply.payload) == (Code.FORBIDDEN, b"not allowed for shared credentials"), path
    assert len(s.hs.requests) == forwarded  # the homeserver saw none of them


def test_an_allow_list_opens_what_it_names_and_an_own_token_opens_everything() -> None:
    s = Setup(devices=[dict(SHARED, allow=["pushers/set", "logout/all"])])
    assert s.send(Code.POST, ("l",), PUSHER).code == Code.CHANGED
    assert s.send(Code.POST, LOGOUT_ALL).code == Code.CHANGED
    assert [(r[1], r[4]) for r in s.hs.requests] == [("/_matrix/client/v3/pushers/set", "Bearer syt_shared"),
                                                     ("/_matrix/client/v3/logout/all", "Bearer syt_shared")]
    assert s.send(Code.POST, ("G",), {"name": "x"}).code == Code.FORBIDDEN  # not named
    # The same address with a token of its own -- sent, then sticky -- has the full API.
    assert s.send(Code.POST, ("G",), {"name": "x"}, options=[(TOKEN, b"syt_own")]).code == Code.CHANGED
    assert s.send(Code.GET, ("k",)).code == Code.CONTENT
    assert [r[4] for r in s.hs.requests[-2:]] == ["Bearer syt_own", "Bearer syt_own"]
def test_a_token_made_sticky_through_a_security_context_stays_in_that_context() -> None:
    from comatrix.coap.message import Peer, Request, Security
    from comatrix.msc3079.peers import PeerTable

    table = PeerTable(16, 100, lambda: 0.0)
    secured = Security("oscore", "01")
    here = Peer("2001:db8::5", 5683)
    table.update(Request(Code.GET, (), peer=here, security=secured, options={TOKEN: (b"tok-secret",)}))
    assert table.update(Request(Code.GET, (), peer=here)).token is None  # plain, same address and port: nothing
    moved = Request(Code.GET, (), peer=Peer("2001:db8::77", 1), security=secured)
    assert table.update(moved).token == "tok-secret"  # the context from anywhere: its own token
    table.forget_token(moved, "tok-secret")
    assert table.update(moved).token is None
