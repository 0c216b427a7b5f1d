"""The compact profile in application-service mode: provisioned device users, transaction-fed watches.

Through the real CoAP layer (`Harness`) into the compact plugins, with the
real store's SQL (in memory) and the in-repo fake homeserver playing the
application-service side (``as_token`` + ``user_id``):

* a provisioned device logs in with an empty password: no homeserver login,
  no Matrix device; its session acts with an `AppserviceToken` for its user;
  its logout (or idle expiry) ends nothing on the homeserver;
* its watch holds no ``/sync``: the event stream's transactions feed it
  (`CompactService.rooms_arrived`), each message numbered once and pushed once,
  even when the same events arrive again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import cbor2
import pytest

from comatrix import longpoll
from comatrix.appservice.stream import EventStream
from comatrix.coap import wire
from comatrix.coap.errors import Unauthorized
from comatrix.coap.message import Peer
from comatrix.coap.numbers import Code, MessageType, OptionNumber
from comatrix.coap.testing import DEFAULT_PEER, Harness, option
from comatrix.compact import codec
from comatrix.compact.service import CompactService
from comatrix.config import build_config
from comatrix.credentials import Credentials
from comatrix.discovery import build_site
from comatrix.errors import error_response
from comatrix.matrix.api import AppserviceToken
from comatrix.matrix.responses import parse_event
from comatrix.matrix.testing import run, stub_transport
from comatrix.plugins.compact import STATE_KEY

import support.world
from test_bad_input_profiles import CBOR, CF, COMPACT_PLUGINS, MemoryStore

AS_TOKEN = "as_token_of_the_compact_tests"
SENSOR = "@comatrix_sensor01:test.local"
OTHER_PEER = ("2001:db8::99", 40000)
SECOND, SECOND_PEER = "@comatrix_sensor02:test.local", ("2001:db8::2", 40000)
SYNC = ("sync",)


class AppserviceWorld(support.world.World):
    """A compact site in application-service mode; ``SENSOR`` provisioned at `DEFAULT_PEER`'s address."""

    def __init__(self) -> None:
        super().__init__()
        self.homeserver.add_appservice(AS_TOKEN, "@comatrix_.*")
        base = self.context()
        config = build_config({"appservice": {"registration": "/x.yaml"}, "devices": [
            {"address": DEFAULT_PEER[0], "user": SENSOR, "appservice": True},
            {"address": SECOND_PEER[0], "user": SECOND, "appservice": True},
            {"address": OTHER_PEER[0], "user": self.user_id, "password": "pw"}]})
        store = MemoryStore()
        credentials = Credentials(config.devices, base.matrix)
        credentials.act_as_appservice(AS_TOKEN)
        self.credentials, self.entries = credentials, config.devices
        self.stream = EventStream(store, base.reactor)
        context = dataclasses.replace(base, config=config, credentials=credentials, store=store, events=self.stream)
        transport, _ = stub_transport(self.homeserver, context.reactor)
        context.state[longpoll.STATE_KEY] = longpoll.LongPoller(transport, context.reactor)
        self.harness = Harness(build_site(COMPACT_PLUGINS, context, error_response))
        self.service: CompactService = context.state[STATE_KEY]

    def send(self, path: str, body: Any, peer: Any = DEFAULT_PEER, *, observe: bool = False,
             token: bytes = b"\x01") -> wire.Datagram:
        options = [(CF, bytes([CBOR]))] + ([(OptionNumber.OBSERVE, b"")] if observe else [])
        [reply] = self.harness.send(Code.FETCH if path == "v" else Code.POST, (path,), payload=cbor2.dumps(body),
                                    peer=peer, options=options, token=token)
        return reply

    def login(self, user: str = SENSOR, peer: Any = DEFAULT_PEER) -> bytes:
        reply = self.send("+", [user, ""], peer)
        assert reply.code == Code.CREATED, reply
        handle: bytes = cbor2.loads(reply.payload)
        return handle

    def joined(self, handle: bytes, peer: Any = DEFAULT_PEER) -> int:
        reply = self.send("x", [handle, self.alias], peer)
        assert reply.code == Code.CHANGED, reply
        room_handle: int = cbor2.loads(reply.payload)
        return room_handle

    def message(self, body: str) -> dict[str, Any]:
        """A person's message in the room, as the homeserver would push it in a transaction."""
        event_id = self.homeserver.add_event(self.room, self.user_id, "m.room.message",
                                             {"msgtype": "m.text", "body": body})
        return next(e for e in self.homeserver.rooms[self.room] if e["event_id"] == event_id)

    def session_of(self, handle: bytes) -> Any:
        return run(self.service.session(handle, Peer(*DEFAULT_PEER), None))


def notifications(replies: list[wire.Datagram]) -> list[wire.Datagram]:
    return [reply for reply in replies if option(reply, OptionNumber.OBSERVE) is not None]


def pushed(replies: list[wire.Datagram]) -> list[tuple[str, int]]:
    """(body, cursor) of the messages the notifications among ``replies`` carry."""
    messages = [codec.decode_message(reply.payload) for reply in notifications(replies)]
    return [(m.body, m.cursor) for m in messages if m is not None]


# ---------------------------------------------------------------- sessions


def test_a_provisioned_device_opens_a_session_with_no_homeserver_login() -> None:
    world = AppserviceWorld()
    tokens = set(world.homeserver.tokens)
    handle = world.login()
    assert len(handle) == codec.HANDLE_SIZE
    assert world.login("comatrix_sensor01") != handle  # the localpart names the same user
    assert world.homeserver.requests == [] and set(world.homeserver.tokens) == tokens  # no Matrix device
    session = world.session_of(handle)
    assert session.user_id == SENSOR and session.device_id is None
    assert isinstance(session.access_token, AppserviceToken)
    assert session.access_token == AppserviceToken(AS_TOKEN, SENSOR)
    assert AS_TOKEN not in repr(session)


@pytest.mark.parametrize("user, peer, code", [
    ("@comatrix_sensor03:test.local", DEFAULT_PEER, Code.FORBIDDEN),  # not this device's user
    ("comatrix_sensor02", DEFAULT_PEER, Code.FORBIDDEN),
    (SECOND, DEFAULT_PEER, Code.FORBIDDEN),  # another provisioned device's user
    ("@d:test.local", OTHER_PEER, Code.BAD_REQUEST),  # an ordinary entry still needs its password
    (SENSOR, ("2001:db8::77", 5683), Code.BAD_REQUEST),  # no entry at all
])
def test_an_empty_password_is_only_a_provisioned_devices_own_login(user: str, peer: Any, code: Code) -> None:
    world = AppserviceWorld()
    assert world.send("+", [user, ""], peer).code == code
    assert world.homeserver.requests == []


def test_open_appservice_session_needs_appservice_mode() -> None:
    world = AppserviceWorld()
    world.service.acting = None
    with pytest.raises(Unauthorized):
        run(world.service.open_appservice_session(SENSOR, Peer(*DEFAULT_PEER)))


def test_the_session_acts_as_its_user_and_its_logout_calls_no_logout() -> None:
    world = AppserviceWorld()
    handle = world.login()
    room_handle = world.joined(handle)
    [join] = world.homeserver.calls("join")
    assert join.query == {"user_id": [SENSOR]}
    assert join.headers[b"Authorization"] == [f"Bearer {AS_TOKEN}".encode()]
    assert SENSOR in world.homeserver.members[world.room]
    assert world.send("w", [handle, room_handle, 1, "21.5 C"]).code == Code.CHANGED
    [sent] = [r for r in world.homeserver.requests if r.method == "PUT"]
    assert sent.query == {"user_id": [SENSOR]}
    assert world.homeserver.rooms[world.room][-1]["sender"] == SENSOR

    assert world.send("-", [handle]).code == Code.CHANGED
    assert world.homeserver.calls("logout") == []
    assert world.send("w", [handle, room_handle, 2, "x"]).code == Code.UNAUTHORIZED  # the handle is gone


def test_an_idle_appservice_session_expires_without_a_logout() -> None:
    world = AppserviceWorld()
    handle = world.login()
    world.service.reactor.advance(world.service.idle_timeout + 1)
    assert run(world.service.expire_idle_sessions()) == 1
    assert world.homeserver.calls("logout") == []
    assert world.send("x", [handle, world.alias]).code == Code.UNAUTHORIZED


# ---------------------------------------------------------------- transaction-fed watches


def test_a_watch_is_fed_by_transactions_and_never_syncs() -> None:
    world = AppserviceWorld()
    handle = world.login()
    room_handle = world.joined(handle)
    first = world.message("first")
    registered = world.send("v", [handle, room_handle], observe=True)
    assert registered.code == Code.CONTENT and option(registered, OptionNumber.OBSERVE) is not None
    latest = codec.decode_message(registered.payload)
    assert latest is not None and latest.body == "first"
    assert world.service.watching(world.session_of(handle).id)
    world.harness.replies()

    second, third = world.message("second"), world.message("third")
    assert run(world.stream.transaction("t1", [first, second, third]))
    replies = world.harness.replies()
    assert pushed(replies) == [("second", latest.cursor + 1), ("third", latest.cursor + 2)]
    assert {codec.decode_message(n.payload).sender for n in notifications(replies)} == {  # type: ignore[union-attr]
        world.user_id}

    # The same events again (another txnId, and straight to the listener): nothing numbered or pushed twice.
    assert run(world.stream.transaction("t2", [second, third]))
    run(world.service.rooms_arrived(world.room, [parse_event(second), parse_event(third)]))
    assert pushed(world.harness.replies()) == []
    # A later FETCH walks from the old position and skips what the transactions numbered.
    again = codec.decode_message(world.send("v", [handle, room_handle, latest.cursor + 1], token=b"\x09").payload)
    assert again is not None and (again.body, again.cursor) == ("third", latest.cursor + 2)
    assert codec.decode_message(world.send("v", [handle, room_handle, latest.cursor + 2],
                                           token=b"\x0a").payload) is None
    assert world.homeserver.calls(*SYNC) == []  # the gateway never held a /sync for the device


def test_each_of_many_watching_sessions_gets_a_message_once() -> None:
    world = AppserviceWorld()
    watchers = [b"\x01", b"\x02", b"\x03"]
    for token in watchers:
        handle = world.login()
        registered = world.send("v", [handle, world.joined(handle)], observe=True, token=token)
        assert option(registered, OptionNumber.OBSERVE) is not None
    world.harness.replies()
    assert run(world.stream.transaction("t1", [world.message("hello")]))
    notes = notifications(world.harness.replies())
    assert sorted(note.token for note in notes) == watchers
    assert [body for body, _cursor in pushed(notes)] == ["hello"] * 3
    assert run(world.stream.transaction("t2", [world.message("again")]))
    assert [body for body, _cursor in pushed(world.harness.replies())] == ["again"] * 3
    assert world.homeserver.calls(*SYNC) == []


def test_a_session_without_observers_leaves_the_feed() -> None:
    world = AppserviceWorld()
    handle = world.login()
    world.send("v", [handle, world.joined(handle)], observe=True)
    session = world.session_of(handle)
    assert world.service.watching(session.id)
    world.harness.replies()
    assert run(world.stream.transaction("t1", [world.message("one")]))
    [note] = notifications(world.harness.replies())
    # The device is gone: it answers the next notification with a RST, which ends its observation.
    world.harness.send_raw(wire.empty(MessageType.RST, note.mid))
    assert world.harness.server.observer_count() == 0
    assert run(world.stream.transaction("t2", [world.message("two")]))
    assert pushed(world.harness.replies()) == []
    assert not world.service.watching(session.id)


def test_a_logged_out_session_leaves_the_feed() -> None:
    world = AppserviceWorld()
    handle = world.login()
    world.send("v", [handle, world.joined(handle)], observe=True)
    session_id = world.session_of(handle).id
    assert world.send("-", [handle]).code == Code.CHANGED
    assert not world.service.watching(session_id)
    world.harness.replies()
    assert run(world.stream.transaction("t1", [world.message("after logout")]))
    assert pushed(world.harness.replies()) == []


def test_a_room_joined_while_watching_is_fed_too() -> None:
    world = AppserviceWorld()
    handle = world.login()
    world.send("v", [handle, world.joined(handle)], observe=True)
    second_room = world.homeserver.new_room(world.user_id, alias_local="lab2")
    reply = world.send("x", [handle, "#lab2:test.local"])
    assert reply.code == Code.CHANGED
    second_handle: int = cbor2.loads(reply.payload)
    world.send("v", [handle, second_handle], observe=True, token=b"\x02")
    world.harness.replies()
    event_id = world.homeserver.add_event(second_room, world.user_id, "m.room.message",
                                          {"msgtype": "m.text", "body": "in the second room"})
    [event] = [e for e in world.homeserver.rooms[second_room] if e["event_id"] == event_id]
    assert run(world.stream.transaction("t1", [event]))
    notes = notifications(world.harness.replies())
    assert [note.token for note in notes] == [b"\x02"] and pushed(notes)[0][0] == "in the second room"
    assert world.homeserver.calls(*SYNC) == []


def test_a_fed_session_whose_observers_left_quietly_idles_out() -> None:
    world = AppserviceWorld()
    handle = world.login()
    room_handle = world.joined(handle)
    world.send("v", [handle, room_handle], observe=True)
    session_id = world.session_of(handle).id
    # The device deregisters (Observe: 1) and no message comes that would notice it.
    [reply] = world.harness.send(Code.FETCH, ("v",), payload=cbor2.dumps([handle, room_handle]),
                                 options=[(CF, bytes([CBOR])), (OptionNumber.OBSERVE, b"\x01")])
    assert reply.code == Code.CONTENT and world.harness.server.observer_count() == 0
    world.service.reactor.advance(world.service.idle_timeout + 1)
    assert not world.service.watching(session_id)
    assert run(world.service.expire_idle_sessions()) == 1
    assert world.send("x", [handle, world.alias]).code == Code.UNAUTHORIZED


@pytest.mark.parametrize("membership", ["leave", "ban"])
def test_a_device_user_removed_from_a_room_gets_none_of_its_later_messages(membership: str) -> None:
    """The homeserver keeps pushing the room while another device user is in it: the gateway must stop."""
    world = AppserviceWorld()
    for user, peer, token in ((SENSOR, DEFAULT_PEER, b"\x01"), (SECOND, SECOND_PEER, b"\x02")):
        handle = world.login(user, peer)
        world.send("v", [handle, world.joined(handle, peer)], peer, observe=True, token=token)
    world.harness.replies()
    before = world.message("before")
    world.homeserver.members[world.room].discard(SENSOR)
    removal_id = world.homeserver.add_event(world.room, world.user_id, "m.room.member", {"membership": membership},
                                            SENSOR)
    [removal] = [e for e in world.homeserver.rooms[world.room] if e["event_id"] == removal_id]
    after = world.message("after the removal")
    assert run(world.stream.transaction("t1", [before, removal, after]))
    notes = notifications(world.harness.replies())
    got = {token: [body for body, _ in pushed([n for n in notes if n.token == token])] for token in (b"\x01", b"\x02")}
    assert got == {b"\x01": ["before"], b"\x02": ["before", "after the removal"]}
    assert run(world.stream.transaction("t2", [world.message("later")]))
    assert [n.token for n in notifications(world.harness.replies())] == [b"\x02"]


def test_append_messages_numbers_only_what_a_handle_has_not_numbered() -> None:
    from comatrix.store import StoredMessage

    def message(n: int, cursor: int = 0) -> StoredMessage:
        return StoredMessage(cursor, f"$e{n}", "@a:test.local", f"m{n}", 1_700_000_000_000 + n)
    store = MemoryStore()
    session_id = run(store.create_session(b"h" * 32, "", SENSOR, None, "::1", 1.0))
    handle = run(store.room_handle(session_id, "!r"))
    other = run(store.room_handle(session_id, "!s"))
    run(store.advance_timeline(session_id, handle, [message(n, n) for n in (1, 2, 3)], 3, "t3"))
    numbered = run(store.append_messages([(session_id, handle, [message(3), message(4), message(5), message(4)]),
                                          (session_id, other, [message(4)]),
                                          (session_id, 99, [message(6)])], keep=4))
    assert numbered == [[message(4, 4), message(5, 5)], [message(4, 1)], []]
    record = run(store.room(session_id, handle))
    assert record is not None and (record.last_cursor, record.after_token) == (5, "t3")  # the walk position stays
    assert run(store.message_at_or_after(session_id, handle, 1)) == message(2, 2)  # kept: the last four
    assert run(store.append_messages([(session_id, handle, [message(5), message(4)])])) == [[]]


def test_fed_numbering_moves_the_walk_position_just_past_the_last_message() -> None:
    world = AppserviceWorld()
    handle = world.login()
    room_handle = world.joined(handle)
    world.send("v", [handle, room_handle], observe=True)
    session_id = world.session_of(handle).id
    world.harness.replies()
    first, second = world.message("one"), world.message("two")
    assert run(world.stream.transaction("t1", [first, second]))
    position = len(world.homeserver.rooms[world.room])  # just after "two"
    [context] = [r for r in world.homeserver.requests if "context" in r.path]
    assert context.path[-1] == second["event_id"] and context.query["user_id"] == [SENSOR]
    record = run(world.service.store.room(session_id, room_handle))
    assert record is not None and record.after_token == f"t{position}"
    [_one, two] = pushed(world.harness.replies())
    # A message no transaction brought (yet): the device's FETCH walks from there, reading only it.
    world.message("three")
    world.homeserver.requests.clear()
    reply = codec.decode_message(world.send("v", [handle, room_handle, two[1]], token=b"\x07").payload)
    assert reply is not None and (reply.body, reply.cursor) == ("three", two[1] + 1)
    [walk] = [r for r in world.homeserver.requests if r.path[-1] == "messages"][:1]
    assert walk.query["from"] == [f"t{position}"] and walk.query["dir"] == ["f"]


def test_a_watch_started_after_a_removal_does_not_index_that_room() -> None:
    """Removed while nothing watched (a restart, say): the next watch reads /joined_rooms and leaves the room out."""
    world = AppserviceWorld()
    handle = world.login()
    room_handle = world.joined(handle)
    session = world.session_of(handle)
    world.homeserver.members[world.room].discard(SENSOR)  # kicked while the gateway was not feeding it
    world.service.watch(session)
    assert world.homeserver.calls("joined_rooms")  # read as the device user when the watch began
    assert run(world.stream.transaction("t1", [world.message("after the kick")]))
    latest = run(world.service.store.latest_message(session.id, room_handle))
    assert latest is None or latest.body != "after the kick"
