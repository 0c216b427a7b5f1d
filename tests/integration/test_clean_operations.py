"""The clean form of issue 13's operations against the real Synapse, driven by libcoap: each one's
effect checked on the Synapse side over HTTP (state, membership, relations, receipts, profile, media),
and bad input refused with 4.00 before the homeserver is asked."""

from __future__ import annotations

import hashlib
import struct
import zlib
from typing import Any
from urllib.parse import quote

import cbor2
import pytest

from support.coap_clients import libcoap
from support.gateway import GatewayProcess
from support.synapse import MatrixUser, SynapseServer

pytestmark = pytest.mark.integration

CBOR = 60
TOKEN_OPTION = 256
CLIENT = "/_matrix/client/v3"


def png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + bytes(n % 256 for n in range(width)) for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 0)) + chunk(b"IEND", b""))


class Device:
    """libcoap requests to the gateway with a user's token."""

    def __init__(self, gateway: GatewayProcess, user: MatrixUser) -> None:
        self.gateway = gateway
        self.user = user

    def call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        payload = None if body is None else cbor2.dumps(body)
        return libcoap(method, self.gateway.uri(path), payload=payload,
                       content_format=None if body is None else CBOR,
                       options=[(TOKEN_OPTION, self.user.access_token)], **kwargs)

    def ok(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        result = self.call(method, path, body, **kwargs)
        assert result.code in ("2.01", "2.04", "2.05"), result
        return result.cbor() if result.payload else None


def state(synapse: SynapseServer, user: MatrixUser, room_id: str, event_type: str, key: str = "") -> Any:
    return synapse.request("GET", f"{CLIENT}/rooms/{quote(room_id, safe='')}/state/{event_type}/{quote(key)}",
                           token=user.access_token)


def membership(synapse: SynapseServer, user: MatrixUser, room_id: str, member: str) -> str:
    return state(synapse, user, room_id, "m.room.member", member)["membership"]


def test_rooms_and_membership(gateway: GatewayProcess, synapse: SynapseServer, synapse_user) -> None:
    owner, guest = synapse_user("owner"), synapse_user("guest")
    device, guest_device = Device(gateway, owner), Device(gateway, guest)
    room_id = device.ok("post", "create", {"name": "Greenhouse", "topic": "air", "invite": [guest.user_id]},
                        )["room_id"]
    assert state(synapse, owner, room_id, "m.room.name")["name"] == "Greenhouse"
    assert state(synapse, owner, room_id, "m.room.join_rules")["join_rule"] == "invite"
    assert membership(synapse, owner, room_id, guest.user_id) == "invite"
    assert guest_device.ok("get", "invitations") == [{"room_id": room_id, "inviter": owner.user_id,
                                                      "name": "Greenhouse"}]
    device.ok("post", "room", {"room_id": room_id, "topic": "air and soil"})
    assert state(synapse, owner, room_id, "m.room.topic")["topic"] == "air and soil"
    assert device.ok("get", f"room?room={room_id}") == {"room_id": room_id, "name": "Greenhouse",
                                                        "topic": "air and soil", "joined": 1, "membership": "join"}
    alias = f"#gh{owner.localpart}:{synapse.server_name}"
    synapse.set_alias(owner.access_token, alias, room_id)
    assert device.ok("get", "room?alias=" + quote(alias)) == {"room_id": room_id}

    guest_device.ok("post", "leave", {"room_id": room_id})  # declines
    assert membership(synapse, owner, room_id, guest.user_id) == "leave"
    device.ok("post", "invite", {"room_id": room_id, "user_id": guest.user_id})
    synapse.join(guest.access_token, room_id)
    assert sorted(device.ok("get", f"members?room={room_id}")) == sorted([owner.user_id, guest.user_id])
    device.ok("post", "kick", {"room_id": room_id, "user_id": guest.user_id, "reason": "test over"})
    kicked = state(synapse, owner, room_id, "m.room.member", guest.user_id)
    assert kicked == {"membership": "leave", "reason": "test over"}
    public = device.ok("post", "create", {"preset": "public_chat"})["room_id"]
    assert state(synapse, owner, public, "m.room.join_rules")["join_rule"] == "public"


def test_history_reactions_redactions_and_receipts(gateway: GatewayProcess, synapse: SynapseServer,
                                                   synapse_user) -> None:
    owner = synapse_user("hist")
    device = Device(gateway, owner)
    room_id = synapse.create_room(owner.access_token)
    sent = [synapse.send_text(owner.access_token, room_id, f"reading {n}") for n in range(5)]
    first = device.ok("get", f"history?room={room_id}&limit=2")
    assert [event["body"] for event in first["chunk"]] == ["reading 4", "reading 3"]
    second = device.ok("get", f"history?room={room_id}&limit=2&from={quote(first['end'])}")
    assert [event["body"] for event in second["chunk"]] == ["reading 2", "reading 1"]
    forward = device.ok("get", f"history?room={room_id}&dir=f&limit=50&from={quote(second['end'])}")
    assert [event["event_id"] for event in forward["chunk"]][-4:] == sent[1:]

    target = sent[-1]
    body = {"room_id": room_id, "event_id": target, "key": "👍", "txn_id": "r1"}
    reaction = device.ok("post", "react", body)["event_id"]
    assert device.ok("post", "react", body)["event_id"] == reaction  # a retry: the same event
    relations = synapse.request("GET", f"/_matrix/client/v1/rooms/{quote(room_id)}/relations/{quote(target)}",
                                token=owner.access_token)["chunk"]
    assert [event["event_id"] for event in relations] == [reaction]
    device.ok("post", "react", {**body, "remove": True})
    reacted = synapse.request("GET", f"{CLIENT}/rooms/{quote(room_id)}/event/{quote(reaction)}",
                              token=owner.access_token)
    assert reacted["content"] == {}  # redacted

    device.ok("post", "read", {"room_id": room_id, "event_id": target})
    sync = synapse.request("GET", f"{CLIENT}/sync", token=owner.access_token)
    receipts = [event["content"] for event in sync["rooms"]["join"][room_id]["ephemeral"]["events"]
                if event["type"] == "m.receipt"]
    assert any(owner.user_id in content.get(target, {}).get("m.read", {}) for content in receipts)

    redaction = device.ok("post", "redact", {"room_id": room_id, "event_id": sent[0], "reason": "typo",
                                             "txn_id": "x1"})["event_id"]
    redacted = synapse.request("GET", f"{CLIENT}/rooms/{quote(room_id)}/event/{quote(sent[0])}",
                               token=owner.access_token)
    assert redacted["content"] == {} and redacted["unsigned"]["redacted_because"]["event_id"] == redaction


def test_profile_and_block1_upload(gateway: GatewayProcess, synapse: SynapseServer, synapse_user) -> None:
    owner = synapse_user("cam")
    device = Device(gateway, owner)
    room_id = synapse.create_room(owner.access_token)
    image = png(120, 80)
    assert len(image) > 5000
    query = f"upload?room={room_id}&type=image/png&name=snap.png&txn_id=u1"
    uploaded = _upload(device, query, image)
    [event] = synapse.text_messages(owner.access_token, room_id, limit=5)
    assert event["event_id"] == uploaded["event_id"]
    assert event["content"] == {"msgtype": "m.image", "body": "snap.png", "url": uploaded["content_uri"],
                                "info": {"mimetype": "image/png", "size": len(image), "w": 120, "h": 80}}
    server, media_id = uploaded["content_uri"].removeprefix("mxc://").split("/")
    served = synapse.request_raw("GET", f"/_matrix/client/v1/media/download/{server}/{media_id}",
                                 token=owner.access_token)
    assert hashlib.sha256(served[1] if isinstance(served[1], bytes) else b"").hexdigest() == \
        hashlib.sha256(image).hexdigest()
    again = _upload(device, query, image)
    assert again["event_id"] == uploaded["event_id"]  # the same txn_id: no second event
    assert len(synapse.text_messages(owner.access_token, room_id, limit=5)) == 1

    media_only = _upload(device, "upload?type=application/octet-stream", b"\x01" * 100)
    assert set(media_only) == {"content_uri"}
    device.ok("post", "profile", {"displayname": "Camera trap", "avatar_url": uploaded["content_uri"]})
    profile = synapse.request("GET", f"{CLIENT}/profile/{quote(owner.user_id)}")
    assert profile == {"displayname": "Camera trap", "avatar_url": uploaded["content_uri"]}
    assert device.ok("get", "profile") == profile

    # A thumbnail of it, fetched block-wise (Block2) in 64-byte blocks, as a device with a display would.
    mxc = quote(uploaded["content_uri"], safe="")
    thumbnail = device.call("get", f"upload?mxc={mxc}&width=32&height=32&method=crop", block_size=64)
    assert (thumbnail.code, thumbnail.content_format) == ("2.05", 23), thumbnail
    assert thumbnail.payload.startswith(b"\x89PNG") and len(thumbnail.payload) > 64
    assert device.call("get", "upload?mxc=https://example.org/x&width=32&height=32").code == "4.00"


def test_send_location_reply_and_edit(gateway: GatewayProcess, synapse: SynapseServer, synapse_user) -> None:
    owner = synapse_user("kinds")
    device = Device(gateway, owner)
    room_id = synapse.create_room(owner.access_token)

    def sent(**fields: Any) -> Any:
        event_id = device.ok("post", "send", {"room_id": room_id, **fields})["event_id"]
        return synapse.request("GET", f"{CLIENT}/rooms/{quote(room_id)}/event/{quote(event_id)}",
                               token=owner.access_token)["content"]

    where = sent(txn_id="k1", msgtype="m.location", body="trap 3", geo_uri="geo:48.2082,16.3738")
    assert where == {"msgtype": "m.location", "body": "trap 3", "geo_uri": "geo:48.2082,16.3738"}
    first = device.ok("post", "send", {"room_id": room_id, "txn_id": "k2", "body": "door open"})["event_id"]
    reply = sent(txn_id="k3", body="checked", reply_to=first)
    assert reply["m.relates_to"] == {"m.in_reply_to": {"event_id": first}}
    edit = sent(txn_id="k4", msgtype="m.notice", body="door closed", replaces=first)
    assert edit == {"msgtype": "m.notice", "body": "* door closed",
                    "m.new_content": {"msgtype": "m.notice", "body": "door closed"},
                    "m.relates_to": {"rel_type": "m.replace", "event_id": first}}


def _upload(device: Device, path: str, media: bytes) -> Any:
    result = libcoap("post", device.gateway.uri(path), payload=media, block_size=256,
                     options=[(TOKEN_OPTION, device.user.access_token)])
    assert result.code == "2.04", result
    return result.cbor()


@pytest.mark.parametrize("method, path, body", [
    ("post", "create", {"preset": "trusted_private_chat"}),
    ("post", "invite", {"room_id": "!nowhere:localhost", "user_id": "nobody"}),
    ("post", "react", {"room_id": "!nowhere:localhost", "event_id": "notanid", "key": "+"}),
    ("get", "history?room=!nowhere:localhost&limit=500", None),
])
def test_bad_input_is_refused_before_synapse(gateway: GatewayProcess, synapse_user, method: str, path: str,
                                              body: Any) -> None:
    device = Device(gateway, synapse_user("bad"))
    result = device.call(method, path, body)
    assert result.code == "4.00" and result.payload, result
