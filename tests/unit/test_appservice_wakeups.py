"""Which device users have news (`comatrix.appservice.wakeups`): MSC3079 observations woken by the stream.

A tracked user's joined rooms are read once (``/joined_rooms``, acting as the
user), then kept from its membership events; news in one of them, or a
membership event about the user, wakes each of its waiters; a waiter with no
news wakes at the fallback.  A failed read leaves nothing behind: the next
observation reads again.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import task

from comatrix.appservice.wakeups import FALLBACK_SECONDS, Wakeups
from comatrix.matrix.api import AppserviceToken
from comatrix.matrix.client import MatrixClient
from comatrix.matrix.errors import HomeserverError
from comatrix.matrix.responses import Event, parse_event
from comatrix.matrix.testing import FakeHomeserver, ScriptedAnswer, run, stub_transport

AS_TOKEN = "as_token_of_the_wakeup_tests"
SENSOR, OTHER = "@comatrix_sensor01:test.local", "@comatrix_sensor02:test.local"


class WakeWorld:
    def __init__(self) -> None:
        self.homeserver = FakeHomeserver()
        self.homeserver.add_appservice(AS_TOKEN, "@comatrix_.*")
        self.alice = self.homeserver.add_user("alice", "pw")
        self.room, self.elsewhere = self.homeserver.new_room(self.alice), self.homeserver.new_room(self.alice)
        self.homeserver.members[self.room].add(SENSOR)
        self.clock = task.Clock()
        transport, _ = stub_transport(self.homeserver, self.clock)
        self.wakeups = Wakeups(MatrixClient(transport, reactor=self.clock), self.clock)

    def event(self, room: str, sender: str = "", **member: Any) -> Event:
        if member:
            self.homeserver.add_event(room, sender or self.alice, "m.room.member",
                                      {"membership": member["membership"]}, member["user"])
        else:
            self.homeserver.add_event(room, sender or self.alice, "m.room.message", {"body": "x"})
        return parse_event(self.homeserver.rooms[room][-1])


def fired(deferred: Any) -> bool:
    results: list[Any] = []
    deferred.addBoth(results.append)
    return bool(results)


def test_news_in_a_joined_room_wakes_the_users_waiters() -> None:
    world = WakeWorld()
    first = run(world.wakeups.track(AppserviceToken(AS_TOKEN, SENSOR)))
    second = run(world.wakeups.track(AppserviceToken(AS_TOKEN, SENSOR)))
    [read] = world.homeserver.calls("joined_rooms")  # once per user
    assert read.query == {"user_id": [SENSOR]}
    assert world.wakeups.joined(SENSOR) == {world.room}
    waits = [first.next(), second.next()]
    world.wakeups(world.elsewhere, [world.event(world.elsewhere)])  # not its room
    assert not any(fired(wait) for wait in waits)
    world.wakeups(world.room, [world.event(world.room)])
    assert all(fired(wait) for wait in waits)
    # News while the observation was syncing is kept for its next wait.
    world.wakeups(world.room, [world.event(world.room)])
    assert fired(first.next())


def test_membership_events_keep_the_joined_rooms() -> None:
    world = WakeWorld()
    waiter = run(world.wakeups.track(AppserviceToken(AS_TOKEN, SENSOR)))
    wait = waiter.next()
    world.wakeups(world.elsewhere, [world.event(world.elsewhere, membership="invite", user=SENSOR)])
    assert fired(wait)  # an invitation is news
    world.wakeups(world.elsewhere, [world.event(world.elsewhere, sender=SENSOR, membership="join", user=SENSOR)])
    assert world.wakeups.joined(SENSOR) == {world.room, world.elsewhere}
    world.wakeups(world.room, [world.event(world.room, membership="leave", user=SENSOR)])
    assert world.wakeups.joined(SENSOR) == {world.elsewhere}
    fired(waiter.next())  # consume the leave's news
    wait = waiter.next()
    world.wakeups(world.room, [world.event(world.room)])
    assert not fired(wait)  # a room it left is no news
    world.wakeups(world.room, [world.event(world.room, membership="join", user=OTHER)])
    assert not fired(wait)  # nor someone else's membership


def test_a_waiter_without_news_wakes_at_the_fallback() -> None:
    world = WakeWorld()
    waiter = run(world.wakeups.track(AppserviceToken(AS_TOKEN, SENSOR)))
    wait = waiter.next()
    world.clock.advance(FALLBACK_SECONDS - 1)
    assert not fired(wait)
    world.clock.advance(1)
    assert fired(wait) and world.clock.getDelayedCalls() == []
    woken = waiter.next()
    world.wakeups(world.room, [world.event(world.room)])
    assert fired(woken) and world.clock.getDelayedCalls() == []  # the fallback timer is cancelled


def test_release_forgets_the_user_with_its_last_waiter() -> None:
    world = WakeWorld()
    first = run(world.wakeups.track(AppserviceToken(AS_TOKEN, SENSOR)))
    second = run(world.wakeups.track(AppserviceToken(AS_TOKEN, SENSOR)))
    first.release()
    assert world.wakeups.joined(SENSOR) == {world.room}
    second.release()
    assert world.wakeups.joined(SENSOR) == frozenset()
    world.wakeups(world.room, [world.event(world.room)])  # nobody to wake: no error
    run(world.wakeups.track(AppserviceToken(AS_TOKEN, SENSOR)))
    assert len(world.homeserver.calls("joined_rooms")) == 2  # tracked again: read again


def test_a_failed_read_of_the_joined_rooms_leaves_nothing_behind() -> None:
    world = WakeWorld()
    world.homeserver.script("GET", ("_matrix", "client", "v3", "joined_rooms"),
                            ScriptedAnswer(502, b"bad gateway"))
    with pytest.raises(HomeserverError):
        run(world.wakeups.track(AppserviceToken(AS_TOKEN, SENSOR)))
    # The next observation of that user reads its rooms again, and is woken by news in them.
    waiter = run(world.wakeups.track(AppserviceToken(AS_TOKEN, SENSOR)))
    assert world.wakeups.joined(SENSOR) == {world.room}
    wait = waiter.next()
    world.wakeups(world.room, [world.event(world.room)])
    assert fired(wait)
    waiter.release()
    assert world.wakeups.joined(SENSOR) == frozenset()
