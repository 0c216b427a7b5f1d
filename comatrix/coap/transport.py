"""UDP listening port that keeps IPv6 zone ids from receive to reply, plus `listen_udp`.

Twisted's ``udp.Port`` cuts the received address to ``(host, port)``, losing
the scope id of link-local peers (facts §7.17), and Python's ``bind``/
``sendto`` ignore a ``%zone`` suffix in a 2-tuple.  `ScopedUDPPort` hands the
protocol ``("fe80::1%lowpan0", port)`` and turns such an address back into a
4-tuple with the scope id when writing.  It also binds ``::`` dual-stack.
"""

from __future__ import annotations

import socket
from functools import lru_cache
from typing import Any

from twisted.internet import error, udp
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol


from comatrix.logs import get_logger  # noqa: E402

log = get_logger(__name__)


@lru_cache(maxsize=64)
def zone_name(scope_id: int) -> str:
    try:
        return socket.if_indextoname(scope_id)
    except OSError:
        return str(scope_id)


@lru_cache(maxsize=64)
def zone_index(zone: str) -> int:
    if zone.isdigit():
        return int(zone)
    return socket.if_nametoindex(zone)


def split_zone(host: str) -> tuple[str, int]:
    """``"fe80::1%lowpan0"`` -> ``("fe80::1", <ifindex>)``; no zone -> scope 0.  OSError if unknown."""
    address, percent, zone = host.partition("%")
    return (address, zone_index(zone)) if percent else (address, 0)


def sockaddr(host: str, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
    """The address form ``socket.sendto``/``bind`` need for ``host`` (4-tuple when zoned)."""
    if "%" not in host:
        return (host, port)
    address, scope = split_zone(host)
    return (address, port, 0, scope)


#: Largest UDP payload over IPv6 (65535 minus the 8-byte UDP header).
MAX_DATAGRAM = 65527


class ScopedUDPPort(udp.Port):  # type: ignore[misc]
    """A ``udp.Port`` whose addresses carry the IPv6 zone (``host%zone``)."""

    def createInternetSocket(self) -> socket.socket:
        skt: socket.socket = super().createInternetSocket()
        if self.addressFamily == socket.AF_INET6 and self.interface.partition("%")[0] == "::":
            try:
                skt.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:  # pragma: no cover - platform without dual-stack
                log.info("IPv6 socket cannot be made dual-stack; IPv4 peers cannot reach [::]")
        return skt

    def _bindSocket(self) -> None:
        # Same steps as udp.Port._bindSocket, but binding a zoned address needs the 4-tuple.
        skt = self._preexistingSocket
        self._preexistingSocket = None
        if skt is None:
            try:
                skt = self.createInternetSocket()
                skt.bind(sockaddr(self.interface, self.port))
            except OSError as exc:
                raise error.CannotListenError(self.interface, self.port, exc)
        self._realPortNumber = skt.getsockname()[1]
        self.connected = 1
        self.socket = skt
        self.fileno = self.socket.fileno  # type: ignore[method-assign]

    def doRead(self) -> None:
        read = 0
        recvfrom = self.socket.recvfrom
        ipv6 = self.addressFamily == socket.AF_INET6
        while read < self.maxThroughput:
            try:
                data, addr = recvfrom(self.maxPacketSize)
            except OSError as exc:
                number = exc.args[0]
                if number in udp._sockErrReadIgnore:
                    return
                if number in udp._sockErrReadRefuse:
                    if self._connectedAddr:
                        self.protocol.connectionRefused()
                    return
                raise
            read += len(data)
            if ipv6:
                host = addr[0]
                if addr[3] and "%" not in host:
                    host = f"{host}%{zone_name(addr[3])}"
                addr = (host, addr[1])
            try:
                self.protocol.datagramReceived(data, addr)
            except BaseException:
                log.failure("Datagram protocol raised")

    def write(self, datagram: bytes, addr: Any = None) -> Any:
        if addr is not None and "%" in addr[0]:
            try:
                addr = sockaddr(addr[0], addr[1])
            except OSError:
                log.warn("Cannot reply to {host}: unknown zone", host=addr[0])
                return None
        return super().write(datagram, addr)


def listen(protocol: DatagramProtocol, host: str, port: int, reactor: Any = None,
           adopt: socket.socket | None = None) -> IListeningPort:
    """Bind ``protocol`` to ``host``/``port`` (IPv4, IPv6, ``::`` dual-stack, or ``fe80::1%zone``).

    ``adopt``: serve this socket, bound already to ``host``/``port`` (`bind_shared`), instead.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor
        reactor = default_reactor
    if "%" in host:
        try:
            split_zone(host)
        except OSError as exc:
            raise error.CannotListenError(host, port, exc)
    try:
        # Twisted reads at most 8 KiB by default and truncates the rest silently; read
        # whole datagrams so an oversized request is answered 4.13, not "malformed".
        listening = ScopedUDPPort(port, protocol, interface=host, reactor=reactor,
                                  maxPacketSize=MAX_DATAGRAM)
    except error.InvalidAddressError as exc:
        raise error.CannotListenError(host, port, exc)
    if adopt is not None:
        adopt.setblocking(False)
        listening._preexistingSocket = adopt  # type: ignore[assignment]
    listening.startListening()
    return listening  # type: ignore[return-value]


class _SharedSocketPort(ScopedUDPPort):
    """Only creates a bound socket, with ``SO_REUSEPORT``, for another process to serve."""

    def createInternetSocket(self) -> socket.socket:
        skt = super().createInternetSocket()
        skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return skt


def bind_shared(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` sockets bound to one ``host``/``port`` with ``SO_REUSEPORT``, blocking, not served here.

    Linux delivers each datagram to one socket of the group, chosen by a hash of the
    source and destination address and port, so one peer (4-tuple) always reaches the
    same socket while the group stays as it is.  Only sockets of the same user may
    join the group.  Raises ``CannotListenError`` (the first socket fails when the port
    is taken by a socket without ``SO_REUSEPORT``).
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            try:
                maker = _SharedSocketPort(port, DatagramProtocol(), interface=host)
            except error.InvalidAddressError as exc:
                raise error.CannotListenError(host, port, exc)
            maker._bindSocket()
            sockets.append(maker.socket)
            port = maker.socket.getsockname()[1]  # port 0: the others join the port the first one got
    except BaseException:
        for skt in sockets:
            skt.close()
        raise
    return sockets
