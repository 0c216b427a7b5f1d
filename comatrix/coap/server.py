"""The CoAP server: message layer, deduplication, block-wise, Observe and dispatch.

`CoapServer` subclasses txThings' ``Coap`` protocol but replaces its whole
incoming path (``datagramReceived`` → ``Responder``), which has the defects
listed in facts §7.  What it guarantees:

* every request gets exactly one response; exceptions, failed Deferreds and
  non-`Response` results pass through the site's error adapter;
* CON → piggy-backed ACK when the answer is ready within ``empty_ack_delay``,
  else an empty ACK and a separate CON response retransmitted per RFC 7252;
  NON → NON, never an empty ACK;
* malformed datagrams are dropped (CON with a readable header → RST), unknown
  critical options → 4.02 (If-Match and If-None-Match too, unless the resource
  sets ``conditional_requests``); a reserved block size (SZX 7) → 4.00;
* deduplication in a bounded cache (no DelayedCall per message);
* block-wise transfers (RFC 7959) and Observe (RFC 7641) in bounded state
  (a representation kept for later blocks is dropped when its resource
  notifies a change or its URI gets a 2.xx to an unsafe method),
  with a share per peer: one peer can neither fill the observer table nor
  evict another peer's Block1 upload (a full table refuses the newcomer);
* all timing comes from `CoapSettings` and the injected reactor, never from
  txThings' module globals.

`Site` is the routing table (path tuple → `CoapResource`) and serves
``/.well-known/core``.  A resource put with ``subtree=True`` (or whose
``subtree`` attribute is true) also serves every path below its own, unless a
longer registered path matches; ``Request.path`` stays the full path.

Per-peer shares key on ``peer_key(request)``: the source address unless the
gateway injects a key function (it keys on the device, security context first),
so this layer needs no notion of identity.

``Site.notify`` pushes to all observers of a resource or to those whose
registration request ``only`` accepts, as NON or (``confirmable``) CON
notifications; the returned Deferred fires with how many were delivered
(acknowledged, for CON).  A resource may define ``observer_removed(request)``
to learn that an observation ended (deregistration, RST, give-up, error).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from collections import deque
from typing import Any, Callable, Hashable, Iterable, NamedTuple

from twisted.internet import defer
from twisted.internet.base import DelayedCall
from twisted.internet.interfaces import IListeningPort

from twisted.python.failure import Failure

from comatrix.logs import get_logger
from comatrix.coap import transport, wire
from comatrix.coap.amplification import ECHO, PeerGuard
from comatrix.coap._txthings import txcoap
from comatrix.coap.blockwise import MAX_SZX, Block, ReservedBlockSize, etag_for
from comatrix.coap.cache import BoundedCache
from comatrix.coap.errors import (BadOption, BadRequest, CoapError, ErrorAdapter, InternalServerError,
                                  MethodNotAllowed, NotAcceptable, NotFound, RequestEntityIncomplete,
                                  RequestEntityTooLarge, ServiceUnavailable, TooManyRequests, decode_uint,
                                  default_error_adapter, encode_uint)
from comatrix.coap.linkformat import WELL_KNOWN_CORE, WellKnownCore
from comatrix.coap.message import Peer, Request, Response, Security
from comatrix.coap.numbers import Code, MessageType, OptionNumber, dotted
from comatrix.coap.secured import MessageProtection, ProtectionUnavailable, Refused

log = get_logger(__name__)

__all__ = ["CoapSettings", "Site", "CoapServer", "listen_udp", "total_delivered", "ResponseHook", "RequestGuard",
           "REQUEST_TAG", "PeerKey", "address_key"]

CON, NON, ACK, RST = MessageType.CON, MessageType.NON, MessageType.ACK, MessageType.RST

#: RFC 9175 Request-Tag: tells concurrent Block1 uploads apart when tokens change.
REQUEST_TAG = 292

#: RFC 7252 §4.8.2 MAX_LATENCY.
MAX_LATENCY = 100.0

#: Called once per request when its final response is sent: (request, response, milliseconds).
ResponseHook = Callable[[Request, Response, float], None]

#: Called with each request before anything else is done with it (block-wise reassembly,
#: routing); raising a `CoapError` answers the request with that error instead.
RequestGuard = Callable[[Request], None]

Address = tuple[str, int]
#: An observation: (peer, token, security context of its registration).
ObserverKey = tuple[Address, bytes, Security | None]

#: Whose share a request counts against (observers, uploads): any hashable key.
PeerKey = Callable[[Request], Hashable]


def address_key(request: Request) -> Hashable:
    """The default `PeerKey`: the source address (the port left out, as a device may change it)."""
    return request.peer.host

#: Critical options this layer handles itself.  Proxy-Uri/-Scheme are passed to
#: resources: CoMatrix's compatibility clients send Proxy-Uri to the gateway.
_BUILTIN_UNDERSTOOD = frozenset({
    OptionNumber.URI_HOST, OptionNumber.URI_PORT, OptionNumber.URI_PATH, OptionNumber.URI_QUERY,
    OptionNumber.ACCEPT, OptionNumber.BLOCK2, OptionNumber.BLOCK1, OptionNumber.PROXY_URI,
    OptionNumber.PROXY_SCHEME,
})
#: Conditional-request options: understood only by resources with ``conditional_requests`` (else 4.02).
_CONDITIONAL = frozenset({OptionNumber.IF_MATCH, OptionNumber.IF_NONE_MATCH})
#: Critical options that must not repeat (RFC 7252 §5.4.5: a repeat is treated as unrecognised).
_SINGLE_CRITICAL = (OptionNumber.URI_HOST, OptionNumber.URI_PORT, OptionNumber.ACCEPT,
                    OptionNumber.BLOCK2, OptionNumber.BLOCK1, OptionNumber.PROXY_URI,
                    OptionNumber.PROXY_SCHEME, OptionNumber.IF_NONE_MATCH)
#: Maximum value lengths of uint options we read (RFC 7252 §5.10, RFC 7959, RFC 7641).
_UINT_MAX_LEN = {OptionNumber.CONTENT_FORMAT: 2, OptionNumber.ACCEPT: 2, OptionNumber.OBSERVE: 3,
                 OptionNumber.SIZE1: 4, OptionNumber.SIZE2: 4, OptionNumber.URI_PORT: 2,
                 OptionNumber.NO_RESPONSE: 1}

#: RFC 7967 No-Response bits: response class -> the bit that says "not interested".
_NO_RESPONSE_BIT = {2: 0x02, 4: 0x08, 5: 0x10}

_SEQ_MODULO = 1 << 24

#: Methods whose effect already happened when their answer is replaced by an Echo challenge: the
#: answer is kept for the repeat that carries the Echo value, instead of acting twice.
_UNSAFE = frozenset({Code.POST, Code.PUT, Code.DELETE, Code.PATCH, Code.IPATCH})


@dataclasses.dataclass(frozen=True)
class CoapSettings:
    """Transmission parameters (RFC 7252 §4.8 defaults) and resource bounds."""

    ack_timeout: float = 2.0
    ack_random_factor: float = 1.5
    max_retransmit: int = 4
    nstart: int = 1
    empty_ack_delay: float = 0.1        # separate response after this (piggy-back if ready sooner)
    dedup_capacity: int = 4096          # bounded dedup cache (entries), plus EXCHANGE_LIFETIME expiry
    max_observers: int = 256            # over the cap: answer without Observe option
    max_observers_per_peer: int = 16    # one peer's share of max_observers (same answer beyond it)
    max_body_size: int = 16384          # Block1 reassembly cap -> 4.13 with Size1
    default_block_szx: int = 6          # our preferred Block2 size when the client does not ask (1024)
    blockwise_state_capacity: int = 256  # pending block-wise transfers kept
    max_uploads_per_peer: int = 4       # one peer's share of the Block1 uploads (beyond it: 4.29)
    con_notification_interval: float = 86400.0  # send a CON notification at least this often
    # Amplification limit (RFC 9175 §2.4): until an address is verified, bytes sent <= factor x bytes received.
    amplification_factor: float = 3.0
    verified_lifetime: float = 3600.0   # seconds an address stays verified (Echo, ACK, security context)
    echo_lifetime: float = 120.0        # seconds an Echo value we issued is accepted
    peer_table_capacity: int = 4096     # addresses tracked (LRU)
    discovery_rate: float = 2.0         # /.well-known/core (and injected discovery paths) per s per address
    discovery_burst: int = 10

    def __post_init__(self) -> None:
        if not 0 <= self.default_block_szx <= MAX_SZX:
            raise ValueError("default_block_szx must be 0..6")
        if min(self.nstart, self.dedup_capacity, self.blockwise_state_capacity) < 1 or self.max_retransmit < 0:
            raise ValueError("nstart, dedup_capacity and blockwise_state_capacity must be >= 1")
        if self.max_observers_per_peer < 1 or self.max_uploads_per_peer < 1:
            raise ValueError("max_observers_per_peer and max_uploads_per_peer must be >= 1")
        if self.ack_timeout <= 0 or self.ack_random_factor < 1 or self.empty_ack_delay < 0:
            raise ValueError("ack_timeout > 0, ack_random_factor >= 1 and empty_ack_delay >= 0 required")
        if self.amplification_factor < 1 or self.peer_table_capacity < 1:
            raise ValueError("amplification_factor >= 1 and peer_table_capacity >= 1 required")
        if self.discovery_rate <= 0 or self.discovery_burst < 1:
            raise ValueError("discovery_rate > 0 and discovery_burst >= 1 required")
        if self.verified_lifetime <= 0 or self.echo_lifetime <= 0:
            raise ValueError("verified_lifetime and echo_lifetime must be positive")

    @property
    def max_transmit_span(self) -> float:
        return self.ack_timeout * (2 ** self.max_retransmit - 1) * self.ack_random_factor

    @property
    def exchange_lifetime(self) -> float:
        # MAX_TRANSMIT_SPAN + 2 * MAX_LATENCY + PROCESSING_DELAY (= ACK_TIMEOUT)
        return self.max_transmit_span + 2 * MAX_LATENCY + self.ack_timeout

    @property
    def non_lifetime(self) -> float:
        return self.max_transmit_span + MAX_LATENCY


class Site:
    """Path → resource table; serves ``/.well-known/core`` unless a resource is put there."""

    def __init__(self, error_adapter: ErrorAdapter = default_error_adapter) -> None:
        self.error_adapter = error_adapter
        self._resources: dict[tuple[str, ...], Any] = {}
        self._subtrees: set[tuple[str, ...]] = set()
        self._well_known = WellKnownCore(self.resources)
        self._servers: list[CoapServer] = []

    def put(self, path: tuple[str, ...], resource: Any, *, subtree: bool | None = None) -> None:
        """Serve ``resource`` at ``path``; with ``subtree`` (default: ``resource.subtree``) below it too."""
        path = tuple(path)
        if any(not isinstance(segment, str) for segment in path):
            raise TypeError("path segments must be str")
        self._resources[path] = resource
        if subtree is None:
            subtree = bool(getattr(resource, "subtree", False))
        if subtree:
            self._subtrees.add(path)
        else:
            self._subtrees.discard(path)
        sites = getattr(resource, "_coap_sites", ())
        if self not in sites:
            resource._coap_sites = sites + (self,)

    def resources(self) -> list[tuple[tuple[str, ...], Any]]:
        """The resources put here (the automatic ``/.well-known/core`` is not listed)."""
        return list(self._resources.items())

    def resolve(self, path: tuple[str, ...]) -> Any:
        """The resource at ``path``, else the one serving the longest subtree prefix of it."""
        resource = self._resources.get(path)
        if resource is not None:
            return resource
        if path == WELL_KNOWN_CORE:
            return self._well_known
        if self._subtrees:
            for length in range(len(path) - 1, 0, -1):
                if path[:length] in self._subtrees:
                    return self._resources[path[:length]]
        raise NotFound("not found")

    def notify(self, resource: Any, only: Callable[[Request], bool] | None = None, *,
               confirmable: bool = False) -> "defer.Deferred[int]":
        """Called by ``CoapResource.notify_observers``; ``only`` selects observations by request.

        Fires with the number of notifications delivered (see `CoapServer.notify`).
        """
        return total_delivered(server.notify(resource, only, confirmable=confirmable) for server in self._servers)

    def observer_requests(self, resource: Any) -> list[Request]:
        """The registration requests of every observation of ``resource`` on this site."""
        return [request for server in self._servers for request in server.observer_requests(resource)]

    def _attach(self, server: "CoapServer") -> None:
        self._servers.append(server)


class _Incoming:
    """One request being answered."""

    __slots__ = ("addr", "mid", "mtype", "token", "request", "received", "ack_timer", "empty_acked",
                 "done", "block1", "block2", "size2_asked", "observe", "cache_key", "not_interested",
                 "security", "exchange", "resource")

    def __init__(self, addr: Address, mid: int, mtype: int, token: bytes, received: float) -> None:
        self.addr = addr
        self.mid = mid
        self.mtype = mtype
        self.token = token
        self.received = received
        self.request: Request | None = None
        self.ack_timer: DelayedCall | None = None
        self.empty_acked = False
        self.done = False
        self.block1: Block | None = None
        self.block2: Block | None = None
        self.size2_asked = False
        self.observe: Any = None  # the resource when this GET may register an observer
        self.cache_key: tuple[Any, ...] | None = None
        self.not_interested = 0  # RFC 7967 No-Response bitmap
        self.security: Security | None = None
        self.exchange: Any = None  # set when the answer must be protected (see `MessageProtection`)
        self.resource: Any = None  # the resource answering (once resolved)


class _Kept(NamedTuple):
    """A representation kept for a peer's later Block2 requests, the resource and request it came from."""

    resource: Any
    request: Request | None
    response: Response


class _Outgoing:
    """A CON message we sent (separate response or notification) awaiting ACK/RST."""

    __slots__ = ("addr", "mid", "build", "data", "attempts", "timeout", "timer", "observer", "active",
                 "delivered")

    def __init__(self, addr: Address, build: Callable[[int], bytes], observer: "_Observer | None") -> None:
        self.addr = addr
        self.build = build
        self.mid = -1
        self.data = b""
        self.attempts = 0
        self.timeout = 0.0
        self.timer: DelayedCall | None = None
        self.observer = observer
        self.active = False
        #: Fired with 1 when acknowledged, 0 when given up or reset (notifications only).
        self.delivered: list[defer.Deferred[int]] = []

    def settle(self, count: int) -> None:
        waiters, self.delivered = self.delivered, []
        for waiter in waiters:
            waiter.callback(count)


class _Observer:
    __slots__ = ("key", "addr", "token", "resource", "request", "block2", "last_con", "con_out", "owner",
                 "exchange")

    def __init__(self, addr: Address, token: bytes, resource: Any, request: Request,
                 block2: Block | None, now: float, owner: Hashable, exchange: Any = None) -> None:
        # A request through a security context never touches a plain one's observation, nor the reverse.
        self.key: ObserverKey = (addr, token, request.security)
        self.owner = owner  # whose share it counts against
        self.addr = addr
        self.token = token
        self.resource = resource
        self.request = request
        self.block2 = block2
        self.last_con = now
        self.con_out: _Outgoing | None = None
        self.exchange = exchange


class _Upload:
    """A Block1 upload being reassembled."""

    __slots__ = ("body", "index_key", "owner", "verified")

    def __init__(self, index_key: tuple[Any, ...], owner: Hashable, verified: bool = True) -> None:
        self.body = bytearray()
        self.index_key = index_key
        self.owner = owner  # whose share it counts against
        self.verified = verified  # started by an address known to receive what we send it


class CoapServer(txcoap.Coap):  # type: ignore[misc]
    """A CoAP server protocol; bind it with `listen_udp`."""

    def __init__(self, site: Site, settings: CoapSettings = CoapSettings(), *, reactor: Any = None,
                 understood_options: frozenset[int] = frozenset(),
                 on_response: ResponseHook | None = None, guard: RequestGuard | None = None,
                 peer_key: PeerKey = address_key, protection: MessageProtection | None = None,
                 discovery_paths: Iterable[tuple[str, ...]] = ()) -> None:
        """``peer_key``: whose share of observers and uploads a request counts against.

        ``discovery_paths``: paths answered without credentials that get a per-address rate
        (``/.well-known/core`` always does).
        """
        super().__init__(site)
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.site = site
        self.settings = settings
        self.reactor = reactor
        self.on_response = on_response
        self.guard = guard
        self.peer_key = peer_key
        self.protection = protection
        #: The security context a peer's datagrams came through (a DTLS port sets it);
        #: None: plain CoAP.
        self.security_for: Callable[[Address], Security | None] | None = None
        self._understood = _BUILTIN_UNDERSTOOD | _CONDITIONAL | frozenset(understood_options) | {REQUEST_TAG}
        self._random = random.Random()
        self._mid = self._random.randrange(0x10000)
        self._seq = 0
        clock = reactor.seconds
        self._peers = PeerGuard(clock, factor=settings.amplification_factor,
                                verified_lifetime=settings.verified_lifetime,
                                echo_lifetime=settings.echo_lifetime, capacity=settings.peer_table_capacity,
                                discovery_rate=settings.discovery_rate, discovery_burst=settings.discovery_burst)
        #: Paths answered without credentials that are worth flooding: per-address rate-limited.
        self._discovery_paths = frozenset(tuple(path) for path in discovery_paths) | {WELL_KNOWN_CORE}
        #: Answers of unsafe requests replaced by an Echo challenge, for the repeat with the Echo value.
        self._challenged: BoundedCache[tuple[Any, ...], Response] = BoundedCache(
            settings.blockwise_state_capacity, settings.echo_lifetime, clock)
        self._dedup: BoundedCache[tuple[Address, int], bytes | None] = BoundedCache(
            settings.dedup_capacity, settings.exchange_lifetime, clock)
        self._uploads: BoundedCache[tuple[Any, ...], _Upload] = BoundedCache(
            settings.blockwise_state_capacity, settings.exchange_lifetime, clock)
        self._upload_index: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self._representations: BoundedCache[tuple[Any, ...], _Kept] = BoundedCache(
            settings.blockwise_state_capacity, settings.exchange_lifetime, clock)
        self._pending: set[_Incoming] = set()
        self._outgoing: dict[tuple[Address, int], _Outgoing] = {}
        self._busy: dict[Address, int] = {}
        self._queued: dict[Address, deque[_Outgoing]] = {}
        self._observers: dict[ObserverKey, _Observer] = {}
        self._observers_by_resource: dict[Any, dict[ObserverKey, _Observer]] = {}
        self._observers_per_peer: dict[Hashable, int] = {}
        self._non_notifications: BoundedCache[tuple[Address, int], ObserverKey] = BoundedCache(
            max(1024, 4 * settings.max_observers), settings.non_lifetime, clock)
        self._accepting = True
        self._idle_waiters: list[defer.Deferred[None]] = []
        self._idle_timers: list[DelayedCall] = []
        site._attach(self)

    # ------------------------------------------------------------------ public API

    def observer_count(self, resource: Any = None) -> int:
        if resource is None:
            return len(self._observers)
        return len(self._observers_by_resource.get(resource, ()))

    def observer_requests(self, resource: Any) -> list[Request]:
        """The registration request of each current observer of ``resource``."""
        return [observer.request for observer in self._observers_by_resource.get(resource, {}).values()]

    def notify(self, resource: Any, only: Callable[[Request], bool] | None = None, *,
               confirmable: bool = False) -> "defer.Deferred[int]":
        """Re-render ``resource`` with each observer's original request and send notifications.

        ``only`` limits the notification to observations whose registration request it
        accepts: for representations that depend on the request (FETCH bodies, queries).
        ``confirmable`` sends CON notifications whatever ``con_notification_interval`` says.
        The Deferred fires with the number delivered (sent, for NON; acknowledged, for
        CON); it never fails.  The resource's representations kept for block-wise
        transfers are dropped first: a peer continuing one gets the new representation.
        """
        self.forget_representations(resource, only)
        waits: list[defer.Deferred[int]] = []
        for observer in list(self._observers_by_resource.get(resource, {}).values()):
            if only is not None and not only(observer.request):
                continue
            delivered: defer.Deferred[int] = defer.Deferred()
            waits.append(delivered)
            deferred = defer.maybeDeferred(resource.render, observer.request)
            deferred.addCallbacks(self._notification_rendered, self._notification_failed,
                                  callbackArgs=(observer, confirmable, delivered),
                                  errbackArgs=(observer, confirmable, delivered))
        return total_delivered(waits)

    def forget_representations(self, resource: Any, only: Callable[[Request], bool] | None = None) -> None:
        """``resource`` changed (for the requests ``only`` accepts): later Block2 requests get blocks
        of its new representation (RFC 7959 §2.4), not of one kept from before."""
        if resource is None:
            return
        kept = self._representations
        for key in kept:
            entry = kept.get(key)
            if entry is not None and entry.resource is resource and (
                    only is None or (entry.request is not None and only(entry.request))):
                kept.pop(key)

    def _forget_target(self, path: tuple[str, ...]) -> None:
        kept = self._representations
        for key in kept:
            if key[2] == path and key[1] in (Code.GET, Code.FETCH):  # see cache_key in _handle
                kept.pop(key)  # (a POST's own answer is no representation of its target: kept)

    def verify_peer(self, host: str) -> None:
        """Treat ``host`` as verified (it proved it receives at its address some other way)."""
        self._peers.verify(host)

    def peer_verified(self, host: str) -> bool:
        return self._peers.verified(host)

    def forget_peer(self, addr: Address) -> None:
        """Drop everything kept for ``addr``: the security session it was made in ended.

        Observations, duplicate answers, Block1 uploads, Block2 representations,
        answers kept for an Echo repeat, CON messages awaiting their ACK (and those
        queued behind them) and requests still being answered all belong to that
        session; a later one from the same address (perhaps with another identity)
        must not receive them.
        """
        for observer in [observer for key, observer in self._observers.items() if key[0] == addr]:
            self._remove_observer(observer)
        for upload_key in [key for key in self._uploads if key[0] == addr]:
            self._drop_upload(upload_key)
        for cache in (self._dedup, self._representations, self._challenged):
            for key in [key for key in cache if key[0] == addr]:
                cache.pop(key)
        for queued in self._queued.pop(addr, ()):
            queued.settle(0)
        for outgoing in [outgoing for outgoing in self._outgoing.values() if outgoing.addr == addr]:
            self._outgoing_done(outgoing)
            outgoing.settle(0)
        for incoming in [incoming for incoming in self._pending if incoming.addr == addr]:
            incoming.done = True  # its answer, when the resource gives it, goes nowhere
            if incoming.ack_timer is not None and incoming.ack_timer.active():
                incoming.ack_timer.cancel()
            incoming.ack_timer = None
            self._pending.discard(incoming)
        if not self._pending and self._idle_waiters:
            self._fire_idle()

    def stop_accepting(self) -> None:
        self._accepting = False

    def in_flight(self) -> int:
        return len(self._pending)

    def wait_idle(self, timeout: float) -> "defer.Deferred[None]":
        """Fires when nothing is in flight, or after ``timeout`` when the rest is answered 5.03."""
        waiter: defer.Deferred[None] = defer.Deferred()
        if not self._pending:
            waiter.callback(None)
            return waiter
        self._idle_waiters.append(waiter)
        self._idle_timers.append(self.reactor.callLater(timeout, self._idle_timeout))
        return waiter

    def stopProtocol(self) -> None:
        self.close()

    def close(self) -> None:
        """Cancel every timer this server holds (shutdown and tests)."""
        for incoming in list(self._pending):
            if incoming.ack_timer is not None and incoming.ack_timer.active():
                incoming.ack_timer.cancel()
        for outgoing in list(self._outgoing.values()):
            if outgoing.timer is not None and outgoing.timer.active():
                outgoing.timer.cancel()
            outgoing.settle(0)
        for queue in self._queued.values():
            for outgoing in queue:
                outgoing.settle(0)
        self._outgoing.clear()
        self._queued.clear()
        self._busy.clear()
        for timer in self._idle_timers:
            if timer.active():
                timer.cancel()
        self._idle_timers.clear()

    # ------------------------------------------------------------------ message layer

    def datagramReceived(self, data: bytes, addr: Address) -> None:
        self._peers.received(addr[0], len(data))
        try:
            message = wire.decode(data)
        except wire.FormatError as exc:
            log.debug("Dropped malformed datagram from {peer}: {reason}", peer=addr, reason=exc.reason)
            if exc.mtype == CON and exc.mid is not None:
                self._write(wire.empty(RST, exc.mid), addr)
            return
        try:
            self._dispatch(message, addr)
        except Exception:
            log.failure("Bug while handling a datagram from {peer}", peer=addr)

    def _dispatch(self, message: wire.Datagram, addr: Address) -> None:
        code = message.code
        mtype = message.mtype
        if 1 <= code < 32:
            if mtype == CON or mtype == NON:
                self._request_received(message, addr)
            # A request in an ACK or RST is malformed: silently ignored.
            return
        if code == 0:
            if mtype == CON:  # CoAP ping
                self._write(wire.empty(RST, message.mid), addr)
            elif mtype == ACK:
                self._acknowledged(addr, message.mid)
            elif mtype == RST:
                self._reset(addr, message.mid)
            return
        # Responses (we never send requests) and reserved classes.
        if mtype == CON:
            self._write(wire.empty(RST, message.mid), addr)
        elif mtype == ACK:
            self._acknowledged(addr, message.mid)

    def _write(self, data: bytes, addr: Address) -> bool:
        """Send ``data`` unless that breaks ``addr``'s amplification limit (then False, nothing sent)."""
        if not self._peers.spend(addr[0], len(data)):
            log.debug("Not sending {size} bytes to unverified {peer}: amplification limit",
                      size=len(data), peer=addr)
            return False
        try:
            self.transport.write(data, addr)
        except Exception:
            log.warn("Could not send {size} bytes to {peer}", size=len(data), peer=addr)
        return True

    def _next_mid(self, addr: Address) -> int:
        # Sequential per peer, but offset by a secret per address: an ACK that verifies an
        # address (see PeerGuard) cannot be forged by reading our Message IDs to another peer.
        self._mid = (self._mid + 1) & 0xFFFF
        return (self._mid + self._peers.mid_offset(addr[0])) & 0xFFFF

    # outgoing CON messages (separate responses and notifications), NSTART per peer

    def _send_con(self, outgoing: _Outgoing) -> None:
        if self._busy.get(outgoing.addr, 0) >= self.settings.nstart:
            self._queued.setdefault(outgoing.addr, deque()).append(outgoing)
            return
        self._busy[outgoing.addr] = self._busy.get(outgoing.addr, 0) + 1
        outgoing.active = True
        outgoing.mid = self._next_mid(outgoing.addr)
        outgoing.data = outgoing.build(outgoing.mid)
        settings = self.settings
        outgoing.timeout = self._random.uniform(settings.ack_timeout,
                                                settings.ack_timeout * settings.ack_random_factor)
        self._outgoing[(outgoing.addr, outgoing.mid)] = outgoing
        if not self._write(outgoing.data, outgoing.addr):
            self._give_up(outgoing)
            return
        outgoing.timer = self.reactor.callLater(outgoing.timeout, self._retransmit, outgoing)

    def _resend_replaced(self, outgoing: _Outgoing, build: Callable[[int], bytes]) -> None:
        """RFC 7641 §4.5.2: a newer notification takes over the pending one's retransmission state."""
        outgoing.build = build
        if not outgoing.active:
            return  # still queued: it will be built fresh when sent
        self._outgoing.pop((outgoing.addr, outgoing.mid), None)
        outgoing.mid = self._next_mid(outgoing.addr)
        outgoing.data = build(outgoing.mid)
        self._outgoing[(outgoing.addr, outgoing.mid)] = outgoing
        self._write(outgoing.data, outgoing.addr)

    def _retransmit(self, outgoing: _Outgoing) -> None:
        outgoing.timer = None
        if outgoing.attempts >= self.settings.max_retransmit:
            log.debug("Gave up on {peer} after {n} retransmissions", peer=outgoing.addr, n=outgoing.attempts)
            self._give_up(outgoing)
            return
        outgoing.attempts += 1
        outgoing.timeout *= 2
        if not self._write(outgoing.data, outgoing.addr):
            # A peer that never ACKs (a forged source?) gets no more than its budget.
            log.debug("Stopped retransmitting to unverified {peer} after {n}", peer=outgoing.addr,
                      n=outgoing.attempts - 1)
            self._give_up(outgoing)
            return
        outgoing.timer = self.reactor.callLater(outgoing.timeout, self._retransmit, outgoing)

    def _give_up(self, outgoing: _Outgoing) -> None:
        self._outgoing_done(outgoing)
        outgoing.settle(0)
        if outgoing.observer is not None:
            self._remove_observer(outgoing.observer)

    def _outgoing_done(self, outgoing: _Outgoing) -> None:
        if not outgoing.active:
            return
        outgoing.active = False
        if outgoing.timer is not None and outgoing.timer.active():
            outgoing.timer.cancel()
        outgoing.timer = None
        self._outgoing.pop((outgoing.addr, outgoing.mid), None)
        if outgoing.observer is not None and outgoing.observer.con_out is outgoing:
            outgoing.observer.con_out = None
        addr = outgoing.addr
        busy = self._busy.get(addr, 1) - 1
        if busy > 0:
            self._busy[addr] = busy
        else:
            self._busy.pop(addr, None)
        queue = self._queued.get(addr)
        if queue:
            following = queue.popleft()
            if not queue:
                del self._queued[addr]
            self._send_con(following)

    def _acknowledged(self, addr: Address, mid: int) -> None:
        outgoing = self._outgoing.get((addr, mid))
        if outgoing is None:
            self._peers.stray(addr[0])
        else:
            self._peers.acknowledged(addr[0])
            if outgoing.observer is not None:
                outgoing.observer.last_con = self.reactor.seconds()
            self._outgoing_done(outgoing)
            outgoing.settle(1)

    def _reset(self, addr: Address, mid: int) -> None:
        outgoing = self._outgoing.get((addr, mid))
        if outgoing is not None:
            self._outgoing_done(outgoing)
            outgoing.settle(0)
            if outgoing.observer is not None:
                self._remove_observer(outgoing.observer)
            return
        key = self._non_notifications.pop((addr, mid))
        if key is None:
            self._peers.stray(addr[0])
            return
        observer = self._observers.get(key)
        if observer is not None:
            self._remove_observer(observer)

    # ------------------------------------------------------------------ requests

    def _request_received(self, message: wire.Datagram, addr: Address) -> None:
        key = (addr, message.mid)
        dedup = self._dedup
        if key in dedup._data:
            previous = dedup.get(key)
            if key in dedup._data:  # still alive after the lazy expiry check
                log.debug("Duplicate {mid} from {peer}", mid=message.mid, peer=addr)
                if message.mtype == CON and previous is not None:
                    self._write(previous, addr)
                return
        dedup.put(key, None)
        log.debug("Request {mid} from {peer}", mid=message.mid, peer=addr)
        incoming = _Incoming(addr, message.mid, message.mtype, message.token, self.reactor.seconds())
        self._pending.add(incoming)
        if self.security_for is not None:
            incoming.security = self.security_for(addr)
        if self.protection is not None and any(number == OptionNumber.OSCORE for number, _ in message.options):
            outcome = self.protection.unprotect(message)
            if isinstance(outcome, Refused):
                incoming.exchange = outcome.exchange
                self._complete(incoming, outcome.response)
                return
            message = outcome.message
            incoming.security = outcome.security
            incoming.exchange = outcome.exchange
        try:
            request = self._parse(message, addr, incoming)
        except CoapError as exc:
            self._complete(incoming, exc.to_response())
            return
        incoming.request = request
        try:
            if not self._gate(incoming, request):
                self._handle(incoming, request)
        except Exception:
            self._complete(incoming, self._adapt(Failure()))

    def _parse(self, message: wire.Datagram, addr: Address, incoming: _Incoming) -> Request:
        options: dict[int, list[bytes]] = {}
        for number, value in message.options:
            values = options.get(number)
            if values is None:
                options[number] = [value]
            else:
                values.append(value)
        frozen = {number: tuple(values) for number, values in options.items()}
        peer = Peer(addr[0], addr[1])
        try:
            method = Code(message.code)
        except ValueError:
            method = Code.EMPTY
        # A minimal request first, so that early errors can still be reported to the hook.
        incoming.request = Request(method=method, path=(), token=message.token, peer=peer,
                                   message_type=MessageType(message.mtype), options=frozen,
                                   security=incoming.security)
        if method == Code.EMPTY:
            raise MethodNotAllowed("unknown method")
        understood = self._understood
        for number in options:
            if number & 1 and number not in understood:
                raise BadOption(f"option {number}")
        for number in _SINGLE_CRITICAL:
            values = options.get(number)
            if values is not None and len(values) > 1:
                raise BadOption(f"option {number} repeated")
        if any(len(value) > 8 for value in options.get(OptionNumber.IF_MATCH, ())) or any(
                options.get(OptionNumber.IF_NONE_MATCH, ())):
            raise BadOption("If-Match or If-None-Match malformed")  # RFC 7252 §5.10: 0-8 bytes, empty
        uints: dict[int, int | None] = {}
        for number, max_len in _UINT_MAX_LEN.items():
            values = options.get(number)
            if values is None:
                uints[number] = None
            elif len(values[0]) > max_len:
                if number & 1:
                    raise BadOption(f"option {number} too long")
                uints[number] = None  # elective with a bad length: ignored
            else:
                uints[number] = decode_uint(values[0])
        try:
            path = tuple(segment.decode("utf-8") for segment in options.get(OptionNumber.URI_PATH, ()))
            query = tuple(item.decode("utf-8") for item in options.get(OptionNumber.URI_QUERY, ()))
        except UnicodeDecodeError:
            raise BadRequest("URI not UTF-8")
        try:
            if OptionNumber.BLOCK1 in options:
                incoming.block1 = Block.decode(options[OptionNumber.BLOCK1][0])
            if OptionNumber.BLOCK2 in options:
                incoming.block2 = Block.decode(options[OptionNumber.BLOCK2][0])
        except ReservedBlockSize as exc:
            raise BadRequest(str(exc))
        except ValueError as exc:  # too long for a Block option: treated as unrecognised (RFC 7252 §5.4.3)
            raise BadOption(str(exc))
        incoming.size2_asked = OptionNumber.SIZE2 in options
        # No-Response is ignored on an Observe registration: its answer says whether it took.
        if uints[OptionNumber.NO_RESPONSE] and uints[OptionNumber.OBSERVE] is None:
            incoming.not_interested = uints[OptionNumber.NO_RESPONSE] or 0
        request = Request(
            method=method, path=path, payload=message.payload, query=query,
            content_format=uints[OptionNumber.CONTENT_FORMAT], accept=uints[OptionNumber.ACCEPT],
            observe=uints[OptionNumber.OBSERVE], token=message.token, peer=peer,
            message_type=MessageType(message.mtype), options=frozen, security=incoming.security)
        incoming.request = request
        return request

    def _handle(self, incoming: _Incoming, request: Request) -> None:
        settings = self.settings
        if not self._accepting:
            self._complete(incoming, ServiceUnavailable("shutting down").to_response())
            return
        if self.guard is not None:
            try:
                self.guard(request)
            except CoapError as exc:
                self._complete(incoming, exc.to_response())
                return
        if request.conditional and not getattr(self.site.resolve(request.path), "conditional_requests", False):
            self._complete(incoming, BadOption("conditional request not supported here").to_response())
            return
        if incoming.block1 is not None and self._streams_block1(request.path):
            pass  # the resource takes each block itself (its own bounded state): see CoapResource
        elif incoming.block1 is not None:
            assembled = self._block1(incoming, request)
            if assembled is None:
                return
            request = incoming.request = assembled
        elif len(request.payload) > settings.max_body_size:
            self._complete(incoming, RequestEntityTooLarge(size1=settings.max_body_size).to_response())
            return
        block2 = incoming.block2
        cache_key = (incoming.addr, request.method, request.path, request.query, request.accept,
                     request.security)
        incoming.cache_key = cache_key
        if block2 is not None and block2.num > 0 and not request.conditional:
            kept = self._representations.get(cache_key)
            if kept is not None:
                incoming.resource = kept.resource
                self._complete(incoming, kept.response)
                return
            if request.method not in (Code.GET, Code.FETCH):
                # Re-running an unsafe method to get a later block would repeat its effect.
                self._complete(incoming, RequestEntityIncomplete("representation expired").to_response())
                return
        resource = incoming.resource = self.site.resolve(request.path)
        accept = request.accept
        if accept is not None and resource.link.ct and accept not in resource.link.ct:
            self._complete(incoming, NotAcceptable("content-format").to_response())
            return
        if request.observe is not None and request.method in (Code.GET, Code.FETCH):  # RFC 8132 §2.4
            if request.observe == 1:
                observer = self._observers.get((incoming.addr, request.token, request.security))
                if observer is not None:
                    self._remove_observer(observer)
            elif request.observe == 0 and resource.link.obs and (block2 is None or block2.num == 0):
                incoming.observe = resource
        deferred = defer.maybeDeferred(resource.render, request)
        deferred.addCallbacks(self._rendered, self._render_failed,
                              callbackArgs=(incoming,), errbackArgs=(incoming,))
        if not incoming.done and incoming.mtype == CON:
            incoming.ack_timer = self.reactor.callLater(settings.empty_ack_delay, self._empty_ack, incoming)

    def _streams_block1(self, path: tuple[str, ...]) -> bool:
        try:
            return bool(getattr(self.site.resolve(path), "streams_block1", False))
        except NotFound:
            return False

    # amplification limit and discovery rate (see comatrix.coap.amplification)

    def _gate(self, incoming: _Incoming, request: Request) -> bool:
        """Verification by Echo or security context, discovery rate, Echo challenge; True when answered."""
        host = incoming.addr[0]
        peers = self._peers
        if request.security is not None:
            peers.verify(host)
        echo = request.option(ECHO)
        if echo is not None and not peers.verified(host):
            if not peers.echo_valid(host, echo):
                log.debug("Stale or foreign Echo from {peer}: challenged again", peer=incoming.addr)
                self._complete(incoming, self._challenge(host))
                return True
            peers.verify(host)
            if request.method in _UNSAFE:
                kept = self._challenged.pop(self._challenged_key(incoming.addr, request))
                if kept is not None:
                    # The repeat of a request answered by a challenge after it acted: its own answer.
                    self._complete(incoming, kept)
                    return True
        block2 = incoming.block2
        first_block = block2 is None or block2.num == 0
        if first_block and request.path in self._discovery_paths:
            wait = peers.discovery_wait(host)
            if wait > 0:
                self._complete(incoming, TooManyRequests("discovery rate limit",
                                                         retry_after=math.ceil(wait)).to_response())
                return True
        return False

    @staticmethod
    def _challenged_key(addr: Address, request: Request) -> tuple[Any, ...]:
        digest = hashlib.blake2s(request.payload, digest_size=8).digest()
        return (addr, request.method, request.path, request.query, request.accept, digest)

    def _challenge(self, host: str) -> Response:
        """4.01 with a fresh Echo value (RFC 9175 §2.3): small, and answered whatever the budget."""
        return Response(code=Code.UNAUTHORIZED, extra_options=((ECHO, self._peers.echo_value(host)),))

    def _fit(self, incoming: _Incoming, response: Response, base: list[wire.RawOption],
             options: list[wire.RawOption], payload: bytes) -> tuple[Response, list[wire.RawOption], bytes] | None:
        """``response`` made to fit an unverified peer's budget; None when it fits unchanged.

        A success goes block-wise with the largest block (at most the one asked for) that fits;
        later blocks come with their own requests, which bring their own budget.  An error loses its
        diagnostic text.  What still does not fit becomes a 4.01 with Echo.
        """
        allowance = self._peers.allowance(incoming.addr[0])
        token = incoming.token
        if allowance is None or wire.encoded_size(token, options, payload) <= allowance:
            return None
        if 64 <= response.code < 96 and response.payload and response.code != Code.CONTINUE:
            block = self._fitting_block(incoming, response, base, allowance)
            if block is not None:
                return response, block[0], block[1]
        elif payload and wire.encoded_size(token, options, b"") <= allowance:
            return response, options, b""
        log.debug("{code} to unverified {peer} over the amplification limit: 4.01 with Echo",
                  code=dotted(response.code), peer=incoming.addr)
        challenge = self._challenge(incoming.addr[0])
        return challenge, self._response_options(challenge), b""

    def _fitting_block(self, incoming: _Incoming, response: Response, base: list[wire.RawOption],
                       allowance: int) -> tuple[list[wire.RawOption], bytes] | None:
        asked = incoming.block2
        szx = min(asked.szx, MAX_SZX) if asked is not None else self.settings.default_block_szx
        offset = asked.num * asked.size if asked is not None else 0
        for candidate in range(szx, -1, -1):
            # RFC 7959 §2.2: a server may answer with a smaller block; NUM then counts in that size.
            block = Block(offset >> (4 + candidate), False, candidate)
            sliced = self._block2_options(response, block, incoming.size2_asked, incoming.cache_key, candidate,
                                          _Kept(incoming.resource, incoming.request, response))
            if isinstance(sliced, Response):
                return None
            options = base + sliced[0]
            if wire.encoded_size(incoming.token, options, sliced[1]) <= allowance:
                return options, sliced[1]
        return None

    def _rendered(self, result: Any, incoming: _Incoming) -> None:
        if not isinstance(result, Response):
            failure = Failure(TypeError(f"resource returned {type(result).__name__}, not Response"))
            result = self._adapt(failure)
        request = incoming.request
        if request is not None and request.method in _UNSAFE and 64 <= result.code < 96:
            # RFC 7252 §5.9.1: the target changed; no peer may go on downloading a representation
            # of it from before.  (Only this URI: a resource serving a subtree has others.)
            self._forget_target(request.path)
        self._complete(incoming, result)

    def _render_failed(self, failure: Failure, incoming: _Incoming) -> None:
        self._complete(incoming, self._adapt(failure))

    def _adapt(self, failure: Failure) -> Response:
        try:
            response = self.site.error_adapter(failure)
            if isinstance(response, Response):
                return response
            log.error("Error adapter returned {kind}, not Response", kind=type(response).__name__)
        except Exception:
            log.failure("Error adapter raised")
        return InternalServerError("internal error").to_response()

    def _empty_ack(self, incoming: _Incoming) -> None:
        incoming.ack_timer = None
        if incoming.done:
            return
        self._send_empty_ack(incoming)

    def _send_empty_ack(self, incoming: _Incoming) -> None:
        incoming.empty_acked = True
        ack = wire.empty(ACK, incoming.mid)
        # A duplicate of this request now gets the empty ACK again (RFC 7252 §4.5).
        self._dedup.replace((incoming.addr, incoming.mid), ack)
        self._write(ack, incoming.addr)

    # block-wise

    def _block1(self, incoming: _Incoming, request: Request) -> Request | None:
        """Store one Block1 piece; the whole request when complete, else None (answered already)."""
        block = incoming.block1
        assert block is not None
        settings = self.settings
        size1 = request.option(OptionNumber.SIZE1)
        if size1 is not None and len(size1) <= 4 and decode_uint(size1) > settings.max_body_size:
            self._complete(incoming, RequestEntityTooLarge(size1=settings.max_body_size).to_response())
            return None
        tag = request.option(REQUEST_TAG)
        index_key = (incoming.addr, request.method, request.path, request.security)
        key = index_key + ((b"t", tag) if tag is not None else (b"k", request.token),)
        if block.num == 0:
            if not block.more:
                return request  # the whole body in one block
            owner = self.peer_key(request)
            verified = self._peers.verified(incoming.addr[0])
            if self._uploads.get(key) is None:
                refusal = self._refuse_upload(owner, incoming.addr[0], verified)
                if refusal is not None:
                    self._complete(incoming, refusal)
                    return None
            upload: _Upload | None = _Upload(index_key, owner, verified)
        else:
            upload = self._uploads.get(key)
            if upload is None and tag is None:
                # RFC 7959 lets a client change the token between blocks: fall back to the
                # single transfer this peer has open on this path.
                fallback = self._upload_index.get(index_key)
                if fallback is not None:
                    upload = self._uploads.get(fallback)
                    if upload is not None:
                        self._uploads.pop(fallback)
        if upload is None or block.offset != len(upload.body):
            self._drop_upload(key)
            self._complete(incoming, RequestEntityIncomplete("block out of order").to_response())
            return None
        if block.more and len(request.payload) != block.size:
            self._drop_upload(key)
            self._complete(incoming, BadRequest("block size mismatch").to_response())
            return None
        upload.body += request.payload
        if len(upload.body) > settings.max_body_size:
            self._drop_upload(key)
            self._complete(incoming, RequestEntityTooLarge(size1=settings.max_body_size).to_response())
            return None
        if block.more:
            self._uploads.put(key, upload)
            self._upload_index[index_key] = key
            self._trim_upload_index()
            self._complete(incoming, Response(code=Code.CONTINUE))
            return None
        self._drop_upload(key)
        return dataclasses.replace(request, payload=bytes(upload.body))

    def _refuse_upload(self, owner: Hashable, host: str, verified: bool) -> Response | None:
        """Why a new upload of ``owner`` cannot start (its share or the table is full), else None.

        Uploads in progress are never evicted for a newcomer: the newcomer waits
        (Max-Age) until one finishes or is abandoned long enough to expire.  Addresses
        not verified yet (anyone on the link can forge them) fill at most half of the
        table; beyond that such a newcomer gets an Echo challenge (RFC 9175 §2.4), which
        a real device answers and a forger cannot -- so forged starts never lock real
        devices out.
        """
        uploads = self._uploads
        uploads.expire()
        now = self.reactor.seconds()
        entries = uploads.expiries()
        own = [expiry for expiry, upload in entries if upload.owner == owner]
        if len(own) >= self.settings.max_uploads_per_peer:
            return TooManyRequests("too many uploads", retry_after=_seconds_until(own[0], now)).to_response()
        if len(entries) >= uploads.capacity:
            log.debug("Block1 upload refused: all {count} upload slots are in use", count=len(entries))
            return ServiceUnavailable("too many uploads", max_age=_seconds_until(entries[0][0], now)).to_response()
        if not verified and sum(not upload.verified for _, upload in entries) >= uploads.capacity // 2:
            log.debug("Block1 upload of unverified {peer} challenged: half the slots hold unverified uploads",
                      peer=host)
            return self._challenge(host)
        return None

    def _drop_upload(self, key: tuple[Any, ...]) -> None:
        upload = self._uploads.pop(key)
        if upload is not None and self._upload_index.get(upload.index_key) == key:
            del self._upload_index[upload.index_key]

    def _trim_upload_index(self) -> None:
        if len(self._upload_index) > 2 * self.settings.blockwise_state_capacity:
            live = self._uploads._data
            self._upload_index = {index: key for index, key in self._upload_index.items() if key in live}

    def _block2_options(self, response: Response, block2: Block | None, size2_asked: bool,
                        cache_key: tuple[Any, ...] | None, default_szx: int,
                        kept: _Kept) -> tuple[list[wire.RawOption], bytes] | Response:
        """The Block2/Size2/ETag options and payload slice for ``response``; an error Response if out of range.

        A representation sent in several blocks is kept (``kept``) under ``cache_key`` for the later ones.
        """
        payload = response.payload
        szx = min(block2.szx, MAX_SZX) if block2 is not None else default_szx
        size = 16 << szx
        num = block2.num if block2 is not None else 0
        extra: list[wire.RawOption] = []
        if num == 0 and len(payload) <= size:
            if block2 is not None:
                extra.append((OptionNumber.BLOCK2, Block(0, False, szx).encode()))
            if size2_asked:
                extra.append((OptionNumber.SIZE2, encode_uint(len(payload))))
            return extra, payload
        start = num * size
        if start >= len(payload):
            return BadOption("block number out of range").to_response()
        more = start + size < len(payload)
        if response.etag is None:  # the response's own ETag is among its options already
            extra.append((OptionNumber.ETAG, etag_for(payload, response.content_format)))
        extra.append((OptionNumber.BLOCK2, Block(num, more, szx).encode()))
        if num == 0:
            extra.append((OptionNumber.SIZE2, encode_uint(len(payload))))
        if cache_key is not None:
            if more or num > 0:
                existing = self._representations.get(cache_key)
                if existing is None or existing.response is not response:
                    existing = kept  # else a later block of it: it stays kept as it came (its request)
                self._representations.put(cache_key, existing)
        return extra, payload[start:start + size]

    # responses

    def _complete(self, incoming: _Incoming, response: Response) -> None:
        if incoming.done:
            return
        incoming.done = True
        if incoming.ack_timer is not None:
            if incoming.ack_timer.active():
                incoming.ack_timer.cancel()
            incoming.ack_timer = None
        self._pending.discard(incoming)
        options = self._response_options(response)
        is_success = 64 <= response.code < 96
        resource = incoming.observe
        request = incoming.request
        if resource is not None and request is not None:
            key = (incoming.addr, incoming.token, request.security)
            owner = self.peer_key(request)
            if is_success and self._may_observe(key, owner):
                self._add_observer(_Observer(incoming.addr, incoming.token, resource, request,
                                             incoming.block2, self.reactor.seconds(), owner, incoming.exchange))
                options.append((OptionNumber.OBSERVE, encode_uint(self._next_seq())))
            elif not is_success:
                observer = self._observers.get(key)
                if observer is not None:
                    self._remove_observer(observer)
        payload = response.payload
        if incoming.block1 is not None and response.code != Code.REQUEST_ENTITY_INCOMPLETE:
            block1 = incoming.block1
            if response.code == Code.CONTINUE or is_success:
                options.append((OptionNumber.BLOCK1, Block(block1.num, block1.more, block1.szx).encode()))
        # Block2 applies to successful representations; an error is sent whole (sliced only if huge).
        block2 = incoming.block2 if is_success else None
        size2_asked = incoming.size2_asked and is_success
        base = list(options)
        if response.code != Code.CONTINUE and (payload or block2 is not None or size2_asked):
            sliced = self._block2_options(response, block2, size2_asked,
                                          incoming.cache_key if is_success else None,
                                          self.settings.default_block_szx,
                                          _Kept(incoming.resource, request, response))
            if isinstance(sliced, Response):
                response = sliced
                options = base = self._response_options(response)
                payload = response.payload
            else:
                options.extend(sliced[0])
                payload = sliced[1]
        fitted = self._fit(incoming, response, base, options, payload)
        challenged = False
        if fitted is not None:
            challenged = fitted[0] is not response
            if challenged and request is not None and request.method in _UNSAFE:
                self._challenged.put(self._challenged_key(incoming.addr, request), response)
            response, options, payload = fitted
            if challenged and resource is not None and request is not None:
                observer = self._observers.get((incoming.addr, incoming.token, request.security))
                if observer is not None:
                    self._remove_observer(observer)
        self._send_response(incoming, response.code, options, payload, challenged)
        if request is not None and self.on_response is not None:
            try:
                self.on_response(request, response, (self.reactor.seconds() - incoming.received) * 1000.0)
            except Exception:
                log.failure("on_response hook raised")
        if not self._pending and self._idle_waiters:
            self._fire_idle()

    @staticmethod
    def _response_options(response: Response) -> list[wire.RawOption]:
        options: list[wire.RawOption] = []
        if response.content_format is not None:
            options.append((OptionNumber.CONTENT_FORMAT, encode_uint(response.content_format)))
        if response.max_age is not None:
            options.append((OptionNumber.MAX_AGE, encode_uint(response.max_age)))
        if response.etag is not None:
            # Whatever the payload: a 2.03 Valid has none and must still carry it (RFC 7252 §5.9.1.3).
            options.append((OptionNumber.ETAG, response.etag))
        for segment in response.location_path:
            options.append((OptionNumber.LOCATION_PATH, segment.encode("utf-8")))
        for item in response.location_query:
            options.append((OptionNumber.LOCATION_QUERY, item.encode("utf-8")))
        options.extend(response.extra_options)
        return options

    def _send_response(self, incoming: _Incoming, code: int, options: list[wire.RawOption],
                       payload: bytes, challenge: bool = False) -> None:
        token = incoming.token
        if incoming.not_interested & _NO_RESPONSE_BIT.get(code >> 5, 0):
            # RFC 7967: the device asked not to hear this class; a CON still needs its ACK.
            log.debug("{code} to {peer} suppressed (No-Response)", code=dotted(code), peer=incoming.addr)
            if incoming.mtype == CON and not incoming.empty_acked:
                ack = wire.empty(ACK, incoming.mid)
                self._dedup.replace((incoming.addr, incoming.mid), ack)
                self._write(ack, incoming.addr)
            return
        if incoming.exchange is not None:
            protected = self._protect(incoming.exchange, code, options, payload)
            if protected is None:
                unavailable = ServiceUnavailable("try again", max_age=1).to_response()
                protected = (unavailable.code, self._response_options(unavailable), unavailable.payload)
            code, options, payload = protected
        # A new observer whose address is not verified gets its first answer as CON: the ACK verifies it.
        confirm = (incoming.observe is not None and incoming.request is not None
                   and (incoming.addr, token, incoming.request.security) in self._observers
                   and self._peers.needs_confirmation(incoming.addr[0]))
        if incoming.mtype == CON and not incoming.empty_acked and not confirm:
            data = wire.encode(ACK, code, incoming.mid, token, options, payload)
            if not self._write(data, incoming.addr):
                # Not even a 4.01 fits this peer's budget: reject the message (RFC 7252 §4.2), 4 bytes.
                data = wire.empty(RST, incoming.mid)
                self._write(data, incoming.addr)
            self._dedup.replace((incoming.addr, incoming.mid), data)
        elif (incoming.mtype == CON or confirm) and not challenge:
            if incoming.mtype == CON and not incoming.empty_acked:
                self._send_empty_ack(incoming)

            def build(mid: int) -> bytes:
                return wire.encode(CON, code, mid, token, options, payload)
            self._send_con(_Outgoing(incoming.addr, build, None))
        else:
            # RFC 9175 §2.4: an Echo challenge is never a separate CON response (retransmissions).
            data = wire.encode(NON, code, self._next_mid(incoming.addr), token, options, payload)
            self._write(data, incoming.addr)

    def _protect(self, exchange: Any, code: int, options: list[wire.RawOption],
                 payload: bytes) -> tuple[int, list[wire.RawOption], bytes] | None:
        assert self.protection is not None
        try:
            return self.protection.protect(exchange, code, options, payload)
        except ProtectionUnavailable as exc:
            log.warn("Could not protect a response: {reason}", reason=str(exc))
            return None

    def _idle_timeout(self) -> None:
        for incoming in list(self._pending):
            self._complete(incoming, ServiceUnavailable("shutting down").to_response())
        self._fire_idle()

    def _fire_idle(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for timer in self._idle_timers:
            if timer.active():
                timer.cancel()
        self._idle_timers.clear()
        for waiter in waiters:
            waiter.callback(None)

    # ------------------------------------------------------------------ observe

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % _SEQ_MODULO
        return self._seq

    def _may_observe(self, key: ObserverKey, owner: Hashable) -> bool:
        """A re-registration always; a new observer only within the total cap and its peer's share."""
        if key in self._observers:
            return True
        settings = self.settings
        if len(self._observers) >= settings.max_observers:
            log.debug("Observe registration of {peer} refused: {cap} observers", peer=key[0],
                      cap=settings.max_observers)
            return False
        if self._observers_per_peer.get(owner, 0) >= settings.max_observers_per_peer:
            log.debug("Observe registration of {peer} refused: its share of {share} is taken", peer=key[0],
                      share=settings.max_observers_per_peer)
            return False
        return True

    def _add_observer(self, observer: _Observer) -> None:
        old = self._observers.get(observer.key)
        if old is not None:
            self._remove_observer(old)
        self._observers[observer.key] = observer
        self._observers_by_resource.setdefault(observer.resource, {})[observer.key] = observer
        owner = observer.owner
        self._observers_per_peer[owner] = self._observers_per_peer.get(owner, 0) + 1

    def _remove_observer(self, observer: _Observer) -> None:
        if self._observers.get(observer.key) is not observer:
            return
        del self._observers[observer.key]
        remaining = self._observers_per_peer.pop(observer.owner, 1) - 1
        if remaining > 0:
            self._observers_per_peer[observer.owner] = remaining
        by_resource = self._observers_by_resource.get(observer.resource)
        if by_resource is not None:
            by_resource.pop(observer.key, None)
            if not by_resource:
                del self._observers_by_resource[observer.resource]
        log.debug("Observer {peer} removed", peer=observer.addr)
        hook = getattr(observer.resource, "observer_removed", None)
        if hook is not None:
            try:
                hook(observer.request)
            except Exception:
                log.failure("observer_removed hook raised")

    def _notification_rendered(self, result: Any, observer: _Observer, confirmable: bool = False,
                               delivered: "defer.Deferred[int] | None" = None) -> None:
        if not isinstance(result, Response):
            result = self._adapt(Failure(TypeError(f"resource returned {type(result).__name__}, not Response")))
        self._send_notification(observer, result, confirmable, delivered)

    def _notification_failed(self, failure: Failure, observer: _Observer, confirmable: bool = False,
                             delivered: "defer.Deferred[int] | None" = None) -> None:
        self._send_notification(observer, self._adapt(failure), confirmable, delivered)

    def _send_notification(self, observer: _Observer, response: Response, confirmable: bool = False,
                           delivered: "defer.Deferred[int] | None" = None) -> None:
        if delivered is None:
            delivered = defer.Deferred()
        if self._observers.get(observer.key) is not observer:
            delivered.callback(0)
            return  # deregistered while rendering
        is_success = 64 <= response.code < 96
        options = self._response_options(response)
        if is_success:
            options.append((OptionNumber.OBSERVE, encode_uint(self._next_seq())))
        else:
            self._remove_observer(observer)
        payload = response.payload
        if payload:
            request = observer.request
            cache_key = (observer.addr, request.method, request.path, request.query, request.accept,
                         request.security)
            first = Block(0, False, observer.block2.szx) if observer.block2 is not None and is_success else None
            sliced = self._block2_options(response, first, False, cache_key, self.settings.default_block_szx,
                                          _Kept(observer.resource, request, response))
            if isinstance(sliced, Response):  # pragma: no cover - block 0 is always in range
                return
            options.extend(sliced[0])
            payload = sliced[1]
        token = observer.token
        code: int = response.code
        if observer.exchange is not None:
            protected = self._protect(observer.exchange, code, options, payload)
            if protected is None:
                self._remove_observer(observer)
                delivered.callback(0)
                return
            code, options, payload = protected

        def build(mid: int) -> bytes:
            return wire.encode(CON, code, mid, token, options, payload)

        now = self.reactor.seconds()
        pending = observer.con_out
        if pending is not None and is_success:
            pending.delivered.append(delivered)
            self._resend_replaced(pending, build)
            return
        # An unverified observer gets CON notifications: its ACK verifies it, and a forged one costs a budget.
        confirmable = confirmable or self._peers.needs_confirmation(observer.addr[0])
        if (is_success and not confirmable
                and now - observer.last_con < self.settings.con_notification_interval):
            mid = self._next_mid(observer.addr)
            self._non_notifications.put((observer.addr, mid), observer.key)
            self._write(wire.encode(NON, code, mid, token, options, payload), observer.addr)
            delivered.callback(1)
            return
        outgoing = _Outgoing(observer.addr, build, observer if is_success else None)
        if is_success:
            observer.con_out = outgoing
            outgoing.delivered.append(delivered)
        else:
            delivered.callback(0)  # an error notification ends the observation
        self._send_con(outgoing)


def _seconds_until(when: float, now: float) -> int:
    """Whole seconds (at least 1) from ``now`` until ``when``: a Max-Age to retry after."""
    return max(1, int(when - now + 0.999))


def total_delivered(waits: Iterable["defer.Deferred[int]"]) -> "defer.Deferred[int]":
    """Fires with the sum of ``waits`` (delivery counts, which never fail) once all have fired.

    Cancelling the result fails it with `CancelledError` and nothing else: the
    deliveries it waits for go on (a CON notification is still retransmitted and
    its observer kept or dropped by its ACK), and none of them is left holding an
    unhandled failure.
    """
    outcome: defer.Deferred[int] = defer.Deferred()

    def settle(result: Any) -> None:
        if not outcome.called:  # cancelled meanwhile: the late result goes nowhere
            outcome.callback(result)

    defer.gatherResults(list(waits), consumeErrors=True).addCallback(sum).addBoth(settle)
    return outcome


def listen_udp(server: CoapServer, host: str, port: int, reactor: Any = None,
               adopt: Any = None) -> IListeningPort:
    """Bind ``server`` on ``host`` (``::`` is dual-stack; ``fe80::1%lowpan0`` binds with the zone).

    ``adopt``: a socket bound already (a worker's share of the port, `transport.bind_shared`).
    Raises ``twisted.internet.error.CannotListenError`` when the address cannot be bound.
    """
    return transport.listen(server, host, port, reactor if reactor is not None else server.reactor, adopt)
