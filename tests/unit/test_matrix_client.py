"""Unit tests of MatrixClient flows against the in-memory fake homeserver (StubTreq)."""

from __future__ import annotations

import json

import pytest
from twisted.internet.task import Clock

from comatrix.matrix import (
    InvalidRoomReference,
    LoginResponse,
    MatrixClient,
    MatrixError,
    check_room_reference,
)
from comatrix.matrix.testing import FakeHomeserver, ScriptedAnswer, run, stub_transport

PASSWORD = "s3cret-Password!"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def hs() -> FakeHomeserver:
    return FakeHomeserver(scan_window=3)


@pytest.fixture
def client(hs: FakeHomeserver, clock: Clock) -> MatrixClient:
    transport, _ = stub_transport(hs, clock)
    return MatrixClient(transport, reactor=clock, alias_cache_ttl=60.0, alias_cache_size=2)


def login(hs: FakeHomeserver, localpart: str = "alice") -> tuple[str, str]:
    user = hs.add_user(localpart, PASSWORD)
    return user, hs.issue_token(user)[0]


def test_register_follows_two_step_dummy_flow(hs: FakeHomeserver, client: MatrixClient) -> None:
    result = run(client.register("alice", PASSWORD, device_id="SENSOR1"))
    assert isinstance(result, LoginResponse)
    assert result.user_id == "@alice:test.local" and result.device_id == "SENSOR1"
    assert hs.tokens[result.access_token] == ("@alice:test.local", "SENSOR1")
    first, second = hs.calls("register")
    assert "auth" not in first.body
    session = second.body["auth"]["session"]
    assert second.body["auth"] == {"type": "m.login.dummy", "session": session}
    assert session not in hs.uia_sessions  # consumed by the fake, so it was the one issued


def test_register_user_in_use(hs: FakeHomeserver, client: MatrixClient) -> None:
    hs.add_user("alice", "other")
    with pytest.raises(MatrixError) as info:
        run(client.register("alice", PASSWORD))
    assert info.value.errcode == "M_USER_IN_USE" and info.value.http_status == 400


def test_register_with_unsupported_stages(hs: FakeHomeserver, client: MatrixClient) -> None:
    hs.script("POST", ("_matrix", "client", "v3", "register"), ScriptedAnswer(
        401, json.dumps({"session": "S", "flows": [{"stages": ["m.login.recaptcha"]}]}).encode()))
    with pytest.raises(MatrixError) as info:
        run(client.register("alice", PASSWORD))
    assert info.value.http_status == 401 and "m.login.recaptcha" in str(info.value)
    assert len(hs.calls("register")) == 1


def test_login_whoami_logout(hs: FakeHomeserver, client: MatrixClient) -> None:
    hs.add_user("alice", PASSWORD)
    session = run(client.login("alice", PASSWORD, device_id="D1"))
    assert session.device_id == "D1"
    assert run(client.whoami(session.access_token)) == "@alice:test.local"
    run(client.logout(session.access_token))
    with pytest.raises(MatrixError) as info:
        run(client.whoami(session.access_token))
    assert info.value.errcode == "M_UNKNOWN_TOKEN"


def test_login_wrong_password(hs: FakeHomeserver, client: MatrixClient) -> None:
    hs.add_user("alice", PASSWORD)
    with pytest.raises(MatrixError) as info:
        run(client.login("alice", "wrong"))
    assert info.value.errcode == "M_FORBIDDEN"


def test_resolve_room_id_is_returned_unchanged_without_http(hs: FakeHomeserver,
                                                          client: MatrixClient) -> None:
    v12 = "!" + "Zk3_" * 10 + "abc"  # 43 chars, no :server
    assert run(client.resolve_room("tok", v12)) == v12
    assert run(client.resolve_room("tok", "!old:example.org")) == "!old:example.org"
    assert hs.requests == []


def test_alias_cache_hit_makes_no_http_call(hs: FakeHomeserver, client: MatrixClient,
                                            clock: Clock) -> None:
    user, token = login(hs)
    room = hs.new_room(user, alias_local="lab")
    assert run(client.resolve_room(token, "#lab:test.local")) == room
    assert run(client.resolve_room(token, "#lab:test.local")) == room
    assert len(hs.calls("directory")) == 1
    clock.advance(61)  # TTL expired
    assert run(client.resolve_room(token, "#lab:test.local")) == room
    assert len(hs.calls("directory")) == 2


def test_alias_cache_is_bounded(hs: FakeHomeserver, client: MatrixClient) -> None:
    user, token = login(hs)
    for name in ("a", "b", "c"):
        hs.new_room(user, alias_local=name)
        run(client.resolve_room(token, f"#{name}:test.local"))
    run(client.resolve_room(token, "#a:test.local"))  # evicted by c (size 2)
    run(client.resolve_room(token, "#c:test.local"))  # still cached
    assert len(hs.calls("directory")) == 4


def test_unknown_alias(hs: FakeHomeserver, client: MatrixClient) -> None:
    with pytest.raises(MatrixError) as info:
        run(client.resolve_room(None, "#nope:test.local"))
    assert info.value.errcode == "M_NOT_FOUND"


@pytest.mark.parametrize("bad", ["", "!", "room", "#noserver", "#:x", "# a:x", "!a\nb", "@u:x",
                                 "!" + "x" * 300])
def test_invalid_room_references(bad: str) -> None:
    with pytest.raises(InvalidRoomReference):
        check_room_reference(bad)


def test_join_by_alias_uses_one_call_and_fills_cache(hs: FakeHomeserver,
                                                     client: MatrixClient) -> None:
    owner, _ = login(hs, "owner")
    room = hs.new_room(owner, alias_local="hall")
    _, token = login(hs, "bob")
    assert run(client.join(token, "#hall:test.local")) == room
    assert [r.path[3:] for r in hs.calls("join")] == [("join", "#hall:test.local")]
    assert run(client.resolve_room(token, "#hall:test.local")) == room
    assert hs.calls("directory") == []


def test_create_invite_join_send(hs: FakeHomeserver, client: MatrixClient) -> None:
    _, alice = login(hs, "alice")
    bob_id, bob = login(hs, "bob")
    room = run(client.create_room(alice, preset="private_chat"))
    run(client.invite(alice, room, bob_id))
    assert run(client.join(bob, room)) == room
    content = {"msgtype": "m.text", "body": "hello"}
    first = run(client.send_message(bob, room, content, "txn-1"))
    again = run(client.send_message(bob, room, content, "txn-1"))
    assert first == again  # same txnId: one event
    assert [e["event_id"] for e in hs.rooms[room]].count(first) == 1


def test_last_message_skips_state_and_pages_over_empty_chunks(hs: FakeHomeserver,
                                                             client: MatrixClient) -> None:
    user, token = login(hs)
    room = hs.new_room(user)
    wanted = hs.add_event(room, user, "m.room.message", {"msgtype": "m.text", "body": "old"})
    for i in range(7):  # more state events than one scan window holds
        hs.add_event(room, user, "m.room.topic", {"topic": str(i)}, "")
    event = run(client.last_message(token, room))
    assert event is not None and event.event_id == wanted and event.content["body"] == "old"
    pages = hs.calls("rooms", room, "messages")
    assert len(pages) > 1  # the first filtered pages were empty but not the end
    assert json.loads(pages[0].query["filter"][0]) == {"types": ["m.room.message"]}


def test_last_message_skips_redacted_and_state_typed_messages(hs: FakeHomeserver,
                                                              client: MatrixClient) -> None:
    user, token = login(hs)
    room = hs.new_room(user)
    wanted = hs.add_event(room, user, "m.room.message", {"msgtype": "m.text", "body": "real"})
    hs.add_event(room, user, "m.room.message", {"body": "a state event"}, "weird")
    hs.add_event(room, user, "m.room.message", {})  # redacted
    event = run(client.last_message(token, room))
    assert event is not None and event.event_id == wanted


def test_last_message_empty_room_is_none(hs: FakeHomeserver, client: MatrixClient) -> None:
    user, token = login(hs)
    room = hs.new_room(user)
    assert run(client.last_message(token, room)) is None


def test_last_message_paging_is_bounded(hs: FakeHomeserver, clock: Clock) -> None:
    transport, _ = stub_transport(hs, clock)
    client = MatrixClient(transport, reactor=clock, max_message_pages=3)
    user, token = login(hs)
    room = hs.new_room(user)
    hs.add_event(room, user, "m.room.message", {"body": "too far back"})
    for i in range(30):
        hs.add_event(room, user, "m.room.topic", {"topic": str(i)}, "")
    assert run(client.last_message(token, room)) is None
    assert len(hs.calls("rooms", room, "messages")) == 3


def test_not_a_member(hs: FakeHomeserver, client: MatrixClient) -> None:
    owner, _ = login(hs, "owner")
    room = hs.new_room(owner)
    _, token = login(hs, "eve")
    with pytest.raises(MatrixError) as info:
        run(client.send_message(token, room, {"body": "x"}, "t"))
    assert info.value.errcode == "M_FORBIDDEN" and info.value.http_status == 403


def test_sync_and_close(hs: FakeHomeserver, client: MatrixClient) -> None:
    hs.script("GET", ("_matrix", "client", "v3", "sync"),
              ScriptedAnswer(200, b'{"next_batch": "s72", "rooms": {}}'))
    _, token = login(hs)
    assert run(client.sync(token, timeout_ms=0)).next_batch == "s72"
    run(client.close())
