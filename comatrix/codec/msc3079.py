"""MSC3079 (Low Bandwidth CS-API) tables and the pure functions that use them.

* `KEY_TABLE_V1`: CBOR integer keys <-> Matrix JSON key names (keys only, every
  nesting level; a string key wins over the same integer key).
* `PATH_CODES`: the one-character path codes and the v3 endpoint each stands for.
* `parse_matrix_path`: a Proxy-Uri or path (code form or full ``/_matrix/client/...``
  form) -> the endpoint template and its parameters.  The Proxy-Uri host is
  dropped here, on purpose: requests only ever go to the configured homeserver.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping
from urllib.parse import unquote

#: Option numbers MSC3079 defines for CoAP (elective 256, critical 257).
ACCESS_TOKEN_OPTION = 256
KEY_TABLE_VERSION_OPTION = 257

KEY_TABLE_V1: Mapping[int, str] = {
    1: "event_id", 2: "type", 3: "content", 4: "state_key", 5: "room_id", 6: "sender",
    7: "user_id", 8: "origin_server_ts", 9: "unsigned", 10: "prev_content", 11: "state",
    12: "timeline", 13: "events", 14: "limited", 15: "prev_batch", 16: "transaction_id", 17: "age",
    18: "redacted_because", 19: "next_batch", 20: "presence", 21: "avatar_url", 22: "account_data",
    23: "rooms", 24: "join", 25: "membership", 26: "displayname", 27: "body", 28: "msgtype",
    29: "format", 30: "formatted_body", 31: "ephemeral", 32: "invite_state", 33: "leave",
    34: "third_party_invite", 35: "is_direct", 36: "hashes", 37: "signatures", 38: "depth",
    39: "prev_events", 40: "prev_state", 41: "auth_events", 42: "origin", 43: "creator",
    44: "join_rule", 45: "history_visibility", 46: "ban", 47: "events_default", 48: "kick",
    49: "redact", 50: "state_default", 51: "users", 52: "users_default", 53: "reason",
    54: "visibility", 55: "room_alias_name", 56: "name", 57: "topic", 58: "invite",
    59: "invite_3pid", 60: "room_version", 61: "creation_content", 62: "initial_state",
    63: "preset", 64: "servers", 65: "identifier", 66: "user", 67: "medium", 68: "address",
    69: "password", 70: "token", 71: "device_id", 72: "initial_device_display_name",
    73: "access_token", 74: "home_server", 75: "well_known", 76: "base_url", 77: "device_lists",
    78: "to_device", 79: "peek", 80: "last_seen_ip", 81: "display_name", 82: "typing",
    83: "last_seen_ts", 84: "algorithm", 85: "sender_key", 86: "session_id", 87: "ciphertext",
    88: "one_time_keys", 89: "timeout", 90: "recent_rooms", 91: "chunk", 92: "m.fully_read",
    93: "device_keys", 94: "failures", 95: "device_display_name", 96: "prev_sender",
    97: "replaces_state", 98: "changed", 99: "unstable_features", 100: "versions", 101: "devices",
    102: "errcode", 103: "error", 104: "room_alias",
}
KEY_TABLE_V1_REVERSE: Mapping[str, int] = {name: number for number, name in KEY_TABLE_V1.items()}

KEY_TABLES: Mapping[int, Mapping[int, str]] = {1: KEY_TABLE_V1}

#: Endpoint templates under ``/_matrix/client/v3/`` (``0`` is ``/_matrix/client/versions``).
#: ``{name}`` segments are parameters, in the order the path code form carries them.
PATH_CODES: Mapping[str, tuple[str, ...]] = {
    "0": ('versions',),
    "1": ('login',),
    "2": ('capabilities',),
    "3": ('logout',),
    "4": ('register',),
    "5": ('user', '{userId}', 'filter'),
    "6": ('user', '{userId}', 'filter', '{filterId}'),
    "7": ('sync',),
    "8": ('rooms', '{roomId}', 'state', '{eventType}', '{stateKey}'),
    "9": ('rooms', '{roomId}', 'send', '{eventType}', '{txnId}'),
    "A": ('rooms', '{roomId}', 'event', '{eventId}'),
    "B": ('rooms', '{roomId}', 'state'),
    "C": ('rooms', '{roomId}', 'members'),
    "D": ('rooms', '{roomId}', 'joined_members'),
    "E": ('rooms', '{roomId}', 'messages'),
    "F": ('rooms', '{roomId}', 'redact', '{eventId}', '{txnId}'),
    "G": ('createRoom',),
    "H": ('directory', 'room', '{roomAlias}'),
    "I": ('joined_rooms',),
    "J": ('rooms', '{roomId}', 'invite'),
    "K": ('rooms', '{roomId}', 'join'),
    "L": ('join', '{roomIdOrAlias}'),
    "M": ('rooms', '{roomId}', 'leave'),
    "N": ('rooms', '{roomId}', 'forget'),
    "O": ('rooms', '{roomId}', 'kick'),
    "P": ('rooms', '{roomId}', 'ban'),
    "Q": ('rooms', '{roomId}', 'unban'),
    "R": ('directory', 'list', 'room', '{roomId}'),
    "S": ('publicRooms',),
    "T": ('user_directory', 'search'),
    "U": ('profile', '{userId}', 'displayname'),
    "V": ('profile', '{userId}', 'avatar_url'),
    "W": ('profile', '{userId}'),
    "X": ('voip', 'turnServer'),
    "Y": ('rooms', '{roomId}', 'typing', '{userId}'),
    "Z": ('rooms', '{roomId}', 'receipt', '{receiptType}', '{eventId}'),
    "a": ('rooms', '{roomId}', 'read_markers'),
    "b": ('presence', '{userId}', 'status'),
    "c": ('sendToDevice', '{eventType}', '{txnId}'),
    "d": ('devices',),
    "e": ('devices', '{deviceId}'),
    "f": ('delete_devices',),
    "g": ('keys', 'upload'),
    "h": ('keys', 'query'),
    "i": ('keys', 'claim'),
    "j": ('keys', 'changes'),
    "k": ('pushers',),
    "l": ('pushers', 'set'),
    "m": ('notifications',),
    "n": ('pushrules',),
    "o": ('search',),
    "p": ('user', '{userId}', 'rooms', '{roomId}', 'tags'),
    "q": ('user', '{userId}', 'rooms', '{roomId}', 'tags', '{tag}'),
    "r": ('user', '{userId}', 'account_data', '{eventType}'),
    "s": ('user', '{userId}', 'rooms', '{roomId}', 'account_data', '{eventType}'),
    "t": ('rooms', '{roomId}', 'context', '{eventId}'),
    "u": ('rooms', '{roomId}', 'report', '{eventId}'),
}


@dataclasses.dataclass(frozen=True)
class MatrixPath:
    """A recognised Matrix endpoint: its template, its parameters and the code if any."""

    template: tuple[str, ...]
    params: Mapping[str, str]
    code: str | None = None

    @property
    def endpoint(self) -> str:
        """The template joined with "/" (``rooms/{roomId}/send/{eventType}/{txnId}``)."""
        return "/".join(self.template)

    def segments(self) -> tuple[str, ...]:
        """The path under the client API prefix with parameters filled in (unescaped)."""
        return tuple(self.params[s[1:-1]] if _is_param(s) else s for s in self.template)


class UnknownPath(ValueError):
    """The path names no endpoint this gateway knows."""


_CLIENT_PREFIX = ("_matrix", "client")
_API_VERSIONS = frozenset({"r0", "v3", "v1", "unstable"})
_TEMPLATE_BY_ENDPOINT = {template: code for code, template in PATH_CODES.items()}


def _is_param(segment: str) -> bool:
    return segment.startswith("{") and segment.endswith("}")


def uri_path(uri: str) -> str:
    """The path of a Proxy-Uri or bare path; scheme, host, port and query are dropped.

    ``#`` is kept as part of the path because room aliases start with it and
    devices rarely percent-encode them.
    """
    if "://" in uri:
        rest = uri.split("://", 1)[1]
        slash = rest.find("/")
        uri = rest[slash:] if slash >= 0 else "/"
    return uri.split("?", 1)[0]


def split_path(path: str) -> list[str]:
    return [unquote(segment) for segment in path.split("/") if segment]


def parse_matrix_path(uri: str) -> MatrixPath:
    """Recognise ``/9/!room/m.room.message/txn1`` or ``/_matrix/client/r0/rooms/.../send/...``."""
    segments = split_path(uri_path(uri))
    if not segments:
        raise UnknownPath("empty Matrix path")
    if tuple(segments[:2]) == _CLIENT_PREFIX:
        rest = segments[2:]
        if rest == ["versions"]:
            return MatrixPath(PATH_CODES["0"], {}, "0")
        if not rest or rest[0] not in _API_VERSIONS:
            raise UnknownPath("unsupported Matrix API version")
        return _match_full(rest[1:])
    code, params = segments[0], segments[1:]
    template = PATH_CODES.get(code)
    if template is None:
        raise UnknownPath(f"unknown path code {code[:8]!r}")
    names = [s[1:-1] for s in template if _is_param(s)]
    if len(params) != len(names):
        raise UnknownPath(f"path code {code} takes {len(names)} parameter(s)")
    return MatrixPath(template, dict(zip(names, params)), code)


def _match_full(segments: list[str]) -> MatrixPath:
    for template, code in _TEMPLATE_BY_ENDPOINT.items():
        if len(template) != len(segments):
            continue
        params: dict[str, str] = {}
        for expected, actual in zip(template, segments):
            if _is_param(expected):
                params[expected[1:-1]] = actual
            elif expected != actual:
                break
        else:
            return MatrixPath(template, params, code)
    raise UnknownPath("unknown Matrix endpoint")


def keys_to_names(value: Any, table: Mapping[int, str] = KEY_TABLE_V1) -> Any:
    """Replace integer keys by their names at every nesting level (values untouched)."""
    if isinstance(value, dict):
        named: dict[Any, Any] = {}
        string_keys = {key for key in value if isinstance(key, str)}
        for key, item in value.items():
            name = table.get(key, key) if isinstance(key, int) and not isinstance(key, bool) else key
            if name in named or (name is not key and name in string_keys):
                continue  # the string form of a key wins over its integer form
            named[name] = keys_to_names(item, table)
        return named
    if isinstance(value, list):
        return [keys_to_names(item, table) for item in value]
    return value


def names_to_keys(value: Any, reverse: Mapping[str, int] = KEY_TABLE_V1_REVERSE) -> Any:
    """Replace key names that have an integer in the table by that integer, at every level."""
    if isinstance(value, dict):
        return {reverse.get(key, key) if isinstance(key, str) else key: names_to_keys(item, reverse)
                for key, item in value.items()}
    if isinstance(value, list):
        return [names_to_keys(item, reverse) for item in value]
    return value
