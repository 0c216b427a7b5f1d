"""Pure builders for Matrix Client-Server API requests (no I/O).

Each builder returns a `MatrixRequest`: method, unescaped path segments, query,
JSON body and the access token.  The transport turns it into HTTP; tests check
builders directly.  Endpoints are the current ``/_matrix/client/v3`` ones.

Path segments are kept unescaped and percent-encoded only in `MatrixRequest.url`,
so a room id (``!abc``), an alias (``#room:server``), an event type or a
client-chosen transaction id can never change the shape of the path.  The
access token never goes into the URL; the transport sends it as an
``Authorization: Bearer`` header.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping
from urllib.parse import quote

__all__ = [
    "CLIENT_V3",
    "AppserviceToken",
    "acting_identity",
    "account_data",
    "MatrixRequest",
    "context",
    "create_room",
    "deactivate",
    "device_signing_upload",
    "displayname",
    "kick",
    "message_content",
    "reaction_content",
    "redact",
    "receipt",
    "relations",
    "room_messages",
    "room_members",
    "room_keys_get",
    "room_keys_put",
    "room_keys_version",
    "room_keys_version_create",
    "shared_secret_nonce",
    "signatures_upload",
    "shared_secret_register",
    "set_account_data",
    "set_avatar_url",
    "upload",
    "generic",
    "invite",
    "join",
    "joined_rooms",
    "keys_claim",
    "keys_query",
    "keys_upload",
    "send_to_device",
    "last_messages",
    "leave",
    "login_password",
    "logout",
    "redact_body",
    "register",
    "resolve_alias",
    "room_state_event",
    "send_event",
    "send_state_event",
    "register_appservice_user",
    "set_displayname",
    "sync",
    "thumbnail",
    "versions",
    "whoami",
]

CLIENT_V3: tuple[str, ...] = ("_matrix", "client", "v3")

#: Keys whose values are secrets wherever they appear in a request body or query.
SECRET_KEYS = frozenset(
    {"password", "new_password", "access_token", "refresh_token", "token", "mac", "as_token", "hs_token"}
)

_REDACTED = "<redacted>"

JsonDict = dict[str, Any]


def redact_body(value: Any) -> Any:
    """Return a copy of a JSON value with the values of `SECRET_KEYS` replaced."""
    if isinstance(value, Mapping):
        return {
            k: (_REDACTED if k in SECRET_KEYS else redact_body(v)) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact_body(v) for v in value]
    return value


class AppserviceToken(str):
    """An application service's ``as_token`` acting as one user of its namespace.

    The string value is the ``as_token`` (sent as the bearer token); `user_id`
    is the user it asserts, added as the ``user_id`` query parameter of every
    request made with it (Application Service API, identity assertion).  Two
    such tokens are equal only when they act as the same user, so tables keyed
    by token (sync loops, sticky tokens) keep the users apart.
    """

    user_id: str

    def __new__(cls, as_token: str, user_id: str) -> "AppserviceToken":
        token = super().__new__(cls, as_token)
        token.user_id = user_id
        return token

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AppserviceToken):
            return str.__eq__(self, other) and self.user_id == other.user_id
        return False

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash((str.__str__(self), self.user_id))

    def __repr__(self) -> str:
        return f"<AppserviceToken for {self.user_id}>"


def acting_identity(token: str) -> str:
    """What tells one acting identity from another: the token, and for an `AppserviceToken` also
    its user (tables keyed by a hash of the token must not mix the users of one as_token)."""
    if isinstance(token, AppserviceToken):
        return f"{str.__str__(token)}\0{token.user_id}"
    return str.__str__(token)


#: Query parameters that pick the user or device a request acts as; only the gateway sets them.
_ASSERTION_KEYS = frozenset({"user_id", "device_id", "org.matrix.msc3202.device_id"})


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@functools.lru_cache(maxsize=4096)
def _segment(segment: str) -> str:
    """A path segment percent-encoded; the fixed ones ("_matrix", "rooms", ...) and a device's room
    ids come back on every request, so they are encoded once."""
    return quote(segment, safe="")


@dataclass(frozen=True, repr=False)
class MatrixRequest:
    """One Client-Server API call, ready for the transport."""

    method: str
    path: tuple[str, ...]
    query: tuple[tuple[str, str], ...] = ()
    body: JsonDict | None = None
    access_token: str | None = field(default=None, repr=False)
    #: A body that is not JSON (a media upload) and its Content-Type; ``body`` is then None.
    raw: bytes | None = field(default=None, repr=False)
    content_type: str | None = None
    #: The answer is not JSON (media): the transport gives ``{"content": bytes, "content_type": str}``.
    binary_answer: bool = False
    #: A pass-through call: a JSON array answer (``GET /rooms/{roomId}/state``) is passed on as it is.
    array_answer: bool = False

    def url(self, base_url: str) -> str:
        """The full URL under ``base_url``; every path segment is percent-encoded."""
        base = base_url.rstrip("/")
        path = "/".join(map(_segment, self.path))
        url = f"{base}/{path}"
        query = self.query
        if isinstance(self.access_token, AppserviceToken):
            # Whatever a device put in the query, the request acts as the token's user only.
            query = tuple((k, v) for k, v in query if k not in _ASSERTION_KEYS)
            query += (("user_id", self.access_token.user_id),)
        if query:
            url += "?" + "&".join(
                f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in query
            )
        return url

    def __repr__(self) -> str:
        query = tuple((k, _REDACTED if k in SECRET_KEYS else v) for k, v in self.query)
        body = redact_body(self.body) if self.body is not None else None
        token = ", access_token=<redacted>" if self.access_token else ""
        return (
            f"MatrixRequest(method={self.method!r}, path={self.path!r}, "
            f"query={query!r}, body={body!r}{token})"
        )

    __str__ = __repr__


def _v3(*segments: str) -> tuple[str, ...]:
    return CLIENT_V3 + segments


def versions() -> MatrixRequest:
    """``GET /_matrix/client/versions`` (unversioned, no auth)."""
    return MatrixRequest("GET", ("_matrix", "client", "versions"))


def register(
    username: str,
    password: str,
    *,
    session: str | None = None,
    device_id: str | None = None,
    initial_device_display_name: str | None = None,
    inhibit_login: bool = False,
) -> MatrixRequest:
    """``POST /register`` for a user account.

    Without ``session`` no ``auth`` is sent, which makes the homeserver answer
    401 with the available flows and a UIA session; with ``session`` the
    request completes the ``m.login.dummy`` stage.
    """
    body: JsonDict = {"username": username, "password": password}
    if session is not None:
        body["auth"] = {"type": "m.login.dummy", "session": session}
    if device_id is not None:
        body["device_id"] = device_id
    if initial_device_display_name is not None:
        body["initial_device_display_name"] = initial_device_display_name
    if inhibit_login:
        body["inhibit_login"] = True
    return MatrixRequest("POST", _v3("register"), (("kind", "user"),), body)


def login_password(
    user: str,
    password: str,
    *,
    device_id: str | None = None,
    initial_device_display_name: str | None = None,
) -> MatrixRequest:
    """``POST /login`` with ``m.login.password`` and an ``m.id.user`` identifier."""
    body: JsonDict = {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": user},
        "password": password,
    }
    if device_id is not None:
        body["device_id"] = device_id
    if initial_device_display_name is not None:
        body["initial_device_display_name"] = initial_device_display_name
    return MatrixRequest("POST", _v3("login"), (), body)


def register_appservice_user(as_token: str, localpart: str) -> MatrixRequest:
    """``POST /register`` of a user in the application service's namespace (no password, no login)."""
    body: JsonDict = {"type": "m.login.application_service", "username": localpart, "inhibit_login": True}
    return MatrixRequest("POST", _v3("register"), (("kind", "user"),), body, as_token)


def set_displayname(token: str, user_id: str, displayname: str) -> MatrixRequest:
    """``PUT /profile/{userId}/displayname``."""
    return MatrixRequest("PUT", _v3("profile", user_id, "displayname"), (), {"displayname": displayname}, token)


def displayname(token: str, user_id: str) -> MatrixRequest:
    """``GET /profile/{userId}/displayname``."""
    return MatrixRequest("GET", _v3("profile", user_id, "displayname"), (), None, token)


def avatar_url(token: str, user_id: str) -> MatrixRequest:
    """``GET /profile/{userId}/avatar_url``."""
    return MatrixRequest("GET", _v3("profile", user_id, "avatar_url"), (), None, token)


def deactivate(token: str) -> MatrixRequest:
    """``POST /account/deactivate`` (an application service may deactivate its users without UIA)."""
    return MatrixRequest("POST", _v3("account", "deactivate"), (), {"erase": False}, token)


def logout(token: str) -> MatrixRequest:
    """``POST /logout``: invalidates ``token``."""
    return MatrixRequest("POST", _v3("logout"), (), {}, token)


def whoami(token: str) -> MatrixRequest:
    """``GET /account/whoami``."""
    return MatrixRequest("GET", _v3("account", "whoami"), access_token=token)


def join(token: str, room_id_or_alias: str, *, via: Iterable[str] = ()) -> MatrixRequest:
    """``POST /join/{roomIdOrAlias}``.

    ``via`` servers are sent both as ``via`` (spec v1.12) and ``server_name``
    (older homeservers); a server reads the first it knows.
    """
    servers = tuple(via)
    query = tuple(("via", s) for s in servers) + tuple(("server_name", s) for s in servers)
    return MatrixRequest("POST", _v3("join", room_id_or_alias), query, {}, token)


def leave(token: str, room_id: str) -> MatrixRequest:
    """``POST /rooms/{roomId}/leave``."""
    return MatrixRequest("POST", _v3("rooms", room_id, "leave"), (), {}, token)


def joined_rooms(token: str) -> MatrixRequest:
    """``GET /joined_rooms``."""
    return MatrixRequest("GET", _v3("joined_rooms"), access_token=token)


def resolve_alias(alias: str, *, token: str | None = None) -> MatrixRequest:
    """``GET /directory/room/{roomAlias}`` (auth optional)."""
    return MatrixRequest("GET", _v3("directory", "room", alias), access_token=token)


def last_messages(
    token: str,
    room_id: str,
    *,
    limit: int = 1,
    types: Iterable[str] = ("m.room.message",),
    from_token: str | None = None,
    dir: str = "b",
) -> MatrixRequest:
    """``GET /rooms/{roomId}/messages`` filtered to ``types`` (facts §5)."""
    if dir not in ("b", "f"):
        raise ValueError("dir must be 'b' or 'f'")
    if limit < 1:
        raise ValueError("limit must be positive")
    query: list[tuple[str, str]] = [("dir", dir), ("limit", str(limit))]
    if from_token is not None:
        query.append(("from", from_token))
    type_list = list(types)
    if type_list:
        query.append(("filter", _compact_json({"types": type_list})))
    return MatrixRequest("GET", _v3("rooms", room_id, "messages"), tuple(query), None, token)


def send_event(
    token: str, room_id: str, event_type: str, txn_id: str, content: Mapping[str, Any]
) -> MatrixRequest:
    """``PUT /rooms/{roomId}/send/{eventType}/{txnId}`` (idempotent per device + txnId)."""
    return MatrixRequest(
        "PUT", _v3("rooms", room_id, "send", event_type, txn_id), (), dict(content), token
    )


def send_state_event(
    token: str,
    room_id: str,
    event_type: str,
    content: Mapping[str, Any],
    state_key: str = "",
) -> MatrixRequest:
    """``PUT /rooms/{roomId}/state/{eventType}/{stateKey}``."""
    return MatrixRequest(
        "PUT", _v3("rooms", room_id, "state", event_type, state_key), (), dict(content), token
    )


def room_state_event(
    token: str, room_id: str, event_type: str, state_key: str = ""
) -> MatrixRequest:
    """``GET /rooms/{roomId}/state/{eventType}/{stateKey}``: the content of one state event."""
    return MatrixRequest(
        "GET", _v3("rooms", room_id, "state", event_type, state_key), access_token=token
    )


def create_room(token: str, **fields: Any) -> MatrixRequest:
    """``POST /createRoom``; ``fields`` are the request body (preset, name, invite, ...)."""
    return MatrixRequest("POST", _v3("createRoom"), (), dict(fields), token)


def invite(token: str, room_id: str, user_id: str) -> MatrixRequest:
    """``POST /rooms/{roomId}/invite``."""
    return MatrixRequest("POST", _v3("rooms", room_id, "invite"), (), {"user_id": user_id}, token)


def context(token: str, room_id: str, event_id: str, *, limit: int = 0) -> MatrixRequest:
    """``GET /rooms/{roomId}/context/{eventId}``: its ``end`` is a pagination token just after the event.

    Members lazy-loaded: the state in the answer holds only the returned events' senders (without
    the filter, every member: 716 KB of JSON per call in a room of 1,000).
    """
    query = (("limit", str(limit)), ("filter", _compact_json({"lazy_load_members": True})))
    return MatrixRequest("GET", _v3("rooms", room_id, "context", event_id), query, access_token=token)


def room_members(token: str, room_id: str) -> MatrixRequest:
    """``GET /rooms/{roomId}/members``: the member events (joined, invited, left...)."""
    return MatrixRequest("GET", _v3("rooms", room_id, "members"), access_token=token)


def joined_members(token: str, room_id: str) -> MatrixRequest:
    """``GET /rooms/{roomId}/joined_members``: the joined users (with display names)."""
    return MatrixRequest("GET", _v3("rooms", room_id, "joined_members"), access_token=token)


def room_messages(token: str, room_id: str, *, from_token: str | None = None, dir: str = "b",
                  limit: int = 10) -> MatrixRequest:
    """``GET /rooms/{roomId}/messages``: one page of every event type (see `last_messages` for filtered)."""
    return last_messages(token, room_id, limit=limit, types=(), from_token=from_token, dir=dir)


def redact(token: str, room_id: str, event_id: str, txn_id: str, reason: str | None = None) -> MatrixRequest:
    """``PUT /rooms/{roomId}/redact/{eventId}/{txnId}`` (idempotent per txnId)."""
    body: JsonDict = {} if reason is None else {"reason": reason}
    return MatrixRequest("PUT", _v3("rooms", room_id, "redact", event_id, txn_id), (), body, token)


def message_content(msgtype: str, body: str, *, geo_uri: str | None = None, reply_to: str | None = None,
                    replaces: str | None = None) -> JsonDict:
    """An ``m.room.message`` content: ``geo_uri`` for ``m.location``; a reply to the event
    ``reply_to`` (``m.in_reply_to``) or an edit of the event ``replaces`` (``m.replace``, with
    ``m.new_content`` and the ``"* "`` fallback body), not both."""
    content: JsonDict = {"msgtype": msgtype, "body": body}
    if geo_uri is not None:
        content["geo_uri"] = geo_uri
    if replaces is not None:
        return {**content, "body": "* " + body, "m.new_content": dict(content),
                "m.relates_to": {"rel_type": "m.replace", "event_id": replaces}}
    if reply_to is not None:
        content["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
    return content


def reaction_content(event_id: str, key: str) -> JsonDict:
    """The content of an ``m.reaction`` annotation of ``event_id`` with ``key`` (an emoji)."""
    return {"m.relates_to": {"rel_type": "m.annotation", "event_id": event_id, "key": key}}


def receipt(token: str, room_id: str, event_id: str, receipt_type: str = "m.read") -> MatrixRequest:
    """``POST /rooms/{roomId}/receipt/{receiptType}/{eventId}``: read up to ``event_id``."""
    return MatrixRequest("POST", _v3("rooms", room_id, "receipt", receipt_type, event_id), (), {}, token)


def relations(token: str, room_id: str, event_id: str, rel_type: str, event_type: str, *,
              from_token: str | None = None, limit: int = 50) -> MatrixRequest:
    """``GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}/{relType}/{eventType}``: one page."""
    query: tuple[tuple[str, str], ...] = (("limit", str(limit)),)
    if from_token is not None:
        query += (("from", from_token),)
    path = ("_matrix", "client", "v1", "rooms", room_id, "relations", event_id, rel_type, event_type)
    return MatrixRequest("GET", path, query, access_token=token)


def kick(token: str, room_id: str, user_id: str, reason: str | None = None) -> MatrixRequest:
    """``POST /rooms/{roomId}/kick``."""
    body: JsonDict = {"user_id": user_id}
    if reason is not None:
        body["reason"] = reason
    return MatrixRequest("POST", _v3("rooms", room_id, "kick"), (), body, token)


def set_avatar_url(token: str, user_id: str, avatar_url: str) -> MatrixRequest:
    """``PUT /profile/{userId}/avatar_url``."""
    return MatrixRequest("PUT", _v3("profile", user_id, "avatar_url"), (), {"avatar_url": avatar_url}, token)


def upload(token: str, data: bytes, content_type: str, filename: str | None = None) -> MatrixRequest:
    """``POST /_matrix/media/v3/upload``: the content as it is, answered with its ``content_uri``."""
    query = (("filename", filename),) if filename else ()
    return MatrixRequest("POST", ("_matrix", "media", "v3", "upload"), query, None, token, raw=data,
                         content_type=content_type)


def thumbnail(token: str, mxc: str, width: int, height: int, method: str = "scale") -> MatrixRequest:
    """``GET /_matrix/client/v1/media/thumbnail/{serverName}/{mediaId}`` (authenticated media)."""
    server, _, media_id = mxc.removeprefix("mxc://").partition("/")
    query = (("width", str(width)), ("height", str(height)), ("method", method))
    return MatrixRequest("GET", ("_matrix", "client", "v1", "media", "thumbnail", server, media_id), query, None,
                         token, binary_answer=True)


def keys_upload(token: str, *, device_keys: Mapping[str, Any] | None = None,
                one_time_keys: Mapping[str, Any] | None = None) -> MatrixRequest:
    """``POST /keys/upload``: the device's identity keys and/or signed one-time keys."""
    body: JsonDict = {}
    if device_keys is not None:
        body["device_keys"] = dict(device_keys)
    if one_time_keys:
        body["one_time_keys"] = dict(one_time_keys)
    return MatrixRequest("POST", _v3("keys", "upload"), (), body, token)


def keys_query(token: str, user_ids: Iterable[str]) -> MatrixRequest:
    """``POST /keys/query``: every device (and its keys) of ``user_ids``."""
    body: JsonDict = {"device_keys": {user: [] for user in user_ids}, "timeout": 10000}
    return MatrixRequest("POST", _v3("keys", "query"), (), body, token)


def keys_claim(token: str, devices: Mapping[str, Iterable[str]],
               algorithm: str = "signed_curve25519") -> MatrixRequest:
    """``POST /keys/claim``: one one-time key of each device (user id -> device ids)."""
    body: JsonDict = {"one_time_keys": {user: {device: algorithm for device in ids}
                                        for user, ids in devices.items()}, "timeout": 10000}
    return MatrixRequest("POST", _v3("keys", "claim"), (), body, token)


def send_to_device(token: str, event_type: str, txn_id: str,
                   messages: Mapping[str, Mapping[str, Any]]) -> MatrixRequest:
    """``PUT /sendToDevice/{eventType}/{txnId}``: user id -> device id -> content."""
    body: JsonDict = {"messages": {user: dict(devices) for user, devices in messages.items()}}
    return MatrixRequest("PUT", _v3("sendToDevice", event_type, txn_id), (), body, token)


def device_signing_upload(token: str, keys: Mapping[str, Any]) -> MatrixRequest:
    """``POST /keys/device_signing/upload``: the user's master, self-signing and user-signing keys."""
    return MatrixRequest("POST", _v3("keys", "device_signing", "upload"), (), dict(keys), token)


def signatures_upload(token: str, signed: Mapping[str, Mapping[str, Any]]) -> MatrixRequest:
    """``POST /keys/signatures/upload``: user id -> key id (a device id) -> the signed key object."""
    body: JsonDict = {user: dict(keys) for user, keys in signed.items()}
    return MatrixRequest("POST", _v3("keys", "signatures", "upload"), (), body, token)


def account_data(token: str, user_id: str, event_type: str) -> MatrixRequest:
    """``GET /user/{userId}/account_data/{type}`` (404 if none)."""
    return MatrixRequest("GET", _v3("user", user_id, "account_data", event_type), (), None, token)


def set_account_data(token: str, user_id: str, event_type: str, content: Mapping[str, Any]) -> MatrixRequest:
    """``PUT /user/{userId}/account_data/{type}``."""
    return MatrixRequest("PUT", _v3("user", user_id, "account_data", event_type), (), dict(content), token)


def room_keys_version(token: str) -> MatrixRequest:
    """``GET /room_keys/version``: the user's current server-side key backup (404 if none)."""
    return MatrixRequest("GET", _v3("room_keys", "version"), (), None, token)


def room_keys_version_create(token: str, algorithm: str, auth_data: Mapping[str, Any]) -> MatrixRequest:
    """``POST /room_keys/version``: a new key backup version (it becomes the current one)."""
    body: JsonDict = {"algorithm": algorithm, "auth_data": dict(auth_data)}
    return MatrixRequest("POST", _v3("room_keys", "version"), (), body, token)


def room_keys_put(token: str, version: str, rooms: Mapping[str, Any]) -> MatrixRequest:
    """``PUT /room_keys/keys?version=``: room id -> {"sessions": session id -> KeyBackupData}."""
    body: JsonDict = {"rooms": dict(rooms)}
    return MatrixRequest("PUT", _v3("room_keys", "keys"), (("version", version),), body, token)


def room_keys_get(token: str, version: str) -> MatrixRequest:
    """``GET /room_keys/keys?version=``: every session of a key backup version."""
    return MatrixRequest("GET", _v3("room_keys", "keys"), (("version", version),), None, token)


_ADMIN_REGISTER = ("_synapse", "admin", "v1", "register")


def shared_secret_nonce() -> MatrixRequest:
    """``GET /_synapse/admin/v1/register``: a nonce for one shared-secret registration (Synapse)."""
    return MatrixRequest("GET", _ADMIN_REGISTER)


def shared_secret_register(shared_secret: str, nonce: str, username: str, password: str,
                           admin: bool = False) -> MatrixRequest:
    """``POST /_synapse/admin/v1/register``: HMAC-SHA1 keyed by the registration shared secret over
    nonce, user, password and ``admin``/``notadmin``, NUL-separated (Synapse's admin API)."""
    mac = hmac.new(shared_secret.encode("utf-8"), digestmod=hashlib.sha1)
    mac.update(b"\x00".join(part.encode("utf-8") for part in
                            (nonce, username, password, "admin" if admin else "notadmin")))
    body: JsonDict = {"nonce": nonce, "username": username, "password": password, "admin": admin,
                      "mac": mac.hexdigest()}
    return MatrixRequest("POST", _ADMIN_REGISTER, (), body)


def sync(
    token: str,
    *,
    since: str | None = None,
    timeout_ms: int = 0,
    filter: str | Mapping[str, Any] | None = None,
    full_state: bool = False,
    set_presence: str | None = None,
) -> MatrixRequest:
    """``GET /sync``; ``filter`` is a filter id or an inline filter object."""
    query: list[tuple[str, str]] = [("timeout", str(int(timeout_ms)))]
    if since is not None:
        query.append(("since", since))
    if filter is not None:
        query.append(("filter", filter if isinstance(filter, str) else _compact_json(filter)))
    if full_state:
        query.append(("full_state", "true"))
    if set_presence is not None:
        query.append(("set_presence", set_presence))
    return MatrixRequest("GET", _v3("sync"), tuple(query), None, token)


def generic(
    method: str,
    path_segments: Iterable[str],
    token: str | None = None,
    query: Iterable[tuple[str, str]] = (),
    body: Mapping[str, Any] | None = None,
) -> MatrixRequest:
    """Any Client-Server call, for pass-through (e.g. MSC3079 path codes).

    ``path_segments`` are unescaped and complete (``("_matrix", "client", ...)``);
    the caller decides which paths it lets through.
    """
    method = method.upper()
    if method not in ("GET", "POST", "PUT", "DELETE"):
        raise ValueError(f"unsupported HTTP method {method!r}")
    return MatrixRequest(
        method,
        tuple(path_segments),
        tuple((str(k), str(v)) for k, v in query),
        dict(body) if body is not None else None,
        token,
        array_answer=True,
    )
