"""The clean form of issue 13's operations (`comatrix.plugins.operations`) through the real CoAP layer
against the in-memory homeserver: what each asks of Matrix and answers, its refusals of bad input
(4.00 or 4.15 before the homeserver is asked), and the shared-credentials policy of each method."""

from __future__ import annotations

import json
import struct
from typing import Any

import cbor2
import pytest

from comatrix.coap.blockwise import Block
from comatrix.coap.numbers import Code, ContentFormat, OptionNumber
from comatrix.coap.testing import Harness, option
from comatrix.discovery import build_site
from comatrix.errors import error_response
from comatrix.matrix.testing import ScriptedAnswer
from comatrix.plugins import operations
from comatrix.plugins.operations import METHOD_OPERATIONS
from comatrix.policy import DEVICE, OPERATIONS

import support.world

PLUGINS = [operations.create, operations.room, operations.invite, operations.leave, operations.kick,
           operations.members, operations.invitations, operations.history, operations.react,
           operations.redact, operations.read, operations.profile, operations.upload]
CF = int(OptionNumber.CONTENT_FORMAT)
SENSOR = ("2001:db8::5", 5683)
PNG = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", 3, 2) + b"\x08\x02\x00\x00\x00"


class Gateway(support.world.World):
    """The clean operations; `SENSOR` acts through a ``[[devices]]`` entry with ``allow``, others send the token."""

    def __init__(self, allow: list[str] | None = None) -> None:
        super().__init__()
        entry = {"address": "2001:db8::/64", "access_token": self.token, "allow": allow or []}
        self.harness = Harness(build_site(PLUGINS, self.context([entry]), error_response))
        self.alice = self.homeserver.add_user("alice", "pw-a")

    def call(self, code: int, path: str, body: Any = None, *, query: tuple[str, ...] = (), shared: bool = False,
             content_format: int | None = ContentFormat.CBOR, raw: bytes | None = None) -> tuple[str, Any]:
        options = [] if content_format is None else [(CF, bytes([content_format]) if content_format else b"")]
        if not shared:
            options.append((256, self.token.encode()))
        payload = raw if raw is not None else (b"" if body is None else cbor2.dumps(body))
        [reply] = self.harness.send(code, (path,), options=options, payload=payload, query=query,
                                    peer=SENSOR if shared else ("2001:db8:1::9", 5683))
        data = cbor2.loads(reply.payload) if reply.payload and Code(reply.code).dotted()[0] == "2" else reply.payload
        return Code(reply.code).dotted(), data

    def ok(self, code: int, path: str, body: Any = None, **kwargs: Any) -> Any:
        result, data = self.call(code, path, body, **kwargs)
        assert result in ("2.01", "2.04", "2.05"), (result, data)
        return data

    def message(self, body: str, sender: str | None = None) -> str:
        return self.homeserver.add_event(self.room, sender or self.user_id, "m.room.message",
                                         {"msgtype": "m.text", "body": body})


def test_rooms_create_info_set_and_alias() -> None:
    gw = Gateway()
    created = gw.ok(Code.POST, "create", {"name": "Greenhouse", "topic": "air", "invite": [gw.alice]})
    [create] = gw.homeserver.calls("createRoom")
    assert create.body == {"preset": "private_chat", "name": "Greenhouse", "topic": "air", "invite": [gw.alice]}
    room_id = created["room_id"]
    gw.ok(Code.POST, "room", {"room_id": room_id, "name": "Glasshouse", "topic": "soil"})
    info = gw.ok(Code.GET, "room", query=(f"room={room_id}",))
    assert info == {"room_id": room_id, "name": "Glasshouse", "topic": "soil", "joined": 1, "membership": "join"}
    assert gw.ok(Code.GET, "room", query=("alias=%23lab:test.local",)) == {"room_id": gw.room}


def test_membership_invite_kick_leave_members_and_invitations() -> None:
    gw = Gateway()
    gw.ok(Code.POST, "invite", {"room_id": gw.room, "user_id": gw.alice})
    assert gw.homeserver.state_events(gw.room, "m.room.member")[gw.alice]["content"] == {"membership": "invite"}
    gw.ok(Code.POST, "kick", {"room_id": gw.alias, "user_id": gw.alice, "reason": "bye"})
    assert gw.homeserver.calls("rooms", gw.room, "kick")[0].body == {"user_id": gw.alice, "reason": "bye"}
    assert gw.ok(Code.GET, "members", query=(f"room={gw.room}",)) == [gw.user_id]
    invite_state = {"events": [{"type": "m.room.member", "state_key": gw.user_id, "sender": gw.alice,
                                "content": {"membership": "invite"}},
                               {"type": "m.room.name", "state_key": "", "sender": gw.alice,
                                "content": {"name": "Hall"}}]}
    sync = {"next_batch": "s1", "rooms": {"invite": {"!hall:test.local": {"invite_state": invite_state}}}}
    gw.homeserver.script("GET", ("_matrix", "client", "v3", "sync"),
                         ScriptedAnswer(200, json.dumps(sync).encode()))
    assert gw.ok(Code.GET, "invitations") == [{"room_id": "!hall:test.local", "inviter": gw.alice, "name": "Hall"}]
    gw.ok(Code.POST, "leave", {"room_id": gw.room})
    assert gw.user_id not in gw.homeserver.members[gw.room]


def test_history_pages_backwards_and_forwards() -> None:
    gw = Gateway()
    ids = [gw.message(f"m{n}") for n in range(3)]
    page = gw.ok(Code.GET, "history", query=(f"room={gw.room}", "limit=2"))
    assert [(e["event_id"], e["body"], e["msgtype"]) for e in page["chunk"]] == [
        (ids[2], "m2", "m.text"), (ids[1], "m1", "m.text")]
    assert page["chunk"][0]["sender"] == gw.user_id and isinstance(page["chunk"][0]["ts"], int)
    forward = gw.ok(Code.GET, "history", query=(f"room={gw.room}", "dir=f", f"from={page['end']}", "limit=5"))
    assert ids[2] in [e["event_id"] for e in forward["chunk"]]


def test_react_remove_redact_and_read() -> None:
    gw = Gateway()
    target = gw.message("door opened")
    body = {"room_id": gw.room, "event_id": target, "key": "👍", "txn_id": "r1"}
    reaction = gw.ok(Code.POST, "react", body)["event_id"]
    assert gw.ok(Code.POST, "react", body)["event_id"] == reaction  # the same txn id: the same event
    removed = gw.ok(Code.POST, "react", {**body, "remove": True})["event_id"]
    assert removed != reaction
    assert gw.call(Code.POST, "react", {**body, "remove": True, "key": "👎"})[0] == "4.04"
    redaction = gw.ok(Code.POST, "redact", {"room_id": gw.room, "event_id": target, "reason": "wrong"})
    assert redaction["event_id"].startswith("$")
    gw.ok(Code.POST, "read", {"room_id": gw.room, "event_id": target})
    assert gw.homeserver.receipts[(gw.room, gw.user_id)] == ("m.read", target)


def test_profile_and_upload() -> None:
    gw = Gateway()
    assert gw.ok(Code.GET, "profile") == {"displayname": None, "avatar_url": None}
    uploaded = gw.ok(Code.POST, "upload", raw=PNG, content_format=None, query=("type=image/png", "name=f.png"))
    assert set(uploaded) == {"content_uri"}
    gw.ok(Code.POST, "profile", {"displayname": "Door", "avatar_url": uploaded["content_uri"]})
    assert gw.ok(Code.GET, "profile") == {"displayname": "Door", "avatar_url": uploaded["content_uri"]}
    sent = gw.ok(Code.POST, "upload", raw=PNG, content_format=ContentFormat.OCTET_STREAM,
                 query=("type=image/png", "name=f.png", f"room={gw.room}", "txn_id=u1"))
    event = gw.homeserver.rooms[gw.room][-1]
    assert event["event_id"] == sent["event_id"]
    assert event["content"] == {"msgtype": "m.image", "body": "f.png", "url": sent["content_uri"],
                                "info": {"mimetype": "image/png", "size": len(PNG), "w": 3, "h": 2}}


BAD_INPUT = [
    (Code.POST, "create", {"preset": "trusted_private_chat"}, ()),
    (Code.POST, "create", {"invite": "@a:b"}, ()),
    (Code.POST, "create", {"invite": ["alice"]}, ()),
    (Code.POST, "create", {"name": 5}, ()),
    (Code.POST, "room", {"room_id": "!r:x"}, ()),
    (Code.GET, "room", None, ("alias=lab",)),
    (Code.GET, "room", None, ()),
    (Code.POST, "invite", {"room_id": "!r:x"}, ()),
    (Code.POST, "invite", {"room_id": "!r:x", "user_id": "@nocolon"}, ()),
    (Code.POST, "leave", {}, ()),
    (Code.POST, "kick", {"room_id": "!r:x", "user_id": "@a:b", "reason": "x" * 600}, ()),
    (Code.GET, "members", None, ("room=",)),
    (Code.GET, "history", None, ("room=!r:x", "dir=up")),
    (Code.GET, "history", None, ("room=!r:x", "limit=0")),
    (Code.GET, "history", None, ("room=!r:x", "limit=51")),
    (Code.POST, "react", {"room_id": "!r:x", "event_id": "e1", "key": "+"}, ()),
    (Code.POST, "react", {"room_id": "!r:x", "event_id": "$e", "key": "+", "remove": "yes"}, ()),
    (Code.POST, "react", {"room_id": "!r:x", "event_id": "$e"}, ()),
    (Code.POST, "redact", {"room_id": "!r:x", "event_id": "$e", "txn_id": "t" * 65}, ()),
    (Code.POST, "read", {"room_id": "!r:x"}, ()),
    (Code.POST, "profile", {}, ()),
    (Code.POST, "profile", {"avatar_url": "https://x/y.png"}, ()),
]


@pytest.mark.parametrize("code, path, body, query", BAD_INPUT)
def test_bad_input_is_400_and_never_reaches_the_homeserver(code: int, path: str, body: Any,
                                                           query: tuple[str, ...]) -> None:
    gw = Gateway()
    result, diagnostic = gw.call(code, path, body, query=query)
    assert result == "4.00" and 0 < len(diagnostic) <= 64, (result, diagnostic)
    assert gw.homeserver.requests == []


@pytest.mark.parametrize("query, payload", [(("type=png",), PNG), (("type=image/png",), b""),
                                            (("type=image/png", "room=lab"), PNG)])
def test_bad_uploads_are_400(query: tuple[str, ...], payload: bytes) -> None:
    gw = Gateway()
    assert gw.call(Code.POST, "upload", raw=payload, content_format=None, query=query)[0] == "4.00"
    assert gw.homeserver.requests == []


def test_wrong_content_formats_are_415() -> None:
    gw = Gateway()
    assert gw.call(Code.POST, "redact", raw=b"{}", content_format=50)[0] == "4.15"
    assert gw.call(Code.POST, "upload", raw=PNG, content_format=ContentFormat.CBOR)[0] == "4.15"
    assert gw.homeserver.requests == []


def test_every_operation_is_in_the_policy_table() -> None:
    assert set(METHOD_OPERATIONS.values()) <= set(OPERATIONS)
    served = {(name, method) for name, method in METHOD_OPERATIONS if method in ("GET", "POST")}
    for plugin in PLUGINS:
        methods = {m for m in ("GET", "POST") if hasattr(plugin.resource_class, f"render_{m}")}
        assert {(plugin.name, m) for m in methods} <= served


def test_shared_credentials_get_device_operations_only_unless_allowed() -> None:
    gw = Gateway()
    gw.message("hello")
    assert gw.call(Code.GET, "history", query=(f"room={gw.room}",), shared=True)[0] == "2.05"
    refused = [(Code.POST, "create", {}), (Code.POST, "invite", {"room_id": gw.room, "user_id": gw.alice}),
               (Code.POST, "kick", {"room_id": gw.room, "user_id": gw.alice}),
               (Code.POST, "redact", {"room_id": gw.room, "event_id": "$e"}),
               (Code.POST, "profile", {"displayname": "x"}), (Code.GET, "invitations", None)]
    before = len(gw.homeserver.requests)
    for code, path, body in refused:
        assert gw.call(code, path, body, shared=True) == ("4.03", b"not allowed for shared credentials"), path
    assert gw.call(Code.POST, "upload", raw=PNG, content_format=None, shared=True,
                   query=("type=image/png",))[0] == "4.03"
    assert len(gw.homeserver.requests) == before
    assert [op for (_, _), op in METHOD_OPERATIONS.items() if OPERATIONS[op] == DEVICE]  # some stay open
    allowed = Gateway(allow=["rooms", "media"])
    assert allowed.call(Code.POST, "create", {"name": "x"}, shared=True)[0] == "2.01"
    assert allowed.call(Code.POST, "upload", raw=PNG, content_format=None, shared=True,
                        query=("type=image/png",))[0] == "2.04"


def test_a_long_member_list_goes_block_wise_and_each_resource_is_listed() -> None:
    gw = Gateway()
    gw.homeserver.members[gw.room].update(f"@sensor-{n:03}:test.local" for n in range(80))
    [first] = gw.harness.send(Code.GET, ("members",), query=(f"room={gw.room}",),
                              options=[(256, gw.token.encode())])
    block = Block.decode(option(first, OptionNumber.BLOCK2) or b"")
    assert first.code == Code.CONTENT and block.num == 0 and block.more and len(first.payload) == block.size
    payload, num = first.payload, 0
    while block.more:
        num += 1
        asked = (OptionNumber.BLOCK2, Block(num, False, 6).encode())
        [reply] = gw.harness.send(Code.GET, ("members",), query=(f"room={gw.room}",),
                                  options=[(256, gw.token.encode()), asked])
        block = Block.decode(option(reply, OptionNumber.BLOCK2) or b"")
        payload += reply.payload
    assert len(cbor2.loads(payload)) == 81
    [listing] = gw.harness.send(Code.GET, (".well-known", "core"))
    links = listing.payload.decode()
    for plugin in PLUGINS:
        assert f'</{plugin.name}>;rt="comatrix.{plugin.name}"' in links, plugin.name


def test_history_through_an_entry_carries_only_its_allowed_senders() -> None:
    gw = Gateway()
    entry = {"address": "2001:db8::/64", "user": gw.user_id, "password": "pw",
             "allowed_senders": ["@eve:elsewhere.org"]}
    gw.harness = Harness(build_site(PLUGINS, gw.context([entry]), error_response))
    gw.message("from alice", gw.alice)
    gw.message("from eve", "@eve:elsewhere.org")
    gw.message("my own")
    page = gw.ok(Code.GET, "history", query=(f"room={gw.room}",), shared=True)
    assert [event["body"] for event in page["chunk"]] == ["my own", "from eve"]
    with_token = gw.ok(Code.GET, "history", query=(f"room={gw.room}",))  # a token of its own: no filter
    assert [event["body"] for event in with_token["chunk"]][:3] == ["my own", "from eve", "from alice"]
