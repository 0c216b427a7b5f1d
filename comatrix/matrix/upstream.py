"""An HTTP/1.1 `IAgent` for exactly one upstream: the configured homeserver.

`twisted.web.client.Agent` serves any URL: per request it parses the URL twice
(``URI.fromBytes``), asks an endpoint factory for an endpoint, computes the
Host header and keys a connection pool by (scheme, host, port).  A gateway in
front of one homeserver knows all of that at start.  `UpstreamAgent` parses
the base URL once; per request it checks that the URL starts with the
homeserver's origin (a plain bytes comparison -- the Authorization header can
only ever reach the configured server), takes the rest as the request target
and sends it over an idle kept-alive connection, or a new one.

The HTTP/1.1 protocol itself stays Twisted's (`HTTP11ClientProtocol`: request
writing, response parsing, chunked bodies, keep-alive decisions): only what
sits around it is purpose-built.  Like Twisted's pool, a request without a body
whose idle connection turns out to be closed by the server is retried once on
a new connection; requests with a body are not (they might have been acted on).
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from twisted.internet.defer import CancelledError, Deferred, fail, gatherResults
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from twisted.web._newclient import (
    HTTP11ClientProtocol,
    Request,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseNeverReceived,
)
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer

__all__ = ["HomeserverOnly", "UpstreamAgent"]

#: Seconds an idle kept-alive connection is kept before it is closed when next looked at
#: (Twisted's pool: 240 s); servers usually close theirs sooner, which is noticed the same way.
IDLE_TIMEOUT = 240.0

_RETRYABLE = (RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived)


class HomeserverOnly(ValueError):
    """A request URL pointing anywhere but the configured homeserver (a bug, never sent)."""


class _ProtocolFactory(Factory):
    """Builds `HTTP11ClientProtocol` instances that hand themselves back to the agent when idle."""

    def __init__(self, agent: "UpstreamAgent") -> None:
        self._agent = agent

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return HTTP11ClientProtocol(self._agent._idle)


@implementer(IAgent)
class UpstreamAgent:
    """An `IAgent` whose every request goes to ``base_url``'s origin over kept-alive connections."""

    def __init__(self, reactor: Any, base_url: str, *, connect_timeout: float, max_idle: int = 8,
                 endpoint: IStreamClientEndpoint | None = None, tls_policy: Any = None) -> None:
        base = URI.fromBytes(base_url.encode("ascii"))
        self._reactor = reactor
        #: ``scheme://host[:port]`` as the URLs handed to `request` spell it.
        self._origin = base.scheme + b"://" + base.netloc
        self._host = _host_value(base.scheme, base.host, base.port)
        self._where = (base.scheme, base.host, base.port, connect_timeout)
        #: Certificates are checked against the system's trust roots (a test names its own).
        self._tls_policy = tls_policy if tls_policy is not None else BrowserLikePolicyForHTTPS()
        #: Built on the first connection (a test's fake clock is no resolver).
        self._endpoint = endpoint
        self._factory = _ProtocolFactory(self)
        self.max_idle = max_idle
        #: Idle connections, most recently used last, with the time each became idle.
        self._pool: list[tuple[HTTP11ClientProtocol, float]] = []

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> "Deferred[Any]":
        try:
            target = self._target(uri)
        except HomeserverOnly:
            return fail()
        if headers is None:
            headers = Headers()
        headers.setRawHeaders(b"Host", [self._host])
        request = Request(method, target, headers, bodyProducer, persistent=True)
        connection = self._take()
        if connection is None:
            return self._connect(request)
        d = connection.request(request)
        if bodyProducer is None:
            d.addErrback(self._retry, request)
        return d

    def _target(self, uri: bytes) -> bytes:
        origin = self._origin
        if not uri.startswith(origin) or uri[len(origin):len(origin) + 1] not in (b"/", b"?", b""):
            raise HomeserverOnly("request URL is not on the configured homeserver")
        return uri[len(origin):] or b"/"

    def _connect(self, request: Request) -> "Deferred[Any]":
        if self._endpoint is None:
            scheme, host, port, timeout = self._where
            endpoint: IStreamClientEndpoint = HostnameEndpoint(self._reactor, host, port, timeout=timeout)
            if scheme == b"https":
                endpoint = wrapClientTLS(self._tls_policy.creatorForNetloc(host, port), endpoint)
            self._endpoint = endpoint
        connected: Deferred[Any] = self._endpoint.connect(self._factory)
        return connected.addCallback(lambda connection: connection.request(request))

    def _retry(self, failure: Failure, request: Request) -> Any:
        """A request without a body that failed on a kept-alive connection before any answer: once more, new."""
        reasons = getattr(failure.value, "reasons", None) or []
        if not failure.check(*_RETRYABLE) or any(r.check(CancelledError) for r in reasons):
            return failure
        return self._connect(request)

    def _take(self) -> HTTP11ClientProtocol | None:
        pool = self._pool
        now = self._reactor.seconds()
        while pool:
            connection, since = pool.pop()
            if connection.state == "QUIESCENT" and now - since < IDLE_TIMEOUT:
                return connection
            _close(connection)
        return None

    def _idle(self, connection: HTTP11ClientProtocol) -> None:
        """`HTTP11ClientProtocol`'s quiescent callback: a kept-alive connection is free again."""
        pool = self._pool
        if len(pool) >= self.max_idle:
            _close(pool.pop(0)[0])
        pool.append((connection, self._reactor.seconds()))

    def close(self) -> "Deferred[Any]":
        """Abort every idle connection (graceful shutdown); fires when they are gone."""
        closing = [connection.abort() for connection, _since in self._pool if connection.state == "QUIESCENT"]
        self._pool = []
        return gatherResults(closing)


def _close(connection: HTTP11ClientProtocol) -> None:
    transport = connection.transport
    if transport is not None:
        transport.loseConnection()


def _host_value(scheme: bytes, host: bytes, port: int) -> bytes:
    """The Host header, as `twisted.web.client.Agent` computes it."""
    if b":" in host and not host.startswith(b"["):
        host = b"[" + host + b"]"
    if (scheme, port) in ((b"http", 80), (b"https", 443)):
        return host
    return b"%b:%d" % (host, port)
