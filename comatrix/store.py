"""Persistent gateway state in SQLite: compact sessions, room handles, message cursors, /sync resume points.

The database lives at ``<state_dir>/comatrix.sqlite3`` (created 0600 in a 0700
directory, because it holds Matrix access tokens); without a state directory it
is in memory and dies with the process.  All SQL runs in the one thread of a
``twisted.enterprise.adbapi`` pool (``cp_max=1``, so SQLite never sees two
writers), never on the reactor thread; every method returns a Deferred or is a
coroutine.

The store never opens a file per call: its one connection is opened at start
(`Store.open`) and kept for the process's life, in WAL mode (the ``-wal`` and
``-shm`` files are opened once, with the connection, where the default rollback
journal would open a file per write transaction) with temporary tables in
memory.  So a gateway whose homeserver connections reach the open-file limit
still reads and writes its state (the limit's headroom for SQLite:
`comatrix.longpoll.FD_RESERVE`).

What is kept, per compact session (see ``docs/protocol.rst``):

* the session: SHA-256 of its handle (the handle itself is never stored), the
  Matrix access token, user id, device id, the address it is bound to, the
  gateway's key of the device that opened it (its per-device share) and when
  it was last used (idle expiry; written coarsely, see `CompactService`);
* room handles: small integers, assigned in join order, per session;
* per room handle, the message timeline position: the last cursor number the
  gateway assigned and the Matrix pagination token just after that message;
* the last `MESSAGES_KEPT` numbered messages of each room handle (sender, body,
  time, msgtype), so "messages since cursor N" is answered without losing any;
* per room handle, up to `HISTORY_KEPT` events a history page fetched that have no
  cursor (older than the numbering), with *historic references* counted down from
  `HISTORY_BASE` (the most recently referenced are kept).

Sessions and room records are also kept in a small in-memory read cache, so a
device's send costs no database round trip once its session is known.  The
store is the database's only writer, so the cache is written through: a
write drops the records it changes, and a read that overlapped a write is
not cached (``_generation``).

With ``workers`` > 1 every worker process opens the same database (``shared``):
WAL lets readers go on while one process writes, a write waits up to
`BUSY_TIMEOUT` for another process's write transaction instead of failing, and
nothing is cached, since another process may change any record.  One database
rather than one per worker, because a device whose source port changes may
reach another worker and must find its compact session there.

Per MSC3079 ``/sync`` observation (`comatrix.msc3079.resume`): the resume
point, i.e. the ``next_batch`` of the last batch the client acknowledged, keyed
by SHA-256 of the access token (never the token) and the CoAP token of the
registration; at most `SYNC_POSITIONS_KEPT`, the least recently advanced go first.

Per ``[[devices]]`` entry the gateway logs in for (`comatrix.credentials`): the
access token of that login, keyed by user and Matrix device id, so a restart
reuses it instead of logging in again (a homeserver may keep every token of a
re-used device id valid, and each login counts against its login rate limit).

In application-service mode (`comatrix.appservice`): the id of the last
transaction handled (a retried one is answered without being handled again)
and the ids of the last `EVENTS_REMEMBERED` events pushed, so an event in two
transactions (before and after a restart) reaches nobody twice.

Webhooks of the internal HTTP API (`comatrix.webhooks`): the subscriptions
(service, room, URL, event types), the delivery queue (one row per
subscription and event, with the exact body to POST and the attempts made so
far; a row goes when the receiver took it, so a delivery pending at a stop is
made after the start), the dead letters (deliveries given up, the newest
`DEAD_LETTERS_KEPT` per service), and per service the /sync position of its
event loop in token mode.  The caps are checked in the transaction that writes.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import sqlite3
from typing import Any, Iterable, Sequence

from twisted.enterprise import adbapi
from twisted.internet import defer

from comatrix.logs import get_logger

log = get_logger(__name__)

__all__ = ["DB_FILENAME", "DEAD_LETTERS_KEPT", "HISTORY_BASE", "HISTORY_KEPT", "MESSAGES_KEPT", "RECORDS_CACHED", "SYNC_POSITIONS_KEPT", "DeadLetter",
           "PendingDelivery", "RoomRecord", "SessionRecord", "SessionUsage", "Store", "StoredMessage", "SyncPosition",
           "WebhookSubscription"]

DB_FILENAME = "comatrix.sqlite3"
#: Numbered messages kept per (session, room handle); older cursors fall out of the window.
MESSAGES_KEPT = 64
#: Events with a historic reference kept per (session, room handle); the first referenced go first.
HISTORY_KEPT = 256
#: Historic references count down from here: 2**32 - 1 (5 bytes of CBOR), far above any cursor.
HISTORY_BASE = 2**32 - 1
#: /sync resume points kept (one per observation: access token x CoAP token).
SYNC_POSITIONS_KEPT = 4096
#: Event ids of application-service transactions remembered (to drop an event pushed twice).
EVENTS_REMEMBERED = 20000
#: Webhook dead letters kept per service (the oldest go first).
DEAD_LETTERS_KEPT = 256
#: Session and room records kept in the read cache (each), least recently used go first.
RECORDS_CACHED = 4096
#: Seconds a write waits for another process's write transaction (``workers`` > 1) before it fails.
BUSY_TIMEOUT = 10.0

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS compact_sessions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        handle_hash BLOB NOT NULL UNIQUE,
        access_token TEXT NOT NULL,
        user_id TEXT NOT NULL,
        device_id TEXT,
        peer_host TEXT NOT NULL,
        created REAL NOT NULL,
        device_key TEXT,
        last_used REAL)""",
    """CREATE TABLE IF NOT EXISTS compact_rooms (
        session_id INTEGER NOT NULL,
        handle INTEGER NOT NULL,
        room_id TEXT NOT NULL,
        last_cursor INTEGER NOT NULL DEFAULT 0,
        after_token TEXT,
        PRIMARY KEY (session_id, handle),
        UNIQUE (session_id, room_id))""",
    """CREATE TABLE IF NOT EXISTS compact_messages (
        session_id INTEGER NOT NULL,
        room_handle INTEGER NOT NULL,
        cursor INTEGER NOT NULL,
        event_id TEXT NOT NULL,
        sender TEXT NOT NULL,
        body TEXT NOT NULL,
        ts INTEGER NOT NULL,
        PRIMARY KEY (session_id, room_handle, cursor))""",
    """CREATE TABLE IF NOT EXISTS compact_history (
        session_id INTEGER NOT NULL,
        room_handle INTEGER NOT NULL,
        ref INTEGER NOT NULL,
        event_id TEXT NOT NULL,
        sender TEXT NOT NULL,
        body TEXT NOT NULL,
        ts INTEGER NOT NULL,
        msgtype TEXT,
        PRIMARY KEY (session_id, room_handle, ref),
        UNIQUE (session_id, room_handle, event_id))""",
    """CREATE TABLE IF NOT EXISTS sync_positions (
        token_hash BLOB NOT NULL,
        observer BLOB NOT NULL,
        registration BLOB NOT NULL,
        position TEXT NOT NULL,
        updated REAL NOT NULL,
        PRIMARY KEY (token_hash, observer))""",
    """CREATE TABLE IF NOT EXISTS appservice_transactions (
        slot INTEGER PRIMARY KEY CHECK (slot = 0),
        txn_id TEXT NOT NULL,
        updated REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS appservice_events (
        event_id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS appservice_events_seq ON appservice_events (seq)""",
    """CREATE TABLE IF NOT EXISTS device_tokens (
        user_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        access_token TEXT NOT NULL,
        updated REAL NOT NULL,
        PRIMARY KEY (user_id, device_id))""",
    """CREATE TABLE IF NOT EXISTS webhook_subscriptions (
        id TEXT PRIMARY KEY,
        service TEXT NOT NULL,
        room_id TEXT NOT NULL,
        url TEXT NOT NULL,
        event_types TEXT NOT NULL,
        created REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS webhook_deliveries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        subscription_id TEXT NOT NULL,
        service TEXT NOT NULL,
        event_id TEXT NOT NULL,
        body BLOB NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL,
        UNIQUE (subscription_id, event_id))""",
    """CREATE TABLE IF NOT EXISTS webhook_dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        subscription_id TEXT NOT NULL,
        service TEXT NOT NULL,
        event_id TEXT NOT NULL,
        body BLOB NOT NULL,
        attempts INTEGER NOT NULL,
        reason TEXT NOT NULL,
        failed REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS webhook_sync_positions (
        service TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        position TEXT NOT NULL,
        updated REAL NOT NULL)""",
)


@dataclasses.dataclass(frozen=True)
class SessionRecord:
    id: int
    handle_hash: bytes = dataclasses.field(repr=False)
    access_token: str = dataclasses.field(repr=False)
    user_id: str
    device_id: str | None
    peer_host: str


@dataclasses.dataclass(frozen=True)
class SessionUsage:
    """Sessions held by one device and by all, each with its oldest last use (None: no session)."""

    device: int
    device_oldest: float | None
    total: int
    total_oldest: float | None


@dataclasses.dataclass(frozen=True)
class RoomRecord:
    session_id: int
    handle: int
    room_id: str
    last_cursor: int
    after_token: str | None


@dataclasses.dataclass(frozen=True)
class StoredMessage:
    cursor: int
    event_id: str
    sender: str
    body: str
    ts: int  # origin_server_ts, milliseconds
    msgtype: str = "m.text"


@dataclasses.dataclass(frozen=True)
class SyncPosition:
    """Where an observation got to: the registration it belongs to and the next ``since``."""

    registration: bytes  # a fingerprint of the registration request, see comatrix.msc3079.resume
    position: str


@dataclasses.dataclass(frozen=True)
class WebhookSubscription:
    id: str
    service: str
    room_id: str
    url: str
    event_types: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class PendingDelivery:
    """A queued webhook delivery: ``body`` is exactly what is POSTed (and signed)."""

    id: int
    subscription_id: str
    service: str
    event_id: str
    body: bytes = dataclasses.field(repr=False)
    attempts: int


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """A webhook delivery given up after ``attempts`` attempts (0: never tried, e.g. the queue was full)."""

    id: int
    subscription_id: str
    service: str
    event_id: str
    body: bytes = dataclasses.field(repr=False)
    attempts: int
    reason: str
    failed: float


def _prepare_file(path: str) -> None:
    """Create the directory (0700) and the database file (0600) before SQLite touches them."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)


#: Columns added to a table after its first release: (table, column, declaration, backfill or None).
_ADDED_COLUMNS = (
    # Sessions opened before: keyed on their address, as `comatrix.identity` keys plain CoAP (no zone id).
    ("compact_sessions", "device_key", "TEXT",
     "'a:' || CASE WHEN instr(peer_host, '%') > 0 THEN substr(peer_host, 1, instr(peer_host, '%') - 1)"
     " ELSE peer_host END"),
    ("compact_sessions", "last_used", "REAL", "created"),
    ("compact_messages", "msgtype", "TEXT", None),  # null: m.text
)


def _migrate(connection: Any) -> None:
    """Bring a database made by an older version up to the current schema (idempotent)."""
    for table, column, declaration, backfill in _ADDED_COLUMNS:
        present = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            connection.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            if backfill is not None:
                connection.execute(f"UPDATE {table} SET {column} = {backfill}")


def _open_connection(connection: Any) -> None:
    # WAL: the journal is one file opened with the connection, not one per write transaction
    # (an in-memory database answers "memory" and stays as it is).
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA temp_store=MEMORY")
    for statement in _SCHEMA:
        connection.execute(statement)
    _migrate(connection)
    connection.commit()


class Store:
    """The gateway's SQLite database behind a one-thread adbapi pool."""

    def __init__(self, path: str | None = None, reactor: Any = None, shared: bool = False) -> None:
        """``shared``: other processes (workers) write the same database, so nothing is cached."""
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.path = path
        if path is not None:
            _prepare_file(path)
        self._pool = adbapi.ConnectionPool(
            "sqlite3", path if path is not None else ":memory:",
            check_same_thread=False, timeout=BUSY_TIMEOUT, cp_min=1, cp_max=1, cp_openfun=_open_connection,
            cp_reactor=reactor)
        self.shared = shared
        self._sessions: collections.OrderedDict[bytes, SessionRecord] = collections.OrderedDict()
        self._rooms: collections.OrderedDict[tuple[int, int], RoomRecord] = collections.OrderedDict()
        #: Bumped after every write that changes cached records; a read that saw it change is not cached.
        self._generation = 0

    @classmethod
    def for_state_dir(cls, state_dir: str | None, reactor: Any = None, shared: bool = False) -> "Store":
        """``<state_dir>/comatrix.sqlite3``, or an in-memory database without a state dir."""
        return cls(os.path.join(state_dir, DB_FILENAME) if state_dir else None, reactor, shared)

    def open(self) -> "defer.Deferred[None]":
        """Open the connection (and its files) now, in the pool's thread, for the process's life."""
        return self._pool.runWithConnection(lambda connection: None)

    def close(self) -> None:
        self._pool.close()

    # ------------------------------------------------------------------ sessions

    async def create_session(self, handle_hash: bytes, access_token: str, user_id: str,
                             device_id: str | None, peer_host: str, now: float,
                             device_key: str | None = None) -> int:
        """A new session, last used ``now``; ``device_key``: whose share it counts against."""
        def insert(txn: Any) -> int:
            txn.execute("INSERT INTO compact_sessions (handle_hash, access_token, user_id, device_id,"
                        " peer_host, created, device_key, last_used) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (sqlite3.Binary(handle_hash), access_token, user_id, device_id, peer_host, now,
                         device_key, now))
            return int(txn.lastrowid)
        return int(await self._pool.runInteraction(insert))

    async def session_by_handle(self, handle_hash: bytes) -> SessionRecord | None:
        cached = _cache_get(self._sessions, handle_hash)
        if cached is not None:
            return cached
        generation = self._generation
        rows = await self._pool.runQuery(
            "SELECT id, handle_hash, access_token, user_id, device_id, peer_host FROM compact_sessions"
            " WHERE handle_hash = ?", (sqlite3.Binary(handle_hash),))
        if not rows:
            return None
        row = rows[0]
        record = SessionRecord(int(row[0]), bytes(row[1]), row[2], row[3], row[4], row[5])
        if generation == self._generation and not self.shared:
            _cache_put(self._sessions, handle_hash, record)
        return record

    async def delete_session(self, session_id: int) -> None:
        def delete(txn: Any) -> None:
            for table, column in (("compact_messages", "session_id"), ("compact_history", "session_id"),
                                  ("compact_rooms", "session_id"),
                                  ("compact_sessions", "id")):
                txn.execute(f"DELETE FROM {table} WHERE {column} = ?", (session_id,))
        try:
            await self._pool.runInteraction(delete)
        finally:
            self._generation += 1
            for handle_hash in [key for key, record in self._sessions.items() if record.id == session_id]:
                del self._sessions[handle_hash]
            for room_key in [key for key in self._rooms if key[0] == session_id]:
                del self._rooms[room_key]

    async def session_count(self) -> int:
        rows = await self._pool.runQuery("SELECT COUNT(*) FROM compact_sessions")
        return int(rows[0][0])

    async def session_usage(self, device_key: str) -> SessionUsage:
        """How many sessions ``device_key`` holds and all devices hold, with the oldest last use of each."""
        def count(txn: Any) -> SessionUsage:
            txn.execute("SELECT COUNT(*), MIN(last_used) FROM compact_sessions WHERE device_key = ?",
                        (device_key,))
            device, device_oldest = txn.fetchone()
            txn.execute("SELECT COUNT(*), MIN(last_used) FROM compact_sessions")
            total, total_oldest = txn.fetchone()
            return SessionUsage(int(device), device_oldest, int(total), total_oldest)
        usage: SessionUsage = await self._pool.runInteraction(count)
        return usage

    async def touch_session(self, session_id: int, now: float) -> None:
        """Record that the session was used at ``now``."""
        await self._pool.runOperation("UPDATE compact_sessions SET last_used = ? WHERE id = ?", (now, session_id))

    async def idle_sessions(self, before: float, limit: int) -> list[SessionRecord]:
        """Up to ``limit`` sessions last used before ``before``, the longest idle first."""
        rows = await self._pool.runQuery(
            "SELECT id, handle_hash, access_token, user_id, device_id, peer_host FROM compact_sessions"
            " WHERE last_used < ? ORDER BY last_used LIMIT ?", (before, limit))
        return [SessionRecord(int(row[0]), bytes(row[1]), row[2], row[3], row[4], row[5]) for row in rows]

    # ------------------------------------------------------------------ room handles

    async def room_handle(self, session_id: int, room_id: str) -> int:
        """The session's handle for ``room_id``; a new one (smallest unused is max+1, from 0) if none."""
        def get_or_assign(txn: Any) -> int:
            txn.execute("SELECT handle FROM compact_rooms WHERE session_id = ? AND room_id = ?",
                        (session_id, room_id))
            row = txn.fetchone()
            if row is not None:
                return int(row[0])
            txn.execute("SELECT COALESCE(MAX(handle) + 1, 0) FROM compact_rooms WHERE session_id = ?",
                        (session_id,))
            handle = int(txn.fetchone()[0])
            txn.execute("INSERT INTO compact_rooms (session_id, handle, room_id) VALUES (?, ?, ?)",
                        (session_id, handle, room_id))
            return handle
        return int(await self._pool.runInteraction(get_or_assign))

    async def room(self, session_id: int, handle: int) -> RoomRecord | None:
        cached = _cache_get(self._rooms, (session_id, handle))
        if cached is not None:
            return cached
        generation = self._generation
        rows = await self._pool.runQuery(
            "SELECT room_id, last_cursor, after_token FROM compact_rooms WHERE session_id = ? AND handle = ?",
            (session_id, handle))
        if not rows:
            return None
        record = RoomRecord(session_id, handle, rows[0][0], int(rows[0][1]), rows[0][2])
        if generation == self._generation and not self.shared:
            _cache_put(self._rooms, (session_id, handle), record)
        return record

    async def rooms(self, session_id: int) -> list[RoomRecord]:
        rows = await self._pool.runQuery(
            "SELECT handle, room_id, last_cursor, after_token FROM compact_rooms WHERE session_id = ?"
            " ORDER BY handle", (session_id,))
        return [RoomRecord(session_id, int(r[0]), r[1], int(r[2]), r[3]) for r in rows]

    # ------------------------------------------------------------------ timelines

    async def advance_timeline(self, session_id: int, handle: int, messages: Iterable[StoredMessage],
                               last_cursor: int, after_token: str | None,
                               keep: int = MESSAGES_KEPT) -> None:
        """Record newly numbered messages and the new position, in one transaction; prune the window."""
        batch = list(messages)

        def write(txn: Any) -> None:
            txn.executemany(
                _INSERT_MESSAGE, [_message_row(session_id, handle, m) for m in batch])
            txn.execute("UPDATE compact_rooms SET last_cursor = ?, after_token = ? WHERE session_id = ?"
                        " AND handle = ?", (last_cursor, after_token, session_id, handle))
            txn.execute("DELETE FROM compact_messages WHERE session_id = ? AND room_handle = ? AND cursor <= ?",
                        (session_id, handle, last_cursor - keep))
        try:
            await self._pool.runInteraction(write)
        finally:
            self._generation += 1
            self._rooms.pop((session_id, handle), None)

    async def append_messages(self, arrivals: Iterable[tuple[int, int, Sequence[StoredMessage]]],
                              after_last: str | None = None,
                              keep: int = MESSAGES_KEPT) -> list[list[StoredMessage]]:
        """Number pushed messages for many (session, room handle)s in one transaction.

        Each arrival's candidates (their ``cursor`` ignored) that the handle has not
        numbered yet get the next cursors.  ``after_last``: the pagination token just
        after the last candidate; it becomes the walk position of every handle that
        numbered that last candidate now (its walk had not got there).  Returns what
        each arrival numbered.
        """
        batch = list(arrivals)

        def write(txn: Any) -> list[list[StoredMessage]]:
            numbered: list[list[StoredMessage]] = []
            for session_id, handle, candidates in batch:
                txn.execute("SELECT last_cursor FROM compact_rooms WHERE session_id = ? AND handle = ?",
                            (session_id, handle))
                row = txn.fetchone()
                fresh: list[StoredMessage] = []
                numbered.append(fresh)
                if row is None:
                    continue
                txn.execute("SELECT event_id FROM compact_messages WHERE session_id = ? AND room_handle = ?",
                            (session_id, handle))
                known = {known_row[0] for known_row in txn.fetchall()}
                cursor = int(row[0])
                for message in candidates:
                    if message.event_id not in known:
                        known.add(message.event_id)
                        cursor += 1
                        fresh.append(dataclasses.replace(message, cursor=cursor))
                if not fresh:
                    continue
                txn.executemany(
                    _INSERT_MESSAGE, [_message_row(session_id, handle, m) for m in fresh])
                if after_last is not None and fresh[-1].event_id == candidates[-1].event_id:
                    txn.execute("UPDATE compact_rooms SET last_cursor = ?, after_token = ? WHERE session_id = ?"
                                " AND handle = ?", (cursor, after_last, session_id, handle))
                else:
                    txn.execute("UPDATE compact_rooms SET last_cursor = ? WHERE session_id = ? AND handle = ?",
                                (cursor, session_id, handle))
                txn.execute("DELETE FROM compact_messages WHERE session_id = ? AND room_handle = ? AND cursor <= ?",
                            (session_id, handle, cursor - keep))
            return numbered
        try:
            result: list[list[StoredMessage]] = await self._pool.runInteraction(write)
            return result
        finally:
            self._generation += 1
            for session_id, handle, _candidates in batch:
                self._rooms.pop((session_id, handle), None)

    async def message_at_or_after(self, session_id: int, handle: int, cursor: int) -> StoredMessage | None:
        """The kept message with the smallest cursor >= ``cursor`` (a larger one means a gap)."""
        rows = await self._pool.runQuery(
            "SELECT cursor, event_id, sender, body, ts, msgtype FROM compact_messages WHERE session_id = ? AND"
            " room_handle = ? AND cursor >= ? ORDER BY cursor LIMIT 1", (session_id, handle, cursor))
        return _message(rows[0]) if rows else None

    async def latest_message(self, session_id: int, handle: int) -> StoredMessage | None:
        rows = await self._pool.runQuery(
            "SELECT cursor, event_id, sender, body, ts, msgtype FROM compact_messages WHERE session_id = ? AND"
            " room_handle = ? ORDER BY cursor DESC LIMIT 1", (session_id, handle))
        return _message(rows[0]) if rows else None

    async def event_id_at(self, session_id: int, handle: int, cursor: int) -> str | None:
        """The event of an event reference: a cursor of the room handle, or a historic reference."""
        if not 0 <= cursor < 2**63:
            return None
        rows = await self._pool.runQuery(
            "SELECT event_id FROM compact_messages WHERE session_id = ? AND room_handle = ? AND cursor = ?"
            " UNION ALL SELECT event_id FROM compact_history WHERE session_id = ? AND room_handle = ? AND ref = ?",
            (session_id, handle, cursor, session_id, handle, cursor))
        return str(rows[0][0]) if rows else None

    async def messages_around(self, session_id: int, handle: int, cursor: int, count: int) -> list[StoredMessage]:
        """Up to ``|count|`` kept numbered messages before (count < 0) or after ``cursor``, oldest first."""
        before = count < 0
        rows = await self._pool.runQuery(
            "SELECT cursor, event_id, sender, body, ts, msgtype FROM compact_messages WHERE session_id = ? AND"
            f" room_handle = ? AND cursor {'<' if before else '>'} ? ORDER BY cursor {'DESC' if before else 'ASC'}"
            " LIMIT ?", (session_id, handle, min(cursor, 2**63 - 1), abs(count)))
        found = [_message(row) for row in rows]
        return found[::-1] if before else found

    async def reference(self, session_id: int, handle: int, messages: Sequence[StoredMessage],
                        keep: int = HISTORY_KEPT) -> list[StoredMessage]:
        """``messages`` (a history page, cursors ignored) with their event references: the cursor or
        historic reference they have, else a new historic reference (the next one down)."""
        def write(txn: Any) -> list[StoredMessage]:
            found = []
            for message in messages:
                txn.execute("SELECT cursor FROM compact_messages WHERE session_id = ? AND room_handle = ? AND"
                            " event_id = ? UNION ALL SELECT ref FROM compact_history WHERE session_id = ? AND"
                            " room_handle = ? AND event_id = ?", (session_id, handle, message.event_id) * 2)
                row = txn.fetchone()
                if row is None:
                    txn.execute("SELECT MIN(ref) FROM compact_history WHERE session_id = ? AND room_handle = ?",
                                (session_id, handle))
                    lowest = txn.fetchone()[0]
                    row = (HISTORY_BASE if lowest is None else int(lowest) - 1,)
                    txn.execute(_INSERT_HISTORIC, _message_row(session_id, handle,
                                                                dataclasses.replace(message, cursor=row[0])))
                found.append(dataclasses.replace(message, cursor=int(row[0])))
            txn.execute("DELETE FROM compact_history WHERE session_id = ? AND room_handle = ? AND ref NOT IN (SELECT"
                        " ref FROM compact_history WHERE session_id = ? AND room_handle = ? ORDER BY ref LIMIT ?)",
                        (session_id, handle, session_id, handle, keep))
            return found
        result: list[StoredMessage] = await self._pool.runInteraction(write)
        return result

    async def known_event_ids(self, session_id: int, handle: int) -> set[str]:
        rows = await self._pool.runQuery(
            "SELECT event_id FROM compact_messages WHERE session_id = ? AND room_handle = ?",
            (session_id, handle))
        return {row[0] for row in rows}

    # ------------------------------------------------------------------ /sync resume points

    async def sync_position(self, token_hash: bytes, observer: bytes) -> SyncPosition | None:
        rows = await self._pool.runQuery(
            "SELECT registration, position FROM sync_positions WHERE token_hash = ? AND observer = ?",
            (sqlite3.Binary(token_hash), sqlite3.Binary(observer)))
        return SyncPosition(bytes(rows[0][0]), rows[0][1]) if rows else None

    async def save_sync_position(self, token_hash: bytes, observer: bytes, position: SyncPosition, now: float,
                                 keep: int = SYNC_POSITIONS_KEPT) -> None:
        """Record ``position`` for the observation; beyond ``keep`` the least recently saved go."""
        def write(txn: Any) -> None:
            txn.execute("INSERT OR REPLACE INTO sync_positions (token_hash, observer, registration, position,"
                        " updated) VALUES (?, ?, ?, ?, ?)",
                        (sqlite3.Binary(token_hash), sqlite3.Binary(observer),
                         sqlite3.Binary(position.registration), position.position, now))
            txn.execute("SELECT COUNT(*) FROM sync_positions")
            excess = int(txn.fetchone()[0]) - keep
            if excess > 0:
                txn.execute("DELETE FROM sync_positions WHERE rowid IN (SELECT rowid FROM sync_positions"
                            " ORDER BY updated, rowid LIMIT ?)", (excess,))
        await self._pool.runInteraction(write)

    async def forget_sync_positions(self, token_hash: bytes, observer: bytes | None = None) -> None:
        """Forget one observation's resume point, or (``observer`` None) every one of the token."""
        if observer is None:
            await self._pool.runOperation("DELETE FROM sync_positions WHERE token_hash = ?",
                                          (sqlite3.Binary(token_hash),))
        else:
            await self._pool.runOperation("DELETE FROM sync_positions WHERE token_hash = ? AND observer = ?",
                                          (sqlite3.Binary(token_hash), sqlite3.Binary(observer)))

    # ------------------------------------------------------------------ configured devices

    # ------------------------------------------------------------------ application service

    async def last_appservice_transaction(self) -> str | None:
        rows = await self._pool.runQuery("SELECT txn_id FROM appservice_transactions WHERE slot = 0")
        return str(rows[0][0]) if rows else None

    async def seen_events(self, event_ids: Iterable[str]) -> set[str]:
        """Which of ``event_ids`` an earlier transaction pushed already."""
        wanted = list(event_ids)

        def select(txn: Any) -> set[str]:
            seen: set[str] = set()
            for start in range(0, len(wanted), 500):  # below SQLite's host-parameter limit
                chunk = wanted[start:start + 500]
                txn.execute("SELECT event_id FROM appservice_events WHERE event_id IN"
                            f" ({','.join('?' * len(chunk))})", chunk)
                seen.update(row[0] for row in txn.fetchall())
            return seen
        if not wanted:
            return set()
        seen: set[str] = await self._pool.runInteraction(select)
        return seen

    async def finish_appservice_transaction(self, txn_id: str, event_ids: Sequence[str], now: float,
                                            keep: int = EVENTS_REMEMBERED) -> None:
        """Record a handled transaction and its events, in one transaction; forget the oldest events."""
        def write(txn: Any) -> None:
            txn.execute("INSERT OR REPLACE INTO appservice_transactions (slot, txn_id, updated) VALUES (0, ?, ?)",
                        (txn_id, now))
            txn.execute("SELECT COALESCE(MAX(seq), 0) FROM appservice_events")
            seq = int(txn.fetchone()[0])
            txn.executemany("INSERT OR IGNORE INTO appservice_events (event_id, seq) VALUES (?, ?)",
                            [(event_id, seq + 1 + index) for index, event_id in enumerate(event_ids)])
            txn.execute("DELETE FROM appservice_events WHERE seq <= ?", (seq + len(event_ids) - keep,))
        await self._pool.runInteraction(write)

    async def device_token(self, user_id: str, device_id: str) -> str | None:
        """The token kept for the gateway's login as ``device_id`` of ``user_id``, if any."""
        rows = await self._pool.runQuery(
            "SELECT access_token FROM device_tokens WHERE user_id = ? AND device_id = ?", (user_id, device_id))
        return str(rows[0][0]) if rows else None

    async def save_device_token(self, user_id: str, device_id: str, access_token: str, now: float) -> None:
        await self._pool.runOperation(
            "INSERT OR REPLACE INTO device_tokens (user_id, device_id, access_token, updated) VALUES (?, ?, ?, ?)",
            (user_id, device_id, access_token, now))

    async def keep_device_tokens_of(self, logins: Iterable[tuple[str, str]]) -> int:
        """Drop the kept tokens of every (user, device id) not in ``logins``; how many went."""
        wanted = set(logins)

        def prune(txn: Any) -> int:
            txn.execute("SELECT user_id, device_id FROM device_tokens")
            stale = [tuple(row) for row in txn.fetchall() if tuple(row) not in wanted]
            txn.executemany("DELETE FROM device_tokens WHERE user_id = ? AND device_id = ?", stale)
            return len(stale)
        return int(await self._pool.runInteraction(prune))

    async def forget_device_token(self, user_id: str, device_id: str, access_token: str) -> None:
        """Drop the kept token, if it is still ``access_token`` (a newer one stays)."""
        await self._pool.runOperation(
            "DELETE FROM device_tokens WHERE user_id = ? AND device_id = ? AND access_token = ?",
            (user_id, device_id, access_token))

    # ------------------------------------------------------------------ webhooks

    async def add_webhook_subscription(self, subscription: WebhookSubscription, now: float, per_service: int,
                                       total: int) -> str | None:
        """Record ``subscription`` unless a cap is reached; None, or which cap ("service", "total")."""
        def insert(txn: Any) -> str | None:
            txn.execute("SELECT COUNT(*) FROM webhook_subscriptions WHERE service = ?", (subscription.service,))
            if int(txn.fetchone()[0]) >= per_service:
                return "service"
            txn.execute("SELECT COUNT(*) FROM webhook_subscriptions")
            if int(txn.fetchone()[0]) >= total:
                return "total"
            txn.execute("INSERT INTO webhook_subscriptions (id, service, room_id, url, event_types, created)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        (subscription.id, subscription.service, subscription.room_id, subscription.url,
                         json.dumps(list(subscription.event_types)), now))
            return None
        refused: str | None = await self._pool.runInteraction(insert)
        return refused

    async def remove_webhook_subscription(self, service: str, subscription_id: str) -> bool:
        """Drop the service's subscription and its queued deliveries; False if it has no such one."""
        def delete(txn: Any) -> bool:
            txn.execute("DELETE FROM webhook_subscriptions WHERE id = ? AND service = ?", (subscription_id, service))
            if txn.rowcount == 0:
                return False
            txn.execute("DELETE FROM webhook_deliveries WHERE subscription_id = ?", (subscription_id,))
            return True
        return bool(await self._pool.runInteraction(delete))

    async def webhook_subscriptions(self) -> list[WebhookSubscription]:
        rows = await self._pool.runQuery(
            "SELECT id, service, room_id, url, event_types FROM webhook_subscriptions ORDER BY created, id")
        return [WebhookSubscription(row[0], row[1], row[2], row[3], tuple(json.loads(row[4]))) for row in rows]

    async def enqueue_webhook_deliveries(self, deliveries: Sequence[tuple[str, str, str, bytes]], now: float,
                                         per_service: int, total: int) -> tuple[set[str], list[str]]:
        """Queue (subscription id, service, event id, body)s in one transaction.

        A delivery queued already (same subscription and event) is not queued twice; one
        for a subscription that is gone is dropped; one beyond the service's share or the
        total goes to the dead letters at once.  Returns the subscription ids that got a
        delivery, and the event ids dead-lettered for lack of room.
        """
        def write(txn: Any) -> tuple[set[str], list[str]]:
            txn.execute("SELECT service, COUNT(*) FROM webhook_deliveries GROUP BY service")
            held = {row[0]: int(row[1]) for row in txn.fetchall()}
            queued = sum(held.values())
            woken: set[str] = set()
            overflow: list[str] = []
            for subscription_id, service, event_id, body in deliveries:
                txn.execute("SELECT EXISTS (SELECT 1 FROM webhook_subscriptions WHERE id = ?), EXISTS (SELECT 1 FROM"
                            " webhook_deliveries WHERE subscription_id = ? AND event_id = ?)",
                            (subscription_id, subscription_id, event_id))
                subscribed, queued_already = txn.fetchone()
                if not subscribed or queued_already:
                    continue
                if held.get(service, 0) >= per_service or queued >= total:
                    overflow.append(event_id)
                    txn.execute("INSERT INTO webhook_dead_letters (subscription_id, service, event_id, body, attempts,"
                                " reason, failed) VALUES (?, ?, ?, ?, 0, 'queue full', ?)",
                                (subscription_id, service, event_id, sqlite3.Binary(body), now))
                    continue
                txn.execute("INSERT INTO webhook_deliveries (subscription_id, service, event_id, body, created)"
                            " VALUES (?, ?, ?, ?, ?)", (subscription_id, service, event_id, sqlite3.Binary(body), now))
                held[service] = held.get(service, 0) + 1
                queued += 1
                woken.add(subscription_id)
            if overflow:
                _prune_dead_letters(txn, {service for _s, service, _e, _b in deliveries})
            return woken, overflow
        result: tuple[set[str], list[str]] = await self._pool.runInteraction(write)
        return result

    async def next_webhook_delivery(self, subscription_id: str) -> PendingDelivery | None:
        """The subscription's oldest queued delivery."""
        rows = await self._pool.runQuery(
            "SELECT id, subscription_id, service, event_id, body, attempts FROM webhook_deliveries"
            " WHERE subscription_id = ? ORDER BY id LIMIT 1", (subscription_id,))
        return PendingDelivery(int(rows[0][0]), rows[0][1], rows[0][2], rows[0][3], bytes(rows[0][4]),
                               int(rows[0][5])) if rows else None

    async def webhook_backlog(self) -> set[str]:
        """The subscriptions with queued deliveries."""
        rows = await self._pool.runQuery("SELECT DISTINCT subscription_id FROM webhook_deliveries")
        return {row[0] for row in rows}

    async def webhook_delivered(self, delivery_id: int) -> None:
        await self._pool.runOperation("DELETE FROM webhook_deliveries WHERE id = ?", (delivery_id,))

    async def webhook_attempt_failed(self, delivery_id: int, attempts: int) -> None:
        await self._pool.runOperation("UPDATE webhook_deliveries SET attempts = ? WHERE id = ?",
                                      (attempts, delivery_id))

    async def dead_letter_webhook_delivery(self, delivery: PendingDelivery, attempts: int, reason: str,
                                           now: float) -> None:
        """Move the delivery from the queue to the dead letters, in one transaction."""
        def move(txn: Any) -> None:
            txn.execute("DELETE FROM webhook_deliveries WHERE id = ?", (delivery.id,))
            txn.execute("INSERT INTO webhook_dead_letters (subscription_id, service, event_id, body, attempts, reason,"
                        " failed) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (delivery.subscription_id, delivery.service, delivery.event_id,
                         sqlite3.Binary(delivery.body), attempts, reason, now))
            _prune_dead_letters(txn, {delivery.service})
        await self._pool.runInteraction(move)

    async def webhook_dead_letters(self, service: str | None = None, limit: int = DEAD_LETTERS_KEPT) -> list[DeadLetter]:
        """The newest dead letters (of ``service``, else of all), newest first."""
        where, args = ("WHERE service = ?", (service,)) if service is not None else ("", ())
        rows = await self._pool.runQuery(
            "SELECT id, subscription_id, service, event_id, body, attempts, reason, failed FROM webhook_dead_letters"
            f" {where} ORDER BY id DESC LIMIT ?", (*args, limit))
        return [DeadLetter(int(r[0]), r[1], r[2], r[3], bytes(r[4]), int(r[5]), r[6], float(r[7])) for r in rows]

    async def webhook_sync_position(self, service: str, user_id: str) -> str | None:
        """Where the service's /sync loop got to, if it was syncing as ``user_id``."""
        rows = await self._pool.runQuery(
            "SELECT position FROM webhook_sync_positions WHERE service = ? AND user_id = ?", (service, user_id))
        return str(rows[0][0]) if rows else None

    async def save_webhook_sync_position(self, service: str, user_id: str, position: str, now: float) -> None:
        await self._pool.runOperation(
            "INSERT OR REPLACE INTO webhook_sync_positions (service, user_id, position, updated) VALUES (?, ?, ?, ?)",
            (service, user_id, position, now))

    async def forget_webhook_sync_position(self, service: str) -> None:
        await self._pool.runOperation("DELETE FROM webhook_sync_positions WHERE service = ?", (service,))


def _prune_dead_letters(txn: Any, services: Iterable[str], keep: int = DEAD_LETTERS_KEPT) -> None:
    for service in services:
        txn.execute("DELETE FROM webhook_dead_letters WHERE service = ? AND id NOT IN (SELECT id FROM"
                    " webhook_dead_letters WHERE service = ? ORDER BY id DESC LIMIT ?)", (service, service, keep))


def _cache_get(cache: "collections.OrderedDict[Any, Any]", key: Any) -> Any:
    record = cache.get(key)
    if record is not None:
        cache.move_to_end(key)
    return record


def _cache_put(cache: "collections.OrderedDict[Any, Any]", key: Any, record: Any) -> None:
    cache[key] = record
    if len(cache) > RECORDS_CACHED:
        cache.popitem(last=False)


_INSERT_MESSAGE = ("INSERT OR REPLACE INTO compact_messages (session_id, room_handle, cursor, event_id, sender, body,"
                   " ts, msgtype) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")


_INSERT_HISTORIC = ("INSERT INTO compact_history (session_id, room_handle, ref, event_id, sender, body, ts, msgtype)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)")


def _message_row(session_id: int, handle: int, m: StoredMessage) -> tuple[Any, ...]:
    return (session_id, handle, m.cursor, m.event_id, m.sender, m.body, m.ts,
            None if m.msgtype == "m.text" else m.msgtype)


def _message(row: Any) -> StoredMessage:
    return StoredMessage(int(row[0]), row[1], row[2], row[3], int(row[4]), row[5] or "m.text")
