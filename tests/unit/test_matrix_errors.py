"""Unit tests of MatrixError and the secret scrubbing of comatrix.matrix.errors."""

from __future__ import annotations

import email.utils

import pytest

from comatrix.matrix.errors import (
    MAX_MESSAGE_CHARS,
    HomeserverError,
    HomeserverTimeout,
    HomeserverUnreachable,
    InvalidResponse,
    MatrixError,
    parse_retry_after,
    redact_secrets,
)

TOKEN = "syt_Ym9i_ToPsEcReTvAlUe_1x2y3z"
PASSWORD = "correct-horse-battery"


def test_fields_from_json_error() -> None:
    err = MatrixError.from_response(403, {"errcode": "M_FORBIDDEN", "error": "You are not invited"})
    assert (err.http_status, err.errcode, err.message) == (403, "M_FORBIDDEN", "You are not invited")
    assert err.retry_after is None and err.soft_logout is False
    assert str(err) == "HTTP 403 M_FORBIDDEN: You are not invited"


def test_retry_after_header_wins_over_body() -> None:
    body = {"errcode": "M_LIMIT_EXCEEDED", "error": "Too Many Requests", "retry_after_ms": 2500}
    assert MatrixError.from_response(429, body, retry_after_header="7").retry_after == 7.0
    assert MatrixError.from_response(429, body).retry_after == 2.5
    # An unparsable header falls back to the body.
    assert MatrixError.from_response(429, body, retry_after_header="soon").retry_after == 2.5


def test_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    header = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(header, now) == pytest.approx(30.0)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("-5", now) is None


@pytest.mark.parametrize("ms", ["100", None, True, float("nan")])
def test_retry_after_ms_must_be_a_number(ms: object) -> None:
    assert MatrixError.from_response(429, {"retry_after_ms": ms}).retry_after is None


def test_soft_logout() -> None:
    err = MatrixError.from_response(401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Token expired",
                                          "soft_logout": True})
    assert err.soft_logout and err.errcode == "M_UNKNOWN_TOKEN" and err.http_status == 401
    assert not MatrixError.from_response(401, {"errcode": "M_UNKNOWN_TOKEN",
                                               "soft_logout": "yes"}).soft_logout


def test_non_json_error_keeps_status() -> None:
    err = MatrixError.from_response(502, None, fallback_message="non-JSON HTTP 502 answer")
    assert err.errcode is None and err.http_status == 502
    assert str(err) == "HTTP 502: non-JSON HTTP 502 answer"


def test_message_is_truncated() -> None:
    err = MatrixError(400, "M_UNKNOWN", "x" * 5000)
    assert len(err.message) <= MAX_MESSAGE_CHARS
    assert len(str(err)) < MAX_MESSAGE_CHARS + 40


def test_secrets_never_in_str_or_repr() -> None:
    # A homeserver (or a proxy) echoing credentials in its error text.
    text = f"bad token {TOKEN} for password {PASSWORD}; Authorization: Bearer abc.def"
    err = MatrixError.from_response(400, {"errcode": "M_BAD_JSON", "error": text},
                                    secrets=[TOKEN, PASSWORD])
    for shown in (str(err), repr(err), str(err.args), err.message):
        assert TOKEN not in shown and PASSWORD not in shown and "abc.def" not in shown
    # Token-shaped strings are scrubbed even when the secret is not known.
    assert TOKEN not in str(MatrixError(400, None, f"echo {TOKEN}"))


def test_redact_secrets_ignores_trivially_short_secrets() -> None:
    assert redact_secrets("a b c", ["a", ""]) == "a b c"
    assert redact_secrets("x access_token=abc&y=1") == "x <redacted>&y=1"


def test_error_hierarchy() -> None:
    for cls in (MatrixError, HomeserverUnreachable, HomeserverTimeout, InvalidResponse):
        assert issubclass(cls, HomeserverError)
