"""In-memory harness for driving a `CoapServer` in tests: fake UDP transport + Clock.

Tests of any layer can serve resources through the real CoAP layer without a
socket: build a `Harness`, send datagrams, read back what the server wrote.
"""

from __future__ import annotations

from typing import Any, Iterable

from twisted.internet import defer
from twisted.internet.task import Clock

from comatrix.coap import wire
from comatrix.coap.message import Request, Response
from comatrix.coap.numbers import Code, MessageType, OptionNumber
from comatrix.coap.resource import CoapResource
from comatrix.coap.server import CoapServer, CoapSettings, Site

DEFAULT_PEER = ("2001:db8::1", 40000)


class PendingResource(CoapResource):
    """A GET resource whose answers wait in ``pending`` until the test fires them."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[defer.Deferred[Response]] = []

    def render_GET(self, request: Request) -> "defer.Deferred[Response]":
        d: defer.Deferred[Response] = defer.Deferred()
        self.pending.append(d)
        return d


class FakeDatagramTransport:
    """Records ``write(data, addr)`` calls."""

    def __init__(self) -> None:
        self.written: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any = None) -> None:
        self.written.append((data, addr))

    def getHost(self) -> Any:
        return None

    def stopListening(self) -> None:
        pass


class Harness:
    """A `CoapServer` on a fake transport with a `Clock` as reactor.

    Its peers count as verified (the amplification limit does not apply to them),
    unless ``verify_peers=False``: then they are what a first-time peer is to the server.
    """

    def __init__(self, site: Site, settings: CoapSettings = CoapSettings(), *, verify_peers: bool = True,
                 **kwargs: Any) -> None:
        self.verify_peers = verify_peers
        self.clock = Clock()
        self.site = site
        self.server = CoapServer(site, settings, reactor=self.clock, **kwargs)
        self.transport = FakeDatagramTransport()
        self.server.makeConnection(self.transport)
        self._mid = 0
        self._read = 0

    def next_mid(self) -> int:
        self._mid = (self._mid + 1) & 0xFFFF
        return self._mid

    def send_raw(self, data: bytes, peer: Any = DEFAULT_PEER) -> list[wire.Datagram]:
        if self.verify_peers and not self.server.peer_verified(peer[0]):
            self.server.verify_peer(peer[0])
        self.server.datagramReceived(data, peer)
        return self.replies()

    def send(self, code: int = Code.GET, path: Iterable[str] = (), *, mtype: int = MessageType.CON,
             mid: int | None = None, token: bytes = b"\x01", options: Iterable[tuple[int, bytes]] = (),
             payload: bytes = b"", query: Iterable[str] = (), peer: Any = DEFAULT_PEER) -> list[wire.Datagram]:
        """Send one request; returns the datagrams the server wrote in reaction (decoded)."""
        all_options = [(int(OptionNumber.URI_PATH), segment.encode()) for segment in path]
        all_options += [(int(OptionNumber.URI_QUERY), item.encode()) for item in query]
        all_options += list(options)
        data = wire.encode(mtype, code, self.next_mid() if mid is None else mid, token, all_options, payload)
        return self.send_raw(data, peer)

    def advance(self, seconds: float) -> list[wire.Datagram]:
        self.clock.advance(seconds)
        return self.replies()

    def replies(self) -> list[wire.Datagram]:
        """Datagrams written since the last call."""
        new = self.transport.written[self._read:]
        self._read = len(self.transport.written)
        return [wire.decode(data) for data, _ in new]

    def addresses(self) -> list[Any]:
        return [addr for _, addr in self.transport.written]


def option(message: wire.Datagram, number: int) -> bytes | None:
    for num, value in message.options:
        if num == number:
            return value
    return None


def options(message: wire.Datagram, number: int) -> list[bytes]:
    return [value for num, value in message.options if num == number]
