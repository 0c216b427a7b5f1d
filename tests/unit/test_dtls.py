"""The DTLS port below the CoAP layer: stateless cookies, session bounds, expiry (Clock).

ClientHellos are built here byte by byte (RFC 6347 §4.2.1 / RFC 5246 §7.4.1.2), as
a forger on the link would send them; OpenSSL answers them for real.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from twisted.internet.task import Clock

from comatrix.coap.server import CoapServer, Site
from comatrix.dtls.server import SWEEP_SECONDS, DtlsProtocol, is_client_hello
from comatrix.dtls.sessions import DtlsSettings, SessionTable
from support.dtls import HELLO_VERIFY_REQUEST, SERVER_HELLO, client_hello, cookie_of, handshake_type

class FakeUdp:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, datagram: bytes, addr: Any) -> None:
        self.sent.append((datagram, addr))

    def getHost(self) -> None:
        return None


class Port:
    """A DtlsProtocol on a fake UDP transport, a Clock and a CoAP server that records requests."""

    def __init__(self, **settings: Any) -> None:
        self.clock = Clock()
        self.coap = CoapServer(Site(), reactor=self.clock)
        self.delivered: list[tuple[bytes, Any]] = []
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
