"""The one event stream (`comatrix.appservice.stream`) and the invitation listener (`comatrix.appservice.invites`).

Stream: each event reaches each listener once, whatever transactions carry it
(a retried txnId, the same event in two transactions, a gateway restart in
between: the ids are kept in the `Store` file); a failing listener does not
fail the transaction; malformed events are skipped; events are handed over
room by room, oldest first.  Invitations of device users are joined when the
inviter is allowed and declined otherwise, acting as the invitee.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from comatrix.appservice.invites import Invitations, inviter_allowed, server_of
from comatrix.appservice.stream import EventStream
from comatrix.config import build_config
from comatrix.credentials import Credentials
from comatrix.matrix.client import MatrixClient
from comatrix.matrix.responses import Event
from comatrix.matrix.testing import FakeHomeserver, ScriptedAnswer, run, stub_transport
from comatrix.store import Store

from test_bad_input_profiles import MemoryStore

ROOM_A, ROOM_B = "!" + "a" * 43, "!" + "b" * 43
AS_TOKEN = "as_token_for_the_stream_tests"


def event(number: int, room: str | None = ROOM_A, **extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"event_id": f"$e{number}", "type": "m.room.message", "sender": "@alice:test.local",
                           "origin_server_ts": 1_700_000_000_000 + number,
                           "content": {"msgtype": "m.text", "body": f"m{number}"}, **extra}
    if room is not None:
        raw["room_id"] = room
    return raw


class Recorder:
    """A listener that records (room, [event ids]) per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(self, room_id: str, events: Sequence[Event]) -> None:
        self.calls.append((room_id, [e.event_id for e in events]))

    def ids(self) -> list[str]:
        return [event_id for _room, ids in self.calls for event_id in ids]


def stream_on(store: Store) -> tuple[EventStream, Recorder]:
    stream, recorder = EventStream(store, reactor), Recorder()
    stream.subscribe(recorder)
    return stream, recorder


# ---------------------------------------------------------------- the stream


@pytest_twisted.ensureDeferred
async def test_an_event_reaches_a_listener_once_across_transactions_and_a_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "state.sqlite3")
    store = Store(path)
    try:
        stream, seen = stream_on(store)
        assert await stream.transaction("t1", [event(1), event(2), event(1)])  # once within one, too
        assert await stream.transaction("t1", [event(1), event(2)]) is False  # the retry
        assert await stream.transaction("t2", [event(2), event(3)])  # another txnId carrying $e2 again
        assert seen.ids() == ["$e1", "$e2", "$e3"]
        assert (stream.transactions, stream.delivered) == (2, 3)
    finally:
        store.close()

    # The gateway restarts: a new stream on the same file.
    store = Store(path)
    try:
        stream, seen = stream_on(store)
        assert await stream.transaction("t2", [event(2), event(3)]) is False  # Synapse retries the last one
        assert await stream.transaction("t3", [event(3), event(4)])
        assert seen.ids() == ["$e4"]
        assert await store.last_appservice_transaction() == "t3"
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_concurrent_transactions_are_handled_one_at_a_time(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "state.sqlite3"))
    try:
        stream, seen = stream_on(store)
        both = [defer.ensureDeferred(stream.transaction(txn, [event(1), event(2)])) for txn in ("t1", "t2")]
        assert await defer.gatherResults(both) == [True, True]
        assert seen.ids() == ["$e1", "$e2"]
    finally:
        store.close()


def test_a_failing_listener_does_not_fail_the_transaction_nor_starve_the_others() -> None:
    stream = EventStream(MemoryStore(), task.Clock())
    before, after = Recorder(), Recorder()

    def broken(room_id: str, events: Sequence[Event]) -> None:
        raise RuntimeError("listener bug")

    async def broken_later(room_id: str, events: Sequence[Event]) -> None:
        raise RuntimeError("async listener bug")
    for listener in (before, broken, broken_later, after):
        stream.subscribe(listener)
    assert run(stream.transaction("t1", [event(1), event(2, ROOM_B)])) is True
    assert before.calls == after.calls == [(ROOM_A, ["$e1"]), (ROOM_B, ["$e2"])]
    # Recorded as handled: Synapse's retry delivers nothing twice.
    assert run(stream.transaction("t1", [event(1), event(2, ROOM_B)])) is False
    assert len(after.calls) == 2


def test_malformed_events_and_events_of_no_room_are_skipped() -> None:
    stream = EventStream(MemoryStore(), task.Clock())
    seen = Recorder()
    stream.subscribe(seen)
    malformed: list[Any] = [
        "not an event", 7, None, [], {},
        {k: v for k, v in event(10).items() if k != "event_id"},
        event(11, content="text"), event(12, state_key=5), event(13, sender=None), event(14, origin_server_ts="x"),
        event(15, room=None, room_id=17),
        event(16, room=None),  # an ephemeral-like event without a room
    ]
    assert run(stream.transaction("t1", [event(1), *malformed, event(2)])) is True
    assert seen.calls == [(ROOM_A, ["$e1", "$e2"])]
    assert stream.delivered == 2


def test_events_are_handed_over_room_by_room_oldest_first() -> None:
    stream = EventStream(MemoryStore(), task.Clock())
    seen = Recorder()
    unsubscribe = stream.subscribe(seen)
    run(stream.transaction("t1", [event(1), event(2, ROOM_B), event(3), event(4, ROOM_B), event(5)]))
    assert seen.calls == [(ROOM_A, ["$e1", "$e3", "$e5"]), (ROOM_B, ["$e2", "$e4"])]
    unsubscribe()
    unsubscribe()  # twice is harmless
    run(stream.transaction("t2", [event(6)]))
    assert len(seen.calls) == 2
    run(stream.transaction("t3", []))  # an empty transaction (ephemeral events only) is fine
    assert len(seen.calls) == 2


@pytest_twisted.ensureDeferred
async def test_the_remembered_event_ids_are_bounded(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "state.sqlite3"))
    try:
        await store.finish_appservice_transaction("t1", ["$1", "$2", "$3"], 1.0, keep=4)
        await store.finish_appservice_transaction("t2", ["$4", "$5"], 2.0, keep=4)
        assert await store.seen_events(["$1", "$2", "$3", "$4", "$5", "$6"]) == {"$2", "$3", "$4", "$5"}
        assert await store.last_appservice_transaction() == "t2"
        many = [f"$x{n}" for n in range(1200)]  # more than one SQLite parameter chunk
        await store.finish_appservice_transaction("t3", many, 3.0)
        assert await store.seen_events(many + ["$unknown"]) == set(many)
    finally:
        store.close()


# ---------------------------------------------------------------- who may invite


def test_inviter_allowed() -> None:
    invitee = "@comatrix_s1:example.org"
    # None: users of the invitee's own server.
    assert inviter_allowed(None, invitee, "@alice:example.org")
    assert not inviter_allowed(None, invitee, "@eve:evil.example")
    assert not inviter_allowed(None, invitee, "@eve:sub.example.org")
    assert not inviter_allowed(None, invitee, "@eve:example.org.evil")
    # Exact user ids.
    assert inviter_allowed(("@bob:other.example",), invitee, "@bob:other.example")
    assert not inviter_allowed(("@bob:other.example",), invitee, "@alice:example.org")  # the default is replaced
    assert not inviter_allowed(("@bob:other.example",), invitee, "@bob2:other.example")
    # Whole servers, with a port where the server name has one.
    assert inviter_allowed(("*:other.example",), invitee, "@anyone:other.example")
    assert not inviter_allowed(("*:other.example",), invitee, "@anyone:other.example:8448")
    assert inviter_allowed(("*:other.example:8448",), invitee, "@anyone:other.example:8448")
    assert inviter_allowed(("@x:a.example", "*:b.example"), invitee, "@y:b.example")
    # Anyone; and nobody.
    assert inviter_allowed(("*",), invitee, "@eve:evil.example")
    assert not inviter_allowed((), invitee, "@alice:example.org")
    assert server_of("@a:example.org:8448") == "example.org:8448" and server_of("nocolon") == ""


# ---------------------------------------------------------------- answering invitations


class InviteWorld:
    """A fake homeserver with the application service, two device users and a room of alice's."""

    SENSOR, PICKY = "@comatrix_sensor01:test.local", "@comatrix_picky:test.local"

    def __init__(self) -> None:
        self.homeserver = FakeHomeserver()
        self.homeserver.add_appservice(AS_TOKEN, "@comatrix_.*")
        self.alice = self.homeserver.add_user("alice", "pw")
        self.room = self.homeserver.new_room(self.alice)
        config = build_config({"appservice": {"registration": "/x.yaml"}, "devices": [
            {"address": "2001:db8::1", "user": self.SENSOR, "appservice": True},
            {"address": "2001:db8::2", "user": self.PICKY, "appservice": True,
             "allow_invites_from": ["@bob:other.example"]}]})
        clock = task.Clock()
        transport, _ = stub_transport(self.homeserver, clock)
        self.credentials = Credentials(config.devices, MatrixClient(transport, reactor=clock))
        self.credentials.act_as_appservice(AS_TOKEN)
        self.stream = EventStream(MemoryStore(), clock)
        self.stream.subscribe(Invitations(self.credentials, MatrixClient(transport, reactor=clock)))

    def invite(self, inviter: str, invitee: str) -> dict[str, Any]:
        self.homeserver.add_event(self.room, inviter, "m.room.member", {"membership": "invite"}, invitee)
        return self.homeserver.rooms[self.room][-1]

    def answers(self) -> list[tuple[tuple[str, ...], list[str]]]:
        return [(r.path[3:], r.query.get("user_id", [])) for r in self.homeserver.requests
                if r.path[3:4] in (("join",), ("rooms",))]


def test_an_invitation_from_an_allowed_inviter_is_joined_as_the_invitee() -> None:
    world = InviteWorld()
    assert run(world.stream.transaction("t1", [world.invite(world.alice, world.SENSOR)]))
    assert world.answers() == [(("join", world.room), [world.SENSOR])]
    [join] = world.homeserver.calls("join")
    assert join.headers[b"Authorization"] == [f"Bearer {AS_TOKEN}".encode()]
    assert world.SENSOR in world.homeserver.members[world.room]


def test_an_invitation_from_anyone_else_is_declined_as_the_invitee() -> None:
    world = InviteWorld()
    eve = "@eve:evil.example"
    # The default allows the own server only; PICKY allows bob alone (not even alice).
    run(world.stream.transaction("t1", [world.invite(eve, world.SENSOR), world.invite(world.alice, world.PICKY)]))
    assert world.answers() == [(("rooms", world.room, "leave"), [world.SENSOR]),
                               (("rooms", world.room, "leave"), [world.PICKY])]
    assert world.homeserver.members[world.room] == {world.alice}
    run(world.stream.transaction("t2", [world.invite("@bob:other.example", world.PICKY)]))
    assert world.answers()[-1] == (("join", world.room), [world.PICKY])


def test_only_invitations_of_device_users_are_answered() -> None:
    world = InviteWorld()
    others = [world.invite(world.alice, "@carol:test.local"),  # not a device user
              world.invite(world.alice, "@comatrix_unprovisioned:test.local"),  # in the namespace, not configured
              event(1, world.room)]
    joined = world.homeserver.add_event(world.room, world.SENSOR, "m.room.member", {"membership": "join"},
                                        world.SENSOR)
    membership = [e for e in world.homeserver.rooms[world.room] if e["event_id"] == joined]
    run(world.stream.transaction("t1", others + membership))
    assert world.answers() == []


def test_a_homeserver_error_while_answering_does_not_fail_the_transaction() -> None:
    world = InviteWorld()
    world.homeserver.script("POST", ("_matrix", "client", "v3", "join"),
                            ScriptedAnswer(403, b'{"errcode": "M_FORBIDDEN", "error": "banned"}'))
    assert run(world.stream.transaction("t1", [world.invite(world.alice, world.SENSOR),
                                               world.invite(world.alice, world.PICKY)])) is True
    assert [path[0] for path, _user in world.answers()] == ["join", "rooms"]  # the next one still answered
    assert run(world.stream.transaction("t1", [])) is False  # recorded: not pushed again


def test_many_invitations_are_answered_several_at_a_time() -> None:
    """A transaction inviting many device users is answered at most INVITATIONS_AT_ONCE at a time, all of them."""
    from typing import cast
    from comatrix.appservice.invites import INVITATIONS_AT_ONCE
    from comatrix.matrix.responses import parse_event

    clock = task.Clock()
    users = [f"@comatrix_s{index}:test.local" for index in range(3 * INVITATIONS_AT_ONCE)]
    config = build_config({"appservice": {"registration": "/x.yaml"}, "devices": [
        {"address": f"2001:db8::{index + 1:x}", "user": user, "appservice": True} for index, user in enumerate(users)]})
    credentials = Credentials(config.devices, cast(Any, None))
    credentials.act_as_appservice(AS_TOKEN)

    class SlowHomeserver:
        in_flight = most = 0
        joined: list[str] = []

        async def join(self, token: Any, room: str) -> str:
            SlowHomeserver.in_flight += 1
            SlowHomeserver.most = max(SlowHomeserver.most, SlowHomeserver.in_flight)
            await task.deferLater(clock, 1.0, lambda: None)
            SlowHomeserver.in_flight -= 1
            SlowHomeserver.joined.append(token.user_id)
            return room

    invitations = Invitations(credentials, cast(Any, SlowHomeserver()))
    events = [parse_event({"event_id": f"$i{index}", "type": "m.room.member", "sender": "@alice:test.local",
                           "origin_server_ts": 1, "room_id": "!r:test.local", "state_key": user,
                           "content": {"membership": "invite"}}) for index, user in enumerate(users)]
    done = defer.ensureDeferred(invitations("!r:test.local", events))
    for _ in range(len(users)):
        clock.advance(1.0)
    assert done.called
    assert SlowHomeserver.most == INVITATIONS_AT_ONCE and sorted(SlowHomeserver.joined) == sorted(users)
