"""Messages in the compact profile end to end against the real Synapse: each msgtype, a reply and an
edit sent with ``comatrix-device`` and checked on the Synapse side over HTTP (content, relations);
history pages backward and forward with their cursors, catching up after missed messages and
reaching events from before the device joined; every datagram within its budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from comatrix.client import CoapResponseError
from comatrix.compact.codec import HistoryPage
from comatrix.store import HISTORY_BASE
from support.gateway import GatewayProcess
from support.synapse import MatrixUser, SynapseServer, _quote
from test_compact_profile import BODY20, Recorder, measured, sensor_user
from test_compact_rooms import device
from test_device_client import device_cli

pytestmark = pytest.mark.integration

CLIENT = "/_matrix/client/v3"
GEO = "geo:48.2082,16.3738"


@pytest.fixture
def gateway(unlimited_gateway: GatewayProcess) -> GatewayProcess:
    """A device sends bursts from loopback: the gateway with rate limits off."""
    return unlimited_gateway


def shared_room(synapse: SynapseServer, owner: MatrixUser, sensor: MatrixUser) -> str:
    room_id = synapse.create_room(owner.access_token)
    synapse.invite(owner.access_token, room_id, sensor.user_id)
    return room_id


def events_by_body(synapse: SynapseServer, user: MatrixUser, room_id: str) -> dict[str, dict[str, Any]]:
    return {event["content"]["body"]: event for event in synapse.text_messages(user.access_token, room_id)}


def relations(synapse: SynapseServer, user: MatrixUser, room_id: str, event_id: str) -> list[dict[str, Any]]:
    path = f"/_matrix/client/v1/rooms/{_quote(room_id)}/relations/{_quote(event_id)}/m.replace"
    return list(synapse.request("GET", path, token=user.access_token)["chunk"])


def test_msgtypes_a_reply_and_an_edit_with_comatrix_device(gateway: GatewayProcess, synapse: SynapseServer,
                                                           tmp_path: Path) -> None:
    owner, sensor = sensor_user(synapse), sensor_user(synapse)
    room_id = shared_room(synapse, owner, sensor)
    run = device_cli(gateway, tmp_path / "device.json")
    run("login", "--", sensor.localpart, sensor.password)
    assert run("join", room_id).stdout == "0\n"

    refs = {name: int(run("send", room_id, *args).stdout) for name, args in [
        ("text", ["21.5 C"]), ("notice", ["door open", "--notice"]), ("emote", ["waves", "--emote"]),
        ("location", ["trap 3", "--location", GEO])]}
    assert sorted(refs.values()) == list(range(refs["text"], refs["text"] + 4))  # numbered at once, in order
    sent = events_by_body(synapse, owner, room_id)
    assert sent["21.5 C"]["content"] == {"msgtype": "m.text", "body": "21.5 C"}
    assert sent["door open"]["content"] == {"msgtype": "m.notice", "body": "door open"}
    assert sent["waves"]["content"] == {"msgtype": "m.emote", "body": "waves"}
    assert sent["trap 3"]["content"] == {"msgtype": "m.location", "body": "trap 3", "geo_uri": GEO}

    question = synapse.send_text(owner.access_token, room_id, "who is there?")
    [line] = run("history", room_id, "--limit", "1").stdout.splitlines()
    reference, said = line.split("\t")
    assert said == f"{owner.localpart}: who is there?"
    reply = int(run("send", room_id, "me", "--reply-to", reference).stdout)
    edit = int(run("send", room_id, "22.0 C", "--edit", str(refs["text"])).stdout)
    assert edit == reply + 1
    sent = events_by_body(synapse, owner, room_id)
    assert sent["me"]["content"]["m.relates_to"] == {"m.in_reply_to": {"event_id": question}}
    original = sent["21.5 C"]["event_id"]
    [replacement] = relations(synapse, owner, room_id, original)
    assert replacement["content"]["m.new_content"] == {"msgtype": "m.text", "body": "22.0 C"}
    assert replacement["content"]["body"] == "* 22.0 C" and replacement["sender"] == sensor.user_id

    lines = run("history", room_id, "--before", str(reply), "--limit", "3").stdout.splitlines()
    assert [line.split("\t")[1] for line in lines] == [
        f"{sensor.localpart}: waves [m.emote]", f"{sensor.localpart}: trap 3 [m.location]",
        f"{owner.localpart}: who is there?"]
    refused = run("send", room_id, "x", "--reply-to", "999", check=False)
    assert refused.returncode == 1 and "4.04 unknown event reference" in refused.stderr
    refused = run("send", room_id, "x", "--location", "geo:north", check=False)
    assert refused.returncode == 1 and "4.00 kind: not a geo: URI" in refused.stderr


def collect(pages: list[HistoryPage]) -> list[str]:
    return [event.body for page in pages for event in page.events]


def test_history_catches_up_and_pages_back_within_budget(gateway: GatewayProcess, synapse: SynapseServer) -> None:
    owner, sensor = sensor_user(synapse), sensor_user(synapse)
    room_id = shared_room(synapse, owner, sensor)
    for n in range(3):  # before the device joins: only history reaches them
        synapse.send_text(owner.access_token, room_id, f"early {n}")
    recorder = Recorder()
    compact = device(gateway, sensor, recorder, "127.0.0.1")
    measured(recorder, "join", lambda: compact.join(room_id))

    sent = measured(recorder, "send", lambda: compact.send(room_id, BODY20))
    notice = measured(recorder, "send-kind", lambda: compact.send(room_id, "door open", 1))
    measured(recorder, "send-kind", lambda: compact.send(room_id, "trap 3", GEO))
    [last] = measured(recorder, "history", lambda: compact.history(room_id)).events
    assert last.body == "trap 3" and last.msgtype == "m.location"

    # Asleep: six messages arrive; forward pages from the last one seen catch up, in order, none missed.
    missed = [f"missed {n}" for n in range(6)]
    for body in missed:
        synapse.send_text(owner.access_token, room_id, body)
    pages, start = [], last.ref
    while True:
        page = measured(recorder, "history", lambda: compact.history(room_id, start, 2))
        pages.append(page)
        if page.next is None:
            break
        start = page.next
    assert collect(pages) == missed and len(pages) == 3
    assert [event.ref for page in pages for event in page.events] == list(range(last.ref + 1, last.ref + 7))

    # Backward from now to the room's start: everything, oldest first, the early ones with historic refs.
    pages, back = [], None
    while True:
        page = measured(recorder, "history", lambda: compact.history(room_id, back, -2))
        pages.insert(0, page)
        if page.next is None:
            break
        back = page.next
    every = [event["content"]["body"] for event in reversed(synapse.text_messages(owner.access_token, room_id))]
    assert collect(pages) == every == ["early 0", "early 1", "early 2", BODY20, "door open", "trap 3", *missed]
    early = pages[0].events[0]
    assert early.body == "early 0" and early.ref > HISTORY_BASE - 10

    # References work both ways: a reply to a historic one, an edit of the device's own notice.
    measured(recorder, "send-reply", lambda: compact.send(room_id, "seen", reply_to=early.ref))
    measured(recorder, "send-edit", lambda: compact.send(room_id, "door closed", 1, replaces=notice))
    events = events_by_body(synapse, owner, room_id)
    assert events["seen"]["content"]["m.relates_to"] == {"m.in_reply_to": {"event_id": events["early 0"]["event_id"]}}
    [edit] = relations(synapse, owner, room_id, events["door open"]["event_id"])
    assert edit["content"]["m.new_content"] == {"msgtype": "m.notice", "body": "door closed"}
    assert sent is not None and sent < notice

    with pytest.raises(CoapResponseError) as refused:
        compact.history(room_id, HISTORY_BASE - 100, -1)  # never given out
    assert refused.value.reply.code_text == "4.04"
    assert all(len(datagram) <= 64 for _way, datagram in recorder.datagrams)
