"""The HTTP API on twisted.web: authentication, per-service rate limits, bodies, dispatch, error answers.

Bound to ``[http_api] bind`` (loopback by default) and ``port`` (7003), in the
gateway's process and reactor.  Every request but the OpenAPI document must
carry ``X-Internal-Service-Token``: it is compared in constant time with every
service's token (no early exit, so the time says nothing about which or how
much matched); none or a wrong one is 401 and nothing reaches the homeserver.
Each service has its own token bucket (``rate``/``burst`` of its entry): over
it, 429 with ``Retry-After``.  Bodies are JSON objects (multipart/form-data for
uploads), at most ``max_body_bytes``.
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Sequence
from urllib.parse import unquote

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.iweb import IRequest

from comatrix.config import HttpApiSettings, ServiceCredentials
from comatrix.http_api.endpoints import Call, Endpoints
from comatrix.http_api.errors import ApiError, answer_for
from comatrix.http_api.routes import PREFIX, Route, match
from comatrix.logs import get_logger
from comatrix.ratelimit import TokenBucket

log = get_logger(__name__)

__all__ = ["InternalApi", "TOKEN_HEADER"]

TOKEN_HEADER = b"x-internal-service-token"


class InternalApi(resource.Resource):
    """``/internal/matrix/...`` as one leaf resource."""

    isLeaf = True

    def __init__(self, services: Sequence[ServiceCredentials], endpoints: Endpoints,
                 settings: HttpApiSettings, clock: Any, metrics: Any = None) -> None:
        """``metrics``: counts each answer as form ``http_api`` (`comatrix.metrics.Metrics`), or None."""
        super().__init__()
        self._metrics = metrics
        self._services = [(service.token.encode("utf-8"), service) for service in services]
        self._endpoints = endpoints
        self._settings = settings
        self._clock = clock
        self._buckets = {service.name: TokenBucket(service.rate, service.burst, clock.seconds())
                         for service in services if service.rate > 0}

    def render(self, request: IRequest) -> Any:
        started = self._clock.seconds()
        try:
            route, call = self._prepare(request)
        except ApiError as error:
            self._count("other", error.status, started)
            return _answer(request, error)
        handler = getattr(self._endpoints, route.handler)
        running = defer.ensureDeferred(handler(call))
        running.addCallbacks(lambda body: _finish(request, 200, body, {}),
                             lambda failure: _failed(request, failure, route))
        running.addBoth(lambda status: self._count(route.path, status, started))
        return server.NOT_DONE_YET

    def _count(self, resource: str, status: Any, started: float) -> None:
        if self._metrics is not None and isinstance(status, int):
            self._metrics.request(resource, "http_api", str(status), self._clock.seconds() - started)

    def _prepare(self, request: IRequest) -> tuple[Route, Call]:
        segments = tuple(unquote(segment.decode("ascii", "replace")) for segment in request.path.split(b"/")[1:])
        if segments[:2] != PREFIX:
            raise ApiError(404, "M_UNRECOGNIZED", "unknown endpoint")
        method = request.method.decode("ascii", "replace")
        route, params, other_method = match(method, segments[2:])
        if route is None:
            raise ApiError(405 if other_method else 404, "M_UNRECOGNIZED",
                           "method not allowed" if other_method else "unknown endpoint")
        service = self._authenticate(request) if route.handler != "openapi" else None
        if service is not None:
            self._admit(service)
        raw = request.content.read(self._settings.max_body_bytes + 1) if request.content is not None else b""
        if len(raw) > self._settings.max_body_bytes:
            raise ApiError(413, "M_TOO_LARGE", f"body larger than {self._settings.max_body_bytes} bytes")
        content_type = (request.getHeader(b"content-type") or b"").decode("latin-1")
        body: Any = {}
        if route.request is not None:
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                raise ApiError(400, "M_NOT_JSON", "body is not JSON") from None
            if not isinstance(body, dict):
                raise ApiError(400, "M_BAD_JSON", "body must be a JSON object")
        query = {key.decode("utf-8", "replace"): values[-1].decode("utf-8", "replace")
                 for key, values in (request.args or {}).items() if values and not route.multipart}
        placeholder = ServiceCredentials(name="-", token="-", user="@-:-")
        return route, Call(service or placeholder, params, query, body, content_type, raw)

    def _authenticate(self, request: IRequest) -> ServiceCredentials:
        given = request.getHeader(TOKEN_HEADER)
        found = None
        for token, service in self._services:  # every comparison is made: no early exit
            if given is not None and hmac.compare_digest(given, token):
                found = service
        if found is None:
            log.info("HTTP API: {what} service token from {peer}", what="no" if given is None else "a wrong",
                     peer=str(request.getClientAddress()))
            raise ApiError(401, "M_UNAUTHORIZED", "missing or wrong X-Internal-Service-Token")
        return found

    def _admit(self, service: ServiceCredentials) -> None:
        bucket = self._buckets.get(service.name)
        if bucket is None:
            return
        now = self._clock.seconds()
        wait = bucket.wait(now)
        if wait > 0:
            raise ApiError(429, "M_LIMIT_EXCEEDED", "too many requests from this service", retry_after=wait)
        bucket.take(now)


def _answer(request: IRequest, error: ApiError) -> bytes:
    answer = answer_for(error)
    assert answer is not None
    status, body, headers = answer
    return _encode(request, status, body, headers)


def _encode(request: IRequest, status: int, body: Any, headers: dict[str, str]) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    for name, value in headers.items():
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


def _finish(request: IRequest, status: int, body: Any, headers: dict[str, str]) -> int:
    """Answer (unless the client went away); the status, for the metrics."""
    if not getattr(request, "_disconnected", False):
        request.write(_encode(request, status, body, headers))
        request.finish()
    return status


def _failed(request: IRequest, failure: Failure, route: Route) -> int:
    answer = answer_for(failure.value)
    if answer is None:
        log.failure("HTTP API {method} {path} failed", failure, method=route.method, path=route.path)
        answer = (500, {"error": "INTERNAL_ERROR", "message": "internal error"}, {})
    return _finish(request, *answer)
