"""End-to-end encryption at the gateway, against the real Synapse and matrix-nio (a real E2EE client with its
own crypto store, which nobody here wrote).

A person's nio client creates an encrypted room and invites a device user.  The
device (compact profile, and the original getmsg with its own token) joins
through the gateway, which publishes the device's keys:

* the device's compact send arrives as ``m.room.encrypted`` and nio decrypts it
  to the same body;
* the person's encrypted message reaches the device's watch, its compact getmsg
  and the original getmsg in clear;
* an encrypted event whose session was never shared reads as ``[undecryptable]``;
* after a gateway restart the device keeps reading, its device keys are the same,
  and nio decrypts its next message, sent with the same Megolm session (no new
  key share);
* members change: one person leaves, another joins; the device's next message is
  sent with a new Megolm session that the newcomer decrypts and the one who left
  never receives;
* without vodozemac the gateway says so at start, refuses the device's send into
  the encrypted room with 5.01 (nothing reaches the room in clear) and reads its
  encrypted messages as ``[undecryptable]``.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any, Callable, Coroutine, Iterator, TypeVar
from urllib.parse import quote

import nio
import pytest

from comatrix.client import CoapResponseError, CompactDevice, DeviceState, OriginalDevice, UdpCoap
from support.gateway import GatewayProcess
from support.synapse import MatrixUser, SynapseServer
from test_resume_restart import NO_LIMITS, WAIT, Watcher

pytestmark = pytest.mark.integration

T = TypeVar("T")
MEGOLM = "m.megolm.v1.aes-sha2"


class Person:
    """A matrix-nio client with end-to-end encryption on, driven step by step on its own event loop."""

    def __init__(self, synapse: SynapseServer, user: MatrixUser, store: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.user = user
        config = nio.AsyncClientConfig(encryption_enabled=True, store_sync_tokens=True)
        self.client = nio.AsyncClient(synapse.base_url, user.user_id, store_path=str(store), config=config)
        answer = self.run(self.client.login(user.password, device_name="person's phone"))
        assert isinstance(answer, nio.LoginResponse), answer
        self.sync()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.run(self.client.close())
        self.loop.close()

    def sync(self) -> nio.SyncResponse:
        answer = self.run(self.client.sync(timeout=0, full_state=False))
        assert isinstance(answer, nio.SyncResponse), answer
        if self.client.should_upload_keys:
            self.run(self.client.keys_upload())
        if self.client.should_query_keys:
            self.run(self.client.keys_query())
        return answer

    def encrypted_room(self, invite: str) -> str:
        answer = self.run(self.client.room_create(
            name="sensors", invite=[invite],
            initial_state=[{"type": "m.room.encryption", "state_key": "", "content": {"algorithm": MEGOLM}}]))
        assert isinstance(answer, nio.RoomCreateResponse), answer
        self.sync()
        return str(answer.room_id)

    def join(self, room_id: str) -> None:
        assert isinstance(self.run(self.client.join(room_id)), nio.JoinResponse)
        self.sync()

    def leave(self, room_id: str) -> None:
        assert isinstance(self.run(self.client.room_leave(room_id)), nio.RoomLeaveResponse)

    def has_room_key(self, room_id: str, content: dict[str, Any]) -> bool:
        """Whether this client received the Megolm session an encrypted ``content`` was sent with."""
        self.sync()
        store = self.client.olm.inbound_group_store  # type: ignore[union-attr]
        return store.get(room_id, content["sender_key"], content["session_id"]) is not None

    def send(self, room_id: str, body: str) -> None:
        self.sync()  # the device user's join and its device keys
        answer = self.run(self.client.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": body},
                                                ignore_unverified_devices=True))
        assert isinstance(answer, nio.RoomSendResponse), answer

    def read(self, room_id: str, body: str) -> nio.RoomMessageText:
        """Sync until the room's timeline holds a decrypted text message with ``body``."""
        deadline = time.monotonic() + WAIT
        seen: list[Any] = []
        while time.monotonic() < deadline:
            answer = self.sync()
            room = answer.rooms.join.get(room_id)
            for event in room.timeline.events if room is not None else ():
                seen.append(event)
                if isinstance(event, nio.RoomMessageText) and event.body == body:
                    return event
            time.sleep(0.2)
        raise AssertionError(f"{body!r} never decrypted by nio; saw {[type(e).__name__ for e in seen]}")


@pytest.fixture
def people(synapse: SynapseServer, synapse_user: Callable[..., MatrixUser],
           tmp_path: Path) -> Iterator[Callable[[str], Person]]:
    made: list[Person] = []

    def make(name: str) -> Person:
        store = tmp_path / f"nio-{name}"
        store.mkdir()
        made.append(Person(synapse, synapse_user(name), store))
        return made[-1]
    try:
        yield make
    finally:
        for someone in made:
            someone.close()


@pytest.fixture
def person(synapse: SynapseServer, synapse_user: Callable[..., MatrixUser], tmp_path: Path) -> Iterator[Person]:
    store = tmp_path / "nio-store"
    store.mkdir()
    someone = Person(synapse, synapse_user("person"), store)
    try:
        yield someone
    finally:
        someone.close()


def raw_event(synapse: SynapseServer, token: str, room_id: str, event_id: str) -> dict[str, Any]:
    path = f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/event/{quote(event_id, safe='')}"
    event = synapse.request("GET", path, token=token)
    assert isinstance(event, dict)
    return event


def device_keys(synapse: SynapseServer, token: str, user_id: str) -> dict[str, Any]:
    answer = synapse.request("POST", "/_matrix/client/v3/keys/query", token=token,
                             body={"device_keys": {user_id: []}})
    return {device: keys["keys"] for device, keys in answer["device_keys"][user_id].items()}


def test_device_and_person_read_each_other_in_an_encrypted_room_across_a_restart(
        make_gateway: Callable[..., GatewayProcess], synapse: SynapseServer,
        synapse_user: Callable[..., MatrixUser], person: Person) -> None:
    gw = make_gateway(config_text=NO_LIMITS)
    sensor = synapse_user("sensor")
    room_id = person.encrypted_room(invite=sensor.user_id)

    device = CompactDevice(UdpCoap(gw.uri(), source="127.0.0.71"), DeviceState(None))
    device.login(sensor.localpart, sensor.password)
    device.join(room_id)
    original = OriginalDevice(UdpCoap(gw.uri(), source="127.0.0.72"), DeviceState(None))
    original.login(sensor.localpart, sensor.password)
    original.join(room_id)  # the original form reads with its own token: its own Matrix device
    keys_before = device_keys(synapse, person.user.access_token, sensor.user_id)
    assert len(keys_before) == 2  # both Matrix devices of the device user published their keys at the join

    # The device speaks: Synapse holds only ciphertext, the person's client decrypts it.
    device.send(room_id, "21.5 C from the sensor")
    read = person.read(room_id, "21.5 C from the sensor")
    assert read.sender == sensor.user_id
    stored = raw_event(synapse, person.user.access_token, room_id, read.event_id)
    assert stored["type"] == "m.room.encrypted" and "21.5" not in str(stored)
    session_before = stored["content"]["session_id"]

    # The person speaks: the device's watch, its compact getmsg and the original getmsg read it in clear.
    watcher = Watcher(device, room_id, count=1)
    person.send(room_id, "heating on, please")
    [pushed] = watcher.join()
    assert (pushed.body, pushed.sender) == ("heating on, please", person.user.user_id)
    latest = device.getmsg(room_id)
    assert latest is not None and latest.body == "heating on, please"
    original_latest = original.getmsg(room_id)
    assert original_latest is not None and original_latest.body == "heating on, please"

    # An encrypted event whose room key nobody shared is reported, not dropped.
    synapse.send_event(person.user.access_token, room_id, "m.room.encrypted", {
        "algorithm": MEGOLM, "sender_key": "x" * 43, "device_id": "NOWHERE", "session_id": "y" * 43,
        "ciphertext": "AwgAEhAAAAAAAAAA"})
    broken = device.getmsg(room_id)
    assert broken is not None and broken.body == "[undecryptable]" and broken.sender == person.user.user_id

    # A restart: same device keys, the stored room keys still read, the same Megolm session goes on.
    gw.stop()
    gw.start()
    person.send(room_id, "after the restart, from the person")
    latest = device.getmsg(room_id)
    assert latest is not None and latest.body == "after the restart, from the person"
    device.send(room_id, "22.0 C after the restart")
    read = person.read(room_id, "22.0 C after the restart")
    stored = raw_event(synapse, person.user.access_token, room_id, read.event_id)
    assert stored["content"]["session_id"] == session_before  # no new key share was needed
    assert device_keys(synapse, person.user.access_token, sensor.user_id) == keys_before


def test_member_change_rotates_the_device_session(
        make_gateway: Callable[..., GatewayProcess], synapse: SynapseServer,
        synapse_user: Callable[..., MatrixUser], people: Callable[[str], Person]) -> None:
    gw = make_gateway(config_text=NO_LIMITS)
    sensor = synapse_user("sensor")
    owner, leaver, newcomer = people("owner"), people("leaver"), people("newcomer")
    room_id = owner.encrypted_room(invite=sensor.user_id)
    synapse.invite(owner.user.access_token, room_id, leaver.user.user_id)
    leaver.join(room_id)
    device = CompactDevice(UdpCoap(gw.uri(), source="127.0.0.73"), DeviceState(None))
    device.login(sensor.localpart, sensor.password)
    device.join(room_id)

    device.send(room_id, "one")
    first = raw_event(synapse, owner.user.access_token, room_id, owner.read(room_id, "one").event_id)["content"]
    leaver.read(room_id, "one")

    leaver.leave(room_id)
    synapse.invite(owner.user.access_token, room_id, newcomer.user.user_id)
    newcomer.join(room_id)
    device.send(room_id, "two")
    second = raw_event(synapse, owner.user.access_token, room_id, owner.read(room_id, "two").event_id)["content"]
    newcomer.read(room_id, "two")
    assert second["session_id"] != first["session_id"]  # rotated: a member it was made for left
    assert leaver.has_room_key(room_id, first) and not leaver.has_room_key(room_id, second)


def test_without_vodozemac_the_gateway_refuses_to_send_plaintext_into_an_encrypted_room(
        make_gateway: Callable[..., GatewayProcess], synapse: SynapseServer,
        synapse_user: Callable[..., MatrixUser], tmp_path: Path) -> None:
    hidden = tmp_path / "no-vodozemac"
    hidden.mkdir()
    (hidden / "vodozemac.py").write_text('raise ImportError("vodozemac hidden by the test")\n')
    gw = make_gateway(config_text=NO_LIMITS, env={**os.environ, "PYTHONPATH": str(hidden)})
    assert "E2EE unavailable (vodozemac not installed)" in gw.log_text()
    owner, sensor = synapse_user("owner"), synapse_user("sensor")
    room_id = synapse.create_room(owner.access_token, invite=[sensor.user_id], initial_state=[
        {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": MEGOLM}}])
    device = CompactDevice(UdpCoap(gw.uri(), source="127.0.0.74"), DeviceState(None))
    device.login(sensor.localpart, sensor.password)
    device.join(room_id)
    with pytest.raises(CoapResponseError) as refused:
        device.send(room_id, "must not go out in clear")
    assert refused.value.reply.code_text == "5.01"
    assert refused.value.reply.payload == b"encrypted room: E2EE unavailable"
    synapse.send_event(owner.access_token, room_id, "m.room.encrypted", {
        "algorithm": MEGOLM, "sender_key": "x" * 43, "device_id": "PHONE", "session_id": "y" * 43,
        "ciphertext": "AwgAEhAAAAAAAAAA"})
    latest = device.getmsg(room_id)
    assert latest is not None and latest.body == "[undecryptable]"
    types = [event["type"] for event in synapse.messages(owner.access_token, room_id, limit=50)]
    assert "m.room.message" not in types  # nothing in clear reached the room
