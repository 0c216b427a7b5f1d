"""`comatrix.webhooks.Webhooks` against a real loopback receiver and the real SQLite store.

Retries with back-off, exactly one successful delivery, the signature, the
dead letters after the last retry, a delivery pending at a stop made after the
next start, unsubscribing, the allow-list of destination hosts and the caps.
Back-off delays are a few milliseconds; nothing sleeps long.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import globalLogPublisher, formatEvent
from twisted.web.http_headers import Headers

from comatrix.matrix.responses import Event
from comatrix.store import DEAD_LETTERS_KEPT, Store
from comatrix.webhooks import AgentPoster, HostNotAllowed, WebhookRefused, WebhookSettings, Webhooks
from support.webhook_receiver import HANG, WebhookReceiver, eventually, pause

ROOM = "!room:test.local"
SECRET = b"logger-service-token"
FAST = WebhookSettings(webhook_backoff=0.01, webhook_timeout_ms=2000)


def event(n: int, event_type: str = "m.room.message") -> Event:
    return Event(f"$event{n}", event_type, "@bob:test.local", 1_732_445_500_000 + n,
                 {"msgtype": "m.text", "body": f"hi {n}"}, room_id=ROOM)


def secrets(service: str) -> bytes | None:
    return {"logger": SECRET, "alerts": b"alerts-token"}.get(service)


def made(store: Store, settings: WebhookSettings = FAST,
         secret_of: Callable[[str], bytes | None] = secrets) -> Webhooks:
    return Webhooks(store, reactor, settings, secret_of)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(str(tmp_path / "comatrix.sqlite3"))
    yield opened
    opened.close()


@pytest.fixture
def logged() -> Any:
    lines: list[str] = []

    def observe(log_event: dict[str, Any]) -> None:
        if log_event.get("log_namespace") == "comatrix.webhooks":
            lines.append(f"{log_event['log_level'].name} {formatEvent(log_event)}")
    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


@pytest_twisted.ensureDeferred
async def test_a_receiver_failing_twice_gets_the_event_on_the_third_try_exactly_once(store: Store) -> None:
    receiver = WebhookReceiver([500, 503, 200])
    url = receiver.listen()
    webhooks = made(store)
    await webhooks.start()
    try:
        sub = await webhooks.subscribe("logger", ROOM, url, ["m.room.message"])
        assert sub.startswith("sub-")
        await webhooks.events_arrived(ROOM, [event(1), event(2, "m.reaction")])
        await eventually(lambda: webhooks.delivered == 1)
        await pause(0.1)  # nothing more comes
        assert len(receiver.received) == 3 and webhooks.retried == 2
        bodies = {got.body for got in receiver.received}
        assert len(bodies) == 1  # every attempt the same body
        body = bodies.pop()
        assert json.loads(body) == {
            "subscription_id": sub, "room_id": ROOM,
            "event": {"type": "m.room.message", "event_id": "$event1", "sender": "@bob:test.local",
                      "content": {"msgtype": "m.text", "body": "hi 1"}, "origin_server_ts": 1_732_445_500_001}}
        for got in receiver.received:
            expected = "sha256=" + hmac.new(SECRET, got.body, hashlib.sha256).hexdigest()
            assert got.headers[b"x-comatrix-signature"].decode() == expected
            assert got.headers[b"x-comatrix-event-id"] == b"$event1"
            assert got.headers[b"content-type"] == b"application/json"
        assert await store.webhook_backlog() == set()
        assert await webhooks.dead_letters() == []
    finally:
        webhooks.stop()
        await receiver.close()


@pytest_twisted.ensureDeferred
async def test_a_receiver_that_never_succeeds_ends_in_the_dead_letters_after_3_retries(store: Store,
                                                                                       logged: list[str]) -> None:
    receiver = WebhookReceiver([500] * 10)
    url = receiver.listen()
    webhooks = made(store)
    await webhooks.start()
    try:
        sub = await webhooks.subscribe("logger", ROOM, url + "?key=query-secret", ["m.room.message"])
        await webhooks.events_arrived(ROOM, [event(1)])
        await eventually(lambda: webhooks.dead == 1)
        await pause(0.1)
        assert len(receiver.received) == 4  # the first attempt and 3 retries
        [letter] = await webhooks.dead_letters()
        assert (letter.subscription_id, letter.service, letter.event_id, letter.attempts, letter.reason) == (
            sub, "logger", "$event1", 4, "HTTP 500")
        assert letter.body == receiver.received[0].body
        assert await store.webhook_backlog() == set()
        warnings = [line for line in logged if line.startswith("warn") and "dead letters" in line]
        assert len(warnings) == 1 and "$event1" in warnings[0] and sub in warnings[0]
        assert not any("query-secret" in line or SECRET.decode() in line for line in logged)
    finally:
        webhooks.stop()
        await receiver.close()


@pytest_twisted.ensureDeferred
async def test_an_attempt_without_an_answer_in_time_is_retried(store: Store) -> None:
    receiver = WebhookReceiver([HANG, 200])
    url = receiver.listen()
    webhooks = made(store, dataclasses.replace(FAST, webhook_timeout_ms=200))
    await webhooks.start()
    try:
        await webhooks.subscribe("logger", ROOM, url, ["m.room.message"])
        await webhooks.events_arrived(ROOM, [event(1)])
        await eventually(lambda: webhooks.delivered == 1)
        assert len(receiver.received) == 2 and webhooks.retried == 1
    finally:
        webhooks.stop()
        await receiver.close()


@pytest_twisted.ensureDeferred
async def test_a_delivery_pending_at_stop_is_made_after_the_next_start(tmp_path: Path) -> None:
    receiver = WebhookReceiver([503, 200])
    url = receiver.listen()
    path = str(tmp_path / "comatrix.sqlite3")
    store = Store(path)
    slow_retry = dataclasses.replace(FAST, webhook_backoff=3600.0)
    try:
        first = made(store, slow_retry)
        await first.start()
        sub = await first.subscribe("logger", ROOM, url, ["m.room.message"])
        await first.events_arrived(ROOM, [event(1)])
        await eventually(lambda: first.retried == 1)  # failed once, waiting an hour for the retry
        first.stop()
    finally:
        store.close()
    assert len(receiver.received) == 1

    reopened = Store(path)
    try:
        second = made(reopened, slow_retry)
        await second.start()
        await eventually(lambda: second.delivered == 1)
        assert [s.id for s in second.subscriptions_of("logger")] == [sub]  # the subscription survived too
        assert len(receiver.received) == 2 and receiver.received[1].body == receiver.received[0].body
        assert await reopened.webhook_backlog() == set()
        second.stop()
    finally:
        reopened.close()
        await receiver.close()


@pytest_twisted.ensureDeferred
async def test_a_subscription_to_a_host_outside_the_allow_list_is_refused(store: Store) -> None:
    webhooks = made(store)
    await webhooks.start()
    refused = {"http://192.0.2.7:7004/hook": 403, "https://example.org/hook": 403, "http://127.0.0.2/hook": 403,
               "ftp://127.0.0.1/hook": 400, "http://user:pw@127.0.0.1/hook": 400, "http://127.0.0.1:port/": 400,
               "http://127.0.0.1/a b": 400, "127.0.0.1:7004": 400, "": 400}
    for url, status in refused.items():
        with pytest.raises(WebhookRefused) as caught:
            await webhooks.subscribe("logger", ROOM, url, ["m.room.message"])
        assert "pw" not in str(caught.value) and caught.value.status == status
    assert await store.webhook_subscriptions() == []
    for url in ("http://[::1]:7004/hook", "https://LOCALHOST/hook", "http://127.0.0.1/hook"):
        await webhooks.subscribe("logger", ROOM, url, ["m.room.message"])
    with pytest.raises(WebhookRefused):
        await webhooks.subscribe("logger", "general", "http://127.0.0.1/hook", ["m.room.message"])
    with pytest.raises(WebhookRefused):
        await webhooks.subscribe("logger", ROOM, "http://127.0.0.1/hook", [])
    webhooks.stop()


@pytest_twisted.ensureDeferred
async def test_the_agent_connects_to_allowed_hosts_only() -> None:
    """The check at connect time, for a URL that got past (or around) the subscription's."""
    poster = AgentPoster(reactor, WebhookSettings(webhook_hosts=("127.0.0.1",)))
    for url in ("http://192.0.2.7/hook", "http://localhost:1/hook"):
        with pytest.raises(HostNotAllowed):
            await poster.post(url, Headers(), b"{}")


@pytest_twisted.ensureDeferred
async def test_unsubscribe_stops_deliveries_and_only_the_owner_may(store: Store) -> None:
    receiver = WebhookReceiver([500] * 10)
    url = receiver.listen()
    webhooks = made(store, dataclasses.replace(FAST, webhook_backoff=3600.0))
    await webhooks.start()
    try:
        sub = await webhooks.subscribe("logger", ROOM, url, ["m.room.message"])
        await webhooks.events_arrived(ROOM, [event(1)])
        await eventually(lambda: webhooks.retried == 1)
        assert not await webhooks.unsubscribe("alerts", sub)  # another service's
        assert await store.webhook_backlog() == {sub}
        assert await webhooks.unsubscribe("logger", sub)
        assert not await webhooks.unsubscribe("logger", sub)
        assert await store.webhook_backlog() == set()
        await webhooks.events_arrived(ROOM, [event(2)])
        await pause(0.1)
        assert len(receiver.received) == 1 and await store.webhook_subscriptions() == []
    finally:
        webhooks.stop()
        await receiver.close()


@pytest_twisted.ensureDeferred
async def test_events_go_to_the_matching_subscriptions_of_the_named_service_only(store: Store) -> None:
    logger, alerts = WebhookReceiver(), WebhookReceiver()
    webhooks = made(store)
    await webhooks.start()
    try:
        for_logger = await webhooks.subscribe("logger", ROOM, logger.listen(), ["m.room.message", "m.room.member"])
        await webhooks.subscribe("alerts", ROOM, alerts.listen(), ["m.room.message"])
        member = dataclasses.replace(event(3, "m.room.member"), content={"membership": "join"},
                                     state_key="@bob:test.local")
        await webhooks.events_arrived(ROOM, [event(1), member], service="logger")
        await webhooks.events_arrived("!other:test.local", [event(4)])
        await eventually(lambda: webhooks.delivered == 2)
        await pause(0.1)
        assert alerts.received == []
        bodies = [json.loads(got.body) for got in logger.received]
        assert [b["event"]["event_id"] for b in bodies] == ["$event1", "$event3"]  # in order
        assert bodies[1]["event"]["state_key"] == "@bob:test.local" and bodies[1]["subscription_id"] == for_logger
        for got in alerts.received + logger.received:
            assert hmac.compare_digest(got.headers[b"x-comatrix-signature"].decode(),
                                       "sha256=" + hmac.new(SECRET, got.body, hashlib.sha256).hexdigest())
    finally:
        webhooks.stop()
        await logger.close()
        await alerts.close()


@pytest_twisted.ensureDeferred
async def test_subscriptions_and_the_queue_have_a_per_service_share_and_a_total(store: Store,
                                                                                logged: list[str]) -> None:
    settings = WebhookSettings(max_subscriptions_per_service=2, max_subscriptions=3,
                               max_deliveries_per_service=2, max_deliveries=3)
    webhooks = made(store, settings)  # not started: deliveries stay queued
    url = "http://127.0.0.1:9/hook"
    first = await webhooks.subscribe("logger", ROOM, url, ["m.room.message"])
    await webhooks.subscribe("logger", "!b:test.local", url, ["m.room.message"])
    with pytest.raises(WebhookRefused, match="of this service") as caught:
        await webhooks.subscribe("logger", ROOM, url, ["m.room.message"])
    assert caught.value.status == 429
    await webhooks.subscribe("alerts", ROOM, url, ["m.room.message"])
    with pytest.raises(WebhookRefused, match="too many webhook subscriptions$"):
        await webhooks.subscribe("alerts", ROOM, url, ["m.room.message"])  # the total
    assert await webhooks.unsubscribe("logger", first)
    await webhooks.subscribe("alerts", ROOM, url, ["m.room.message"])  # room again

    await webhooks.events_arrived(ROOM, [event(1), event(2)])  # 2 alerts subscriptions x 2 events
    letters = await webhooks.dead_letters("alerts")
    assert [(letter.event_id, letter.reason, letter.attempts) for letter in letters] == [
        ("$event2", "queue full", 0), ("$event2", "queue full", 0)]
    await webhooks.events_arrived(ROOM, [event(1)])  # queued already: not twice, not dead
    assert len(await webhooks.dead_letters()) == 2
    assert any(line.startswith("warn Webhook queue full") for line in logged)


def test_settings_from_the_http_api_table() -> None:
    settings = WebhookSettings.from_table({"webhook_timeout_ms": 2500, "webhook_hosts": ["[::1]", "Hooks.lan"],
                                           "webhook_retries": 2, "webhook_backoff": 0.5, "bind": "127.0.0.1"})
    assert (settings.timeout, settings.webhook_hosts, settings.webhook_retries) == (2.5, ("::1", "hooks.lan"), 2)
    assert [settings.delay(n) for n in (1, 2)] == [0.5, 1.0]
    assert WebhookSettings().webhook_hosts == ("127.0.0.1", "::1", "localhost")
    for bad in ({"webhook_timeout_ms": 0}, {"webhook_timeout_ms": 1.5}, {"webhook_hosts": "127.0.0.1"},
                {"webhook_hosts": []}, {"webhook_retries": -1}, {"webhook_backoff": True},
                {"max_subscriptions_per_service": 2000}, {"max_deliveries_per_service": 0}):
        with pytest.raises(ValueError):
            WebhookSettings.from_table(bad)


@pytest_twisted.ensureDeferred
async def test_deliveries_of_a_service_no_longer_configured_go_to_the_dead_letters(store: Store,
                                                                                    logged: list[str]) -> None:
    before = made(store, WebhookSettings(webhook_hosts=("127.0.0.1", "hooks.lan")))
    sub = await before.subscribe("logger", ROOM, "http://hooks.lan:7004/hook", ["m.room.message"])
    await before.events_arrived(ROOM, [event(1)])  # not started: queued

    after = made(store, FAST, secret_of=lambda service: None)  # the service left the config, the host the list
    await after.start()
    try:
        await eventually(lambda: after.dead == 1)
        [letter] = await after.dead_letters("logger")
        assert (letter.subscription_id, letter.attempts, letter.reason) == (sub, 0, "service no longer configured")
        assert any(line.startswith("warn") and "hooks.lan is no longer allowed" in line for line in logged)
    finally:
        after.stop()


@pytest_twisted.ensureDeferred
async def test_the_dead_letters_keep_the_newest_of_each_service(store: Store) -> None:
    webhooks = made(store, WebhookSettings(max_deliveries_per_service=1))  # not started
    await webhooks.subscribe("logger", ROOM, "http://127.0.0.1:9/hook", ["m.room.message"])
    await webhooks.events_arrived(ROOM, [event(n) for n in range(DEAD_LETTERS_KEPT + 11)])
    letters = await webhooks.dead_letters("logger", limit=1000)
    assert len(letters) == DEAD_LETTERS_KEPT
    assert letters[0].event_id == f"$event{DEAD_LETTERS_KEPT + 10}" and letters[-1].event_id == "$event11"
