"""The compact profile's media and profile resources: ``/$`` (upload, thumbnail) and ``/=`` (profile).

``POST /$`` takes a Block1 upload block by block (the CoAP layer hands each one
over: ``streams_block1``) and answers 2.31 Continue until the last, then 2.04 once
the media is in the homeserver's repository and its event is sent
(`comatrix.compact.media`).  Blocks that carry more to come never reach the
homeserver, so they cost no rate-limit token; the first and the last do.
``FETCH /$`` answers a thumbnail (authenticated media), block-wise as the device
asks.  ``POST /=`` sets the display name and the avatar, ``FETCH /=`` reads the
display name.  The sizes are ``[limits]`` settings: ``max_upload_size``,
``upload_memory``, ``upload_memory_per_device``.
"""

from __future__ import annotations

from twisted.internet import defer

from comatrix.coap.blockwise import Block
from comatrix.coap.errors import BadRequest, RequestEntityTooLarge, UnsupportedContentFormat
from comatrix.coap.message import Request, Response
from comatrix.coap.numbers import Code, ContentFormat, OptionNumber
from comatrix.coap.resource import CoapResource
from comatrix.coap.server import REQUEST_TAG
from comatrix.compact import mediawire
from comatrix.compact.codec import PATHS, HandleRequest
from comatrix.compact.media import MediaOperations
from comatrix.compact.mediawire import ProfileRequest, ThumbnailRequest, decode_upload_header
from comatrix.identity import acting_for, device_of
from comatrix.interfaces import PluginContext
from comatrix.plugins.compact import CompactResource, _cbor, _link
from comatrix.resources import ResourcePlugin

#: Key of the shared `MediaOperations` in ``PluginContext.state``.
STATE_KEY = "compact-media"


def media_operations(resource: CompactResource) -> MediaOperations:
    """The one `MediaOperations` of this gateway (made by whichever media resource is built first)."""
    operations = resource.context.state.get(STATE_KEY)
    if not isinstance(operations, MediaOperations):
        operations = resource.context.state[STATE_KEY] = MediaOperations(resource.service)
    return operations


def _block1(request: Request) -> Block | None:
    raw = request.option(OptionNumber.BLOCK1)
    return None if raw is None else Block.decode(raw)


def _size1(request: Request) -> int | None:
    raw = request.option(OptionNumber.SIZE1)
    return None if raw is None or len(raw) > 4 else int.from_bytes(raw, "big")


class UploadResource(CompactResource):
    """POST: a Block1 upload (header || media) -> m.image/m.file/m.audio/m.video; FETCH: a thumbnail."""

    link = _link("upload", "Compact upload: [handle, room, key, type(, name)] || media (Block1); "
                           "FETCH: thumbnail")
    streams_block1 = True

    def __init__(self, context: PluginContext) -> None:
        super().__init__(context)
        self.media = media_operations(self)

    def render(self, request: Request) -> "defer.Deferred[Response]":
        block = _block1(request) if request.method == Code.POST else None
        if block is not None and block.num > 0 and block.more:
            # A block in the middle reaches nothing but memory: no rate-limit token for it.
            with acting_for(request):
                return CoapResource.render(self, request)
        return super().render(request)

    @staticmethod
    def upload_body(request: Request) -> bytes:
        if request.content_format not in (None, ContentFormat.OCTET_STREAM):
            raise UnsupportedContentFormat("expected no Content-Format or 42")
        return request.payload

    async def render_POST(self, request: Request) -> Response:
        block = _block1(request)
        owner = device_of(request).key
        tag = request.option(REQUEST_TAG) or b""
        if block is not None and block.num > 0:
            upload = self.media.uploads.add(owner, tag, block, self.upload_body(request))
            if block.more:
                return Response(code=Code.CONTINUE)
            session = await self.service.session(upload.header.handle, request.peer, request.security)
            if session.id != upload.session_id:
                raise BadRequest("upload: session changed")
            await self.media.finish(session, upload.header, bytes(upload.media))
            return Response(code=Code.CHANGED)
        payload = self.upload_body(request)
        header, start = decode_upload_header(payload)
        session = await self.service.session(header.handle, request.peer, request.security)
        if header.room is not None:
            await self.service.room(session, header.room)
        if self.media.completed(session.id, header.key) is not None:
            return Response(code=Code.CHANGED)  # done before (its answer was lost): nothing is sent again
        if block is None or not block.more:  # the whole upload in one request
            media = payload[start:]
            if len(media) > self.media.uploads.limits.max_upload_size:
                raise RequestEntityTooLarge(size1=self.media.uploads.limits.max_upload_size)
            await self.media.finish(session, header, media)
            return Response(code=Code.CHANGED)
        if len(payload) != block.size:
            raise BadRequest("block size mismatch")
        size1 = _size1(request)
        media_size = None if size1 is None else max(0, size1 - start)
        self.media.uploads.start(owner, tag, session.id, header, media_size, payload[start:], len(payload))
        return Response(code=Code.CONTINUE)

    async def render_FETCH(self, request: Request) -> Response:
        fetch = ThumbnailRequest.decode(self.payload(request))
        session = await self.service.session(fetch.handle, request.peer, request.security)
        data, content_type = await self.media.thumbnail(session, fetch.media, fetch.width, fetch.height, fetch.crop)
        return Response(code=Code.CONTENT, payload=data, content_format=mediawire.content_format_of(content_type))


class ProfileResource(CompactResource):
    """POST ``[handle, name(, avatar)]``: display name and avatar; FETCH ``[handle]``: the display name."""

    link = _link("profile", "Compact profile: [handle, name, avatar]; FETCH [handle]: display name")

    def __init__(self, context: PluginContext) -> None:
        super().__init__(context)
        self.media = media_operations(self)

    async def render_POST(self, request: Request) -> Response:
        change = ProfileRequest.decode(self.payload(request))
        session = await self.service.session(change.handle, request.peer, request.security)
        await self.media.set_profile(session, change.name, change.avatar)
        return Response(code=Code.CHANGED)

    async def render_FETCH(self, request: Request) -> Response:
        fetch = HandleRequest.decode(self.payload(request))
        session = await self.service.session(fetch.handle, request.peer, request.security)
        return _cbor(mediawire.encode_display_name(await self.media.display_name(session)), Code.CONTENT)


compact_upload = ResourcePlugin("compact-upload", (PATHS["upload"],), UploadResource)
compact_profile = ResourcePlugin("compact-profile", (PATHS["profile"],), ProfileResource)
