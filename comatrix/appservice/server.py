"""The application-service API the homeserver calls (Application Service API v1), on twisted.web.

Served in the gateway's process and reactor, bound to ``[appservice] bind``
(loopback by default) and ``port``.  Every request must carry the
registration's ``hs_token`` as ``Authorization: Bearer``, compared in constant
time: none is 401 ``M_UNAUTHORIZED``, a wrong one 403 ``M_FORBIDDEN``.

* ``PUT /_matrix/app/v1/transactions/{txnId}``: new events, handed to the event
  stream; 200 ``{}`` once handled.  Idempotent by txnId (the stream keeps the
  last one).  A body that is not a JSON object with an ``events`` list is 400
  ``M_BAD_JSON``.
* ``GET /_matrix/app/v1/users/{userId}``: 200 ``{}`` for a provisioned device
  user, 404 otherwise (the gateway creates users only through ``comatrixctl``).
* ``GET /_matrix/app/v1/rooms/{alias}``: 404 (the gateway has no room namespace).
* ``POST /_matrix/app/v1/ping``: 200 ``{}`` (the homeserver's ping, MSC2659).

Anything else is 404 ``M_UNRECOGNIZED`` (405 for a known path with another method).
"""

from __future__ import annotations

import hmac
import json
from urllib.parse import unquote
from typing import Any, Callable

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.iweb import IRequest

from comatrix.appservice.stream import EventStream
from comatrix.logs import get_logger

log = get_logger(__name__)

__all__ = ["AppserviceResource", "MAX_TRANSACTION_BYTES"]

#: Largest transaction body accepted (Synapse sends at most 100 events and 100 ephemeral ones).
MAX_TRANSACTION_BYTES = 16 * 1024 * 1024

_PREFIX = (b"_matrix", b"app", b"v1")


class AppserviceResource(resource.Resource):
    """The whole ``/_matrix/app/v1`` tree as one leaf resource."""

    isLeaf = True

    def __init__(self, hs_token: str, stream: EventStream, is_device_user: Callable[[str], bool]) -> None:
        super().__init__()
        self._hs_token = hs_token.encode("utf-8")
        self._stream = stream
        self._is_device_user = is_device_user

    def render(self, request: IRequest) -> Any:
        segments = request.path.split(b"/")[1:]
        method = request.method.decode("ascii", "replace")
        denied = self._check_token(request)
        if denied is not None:
            return denied
        if tuple(segments[:3]) != _PREFIX or len(segments) < 4:
            return _error(request, 404, "M_UNRECOGNIZED", "unknown endpoint")
        kind, rest = segments[3], segments[4:]
        try:
            argument = unquote(rest[0].decode("ascii"), errors="strict") if rest else ""
        except UnicodeDecodeError:
            return _error(request, 400, "M_INVALID_PARAM", "path is not UTF-8")
        route = {(b"transactions", "PUT"): self._transaction, (b"users", "GET"): self._user,
                 (b"rooms", "GET"): self._room, (b"ping", "POST"): self._ping}.get((kind, method))
        if route is None:
            known = kind in (b"transactions", b"users", b"rooms", b"ping")
            return _error(request, 405 if known else 404, "M_UNRECOGNIZED",
                          "method not allowed" if known else "unknown endpoint")
        if kind != b"ping" and (len(rest) != 1 or not argument):
            return _error(request, 404, "M_UNRECOGNIZED", "unknown endpoint")
        return route(request, argument)

    def _check_token(self, request: IRequest) -> bytes | None:
        header = request.getHeader(b"authorization")
        if header is None:
            return _error(request, 401, "M_UNAUTHORIZED", "missing hs_token")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._hs_token):
            log.warn("Appservice request with a wrong hs_token from {peer}", peer=str(request.getClientAddress()))
            return _error(request, 403, "M_FORBIDDEN", "wrong hs_token")
        return None

    def _transaction(self, request: IRequest, txn_id: str) -> Any:
        raw = request.content.read(MAX_TRANSACTION_BYTES + 1)
        if len(raw) > MAX_TRANSACTION_BYTES:
            return _error(request, 413, "M_TOO_LARGE", "transaction too large")
        try:
            body = json.loads(raw)
        except ValueError:
            return _error(request, 400, "M_NOT_JSON", "body is not JSON")
        events = body.get("events") if isinstance(body, dict) else None
        if not isinstance(events, list):
            return _error(request, 400, "M_BAD_JSON", "events must be a list")
        handled = defer.ensureDeferred(self._stream.transaction(txn_id, events))
        handled.addCallbacks(lambda _fresh: _finish(request, 200, {}), lambda failure: _failed(request, failure))
        return server.NOT_DONE_YET

    def _user(self, request: IRequest, user_id: str) -> bytes:
        if self._is_device_user(user_id):
            return _json(request, 200, {})
        return _error(request, 404, "M_NOT_FOUND", "no such device user")

    def _room(self, request: IRequest, alias: str) -> bytes:
        return _error(request, 404, "M_NOT_FOUND", "the gateway provides no room aliases")

    def _ping(self, request: IRequest, _argument: str) -> bytes:
        log.info("Ping from the homeserver")
        return _json(request, 200, {})


def _json(request: IRequest, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body).encode("utf-8")


def _error(request: IRequest, status: int, errcode: str, message: str) -> bytes:
    return _json(request, status, {"errcode": errcode, "error": message})


def _finish(request: IRequest, status: int, body: Any) -> None:
    if getattr(request, "_disconnected", False):
        return
    request.write(_json(request, status, body))
    request.finish()


def _failed(request: IRequest, failure: Failure) -> None:
    # The homeserver retries the transaction: nothing it carried is lost.
    log.failure("Appservice transaction failed; the homeserver will retry it", failure)
    _finish(request, 500, {"errcode": "M_UNKNOWN", "error": "transaction not handled"})
