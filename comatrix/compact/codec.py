"""Wire layouts of the compact device profile (pure functions, no I/O).

Every request and response body is one CBOR data item, positional (arrays), so
no key costs a byte.  The layouts, by resource (``docs/protocol.rst`` is the
normative description)::

    POST  /+  [user, password]                 -> 2.01  h'<8-byte session handle>'   (login)
    POST  /-  [handle]                         -> 2.04  (empty)                       (logout)
    POST  /x  [handle, room]                   -> 2.04  room-handle (uint)            (join)
    POST  /w  [handle, room-handle, seq, body] -> 2.04  (empty)                       (send: write)
    FETCH /v  [handle, room-handle(, cursor)]  -> 2.05  [sender, body, ts, cursor] or []  (messages: view)
    GET   /z                                   -> 2.05  unix-seconds (uint)           (time: zeit)

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
    "room_id_from_hash", "room_id_to_hash", "encode_handle", "decode_handle", "encode_uint",
    "decode_uint", "encode_message", "decode_message", "CodecError",
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
PATHS = {"login": "+", "logout": "-", "join": "x", "send": "w", "messages": "v", "time": "z"}
#: Operation -> resource type shown in /.well-known/core.
RESOURCE_TYPES = {op: f"comatrix.c.{op}" for op in PATHS}

#: The profile's byte budgets: whole CoAP messages (UDP payloads, no DTLS/OSCORE), as
#: (request, response) per operation; "notification" is one Observe notification.  They hold
#: for a '!'+43-char room id, a 20-character body and the sender '@sensor01:example.org'.
BUDGETS: dict[str, tuple[int, int]] = {
    "send": (48, 16), "getmsg": (24, 64), "notification": (0, 72),
    "join": (64, 64), "login": (64, 64), "logout": (64, 64), "time": (64, 64),
}

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


RoomReference = Union[str, bytes]


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
        return cls(_handle(handle), _text(room, "room", MAX_ROOM_REF))


@dataclasses.dataclass(frozen=True)
class SendRequest:
    handle: bytes = dataclasses.field(repr=False)
    room: int = 0
    seq: int = 0
    body: str = ""

    def encode(self) -> bytes:
        return cbor2.dumps([self.handle, self.room, self.seq, self.body])

    @classmethod
    def decode(cls, payload: bytes) -> "SendRequest":
        handle, room, seq, body = _array(payload, (4,), "send")
        return cls(_handle(handle), _uint(room, "room"), _uint(seq, "seq"), _text(body, "body", MAX_BODY))


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
