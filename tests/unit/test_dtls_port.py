"""The DTLS port below the CoAP layer: stateless cookies, session bounds, expiry (Clock).

ClientHellos are built here byte by byte (RFC 6347 §4.2.1 / RFC 5246 §7.4.1.2), as
a forger on the link would send them; OpenSSL answers them for real.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from twisted.internet.task import Clock

from comatrix.coap import wire
from comatrix.coap.message import Request, Response, Security
from comatrix.coap.numbers import Code, MessageType, OptionNumber
from comatrix.coap.resource import CoapResource, LinkAttributes
from comatrix.identity import device_of
from comatrix.coap.server import CoapServer, Site
from comatrix.dtls.server import SWEEP_SECONDS, DtlsProtocol, is_client_hello
from comatrix.dtls.sessions import DtlsSettings, SessionTable
from support.dtls import (HELLO_VERIFY_REQUEST, SERVER_HELLO, PskClient, client_hello, cookie_of,
                          handshake_type)

class FakeUdp:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, datagram: bytes, addr: Any) -> None:
        self.sent.append((datagram, addr))

    def getHost(self) -> None:
        return None


class Port:
    """A DtlsProtocol on a fake UDP transport, a Clock and a CoAP server that records requests."""

    def __init__(self, site: Site | None = None, **settings: Any) -> None:
        """Without ``site`` the CoAP server only records what it would have parsed."""
        self.clock = Clock()
        self.coap = CoapServer(site or Site(), reactor=self.clock)
        self.delivered: list[tuple[bytes, Any]] = []
        if site is None:
            self.coap.datagramReceived = lambda data, addr: self.delivered.append((data, addr))
        self.protocol = DtlsProtocol(self.coap, {"dev": b"k" * 16}.get, DtlsSettings(**settings),
                                     reactor=self.clock)
        self.udp = FakeUdp()
        self.protocol.makeConnection(self.udp)

    def receive(self, datagram: bytes, addr: tuple[str, int]) -> list[bytes]:
        before = len(self.udp.sent)
        self.protocol.datagramReceived(datagram, addr)
        return [data for data, to in self.udp.sent[before:] if to == addr]

    def open(self, addr: tuple[str, int]) -> list[bytes]:
        """Cookie exchange, then the ClientHello with the cookie: what the server answered."""
        (verify,) = self.receive(client_hello(), addr)
        return self.receive(client_hello(cookie_of(verify), message_seq=1, record_seq=1), addr)

    def close(self) -> None:
        self.protocol.doStop()


@pytest.fixture
def port() -> Any:
    made = Port()
    yield made
    made.close()


def test_forged_client_hello_gets_only_a_small_hello_verify_request(port: Port) -> None:
    hello = client_hello()
    assert is_client_hello(hello)
    answers = port.receive(hello, ("127.0.0.1", 40000))
    assert len(answers) == 1
    assert handshake_type(answers[0]) == HELLO_VERIFY_REQUEST
    assert len(answers[0]) <= len(hello)
    assert len(port.protocol.sessions) == 0
    assert port.delivered == []


def test_a_wrong_cookie_or_a_cookie_of_another_address_creates_nothing(port: Port) -> None:
    (verify,) = port.receive(client_hello(), ("127.0.0.1", 40000))
    cookie = cookie_of(verify)
    forged = bytes(len(cookie))
    for addr, echoed in ((("127.0.0.1", 40000), forged), (("127.0.0.2", 40000), cookie),
                         (("127.0.0.1", 40001), cookie)):
        answers = port.receive(client_hello(echoed, message_seq=1, record_seq=1), addr)
        assert [handshake_type(answer) for answer in answers] == [HELLO_VERIFY_REQUEST]  # asked again
    assert len(port.protocol.sessions) == 0


def test_only_client_hellos_are_looked_at_from_unknown_peers(port: Port) -> None:
    application_data = bytes([23]) + b"\xfe\xfd" + b"\x00\x01" + bytes(6) + b"\x00\x10" + os.urandom(16)
    for junk in (b"", b"\x16", os.urandom(100), application_data, client_hello()[:20]):
        assert port.receive(junk, ("127.0.0.1", 40000)) == []
    assert len(port.protocol.sessions) == 0


def test_a_valid_cookie_starts_the_handshake(port: Port) -> None:
    answers = port.open(("127.0.0.1", 40000))
    assert len(answers) == 1 and handshake_type(answers[0]) == SERVER_HELLO  # (then ServerHelloDone)
    assert len(port.protocol.sessions) == 1
    assert port.protocol.security_for(("127.0.0.1", 40000)) is None  # no identity before Finished
    assert port.delivered == []


def test_sessions_are_bounded_per_address_and_in_total() -> None:
    port = Port(sessions_per_address=2, max_sessions=3)
    try:
        for source_port in (1001, 1002, 1003):
            port.open(("127.0.0.1", source_port))
        assert port.protocol.sessions.host_count("127.0.0.1") == 2
        assert port.protocol.sessions.get(("127.0.0.1", 1003)) is None
        port.open(("127.0.0.2", 1001))
        assert port.open(("127.0.0.3", 1001)) == []  # the table is full: no answer, no state
        assert len(port.protocol.sessions) == 3
        assert port.protocol.sessions.get(("127.0.0.3", 1001)) is None
    finally:
        port.close()


def test_a_handshake_that_does_not_finish_expires() -> None:
    port = Port(handshake_timeout=SWEEP_SECONDS, idle_timeout=10 * SWEEP_SECONDS)
    try:
        port.open(("127.0.0.1", 40000))
        port.clock.advance(SWEEP_SECONDS - 1)
        assert len(port.protocol.sessions) == 1
        port.clock.advance(SWEEP_SECONDS)
        assert len(port.protocol.sessions) == 0
        # Its address may start again.
        assert port.open(("127.0.0.1", 40000))
    finally:
        port.close()


def test_cookies_of_an_old_secret_stop_working(port: Port) -> None:
    addr = ("127.0.0.1", 40000)
    (verify,) = port.receive(client_hello(), addr)
    port.clock.advance(SWEEP_SECONDS)
    port.clock.advance(SWEEP_SECONDS)  # two rotations
    answers = port.receive(client_hello(cookie_of(verify), message_seq=1, record_seq=1), addr)
    assert [handshake_type(answer) for answer in answers] == [HELLO_VERIFY_REQUEST]
    assert len(port.protocol.sessions) == 0


def test_session_table_idle_expiry_counts_activity() -> None:
    settings = DtlsSettings(idle_timeout=100, handshake_timeout=10)
    table: SessionTable[str] = SessionTable(settings)
    done = table.add(("127.0.0.1", 1), "established", now=0)
    done.established = True
    table.add(("127.0.0.1", 2), "half-open", now=0)
    assert [entry.value for entry in table.expired(10)] == ["half-open"]
    table.remove(("127.0.0.1", 2))
    done.last_active = 50
    assert table.expired(149) == []
    assert [entry.value for entry in table.expired(150)] == ["established"]
    table.remove(("127.0.0.1", 1))
    assert len(table) == 0 and table.host_count("127.0.0.1") == 0


def test_session_table_replacing_a_session_needs_no_extra_room() -> None:
    table: SessionTable[str] = SessionTable(DtlsSettings(max_sessions=1, sessions_per_address=1))
    table.add(("127.0.0.1", 1), "old", now=0)
    assert table.has_room(("127.0.0.1", 1))
    assert not table.has_room(("127.0.0.1", 2))
    assert not table.has_room(("127.0.0.2", 1))


def test_settings_are_checked() -> None:
    for bad in ({"max_sessions": 0}, {"sessions_per_address": 0}, {"idle_timeout": 0}, {"mtu": 100}):
        with pytest.raises(ValueError):
            DtlsSettings(**bad)


def test_the_dtls_timer_retransmits_the_last_flight() -> None:
    port = Port()
    try:
        (flight,) = port.open(("127.0.0.1", 40000))
        entry = port.protocol.sessions.get(("127.0.0.1", 40000))
        assert entry is not None and entry.value.timer is not None and entry.value.timer.active()
        # OpenSSL reads the wall clock for its timer (initially 1 s); the reactor's call drives it.
        time.sleep(1.1)
        before = len(port.udp.sent)
        port.clock.advance(entry.value.timer.getTime() - port.clock.seconds())
        resent = [data for data, _ in port.udp.sent[before:]]
        assert len(resent) == 1 and handshake_type(resent[0]) == SERVER_HELLO
        assert len(resent[0]) == len(flight)
        assert entry.value.timer is not None and entry.value.timer.active()  # backed off, armed again
    finally:
        port.close()


def establish(port: Port, addr: tuple[str, int], identity: str = "dev", key: bytes = b"k" * 16) -> PskClient:
    client = PskClient(identity, key)
    answers: list[bytes] = []
    for _ in range(10):  # a PSK handshake is 3 round trips after the cookie
        sent = client.step(answers)
        client.sent.append(sent)
        answers = port.receive(sent, addr) if sent else []
        if (client.connection.established or client.failed) and not answers:
            break
    return client


def test_an_established_session_delivers_requests_with_the_psk_identity() -> None:
    port = Port()
    client = establish(port, ("127.0.0.1", 40000))
    try:
        entry = port.protocol.sessions.get(("127.0.0.1", 40000))
        assert entry is not None and entry.established and entry.value.timer is None
        assert port.protocol.security_for(("127.0.0.1", 40000)) == Security("dtls", "dev")
        port.receive(client.connection.encrypt(b"coap request"), ("127.0.0.1", 40000))
        assert port.delivered == [(b"coap request", ("127.0.0.1", 40000))]
        # What the CoAP server writes back goes out encrypted, through the session.
        port.coap.transport.write(b"coap response", ("127.0.0.1", 40000))
        records, closed = client.connection.receive(port.udp.sent[-1][0])
        assert records == [b"coap response"] and not closed
    finally:
        client.close()
        port.close()


def test_a_wrong_key_never_gets_a_session_nor_delivers_data() -> None:
    port = Port()
    client = establish(port, ("127.0.0.1", 40000), key=b"x" * 16)
    try:
        assert not client.connection.established
        entry = port.protocol.sessions.get(("127.0.0.1", 40000))
        assert entry is None or not entry.established
        assert port.delivered == []
        stranger = establish(port, ("127.0.0.1", 40001), identity="nobody")
        assert port.protocol.sessions.get(("127.0.0.1", 40001)) is None  # failed with an alert
        stranger.close()
    finally:
        client.close()
        port.close()


def test_idle_sessions_end_with_a_close_notify() -> None:
    port = Port(idle_timeout=2 * SWEEP_SECONDS)
    addr = ("127.0.0.1", 40000)
    client = establish(port, addr)
    try:
        port.clock.advance(SWEEP_SECONDS)
        port.receive(client.connection.encrypt(b"still here"), addr)
        port.clock.advance(SWEEP_SECONDS)
        assert port.protocol.sessions.get(addr) is not None  # active within idle_timeout
        port.clock.advance(SWEEP_SECONDS)
        port.clock.advance(SWEEP_SECONDS)
        assert port.protocol.sessions.get(addr) is None
        records, closed = client.connection.receive(port.udp.sent[-1][0])
        assert closed  # the gateway said close_notify
    finally:
        client.close()
        port.close()


ADDR = ("127.0.0.1", 40000)


@pytest.fixture
def client(port: Port) -> Any:
    """A client with an established session with ``port``, from ADDR."""
    made = establish(port, ADDR)
    yield made
    made.close()


def test_a_late_copy_of_the_hello_that_started_a_session_changes_nothing(port: Port, client: PskClient) -> None:
    session = port.protocol.sessions.get(ADDR)
    hello_with_cookie = client.sent[1]
    assert handshake_type(hello_with_cookie) == 1 and cookie_of_hello(hello_with_cookie)
    assert port.receive(hello_with_cookie, ADDR) == []
    assert port.protocol.sessions.get(ADDR) is session and session is not None and session.established


def cookie_of_hello(hello: bytes) -> bytes:
    session_id_length = hello[59]
    at = 60 + session_id_length
    return hello[at + 1:at + 1 + hello[at]]


def test_a_close_notify_from_the_peer_ends_the_session(port: Port, client: PskClient) -> None:
    answers = port.receive(client.connection.close_notify(), ADDR)
    assert port.protocol.sessions.get(ADDR) is None
    assert len(answers) == 1  # our close_notify


def test_a_new_handshake_from_the_same_address_replaces_the_session_after_its_cookie(port: Port) -> None:
    addr = ("127.0.0.1", 40000)
    old = establish(port, addr)
    try:
        first = port.protocol.sessions.get(addr)
        # A stranger's forged hello from that address gets a cookie request; the session stays.
        assert [handshake_type(a) for a in port.receive(client_hello(), addr)] == [HELLO_VERIFY_REQUEST]
        assert port.protocol.sessions.get(addr) is first
        new = establish(port, addr)
        second = port.protocol.sessions.get(addr)
        assert second is not None and second is not first and second.established
        new.close()
    finally:
        old.close()


class Whoami(CoapResource):
    link = LinkAttributes(obs=True)

    def render_GET(self, request: Request) -> Response:
        return Response.text(device_of(request).key)


def test_observations_and_exchanges_live_and_end_with_their_dtls_session() -> None:
    site = Site()
    whoami = Whoami()
    site.put(("whoami",), whoami)
    port = Port(site)
    client = establish(port, ADDR)
    try:
        observe = wire.encode(MessageType.CON, Code.GET, 1, b"tk", [(OptionNumber.OBSERVE, b""),
                                                                   (OptionNumber.URI_PATH, b"whoami")])
        (answer,) = port.receive(client.connection.encrypt(observe), ADDR)
        (plain,) = client.connection.receive(answer)[0]
        assert wire.decode(plain).payload == b"dtls:dev"
        assert port.coap.observer_count(whoami) == 1
        port.receive(client.connection.close_notify(), ADDR)
        assert port.coap.observer_count(whoami) == 0
        # A new session from that address reusing message id 1 gets its own answer, not the old one.
        again = establish(port, ADDR)
        request = wire.encode(MessageType.CON, Code.GET, 1, b"t2", [(OptionNumber.URI_PATH, b"whoami")])
        (answer,) = port.receive(again.connection.encrypt(request), ADDR)
        (plain,) = again.connection.receive(answer)[0]
        assert wire.decode(plain).token == b"t2"
        again.close()
    finally:
        client.close()
        port.close()
