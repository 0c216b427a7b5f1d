"""The compact /sync loop numbers messages from a complete /sync timeline, without a /messages walk.

A room whose every message up to the /sync's ``since`` is numbered (the loop has
handled a /sync for it before) takes a non-limited timeline as all that is new:
no ``/messages`` round trip before the push, and its next_batch becomes the walk
position.  A limited timeline, or a room the loop has not caught up yet, is
walked forward as before.  Events numbered already are never numbered twice.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from twisted.internet import defer, task

from comatrix.compact.service import CompactService
from comatrix.longpoll import LongPoller
from comatrix.matrix.client import MatrixClient
from comatrix.store import RoomRecord, SessionRecord, StoredMessage
from support.scripted_sync import ScriptedSync

SESSION = SessionRecord(1, b"\x00" * 32, "syt_tok", "@d:test.local", "DEV", "::1")


def event(n: int) -> dict[str, Any]:
    return {"event_id": f"$e{n}", "type": "m.room.message", "sender": "@a:test.local",
            "origin_server_ts": 1_700_000_000_000 + n, "content": {"msgtype": "m.text", "body": f"m{n}"}}


def sync(batch: str, rooms: dict[str, tuple[list[int], bool]]) -> dict[str, Any]:
    """A /sync answer: room id -> (event numbers of its timeline, limited)."""
    return {"next_batch": batch, "rooms": {"join": {
        room: {"timeline": {"events": [event(n) for n in numbers], "limited": limited}}
        for room, (numbers, limited) in rooms.items()}}}


class MemoryStore:
    """The part of `comatrix.store.Store` the compact service's timelines use, in memory."""

    def __init__(self) -> None:
        self.records: dict[int, RoomRecord] = {}
        self.messages: dict[int, list[StoredMessage]] = {}

    def add_room(self, handle: int, room_id: str, last_cursor: int, after_token: str, known: Iterable[int]) -> None:
        self.records[handle] = RoomRecord(SESSION.id, handle, room_id, last_cursor, after_token)
        self.messages[handle] = [StoredMessage(0, f"$e{n}", "@a:test.local", f"m{n}", 0) for n in known]

    async def rooms(self, session_id: int) -> list[RoomRecord]:
        return list(self.records.values())

    async def room(self, session_id: int, handle: int) -> RoomRecord | None:
        return self.records.get(handle)

    async def known_event_ids(self, session_id: int, handle: int) -> set[str]:
        return {message.event_id for message in self.messages[handle]}

    async def advance_timeline(self, session_id: int, handle: int, messages: Iterable[StoredMessage],
                               last_cursor: int, after_token: str | None) -> None:
        self.messages[handle].extend(messages)
        self.records[handle] = dataclasses.replace(self.records[handle], last_cursor=last_cursor,
                                                   after_token=after_token)


class Walks:
    """The homeserver's /rooms/{r}/messages for the forward walk: scripted pages, recorded calls."""

    base_url = "https://hs.test.local"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []  # (room id, from)
        self.pages: dict[str, list[list[int]]] = {}

    def request(self, req: Any) -> "defer.Deferred[tuple[int, dict[str, Any]]]":
        assert req.path[-1] == "messages", req.path
        room_id = req.path[-2]
        self.calls.append((room_id, dict(req.query).get("from")))
        pages = self.pages.get(room_id) or [[]]
        numbers = pages.pop(0)
        return defer.succeed((200, {"chunk": [event(n) for n in numbers], "start": "w0",
                                    "end": f"w{len(self.calls)}"}))


def service_with(store: MemoryStore) -> tuple[CompactService, ScriptedSync, Walks, list[tuple[int, int, str]]]:
    clock = task.Clock()
    upstream, walks = ScriptedSync(clock), Walks()
    service = CompactService(MatrixClient(walks, reactor=clock), store, clock,  # type: ignore[arg-type]
                             long_polls=LongPoller(upstream, clock))  # type: ignore[arg-type]
    pushed: list[tuple[int, int, str]] = []
    service.on_message = lambda session, handle, message: pushed.append((handle, message.cursor,
                                                                         message.event_id))
    service.is_observed = lambda session: True
    return service, upstream, walks, pushed


def test_a_complete_timeline_is_numbered_without_a_walk() -> None:
    store = MemoryStore()
    store.add_room(0, "!r", last_cursor=1, after_token="t0", known=[1])
    service, upstream, walks, pushed = service_with(store)
    upstream.outcomes = [{"next_batch": "s1"}, sync("s2", {"!r": ([2, 3], False)})]
    service.watch(SESSION)
    # The first /sync walked the room once (nothing new); the second numbered 2 and 3 from /sync alone.
    assert walks.calls == [("!r", "t0")]
    assert pushed == [(0, 2, "$e2"), (0, 3, "$e3")]
    assert (store.records[0].last_cursor, store.records[0].after_token) == (3, "s2")
    assert upstream.since() == [None, "s1", "s2"]
    service.stop()


def test_a_limited_timeline_is_walked_and_nothing_is_numbered_twice() -> None:
    store = MemoryStore()
    store.add_room(0, "!r", last_cursor=1, after_token="t0", known=[1])
    service, upstream, walks, pushed = service_with(store)
    walks.pages["!r"] = [[], [2, 3, 4], []]
    upstream.outcomes = [{"next_batch": "s1"},
                         sync("s2", {"!r": ([3, 4], True)}),     # more than the timeline holds: walk
                         sync("s3", {"!r": ([4, 5], False)})]    # 4 is numbered already
    service.watch(SESSION)
    assert [call[0] for call in walks.calls] == ["!r", "!r", "!r"]  # first catch-up, then the limited one
    assert pushed == [(0, 2, "$e2"), (0, 3, "$e3"), (0, 4, "$e4"), (0, 5, "$e5")]
    assert store.records[0].after_token == "s3"
    service.stop()


def test_a_room_the_loop_has_not_caught_up_is_walked_first() -> None:
    store = MemoryStore()
    store.add_room(0, "!r", last_cursor=1, after_token="t0", known=[1])
    service, upstream, walks, pushed = service_with(store)
    upstream.outcomes = [{"next_batch": "s1"}]
    service.watch(SESSION)
    # A room joined while the loop runs: its first news may follow older messages the loop never saw.
    store.add_room(1, "!q", last_cursor=1, after_token="j0", known=[10])
    walks.pages["!q"] = [[11, 12], []]
    upstream.answer(sync("s2", {"!q": ([12], False)}))
    assert walks.calls[1:] == [("!q", "j0"), ("!q", "w2")]
    upstream.answer(sync("s3", {"!q": ([13], False)}))
    assert len(walks.calls) == 3  # caught up now: no walk
    assert pushed == [(1, 2, "$e11"), (1, 3, "$e12"), (1, 4, "$e13")]
    service.stop()


def test_nothing_new_in_a_timeline_leaves_the_walk_position() -> None:
    store = MemoryStore()
    store.add_room(0, "!r", last_cursor=2, after_token="t0", known=[1, 2])
    service, upstream, walks, pushed = service_with(store)
    upstream.outcomes = [{"next_batch": "s1"}, sync("s2", {"!r": ([2], False)})]
    service.watch(SESSION)
    # A FETCH's walk numbered 2 already and may be past s2: the position is not moved back.
    assert pushed == [] and store.records[0].after_token == "t0"
    service.stop()
