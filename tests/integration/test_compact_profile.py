"""The compact profile end to end against the real Synapse, with the reference device client's API.

Every datagram the device sends or receives is recorded (the client's trace hook
sees the exact UDP payloads), so the byte budgets of ``docs/protocol.rst`` are
asserted on real traffic.  The test homeserver is ``test.local``; sizes that
contain the sender are normalised to the spec's ``@sensor01:example.org`` by the
difference in length (same CBOR header size for both).
"""

from __future__ import annotations

import hashlib
import itertools
import secrets
import threading
import time
from typing import Any, Callable

import cbor2
import pytest

from comatrix.client import CoapResponseError, CompactDevice, DeviceState, UdpCoap
from comatrix.coap import wire
from comatrix.coap.numbers import Code, OptionNumber
from comatrix.compact import codec
from comatrix.compact.codec import BUDGETS, PATHS, SendRequest
from support.coap_clients import libcoap
from support.gateway import GatewayProcess
from support.secrets import remember
from support.synapse import MatrixUser, SynapseServer

pytestmark = pytest.mark.integration

SPEC_SENDER = "@sensor01:example.org"
BODY20 = "temperature=21.5C ok"
assert len(BODY20) == 20


class Recorder:
    """Collects (direction, datagram) pairs from `UdpCoap`'s trace hook."""

    def __init__(self) -> None:
        self.datagrams: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()

    def __call__(self, direction: str, data: bytes) -> None:
        with self.lock:
            self.datagrams.append((direction, data))

    def mark(self) -> int:
        with self.lock:
            return len(self.datagrams)

    def since(self, mark: int) -> list[tuple[str, bytes]]:
        with self.lock:
            return self.datagrams[mark:]


def sizes(recorder: Recorder, mark: int) -> tuple[list[int], list[int]]:
    got = recorder.since(mark)
    return [len(d) for way, d in got if way == "up"], [len(d) for way, d in got if way == "down"]


def measured(recorder: Recorder, op: str, call: Callable[[], Any], adjust_down: int = 0) -> Any:
    """Run ``call`` and assert every datagram of the exchange within the budget of ``op``."""
    mark = recorder.mark()
    result = call()
    up, down = sizes(recorder, mark)
    assert up and down, (op, up, down)
    request_budget, response_budget = BUDGETS[op]
    assert max(up) <= request_budget, (op, up)
    assert max(down) + adjust_down <= response_budget, (op, down, adjust_down)
    return result


#: These tests send bursts from one address; the gateway's device rate limit is not under test here.
NO_LIMITS = "[limits]\ndevice_rate = 0\nglobal_rate = 0\n"


@pytest.fixture
def gateway(unlimited_gateway: GatewayProcess) -> GatewayProcess:
    """These tests send bursts from one address: use the gateway with rate limits off."""
    return unlimited_gateway


def device_for(gateway: GatewayProcess, recorder: Recorder | None = None, **kwargs: Any) -> CompactDevice:
    return CompactDevice(UdpCoap(gateway.uri(), trace=recorder, **kwargs), DeviceState(None))


def joined_device(gateway: GatewayProcess, synapse: SynapseServer) -> tuple[MatrixUser, CompactDevice, str]:
    """A fresh sensor user, logged in through the gateway and joined to a room of its own."""
    sensor = sensor_user(synapse)
    device = device_for(gateway)
    device.login(sensor.localpart, sensor.password)
    room_id = synapse.create_room(sensor.access_token)
    device.join(room_id)
    return sensor, device, room_id


_SENSOR_NUMBERS = itertools.count(secrets.randbelow(256))


def sensor_user(synapse: SynapseServer) -> MatrixUser:
    # "@sensorXX:test.local" (20 chars, as SPEC_SENDER's localpart) keeps the login frame
    # within its budget; counting instead of drawing keeps the names of one session
    # distinct on the session-wide Synapse (two random hex digits collided in CI).
    localpart = f"sensor{next(_SENSOR_NUMBERS) % 256:02x}"
    password = remember(secrets.token_urlsafe(12))
    user_id, token, device_id = synapse.register(localpart, password)
    return MatrixUser(user_id, localpart, password, token, device_id)


def invited_room(synapse: SynapseServer, owner: MatrixUser, invitee: str) -> str:
    room_id = synapse.create_room(owner.access_token)
    synapse.invite(owner.access_token, room_id, invitee)
    return room_id


def test_every_operation_end_to_end_within_budget(gateway: GatewayProcess, synapse: SynapseServer,
                                                  synapse_user: Callable[..., MatrixUser]) -> None:
    sensor, owner = sensor_user(synapse), synapse_user("owner")
    adjust = len(SPEC_SENDER) - len(sensor.user_id)
    recorder = Recorder()
    device = device_for(gateway, recorder)

    now = measured(recorder, "time", device.time)
    assert abs(now - time.time()) < 300

    handle = measured(recorder, "login", lambda: device.login(sensor.localpart, sensor.password))
    remember(handle.hex())
    assert len(handle) == codec.HANDLE_SIZE and device.compact["seq"] >= now

    room_id = invited_room(synapse, owner, sensor.user_id)
    assert len(room_id) == 44 and codec.room_id_to_hash(room_id) is not None  # room version 12
    room_handle = measured(recorder, "join", lambda: device.join(room_id))
    assert room_handle == 0

    measured(recorder, "send", lambda: device.send(room_id, BODY20))
    latest = synapse.text_messages(owner.access_token, room_id, limit=1)[0]
    assert (latest["sender"], latest["content"]) == (sensor.user_id, {"msgtype": "m.text", "body": BODY20})

    message = measured(recorder, "getmsg", lambda: device.getmsg(room_id), adjust_down=adjust)
    assert message is not None and (message.sender, message.body) == (sensor.user_id, BODY20)
    assert abs(message.ts - time.time()) < 300

    # "since": messages written over HTTP arrive one by one, in order, with consecutive cursors
    for text in ("one", "two", "three"):
        synapse.send_text(owner.access_token, room_id, text)
    news = device.new_messages(room_id)
    assert [m.body for m in news] == ["one", "two", "three"]
    assert [m.cursor for m in news] == [message.cursor + 1, message.cursor + 2, message.cursor + 3]
    assert device.new_messages(room_id) == []

    measured(recorder, "logout", device.logout)
    with pytest.raises(CoapResponseError) as refused:
        CompactDevice(UdpCoap(gateway.uri()), DeviceState(None, {"compact": {
            "handle": handle.hex(), "rooms": {room_id: 0}}})).getmsg(room_id)
    assert refused.value.reply.code_text == "4.01"


def test_retry_with_the_same_seq_makes_one_event(gateway: GatewayProcess, synapse: SynapseServer) -> None:
    sensor, device, room_id = joined_device(gateway, synapse)
    # The same request as a new exchange (new MID and token: CoAP deduplication cannot help).
    payload = SendRequest(device.handle, 0, 77, "reading 42").encode()
    for _ in range(3):
        reply = device.coap.request(Code.POST, PATHS["send"], payload=payload, content_format=60)
        # The answer is the event's reference (cursor 1: the room had no message): the same each time.
        assert reply.code_text == "2.04" and reply.payload == codec.encode_uint(1)
    bodies = [e["content"]["body"] for e in synapse.text_messages(sensor.access_token, room_id)]
    assert bodies.count("reading 42") == 1
    assert device.send(room_id, "reading 43") == 2  # the next seq is another event
    bodies = [e["content"]["body"] for e in synapse.text_messages(sensor.access_token, room_id)]
    assert bodies[:2] == ["reading 43", "reading 42"]


def test_session_is_bound_to_the_device_address(gateway: GatewayProcess, synapse: SynapseServer) -> None:
    sensor = sensor_user(synapse)
    device = device_for(gateway)
    handle = device.login(sensor.localpart, sensor.password)
    remember(handle.hex())
    room_id = synapse.create_room(sensor.access_token)
    device.join(room_id)
    thief = CompactDevice(UdpCoap(gateway.uri(), source="127.0.0.2"),
                          DeviceState(None, {"compact": {"handle": handle.hex(), "rooms": {room_id: 0}, "seq": 1}}))
    for attempt in (lambda: thief.send(room_id, "not me"), lambda: thief.getmsg(room_id), thief.logout):
        with pytest.raises(CoapResponseError) as refused:
            attempt()
        assert refused.value.reply.code_text == "4.03"
    assert device.getmsg(room_id) is None  # still valid for its owner; the room has no message


def test_errors_are_coap_codes(gateway: GatewayProcess, synapse: SynapseServer) -> None:
    coap = UdpCoap(gateway.uri())
    unknown = SendRequest(secrets.token_bytes(8), 0, 1, "x").encode()
    assert coap.request(Code.POST, PATHS["send"], payload=unknown, content_format=60).code_text == "4.01"
    assert coap.request(Code.POST, PATHS["send"], payload=b"\x83\x01\x02\x03", content_format=60).code_text == "4.00"
    assert coap.request(Code.POST, PATHS["send"], payload=b"\xff", content_format=60).code_text == "4.00"
    assert coap.request(Code.POST, PATHS["send"], payload=unknown, content_format=0).code_text == "4.15"
    assert coap.request(Code.GET, PATHS["send"]).code_text == "4.05"
    wrong = codec.LoginRequest("nobody" + secrets.token_hex(3), "wrong-password").encode()
    assert coap.request(Code.POST, PATHS["login"], payload=wrong, content_format=60).code_text == "4.03"
    sensor = sensor_user(synapse)
    device = device_for(gateway)
    device.login(sensor.localpart, sensor.password)
    fetch = codec.MessagesRequest(device.handle, 9).encode()
    assert coap.request(Code.FETCH, PATHS["messages"], payload=fetch, content_format=60).code_text == "4.04"
    core = libcoap("get", gateway.uri(".well-known/core?rt=comatrix.c.*")).text()
    assert "</_matrix>" not in core
    for op, path in PATHS.items():
        assert f'</{path}>' in core and f'rt="comatrix.c.{op}"' in core
    assert ";obs" in core.split(f"</{PATHS['messages']}>")[1].split("</")[0]


def test_observe_pushes_each_new_message(gateway: GatewayProcess, synapse: SynapseServer,
                                         synapse_user: Callable[..., MatrixUser]) -> None:
    sensor, owner = sensor_user(synapse), synapse_user("owner")
    adjust = len(SPEC_SENDER) - len(owner.user_id)
    recorder = Recorder()
    device = device_for(gateway, recorder)
    device.login(sensor.localpart, sensor.password)
    room_id = invited_room(synapse, owner, sensor.user_id)
    device.join(room_id)
    synapse.send_text(owner.access_token, room_id, "before watching")

    received: list[Any] = []
    errors: list[BaseException] = []
    mark = recorder.mark()

    def watch() -> None:
        try:
            for message in device.watch(room_id, count=3, timeout=20):
                received.append(message)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    deadline = time.monotonic() + 15
    while not any(way == "down" and wire.decode(d).code == Code.CONTENT  # registration answered
                  for way, d in recorder.since(mark)):
        assert time.monotonic() < deadline and not errors, errors
        time.sleep(0.02)
    texts = ["pushed " + BODY20[:13], "second", "third"]
    for text in texts:
        synapse.send_text(owner.access_token, room_id, text)
    watcher.join(30)
    assert not watcher.is_alive() and not errors, errors
    assert [m.body for m in received] == texts
    assert [m.sender for m in received] == [owner.user_id] * 3
    cursors = [m.cursor for m in received]
    assert cursors == list(range(cursors[0], cursors[0] + 3))

    answers = [d for way, d in recorder.since(mark) if way == "down" and wire.decode(d).code == Code.CONTENT]
    assert len(answers) >= 4  # the registration response and three notifications
    assert all(any(num == OptionNumber.OBSERVE for num, _ in wire.decode(d).options) for d in answers)
    pushed = [d for d in answers if b"pushed" in d][0]
    assert len(pushed) + adjust <= BUDGETS["notification"][1], len(pushed)
    assert cbor2.loads(wire.decode(pushed).payload)[1] == texts[0]


def test_sessions_survive_a_gateway_restart(make_gateway: Callable[..., GatewayProcess],
                                            synapse: SynapseServer) -> None:
    gw = make_gateway(config_text=NO_LIMITS)
    sensor = sensor_user(synapse)
    room_id = synapse.create_room(sensor.access_token)
    alias = synapse.full_alias("lab" + secrets.token_hex(4))
    synapse.set_alias(sensor.access_token, alias, room_id)
    gw.stop()
    gw.config.write_text(NO_LIMITS + f'[plugins.compact.rooms]\nlab = "{alias}"\n')
    gw.start()
    device = device_for(gw)
    device.login(sensor.localpart, sensor.password)
    assert device.join("lab") == 0
    device.send("lab", "before restart")
    # The same send again, byte for byte, as a device that never heard the answer
    # retries it after the restart (same seq, new CoAP message id and token).
    unheard = SendRequest(device.handle, device.room_handle("lab"), int(device.compact["seq"]),
                          "before restart").encode()
    database = gw.state_dir / "comatrix.sqlite3"
    assert database.stat().st_mode & 0o777 == 0o600
    gw.stop()
    gw.start()
    retried = device.coap.request(Code.POST, PATHS["send"], payload=unheard, content_format=60)
    assert retried.code_text == "2.04"
    device.send("lab", "after restart")
    got = device.getmsg("lab")
    assert got is not None and got.body == "after restart"
    bodies = [event["content"]["body"] for event in synapse.text_messages(sensor.access_token, room_id)]
    assert bodies == ["after restart", "before restart"]  # newest first, each once
    with pytest.raises(CoapResponseError) as unknown_name:
        device.join("kitchen")
    assert unknown_name.value.reply.code_text == "4.00"


def test_state_files_hold_no_handle_and_no_password(make_gateway: Callable[..., GatewayProcess],
                                                    synapse: SynapseServer) -> None:
    """The store keeps the SHA-256 of each session handle, never the handle, and never a password."""
    gw = make_gateway(config_text=NO_LIMITS)
    sensors = [sensor_user(synapse) for _ in range(2)]
    handles = []
    for sensor in sensors:
        device = device_for(gw)
        handles.append(device.login(sensor.localpart, sensor.password))
        remember(device.handle.hex())
        room_id = synapse.create_room(sensor.access_token)
        device.join(room_id)
        device.send(room_id, "stored?")
        assert device.getmsg(room_id) is not None
    gw.remember_stored_tokens()
    secrets_sent = {}
    for number, (sensor, handle) in enumerate(zip(sensors, handles)):
        secrets_sent[f"handle {number}"] = handle
        secrets_sent[f"handle {number} in hex"] = handle.hex().encode()
        secrets_sent[f"password {number}"] = sensor.password.encode()
        secrets_sent[f"the user's own token {number}"] = sensor.access_token.encode()
    hashes = {f"sha256 of handle {n}": hashlib.sha256(handle).digest() for n, handle in enumerate(handles)}
    assert gw.state_files_holding(secrets_sent) == {}  # running: the write-ahead log too
    assert set(gw.state_files_holding(hashes)) == set(hashes)  # the scan does see what is stored
    gw.stop()
    assert gw.state_files_holding(secrets_sent) == {}
    assert set(gw.state_files_holding(hashes)) == set(hashes)


def test_fire_and_forget_send_with_no_response_via_libcoap(gateway: GatewayProcess, synapse: SynapseServer) -> None:
    # RFC 7967: a NON send with No-Response 2 gets nothing back on success -- no downlink at all --
    # while an error still reaches the device.
    from support.coap_clients import CoapNoResponse

    sensor, device, room_id = joined_device(gateway, synapse)
    no_success_answer = [(int(OptionNumber.NO_RESPONSE), b"\x02")]
    payload = SendRequest(device.handle, 0, 501, "quiet reading").encode()
    with pytest.raises(CoapNoResponse):
        libcoap("post", gateway.uri(PATHS["send"]), payload=payload, content_format=60,
                options=no_success_answer, non=True, timeout=2)
    deadline = time.monotonic() + 10
    while "quiet reading" not in [e["content"]["body"] for e in synapse.text_messages(sensor.access_token, room_id)]:
        assert time.monotonic() < deadline, "the NON send never reached the room"
        time.sleep(0.2)
    unknown = SendRequest(b"\x00" * len(device.handle), 0, 502, "lost?").encode()
    refused = libcoap("post", gateway.uri(PATHS["send"]), payload=unknown, content_format=60,
                      options=no_success_answer, non=True, timeout=5)
    assert refused.code == "4.01"
