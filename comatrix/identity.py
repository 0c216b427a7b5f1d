"""Who asks: the one `Device` value every quota, rate limit and homeserver call keys on.

A request's device is the strongest identity the gateway has for it: the
security context it came through (DTLS PSK identity, OSCORE recipient id, EDHOC
credential), else its source address (plain CoAP, where anyone on the link can
forge it).  ``Device.key`` is what per-device tables are keyed by;
``Device.address`` is the source address without its zone id, which the
homeserver sees in ``X-Forwarded-For`` so its per-IP limits apply per device.

`acting_for` makes a request's device the *current* one while a resource runs:
coroutines started inside it (and the homeserver calls they make) keep seeing
that device, even after the resource has returned its Deferred, because
Twisted runs each coroutine in a copy of the context it was started in.
Layers below the faces (the Matrix transport, long-poll pools) read it with
`current_device` instead of having a device threaded through every call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
from contextvars import ContextVar
from typing import Iterator

from comatrix.coap.message import Request

__all__ = ["Device", "device_of", "acting_for", "acting_as", "current_device", "plain_address"]


@dataclasses.dataclass(frozen=True)
class Device:
    """One device as the gateway knows it."""

    #: Stable key of per-device tables: ``"a:<address>"`` for plain CoAP,
    #: ``"<scheme>:<identity>"`` (``"dtls:sensor01"``) for a security context.
    key: str
    #: Source address without zone id (for ``X-Forwarded-For`` and logs).
    address: str
    #: True when the identity comes from a security context, not a forgeable address.
    secured: bool = False

    def __str__(self) -> str:
        return self.key


@functools.lru_cache(maxsize=4096)  # pure; every request asks it for its peer's address, often twice
def plain_address(host: str) -> str:
    """``host`` without an IPv6 zone id; an IPv4-mapped IPv6 address as plain IPv4."""
    bare = host.split("%", 1)[0]
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        return bare
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def device_of(request: Request) -> Device:
    """The device a request comes from (security identity first, then address)."""
    address = plain_address(request.peer.host)
    security = request.security
    if security is not None:
        return Device(key=f"{security.scheme}:{security.identity}", address=address, secured=True)
    # The port is left out: a sleepy device may come back from another source port.
    return Device(key="a:" + address, address=address)


_current: ContextVar[Device | None] = ContextVar("comatrix_current_device", default=None)


def current_device() -> Device | None:
    """The device the code running now acts for (None: the gateway itself)."""
    return _current.get()


@contextlib.contextmanager
def acting_for(request: Request) -> Iterator[Device]:
    """Make ``request``'s device the current one for what runs (and starts) inside."""
    device = device_of(request)
    with acting_as(device):
        yield device


@contextlib.contextmanager
def acting_as(device: Device | None) -> Iterator[Device | None]:
    """Make ``device`` the current one (None: the gateway itself), e.g. for a loop
    that starts later, outside the request that asked for it."""
    reset = _current.set(device)
    try:
        yield device
    finally:
        _current.reset(reset)
