"""UDP transport: IPv6 zone ids kept from receive to reply; IPv4/IPv6/dual-stack binding."""

from __future__ import annotations

import errno
import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, error, reactor, task, threads

from comatrix.coap import wire
from comatrix.coap.message import Request, Response
from comatrix.coap.numbers import Code, MessageType
from comatrix.coap.resource import CoapResource
from comatrix.coap.server import CoapServer, Site, listen_udp
from comatrix.coap.transport import ScopedUDPPort, sockaddr


class Who(CoapResource):
    def render_GET(self, request: Request) -> Response:
        return Response(payload=request.peer.host.encode())


class FakeSocket:
    def __init__(self, incoming: list[tuple[bytes, Any]]) -> None:
        self.incoming = incoming
        self.sent: list[tuple[bytes, Any]] = []

    def recvfrom(self, size: int) -> tuple[bytes, Any]:
        if not self.incoming:
            raise BlockingIOError(errno.EAGAIN, "would block")
        return self.incoming.pop(0)

    def sendto(self, data: bytes, addr: Any) -> int:
        self.sent.append((data, addr))
        return len(data)


def test_zone_id_kept_from_receive_to_reply_unit() -> None:
    index, name = socket.if_nameindex()[0]
    site = Site()
    site.put(("who",), Who())
    server = CoapServer(site, reactor=task.Clock())
    port = ScopedUDPPort(0, server, interface="::", reactor=task.Clock())
    request = wire.encode(MessageType.CON, Code.GET, 1, b"t", [(11, b"who")])
    fake = FakeSocket([(request, ("fe80::2", 5683, 0, index)), (request, ("2001:db8::5", 5683, 0, 0))])
    port.socket = fake
    server.makeConnection(port)
    port.doRead()
    [(first, addr1), (second, addr2)] = fake.sent
    assert wire.decode(first).payload == f"fe80::2%{name}".encode()
    assert addr1 == ("fe80::2", 5683, 0, index)
    assert wire.decode(second).payload == b"2001:db8::5" and addr2 == ("2001:db8::5", 5683)


def test_sockaddr() -> None:
    index, name = socket.if_nameindex()[0]
    assert sockaddr(f"fe80::1%{name}", 1) == ("fe80::1", 1, 0, index)
    assert sockaddr("fe80::1%7", 1) == ("fe80::1", 1, 0, 7)
    assert sockaddr("127.0.0.1", 1) == ("127.0.0.1", 1)


def exchange(family: int, target: tuple[str, int]) -> bytes:
    with socket.socket(family, socket.SOCK_DGRAM) as client:
        client.settimeout(10)
        client.sendto(wire.encode(MessageType.CON, Code.GET, 3, b"x", [(11, b"who")]), target)
        data, _ = client.recvfrom(2048)
    return wire.decode(data).payload


@pytest.mark.parametrize("bind,family,target", [
    ("127.0.0.1", socket.AF_INET, "127.0.0.1"),
    ("::1", socket.AF_INET6, "::1"),
    ("::", socket.AF_INET, "127.0.0.1"),   # dual-stack: IPv4 client on the IPv6 wildcard
    ("::", socket.AF_INET6, "::1"),
])
@pytest_twisted.inlineCallbacks
def test_listen_udp_loopback(bind: str, family: int, target: str) -> Any:
    site = Site()
    site.put(("who",), Who())
    server = CoapServer(site, reactor=reactor)
    port: Any = listen_udp(server, bind, 0)
    try:
        payload = yield threads.deferToThread(exchange, family, (target, port.getHost().port))
        assert payload.decode() in (target, f"::ffff:{target}")
    finally:
        yield defer.maybeDeferred(port.stopListening)


def test_listen_udp_errors() -> None:
    server = CoapServer(Site(), reactor=reactor)
    with pytest.raises(error.CannotListenError):
        listen_udp(server, "fe80::1%no-such-interface0", 0)
    with pytest.raises(error.CannotListenError):
        listen_udp(server, "not an address", 0)
    with pytest.raises(error.CannotListenError):
        listen_udp(server, "192.0.2.77", 0)  # not a local address



def oversized_exchange(target: tuple[str, int], size: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(10)
        client.sendto(wire.encode(MessageType.CON, Code.GET, 4, b"y", [(11, b"who")], b"z" * size), target)
        data, _ = client.recvfrom(2048)
    return wire.decode(data).code


@pytest_twisted.inlineCallbacks
def test_datagram_larger_than_8k_is_read_whole_and_refused_413() -> Any:
    site = Site()
    site.put(("who",), Who())
    server = CoapServer(site, reactor=reactor)
    port: Any = listen_udp(server, "127.0.0.1", 0)
    try:
        code = yield threads.deferToThread(oversized_exchange, ("127.0.0.1", port.getHost().port), 20000)
        assert code == Code.REQUEST_ENTITY_TOO_LARGE
    finally:
        yield defer.maybeDeferred(port.stopListening)
