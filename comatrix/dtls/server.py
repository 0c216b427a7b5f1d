"""CoAP over DTLS 1.2 with PSK (RFC 7252 §9, profiled by RFC 7925): the ``coaps`` port.

`DtlsProtocol` sits on its own UDP port below a `CoapServer`: it runs one DTLS
server session per peer address inside the reactor (memory BIOs, the DTLS
retransmission timer driven by ``reactor.callLater``), hands each decrypted
datagram to the CoAP server as if it had arrived in clear, and encrypts what the
CoAP server writes back.  The CoAP server serves the same `Site` as the plain
port, so every resource, Observe and block-wise behave identically; it learns
the peer's PSK identity through ``security_for`` and puts it on each request.

A datagram from an address without a session is looked at only if it is a
ClientHello; it goes through ``DTLSv1_listen`` on one shared listener object, so
a ClientHello without a valid cookie (an HMAC of the source address) creates no
state and is answered by a HelloVerifyRequest no larger than itself.  Only a
ClientHello echoing a valid cookie -- proof the peer receives at its address --
gets a session, within the table's per-address and total bounds.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.internet.base import DelayedCall
from twisted.internet.protocol import DatagramProtocol

from comatrix.coap import transport
from comatrix.coap.message import Peer, Security
from comatrix.dtls.libssl import Connection, HandshakeFailed, ServerContext
from comatrix.dtls.sessions import Address, DtlsSettings, Entry, SessionTable
from comatrix.logs import get_logger

log = get_logger(__name__)

#: Seconds between sweeps for idle sessions; the cookie secret rotates at the same pace.
SWEEP_SECONDS = 30.0

_HANDSHAKE = 22
_CLIENT_HELLO = 1


def is_client_hello(datagram: bytes) -> bool:
    """A DTLS record in epoch 0 carrying a ClientHello (checked before OpenSSL sees it)."""
    return (len(datagram) > 25 and datagram[0] == _HANDSHAKE and datagram[1] == 0xFE
            and datagram[3:5] == b"\0\0" and datagram[13] == _CLIENT_HELLO)


def client_random(hello: bytes) -> bytes:
    """The 32-byte random of a ClientHello (after record, handshake headers and version)."""
    return hello[27:59]


def peer_key(address: Address) -> bytes:
    """What a cookie is bound to: the full source address."""
    return f"{address[0]}|{address[1]}".encode("utf-8")


class _Session:
    """One peer's DTLS session: its OpenSSL connection, retransmission timer and identity."""

    def __init__(self, connection: Connection, random: bytes) -> None:
        self.connection = connection
        #: The random of the ClientHello that started it: a late copy of that hello is no new handshake.
        self.random = random
        self.timer: DelayedCall | None = None
        self.security: Security | None = None

    def cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


class _Inner:
    """What the CoAP server sees as its transport: writes go out through the peer's session."""

    def __init__(self, protocol: "DtlsProtocol") -> None:
        self._protocol = protocol

    def write(self, datagram: bytes, addr: Address) -> None:
        self._protocol.send_application(datagram, addr)

    def getHost(self) -> Any:
        transport = self._protocol.transport
        return transport.getHost() if transport is not None else None


class DtlsProtocol(DatagramProtocol):
    """The DTLS port: sessions per peer, feeding a CoAP server (``coap``)."""

    def __init__(self, coap: Any, psk_for: Callable[[str], bytes | None],
                 settings: DtlsSettings = DtlsSettings(), *, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.reactor = reactor
        self.settings = settings
        self.coap = coap
        self.context = ServerContext(psk_for)
        self._listener = Connection(self.context, settings.mtu)
        self.sessions: SessionTable[_Session] = SessionTable(settings)
        self._sweeper: DelayedCall | None = None
        coap.security_for = self.security_for
        coap.makeConnection(_Inner(self))

    # ------------------------------------------------------------------ lifecycle

    def startProtocol(self) -> None:
        self._schedule_sweep()

    def stopProtocol(self) -> None:
        self.close()
        self.coap.doStop()

    def close(self) -> None:
        """End every session (with close_notify) and cancel every timer."""
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        for entry in self.sessions:
            self._end(entry, notify=entry.established)
        self._listener.free()
        self.context.free()

    # ------------------------------------------------------------------ the CoAP side

    def security_for(self, addr: Address) -> Security | None:
        entry = self.sessions.get(addr)
        return entry.value.security if entry is not None else None

    def send_application(self, datagram: bytes, addr: Address) -> None:
        entry = self.sessions.get(addr)
        if entry is None or not entry.established:
            log.debug("No DTLS session with {peer}: {size} bytes not sent", peer=Peer(*addr), size=len(datagram))
            return
        entry.last_active = self.reactor.seconds()
        self._send(entry.value.connection.encrypt(datagram), addr)

    # ------------------------------------------------------------------ the DTLS side

    def datagramReceived(self, datagram: bytes, addr: Address) -> None:
        entry = self.sessions.get(addr)
        if entry is not None and entry.established and is_client_hello(datagram):
            if client_random(datagram) == entry.value.random:
                return  # a late copy of the hello that started this session
            entry = None  # a new handshake (the device restarted): a cookie first, as for a stranger
        if entry is None:
            self._hello(datagram, addr)
            return
        entry.last_active = self.reactor.seconds()
        if entry.established:
            self._application(entry, datagram)
        else:
            entry.value.connection.feed(datagram)
            self._advance(entry)

    def _hello(self, datagram: bytes, addr: Address) -> None:
        if not is_client_hello(datagram):
            return  # not for us: no answer, no state
        accepted, answer = self._listener.listen(datagram, peer_key(addr))
        if not accepted:
            if answer and len(answer) <= len(datagram):
                self._send(answer, addr)
            return
        connection, self._listener = self._listener, Connection(self.context, self.settings.mtu)
        old = self.sessions.get(addr)
        if old is not None and self.sessions.has_room(addr):
            log.info("DTLS: new handshake from {peer} replaces its session", peer=Peer(*addr))
            self._end(old, notify=False)
        if not self.sessions.has_room(addr):
            log.info("DTLS: no room for a session with {peer} ({total} sessions, {mine} from its address)",
                     peer=Peer(*addr), total=len(self.sessions), mine=self.sessions.host_count(addr[0]))
            connection.free()
            return
        entry = self.sessions.add(addr, _Session(connection, client_random(datagram)), self.reactor.seconds())
        self._advance(entry)

    def _advance(self, entry: Entry[_Session]) -> None:
        session = entry.value
        try:
            done = session.connection.handshake()
        except HandshakeFailed as failed:
            log.info("DTLS handshake with {peer} failed", peer=Peer(*entry.address))
            self._send(failed.output, entry.address)
            self._end(entry, notify=False)
            return
        self._send(session.connection.take_output(), entry.address)
        if not done:
            self._arm_timer(entry)
            return
        session.cancel_timer()
        entry.established = True
        identity = session.connection.psk_identity() or ""
        session.security = Security("dtls", identity)
        log.info("DTLS session with {peer}: identity {identity}, {cipher}", peer=Peer(*entry.address),
                 identity=identity, cipher=session.connection.cipher())
        self._application(entry, b"")  # records that arrived with or before the last flight

    def _application(self, entry: Entry[_Session], datagram: bytes) -> None:
        connection = entry.value.connection
        try:
            records, closed = connection.receive(datagram)
        except HandshakeFailed as failed:
            self._send(failed.output, entry.address)
            self._end(entry, notify=False)
            return
        self._send(connection.take_output(), entry.address)
        for record in records:
            self.coap.datagramReceived(record, entry.address)
        if closed:
            log.info("DTLS: {peer} closed its session", peer=Peer(*entry.address))
            self._end(entry, notify=True)

    def _arm_timer(self, entry: Entry[_Session]) -> None:
        session = entry.value
        session.cancel_timer()
        delay = session.connection.timeout()
        if delay is not None:
            session.timer = self.reactor.callLater(max(delay, 0.001), self._retransmit, entry)

    def _retransmit(self, entry: Entry[_Session]) -> None:
        entry.value.timer = None
        if self.sessions.get(entry.address) is not entry:
            return
        output, alive = entry.value.connection.handle_timeout()
        self._send(output, entry.address)
        if alive:
            self._arm_timer(entry)
        else:
            log.info("DTLS handshake with {peer} timed out", peer=Peer(*entry.address))
            self._end(entry, notify=False)

    def _end(self, entry: Entry[_Session], *, notify: bool) -> None:
        """Forget a session; with ``notify``, send our close_notify first.

        Its observations end with it (RFC 7252 §9.1: the DTLS session is the
        endpoint), so a later session from that address -- perhaps with another
        identity -- never receives them.
        """
        if self.sessions.get(entry.address) is entry:
            self.sessions.remove(entry.address)
            self.coap.forget_peer(entry.address)
        session = entry.value
        session.cancel_timer()
        if notify:
            self._send(session.connection.close_notify(), entry.address)
        session.connection.free()

    def _send(self, datagram: bytes, addr: Address) -> None:
        if not datagram or self.transport is None:
            return
        try:
            self.transport.write(datagram, addr)
        except Exception:
            log.warn("Could not send {size} bytes to {peer}", size=len(datagram), peer=Peer(*addr))

    def end_sessions_of(self, identities: Iterable[str]) -> int:
        """End (with close_notify) the sessions of these PSK identities: removed or re-keyed
        devices.  Returns how many ended; other devices' sessions are untouched."""
        ended = set(identities)
        count = 0
        for entry in list(self.sessions):
            security = entry.value.security
            if security is not None and security.identity in ended:
                self._end(entry, notify=entry.established)
                count += 1
        return count

    # ------------------------------------------------------------------ expiry

    def _schedule_sweep(self) -> None:
        self._sweeper = self.reactor.callLater(SWEEP_SECONDS, self.sweep)

    def sweep(self) -> None:
        """End idle sessions and overdue handshakes; rotate the cookie secret."""
        self.context.rotate_cookie_secret()
        for entry in self.sessions.expired(self.reactor.seconds()):
            log.info("DTLS session with {peer} expired", peer=Peer(*entry.address))
            self._end(entry, notify=entry.established)
        self._schedule_sweep()


def listen_dtls(coap: Any, psk_for: Callable[[str], bytes | None], settings: DtlsSettings,
                host: str, port: int, reactor: Any = None, adopt: Any = None) -> Any:
    """Serve ``coap`` over DTLS on ``host``/``port``; returns the listening port.

    ``adopt``: a socket bound already (a worker's share of the port, `transport.bind_shared`).
    Raises ``CannotListenError`` when the port cannot be bound and `DtlsUnavailable`
    when libssl is missing.
    """
    protocol = DtlsProtocol(coap, psk_for, settings, reactor=reactor)
    return transport.listen(protocol, host, port, protocol.reactor, adopt)
