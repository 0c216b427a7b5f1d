"""Messages in the compact profile, through the real CoAP layer and the real store's SQL, against the
in-repo fake homeserver: send kinds (notice, emote, location), replies and edits by event reference,
the reference a send answers, history pages both ways with their cursors, and the refusals (bad input
4.00 with a short diagnostic, unknown references 4.04, nothing reaching the homeserver)."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from comatrix.coap import wire
from comatrix.coap.numbers import Code
from comatrix.coap.testing import Harness
from comatrix.compact import codec
from comatrix.compact.codec import BUDGETS, PATHS, HistoryEvent, HistoryPage, HistoryRequest, SendRequest
from comatrix.discovery import build_site
from comatrix.errors import error_response
from comatrix.plugins import compact
from comatrix.store import HISTORY_BASE

import support.world
from test_bad_input_profiles import CBOR, CF, site_context
from test_compact_codec import BODY20, HANDLE, _datagram, _response

PLUGINS = [compact.compact_login, compact.compact_join, compact.compact_send, compact.compact_messages,
           compact.compact_history]
DEVICE = ("2001:db8::a", 5683)


class MessagesWorld(support.world.World):
    """User ``@d`` logged in from `DEVICE`, joined to ``#lab`` (room handle 0), which alice can write to."""

    def __init__(self, earlier: int = 0) -> None:
        super().__init__()
        self.alice = self.homeserver.add_user("alice", "pw-a")
        self.homeserver.members[self.room].add(self.alice)
        for n in range(earlier):  # before the device joins: history only
            self.say(f"old {n}")
        self.harness = Harness(build_site(PLUGINS, site_context(self), error_response))
        self.handle: bytes = cbor2.loads(self.call(Code.POST, "login", ["d", "pw"]).payload)
        assert cbor2.loads(self.ok(Code.POST, "join", self.alias)) == 0
        self.seq = 0

    def say(self, body: str, msgtype: str = "m.text") -> str:
        return self.homeserver.add_event(self.room, self.alice, "m.room.message", {"msgtype": msgtype, "body": body})

    def call(self, code: int, op: str, body: Any) -> wire.Datagram:
        [reply] = self.harness.send(code, (PATHS[op],), payload=cbor2.dumps(body), peer=DEVICE,
                                    options=[(CF, bytes([CBOR]))])
        return reply

    def ok(self, code: int, op: str, *body: Any) -> bytes:
        reply = self.call(code, op, [self.handle, *body])
        assert reply.code in (Code.CREATED, Code.CHANGED, Code.CONTENT), (reply.code, reply.payload)
        return reply.payload

    def send(self, body: str, *extra: Any, seq: int | None = None) -> int:
        if seq is None:
            self.seq += 1
        return codec.decode_uint(self.ok(Code.POST, "send", 0, seq or self.seq, body, *extra))

    def history(self, *body: Any) -> HistoryPage:
        return codec.decode_history(self.ok(Code.FETCH, "history", 0, *body))

    def content(self, event_id: str) -> dict[str, Any]:
        [event] = [event for event in self.homeserver.rooms[self.room] if event["event_id"] == event_id]
        return dict(event["content"])


def last_content(world: MessagesWorld) -> dict[str, Any]:
    return dict(world.homeserver.rooms[world.room][-1]["content"])


def test_a_send_answers_its_reference_and_plain_text_is_the_old_layout() -> None:
    world = MessagesWorld()
    world.say("before")
    assert SendRequest(world.handle, 0, 1, "hi").encode() == cbor2.dumps([world.handle, 0, 1, "hi"])
    reference = world.send("21.5 C")
    assert last_content(world) == {"msgtype": "m.text", "body": "21.5 C"}
    # The walk had not numbered "before" yet: the send took the next cursor, the walk gives "before" one after it.
    message = codec.decode_message(world.ok(Code.FETCH, "messages", 0, reference - 1))
    assert message is not None and (message.body, message.cursor) == ("21.5 C", reference)
    assert world.send("21.5 C", seq=world.seq) == reference  # a retry: same event, same reference
    assert len([e for e in world.homeserver.rooms[world.room] if e["content"].get("body") == "21.5 C"]) == 1


@pytest.mark.parametrize("kind, content", [
    (1, {"msgtype": "m.notice", "body": "door open"}),
    (2, {"msgtype": "m.emote", "body": "door open"}),
    ("geo:48.2082,16.3738", {"msgtype": "m.location", "body": "door open", "geo_uri": "geo:48.2082,16.3738"}),
])
def test_send_kinds(kind: int | str, content: dict[str, Any]) -> None:
    world = MessagesWorld()
    world.send("door open", kind)
    assert last_content(world) == content


def test_a_reply_and_an_edit_refer_to_events_by_reference() -> None:
    world = MessagesWorld()
    alice_event = world.say("who is there?")
    own = world.send("21.5 C")
    page = world.history()  # the newest: numbers alice's message too
    [newest] = page.events
    assert newest.body == "who is there?" and newest.sender == "alice"
    world.send("me", 0, newest.ref)
    assert last_content(world) == {"msgtype": "m.text", "body": "me",
                                   "m.relates_to": {"m.in_reply_to": {"event_id": alice_event}}}
    own_event = world.homeserver.rooms[world.room][-2]["event_id"]
    world.send("22.0 C", 1, None, own)
    assert last_content(world) == {"msgtype": "m.notice", "body": "* 22.0 C",
                                   "m.new_content": {"msgtype": "m.notice", "body": "22.0 C"},
                                   "m.relates_to": {"rel_type": "m.replace", "event_id": own_event}}
    [edit] = world.history().events  # numbered as a walk would: with the content's "* " fallback
    assert (edit.body, edit.msgtype) == ("* 22.0 C", "m.notice")


def test_history_pages_backward_from_now_into_events_before_the_join_and_forward_again() -> None:
    world = MessagesWorld(earlier=3)  # old 0..2; the join numbers "old 2" as cursor 1
    for n in range(3):
        world.say(f"new {n}")
    page = world.history(None, -2)
    assert [(e.ref, e.body) for e in page.events] == [(3, "new 1"), (4, "new 2")] and page.next == 3
    page = world.history(page.next, -2)
    assert [(e.ref, e.body) for e in page.events] == [(1, "old 2"), (2, "new 0")] and page.next == 1
    page = world.history(page.next, -5)  # before the numbering: historic references, counted down
    assert [(e.ref, e.body) for e in page.events] == [(HISTORY_BASE - 1, "old 0"), (HISTORY_BASE, "old 1")]
    assert page.next is None  # the room's start
    again = world.history(HISTORY_BASE - 1, 2)  # forward from a historic reference
    assert [(e.ref, e.body) for e in again.events] == [(HISTORY_BASE, "old 1"), (1, "old 2")]
    assert again.next == 1
    world.send("reply to the oldest", 0, HISTORY_BASE - 1)
    assert last_content(world)["m.relates_to"]["m.in_reply_to"]["event_id"] == world.homeserver.rooms[
        world.room][2]["event_id"]


def test_history_forward_catches_up_after_missed_messages_and_says_when_it_is_done() -> None:
    world = MessagesWorld()
    world.say("seen")
    [seen] = world.history().events
    for n in range(5):
        world.say(f"missed {n}", "m.notice" if n == 4 else "m.text")
    first = world.history(seen.ref, 3)
    assert [e.body for e in first.events] == ["missed 0", "missed 1", "missed 2"] and first.next == seen.ref + 3
    rest = world.history(first.next, 3)
    assert [e.body for e in rest.events] == ["missed 3", "missed 4"] and rest.next is None
    assert rest.events[-1].msgtype == "m.notice"
    assert world.history(rest.events[-1].ref, 3) == HistoryPage(None)


def test_a_history_page_of_one_fits_the_budget() -> None:
    world = MessagesWorld()
    world.say("x" * 20)
    payload = world.ok(Code.FETCH, "history", 0)
    [event] = codec.decode_history(payload).events
    assert event == HistoryEvent(1, "alice", "x" * 20, event.ts)
    assert len(payload) <= 64 - 4 - 2 - 2 - 1  # header, token, content-format, payload marker


@pytest.mark.parametrize("op, body, diagnostic", [
    ("send", [0, 1, "hi", 3], b"kind: 0, 1, 2 or a geo: URI"),
    ("send", [0, 1, "hi", "geo:north"], b"kind: not a geo: URI"),
    ("send", [0, 1, "hi", "geo:" + "1" * 300], b"kind: not a geo: URI"),
    ("send", [0, 1, "hi", 0, 1, 1], b"a reply cannot be an edit too"),
    ("send", [0, 1, "hi", 0, -1], b"reply-to must be an unsigned integer"),
    ("send", [0, 1, "hi", 0, None, "x"], b"replaces must be an unsigned integer"),
    ("send", [0, 1, "hi", None], b"kind must be an unsigned integer"),
    ("send", [0, 1, "hi", 0, None, None, None], b"send: expected a CBOR array of 4 or 5 or 6 or 7"),
    ("history", [0, None, 1], b"a forward page needs a from reference"),
    ("history", [0, None, 0], b"count must be -20..-1 or 1..20"),
    ("history", [0, None, 21], b"count must be -20..-1 or 1..20"),
    ("history", [0, None, True], b"count must be -20..-1 or 1..20"),
    ("history", [0, "1", -1], b"from must be an unsigned integer"),
    ("history", [0, None, -1, 0], b"history: expected a CBOR array of 2 or 3 or 4"),
])
def test_bad_input_is_400_with_a_diagnostic_and_nothing_reaches_the_homeserver(
        op: str, body: list[Any], diagnostic: bytes) -> None:
    world = MessagesWorld()
    world.homeserver.requests.clear()
    method = Code.POST if op == "send" else Code.FETCH
    reply = world.call(method, op, [world.handle, *body])
    assert (reply.code, reply.payload) == (Code.BAD_REQUEST, diagnostic)
    assert world.homeserver.requests == []


@pytest.mark.parametrize("op, body", [
    ("send", [0, 1, "hi", 0, 5]), ("send", [0, 1, "hi", 0, None, 5]), ("send", [0, 1, "hi", 0, HISTORY_BASE]),
    ("history", [0, 5, -1]), ("history", [0, 5, 1]), ("history", [0, HISTORY_BASE, -1]),
])
def test_an_unknown_event_reference_is_404_before_the_homeserver_is_asked(op: str, body: list[Any]) -> None:
    world = MessagesWorld()
    world.homeserver.requests.clear()
    reply = world.call(Code.POST if op == "send" else Code.FETCH, op, [world.handle, *body])
    assert (reply.code, reply.payload) == (Code.NOT_FOUND, b"unknown event reference")
    assert world.homeserver.requests == []


# -- the examples of docs/protocol.rst ("Message kinds, replies, edits and history"), byte-exact

SEQ = 1_763_700_000
TS = 1_763_700_123
BODY20_HEX = "74 74 65 6d 70 65 72 61 74 75 72 65 3d 32 31 2e 35 43 20 6f 6b"
SEND_HEAD = "42 02 12 34 4a 7e b1 77 11 3c ff"
FETCH_HEAD = "42 05 12 34 4a 7e b1 28 11 3c ff"
H = "48 8c 1f 3a 9e 02 d4 7b 65"


def doc_examples() -> dict[str, tuple[bytes, bytes]]:
    def send(n: int, reference: int, *extra: Any) -> tuple[bytes, bytes]:
        request = SendRequest(HANDLE, 0, SEQ + n, BODY20, *extra).encode()
        return _datagram(Code.POST, PATHS["send"], request), _response(Code.CHANGED, codec.encode_uint(reference))

    def history(request: HistoryRequest, page: HistoryPage) -> tuple[bytes, bytes]:
        return (_datagram(Code.FETCH, PATHS["history"], request.encode()),
                _response(Code.CONTENT, codec.encode_history(page)))
    return {
        "send-kind notice": send(1, 8, 1),
        "send-kind location": send(2, 9, "geo:48.2082,16.3738"),
        "send-reply": send(3, 10, 0, 7),
        "send-edit": send(4, 11, 0, None, 7),
        "history newest": history(HistoryRequest(HANDLE, 0), HistoryPage(11, (HistoryEvent(11, "sensor01", BODY20, TS),))),
        "history forward": history(HistoryRequest(HANDLE, 0, 7, 1),
                                   HistoryPage(8, (HistoryEvent(8, "alice", "door open", TS, "m.notice"),))),
        "history historic": history(HistoryRequest(HANDLE, 0, 1),
                                    HistoryPage(None, (HistoryEvent(HISTORY_BASE, "alice", "hello", TS - 86400),))),
    }


def test_the_documented_examples_byte_for_byte_and_within_budget() -> None:
    examples = doc_examples()
    hexed = {name: (up.hex(" "), down.hex(" ")) for name, (up, down) in examples.items()}
    assert hexed["send-kind notice"] == (f"{SEND_HEAD} 85 {H} 00 1a 69 1f ed 21 {BODY20_HEX} 01",
                                         "62 44 12 34 4a 7e c1 3c ff 08")
    assert hexed["send-kind location"][0] == (f"{SEND_HEAD} 85 {H} 00 1a 69 1f ed 22 {BODY20_HEX} "
                                              "6f 34 38 2e 32 30 38 32 2c 31 36 2e 33 37 33 38")
    assert hexed["send-reply"][0] == f"{SEND_HEAD} 86 {H} 00 1a 69 1f ed 23 {BODY20_HEX} 00 07"
    assert hexed["send-edit"][0] == f"{SEND_HEAD} 87 {H} 00 1a 69 1f ed 24 {BODY20_HEX} 00 f6 07"
    assert hexed["history newest"] == (f"{FETCH_HEAD} 82 {H} 00", "62 45 12 34 4a 7e c1 3c ff 82 0b 84 0b "
                                       f"68 73 65 6e 73 6f 72 30 31 {BODY20_HEX} 1a 69 1f ed 9b")
    assert hexed["history forward"] == (f"{FETCH_HEAD} 84 {H} 00 07 01", "62 45 12 34 4a 7e c1 3c ff 82 08 85 08 "
                                        "65 61 6c 69 63 65 69 64 6f 6f 72 20 6f 70 65 6e 1a 69 1f ed 9b 01")
    assert hexed["history historic"] == (f"{FETCH_HEAD} 83 {H} 00 01", "62 45 12 34 4a 7e c1 3c ff 82 f6 84 "
                                         "1a ff ff ff ff 65 61 6c 69 63 65 65 68 65 6c 6c 6f 1a 69 1e 9c 1b")
    sizes = {name: (len(up), len(down)) for name, (up, down) in examples.items()}
    assert sizes == {"send-kind notice": (49, 10), "send-kind location": (64, 10), "send-reply": (50, 10),
                     "send-edit": (51, 10), "history newest": (22, 48), "history forward": (24, 35),
                     "history historic": (23, 34)}
    for name, (up, down) in sizes.items():
        request_budget, response_budget = BUDGETS[name.split()[0]]
        assert up <= request_budget and down <= response_budget, name
    for name, (up, _down) in examples.items():  # the gateway reads back what the device wrote
        payload = up[up.index(b"\xff") + 1:]
        decoded = SendRequest.decode(payload) if name.startswith("send") else HistoryRequest.decode(payload)
        assert decoded.handle == HANDLE
    assert SendRequest.decode(examples["send-kind location"][0][11:]).kind == "geo:48.2082,16.3738"


# -- any body: a valid request or a 4.xx that reaches nothing

#: CBOR values a buggy or hostile device might put in the new positions.
junk = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70), st.text(max_size=30),
                 st.binary(max_size=10), st.floats(allow_nan=True), st.lists(st.integers(), max_size=3),
                 st.sampled_from(["geo:1,2", "1.5,2.5", "geo:91.0,-181.0;u=5", 1, 2, 3, -1, -20, 20, 21, 0]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=st.sampled_from(["send", "history"]), extra=st.lists(junk, max_size=5))
def test_any_extension_is_answered_and_a_refusal_reaches_nothing(op: str, extra: list[Any]) -> None:
    world = MessagesWorld()
    world.homeserver.requests.clear()
    body = [world.handle, 0, 5, "hi", *extra] if op == "send" else [world.handle, 0, *extra]
    reply = world.call(Code.POST if op == "send" else Code.FETCH, op, body)
    assert reply.code in (Code.CHANGED, Code.CONTENT, Code.BAD_REQUEST, Code.NOT_FOUND), (body, reply.code)
    if reply.code >> 5 == 4:
        assert world.homeserver.requests == [] and 0 < len(reply.payload) <= 48
