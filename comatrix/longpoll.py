"""Homeserver long-polls (``/sync``): the gateway's one uncapped pool for them, deadlines, back-off.

Every ``/sync`` loop of the gateway -- the compact profile's one per observed
session, MSC3079's Observe loops and plain MSC3079 long-poll requests -- goes
through the one `LongPoller` of the gateway (`long_poller`), never through the
Matrix client the plugins use for everything else:

* That client's transport is capped (``[limits] max_upstream``,
  `comatrix.ratelimit.LimitedTransport`).  A long-poll holds its slot for its
  whole timeout, so a few watching devices would starve every send.  The
  long-poll transport has no cap; what bounds it is the number of loops:
  MSC3079's ``max_sync_loops`` and at most one compact loop per observed
  session (observations are bounded by ``[coap] max_observers``).
* Each call gets its own deadline: the long-poll timeout the homeserver was
  asked for plus a margin (`with_deadline`), instead of the transport's one.

After homeserver trouble a loop waits as `Backoff` says: exponential with
"equal jitter", so that loops which failed together (the homeserver restarted)
do not all come back in the same instant, and a 429's ``Retry-After`` is
honoured when it asks for longer.  A loop keeps its position (``since``) across
the wait: it resumes where it was, not from scratch.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure

from comatrix.interfaces import PluginContext
from comatrix.logs import get_logger
from comatrix.matrix.api import MatrixRequest
from comatrix.matrix.errors import HomeserverError, HomeserverTimeout, MatrixError
from comatrix.matrix.transport import MatrixTransport

__all__ = ["BACKOFF_CAP", "BACKOFF_FIRST", "DEADLINE_MARGIN", "Backoff", "LongPoller", "is_transient",
           "long_poller", "retry_delay", "with_deadline"]

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


class LongPoller:
    """Sends long-polls over a transport of their own, each with its own deadline."""

    def __init__(self, transport: MatrixTransport, reactor: Any) -> None:
        self.transport = transport
        self.reactor = reactor

    @classmethod
    def for_homeserver(cls, base_url: str, reactor: Any, connect_timeout: float | None = None) -> "LongPoller":
        """``connect_timeout``: the gateway's, so a host that is down is "unreachable" here too."""
        return cls(MatrixTransport(base_url, reactor=reactor, timeout=TRANSPORT_BACKSTOP,
                                   connect_timeout=connect_timeout,
                                   max_connections_per_host=LONG_POLL_CONNECTIONS_KEPT), reactor)

    def request(self, req: MatrixRequest, deadline: float) -> "defer.Deferred[tuple[int, dict[str, Any]]]":
        """``req`` (a long-poll) sent at once; `HomeserverTimeout` after ``deadline`` seconds."""
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
                                       getattr(transport, "connect_timeout", None))
    context.state[STATE_KEY] = poller
    trigger = getattr(context.reactor, "addSystemEventTrigger", None)
    if trigger is not None:
        # Idle connections close here; the loops' own shutdown cancels the calls in flight.
        trigger("before", "shutdown", poller.close)
    return poller
