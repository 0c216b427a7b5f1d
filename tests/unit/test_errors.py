"""The one error adapter: every failure -> one CoAP response (facts §4)."""

from __future__ import annotations

import pytest
from twisted.python.failure import Failure

from comatrix.coap.errors import NotAcceptable, TooManyRequests
from comatrix.coap.numbers import Code, ContentFormat
from comatrix.codec.cbor import CodecError
from comatrix.errors import HTTP_ERROR_TO_COAP, coap_code_for_http_error, error_response
from comatrix.matrix.errors import HomeserverTimeout, HomeserverUnreachable, InvalidResponse, MatrixError


def adapt(exc: BaseException):
    try:
        raise exc
    except BaseException:
        return error_response(Failure())


@pytest.mark.parametrize("error, code, diagnostic", [
    (MatrixError(403, "M_FORBIDDEN", "You are not invited"), Code.FORBIDDEN,
     b"M_FORBIDDEN: You are not invited"),
    (MatrixError(404, "M_NOT_FOUND"), Code.NOT_FOUND, b"M_NOT_FOUND"),
    (MatrixError(401, "M_UNKNOWN_TOKEN"), Code.UNAUTHORIZED, b"M_UNKNOWN_TOKEN"),
    (MatrixError(400, "M_USER_IN_USE"), Code.BAD_REQUEST, b"M_USER_IN_USE"),
    (MatrixError(400, "M_INVALID_USERNAME"), Code.BAD_REQUEST, b"M_INVALID_USERNAME"),
    (MatrixError(502, None, "<html>"), Code.BAD_GATEWAY, b"HTTP 502"),
    (MatrixError(418, None), Code.BAD_REQUEST, b"HTTP 418"),
    (MatrixError(599, None), Code.BAD_GATEWAY, b"HTTP 599"),
    (HomeserverUnreachable("refused"), Code.BAD_GATEWAY, b"homeserver unreachable"),
    (HomeserverTimeout("slow"), Code.GATEWAY_TIMEOUT, b"homeserver timeout"),
    (InvalidResponse("garbage"), Code.BAD_GATEWAY, b"bad homeserver answer"),
    (CodecError("missing body"), Code.BAD_REQUEST, b"missing body"),
    (NotAcceptable("cbor only"), Code.NOT_ACCEPTABLE, b"cbor only"),
])
def test_mapping(error: BaseException, code: Code, diagnostic: bytes) -> None:
    response = adapt(error)
    assert response.code == code
    assert response.payload == diagnostic
    assert response.content_format == ContentFormat.TEXT_PLAIN


def test_rate_limit_carries_max_age_rounded_up() -> None:
    response = adapt(MatrixError(429, "M_LIMIT_EXCEEDED", retry_after=2.2))
    assert (response.code, response.max_age) == (Code.TOO_MANY_REQUESTS, 3)
    assert adapt(MatrixError(429, None)).max_age == 1
    assert adapt(TooManyRequests(retry_after=7)).max_age == 7


def test_unexpected_error_is_500_without_details() -> None:
    response = adapt(KeyError("syt_secret_token_value"))
    assert response.code == Code.INTERNAL_SERVER_ERROR
    assert b"syt_" not in response.payload


def test_status_table_follows_facts() -> None:
    assert HTTP_ERROR_TO_COAP[429] == Code.TOO_MANY_REQUESTS
    assert coap_code_for_http_error(504) == Code.GATEWAY_TIMEOUT
    assert coap_code_for_http_error(451) == Code.BAD_REQUEST
