"""``security = "required"`` against the real Synapse: plain CoAP carries no secret through.

A plain-CoAP send with a valid token in option 256, and a compact session handle
sniffed from the air and replayed in plain CoAP, are both answered 4.01 "security
required" and a counting relay in front of Synapse shows the homeserver saw
nothing; ``/time`` and ``/.well-known/core`` still answer in plain.  The peers are
libcoap's ``coap-client-notls`` and the reference device client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import cbor2
import pytest

from comatrix.client import CompactDevice, CoapResponseError, DeviceState, UdpCoap
from support.coap_clients import libcoap
from support.gateway import GatewayProcess
from support.relays import CountingTcpRelay
from support.secrets import remember
from support.synapse import MatrixUser, SynapseServer

pytestmark = pytest.mark.integration

REQUIRED = 'security = "required"\n'
OPTIONAL = 'security = "optional"\n'


def test_plain_send_with_a_valid_token_is_refused_and_synapse_sees_nothing(
        make_gateway: Callable[..., GatewayProcess], synapse: SynapseServer,
        synapse_user: Callable[..., MatrixUser]) -> None:
    device = synapse_user("plainsend")
    room_id = synapse.create_room(device.access_token)
    with CountingTcpRelay(synapse.port) as relay:
        gw = make_gateway(homeserver=relay.url, config_text=REQUIRED)
        body = cbor2.dumps({"room_id": room_id, "body": "sniffable"})
        refused = libcoap("POST", gw.uri("send"), payload=body, content_format=60,
                          options=[(256, device.access_token.encode())])
        assert (refused.code, refused.text()) == ("4.01", "security required")
        assert libcoap("GET", gw.uri("time")).code == "2.05"
        core = libcoap("GET", gw.uri(".well-known/core"))
        assert core.code == "2.05" and "</send>" in core.text()
        assert (relay.connections, relay.requests) == (0, [])
    assert synapse.text_messages(device.access_token, room_id) == []


def test_sniffed_compact_handle_replayed_in_plain_is_refused(
        make_gateway: Callable[..., GatewayProcess], synapse: SynapseServer,
        synapse_user: Callable[..., MatrixUser], tmp_path: Path) -> None:
    sensor = synapse_user("sniffed")
    room_id = synapse.create_room(sensor.access_token)
    # The handle a device got while the gateway still allowed plain CoAP (sniffed on the air).
    open_gw = make_gateway(workdir=tmp_path, config_text=OPTIONAL)
    device = CompactDevice(UdpCoap(open_gw.uri()), DeviceState(None))
    remember(device.login(sensor.localpart, sensor.password).hex())
    device.join(room_id)
    device.send(room_id, "before")
    open_gw.stop()
    with CountingTcpRelay(synapse.port) as relay:
        (tmp_path / "comatrix.toml").write_text(REQUIRED)
        strict_gw = make_gateway(workdir=tmp_path, homeserver=relay.url, config=tmp_path / "comatrix.toml")
        replay = CompactDevice(UdpCoap(strict_gw.uri()), device.state)
        with pytest.raises(CoapResponseError) as refused:
            replay.send(room_id, "replayed")
        assert refused.value.reply.code_text == "4.01"
        assert (relay.connections, relay.requests) == (0, [])
    assert [event["content"]["body"] for event in
            synapse.text_messages(sensor.access_token, room_id)] == ["before"]
