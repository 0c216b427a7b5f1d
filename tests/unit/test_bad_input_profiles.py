"""Bad input never hurts, beyond the classic resources: the compact profile, MSC3079, /.well-known/core.

The same properties as ``test_bad_input`` (whose helpers and strategies this
module reuses), through the real CoAP layer into sites built from the compact
plugins, the MSC3079 plugin, or all of them, over the in-memory `FakeHomeserver`:

* compact profile (``/+ /- /x /w /v /z``): wrong content-format, invalid CBOR,
  non-arrays, arrays of the wrong length, elements of the wrong type, huge and
  negative integers, oversized strings, invalid UTF-8, deep nesting, unknown or
  foreign handles and room handles are refused with a 4.xx and a short
  diagnostic, nothing reaches the homeserver, nothing loud is logged (except
  the one WARNING ``docs/protocol.rst`` specifies for a handle that is unknown
  or bound to another address); and every uint below 2**64 where the layout
  takes one is well-formed (a room handle never assigned is 4.04);
* MSC3079 (``/9/...``, ``/G``, ``/1`` and a full ``/_matrix/client/v3/...`` send):
  a generic translation, so only bodies that are malformed as such (not CBOR or
  not JSON, not a map, not UTF-8 / not Unicode, deeper than the gateway's limit,
  integers beyond ``±2**53``, values and keys JSON cannot carry), in CBOR with
  integer keys or in JSON, must be refused; well-formed bodies with wrong types
  are forwarded exactly;
* ``/.well-known/core`` with junk filters: never a 5.xx, only links of the
  unfiltered listing.

Every refusal property is paired with a valid request that does reach the
homeserver (``/z`` and ``/.well-known/core`` never call it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
from typing import Any, Callable, Sequence

import cbor2
import pytest
from hypothesis import assume, event, given, strategies as st
from twisted.internet import defer

from comatrix import longpoll, store as store_module
from comatrix.coap import wire
from comatrix.coap.errors import encode_uint
from comatrix.coap.numbers import Code, ContentFormat, OptionNumber
from comatrix.coap.testing import DEFAULT_PEER, Harness, option
from comatrix.codec.cbor import MAX_DEPTH
from comatrix.codec.msc3079 import KEY_TABLE_V1, KEY_TABLE_V1_REVERSE, KEY_TABLE_VERSION_OPTION
from comatrix.compact import codec
from comatrix.discovery import build_site
from comatrix.errors import error_response
from comatrix.interfaces import IResourcePlugin, PluginContext
from comatrix.matrix.testing import stub_transport
from comatrix.msc3079.translate import MAX_JSON_INTEGER
from comatrix.plugins import compact, msc3079

import support.world
from test_bad_input import (CF, EXAMPLES, PLUGINS as CLASSIC_PLUGINS, TOKEN_OPTION, assert_refused, captured_log,
                            deep, encode_with_raw, huge_integers, invalid_utf8, not_text, text_header)

COMPACT_PLUGINS: list[IResourcePlugin] = [compact.compact_login, compact.compact_logout, compact.compact_join,
                                          compact.compact_send, compact.compact_messages, compact.compact_time,
                                          compact.compact_room, compact.compact_invite, compact.compact_leave,
                                          compact.compact_kick, compact.compact_members]
OTHER_PEER = ("2001:db8::99", 40000)
CBOR = int(ContentFormat.CBOR)
JSON = int(ContentFormat.JSON)


# -- worlds -------------------------------------------------------------------------------------

class SynchronousPool:
    """What `comatrix.store.Store` uses of adbapi's pool, on one in-memory SQLite connection, at once.

    The Harness runs on a `Clock`: a request must be answered before ``send`` returns,
    so the store's SQL cannot wait for a thread.
    """

    def __init__(self) -> None:
        self.connection = sqlite3.connect(":memory:")
        store_module._open_connection(self.connection)

    def runInteraction(self, interaction: Callable[..., Any], *args: Any) -> "defer.Deferred[Any]":
        cursor = self.connection.cursor()
        try:
            result = interaction(cursor, *args)
        except BaseException:
            self.connection.rollback()
            return defer.fail()
        self.connection.commit()
        return defer.succeed(result)

    def runQuery(self, *args: Any) -> "defer.Deferred[list[Any]]":
        return self.runInteraction(lambda txn: txn.execute(*args).fetchall())

    def runOperation(self, *args: Any) -> "defer.Deferred[None]":
        def operation(txn: sqlite3.Cursor) -> None:
            txn.execute(*args)
        return self.runInteraction(operation)

    def close(self) -> None:
        self.connection.close()


class _NotRunning:
    """A reactor that never runs: the adbapi pool `Store` makes is never started."""

    def callWhenRunning(self, function: Callable[..., Any], *args: Any) -> None:
        return None


class MemoryStore(store_module.Store):
    """The real store (its SQL and caches) on a `SynchronousPool`."""

    def __init__(self) -> None:
        super().__init__(None, _NotRunning())
        self._pool = SynchronousPool()  # type: ignore[assignment]


def site_context(world: support.world.World) -> PluginContext:
    """``world``'s context with a store and a long-poll pool that also go to the fake homeserver."""
    context = dataclasses.replace(world.context(), store=MemoryStore())
    transport, _ = stub_transport(world.homeserver, context.reactor)
    context.state[longpoll.STATE_KEY] = longpoll.LongPoller(transport, context.reactor)
    return context


class CompactWorld(support.world.World):
    """A compact site; user ``@d`` logged in (``handle``) and joined to ``#lab`` (``room_handle``).

    The setup's own homeserver requests are forgotten: ``homeserver.requests`` starts empty.
    """

    def __init__(self) -> None:
        super().__init__()
        self.harness = Harness(build_site(COMPACT_PLUGINS, site_context(self), error_response))
        reply = self.send(Code.POST, "+", cbor2.dumps(["d", "pw"]))
        assert reply.code == Code.CREATED, reply
        self.handle: bytes = cbor2.loads(reply.payload)
        reply = self.send(Code.POST, "x", cbor2.dumps([self.handle, self.alias]))
        assert reply.code == Code.CHANGED, reply
        self.room_handle: int = cbor2.loads(reply.payload)
        self.homeserver.requests.clear()

    def send(self, method: Code, path: str, payload: bytes = b"", *, content_format: int | None = CBOR,
             observe: bool = False, peer: Any = DEFAULT_PEER,
             options: Sequence[tuple[int, bytes]] = ()) -> wire.Datagram:
        all_options = list(options)
        if content_format is not None:
            all_options.append((CF, encode_uint(content_format)))
        if observe:
            all_options.append((OptionNumber.OBSERVE, b""))
        [reply] = self.harness.send(method, (path,), payload=payload, options=all_options, peer=peer)
        return reply


class Msc3079World(support.world.World):
    """An MSC3079 site, options 256/257 understood as in the gateway."""

    def __init__(self) -> None:
        super().__init__()
        self.harness = Harness(build_site([msc3079.msc3079], site_context(self), error_response),
                               understood_options=frozenset({TOKEN_OPTION, KEY_TABLE_VERSION_OPTION}))

    def send(self, method: Code, path: tuple[str, ...], payload: bytes = b"", *,
             content_format: int | None = CBOR, token: bool = True) -> wire.Datagram:
        options = [(TOKEN_OPTION, self.token.encode())] if token else []
        if content_format is not None:
            options.append((CF, encode_uint(content_format)))
        [reply] = self.harness.send(method, path, payload=payload, options=options)
        return reply


#: What `docs/protocol.rst` has the compact service log as WARNING ("a misbehaving peer").
DOCUMENTED_WARNINGS = {"unknown-handle": "Unknown compact session handle from {peer}",
                       "other-peer": "Compact session {id} used from {peer}, bound to another address"}


def refused(world: support.world.World, reply: wire.Datagram, events: list[dict[str, Any]],
            warning: str | None = None) -> None:
    """`assert_refused`, but the one documented ``warning`` (a log format) must be logged, once, instead."""
    if warning is not None:
        warned = [e for e in events if e.get("log_format") == warning]
        assert len(warned) == 1 and "log_failure" not in warned[0], warned
        events = [e for e in events if e is not warned[0]]
    # assert_refused reads nothing of its world but ``homeserver``.
    assert_refused(world, reply, events)  # type: ignore[arg-type]


# -- compact profile: what each path takes ------------------------------------------------------

#: Element kinds of the compact layouts (``comatrix.compact.codec``): text (with its byte limit),
#: the 8-byte session handle, a uint, and a join's room (text, or the 32-byte id hash).
TEXT_LIMITS = {"user": codec.MAX_USER, "password": codec.MAX_PASSWORD, "room": codec.MAX_ROOM_REF,
               "body": codec.MAX_BODY, "name": codec.MAX_NAME, "topic": codec.MAX_TOPIC, "reason": codec.MAX_REASON}
UINTS = ("room-handle", "seq", "cursor")

#: Path -> (method, element names, accepted array lengths).
LAYOUTS: dict[str, tuple[Code, tuple[str, ...], tuple[int, ...]]] = {
    codec.PATHS["login"]: (Code.POST, ("user", "password"), (2,)),
    codec.PATHS["logout"]: (Code.POST, ("handle",), (1,)),
    codec.PATHS["join"]: (Code.POST, ("handle", "room"), (2,)),
    codec.PATHS["send"]: (Code.POST, ("handle", "room-handle", "seq", "body"), (4,)),
    codec.PATHS["messages"]: (Code.FETCH, ("handle", "room-handle", "cursor"), (2, 3)),
    codec.PATHS["room"]: (Code.POST, ("handle", "room-handle", "name", "topic"), (3, 4)),
    codec.PATHS["invite"]: (Code.POST, ("handle", "room-handle", "user"), (3,)),
    codec.PATHS["leave"]: (Code.POST, ("handle", "room-handle"), (2,)),
    codec.PATHS["kick"]: (Code.POST, ("handle", "room-handle", "user", "reason"), (3, 4)),
    codec.PATHS["members"]: (Code.FETCH, ("handle", "room-handle"), (2,)),
}


def valid_elements(world: CompactWorld, path: str) -> list[Any]:
    values = {"user": "d", "password": "pw", "handle": world.handle, "room": world.alias,
              "room-handle": world.room_handle, "seq": 7, "body": "hi", "cursor": 0, "name": "Lab", "topic": "t",
              "reason": "r"}
    return [values[name] for name in LAYOUTS[path][1]]


def cbor_array(items: Sequence[bytes]) -> bytes:
    """A CBOR array of already-encoded items."""
    assert len(items) < 24
    return bytes([0x80 | len(items)]) + b"".join(items)


@pytest.mark.parametrize("path", sorted(LAYOUTS))
def test_a_valid_compact_request_does_reach_the_homeserver(path: str) -> None:
    world = CompactWorld()
    method, _names, _sizes = LAYOUTS[path]
    with captured_log() as events:
        reply = world.send(method, path, cbor2.dumps(valid_elements(world, path)))
    assert reply.code >> 5 == 2, (Code(reply.code).dotted(), reply.payload)
    assert world.homeserver.requests
    assert not [e for e in events if "log_failure" in e]


@pytest.mark.parametrize("path", sorted(LAYOUTS))
@pytest.mark.parametrize("proxy", [(OptionNumber.PROXY_URI, b"coap://elsewhere.example/x"),
                                   (OptionNumber.PROXY_SCHEME, b"http")])
def test_a_compact_request_asking_for_a_proxy_is_505_and_not_forwarded(path: str,
                                                                       proxy: tuple[int, bytes]) -> None:
    # RFC 7252 5.7.2: this gateway is no forward proxy for the compact profile; the valid
    # request must not quietly go to the configured homeserver instead.
    world = CompactWorld()
    method, _names, _sizes = LAYOUTS[path]
    with captured_log() as events:
        reply = world.send(method, path, cbor2.dumps(valid_elements(world, path)), options=[proxy])
    assert reply.code == Code.PROXYING_NOT_SUPPORTED, Code(reply.code).dotted()
    assert reply.payload == b"proxying not supported"
    assert world.homeserver.requests == []
    assert not [e for e in events if "log_failure" in e]


def test_compact_time_answers_without_the_homeserver() -> None:
    world = CompactWorld()
    reply = world.send(Code.GET, codec.PATHS["time"], content_format=None)
    assert reply.code == Code.CONTENT and codec.decode_uint(reply.payload) == 1_700_000_000
    assert world.homeserver.requests == []


#: Neither text nor bytes (``not_text`` without its byte strings).
not_a_string = st.one_of(st.integers(), huge_integers, st.floats(allow_nan=True), st.booleans(), st.none(),
                         st.lists(st.text(max_size=5), max_size=3),
                         st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))


#: Where a uint stops fitting an int64, i.e. SQLite's INTEGER, and the wire's own limit.
top_of_range = st.sampled_from([2**63 - 2, 2**63 - 1, 2**63, codec.MAX_UINT])


def wrong_type(name: str) -> st.SearchStrategy[Any]:
    """Values of another type than element ``name`` takes."""
    if name == "handle":
        return st.one_of(not_a_string, st.text(max_size=8),
                         st.binary(max_size=40).filter(lambda b: len(b) != codec.HANDLE_SIZE))
    if name in UINTS:
        return st.one_of(st.text(max_size=8), st.binary(max_size=8), st.booleans(), st.none(),
                         st.floats(allow_nan=True), st.integers(max_value=-1),
                         st.lists(st.integers(min_value=0), max_size=2))
    if name == "room":  # text, the 32-byte hash, or (a uint) a room handle of the session
        return st.one_of(not_a_string.filter(lambda value: not _is_uint(value)), st.just(""),
                         st.binary(max_size=64).filter(lambda b: len(b) != codec.ROOM_HASH_SIZE))
    return st.one_of(not_text, st.just(""))


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= codec.MAX_UINT


@st.composite
def bad_compact_request(draw: st.DrawFn, world: CompactWorld, path: str) -> tuple[bytes, int | None, str, Any]:
    """(payload, content-format, kind, peer) that the compact resource at ``path`` must refuse."""
    _method, names, sizes = LAYOUTS[path]
    elements = valid_elements(world, path)
    if len(sizes) > 1 and draw(st.booleans()):  # the last element is optional (a cursor, a topic, a reason)
        elements = elements[:min(sizes)]
    valid = cbor2.dumps(elements)
    kinds = ["content-format", "invalid-cbor", "not-an-array", "wrong-length", "wrong-type", "huge-integer",
             "deep"]
    texts = [i for i, name in enumerate(names[:len(elements)]) if name in TEXT_LIMITS]
    if texts:
        kinds += ["oversized", "invalid-utf8"]
    if "handle" in names:
        kinds += ["unknown-handle", "other-peer", "oversized"]
    if "room-handle" in names:
        kinds.append("unknown-room-handle")
    if "room" in names:
        kinds.append("unknown-room-name")
    kind = draw(st.sampled_from(kinds))
    peer = OTHER_PEER if kind == "other-peer" else DEFAULT_PEER
    if kind in ("content-format", "other-peer"):
        fmt = draw(st.integers(min_value=0, max_value=65535).filter(lambda n: n != CBOR)) \
            if kind == "content-format" else CBOR
        return valid, fmt, kind, peer
    if kind == "invalid-cbor":
        how = draw(st.sampled_from(["truncated", "trailing", "random"]))
        if how == "truncated":
            return valid[:draw(st.integers(min_value=1, max_value=len(valid) - 1))], CBOR, kind, peer
        if how == "trailing":
            return valid + draw(st.binary(min_size=1, max_size=8)), CBOR, kind, peer
        junk = draw(st.binary(min_size=1, max_size=64))
        try:
            cbor2.loads(junk)
        except Exception:
            return junk, CBOR, kind, peer
        assume(False)  # junk that happens to be one CBOR item is another category
    if kind == "not-an-array":
        value = draw(st.one_of(not_text, st.text(max_size=10), st.none(),
                               st.dictionaries(st.integers(0, 5), st.binary(max_size=8), max_size=4)))
        assume(not isinstance(value, list))
        return cbor2.dumps(value), draw(st.sampled_from([CBOR, None])), kind, peer
    if kind == "wrong-length":
        length = draw(st.integers(min_value=0, max_value=8).filter(lambda n: n not in sizes))
        padded = (elements * 8)[:length]
        return cbor2.dumps(padded), CBOR, kind, peer
    index = draw(st.sampled_from(range(len(elements))))
    name = names[index]
    items = [cbor2.dumps(element) for element in elements]
    if kind == "wrong-type":
        items[index] = cbor2.dumps(draw(wrong_type(name)))
    elif kind == "huge-integer":
        if name in UINTS:
            value = draw(st.one_of(st.integers(min_value=codec.MAX_UINT + 1), st.integers(max_value=-1)))
        else:
            value = draw(st.one_of(huge_integers, st.integers(max_value=-1)))
        items[index] = cbor2.dumps(value)
    elif kind == "deep":
        items[index] = deep(draw(st.integers(min_value=2, max_value=20_000)),
                            draw(st.sampled_from(["array", "map"])))
    elif kind == "unknown-handle":
        items[names.index("handle")] = cbor2.dumps(draw(st.binary(min_size=codec.HANDLE_SIZE,
                                                                  max_size=codec.HANDLE_SIZE)
                                                        .filter(lambda h: h != world.handle)))
    elif kind == "unknown-room-handle":
        items[names.index("room-handle")] = cbor2.dumps(draw(st.one_of(
            st.integers(min_value=world.room_handle + 1, max_value=codec.MAX_UINT), top_of_range)))
    elif kind == "unknown-room-name":  # neither an alias nor an id nor configured on the gateway
        items[names.index("room")] = cbor2.dumps(draw(st.text(min_size=1, max_size=40)
                                                      .filter(lambda t: t[0] not in "!#")))
    elif kind == "oversized":
        index = draw(st.sampled_from(texts + ([names.index("handle")] if "handle" in names else [])))
        name = names[index]
        if name == "handle":
            items[index] = cbor2.dumps(draw(st.binary(min_size=codec.HANDLE_SIZE + 1, max_size=2000)))
        else:
            limit = TEXT_LIMITS[name]
            char = draw(st.sampled_from(["a", "é", "\u20ac", "\U0001f600"]))
            size = draw(st.integers(min_value=limit + 1, max_value=limit + 300))
            items[index] = cbor2.dumps(char * (size // len(char.encode()) + 1))
    else:
        assert kind == "invalid-utf8"
        index = draw(st.sampled_from(texts))
        raw = draw(st.binary(max_size=4)) + draw(invalid_utf8)
        items[index] = text_header(len(raw)) + raw
    return cbor_array(items), CBOR, kind, peer


def check_compact(path: str, data: st.DataObject) -> None:
    world = CompactWorld()
    method = LAYOUTS[path][0]
    payload, fmt, kind, peer = data.draw(bad_compact_request(world, path), label="bad request")
    event(kind)
    observe = method == Code.FETCH and data.draw(st.booleans(), label="observe")
    with captured_log() as events:
        reply = world.send(method, path, payload, content_format=fmt, observe=observe, peer=peer)
    refused(world, reply, events, DOCUMENTED_WARNINGS.get(kind))
    expected = {"content-format": Code.UNSUPPORTED_CONTENT_FORMAT, "unknown-handle": Code.UNAUTHORIZED,
                "other-peer": Code.FORBIDDEN, "unknown-room-handle": Code.NOT_FOUND}.get(kind)
    if expected is not None:
        assert reply.code == expected, (kind, Code(reply.code).dotted())
    if observe:
        assert option(reply, OptionNumber.OBSERVE) is None  # a refusal registers no observation


@EXAMPLES
@given(data=st.data())
def test_compact_login_refuses_bad_requests(data: st.DataObject) -> None:
    check_compact(codec.PATHS["login"], data)



@EXAMPLES
@given(data=st.data())
def test_compact_logout_refuses_bad_requests(data: st.DataObject) -> None:
    check_compact(codec.PATHS["logout"], data)



@EXAMPLES
@given(data=st.data())
def test_compact_join_refuses_bad_requests(data: st.DataObject) -> None:
    check_compact(codec.PATHS["join"], data)



@EXAMPLES
@given(data=st.data())
def test_compact_send_refuses_bad_requests(data: st.DataObject) -> None:
    check_compact(codec.PATHS["send"], data)



@EXAMPLES
@given(data=st.data())
def test_compact_messages_refuses_bad_requests(data: st.DataObject) -> None:
    check_compact(codec.PATHS["messages"], data)


@EXAMPLES
@given(data=st.data(), op=st.sampled_from(["room", "invite", "leave", "kick", "members"]))
def test_compact_room_operations_refuse_bad_requests(data: st.DataObject, op: str) -> None:
    check_compact(codec.PATHS[op], data)


@EXAMPLES
@given(number=st.one_of(st.integers(min_value=1, max_value=codec.MAX_UINT), top_of_range),
       where=st.sampled_from([("w", "room-handle"), ("v", "room-handle"), ("w", "seq"), ("v", "cursor")]))
def test_compact_uints_anywhere_below_2_64_are_answered(number: int, where: tuple[str, str]) -> None:
    """Every uint below 2**64 is well-formed: a room handle never assigned is 4.04, a seq or cursor is used.

    (Room handles and cursors above 2**63 - 1 do not fit the store's SQLite INTEGER.)
    """
    path, name = where
    world = CompactWorld()
    elements = valid_elements(world, path)
    elements[LAYOUTS[path][1].index(name)] = number
    with captured_log() as events:
        reply = world.send(LAYOUTS[path][0], path, cbor2.dumps(elements))
    if name == "room-handle":
        refused(world, reply, events)
        assert reply.code == Code.NOT_FOUND
        return
    assert reply.code == (Code.CHANGED if path == "w" else Code.CONTENT), (Code(reply.code).dotted(), reply.payload)
    assert world.homeserver.requests  # the send, or the walk behind "messages since cursor"
    assert not [e for e in events if "log_failure" in e]
    if name == "cursor":
        assert codec.decode_message(reply.payload) is None  # the room has no message: caught up


@EXAMPLES
@given(accept=st.integers(min_value=0, max_value=65535).filter(lambda n: n != CBOR),
       method=st.sampled_from([Code.POST, Code.PUT, Code.DELETE, Code.FETCH, None]),
       payload=st.binary(max_size=64))
def test_compact_time_refuses_bad_accept_and_methods(accept: int, method: Code | None, payload: bytes) -> None:
    world = CompactWorld()
    with captured_log() as events:
        if method is None:
            reply = world.send(Code.GET, codec.PATHS["time"], payload, content_format=None,
                               options=[(OptionNumber.ACCEPT, encode_uint(accept))])
        else:
            reply = world.send(method, codec.PATHS["time"], payload, content_format=None)
    refused(world, reply, events)
    assert reply.code == (Code.NOT_ACCEPTABLE if method is None else Code.METHOD_NOT_ALLOWED)


# -- MSC3079 --------------------------------------------------------------------------------------

K = KEY_TABLE_V1_REVERSE


def msc3079_endpoints(world: Msc3079World) -> dict[str, tuple[Code, tuple[str, ...], dict[Any, Any], bool]]:
    """Name -> (method, Uri-Path, a valid integer-key body, takes the token)."""
    return {
        "send-code": (Code.PUT, ("9", world.room, "m.room.message", "txn1"),
                      {K["msgtype"]: "m.text", K["body"]: "hi"}, True),
        "send-full": (Code.PUT, ("_matrix", "client", "v3", "rooms", world.room, "send", "m.room.message", "t2"),
                      {K["msgtype"]: "m.text", K["body"]: "hi"}, True),
        "createRoom": (Code.POST, ("G",), {K["name"]: "Lab 2", K["preset"]: "private_chat",
                                           K["creation_content"]: {"m.federate": False}}, True),
        "login": (Code.POST, ("1",), {K["type"]: "m.login.password", K["password"]: "pw",
                                      K["identifier"]: {K["type"]: "m.id.user", K["user"]: "d"}}, False),
    }


ENDPOINTS = ("createRoom", "login", "send-code", "send-full")


@pytest.mark.parametrize("name", ENDPOINTS)
def test_a_valid_msc3079_request_does_reach_the_homeserver(name: str) -> None:
    world = Msc3079World()
    method, path, body, token = msc3079_endpoints(world)[name]
    reply = world.send(method, path, cbor2.dumps(body), token=token)
    assert reply.code >> 5 == 2, (Code(reply.code).dotted(), reply.payload)
    [request] = world.homeserver.requests
    assert request.body == named(body)


def named(value: Any) -> Any:
    """The JSON of a body whose integer keys are all in the table (no string key clashes)."""
    if isinstance(value, dict):
        return {KEY_TABLE_V1.get(key, key): named(item) for key, item in value.items()}
    if isinstance(value, list):
        return [named(item) for item in value]
    return value


def depth(value: Any) -> int:
    """Nesting as `comatrix.codec.cbor.MAX_DEPTH` counts it: the longest chain of items, leaves included."""
    if isinstance(value, dict):
        return 1 + max([0] + [depth(item) for item in value.values()])
    if isinstance(value, list):
        return 1 + max([0] + [depth(item) for item in value])
    return 1


def beyond_json_range(max_bits: int = 16_000) -> st.SearchStrategy[int]:
    """Integers of a magnitude above `MAX_JSON_INTEGER`, up to 16,000-bit bignums."""
    powers = st.integers(min_value=54, max_value=max_bits).map(lambda bits: 2**bits)
    return st.one_of(huge_integers, st.integers(min_value=MAX_JSON_INTEGER + 1, max_value=2**64),
                     st.integers(min_value=-(2**64), max_value=-MAX_JSON_INTEGER - 1),
                     powers, powers.map(lambda n: -n))


#: Values JSON cannot carry; CBOR can.
not_json_values = st.one_of(st.binary(max_size=8), st.sampled_from([cbor2.undefined, cbor2.CBORSimpleValue(99)]),
                            st.builds(cbor2.CBORTag, st.sampled_from([6, 99, 1234, 55799 + 1]), st.integers()),
                            st.sampled_from([math.nan, math.inf, -math.inf]), beyond_json_range())
#: Map keys JSON cannot carry: unknown integer keys, other types.
#: (Booleans and integral floats would equal integer keys: none of 0 and 1 is in the bodies used.)
not_json_keys = st.one_of(st.integers().filter(lambda n: n not in KEY_TABLE_V1), beyond_json_range(),
                          st.binary(max_size=4), st.booleans(), st.none(),
                          st.floats(allow_nan=False).filter(lambda f: not f.is_integer()))
lone_surrogates = st.lists(st.sampled_from(["\\ud800", "\\udbff", "\\udc00", "\\udfff", "\\udc00\\ud800"]),
                           min_size=1, max_size=3).map("".join).filter(
    lambda escaped: any(0xD800 <= ord(c) <= 0xDFFF for c in json.loads(f'"{escaped}"')))  # not all paired


def with_raw_key(body: dict[Any, Any], raw_key: bytes) -> bytes:
    """A CBOR map of ``body`` plus one entry whose key is the already-encoded ``raw_key``."""
    assert len(body) < 23
    return (bytes([0xA0 | (len(body) + 1)]) + b"".join(cbor2.dumps(k) + cbor2.dumps(v) for k, v in body.items())
            + raw_key + b"\x00")


@st.composite
def malformed_msc3079_body(draw: st.DrawFn, body: dict[Any, Any]) -> tuple[bytes, int | None, str]:
    """(payload, content-format, kind) of a body that is malformed whatever the endpoint."""
    kind = draw(st.sampled_from(["content-format", "invalid-cbor", "not-a-map", "invalid-utf8", "deep",
                                 "huge-integer", "not-json-value", "not-json-key", "json-malformed",
                                 "json-surrogate", "json-deep", "json-not-object", "json-non-finite",
                                 "json-huge-integer"]))
    valid = cbor2.dumps(body)
    # Where to put the bad value: the top level or a map nested in it.
    key = draw(st.sampled_from(sorted(body, key=str)))
    nested = isinstance(body[key], dict) and draw(st.booleans())

    def put(raw: bytes) -> bytes:
        if nested:
            return encode_with_raw(body, {key: encode_with_raw(body[key], {"x": raw})})
        return encode_with_raw(body, {key: raw})

    if kind == "content-format":
        fmt = draw(st.integers(min_value=0, max_value=65535).filter(lambda n: n not in (CBOR, JSON)))
        return valid, fmt, kind
    if kind == "invalid-cbor":
        how = draw(st.sampled_from(["truncated", "trailing", "random"]))
        if how == "truncated":
            return valid[:draw(st.integers(min_value=1, max_value=len(valid) - 1))], CBOR, kind
        if how == "trailing":
            return valid + draw(st.binary(min_size=1, max_size=8)), CBOR, kind
        junk = draw(st.binary(min_size=1, max_size=64))
        try:
            cbor2.loads(junk)
        except Exception:
            return junk, CBOR, kind
        assume(False)
    if kind == "not-a-map":
        value = draw(st.one_of(not_text, st.text(min_size=1, max_size=10), st.none(),
                               st.lists(st.dictionaries(st.integers(1, 104), st.text(max_size=3)), max_size=2)))
        assume(not isinstance(value, dict))
        return cbor2.dumps(value), draw(st.sampled_from([CBOR, None])), kind
    if kind == "invalid-utf8":
        raw = draw(st.binary(max_size=4)) + draw(invalid_utf8)
        item = text_header(len(raw)) + raw
        if draw(st.booleans()):  # as a value, else as a key
            return put(item), CBOR, kind
        return with_raw_key(body, item), CBOR, kind
    if kind == "deep":
        levels = draw(st.integers(min_value=MAX_DEPTH, max_value=20_000))
        return put(deep(levels, draw(st.sampled_from(["array", "map"])))), CBOR, kind
    if kind in ("huge-integer", "not-json-value"):
        value = draw(beyond_json_range() if kind == "huge-integer" else not_json_values)
        return put(cbor2.dumps(value)), CBOR, kind
    if kind == "not-json-key":
        return with_raw_key(body, cbor2.dumps(draw(not_json_keys))), CBOR, kind
    text = json.dumps(named(body), separators=(",", ":"))
    if kind == "json-malformed":
        how = draw(st.sampled_from(["truncated", "trailing", "invalid-utf8"]))
        if how == "truncated":
            return text[:draw(st.integers(min_value=1, max_value=len(text) - 1))].encode(), JSON, kind
        if how == "trailing":
            return (text + draw(st.sampled_from(["}", ",", "x", "{}", "]"]))).encode(), JSON, kind
        return text[:-1].encode() + b',"x":"' + draw(invalid_utf8) + b'"}', JSON, kind
    if kind == "json-surrogate":
        escaped = '"' + draw(st.text(alphabet="ab", max_size=3)) + draw(lone_surrogates) + '"'
        entry = f"{escaped}:1" if draw(st.booleans()) else f'"x":{escaped}'
        return (text[:-1] + "," + entry + "}").encode(), JSON, kind
    if kind == "json-deep":
        levels = draw(st.integers(min_value=MAX_DEPTH, max_value=5_000))
        return (text[:-1] + ',"x":' + "[" * levels + "]" * levels + "}").encode(), JSON, kind
    if kind == "json-not-object":
        value = draw(st.one_of(st.integers(-100, 100), st.text(max_size=5), st.none(), st.booleans(),
                               st.lists(st.integers(0, 5), max_size=3)))
        return json.dumps(value).encode(), JSON, kind
    if kind == "json-non-finite":
        number = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e999"]))
        return (text[:-1] + ',"x":' + number + "}").encode(), JSON, kind
    assert kind == "json-huge-integer"
    huge = draw(beyond_json_range(max_bits=13_000))  # str() refuses more than 4300 digits
    return (text[:-1] + ',"x":' + str(huge) + "}").encode(), JSON, kind


def check_msc3079(name: str, data: st.DataObject) -> None:
    world = Msc3079World()
    method, path, body, token = msc3079_endpoints(world)[name]
    payload, fmt, kind = data.draw(malformed_msc3079_body(body), label="malformed body")
    event(kind)
    with captured_log() as events:
        reply = world.send(method, path, payload, content_format=fmt, token=token)
    refused(world, reply, events)
    if kind == "content-format":
        assert reply.code == Code.UNSUPPORTED_CONTENT_FORMAT


@EXAMPLES
@given(data=st.data())
def test_msc3079_path_code_send_refuses_malformed_bodies(data: st.DataObject) -> None:
    check_msc3079("send-code", data)


@EXAMPLES
@given(data=st.data())
def test_msc3079_full_path_send_refuses_malformed_bodies(data: st.DataObject) -> None:
    check_msc3079("send-full", data)


@EXAMPLES
@given(data=st.data())
def test_msc3079_create_room_refuses_malformed_bodies(data: st.DataObject) -> None:
    check_msc3079("createRoom", data)


@EXAMPLES
@given(data=st.data())
def test_msc3079_login_refuses_malformed_bodies(data: st.DataObject) -> None:
    check_msc3079("login", data)


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-MAX_JSON_INTEGER, MAX_JSON_INTEGER),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=12)


@EXAMPLES
@given(content=st.dictionaries(st.sampled_from([K["msgtype"], K["body"], K["format"], K["formatted_body"]]),
                               json_values, max_size=4),
       wrapping=st.integers(min_value=0, max_value=MAX_DEPTH), full_path=st.booleans())
def test_msc3079_wrong_types_are_forwarded_exactly_unless_too_deep(content: dict[int, Any], wrapping: int,
                                                                   full_path: bool) -> None:
    """A well-formed body is the homeserver's to judge: forwarded as is, unless nested too deeply.

    ``wrapping`` puts the content that many arrays deep (under ``body``), across the depth limit.
    """
    if wrapping:
        inner: Any = content
        for _ in range(wrapping):
            inner = [inner]
        content = {K["msgtype"]: "m.text", K["body"]: inner}
    world = Msc3079World()
    method, path, _body, _token = msc3079_endpoints(world)["send-full" if full_path else "send-code"]
    with captured_log() as events:
        reply = world.send(method, path, cbor2.dumps(content))
    if depth(content) > MAX_DEPTH:
        event("too deep: refused")
        refused(world, reply, events)
        return
    event("forwarded")
    assert reply.code == Code.CHANGED, (Code(reply.code).dotted(), reply.payload)
    [request] = world.homeserver.requests
    assert request.body == named(content)
    assert not [e for e in events if "log_failure" in e]


# -- /.well-known/core --------------------------------------------------------------------------

BLOCK2 = int(OptionNumber.BLOCK2)


class ListingWorld(support.world.World):
    """A site of every built-in plugin: classic, compact and MSC3079."""

    def __init__(self) -> None:
        super().__init__()
        self.harness = Harness(build_site(CLASSIC_PLUGINS + COMPACT_PLUGINS + [msc3079.msc3079],
                                          site_context(self), error_response))

    def get(self, query: Sequence[bytes]) -> tuple[wire.Datagram, bytes]:
        """GET /.well-known/core with these raw Uri-Query values: the last reply and the whole payload."""
        payload, number = b"", 0
        while True:
            options = [(int(OptionNumber.URI_QUERY), item) for item in query]
            if number:
                options.append((BLOCK2, encode_uint(number << 4 | 6)))
            [reply] = self.harness.send(Code.GET, (".well-known", "core"), options=options)
            block = option(reply, BLOCK2)
            payload += reply.payload
            if reply.code != Code.CONTENT or block is None or not int.from_bytes(block, "big") & 0x08:
                return reply, payload
            number += 1


def split_links(listing: str) -> list[str]:
    """The links of a link-format document (commas inside quoted values do not separate)."""
    links, current, quoted, escaped = [], "", False, False
    for char in listing:
        if char == "," and not quoted:
            links.append(current)
            current = ""
            continue
        current += char
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
    return links + [current] if current else links


@pytest.fixture(scope="module")
def full_listing() -> list[str]:
    reply, payload = ListingWorld().get([])
    assert reply.code == Code.CONTENT
    links = split_links(payload.decode("utf-8"))
    assert {"</w>", "</_matrix>", "</send>"} <= {link.split(";")[0] for link in links}
    return links


junk_text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=30)
#: Filters that do select links (so that the subset property has something to check).
selecting_filters = st.sampled_from([
    "rt=*", "rt=comatrix.*", "rt=comatrix.c.*", "rt=org.matrix.msc3079*", "ct=60", "ct=50", "ct=0", "obs",
    "obs=", "obs=*", "href=/w", "href=/_matrix", "href=/%2B", "href=/*", "href=/_matrix*", "title=Compact*",
    "title=Log%20in", "title=*", "%72t=comatrix.c.send"])
filter_names = st.one_of(st.sampled_from(["rt", "href", "if", "ct", "sz", "title", "obs", "anchor", ""]),
                         junk_text)
#: Junk, broken percent-escapes, percent-escapes of bytes that are not UTF-8.
filter_values = st.one_of(
    junk_text, junk_text.map(lambda t: t + "*"), st.sampled_from(["%FF", "%", "%e2%82", "%2", "*%00", "60 50"]),
    st.binary(max_size=6).map(lambda b: "".join(f"%{byte:02X}" for byte in b)))
junk_filters = st.builds(lambda name, separator, value: f"{name}{separator}{value}",
                         filter_names, st.sampled_from(["=", "", "=="]), filter_values)


@st.composite
def junk_query(draw: st.DrawFn) -> tuple[list[bytes], bool]:
    """(raw Uri-Query values, whether one of them is not UTF-8)."""
    items = [draw(st.one_of(selecting_filters, junk_filters)).encode()
             for _ in range(draw(st.integers(min_value=1, max_value=3)))]
    not_utf8 = draw(st.integers(min_value=0, max_value=4)) == 0
    if not_utf8:
        index = draw(st.sampled_from(range(len(items))))
        items[index] = draw(st.sampled_from([b"rt=", b"href=", b""])) + draw(invalid_utf8)
    return items, not_utf8


@EXAMPLES
@given(query=junk_query())
def test_well_known_core_with_junk_filters_lists_a_subset_or_refuses(full_listing: list[str],
                                                                    query: tuple[list[bytes], bool]) -> None:
    items, not_utf8 = query
    world = ListingWorld()
    with captured_log() as events:
        reply, payload = world.get(items)
    if not_utf8:
        event("query not UTF-8")
        refused(world, reply, events)
        assert reply.code == Code.BAD_REQUEST
        return
    assert reply.code == Code.CONTENT, (Code(reply.code).dotted(), reply.payload)
    event("empty" if not payload else "some links")
    assert set(split_links(payload.decode("utf-8"))) <= set(full_listing)
    assert not [e for e in events if "log_failure" in e or e["log_level"].name in ("warn", "error", "critical")]


@EXAMPLES
@given(data=st.data())
def test_well_known_core_href_filter_finds_each_link(full_listing: list[str], data: st.DataObject) -> None:
    """The anchor of the junk-filter property: a real filter does select."""
    link = data.draw(st.sampled_from(full_listing), label="link")
    href = link.split(";")[0][1:-1]
    _reply, payload = ListingWorld().get([f"href={href}".encode()])
    assert split_links(payload.decode("utf-8")) == [link]
