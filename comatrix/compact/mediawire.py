"""Wire layouts of the compact profile's media and profile operations (pure functions, no I/O).

``docs/protocol.rst`` is the normative description; in short::

    POST  /$  header || media   (Block1)        -> 2.31 per block, 2.04 at the end          (upload)
              header = [handle, room-handle, key, type(, name)]  (one CBOR item, in the first block;
                       room-handle null: to the media repository only, no event)
    FETCH /$  [handle, media, width, height(, crop)] -> 2.05 image bytes (Block2)         (thumbnail)
    POST  /=  [handle, name(, avatar)]         -> 2.04                                      (set profile)
    FETCH /=  [handle]                         -> 2.05  display name (text) or null         (read profile)

``type`` is a uint (an index into `MEDIA_TYPES`) or a mimetype as text; ``key`` a
device-chosen uint naming the upload (a retry with the same key never makes a
second event); ``media`` and ``avatar`` an upload key of the session (uint), an
``mxc://`` URI (text) or ``[room-handle, event-ref]`` (the event that carries it).  `image_size` reads width and height from the first bytes
of a PNG, GIF or JPEG file.
"""

from __future__ import annotations

import dataclasses
import io
import re
import struct
from typing import Any, Union

import cbor2

from comatrix.compact.codec import MAX_NAME, CodecError, _array, _handle, _text, _uint

__all__ = ["MEDIA_TYPES", "MAX_HEADER", "MAX_FILENAME", "MAX_THUMBNAIL_SIDE", "UploadHeader", "ProfileRequest",
           "ThumbnailRequest", "MediaReference", "decode_upload_header", "image_size", "msgtype_for",
           "content_format_of", "is_mxc",
           "encode_display_name", "decode_display_name"]

#: Mimetypes a device names by their index (one byte on air); any other goes as text.
MEDIA_TYPES = ("application/octet-stream", "image/jpeg", "image/png", "image/gif", "image/webp",
               "audio/ogg", "audio/mpeg", "audio/wav", "video/mp4", "text/plain", "application/json",
               "application/cbor")
#: Longest upload header (bytes); it must also fit in the first block.
MAX_HEADER = 320
MAX_FILENAME = 128
MAX_MIMETYPE = 127
#: Largest thumbnail width or height a device may ask for (Matrix servers offer up to 800).
MAX_THUMBNAIL_SIDE = 800

_MIMETYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*")
_MXC = re.compile(r"mxc://[A-Za-z0-9.:\[\]-]+/[A-Za-z0-9_-]+")

#: A media item: an upload key of the session (uint), an ``mxc://`` URI, or the event that carries
#: it as (room handle, event reference).
MediaReference = Union[int, str, tuple[int, int]]


def _mimetype(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(MEDIA_TYPES):
            raise CodecError("unknown media type index")
        return MEDIA_TYPES[value]
    text = _text(value, "type", MAX_MIMETYPE).lower()
    if not _MIMETYPE.fullmatch(text):
        raise CodecError("type must be a mimetype")
    return text


def _media(value: Any, what: str) -> MediaReference:
    if isinstance(value, str):
        if not _MXC.fullmatch(value):
            raise CodecError(f"{what} must be an upload key, mxc:// URI or [room, ref]")
        return value
    if isinstance(value, list) and len(value) == 2:
        return _uint(value[0], "room"), _uint(value[1], "event reference")
    return _uint(value, what)


def _media_item(media: MediaReference) -> Any:
    return list(media) if isinstance(media, tuple) else media


@dataclasses.dataclass(frozen=True)
class UploadHeader:
    """What the first block of an upload starts with: whose, where to, its key, type and name."""

    handle: bytes = dataclasses.field(repr=False)
    #: None: to the media repository only, no event (an avatar, say).
    room: int | None = 0
    key: int = 0
    mimetype: str = MEDIA_TYPES[0]
    filename: str | None = None

    def encode(self) -> bytes:
        kind: int | str = MEDIA_TYPES.index(self.mimetype) if self.mimetype in MEDIA_TYPES else self.mimetype
        items: list[Any] = [self.handle, self.room, self.key, kind]
        if self.filename is not None:
            items.append(self.filename)
        return cbor2.dumps(items)

    @property
    def msgtype(self) -> str:
        return msgtype_for(self.mimetype)


def decode_upload_header(payload: bytes) -> tuple[UploadHeader, int]:
    """The header at the start of ``payload`` and where the media starts (raises `CodecError`)."""
    if not payload or payload[0] >> 5 != 4:  # CBOR major type 4: an array
        raise CodecError("upload: expected a CBOR array header")
    stream = io.BytesIO(payload[:MAX_HEADER])
    try:
        items = cbor2.CBORDecoder(stream).decode()
    except (cbor2.CBORDecodeError, ValueError, EOFError):
        raise CodecError("upload: header incomplete or malformed (it must fit the first block)") from None
    if not isinstance(items, list) or len(items) not in (4, 5):
        raise CodecError("upload: expected [handle, room, key, type(, name)]")
    name = items[4] if len(items) == 5 else None
    room = None if items[1] is None else _uint(items[1], "room")
    header = UploadHeader(_handle(items[0]), room, _uint(items[2], "key"), _mimetype(items[3]),
                          None if name is None else _text(name, "name", MAX_FILENAME))
    return header, stream.tell()


def content_format_of(content_type: str) -> int:
    """An image's CoAP Content-Format: 42 (octet-stream) unless CoAP numbers its type (RFC 7252 §12.3)."""
    return {"image/png": 23, "image/jpeg": 22, "image/gif": 21}.get(content_type.split(";")[0].strip(), 42)


def is_mxc(value: str) -> bool:
    return _MXC.fullmatch(value) is not None


def msgtype_for(mimetype: str) -> str:
    """The Matrix msgtype of a media message of ``mimetype``."""
    major = mimetype.partition("/")[0]
    return {"image": "m.image", "audio": "m.audio", "video": "m.video"}.get(major, "m.file")


@dataclasses.dataclass(frozen=True)
class ProfileRequest:
    """POST ``[handle, name(, avatar)]`` (null: unchanged); FETCH ``[handle]``."""

    handle: bytes = dataclasses.field(repr=False)
    name: str | None = None
    avatar: MediaReference | None = None

    def encode(self) -> bytes:
        items: list[Any] = [self.handle, self.name]
        if self.avatar is not None:
            items.append(_media_item(self.avatar))
        return cbor2.dumps(items)

    @classmethod
    def decode(cls, payload: bytes) -> "ProfileRequest":
        items = _array(payload, (2, 3), "profile")
        name, avatar = items[1], items[2] if len(items) == 3 else None
        if name is None and avatar is None:
            raise CodecError("nothing to set: name and avatar are null")
        return cls(_handle(items[0]), None if name is None else _text(name, "name", MAX_NAME),
                   None if avatar is None else _media(avatar, "avatar"))


def encode_display_name(name: str | None) -> bytes:
    return cbor2.dumps(name)


def decode_display_name(payload: bytes) -> str | None:
    value = cbor2.loads(payload) if payload else None
    return None if value is None else _text(value, "name", MAX_NAME)


@dataclasses.dataclass(frozen=True)
class ThumbnailRequest:
    """FETCH ``[handle, media, width, height(, crop)]``: ``crop`` 1 crops, 0 (default) scales."""

    handle: bytes = dataclasses.field(repr=False)
    media: MediaReference = 0
    width: int = 96
    height: int = 96
    crop: bool = False

    def encode(self) -> bytes:
        items: list[Any] = [self.handle, _media_item(self.media), self.width, self.height]
        if self.crop:
            items.append(1)
        return cbor2.dumps(items)

    @classmethod
    def decode(cls, payload: bytes) -> "ThumbnailRequest":
        items = _array(payload, (4, 5), "thumbnail")
        width, height = _uint(items[2], "width"), _uint(items[3], "height")
        if not (1 <= width <= MAX_THUMBNAIL_SIDE and 1 <= height <= MAX_THUMBNAIL_SIDE):
            raise CodecError(f"width and height must be 1..{MAX_THUMBNAIL_SIDE}")
        crop = _uint(items[4], "crop") if len(items) == 5 else 0
        if crop > 1:
            raise CodecError("crop must be 0 or 1")
        return cls(_handle(items[0]), _media(items[1], "media"), width, height, bool(crop))


# ---------------------------------------------------------------------- image headers

_PNG = b"\x89PNG\r\n\x1a\n"
#: JPEG start-of-frame markers (they carry the size); not DHT (C4), JPG (C8) or DAC (CC).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
#: JPEG markers without a length field.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})
#: Segments looked at before giving up on a JPEG (a real one has its frame header early).
_JPEG_SEGMENTS = 64


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG, GIF or JPEG image from its header; None for anything else."""
    if data.startswith(_PNG) and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return _positive(width, height)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return _positive(width, height)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    return None


def _positive(width: int, height: int) -> tuple[int, int] | None:
    return (width, height) if width > 0 and height > 0 else None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    offset = 2
    for _ in range(_JPEG_SEGMENTS):
        while offset < len(data) and data[offset] == 0xFF and offset + 1 < len(data) and data[offset + 1] == 0xFF:
            offset += 1  # fill bytes
        if offset + 4 > len(data) or data[offset] != 0xFF:
            return None
        marker = data[offset + 1]
        if marker in _JPEG_STANDALONE:
            offset += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before it
            return None
        (length,) = struct.unpack(">H", data[offset + 2:offset + 4])
        if marker in _JPEG_SOF:
            if offset + 9 > len(data) or length < 7:
                return None
            height, width = struct.unpack(">HH", data[offset + 5:offset + 9])
            return _positive(width, height)
        if length < 2:
            return None
        offset += 2 + length
    return None
