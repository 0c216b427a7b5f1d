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
* key backup: the device user's room keys (the person's and the device's own) go into a server-side key
  backup; after the gateway's crypto state is wiped and only the recovery key (``comatrixctl e2ee
  backup-key``) put back, the device's next Matrix device restores them and reads the old message in clear;
* cross-signing: the device user's master and self-signing keys are on the homeserver, its device is signed
  by the self-signing key and its key backup by the master key (signatures checked here);
* room key requests: the device user's own phone (nio, logged in as the device user, trusting the gateway's
  device) asks for the key of a message sent before it existed; the gateway forwards it and the phone reads
  the message;
* without vodozemac the gateway says so at start, refuses the device's send into
  the encrypted room with 5.01 (nothing reaches the room in clear) and reads its
  encrypted messages as ``[undecryptable]``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Coroutine, Iterator, TypeVar
from urllib.parse import quote

import nio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
import pytest

from comatrix import ctl
from comatrix.e2ee import formats as e2ee_formats, secret_storage
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

    def send(self, room_id: str, body: str) -> str:
        self.sync()  # the device user's join and its device keys
        answer = self.run(self.client.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": body},
                                                ignore_unverified_devices=True))
        assert isinstance(answer, nio.RoomSendResponse), answer
        return str(answer.event_id)

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


def sensor_in_encrypted_room(gw: GatewayProcess, synapse_user: Callable[..., MatrixUser], person: Person,
                             source: str) -> tuple[MatrixUser, str, CompactDevice]:
    """A device user invited into the person's new encrypted room, joined by a compact device at ``source``."""
    sensor = synapse_user("sensor")
    room_id = person.encrypted_room(invite=sensor.user_id)
    device = CompactDevice(UdpCoap(gw.uri(), source=source), DeviceState(None))
    device.login(sensor.localpart, sensor.password)
    device.join(room_id)
    return sensor, room_id, device


def test_device_and_person_read_each_other_in_an_encrypted_room_across_a_restart(
        make_gateway: Callable[..., GatewayProcess], synapse: SynapseServer,
        synapse_user: Callable[..., MatrixUser], person: Person) -> None:
    gw = make_gateway(config_text=NO_LIMITS)
    sensor, room_id, device = sensor_in_encrypted_room(gw, synapse_user, person, "127.0.0.71")
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


def comatrixctl(gw: GatewayProcess, *args: str, stdin: str = "") -> str:
    config = gw.workdir / "ctl.toml"
    config.write_text(f'homeserver = "{gw.homeserver}"\nstate_dir = "{gw.state_dir}"\n')
    out = io.StringIO()
    assert ctl.main(["--config", str(config), *args], out=out, stdin=io.StringIO(stdin)) == 0, out.getvalue()
    return out.getvalue()


def test_room_keys_come_back_from_the_key_backup_after_the_crypto_state_is_lost(
        make_gateway: Callable[..., GatewayProcess], synapse: SynapseServer,
        synapse_user: Callable[..., MatrixUser], person: Person) -> None:
    gw = make_gateway(config_text=NO_LIMITS)
    sensor, room_id, device = sensor_in_encrypted_room(gw, synapse_user, person, "127.0.0.75")
    device.send(room_id, "19.0 C before the loss")  # the device's own Megolm session
    person.read(room_id, "19.0 C before the loss")
    person.send(room_id, "from the person, before the loss")
    latest = device.getmsg(room_id)
    assert latest is not None and latest.body == "from the person, before the loss"

    # Both room keys are in the device user's key backup, encrypted to the gateway's backup key.
    backup = synapse.request("GET", "/_matrix/client/v3/room_keys/version", token=sensor.access_token)
    assert backup["algorithm"] == "m.megolm_backup.v1.curve25519-aes-sha2"
    assert len(backup["auth_data"]["signatures"][sensor.user_id]) == 2  # by the device and the master key
    stored = synapse.request("GET", "/_matrix/client/v3/room_keys/keys", token=sensor.access_token,
                             query={"version": backup["version"]})
    assert len(stored["rooms"][room_id]["sessions"]) == 2 and "before the loss" not in str(stored)
    assert f"key backup         version {backup['version']}: 2 of 2" in comatrixctl(
        gw, "e2ee", "status", sensor.user_id)
    recovery = comatrixctl(gw, "e2ee", "backup-key").strip()
    secret = synapse.request("GET", f"/_matrix/client/v3/user/{quote(sensor.user_id)}/account_data/"
                             "m.cross_signing.master", token=sensor.access_token)
    [(_key_id, encrypted)] = secret["encrypted"].items()
    assert set(encrypted) == {"iv", "ciphertext", "mac"}
    backup_key = e2ee_formats.recovery_key_bytes(recovery)  # the recovery key opens the secret storage
    stored_key = synapse.request("GET", f"/_matrix/client/v3/user/{quote(sensor.user_id)}/account_data/"
                                 "m.megolm_backup.v1", token=sensor.access_token)["encrypted"][_key_id]
    assert b64decode(secret_storage.decrypt(backup_key, "m.megolm_backup.v1", stored_key)) == backup_key
    assert recovery not in gw.log_text()

    # The whole crypto state is lost; the operator puts the recovery key back.
    gw.stop()
    shutil.rmtree(gw.state_dir / "e2ee")
    for name in ("e2ee.key", "e2ee-backup.key"):
        (gw.state_dir / name).unlink()
    assert "written (0600)" in comatrixctl(gw, "e2ee", "backup-key", "--restore", stdin=recovery + "\n")
    gw.start()
    device.login(sensor.localpart, sensor.password)  # a new Matrix device: new identity keys
    device.join(room_id)  # already a member: the new login's room handle
    latest = device.getmsg(room_id)
    assert latest is not None and latest.body == "from the person, before the loss"
    assert f"2 room keys of {sensor.user_id} restored from key backup version {backup['version']}" in gw.log_text()
    # The cross-signing keys come back from secret storage (under the same key): the new device is signed.
    assert f"cross-signing keys of {sensor.user_id} recovered from secret storage" in gw.log_text()
    answer = synapse.request("POST", "/_matrix/client/v3/keys/query", token=person.user.access_token,
                             body={"device_keys": {sensor.user_id: []}})
    [ssk] = answer["self_signing_keys"][sensor.user_id]["keys"].values()
    assert sum(signed_by(keys, sensor.user_id, ssk) for keys in answer["device_keys"][sensor.user_id].values()) == 2
    assert synapse.request("GET", "/_matrix/client/v3/room_keys/version",
                           token=sensor.access_token)["version"] == backup["version"]  # the same backup goes on


def signed_by(value: dict[str, Any], user_id: str, public_key: str) -> bool:
    """Whether ``value`` carries ``user_id``'s valid signature by the Ed25519 ``public_key`` (checked here)."""
    signature = value.get("signatures", {}).get(user_id, {}).get(f"ed25519:{public_key}")
    if signature is None:
        return False
    unsigned = {k: v for k, v in value.items() if k not in ("signatures", "unsigned")}
    Ed25519PublicKey.from_public_bytes(b64decode(public_key)).verify(
        b64decode(signature), json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode())
    return True


def b64decode(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def test_the_device_user_is_cross_signed_and_its_device_signed_by_the_self_signing_key(
        make_gateway: Callable[..., GatewayProcess], synapse: SynapseServer,
        synapse_user: Callable[..., MatrixUser], person: Person) -> None:
    gw = make_gateway(config_text=NO_LIMITS)
    sensor, room_id, device = sensor_in_encrypted_room(gw, synapse_user, person, "127.0.0.76")
    answer = synapse.request("POST", "/_matrix/client/v3/keys/query", token=person.user.access_token,
                             body={"device_keys": {sensor.user_id: []}})
    master_key = answer["master_keys"][sensor.user_id]
    [master] = master_key["keys"].values()
    self_signing = answer["self_signing_keys"][sensor.user_id]
    [ssk] = self_signing["keys"].values()
    assert master_key["usage"] == ["master"] and self_signing["usage"] == ["self_signing"]
    assert signed_by(self_signing, sensor.user_id, master)
    [(device_id, keys)] = answer["device_keys"][sensor.user_id].items()  # the gateway's device of the sensor
    assert signed_by(keys, sensor.user_id, ssk)
    backup = synapse.request("GET", "/_matrix/client/v3/room_keys/version", token=sensor.access_token)
    assert signed_by(backup["auth_data"], sensor.user_id, master)
    status = comatrixctl(gw, "e2ee", "status", sensor.user_id)
    assert f"device {device_id}" in status and "cross-signed       yes" in status
    assert f"master key         {master}" in status
    # A restart signs nothing twice and keeps the same keys.
    gw.stop()
    gw.start()
    device.getmsg(room_id)
    again = synapse.request("POST", "/_matrix/client/v3/keys/query", token=person.user.access_token,
                            body={"device_keys": {sensor.user_id: []}})
    assert again["master_keys"][sensor.user_id]["keys"] == master_key["keys"]


def test_the_device_users_own_phone_gets_a_room_key_it_asks_for(
        make_gateway: Callable[..., GatewayProcess], synapse: SynapseServer,
        synapse_user: Callable[..., MatrixUser], person: Person, tmp_path: Path) -> None:
    gw = make_gateway(config_text=NO_LIMITS)
    sensor, room_id, device = sensor_in_encrypted_room(gw, synapse_user, person, "127.0.0.77")
    event_id = person.send(room_id, "sent before the phone existed")
    latest = device.getmsg(room_id)
    assert latest is not None and latest.body == "sent before the phone existed"
    [gateway_device] = device_keys(synapse, person.user.access_token, sensor.user_id)

    (tmp_path / "nio-phone").mkdir()
    phone = Person(synapse, sensor, tmp_path / "nio-phone")  # the device user's own phone, a later device
    try:
        phone.sync()
        phone.client.verify_device(phone.client.device_store[sensor.user_id][gateway_device])
        raw = raw_event(synapse, person.user.access_token, room_id, event_id)
        encrypted = nio.MegolmEvent.from_dict(raw)
        encrypted.room_id = room_id
        with pytest.raises(nio.EncryptionError):  # the phone was not there when the key was shared
            phone.client.decrypt_event(encrypted)
        watcher = Watcher(device, room_id, count=1)  # the device's /sync, where the request arrives
        assert isinstance(phone.run(phone.client.request_room_key(encrypted)), nio.RoomKeyRequestResponse)
        deadline = time.monotonic() + WAIT
        while not phone.has_room_key(room_id, raw["content"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        decrypted = phone.client.decrypt_event(encrypted)
        assert isinstance(decrypted, nio.RoomMessageText) and decrypted.body == "sent before the phone existed"
        assert f"room key of {room_id} forwarded to {sensor.user_id}'s own device" in gw.log_text()
        person.send(room_id, "ends the watch")
        watcher.join()
    finally:
        phone.close()
