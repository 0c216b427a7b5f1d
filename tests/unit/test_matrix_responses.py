"""Unit tests of the pure Matrix response parsers (comatrix.matrix.responses)."""

from __future__ import annotations

from typing import Any, Callable

import pytest

from comatrix.matrix import responses as r
from comatrix.matrix.errors import InvalidResponse

TOKEN = "syt_YWxpY2U_SeCrEtToKeN_4f2a"
ROOM_V12 = "!" + "a" * 43


def message(event_id: str = "$e1", **extra: Any) -> dict[str, Any]:
    event = {"event_id": event_id, "type": "m.room.message", "sender": "@a:x",
             "origin_server_ts": 1700000000000, "content": {"msgtype": "m.text", "body": "hi"},
             "room_id": ROOM_V12}
    event.update(extra)
    return event


def test_parse_login() -> None:
    login = r.parse_login({"user_id": "@a:x", "access_token": TOKEN, "device_id": "D",
                           "home_server": "x"})
    assert login == r.LoginResponse("@a:x", TOKEN, "D")
    assert TOKEN not in repr(login) and TOKEN not in str(login)


def test_parse_register_with_and_without_token() -> None:
    assert r.parse_register({"user_id": "@a:x", "access_token": TOKEN, "device_id": "D"}) == \
        r.RegisterResponse("@a:x", TOKEN, "D")
    reg = r.parse_register({"user_id": "@a:x"})
    assert reg.access_token is None and reg.device_id is None
    assert TOKEN not in repr(r.parse_register({"user_id": "@a:x", "access_token": TOKEN}))


def test_parse_uia_flows() -> None:
    body = {"session": "S", "flows": [{"stages": ["m.login.dummy"]},
                                      {"stages": ["m.login.recaptcha", "m.login.email.identity"]}],
            "params": {}}
    flows = r.parse_uia_flows(body)
    assert flows.session == "S" and r.parse_flows_session(body) == "S"
    assert flows.offers_only("m.login.dummy")
    assert not r.parse_uia_flows({"session": "S", "flows": [{"stages": ["m.login.recaptcha"]}]}) \
        .offers_only("m.login.dummy")


def test_parse_event_and_state_event() -> None:
    event = r.parse_event(message())
    assert (event.event_id, event.type, event.sender, event.origin_server_ts) == \
        ("$e1", "m.room.message", "@a:x", 1700000000000)
    assert event.content == {"msgtype": "m.text", "body": "hi"}
    assert event.room_id == ROOM_V12 and not event.is_state and not event.is_redacted
    state = r.parse_event(message(type="m.room.topic", state_key="", content={"topic": "t"}))
    assert state.is_state and state.state_key == ""
    assert r.parse_event(message(content={})).is_redacted


def test_parse_messages_end_and_empty_chunk() -> None:
    page = r.parse_messages({"chunk": [], "start": "t9", "end": "t5"})
    assert page.events == () and page.end == "t5"  # empty chunk is not the end
    last = r.parse_messages({"chunk": [message()], "start": "t9"})
    assert last.end is None and last.start == "t9" and len(last.events) == 1


def test_simple_parsers() -> None:
    assert r.parse_join({"room_id": ROOM_V12}) == ROOM_V12
    assert r.parse_create_room({"room_id": ROOM_V12}) == ROOM_V12
    assert r.parse_send({"event_id": "$e"}) == "$e"
    assert r.parse_whoami({"user_id": "@a:x", "device_id": "D"}) == "@a:x"
    assert r.parse_joined_rooms({"joined_rooms": [ROOM_V12]}) == (ROOM_V12,)
    assert r.parse_resolve_alias({"room_id": ROOM_V12, "servers": ["x", "y"]}) == \
        r.ResolvedAlias(ROOM_V12, ("x", "y"))
    assert r.parse_resolve_alias({"room_id": ROOM_V12}).servers == ()
    versions = r.parse_versions({"versions": ["v1.11"], "unstable_features": {"m.x": True}})
    assert versions.versions == ("v1.11",) and versions.unstable_features == {"m.x": True}
    sync = r.parse_sync({"next_batch": "s1", "rooms": {}})
    assert sync.next_batch == "s1" and sync.body["rooms"] == {}


BAD_SHAPES: list[tuple[Callable[[Any], object], Any]] = [
    (r.parse_login, []),
    (r.parse_login, "text"),
    (r.parse_login, {"user_id": "@a:x"}),
    (r.parse_login, {"user_id": "@a:x", "access_token": 5}),
    (r.parse_register, {"access_token": TOKEN}),
    (r.parse_flows_session, {"flows": []}),
    (r.parse_uia_flows, {"session": "S"}),
    (r.parse_uia_flows, {"session": "S", "flows": [{"stages": "m.login.dummy"}]}),
    (r.parse_join, {}),
    (r.parse_join, {"room_id": ""}),
    (r.parse_join, None),
    (r.parse_resolve_alias, {"room_id": "!r", "servers": "x"}),
    (r.parse_send, {"event_id": None}),
    (r.parse_whoami, {"device_id": "D"}),
    (r.parse_joined_rooms, {"joined_rooms": [1]}),
    (r.parse_messages, {"start": "t"}),
    (r.parse_messages, {"chunk": {}, "start": "t"}),
    (r.parse_messages, {"chunk": [], "end": "t"}),
    (r.parse_messages, {"chunk": [{"type": "m.room.message"}], "start": "t"}),
    (r.parse_event, message(origin_server_ts="yesterday")),
    (r.parse_event, message(origin_server_ts=True)),
    (r.parse_event, message(content="hi")),
    (r.parse_event, message(state_key=3)),
    (r.parse_versions, {"versions": "v1.11"}),
    (r.parse_sync, {"rooms": {}}),
]


@pytest.mark.parametrize("parser, body", BAD_SHAPES)
def test_parsers_reject_wrong_shapes(parser: Callable[[Any], object], body: Any) -> None:
    with pytest.raises(InvalidResponse):
        parser(body)


def test_invalid_response_never_echoes_values() -> None:
    with pytest.raises(InvalidResponse) as info:
        r.parse_login({"user_id": 7, "access_token": TOKEN})
    assert TOKEN not in str(info.value) and TOKEN not in repr(info.value)
