"""Amplification limit for unverified peers (RFC 7252 §11.3, RFC 9175 §2.4) and a per-address discovery rate.

A forged source address turns any UDP server into a reflector: a small request
"from" the victim makes the server send its (larger) answer, and its
retransmissions, to the victim.  `PeerGuard` keeps, per source address (the
host; the port is ignored, a victim has them all), the bytes received from it
and the bytes sent to it, and until the address is *verified* lets the server
send at most ``factor`` times what it received.

An address is verified for ``verified_lifetime`` seconds when it

* returns an Echo value (RFC 9175, option 252) this process issued to it less
  than ``echo_lifetime`` seconds ago: 4 bytes of issue time and a 6-byte
  HMAC over time and address under a per-process random key, so a value is
  useless for any other address and no state is kept per challenge;
* acknowledges a CON message we sent to it.  Our Message IDs towards an
  address are offset by a secret per-address value (`mid_offset`), so an
  attacker watching its own traffic cannot predict them, and an address that
  sent more than `MAX_STRAYS` unmatched ACK/RST (guesses) no longer verifies
  that way;
* sends through a security context (the server decides; `verify`).

The table is an LRU of ``capacity`` addresses, so it is no memory DoS itself.
Forgetting an address is safe: an unverified one starts again from zero bytes
received (nothing may be sent before it asks again), a verified one has to
verify again.  The same entry holds the address's discovery rate state: a
GCRA (virtual scheduling) of ``discovery_rate`` per second with
``discovery_burst`` tolerance -- one float per address.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import OrderedDict
from typing import Callable

__all__ = ["ECHO", "ECHO_SIZE", "MAX_STRAYS", "PeerGuard"]

#: RFC 9175 Echo option number: elective, safe-to-forward, NoCacheKey, not repeatable, 1-40 bytes.
ECHO = 252

_TIME_BYTES = 4
_MAC_BYTES = 6
#: Length of the Echo values we issue.
ECHO_SIZE = _TIME_BYTES + _MAC_BYTES
_TIME_MODULO = 1 << (8 * _TIME_BYTES)

#: Unmatched ACK/RST an unverified address may send before its ACKs stop verifying it.
MAX_STRAYS = 16


class _Peer:
    __slots__ = ("received", "sent", "verified_at", "strays", "tat", "mid_offset")

    def __init__(self) -> None:
        self.received = 0
        self.sent = 0
        self.verified_at: float | None = None
        self.strays = 0
        self.tat = 0.0  # discovery: theoretical arrival time of the next request
        self.mid_offset: int | None = None  # derived once (an HMAC), not per message


class PeerGuard:
    """Per-address byte budget, verification (Echo, ACK, security) and discovery rate."""

    def __init__(self, clock: Callable[[], float], *, factor: float = 3.0, verified_lifetime: float = 3600.0,
                 echo_lifetime: float = 120.0, capacity: int = 4096, discovery_rate: float = 2.0,
                 discovery_burst: int = 10, key: bytes | None = None) -> None:
        if factor < 1 or capacity < 1 or discovery_rate <= 0 or discovery_burst < 1:
            raise ValueError("factor >= 1, capacity >= 1, discovery_rate > 0 and discovery_burst >= 1 required")
        self._clock = clock
        self.factor = factor
        self.verified_lifetime = verified_lifetime
        self.echo_lifetime = echo_lifetime
        self.capacity = capacity
        self._interval = 1.0 / discovery_rate
        self._tolerance = (discovery_burst - 1) * self._interval
        self._key = key if key is not None else os.urandom(32)
        self._peers: OrderedDict[str, _Peer] = OrderedDict()

    def __len__(self) -> int:
        return len(self._peers)

    def _peer(self, host: str) -> _Peer:
        peer = self._peers.get(host)
        if peer is None:
            peer = self._peers[host] = _Peer()
            if len(self._peers) > self.capacity:
                self._peers.popitem(last=False)
        else:
            self._peers.move_to_end(host)
        return peer

    def _is_verified(self, peer: _Peer) -> bool:
        return peer.verified_at is not None and self._clock() - peer.verified_at < self.verified_lifetime

    # ------------------------------------------------------------------ byte budget

    def received(self, host: str, size: int) -> None:
        """``size`` bytes (one datagram) arrived from ``host``."""
        self._peer(host).received += size

    def verified(self, host: str) -> bool:
        peer = self._peers.get(host)
        return peer is not None and self._is_verified(peer)

    def allowance(self, host: str) -> int | None:
        """Bytes that may still go to ``host`` now; None when it is verified (no limit)."""
        peer = self._peer(host)
        if self._is_verified(peer):
            return None
        return max(0, int(self.factor * peer.received) - peer.sent)

    def spend(self, host: str, size: int) -> bool:
        """Account ``size`` bytes about to be sent to ``host``; False (nothing accounted) if over budget."""
        allowance = self.allowance(host)
        if allowance is not None and size > allowance:
            return False
        self._peers[host].sent += size
        return True

    # ------------------------------------------------------------------ verification

    def verify(self, host: str) -> None:
        peer = self._peer(host)
        peer.verified_at = self._clock()
        peer.strays = 0

    def needs_confirmation(self, host: str) -> bool:
        """True when a message to ``host`` should be CON, so that its ACK (re)verifies the address.

        That is when the address is unverified or has used up half its verified time.
        """
        peer = self._peers.get(host)
        if peer is None or peer.verified_at is None:
            return True
        return self._clock() - peer.verified_at >= self.verified_lifetime / 2

    def acknowledged(self, host: str) -> None:
        """``host`` acknowledged a CON message we sent it (Message ID matched)."""
        peer = self._peer(host)
        if peer.strays <= MAX_STRAYS:
            self.verify(host)

    def stray(self, host: str) -> None:
        """An ACK or RST from ``host`` that matched nothing we sent: possibly a guess."""
        peer = self._peer(host)
        peer.strays = min(peer.strays + 1, MAX_STRAYS + 1)

    def mid_offset(self, host: str) -> int:
        """A secret, stable 16-bit offset for the Message IDs we use towards ``host``."""
        peer = self._peer(host)
        if peer.mid_offset is None:
            digest = hmac.digest(self._key, b"mid\0" + host.encode("utf-8"), hashlib.sha256)
            peer.mid_offset = int.from_bytes(digest[:2], "big")
        return peer.mid_offset

    # ------------------------------------------------------------------ Echo

    def _mac(self, stamp: bytes, host: str) -> bytes:
        return hmac.digest(self._key, b"echo\0" + stamp + host.encode("utf-8"), hashlib.sha256)[:_MAC_BYTES]

    def echo_value(self, host: str) -> bytes:
        """A fresh Echo value for ``host`` (RFC 9175 §2.3, Appendix A "integrity protected timestamp")."""
        stamp = (int(self._clock()) % _TIME_MODULO).to_bytes(_TIME_BYTES, "big")
        return stamp + self._mac(stamp, host)

    def echo_valid(self, host: str, value: bytes) -> bool:
        """Whether ``value`` is an Echo value we issued to ``host`` less than ``echo_lifetime`` ago."""
        if len(value) != ECHO_SIZE:
            return False
        stamp = value[:_TIME_BYTES]
        if not hmac.compare_digest(value[_TIME_BYTES:], self._mac(stamp, host)):
            return False
        age = (int(self._clock()) - int.from_bytes(stamp, "big")) % _TIME_MODULO
        return age <= self.echo_lifetime

    # ------------------------------------------------------------------ discovery rate

    def discovery_wait(self, host: str) -> float:
        """Take one discovery request for ``host``: 0 if allowed now, else seconds to wait."""
        peer = self._peer(host)
        now = self._clock()
        tat = max(peer.tat, now)
        if tat - now > self._tolerance:
            return tat - now - self._tolerance
        peer.tat = tat + self._interval
        return 0.0
