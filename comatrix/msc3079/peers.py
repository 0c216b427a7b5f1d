"""Sticky MSC3079 options per peer: the access token (option 256) and key-table version (257).

MSC3079 lets a client send its token once per connection; later requests
without option 256 act with the last value, and a new value replaces it.  The
same holds for option 257.  Over plain UDP the "connection" is the peer's
address and port; through a security context (OSCORE, DTLS) it is that
context, whatever the address, so a plain request from a spoofed address
never acts with a token made sticky inside a context.  An entry lives while the peer keeps talking and is dropped
after ``idle_timeout`` seconds of silence, or when the bounded table needs room
for a newer peer (least recently active first).

Without DTLS anyone who can spoof a peer's source address can act with its
sticky token, exactly as anyone on the path can read the token itself: the
MSC's connection is a DTLS session, and stickiness can be switched off.
"""

from __future__ import annotations

from typing import Callable

from comatrix.coap.cache import BoundedCache
from comatrix.coap.errors import BadOption
from comatrix.coap.message import Request
from comatrix.codec.msc3079 import ACCESS_TOKEN_OPTION, KEY_TABLE_VERSION_OPTION
from comatrix.credentials import token_from_request
from comatrix.msc3079.translate import KNOWN_KEY_TABLE

__all__ = ["PeerState", "PeerTable", "key_table_version"]


def key_table_version(raw: bytes) -> int:
    """Option 257 -> the table to answer with: 0 none; above the known table, the known one.

    Tables only ever add keys (MSC3079), so a client asking for a newer table
    understands every key of ours; refusing it would gain nothing.
    """
    if len(raw) > 4:
        raise BadOption("option 257 too long")
    return min(int.from_bytes(raw, "big"), KNOWN_KEY_TABLE)


class PeerState:
    """What one peer made sticky.  The token never appears in a repr."""

    __slots__ = ("token", "version")

    def __init__(self) -> None:
        self.token: str | None = None
        self.version: int | None = None

    def __repr__(self) -> str:
        return f"PeerState(token={'<set>' if self.token else None}, version={self.version!r})"


def connection_of(request: Request) -> tuple[str, int]:
    """(host, port) for plain CoAP; ("<scheme>:<identity>", 0) for a request through a security context."""
    security = request.security
    if security is None:
        return (request.peer.host, request.peer.port)
    return (f"{security.scheme}:{security.identity}", 0)


class PeerTable:
    """Bounded, idle-expiring map `connection_of` -> `PeerState`."""

    def __init__(self, capacity: int, idle_timeout: float, clock: Callable[[], float], *,
                 sticky: bool = True) -> None:
        self._states: BoundedCache[tuple[str, int], PeerState] = BoundedCache(capacity, idle_timeout, clock)
        self.sticky = sticky

    def __len__(self) -> int:
        return len(self._states)

    def update(self, request: Request) -> PeerState:
        """The peer's state after this request's options 256/257 (a fresh one if not sticky)."""
        key = connection_of(request)
        state = self._states.get(key) if self.sticky else None
        if state is None:
            state = PeerState()
        token = token_from_request(request)
        if token is not None:
            state.token = token
        raw_version = request.option(KEY_TABLE_VERSION_OPTION)
        if raw_version is not None:
            state.version = key_table_version(raw_version)
        if self.sticky and (state.token is not None or state.version is not None):
            self._states.put(key, state)  # also refreshes its idle lifetime and LRU position
        return state

    def forget_token(self, request: Request, token: str) -> None:
        """The token is dead (logout): drop it if it is still the sticky one of the request's connection."""
        state = self._states.get(connection_of(request))
        if state is not None and state.token == token:
            state.token = None


#: Re-exported for callers that build requests by hand (tests, the device client).
OPTIONS = (ACCESS_TOKEN_OPTION, KEY_TABLE_VERSION_OPTION)
