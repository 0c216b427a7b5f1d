"""One device's long-poll flood against the real Synapse cannot exhaust the gateway's open files.

The gateway runs under ``prlimit --nofile=256`` (its own open-file limit, read at start).  One
device (127.0.0.2, one account) sends 300 concurrent MSC3079 ``GET /7?timeout=...&since=...``
long-polls: its share (``long_polls_per_device``, 4) hangs on Synapse, the other 296 are answered
4.29 with Max-Age at once.  Meanwhile another device's MSC3079 send and a compact login from a
third address succeed, and the gateway's open descriptors (``/proc/<pid>/fd``) stay below 80 % of
its limit.  The total the gateway planned with is the one its start-up log line names.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path

import cbor2
import pytest

from comatrix.client import CompactDevice, DeviceState, UdpCoap
from comatrix.coap import wire
from comatrix.coap.numbers import MessageType
from comatrix.longpoll import FD_RESERVE, FD_SHARE
from support.coap_clients import aiocoap_request
from support.gateway import GatewayProcess
from support.secrets import remember
from support.synapse import SynapseServer

pytestmark = pytest.mark.integration

#: The gateway's open-file limit in this test.
NOFILE = 256
FLOOD = 300
PER_DEVICE = 4
CBOR, TOKEN, MAX_AGE, URI_PATH, URI_QUERY = 60, 256, 14, 11, 15
CON, ACK = 0, 2
GET = 1
TOO_MANY_REQUESTS = (4 << 5) | 29
CONTENT = (2 << 5) | 5
MSGTYPE, BODY = 28, 27
#: Bound for the flood's immediate answers (they come within milliseconds on an idle machine).
WAIT = 60.0


class LimitedGateway(GatewayProcess):
    """The gateway started through ``prlimit``, which sets the limit and execs twistd (same pid)."""

    def command(self) -> list[str]:
        return ["prlimit", f"--nofile={NOFILE}:{NOFILE}", "--"] + super().command()


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Flood:
    """``FLOOD`` CON long-polls from one socket; the gateway's answers, by Message ID."""

    def __init__(self, gateway: GatewayProcess, token: str, since: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.2", 0))
        self.server = ("127.0.0.1", gateway.port)
        options = [(URI_PATH, b"7"), (URI_QUERY, b"timeout=20000"), (URI_QUERY, f"since={since}".encode()),
                   (TOKEN, token.encode())]
        first = secrets.randbelow(0x10000)
        self.requests = {(first + n) & 0xFFFF: wire.encode(CON, GET, (first + n) & 0xFFFF, n.to_bytes(2, "big"),
                                                           options, b"")
                         for n in range(FLOOD)}
        self.acked: set[int] = set()
        self.answers: dict[bytes, tuple[int, list[tuple[int, bytes]], bytes]] = {}

    def close(self) -> None:
        self.sock.close()

    def run(self, until: float, on_tick: "callable[[], None]") -> None:  # type: ignore[valid-type]
        """Send all, resend (same MID) what has no ACK yet every 2 s, until every refusal is in."""
        next_send = 0.0
        while time.monotonic() < until and len(self.answers) < FLOOD - PER_DEVICE:
            now = time.monotonic()
            if now >= next_send:
                for mid, datagram in self.requests.items():
                    if mid not in self.acked:
                        self.sock.sendto(datagram, self.server)
                next_send = now + 2.0
            self.sock.settimeout(0.2)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                on_tick()
                continue
            mtype, code, mid, token, options, payload = wire.decode(data)
            if mtype == CON:
                self.sock.sendto(wire.empty(MessageType.ACK, mid), self.server)
            if mtype == ACK:
                self.acked.add(mid)
            if code != 0:
                self.answers[token] = (code, options, payload)
            on_tick()


def test_300_long_polls_from_one_device_leave_other_devices_and_open_files_alone(
        synapse: SynapseServer, synapse_user, tmp_path: Path) -> None:
    flooder, sender, compact_user = synapse_user("flood"), synapse_user("other"), synapse_user("compact")
    room_id = synapse.create_room(sender.access_token)
    gateway = LimitedGateway(synapse.base_url, tmp_path / "gw", log_level="info",
                             # Rate limits off for the device: what holds it back here is its long-poll share.
                             config_text=f"[limits]\ndevice_rate = 0\nlong_polls_per_device = {PER_DEVICE}\n")
    gateway.start()
    flood = None
    try:
        planned = int(NOFILE * FD_SHARE) - FD_RESERVE - 16  # 16: max_upstream, above max_connections
        assert f"at most {planned} in all, {PER_DEVICE} per device; open-file limit {NOFILE}" in gateway.log_text()

        first = aiocoap_request("GET", gateway.uri("7?timeout=0"), options=[(TOKEN, flooder.access_token.encode())])
        assert first.code == "2.05"
        flood = Flood(gateway, flooder.access_token, first.cbor()["next_batch"])
        most = [open_files(gateway.pid or 0)]
        flood.run(time.monotonic() + WAIT, lambda: most.append(open_files(gateway.pid or 0)))

        refused = [answer for answer in flood.answers.values() if answer[0] == TOO_MANY_REQUESTS]
        assert len(refused) == FLOOD - PER_DEVICE == len(flood.answers)
        for _code, options, payload in refused:
            assert payload == b"too many long-polls of this device"
            assert any(number == MAX_AGE for number, _ in options)
        assert len(flood.acked) == FLOOD  # the device's share is still hanging on Synapse (empty ACKs)

        # Another device's send and a compact login from a third address go through meanwhile.
        sent = aiocoap_request("PUT", gateway.uri(f"9/{room_id}/m.room.message/{secrets.token_hex(4)}"),
                               content_format=CBOR, options=[(TOKEN, sender.access_token.encode())],
                               payload=cbor2.dumps({MSGTYPE: "m.text", BODY: "sent during the flood"}))
        assert sent.code == "2.04"
        assert synapse.text_messages(sender.access_token, room_id)[0]["content"]["body"] == "sent during the flood"
        device = CompactDevice(UdpCoap(gateway.uri(), source="127.0.0.4"), DeviceState(None, {}))
        remember(device.login(compact_user.localpart, compact_user.password).hex())

        most.append(open_files(gateway.pid or 0))
        assert max(most) < NOFILE * FD_SHARE, f"open files peaked at {max(most)} of {NOFILE}"
    finally:
        if flood is not None:
            flood.close()
        gateway.stop()
        gateway.remember_stored_tokens()
