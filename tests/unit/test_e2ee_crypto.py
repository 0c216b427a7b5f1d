"""End-to-end encryption at the gateway (`comatrix.e2ee`): the pure parts, one device's vodozemac state, the
state at rest, and the refusal when vodozemac is missing.

Two `DeviceCrypto` play both ends of the protocol (the real peer, matrix-nio, is in
``tests/integration/test_e2ee.py``): keys signed and checked, a room key sent over
Olm and read back, Megolm messages decrypted, rotation on a member leaving and
after the room's message count, and everything still working after the state went
through `to_state` / `from_state` and the sealed file.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import stat
import sys
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task

from comatrix import e2ee
from comatrix.coap.errors import NotImplementedCoap
from comatrix.ctl import main as ctl_main
from comatrix.e2ee import formats
from comatrix.e2ee.device import DeviceCrypto
from comatrix.e2ee.gateway import Unavailable
from comatrix.e2ee.vault import KEY_FILENAME, Vault, seal, unseal
from comatrix.matrix.api import AppserviceToken
from comatrix.matrix.client import MatrixClient
from comatrix.matrix.responses import Event
from comatrix.matrix.testing import FakeHomeserver, run, stub_transport

ROOM = "!" + "r" * 43
ALICE, BOB = "@alice:test.local", "@bob:test.local"


def encrypted_event(content: dict[str, Any], event_id: str = "$1") -> Event:
    return Event(event_id, formats.ENCRYPTED, ALICE, 1_700_000_000_000, content, room_id=ROOM)


# ---------------------------------------------------------------------- pure formats

def test_canonical_json_sorts_keys_and_keeps_unicode() -> None:
    assert formats.canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode("utf-8")


def test_rotation_from_room_settings_with_spec_defaults() -> None:
    assert formats.rotation_of({"algorithm": formats.MEGOLM}) == formats.Rotation(604_800_000, 100)
    assert formats.rotation_of({"rotation_period_ms": 5000, "rotation_period_msgs": 3}) == formats.Rotation(5000, 3)
    # Nonsense values do not turn rotation off.
    assert formats.rotation_of({"rotation_period_ms": -1, "rotation_period_msgs": True}) == formats.Rotation()
    rotation = formats.Rotation(period_ms=1000, messages=2)
    assert not rotation.due(created_ms=0, sent=1, now_ms=999)
    assert rotation.due(created_ms=0, sent=2, now_ms=0)
    assert rotation.due(created_ms=0, sent=0, now_ms=1000)


def test_megolm_payload_of_another_room_is_refused() -> None:
    plaintext = formats.megolm_plaintext(ROOM, "m.room.message", {"body": "hi"})
    assert formats.parse_megolm_plaintext(plaintext, ROOM) == ("m.room.message", {"body": "hi"})
    with pytest.raises(ValueError):
        formats.parse_megolm_plaintext(plaintext, "!other")


def test_undecryptable_marker_keeps_the_event() -> None:
    event = formats.undecryptable(encrypted_event({"algorithm": formats.MEGOLM}), "room key not received")
    assert (event.event_id, event.type, event.sender) == ("$1", "m.room.message", ALICE)
    assert event.content["body"] == formats.UNDECRYPTABLE_BODY == "[undecryptable]"
    assert event.content["msgtype"] == formats.UNDECRYPTABLE_MSGTYPE


# ---------------------------------------------------------------------- one device's state

def exchange_room_key(alice: DeviceCrypto, bob: DeviceCrypto, members: set[str], now_ms: int = 0,
                      rotation: formats.Rotation = formats.Rotation()) -> None:
    """What `GatewayCrypto._share` does, with the homeserver's part played here."""
    alice.keys_queried({"device_keys": {BOB: {bob.device_id: bob.device_keys()}}}, [BOB])
    peer = alice.devices_of([BOB])[0]
    if alice.without_olm([peer]):
        otks = bob.one_time_keys(published=0)
        bob.mark_published()
        key_id, key = next(iter(otks.items()))
        alice.keys_claimed({"one_time_keys": {BOB: {bob.device_id: {key_id: key}}}}, [peer])
    outbound = alice.outbound_for(ROOM, rotation, members, now_ms)
    if (BOB, bob.device_id) not in outbound.shared:
        bob.to_device({"type": formats.ENCRYPTED, "sender": ALICE,
                       "content": alice.olm_encrypt(peer, formats.ROOM_KEY, alice.room_key(ROOM, outbound))})
        outbound.shared.add((BOB, bob.device_id))


def test_room_key_over_olm_then_megolm_messages_decrypt() -> None:
    alice, bob = DeviceCrypto(ALICE, "ALICEDEV"), DeviceCrypto(BOB, "BOBDEV")
    exchange_room_key(alice, bob, {ALICE, BOB})
    for n in range(3):
        content = alice.megolm_encrypt(ROOM, "m.room.message", {"msgtype": "m.text", "body": f"hello {n}"})
        assert content["algorithm"] == formats.MEGOLM and "hello" not in str(content)
        event = bob.megolm_decrypt(ROOM, encrypted_event(content))
        assert (event.type, event.content["body"]) == ("m.room.message", f"hello {n}")
    # Alice reads her own messages too (she keeps an inbound copy of her outbound session).
    own = alice.megolm_encrypt(ROOM, "m.room.message", {"body": "mine"})
    assert alice.megolm_decrypt(ROOM, encrypted_event(own)).content["body"] == "mine"


def test_a_relation_travels_in_the_clear_and_is_read_back_with_the_message() -> None:
    alice, bob = DeviceCrypto(ALICE, "ALICEDEV"), DeviceCrypto(BOB, "BOBDEV")
    exchange_room_key(alice, bob, {ALICE, BOB})
    relation = {"rel_type": "m.annotation", "event_id": "$target", "key": "👍"}
    content = alice.megolm_encrypt(ROOM, "m.reaction", {"m.relates_to": relation})
    # The homeserver aggregates relations: it must see this one; the payload does not repeat it.
    assert content["m.relates_to"] == relation and "m.annotation" not in str(content["ciphertext"])
    event = bob.megolm_decrypt(ROOM, encrypted_event(content))
    assert (event.type, event.content) == ("m.reaction", {"m.relates_to": relation})


def test_unknown_session_and_garbage_are_reported_undecryptable() -> None:
    alice, bob = DeviceCrypto(ALICE, "ALICEDEV"), DeviceCrypto(BOB, "BOBDEV")
    alice.outbound_for(ROOM, formats.Rotation(), {ALICE, BOB}, 0)
    content = alice.megolm_encrypt(ROOM, "m.room.message", {"body": "secret"})
    event = bob.megolm_decrypt(ROOM, encrypted_event(content))
    assert event.content["body"] == "[undecryptable]" and event.content["reason"] == "room key not received"
    exchange_room_key(alice, bob, {ALICE, BOB})
    broken = dict(alice.megolm_encrypt(ROOM, "m.room.message", {"body": "x"}), ciphertext="AAAA")
    assert bob.megolm_decrypt(ROOM, encrypted_event(broken)).content["reason"] == "decryption failed"


def test_a_members_room_key_does_not_vouch_for_another_sender() -> None:
    alice, bob = DeviceCrypto(ALICE, "ALICEDEV"), DeviceCrypto(BOB, "BOBDEV")
    exchange_room_key(alice, bob, {ALICE, BOB})
    content = alice.megolm_encrypt(ROOM, "m.room.message", {"body": "open the door"})
    forged = dataclasses.replace(encrypted_event(content), sender="@carol:test.local")
    event = bob.megolm_decrypt(ROOM, forged)
    assert event.content["body"] == "[undecryptable]" and event.content["reason"] == "room key of another sender"


def test_device_keys_not_signed_by_the_device_are_ignored() -> None:
    alice, bob, mallory = DeviceCrypto(ALICE, "ALICEDEV"), DeviceCrypto(BOB, "BOBDEV"), DeviceCrypto(BOB, "BOBDEV")
    forged = bob.device_keys()
    forged["keys"]["curve25519:BOBDEV"] = mallory.curve25519  # the signature no longer covers it
    alice.keys_queried({"device_keys": {BOB: {"BOBDEV": forged}}}, [BOB])
    assert alice.devices_of([BOB]) == []
    misfiled = bob.device_keys()
    alice.keys_queried({"device_keys": {BOB: {"OTHER": misfiled}}}, [BOB])
    assert alice.devices_of([BOB]) == []


def test_olm_message_for_another_recipient_is_ignored() -> None:
    alice, bob, carol = DeviceCrypto(ALICE, "A"), DeviceCrypto(BOB, "B"), DeviceCrypto("@carol:test.local", "C")
    exchange_room_key(alice, bob, {ALICE, BOB})
    # Alice's envelope to Bob, replayed to Carol under Bob's name: Carol cannot even find her key in it.
    outbound = alice.outbound[ROOM]
    envelope = alice.olm_encrypt(alice.devices_of([BOB])[0], formats.ROOM_KEY, alice.room_key(ROOM, outbound))
    carol.to_device({"type": formats.ENCRYPTED, "sender": ALICE, "content": envelope})
    assert carol.inbound == {}


def test_megolm_rotates_when_a_member_leaves_and_after_the_message_count() -> None:
    alice, bob = DeviceCrypto(ALICE, "ALICEDEV"), DeviceCrypto(BOB, "BOBDEV")
    rotation = formats.Rotation(period_ms=10**9, messages=2)
    first = alice.outbound_for(ROOM, rotation, {ALICE, BOB}, 0).session.session_id
    assert alice.outbound_for(ROOM, rotation, {ALICE, BOB, "@carol:test.local"}, 0).session.session_id == first
    # Carol joined the set; her leaving rotates.
    assert alice.outbound_for(ROOM, rotation, {ALICE, BOB}, 0).session.session_id != first
    second = alice.outbound[ROOM].session.session_id
    alice.megolm_encrypt(ROOM, "m.room.message", {"body": "1"})
    alice.megolm_encrypt(ROOM, "m.room.message", {"body": "2"})
    assert alice.outbound_for(ROOM, rotation, {ALICE, BOB}, 0).session.session_id != second


def test_one_time_keys_are_replenished_to_the_target_and_signed() -> None:
    device = DeviceCrypto(ALICE, "ALICEDEV")
    keys = device.one_time_keys(published=20)
    assert len(keys) == formats.OTK_TARGET - 20
    device.mark_published()
    assert device.one_time_keys(published=formats.OTK_TARGET) == {}
    keys = device.one_time_keys(published=0)
    assert len(keys) == formats.OTK_TARGET
    assert all(list(k["signatures"][ALICE]) == ["ed25519:ALICEDEV"] for k in keys.values())


@pytest_twisted.ensureDeferred
async def test_state_survives_a_restart_through_the_sealed_file(tmp_path: Any) -> None:
    alice, bob = DeviceCrypto(ALICE, "ALICEDEV"), DeviceCrypto(BOB, "BOBDEV")
    exchange_room_key(alice, bob, {ALICE, BOB})
    vault = Vault(tmp_path)
    await vault.save(BOB, "BOBDEV", bob.to_state(vault.key))
    await vault.save(ALICE, "ALICEDEV", alice.to_state(vault.key))
    reopened = Vault(tmp_path)  # same key file
    bob2 = DeviceCrypto.from_state(await reopened.load(BOB, "BOBDEV"), reopened.key)  # type: ignore[arg-type]
    alice2 = DeviceCrypto.from_state(await reopened.load(ALICE, "ALICEDEV"), reopened.key)  # type: ignore[arg-type]
    assert (bob2.curve25519, bob2.ed25519) == (bob.curve25519, bob.ed25519)
    content = alice2.megolm_encrypt(ROOM, "m.room.message", {"body": "after restart"})
    assert bob2.megolm_decrypt(ROOM, encrypted_event(content)).content["body"] == "after restart"
    assert alice2.outbound[ROOM].shared == {(BOB, "BOBDEV")}


@pytest_twisted.ensureDeferred
async def test_a_logged_out_device_leaves_no_state_behind(tmp_path: Any) -> None:
    """Each compact login is a new Matrix device: without this the state directory only grows."""
    vault = Vault(tmp_path)
    await vault.save(BOB, "BOBDEV", DeviceCrypto(BOB, "BOBDEV").to_state(vault.key))
    await vault.save(ALICE, "ALICEDEV", DeviceCrypto(ALICE, "ALICEDEV").to_state(vault.key))
    await vault.forget(BOB, "BOBDEV")
    assert await vault.load(BOB, "BOBDEV") is None and await vault.load(ALICE, "ALICEDEV") is not None
    await vault.forget(BOB, "BOBDEV")  # twice is fine
    assert len(list((tmp_path / "e2ee").iterdir())) == 1


class RecordingCrypto(Unavailable):
    """What the Matrix client tells its crypto around a logout."""

    def __init__(self, matrix: MatrixClient) -> None:
        super().__init__(matrix, task.Clock())
        self.forgotten: list[tuple[str, str]] = []

    async def device_of(self, token: str) -> tuple[str, str] | None:
        return (ALICE, "ALICEDEV")

    async def forget(self, identity: tuple[str, str]) -> None:
        self.forgotten.append(identity)


def test_logout_drops_the_devices_crypto_state_only_once_the_homeserver_agreed() -> None:
    server = FakeHomeserver()
    clock = task.Clock()
    transport, _stub = stub_transport(server, clock)
    matrix = MatrixClient(transport, reactor=clock)
    crypto = matrix.crypto = RecordingCrypto(matrix)
    token, _device = server.issue_token(ALICE)
    run(matrix.logout(token))
    assert crypto.forgotten == [(ALICE, "ALICEDEV")]
    with pytest.raises(Exception):
        run(matrix.logout(token))  # a dead token: the homeserver refuses, nothing more is dropped
    assert crypto.forgotten == [(ALICE, "ALICEDEV")]


@pytest_twisted.ensureDeferred
async def test_vault_key_file_is_private_and_state_is_sealed(tmp_path: Any) -> None:
    vault = Vault(tmp_path)
    key_file = tmp_path / KEY_FILENAME
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600 and len(key_file.read_bytes()) == 32
    await vault.save(ALICE, "D", {"secret": "s3cr3t-pickle"})
    (state_file,) = list((tmp_path / "e2ee").iterdir())
    assert stat.S_IMODE(os.stat(state_file).st_mode) == 0o600
    assert "s3cr3t" not in state_file.read_text()
    assert await vault.load(ALICE, "D") == {"secret": "s3cr3t-pickle"}
    assert await vault.load(ALICE, "other") is None
    # A sealed state opened under another device's name (a file copied over another) fails.
    sealed = seal(vault.key, "a.state", {"x": 1})
    assert unseal(vault.key, "a.state", sealed) == {"x": 1}
    with pytest.raises(Exception):
        unseal(vault.key, "b.state", sealed)


# ---------------------------------------------------------------------- without vodozemac

@pytest.fixture
def homeserver() -> tuple[FakeHomeserver, MatrixClient, str, str, str]:
    server = FakeHomeserver()
    clock = task.Clock()
    transport, _stub = stub_transport(server, clock)
    matrix = MatrixClient(transport, reactor=clock)
    token, _device = server.issue_token(ALICE)
    encrypted, plain = server.new_room(ALICE), server.new_room(ALICE)
    server.add_event(encrypted, ALICE, "m.room.encryption", {"algorithm": formats.MEGOLM}, "")
    return server, matrix, token, encrypted, plain


def test_without_vodozemac_the_gateway_says_so_and_refuses_encrypted_rooms(
        homeserver: tuple[FakeHomeserver, MatrixClient, str, str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    server, matrix, token, encrypted, plain = homeserver
    monkeypatch.setitem(sys.modules, "vodozemac", None)  # `import vodozemac` fails
    assert not e2ee.available()
    e2ee.install(matrix, None, task.Clock())
    assert isinstance(matrix.crypto, Unavailable)
    with pytest.raises(NotImplementedCoap) as refused:
        run(matrix.send_message(token, encrypted, {"msgtype": "m.text", "body": "plain"}, "t1"))
    assert str(refused.value) == "encrypted room: E2EE unavailable"
    assert not [e for e in server.rooms[encrypted] if e["type"] == "m.room.message"]  # nothing went out
    # An unencrypted room works as before.
    run(matrix.send_message(token, plain, {"msgtype": "m.text", "body": "plain"}, "t2"))
    assert server.rooms[plain][-1]["content"]["body"] == "plain"


def test_application_service_users_are_refused_in_encrypted_rooms_for_now(
        homeserver: tuple[FakeHomeserver, MatrixClient, str, str, str]) -> None:
    server, matrix, _token, encrypted, _plain = homeserver
    e2ee.install(matrix, None, task.Clock())
    server.add_appservice("as-token-of-the-gateway", "@comatrix_.*")
    as_user = AppserviceToken("as-token-of-the-gateway", "@comatrix_door:test.local")
    server.members[encrypted].add(as_user.user_id)
    with pytest.raises(NotImplementedCoap) as refused:
        run(matrix.crypto.outgoing(as_user, encrypted, "m.room.message", {"msgtype": "m.text", "body": "x"}))
    assert str(refused.value) == "encrypted room: E2EE not yet for appservice users"
    assert not [e for e in server.rooms[encrypted] if e["type"] == "m.room.message"]  # nothing went out


def test_with_several_workers_e2ee_is_off_and_encrypted_rooms_are_refused(
        homeserver: tuple[FakeHomeserver, MatrixClient, str, str, str]) -> None:
    server, matrix, token, encrypted, _plain = homeserver
    e2ee.install(matrix, None, task.Clock(), single_process=False)
    assert isinstance(matrix.crypto, Unavailable)
    with pytest.raises(NotImplementedCoap):
        run(matrix.send_message(token, encrypted, {"msgtype": "m.text", "body": "plain"}, "t1"))
    assert not [e for e in server.rooms[encrypted] if e["type"] == "m.room.message"]


def test_without_vodozemac_encrypted_messages_read_as_undecryptable(
        homeserver: tuple[FakeHomeserver, MatrixClient, str, str, str]) -> None:
    server, matrix, token, encrypted, _plain = homeserver
    matrix.crypto = Unavailable(matrix, task.Clock())
    server.add_event(encrypted, BOB, "m.room.message", {"msgtype": "m.text", "body": "old"})
    server.add_event(encrypted, BOB, formats.ENCRYPTED, {"algorithm": formats.MEGOLM, "ciphertext": "x"})
    latest = run(matrix.last_message(token, encrypted))
    assert latest is not None and latest.sender == BOB
    assert latest.content["body"] == "[undecryptable]" and latest.content["reason"] == "E2EE unavailable"


# ---------------------------------------------------------------------- comatrixctl e2ee status

@pytest_twisted.ensureDeferred
async def test_ctl_status_shows_keys_and_sessions_without_secrets(tmp_path: Any) -> None:
    state_dir = tmp_path / "state"
    config = tmp_path / "comatrix.toml"
    config.write_text(f'homeserver = "http://127.0.0.1:8008"\nstate_dir = "{state_dir}"\n')
    alice, bob = DeviceCrypto(ALICE, "ALICEDEV"), DeviceCrypto(BOB, "BOBDEV")
    exchange_room_key(alice, bob, {ALICE, BOB})
    alice.megolm_encrypt(ROOM, "m.room.message", {"body": "x"})
    vault = Vault(state_dir)
    await vault.save(ALICE, "ALICEDEV", alice.to_state(vault.key))
    await vault.save(BOB, "BOBDEV", bob.to_state(vault.key))

    out = io.StringIO()
    assert ctl_main(["--config", str(config), "e2ee", "status", ALICE], out=out) == 0
    text = out.getvalue()
    assert f"{ALICE} device ALICEDEV" in text and "BOBDEV\n" not in text.split("olm sessions")[0]
    assert f"curve25519 {alice.curve25519}" in text and f"ed25519    {alice.ed25519}" in text
    assert "olm sessions       1 with 1 devices" in text
    assert f"{ROOM}: 1 messages since" in text and "shared with 1 devices" in text
    assert "key backup         none" in text
    pickles = alice.to_state(vault.key)
    assert pickles["account"] not in text and alice.room_key(ROOM, alice.outbound[ROOM])["session_key"] not in text

    out = io.StringIO()
    assert ctl_main(["--config", str(config), "e2ee", "status", "@nobody:test.local"], out=out) == 0
    assert "no E2EE state" in out.getvalue()


# ---------------------------------------------------------------------- server-side key backup

def test_recovery_key_round_trip_and_refusals() -> None:
    key = bytes(range(32))
    text = formats.recovery_key(key)
    assert text.startswith("Es") and all(len(group) == 4 for group in text.split()[:-1])  # the spec's shape
    assert formats.recovery_key_bytes(text) == key
    assert formats.recovery_key_bytes(text.replace(" ", "") + "\n") == key
    flipped = text[:-1] + ("1" if text[-1] != "1" else "2")
    for bad in (flipped, "0OIl", text + "1", ""):
        with pytest.raises(ValueError):
            formats.recovery_key_bytes(bad)


def test_backed_up_room_keys_restore_into_a_new_device_state() -> None:
    import vodozemac as vz

    private = vz.Curve25519SecretKey()
    public = private.public_key().to_base64()
    alice, bob = DeviceCrypto(ALICE, "ALICEDEV"), DeviceCrypto(BOB, "BOBDEV")
    exchange_room_key(alice, bob, {ALICE, BOB})
    content = alice.megolm_encrypt(ROOM, "m.room.message", {"body": "before the loss"})
    bob.outbound_for(ROOM, formats.Rotation(), {ALICE, BOB}, 0)  # bob's own session is backed up too
    own = bob.megolm_encrypt(ROOM, "m.room.message", {"body": "bob's own"})

    auth = bob.backup_auth_data(public)
    assert auth["public_key"] == public and f"ed25519:{bob.device_id}" in auth["signatures"][BOB]
    rooms, taken = bob.backup_pending(public, limit=1)
    assert len(taken) == 1 and "session_key" not in str(rooms)  # encrypted to the backup key
    bob.backup_stored(taken)
    more, rest = bob.backup_pending(public, limit=10)
    bob.backup_stored(rest)
    assert len(rest) == 1 and bob.backup_pending(public, limit=10) == ({}, [])
    entry = next(iter(more[ROOM]["sessions"].values()))
    assert set(entry["session_data"]) == {"ephemeral", "ciphertext", "mac"} and entry["first_message_index"] == 0
    backup = {"rooms": {ROOM: {"sessions": {**rooms[ROOM]["sessions"], **more[ROOM]["sessions"]}}}}

    fresh = DeviceCrypto(BOB, "NEWDEV")  # bob's crypto state was lost: a new device of the same user
    assert fresh.megolm_decrypt(ROOM, encrypted_event(content)).content["body"] == "[undecryptable]"
    assert fresh.restore(backup, private.to_bytes()) == 2
    assert fresh.megolm_decrypt(ROOM, encrypted_event(content)).content["body"] == "before the loss"
    mine = dataclasses.replace(encrypted_event(own), sender=BOB)
    assert fresh.megolm_decrypt(ROOM, mine).content["body"] == "bob's own"
    assert fresh.backup_pending(public, limit=10) == ({}, [])  # what came from the backup is not sent back
    # The restored senders still hold: alice's session does not vouch for bob's name.
    forged = dataclasses.replace(encrypted_event(content), sender=BOB)
    assert fresh.megolm_decrypt(ROOM, forged).content["reason"] == "room key of another sender"
    # Another key opens nothing; the state keeps the backup bookkeeping.
    assert DeviceCrypto(BOB, "OTHER").restore(backup, vz.Curve25519SecretKey().to_bytes()) == 0
    fresh.backup_version = "3"
    again = DeviceCrypto.from_state(fresh.to_state(b"k" * 32), b"k" * 32)
    assert (again.backup_version, again.backed_up) == ("3", fresh.backed_up)


def test_ctl_backup_key_prints_and_restores_the_recovery_key(tmp_path: Any) -> None:
    state_dir = tmp_path / "state"
    config = tmp_path / "comatrix.toml"
    config.write_text(f'homeserver = "http://127.0.0.1:8008"\nstate_dir = "{state_dir}"\n')
    args = ["--config", str(config), "e2ee", "backup-key"]
    assert ctl_main(args, out=io.StringIO()) != 0  # the gateway has made none yet
    from comatrix.e2ee.vault import BACKUP_KEY_FILENAME, load_or_create_key

    key = load_or_create_key(state_dir, BACKUP_KEY_FILENAME)
    key_file = state_dir / BACKUP_KEY_FILENAME
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    out = io.StringIO()
    assert ctl_main(args, out=out) == 0
    recovery = out.getvalue().strip()
    assert formats.recovery_key_bytes(recovery) == key

    key_file.unlink()  # the state directory was lost; the operator kept the recovery key
    out = io.StringIO()
    assert ctl_main([*args, "--restore"], out=out, stdin=io.StringIO(recovery + "\n")) == 0
    assert key_file.read_bytes() == key and stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert recovery not in out.getvalue()
    other = formats.recovery_key(bytes(32))
    assert ctl_main([*args, "--restore"], out=io.StringIO(), stdin=io.StringIO(other)) != 0  # never overwritten
    assert ctl_main([*args, "--restore"], out=io.StringIO(), stdin=io.StringIO("not a key")) != 0
    assert key_file.read_bytes() == key


# ---------------------------------------------------------------------- cross-signing

def test_cross_signing_keys_sign_the_device_and_show_in_status() -> None:
    from comatrix.e2ee.cross_signing import CrossSigning
    from comatrix.e2ee.device import verify_signed
    from comatrix.e2ee.status import describe

    bob = DeviceCrypto(BOB, "BOBDEV")
    cross = CrossSigning.generate(BOB)
    master, ssk = cross.public("master"), cross.public("self_signing")
    body = cross.upload_body()
    assert body["master_key"] == {"user_id": BOB, "usage": ["master"], "keys": {f"ed25519:{master}": master}}
    assert body["self_signing_key"]["usage"] == ["self_signing"]
    for role in ("self_signing_key", "user_signing_key"):
        assert verify_signed(body[role], BOB, master, master)
    signed = cross.sign("self_signing", bob.device_keys())
    assert verify_signed(signed, BOB, ssk, ssk)
    assert verify_signed(signed, BOB, "BOBDEV", bob.ed25519)  # the device's own signature is kept
    assert not verify_signed(dict(signed, device_id="OTHER"), BOB, ssk, ssk)

    state = cross.to_state()
    assert CrossSigning.from_state(state).public("master") == master
    bob.cross_signed = True
    text = describe(BOB, [bob.to_state(b"k" * 32), state])
    assert "cross-signed       yes" in text and f"master key         {master}" in text
    assert all(private not in text for private in state["private"].values())
    assert "cross-signing keys: none yet" in describe(BOB, [DeviceCrypto(BOB, "X").to_state(b"k" * 32)])


# ---------------------------------------------------------------------- room key requests

def test_only_the_users_own_other_devices_get_their_room_key_requests_noted() -> None:
    import vodozemac as vz

    alice, bob = DeviceCrypto(ALICE, "ALICEDEV"), DeviceCrypto(BOB, "BOBDEV")
    exchange_room_key(alice, bob, {ALICE, BOB})
    session_id = alice.outbound[ROOM].session.session_id

    def request(sender: str, device: str, session: str = session_id) -> dict[str, Any]:
        return {"type": formats.ROOM_KEY_REQUEST, "sender": sender, "content": {
            "action": "request", "requesting_device_id": device, "request_id": "r1",
            "body": {"algorithm": formats.MEGOLM, "room_id": ROOM, "session_id": session, "sender_key": "x"}}}
    bob.to_device(request(ALICE, "ALICEDEV"))  # another user: never
    bob.to_device(request(BOB, "BOBDEV"))  # itself
    bob.to_device(request(BOB, "PHONE", session="unknown"))  # a session it does not have
    assert bob.key_requests == []
    bob.to_device(request(BOB, "PHONE"))
    assert bob.key_requests == [("PHONE", ROOM, session_id)]
    bob.keys_queried({"device_keys": {ALICE: {"ALICEDEV": alice.device_keys()}}}, [ALICE])
    forwarded = bob.forwarded_room_key(ROOM, session_id)
    assert (forwarded["sender_key"], forwarded["sender_claimed_ed25519_key"]) == (alice.curve25519, alice.ed25519)
    phone = vz.InboundGroupSession.import_session(vz.ExportedSessionKey(forwarded["session_key"]))
    content = alice.megolm_encrypt(ROOM, "m.room.message", {"body": "for the phone"})
    assert b"for the phone" in phone.decrypt(vz.MegolmMessage.from_base64(content["ciphertext"])).plaintext


def test_secret_storage_round_trip_and_refusals() -> None:
    from comatrix.e2ee import secret_storage
    from comatrix.e2ee.cross_signing import CrossSigning

    key, other = os.urandom(32), os.urandom(32)
    cross = CrossSigning.generate(BOB)
    stored = {name: secret_storage.encrypt(key, name, secret) for name, secret in cross.secrets().items()}
    assert all(base64_bit63_clear(entry["iv"]) for entry in stored.values())
    back = {name: secret_storage.decrypt(key, name, entry) for name, entry in stored.items()}
    assert CrossSigning.from_secrets(BOB, back).public("master") == cross.public("master")
    name, entry = next(iter(stored.items()))
    for wrong_key, wrong_name in ((other, name), (key, "m.cross_signing.other")):
        with pytest.raises(ValueError):
            secret_storage.decrypt(wrong_key, wrong_name, entry)
    description = secret_storage.describe_key(key)
    assert description["algorithm"] == "m.secret_storage.v1.aes-hmac-sha2"
    assert secret_storage.decrypt(key, "", {**description, "ciphertext": secret_storage.encrypt(
        key, "", "\0" * 32, iv=base64.b64decode(description["iv"]))["ciphertext"]}) == "\0" * 32
    assert secret_storage.key_id(key) == secret_storage.key_id(key) != secret_storage.key_id(other)


def base64_bit63_clear(iv: str) -> bool:
    return not base64.b64decode(iv)[8] & 0x80
