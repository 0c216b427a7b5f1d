"""Bad input never hurts: property-based tests for every built-in resource.

Each example goes through the real CoAP layer (`comatrix.coap.testing.Harness`)
into the gateway's site (built-in plugins, the gateway's error adapter) backed by
the in-memory `FakeHomeserver`.  For wrong content-formats, invalid CBOR, values
of the wrong type, missing fields, oversized strings, invalid UTF-8, huge
integers and deep nesting the properties are: a 4.xx answer with a short
diagnostic, no request reached the homeserver, and no log event above DEBUG
carrying a traceback (nor any WARNING or worse).  Each resource also gets one
valid request that does reach the homeserver, so the properties are not hollow.
"""

from __future__ import annotations

import support.world

import contextlib
from typing import Any, Iterator, cast

import cbor2
import pytest
from hypothesis import HealthCheck, assume, event, given, settings, strategies as st
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher

from comatrix.coap import wire
from comatrix.coap.errors import encode_uint
from comatrix.coap.numbers import Code, ContentFormat, OptionNumber
from comatrix.coap.testing import Harness
from comatrix.codec.msc3079 import UnknownPath, parse_matrix_path
from comatrix.discovery import build_site
from comatrix.errors import error_response
from comatrix.plugins import accounts, clock, rooms

PLUGINS = [accounts.register, accounts.login, accounts.logout, rooms.join, rooms.getmsg, rooms.send,
           clock.time]
TOKEN_OPTION = 256
CF = int(OptionNumber.CONTENT_FORMAT)

EXAMPLES = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class World(support.world.World):
    """The shared fake world, served by a gateway site built from the built-in plugins."""

    def __init__(self) -> None:
        super().__init__()
        # Registration open: its body checks are exercised too (closed, it is refused before them).
        self.harness = Harness(build_site(PLUGINS, self.context(allow_registration=True), error_response))

    def request(self, method: Code, path: str, payload: bytes = b"", *, content_format: int | None = None,
                token: bool = True, options: list[tuple[int, bytes]] | None = None,
                query: tuple[str, ...] = ()) -> wire.Datagram:
        all_options = list(options or [])
        if content_format is not None:
            all_options.append((CF, encode_uint(content_format)))
        if token:
            all_options.append((TOKEN_OPTION, self.token.encode()))
        [reply] = self.harness.send(method, (path,), payload=payload, options=all_options, query=query)
        return reply


@contextlib.contextmanager
def captured_log() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


def assert_refused(world: World, reply: wire.Datagram, events: list[dict[str, Any]]) -> None:
    assert reply.code >> 5 == 4, (Code(reply.code).dotted(), reply.payload)
    assert 0 < len(reply.payload) <= 64, reply.payload  # a short diagnostic
    reply.payload.decode("utf-8")
    assert world.homeserver.requests == [], [r.path for r in world.homeserver.requests]
    loud = [e for e in events if e.get("log_level", LogLevel.debug) > LogLevel.debug
            and ("log_failure" in e or e.get("log_level") >= LogLevel.warn)]
    assert loud == [], loud


# -- what each resource reads -------------------------------------------------------------

#: Per resource: method, a valid body, and its fields: name -> (max UTF-8 length, required).
#: Only fields the resource reads for that body are listed (unknown keys are ignored, as in Matrix).
BODY_RESOURCES: dict[str, tuple[Code, dict[str, Any], dict[str, tuple[int, bool]]]] = {
    "register": (Code.POST, {"username": "newdev", "password": "pw2", "device_id": "D1"},
                 {"username": (255, True), "password": (512, True), "device_id": (255, False)}),
    "login": (Code.POST, {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "d"},
                          "password": "pw"},
              {"password": (512, True)}),
    "logout": (Code.POST, {}, {}),
    "join": (Code.POST, {"room_id": "ROOM"}, {"room_id": (255, True)}),
    "send": (Code.POST, {"room_id": "ROOM", "txn_id": "t1", "body": "hi", "msgtype": "m.text",
                         "formatted_body": "<b>hi</b>", "format": "org.matrix.custom.html"},
             {"room_id": (255, True), "txn_id": (64, False), "body": (16384, True), "msgtype": (64, False),
              "formatted_body": (16384, False), "format": (64, False)}),
}


def valid_body(world: World, name: str) -> dict[str, Any]:
    body = dict(BODY_RESOURCES[name][1])
    if body.get("room_id") == "ROOM":
        body["room_id"] = world.room
    return body


def uses_token(name: str) -> bool:
    return name not in ("register", "login")


@pytest.mark.parametrize("name", sorted(BODY_RESOURCES))
def test_a_valid_body_does_reach_the_homeserver(name: str) -> None:
    world = World()
    method = BODY_RESOURCES[name][0]
    reply = world.request(method, name, cbor2.dumps(valid_body(world, name)),
                          content_format=ContentFormat.CBOR, token=uses_token(name))
    assert reply.code >> 5 == 2, (Code(reply.code).dotted(), reply.payload)
    assert world.homeserver.requests


# -- strategies -------------------------------------------------------------------------------

huge_integers = st.one_of(st.integers(min_value=2**64), st.integers(max_value=-(2**64) - 1),
                          st.integers(min_value=2**63, max_value=2**64 - 1))
not_text = st.one_of(
    st.integers(), huge_integers, st.floats(allow_nan=True), st.booleans(), st.binary(max_size=40),
    st.lists(st.text(max_size=5), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


def text_header(length: int) -> bytes:
    """The CBOR head of a text string (major type 3) of ``length`` bytes."""
    if length < 24:
        return bytes([0x60 | length])
    if length < 256:
        return bytes([0x78, length])
    return bytes([0x79]) + length.to_bytes(2, "big")


def encode_with_raw(body: dict[str, Any], raw: dict[str, bytes]) -> bytes:
    """A CBOR map of ``body`` whose ``raw`` fields are given as already-encoded items."""
    items = {**{k: cbor2.dumps(v) for k, v in body.items() if k not in raw}, **raw}
    assert len(items) < 24
    out = bytes([0xA0 | len(items)])
    for key, value in items.items():
        out += cbor2.dumps(key) + value
    return out


invalid_utf8 = st.sampled_from([b"\xff", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x82", b"\xed\xa0\x80",
                                b"\xf8\x88\x80\x80\x80", b"ok\xc0\xaf", b"\xf4\x90\x80\x80"])


def deep(depth: int, kind: str) -> bytes:
    """A CBOR item nested ``depth`` levels (arrays or maps), built as bytes (no recursion here)."""
    if kind == "array":
        return b"\x81" * depth + b"\x00"
    return b"\xa1\x61k" * depth + b"\x00"


@st.composite
def bad_body(draw: st.DrawFn, name: str, room: str) -> tuple[bytes, int | None, str]:
    """(payload, content-format, kind) that the resource ``name`` must refuse."""
    _method, base, fields = BODY_RESOURCES[name]
    body = {k: (room if v == "ROOM" else v) for k, v in base.items()}
    kinds = ["content-format", "invalid-cbor", "not-a-map", "deep"]
    if fields:
        kinds += ["wrong-type", "oversized", "invalid-utf8", "huge-integer"]
    if any(required for _, required in fields.values()):
        kinds.append("missing")
    kind = draw(st.sampled_from(kinds))
    valid = cbor2.dumps(body)
    if kind == "content-format":
        fmt = draw(st.integers(min_value=0, max_value=65535).filter(lambda n: n != ContentFormat.CBOR))
        return valid, fmt, kind
    if kind == "invalid-cbor":
        how = draw(st.sampled_from(["truncated", "trailing", "random"]))
        if how == "truncated" and len(valid) > 1:
            return valid[:draw(st.integers(min_value=1, max_value=len(valid) - 1))], 60, kind
        if how != "random":
            return valid + draw(st.binary(min_size=1, max_size=8)), 60, kind
        junk = draw(st.binary(min_size=1, max_size=64))
        try:
            value = cbor2.loads(junk)
        except Exception:
            return junk, 60, kind
        assume(not isinstance(value, dict))  # a valid map of junk is another category
        return junk, 60, "not-a-map"
    if kind == "not-a-map":
        value = draw(st.one_of(not_text, st.text(max_size=10), st.none(),
                               st.lists(st.dictionaries(st.text(max_size=3), st.text(max_size=3)), max_size=2)))
        assume(not isinstance(value, dict))
        return cbor2.dumps(value), draw(st.sampled_from([60, None])), kind
    if kind == "deep":
        depth = draw(st.integers(min_value=9, max_value=20_000))
        field = draw(st.sampled_from(sorted(fields) + ["extra"]))
        return encode_with_raw(body, {field: deep(depth, draw(st.sampled_from(["array", "map"])))}), 60, kind
    field = draw(st.sampled_from(sorted(fields)))
    limit, _required = fields[field]
    if kind == "wrong-type":
        return cbor2.dumps({**body, field: draw(not_text)}), 60, kind
    if kind == "huge-integer":
        return cbor2.dumps({**body, field: draw(huge_integers)}), 60, kind
    if kind == "missing":
        field = draw(st.sampled_from(sorted(f for f, (_, required) in fields.items() if required)))
        return cbor2.dumps({k: v for k, v in body.items() if k != field}), 60, kind
    if kind == "oversized":
        size = draw(st.integers(min_value=limit + 1, max_value=limit + 300))
        char = draw(st.sampled_from(["a", "é", "\u20ac", "\U0001f600"]))
        text = "!" + char * (size // len(char.encode()) + 1) if field == "room_id" else char * (
            size // len(char.encode()) + 1)
        return cbor2.dumps({**body, field: text}), 60, kind
    assert kind == "invalid-utf8"
    raw = draw(invalid_utf8)
    prefix = b"!" if field == "room_id" else b""
    item = text_header(len(prefix + raw)) + prefix + raw
    return encode_with_raw(body, {field: item}), 60, kind


def check_body_resource(name: str, data: st.DataObject) -> None:
    world = World()
    payload, fmt, kind = data.draw(bad_body(name, world.room), label="bad body")
    event(kind)
    with captured_log() as events:
        reply = world.request(BODY_RESOURCES[name][0], name, payload, content_format=fmt,
                              token=uses_token(name))
    assert_refused(world, reply, events)
    if kind == "content-format":
        assert reply.code == Code.UNSUPPORTED_CONTENT_FORMAT


@EXAMPLES
@given(data=st.data())
def test_register_refuses_bad_bodies(data: st.DataObject) -> None:
    check_body_resource("register", data)


@EXAMPLES
@given(data=st.data())
def test_login_refuses_bad_bodies(data: st.DataObject) -> None:
    check_body_resource("login", data)


@EXAMPLES
@given(data=st.data())
def test_logout_refuses_bad_bodies(data: st.DataObject) -> None:
    check_body_resource("logout", data)


@EXAMPLES
@given(data=st.data())
def test_join_refuses_bad_bodies(data: st.DataObject) -> None:
    check_body_resource("join", data)


@EXAMPLES
@given(data=st.data())
def test_send_refuses_bad_bodies(data: st.DataObject) -> None:
    check_body_resource("send", data)


@EXAMPLES
@given(identifier=st.one_of(not_text.filter(lambda v: not isinstance(v, dict)),
                            st.fixed_dictionaries({"type": st.one_of(not_text, st.just("m.id.phone"))}),
                            st.fixed_dictionaries({"type": st.just("m.id.user"),
                                                   "user": st.one_of(not_text, st.just(""),
                                                                     st.text(min_size=256, max_size=300))})),
       login_type=st.one_of(st.just("m.login.password"), not_text, st.sampled_from(["m.login.token", ""])))
def test_login_refuses_bad_identifiers_and_types(identifier: Any, login_type: Any) -> None:
    world = World()
    body = {"type": login_type, "identifier": identifier, "password": "pw"}
    with captured_log() as events:
        reply = world.request(Code.POST, "login", cbor2.dumps(body), content_format=60, token=False)
    assert_refused(world, reply, events)


# -- resources without a body ----------------------------------------------------------------

bad_rooms = st.one_of(
    st.text(max_size=20).filter(lambda t: not t.startswith(("!", "#"))),
    st.text(min_size=1, max_size=3).map(lambda t: "!" + t * 300),
)


@EXAMPLES
@given(room=bad_rooms, via=st.sampled_from(["query", "proxy"]))
def test_getmsg_refuses_bad_rooms(room: str, via: str) -> None:
    world = World()
    with captured_log() as events:
        if via == "query":
            reply = world.request(Code.GET, "getmsg", query=(f"room={room}",))
        else:
            proxy = ("coap://gw/E/" + room).encode("utf-8")[:1034]
            reply = world.request(Code.GET, "getmsg", options=[(OptionNumber.PROXY_URI, proxy)])
    assert_refused(world, reply, events)


@EXAMPLES
@given(raw=invalid_utf8, where=st.sampled_from([OptionNumber.URI_QUERY, OptionNumber.PROXY_URI]),
       escaped=st.booleans())
def test_getmsg_refuses_invalid_utf8_references(raw: bytes, where: int, escaped: bool) -> None:
    world = World()
    if escaped:  # valid option text, but the percent-encoded bytes are not UTF-8
        raw = "".join(f"%{byte:02X}" for byte in raw).encode("ascii")
    value = b"room=!" + raw if where == OptionNumber.URI_QUERY else b"coap://gw/E/!" + raw
    with captured_log() as events:
        reply = world.request(Code.GET, "getmsg", options=[(where, value)])
    assert_refused(world, reply, events)


@EXAMPLES
@given(proxy=st.text(max_size=80), name=st.sampled_from(["join", "send", "getmsg", "logout", "login",
                                                          "register"]))
def test_junk_proxy_uri_is_refused(proxy: str, name: str) -> None:
    world = World()
    resource = world.harness.site.resolve((name,))
    try:
        assume(parse_matrix_path(proxy).code not in resource.proxy_codes)
    except UnknownPath:
        pass
    method = Code.GET if name == "getmsg" else Code.POST
    with captured_log() as events:
        reply = world.request(method, name, cbor2.dumps(valid_body(world, name)) if name != "getmsg" else b"",
                              content_format=60 if name != "getmsg" else None,
                              options=[(OptionNumber.PROXY_URI, proxy.encode("utf-8"))],
                              query=(f"room={world.room}",) if name == "getmsg" else (),
                              token=uses_token(name))
    assert_refused(world, reply, events)


@EXAMPLES
@given(token=st.one_of(st.binary(min_size=1025, max_size=1100), st.binary(max_size=40).filter(
    lambda raw: any(b < 0x21 or b > 0x7E for b in raw.strip(b" ")) or not raw.strip(b" "))),
    name=st.sampled_from(["join", "send", "getmsg", "logout"]))
def test_malformed_tokens_are_refused(token: bytes, name: str) -> None:
    world = World()
    method = Code.GET if name == "getmsg" else Code.POST
    with captured_log() as events:
        reply = world.request(method, name, cbor2.dumps(valid_body(world, name)) if name != "getmsg" else b"",
                              content_format=60 if name != "getmsg" else None, token=False,
                              options=[(TOKEN_OPTION, token)],
                              query=(f"room={world.room}",) if name == "getmsg" else ())
    assert_refused(world, reply, events)
    assert reply.code == Code.UNAUTHORIZED


@EXAMPLES
@given(accept=st.integers(min_value=0, max_value=65535).filter(lambda n: n not in (0, 60)),
       method=st.sampled_from([Code.POST, Code.PUT, Code.DELETE, None]),
       payload=st.binary(max_size=64))
def test_time_refuses_bad_accept_and_methods(accept: int, method: Code | None, payload: bytes) -> None:
    world = World()
    with captured_log() as events:
        if method is None:
            reply = world.request(Code.GET, "time", payload, token=False,
                                  options=[(OptionNumber.ACCEPT, encode_uint(accept))])
        else:
            reply = world.request(method, "time", payload, token=False)
    assert_refused(world, reply, events)
    assert reply.code == (Code.NOT_ACCEPTABLE if method is None else Code.METHOD_NOT_ALLOWED)
