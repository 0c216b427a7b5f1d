"""Homeserver long-polls (``/sync``): the gateway's pool for them, its quotas, deadlines, back-off.

Every ``/sync`` loop of the gateway -- the compact profile's one per observed
session, MSC3079's Observe loops and plain MSC3079 long-poll requests -- goes
through the one `LongPoller` of the gateway (`long_poller`), never through the
Matrix client the plugins use for everything else:

* That client's transport is capped (``[limits] max_upstream``,
  `comatrix.ratelimit.LimitedTransport`).  A long-poll holds its slot for its
  whole timeout, so a few watching devices would starve every send.  The
  long-poll transport has a bound of its own instead: `LongPollQuota`.
* Each call gets its own deadline: the long-poll timeout the homeserver was
  asked for plus a margin (`with_deadline`), instead of the transport's one.

Quotas.  Each long-poll holds one TCP connection to the homeserver -- one open
file -- for its whole timeout, so they are counted: a loop (MSC3079 Observe,
compact watch) holds a `Lease` from its registration to its end, a plain
long-poll for its one call.  A device (`comatrix.identity.Device`, the current
one while its resource runs) holds at most ``[limits] long_polls_per_device``;
all devices together at most ``max_long_polls``, capped at start so that the
long-polls, the capped client's connections and `FD_RESERVE` (SQLite, the
listening socket, logs, the reactor's own descriptors) stay within
`FD_SHARE` of the process's open-file limit (``RLIMIT_NOFILE``,
`long_poll_budget`).  A long-poll beyond the device's share is answered 4.29,
beyond the total 5.03, both at once and with Max-Age: the newcomer waits, no
other device's request fails.

After homeserver trouble a loop waits as `Backoff` says: exponential with
"equal jitter", so that loops which failed together (the homeserver restarted)
do not all come back in the same instant, and a 429's ``Retry-After`` is
honoured when it asks for longer.  A loop keeps its position (``since``) across
the wait: it resumes where it was, not from scratch.
"""

from __future__ import annotations

import random
import resource
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure

from comatrix.coap.errors import ServiceUnavailable, TooManyRequests
from comatrix.config import Config, LimitSettings
from comatrix.identity import Device, current_device
from comatrix.interfaces import PluginContext
from comatrix.logs import get_logger
from comatrix.matrix.api import MatrixRequest
from comatrix.matrix.errors import HomeserverError, HomeserverTimeout, MatrixError
from comatrix.matrix.transport import MatrixTransport
from comatrix.ratelimit import AdmittedTransport

__all__ = ["BACKOFF_CAP", "BACKOFF_FIRST", "DEADLINE_MARGIN", "FD_RESERVE", "FD_SHARE", "Backoff", "Lease",
           "LongPollQuota", "LongPoller", "is_transient", "long_poll_budget", "long_poller",
           "open_file_limit", "retry_delay", "with_deadline"]

log = get_logger(__name__)

#: First back-off delay (s) after homeserver trouble; it doubles with each failure in a row...
BACKOFF_FIRST = 1.0
#: ... up to this (s).  The actual delay is drawn from [d/2, d] (equal jitter).
BACKOFF_CAP = 60.0
#: HTTP deadline of a long-poll = the timeout the homeserver was asked for + this (s).
DEADLINE_MARGIN = 10.0
#: The long-poll transport's own deadline: only a backstop, every call has its own (`with_deadline`).
TRANSPORT_BACKSTOP = 3600.0
#: Idle long-poll connections kept for reuse: a loop's next /sync follows its last at once, so
#: keeping one per loop (up to this) avoids a TCP (and TLS) handshake per long-poll.
LONG_POLL_CONNECTIONS_KEPT = 64
#: Key of the gateway's `LongPoller` in ``PluginContext.state``.
STATE_KEY = "long-poll"
#: Open files kept out of the long-polls' and the Matrix client's reach: SQLite (database,
#: WAL, shared memory), the CoAP socket(s), log files, the reactor's epoll and waker, stdio.
FD_RESERVE = 64
#: Share of the open-file limit the gateway plans to use at most (the rest is slack).
FD_SHARE = 0.8
#: Max-Age (s) of a refused long-poll: a slot frees when some long-poll ends.
LONG_POLL_RETRY_AFTER = 10


class Backoff:
    """Exponential back-off with equal jitter.

    The n-th delay in a row (n = 0, 1, ...) is drawn from ``[d/2, d]`` with
    ``d = min(cap, first * 2**n)``: the delays grow (their lower bound doubles),
    never exceed ``cap``, and are spread so loops that failed together retry
    apart.  ``random`` returns a float in [0, 1); tests pass a fixed sequence.
    """

    def __init__(self, first: float = BACKOFF_FIRST, cap: float = BACKOFF_CAP, *,
                 random: Callable[[], float] = random.random) -> None:
        if not 0 < first <= cap:
            raise ValueError("back-off needs 0 < first <= cap")
        self.first = first
        self.cap = cap
        self._random = random
        self._failures = 0

    def ceiling(self) -> float:
        """The upper bound ``d`` of the next delay."""
        # Stop doubling once the cap is reached: no float overflow however long the outage.
        return min(self.cap, self.first * 2.0 ** min(self._failures, 64))

    def next(self) -> float:
        """The delay before the next attempt; counts one more failure."""
        ceiling = self.ceiling()
        self._failures += 1
        return ceiling / 2 + self._random() * ceiling / 2

    def reset(self) -> None:
        """A success: the next failure starts from ``first`` again."""
        self._failures = 0


def is_transient(error: HomeserverError) -> bool:
    """Trouble a loop should wait out: no connection, no answer in time, nonsense, 429 or 5xx."""
    if isinstance(error, MatrixError):
        return error.http_status == 429 or error.http_status >= 500
    return True


def retry_delay(backoff: Backoff, error: HomeserverError) -> float:
    """The next back-off delay, or the homeserver's ``Retry-After`` if that is longer."""
    delay = backoff.next()
    retry_after = error.retry_after if isinstance(error, MatrixError) else None
    return max(delay, retry_after) if retry_after is not None else delay


def with_deadline(d: "defer.Deferred[Any]", seconds: float, reactor: Any) -> "defer.Deferred[Any]":
    """``d``, cancelled after ``seconds`` and then failing with `HomeserverTimeout`."""
    expired = []

    def expire() -> None:
        expired.append(True)
        d.cancel()

    timer = reactor.callLater(seconds, expire)

    def done(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        if expired and isinstance(result, Failure) and result.check(CancelledError):
            raise HomeserverTimeout(f"homeserver gave no answer within {seconds:g} s")
        return result

    return d.addBoth(done)


def open_file_limit() -> int | None:
    """The process's soft ``RLIMIT_NOFILE`` (None: unlimited)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def long_poll_budget(open_files: int | None, client_connections: int) -> int | None:
    """Long-polls that fit beside ``client_connections`` and `FD_RESERVE` in `FD_SHARE` of the limit."""
    if open_files is None:
        return None
    return int(open_files * FD_SHARE) - FD_RESERVE - client_connections


class Lease:
    """One long-poll slot of a device; `release` (idempotent) gives it back."""

    __slots__ = ("_quota", "key", "released")

    def __init__(self, quota: "LongPollQuota", key: str | None) -> None:
        self._quota = quota
        self.key = key
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._quota._release(self.key)

    def release_passing(self, result: Any) -> Any:
        """`release`, as a Deferred callback that passes ``result`` on."""
        self.release()
        return result


class LongPollQuota:
    """At most ``per_device`` long-polls per device and ``total`` in all (module docstring)."""

    def __init__(self, per_device: int, total: int) -> None:
        self.per_device = per_device
        self.total = total
        self._held: dict[str, int] = {}
        self._in_use = 0

    @property
    def in_use(self) -> int:
        return self._in_use

    def held_by(self, key: str) -> int:
        return self._held.get(key, 0)

    def lease(self, device: Device | None) -> Lease:
        """A slot for ``device`` (None: the gateway itself, bound by the total only), or 4.29 / 5.03."""
        key = device.key if device is not None else None
        if key is not None and self._held.get(key, 0) >= self.per_device:
            # debug: a flood must not flood the log too (each request has its access-log line already)
            log.debug("Long-polls of {device}: all {n} of its share in use: 4.29", device=key, n=self.per_device)
            raise TooManyRequests("too many long-polls of this device", retry_after=LONG_POLL_RETRY_AFTER)
        if self._in_use >= self.total:
            log.info("Long-polls: all {n} in use: 5.03", n=self.total)
            raise ServiceUnavailable("too many long-polls", max_age=LONG_POLL_RETRY_AFTER)
        self._in_use += 1
        if key is not None:
            self._held[key] = self._held.get(key, 0) + 1
        return Lease(self, key)

    def _release(self, key: str | None) -> None:
        self._in_use -= 1
        if key is not None:
            left = self._held[key] - 1
            if left:
                self._held[key] = left
            else:
                del self._held[key]  # the table holds only devices with a long-poll running

    @classmethod
    def for_process(cls, config: Config, open_files: int | None) -> "LongPollQuota":
        """The configured quota, its total capped to what ``open_files`` leaves room for (logged)."""
        limits = config.limits
        client = max(config.max_connections, limits.max_upstream)
        budget = long_poll_budget(open_files, client)
        total = limits.max_long_polls if budget is None else max(1, min(limits.max_long_polls, budget))
        if total < limits.max_long_polls:
            log.warn("[limits] max_long_polls = {asked} does not fit the open-file limit {limit}: "
                     "using {total}", asked=limits.max_long_polls, limit=open_files, total=total)
        log.info("Long-polls to the homeserver: at most {total} in all, {per} per device; open-file limit "
                 "{limit} ({client} kept for the Matrix client, {reserve} reserved)",
                 total=total, per=min(limits.long_polls_per_device, total),
                 limit="unlimited" if open_files is None else open_files, client=client, reserve=FD_RESERVE)
        return cls(min(limits.long_polls_per_device, total), total)


class LongPoller:
    """Sends long-polls over a transport of their own, each with its own deadline, within a quota."""

    def __init__(self, transport: MatrixTransport, reactor: Any, quota: LongPollQuota | None = None) -> None:
        """``quota``: default the ``[limits]`` defaults (tests); the gateway's is sized by `long_poller`."""
        self.transport = transport
        self.reactor = reactor
        defaults = LimitSettings()
        self.quota = quota if quota is not None else LongPollQuota(defaults.long_polls_per_device,
                                                                   defaults.max_long_polls)

    @classmethod
    def for_homeserver(cls, base_url: str, reactor: Any, connect_timeout: float | None = None,
                       quota: LongPollQuota | None = None) -> "LongPoller":
        """``connect_timeout``: the gateway's, so a host that is down is "unreachable" here too."""
        return cls(AdmittedTransport(base_url, reactor=reactor, timeout=TRANSPORT_BACKSTOP,
                                     connect_timeout=connect_timeout,
                                     max_connections_per_host=LONG_POLL_CONNECTIONS_KEPT), reactor, quota)

    def lease(self) -> Lease:
        """A slot for the current device, to hold for a loop's life (4.29 / 5.03 when none is left)."""
        return self.quota.lease(current_device())

    def request(self, req: MatrixRequest, deadline: float,
                lease: Lease | None = None) -> "defer.Deferred[tuple[int, dict[str, Any]]]":
        """``req`` (a long-poll) sent at once; `HomeserverTimeout` after ``deadline`` seconds.

        ``lease``: the caller's (a loop's); without one the call takes a slot of the
        current device for its own duration, or fails at once with 4.29 / 5.03.
        """
        if lease is None:
            try:
                own = self.lease()
            except (TooManyRequests, ServiceUnavailable):
                return defer.fail()
            return self.request(req, deadline, own).addBoth(own.release_passing)
        return with_deadline(self.transport.request(req), deadline, self.reactor)

    def close(self) -> "defer.Deferred[None]":
        return self.transport.close()


def long_poller(context: PluginContext) -> LongPoller:
    """The gateway's one `LongPoller` (made on first use, its connections closed at shutdown)."""
    poller = context.state.get(STATE_KEY)
    if isinstance(poller, LongPoller):
        return poller
    transport = context.matrix.transport
    poller = LongPoller.for_homeserver(transport.base_url, context.reactor,
                                       getattr(transport, "connect_timeout", None),
                                       LongPollQuota.for_process(context.config, open_file_limit()))
    context.state[STATE_KEY] = poller
    trigger = getattr(context.reactor, "addSystemEventTrigger", None)
    if trigger is not None:
        # Idle connections close here; the loops' own shutdown cancels the calls in flight.
        trigger("before", "shutdown", poller.close)
    return poller
