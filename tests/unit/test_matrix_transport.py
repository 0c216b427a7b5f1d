"""Unit tests of MatrixTransport against an in-memory fake homeserver (StubTreq), plus
one real-socket test for a refused connection on loopback."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock

from comatrix.matrix import api
from comatrix.matrix.errors import (
    HomeserverTimeout,
    HomeserverUnreachable,
    InvalidResponse,
    MatrixError,
)
from comatrix.matrix.testing import FakeHomeserver, ScriptedAnswer, result_of, stub_transport
from comatrix.matrix.transport import MatrixTransport

PASSWORD = "pa55-word-SECRET"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def hs() -> FakeHomeserver:
    return FakeHomeserver()


def test_success_returns_status_and_json(hs: FakeHomeserver, clock: Clock) -> None:
    transport, _ = stub_transport(hs, clock)
    status, body = result_of(transport.request(api.versions()))
    assert status == 200 and "v1.11" in body["versions"]
    assert not clock.getDelayedCalls()  # the deadline timer was cancelled


def test_token_goes_in_bearer_header_only(hs: FakeHomeserver, clock: Clock) -> None:
    user = hs.add_user("alice", PASSWORD)
    token, _ = hs.issue_token(user)
    transport, _ = stub_transport(hs, clock)
    _, body = result_of(transport.request(api.whoami(token)))
    assert body["user_id"] == user
    seen = hs.requests[-1]
    assert seen.headers[b"Authorization"] == [b"Bearer " + token.encode()]
    assert token.encode() not in seen.uri


def test_json_body_and_percent_encoded_path(hs: FakeHomeserver, clock: Clock) -> None:
    user = hs.add_user("alice", PASSWORD)
    token, _ = hs.issue_token(user)
    room = hs.new_room(user)
    transport, _ = stub_transport(hs, clock)
    txn = "t/1?#!:ü"
    result_of(transport.request(api.send_event(token, room, "m.room.message", txn,
                                               {"msgtype": "m.text", "body": "grüße"})))
    seen = hs.requests[-1]
    assert seen.method == "PUT"
    assert seen.path[3:] == ("rooms", room, "send", "m.room.message", txn)
    assert seen.uri.startswith(b"/_matrix/client/v3/rooms/%21")
    assert b"t%2F1%3F%23%21%3A%C3%BC" in seen.uri
    assert seen.headers[b"Content-Type"] == [b"application/json"]
    assert seen.body == {"msgtype": "m.text", "body": "grüße"}


def test_bodyless_post_sends_empty_json_object(hs: FakeHomeserver, clock: Clock) -> None:
    transport, _ = stub_transport(hs, clock)
    hs.script("POST", ("x",), ScriptedAnswer(200, b"{}"))
    assert result_of(transport.request(api.generic("POST", ["x"]))) == (200, {})
    assert hs.requests[-1].body == {}


def test_429_retry_after_header(hs: FakeHomeserver, clock: Clock) -> None:
    transport, _ = stub_transport(hs, clock)
    hs.script("GET", ("_matrix",), ScriptedAnswer(
        429, json.dumps({"errcode": "M_LIMIT_EXCEEDED", "error": "Too Many Requests",
                         "retry_after_ms": 9000}).encode(), {"Retry-After": "3"}))
    with pytest.raises(MatrixError) as info:
        result_of(transport.request(api.versions()))
    err = info.value
    assert (err.http_status, err.errcode, err.retry_after) == (429, "M_LIMIT_EXCEEDED", 3.0)
    # Not retried inside the transport: the device is told when to come back.
    assert len(hs.requests) == 1 and not clock.getDelayedCalls()


def test_429_retry_after_ms_only(hs: FakeHomeserver, clock: Clock) -> None:
    transport, _ = stub_transport(hs, clock)
    hs.script("GET", ("_matrix",), ScriptedAnswer(
        429, b'{"errcode":"M_LIMIT_EXCEEDED","error":"slow down","retry_after_ms":1500}'))
    with pytest.raises(MatrixError) as info:
        result_of(transport.request(api.versions()))
    assert info.value.retry_after == 1.5


def test_401_unknown_token_soft_logout(hs: FakeHomeserver, clock: Clock) -> None:
    stale = "syt_c3RhbGU_StAlEtOkEn_000"
    hs.soft_logged_out.add(stale)
    transport, _ = stub_transport(hs, clock)
    with pytest.raises(MatrixError) as info:
        result_of(transport.request(api.whoami(stale)))
    err = info.value
    assert (err.http_status, err.errcode, err.soft_logout) == (401, "M_UNKNOWN_TOKEN", True)
    assert stale not in str(err) and stale not in repr(err)


def test_non_json_502_page_is_matrix_error_without_errcode(hs: FakeHomeserver, clock: Clock) -> None:
    transport, _ = stub_transport(hs, clock)
    page = b"<html><body><h1>502 Bad Gateway</h1>nginx</body></html>"
    hs.script("GET", ("_matrix",), ScriptedAnswer(502, page, {"Content-Type": "text/html"}))
    with pytest.raises(MatrixError) as info:
        result_of(transport.request(api.versions()))
    assert info.value.http_status == 502 and info.value.errcode is None
    assert "<html>" not in str(info.value)


@pytest.mark.parametrize("payload", [b"<html>ok</html>", b"[1, 2]", b"\xff\xfe", b'{"a": '])
def test_2xx_that_is_not_a_json_object_is_invalid(hs: FakeHomeserver, clock: Clock,
                                                   payload: bytes) -> None:
    transport, _ = stub_transport(hs, clock)
    hs.script("GET", ("_matrix",), ScriptedAnswer(200, payload))
    with pytest.raises(InvalidResponse):
        result_of(transport.request(api.versions()))


def test_oversized_body_is_invalid(hs: FakeHomeserver, clock: Clock) -> None:
    transport = MatrixTransport("https://hs", reactor=clock, max_response_bytes=100,
                                http_client=stub_transport(hs, clock)[1])  # type: ignore[arg-type]
    hs.script("GET", ("_matrix",), ScriptedAnswer(200, b'{"pad": "' + b"x" * 500 + b'"}'))
    with pytest.raises(InvalidResponse):
        result_of(transport.request(api.versions()))


def test_redirect_is_not_followed(hs: FakeHomeserver, clock: Clock) -> None:
    transport, _ = stub_transport(hs, clock)
    hs.script("GET", ("_matrix",), ScriptedAnswer(
        302, b"", {"Location": "https://evil.example/_matrix/client/v3/account/whoami"}))
    with pytest.raises(MatrixError) as info:
        result_of(transport.request(api.whoami("syt_x_y_z")))
    assert info.value.http_status == 302
    assert len(hs.requests) == 1


def test_bad_token_characters_fail_without_echo(hs: FakeHomeserver, clock: Clock) -> None:
    transport, _ = stub_transport(hs, clock)
    evil = "abc\r\nX-Injected: 1"
    with pytest.raises(ValueError) as info:
        result_of(transport.request(api.whoami(evil)))
    assert evil not in str(info.value)
    assert hs.requests == []


def fired(d: "Deferred[Any]") -> list[object]:
    """A list that gets the Deferred's result when it fires (without consuming it)."""
    seen: list[object] = []

    def record(result: object) -> object:
        seen.append(result)
        return result

    d.addBoth(record)
    return seen


def test_timeout_before_headers(hs: FakeHomeserver, clock: Clock) -> None:
    transport, _ = stub_transport(hs, clock, timeout=5.0)
    hs.script("GET", ("_matrix",), None)  # never answers
    d = transport.request(api.versions())
    done = fired(d)
    clock.advance(4.9)
    assert not done
    clock.advance(0.2)
    with pytest.raises(HomeserverTimeout):
        result_of(d)
    assert len(hs.hanging) == 1


def test_timeout_covers_the_whole_body(hs: FakeHomeserver, clock: Clock) -> None:
    transport, stub = stub_transport(hs, clock, timeout=5.0)
    hs.script("GET", ("_matrix",), None)
    d = transport.request(api.versions())
    done = fired(d)
    hanging = hs.hanging[0]
    hanging.setHeader(b"Content-Length", b"100")
    hanging.write(b'{"versions": [')  # headers and part of the body, then silence
    stub.flush()
    assert not done
    clock.advance(5.0)
    with pytest.raises(HomeserverTimeout):
        result_of(d)


def test_caller_cancel_is_not_reported_as_homeserver_failure(hs: FakeHomeserver,
                                                            clock: Clock) -> None:
    transport, _ = stub_transport(hs, clock)
    hs.script("GET", ("_matrix",), None)
    d = transport.request(api.versions())
    d.cancel()
    with pytest.raises(CancelledError):
        result_of(d)
    assert not clock.getDelayedCalls()


def test_close_without_own_pool(hs: FakeHomeserver, clock: Clock) -> None:
    transport, _ = stub_transport(hs, clock)
    assert result_of(transport.close()) is None


@pytest.mark.parametrize("url", ["ftp://x", "hs.local:8008", "http://x/?q=1"])
def test_rejects_bad_base_url(url: str) -> None:
    with pytest.raises(ValueError):
        MatrixTransport(url, reactor=Clock())


@pytest_twisted.ensureDeferred
async def test_refused_connection_is_unreachable() -> None:
    # A bound socket that never listens: connecting to it is refused at once.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        transport = MatrixTransport(f"http://127.0.0.1:{port}", timeout=10.0)
        try:
            with pytest.raises(HomeserverUnreachable) as info:
                await transport.request(api.login_password("alice", PASSWORD))
            assert PASSWORD not in str(info.value)
        finally:
            await transport.close()
    finally:
        sock.close()


def _tls_site(resource: Any) -> tuple[Any, Any]:
    """A TLS listener on 127.0.0.1 with a fresh self-signed certificate for "localhost"; (port, cert)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from twisted.internet import reactor as global_reactor, ssl
    from twisted.web.server import Site

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    server_cert = ssl.PrivateCertificate.loadPEM(pem)
    reactor: Any = global_reactor
    port = reactor.listenSSL(0, Site(resource), server_cert.options(), interface="127.0.0.1")
    return port, ssl.Certificate.loadPEM(cert.public_bytes(serialization.Encoding.PEM))


@pytest_twisted.ensureDeferred
async def test_https_homeserver_round_trip_and_certificate_check() -> None:
    # The agent speaks TLS to an https homeserver, reuses the connection, and checks the certificate.
    from twisted.web.client import BrowserLikePolicyForHTTPS

    from comatrix.matrix.upstream import UpstreamAgent

    hs = FakeHomeserver()
    user = hs.add_user("alice", PASSWORD)
    token, _ = hs.issue_token(user)
    port, cert = _tls_site(hs)
    url = f"https://localhost:{port.getHost().port}"
    trusting = MatrixTransport(url, timeout=10.0)
    assert trusting._agent is not None
    trusting._agent._tls_policy = BrowserLikePolicyForHTTPS(trustRoot=cert)
    untrusting = MatrixTransport(url, timeout=10.0)  # the system's roots: a self-signed certificate fails
    try:
        for _ in range(2):
            status, body = await trusting.request(api.whoami(token))
            assert (status, body["user_id"]) == (200, user)
        assert len(trusting._agent._pool) == 1  # one kept-alive TLS connection served both
        with pytest.raises(HomeserverUnreachable):
            await untrusting.request(api.whoami(token))
    finally:
        await trusting.close()
        await untrusting.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_connection_not_taken_in_time_is_unreachable_not_slow(connectionless_homeserver: str) -> None:
    from twisted.internet import reactor

    transport = MatrixTransport(connectionless_homeserver, timeout=10.0, connect_timeout=0.5)
    started = reactor.seconds()  # type: ignore[attr-defined]
    try:
        with pytest.raises(HomeserverUnreachable, match="no connection within 0.5 s"):
            await transport.request(api.login_password("alice", PASSWORD))
    finally:
        await transport.close()
    assert 0.4 < reactor.seconds() - started < 5  # type: ignore[attr-defined]  # the connect deadline, not 10 s


def test_connect_timeout_never_exceeds_the_request_deadline() -> None:
    assert MatrixTransport("http://hs", reactor=Clock(), timeout=2.0, connect_timeout=5.0).connect_timeout == 2.0
    assert MatrixTransport("http://hs", reactor=Clock(), timeout=2.0).connect_timeout == 2.0
    with pytest.raises(ValueError):
        MatrixTransport("http://hs", reactor=Clock(), connect_timeout=0)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest_twisted.ensureDeferred
async def test_real_pool_round_trip_on_loopback(host: str) -> None:
    # An IPv6 literal homeserver (a border router's neighbour) works too: treq alone would
    # IDNA-encode "[::1]" on every request and fail.
    from twisted.internet import reactor as global_reactor
    from twisted.web.server import Site

    reactor: Any = global_reactor  # zope interfaces are opaque to mypy without its plugin

    hs = FakeHomeserver()
    user = hs.add_user("alice", PASSWORD)
    token, _ = hs.issue_token(user)
    port = reactor.listenTCP(0, Site(hs), interface=host)
    netloc = f"[{host}]" if ":" in host else host
    transport = MatrixTransport(f"http://{netloc}:{port.getHost().port}", timeout=10.0)
    try:
        for _ in range(3):  # several requests over the persistent pool
            status, body = await transport.request(api.whoami(token))
            assert (status, body["user_id"]) == (200, user)
        with pytest.raises(MatrixError) as info:
            await transport.request(api.whoami("syt_bm9ib2R5_UnKnOwN_000"))
        assert info.value.errcode == "M_UNKNOWN_TOKEN"
    finally:
        await transport.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_cookies_from_the_homeserver_are_never_sent_back() -> None:
    # Every device shares the transport: a cookie set for one must not ride along with another's request.
    from twisted.internet import reactor as global_reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    reactor: Any = global_reactor
    seen_cookies: list[Any] = []
    seen_bodies: list[bytes] = []

    class SetsCookies(Resource):
        isLeaf = True

        def render(self, request: Any) -> bytes:
            seen_cookies.append(request.getHeader(b"cookie"))
            seen_bodies.append(request.content.read())
            request.addCookie(b"session", b"device-a", path=b"/")
            request.setHeader(b"content-type", b"application/json")
            return b"{}"

    port = reactor.listenTCP(0, Site(SetsCookies()), interface="127.0.0.1")
    transport = MatrixTransport(f"http://127.0.0.1:{port.getHost().port}", timeout=10.0)
    try:
        for txn in ("t1", "t2"):
            await transport.request(api.send_event("tok", "!r:hs", "m.room.message", txn, {"body": "hi"}))
    finally:
        await transport.close()
        await port.stopListening()
    assert seen_cookies == [None, None]
    assert [json.loads(body) for body in seen_bodies] == [{"body": "hi"}, {"body": "hi"}]


def test_agent_only_reaches_the_configured_homeserver() -> None:
    from twisted.internet.task import Clock

    from comatrix.matrix.upstream import HomeserverOnly, UpstreamAgent

    class Endpoint:
        def __init__(self) -> None:
            self.connects = 0

        def connect(self, factory: Any) -> Deferred[Any]:
            self.connects += 1
            return Deferred()

    endpoint = Endpoint()
    agent = UpstreamAgent(Clock(), "https://hs.example.org:8448/prefix", connect_timeout=5.0, endpoint=endpoint)
    agent.request(b"GET", b"https://hs.example.org:8448/prefix/_matrix/x")
    assert endpoint.connects == 1
    for elsewhere in (b"https://evil.example.org:8448/_matrix/x", b"http://hs.example.org:8448/_matrix/x",
                      b"https://hs.example.org/_matrix/x", b"https://hs.example.org:84480/_matrix/x",
                      b"https://hs.example.org:8448@evil.example/_matrix/x"):
        with pytest.raises(HomeserverOnly):
            result_of(agent.request(b"GET", elsewhere))
    assert endpoint.connects == 1


def test_homeserver_url_is_a_uri_once() -> None:
    from twisted.internet import reactor

    assert MatrixTransport("https://bücher.example/matrix/", reactor=reactor).base_url == \
        "https://xn--bcher-kva.example/matrix"
    assert MatrixTransport("http://[fd00::1]:8008", reactor=reactor).base_url == "http://[fd00::1]:8008"


@pytest.mark.parametrize("body", [False, True])
def test_request_on_a_closed_kept_alive_connection_is_retried_once_without_body(body: bool) -> None:
    # The server may close an idle kept-alive connection just as it is reused: a request without a
    # body goes again on a new connection (as Twisted's pool does); one with a body might have been
    # acted on, so its failure stands (the device sees 5.02 and may retry itself).
    from twisted.internet.defer import fail
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure
    from twisted.web._newclient import ResponseNeverReceived

    from comatrix.matrix.transport import _BytesBody
    from comatrix.matrix.upstream import UpstreamAgent

    class Stale:
        state = "QUIESCENT"
        transport = None

        def request(self, request: Any) -> Deferred[Any]:
            return fail(ResponseNeverReceived([Failure(ConnectionDone())]))

    class Endpoint:
        def __init__(self) -> None:
            self.connects = 0

        def connect(self, factory: Any) -> Deferred[Any]:
            self.connects += 1
            return Deferred()

    clock = Clock()
    endpoint = Endpoint()
    agent = UpstreamAgent(clock, "http://hs:8008", connect_timeout=5.0, endpoint=endpoint)
    agent._pool.append((Stale(), clock.seconds()))  # type: ignore[arg-type]
    d = agent.request(b"PUT" if body else b"GET", b"http://hs:8008/_matrix/x",
                      bodyProducer=_BytesBody(b"{}") if body else None)
    if body:
        with pytest.raises(ResponseNeverReceived):
            result_of(d)
        assert endpoint.connects == 0
    else:
        outcome: list[Any] = []
        d.addBoth(outcome.append)
        assert outcome == [] and endpoint.connects == 1  # waiting on the new connection


def test_request_head_on_the_wire_one_line_per_header() -> None:
    # The fixed headers are prepared once per device address and the token goes in as checked:
    # the request head is what Twisted's `Headers` writes (canonical names, Host last), and a
    # media type the device named still has its line breaks replaced.
    from twisted.internet.defer import succeed
    from twisted.internet.testing import StringTransport

    from comatrix.identity import Device, acting_as
    from comatrix.matrix.api import MatrixRequest

    wires: list[StringTransport] = []

    class Endpoint:
        def connect(self, factory: Any) -> Deferred[Any]:
            protocol = factory.buildProtocol(None)
            wire = StringTransport()
            protocol.makeConnection(wire)
            wires.append(wire)
            return succeed(protocol)

    transport = MatrixTransport("http://hs.example:8008", reactor=Clock())
    assert transport._agent is not None
    transport._agent._endpoint = Endpoint()  # type: ignore[assignment]
    with acting_as(Device("a:2001:db8::7", "2001:db8::7")):
        transport.request(api.send_event("tok", "!r:hs", "m.room.message", "t1", {"body": "hi"}))
    transport.request(MatrixRequest("POST", ("_matrix", "media", "v3", "upload"), access_token="tok",
                                    raw=b"x", content_type="text/plain\r\nX-Injected: 1"))
    transport.request(api.versions())
    heads = [wire.value().split(b"\r\n\r\n", 1)[0].split(b"\r\n") for wire in wires]
    assert heads[0] == [
        b"PUT /_matrix/client/v3/rooms/%21r%3Ahs/send/m.room.message/t1 HTTP/1.1",
        b"Content-Length: 13", b"Accept: application/json", b"User-Agent: CoMatrix/0.1 (CoAP gateway)",
        b"X-Forwarded-For: 2001:db8::7", b"X-Forwarded-Proto: http", b"Authorization: Bearer tok",
        b"Content-Type: application/json", b"Host: hs.example:8008"]
    assert heads[1][2:] == [
        b"Accept: application/json", b"User-Agent: CoMatrix/0.1 (CoAP gateway)", b"Authorization: Bearer tok",
        b"Content-Type: text/plain X-Injected: 1", b"Host: hs.example:8008"]
    assert heads[2] == [b"GET /_matrix/client/versions HTTP/1.1", b"Accept: application/json",
                        b"User-Agent: CoMatrix/0.1 (CoAP gateway)", b"Host: hs.example:8008"]
