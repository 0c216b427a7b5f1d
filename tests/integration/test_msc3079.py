"""Native MSC3079 against the real Synapse, requests built by hand from the MSC's rules (aiocoap).

Path codes (``/0`` versions, ``/9`` send, ``/7`` sync), option 256 (token, sticky
per peer), option 257 and integer keys, Observe on /sync with a message sent by a
second user over HTTP, and a Synapse 429 arriving as 4.29 with Max-Age.
"""

from __future__ import annotations

import asyncio
import queue
import secrets
import threading
from typing import Any

import cbor2
import pytest

from support.coap_clients import aiocoap_request, libcoap, harvest_secrets
from support.gateway import GatewayProcess
from support.secrets import remember
from support.synapse import SynapseServer

pytestmark = pytest.mark.integration

CBOR = 60
TOKEN, KEYS = 256, 257
LOW_BANDWIDTH = "org.matrix.msc3079.low_bandwidth"
# MSC3079 Appendix A keys used below.
EVENT_ID, TYPE, CONTENT, SENDER, TIMELINE, EVENTS, NEXT_BATCH, ROOMS, JOIN, BODY, MSGTYPE = (
    1, 2, 3, 6, 12, 13, 19, 23, 24, 27, 28)
VERSIONS, UNSTABLE_FEATURES, ERRCODE = 100, 99, 102
USER_ID, IDENTIFIER, USER, PASSWORD, DEVICE_ID, INITIAL_DEVICE_DISPLAY_NAME, ACCESS_TOKEN = (
    7, 65, 66, 69, 71, 72, 73)
#: Bound for anything that should happen within a second or two.
WAIT = 30.0


def test_versions_advertise_low_bandwidth(gateway: GatewayProcess) -> None:
    # The answer takes several blocks: more than an unverified address may be sent (the
    # amplification limit), so the gateway asks for an Echo (RFC 9175) partway.  libcoap
    # answers it, which verifies the address; aiocoap 0.4.17 gives up on a block-wise
    # transfer interrupted by an Echo, so it comes second, from the verified address.
    first = libcoap("get", gateway.uri("0"))
    assert first.code == "2.05" and LOW_BANDWIDTH.encode() in first.payload
    plain = aiocoap_request("GET", gateway.uri("0"))
    assert plain.code == "2.05" and plain.content_format == CBOR
    body = plain.cbor()
    assert body["unstable_features"][LOW_BANDWIDTH] is True
    assert body[LOW_BANDWIDTH] == {"dtls": None, "cbor_enum_version": 1, "coap_enum_version": 1, "observe": 1}
    assert isinstance(body["versions"], list) and body["versions"]
    keyed = aiocoap_request("GET", gateway.uri("_matrix/client/versions"), options=[(KEYS, 1)]).cbor()
    assert keyed[UNSTABLE_FEATURES][LOW_BANDWIDTH] is True and keyed[VERSIONS] == body["versions"]


async def _session(uri_base: str, requests: list[dict[str, Any]]) -> list[tuple[str, Any, int | None]]:
    """Several requests from one aiocoap context (one UDP source port: one MSC3079 "connection")."""
    import aiocoap
    from aiocoap.optiontypes import OpaqueOption

    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    answers = []
    try:
        for spec in requests:
            message = aiocoap.Message(code=aiocoap.numbers.codes.Code[spec["method"]],
                                      uri=uri_base + spec["path"], payload=spec.get("payload", b""))
            if spec.get("payload"):
                message.opt.content_format = CBOR
            for number, value in spec.get("options", []):
                message.opt.add_option(OpaqueOption(number, value))
            harvest_secrets(bytes(message.payload), [(n, v) for n, v in spec.get("options", [])])
            response = await asyncio.wait_for(context.request(message).response, WAIT)
            payload = bytes(response.payload)
            decoded = cbor2.loads(payload) if response.opt.content_format == CBOR else payload
            answers.append((response.code.dotted, decoded, response.opt.max_age))
    finally:
        await context.shutdown()
    return answers


def session(gateway: GatewayProcess, requests: list[dict[str, Any]]) -> list[tuple[str, Any, int | None]]:
    result: "queue.Queue[Any]" = queue.Queue()
    thread = threading.Thread(target=lambda: result.put(asyncio.run(_session(gateway.uri(""), requests))))
    thread.start()
    thread.join(WAIT * (len(requests) + 1))
    assert not thread.is_alive(), "aiocoap session did not finish"
    return result.get_nowait()


def test_send_by_path_code_with_integer_keys_and_a_sticky_token(
        gateway: GatewayProcess, synapse: SynapseServer, synapse_user) -> None:
    device = synapse_user("lb")
    room_id = synapse.create_room(device.access_token)
    token = device.access_token.encode()
    txn = secrets.token_hex(4)
    answers = session(gateway, [
        {"method": "PUT", "path": f"9/{room_id}/m.room.message/{txn}a", "options": [(TOKEN, token)],
         "payload": cbor2.dumps({MSGTYPE: "m.text", BODY: "hi"})},
        # No option 256 any more: the token is sticky for this peer.
        {"method": "PUT", "path": f"9/{room_id}/m.room.message/{txn}b",
         "payload": cbor2.dumps({MSGTYPE: "m.notice", BODY: "again", "body": "string key wins"})},
        # The full r0 path of the first send, same txn id: the same event, not a new one.
        {"method": "PUT", "path": f"_matrix/client/r0/rooms/{room_id}/send/m.room.message/{txn}a",
         "payload": cbor2.dumps({MSGTYPE: "m.text", BODY: "hi"})},
    ])
    assert [code for code, _, _ in answers] == ["2.04", "2.04", "2.04"]
    first, second, retry = (body[EVENT_ID] for _, body, _ in answers)
    assert retry == first
    messages = synapse.text_messages(device.access_token, room_id)
    by_id = {event["event_id"]: event for event in messages}
    assert by_id[first]["content"] == {"msgtype": "m.text", "body": "hi"}
    assert by_id[second]["content"] == {"msgtype": "m.notice", "body": "string key wins"}
    assert by_id[first]["sender"] == device.user_id
    # Another peer (a fresh aiocoap context) has no sticky token.
    stranger = aiocoap_request("PUT", gateway.uri(f"9/{room_id}/m.room.message/{txn}c"), content_format=CBOR,
                               payload=cbor2.dumps({BODY: "who?"}))
    assert stranger.code == "4.01" and stranger.cbor()[ERRCODE] == "M_MISSING_TOKEN"


def test_integer_key_login_end_to_end(gateway: GatewayProcess, synapse: SynapseServer, synapse_user) -> None:
    """MSC3079 login with integer keys both ways: the new token comes back under 73 and works."""
    user = synapse_user("lbkeys")
    keys = [(KEYS, b"\x01")]
    login = cbor2.dumps({TYPE: "m.login.password", IDENTIFIER: {TYPE: "m.id.user", USER: user.localpart},
                         PASSWORD: user.password, INITIAL_DEVICE_DISPLAY_NAME: "integer keys"})
    [(code, answer, _)] = session(gateway, [{"method": "POST", "path": "1", "options": keys, "payload": login}])
    assert code == "2.04", answer
    assert all(isinstance(key, int) for key in answer), answer
    token = remember(answer[ACCESS_TOKEN])
    assert token.startswith("syt_") and token != user.access_token
    assert answer[USER_ID] == user.user_id and "access_token" not in answer
    assert isinstance(answer[DEVICE_ID], str) and INITIAL_DEVICE_DISPLAY_NAME not in answer
    # the token works, from another peer, on a room of the user's and for Synapse itself
    room_id = synapse.create_room(user.access_token)
    [(code, sent, _)] = session(gateway, [
        {"method": "PUT", "path": f"9/{room_id}/m.room.message/{secrets.token_hex(4)}",
         "options": [(TOKEN, token.encode())] + keys, "payload": cbor2.dumps({MSGTYPE: "m.text", BODY: "keyed"})}])
    assert code == "2.04" and sent[EVENT_ID].startswith("$")
    [latest] = synapse.text_messages(user.access_token, room_id, limit=1)
    assert (latest["event_id"], latest["sender"], latest["content"]["body"]) == (sent[EVENT_ID], user.user_id, "keyed")
    assert synapse.whoami(token) == user.user_id


def test_sync_observe_pushes_a_message_sent_over_http(
        gateway: GatewayProcess, synapse: SynapseServer, synapse_user) -> None:
    device, friend = synapse_user("lbobs"), synapse_user("friend")
    room_id = synapse.create_room(device.access_token, preset="public_chat")
    synapse.join(friend.access_token, room_id)
    events: "queue.Queue[tuple[str, Any, bool]]" = queue.Queue()
    stop = threading.Event()

    async def observe() -> None:
        import aiocoap
        from aiocoap.optiontypes import OpaqueOption

        context = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            message = aiocoap.Message(code=aiocoap.GET, uri=gateway.uri("7"), observe=0)
            message.opt.add_option(OpaqueOption(TOKEN, device.access_token.encode()))
            message.opt.add_option(OpaqueOption(KEYS, b"\x01"))
            request = context.request(message)
            first = await asyncio.wait_for(request.response, WAIT)
            events.put((first.code.dotted, cbor2.loads(first.payload), first.opt.observe is not None))
            async for notification in request.observation:
                events.put((notification.code.dotted, cbor2.loads(notification.payload), True))
                if stop.is_set():
                    break
            request.observation.cancel()
        except Exception as exc:  # surfaced to the test through the queue
            events.put(("error", repr(exc), False))
        finally:
            await context.shutdown()

    thread = threading.Thread(target=lambda: asyncio.run(observe()), daemon=True)
    thread.start()
    try:
        code, initial, registered = events.get(timeout=WAIT)
        assert (code, registered) == ("2.05", True), initial
        assert isinstance(initial[NEXT_BATCH], str)
        synapse.send_text(friend.access_token, room_id, "ping over http")
        found = None
        while found is None:
            code, body, _ = events.get(timeout=WAIT)
            assert code == "2.05", body
            assert isinstance(body[NEXT_BATCH], str)
            timeline = body.get(ROOMS, {}).get(JOIN, {}).get(room_id, {}).get(TIMELINE, {}).get(EVENTS, [])
            found = next((event for event in timeline if event.get(CONTENT, {}).get(BODY) == "ping over http"),
                         None)
        assert found[SENDER] == friend.user_id and found[TYPE] == "m.room.message"
    finally:
        stop.set()
        synapse.send_text(friend.access_token, room_id, "wake the observer up")
        thread.join(WAIT)
    assert not thread.is_alive()


def test_sync_long_poll_returns_at_once_when_there_is_news(
        gateway: GatewayProcess, synapse: SynapseServer, synapse_user) -> None:
    device = synapse_user("lbpoll")
    room_id = synapse.create_room(device.access_token)
    synapse.send_text(device.access_token, room_id, "waiting for you")
    answer = aiocoap_request("GET", gateway.uri("_matrix/client/r0/sync?timeout=20000"),
                             options=[(TOKEN, "Bearer " + device.access_token), (KEYS, 1)], timeout=WAIT)
    assert answer.code == "2.05"
    body = answer.cbor()
    timeline = body[ROOMS][JOIN][room_id][TIMELINE][EVENTS]
    assert any(event.get(CONTENT, {}).get(BODY) == "waiting for you" for event in timeline)


def test_synapse_rate_limit_is_429_with_max_age(gateway: GatewayProcess, synapse: SynapseServer,
                                                synapse_user) -> None:
    device = synapse_user("lb429")
    room_id = synapse.create_room(device.access_token)
    _admin_id, admin_token, _ = synapse.register_admin()
    synapse.set_ratelimit(admin_token, device.user_id, messages_per_second=1, burst_count=1)
    token = device.access_token.encode()
    try:
        answers = session(gateway, [
            {"method": "PUT", "path": f"9/{room_id}/m.room.message/rl{i}", "options": [(TOKEN, token)],
             "payload": cbor2.dumps({MSGTYPE: "m.text", BODY: f"m{i}"})} for i in range(4)])
    finally:
        synapse.clear_ratelimit(admin_token, device.user_id)
    limited = [(body, max_age) for code, body, max_age in answers if code == "4.29"]
    assert limited, [code for code, _, _ in answers]
    assert all(max_age is not None and max_age >= 1 for _, max_age in limited)
    assert limited[0][0][ERRCODE] == "M_LIMIT_EXCEEDED"


def test_an_array_answer_passes_through(gateway: GatewayProcess, synapse: SynapseServer, synapse_user) -> None:
    """``GET /rooms/{roomId}/state`` answers a JSON array: it reaches the device as a CBOR array."""
    device = synapse_user("state")
    room_id = synapse.create_room(device.access_token)
    answer = libcoap("get", gateway.uri(f"_matrix/client/v3/rooms/{room_id}/state"), block_size=1024,
                     options=[(TOKEN, device.access_token), (KEYS, 1)])
    assert answer.code == "2.05", answer
    events = answer.cbor()
    assert isinstance(events, list) and "m.room.create" in {event[TYPE] for event in events}
