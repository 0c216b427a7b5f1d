"""The thin network layer: one treq client sending `MatrixRequest` values.

This is the only module of CoMatrix that imports treq.  It adds the bearer
token header, encodes the JSON body, enforces one deadline over connect +
request + whole response, and turns every outcome into either
``(status, json_object)`` for 2xx or one of the typed errors of
`comatrix.matrix.errors`.

Deadlines: a connection the homeserver does not take within ``connect_timeout``
means it is down (`HomeserverUnreachable`, 5.02 for the device); an answer that
does not arrive within ``timeout`` of the call means it is slow
(`HomeserverTimeout`, 5.04).

Rate limits: a 429 becomes a `MatrixError` whose ``retry_after`` comes from
``Retry-After`` (first) or ``retry_after_ms``.  The transport deliberately does
not sleep and retry: a constrained device is waiting for its CoAP answer, and
the gateway tells it when to come back (4.29 with Max-Age) instead of holding
the exchange (and a connection) open past the device's own timeouts.

Devices: a call made for a device (`comatrix.identity.current_device` when it
is requested) names the device's address in ``X-Forwarded-For``, so a
homeserver that trusts the header (Synapse: ``x_forwarded: true`` on the
listener) applies its per-IP limits -- logins, registrations -- per device
instead of to the whole gateway.  Calls the gateway makes for itself carry none.

Redirects are not followed and the agent has one endpoint, the configured
homeserver's, so the Authorization header can only ever reach it.  Cookies are
refused: every device shares this client, so a cookie set in answer to one
device must not ride along with another's requests.

Underneath treq is what a gateway forwarding thousands of small requests to
one server needs (`comatrix.matrix.upstream.UpstreamAgent`): the base URL is
parsed and the endpoint, Host header and TLS policy are built once at start,
connections are kept alive in the agent's own pool, and the URL of a request
is never parsed again -- it is checked to start with the homeserver's origin.
`_UpstreamClient` is treq's `HTTPClient` for that agent: the calls this module
makes (no cookies, no redirects, no compression: the homeserver's JSON is
small) go straight to the agent and come back as treq responses; any other
call takes treq's general path.  A body already in memory is written at once
instead of through a Cooperator.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from http.cookiejar import CookieJar
from typing import Any, Callable, Protocol as TypingProtocol, cast

from zope.interface import implementer

from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import Protocol, connectionDone

from twisted.python.failure import Failure
from twisted.web.client import (
    PartialDownloadError,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer

from hyperlink import EncodedURL
from treq.client import HTTPClient
from treq.response import _Response

from comatrix.identity import Device, current_device, plain_address
from comatrix.logs import get_logger
from comatrix.matrix.api import SECRET_KEYS, MatrixRequest
from comatrix.matrix.upstream import HomeserverOnly, UpstreamAgent
from comatrix.matrix.errors import (
    HomeserverTimeout,
    HomeserverUnreachable,
    InvalidResponse,
    MatrixError,
)

__all__ = ["HttpClientLike", "MatrixTransport", "DEFAULT_MAX_RESPONSE_BYTES"]

log = get_logger(__name__)

#: Large enough for a busy /sync, small enough that a broken server cannot exhaust memory.
DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024

_USER_AGENT = b"CoMatrix/0.1 (CoAP gateway)"

#: A token that can go in a header as it is: visible ASCII, no space (RFC 6750 allows less still).
_HEADER_TOKEN = re.compile("[!-~]+")

# Failures meaning "no usable connection to the homeserver".
_UNREACHABLE = (
    ierror.ConnectError,  # refused, DNS lookup, no route, ConnectingCancelled...
    ierror.ConnectionLost,
    ierror.ConnectionDone,
    ResponseNeverReceived,
    ResponseFailed,
    RequestTransmissionFailed,
    PartialDownloadError,
)


class HttpClientLike(TypingProtocol):
    """What the transport needs from treq: the ``request`` of `treq.client.HTTPClient`."""

    def request(self, method: str, url: Any, **kwargs: Any) -> "Deferred[Any]": ...


def _secrets_of(req: MatrixRequest) -> list[str]:
    secrets: list[str] = []
    if req.access_token:
        secrets.append(req.access_token)

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if k in SECRET_KEYS and isinstance(v, str):
                    secrets.append(v)
                else:
                    walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(req.body)
    return secrets


class _NoCookies(CookieJar):
    """A cookie jar that never takes a cookie and never sends one (and spends nothing on either)."""

    def add_cookie_header(self, request: Any) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass

    def set_cookie(self, cookie: Any) -> None:
        pass


class _PreparedHeaders(Headers):
    """`Headers` taken as they are: canonical names, values already checked (`_fixed_headers`, a token
    matched by `_HEADER_TOKEN`, constants); values set later go through `Headers`' own checks.

    `Headers` canonicalises every name and scans every value for line breaks on
    each call; the transport's headers are the same few on every call.
    """

    __slots__ = ()

    def __init__(self, raw: dict[bytes, list[bytes]]) -> None:
        self._rawHeaders = raw


@implementer(IBodyProducer)
class _BytesBody:
    """A request body already in memory, written in one go."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> "Deferred[None]":
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _UpstreamClient(HTTPClient):
    """treq's `HTTPClient` over an `UpstreamAgent`, with a direct path for the transport's own calls.

    treq wraps its agent, on every request, in a cookie agent (parsing the URL
    again), a gzip decoder agent (copying the headers) and a hyperlink URL: none
    of it does anything for a homeserver that gets no cookies, follows no
    redirects and answers small JSON.  A call made the way `MatrixTransport.send`
    makes it -- an encoded URL as ``str``, `Headers`, bytes or no body, no
    redirects, unbuffered -- goes to the agent as it is; anything else takes
    treq's own path.
    """

    def request(self, method: str, url: Any, *, headers: Any = None, data: Any = None,
                allow_redirects: bool = True, unbuffered: bool = False, **kwargs: Any) -> "Deferred[Any]":
        if kwargs or allow_redirects or not unbuffered or type(url) is not str \
                or type(headers) not in (Headers, _PreparedHeaders) or not (data is None or type(data) is bytes):
            return super().request(method, url, headers=headers, data=data, allow_redirects=allow_redirects,
                                   unbuffered=unbuffered, **kwargs)
        body = None if data is None else _BytesBody(data)
        d: Deferred[Any] = self._agent.request(method.encode("ascii"), url.encode("ascii"), headers, body)
        return d.addCallback(_Response, self._cookiejar)


class _BodyCollector(Protocol):
    """Collects a response body up to a size limit; cancelling it aborts the connection."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self.finished: Deferred[bytes] = Deferred(lambda _d: self.abort())

    def abort(self) -> None:
        transport = self.transport
        if transport is None:
            return
        stop = getattr(transport, "abortConnection", None) or getattr(
            transport, "stopProducing", None
        )
        if stop is not None:
            stop()

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.abort()
            self.finished.errback(
                Failure(InvalidResponse(f"response body larger than {self._limit} bytes"))
            )
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._parts))
        else:
            self.finished.errback(reason)


class MatrixTransport:
    """Sends `MatrixRequest` values to one homeserver over a persistent connection pool."""

    def __init__(
        self,
        base_url: str,
        *,
        reactor: Any = None,
        timeout: float = 10.0,
        connect_timeout: float | None = None,
        max_connections_per_host: int = 8,
        http_client: HttpClientLike | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError("homeserver base URL must start with http:// or https://")
        if "?" in base_url or "#" in base_url:
            raise ValueError("homeserver base URL must not have a query or fragment")
        if timeout <= 0 or (connect_timeout is not None and connect_timeout <= 0):
            raise ValueError("timeout and connect_timeout must be positive")
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.base_url = _base_uri(base_url.rstrip("/"))
        self._scheme = self.base_url.split(":", 1)[0].encode("ascii")
        self.timeout = timeout
        self.connect_timeout = timeout if connect_timeout is None else min(connect_timeout, timeout)
        self._reactor = reactor
        self._max_response_bytes = max_response_bytes
        self._agent: UpstreamAgent | None = None
        if http_client is None:
            self._agent = UpstreamAgent(reactor, self.base_url, connect_timeout=self.connect_timeout,
                                        max_idle=max_connections_per_host)
            http_client = _UpstreamClient(cast(Any, self._agent), cookiejar=cast(Any, _NoCookies()),
                                          data_to_body_producer=_BytesBody)
        self._client: HttpClientLike = http_client
        #: Called with (seconds, answer or Failure) as each call ends (`comatrix.metrics`); None: off.
        self.on_answer: Callable[[float, Any], None] | None = None

    def request(self, req: MatrixRequest) -> "Deferred[tuple[int, dict[str, Any]]]":
        """Send ``req`` for the current device; fire with ``(status, json_object)`` on 2xx, else fail typed.

        Failures: `MatrixError` (non-2xx), `HomeserverUnreachable`,
        `HomeserverTimeout`, `InvalidResponse`.
        """
        return self.send(req, current_device())

    def send(self, req: MatrixRequest, device: Device | None) -> "Deferred[tuple[int, dict[str, Any]]]":
        """`request` for ``device`` (None: the gateway's own call), named by the caller.

        For a caller that sends later, from another context (a queue), than the one
        the call was asked for in.
        """
        url = req.url(self.base_url)
        raw_headers = {name: [value] for name, value in
                       _fixed_headers(req.binary_answer, _forwardable(device), self._scheme)}
        if req.access_token is not None:
            try:
                token = _token_bytes(req.access_token)
            except ValueError as e:
                return fail(e)
            raw_headers[b"Authorization"] = [b"Bearer " + token]
        data: bytes | None = None
        if req.body is not None and req.raw is None:
            data = json.dumps(req.body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
            raw_headers[b"Content-Type"] = [b"application/json"]
        elif req.raw is None and req.method in ("POST", "PUT"):
            data = b"{}"
            raw_headers[b"Content-Type"] = [b"application/json"]
        headers = _PreparedHeaders(raw_headers)
        if req.raw is not None:
            data = req.raw
            # A media type the device named: through Twisted's own checks (line breaks).
            headers.setRawHeaders(b"Content-Type", [(req.content_type or "application/octet-stream").encode("latin-1")])
        started = self._reactor.seconds()
        timed_out = False
        # Log the path template only: segments may be user-chosen but never secret.
        where = f"{req.method} /{'/'.join(req.path)}"

        d: Deferred[Any] = self._client.request(
            req.method,
            url,
            headers=headers,
            data=data,
            allow_redirects=False,
            unbuffered=True,
        )

        def on_timeout() -> None:
            nonlocal timed_out
            timed_out = True
            d.cancel()

        # An IDelayedCall; typed Any because mypy cannot see zope interfaces.
        timer: Any = self._reactor.callLater(self.timeout, on_timeout)

        def read(response: Any) -> "Deferred[tuple[int, dict[str, Any]]]":
            collector = _BodyCollector(self._max_response_bytes)
            response.deliverBody(collector)
            return collector.finished.addCallback(
                lambda raw: self._interpret(response, raw, req, where)
            )

        def translate(failure: Failure) -> Failure:
            elapsed = self._reactor.seconds() - started
            if failure.check(MatrixError, InvalidResponse, HomeserverTimeout, HomeserverUnreachable):
                return failure
            if not timed_out and _cancelled(failure):
                # The caller cancelled (e.g. shutdown): not a homeserver problem.
                return Failure(CancelledError())
            if timed_out:
                log.info("{where}: no answer within {timeout} s", where=where, timeout=self.timeout)
                return Failure(HomeserverTimeout(f"homeserver gave no answer within {self.timeout:g} s"))
            if failure.check(ierror.TimeoutError):
                # Only the connection attempt has a timeout of its own: nobody took the call.
                log.warn("{where}: homeserver took no connection within {timeout} s",
                         where=where, timeout=self.connect_timeout)
                return Failure(HomeserverUnreachable(
                    f"homeserver took no connection within {self.connect_timeout:g} s"))
            if failure.check(*_UNREACHABLE):
                reason = _describe(failure)
                log.warn("{where}: homeserver unreachable after {elapsed:.3f} s: {reason}",
                         where=where, elapsed=elapsed, reason=reason)
                return Failure(HomeserverUnreachable(f"homeserver unreachable: {reason}"))
            return failure

        on_answer = self.on_answer

        def finish(result: Any) -> Any:
            # One callback for every outcome: stop the deadline, type the failure, report.
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure):
                result = translate(result)
            if on_answer is not None:
                self._report(result, on_answer, started)
            return result

        d.addCallback(read)
        d.addBoth(finish)
        return d

    def _report(self, result: Any, on_answer: Callable[[float, Any], None], started: float) -> Any:
        try:
            on_answer(self._reactor.seconds() - started, result)
        except Exception:
            log.failure("on_answer hook raised")
        return result

    def _interpret(
        self, response: Any, raw: bytes, req: MatrixRequest, where: str
    ) -> tuple[int, dict[str, Any]]:
        status = int(response.code)
        if req.binary_answer and 200 <= status < 300:
            content_type = response.headers.getRawHeaders(b"Content-Type") or [b"application/octet-stream"]
            log.debug("{where} -> {status}, {size} bytes", where=where, status=status, size=len(raw))
            return status, {"content": raw, "content_type": content_type[0].decode("latin-1")}
        body = _decode_json(raw)
        if 200 <= status < 300:
            if body is None:
                if status == 204 or not raw.strip():
                    return status, {}
                if req.array_answer and _is_json_array(raw):
                    log.debug("{where} -> {status} (an array)", where=where, status=status)
                    # Only pass-through callers ask for it, and they hand the answer on unread.
                    return status, json.loads(raw)  # type: ignore[no-any-return]
                log.warn("{where}: {status} answer is not a JSON object", where=where, status=status)
                raise InvalidResponse(f"HTTP {status} answer is not a JSON object")
            log.debug("{where} -> {status}", where=where, status=status)
            return status, body
        retry_after = response.headers.getRawHeaders(b"Retry-After")
        err = MatrixError.from_response(
            status,
            body,
            retry_after_header=retry_after[0].decode("latin-1") if retry_after else None,
            now=self._reactor.seconds(),
            secrets=_secrets_of(req),
            fallback_message="" if body is not None else f"non-JSON HTTP {status} answer",
        )
        if status == 429:
            log.info("{where}: rate limited: {error}", where=where, error=str(err))
        elif status >= 500:
            log.warn("{where}: homeserver error: {error}", where=where, error=str(err))
        else:
            log.debug("{where}: {error}", where=where, error=str(err))
        raise err

    def close(self) -> "Deferred[None]":
        """Close the idle pooled connections (graceful shutdown)."""
        if self._agent is None:
            return succeed(None)
        return self._agent.close().addCallback(lambda _: None)


def _base_uri(base_url: str) -> str:
    """The homeserver URL as a URI: an internationalised host name IDNA-encoded, once.

    IP literals and ASCII names are left as they are (hyperlink's ``to_uri`` would
    reject an IPv6 literal: ``[fd00::1]`` is not a valid IDNA label).
    """
    url = EncodedURL.from_text(base_url)
    return url.to_text() if url.host.isascii() else url.to_uri().to_text()


@functools.lru_cache(maxsize=4096)  # pure, and asked on every call a device makes
def _fixed_headers(binary_answer: bool, address: bytes | None, scheme: bytes) -> tuple[tuple[bytes, bytes], ...]:
    """The headers of a call that do not depend on its token or body, as Twisted's `Headers` stores them.

    ``X-Forwarded-For`` names the device, so the homeserver's per-IP limits
    apply per device; with it goes ``X-Forwarded-Proto``, the scheme the
    gateway itself speaks to the homeserver (Synapse otherwise assumes https,
    and warns on every call).  The gateway's own calls (no device) carry neither.
    """
    headers = Headers()
    headers.addRawHeader(b"Accept", b"*/*" if binary_answer else b"application/json")
    headers.addRawHeader(b"User-Agent", _USER_AGENT)
    if address is not None:
        headers.addRawHeader(b"X-Forwarded-For", address)
        headers.addRawHeader(b"X-Forwarded-Proto", scheme)
    return tuple((name, value) for name, values in headers.getAllRawHeaders() for value in values)


def _forwardable(device: Device | None) -> bytes | None:
    """The device's address for a header: an IP literal without zone id, else nothing."""
    if device is None:
        return None
    return _forwardable_address(device.address)


@functools.lru_cache(maxsize=4096)  # pure, and asked on every call a device makes
def _forwardable_address(address: str) -> bytes | None:
    try:
        parsed = ipaddress.ip_address(plain_address(address))
    except ValueError:
        return None
    return str(parsed).encode("ascii")


def _token_bytes(token: str) -> bytes:
    # A header injection attempt or a garbled token must not reach the wire; the
    # message must not echo the token either.
    if _HEADER_TOKEN.fullmatch(token) is None:
        raise ValueError("access token contains characters not allowed in a header")
    return token.encode("ascii")


def _is_json_array(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw.decode("utf-8")), list)
    except (UnicodeDecodeError, ValueError):
        return False


def _decode_json(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _inner_failures(failure: Failure) -> list[Failure]:
    inner = getattr(failure.value, "reasons", None)
    return [f for f in inner if isinstance(f, Failure)] if isinstance(inner, list) else []


def _cancelled(failure: Failure) -> bool:
    return bool(failure.check(CancelledError, ierror.ConnectingCancelledError)) or any(
        f.check(CancelledError) for f in _inner_failures(failure)
    )


def _describe(failure: Failure) -> str:
    """A short, secret-free reason: the exception class names, inner ones first."""
    names = [type(f.value).__name__ for f in _inner_failures(failure)]
    names.append(type(failure.value).__name__)
    return "/".join(dict.fromkeys(names))
