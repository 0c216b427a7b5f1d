"""Reactions, redactions, read receipts and allowed senders in the compact profile end to end: devices
(distinct source addresses, Synapse users) through the gateway with the reference client (its API and
the ``comatrix-device`` command), every result checked on the Synapse side over HTTP (``/relations``,
the redacted event, the other user's ``/sync`` receipts), every datagram within its 64-byte budget."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from comatrix.coap import wire
from comatrix.coap.numbers import Code
from comatrix.client import CoapResponseError, CompactDevice, DeviceState, UdpCoap
from support.gateway import GatewayProcess
from support.synapse import MatrixUser, SynapseServer, _quote
from test_compact_profile import NO_LIMITS, Recorder, invited_room, measured, sensor_user
from test_device_client import device_cli

pytestmark = pytest.mark.integration

CLIENT = "/_matrix/client/v3"
RECEIPTS_ONLY = json.dumps({"presence": {"types": []}, "account_data": {"types": []},
                            "room": {"timeline": {"limit": 0}, "state": {"types": []},
                                     "ephemeral": {"types": ["m.receipt"]}}})


@pytest.fixture
def gateway(unlimited_gateway: GatewayProcess) -> GatewayProcess:
    return unlimited_gateway


def device(gateway: GatewayProcess, user: MatrixUser, recorder: Recorder | None, source: str) -> CompactDevice:
    compact = CompactDevice(UdpCoap(gateway.uri(), trace=recorder, source=source), DeviceState(None))
    compact.login(user.localpart, user.password)
    return compact


def reactions(synapse: SynapseServer, user: MatrixUser, room_id: str, event_id: str) -> list[tuple[str, str]]:
    """(sender, key) of the live annotations of ``event_id``, as Synapse's ``/relations`` gives them."""
    body = synapse.request("GET", f"/_matrix/client/v1/rooms/{_quote(room_id)}/relations/{_quote(event_id)}"
                                  "/m.annotation/m.reaction", token=user.access_token)
    return [(event["sender"], event["content"]["m.relates_to"]["key"]) for event in body["chunk"]]


def reason(synapse: SynapseServer, user: MatrixUser, room_id: str, event_id: str) -> str:
    """The reason of the redaction of ``event_id`` (which must be redacted), as Synapse serves the event."""
    event = synapse.request("GET", f"{CLIENT}/rooms/{_quote(room_id)}/event/{_quote(event_id)}",
                            token=user.access_token)
    assert event["content"] == {}
    return str(event["unsigned"]["redacted_because"]["content"]["reason"])


def read_up_to(synapse: SynapseServer, user: MatrixUser, room_id: str, reader: MatrixUser) -> str | None:
    """The event ``reader``'s m.read receipt names, in ``user``'s /sync (polled: receipts are streamed)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        sync = synapse.request("GET", f"{CLIENT}/sync", token=user.access_token,
                               query={"filter": RECEIPTS_ONLY, "timeout": "0"})
        room = sync.get("rooms", {}).get("join", {}).get(room_id, {})
        for ephemeral in room.get("ephemeral", {}).get("events", []):
            for event_id, kinds in ephemeral.get("content", {}).items():
                if reader.user_id in kinds.get("m.read", {}):
                    return str(event_id)
        time.sleep(0.2)
    return None


def test_react_redact_and_read_end_to_end_within_budget(gateway: GatewayProcess, synapse: SynapseServer) -> None:
    sensor, owner = sensor_user(synapse), sensor_user(synapse)
    room_id = invited_room(synapse, owner, sensor.user_id)
    recorder = Recorder()
    compact = device(gateway, sensor, recorder, "127.0.0.1")
    compact.join(room_id)
    command = synapse.send_text(owner.access_token, room_id, "open the door")
    message = compact.getmsg(room_id)
    assert message is not None and message.body == "open the door"

    for _ in range(2):  # a repeat (its answer lost) adds nothing
        measured(recorder, "react", lambda: compact.react(room_id, message.cursor, "👍"))
    assert reactions(synapse, owner, room_id, command) == [(sensor.user_id, "👍")]
    measured(recorder, "react", lambda: compact.react(room_id, message.cursor, "👍", remove=True))
    assert reactions(synapse, owner, room_id, command) == []
    measured(recorder, "react", lambda: compact.react(room_id, message.cursor, "👍", remove=True))  # still fine

    measured(recorder, "read", lambda: compact.read(room_id, message.cursor))
    assert read_up_to(synapse, owner, room_id, sensor) == command

    compact.send(room_id, "wrong value 99")
    own = compact.getmsg(room_id)
    assert own is not None and own.sender == sensor.user_id
    measured(recorder, "redact", lambda: compact.redact(room_id, own.cursor, "sensor fault"))
    [redacted] = [event for event in synapse.text_messages(owner.access_token, room_id)
                  if event["sender"] == sensor.user_id]
    assert redacted["content"] == {}
    assert reason(synapse, owner, room_id, redacted["event_id"]) == "sensor fault"

    with pytest.raises(CoapResponseError) as unknown:
        measured(recorder, "read", lambda: compact.read(room_id, own.cursor + 5))
    assert unknown.value.reply.code_text == "4.04"
    assert all(len(datagram) <= 64 for _way, datagram in recorder.datagrams)


def test_the_relation_commands_of_comatrix_device(gateway: GatewayProcess, synapse: SynapseServer,
                                                  tmp_path: Path) -> None:
    sensor, owner = sensor_user(synapse), sensor_user(synapse)
    room_id = invited_room(synapse, owner, sensor.user_id)
    run = device_cli(gateway, tmp_path / "sensor.json")
    run("login", "--", sensor.localpart, sensor.password)
    run("join", room_id)
    command = synapse.send_text(owner.access_token, room_id, "status?")
    ref = str(json.loads(run("--json", "getmsg", room_id).stdout)["cursor"])

    assert run("react", room_id, ref, "✅").stderr == "reacted\n"
    assert reactions(synapse, owner, room_id, command) == [(sensor.user_id, "✅")]
    assert run("react", room_id, ref, "✅", "--remove").stderr == "reaction removed\n"
    assert reactions(synapse, owner, room_id, command) == []
    assert run("read", room_id, ref).stderr == "read\n"
    assert read_up_to(synapse, owner, room_id, sensor) == command
    forbidden = run("redact", room_id, ref, check=False)  # another user's message: Synapse refuses
    assert forbidden.returncode == 1 and forbidden.stderr.startswith("comatrix-device: 4.03 M_FORBIDDEN")
    run("send", room_id, "reading 42")
    own = json.loads(run("--json", "getmsg", room_id).stdout)
    assert own["body"] == "reading 42"
    assert run("redact", room_id, str(own["cursor"]), "--reason", "handled").stderr == "redacted\n"
    [sent] = [event for event in synapse.text_messages(owner.access_token, room_id)
              if event["sender"] == sensor.user_id]
    assert reason(synapse, owner, room_id, sent["event_id"]) == "handled"
    refused = run("react", room_id, ref, "x" * 65, check=False)
    assert refused.returncode == 1 and refused.stderr.startswith("comatrix-device: 4.00 key too long")


def test_a_watch_delivers_allowed_senders_only(make_gateway: Callable[..., GatewayProcess],
                                               synapse: SynapseServer) -> None:
    sensor, commander, stranger = sensor_user(synapse), sensor_user(synapse), sensor_user(synapse)
    gw = make_gateway(config_text=NO_LIMITS + "[[devices]]\naddress = \"127.0.0.7\"\n"
                                  f"access_token = \"{sensor.access_token}\"\n"
                                  f"allowed_senders = [\"{commander.user_id}\"]\n")
    room_id = invited_room(synapse, commander, sensor.user_id)
    synapse.invite(commander.access_token, room_id, stranger.user_id)
    synapse.join(stranger.access_token, room_id)
    recorder = Recorder()
    compact = device(gw, sensor, recorder, "127.0.0.7")
    compact.join(room_id)
    assert "allowed_senders" in gw.log_path.read_text()  # what applies is said at start

    received: list[Any] = []
    errors: list[BaseException] = []

    def watch() -> None:
        try:
            for message in compact.watch(room_id, count=2, timeout=20):
                received.append(message)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
    synapse.send_text(commander.access_token, room_id, "first")  # the watch's starting point
    mark = recorder.mark()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    deadline = time.monotonic() + 15
    while not any(way == "down" and wire.decode(datagram).code == Code.CONTENT  # registration answered
                  for way, datagram in recorder.since(mark)):
        assert time.monotonic() < deadline and not errors, errors
        time.sleep(0.02)
    synapse.send_text(stranger.access_token, room_id, "do something bad")
    synapse.send_text(commander.access_token, room_id, "measure now")
    synapse.send_text(stranger.access_token, room_id, "and again")
    synapse.send_text(commander.access_token, room_id, "report")
    watcher.join(30)
    assert not watcher.is_alive() and not errors, errors
    assert [(m.sender, m.body) for m in received] == [(commander.user_id, "measure now"),
                                                       (commander.user_id, "report")]
    assert received[1].cursor == received[0].cursor + 1  # the stranger's got no number: no gap
    later = compact.new_messages(room_id)
    assert later == []
    assert [m.body for m in (compact.getmsg(room_id),) if m] == ["report"]
