"""Unit tests of the pure Matrix request builders (comatrix.matrix.api)."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest

from comatrix.matrix import api
from comatrix.matrix.api import MatrixRequest

BASE = "https://matrix.example.org"
TOKEN = "syt_c2VjcmV0_SeCrEtToKeN_0a1b2c"
PASSWORD = "hunter2-PaSsWoRd"
V3 = ("_matrix", "client", "v3")


def decoded_path(url: str) -> list[str]:
    return [unquote(s) for s in urlsplit(url).path.split("/")[1:]]


def test_versions_is_unversioned_and_anonymous() -> None:
    req = api.versions()
    assert (req.method, req.path, req.access_token) == ("GET", ("_matrix", "client", "versions"), None)
    assert req.url(BASE) == BASE + "/_matrix/client/versions"


def test_register_without_session_has_no_auth() -> None:
    req = api.register("alice", PASSWORD)
    assert req.method == "POST" and req.path == V3 + ("register",)
    assert req.body == {"username": "alice", "password": PASSWORD}
    assert ("kind", "user") in req.query


def test_register_with_session_completes_dummy_stage() -> None:
    req = api.register("alice", PASSWORD, session="S1", device_id="DEV", inhibit_login=True,
                       initial_device_display_name="sensor")
    assert req.body == {
        "username": "alice", "password": PASSWORD,
        "auth": {"type": "m.login.dummy", "session": "S1"},
        "device_id": "DEV", "initial_device_display_name": "sensor", "inhibit_login": True,
    }


def test_login_password_uses_user_identifier() -> None:
    req = api.login_password("alice", PASSWORD, device_id="DEV")
    assert req.path == V3 + ("login",) and req.access_token is None
    assert req.body == {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": "alice"},
        "password": PASSWORD,
        "device_id": "DEV",
    }


@pytest.mark.parametrize(
    "req, method, path",
    [
        (api.logout(TOKEN), "POST", V3 + ("logout",)),
        (api.whoami(TOKEN), "GET", V3 + ("account", "whoami")),
        (api.join(TOKEN, "#room:example.org"), "POST", V3 + ("join", "#room:example.org")),
        (api.leave(TOKEN, "!r"), "POST", V3 + ("rooms", "!r", "leave")),
        (api.joined_rooms(TOKEN), "GET", V3 + ("joined_rooms",)),
        (api.invite(TOKEN, "!r", "@bob:x"), "POST", V3 + ("rooms", "!r", "invite")),
        (api.create_room(TOKEN, preset="private_chat"), "POST", V3 + ("createRoom",)),
        (api.send_event(TOKEN, "!r", "m.room.message", "t1", {"body": "hi"}), "PUT",
         V3 + ("rooms", "!r", "send", "m.room.message", "t1")),
        (api.room_state_event(TOKEN, "!r", "m.room.name"), "GET",
         V3 + ("rooms", "!r", "state", "m.room.name", "")),
        (api.send_state_event(TOKEN, "!r", "m.room.topic", {"topic": "t"}), "PUT",
         V3 + ("rooms", "!r", "state", "m.room.topic", "")),
        (api.sync(TOKEN), "GET", V3 + ("sync",)),
    ],
)
def test_builders_method_path_and_token(req: MatrixRequest, method: str, path: tuple[str, ...]) -> None:
    assert (req.method, req.path, req.access_token) == (method, path, TOKEN)
    # The token is a header, never part of the URL.
    assert TOKEN not in req.url(BASE)
    assert "access_token" not in req.url(BASE)
    if method in ("POST", "PUT"):
        assert isinstance(req.body, dict)


def test_invite_and_create_room_bodies() -> None:
    assert api.invite(TOKEN, "!r", "@bob:x").body == {"user_id": "@bob:x"}
    assert api.create_room(TOKEN, preset="private_chat", invite=["@b:x"]).body == {
        "preset": "private_chat", "invite": ["@b:x"]}


def test_join_via_servers_sent_as_via_and_server_name() -> None:
    req = api.join(TOKEN, "!r", via=["a.org", "b.org"])
    assert req.query == (("via", "a.org"), ("via", "b.org"),
                         ("server_name", "a.org"), ("server_name", "b.org"))


def test_resolve_alias_needs_no_token() -> None:
    req = api.resolve_alias("#room:example.org")
    assert req.path == V3 + ("directory", "room", "#room:example.org")
    assert req.access_token is None
    assert req.url(BASE) == BASE + "/_matrix/client/v3/directory/room/%23room%3Aexample.org"


@pytest.mark.parametrize(
    "segment, encoded",
    [
        ("!abc:example.org", "%21abc%3Aexample.org"),
        ("!" + "A" * 43, "%21" + "A" * 43),  # room v12 id: no server part
        ("#alias:example.org", "%23alias%3Aexample.org"),
        ("txn/with/slashes", "txn%2Fwith%2Fslashes"),
        ("..", ".."),
        ("a?b&c=d", "a%3Fb%26c%3Dd"),
        ("s p a c e", "s%20p%20a%20c%20e"),
        ("grüße-😀", "gr%C3%BC%C3%9Fe-%F0%9F%98%80"),
        ("100%", "100%25"),
    ],
)
def test_url_percent_encodes_every_segment(segment: str, encoded: str) -> None:
    req = api.send_event(TOKEN, segment, "m.room.message", segment, {})
    url = req.url(BASE + "/")
    assert url == f"{BASE}/_matrix/client/v3/rooms/{encoded}/send/m.room.message/{encoded}"
    assert decoded_path(url)[4] == segment and decoded_path(url)[7] == segment


def test_url_keeps_base_path_prefix() -> None:
    assert api.whoami(TOKEN).url("https://host/matrix/") == (
        "https://host/matrix/_matrix/client/v3/account/whoami")


def test_last_messages_query_has_filter_json() -> None:
    req = api.last_messages(TOKEN, "!room", limit=3, from_token="t42_7", dir="b")
    assert req.method == "GET" and req.path == V3 + ("rooms", "!room", "messages")
    assert req.body is None
    query = dict(parse_qsl(urlsplit(req.url(BASE)).query))
    assert query["dir"] == "b" and query["limit"] == "3" and query["from"] == "t42_7"
    assert json.loads(query["filter"]) == {"types": ["m.room.message"]}


def test_context_lazy_loads_members() -> None:
    req = api.context(TOKEN, "!room", "$event")
    assert req.method == "GET" and req.path == V3 + ("rooms", "!room", "context", "$event")
    query = dict(parse_qsl(urlsplit(req.url(BASE)).query))
    # Without the filter the answer's state holds every member of the room.
    assert query["limit"] == "0" and json.loads(query["filter"]) == {"lazy_load_members": True}


def test_last_messages_defaults_follow_facts() -> None:
    query = dict(api.last_messages(TOKEN, "!room").query)
    assert query["dir"] == "b" and query["limit"] == "1" and "from" not in query


@pytest.mark.parametrize("kwargs", [{"dir": "x"}, {"limit": 0}])
def test_last_messages_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        api.last_messages(TOKEN, "!room", **kwargs)  # type: ignore[arg-type]


def test_sync_query() -> None:
    req = api.sync(TOKEN, since="s1", timeout_ms=30000, filter={"room": {"timeline": {"limit": 1}}})
    query = dict(req.query)
    assert query["since"] == "s1" and query["timeout"] == "30000"
    assert json.loads(query["filter"]) == {"room": {"timeline": {"limit": 1}}}
    assert dict(api.sync(TOKEN, filter="7").query)["filter"] == "7"


def test_generic_pass_through() -> None:
    req = api.generic("put", ["_matrix", "client", "v3", "rooms", "!r", "typing", "@u:x"], TOKEN,
                      [("a", "b")], {"typing": True})
    assert req == MatrixRequest("PUT", V3 + ("rooms", "!r", "typing", "@u:x"), (("a", "b"),),
                                {"typing": True}, TOKEN, array_answer=True)  # an array answer passes through
    with pytest.raises(ValueError):
        api.generic("CONNECT", ["x"])


def test_repr_redacts_token_and_secret_body_values() -> None:
    requests = [
        api.register("alice", PASSWORD, session="S"),
        api.login_password("alice", PASSWORD),
        api.logout(TOKEN),
        api.generic("POST", ["x"], TOKEN, [("access_token", TOKEN)],
                    {"nested": [{"token": TOKEN}], "auth": {"password": PASSWORD}}),
    ]
    for req in requests:
        for text in (repr(req), str(req), f"{req}", repr([req])):
            assert TOKEN not in text
            assert PASSWORD not in text
    assert "<redacted>" in repr(requests[1])
    assert "alice" in repr(requests[1])  # non-secret fields stay visible for debugging


def test_request_is_frozen() -> None:
    req = api.whoami(TOKEN)
    with pytest.raises(AttributeError):
        req.method = "POST"  # type: ignore[misc]
