"""Rooms and membership in the compact profile, through the real CoAP layer and the real store's SQL,
against the in-repo fake homeserver: what each operation asks of Matrix, what it answers, and its
refusals (bad input answered 4.00 before the homeserver is asked, unknown room handles 4.04)."""

from __future__ import annotations

import json
from typing import Any

import cbor2

from comatrix.coap import wire
from comatrix.coap.blockwise import Block
from comatrix.coap.numbers import Code, OptionNumber
from comatrix.coap.testing import Harness, option
from comatrix.compact import codec
from comatrix.compact.codec import PATHS, Invitation, RoomInfo
from comatrix.compact.rooms import full_user_id, short_user
from comatrix.discovery import build_site
from comatrix.errors import error_response
from comatrix.matrix.testing import ScriptedAnswer
from comatrix.plugins import compact

import support.world
from test_bad_input_profiles import CBOR, CF, OTHER_PEER, site_context

ROOM_PLUGINS = [compact.compact_login, compact.compact_join, compact.compact_create, compact.compact_room,
                compact.compact_invite, compact.compact_leave, compact.compact_kick, compact.compact_members]
DEVICE = ("2001:db8::a", 5683)
SYNC = ("_matrix", "client", "v3", "sync")


class RoomsWorld(support.world.World):
    """A compact site with the room operations; user ``@d`` logged in from `DEVICE`."""

    def __init__(self) -> None:
        super().__init__()
        self.harness = Harness(build_site(ROOM_PLUGINS, site_context(self), error_response))
        self.alice = self.homeserver.add_user("alice", "pw-a")
        self.handle: bytes = cbor2.loads(self.call(Code.POST, "login", ["d", "pw"]).payload)

    def call(self, code: int, op: str, body: Any, peer: Any = DEVICE,
             options: list[tuple[int, bytes]] | None = None) -> wire.Datagram:
        [reply] = self.harness.send(code, (PATHS[op],), payload=cbor2.dumps(body), peer=peer,
                                    options=[(CF, bytes([CBOR]))] + (options or []))
        return reply

    def ok(self, code: int, op: str, *body: Any) -> Any:
        reply = self.call(code, op, [self.handle, *body])
        assert reply.code in (Code.CREATED, Code.CHANGED, Code.CONTENT), (reply.code, reply.payload)
        return reply.payload

    def state(self, room_id: str, event_type: str, key: str = "") -> dict[str, Any]:
        return dict(self.homeserver.state_events(room_id, event_type)[key]["content"])

    def room_id(self, room_handle: int) -> str:
        return [room for room in self.homeserver.rooms if room != self.room][room_handle]


def test_create_gives_a_room_handle_with_name_topic_invitations_and_preset() -> None:
    world = RoomsWorld()
    payload = world.ok(Code.POST, "create", 0, "Greenhouse", "air and soil", ["alice", "@bob:elsewhere.org"])
    assert codec.decode_uint(payload) == 0
    [create] = world.homeserver.calls("createRoom")
    assert create.body == {"preset": "private_chat", "name": "Greenhouse", "topic": "air and soil",
                           "invite": ["@alice:test.local", "@bob:elsewhere.org"]}
    room_id = world.room_id(0)
    assert world.state(room_id, "m.room.member", "@alice:test.local") == {"membership": "invite"}
    assert codec.decode_uint(world.ok(Code.POST, "create", 1)) == 1  # public, nothing else
    assert world.homeserver.calls("createRoom")[1].body == {"preset": "public_chat"}


def test_room_info_set_name_and_topic_and_alias_resolution() -> None:
    world = RoomsWorld()
    world.ok(Code.POST, "create", 0, "Greenhouse")
    info = codec.decode_room_info(world.ok(Code.FETCH, "room", 0))
    assert info == RoomInfo("Greenhouse", None, 1, "join")
    world.ok(Code.POST, "room", 0, None, "air and soil")
    world.ok(Code.POST, "room", 0, "Greenhouse 2")
    room_id = world.room_id(0)
    assert world.state(room_id, "m.room.name") == {"name": "Greenhouse 2"}
    assert world.state(room_id, "m.room.topic") == {"topic": "air and soil"}
    assert codec.decode_room_info(world.ok(Code.FETCH, "room", 0)) == RoomInfo("Greenhouse 2", "air and soil", 1,
                                                                               "join")
    assert codec.decode_room_id(world.ok(Code.FETCH, "room", world.alias)) == world.room
    missing = world.call(Code.FETCH, "room", [world.handle, "#nowhere:test.local"])
    assert missing.code == Code.NOT_FOUND and missing.payload.startswith(b"M_NOT_FOUND")


def test_invite_members_kick_and_leave() -> None:
    world = RoomsWorld()
    world.ok(Code.POST, "create", 0)
    room_id = world.room_id(0)
    world.ok(Code.POST, "invite", 0, "alice")
    assert world.state(room_id, "m.room.member", world.alice) == {"membership": "invite"}
    world.homeserver.members[room_id].update({world.alice, "@bob:elsewhere.org"})  # they accepted
    assert codec.decode_users(world.ok(Code.FETCH, "members", 0)) == ["alice", "@bob:elsewhere.org", "d"]  # sorted by user id
    world.ok(Code.POST, "kick", 0, "alice", "left the project")
    [kick] = world.homeserver.calls("rooms", room_id, "kick")
    assert kick.body == {"user_id": world.alice, "reason": "left the project"}
    world.ok(Code.POST, "kick", 0, "@bob:elsewhere.org")
    assert world.homeserver.calls("rooms", room_id, "kick")[1].body == {"user_id": "@bob:elsewhere.org"}
    assert codec.decode_users(world.ok(Code.FETCH, "members", 0)) == ["d"]
    world.ok(Code.POST, "leave", 0)
    assert world.user_id not in world.homeserver.members[room_id]
    assert world.call(Code.FETCH, "members", [world.handle, 0]).code == Code.FORBIDDEN  # the homeserver's answer


def test_a_long_member_list_comes_block_wise_in_frames_of_the_budget() -> None:
    world = RoomsWorld()
    world.ok(Code.POST, "create", 0)
    room_id = world.room_id(0)
    world.homeserver.members[room_id].update(f"@member{n:02d}:test.local" for n in range(20))
    body, num = b"", 0
    while True:
        reply = world.call(Code.FETCH, "members", [world.handle, 0],
                           options=[(OptionNumber.BLOCK2, Block(num, False, 1).encode())])
        assert reply.code == Code.CONTENT and len(wire.encode(reply.mtype, reply.code, reply.mid, reply.token,
                                                              list(reply.options), reply.payload)) <= 64
        block = Block.decode(option(reply, OptionNumber.BLOCK2) or b"")
        body += reply.payload
        if not block.more:
            break
        num += 1
    assert num > 3 and codec.decode_users(body) == ["d"] + [f"member{n:02d}" for n in range(20)]
    assert len(world.homeserver.calls("rooms", room_id, "joined_members")) == 1  # later blocks: the kept answer


def test_pending_invitations_get_room_handles_accept_joins_and_decline_leaves() -> None:
    world = RoomsWorld()
    first, second = world.homeserver.new_room(world.alice), world.homeserver.new_room(world.alice)
    invite_state = {
        first: [{"type": "m.room.name", "state_key": "", "sender": world.alice, "content": {"name": "Greenhouse"}},
                {"type": "m.room.member", "state_key": world.user_id, "sender": world.alice,
                 "content": {"membership": "invite"}}],
        second: [{"type": "m.room.member", "state_key": world.user_id, "sender": "@eve:elsewhere.org",
                  "content": {"membership": "invite"}}],
    }
    sync = {"next_batch": "s1", "rooms": {"invite": {room: {"invite_state": {"events": events}}
                                                    for room, events in invite_state.items()}}}
    world.homeserver.script("GET", SYNC, ScriptedAnswer(200, json.dumps(sync).encode()))
    invitations = codec.decode_invitations(world.ok(Code.FETCH, "invite"))
    by_room = dict(zip(sorted(invite_state), invitations))
    assert by_room[first] == Invitation(by_room[first].room, "alice", "Greenhouse")
    assert by_room[second] == Invitation(by_room[second].room, "@eve:elsewhere.org", None)
    assert sorted(invitation.room for invitation in invitations) == [0, 1]
    [asked] = world.homeserver.calls("sync")
    assert json.loads(asked.query["filter"][0])["room"]["timeline"] == {"limit": 0}

    accepted = codec.decode_uint(world.ok(Code.POST, "join", by_room[first].room))
    assert accepted == by_room[first].room and world.user_id in world.homeserver.members[first]
    world.ok(Code.POST, "leave", by_room[second].room)  # declines
    assert world.homeserver.calls("rooms", second, "leave")


def test_bad_input_never_reaches_the_homeserver() -> None:
    world = RoomsWorld()
    world.ok(Code.POST, "create", 0)
    asked = len(world.homeserver.requests)
    for op, body in (("invite", [world.handle, 0, "no spaces"]), ("kick", [world.handle, 0, "@nocolon"]),
                     ("create", [world.handle, 0, None, None, ["a b"]]), ("room", [world.handle, "lab"]),
                     ("room", [world.handle, "#nocolon"]),
                     ("room", [world.handle, 0, None]), ("members", [world.handle, "x"])):
        code = Code.FETCH if body[1:] in (["lab"], ["x"], ["#nocolon"]) else Code.POST
        reply = world.call(code, op, body)
        assert reply.code == Code.BAD_REQUEST and 0 < len(reply.payload) <= 48, (op, reply)
    assert world.call(Code.POST, "leave", [world.handle, 5]).code == Code.NOT_FOUND
    assert world.call(Code.POST, "invite", [world.handle, 0, "alice"], peer=OTHER_PEER).code == Code.FORBIDDEN
    assert world.call(Code.POST, "kick", [bytes(8), 0, "alice"]).code == Code.UNAUTHORIZED
    assert len(world.homeserver.requests) == asked


def test_short_user_references() -> None:
    own = "@sensor01:example.org"
    assert full_user_id("alice", own) == "@alice:example.org"
    assert full_user_id("@bob:matrix.org", own) == "@bob:matrix.org"
    assert short_user("@alice:example.org", own) == "alice" and short_user("@bob:matrix.org", own) == "@bob:matrix.org"
