"""Webhooks fed by a service's own /sync loop (token mode), against a real Synapse.

In-process: `comatrix.webhooks.Webhooks` and `ServiceEvents` on the test's
reactor, the long-polls through a real `comatrix.longpoll.LongPoller` to the
test Synapse, deliveries to a real loopback receiver.  Synapse is driven from a
thread (its helpers block), so the reactor keeps serving the long-poll.
Checks what a scripted homeserver cannot: that Synapse honours the loop's
filter (subscribed rooms and event types only), that a subscription added
while a long-poll waits gets its room's next event, and that each message
arrives once, signed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from comatrix.longpoll import LongPoller
from comatrix.store import Store
from comatrix.webhooks import ServiceEvents, WebhookSettings, Webhooks
from support.synapse import MatrixUser, SynapseServer
from support.webhook_receiver import WebhookReceiver, eventually, pause

pytestmark = pytest.mark.integration

SECRET = b"logger-service-token"
#: Longest wait for a message to go from Synapse through /sync to the receiver.
ARRIVAL = 30.0


def in_thread(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return threads.deferToThread(call, *args, **kwargs)


@pytest_twisted.ensureDeferred
async def test_a_services_sync_loop_delivers_its_subscribed_rooms_events_once(
        synapse: SynapseServer, synapse_user: Callable[..., MatrixUser], tmp_path: Path) -> None:
    service_user: MatrixUser = await in_thread(synapse_user, "hookservice")
    bob: MatrixUser = await in_thread(synapse_user, "hookbob")
    rooms = []
    for _ in range(2):
        room = await in_thread(synapse.create_room, service_user.access_token, preset="public_chat")
        await in_thread(synapse.join, bob.access_token, room)
        rooms.append(room)
    first_room, second_room = rooms

    receiver = WebhookReceiver()
    url = receiver.listen()
    store = Store(str(tmp_path / "comatrix.sqlite3"))
    webhooks = Webhooks(store, reactor, WebhookSettings(webhook_backoff=0.05), lambda service: SECRET)
    poller = LongPoller.for_homeserver(synapse.base_url, reactor, connect_timeout=5.0)
    events = ServiceEvents(webhooks, poller, reactor,
                           lambda service: (service_user.user_id, service_user.access_token),
                           long_poll_seconds=10.0)
    events.start()
    try:
        await webhooks.start()
        first = await webhooks.subscribe("logger", first_room, url, ["m.room.message"])
        assert events.running("logger")
        await _positioned(store, service_user.user_id)

        await in_thread(synapse.send_text, bob.access_token, first_room, "hello webhooks")
        await in_thread(synapse.send_event, bob.access_token, first_room, "org.example.reading", {"value": 21})
        await in_thread(synapse.send_text, bob.access_token, second_room, "not subscribed yet")
        # Once this one is delivered, the loop's position is past everything before it.
        await in_thread(synapse.send_text, bob.access_token, first_room, "hello again")
        await eventually(lambda: len(receiver.received) == 2, ARRIVAL)

        # A long-poll is waiting with the first room's filter: the new subscription makes it ask again.
        second = await webhooks.subscribe("logger", second_room, url, ["m.room.message"])
        await pause(0.5)
        await in_thread(synapse.send_text, bob.access_token, second_room, "now subscribed")
        await eventually(lambda: len(receiver.received) == 3, ARRIVAL)
        await pause(1.0)  # nothing else comes

        bodies = [json.loads(got.body) for got in receiver.received]
        assert [(b["subscription_id"], b["room_id"], b["event"]["content"]["body"], b["event"]["sender"])
                for b in bodies] == [(first, first_room, "hello webhooks", bob.user_id),
                                     (first, first_room, "hello again", bob.user_id),
                                     (second, second_room, "now subscribed", bob.user_id)]
        for got in receiver.received:
            assert got.headers[b"x-comatrix-signature"].decode() == \
                "sha256=" + hmac.new(SECRET, got.body, hashlib.sha256).hexdigest()
            assert got.headers[b"x-comatrix-event-id"].decode() == json.loads(got.body)["event"]["event_id"]
        assert webhooks.delivered == 3 and webhooks.retried == 0
    finally:
        events.stop()
        webhooks.stop()
        await poller.close()
        store.close()
        await receiver.close()


async def _positioned(store: Store, user_id: str) -> None:
    """Wait until the loop has taken its starting position (what comes next is delivered)."""
    for _ in range(int(ARRIVAL / 0.05)):
        if await store.webhook_sync_position("logger", user_id) is not None:
            return
        await pause(0.05)
    raise AssertionError("the service's /sync loop took no position")
