"""The state behind the compact profile: sessions, room handles, message cursors, /sync loops.

`CompactService` is shared by the compact resources of one gateway.  It knows
Matrix (through `MatrixClient`) and the store, not CoAP: it raises the CoAP
layer's error types only for the answers the profile defines (unknown session
4.01, session used from another address -- or, for a session opened through a
security context (DTLS, OSCORE), from outside that context -- 4.03, unknown room
handle 4.04).

Message cursors.  For each (session, room handle) the gateway numbers the
room's ``m.room.message`` events 1, 2, 3, ... in homeserver order, walking the
room forward from a Matrix pagination token it keeps (``after_token``).  A
cursor is such a number; "messages since cursor N" is message N+1 (or the next
kept one, a larger number telling the device it lost some).  Numbers are
assigned under a per-timeline lock, so they are consecutive and in order
whoever asks first (a FETCH, a join, or the session's /sync loop), by the
forward walk (`_advance`) or -- saving the walk's ``/messages`` round trips when
a push is due -- from a /sync timeline that is known to hold everything new
(`timeline_arrived`; its next_batch is then the walk position, which
``/messages`` accepts as ``from``).

Sessions are a bounded resource (each is a Matrix device on the homeserver):
one device may hold ``[limits] max_sessions_per_device`` of them and all
devices together ``max_sessions``; a login beyond either is refused (4.29 or
5.03, Max-Age until the oldest could idle out) before the homeserver is asked,
so no Matrix device is made.  A session unused for ``session_idle_timeout``
(one with a running /sync loop counts as used) is closed by a periodic sweep,
which logs its Matrix device out first; the sweep also runs at start, for
sessions that idled out while the gateway was down.  The last use is written at
most every `touch_interval` seconds per session, so sends cost no extra write.

Observe.  A session with at least one observation gets one ``/sync`` long-poll
loop (`_SyncLoop`).  When a room the session has a handle for shows new
messages, they are numbered and every newly numbered message is handed to
``on_message`` (the resource pushes it to the
observers of that room).  Another trigger -- an application-service
transaction for many devices -- can later call `messages_arrived` the same way.

The long-polls go through the gateway's long-poll pool (`comatrix.longpoll`),
so watching devices never hold the slots of the upstream cap that sends and
fetches need; a loop holds one long-poll slot of the device that started it
(its share is ``[limits] long_polls_per_device``), and a loop's first /sync
catches up every room of the session.  Positions survive restarts without a sync token of their own:
what a device relies on is the per-room walk position (``after_token``) and
the numbering in the store, so a device that observes again after a gateway
restart gets what arrived meanwhile, with the next cursors.  Homeserver
trouble is waited out with jittered exponential back-off (`Backoff`).

Allowed senders.  Only messages of the session's own user and of the senders its
device may hear from (``allowed_senders``, `SenderPolicy`) are numbered: `_sender_allowed`
is the one test every numbering path (walk, /sync timeline, transaction) applies, so
a message of anyone else never gets a cursor, a push or a byte on the air.

Application-service mode.  A provisioned device user (`comatrix.appservice`)
opens a session with no password (`open_appservice_session`): no homeserver
login, no Matrix device, and the session acts with the ``as_token`` as its user.
Its watch holds no /sync long-poll: it joins the transaction-fed index (room id
-> watching sessions), and the event stream's listener (`rooms_arrived`)
numbers each room's new messages for all its watching sessions in one store
transaction and pushes them in one batch (``on_messages``).  The walk position
stays where it was: a later walk skips what was numbered from transactions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import secrets
from typing import Any, Awaitable, Callable, Mapping, Sequence

from twisted.internet import defer, task
from twisted.python.failure import Failure

from comatrix.coap.errors import (BadRequest, Forbidden, NotFound, ServiceUnavailable, TooManyRequests,
                                  Unauthorized)
from comatrix.coap.message import Peer, Security
from comatrix.compact.codec import HANDLE_SIZE, LOCATION, MSGTYPES
from comatrix.config import LimitSettings
from comatrix.identity import plain_address
from comatrix.logs import get_logger
from comatrix.longpoll import DEADLINE_MARGIN, Backoff, Lease, LongPoller, is_transient, retry_delay
from comatrix.matrix import api
from comatrix.matrix.client import ENCRYPTED_TYPE, MatrixClient, check_room_reference
from comatrix.matrix.api import AppserviceToken
from comatrix.matrix.errors import HomeserverError, InvalidResponse, InvalidRoomReference, MatrixError
from comatrix.matrix.responses import Event, SyncResponse, parse_event, parse_messages, parse_sync
from comatrix.policy import sender_filter
from comatrix.store import HISTORY_BASE, RoomRecord, SessionRecord, Store, StoredMessage

log = get_logger(__name__)

__all__ = ["CompactService", "Session", "handle_hash", "txn_id"]

MESSAGE_TYPE = "m.room.message"
#: Forward pages walked per advance before re-anchoring at the newest message (a visible gap).
MAX_WALK_PAGES = 5
WALK_PAGE_SIZE = 20
#: Message events a /sync answer carries per room; more since the last /sync (``limited``)
#: are numbered by the forward walk instead.
SYNC_TIMELINE_LIMIT = 10
#: The sync filter: only message events in joined rooms' timelines, nothing else.
SYNC_FILTER: Mapping[str, Any] = {
    "presence": {"types": []},
    "account_data": {"types": []},
    "room": {
        "timeline": {"types": [MESSAGE_TYPE, ENCRYPTED_TYPE], "limit": SYNC_TIMELINE_LIMIT},
        "state": {"types": []},
        "ephemeral": {"types": []},
        "account_data": {"types": []},
    },
}
#: The long-poll timeout (s) the session loops ask the homeserver for.
LONG_POLL_SECONDS = 25.0
#: Idle sessions closed per sweep (the next sweep takes the rest).
EXPIRY_BATCH = 64
#: Longest time between two idle-session sweeps, and between two writes of a session's last use (s).
MAX_SWEEP_INTERVAL = 300.0
MAX_TOUCH_INTERVAL = 300.0

#: Largest room handle or cursor the store can hold (SQLite INTEGER is signed 64-bit).  The wire
#: takes any uint below 2**64; nothing above this is ever assigned, and SQLite would refuse it.
MAX_STORED_NUMBER = 2**63 - 1
#: References above this are historic (`Store.reference`), below it cursors.
HISTORIC_FLOOR = HISTORY_BASE - 2**24

Session = SessionRecord
#: Called for each newly numbered message of a session's room: (session, room handle, message).
MessageSink = Callable[[SessionRecord, int, StoredMessage], None]
#: Called with a batch of newly numbered messages of many sessions at once; returns the ids of the
#: sessions none of whose observers took a message (no longer watching).
BatchSink = Callable[[Sequence[tuple[SessionRecord, int, StoredMessage]]], set[int]]
#: (session, room id) -> the ``allowed_senders`` patterns that apply (None: the default, users of
#: the session user's own server).
SenderPolicy = Callable[[SessionRecord, str], Sequence[str] | None]
#: What an appservice session's access token is stored as: it has none of its own.
APPSERVICE_SESSION_TOKEN = ""


def handle_hash(handle: bytes) -> bytes:
    return hashlib.sha256(handle).digest()


def txn_id(session_id: int, seq: int) -> str:
    """The Matrix transaction id of a compact send: a function of (session, seq) only.

    A retry with the same seq therefore reuses the txnId and the homeserver
    returns the first event instead of making a second one (facts §5).
    """
    return f"c{session_id}.{seq}"


def _binding(peer: Peer, security: Security | None) -> str:
    """What a session is bound to: the security identity it was opened through, else the source address."""
    return peer.host if security is None else f"{security.scheme}:{security.identity}"


def _usable(event: Event) -> bool:
    return event.type == MESSAGE_TYPE and not event.is_state and not event.is_redacted


@dataclasses.dataclass
class _SyncLoop:
    session: SessionRecord
    #: The long-poll slot of the device that started the watch, held until the loop ends.
    lease: Lease
    deferred: "defer.Deferred[None] | None" = None
    stopped: bool = False


class CompactService:
    """Sessions, rooms and timelines of the compact profile for one gateway."""

    def __init__(self, matrix: MatrixClient, store: Store, reactor: Any, *,
                 rooms: Mapping[str, str] | None = None, long_poll_seconds: float = LONG_POLL_SECONDS,
                 long_polls: LongPoller | None = None, jitter: Callable[[], float] = random.random,
                 limits: LimitSettings = LimitSettings(),
                 acting: Callable[[str], AppserviceToken] | None = None) -> None:
        """``long_polls``: the gateway's long-poll pool (without: /sync goes through ``matrix``);
        ``limits``: the session caps and idle timeout (``[limits]``); ``acting``: in
        application-service mode, the token acting as a user of the namespace (then watches
        of appservice sessions are fed by `rooms_arrived`, not /sync)."""
        self.matrix = matrix
        self.store = store
        self.reactor = reactor
        #: Room names configured for joins (``[plugins.compact.rooms]``): name -> alias or room id.
        self.configured_rooms = dict(rooms or {})
        self.long_poll_ms = int(long_poll_seconds * 1000)
        self.long_polls = long_polls if long_polls is not None else LongPoller(matrix.transport, reactor)
        #: Random source of the loops' back-off jitter (tests make it deterministic).
        self.jitter = jitter
        self.on_message: MessageSink | None = None
        self.on_messages: BatchSink | None = None
        self.acting = acting
        #: Transaction-fed watches: session id -> session, and room id -> {session id: room handle}.
        self._fed: dict[int, SessionRecord] = {}
        self._fed_rooms: dict[str, dict[int, int]] = {}
        #: Whose messages a session's watches and history deliver (set by the plugin from ``[[devices]]``).
        self.allowed_senders: SenderPolicy = lambda session, room_id: None
        #: Returns whether a session still has observers (set by the messages resource).
        self.is_observed: Callable[[SessionRecord], bool] = lambda session: False
        self._locks: dict[tuple[int, int], defer.DeferredLock] = {}
        self._loops: dict[int, _SyncLoop] = {}
        self.limits = limits
        self.idle_timeout = limits.session_idle_timeout
        self.touch_interval = min(MAX_TOUCH_INTERVAL, self.idle_timeout / 8)
        #: Session id -> when its last use was last written (one entry per live session).
        self._touched: dict[int, float] = {}
        #: Device key -> logins under way (not yet in the store), counted against the caps.
        self._opening: dict[str, int] = {}
        self._sweeper: task.LoopingCall | None = None

    # ------------------------------------------------------------------ sessions

    async def login(self, user: str, password: str, peer: Peer, device_key: str | None = None,
                    security: Security | None = None) -> bytes:
        """Log in to Matrix and open a session bound to ``security`` (else ``peer``'s address);
        returns the handle.

        ``device_key`` (default: the address as `comatrix.identity` keys plain CoAP) is
        whose share the session counts against; over a cap nothing reaches the homeserver.
        """
        async def matrix_login() -> tuple[str, str, str | None]:
            login = await self.matrix.login(user, password, initial_device_display_name="CoMatrix compact device")
            return login.access_token, login.user_id, login.device_id
        return await self._open(matrix_login, peer, device_key, security)

    async def open_appservice_session(self, user_id: str, peer: Peer, device_key: str | None = None,
                                      security: Security | None = None) -> bytes:
        """A session of a provisioned device user (application-service mode): no login, no Matrix device."""
        if self.acting is None:
            raise Unauthorized("application-service mode is off")

        async def no_login() -> tuple[str, str, str | None]:
            return APPSERVICE_SESSION_TOKEN, user_id, None
        return await self._open(no_login, peer, device_key, security)

    async def _open(self, login: Callable[[], Awaitable[tuple[str, str, str | None]]], peer: Peer,
                    device_key: str | None, security: Security | None) -> bytes:
        key = device_key if device_key is not None else "a:" + plain_address(peer.host)
        self._opening[key] = self._opening.get(key, 0) + 1  # reserved before the check: logins race
        try:
            await self._admit(key)
            access_token, user_id, device_id = await login()
            handle = secrets.token_bytes(HANDLE_SIZE)
            now = self.reactor.seconds()
            session_id = await self.store.create_session(handle_hash(handle), access_token, user_id,
                                                         device_id, _binding(peer, security), now, key)
        finally:
            left = self._opening.pop(key) - 1
            if left:
                self._opening[key] = left
        self._touched[session_id] = now
        log.info("Compact session {id} opened for {user} at {peer}", id=session_id, user=user_id,
                 peer=_binding(peer, security))
        return handle

    async def _admit(self, device_key: str) -> None:
        """Raise 4.29 (the device's share) or 5.03 (all sessions) unless this login (reserved) fits."""
        limits = self.limits
        usage = await self.store.session_usage(device_key)
        if usage.device + self._opening.get(device_key, 0) > limits.max_sessions_per_device:
            log.info("Compact login of {device} refused: it holds {count} sessions", device=device_key,
                     count=usage.device)
            raise TooManyRequests("too many sessions", retry_after=self._retry_after(usage.device_oldest))
        if usage.total + sum(self._opening.values()) > limits.max_sessions:
            log.warn("Compact login of {device} refused: {count} sessions open ([limits] max_sessions)",
                     device=device_key, count=usage.total)
            raise ServiceUnavailable("too many sessions", max_age=self._retry_after(usage.total_oldest))

    def _retry_after(self, oldest_use: float | None) -> int:
        """Seconds until a session last used at ``oldest_use`` idles out (at least 1)."""
        if oldest_use is None:
            return 1
        return max(1, math.ceil(min(self.idle_timeout, oldest_use + self.idle_timeout - self.reactor.seconds())))

    async def session(self, handle: bytes, peer: Peer, security: Security | None = None) -> SessionRecord:
        record = await self.store.session_by_handle(handle_hash(handle))
        if record is None:
            log.warn("Unknown compact session handle from {peer}", peer=str(peer))
            raise Unauthorized("unknown session")
        if record.peer_host != _binding(peer, security):
            log.warn("Compact session {id} used from {peer}, bound to another address",
                     id=record.id, peer=str(peer))
            raise Forbidden("session bound to another address")
        self._touch(record.id)
        return self._acting_record(record)

    def _acting_record(self, record: SessionRecord) -> SessionRecord:
        """An appservice session's record with the token acting as its user."""
        if record.access_token != APPSERVICE_SESSION_TOKEN:
            return record
        if self.acting is None:
            raise Unauthorized("application-service mode is off")
        return dataclasses.replace(record, access_token=self.acting(record.user_id))

    def _touch(self, session_id: int) -> None:
        """Note a use of the session; written to the store at most every `touch_interval` seconds."""
        now = self.reactor.seconds()
        last = self._touched.get(session_id)
        if last is not None and now - last < self.touch_interval:
            return
        self._touched[session_id] = now
        defer.ensureDeferred(self.store.touch_session(session_id, now)).addErrback(
            lambda failure: log.failure("Could not record the use of compact session {id}", failure, id=session_id))

    async def logout(self, session: SessionRecord) -> None:
        """Revoke the handle and log the Matrix token out (an already dead token is fine)."""
        self._stop_loop(session.id)
        await self._forget(session)
        await self._logout_matrix(session)
        log.info("Compact session {id} closed", id=session.id)

    async def _forget(self, session: SessionRecord) -> None:
        self._unfeed(session.id)
        await self.store.delete_session(session.id)
        self._touched.pop(session.id, None)
        for key in [key for key in self._locks if key[0] == session.id]:
            del self._locks[key]

    async def _logout_matrix(self, session: SessionRecord) -> None:
        """Log the session's Matrix device out; a token the homeserver no longer knows is fine."""
        if session.access_token == APPSERVICE_SESSION_TOKEN or isinstance(session.access_token, AppserviceToken):
            return  # an appservice session has no login of its own to end
        try:
            await self.matrix.logout(session.access_token)
        except MatrixError as error:
            if error.http_status != 401:
                raise

    # ------------------------------------------------------------------ idle expiry

    def start_expiry(self) -> None:
        """Sweep idle sessions now (those that idled out while the gateway was down) and periodically."""
        if self._sweeper is not None:
            return
        self._sweeper = task.LoopingCall(self._sweep)
        self._sweeper.clock = self.reactor
        interval = min(MAX_SWEEP_INTERVAL, self.idle_timeout / 4)
        self._sweeper.start(interval, now=True).addErrback(
            lambda failure: log.failure("Idle compact session sweep stopped", failure))

    async def _sweep(self) -> None:
        try:
            await self.expire_idle_sessions()
        except Exception:
            log.failure("Idle compact session sweep failed")

    async def expire_idle_sessions(self) -> int:
        """Close sessions idle for ``session_idle_timeout``, logging their Matrix devices out; how many.

        A session whose logout fails for a reason other than a dead token is kept and
        tried again by the next sweep: deleting it would leave its Matrix device behind.
        """
        now = self.reactor.seconds()
        closed = 0
        for session in await self.store.idle_sessions(now - self.idle_timeout, EXPIRY_BATCH):
            if self.watching(session.id):  # observed: in use, though the device sends nothing
                self._touch(session.id)
                continue
            try:
                await self._logout_matrix(session)
            except (HomeserverError, ServiceUnavailable) as error:
                log.info("Idle compact session {id}: logout failed ({error}), retrying later", id=session.id,
                         error=_describe(error))
                continue
            await self._forget(session)
            closed += 1
            log.info("Compact session {id} of {user} closed after {idle:.0f} s unused; Matrix device logged out",
                     id=session.id, user=session.user_id, idle=self.idle_timeout)
        return closed

    # ------------------------------------------------------------------ rooms

    def resolve_reference(self, room: str) -> str:
        """A configured room name -> its alias or id; an alias or id as is; else 4.00 (a diagnostic
        short enough for the profile's error datagram)."""
        configured = self.configured_rooms.get(room)
        if configured is not None:
            return configured
        if room[0] not in "!#":
            raise BadRequest("unknown room name")
        try:
            return check_room_reference(room)
        except InvalidRoomReference:
            raise BadRequest("room: not a room id or #alias:server") from None

    async def join(self, session: SessionRecord, room: str) -> int:
        return await self.joined(session, await self.matrix.join(session.access_token, self.resolve_reference(room)))

    async def joined(self, session: SessionRecord, room_id: str) -> int:
        """The session's user is in ``room_id`` now (a join, a create): its room handle, timeline anchored."""
        handle = await self.store.room_handle(session.id, room_id)
        if session.id in self._fed:
            self._fed_rooms.setdefault(room_id, {})[session.id] = handle
        await self.advance(session, handle)  # anchors the timeline: cursors count from the join
        return handle

    async def room(self, session: SessionRecord, handle: int) -> RoomRecord:
        record = await self.store.room(session.id, handle) if 0 <= handle <= MAX_STORED_NUMBER else None
        if record is None:
            raise NotFound("unknown room handle")
        return record

    async def send(self, session: SessionRecord, handle: int, seq: int, body: str, kind: int | str = 0,
                   reply_to: int | None = None, replaces: int | None = None) -> int:
        """Send a message (``kind``: an index into `MSGTYPES` or a ``geo:`` URI, see the codec), a
        reply to or an edit of an event reference; returns the new event's reference.

        The event is numbered at once (the next cursor of the room handle, unless a walk
        already numbered it) and pushed to the session's observers like any other, so the
        device can refer to it right away.  A retry with the same seq is the same event
        (same transaction id) and gets the same reference.
        """
        record = await self.room(session, handle)
        msgtype = LOCATION if isinstance(kind, str) else MSGTYPES[kind]
        edited = None if replaces is None else await self.event_id(session, handle, replaces)
        answered = None if reply_to is None or edited is not None else await self.event_id(session, handle, reply_to)
        content = api.message_content(msgtype, body, geo_uri=kind if isinstance(kind, str) else None,
                                      replaces=edited, reply_to=answered)
        event_id = await self.matrix.send_message(session.access_token, record.room_id, content,
                                                  txn_id(session.id, seq))
        # Numbered as a walk would number it: its body is the content's (an edit's "* " fallback).
        return await self._own_event(session, handle, StoredMessage(0, event_id, session.user_id, content["body"],
                                                                    int(self.reactor.seconds() * 1000), msgtype))

    async def event_id(self, session: SessionRecord, handle: int, reference: int) -> str:
        """The event of an event reference of the room handle; 4.04 if the gateway has none."""
        event_id = await self.store.event_id_at(session.id, handle, reference)
        if event_id is None:
            raise NotFound("unknown event reference")
        return event_id

    async def _own_event(self, session: SessionRecord, handle: int, message: StoredMessage) -> int:
        lock = self._lock(session.id, handle)
        await lock.acquire()
        try:
            (numbered,) = await self.store.append_messages([(session.id, handle, [message])])
        finally:
            lock.release()
        for fresh in numbered:
            if self.on_message is not None:
                self.on_message(session, handle, fresh)
        if numbered:
            return numbered[0].cursor
        (known,) = await self.store.reference(session.id, handle, [message])  # a retry: already numbered
        return known.cursor

    # ------------------------------------------------------------------ messages

    async def latest(self, session: SessionRecord, handle: int) -> StoredMessage | None:
        await self.room(session, handle)
        await self.advance(session, handle)
        return await self.store.latest_message(session.id, handle)

    async def since(self, session: SessionRecord, handle: int, cursor: int) -> StoredMessage | None:
        """The first message after ``cursor`` (its cursor > cursor+1 if some fell out of the window)."""
        record = await self.room(session, handle)
        if cursor >= record.last_cursor:
            await self.advance(session, handle)
        if cursor >= MAX_STORED_NUMBER:
            return None  # no message is numbered beyond it
        return await self.store.message_at_or_after(session.id, handle, cursor + 1)

    def _lock(self, session_id: int, handle: int) -> defer.DeferredLock:
        key = (session_id, handle)
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = defer.DeferredLock()
        return lock

    async def advance(self, session: SessionRecord, handle: int, *, reanchor: bool = True) -> list[StoredMessage]:
        """Number the room's messages the gateway has not seen yet; returns them, oldest first.

        ``reanchor`` False (a history page): a room far behind is walked `MAX_WALK_PAGES` on
        and its position kept there, instead of jumping to the newest message."""
        lock = self._lock(session.id, handle)
        await lock.acquire()
        try:
            return await self._advance(session, handle, reanchor)
        finally:
            lock.release()

    def _deliverable(self, session: SessionRecord, room_id: str) -> Callable[[Event], bool]:
        """Whether an event of ``room_id`` is a message for the session's device: the test every
        numbering path applies (so nothing else is numbered, pushed or answered)."""
        allowed = self._sender_allowed(session, room_id)
        return lambda event: _usable(event) and allowed(event.sender)

    def _sender_allowed(self, session: SessionRecord, room_id: str) -> Callable[[str], bool]:
        return sender_filter(self.allowed_senders(session, room_id), session.user_id)

    async def _advance(self, session: SessionRecord, handle: int, reanchor: bool = True) -> list[StoredMessage]:
        record = await self.room(session, handle)
        deliverable = self._deliverable(session, record.room_id)
        token = session.access_token
        cursor = record.last_cursor
        fresh: list[StoredMessage] = []
        if record.after_token is not None:
            known = await self.store.known_event_ids(session.id, handle)
            position: str | None = record.after_token
            for _ in range(MAX_WALK_PAGES):
                page = parse_messages(await self.matrix.request(api.last_messages(
                    token, record.room_id, limit=WALK_PAGE_SIZE, from_token=position, dir="f",
                    types=self.matrix.readable_types((MESSAGE_TYPE,)))))
                events = await self.matrix.decrypt(token, record.room_id, page.events)
                cursor = _number(events, known, cursor, fresh, deliverable)
                if page.end is None or not page.events:
                    break
                position = page.end
            else:
                if reanchor:
                    position = None
            if position is not None:
                await self.store.advance_timeline(session.id, handle, fresh, cursor, position)
                return fresh
            log.info("Room handle {handle} of session {id} is far behind: re-anchoring",
                     handle=handle, id=session.id)
            fresh = []
            cursor = record.last_cursor + 1  # a gap in the numbering: the device sees it lost messages
        # First use (or re-anchoring): the newest message, and "now" as the position.
        page = parse_messages(await self.matrix.request(api.last_messages(
            token, record.room_id, limit=1, types=self.matrix.readable_types((MESSAGE_TYPE,)))))
        latest = [event for event in await self.matrix.decrypt(token, record.room_id, page.events)
                  if deliverable(event)]
        if latest:
            cursor += 1
            fresh.append(_stored(cursor, latest[0]))
        await self.store.advance_timeline(session.id, handle, fresh[-1:], cursor, page.start)
        return fresh[-1:]

    # ------------------------------------------------------------------ history

    async def history(self, session: SessionRecord, handle: int, start: int | None,
                      count: int) -> tuple[int | None, list[StoredMessage]]:
        """A page of ``|count|`` messages before (count < 0; ``start`` None: now) or after the event
        reference ``start``, oldest first, each with its reference in ``cursor``; and the reference
        the next page that way starts from (None: this one reached the room's start, or its newest).

        Numbered messages come from the store; forward past the newest, the room is walked on
        (without re-anchoring: nothing is skipped); before the kept ones, or from a historic
        reference, pages come from the homeserver and get references (`Store.reference`).
        """
        record = await self.room(session, handle)
        historic = start is not None and start > HISTORIC_FLOOR
        if start is not None and (historic or start > record.last_cursor):
            await self.event_id(session, handle, start)  # 4.04 before anything reaches the homeserver
        if count > 0:
            return await self._forward(session, record, start, count, historic)
        if start is None:
            await self.advance(session, handle)
            start = MAX_STORED_NUMBER
        page = [] if historic else await self.store.messages_around(session.id, handle, start, count)
        if len(page) == -count:
            return page[0].cursor, page
        anchor = page[0].event_id if page else await self.store.event_id_at(session.id, handle, start)
        if anchor is None and start != MAX_STORED_NUMBER:
            raise NotFound("event reference out of the kept window")
        more, older = await self._homeserver_page(session, record, anchor, count + len(page))
        page = older + page
        return (page[0].cursor if more and page else None), page

    async def _forward(self, session: SessionRecord, record: RoomRecord, start: int | None, count: int,
                       historic: bool) -> tuple[int | None, list[StoredMessage]]:
        assert start is not None
        if historic:
            more, page = await self._homeserver_page(session, record, await self.event_id(
                session, record.handle, start), count)
            return (page[-1].cursor if more and page else None), page
        page = await self.store.messages_around(session.id, record.handle, start, count + 1)
        if len(page) <= count:
            await self.advance(session, record.handle, reanchor=False)
            page = await self.store.messages_around(session.id, record.handle, start, count + 1)
        more = len(page) > count
        page = page[:count]
        return (page[-1].cursor if more else None), page

    async def _homeserver_page(self, session: SessionRecord, record: RoomRecord, anchor: str | None,
                               count: int) -> tuple[bool, list[StoredMessage]]:
        """``|count|`` messages before (count < 0) or after the event ``anchor`` (None: the room's
        end), oldest first, referenced; and whether the homeserver has more that way."""
        token = session.access_token
        position: str | None = None
        if anchor is not None:
            around = await self.matrix.request(api.context(token, record.room_id, anchor))
            position = around.get("start" if count < 0 else "end")
            if not isinstance(position, str):
                raise InvalidResponse("context: no pagination token")
        wanted = abs(count)
        events: list[Event] = []
        more = True  # unless the homeserver says it has no more (a short chunk alone does not)
        for _ in range(MAX_WALK_PAGES):
            page = parse_messages(await self.matrix.request(api.last_messages(  # one more: is there more?
                token, record.room_id, limit=wanted + 1 - len(events), from_token=position,
                dir="b" if count < 0 else "f")))
            events += page.events
            if len(events) > wanted or page.end is None:
                more = len(events) > wanted
                break
            position = page.end
        deliverable = self._deliverable(session, record.room_id)  # history too: allowed senders only
        usable = [_stored(0, event) for event in events[:wanted] if deliverable(event)]
        # Backward pages arrive newest first and are referenced so: historic references go down with time.
        referenced = await self.store.reference(session.id, record.handle, usable)
        if count < 0:
            referenced.reverse()
        return more, referenced

    async def timeline_arrived(self, session: SessionRecord, handle: int, events: Sequence[Event],
                               position: str) -> list[StoredMessage]:
        """Number the events of a complete /sync timeline; ``position`` (its next_batch) follows them.

        Only for a room whose every message up to the /sync's ``since`` is numbered
        (see `_run`): then these events are all that is new, and no ``/messages``
        walk is needed.  Events a walk already numbered are skipped; if nothing was
        new, the walk position stays where it is (it may already be past ``position``).
        """
        lock = self._lock(session.id, handle)
        await lock.acquire()
        try:
            record = await self.room(session, handle)
            if record.after_token is None:
                return await self._advance(session, handle)
            known = await self.store.known_event_ids(session.id, handle)
            fresh: list[StoredMessage] = []
            events = await self.matrix.decrypt(session.access_token, record.room_id, events)
            cursor = _number(events, known, record.last_cursor, fresh, self._deliverable(session, record.room_id))
            if fresh:
                await self.store.advance_timeline(session.id, handle, fresh, cursor, position)
            log.debug("Room handle {handle} of compact session {id}: {count} numbered from /sync",
                      handle=handle, id=session.id, count=len(fresh))
            return fresh
        finally:
            lock.release()

    async def messages_arrived(self, session: SessionRecord, room_ids: set[str],
                               timelines: Mapping[str, tuple[Sequence[Event], str]] | None = None) -> None:
        """Something (the sync loop) saw new messages in ``room_ids``: number and push them.

        ``timelines``: rooms whose /sync timeline is complete, with its events and
        next_batch (numbered from it); the other rooms are walked forward.
        """
        timelines = timelines or {}
        for record in await self.store.rooms(session.id):
            if record.room_id in room_ids:
                timeline = timelines.get(record.room_id)
                try:
                    if timeline is not None:
                        fresh = await self.timeline_arrived(session, record.handle, *timeline)
                    else:
                        fresh = await self.advance(session, record.handle)
                except MatrixError as error:
                    if error.http_status == 401 or is_transient(error):
                        raise
                    # E.g. the user left the room: it must not hold up the session's other rooms.
                    log.info("Room handle {handle} of compact session {id} not readable: {error}",
                             handle=record.handle, id=session.id, error=error.errcode or error.http_status)
                    continue
                for message in fresh:
                    if self.on_message is not None:
                        self.on_message(session, record.handle, message)

    # ------------------------------------------------------------------ /sync loops

    def watch(self, session: SessionRecord) -> None:
        """Make sure ``session`` has its /sync loop running.

        A new loop takes a long-poll slot of the current device (the one whose
        observation starts it); without a free one: 4.29 / 5.03 with Max-Age.
        """
        if isinstance(session.access_token, AppserviceToken) and self.acting is not None:
            self._feed(session)
            return
        loop = self._loops.get(session.id)
        if loop is not None and not loop.stopped:
            return
        loop = self._loops[session.id] = _SyncLoop(session, self.long_polls.lease())
        loop.deferred = defer.ensureDeferred(self._run(loop))
        loop.deferred.addErrback(self._loop_failed, loop)

    def _feed(self, session: SessionRecord) -> None:
        """Watch an appservice session from the event stream: index its rooms, then catch them up."""
        if session.id in self._fed:
            return
        self._fed[session.id] = session
        indexed = defer.ensureDeferred(self._index_and_catch_up(session))
        indexed.addErrback(lambda failure: log.failure("Could not start the watch of compact session {id}",
                                                       failure, id=session.id))

    async def _index_and_catch_up(self, session: SessionRecord) -> None:
        records = await self.store.rooms(session.id)
        # Only rooms the user is in now: it may have been removed from one while nothing watched
        # (during a restart, say), and the homeserver keeps pushing that room for the others.
        joined = (await self.matrix.request(api.joined_rooms(session.access_token))).get("joined_rooms")
        if session.id not in self._fed:
            return
        if isinstance(joined, list):
            records = [record for record in records if record.room_id in joined]
        for record in records:
            self._fed_rooms.setdefault(record.room_id, {})[session.id] = record.handle
        # What arrived between the device's FETCH and the index is found by one walk per room.
        await self.messages_arrived(session, {record.room_id for record in records})

    def _unfeed(self, session_id: int) -> None:
        if self._fed.pop(session_id, None) is None:
            return
        for room_id in [room_id for room_id, sessions in self._fed_rooms.items() if session_id in sessions]:
            del self._fed_rooms[room_id][session_id]
            if not self._fed_rooms[room_id]:
                del self._fed_rooms[room_id]

    async def rooms_arrived(self, room_id: str, events: Sequence[Event]) -> None:
        """An event-stream listener: number ``events`` for every session watching ``room_id``, push them."""
        watchers = self._fed_rooms.get(room_id)
        if not watchers:
            return
        # The homeserver goes on pushing a room a device user left (or was removed from) while another
        # device user is in it: that session gets what came before, and the room leaves its index.
        ended = self._memberships_ended(room_id, watchers, events)
        indexed = [(index, _stored(0, event)) for index, event in enumerate(events) if _usable(event)]
        if not indexed:
            return
        candidates = [message for _index, message in indexed]
        asking = min(self._fed_rooms.get(room_id) or ended)
        after_last = await self._position_after(room_id, candidates[-1].event_id, asking)
        arrivals = {pair: candidates for pair in self._fed_rooms.get(room_id, {}).items()}  # as it is now
        for session_id, (handle, end) in ended.items():
            arrivals[(session_id, handle)] = [message for index, message in indexed if index < end]
        for (session_id, handle), messages in arrivals.items():
            fed = self._fed.get(session_id)
            allowed = self._sender_allowed(fed, room_id) if fed is not None else lambda sender: False
            arrivals[(session_id, handle)] = [message for message in messages if allowed(message.sender)]
        pairs = sorted(arrivals)
        locks = [self._lock(session_id, handle) for session_id, handle in pairs]
        for lock in locks:
            await lock.acquire()
        try:
            numbered = await self.store.append_messages(
                [(session_id, handle, arrivals[(session_id, handle)]) for session_id, handle in pairs], after_last)
        finally:
            for lock in locks:
                lock.release()
        batch = [(self._fed[session_id], handle, message)
                 for (session_id, handle), fresh in zip(pairs, numbered) if session_id in self._fed
                 for message in fresh]
        if batch and self.on_messages is not None:
            for session_id in self.on_messages(batch):
                if not self.is_observed(self._fed[session_id]):
                    log.debug("Compact session {id} has no observers left: its watch ends", id=session_id)
                    self._unfeed(session_id)

    async def _position_after(self, room_id: str, event_id: str, session_id: int) -> str | None:
        """The pagination token just after ``event_id`` (one call per room, whatever the watchers),
        so a later walk of a watching session starts there; None (the walk re-reads) on trouble."""
        session = self._fed.get(session_id)
        if session is None:
            return None
        try:
            body = await self.matrix.request(api.context(session.access_token, room_id, event_id))
        except (HomeserverError, ServiceUnavailable) as error:
            log.info("No position after {event} in {room}: {error}", event=event_id, room=room_id,
                     error=_describe(error))
            return None
        end = body.get("end")
        return end if isinstance(end, str) and end else None

    def _memberships_ended(self, room_id: str, watchers: dict[int, int],
                           events: Sequence[Event]) -> dict[int, tuple[int, int]]:
        """Watching sessions whose user left or was removed from ``room_id`` in ``events``: their room
        handle and the index of that event.  They are taken out of the room's index at once."""
        ended: dict[int, tuple[int, int]] = {}
        for index, event in enumerate(events):
            if event.type != "m.room.member" or event.content.get("membership") not in ("leave", "ban"):
                continue
            for session_id, handle in list(watchers.items()):
                fed = self._fed.get(session_id)
                if fed is not None and fed.user_id == event.state_key:
                    ended[session_id] = (handle, index)
                    del watchers[session_id]
        if not watchers:
            self._fed_rooms.pop(room_id, None)
        return ended

    def watching(self, session_id: int) -> bool:
        fed = self._fed.get(session_id)
        if fed is not None:
            # No loop notices observers that left while nothing was pushed: ask (else it never idles out).
            return self.is_observed(fed)
        loop = self._loops.get(session_id)
        return loop is not None and not loop.stopped

    def _loop_failed(self, failure: Failure, loop: _SyncLoop) -> None:
        loop.stopped = True
        if not failure.check(defer.CancelledError):
            log.failure("Sync loop of compact session {id} failed", failure, id=loop.session.id)

    def _stop_loop(self, session_id: int) -> None:
        loop = self._loops.pop(session_id, None)
        if loop is not None:
            loop.stopped = True
            if loop.deferred is not None:
                loop.deferred.cancel()

    def stop(self) -> None:
        if self._sweeper is not None:
            if self._sweeper.running:
                self._sweeper.stop()
            self._sweeper = None
        for session_id in list(self._loops):
            self._stop_loop(session_id)

    async def _sync(self, loop: _SyncLoop, since: str | None) -> SyncResponse:
        """One /sync of a session loop over the long-poll pool, with its own deadline."""
        timeout_ms = 0 if since is None else self.long_poll_ms
        req = api.sync(loop.session.access_token, since=since, timeout_ms=timeout_ms, filter=SYNC_FILTER)
        _status, body = await self.long_polls.request(req, timeout_ms / 1000.0 + DEADLINE_MARGIN, loop.lease)
        return parse_sync(body)

    async def _run(self, loop: _SyncLoop) -> None:
        try:
            await self._loop(loop)
        finally:
            loop.lease.release()

    async def _loop(self, loop: _SyncLoop) -> None:
        session = loop.session
        since: str | None = None
        # Rooms whose every message up to ``since`` is numbered: a complete /sync timeline of
        # one of them holds all that is new.  A room joins the set once a /sync of this loop
        # has been handled for it (the first one walks every room forward).
        caught_up: set[str] = set()
        backoff = Backoff(random=self.jitter)
        log.debug("Compact session {id}: sync loop started", id=session.id)
        while not loop.stopped:
            try:
                sync = await self._sync(loop, since)
                await self._crypto_news(session, sync)
                joined = sync.body.get("rooms", {}).get("join", {}) if isinstance(sync.body, Mapping) else {}
                timelines: dict[str, tuple[Sequence[Event], str]] = {}
                if since is None:
                    # Anything between the device's FETCH (or the trouble) and this position is caught up.
                    rooms = {record.room_id for record in await self.store.rooms(session.id)}
                else:
                    rooms = set()
                    for room_id, room in joined.items():
                        timeline = room.get("timeline") if isinstance(room, Mapping) else None
                        if isinstance(timeline, Mapping) and timeline.get("events"):
                            rooms.add(room_id)
                            events = _complete_timeline(timeline) if room_id in caught_up else None
                            if events is not None:
                                timelines[room_id] = (events, sync.next_batch)
                if rooms:
                    await self.messages_arrived(session, rooms, timelines)
                caught_up |= rooms
                since = sync.next_batch
            except (HomeserverError, ServiceUnavailable) as error:
                if isinstance(error, MatrixError) and error.http_status == 401:
                    log.info("Sync loop of compact session {id}: token refused, stopping", id=session.id)
                    break
                # Keep the position (since): the next /sync sees the same news again.  A 5.03 is the
                # upstream cap refusing the walk (overload): waited out like homeserver trouble.
                delay = retry_delay(backoff, error) if isinstance(error, HomeserverError) else backoff.next()
                log.info("Sync loop of compact session {id}: {error}; retrying in {delay:.1f} s",
                         id=session.id, error=_describe(error), delay=delay)
                await task.deferLater(self.reactor, delay, lambda: None)
                continue
            backoff.reset()
            if not self.is_observed(session):
                log.debug("Compact session {id} has no observers left: sync loop ends", id=session.id)
                break
        loop.stopped = True
        if self._loops.get(session.id) is loop:
            del self._loops[session.id]


    async def _crypto_news(self, session: SessionRecord, sync: SyncResponse) -> None:
        """Hand a /sync answer's to-device events and key news to E2EE (they are the device's only copy)."""
        try:
            await self.matrix.sync_arrived(session.access_token, sync.body)
        except defer.CancelledError:
            raise
        except (HomeserverError, ServiceUnavailable) as error:
            log.info("Compact session {id}: E2EE news of a /sync not taken: {error}", id=session.id,
                     error=_describe(error))
        except Exception:
            log.failure("Compact session {id}: E2EE news of a /sync not taken", id=session.id)


def _complete_timeline(timeline: Mapping[str, Any]) -> list[Event] | None:
    """The events of a /sync room timeline that holds everything since the last /sync, else None."""
    if timeline.get("limited") is not False:  # limited, or a server that does not say: walk
        return None
    try:
        return [parse_event(event) for event in timeline.get("events", ())]
    except InvalidResponse:
        return None


def _describe(error: Exception) -> str:
    """A short, secret-free reason for the log (Matrix errors are redacted when built)."""
    return str(error) if isinstance(error, MatrixError) else type(error).__name__


def _number(events: Sequence[Event], known: set[str], cursor: int, fresh: list[StoredMessage],
            deliverable: Callable[[Event], bool]) -> int:
    """Number the deliverable events not in ``known`` after ``cursor`` into ``fresh``; the last cursor."""
    for event in events:
        if deliverable(event) and event.event_id not in known:
            cursor += 1
            known.add(event.event_id)
            fresh.append(_stored(cursor, event))
    return cursor


def _stored(cursor: int, event: Event) -> StoredMessage:
    body = event.content.get("body")
    msgtype = event.content.get("msgtype")
    return StoredMessage(cursor, event.event_id, event.sender, body if isinstance(body, str) else "",
                         event.origin_server_ts, msgtype if isinstance(msgtype, str) else "m.text")
