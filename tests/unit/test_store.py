"""`comatrix.store.Store` on a real SQLite file and in memory (adbapi thread, real reactor)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import defer

from comatrix.store import DB_FILENAME, Store, StoredMessage, SyncPosition


def _hash(n: int) -> bytes:
    return hashlib.sha256(bytes([n])).digest()


def _message(cursor: int) -> StoredMessage:
    return StoredMessage(cursor, f"$event{cursor}", "@a:example.org", f"body {cursor}", 1_700_000_000_000 + cursor)


@pytest_twisted.ensureDeferred
async def test_sessions_rooms_and_timelines_persist_in_a_0600_file(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    store = Store.for_state_dir(str(state_dir))
    try:
        path = state_dir / DB_FILENAME
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o700
        first = await store.create_session(_hash(1), "syt_secret_token", "@a:example.org", "DEV", "::1", 1.0)
        second = await store.create_session(_hash(2), "syt_other", "@b:example.org", None, "10.0.0.2", 2.0)
        assert first != second
        assert await store.room_handle(first, "!r1") == 0
        assert await store.room_handle(first, "!r2") == 1
        assert await store.room_handle(first, "!r1") == 0  # stable
        assert await store.room_handle(second, "!r2") == 0  # per session
        await store.advance_timeline(first, 1, [_message(1), _message(2)], 2, "s100")
    finally:
        store.close()

    reopened = Store.for_state_dir(str(state_dir))
    try:
        record = await reopened.session_by_handle(_hash(1))
        assert record is not None and (record.id, record.user_id, record.device_id, record.peer_host) == (
            first, "@a:example.org", "DEV", "::1")
        assert record.access_token == "syt_secret_token" and "syt_secret" not in repr(record)
        room = await reopened.room(first, 1)
        assert room is not None and (room.room_id, room.last_cursor, room.after_token) == ("!r2", 2, "s100")
        assert await reopened.message_at_or_after(first, 1, 2) == _message(2)
        assert await reopened.latest_message(first, 1) == _message(2)
        assert await reopened.known_event_ids(first, 1) == {"$event1", "$event2"}
        assert [r.handle for r in await reopened.rooms(first)] == [0, 1]

        await reopened.delete_session(first)
        assert await reopened.session_by_handle(_hash(1)) is None
        assert await reopened.room(first, 1) is None and await reopened.latest_message(first, 1) is None
        assert await reopened.session_count() == 1
    finally:
        reopened.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest_twisted.ensureDeferred
async def test_the_message_window_is_bounded_and_gaps_are_visible() -> None:
    store = Store.for_state_dir(None)  # in memory
    try:
        session = await store.create_session(_hash(3), "tok", "@c:example.org", None, "::1", 0.0)
        handle = await store.room_handle(session, "!room")
        for cursor in range(1, 11):
            await store.advance_timeline(session, handle, [_message(cursor)], cursor, f"t{cursor}", keep=4)
        # Only cursors 7..10 are kept; asking for 3 gives 7: the device sees it lost 3..6.
        kept = await store.message_at_or_after(session, handle, 3)
        assert kept is not None and kept.cursor == 7
        assert await store.message_at_or_after(session, handle, 11) is None
        assert await store.room(session, 99) is None
        assert await store.session_by_handle(_hash(4)) is None
    finally:
        store.close()


class _CountingQueries:
    """Wraps the store's pool: counts the SELECTs that reach SQLite."""

    def __init__(self, store: Store) -> None:
        self.count = 0
        self._run_query = store._pool.runQuery
        store._pool.runQuery = self  # type: ignore[method-assign]

    def __call__(self, *args: object, **kwargs: object) -> object:
        self.count += 1
        return self._run_query(*args, **kwargs)


@pytest_twisted.ensureDeferred
async def test_session_and_room_reads_are_cached_and_writes_are_seen() -> None:
    store = Store()
    try:
        session = await store.create_session(_hash(1), "syt_token", "@a:example.org", "DEV", "::1", 1.0)
        handle = await store.room_handle(session, "!r1")
        queries = _CountingQueries(store)
        for _ in range(3):
            record = await store.session_by_handle(_hash(1))
            assert record is not None and record.id == session
            room = await store.room(session, handle)
            assert room is not None and room.last_cursor == 0
        assert queries.count == 2  # one per record; the repeats came from the cache

        await store.advance_timeline(session, handle, [_message(1)], 1, "s1")
        room = await store.room(session, handle)
        assert room is not None and (room.last_cursor, room.after_token) == (1, "s1")

        await store.delete_session(session)
        assert await store.session_by_handle(_hash(1)) is None
        assert await store.room(session, handle) is None
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_a_read_overlapping_a_write_is_not_cached() -> None:
    store = Store()
    try:
        session = await store.create_session(_hash(1), "syt_token", "@a:example.org", "DEV", "::1", 1.0)
        handle = await store.room_handle(session, "!r1")
        # Both run in the store's one thread, in this order: the read sees the old row.
        reading = defer.ensureDeferred(store.room(session, handle))
        writing = defer.ensureDeferred(store.advance_timeline(session, handle, [_message(1)], 1, "s1"))
        stale = await reading
        await writing
        assert stale is not None and stale.last_cursor in (0, 1)
        room = await store.room(session, handle)
        assert room is not None and room.last_cursor == 1

        looking_up = defer.ensureDeferred(store.session_by_handle(_hash(1)))
        deleting = defer.ensureDeferred(store.delete_session(session))
        await looking_up
        await deleting
        assert await store.session_by_handle(_hash(1)) is None
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_no_statement_runs_on_the_reactor_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every SQL statement the store executes is traced with the thread it ran on.
    import threading

    from comatrix import store as store_module

    threads: set[int] = set()
    open_connection = store_module._open_connection

    def traced(connection: Any) -> None:
        connection.set_trace_callback(lambda _statement: threads.add(threading.get_ident()))
        open_connection(connection)

    monkeypatch.setattr(store_module, "_open_connection", traced)
    store = Store.for_state_dir(str(tmp_path))
    try:
        session = await store.create_session(_hash(9), "syt_thread_check", "@t:example.org", None, "::1", 1.0)
        handle = await store.room_handle(session, "!r")
        await store.advance_timeline(session, handle, [_message(1)], 1, "s1")
        await store.save_sync_position(_hash(8), b"obs", SyncPosition(b"registration", "s1"), 1.0)
        assert await store.sync_position(_hash(8), b"obs") is not None
        assert await store.message_at_or_after(session, handle, 1) == _message(1)
        await store.delete_session(session)
    finally:
        store.close()
    assert threads, "no statement was traced"
    assert threading.get_ident() not in threads  # the reactor (this test's) thread ran none


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.for_state_dir(str(tmp_path))
    try:
        yield opened
    finally:
        opened.close()


@pytest_twisted.ensureDeferred
async def test_device_tokens_are_kept_replaced_and_forgotten_only_when_still_current(store: Store) -> None:
    assert await store.device_token("@s:hs", "COMATRIX1") is None
    await store.save_device_token("@s:hs", "COMATRIX1", "syt_first_token", 1.0)
    await store.save_device_token("@s:hs", "COMATRIX2", "syt_other_device", 1.0)
    assert await store.device_token("@s:hs", "COMATRIX1") == "syt_first_token"
    await store.save_device_token("@s:hs", "COMATRIX1", "syt_second_token", 2.0)
    await store.forget_device_token("@s:hs", "COMATRIX1", "syt_first_token")  # stale: nothing happens
    assert await store.device_token("@s:hs", "COMATRIX1") == "syt_second_token"
    await store.forget_device_token("@s:hs", "COMATRIX1", "syt_second_token")
    assert await store.device_token("@s:hs", "COMATRIX1") is None
    assert await store.device_token("@s:hs", "COMATRIX2") == "syt_other_device"


@pytest_twisted.ensureDeferred
async def test_tokens_of_logins_no_longer_configured_are_dropped(store: Store) -> None:
    await store.save_device_token("@s:hs", "KEPT", "syt_still_configured", 1.0)
    await store.save_device_token("@s:hs", "GONE", "syt_entry_removed", 1.0)
    assert await store.keep_device_tokens_of([("@s:hs", "KEPT"), ("@t:hs", "NEVER")]) == 1
    assert await store.device_token("@s:hs", "KEPT") == "syt_still_configured"
    assert await store.device_token("@s:hs", "GONE") is None


def _open_files_under(directory: Path) -> list[str]:
    """The files of ``directory`` this process holds open (from /proc/self/fd)."""
    names = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor)
        if target.startswith(str(directory) + os.sep):
            names.append(os.path.basename(target))
    return sorted(names)


@pytest_twisted.ensureDeferred
async def test_the_connection_is_opened_at_start_and_no_write_opens_a_file(tmp_path: Path) -> None:
    # SQLite must not need a descriptor per call: once open, the store keeps the database and
    # its WAL open, so a process at its open-file limit still reads and writes its state.
    state_dir = tmp_path / "state"
    store = Store.for_state_dir(str(state_dir))
    try:
        assert _open_files_under(state_dir) == []
        await store.open()
        kept = _open_files_under(state_dir)
        assert DB_FILENAME in kept and DB_FILENAME + "-wal" in kept
        for n in range(20):
            session = await store.create_session(_hash(n), f"syt_{n}", "@a:example.org", None, "::1", float(n))
            await store.room_handle(session, "!r")
            await store.advance_timeline(session, 0, [_message(1)], 1, "s1")
            assert _open_files_under(state_dir) == kept
        assert stat.S_IMODE(os.stat(state_dir / (DB_FILENAME + "-wal")).st_mode) == 0o600
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_writes_go_on_when_the_process_has_no_descriptor_left(tmp_path: Path) -> None:
    import resource

    store = Store.for_state_dir(str(tmp_path / "state"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    try:
        await store.open()
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
        while True:  # take every free descriptor number below the limit
            try:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        session = await store.create_session(_hash(7), "syt_full", "@a:example.org", None, "::1", 1.0)
        await store.advance_timeline(session, await store.room_handle(session, "!r"), [_message(1)], 1, "s1")
        assert await store.latest_message(session, 0) == _message(1)
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        store.close()
