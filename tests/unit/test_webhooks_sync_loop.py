"""`comatrix.webhooks.ServiceEvents`: a service's /sync loop feeding its webhooks (token mode).

The homeserver side is a scripted long-poll transport (`support.scripted_sync`);
the deliveries go to a real loopback receiver through the real store.  The loop
runs while the service has subscriptions, takes its position on the first
/sync (nothing from before the subscription), delivers the subscribed rooms'
events of the next ones, keeps its position across a restart, and ends (its
long-poll cancelled, its position forgotten) with the last subscription.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor, task

from comatrix.longpoll import LongPoller
from comatrix.store import Store
from comatrix.webhooks import ServiceEvents, WebhookSettings, Webhooks
from support.scripted_sync import ScriptedSync
from support.webhook_receiver import WebhookReceiver, eventually

ROOM = "!room:test.local"
USER = "@logger:test.local"


def identity(service: str) -> tuple[str, str] | None:
    return (USER, "syt_logger_token") if service == "logger" else None


def raw_event(n: int, event_type: str = "m.room.message") -> dict[str, Any]:
    return {"type": event_type, "event_id": f"$e{n}", "sender": "@bob:test.local", "origin_server_ts": n,
            "content": {"msgtype": "m.text", "body": f"hi {n}"}}


def timeline(*events: dict[str, Any]) -> dict[str, Any]:
    return {"timeline": {"events": list(events), "limited": False}}


def service_events(webhooks: Webhooks, clock: task.Clock) -> tuple[ServiceEvents, ScriptedSync]:
    upstream = ScriptedSync(clock)
    events = ServiceEvents(webhooks, LongPoller(upstream, clock), clock, identity,  # type: ignore[arg-type]
                           jitter=lambda: 0.0)
    events.start()
    return events, upstream


@pytest_twisted.ensureDeferred
async def test_one_sync_loop_per_service_feeds_its_subscriptions_and_resumes_after_a_restart(tmp_path: Path) -> None:
    receiver = WebhookReceiver()
    url = receiver.listen()
    store = Store(str(tmp_path / "comatrix.sqlite3"))
    webhooks = Webhooks(store, reactor, WebhookSettings(webhook_backoff=0.01), lambda service: b"secret")
    clock = task.Clock()
    events, upstream = service_events(webhooks, clock)
    try:
        await webhooks.start()
        assert not events.running("logger") and upstream.calls == []
        upstream.outcomes = [{"next_batch": "s1", "rooms": {"join": {ROOM: timeline(raw_event(0))}}}]
        sub = await webhooks.subscribe("logger", ROOM, url, ["m.room.message"])
        await eventually(lambda: len(upstream.calls) == 2)  # the position, then the long-poll from it
        first, second = (query for _time, query in upstream.calls)
        assert "since" not in first and first["timeout"] == "0"
        assert json.loads(first["filter"])["room"]["rooms"] == [ROOM]
        assert json.loads(first["filter"])["room"]["timeline"]["types"] == ["m.room.message"]
        assert (second["since"], second["timeout"]) == ("s1", "25000")

        upstream.answer({"next_batch": "s2", "rooms": {"join": {
            ROOM: timeline(raw_event(1), raw_event(2, "m.reaction"), {"type": "junk"}),
            "!other:test.local": timeline(raw_event(3))}}})
        await eventually(lambda: len(upstream.calls) == 3 and webhooks.delivered == 1)
        [got] = receiver.received
        assert json.loads(got.body)["event"]["event_id"] == "$e1" and json.loads(got.body)["subscription_id"] == sub
        assert await store.webhook_sync_position("logger", USER) == "s2"
        assert upstream.since()[-1] == "s2"

        events.stop()  # the gateway stops: the long-poll is cancelled, the position stays
        assert upstream.waiting == []
        events, upstream = service_events(webhooks, clock)
        await eventually(lambda: len(upstream.calls) == 1)
        assert (upstream.calls[0][1]["since"], upstream.calls[0][1]["timeout"]) == ("s2", "25000")

        assert await webhooks.unsubscribe("logger", sub)  # the last one: the loop ends
        await eventually(lambda: not events.running("logger"))
        assert upstream.waiting == [] and len(upstream.calls) == 1
        assert await store.webhook_sync_position("logger", USER) is None
    finally:
        events.stop()
        webhooks.stop()
        store.close()
        await receiver.close()


@pytest_twisted.ensureDeferred
async def test_a_new_subscription_makes_the_running_long_poll_ask_again_with_it(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "comatrix.sqlite3"))
    webhooks = Webhooks(store, reactor, WebhookSettings(), lambda service: b"secret")
    clock = task.Clock()
    events, upstream = service_events(webhooks, clock)
    try:
        await webhooks.start()
        upstream.outcomes = [{"next_batch": "s1"}]
        await webhooks.subscribe("logger", ROOM, "http://127.0.0.1:9/hook", ["m.room.message"])
        await eventually(lambda: len(upstream.calls) == 2)
        await webhooks.subscribe("logger", "!b:test.local", "http://127.0.0.1:9/hook", ["m.room.member"])
        await eventually(lambda: len(upstream.calls) == 3)
        query = upstream.calls[2][1]
        assert query["since"] == "s1" and len(upstream.waiting) == 1
        assert json.loads(query["filter"])["room"]["rooms"] == ["!b:test.local", ROOM]
        assert json.loads(query["filter"])["room"]["timeline"]["types"] == ["m.room.member", "m.room.message"]
        await webhooks.subscribe("nobody", ROOM, "http://127.0.0.1:9/hook", ["m.room.message"])
        assert not events.running("nobody")  # no Matrix identity: no loop
    finally:
        events.stop()
        webhooks.stop()
        store.close()
