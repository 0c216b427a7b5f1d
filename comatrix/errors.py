"""The one error adapter: every failure of a request becomes one CoAP response here.

Order of precedence: errors that already carry a CoAP response (`CoapError`),
body/path problems from the codecs (4.00), Matrix answers (by errcode, then by
HTTP status, facts §4), homeserver trouble (5.02 / 5.04), and anything else
5.00 with the traceback in the log only.  Diagnostics are short and never contain
secrets.  For Matrix errors they are the errcode and the homeserver's own ``error``
text (``M_FORBIDDEN: Invalid username or password``), cut to fit: 64 bytes
(`MAX_DIAGNOSTIC_BYTES`), or less where a profile's response budget says so (the
compact profile's `COMPACT_DIAGNOSTIC_BYTES`).  The text was scrubbed of the
request's secrets and of token-shaped strings when the `MatrixError` was built.
"""

from __future__ import annotations

import math
from typing import Mapping


from twisted.python.failure import Failure

from comatrix.logs import get_logger
from comatrix.coap.errors import MAX_DIAGNOSTIC_BYTES, CoapError, default_error_adapter
from comatrix.coap.message import Response
from comatrix.coap.numbers import Code, ContentFormat
from comatrix.codec.cbor import CodecError
from comatrix.codec.msc3079 import UnknownPath
from comatrix.matrix.errors import (HomeserverTimeout, HomeserverUnreachable, InvalidResponse,
                                    InvalidRoomReference, MatrixError)

log = get_logger(__name__)

#: HTTP status of a homeserver error -> CoAP response code (facts §4, RFC 7252 §10.1, RFC 8516).
HTTP_ERROR_TO_COAP: Mapping[int, Code] = {
    400: Code.BAD_REQUEST,
    401: Code.UNAUTHORIZED,
    403: Code.FORBIDDEN,
    404: Code.NOT_FOUND,
    405: Code.METHOD_NOT_ALLOWED,
    406: Code.NOT_ACCEPTABLE,
    409: Code.CONFLICT,
    412: Code.PRECONDITION_FAILED,
    413: Code.REQUEST_ENTITY_TOO_LARGE,
    415: Code.UNSUPPORTED_CONTENT_FORMAT,
    422: Code.UNPROCESSABLE_ENTITY,
    429: Code.TOO_MANY_REQUESTS,
    500: Code.INTERNAL_SERVER_ERROR,
    501: Code.NOT_IMPLEMENTED,
    502: Code.BAD_GATEWAY,
    503: Code.SERVICE_UNAVAILABLE,
    504: Code.GATEWAY_TIMEOUT,
}

#: Matrix errcodes whose meaning is clearer than the HTTP status they come with.
ERRCODE_TO_COAP: Mapping[str, Code] = {
    "M_UNKNOWN_TOKEN": Code.UNAUTHORIZED,
    "M_MISSING_TOKEN": Code.UNAUTHORIZED,
    "M_FORBIDDEN": Code.FORBIDDEN,
    "M_NOT_FOUND": Code.NOT_FOUND,
    "M_USER_IN_USE": Code.BAD_REQUEST,
    "M_INVALID_USERNAME": Code.BAD_REQUEST,
    "M_EXCLUSIVE": Code.BAD_REQUEST,
    "M_BAD_JSON": Code.BAD_REQUEST,
    "M_NOT_JSON": Code.BAD_REQUEST,
    "M_LIMIT_EXCEEDED": Code.TOO_MANY_REQUESTS,
    "M_TOO_LARGE": Code.REQUEST_ENTITY_TOO_LARGE,
}


def coap_code_for_http_error(status: int) -> Code:
    """Any non-2xx HTTP status -> CoAP code (other 4xx -> 4.00, other 5xx/unknown -> 5.02)."""
    if status in HTTP_ERROR_TO_COAP:
        return HTTP_ERROR_TO_COAP[status]
    return Code.BAD_REQUEST if 400 <= status < 500 else Code.BAD_GATEWAY


#: The compact profile's error diagnostics: with a 4-byte header, an 8-byte token, the
#: Content-Format option and the payload marker, an error datagram stays within the
#: profile's 64-byte response budget (``docs/protocol.rst``).
COMPACT_DIAGNOSTIC_BYTES = 48


def shorten(text: str, limit: int = MAX_DIAGNOSTIC_BYTES) -> bytes:
    """``text`` as UTF-8 of at most ``limit`` bytes, never cutting a character in half."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore").encode("utf-8")


def matrix_diagnostic(error: MatrixError) -> str:
    """``ERRCODE: homeserver's text`` (or the HTTP status when the answer had no errcode)."""
    label = error.errcode or f"HTTP {error.http_status}"
    # A non-JSON answer's "text" is a proxy's HTML page: the status says more.
    return f"{label}: {error.message}" if error.errcode and error.message else label


def matrix_error_response(error: MatrixError, limit: int = MAX_DIAGNOSTIC_BYTES) -> Response:
    code = ERRCODE_TO_COAP.get(error.errcode or "") or coap_code_for_http_error(error.http_status)
    max_age = None
    if code == Code.TOO_MANY_REQUESTS:
        max_age = max(1, math.ceil(error.retry_after)) if error.retry_after else 1
    return Response(code=code, payload=shorten(matrix_diagnostic(error), limit),
                    content_format=ContentFormat.TEXT_PLAIN, max_age=max_age)


def _text(code: Code, diagnostic: str) -> Response:
    return Response(code=code, payload=shorten(diagnostic), content_format=ContentFormat.TEXT_PLAIN)


def error_response(failure: Failure) -> Response:
    """The gateway's error adapter (installed on the CoAP site)."""
    if failure.check(CoapError):
        return failure.value.to_response()  # type: ignore[union-attr]
    if failure.check(CodecError, UnknownPath, InvalidRoomReference):
        return _text(Code.BAD_REQUEST, str(failure.value))
    if failure.check(MatrixError):
        return matrix_error_response(failure.value)  # type: ignore[arg-type]
    if failure.check(HomeserverUnreachable):
        log.warn("Homeserver unreachable: {reason}", reason=type(failure.value).__name__)
        return _text(Code.BAD_GATEWAY, "homeserver unreachable")
    if failure.check(HomeserverTimeout):
        log.warn("Homeserver did not answer in time")
        return _text(Code.GATEWAY_TIMEOUT, "homeserver timeout")
    if failure.check(InvalidResponse):
        log.warn("Homeserver answer not understood")
        return _text(Code.BAD_GATEWAY, "bad homeserver answer")
    return default_error_adapter(failure)
