"""Reactions, redactions and read receipts in the compact profile.

A device names an event by its *event reference*: the cursor ``FETCH /v`` answered for
it in that room handle's numbering, resolved with `Store.event_id_at` (an unknown
reference is 4.04).  Every operation may be repeated after a lost answer without a
second effect on the homeserver:

* react: the event's annotations are looked up first (``/relations``); the user's
  own with that key already there is success.  A homeserver that refuses a duplicate
  annotation (``M_DUPLICATE_ANNOTATION``) is success too.  Requests of one session
  take turns, so a retry never races its original.
* remove: every annotation of the user with that key is redacted; none left is success.
* redact: the transaction id is a function of (session, event), so a repeated
  redaction is the first one.
* read: a receipt is a position; setting it twice changes nothing.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from twisted.internet import defer

from comatrix.coap.errors import NotFound
from comatrix.compact.service import MAX_STORED_NUMBER, CompactService
from comatrix.logs import get_logger
from comatrix.matrix.errors import MatrixError
from comatrix.store import SessionRecord

__all__ = ["RelationOperations", "own_reactions"]

log = get_logger(__name__)

DUPLICATE_ANNOTATION = "M_DUPLICATE_ANNOTATION"


def own_reactions(events: list[dict[str, Any]], user_id: str, key: str) -> list[str]:
    """Event ids of ``user_id``'s annotations with ``key`` among ``/relations`` events."""
    found = []
    for event in events:
        relates = event.get("content", {}).get("m.relates_to") if isinstance(event.get("content"), dict) else None
        if (event.get("sender") == user_id and isinstance(relates, dict) and relates.get("key") == key
                and isinstance(event.get("event_id"), str)):
            found.append(event["event_id"])
    return found


def _digest(event_id: str) -> str:
    return hashlib.sha256(event_id.encode("utf-8")).hexdigest()[:16]


class RelationOperations:
    """React, redact and read for compact sessions (one per gateway)."""

    def __init__(self, service: CompactService) -> None:
        self.service = service
        self.matrix = service.matrix
        #: Session id -> the lock its reactions take turns on (dropped when nobody holds or waits).
        self._locks: dict[int, defer.DeferredLock] = {}

    async def event(self, session: SessionRecord, handle: int, ref: int) -> tuple[str, str]:
        """(room id, event id) of an event reference; 4.04 for an unknown room handle or reference."""
        room = await self.service.room(session, handle)
        event_id = (await self.service.store.event_id_at(session.id, handle, ref)
                    if ref <= MAX_STORED_NUMBER else None)
        if event_id is None:
            raise NotFound("unknown event reference")
        return room.room_id, event_id

    async def react(self, session: SessionRecord, handle: int, ref: int, key: str, *, remove: bool = False) -> None:
        room_id, event_id = await self.event(session, handle, ref)
        lock = self._locks.setdefault(session.id, defer.DeferredLock())
        await lock.acquire()
        try:
            existing = own_reactions(await self.matrix.reactions(session.access_token, room_id, event_id),
                                     session.user_id, key)
            if remove:
                for reaction in existing:
                    await self.matrix.redact(session.access_token, room_id, reaction,
                                             f"c{session.id}.x{_digest(reaction)}")
            elif not existing:
                await self._annotate(session, room_id, event_id, key)
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self._locks.pop(session.id, None)

    async def _annotate(self, session: SessionRecord, room_id: str, event_id: str, key: str) -> None:
        try:
            await self.matrix.react(session.access_token, room_id, event_id, key,
                                    f"c{session.id}.r{secrets.token_hex(8)}")
        except MatrixError as error:
            if error.errcode != DUPLICATE_ANNOTATION:
                raise
            log.debug("Compact session {id}: reaction already there", id=session.id)

    async def redact(self, session: SessionRecord, handle: int, ref: int, reason: str | None) -> None:
        room_id, event_id = await self.event(session, handle, ref)
        await self.matrix.redact(session.access_token, room_id, event_id, f"c{session.id}.x{_digest(event_id)}",
                                 reason)

    async def read(self, session: SessionRecord, handle: int, ref: int) -> None:
        room_id, event_id = await self.event(session, handle, ref)
        await self.matrix.read_receipt(session.access_token, room_id, event_id)
