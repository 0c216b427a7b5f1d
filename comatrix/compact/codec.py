"""Wire layouts of the compact device profile (pure functions, no I/O).

Every request and response body is one CBOR data item, positional (arrays), so
no key costs a byte.  The layouts, by resource (``docs/protocol.rst`` is the
normative description)::

    POST  /+  [user, password]                 -> 2.01  h'<8-byte session handle>'   (login)
    POST  /-  [handle]                         -> 2.04  (empty)                       (logout)
    POST  /x  [handle, room]                   -> 2.04  room-handle (uint)            (join)
    POST  /w  [handle, room-handle, seq, body(, kind(, reply-to(, replaces)))] -> 2.04  reference (uint)  (send)
    FETCH /v  [handle, room-handle(, cursor)]  -> 2.05  [sender, body, ts, cursor] or []  (messages: view)
    GET   /z                                   -> 2.05  unix-seconds (uint)           (time: zeit)
    POST  /*  [handle, public(, name(, topic(, [user...]))) -> 2.01 room-handle      (create)
    FETCH /y  [handle, room-handle]            -> 2.05  [name, topic, joined, membership]  (room info)
    FETCH /y  [handle, "#alias:server"]        -> 2.05  room id (32 bytes for v12, else text)  (resolve)
    POST  /y  [handle, room-handle, name(, topic)] -> 2.04  (null: unchanged)        (set name/topic)
    POST  /@  [handle, room-handle, user]      -> 2.04                                (invite)
    FETCH /@  [handle]                         -> 2.05  [[room-handle, inviter, name], ...]  (invitations)
    POST  /~  [handle, room-handle]            -> 2.04                                (leave, decline)
    POST  /!  [handle, room-handle, user(, reason)] -> 2.04                           (kick)
    FETCH /&  [handle, room-handle]            -> 2.05  [user, ...]                   (members)
    POST  /)  [handle, room-handle, ref, key(, remove)] -> 2.04                       (react; remove: 1)
    POST  /_  [handle, room-handle, ref(, reason)] -> 2.04                            (redact)
    POST  /,  [handle, room-handle, ref]       -> 2.04                                (read receipt)
    FETCH /(  [handle, room-handle(, from(, count))] -> 2.05  [next, [ref, sender, body, ts(, kind)], ...]  (history)

A send's ``kind`` is 0 m.text (the default), 1 m.notice, 2 m.emote, or a ``geo:`` URI
(text, the ``geo:`` scheme may be left out): m.location.  ``reply-to`` and ``replaces`` are event references (the cursors of the
session's room handle); an event reference is what a send answers and what history lists.

An invitation is accepted by a join with its room handle: ``POST /x [handle, room-handle]``.
``ref`` is an event reference: the cursor of a message in that room handle's numbering
(what ``FETCH /v`` answers).
``user`` is a localpart (of the session user's server) or a full user id; answers name users
of that server by their localpart too.

``room`` in a join is a text string (``#alias:server``, ``!roomid`` or a name
configured on the gateway) or, for room ids of room version 12 and later, the
32-byte hash the id encodes (``!`` + unpadded base64url of it), 13 bytes shorter
on air.  Decoders raise `CodecError` (answered 4.00) with a short diagnostic.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
from typing import Any, Union

import cbor2

from comatrix.codec.cbor import CodecError, decode

__all__ = [
    "BUDGETS", "CONTENT_FORMAT", "HANDLE_SIZE", "MAX_BODY", "MAX_PASSWORD", "MAX_ROOM_REF", "MAX_USER", "PATHS",
    "RESOURCE_TYPES", "ROOM_HASH_SIZE", "MAX_UINT",
    "LoginRequest", "HandleRequest", "JoinRequest", "SendRequest", "MessagesRequest", "Message",
    "MEMBERSHIPS", "CreateRequest", "RoomRequest", "SetRoomRequest", "UserRequest", "RoomInfo", "Invitation",
    "encode_room_info", "decode_room_info", "encode_invitations", "decode_invitations", "encode_users",
    "decode_users", "encode_room_id", "decode_room_id",
    "room_id_from_hash", "room_id_to_hash", "encode_handle", "decode_handle", "encode_uint",
    "decode_uint", "encode_message", "decode_message", "CodecError",
    "EventRequest", "ReactRequest", "MAX_REACTION_KEY",
    "MSGTYPES", "MAX_GEO", "HistoryRequest", "HistoryEvent", "HistoryPage", "encode_history", "decode_history",
]

#: application/cbor: the bodies are plain CBOR; the resource type (rt) names the layout.
CONTENT_FORMAT = 60
#: Session handles are 8 random bytes (64 bits).
HANDLE_SIZE = 8
#: A room id of room version >= 12 is "!" + unpadded base64url of a 32-byte hash.
ROOM_HASH_SIZE = 32
MAX_USER = 255
MAX_PASSWORD = 512
MAX_ROOM_REF = 255
#: Longest message body accepted (bytes of UTF-8); a device message is far smaller.
MAX_BODY = 4096
#: Room handles, sequence numbers and cursors are unsigned and fit in 64 bits.
MAX_UINT = (1 << 64) - 1

#: Operation -> Uri-Path segment (one character each).  None of them is an MSC3079 path
#: code (0-9, A-Z, a-u), so a native MSC3079 endpoint keeps every short code.
PATHS = {"login": "+", "logout": "-", "join": "x", "send": "w", "messages": "v", "time": "z",
         "create": "*", "room": "y", "invite": "@", "leave": "~", "kick": "!", "members": "&",
         "react": ")", "redact": "_", "read": ",",
         "upload": "$", "profile": "="}
PATHS["history"] = "("
#: Operation -> resource type shown in /.well-known/core.
RESOURCE_TYPES = {op: f"comatrix.c.{op}" for op in PATHS}

#: The profile's byte budgets: whole CoAP messages (UDP payloads, no DTLS/OSCORE), as
#: (request, response) per operation; "notification" is one Observe notification.  They hold
#: for a '!'+43-char room id, a 20-character body and the sender '@sensor01:example.org'.
BUDGETS: dict[str, tuple[int, int]] = {
    "send": (48, 16), "getmsg": (24, 64), "notification": (0, 72),
    "join": (64, 64), "login": (64, 64), "logout": (64, 64), "time": (64, 64),
    "create": (64, 64), "room": (64, 64), "invite": (64, 64), "leave": (64, 64), "kick": (64, 64),
    "members": (64, 64),
    "react": (64, 64), "redact": (64, 64), "read": (64, 64),
    "upload": (64, 64), "thumbnail": (64, 64), "profile": (64, 64),  # media payload aside (mediawire)
}
BUDGETS.update({"send-kind": (64, 16), "send-reply": (64, 16), "send-edit": (64, 16), "history": (64, 64)})
#: A membership as the room info gives it: its index here (uint).
MEMBERSHIPS = ("join", "invite", "leave", "ban", "knock")
#: Users a create may invite; text fields of the room operations (bytes of UTF-8).
MAX_INVITES = 8
MAX_NAME = 255
MAX_TOPIC = 1024
MAX_REASON = 255
#: Longest reaction key (bytes of UTF-8): an emoji, or a short word.
MAX_REACTION_KEY = 64

_ROOM_ID_V12 = re.compile(r"![A-Za-z0-9_-]{43}")


def room_id_to_hash(room_id: str) -> bytes | None:
    """The 32 bytes a room-version-12 id encodes, or None if ``room_id`` is not of that form."""
    if not _ROOM_ID_V12.fullmatch(room_id):
        return None
    try:
        raw = base64.urlsafe_b64decode(room_id[1:] + "=")
    except (binascii.Error, ValueError):
        return None
    if len(raw) != ROOM_HASH_SIZE or room_id_from_hash(raw) != room_id:
        return None  # non-canonical trailing bits: send the text form instead
    return raw


def room_id_from_hash(raw: bytes) -> str:
    return "!" + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _array(payload: bytes, sizes: tuple[int, ...], what: str) -> list[Any]:
    value = decode(payload) if payload else None
    if not isinstance(value, list) or len(value) not in sizes:
        counts = " or ".join(str(size) for size in sizes)
        raise CodecError(f"{what}: expected a CBOR array of {counts}")
    return value


def _handle(value: Any) -> bytes:
    if not isinstance(value, bytes) or len(value) != HANDLE_SIZE:
        raise CodecError(f"handle must be a {HANDLE_SIZE}-byte string")
    return value


def _uint(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_UINT:
        raise CodecError(f"{what} must be an unsigned integer")
    return value


def _text(value: Any, what: str, max_bytes: int) -> str:
    if not isinstance(value, str) or not value:
        raise CodecError(f"{what} must be a non-empty text string")
    if len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        raise CodecError(f"{what} too long")
    return value


@dataclasses.dataclass(frozen=True)
class LoginRequest:
    user: str
    password: str = dataclasses.field(repr=False)

    def encode(self) -> bytes:
        return cbor2.dumps([self.user, self.password])

    @classmethod
    def decode(cls, payload: bytes) -> "LoginRequest":
        user, password = _array(payload, (2,), "login")
        # An empty password is a provisioned device user's login (application-service mode).
        return cls(_text(user, "user", MAX_USER), "" if password == "" else _text(password, "password", MAX_PASSWORD))


@dataclasses.dataclass(frozen=True)
class HandleRequest:
    """A request that names only the session (logout)."""

    handle: bytes = dataclasses.field(repr=False)

    def encode(self) -> bytes:
        return cbor2.dumps([self.handle])

    @classmethod
    def decode(cls, payload: bytes) -> "HandleRequest":
        (handle,) = _array(payload, (1,), "request")
        return cls(_handle(handle))


#: A room in a join: text (alias, id, configured name), a v12 id's 32 bytes, or a room handle the
#: session already has (an invitation's: the join accepts it).
RoomReference = Union[str, bytes, int]


@dataclasses.dataclass(frozen=True)
class JoinRequest:
    handle: bytes = dataclasses.field(repr=False)
    room: RoomReference = ""

    @classmethod
    def for_room(cls, handle: bytes, room: str) -> "JoinRequest":
        """The shortest form: a v12 room id goes as its 32-byte hash."""
        raw = room_id_to_hash(room)
        return cls(handle, raw if raw is not None else room)

    def room_text(self) -> str:
        if isinstance(self.room, int):
            raise CodecError("room is a room handle")
        return room_id_from_hash(self.room) if isinstance(self.room, bytes) else self.room

    def encode(self) -> bytes:
        return cbor2.dumps([self.handle, self.room])

    @classmethod
    def decode(cls, payload: bytes) -> "JoinRequest":
        handle, room = _array(payload, (2,), "join")
        if isinstance(room, bytes):
            if len(room) != ROOM_HASH_SIZE:
                raise CodecError(f"room as bytes must be the {ROOM_HASH_SIZE}-byte id hash")
            return cls(_handle(handle), room)
        if isinstance(room, int) and not isinstance(room, bool):
            return cls(_handle(handle), _uint(room, "room"))
        return cls(_handle(handle), _text(room, "room", MAX_ROOM_REF))


#: A send's ``kind`` -> msgtype (a ``geo:`` URI as kind is m.location).
MSGTYPES = ("m.text", "m.notice", "m.emote")
LOCATION = "m.location"
MAX_GEO = 255
#: RFC 5870: ``geo:`` latitude, longitude(, altitude)(;parameters).
_GEO = re.compile(r"geo:-?[0-9]{1,3}(\.[0-9]+)?,-?[0-9]{1,3}(\.[0-9]+)?(,-?[0-9]+(\.[0-9]+)?)?(;[!-~]*)?")


def _optional_uint(value: Any, what: str) -> int | None:
    return None if value is None else _uint(value, what)


def _kind(value: Any) -> int | str:
    if isinstance(value, str):
        uri = value if value.startswith("geo:") else "geo:" + value  # the scheme may be left out
        if len(uri) > MAX_GEO or not _GEO.fullmatch(uri):
            raise CodecError("kind: not a geo: URI")
        return uri
    kind = _uint(value, "kind")
    if kind >= len(MSGTYPES):
        raise CodecError("kind: 0, 1, 2 or a geo: URI")
    return kind


@dataclasses.dataclass(frozen=True)
class SendRequest:
    """``[handle, room, seq, body(, kind(, reply-to(, replaces)))]``; trailing defaults are left out,
    so a plain text message is the 4-element array it always was."""

    handle: bytes = dataclasses.field(repr=False)
    room: int = 0
    seq: int = 0
    body: str = ""
    #: An index into `MSGTYPES`, or a ``geo:`` URI (m.location).
    kind: int | str = 0
    #: Event references: the event this one replies to, the event it edits (not both).
    reply_to: int | None = None
    replaces: int | None = None

    @property
    def msgtype(self) -> str:
        return LOCATION if isinstance(self.kind, str) else MSGTYPES[self.kind]

    def encode(self) -> bytes:
        kind = self.kind[4:] if isinstance(self.kind, str) and self.kind.startswith("geo:") else self.kind
        items: list[Any] = [self.handle, self.room, self.seq, self.body, kind, self.reply_to, self.replaces]
        while items[-1] is None:
            items.pop()  # trailing defaults cost nothing
        if len(items) == 5 and items[4] == 0:
            items.pop()
        return cbor2.dumps(items)

    @classmethod
    def decode(cls, payload: bytes) -> "SendRequest":
        items = _array(payload, (4, 5, 6, 7), "send")
        handle, room, seq, body = items[:4]
        reply_to, replaces = _optional_uint(_tail(items, 5), "reply-to"), _optional_uint(_tail(items, 6), "replaces")
        if reply_to is not None and replaces is not None:
            raise CodecError("a reply cannot be an edit too")
        return cls(_handle(handle), _uint(room, "room"), _uint(seq, "seq"), _text(body, "body", MAX_BODY),
                   _kind(items[4] if len(items) > 4 else 0), reply_to, replaces)


@dataclasses.dataclass(frozen=True)
class MessagesRequest:
    handle: bytes = dataclasses.field(repr=False)
    room: int = 0
    cursor: int | None = None

    def encode(self) -> bytes:
        items: list[Any] = [self.handle, self.room]
        if self.cursor is not None:
            items.append(self.cursor)
        return cbor2.dumps(items)

    @classmethod
    def decode(cls, payload: bytes) -> "MessagesRequest":
        items = _array(payload, (2, 3), "messages")
        cursor = _uint(items[2], "cursor") if len(items) == 3 else None
        return cls(_handle(items[0]), _uint(items[1], "room"), cursor)


@dataclasses.dataclass(frozen=True)
class Message:
    """One message as a device sees it; ``ts`` in Unix seconds."""

    sender: str
    body: str
    ts: int
    cursor: int


def encode_message(message: Message | None) -> bytes:
    """``[sender, body, ts, cursor]``, or ``[]`` for "no message"."""
    if message is None:
        return b"\x80"
    return cbor2.dumps([message.sender, message.body, message.ts, message.cursor])


def decode_message(payload: bytes) -> Message | None:
    items = _array(payload, (0, 4), "message")
    if not items:
        return None
    sender, body, ts, cursor = items
    if not isinstance(sender, str) or not isinstance(body, str):
        raise CodecError("sender and body must be text strings")
    return Message(sender, body, _uint(ts, "ts"), _uint(cursor, "cursor"))


def encode_handle(handle: bytes) -> bytes:
    return cbor2.dumps(_handle(handle))


def decode_handle(payload: bytes) -> bytes:
    return _handle(decode(payload))


def encode_uint(value: int) -> bytes:
    return cbor2.dumps(_uint(value, "value"))


def decode_uint(payload: bytes) -> int:
    return _uint(decode(payload), "value")


# ---------------------------------------------------------------------- rooms and membership


def _optional_text(value: Any, what: str, max_bytes: int) -> str | None:
    """A text field that may be null (unset or unchanged); "" is null too."""
    return None if value is None or value == "" else _text(value, what, max_bytes)


def _tail(items: list[Any], index: int) -> Any:
    return items[index] if len(items) > index else None


@dataclasses.dataclass(frozen=True)
class CreateRequest:
    """``[handle, public(, name(, topic(, [user, ...])))]``: ``public`` 0 private_chat, 1 public_chat."""

    handle: bytes = dataclasses.field(repr=False)
    public: bool = False
    name: str | None = None
    topic: str | None = None
    invite: tuple[str, ...] = ()

    def encode(self) -> bytes:
        items: list[Any] = [self.handle, int(self.public), self.name, self.topic, list(self.invite)]
        while len(items) > 2 and items[-1] in (None, []):
            items.pop()  # trailing defaults cost nothing
        return cbor2.dumps(items)

    @classmethod
    def decode(cls, payload: bytes) -> "CreateRequest":
        items = _array(payload, (2, 3, 4, 5), "create")
        public = _uint(items[1], "public")
        if public > 1:
            raise CodecError("public must be 0 or 1")
        invite = _tail(items, 4)
        if invite is None:
            invite = []
        if not isinstance(invite, list) or len(invite) > MAX_INVITES:
            raise CodecError(f"invite must be an array of at most {MAX_INVITES} users")
        return cls(_handle(items[0]), bool(public), _optional_text(_tail(items, 2), "name", MAX_NAME),
                   _optional_text(_tail(items, 3), "topic", MAX_TOPIC),
                   tuple(_text(user, "user", MAX_USER) for user in invite))


@dataclasses.dataclass(frozen=True)
class RoomRequest:
    """``[handle, room-handle]`` (leave, members, room info), or ``[handle, "#alias"]`` (resolve)."""

    handle: bytes = dataclasses.field(repr=False)
    room: int | str = 0

    def encode(self) -> bytes:
        return cbor2.dumps([self.handle, self.room])

    @classmethod
    def decode(cls, payload: bytes, *, alias: bool = False) -> "RoomRequest":
        """``alias``: a text room reference is allowed (the room resource resolves it)."""
        handle, room = _array(payload, (2,), "request")
        if alias and isinstance(room, str):
            return cls(_handle(handle), _text(room, "room", MAX_ROOM_REF))
        return cls(_handle(handle), _uint(room, "room"))


@dataclasses.dataclass(frozen=True)
class SetRoomRequest:
    """``[handle, room-handle, name(, topic)]``; a null (or absent) field stays as it is."""

    handle: bytes = dataclasses.field(repr=False)
    room: int = 0
    name: str | None = None
    topic: str | None = None

    def encode(self) -> bytes:
        items: list[Any] = [self.handle, self.room, self.name]
        if self.topic is not None:
            items.append(self.topic)
        return cbor2.dumps(items)

    @classmethod
    def decode(cls, payload: bytes) -> "SetRoomRequest":
        items = _array(payload, (3, 4), "set room")
        name, topic = items[2], _tail(items, 3)
        if name is None and topic is None:
            raise CodecError("nothing to set: name and topic are null")
        return cls(_handle(items[0]), _uint(items[1], "room"),
                   None if name is None else _text(name, "name", MAX_NAME),
                   None if topic is None else _text(topic, "topic", MAX_TOPIC))


@dataclasses.dataclass(frozen=True)
class UserRequest:
    """``[handle, room-handle, user(, reason)]`` (invite; kick with an optional reason)."""

    handle: bytes = dataclasses.field(repr=False)
    room: int = 0
    user: str = ""
    reason: str | None = None

    def encode(self) -> bytes:
        items: list[Any] = [self.handle, self.room, self.user]
        if self.reason is not None:
            items.append(self.reason)
        return cbor2.dumps(items)

    @classmethod
    def decode(cls, payload: bytes, *, reason: bool = False) -> "UserRequest":
        items = _array(payload, (3, 4) if reason else (3,), "request")
        reason_ = _tail(items, 3)
        return cls(_handle(items[0]), _uint(items[1], "room"), _text(items[2], "user", MAX_USER),
                   None if reason_ is None else _text(reason_, "reason", MAX_REASON))


@dataclasses.dataclass(frozen=True)
class RoomInfo:
    name: str | None
    topic: str | None
    joined: int
    membership: str


def encode_room_info(info: RoomInfo) -> bytes:
    """``[name, topic, joined, membership]``: name and topic null when unset, membership an index
    into `MEMBERSHIPS` (null when the device's user has no membership)."""
    membership = MEMBERSHIPS.index(info.membership) if info.membership in MEMBERSHIPS else None
    return cbor2.dumps([info.name, info.topic, info.joined, membership])


def decode_room_info(payload: bytes) -> RoomInfo:
    name, topic, joined, membership = _array(payload, (4,), "room info")
    if membership is not None and (not isinstance(membership, int) or not 0 <= membership < len(MEMBERSHIPS)):
        raise CodecError("unknown membership")
    return RoomInfo(_optional_text(name, "name", MAX_NAME), _optional_text(topic, "topic", MAX_TOPIC),
                    _uint(joined, "joined"), "" if membership is None else MEMBERSHIPS[membership])


@dataclasses.dataclass(frozen=True)
class Invitation:
    """A pending invitation: the room handle it got, who invited, the room's name (None: unknown)."""

    room: int
    inviter: str | None
    name: str | None


def encode_invitations(invitations: list[Invitation]) -> bytes:
    return cbor2.dumps([[invitation.room, invitation.inviter, invitation.name] for invitation in invitations])


def decode_invitations(payload: bytes) -> list[Invitation]:
    items = decode(payload)
    if not isinstance(items, list) or not all(isinstance(item, list) and len(item) == 3 for item in items):
        raise CodecError("invitations: expected an array of [room-handle, inviter, name]")
    return [Invitation(_uint(room, "room"), _optional_text(inviter, "inviter", MAX_USER),
                       _optional_text(name, "name", MAX_NAME)) for room, inviter, name in items]


def encode_users(users: list[str]) -> bytes:
    return cbor2.dumps(list(users))


def decode_users(payload: bytes) -> list[str]:
    items = decode(payload)
    if not isinstance(items, list):
        raise CodecError("members: expected an array of users")
    return [_text(user, "user", MAX_USER) for user in items]


def encode_room_id(room_id: str) -> bytes:
    """A room id as short as it goes: a v12 id as the 32 bytes it encodes, else its text."""
    raw = room_id_to_hash(room_id)
    return cbor2.dumps(raw if raw is not None else room_id)


def decode_room_id(payload: bytes) -> str:
    value = decode(payload)
    if isinstance(value, bytes) and len(value) == ROOM_HASH_SIZE:
        return room_id_from_hash(value)
    return _text(value, "room id", MAX_ROOM_REF)


# ---------------------------------------------------------------------- relations


@dataclasses.dataclass(frozen=True)
class EventRequest:
    """``[handle, room-handle, ref(, reason)]``: a read receipt (no reason) or a redaction."""

    handle: bytes = dataclasses.field(repr=False)
    room: int = 0
    ref: int = 0
    reason: str | None = None

    def encode(self) -> bytes:
        items: list[Any] = [self.handle, self.room, self.ref]
        if self.reason is not None:
            items.append(self.reason)
        return cbor2.dumps(items)

    @classmethod
    def decode(cls, payload: bytes, *, reason: bool = False) -> "EventRequest":
        items = _array(payload, (3, 4) if reason else (3,), "request")
        return cls(_handle(items[0]), _uint(items[1], "room"), _uint(items[2], "ref"),
                   _optional_text(_tail(items, 3), "reason", MAX_REASON))


@dataclasses.dataclass(frozen=True)
class ReactRequest:
    """``[handle, room-handle, ref, key(, remove)]``: ``remove`` 1 takes the reaction back."""

    handle: bytes = dataclasses.field(repr=False)
    room: int = 0
    ref: int = 0
    key: str = ""
    remove: bool = False

    def encode(self) -> bytes:
        items: list[Any] = [self.handle, self.room, self.ref, self.key]
        if self.remove:
            items.append(1)
        return cbor2.dumps(items)

    @classmethod
    def decode(cls, payload: bytes) -> "ReactRequest":
        items = _array(payload, (4, 5), "react")
        remove = _uint(items[4], "remove") if len(items) == 5 else 0
        if remove > 1:
            raise CodecError("remove must be 0 or 1")
        return cls(_handle(items[0]), _uint(items[1], "room"), _uint(items[2], "ref"),
                   _text(items[3], "key", MAX_REACTION_KEY), bool(remove))
# ---------------------------------------------------------------------- history

#: Events one history page may ask for (either direction).
MAX_PAGE = 20


@dataclasses.dataclass(frozen=True)
class HistoryRequest:
    """``[handle, room-handle(, from(, count))]``: ``count`` events before (count < 0, default -1)
    or after (count > 0) the event reference ``from``; ``from`` null is "now" (backward only)."""

    handle: bytes = dataclasses.field(repr=False)
    room: int = 0
    start: int | None = None
    count: int = -1

    def encode(self) -> bytes:
        items: list[Any] = [self.handle, self.room, self.start, self.count]
        if self.count == -1:
            items.pop()
            if self.start is None:
                items.pop()
        return cbor2.dumps(items)

    @classmethod
    def decode(cls, payload: bytes) -> "HistoryRequest":
        items = _array(payload, (2, 3, 4), "history")
        start = _optional_uint(_tail(items, 2), "from")
        count = items[3] if len(items) > 3 else -1
        if not isinstance(count, int) or isinstance(count, bool) or count == 0 or abs(count) > MAX_PAGE:
            raise CodecError(f"count must be -{MAX_PAGE}..-1 or 1..{MAX_PAGE}")
        if count > 0 and start is None:
            raise CodecError("a forward page needs a from reference")
        return cls(_handle(items[0]), _uint(items[1], "room"), start, count)


@dataclasses.dataclass(frozen=True)
class HistoryEvent:
    """One event of a history page; ``ts`` in Unix seconds, ``sender`` short (a localpart for
    users of the session user's server)."""

    ref: int
    sender: str
    body: str
    ts: int
    msgtype: str = "m.text"


@dataclasses.dataclass(frozen=True)
class HistoryPage:
    """Events oldest first, and ``next``: the reference to page on from (null: nothing more that way)."""

    next: int | None
    events: tuple[HistoryEvent, ...] = ()


def _history_event(event: HistoryEvent) -> list[Any]:
    items: list[Any] = [event.ref, event.sender, event.body, event.ts]
    if event.msgtype != "m.text":
        items.append(MSGTYPES.index(event.msgtype) if event.msgtype in MSGTYPES else event.msgtype)
    return items


def encode_history(page: HistoryPage) -> bytes:
    """``[next, [ref, sender, body, ts(, msgtype)], ...]``; msgtype only where it is not m.text: 1
    m.notice, 2 m.emote (a send's kinds), any other as its text (``m.location``, ``m.image``...)."""
    return cbor2.dumps([page.next, *(_history_event(event) for event in page.events)])


def decode_history(payload: bytes) -> HistoryPage:
    items = decode(payload)
    if not isinstance(items, list) or not items:
        raise CodecError("history: expected [next, event...]")
    events = []
    for item in items[1:]:
        if not isinstance(item, list) or len(item) not in (4, 5):
            raise CodecError("history: an event is [ref, sender, body, ts(, msgtype)]")
        msgtype = item[4] if len(item) == 5 else "m.text"
        if isinstance(msgtype, int) and not isinstance(msgtype, bool) and 0 <= msgtype < len(MSGTYPES):
            msgtype = MSGTYPES[msgtype]
        if not isinstance(item[1], str) or not isinstance(item[2], str) or not isinstance(msgtype, str):
            raise CodecError("history: sender, body and msgtype are text strings")
        events.append(HistoryEvent(_uint(item[0], "ref"), item[1], item[2], _uint(item[3], "ts"), msgtype))
    return HistoryPage(_optional_uint(items[0], "next"), tuple(events))
