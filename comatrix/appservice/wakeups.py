"""Which device users have news: wakes the ``/sync`` observations of device users from the event stream.

In application-service mode an MSC3079 ``/sync`` observation of a provisioned
device does not hold a long-poll: it waits on a `Waiter` and syncs (without
waiting on the homeserver) when its user has news.  A user has news when a
transaction carries an event of a room the user is joined to, or a membership
event about the user (an invitation, a join, a leave).  The joined rooms of a
user are read once (``/joined_rooms``) when its first observation starts and
then kept from its membership events.  A waiter also wakes after a fallback
period, for what transactions do not carry (to-device messages, account data).
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet import defer

from comatrix.appservice.stream import member_events, membership
from comatrix.logs import get_logger
from comatrix.matrix import api
from comatrix.matrix.client import MatrixClient
from comatrix.matrix.responses import Event

log = get_logger(__name__)

__all__ = ["FALLBACK_SECONDS", "Waiter", "Wakeups"]

#: Longest a fed observation waits without news before it syncs anyway.
FALLBACK_SECONDS = 300.0

_JOINED = frozenset({"join"})


class Waiter:
    """One observation's wake-up: `next` fires on news (or news that came meanwhile), else at the fallback."""

    def __init__(self, wakeups: "Wakeups", user_id: str, reactor: Any) -> None:
        self.wakeups = wakeups
        self.user_id = user_id
        self._reactor = reactor
        self._news = False
        self._deferred: defer.Deferred[None] | None = None

    def wake(self) -> None:
        waiting, self._deferred = self._deferred, None
        if waiting is None:
            self._news = True  # for the next `next`: the observation is syncing right now
        else:
            waiting.callback(None)

    def next(self, fallback: float = FALLBACK_SECONDS) -> "defer.Deferred[None]":
        if self._news:
            self._news = False
            return defer.succeed(None)
        waiting: defer.Deferred[None] = defer.Deferred()
        self._deferred = waiting
        timer = self._reactor.callLater(fallback, self.wake)

        def done(result: Any) -> Any:  # woken, fallen back or cancelled
            if timer.active():
                timer.cancel()
            if self._deferred is waiting:
                self._deferred = None
            return result
        waiting.addBoth(done)
        return waiting

    def release(self) -> None:
        self.wakeups.release(self)


class Wakeups:
    """An event-stream listener that knows the joined rooms of users being observed."""

    def __init__(self, matrix: MatrixClient, reactor: Any) -> None:
        self._matrix = matrix
        self._reactor = reactor
        self._rooms_of: dict[str, set[str]] = {}
        self._users_in: dict[str, set[str]] = {}
        self._waiters: dict[str, set[Waiter]] = {}

    async def track(self, token: api.AppserviceToken) -> Waiter:
        """A waiter for ``token``'s user (its joined rooms are read when it is the first)."""
        user_id = token.user_id
        waiter = Waiter(self, user_id, self._reactor)
        self._waiters.setdefault(user_id, set()).add(waiter)
        if user_id not in self._rooms_of:
            self._rooms_of[user_id] = set()
            try:
                body = await self._matrix.request(api.joined_rooms(token))
            except BaseException:
                # The caller gets no waiter to release; an empty set kept would stop the next read.
                self.release(waiter)
                self._rooms_of.pop(user_id, None)
                raise
            rooms = body.get("joined_rooms")
            for room_id in rooms if isinstance(rooms, list) else ():
                if isinstance(room_id, str) and user_id in self._rooms_of:
                    self._join(user_id, room_id)
        return waiter

    def release(self, waiter: Waiter) -> None:
        user_id = waiter.user_id
        waiters = self._waiters.get(user_id)
        if waiters is None:
            return
        waiters.discard(waiter)
        if not waiters:
            del self._waiters[user_id]
            for room_id in self._rooms_of.pop(user_id, set()):
                self._leave(user_id, room_id)

    def joined(self, user_id: str) -> frozenset[str]:
        return frozenset(self._rooms_of.get(user_id, ()))

    def _join(self, user_id: str, room_id: str) -> None:
        self._rooms_of[user_id].add(room_id)
        self._users_in.setdefault(room_id, set()).add(user_id)

    def _leave(self, user_id: str, room_id: str) -> None:
        users = self._users_in.get(room_id)
        if users is not None:
            users.discard(user_id)
            if not users:
                del self._users_in[room_id]

    def __call__(self, room_id: str, events: Sequence[Event]) -> None:
        woken = set(self._users_in.get(room_id, ()))
        for event in member_events(events):
            user_id = event.state_key
            if user_id is None or user_id not in self._rooms_of:
                continue
            if membership(event) in _JOINED:
                self._join(user_id, room_id)
            else:
                self._rooms_of[user_id].discard(room_id)
                self._leave(user_id, room_id)
            woken.add(user_id)
        for user_id in woken:
            for waiter in list(self._waiters.get(user_id, ())):
                waiter.wake()
