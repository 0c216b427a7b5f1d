"""Media and profile in the compact profile, through the real CoAP layer and store, against the in-repo
fake homeserver: Block1 uploads (info, idempotency by key, restarts, bounded memory with a share per
device, 4.13 with Size1, bad headers answered 4.00 before the homeserver is asked), thumbnails
block-wise, display name and avatar; and the pure parts (header layout, image sizes)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import cbor2
import pytest

from comatrix.coap import wire
from comatrix.coap.blockwise import Block
from comatrix.coap.errors import encode_uint
from comatrix.coap.numbers import Code, OptionNumber
from comatrix.coap.testing import Harness, option
from comatrix.compact.codec import BUDGETS, PATHS, CodecError, HandleRequest
from comatrix.compact.media import UPLOAD_IDLE, media_content, upload_txn_id
from comatrix.compact.mediawire import (MEDIA_TYPES, ProfileRequest, ThumbnailRequest, UploadHeader,
                                        decode_display_name, decode_upload_header, encode_display_name, image_size,
                                        msgtype_for)
from comatrix.config import ConfigError, LimitSettings, build_config
from comatrix.discovery import build_site
from comatrix.errors import error_response
from comatrix.plugins import compact, media

import support.world
from support.images import gif_header, jpeg_header, png
from test_bad_input_profiles import CBOR, CF, OTHER_PEER, site_context

PLUGINS = [compact.compact_login, compact.compact_join, compact.compact_messages, media.compact_upload,
           media.compact_profile]
DEVICE = ("2001:db8::a", 5683)
SECOND = ("2001:db8::b", 5683)
REQUEST_TAG = 292
UPLOAD = PATHS["upload"]


def datagram_size(message: wire.Datagram) -> int:
    return len(wire.encode(message.mtype, message.code, message.mid, message.token, list(message.options),
                           message.payload))


class MediaWorld(support.world.World):
    """A compact site with uploads and profile; user ``@d`` logged in from `DEVICE`, joined to ``#lab``."""

    def __init__(self, limits: LimitSettings | None = None) -> None:
        super().__init__()
        context = site_context(self)
        if limits is not None:
            context = dataclasses.replace(context, config=dataclasses.replace(context.config, limits=limits))
        self.reactor = context.reactor
        self.harness = Harness(build_site(PLUGINS, context, error_response))
        self.handle = self.login(DEVICE)
        self.room_handle = cbor2.loads(self.call(Code.POST, "join", [self.handle, self.alias]).payload)
        self._tokens = iter(range(1, 1 << 16))

    def login(self, peer: Any) -> bytes:
        return bytes(cbor2.loads(self.call(Code.POST, "login", ["d", "pw"], peer=peer).payload))

    def call(self, code: int, op: str, body: Any, peer: Any = DEVICE,
             options: Sequence[tuple[int, bytes]] = ()) -> wire.Datagram:
        [reply] = self.harness.send(code, (PATHS[op],), payload=cbor2.dumps(body), peer=peer,
                                    options=[(CF, bytes([CBOR]))] + list(options))
        return reply

    def block(self, body: bytes, num: int, szx: int, tag: bytes, *, peer: Any = DEVICE, size1: bool = True,
              token: bytes = b"\x01") -> wire.Datagram:
        size = 16 << szx
        more = (num + 1) * size < len(body)
        options = [(OptionNumber.BLOCK1, Block(num, more, szx).encode()), (REQUEST_TAG, tag)]
        if num == 0 and size1:
            options.append((OptionNumber.SIZE1, encode_uint(len(body))))
        [reply] = self.harness.send(Code.POST, (UPLOAD,), payload=body[num * size:(num + 1) * size], peer=peer,
                                    options=options, token=token)
        return reply

    def upload(self, body: bytes, szx: int = 2, tag: bytes = b"\x07", *, peer: Any = DEVICE,
               upto: int | None = None) -> list[wire.Datagram]:
        """Every block of ``body`` (or the first ``upto``), each as a new exchange; the replies."""
        count = -(-len(body) // (16 << szx))
        return [self.block(body, num, szx, tag, peer=peer) for num in range(count if upto is None else upto)]

    def media_calls(self) -> list[Any]:
        return [r for r in self.homeserver.requests if r.path[:4] == ("_matrix", "media", "v3", "upload")]

    def events(self, msgtype: str | None = None) -> list[dict[str, Any]]:
        return [event for event in self.homeserver.rooms[self.room] if event["type"] == "m.room.message"
                and (msgtype is None or event["content"].get("msgtype") == msgtype)]


def header(world: MediaWorld, key: int, mimetype: str = "image/png", name: str | None = "cam.png",
           room: int | None = -1) -> bytes:
    return UploadHeader(world.handle, world.room_handle if room == -1 else room, key, mimetype, name).encode()


# ---------------------------------------------------------------------- pure parts


def test_image_sizes_come_from_png_gif_and_jpeg_headers() -> None:
    assert image_size(png(37, 21)) == (37, 21)
    assert image_size(gif_header(640, 480)) == (640, 480)
    assert image_size(jpeg_header(1024, 768)) == (1024, 768)
    progressive = jpeg_header(300, 200).replace(b"\xff\xc0", b"\xff\xc2")
    assert image_size(progressive) == (300, 200)


@pytest.mark.parametrize("data", [b"", b"hello", png(4, 4)[:20], gif_header(0, 5), jpeg_header(8, 8)[:30],
                                  b"\xff\xd8\xff\xda\x00\x02", b"\xff\xd8\xff\xe0\x00\x00",
                                  b"\xff\xd8" + b"\xff\xe0\x00\x02" * 100])
def test_image_size_of_anything_else_is_none(data: bytes) -> None:
    assert image_size(data) is None


def test_upload_header_round_trip_and_where_the_media_starts() -> None:
    handle = bytes(range(8))
    for mimetype in ("image/png", "application/x-custom"):
        encoded = UploadHeader(handle, 3, 70000, mimetype, "a.bin").encode()
        decoded, start = decode_upload_header(encoded + b"\x89PNG...")
        assert decoded == UploadHeader(handle, 3, 70000, mimetype, "a.bin") and start == len(encoded)
    # A known type is one byte on air: [h'..', 0, 1, 2] = 1 + 9 + 1 + 1 + 1 bytes.
    assert UploadHeader(handle, 0, 1, "image/png").encode() == b"\x84\x48" + handle + b"\x00\x01\x02"
    assert decode_upload_header(UploadHeader(handle, None, 1, "image/png").encode())[0].room is None
    assert msgtype_for("image/png") == "m.image" and msgtype_for("audio/ogg") == "m.audio"
    assert msgtype_for("video/mp4") == "m.video" and msgtype_for("application/pdf") == "m.file"


@pytest.mark.parametrize("payload", [b"", b"\x01", cbor2.dumps({"a": 1}), cbor2.dumps([b"x" * 8, 0, 1]),
                                     cbor2.dumps([b"x" * 7, 0, 1, 2]), cbor2.dumps([b"x" * 8, -1, 1, 2]),
                                     cbor2.dumps([b"x" * 8, 0, 1, len(MEDIA_TYPES)]),
                                     cbor2.dumps([b"x" * 8, 0, 1, "not a type"]),
                                     cbor2.dumps([b"x" * 8, 0, 1, 2, 5]), cbor2.dumps([b"x" * 8, 0, 1, 2])[:-1],
                                     b"\x9f" + b"\x00" * 400])
def test_bad_upload_headers_are_codec_errors(payload: bytes) -> None:
    with pytest.raises(CodecError):
        decode_upload_header(payload)


def test_profile_and_thumbnail_layouts() -> None:
    handle = bytes(8)
    assert ProfileRequest.decode(ProfileRequest(handle, "Cam 1").encode()) == ProfileRequest(handle, "Cam 1")
    assert ProfileRequest.decode(ProfileRequest(handle, None, 5).encode()).avatar == 5
    assert ProfileRequest.decode(cbor2.dumps([handle, None, "mxc://hs/abc"])).avatar == "mxc://hs/abc"
    for bad in ([handle, None], [handle, None, "http://x/y"], [handle, ""], [handle]):
        with pytest.raises(CodecError):
            ProfileRequest.decode(cbor2.dumps(bad))
    request = ThumbnailRequest(handle, 4, 96, 64, True)
    assert ThumbnailRequest.decode(request.encode()) == request
    for bad in ([handle, 4, 0, 64], [handle, 4, 96, 801], [handle, "x", 96, 96], [handle, 4, 96, 96, 2]):
        with pytest.raises(CodecError):
            ThumbnailRequest.decode(cbor2.dumps(bad))
    assert decode_display_name(cbor2.dumps(None)) is None and decode_display_name(cbor2.dumps("Cam")) == "Cam"


def test_media_content_names_type_size_and_image_dimensions() -> None:
    image = png(5, 3)
    content = media_content(UploadHeader(bytes(8), 0, 9, "image/png"), image, "mxc://hs/m1")
    assert content == {"msgtype": "m.image", "body": "upload-9.png", "url": "mxc://hs/m1",
                       "info": {"mimetype": "image/png", "size": len(image), "w": 5, "h": 3}}
    audio = media_content(UploadHeader(bytes(8), 0, 9, "audio/ogg", "bird.ogg"), b"OggS", "mxc://hs/m2")
    assert audio["msgtype"] == "m.audio" and audio["body"] == "bird.ogg" and "w" not in audio["info"]


# ---------------------------------------------------------------------- uploads through the CoAP layer


def test_block_wise_upload_sends_one_m_image_with_info_and_every_frame_within_budget() -> None:
    world = MediaWorld()
    image = png(40, 30)
    body = header(world, 7) + image
    replies = world.upload(body)
    assert [reply.code for reply in replies[:-1]] == [Code.CONTINUE] * (len(replies) - 1)
    assert replies[-1].code == Code.CHANGED
    for num, reply in enumerate(replies):
        assert Block.decode(option(reply, OptionNumber.BLOCK1) or b"").num == num
        assert datagram_size(reply) <= BUDGETS["upload"][1]
    [stored] = world.homeserver.media.values()
    assert stored == (image, "image/png")
    [event] = world.events()
    assert event["content"] == {"msgtype": "m.image", "body": "cam.png", "url": event["content"]["url"],
                                "info": {"mimetype": "image/png", "size": len(image), "w": 40, "h": 30}}
    assert event["content"]["url"].startswith("mxc://test.local/")
    [send] = [r for r in world.homeserver.requests if r.path[3:6] == ("rooms", world.room, "send")]
    session_id = 1
    assert send.path[-1] == upload_txn_id(session_id, 7)


def test_the_first_request_carries_at_most_64_bytes_besides_the_media() -> None:
    world = MediaWorld()
    image = png(40, 30)
    first = header(world, 4_000_000_000) + image
    szx = 2
    options = [(OptionNumber.URI_PATH, UPLOAD.encode()), (OptionNumber.BLOCK1, Block(0, True, szx).encode()),
               (REQUEST_TAG, (4_000_000_000).to_bytes(4, "big")), (OptionNumber.SIZE1, encode_uint(len(first)))]
    datagram = wire.encode(0, Code.POST, 1, b"\x01\x02", options, first[:16 << szx])
    media_in_it = (16 << szx) - (len(first) - len(image))
    assert len(datagram) - media_in_it <= BUDGETS["upload"][0]


def test_the_same_key_again_makes_no_second_event_nor_a_second_media_upload() -> None:
    world = MediaWorld()
    body = header(world, 11) + png(20, 20)
    world.upload(body)
    again = world.block(body, 0, 2, b"\x0b", token=b"\x02")
    assert again.code == Code.CHANGED  # done before: answered at once, from the first block
    assert len(world.media_calls()) == 1 and len(world.events()) == 1


def test_an_upload_interrupted_and_restarted_with_the_same_key_makes_one_event() -> None:
    world = MediaWorld()
    body = header(world, 12) + png(30, 30)
    world.upload(body, upto=5)  # the device stops (out of range, rebooted) after five blocks
    lost = world.block(body, 9, 2, b"\x0c")  # a block the gateway cannot place
    assert lost.code == Code.REQUEST_ENTITY_INCOMPLETE
    replies = world.upload(body)  # from the first block again, same key
    assert replies[-1].code == Code.CHANGED
    assert len(world.events()) == 1 and len(world.media_calls()) == 1
    # The final block repeated (its answer lost): the gateway has no upload to add it to (4.08), so the
    # device starts again, and its first block is answered "done" at once.
    last = len(replies) - 1
    assert world.block(body, last, 2, b"\x0c").code == Code.REQUEST_ENTITY_INCOMPLETE
    assert world.block(body, 0, 2, b"\x0c").code == Code.CHANGED
    assert len(world.events()) == 1 and len(world.media_calls()) == 1


def test_a_repeated_block_is_taken_once() -> None:
    world = MediaWorld()
    body = header(world, 13) + png(16, 16)
    world.upload(body, upto=3)
    assert world.block(body, 2, 2, b"\x07").code == Code.CONTINUE  # its 2.31 was lost: sent again
    replies = [world.block(body, num, 2, b"\x07") for num in range(3, -(-len(body) // 64))]
    assert replies[-1].code == Code.CHANGED
    [stored] = world.homeserver.media.values()
    assert stored[0] == body[len(header(world, 13)):]


def test_too_large_is_4_13_with_size1_and_reaches_nothing() -> None:
    limits = LimitSettings(max_upload_size=2048, upload_memory_per_device=4096, upload_memory=8192)
    world = MediaWorld(limits)
    world.homeserver.requests.clear()
    body = header(world, 1) + bytes(3000)
    refused = world.block(body, 0, 2, b"\x01")
    assert refused.code == Code.REQUEST_ENTITY_TOO_LARGE and option(refused, OptionNumber.SIZE1) == encode_uint(2048)
    # Without Size1 the cap holds as the blocks come.
    replies = [world.block(body, num, 2, b"\x02", size1=False) for num in range(40)]
    [stop] = [reply for reply in replies if reply.code != Code.CONTINUE][:1]
    assert stop.code == Code.REQUEST_ENTITY_TOO_LARGE and option(stop, OptionNumber.SIZE1) == encode_uint(2048)
    assert replies.index(stop) == 2048 // 64  # the block that went beyond 2048 bytes of media
    whole = world.harness.send(Code.POST, (UPLOAD,), payload=body, peer=DEVICE)[0]
    assert whole.code == Code.REQUEST_ENTITY_TOO_LARGE
    assert world.homeserver.requests == []


def test_reassembly_memory_has_a_share_per_device_and_a_total() -> None:
    limits = LimitSettings(max_upload_size=4096, upload_memory_per_device=8192, upload_memory=12288)
    world = MediaWorld(limits)
    second = world.login(SECOND)
    body = header(world, 1) + bytes(4000)
    assert world.block(body, 0, 2, b"\x01").code == Code.CONTINUE
    assert world.block(body, 0, 2, b"\x02").code == Code.CONTINUE
    refused = world.block(body, 0, 2, b"\x03")  # a third 4 KiB reservation: beyond the device's share
    assert refused.code == Code.TOO_MANY_REQUESTS and option(refused, OptionNumber.MAX_AGE) is not None
    other = UploadHeader(second, None, 1, "image/png").encode() + bytes(4000)
    assert world.block(other, 0, 2, b"\x01", peer=SECOND).code == Code.CONTINUE  # another device: its own share
    full = world.block(other, 0, 2, b"\x02", peer=SECOND)
    assert full.code == Code.SERVICE_UNAVAILABLE and option(full, OptionNumber.MAX_AGE) is not None
    world.reactor.advance(UPLOAD_IDLE + 1)  # abandoned uploads free their memory
    assert world.block(body, 0, 2, b"\x03").code == Code.CONTINUE
    assert world.block(body, 1, 2, b"\x01").code == Code.REQUEST_ENTITY_INCOMPLETE  # that one is gone


@pytest.mark.parametrize("first", [b"", b"\x00" * 64, cbor2.dumps(["d", 0, 1, 2]) + bytes(40),
                                   cbor2.dumps([bytes(8), 0, 1, 99]) + bytes(40),
                                   cbor2.dumps([bytes(8), 0, 1, "no/such type"]) + bytes(40)])
def test_bad_upload_input_is_4_00_and_reaches_nothing(first: bytes) -> None:
    world = MediaWorld()
    world.homeserver.requests.clear()
    options = [(OptionNumber.BLOCK1, Block(0, len(first) == 64, 2).encode())] if first else []
    [reply] = world.harness.send(Code.POST, (UPLOAD,), payload=first, peer=DEVICE, options=options)
    assert reply.code == Code.BAD_REQUEST and 0 < len(reply.payload) <= 48
    assert world.homeserver.requests == []


def test_unknown_session_room_and_foreign_address_are_refused_before_the_homeserver() -> None:
    world = MediaWorld()
    world.homeserver.requests.clear()
    cases = [(UploadHeader(bytes(8), 0, 1, "image/png").encode(), DEVICE, Code.UNAUTHORIZED),
             (header(world, 1, room=9), DEVICE, Code.NOT_FOUND),
             (header(world, 1), OTHER_PEER, Code.FORBIDDEN)]
    for first, peer, code in cases:
        [reply] = world.harness.send(Code.POST, (UPLOAD,), payload=first + b"GIF89a", peer=peer)
        assert reply.code == code
    assert world.homeserver.requests == []


def test_a_small_file_goes_in_one_request_and_media_only_makes_no_event() -> None:
    world = MediaWorld()
    [reply] = world.harness.send(Code.POST, (UPLOAD,), payload=header(world, 2, "image/gif") + gif_header(3, 2), peer=DEVICE)
    assert reply.code == Code.CHANGED
    [event] = world.events("m.image")
    assert event["content"]["info"] == {"mimetype": "image/gif", "size": 13, "w": 3, "h": 2}
    [reply] = world.harness.send(Code.POST, (UPLOAD,), payload=header(world, 3, room=None) + b"avatar", peer=DEVICE)
    assert reply.code == Code.CHANGED and len(world.events()) == 1 and len(world.homeserver.media) == 2


# ---------------------------------------------------------------------- thumbnails and profile


def test_a_thumbnail_comes_block_wise_by_upload_key() -> None:
    world = MediaWorld()
    image = png(24, 24)
    world.upload(header(world, 21) + image)
    body, num = b"", 0
    while True:
        reply = world.call(Code.FETCH, "upload", [world.handle, 21, 96, 96],
                           options=[(OptionNumber.BLOCK2, Block(num, False, 2).encode())])
        assert reply.code == Code.CONTENT and option(reply, OptionNumber.CONTENT_FORMAT) == bytes([23])
        body += reply.payload
        block = Block.decode(option(reply, OptionNumber.BLOCK2) or b"")
        if not block.more:
            break
        num += 1
    assert body == image and num > 1  # the fake homeserver serves the image itself as its thumbnail
    [call] = [r for r in world.homeserver.requests if r.path[:5] == ("_matrix", "client", "v1", "media", "thumbnail")]
    assert call.query == {"width": ["96"], "height": ["96"], "method": ["scale"]}
    assert world.call(Code.FETCH, "upload", [world.handle, 99, 96, 96]).code == Code.NOT_FOUND


def test_a_thumbnail_of_the_media_of_an_event_by_its_event_reference() -> None:
    world = MediaWorld()
    image = png(12, 12)
    world.upload(header(world, 22) + image)
    latest = [world.handle, world.room_handle]
    [_sender, body, _ts, cursor] = cbor2.loads(world.call(Code.FETCH, "messages", latest).payload)
    assert body == "cam.png"
    reply = world.call(Code.FETCH, "upload", [world.handle, [world.room_handle, cursor], 32, 32])
    assert reply.code == Code.CONTENT and reply.payload == image
    unknown = world.call(Code.FETCH, "upload", [world.handle, [world.room_handle, cursor + 5], 32, 32])
    assert unknown.code == Code.NOT_FOUND and unknown.payload == b"unknown event reference"
    assert world.call(Code.FETCH, "upload", [world.handle, [7, cursor], 32, 32]).code == Code.NOT_FOUND
    world.homeserver.add_event(world.room, world.user_id, "m.room.message", {"msgtype": "m.text", "body": "hi"})
    text_cursor = cbor2.loads(world.call(Code.FETCH, "messages", latest).payload)[3]
    no_media = world.call(Code.FETCH, "upload", [world.handle, [world.room_handle, text_cursor], 32, 32])
    assert no_media.code == Code.NOT_FOUND and no_media.payload == b"event carries no media"
    request = ThumbnailRequest(world.handle, (0, 3), 32, 32)
    assert ThumbnailRequest.decode(request.encode()) == request


def test_profile_display_name_and_avatar_from_an_upload_key_or_an_mxc() -> None:
    world = MediaWorld()
    assert decode_display_name(world.call(Code.FETCH, "profile", [world.handle]).payload) is None
    assert world.call(Code.POST, "profile", [world.handle, "Door camera"]).code == Code.CHANGED
    assert decode_display_name(world.call(Code.FETCH, "profile", [world.handle]).payload) == "Door camera"
    world.harness.send(Code.POST, (UPLOAD,), payload=header(world, 5, room=None) + png(8, 8), peer=DEVICE)
    assert world.call(Code.POST, "profile", [world.handle, None, 5]).code == Code.CHANGED
    [(media_id, _)] = world.homeserver.media.items()
    assert world.homeserver.profiles[world.user_id] == {"displayname": "Door camera",
                                                        "avatar_url": f"mxc://test.local/{media_id}"}
    assert world.call(Code.POST, "profile", [world.handle, None, "mxc://elsewhere.org/abc"]).code == Code.CHANGED
    assert world.homeserver.profiles[world.user_id]["avatar_url"] == "mxc://elsewhere.org/abc"
    world.homeserver.requests.clear()
    assert world.call(Code.POST, "profile", [world.handle, None, 77]).code == Code.NOT_FOUND  # unknown key
    for bad in ([world.handle], [world.handle, None], [world.handle, 5], [world.handle, None, "https://x"]):
        reply = world.call(Code.POST, "profile", bad)
        assert reply.code == Code.BAD_REQUEST and reply.payload
    assert world.homeserver.requests == []


# ---------------------------------------------------------------------- the examples of docs/protocol.rst

SPEC_HANDLE = bytes.fromhex("8c1f3a9e02d47b65")
SPEC_TOKEN = bytes.fromhex("4a7e")


def _hex(data: bytes) -> str:
    return " ".join(f"{byte:02x}" for byte in data)


def _spec_text() -> str:
    text = (Path(__file__).resolve().parents[2] / "docs" / "protocol.rst").read_text()
    return " ".join(text.split())


def test_the_byte_by_byte_examples_of_the_spec_are_what_the_code_sends() -> None:
    spec = _spec_text()
    head = UploadHeader(SPEC_HANDLE, 0, 1, "image/png").encode()
    body_size = len(head) + 1000
    first_options = [(OptionNumber.URI_PATH, b"$"), (OptionNumber.BLOCK1, Block(0, True, 2).encode()),
                     (OptionNumber.SIZE1, encode_uint(body_size)), (REQUEST_TAG, b"\x01")]
    first = wire.encode(0, Code.POST, 0x1234, SPEC_TOKEN, first_options, head + png(20, 20)[:64 - len(head)])
    assert len(first) == 83 and len(first) - (64 - len(head)) == 32 <= BUDGETS["upload"][0]
    lines = ["42 02 12 34 4a 7e b1 24", "d1 03 0a", "d2 14 03 f5", "d1 db 01", "ff",
             "84 48 8c 1f 3a 9e 02 d4 7b 65 00 01 02"]  # as the spec shows them, one per line
    assert _hex(first[:len(first) - (64 - len(head))]) == " ".join(lines)
    assert all(line in spec for line in lines)
    answers = {
        "62 5f 12 34 4a 7e d1 0e 0a": wire.encode(2, Code.CONTINUE, 0x1234, SPEC_TOKEN,
                                                  [(OptionNumber.BLOCK1, Block(0, True, 2).encode())], b""),
        "62 44 12 36 4a 7e d1 0e f2": wire.encode(2, Code.CHANGED, 0x1236, SPEC_TOKEN,
                                                  [(OptionNumber.BLOCK1, Block(15, False, 2).encode())], b""),
        "62 8d 12 34 4a 7e c0 d3 23 04 00 00 ff 74 6f 6f 20 6c 61 72 67 65":
            wire.encode(2, Code.REQUEST_ENTITY_TOO_LARGE, 0x1234, SPEC_TOKEN,
                        [(OptionNumber.CONTENT_FORMAT, b""), (OptionNumber.SIZE1, encode_uint(262144))], b"too large"),
        "42 05 12 34 4a 7e b1 24 11 3c b1 02 ff | 84 48 8c 1f 3a 9e 02 d4 7b 65 01 18 60 18 60":
            wire.encode(0, Code.FETCH, 0x1234, SPEC_TOKEN, [(OptionNumber.URI_PATH, b"$"), (CF, bytes([CBOR])),
                                                            (OptionNumber.BLOCK2, Block(0, False, 2).encode())],
                        ThumbnailRequest(SPEC_HANDLE, 1, 96, 96).encode()),
        "42 02 12 34 4a 7e b1 3d 11 3c ff 83 48 8c 1f 3a 9e 02 d4 7b 65 f6 01":
            wire.encode(0, Code.POST, 0x1234, SPEC_TOKEN, [(OptionNumber.URI_PATH, b"="), (CF, bytes([CBOR]))],
                        ProfileRequest(SPEC_HANDLE, None, 1).encode()),
        "42 05 12 34 4a 7e b1 3d 11 3c ff 81 48 8c 1f 3a 9e 02 d4 7b 65":
            wire.encode(0, Code.FETCH, 0x1234, SPEC_TOKEN, [(OptionNumber.URI_PATH, b"="), (CF, bytes([CBOR]))],
                        HandleRequest(SPEC_HANDLE).encode()),
        "62 45 12 34 4a 7e c1 3c ff 6b 44 6f 6f 72 20 63 61 6d 65 72 61":
            wire.encode(2, Code.CONTENT, 0x1234, SPEC_TOKEN, [(CF, bytes([CBOR]))], encode_display_name("Door camera")),
    }
    for text, datagram in answers.items():
        parts = text.split(" | ")  # lines of the spec, with its comments between them
        assert _hex(datagram) == " ".join(parts) and all(part in spec for part in parts)
        assert len(datagram) <= 64
    set_name = wire.encode(0, Code.POST, 0x1234, SPEC_TOKEN, [(OptionNumber.URI_PATH, b"="), (CF, bytes([CBOR]))],
                           ProfileRequest(SPEC_HANDLE, "Door camera").encode())
    assert len(set_name) == 33 and "6b 44 6f 6f 72 20 63 61 6d 65 72 61" in spec


def test_upload_limits_are_validated_config_keys() -> None:
    config = build_config({"limits": {"max_upload_size": 1024, "upload_memory_per_device": 2048,
                                      "upload_memory": 4096}})
    assert (config.limits.max_upload_size, config.limits.upload_memory_per_device,
            config.limits.upload_memory) == (1024, 2048, 4096)
    assert LimitSettings().max_upload_size == 256 * 1024
    for bad in ({"max_upload_size": 0}, {"max_upload_size": 600_000}, {"upload_memory": 1024},
                {"max_upload_size": 1.5}, {"max_upload_bytes": 1}):
        with pytest.raises(ConfigError):
            build_config({"limits": bad})
