"""Observers resume across a gateway restart, against the real Synapse.

* Compact profile: a device logs in, joins and watches ``/v``; the gateway is
  stopped, messages are sent over HTTP while it is down, the gateway starts
  again and the device observes again: it gets exactly what arrived during
  the outage, with the next cursors, and is then pushed the next message.
* Compact profile, Synapse outage: the session's /sync loop fails, backs off and
  keeps its position; once Synapse is back the next message is pushed to the
  same observation, with the next cursor, and the gateway never restarted.
* MSC3079: a client observes ``/7`` and acknowledges a pushed batch; the
  gateway restarts while a message is sent over HTTP; the client repeats its
  registration (same request, same CoAP token, same port): the answer holds
  the message sent during the outage and not the one it already acknowledged,
  and the next message is pushed again.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
import sqlite3
import struct
import threading
import time
from typing import Any, Callable, Iterator

import cbor2
import pytest

from comatrix.client import CompactDevice, DeviceState, Message, UdpCoap
from comatrix.coap import wire
from comatrix.coap.numbers import Code, MessageType, OptionNumber
from comatrix.store import DB_FILENAME
from support.gateway import GatewayProcess
from support.synapse import MatrixUser, SynapseServer

pytestmark = pytest.mark.integration

NO_LIMITS = "[limits]\ndevice_rate = 0\nglobal_rate = 0\n"
#: Bound for anything that should take a second or two.
WAIT = 20.0


def owner_room_with(synapse: SynapseServer, owner: MatrixUser, member: MatrixUser) -> str:
    room_id = synapse.create_room(owner.access_token)
    synapse.invite(owner.access_token, room_id, member.user_id)
    return room_id


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- compact ---------------------------------------------------------------------------------


class Watcher:
    """``CompactDevice.watch`` in a thread, with a hook telling when the registration was answered."""

    def __init__(self, device: CompactDevice, room: str, count: int, *, quiet_for: float = WAIT) -> None:
        """``quiet_for``: longest time without a notification before the watch gives up."""
        self.quiet_for = quiet_for
        self.received: list[Message] = []
        self.errors: list[BaseException] = []
        self.registered = threading.Event()
        original = device.coap.trace

        def trace(direction: str, data: bytes) -> None:
            if original is not None:
                original(direction, data)
            if direction == "down":
                try:
                    message = wire.decode(data)
                except wire.FormatError:
                    return
                if message.code == Code.CONTENT:
                    self.registered.set()

        device.coap.trace = trace
        self.thread = threading.Thread(target=self._run, args=(device, room, count), daemon=True)
        self.thread.start()
        if not self.registered.wait(WAIT):
            raise AssertionError(f"observation not registered: {self.errors}")

    def _run(self, device: CompactDevice, room: str, count: int) -> None:
        try:
            for message in device.watch(room, count=count, timeout=self.quiet_for):
                self.received.append(message)
        except BaseException as exc:  # reported by the main thread
            self.errors.append(exc)

    def join(self) -> list[Message]:
        self.thread.join(self.quiet_for * 2)
        assert not self.thread.is_alive() and not self.errors, self.errors
        return self.received


def compact_member(make_gateway: Callable[..., GatewayProcess], synapse: SynapseServer,
                   synapse_user: Callable[..., MatrixUser]) -> tuple[GatewayProcess, MatrixUser, str, CompactDevice]:
    """A gateway, a room's owner and the room, and a compact device logged in and joined to it."""
    gw = make_gateway(config_text=NO_LIMITS)
    sensor, owner = synapse_user("watcher"), synapse_user("owner")
    room_id = owner_room_with(synapse, owner, sensor)
    device = CompactDevice(UdpCoap(gw.uri()), DeviceState(None))
    device.login(sensor.localpart, sensor.password)
    device.join(room_id)
    return gw, owner, room_id, device


def test_compact_watch_after_a_gateway_restart_gets_what_arrived_meanwhile(
        make_gateway: Callable[..., GatewayProcess], synapse: SynapseServer,
        synapse_user: Callable[..., MatrixUser]) -> None:
    gw, owner, room_id, device = compact_member(make_gateway, synapse, synapse_user)

    watcher = Watcher(device, room_id, count=1)
    synapse.send_text(owner.access_token, room_id, "before the restart")
    [first] = watcher.join()
    assert first.body == "before the restart"

    gw.stop()
    for text in ("during the outage 1", "during the outage 2"):
        synapse.send_text(owner.access_token, room_id, text)
    gw.start()

    watcher = Watcher(device, room_id, count=3)
    # The device catches up first (the registration answer shows a gap; it fetches from its cursor)...
    wait_for(lambda: len(watcher.received) == 2 or bool(watcher.errors), "the catch-up")
    # ...then a new message is pushed to the renewed observation.
    synapse.send_text(owner.access_token, room_id, "after the restart")
    received = watcher.join()
    assert [m.body for m in received] == ["during the outage 1", "during the outage 2", "after the restart"]
    assert [m.cursor for m in received] == [first.cursor + 1, first.cursor + 2, first.cursor + 3]
    assert all(m.sender == owner.user_id for m in received)


def test_compact_watch_survives_a_synapse_outage_without_a_gateway_restart(
        make_gateway: Callable[..., GatewayProcess], synapse: SynapseServer,
        synapse_user: Callable[..., MatrixUser]) -> None:
    gw, owner, room_id, device = compact_member(make_gateway, synapse, synapse_user)

    # Stopping and starting Synapse, then the loop's back-off (1, ~2, ~4 s...), pass without a push.
    watcher = Watcher(device, room_id, count=2, quiet_for=60.0)
    synapse.send_text(owner.access_token, room_id, "before the outage")
    wait_for(lambda: len(watcher.received) == 1 or bool(watcher.errors), "the first push")
    with synapse.stopped():
        # The session's /sync loop fails, backs off and keeps its position; the
        # observation stays registered.
        wait_for(lambda: "Sync loop of compact session" in gw.log_text() and "retrying in" in gw.log_text(),
                 "the sync loop to fail and back off")
    synapse.send_text(owner.access_token, room_id, "after the outage")
    received = watcher.join()
    assert [m.body for m in received] == ["before the outage", "after the outage"]
    assert received[1].cursor == received[0].cursor + 1
    assert gw.running


# -- MSC3079 ---------------------------------------------------------------------------------

ACCESS_TOKEN, KEY_TABLE = 256, 257
NEXT_BATCH, ROOMS, JOIN, TIMELINE, EVENTS, CONTENT, BODY = 19, 23, 24, 12, 13, 3, 27
#: Keeps every answer small (one CoAP block): only message events, no state, presence or receipts.
FILTER = json.dumps({"presence": {"types": []}, "account_data": {"types": []},
                     "room": {"timeline": {"types": ["m.room.message"], "limit": 10}, "state": {"types": []},
                              "ephemeral": {"types": []}, "account_data": {"types": []}}},
                    separators=(",", ":"))


class SyncObserver:
    """A bare CoAP client observing ``/7`` with a fixed CoAP token from a fixed port.

    A real device repeats its registration request as it is (RFC 7641 §3.3.1);
    client libraries that pick a new token each time cannot show that.
    """

    def __init__(self, gateway: GatewayProcess, access_token: str) -> None:
        self.address = (gateway.ip, gateway.port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.token = secrets.token_bytes(4)
        self.options = [(int(OptionNumber.URI_PATH), b"7"),
                        (int(OptionNumber.URI_QUERY), b"filter=" + FILTER.encode()),
                        (ACCESS_TOKEN, access_token.encode()), (KEY_TABLE, b"\x01")]
        self.seen: set[int] = set()

    def close(self) -> None:
        self.sock.close()

    def _receive(self, deadline: float) -> wire.Datagram | None:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                return None
            message = wire.decode(data)
            if message.mtype == MessageType.CON:
                self.sock.sendto(wire.empty(MessageType.ACK, message.mid), self.address)
            return message

    def register(self) -> dict[Any, Any]:
        """Send the (always identical) registration; its answer, decoded."""
        mid = secrets.randbits(16)
        request = wire.encode(MessageType.CON, Code.GET, mid, self.token,
                              sorted([(int(OptionNumber.OBSERVE), b"")] + self.options), b"")
        deadline = time.monotonic() + WAIT
        for _ in range(4):  # CON retransmissions, bounded
            self.sock.sendto(request, self.address)
            retry = time.monotonic() + 2.0
            while (message := self._receive(min(retry, deadline))) is not None:
                if message.token == self.token and message.code != Code.EMPTY:
                    assert message.code == Code.CONTENT, message
                    return self._body(message)
                if message.mtype == MessageType.ACK and message.mid == mid:
                    retry = deadline  # acknowledged: the separate response follows
        raise AssertionError("registration not answered")

    def notification(self) -> dict[Any, Any]:
        deadline = time.monotonic() + WAIT
        while (message := self._receive(deadline)) is not None:
            if message.token == self.token and message.code != Code.EMPTY and message.mid not in self.seen:
                self.seen.add(message.mid)
                assert message.code == Code.CONTENT, message
                return self._body(message)
        raise AssertionError("no notification")

    @staticmethod
    def _body(message: wire.Datagram) -> dict[Any, Any]:
        assert not any(number == OptionNumber.BLOCK2 for number, _ in message.options), "answer too large"
        body = cbor2.loads(message.payload)
        assert isinstance(body, dict)
        return body


def bodies(answer: dict[Any, Any], room_id: str) -> list[str]:
    events = answer.get(ROOMS, {}).get(JOIN, {}).get(room_id, {}).get(TIMELINE, {}).get(EVENTS, [])
    return [event.get(CONTENT, {}).get(BODY) for event in events]


def notifications_until(observer: SyncObserver, room_id: str, text: str) -> Iterator[list[str]]:
    """Timeline bodies of each notification until one carries ``text``."""
    for _ in range(20):
        found = bodies(observer.notification(), room_id)
        yield found
        if text in found:
            return
    raise AssertionError(f"{text!r} never pushed")


def saved_positions(gateway: GatewayProcess) -> int:
    try:
        with sqlite3.connect(f"file:{gateway.state_dir / DB_FILENAME}?mode=ro", uri=True, timeout=1) as db:
            return int(db.execute("SELECT COUNT(*) FROM sync_positions").fetchone()[0])
    except sqlite3.OperationalError:  # not created yet, or busy
        return 0


def test_msc3079_observation_resumes_after_a_gateway_restart(
        make_gateway: Callable[..., GatewayProcess], synapse: SynapseServer,
        synapse_user: Callable[..., MatrixUser]) -> None:
    gw = make_gateway(config_text=NO_LIMITS)
    device, friend = synapse_user("lbresume"), synapse_user("friend")
    room_id = owner_room_with(synapse, friend, device)
    synapse.join(device.access_token, room_id)
    observer = SyncObserver(gw, device.access_token)
    try:
        first = observer.register()
        assert isinstance(first[NEXT_BATCH], str)
        synapse.send_text(friend.access_token, room_id, "acknowledged before")
        list(notifications_until(observer, room_id, "acknowledged before"))  # each one ACKed
        wait_for(lambda: saved_positions(gw) == 1, "the acknowledged position in SQLite")
        # The resume point is keyed by the SHA-256 of the client's token, never the token.
        token = device.access_token.encode()
        assert gw.state_files_holding({"access token": token}) == {}
        assert gw.state_files_holding({"its hash": hashlib.sha256(token).digest()}) != {}

        gw.stop()
        synapse.send_text(friend.access_token, room_id, "sent while the gateway was down")
        gw.start()

        again = observer.register()  # the very same request
        assert bodies(again, room_id) == ["sent while the gateway was down"]
        synapse.send_text(friend.access_token, room_id, "after the restart")
        pushed = [body for found in notifications_until(observer, room_id, "after the restart") for body in found]
        assert pushed == ["after the restart"]
    finally:
        observer.close()
