"""``workers = 2`` in front of the real Synapse: a device's compact session outlives its source port.

A new source port is a new 4-tuple, which the kernel may hand to the other
worker.  The session (handle -> Matrix token, room handles) is in the SQLite
database the workers share, so the device goes on sending from any port, and
the worker it lands on finds the session there.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from comatrix.client import CompactDevice, DeviceState, UdpCoap
from support.secrets import remember
from support.synapse import SynapseServer
from test_workers import WORKERS, Supervised

DEVICE = "127.0.0.70"
PORTS = 12  # the chance that no new port reaches the other worker: 2 ** -PORTS


def test_a_compact_session_survives_new_source_ports_on_either_worker(synapse: SynapseServer, tmp_path: Path) -> None:
    password = remember(secrets.token_urlsafe(12))
    localpart = f"wk{secrets.token_hex(3)}"
    user_id, token, _device_id = synapse.register(localpart, password)
    running = Supervised(tmp_path, config_text="[limits]\ndevice_rate = 0\nglobal_rate = 0\n",
                         homeserver=synapse.base_url)
    running.start()
    try:
        state = DeviceState(None)
        first = UdpCoap(running.gateway.uri(), source=DEVICE)
        device = CompactDevice(first, state)
        remember(device.login(localpart, password).hex())
        room_id = synapse.create_room(token)
        device.join(room_id)
        first.close()
        bodies = []
        for number in range(PORTS):
            coap = UdpCoap(running.gateway.uri(), source=DEVICE)  # a new socket: a new source port
            try:
                bodies.append(f"from port {number} {secrets.token_hex(2)}")
                CompactDevice(coap, state).send(room_id, bodies[-1])
            finally:
                coap.close()
        sent = [event["content"]["body"] for event in synapse.text_messages(token, room_id, limit=PORTS)]
        assert sorted(sent) == sorted(bodies)
        assert all(event_sender == user_id for event_sender in
                   (event["sender"] for event in synapse.text_messages(token, room_id, limit=PORTS)))
        served = [re.findall(rf"{re.escape(DEVICE)}:\d+ ", running.log(index)) for index in range(WORKERS)]
        assert all(served), served  # both workers served this one session
    finally:
        running.gateway.stop()
