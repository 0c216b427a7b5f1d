"""Overload protection for requests that go to the homeserver: rate limits and a concurrency cap.

Two independent mechanisms, both configured in the ``[limits]`` table:

* `Admission` -- token buckets, one per device (keyed by the request's
  `comatrix.identity.Device`, or by the device's access token when
  ``device_key = "token"``) plus one global bucket.  A request that finds a
  bucket empty is answered 4.29 with Max-Age = whole seconds until a token is
  available (RFC 8516), so one chatty device cannot starve the others or get
  the gateway's users rate-limited by the homeserver.  The two are charged at
  different moments:

  - the device's bucket when `comatrix.resources.MatrixResource` admits the
    request (`Admission.check`), before it is handled; local resources
    (``/time``, ``/.well-known/core``) never see it;
  - the global bucket only when the request's first homeserver call goes out
    (`Ticket.pay`, called by `AdmittedTransport.paid_send`).  Junk that fails early --
    malformed (4.00), no credentials (4.01), unknown path (4.04), wrong
    content-format (4.15) -- therefore costs its sender's own bucket and never
    the budget every device shares.  A request the global bucket refuses gets
    its device token back.

* `UpstreamLimiter` -- at most ``max_upstream`` homeserver calls at once; the
  next ``upstream_queue`` wait in FIFO order (at most ``queue_timeout``
  seconds), anything beyond is answered 5.03 with Max-Age at once.
  `LimitedTransport` applies it to every call a `MatrixTransport` makes.

* `FailedLogins` -- wrong-password logins per device (``login_failures`` within
  ``login_failure_window`` seconds).  A device over it gets 4.29 with Max-Age
  from the gateway itself, so the homeserver never counts its attempts: a
  homeserver that sees only the gateway's address (no ``x_forwarded``) cannot
  be made to lock every device out because one device guesses passwords.
  `LimitedTransport` applies it to every login, whichever resource asked.

State is bounded: per-device buckets and login records live in LRU tables of
``max_devices`` entries, and a bucket that has refilled completely is as good as
a new one, so eviction never favours a device.  Time comes from the injected reactor only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
from collections import OrderedDict, deque
from contextvars import ContextVar
from typing import Any, Callable, Iterator, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

from comatrix.logs import get_logger
from comatrix.coap.errors import ServiceUnavailable, TooManyRequests
from comatrix.coap.message import Request
from comatrix.config import LimitSettings
from comatrix.credentials import token_from_request
from comatrix.identity import Device, current_device, device_of
from comatrix.matrix.api import MatrixRequest
from comatrix.matrix.errors import MatrixError
from comatrix.matrix.transport import MatrixTransport

__all__ = ["TokenBucket", "Admission", "Ticket", "AdmittedTransport", "FailedLogins", "UpstreamBusy",
           "UpstreamLimiter", "LimitedTransport", "current_ticket", "install", "is_login"]

log = get_logger(__name__)

T = TypeVar("T")

#: Max-Age of a 5.03 "upstream busy": the queue is full now, but it drains within a request timeout.
BUSY_RETRY_AFTER = 2

class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; one request takes one token."""

    __slots__ = ("rate", "burst", "_tokens", "_stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = now

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = max(self._stamp, now)

    def wait(self, now: float) -> float:
        """Seconds until a token is available (0: one is available now)."""
        self._refill(now)
        if self._tokens >= 1:
            return 0.0
        return (1 - self._tokens) / self.rate

    def take(self, now: float) -> None:
        self._refill(now)
        self._tokens -= 1

    def give_back(self, now: float) -> None:
        """Return a token taken for a request that was refused elsewhere."""
        self._refill(now)
        self._tokens = min(float(self.burst), self._tokens + 1)

    def full(self, now: float) -> bool:
        self._refill(now)
        return self._tokens >= self.burst


class Admission:
    """Per-device and global token buckets for requests that would go upstream."""

    def __init__(self, settings: LimitSettings, clock: Any) -> None:
        self.settings = settings
        self._clock = clock
        self._devices: OrderedDict[str, TokenBucket] = OrderedDict()
        self._global = (TokenBucket(settings.global_rate, settings.global_burst, clock.seconds())
                        if settings.global_rate > 0 else None)

    def device_key(self, request: Request) -> str:
        """The bucket a request draws from.  Tokens are hashed: they must not sit in a table."""
        if self.settings.device_key == "token":
            try:
                token = token_from_request(request)
            except Exception:
                token = None  # a malformed token is refused later, with its own 4.01
            if token is not None:
                return "t:" + hashlib.sha256(token.encode("ascii")).hexdigest()[:32]
        return device_of(request).key

    def _bucket(self, key: str, now: float) -> TokenBucket | None:
        settings = self.settings
        if settings.device_rate <= 0:
            return None
        bucket = self._devices.get(key)
        if bucket is not None:
            self._devices.move_to_end(key)
            return bucket
        bucket = TokenBucket(settings.device_rate, settings.device_burst, now)
        self._devices[key] = bucket
        while len(self._devices) > settings.max_devices:
            self._devices.popitem(last=False)
        return bucket

    def check(self, request: Request) -> "Ticket":
        """Take a token from the device's bucket, or raise `TooManyRequests`.

        The returned `Ticket` takes the global token later, when the request
        first calls the homeserver (`Ticket.pay`).
        """
        now = self._clock.seconds()
        device = self._bucket(self.device_key(request), now)
        wait = device.wait(now) if device is not None else 0.0
        if wait > 0:
            self._refuse("device", request, wait)
        if device is not None:
            device.take(now)
        return Ticket(self, request, device)

    def pay_global(self, ticket: "Ticket") -> None:
        """The global token for ``ticket``'s request, or `TooManyRequests` (its device token goes back)."""
        if self._global is None:
            return
        now = self._clock.seconds()
        wait = self._global.wait(now)
        if wait > 0:
            if ticket.device is not None:
                ticket.device.give_back(now)
            self._refuse("gateway", ticket.request, wait)
        self._global.take(now)

    @staticmethod
    def _refuse(which: str, request: Request, wait: float) -> None:
        log.info("Rate limit ({which}) for {peer}: retry in {wait:.2f} s", which=which,
                 peer=str(request.peer), wait=wait)
        raise TooManyRequests(f"{which} rate limit", retry_after=math.ceil(wait))

    def tracked_devices(self) -> int:
        return len(self._devices)


def is_login(req: MatrixRequest) -> bool:
    """``POST /_matrix/client/<version>/login``, whatever resource (and path form) asked for it."""
    return (req.method == "POST" and req.path[:2] == ("_matrix", "client")
            and req.path[3:] in (("login",), ("login", "")))


def _wrong_credentials(result: Any) -> bool:
    """The homeserver's answer to a wrong password (or unknown user, or bad login token)."""
    error = result.value if isinstance(result, Failure) else None
    return isinstance(error, MatrixError) and (
        error.http_status == 401 or (error.http_status == 403 and error.errcode == "M_FORBIDDEN"))


class _LoginRecord:
    """One device's recent login failures (times, oldest first) and its logins in flight."""

    __slots__ = ("failures", "pending")

    def __init__(self, limit: int) -> None:
        self.failures: deque[float] = deque(maxlen=limit)
        self.pending = 0


class FailedLogins:
    """Per-device wrong-password count; a device over it is refused before the homeserver sees it."""

    def __init__(self, settings: LimitSettings, clock: Any) -> None:
        self.limit = settings.login_failures
        self.window = settings.login_failure_window
        self.max_devices = settings.max_devices
        self._clock = clock
        self._devices: OrderedDict[str, _LoginRecord] = OrderedDict()

    def guard(self, device: Device | None, call: Callable[[], "defer.Deferred[T]"]) -> "defer.Deferred[T]":
        """``call()`` -- a login for ``device`` -- or `TooManyRequests` if the device is over its share.

        Logins in flight count as possible failures, so a burst of guesses sent
        at once cannot overshoot the limit.  The gateway's own logins (no device)
        are not counted.
        """
        if self.limit <= 0 or device is None:
            return call()
        record = self._record(device.key)
        wait = self._wait(record)
        if wait > 0:
            log.info("Login refused for {device}: {count} failed logins within {window:g} s",
                     device=device.key, count=len(record.failures), window=self.window)
            return defer.fail(TooManyRequests("too many failed logins", retry_after=math.ceil(wait)))
        record.pending += 1

        def outcome(result: Any) -> Any:
            record.pending -= 1
            if _wrong_credentials(result):
                record.failures.append(self._clock.seconds())
            elif not isinstance(result, Failure):
                record.failures.clear()  # a success: the count starts again
                if not record.pending and self._devices.get(device.key) is record:
                    del self._devices[device.key]
            return result

        return defer.maybeDeferred(call).addBoth(outcome)

    def _record(self, key: str) -> _LoginRecord:
        record = self._devices.get(key)
        if record is not None:
            self._devices.move_to_end(key)
            return record
        record = self._devices[key] = _LoginRecord(self.limit)
        while len(self._devices) > self.max_devices:
            self._devices.popitem(last=False)
        return record

    def _wait(self, record: _LoginRecord) -> float:
        """Seconds until the device may try again (0: now)."""
        now = self._clock.seconds()
        failures = record.failures
        while failures and failures[0] + self.window <= now:
            failures.popleft()
        if len(failures) >= self.limit:
            return failures[0] + self.window - now
        if len(failures) + record.pending >= self.limit:
            return 1.0  # the logins in flight decide; their answers are due within a request timeout
        return 0.0

    def tracked_devices(self) -> int:
        return len(self._devices)


class Ticket:
    """An admitted request's debt to the global bucket, paid by its first homeserver call.

    `Admission.check` hands it out; `MatrixResource` makes it the current
    ticket while the request is handled (`current`) and closes it when the
    answer is ready: work a request leaves running afterwards (a watch loop)
    is not charged to it.
    """

    __slots__ = ("admission", "request", "device", "paid", "closed")

    def __init__(self, admission: Admission, request: Request, device: TokenBucket | None) -> None:
        self.admission = admission
        self.request = request
        self.device = device
        self.paid = False
        self.closed = False

    def pay(self) -> None:
        """Take the global token once (`TooManyRequests` if none is left); later calls are free."""
        if self.paid or self.closed:
            return
        self.admission.pay_global(self)
        self.paid = True

    def close(self, result: T) -> T:
        """The request is answered (a Deferred callback: passes ``result`` on)."""
        self.closed = True
        return result

    @contextlib.contextmanager
    def current(self) -> Iterator["Ticket"]:
        """Make this the ticket homeserver calls started inside (and their coroutines) pay with."""
        reset = _current_ticket.set(self)
        try:
            yield self
        finally:
            _current_ticket.reset(reset)


_current_ticket: ContextVar[Ticket | None] = ContextVar("comatrix_current_ticket", default=None)


def current_ticket() -> Ticket | None:
    """The ticket of the request the code running now handles (None: no admitted request)."""
    return _current_ticket.get()


class AdmittedTransport(MatrixTransport):
    """A `MatrixTransport` whose calls pay their request's global token as they go out (4.29 if none)."""

    def request(self, req: MatrixRequest) -> "defer.Deferred[tuple[int, dict[str, Any]]]":
        return self.paid_send(req, current_device(), current_ticket())

    def paid_send(self, req: MatrixRequest, device: Device | None,
                  ticket: Ticket | None) -> "defer.Deferred[tuple[int, dict[str, Any]]]":
        """The one place the global bucket is charged: `send` for ``device`` once ``ticket`` (the
        request's, read when the call was requested) has paid; 4.29 at once when no token is left."""
        if ticket is not None:
            try:
                ticket.pay()
            except TooManyRequests:
                return defer.fail()
        return self.send(req, device)


class UpstreamBusy(ServiceUnavailable):
    """Too many homeserver calls waiting already: answered 5.03 with Max-Age."""

    def __init__(self, diagnostic: str = "upstream busy") -> None:
        super().__init__(diagnostic, max_age=BUSY_RETRY_AFTER)


@dataclasses.dataclass(eq=False)
class _Waiter:
    start: Callable[[], None]
    deferred: "defer.Deferred[Any]"
    timer: Any = None


class UpstreamLimiter:
    """At most ``max_active`` calls at once; ``max_queue`` more wait in FIFO order."""

    def __init__(self, max_active: int, max_queue: int, queue_timeout: float, clock: Any) -> None:
        self.max_active = max_active
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self._clock = clock
        self._active = 0
        self._queue: deque[_Waiter] = deque()

    @property
    def active(self) -> int:
        return self._active

    @property
    def queued(self) -> int:
        return len(self._queue)

    def run(self, call: Callable[[], "defer.Deferred[T]"]) -> "defer.Deferred[T]":
        """``call()`` now or once a slot is free; fails with `UpstreamBusy` when it cannot wait."""
        if self._active < self.max_active:
            return self._start(call)
        if len(self._queue) >= self.max_queue:
            log.info("Upstream queue full ({queued} waiting): 5.03", queued=len(self._queue))
            return defer.fail(UpstreamBusy())
        result: defer.Deferred[T] = defer.Deferred(lambda d: self._cancelled(waiter))

        def start() -> None:
            self._start(call).chainDeferred(result)

        waiter = _Waiter(start, result)
        waiter.timer = self._clock.callLater(self.queue_timeout, self._expired, waiter)
        self._queue.append(waiter)
        return result

    def _start(self, call: Callable[[], "defer.Deferred[T]"]) -> "defer.Deferred[T]":
        self._active += 1
        try:
            d = call()
        except BaseException:
            d = defer.fail(Failure())
        return d.addBoth(self._release)

    def _release(self, result: Any) -> Any:
        self._active -= 1
        while self._queue and self._active < self.max_active:
            waiter = self._queue.popleft()
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            waiter.start()
        return result

    def _expired(self, waiter: _Waiter) -> None:
        waiter.timer = None
        try:
            self._queue.remove(waiter)
        except ValueError:
            return
        log.info("Upstream call waited {timeout} s for a slot: 5.03", timeout=self.queue_timeout)
        waiter.deferred.errback(UpstreamBusy("upstream busy (queue timeout)"))

    def _cancelled(self, waiter: _Waiter) -> None:
        if waiter in self._queue:
            self._queue.remove(waiter)
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()


class LimitedTransport(AdmittedTransport):
    """An `AdmittedTransport` whose every call goes through an `UpstreamLimiter` (and logins
    through `FailedLogins`, when given).

    The transport's own deadline starts when the call leaves the queue, so a
    queued call can take up to ``queue_timeout + request_timeout`` in all.  The
    device a call is for is the one current when it is *requested*: a queued
    call starts from another call's completion, in that call's context.
    """

    def __init__(self, base_url: str, *, limiter: UpstreamLimiter, logins: FailedLogins | None = None,
                 **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self.limiter = limiter
        self.logins = logins

    def request(self, req: MatrixRequest) -> "defer.Deferred[tuple[int, dict[str, Any]]]":
        device, ticket = current_device(), current_ticket()

        def queued() -> "defer.Deferred[tuple[int, dict[str, Any]]]":
            return self.limiter.run(lambda: self.paid_send(req, device, ticket))

        if self.logins is not None and is_login(req):
            return self.logins.guard(device, queued)
        return queued()


def install(site: Any, admission: Admission) -> int:
    """Make every Matrix resource of ``site`` check ``admission``; returns how many."""
    from comatrix.resources import MatrixResource

    count = 0
    for _path, resource in site.resources():
        if isinstance(resource, MatrixResource):
            resource.admission = admission
            count += 1
    return count
