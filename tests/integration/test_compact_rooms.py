"""Rooms and membership in the compact profile end to end: two devices (two source addresses, two
Synapse users) through the gateway with the reference client's API, every result checked on the
Synapse side over HTTP, and every datagram of every exchange within its 64-byte budget."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest

from comatrix.client import CoapResponseError, CompactDevice, DeviceState, UdpCoap
from comatrix.compact import codec
from support.gateway import GatewayProcess
from support.synapse import MatrixUser, SynapseServer, _quote
from test_compact_profile import Recorder, measured, sensor_user
from test_device_client import device_cli

pytestmark = pytest.mark.integration

CLIENT = "/_matrix/client/v3"


@pytest.fixture
def gateway(unlimited_gateway: GatewayProcess) -> GatewayProcess:
    """Two devices send bursts from loopback: the gateway with rate limits off."""
    return unlimited_gateway


def device(gateway: GatewayProcess, user: MatrixUser, recorder: Recorder, source: str) -> CompactDevice:
    compact = CompactDevice(UdpCoap(gateway.uri(), trace=recorder, source=source), DeviceState(None))
    compact.login(user.localpart, user.password)
    return compact


def state(synapse: SynapseServer, user: MatrixUser, room_id: str, event_type: str, key: str = "") -> Any:
    return synapse.request("GET", f"{CLIENT}/rooms/{_quote(room_id)}/state/{event_type}/{_quote(key)}",
                           token=user.access_token)


def membership(synapse: SynapseServer, user: MatrixUser, room_id: str, member: MatrixUser) -> str:
    return str(state(synapse, user, room_id, "m.room.member", member.user_id)["membership"])


def test_rooms_and_membership_end_to_end_within_budget(gateway: GatewayProcess, synapse: SynapseServer) -> None:
    owner, friend = sensor_user(synapse), sensor_user(synapse)
    recorder = Recorder()
    sensor = device(gateway, owner, recorder, "127.0.0.1")
    other = device(gateway, friend, recorder, "127.0.0.2")

    # Rooms: create with a name, a topic and an invitation; read it; change it; resolve an alias.
    handle = measured(recorder, "create", lambda: sensor.create("Greenhouse", "air and soil", [friend.localpart]))
    room_id = synapse.request("GET", f"{CLIENT}/joined_rooms", token=owner.access_token)["joined_rooms"][0]
    assert handle == 0 and sensor.room_handle("Greenhouse") == 0
    assert state(synapse, owner, room_id, "m.room.name") == {"name": "Greenhouse"}
    assert state(synapse, owner, room_id, "m.room.topic")["topic"] == "air and soil"
    assert state(synapse, owner, room_id, "m.room.join_rules")["join_rule"] == "invite"  # private_chat
    assert membership(synapse, owner, room_id, friend) == "invite"
    info = measured(recorder, "room", lambda: sensor.room_info("Greenhouse"))
    assert info == codec.RoomInfo("Greenhouse", "air and soil", 1, "join")
    measured(recorder, "room", lambda: sensor.set_room("Greenhouse", name="Greenhouse 2"))
    measured(recorder, "room", lambda: sensor.set_room("Greenhouse", topic="soil moisture"))
    assert state(synapse, owner, room_id, "m.room.name") == {"name": "Greenhouse 2"}
    assert state(synapse, owner, room_id, "m.room.topic")["topic"] == "soil moisture"
    alias = f"#gh{secrets.token_hex(3)}:{synapse.server_name}"
    synapse.set_alias(owner.access_token, alias, room_id)
    assert measured(recorder, "room", lambda: sensor.resolve(alias)) == room_id

    # Membership: the invited device lists its invitation and accepts it.
    [invitation] = measured(recorder, "invite", other.invitations)
    # The name as the invitation carries it (stripped state, a snapshot taken when inviting).
    assert invitation.inviter == owner.localpart and invitation.name == "Greenhouse"
    assert measured(recorder, "join", lambda: other.accept(invitation.room, "greenhouse")) == invitation.room
    assert membership(synapse, owner, room_id, friend) == "join"
    assert measured(recorder, "members", lambda: sensor.members("Greenhouse")) == sorted(
        [owner.localpart, friend.localpart], key=lambda local: f"@{local}:{synapse.server_name}")
    assert sensor.room_info("Greenhouse").joined == 2

    # Kick (with a reason), invite again, leave.
    measured(recorder, "kick", lambda: sensor.kick("Greenhouse", friend.localpart, "moved away"))
    kicked = state(synapse, owner, room_id, "m.room.member", friend.user_id)
    assert kicked["membership"] == "leave" and kicked["reason"] == "moved away"
    measured(recorder, "invite", lambda: sensor.invite("Greenhouse", friend.user_id))  # a full user id works too
    assert membership(synapse, owner, room_id, friend) == "invite"
    [again] = other.invitations()
    assert other.accept(again.room) == invitation.room  # the same room keeps its room handle
    measured(recorder, "leave", lambda: other.leave("greenhouse"))
    assert membership(synapse, owner, room_id, friend) == "leave"
    assert sensor.members("Greenhouse") == [owner.localpart]

    # An invitation declined.
    second = sensor.create("Shed", invite=[friend.localpart], public=True)
    second_id = next(room for room in synapse.request("GET", f"{CLIENT}/joined_rooms",
                                                      token=owner.access_token)["joined_rooms"] if room != room_id)
    assert second == 1 and state(synapse, owner, second_id, "m.room.join_rules")["join_rule"] == "public"
    [shed] = other.invitations()
    assert shed.name == "Shed"
    measured(recorder, "leave", lambda: other.decline(shed.room))
    assert membership(synapse, owner, second_id, friend) == "leave"
    assert other.invitations() == []


def test_refusals_are_the_profiles_codes(gateway: GatewayProcess, synapse: SynapseServer) -> None:
    owner = sensor_user(synapse)
    recorder = Recorder()
    sensor = device(gateway, owner, recorder, "127.0.0.1")
    sensor.create("Lab")
    cases = [(lambda: sensor.invite("Lab", "not a user"), "4.00"),
             (lambda: sensor.kick("Lab", "@nocolon"), "4.00"),
             (lambda: sensor.members("7"), "4.04"),
             (lambda: sensor.resolve(f"#nowhere{secrets.token_hex(3)}:{synapse.server_name}"), "4.04"),
             (lambda: sensor.kick("Lab", owner.localpart + "x"), "4.03")]  # not in the room: Synapse refuses
    for call, code in cases:
        with pytest.raises(CoapResponseError) as refused:
            call()
        assert refused.value.reply.code_text == code, refused.value
    assert all(len(datagram) <= 64 for _way, datagram in recorder.datagrams)


def test_the_room_commands_of_comatrix_device(gateway: GatewayProcess, synapse: SynapseServer,
                                              tmp_path: Path) -> None:
    owner, friend = sensor_user(synapse), sensor_user(synapse)
    run, other = device_cli(gateway, tmp_path / "owner.json"), device_cli(gateway, tmp_path / "friend.json")
    run("login", "--", owner.localpart, owner.password)
    other("login", "--", friend.localpart, friend.password)

    assert run("create", "Lab", "--topic", "bench", "--invite", friend.localpart).stdout == "0\n"
    room_id = synapse.request("GET", f"{CLIENT}/joined_rooms", token=owner.access_token)["joined_rooms"][0]
    assert run("room", "Lab", "--name", "Lab 2").stderr == "set\n"
    assert run("room", "Lab").stdout == "name: Lab 2\ntopic: bench\njoined: 1\nmembership: join\n"
    alias = f"#lab{secrets.token_hex(3)}:{synapse.server_name}"
    synapse.set_alias(owner.access_token, alias, room_id)
    assert run("room", alias).stdout == room_id + "\n"

    [line] = other("invitations").stdout.splitlines()
    room_handle, inviter, name = line.split("\t")
    assert (inviter, name) == (owner.localpart, "Lab")
    assert other("accept", room_handle, "lab").stdout == room_handle + "\n"
    assert run("members", "Lab").stdout.split() == sorted(
        [owner.localpart, friend.localpart], key=lambda local: f"@{local}:{synapse.server_name}")
    assert run("kick", "Lab", friend.localpart, "done").stderr == "kicked\n"
    assert membership(synapse, owner, room_id, friend) == "leave"
    assert run("invite", "Lab", friend.localpart).stderr == "invited\n"
    [line] = other("invitations").stdout.splitlines()
    assert other("decline", line.split("\t")[0]).stderr == "declined\n"
    assert membership(synapse, owner, room_id, friend) == "leave"
    assert run("leave", "Lab").stderr == "left\n"
    assert membership(synapse, owner, room_id, owner) == "leave"
    refused = run("invite", "Lab", "not a user", check=False)
    assert refused.returncode == 1 and refused.stderr.startswith("comatrix-device: 4.00 user must be")
