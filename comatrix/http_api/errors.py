"""The HTTP API's errors and the one place Matrix and gateway errors become HTTP answers.

Every error answer has the spec's shape ``{"error": CODE, "message": text}``.
A homeserver refusal keeps its HTTP status and errcode; a homeserver that
cannot be reached is 502, one that does not answer in time 504, a rate limit
429 with ``Retry-After``; anything unexpected is 500 ``INTERNAL_ERROR`` with
the traceback in the log, never in the answer.
"""

from __future__ import annotations

import math
from typing import Any

from comatrix.coap.errors import CoapError
from comatrix.matrix.errors import HomeserverTimeout, HomeserverUnreachable, InvalidResponse, MatrixError

__all__ = ["ApiError", "answer_for"]

#: Longest message text passed on (the homeserver's own text included).
MAX_MESSAGE = 200


class ApiError(Exception):
    """An error the API answers itself: status, spec error code, short message."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


def answer_for(error: BaseException) -> tuple[int, dict[str, Any], dict[str, str]] | None:
    """(status, body, headers) for a known error; None for one that is our bug (500, logged)."""
    if isinstance(error, ApiError):
        return _answer(error.status, error.code, error.message, error.retry_after)
    if isinstance(error, MatrixError):
        status = error.http_status if 400 <= error.http_status < 500 else 502
        return _answer(status, error.errcode or "M_UNKNOWN", error.message, error.retry_after)
    if isinstance(error, HomeserverTimeout):
        return _answer(504, "M_UNKNOWN", "the homeserver did not answer in time")
    if isinstance(error, (HomeserverUnreachable, InvalidResponse)):
        return _answer(502, "M_UNKNOWN", str(error))
    if isinstance(error, CoapError):
        # The gateway's own refusals (its limits, its policy): CoAP 4.29 is HTTP 429, 5.03 is 503, ...
        status = (int(error.code) >> 5) * 100 + (int(error.code) & 0x1F)
        code = {429: "M_LIMIT_EXCEEDED", 403: "M_FORBIDDEN", 404: "M_NOT_FOUND", 400: "M_BAD_JSON"}.get(
            status, "M_UNKNOWN")
        return _answer(status, code, error.diagnostic, error.max_age if status in (429, 503) else None)
    return None


def _answer(status: int, code: str, message: str,
            retry_after: float | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after else {}
    return status, {"error": code, "message": message[:MAX_MESSAGE]}, headers
