"""The gateway against a real Synapse, driven by real CoAP clients (libcoap and aiocoap).

Covers the device journey register -> login -> join -> send -> getmsg -> logout in
both the original CoMatrix form (Proxy-Uri + option 256) and the clean form, plus
aliases and idempotent sends.
"""

from __future__ import annotations

import secrets

import cbor2
import pytest

from support.coap_clients import aiocoap_request, libcoap
from support.gateway import GatewayProcess
from support.secrets import remember
from support.synapse import MatrixUser, SynapseServer

pytestmark = pytest.mark.integration

CBOR = 60
TOKEN_OPTION = 256
PROXY_URI = 35


def token_option(token: str) -> list[tuple[int, str]]:
    return [(TOKEN_OPTION, token)]


def room_with_invite(synapse: SynapseServer, owner: MatrixUser, invitee: str, **body: object) -> str:
    room_id = synapse.create_room(owner.access_token, **body)
    synapse.invite(owner.access_token, room_id, invitee)
    return room_id


def test_device_journey_original_and_clean_forms(gateway: GatewayProcess, synapse: SynapseServer,
                                                 synapse_user) -> None:
    username = "dev" + secrets.token_hex(5)
    password = remember(secrets.token_urlsafe(16))

    # register with libcoap, the original map including the dummy auth stage
    registered = libcoap("post", gateway.uri("register"), content_format=CBOR, payload=cbor2.dumps(
        {"username": username, "password": password, "auth": {"type": "m.login.dummy"}}))
    assert registered.code == "2.04", registered
    session = registered.cbor()
    assert set(session) == {"access_token", "user_id", "device_id"}
    user_id = session["user_id"]
    assert user_id == f"@{username}:{synapse.server_name}"
    assert synapse.whoami(session["access_token"]) == user_id

    # login with aiocoap, the original identifier map
    logged_in = aiocoap_request("POST", gateway.uri("login"), content_format=CBOR, payload=cbor2.dumps({
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": username},
        "password": password}))
    assert logged_in.code == "2.04"
    token = logged_in.cbor()["access_token"]
    assert token != session["access_token"]

    # a second user creates a room and invites the device; the device joins (original form)
    owner = synapse_user("owner")
    room_id = room_with_invite(synapse, owner, user_id)
    joined = libcoap("post", gateway.uri("join"),
                     options=[(TOKEN_OPTION, token), (PROXY_URI, f"coap://ignored.example/K/{room_id}")])
    assert (joined.code, joined.cbor()) == ("2.04", {"room_id": room_id})

    # send, clean form, and check in Synapse over HTTP
    sent = libcoap("post", gateway.uri("send"), content_format=CBOR, options=token_option(token),
                   payload=cbor2.dumps({"room_id": room_id, "txn_id": "t-1", "body": "hello clean"}))
    assert sent.code == "2.04"
    event_id = sent.cbor()["event_id"]
    latest = synapse.text_messages(owner.access_token, room_id, limit=1)[0]
    assert (latest["event_id"], latest["sender"], latest["content"]) == (
        event_id, user_id, {"msgtype": "m.text", "body": "hello clean"})

    # send, original form: Proxy-Uri /9/<room>/<type>/<txn>, Matrix content as the body
    original = libcoap("put", gateway.uri("send"), content_format=CBOR, options=[
        (TOKEN_OPTION, token), (PROXY_URI, f"coap://h/9/{room_id}/m.room.message/t-2")],
        payload=cbor2.dumps({"msgtype": "m.notice", "body": "hello original"}))
    assert original.code == "2.04"

    # getmsg: original form with libcoap, clean form with aiocoap
    got = libcoap("get", gateway.uri("getmsg"),
                  options=[(TOKEN_OPTION, token), (PROXY_URI, f"coap://h/E/{room_id}")])
    assert got.code == "2.05"
    # as the original gateway answered: sender and body only (one 802.15.4 frame)
    assert got.cbor() == {"sender": user_id, "body": "hello original"}
    got_clean = aiocoap_request("GET", gateway.uri(f"getmsg?room={room_id}"),
                                options=[(TOKEN_OPTION, "Bearer " + token)])
    message = got_clean.cbor()
    assert got_clean.code == "2.05" and (message["sender"], message["body"]) == (user_id, "hello original")
    assert message["event_id"].startswith("$") and message["origin_server_ts"] > 0

    # logout, then the old token is refused
    assert libcoap("post", gateway.uri("logout"), options=token_option(token)).code == "2.04"
    refused = libcoap("get", gateway.uri(f"getmsg?room={room_id}"), options=token_option(token))
    assert (refused.code, refused.payload.partition(b":")[0]) == ("4.01", b"M_UNKNOWN_TOKEN")


def test_join_and_send_by_alias(gateway: GatewayProcess, synapse: SynapseServer, synapse_user) -> None:
    device, owner = synapse_user("dev"), synapse_user("owner")
    room_id = room_with_invite(synapse, owner, device.user_id)
    alias = synapse.full_alias("lab" + secrets.token_hex(4))
    synapse.set_alias(owner.access_token, alias, room_id)
    joined = libcoap("post", gateway.uri("join"), content_format=CBOR,
                     options=token_option(device.access_token), payload=cbor2.dumps({"room_id": alias}))
    assert (joined.code, joined.cbor()) == ("2.04", {"room_id": room_id})
    sent = aiocoap_request("POST", gateway.uri("send"), content_format=CBOR,
                           options=token_option(device.access_token),
                           payload=cbor2.dumps({"room_id": alias, "body": "via alias"}))
    assert sent.code == "2.04"
    assert synapse.text_messages(owner.access_token, room_id, limit=1)[0]["content"]["body"] == "via alias"


def test_same_txn_id_makes_one_event(gateway: GatewayProcess, synapse: SynapseServer, synapse_user) -> None:
    device = synapse_user("dev")
    room_id = synapse.create_room(device.access_token)
    body = cbor2.dumps({"room_id": room_id, "txn_id": "reading-42", "body": "21.5"})
    answers = [libcoap("post", gateway.uri("send"), content_format=CBOR,
                       options=token_option(device.access_token), payload=body) for _ in range(3)]
    assert {a.code for a in answers} == {"2.04"}
    assert len({a.cbor()["event_id"] for a in answers}) == 1
    bodies = [e["content"]["body"] for e in synapse.text_messages(device.access_token, room_id)]
    assert bodies.count("21.5") == 1


def test_getmsg_skips_state_events_and_empty_room_is_404(gateway: GatewayProcess, synapse: SynapseServer,
                                                          synapse_user) -> None:
    device = synapse_user("dev")
    room_id = synapse.create_room(device.access_token, name="empty")
    empty = libcoap("get", gateway.uri(f"getmsg?room={room_id}"), options=token_option(device.access_token))
    assert (empty.code, empty.payload) == ("4.04", b"no message")
    synapse.send_text(device.access_token, room_id, "before topic")
    synapse.send_event(device.access_token, room_id, "m.reaction", {})  # a non-message event
    got = libcoap("get", gateway.uri(f"getmsg?room={room_id}"), options=token_option(device.access_token))
    assert got.code == "2.05" and got.cbor()["body"] == "before topic"


def test_time_and_well_known_core(gateway: GatewayProcess) -> None:
    text = libcoap("get", gateway.uri("time"))
    assert text.code == "2.05" and text.payload.isdigit()
    as_cbor = aiocoap_request("GET", gateway.uri("time"), accept=CBOR)
    assert as_cbor.code == "2.05" and isinstance(as_cbor.cbor(), int)
    core = libcoap("get", gateway.uri(".well-known/core")).text()
    for path in ("register", "login", "logout", "join", "getmsg", "send", "time"):
        assert f"</{path}>" in core
    filtered = libcoap("get", gateway.uri(".well-known/core?rt=comatrix.send")).text()
    assert filtered.startswith("</send>") and "</time>" not in filtered
