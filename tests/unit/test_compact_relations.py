"""Reactions, redactions, read receipts and allowed senders in the compact profile, through the real
CoAP layer and the real store's SQL, against the in-repo fake homeserver: what each operation asks
of Matrix, that each may be repeated, its refusals (bad input 4.00 and unknown references 4.04,
nothing asked of the homeserver), and whose messages a device's reads number at all."""

from __future__ import annotations

import dataclasses
from typing import Any

import cbor2

from comatrix.coap import wire
from comatrix.coap.numbers import Code
from comatrix.coap.testing import DEFAULT_PEER, Harness
from comatrix.compact import codec
from comatrix.compact.codec import PATHS
from comatrix.config import ConfigError, build_config
from comatrix.discovery import build_site
from comatrix.errors import error_response
from comatrix.interfaces import PluginContext
from comatrix.matrix.testing import run
from comatrix.plugins import compact, rooms

import pytest
import support.world
from test_appservice_compact import SENSOR, AppserviceWorld, pushed
from test_bad_input_profiles import CBOR, CF, site_context

PLUGINS = [compact.compact_login, compact.compact_join, compact.compact_messages, compact.compact_react,
           compact.compact_redact, compact.compact_read]
DEVICE = ("2001:db8::a", 5683)


class RelationsWorld(support.world.World):
    """A compact site with react/redact/read; ``@d`` logged in from `DEVICE` and joined to ``#lab``.

    ``devices``: the gateway's ``[[devices]]`` entries (allowed_senders); a ``rooms`` key "lab" stands
    for the id of ``#lab``."""

    def __init__(self, devices: list[dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.devices = [{**entry, "rooms": {self.room if room == "lab" else room: table
                                            for room, table in entry.get("rooms", {}).items()}}
                        for entry in devices or []]
        self.alice = self.homeserver.add_user("alice", "pw-a")
        self.homeserver.members[self.room].add(self.alice)
        self.harness = Harness(build_site(PLUGINS, site_context(self), error_response))
        self.handle: bytes = cbor2.loads(self.call(Code.POST, "login", ["d", "pw"]).payload)
        self.room_handle = codec.decode_uint(self.ok(Code.POST, "join", self.alias))

    def context(self, devices: list[dict[str, Any]] | None = None, *,
                allow_registration: bool = False) -> PluginContext:
        return super().context(devices or self.devices, allow_registration=allow_registration)

    def call(self, code: int, op: str, body: Any) -> wire.Datagram:
        [reply] = self.harness.send(code, (PATHS[op],), payload=cbor2.dumps(body), peer=DEVICE,
                                    options=[(CF, bytes([CBOR]))])
        return reply

    def ok(self, code: int, op: str, *body: Any) -> bytes:
        reply = self.call(code, op, [self.handle, *body])
        assert reply.code in (Code.CHANGED, Code.CONTENT), (reply.code, reply.payload)
        return reply.payload

    def say(self, sender: str, body: str) -> str:
        return self.homeserver.add_event(self.room, sender, "m.room.message", {"msgtype": "m.text", "body": body})

    def messages(self) -> list[codec.Message]:
        """Every message numbered for the device since its join, by FETCH /v since a cursor."""
        found: list[codec.Message] = []
        while True:
            cursor = found[-1].cursor if found else 0
            message = codec.decode_message(self.ok(Code.FETCH, "messages", self.room_handle, cursor))
            if message is None:
                return found
            found.append(message)

    def events(self, event_type: str) -> list[dict[str, Any]]:
        return [event for event in self.homeserver.rooms[self.room] if event["type"] == event_type]


def test_a_reaction_is_added_once_and_removed_once() -> None:
    world = RelationsWorld()
    target = world.say(world.alice, "door open")
    [message] = world.messages()
    for _ in range(2):  # a repeated request (its answer was lost) adds nothing
        world.ok(Code.POST, "react", world.room_handle, message.cursor, "👍")
    [reaction] = world.events("m.reaction")
    assert reaction["sender"] == world.user_id
    assert reaction["content"] == {"m.relates_to": {"rel_type": "m.annotation", "event_id": target, "key": "👍"}}
    world.ok(Code.POST, "react", world.room_handle, message.cursor, "👀")  # another key is another reaction
    for _ in range(2):
        world.ok(Code.POST, "react", world.room_handle, message.cursor, "👍", 1)
    [redaction] = world.events("m.room.redaction")
    assert redaction["redacts"] == reaction["event_id"]
    assert [event["content"]["m.relates_to"]["key"] for event in world.events("m.reaction") if event["content"]] == ["👀"]
    world.ok(Code.POST, "react", world.room_handle, message.cursor, "👍")  # added again after its removal
    assert len(world.events("m.reaction")) == 3


def test_a_redaction_carries_its_reason_and_a_repeat_is_the_same_redaction() -> None:
    world = RelationsWorld()
    target = world.say(world.user_id, "wrong value")
    [message] = world.messages()
    world.ok(Code.POST, "redact", world.room_handle, message.cursor, "sensor fault")
    world.ok(Code.POST, "redact", world.room_handle, message.cursor, "sensor fault")
    [redaction] = world.events("m.room.redaction")
    assert redaction["redacts"] == target and redaction["content"] == {"reason": "sensor fault"}
    [put] = {call.path for call in world.homeserver.calls("rooms", world.room, "redact")}
    assert put[-2] == target
    other = world.say(world.alice, "spam")
    world.ok(Code.POST, "redact", world.room_handle, world.messages()[-1].cursor)  # no reason
    assert world.events("m.room.redaction")[-1]["content"] == {} and world.events("m.room.redaction")[-1]["redacts"] == other


def test_a_read_receipt_names_the_referenced_event() -> None:
    world = RelationsWorld()
    first = world.say(world.alice, "one")
    world.say(world.alice, "two")
    messages = world.messages()
    world.ok(Code.POST, "read", world.room_handle, messages[0].cursor)
    assert world.homeserver.receipts[(world.room, world.user_id)] == ("m.read", first)


def test_bad_input_and_unknown_references_never_reach_the_homeserver() -> None:
    world = RelationsWorld()
    world.say(world.alice, "one")
    [message] = world.messages()
    world.homeserver.requests.clear()
    handle, room, ref = world.handle, world.room_handle, message.cursor
    for op, body in (("react", [handle, room, ref, ""]), ("react", [handle, room, ref, "x" * 65]),
                     ("react", [handle, room, ref, "👍", 2]), ("react", [handle, room, ref]),
                     ("react", [handle, room, -1, "👍"]), ("redact", [handle, room, ref, 7]),
                     ("redact", [handle, room]), ("read", [handle, room, ref, "why"]),
                     ("read", [handle, room, "1"]), ("read", [handle, room, ref, None, None])):
        reply = world.call(Code.POST, op, body)
        assert reply.code == Code.BAD_REQUEST and 0 < len(reply.payload) <= 48, (op, reply)
    for op, body in (("react", [handle, room, ref + 1, "👍"]), ("redact", [handle, room, 2**64 - 1]),
                     ("read", [handle, room, 0]), ("read", [handle, room + 5, ref])):
        reply = world.call(Code.POST, op, body)
        assert reply.code == Code.NOT_FOUND, (op, reply)
    assert world.call(Code.POST, "read", [handle, room, ref + 1]).payload == b"unknown event reference"
    assert world.homeserver.requests == []


def senders(world: RelationsWorld, *users: str) -> list[str]:
    """Each of ``users`` says something; the senders of what the device's reads number."""
    for user in users:
        world.say(user, f"from {user}")
    return [message.sender for message in world.messages()]


def test_by_default_messages_of_the_users_own_server_and_its_own_reach_a_device() -> None:
    world = RelationsWorld()
    assert senders(world, "@eve:elsewhere.org", world.alice, world.user_id, "@bob:test.local.evil") == [
        world.alice, world.user_id]


def test_allowed_senders_of_the_devices_entry_filter_what_is_numbered() -> None:
    entry = {"address": DEVICE[0], "user": "d", "password": "pw", "allowed_senders": ["@eve:elsewhere.org"],
             "rooms": {"!other:test.local": {"allowed_senders": ["*"]}}}
    world = RelationsWorld([entry])
    got = senders(world, "@eve:elsewhere.org", world.alice, "@mallory:elsewhere.org", world.user_id)
    assert got == ["@eve:elsewhere.org", world.user_id]
    assert [message.cursor for message in world.messages()] == [1, 2]  # filtered ones get no number


def test_a_room_of_the_entry_has_its_own_allowed_senders() -> None:
    entry = {"address": DEVICE[0], "user": "d", "password": "pw", "allowed_senders": [],
             "rooms": {"lab": {"allowed_senders": ["*:elsewhere.org"]}}}
    world = RelationsWorld([entry])
    assert senders(world, "@eve:elsewhere.org", world.alice) == ["@eve:elsewhere.org"]


def test_allowed_senders_are_validated() -> None:
    base = {"address": "2001:db8::a", "user": "d", "password": "pw"}
    for bad in ({"allowed_senders": "@a:b"}, {"allowed_senders": ["alice"]}, {"allowed_senders": ["*:"]},
                {"rooms": {"#lab:test.local": {"allowed_senders": []}}},
                {"rooms": {"!r:test.local": {"allowed_senders": [], "other": 1}}},
                {"rooms": {"!r:test.local": ["@a:b"]}}, {"rooms": []}):
        with pytest.raises(ConfigError, match="allowed_senders|rooms"):
            build_config({"devices": [{**base, **bad}]})
    [device] = build_config({"devices": [{**base, "allowed_senders": ["*:example.org", "@a:b.org"],
                                          "rooms": {"!r:b.org": {"allowed_senders": ["*"]}}}]}).devices
    assert device.senders_in("!r:b.org") == ("*",) and device.senders_in("!s:b.org") == ("*:example.org", "@a:b.org")


def test_transaction_fed_watches_push_allowed_senders_only_and_follow_a_reload() -> None:
    world = AppserviceWorld()
    handle = world.login()
    room_handle = world.joined(handle)
    world.message("first")
    registered = codec.decode_message(world.send("v", [handle, room_handle], observe=True).payload)
    world.harness.replies()
    sensor = world.credentials.entry_for_binding(DEFAULT_PEER[0])  # what the session is bound to
    assert sensor is not None and sensor.user == SENSOR
    alice = world.homeserver.add_user("alice", "pw-a")
    # As a SIGHUP reload does: the next numbering follows the new entries.
    world.credentials.replace_devices([dataclasses.replace(entry, allowed_senders=(alice,)) if entry is sensor
                                       else entry for entry in world.entries])

    def said(sender: str, body: str) -> dict[str, Any]:
        event_id = world.homeserver.add_event(world.room, sender, "m.room.message", {"msgtype": "m.text", "body": body})
        return next(event for event in world.homeserver.rooms[world.room] if event["event_id"] == event_id)
    events = [said(world.user_id, "same server"), said(alice, "allowed"), said("@eve:elsewhere.org", "stranger")]
    assert run(world.stream.transaction("t1", events))
    assert registered is not None and pushed(world.harness.replies()) == [("allowed", registered.cursor + 1)]


@pytest.mark.parametrize("allowed, latest", [(None, "@alice:test.local"), (["@eve:elsewhere.org"], "@eve:elsewhere.org")])
def test_the_clean_getmsg_of_a_device_acting_through_its_entry_follows_allowed_senders(
        allowed: list[str] | None, latest: str) -> None:
    world = support.world.World()
    entry: dict[str, Any] = {"address": DEVICE[0], "user": world.user_id, "password": "pw"}
    if allowed is not None:
        entry["allowed_senders"] = allowed
    harness = Harness(build_site([rooms.getmsg], world.context([entry]), error_response))
    for sender in ("@eve:elsewhere.org", "@alice:test.local", "@mallory:elsewhere.org"):
        world.homeserver.add_event(world.room, sender, "m.room.message", {"msgtype": "m.text", "body": sender})

    def getmsg(options: list[tuple[int, bytes]] = []) -> Any:
        [reply] = harness.send(Code.GET, ("getmsg",), query=[f"room={world.alias}"], peer=DEVICE, options=options)
        assert reply.code == Code.CONTENT, reply
        return cbor2.loads(reply.payload)["sender"]
    assert getmsg() == latest
    assert getmsg([(256, world.token.encode())]) == "@mallory:elsewhere.org"  # its own token: not the entry's device
