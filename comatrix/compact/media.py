"""Media and profile in the compact profile: Block1 uploads to the media repository, thumbnails,
display name and avatar.

An upload (``docs/protocol.rst``, "Media") arrives block by block (RFC 7959 Block1);
the CoAP layer hands each block to the upload resource as it comes
(``streams_block1``), and `UploadTable` reassembles it in memory that is bounded
three ways: one upload's media (``[limits] max_upload_size``, 4.13 with Size1), one
device's uploads together (``upload_memory_per_device``, 4.29) and all of them
(``upload_memory``, 5.03).  An upload reserves what its Size1 announces (else the
largest allowed) when it starts, so the caps hold before the bytes come.  An
upload left unfinished for `UPLOAD_IDLE` seconds is dropped.

When the last block is in, `MediaOperations.finish` posts the media to the
homeserver (``POST /_matrix/media/v3/upload``) and sends an ``m.image``,
``m.file``, ``m.audio`` or ``m.video`` event with ``info`` (mimetype, size;
width and height of PNG, GIF and JPEG images).  Its transaction id is a function
of (session, upload key) only, so an upload restarted with the same key never
makes a second event; and an upload key whose event was sent is answered at once
(`completed`), without uploading the media again.  The last `KEYS_KEPT` upload
keys of each session are remembered with their ``mxc://`` URI: a profile avatar
or a thumbnail may name an upload by its key.  No CoAP here beyond the profile's
error types.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Hashable

from comatrix.coap.errors import (BadRequest, NotFound, RequestEntityIncomplete, RequestEntityTooLarge,
                                  ServiceUnavailable, TooManyRequests)
from comatrix.coap.blockwise import Block
from comatrix.compact.mediawire import MediaReference, UploadHeader, image_size
from comatrix.compact.service import CompactService
from comatrix.config import LimitSettings
from comatrix.logs import get_logger
from comatrix.matrix import api
from comatrix.matrix.errors import InvalidResponse, MatrixError
from comatrix.store import SessionRecord

__all__ = ["MediaOperations", "UploadTable", "Upload", "upload_txn_id", "UPLOAD_IDLE", "KEYS_KEPT"]

log = get_logger(__name__)

#: Seconds an unfinished upload is kept without a new block (then its memory is freed).
UPLOAD_IDLE = 120.0
#: Least memory an upload reserves (bytes): tiny reservations would let a device hold many.
MIN_RESERVATION = 1024
#: Upload keys remembered per session (with their mxc URI), and sessions remembered.
KEYS_KEPT = 16


def upload_txn_id(session_id: int, key: int) -> str:
    """The Matrix transaction id of an upload's event: a function of (session, key) only."""
    return f"u{session_id}.{key}"


@dataclasses.dataclass
class Upload:
    """An upload being reassembled: its header, the media so far, what it reserved."""

    owner: Hashable
    session_id: int
    header: UploadHeader
    #: Bytes of the whole body (header and media) received so far, and the media part of them.
    received: int
    media: bytearray
    reserved: int
    touched: float
    #: Length of the last block taken: a repeat of it (a retry with a new Message ID) is no error.
    last_block: int = 0


class UploadTable:
    """Uploads in progress, keyed by (device, Request-Tag); bounded in bytes, with a share per device."""

    def __init__(self, limits: LimitSettings, clock: Any) -> None:
        self.limits = limits
        self.clock = clock
        self._uploads: dict[tuple[Hashable, bytes], Upload] = {}

    def usage(self, owner: Hashable | None = None) -> int:
        """Bytes reserved by ``owner`` (None: by everyone)."""
        return sum(upload.reserved for upload in self._uploads.values() if owner is None or upload.owner == owner)

    def __len__(self) -> int:
        return len(self._uploads)

    def _expire(self) -> None:
        stale = self.clock.seconds() - UPLOAD_IDLE
        for key in [key for key, upload in self._uploads.items() if upload.touched < stale]:
            log.info("Compact upload of {device} abandoned: dropped", device=key[0])
            del self._uploads[key]

    def _wait(self, uploads: list[Upload]) -> int:
        """Seconds until the oldest of ``uploads`` idles out (at least 1)."""
        oldest = min((upload.touched for upload in uploads), default=self.clock.seconds())
        return max(1, math.ceil(oldest + UPLOAD_IDLE - self.clock.seconds()))

    def start(self, owner: Hashable, tag: bytes, session_id: int, header: UploadHeader, media_size: int | None,
              first: bytes, body_bytes: int) -> Upload:
        """A new upload (replacing ``owner``'s one with the same tag): its first block taken, memory
        reserved; 4.13, 4.29 or 5.03 when it does not fit."""
        maximum = self.limits.max_upload_size
        if (media_size is not None and media_size > maximum) or len(first) > maximum:
            raise RequestEntityTooLarge(size1=maximum)
        self._uploads.pop((owner, tag), None)
        self._expire()
        reserve = max(MIN_RESERVATION, media_size if media_size is not None else maximum)
        own = [upload for upload in self._uploads.values() if upload.owner == owner]
        if sum(upload.reserved for upload in own) + reserve > self.limits.upload_memory_per_device:
            raise TooManyRequests("upload memory share in use", retry_after=self._wait(own))
        if self.usage() + reserve > self.limits.upload_memory:
            log.warn("Compact upload of {device} refused: upload memory full", device=owner)
            raise ServiceUnavailable("upload memory full", max_age=self._wait(list(self._uploads.values())))
        upload = Upload(owner, session_id, header, body_bytes, bytearray(first), reserve, self.clock.seconds(),
                        body_bytes)
        self._uploads[(owner, tag)] = upload
        return upload

    def add(self, owner: Hashable, tag: bytes, block: Block, payload: bytes) -> Upload:
        """Take a later block; the upload (complete when ``block.more`` is false, then no longer kept)."""
        key = (owner, tag)
        upload = self._uploads.get(key)
        if upload is not None and upload.touched < self.clock.seconds() - UPLOAD_IDLE:
            del self._uploads[key]
            upload = None
        if upload is None:
            raise RequestEntityIncomplete("no upload in progress: start again")
        if block.offset + len(payload) == upload.received and len(payload) == upload.last_block:
            upload.touched = self.clock.seconds()
            return upload  # the last block again (its answer was lost): taken already
        if block.offset != upload.received:
            del self._uploads[key]
            raise RequestEntityIncomplete("block out of order: start again")
        if block.more and len(payload) != block.size:
            del self._uploads[key]
            raise BadRequest("block size mismatch")
        if len(upload.media) + len(payload) > min(upload.reserved, self.limits.max_upload_size):
            del self._uploads[key]
            raise RequestEntityTooLarge(size1=self.limits.max_upload_size)
        upload.media += payload
        upload.received += len(payload)
        upload.last_block = len(payload)
        upload.touched = self.clock.seconds()
        if not block.more:
            del self._uploads[key]
        return upload


@dataclasses.dataclass(frozen=True)
class Uploaded:
    """A finished upload: its media URI and the event that carries it ("" for media only)."""

    mxc: str
    event_id: str


def media_content(header: UploadHeader, media: bytes, mxc: str) -> dict[str, Any]:
    """The content of the event that carries an upload (pure)."""
    info: dict[str, Any] = {"mimetype": header.mimetype, "size": len(media)}
    if header.mimetype.startswith("image/"):
        size = image_size(media)
        if size is not None:
            info["w"], info["h"] = size
    return {"msgtype": header.msgtype, "body": header.filename or _default_name(header), "url": mxc, "info": info}


def _default_name(header: UploadHeader) -> str:
    subtype = header.mimetype.partition("/")[2].split("+")[0].split(".")[-1]
    return f"upload-{header.key}.{subtype or 'bin'}"


class MediaOperations:
    """Uploads, thumbnails and profile of compact sessions (one per gateway)."""

    def __init__(self, service: CompactService) -> None:
        self.service = service
        self.matrix = service.matrix
        self.uploads = UploadTable(service.limits, service.reactor)
        #: Session id -> upload key -> what it made (the last `KEYS_KEPT` per session).
        self._done: collections.OrderedDict[int, collections.OrderedDict[int, Uploaded]] = collections.OrderedDict()

    def completed(self, session_id: int, key: int) -> Uploaded | None:
        keys = self._done.get(session_id)
        return None if keys is None else keys.get(key)

    def _remember(self, session_id: int, key: int, uploaded: Uploaded) -> None:
        keys = self._done.setdefault(session_id, collections.OrderedDict())
        self._done.move_to_end(session_id)
        keys[key] = uploaded
        while len(keys) > KEYS_KEPT:
            keys.popitem(last=False)
        while len(self._done) > self.service.limits.max_sessions:
            self._done.popitem(last=False)

    async def finish(self, session: SessionRecord, header: UploadHeader, media: bytes) -> Uploaded:
        """Post the media to the homeserver and send its event (once per session and key)."""
        done = self.completed(session.id, header.key)
        if done is not None:
            return done
        room = None if header.room is None else await self.service.room(session, header.room)
        if not media:
            raise BadRequest("upload: no media")
        mxc = await self.matrix.upload(session.access_token, media, header.mimetype, header.filename)
        event_id = ""
        if room is not None:
            event_id = await self.matrix.send_message(session.access_token, room.room_id,
                                                      media_content(header, media, mxc),
                                                      upload_txn_id(session.id, header.key))
        uploaded = Uploaded(mxc, event_id)
        self._remember(session.id, header.key, uploaded)
        log.info("Compact session {id} uploaded {size} bytes of {type} as {event}", id=session.id, size=len(media),
                 type=header.mimetype, event=event_id)
        return uploaded

    async def mxc_of(self, session: SessionRecord, media: MediaReference) -> str:
        """An upload key of the session (4.04 when not among the last kept), an mxc URI, or the event
        that carries the media (room handle, event reference) -> the URI."""
        if isinstance(media, str):
            return media
        if isinstance(media, tuple):
            return await self._mxc_of_event(session, *media)
        done = self.completed(session.id, media)
        if done is None:
            raise NotFound("unknown upload key")
        return done.mxc

    async def _mxc_of_event(self, session: SessionRecord, handle: int, reference: int) -> str:
        room = await self.service.room(session, handle)
        event_id = await self.service.store.event_id_at(session.id, handle, reference)
        if event_id is None:
            raise NotFound("unknown event reference")
        body = await self.matrix.request(api.context(session.access_token, room.room_id, event_id))
        event = body.get("event")
        content = event.get("content") if isinstance(event, dict) else None
        url = content.get("url") if isinstance(content, dict) else None
        if not isinstance(url, str) or not url.startswith("mxc://"):
            raise NotFound("event carries no media")
        return url

    async def thumbnail(self, session: SessionRecord, media: MediaReference, width: int, height: int,
                        crop: bool) -> tuple[bytes, str]:
        """A thumbnail of an upload (its key), of the media of an event, or of any ``mxc://`` URI:
        (image bytes, content type)."""
        mxc = await self.mxc_of(session, media)
        body = await self.matrix.request(api.thumbnail(session.access_token, mxc, width, height,
                                                       "crop" if crop else "scale"))
        content = body.get("content")
        if not isinstance(content, bytes):
            raise InvalidResponse("thumbnail answer without content")
        return content, str(body.get("content_type") or "application/octet-stream")

    # ------------------------------------------------------------------ profile

    async def set_profile(self, session: SessionRecord, name: str | None, avatar: MediaReference | None) -> None:
        avatar_url = None if avatar is None else await self.mxc_of(session, avatar)
        if name is not None:
            await self.matrix.set_displayname(session.access_token, session.user_id, name)
        if avatar_url is not None:
            await self.matrix.set_avatar_url(session.access_token, session.user_id, avatar_url)

    async def display_name(self, session: SessionRecord) -> str | None:
        try:
            body = await self.matrix.request(api.displayname(session.access_token, session.user_id))
        except MatrixError as error:
            if error.http_status == 404:
                return None
            raise
        name = body.get("displayname")
        return name if isinstance(name, str) and name else None
