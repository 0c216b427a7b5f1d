"""Media and profile in the compact profile end to end, against the real Synapse, checked on its side
over HTTP: a 100 KB image uploaded block-wise by the reference client through the 30 %-loss,
reordering relay arrives once and byte-identical (SHA-256 of what Synapse serves over authenticated
media) as ``m.image`` with the right ``info``; an upload interrupted and restarted with the same key,
and one repeated after it finished, make no second event; display name and avatar are set (the avatar
from an upload); a thumbnail comes block-wise; and every frame but the media is within its budget."""

from __future__ import annotations

import hashlib
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from comatrix.client import CompactDevice, DeviceState, NoResponse, Reply, UdpCoap
from comatrix.coap import wire
from comatrix.coap.blockwise import Block
from comatrix.coap.numbers import Code, OptionNumber
from comatrix.compact.codec import BUDGETS
from comatrix.compact.mediawire import UploadHeader
from support.gateway import GatewayProcess
from support.images import png
from support.synapse import MatrixUser, SynapseServer, _quote
from test_compact_profile import Recorder, measured, sensor_user
from test_device_client import device_cli
from test_reliability import FAST_COAP, NO_LIMITS, LossyRelay

pytestmark = pytest.mark.integration

CLIENT = "/_matrix/client/v3"


def media_events(synapse: SynapseServer, user: MatrixUser, room_id: str) -> list[dict[str, Any]]:
    """The room's m.room.message events that carry media, oldest first."""
    body = synapse.request("GET", f"{CLIENT}/rooms/{_quote(room_id)}/messages", token=user.access_token,
                           query={"dir": "f", "limit": "100", "filter": '{"types":["m.room.message"]}'})
    return [event for event in body["chunk"] if "url" in event["content"]]


def download(synapse: SynapseServer, user: MatrixUser, mxc: str) -> bytes:
    """What Synapse serves for ``mxc`` over authenticated media."""
    server, _, media_id = mxc.removeprefix("mxc://").partition("/")
    status, body = synapse.request_raw("GET", f"/_matrix/client/v1/media/download/{_quote(server)}/"
                                              f"{urllib.parse.quote(media_id)}", token=user.access_token)
    assert status == 200 and isinstance(body, bytes), (status, body)
    return body


class Interrupted(UdpCoap):
    """The reference client's link, lost for good after ``exchanges`` requests (a device out of range)."""

    def __init__(self, gateway: str, exchanges: int, **kwargs: Any) -> None:
        super().__init__(gateway, **kwargs)
        self.left = exchanges

    def request(self, code: int, path: str, **kwargs: Any) -> Reply:
        if self.left == 0:
            raise NoResponse("link lost")
        self.left -= 1
        return super().request(code, path, **kwargs)


def test_a_100_kb_image_through_a_lossy_reordering_link_arrives_once_byte_identical(
        make_gateway, synapse: SynapseServer, synapse_user) -> None:
    user = synapse_user("camera")
    room_id = synapse.create_room(user.access_token)
    gw = make_gateway(config_text=FAST_COAP + NO_LIMITS, log_level="info")
    state = DeviceState(None)
    with UdpCoap(gw.uri()) as direct:
        setup = CompactDevice(direct, state)
        setup.login(user.localpart, user.password)
        setup.join(room_id)
    image = png(184, 184, seed=7)  # noise: ~100 KB even compressed
    assert 95_000 < len(image) < 110_000
    with LossyRelay(("127.0.0.1", gw.port), loss=0.3, reorder=0.1, seed=20261202) as relay:
        with UdpCoap(f"coap://127.0.0.1:{relay.port}", ack_timeout=0.1) as lossy:
            CompactDevice(lossy, state, retries=10).upload(room_id, image, "image/png", "trap.png", key=1)
        stats = relay.stats
    for way in ("up", "down"):
        assert stats[way]["dropped"] > 0.2 * (stats[way]["dropped"] + stats[way]["forwarded"]), stats
        assert stats[way]["reordered"] > 0, stats
    [event] = media_events(synapse, user, room_id)
    content = event["content"]
    assert content["msgtype"] == "m.image" and content["body"] == "trap.png"
    assert content["info"] == {"mimetype": "image/png", "size": len(image), "w": 184, "h": 184}
    assert hashlib.sha256(download(synapse, user, content["url"])).hexdigest() == hashlib.sha256(image).hexdigest()

    # Interrupted after 20 blocks (the link is lost), then restarted with the same key: one more event.
    second = png(64, 64, seed=8)
    with pytest.raises(NoResponse):
        with Interrupted(gw.uri(), 20) as dying:
            CompactDevice(dying, state, retries=0).upload(room_id, second, "image/png", "second.png", key=2,
                                                          szx=2)
    assert len(media_events(synapse, user, room_id)) == 1
    with UdpCoap(gw.uri()) as again:
        device = CompactDevice(again, state)
        device.upload(room_id, second, "image/png", "second.png", key=2, szx=2)
        device.upload(room_id, second, "image/png", "second.png", key=2, szx=2)  # after it finished, too
    events = media_events(synapse, user, room_id)
    assert len(events) == 2 and events[1]["content"]["body"] == "second.png"
    assert download(synapse, user, events[1]["content"]["url"]) == second


def test_upload_profile_and_thumbnail_with_comatrix_device_within_budget(
        unlimited_gateway: GatewayProcess, synapse: SynapseServer, tmp_path: Path) -> None:
    user = sensor_user(synapse)
    room_id = synapse.create_room(user.access_token)
    run = device_cli(unlimited_gateway, tmp_path / "device.json")
    run("login", user.localpart, "--", user.password)
    run("join", room_id)
    picture = tmp_path / "doorbell.png"
    picture.write_bytes(png(120, 90, seed=3))
    assert "upload key 7" in run("upload", room_id, str(picture), "--key", "7").stderr
    run("upload", room_id, str(picture), "--key", "7")  # the same key again: no second event
    [event] = media_events(synapse, user, room_id)
    assert event["content"]["info"] == {"mimetype": "image/png", "size": picture.stat().st_size, "w": 120, "h": 90}

    avatar = tmp_path / "face.png"
    avatar.write_bytes(png(16, 16, seed=5))
    run("profile", "--name", "Door camera", "--avatar", str(avatar))
    profile = synapse.request("GET", f"{CLIENT}/profile/{_quote(user.user_id)}", token=user.access_token)
    assert profile["displayname"] == "Door camera"
    assert download(synapse, user, profile["avatar_url"]) == avatar.read_bytes()
    assert run("profile").stdout.strip() == "Door camera"
    assert len(media_events(synapse, user, room_id)) == 1  # the avatar went to the media repository only

    # The same through the client API, every frame recorded: a thumbnail block-wise, the profile in budget.
    recorder = Recorder()
    state = DeviceState(tmp_path / "device.json")
    device = CompactDevice(UdpCoap(unlimited_gateway.uri(), trace=recorder), DeviceState.load(state.path))
    mark = recorder.mark()
    thumbnail = device.thumbnail(7, 32, 32, crop=True, szx=2)
    assert thumbnail.payload[:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb", b"\xff\xd8\xff\xe1")
    downs = [wire.decode(data) for way, data in recorder.since(mark) if way == "down"]
    assert len(downs) > 2 and all(Block.decode(_option(d, OptionNumber.BLOCK2)).szx == 2 for d in downs)
    assert all(len(data) - len(wire.decode(data).payload) <= BUDGETS["thumbnail"][1]
               for way, data in recorder.since(mark) if way == "down")
    assert max(len(data) for way, data in recorder.since(mark) if way == "up") <= BUDGETS["thumbnail"][0]
    measured(recorder, "profile", lambda: device.set_profile("Door cam 2"))
    assert measured(recorder, "profile", device.display_name) == "Door cam 2"

    # An upload: the first request carries at most 64 bytes besides the media, every answer fits 64.
    mark = recorder.mark()
    small = png(20, 20, seed=4)
    device.upload(room_id, small, "image/png", None, key=8, szx=2)
    got = recorder.since(mark)
    first = next(data for way, data in got if way == "up")
    media_bytes = len(wire.decode(first).payload) - len(UploadHeader(device.handle, 0, 8, "image/png").encode())
    assert len(first) - media_bytes <= BUDGETS["upload"][0]
    assert max(len(data) for way, data in got if way == "down") <= BUDGETS["upload"][1]
    assert len(media_events(synapse, user, room_id)) == 2
    device.coap.close()


def _option(message: wire.Datagram, number: int) -> bytes:
    return next(value for num, value in message.options if num == number)
