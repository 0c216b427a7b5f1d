"""One stream of new events for every device: application-service transactions in, listeners out.

The homeserver pushes the events of the gateway's namespace in transactions
(`comatrix.appservice.server` hands each one to `EventStream.transaction`).
The stream handles them one at a time, in order, and:

* answers a retried transaction (the id it handled last, kept in the store)
  without handling it again;
* drops events an earlier transaction carried (their ids are kept in the store,
  across restarts), so an event reaches each listener once;
* hands the rest to its listeners, room by room (compact watches, plugins:
  `subscribe`), each event parsed once;
* records the transaction as handled only when every listener is done, so a
  transaction the gateway dies in is pushed again, and its events delivered then.

A listener that fails is logged and does not fail the transaction: the
homeserver would push it again and again, and the other listeners would see
its events twice.
"""

from __future__ import annotations

import inspect
from typing import Any, Awaitable, Callable, Mapping, Sequence

from twisted.internet import defer

from comatrix.logs import get_logger
from comatrix.matrix.errors import InvalidResponse
from comatrix.matrix.responses import Event, parse_event
from comatrix.store import Store

log = get_logger(__name__)

__all__ = ["EventStream", "RoomListener"]

#: Called with a room id and that room's new events of one transaction, oldest first.
RoomListener = Callable[[str, Sequence[Event]], "Awaitable[None] | None"]


class EventStream:
    """Transactions in; each new event, once, to every listener."""

    def __init__(self, store: Store, reactor: Any) -> None:
        self._store = store
        self._reactor = reactor
        self._listeners: list[RoomListener] = []
        self._lock = defer.DeferredLock()
        #: Transactions handled and events delivered since start (for logs and benchmarks).
        self.transactions = 0
        self.delivered = 0

    def subscribe(self, listener: RoomListener) -> Callable[[], None]:
        """Call ``listener`` for every room with new events; returns the way to unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    async def transaction(self, txn_id: str, events: Sequence[Any]) -> bool:
        """Handle one transaction; False when it is the last one handled already (a retry)."""
        await self._lock.acquire()
        try:
            if txn_id == await self._store.last_appservice_transaction():
                log.debug("Appservice transaction {txn} was handled already", txn=txn_id)
                return False
            fresh = await self._fresh(events)
            await self._deliver(fresh)
            await self._store.finish_appservice_transaction(txn_id, [event.event_id for event in fresh],
                                                            self._reactor.seconds())
            self.transactions += 1
            self.delivered += len(fresh)
            log.debug("Appservice transaction {txn}: {count} new event(s)", txn=txn_id, count=len(fresh))
            return True
        finally:
            self._lock.release()

    async def _fresh(self, raw_events: Sequence[Any]) -> list[Event]:
        """The transaction's well-formed room events no earlier transaction carried, in order."""
        parsed: dict[str, Event] = {}
        for raw in raw_events:
            try:
                event = parse_event(raw)
            except InvalidResponse as error:
                log.info("Appservice transaction: skipping a malformed event ({error})", error=str(error))
                continue
            if event.room_id is not None and event.event_id not in parsed:
                parsed[event.event_id] = event
        seen = await self._store.seen_events(parsed)
        return [event for event_id, event in parsed.items() if event_id not in seen]

    async def _deliver(self, events: Sequence[Event]) -> None:
        by_room: dict[str, list[Event]] = {}
        for event in events:
            assert event.room_id is not None
            by_room.setdefault(event.room_id, []).append(event)
        for room_id, room_events in by_room.items():
            log.debug("Appservice events: {count} in {room}", count=len(room_events), room=room_id)
        for listener in list(self._listeners):
            for room_id, room_events in by_room.items():
                try:
                    result = listener(room_id, room_events)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    log.failure("An event listener failed on room {room}", room=room_id)


def member_events(events: Sequence[Event]) -> list[Event]:
    """The membership events of ``events`` (state events of type m.room.member)."""
    return [event for event in events if event.type == "m.room.member" and isinstance(event.state_key, str)]


def membership(event: Event) -> str | None:
    value = event.content.get("membership") if isinstance(event.content, Mapping) else None
    return value if isinstance(value, str) else None
