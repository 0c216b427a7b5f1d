"""Typed failures of the Matrix layer, and the helpers that keep secrets out of them.

Every way a homeserver call can fail ends as one of these exceptions, so the
gateway's single error adapter can map them to CoAP codes (facts §4):

* `MatrixError` -- the homeserver answered with a non-2xx status.  Carries the
  Matrix ``errcode``, the HTTP status, ``retry_after`` (seconds) for 429 and
  ``soft_logout`` for 401 ``M_UNKNOWN_TOKEN``.  A non-2xx answer that is not
  JSON (an HTML 502 page from a reverse proxy, say) is still a `MatrixError`
  with ``errcode=None``: its HTTP status is the useful fact (502 -> 5.02,
  503 -> 5.03, 429 with ``Retry-After`` -> 4.29).
* `HomeserverUnreachable` -- connection refused/reset, DNS or TLS failure (-> 5.02).
* `HomeserverTimeout` -- no complete answer within the deadline (-> 5.04).
* `InvalidResponse` -- a 2xx answer we do not understand (-> 5.02).
* `InvalidRoomReference` -- the caller gave something that is neither a room
  id nor an alias; a bad request, not a homeserver problem.

No exception here ever includes an access token or password in ``str()`` or
``repr()``: messages from the homeserver are scrubbed and truncated.
"""

from __future__ import annotations

import email.utils
import math
import re
from typing import Any, Iterable, Mapping

__all__ = [
    "HomeserverError",
    "HomeserverTimeout",
    "HomeserverUnreachable",
    "InvalidResponse",
    "InvalidRoomReference",
    "MatrixError",
    "MAX_MESSAGE_CHARS",
    "parse_retry_after",
    "redact_secrets",
]

#: Matrix error texts are for humans; keep them short in logs and diagnostics.
MAX_MESSAGE_CHARS = 200

REDACTED = "<redacted>"

# Token-shaped strings a homeserver (or a proxy echoing a request) might put in
# an error text: Synapse access/refresh tokens, and bearer credentials.
_TOKEN_PATTERNS = re.compile(
    r"(syt_[A-Za-z0-9_\-]+|syr_[A-Za-z0-9_\-]+|(?i:bearer)\s+\S+|access_token=[^&\s]+)"
)


def redact_secrets(text: str, secrets: Iterable[str] = ()) -> str:
    """Return ``text`` with every known secret and every token-shaped string replaced."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    return _TOKEN_PATTERNS.sub(REDACTED, text)


def _truncate(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Parse an HTTP ``Retry-After`` value into seconds from ``now``.

    Accepts delta-seconds and HTTP-dates (RFC 9110 §10.2.3); anything else is
    ignored (None).  Dates in the past give 0.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:  # pragma: no cover - older Pythons returned None
        return None
    return max(0.0, when.timestamp() - now)


class HomeserverError(Exception):
    """Base class of every failure talking to the homeserver."""


class MatrixError(HomeserverError):
    """The homeserver answered with a non-2xx HTTP status."""

    errcode: str | None
    http_status: int
    message: str
    retry_after: float | None
    soft_logout: bool

    def __init__(
        self,
        http_status: int,
        errcode: str | None = None,
        message: str = "",
        *,
        retry_after: float | None = None,
        soft_logout: bool = False,
        body: Mapping[str, Any] | None = None,
        secrets: Iterable[str] = (),
    ) -> None:
        self.http_status = http_status
        self.errcode = errcode
        self.message = _truncate(redact_secrets(message, secrets))
        self.retry_after = retry_after
        self.soft_logout = soft_logout
        # The full JSON answer, for callers that need more than errcode (the
        # register flow reads `flows` and `session` from a 401).  Never shown.
        self.body: Mapping[str, Any] = dict(body) if body else {}
        super().__init__(str(self))

    @classmethod
    def from_response(
        cls,
        http_status: int,
        body: Mapping[str, Any] | None,
        *,
        retry_after_header: str | None = None,
        now: float = 0.0,
        secrets: Iterable[str] = (),
        fallback_message: str = "",
    ) -> "MatrixError":
        """Build the error for a non-2xx answer (``body`` None if it was not JSON).

        ``Retry-After`` wins over ``retry_after_ms`` (facts §5).
        """
        body = body or {}
        errcode = body.get("errcode")
        if not isinstance(errcode, str):
            errcode = None
        message = body.get("error")
        if not isinstance(message, str):
            message = fallback_message
        retry_after = parse_retry_after(retry_after_header, now)
        if retry_after is None:
            ms = body.get("retry_after_ms")
            if isinstance(ms, (int, float)) and not isinstance(ms, bool) and math.isfinite(ms):
                retry_after = max(0.0, ms / 1000.0)
        soft_logout = body.get("soft_logout") is True
        return cls(
            http_status,
            errcode,
            message,
            retry_after=retry_after,
            soft_logout=soft_logout,
            body=body,
            secrets=secrets,
        )

    def __str__(self) -> str:
        parts = [f"HTTP {self.http_status}"]
        if self.errcode:
            parts.append(self.errcode)
        text = " ".join(parts)
        if self.message:
            text += f": {self.message}"
        if self.retry_after is not None:
            text += f" (retry after {self.retry_after:g} s)"
        return text

    def __repr__(self) -> str:
        return (
            f"MatrixError(http_status={self.http_status!r}, errcode={self.errcode!r}, "
            f"message={self.message!r}, retry_after={self.retry_after!r}, "
            f"soft_logout={self.soft_logout!r})"
        )


class HomeserverUnreachable(HomeserverError):
    """No usable connection to the homeserver: refused, reset, DNS, TLS."""


class HomeserverTimeout(HomeserverError):
    """The homeserver did not answer completely within the deadline."""


class InvalidResponse(HomeserverError):
    """The homeserver answered 2xx with something we do not understand."""


class InvalidRoomReference(ValueError):
    """A room reference that is neither a room id (``!…``) nor an alias (``#…:…``)."""
