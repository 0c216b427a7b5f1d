"""Pure MSC3079 translation: paths, integer keys, success codes (no I/O).

Paths: a full ``/_matrix/client/<version>/...`` path or a one-character path
code (``comatrix.codec.msc3079.PATH_CODES``) becomes the homeserver path.  The
endpoints of the code table are sent to today's ``v3``; other full paths keep
their version except ``r0``, which became ``v3``.  Media stays on HTTP, and
nothing outside ``/_matrix/client`` is ever forwarded.

Keys: request bodies may use the integer keys of the table the client speaks
(MSC3079 Appendix A); they are replaced by names at every nesting level, a
string key winning over its integer form.  An integer key the table does not
know cannot be expressed in JSON without changing its meaning (``"8"`` must
stay literal), so it is refused, as are keys and values JSON cannot carry:
byte strings, tags, non-finite numbers, text that is not Unicode (lone
surrogates, which a JSON body can escape), and integers beyond ``±2**53``,
which JSON peers parsing numbers as IEEE doubles would change (RFC 8259 §6;
homeservers refuse them in events anyway: canonical JSON stops at 2**53 - 1).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping
from urllib.parse import quote

from comatrix.coap.errors import BadRequest, NotFound
from comatrix.coap.numbers import Code
from comatrix.codec.cbor import CodecError
from comatrix.codec.msc3079 import (KEY_TABLE_V1_REVERSE, KEY_TABLES, PATH_CODES, UnknownPath,
                                    keys_to_names, names_to_keys, parse_matrix_path)

__all__ = ["Target", "map_path", "with_txn_id", "json_from_request", "uses_integer_keys", "keys_for_client",
           "success_code", "KNOWN_KEY_TABLE", "CLIENT_API_VERSIONS", "MAX_JSON_INTEGER", "sync_is_empty"]

#: The highest key-table version this gateway knows (tables only ever add keys).
KNOWN_KEY_TABLE = max(KEY_TABLES)
#: API versions accepted in full paths.
CLIENT_API_VERSIONS = frozenset({"r0", "v3", "v1", "unstable"})
#: Largest integer magnitude passed on in a JSON body: up to it, every integer is exact as a double.
MAX_JSON_INTEGER = 2**53
#: Endpoints that take no access token: a sticky token is not attached to them
#: (Synapse reads a token on /register as an application service's).
_NO_AUTH = frozenset({"versions", "login", "register"})


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a request goes on the homeserver."""

    segments: tuple[str, ...]          # the full HTTP path, unescaped
    endpoint: tuple[str, ...] | None   # the code-table template when the endpoint is in it
    code: str | None = None            # the path code, for the code-table endpoints

    @property
    def is_versions(self) -> bool:
        return self.segments == ("_matrix", "client", "versions")

    @property
    def is_sync(self) -> bool:
        return self.endpoint == PATH_CODES["7"]

    @property
    def is_logout(self) -> bool:
        return self.segments[3:4] == ("logout",)

    @property
    def takes_token(self) -> bool:
        return self.segments[2:3] != ("versions",) and self.segments[3:4] not in {(name,) for name in _NO_AUTH}


def with_txn_id(target: Target, scope: Callable[[str], str]) -> Target:
    """``target`` with its ``{txnId}`` path parameter passed through ``scope`` (if it has one)."""
    if target.endpoint is None or "{txnId}" not in target.endpoint:
        return target
    index = len(target.segments) - len(target.endpoint) + target.endpoint.index("{txnId}")
    segments = target.segments[:index] + (scope(target.segments[index]),) + target.segments[index + 1:]
    return dataclasses.replace(target, segments=segments)


def _joined(segments: tuple[str, ...]) -> str:
    return "/" + "/".join(quote(segment, safe="") for segment in segments)


#: The CoAP paths of ``/versions`` (path code and full path): answered without a token, so the
#: CoAP layer rate-limits them per address like ``/.well-known/core``.
VERSIONS_PATHS: tuple[tuple[str, ...], ...] = (("0",), ("_matrix", "client", "versions"))


def map_path(path: tuple[str, ...]) -> Target:
    """The homeserver target of a CoAP Uri-Path; `NotFound` / `BadRequest` otherwise."""
    if any(segment in ("", ".", "..") for segment in path):
        raise BadRequest("empty or dot path segment")
    if not path:
        raise NotFound("no Matrix path")
    if path[0] == "_matrix":
        if path[1:2] == ("media",) or path[3:4] == ("media",):
            raise NotFound("media is HTTP only")
        if path[1:2] != ("client",):
            raise NotFound("only /_matrix/client")
        if path[2:] == ("versions",):
            return Target(("_matrix", "client", "versions"), PATH_CODES["0"], "0")
        if len(path) < 4 or path[2] not in CLIENT_API_VERSIONS:
            raise NotFound("unknown client API version")
        try:
            known = parse_matrix_path(_joined(path))
        except UnknownPath:
            version = "v3" if path[2] == "r0" else path[2]
            return Target(("_matrix", "client", version) + path[3:], None)
        return _target(known.template, known.segments(), known.code)
    try:
        known = parse_matrix_path(_joined(path))
    except UnknownPath as exc:
        raise NotFound(str(exc)) from None
    return _target(known.template, known.segments(), known.code)


def _target(template: tuple[str, ...], segments: tuple[str, ...], code: str | None) -> Target:
    if code == "0":
        return Target(("_matrix", "client", "versions"), template, code)
    if code == "n":
        segments = segments + ("",)  # the spec's path is /pushrules/ with its trailing slash
    return Target(("_matrix", "client", "v3") + segments, template, code)


def uses_integer_keys(value: Any) -> bool:
    """Whether any map in ``value`` has an integer key."""
    if isinstance(value, dict):
        return any(isinstance(key, int) and not isinstance(key, bool) for key in value) or any(
            uses_integer_keys(item) for item in value.values())
    if isinstance(value, list):
        return any(uses_integer_keys(item) for item in value)
    return False


def json_from_request(body: Any, table: Mapping[int, str]) -> dict[str, Any]:
    """A decoded request body with integer keys named, checked to be JSON-representable."""
    named = keys_to_names(body, table)
    _check_json(named)
    if not isinstance(named, dict):
        raise CodecError("body must be a map")
    return named


def _check_json(value: Any) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, int) and not isinstance(key, bool):
                # A bignum key is not echoed: the diagnostic stays short (and str() would refuse it).
                raise CodecError(f"unknown integer key {key}" if abs(key) <= MAX_JSON_INTEGER
                                 else "unknown integer key")
            if not isinstance(key, str):
                raise CodecError("map keys must be text or integers")
            _check_text(key)
            _check_json(item)
    elif isinstance(value, list):
        for item in value:
            _check_json(item)
    elif isinstance(value, str):
        _check_text(value)
    elif isinstance(value, bool) or value is None:
        pass
    elif isinstance(value, int):
        if not -MAX_JSON_INTEGER <= value <= MAX_JSON_INTEGER:
            raise CodecError("integer out of JSON range")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise CodecError("non-finite number")
    else:
        raise CodecError("value not representable in JSON")


def _check_text(text: str) -> None:
    """Text must be UTF-8-encodable: a JSON body can escape lone surrogates (``"\\ud800"``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CodecError("text not valid Unicode") from None


def keys_for_client(body: Any, version: int) -> Any:
    """A homeserver answer with the integer keys of table ``version`` (0: names only)."""
    if version <= 0:
        return body
    return names_to_keys(body, KEY_TABLE_V1_REVERSE)


def success_code(method: Code, status: int) -> Code:
    """facts §4: 201 -> 2.01; 204 -> 2.04 (2.02 for DELETE); else 2.05 for GET, 2.02 DELETE, 2.04."""
    if status == 201:
        return Code.CREATED
    if method == Code.DELETE:
        return Code.DELETED
    if status == 204 or method != Code.GET:
        return Code.CHANGED
    return Code.CONTENT


def _nonempty_events(section: Any) -> bool:
    return isinstance(section, dict) and bool(section.get("events"))


def sync_is_empty(body: Mapping[str, Any]) -> bool:
    """Whether a /sync answer carries nothing for the client but a new ``next_batch``."""
    rooms = body.get("rooms")
    if isinstance(rooms, dict) and any(isinstance(group, dict) and group for group in rooms.values()):
        return False
    if any(_nonempty_events(body.get(key)) for key in ("presence", "account_data", "to_device")):
        return False
    lists = body.get("device_lists")
    if isinstance(lists, dict) and any(lists.get(key) for key in ("changed", "left")):
        return False
    return True
