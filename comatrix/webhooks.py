"""Webhooks of the internal HTTP API: subscriptions, a persistent delivery queue, signed POSTs.

A service next to the devices subscribes to the events of a room
(``POST /internal/matrix/webhook/subscribe`` of the gateway-API spec, handled
by the HTTP API through `Webhooks.subscribe`); the gateway then POSTs each
matching event to the subscription's URL as the spec's JSON::

    {"subscription_id": "sub-...", "room_id": "!r:hs", "event": {"type": ..., "event_id": ...,
     "sender": ..., "content": {...}, "origin_server_ts": ...}}

(a state event, e.g. ``m.room.member``, also carries its ``state_key``).

Delivery.  Each (subscription, event) is a row of the gateway's SQLite store
(`comatrix.store`) holding the exact body; the row goes only when the receiver
answered 2xx, so a delivery pending when the gateway stops is made after it
starts again (`start`): at least once, never silently lost.  A receiver that
got an event twice (the gateway died between its 2xx and the row's removal)
recognises it by ``X-CoMatrix-Event-Id`` (with the subscription id of the body).
A failed attempt -- no connection, no complete answer within
``webhook_timeout_ms``, any status but 2xx (redirects are not followed) -- is
retried ``webhook_retries`` times (3: at most 4 attempts), after
``webhook_backoff`` seconds, then twice that, and so on; after the last one the
delivery moves to the dead letters (`dead_letters`) with a WARN line.  The
attempts made are kept, so a restart does not start a delivery's count over.
One subscription's deliveries go in order, one at a time (a failing one holds
the later ones back); all subscriptions together have `MAX_IN_FLIGHT` POSTs in
flight at most.

Signature.  ``X-CoMatrix-Signature: sha256=<hex>`` is HMAC-SHA256 over the
exact body, keyed by the subscribing service's secret (its
``X-Internal-Service-Token``, looked up when the POST is made, so it is never
stored and a changed token signs the next POST).

Bounds and destinations.  A service holds at most
``max_subscriptions_per_service`` subscriptions and all together
``max_subscriptions``; the queue holds at most ``max_deliveries_per_service``
deliveries of one service and ``max_deliveries`` in all -- an event beyond
goes to the dead letters at once ("queue full").  A subscription URL must be
http(s) with a host literally in ``webhook_hosts`` (loopback by default), no
user info; the agent checks the host again for every connection and connects
to that host only, so a subscription cannot make the gateway call anywhere
else.

Event sources.  `events_arrived` has the signature of an event-stream listener
(`comatrix.appservice.stream.RoomListener`): in application-service mode the
stream feeds it.  Otherwise `ServiceEvents` runs one ``/sync`` long-poll loop per
service with subscriptions, as that service's Matrix user, through the
gateway's long-poll pool (`comatrix.longpoll`), and feeds that service's
subscriptions only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import io
import ipaddress
import json
import random
import secrets
from typing import Any, Callable, Mapping, Protocol as TypingProtocol, Sequence
from urllib.parse import urlsplit

from zope.interface import implementer

from twisted.internet import defer, task
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory

from comatrix.coap.errors import ServiceUnavailable
from comatrix.config import WEBHOOK_KEYS, WebhookSettings
from comatrix.logs import get_logger
from comatrix.longpoll import DEADLINE_MARGIN, Backoff, Lease, LongPoller, is_transient, retry_delay
from comatrix.matrix import api
from comatrix.matrix.errors import HomeserverError, InvalidResponse, MatrixError
from comatrix.matrix.responses import Event, parse_event, parse_sync
from comatrix.store import DEAD_LETTERS_KEPT, DeadLetter, PendingDelivery, Store, WebhookSubscription

log = get_logger(__name__)

__all__ = ["EVENT_ID_HEADER", "MAX_IN_FLIGHT", "SIGNATURE_HEADER", "WEBHOOK_KEYS", "AgentPoster", "HostNotAllowed",
           "Poster", "ServiceEvents", "WebhookRefused", "WebhookSettings", "Webhooks", "check_url", "payload",
           "signature", "sync_filter"]

SIGNATURE_HEADER = b"X-CoMatrix-Signature"
EVENT_ID_HEADER = b"X-CoMatrix-Event-Id"
#: Webhook POSTs in flight at once, all subscriptions together (each holds a connection).
MAX_IN_FLIGHT = 16
#: Longest subscription URL accepted, and most event types per subscription.
MAX_URL_LENGTH = 2048
MAX_EVENT_TYPES = 32
#: Longest room id and event type accepted (Matrix's own limit on identifiers).
MAX_ID_LENGTH = 255
_USER_AGENT = b"CoMatrix webhooks"


class WebhookRefused(ValueError):
    """A subscription the gateway does not take; the message is safe to answer (no secret).

    ``status``: the HTTP status that fits -- 400 (malformed), 403 (host not allowed), 429 (a cap).
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status




def signature(secret: bytes, body: bytes) -> str:
    """The ``X-CoMatrix-Signature`` value of ``body``: ``sha256=<hex HMAC-SHA256>``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------- HTTP client


class Poster(TypingProtocol):
    """Sends one webhook POST; fires with the status code (the answer's body is discarded)."""

    def post(self, url: str, headers: Headers, body: bytes) -> "defer.Deferred[int]": ...


class HostNotAllowed(ValueError):
    """A connection to a host outside ``webhook_hosts`` (never made)."""


@implementer(IAgentEndpointFactory)
class _AllowedHosts:
    """The agent's endpoints: only to the allowed hosts, each connection with a connect timeout."""

    def __init__(self, reactor: Any, hosts: Sequence[str], connect_timeout: float) -> None:
        self._reactor = reactor
        self._hosts = frozenset(hosts)
        self._connect_timeout = connect_timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii").lower().strip("[]")
        if uri.scheme not in (b"http", b"https") or host not in self._hosts:
            raise HostNotAllowed("webhook destination host not allowed")
        endpoint: IStreamClientEndpoint = HostnameEndpoint(self._reactor, uri.host.strip(b"[]"), uri.port,
                                                           timeout=self._connect_timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(BrowserLikePolicyForHTTPS().creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint


class _Discard(Protocol):
    """Reads an answer's body into nothing; ``done`` fires when it ends (or the connection does)."""

    def __init__(self) -> None:
        self.done: defer.Deferred[None] = defer.Deferred(lambda _d: self._abort())

    def _abort(self) -> None:
        stop = getattr(self.transport, "stopProducing", None)
        if stop is not None:
            stop()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.callback(None)


class AgentPoster:
    """`Poster` over a Twisted `Agent`: allowed hosts only, no redirects, no kept connections."""

    def __init__(self, reactor: Any, settings: WebhookSettings) -> None:
        self._reactor = reactor
        self._timeout = settings.timeout
        # One connection per POST: receivers are few and local, and nothing idles between events.
        self._agent = Agent.usingEndpointFactory(
            reactor, _AllowedHosts(reactor, settings.webhook_hosts, settings.timeout),
            pool=HTTPConnectionPool(reactor, persistent=False))

    def post(self, url: str, headers: Headers, body: bytes) -> "defer.Deferred[int]":
        async def exchange() -> int:
            response = await self._agent.request(b"POST", url.encode("ascii"), headers,
                                                 FileBodyProducer(io.BytesIO(body)))
            discard = _Discard()
            response.deliverBody(discard)
            await discard.done
            return int(response.code)
        return defer.ensureDeferred(exchange()).addTimeout(self._timeout, self._reactor)


# ---------------------------------------------------------------------------------- subscriptions


def check_url(url: str, hosts: Sequence[str]) -> str:
    """``url`` if it is an http(s) URL to an allowed host, else `WebhookRefused`."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH or not url.isascii() \
            or any(ch <= " " for ch in url):
        raise WebhookRefused(f"webhook_url must be an http(s) URL of at most {MAX_URL_LENGTH} ASCII characters")
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        parts.port  # noqa: B018 -- raises on a port that is not a number
    except ValueError:
        raise WebhookRefused("webhook_url is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not host:
        raise WebhookRefused("webhook_url must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused("webhook_url must not carry user info")
    if host not in hosts:
        raise WebhookRefused(f"webhook_url host {host} is not an allowed webhook destination ([http_api] webhook_hosts)",
                             403)
    return url


def _check_names(room_id: str, event_types: Sequence[str]) -> tuple[str, ...]:
    if not isinstance(room_id, str) or not room_id.startswith("!") or len(room_id) > MAX_ID_LENGTH:
        raise WebhookRefused("room_id must be a room id (!...)")
    if isinstance(event_types, str) or not isinstance(event_types, Sequence) or not event_types \
            or len(event_types) > MAX_EVENT_TYPES \
            or not all(isinstance(t, str) and 0 < len(t) <= MAX_ID_LENGTH for t in event_types):
        raise WebhookRefused(f"events must list 1-{MAX_EVENT_TYPES} event types")
    return tuple(dict.fromkeys(event_types))


def payload(subscription_id: str, room_id: str, event: Event) -> bytes:
    """The body POSTed for ``event``: the spec's shape, compact JSON in UTF-8."""
    described: dict[str, Any] = {"type": event.type, "event_id": event.event_id, "sender": event.sender,
                                 "content": dict(event.content), "origin_server_ts": event.origin_server_ts}
    if event.state_key is not None:
        described["state_key"] = event.state_key
    return json.dumps({"subscription_id": subscription_id, "room_id": room_id, "event": described},
                      separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class Webhooks:
    """Subscriptions and deliveries of one gateway (module docstring)."""

    def __init__(self, store: Store, reactor: Any, settings: WebhookSettings,
                 secret_of: Callable[[str], bytes | None], *, poster: Poster | None = None) -> None:
        """``secret_of``: a service's signing secret (its token), None when it is not configured (any more)."""
        self.store = store
        self.reactor = reactor
        self.settings = settings
        self._secret_of = secret_of
        self._poster: Poster = poster if poster is not None else AgentPoster(reactor, settings)
        self._subscriptions: dict[str, WebhookSubscription] | None = None
        self._loading = defer.DeferredLock()
        self._running = False
        #: Subscription id -> its running delivery worker; ids woken while theirs was finishing.
        self._workers: dict[str, defer.Deferred[None]] = {}
        self._woken: set[str] = set()
        self._slots = defer.DeferredSemaphore(MAX_IN_FLIGHT)
        self._listeners: list[Callable[[str], None]] = []
        #: Deliveries made, retried and given up since start (for logs, metrics and tests).
        #: Where outcomes are counted (`comatrix.metrics.Metrics`), None when metrics are off.
        self.metrics: Any = None
        self.delivered = 0
        self.retried = 0
        self.dead = 0

    # -------------------------------------------------------------- life

    def start(self) -> "defer.Deferred[None]":
        """Load the subscriptions and resume the queued deliveries (fires when they are under way)."""
        self._running = True
        hosts = [host for host in self.settings.webhook_hosts if not _is_loopback(host)]
        if hosts:
            log.warn("Webhooks may POST to hosts beyond loopback ([http_api] webhook_hosts): {hosts}",
                     hosts=", ".join(hosts))
        return defer.ensureDeferred(self._resume()).addErrback(
            lambda failure: log.failure("Could not resume the webhook deliveries", failure))

    async def _resume(self) -> None:
        subscriptions = await self._loaded()
        backlog = await self.store.webhook_backlog()
        log.info("Webhooks: {count} subscription(s), {pending} with queued deliveries",
                 count=len(subscriptions), pending=len(backlog))
        for subscription in subscriptions.values():
            try:
                check_url(subscription.url, self.settings.webhook_hosts)
            except WebhookRefused:
                log.warn("Webhook subscription {id} of {service}: its host {host} is no longer allowed "
                         "([http_api] webhook_hosts); its deliveries will fail", id=subscription.id,
                         service=subscription.service, host=urlsplit(subscription.url).hostname)
        for service in {subscription.service for subscription in subscriptions.values()}:
            self._changed(service)
        for subscription_id in backlog:
            self._wake(subscription_id)

    def _observe(self, outcome: str) -> None:
        """Tell the metrics (``webhook_delivered``, ``webhook_retried``, ``webhook_dead_lettered``), if any."""
        if self.metrics is not None:
            getattr(self.metrics, f"webhook_{outcome}")()

    def stop(self) -> None:
        """Stop delivering (what is queued stays queued for the next start)."""
        self._running = False
        for worker in list(self._workers.values()):
            worker.cancel()

    async def _loaded(self) -> dict[str, WebhookSubscription]:
        if self._subscriptions is None:
            await self._loading.acquire()
            try:
                if self._subscriptions is None:
                    self._subscriptions = {s.id: s for s in await self.store.webhook_subscriptions()}
            finally:
                self._loading.release()
        return self._subscriptions

    # -------------------------------------------------------------- subscriptions

    async def subscribe(self, service: str, room_id: str, url: str, event_types: Sequence[str]) -> str:
        """A new subscription of ``service``; its id ("sub-..."), or `WebhookRefused`."""
        types = _check_names(room_id, event_types)
        check_url(url, self.settings.webhook_hosts)
        subscriptions = await self._loaded()
        subscription = WebhookSubscription("sub-" + secrets.token_hex(8), service, room_id, url, types)
        refused = await self.store.add_webhook_subscription(
            subscription, self.reactor.seconds(), self.settings.max_subscriptions_per_service,
            self.settings.max_subscriptions)
        if refused is not None:
            log.info("Webhook subscription of {service} refused: {cap} cap reached", service=service, cap=refused)
            raise WebhookRefused("too many webhook subscriptions" + (" of this service" if refused == "service" else ""),
                                 429)
        subscriptions[subscription.id] = subscription
        log.info("Webhook subscription {id} of {service}: {room} to {host}", id=subscription.id, service=service,
                 room=room_id, host=urlsplit(url).hostname)
        self._changed(service)
        return subscription.id

    async def unsubscribe(self, service: str, subscription_id: str) -> bool:
        """End the service's subscription and drop its queued deliveries; False if it has none of that id."""
        subscriptions = await self._loaded()
        subscription = subscriptions.get(subscription_id)
        if subscription is None or subscription.service != service:
            return False
        del subscriptions[subscription_id]
        worker = self._workers.get(subscription_id)
        if worker is not None:
            worker.cancel()
        removed = await self.store.remove_webhook_subscription(service, subscription_id)
        log.info("Webhook subscription {id} of {service} ended", id=subscription_id, service=service)
        self._changed(service)
        return removed

    def on_change(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call ``listener(service)`` when a service's subscriptions change; returns the way to stop."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _changed(self, service: str) -> None:
        for listener in list(self._listeners):
            listener(service)

    def services(self) -> set[str]:
        """The services with subscriptions (none before `start` has loaded them)."""
        return {s.service for s in (self._subscriptions or {}).values()}

    def subscriptions_of(self, service: str) -> list[WebhookSubscription]:
        """The service's subscriptions (none before `start` has loaded them)."""
        return [s for s in (self._subscriptions or {}).values() if s.service == service]

    async def dead_letters(self, service: str | None = None, limit: int = DEAD_LETTERS_KEPT) -> list[DeadLetter]:
        """The newest deliveries given up (of ``service``, else of all), newest first."""
        return await self.store.webhook_dead_letters(service, limit)

    # -------------------------------------------------------------- events in

    async def events_arrived(self, room_id: str, events: Sequence[Event], service: str | None = None) -> None:
        """Queue one delivery per matching subscription and event (of ``service`` only, if given), then deliver.

        Returns once the deliveries are in the store: a caller that records its position
        afterwards loses no event to a crash.
        """
        subscriptions = [s for s in (await self._loaded()).values()
                         if s.room_id == room_id and (service is None or s.service == service)]
        rows = [(s.id, s.service, event.event_id, payload(s.id, room_id, event))
                for event in events for s in subscriptions if event.type in s.event_types]
        if not rows:
            return
        woken, overflow = await self.store.enqueue_webhook_deliveries(
            rows, self.reactor.seconds(), self.settings.max_deliveries_per_service, self.settings.max_deliveries)
        if overflow:
            self.dead += len(overflow)
            for _ in overflow:
                self._observe("dead_lettered")
            log.warn("Webhook queue full: {count} event(s) of {room} went to the dead letters",
                     count=len(overflow), room=room_id)
        for subscription_id in woken:
            self._wake(subscription_id)

    # -------------------------------------------------------------- deliveries

    def _wake(self, subscription_id: str) -> None:
        if not self._running:
            return
        if subscription_id in self._workers:
            self._woken.add(subscription_id)
            return
        worker = self._workers[subscription_id] = defer.ensureDeferred(self._drain(subscription_id))
        worker.addErrback(self._worker_failed, subscription_id)

    def _worker_failed(self, failure: Failure, subscription_id: str) -> None:
        if not failure.check(defer.CancelledError):
            log.failure("Webhook deliveries of {id} failed", failure, id=subscription_id)

    async def _drain(self, subscription_id: str) -> None:
        """Deliver the subscription's queue in order until it is empty."""
        try:
            # A subscription that ended takes its queue with it (`unsubscribe`).
            while self._running and subscription_id in (self._subscriptions or {}):
                delivery = await self.store.next_webhook_delivery(subscription_id)
                if delivery is None:
                    break
                await self._deliver(delivery)
        finally:
            del self._workers[subscription_id]
            if subscription_id in self._woken:
                self._woken.discard(subscription_id)
                self._wake(subscription_id)

    async def _deliver(self, delivery: PendingDelivery) -> None:
        """One attempt; then the row goes (2xx), waits for its retry, or moves to the dead letters."""
        subscription = (self._subscriptions or {})[delivery.subscription_id]
        secret = self._secret_of(delivery.service)
        attempt = delivery.attempts + 1
        if secret is None:
            await self._give_up(delivery, delivery.attempts, "service no longer configured")
            return
        problem = await self._attempt(subscription, delivery, secret)
        if problem is None:
            await self.store.webhook_delivered(delivery.id)
            self.delivered += 1
            self._observe("delivered")
            log.debug("Webhook {id}: event {event} delivered (attempt {n})", id=subscription.id,
                      event=delivery.event_id, n=attempt)
            return
        if attempt > self.settings.webhook_retries:
            await self._give_up(delivery, attempt, problem)
            return
        await self.store.webhook_attempt_failed(delivery.id, attempt)
        self.retried += 1
        self._observe("retried")
        delay = self.settings.delay(attempt)
        log.info("Webhook {id}: event {event} not delivered ({problem}); retry {n} of {retries} in {delay:g} s",
                 id=subscription.id, event=delivery.event_id, problem=problem, n=attempt,
                 retries=self.settings.webhook_retries, delay=delay)
        await task.deferLater(self.reactor, delay, lambda: None)

    async def _attempt(self, subscription: WebhookSubscription, delivery: PendingDelivery, secret: bytes) -> str | None:
        """POST the delivery once; None when the receiver took it, else what went wrong (no secrets)."""
        headers = Headers({b"Content-Type": [b"application/json"], b"User-Agent": [_USER_AGENT],
                           SIGNATURE_HEADER: [signature(secret, delivery.body).encode("ascii")]})
        if delivery.event_id.isascii() and delivery.event_id.isprintable():
            headers.setRawHeaders(EVENT_ID_HEADER, [delivery.event_id.encode("ascii")])
        await self._slots.acquire()
        try:
            status = await self._poster.post(subscription.url, headers, delivery.body)
        except defer.CancelledError:
            raise
        except defer.TimeoutError:
            return f"no answer within {self.settings.webhook_timeout_ms} ms"
        except Exception as error:
            return type(error).__name__
        finally:
            self._slots.release()
        return None if 200 <= status < 300 else f"HTTP {status}"

    async def _give_up(self, delivery: PendingDelivery, attempts: int, reason: str) -> None:
        await self.store.dead_letter_webhook_delivery(delivery, attempts, reason, self.reactor.seconds())
        self.dead += 1
        self._observe("dead_lettered")
        log.warn("Webhook {id} of {service}: event {event} given up after {attempts} attempt(s) ({reason}); "
                 "kept in the dead letters", id=delivery.subscription_id, service=delivery.service,
                 event=delivery.event_id, attempts=attempts, reason=reason)


# ---------------------------------------------------------------------------------- token mode

#: The long-poll timeout (s) the service loops ask the homeserver for.
LONG_POLL_SECONDS = 25.0
#: Timeline events per room and /sync; more since the last one (a limited timeline) are not walked back.
SYNC_TIMELINE_LIMIT = 100


def sync_filter(subscriptions: Sequence[WebhookSubscription]) -> Mapping[str, Any]:
    """Only the timelines of the subscribed rooms, only the subscribed event types."""
    return {
        "presence": {"types": []},
        "account_data": {"types": []},
        "room": {
            "rooms": sorted({s.room_id for s in subscriptions}),
            "timeline": {"types": sorted({t for s in subscriptions for t in s.event_types}),
                         "limit": SYNC_TIMELINE_LIMIT},
            "state": {"types": []},
            "ephemeral": {"types": []},
            "account_data": {"types": []},
        },
    }


@dataclasses.dataclass
class _ServiceLoop:
    service: str
    deferred: "defer.Deferred[None] | None" = None
    #: The /sync in flight; cancelled (and the loop goes on) when the subscriptions change.
    call: "defer.Deferred[Any] | None" = None
    poked: bool = False


class ServiceEvents:
    """Token mode: one /sync loop per service with subscriptions, as its Matrix user, feeding `Webhooks`.

    The /sync filter names the subscribed rooms and event types only; a change of the
    service's subscriptions cancels the waiting long-poll, and the loop asks again,
    from the same position, with the new filter.  A loop's first /sync (no position
    kept) only takes the position: nothing from before is delivered.  A subscription
    added to a running loop may also get its room's events since the loop's last
    answer (at most one long-poll, ``long_poll_seconds``, before it).  The position is
    kept in the store after each batch is queued, so a restart resumes there (events
    of the downtime are delivered); it is forgotten when the service's last
    subscription ends.  A timeline Synapse marks ``limited`` (more than
    `SYNC_TIMELINE_LIMIT` events of a room since the last answer) is not walked back:
    only its newest events are delivered.  A refused token (401/403) ends the loop;
    call `refresh` once the service has a new one.
    """

    def __init__(self, webhooks: Webhooks, long_polls: LongPoller, reactor: Any,
                 identity_of: Callable[[str], tuple[str, str] | None], *,
                 long_poll_seconds: float = LONG_POLL_SECONDS, jitter: Callable[[], float] = random.random) -> None:
        """``identity_of``: a service's Matrix (user id, access token), None when it has none."""
        self.webhooks = webhooks
        self.long_polls = long_polls
        self.reactor = reactor
        self._identity_of = identity_of
        self.long_poll_ms = int(long_poll_seconds * 1000)
        self.jitter = jitter
        self._loops: dict[str, _ServiceLoop] = {}
        self._stop_listening: Callable[[], None] | None = None

    def start(self) -> None:
        """Follow the subscriptions (call before `Webhooks.start`, which announces the loaded ones)."""
        self._stop_listening = self.webhooks.on_change(self.refresh)
        for service in self.webhooks.services():
            self.refresh(service)

    def stop(self) -> None:
        if self._stop_listening is not None:
            self._stop_listening()
            self._stop_listening = None
        for loop in list(self._loops.values()):
            if loop.deferred is not None:
                loop.deferred.cancel()

    def refresh(self, service: str) -> None:
        """Start the service's loop, or make it ask again with the new filter (or end)."""
        loop = self._loops.get(service)
        if loop is None:
            if self.webhooks.subscriptions_of(service):
                loop = self._loops[service] = _ServiceLoop(service)
                loop.deferred = defer.ensureDeferred(self._run(loop))
                loop.deferred.addErrback(self._loop_failed, loop)
            return
        if loop.call is not None:
            loop.poked = True
            loop.call.cancel()

    def running(self, service: str) -> bool:
        return service in self._loops

    def _loop_failed(self, failure: Failure, loop: _ServiceLoop) -> None:
        if not failure.check(defer.CancelledError):
            log.failure("Webhook event loop of {service} failed", failure, service=loop.service)

    async def _run(self, loop: _ServiceLoop) -> None:
        lease: Lease | None = None
        try:
            lease = await self._lease(loop)
            await self._loop(loop, lease)
        finally:
            if lease is not None:
                lease.release()
            if self._loops.get(loop.service) is loop:
                del self._loops[loop.service]

    async def _lease(self, loop: _ServiceLoop) -> Lease:
        """A long-poll slot of the gateway's own (the total bounds it), waited for when none is free."""
        backoff = Backoff(random=self.jitter)
        while True:
            try:
                return self.long_polls.quota.lease(None)
            except ServiceUnavailable:
                delay = backoff.next()
                log.info("Webhook event loop of {service}: no long-poll slot free; again in {delay:.1f} s",
                         service=loop.service, delay=delay)
                await task.deferLater(self.reactor, delay, lambda: None)

    async def _loop(self, loop: _ServiceLoop, lease: Lease) -> None:
        service, store = loop.service, self.webhooks.store
        backoff = Backoff(random=self.jitter)
        since: str | None = None
        known_user: str | None = None
        while True:
            subscriptions = self.webhooks.subscriptions_of(service)
            identity = self._identity_of(service)
            if not subscriptions or identity is None:
                if not subscriptions:
                    await store.forget_webhook_sync_position(service)
                else:
                    log.warn("Webhook event loop of {service}: the service has no Matrix identity", service=service)
                return
            user_id, token = identity
            if user_id != known_user:
                since, known_user = await store.webhook_sync_position(service, user_id), user_id
            try:
                since = await self._sync_once(loop, lease, token, since, subscriptions)
                await store.save_webhook_sync_position(service, user_id, since, self.reactor.seconds())
            except defer.CancelledError:
                if not loop.poked:
                    raise
                loop.poked = False
                continue
            except (HomeserverError, ServiceUnavailable) as error:
                if isinstance(error, HomeserverError) and not is_transient(error):
                    status = error.http_status if isinstance(error, MatrixError) else "?"
                    log.warn("Webhook event loop of {service}: homeserver refused /sync ({status}); stopping",
                             service=service, status=status)
                    return
                delay = retry_delay(backoff, error) if isinstance(error, HomeserverError) else backoff.next()
                log.info("Webhook event loop of {service}: {error}; again in {delay:.1f} s", service=service,
                         error=type(error).__name__, delay=delay)
                await task.deferLater(self.reactor, delay, lambda: None)
                continue
            backoff.reset()

    async def _sync_once(self, loop: _ServiceLoop, lease: Lease, token: str, since: str | None,
                         subscriptions: Sequence[WebhookSubscription]) -> str:
        """One /sync; its events queued for the service's subscriptions; the next position."""
        timeout_ms = 0 if since is None else self.long_poll_ms
        req = api.sync(token, since=since, timeout_ms=timeout_ms, filter=sync_filter(subscriptions))
        loop.call = self.long_polls.request(req, timeout_ms / 1000.0 + DEADLINE_MARGIN, lease)
        try:
            _status, body = await loop.call
        finally:
            loop.call = None
        sync = parse_sync(body)
        if since is None:
            return sync.next_batch  # the starting point: nothing before the subscription is delivered
        rooms = body.get("rooms", {}).get("join", {}) if isinstance(body.get("rooms"), Mapping) else {}
        wanted = {s.room_id for s in subscriptions}
        for room_id, room in rooms.items() if isinstance(rooms, Mapping) else ():
            if room_id in wanted and isinstance(room, Mapping):
                events = _timeline_events(room.get("timeline"))
                if events:
                    await self.webhooks.events_arrived(room_id, events, service=loop.service)
        return sync.next_batch


def _timeline_events(timeline: Any) -> list[Event]:
    if not isinstance(timeline, Mapping) or not isinstance(timeline.get("events"), list):
        return []
    events = []
    for raw in timeline["events"]:
        try:
            events.append(parse_event(raw))
        except InvalidResponse:
            continue
    return events
