"""The store shared by worker processes: two real processes write one SQLite database at once.

Each process runs its own reactor and `comatrix.store.Store` (``shared``, as a
worker opens it) and writes sessions, room handles, timelines and resume points
as fast as it can, both starting at the same instant.  None of those writes may
fail with "database is locked", and every one must be there afterwards.  A second
test shows a shared store caches nothing another process could change.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest_twisted

from support import REPO_ROOT
from comatrix.store import Store, StoredMessage, SyncPosition

WRITER = r'''
import sys, time
from twisted.internet import defer, reactor, task
from comatrix.store import Store, StoredMessage, SyncPosition

path, name, count, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])

async def write_all():
    store = Store(path, reactor, shared=True)
    await store.open()
    await task.deferLater(reactor, max(0.0, start - time.time()), lambda: None)
    for number in range(count):
        session = await store.create_session(f"{name}-{number}".encode(), "token", "@u:x", None, "127.0.0.1",
                                             time.time(), f"a:{name}")
        handle = await store.room_handle(session, f"!room{number}:x")
        await store.advance_timeline(session, handle, [StoredMessage(1, f"$e{number}", "@u:x", "hi", 1)], 1, "t1")
        await store.save_sync_position(f"{name}{number}".encode(), b"obs", SyncPosition(b"r", "s1"), time.time())
    store.close()

def main():
    done = defer.ensureDeferred(write_all())
    failures = []
    done.addErrback(failures.append)
    done.addBoth(lambda _: reactor.stop())
    reactor.run()
    if failures:
        print(failures[0].getTraceback(), file=sys.stderr)
        sys.exit(1)

main()
'''

WRITES = 150


def test_two_processes_write_the_shared_store_at_once_without_a_failure(tmp_path: Path) -> None:
    path = tmp_path / "comatrix.sqlite3"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    start = time.time() + 3.0  # both processes imported and opened by then
    writers = [subprocess.Popen([sys.executable, str(script), str(path), name, str(WRITES), str(start)],
                                env=env, stderr=subprocess.PIPE) for name in ("w0", "w1")]
    outcomes = []
    for writer in writers:
        _out, err = writer.communicate(timeout=120)
        outcomes.append((writer.returncode, err.decode(errors="replace")[-2000:]))
    assert outcomes == [(0, ""), (0, "")]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT COUNT(*) FROM compact_sessions").fetchone()[0] == 2 * WRITES
        assert db.execute("SELECT COUNT(*) FROM compact_rooms WHERE last_cursor = 1").fetchone()[0] == 2 * WRITES
        assert db.execute("SELECT COUNT(*) FROM compact_messages").fetchone()[0] == 2 * WRITES
        assert db.execute("SELECT COUNT(*) FROM sync_positions").fetchone()[0] == 2 * WRITES


@pytest_twisted.ensureDeferred
async def test_a_shared_store_sees_what_another_process_changed(tmp_path: Path) -> None:
    from twisted.internet import reactor
    path = str(tmp_path / "comatrix.sqlite3")
    mine, other = Store(path, reactor, shared=True), Store(path, reactor, shared=True)
    try:
        session = await mine.create_session(b"h", "token", "@u:x", None, "127.0.0.1", 1.0, "a:127.0.0.1")
        handle = await mine.room_handle(session, "!r:x")
        assert (await mine.session_by_handle(b"h")) is not None
        assert (await mine.room(session, handle)).last_cursor == 0  # type: ignore[union-attr]
        await other.advance_timeline(session, handle, [StoredMessage(1, "$e", "@u:x", "hi", 1)], 1, "t")
        assert (await mine.room(session, handle)).last_cursor == 1  # type: ignore[union-attr]
        await other.delete_session(session)
        assert await mine.session_by_handle(b"h") is None
        await other.save_sync_position(b"t", b"o", SyncPosition(b"r", "p"), 2.0)
        assert await mine.sync_position(b"t", b"o") == SyncPosition(b"r", "p")
    finally:
        mine.close()
        other.close()
