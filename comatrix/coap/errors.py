"""Exceptions that carry their own CoAP response, and the default error adapter.

A resource raises (or fails its Deferred with) a `CoapError`; the CoAP layer
turns every failure into exactly one response by calling the site's error
adapter.  The default adapter here knows only CoAP; the gateway installs its own
(``comatrix.errors.error_response``) which maps Matrix failures first.
"""

from __future__ import annotations

from typing import Callable


from twisted.python.failure import Failure

from comatrix.logs import get_logger
from comatrix.coap.message import Response
from comatrix.coap.numbers import Code, ContentFormat, OptionNumber

log = get_logger(__name__)

#: Turns any failure of a resource into the one response the peer gets.
ErrorAdapter = Callable[[Failure], Response]

#: Diagnostics are for humans debugging devices; keep them short on air.
MAX_DIAGNOSTIC_BYTES = 64


class CoapError(Exception):
    """An error that is answered with ``code`` and a short text/plain diagnostic."""

    code: Code = Code.INTERNAL_SERVER_ERROR

    def __init__(self, diagnostic: str = "", *, max_age: int | None = None,
                 extra_options: tuple[tuple[int, bytes], ...] = ()) -> None:
        super().__init__(diagnostic)
        self.diagnostic = diagnostic
        self.max_age = max_age
        self.extra_options = extra_options

    def to_response(self) -> Response:
        payload = self.diagnostic.encode("utf-8")[:MAX_DIAGNOSTIC_BYTES]
        return Response(
            code=self.code,
            payload=payload,
            content_format=ContentFormat.TEXT_PLAIN if payload else None,
            max_age=self.max_age,
            extra_options=self.extra_options,
        )


class BadRequest(CoapError):
    code = Code.BAD_REQUEST


class Unauthorized(CoapError):
    code = Code.UNAUTHORIZED


class BadOption(CoapError):
    code = Code.BAD_OPTION


class Forbidden(CoapError):
    code = Code.FORBIDDEN


class NotFound(CoapError):
    code = Code.NOT_FOUND


class MethodNotAllowed(CoapError):
    code = Code.METHOD_NOT_ALLOWED


class NotAcceptable(CoapError):
    code = Code.NOT_ACCEPTABLE


class RequestEntityIncomplete(CoapError):
    code = Code.REQUEST_ENTITY_INCOMPLETE


class Conflict(CoapError):
    code = Code.CONFLICT


class PreconditionFailed(CoapError):
    code = Code.PRECONDITION_FAILED


class RequestEntityTooLarge(CoapError):
    code = Code.REQUEST_ENTITY_TOO_LARGE

    def __init__(self, diagnostic: str = "too large", *, size1: int | None = None) -> None:
        extra = ((OptionNumber.SIZE1, encode_uint(size1)),) if size1 is not None else ()
        super().__init__(diagnostic, extra_options=extra)


class UnsupportedContentFormat(CoapError):
    code = Code.UNSUPPORTED_CONTENT_FORMAT


class UnprocessableEntity(CoapError):
    code = Code.UNPROCESSABLE_ENTITY


class TooManyRequests(CoapError):
    """RFC 8516: the retry delay goes into Max-Age."""

    code = Code.TOO_MANY_REQUESTS

    def __init__(self, diagnostic: str = "rate limited", *, retry_after: int = 1) -> None:
        super().__init__(diagnostic, max_age=max(1, retry_after))


class InternalServerError(CoapError):
    code = Code.INTERNAL_SERVER_ERROR


class NotImplementedCoap(CoapError):
    code = Code.NOT_IMPLEMENTED


class BadGateway(CoapError):
    code = Code.BAD_GATEWAY


class ServiceUnavailable(CoapError):
    code = Code.SERVICE_UNAVAILABLE


class GatewayTimeout(CoapError):
    code = Code.GATEWAY_TIMEOUT


class ProxyingNotSupported(CoapError):
    code = Code.PROXYING_NOT_SUPPORTED


def encode_uint(value: int) -> bytes:
    """CoAP uint option encoding: big-endian, no leading zero bytes (0 -> b"")."""
    if value < 0:
        raise ValueError("uint option values are non-negative")
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def decode_uint(raw: bytes) -> int:
    return int.from_bytes(raw, "big") if raw else 0


def default_error_adapter(failure: Failure) -> Response:
    """CoapError -> its own response; anything else -> 5.00, traceback to the log only."""
    if failure.check(CoapError):
        return failure.value.to_response()  # type: ignore[union-attr]
    log.failure("Unexpected error while handling a request", failure)
    return InternalServerError("internal error").to_response()

