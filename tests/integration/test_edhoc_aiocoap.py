"""EDHOC against a real peer: aiocoap's EDHOC client (lakers inside) establishes the OSCORE context.

The device has only its own P-256 key pair and the gateway's credential (CCS);
the gateway has the device's credential in a ``[[devices]]`` entry with
``edhoc`` and no address, and runs with ``security = "required"``.  After the
exchange the device uses the new OSCORE context for ``/time`` and a send that
appears in Synapse as the entry's user.  Both of aiocoap's flows run: the
RFC 9668 combined request (its default: message_3 rides on the first OSCORE
request) and message_3 on its own (answered with message_4).  A
`RecordingUdpRelay` measures the exchange on the real datagrams.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import cbor2
import pytest

from comatrix.coap import wire
from comatrix.edhoc.ccs import generate_key, make_ccs, private_bytes
from comatrix.edhoc.responder import GatewayKey
from support.coap_clients import aiocoap_client_cli
from support.relays import RecordingUdpRelay
from support.synapse import MatrixUser, SynapseServer
from test_oscore_aiocoap import AiocoapDevice

pytestmark = pytest.mark.integration

CBOR = 60


class EdhocProvisioned:
    """The device's key pair and credential, the gateway's credential, and the gateway's entry."""

    def __init__(self, workdir: Path, user: MatrixUser, gateway: GatewayKey, *, combined: bool) -> None:
        key = generate_key()
        self.private = private_bytes(key)
        self.ccs = make_ccs(key.public_key(), b"\x01", "sensor01")
        self.gateway = gateway
        self.combined = combined
        self.user = user
        self.credentials = workdir / "credentials.toml"
        self.credentials.write_text(
            f'[[devices]]\nuser = "{user.user_id}"\npassword = "{user.password}"\n'
            f'edhoc = {{ credential = "{self.ccs.encoded.hex()}" }}\n')
        self.credentials.chmod(0o640)

    def config_text(self) -> str:
        return f'security = "required"\ncredentials_file = "{self.credentials}"\n'

    def client_credentials(self, port: int) -> dict[str, Any]:
        """aiocoap's ``edhoc-oscore`` credential item (its credentials file format, as a dict)."""
        return {f"coap://127.0.0.1:{port}/*": {"edhoc-oscore": {
            "suite": 2, "method": 3,
            "own_cred_style": "by-key-id",
            "own_cred": {14: cbor2.loads(self.ccs.encoded)},
            "private_key": {1: 2, -1: 1, -4: self.private},
            "peer_cred": {14: cbor2.loads(self.gateway.credential.encoded)},
            "use_combined_edhoc": self.combined,
        }}}


def _gateway_with_key(make_gateway: Callable[..., Any], synapse_user: Callable[..., MatrixUser],
                      tmp_path: Path, combined: bool) -> tuple[Any, EdhocProvisioned]:
    state_dir = tmp_path / "gw" / "state"  # GatewayProcess's state dir under its workdir
    state_dir.mkdir(parents=True)
    gateway_key = GatewayKey.load_or_create(state_dir)  # what comatrixctl device add --edhoc does
    provisioned = EdhocProvisioned(tmp_path, synapse_user("edh"), gateway_key, combined=combined)
    gw = make_gateway(workdir=tmp_path / "gw", config_text=provisioned.config_text())
    assert gw.state_dir == state_dir
    return gw, provisioned


def _sizes(records: list[tuple[str, bytes]]) -> list[tuple[str, int, str]]:
    """(direction, datagram bytes, kind) per datagram: kind "edhoc" (to /.well-known/edhoc),
    "edhoc+oscore" (RFC 9668 combined request, EDHOC option 21), "oscore", or "answer" (down)."""
    out = []
    for way, data in records:
        options = wire.decode(data).options
        kind = ("answer" if way == "down" else "edhoc" if (11, b"edhoc") in options else
                "edhoc+oscore" if any(number == 21 for number, _ in options) else "oscore")
        out.append((way, len(data), kind))
    return out


def _recorded(relay: RecordingUdpRelay, count: int) -> list[tuple[str, bytes]]:
    """The first ``count`` datagrams, once the relay has recorded them (bounded wait)."""
    deadline = time.monotonic() + 5
    while len(relay.since(0)) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return relay.since(0)[:count]


@pytest.mark.parametrize("combined", [True, False], ids=["rfc9668-combined", "message_3-then-message_4"])
def test_aiocoap_edhoc_client_establishes_oscore_and_sends_as_the_entry(
        make_gateway, synapse: SynapseServer, synapse_user: Callable[..., MatrixUser],
        tmp_path: Path, combined: bool) -> None:
    gw, provisioned = _gateway_with_key(make_gateway, synapse_user, tmp_path, combined)
    user = provisioned.user
    room_id = synapse.create_room(user.access_token)
    with RecordingUdpRelay(gw.port) as relay:
        device = AiocoapDevice(provisioned, relay.port)  # type: ignore[arg-type]
        try:
            answer = device.request("GET", "time")
            assert str(answer.code) == "2.05 Content", answer
            assert abs(int(answer.payload) - time.time()) < 300
            # message_1/2, [message_3/4,] the OSCORE GET /time; the relay records just after forwarding.
            exchange = _recorded(relay, 4 if combined else 6)
            sent = device.request("POST", "send", cbor2.dumps({"room_id": room_id, "body": "via edhoc"}), CBOR)
            assert str(sent.code) == "2.04 Changed", sent
        finally:
            device.close()
    latest = synapse.text_messages(user.access_token, room_id, limit=1)[0]
    assert (latest["sender"], latest["content"]["body"]) == (user.user_id, "via edhoc")
    sizes = _sizes(exchange)
    print(f"EDHOC exchange ({'combined' if combined else 'separate'}), then GET /time: {sizes}")
    assert [way for way, _, _ in sizes] == ["up", "down"] * (len(sizes) // 2)
    kinds = [kind for way, _, kind in sizes if way == "up"]
    assert kinds == (["edhoc", "edhoc+oscore"] if combined else ["edhoc", "edhoc", "oscore"])
    log = gw.log_text()
    assert f"EDHOC: OSCORE context for credential {provisioned.ccs.fingerprint}" in log
    assert provisioned.private.hex() not in log


def test_an_unknown_device_gets_no_context_and_plain_coap_reaches_nothing(
        make_gateway, synapse: SynapseServer, synapse_user: Callable[..., MatrixUser], tmp_path: Path) -> None:
    gw, provisioned = _gateway_with_key(make_gateway, synapse_user, tmp_path, combined=False)
    stranger_key = generate_key()
    provisioned.private = private_bytes(stranger_key)
    provisioned.ccs = make_ccs(stranger_key.public_key(), b"\x02", "stranger")
    device = AiocoapDevice(provisioned, gw.port)  # type: ignore[arg-type]
    try:
        with pytest.raises(Exception) as refused:  # aiocoap raises on the EDHOC error message
            device.request("GET", "time")
    finally:
        device.close()
    assert "4.00 Bad Request" in repr(refused.value), refused.value
    log = gw.log_text()
    assert "message_3 names a credential no [[devices]] entry has" in log
    assert "EDHOC: OSCORE context" not in log
    assert "GET /time 2.05" not in log.split("names a credential")[1]  # nothing went on after the refusal


def test_aiocoap_client_cli_with_an_edhoc_credentials_file(make_gateway, synapse: SynapseServer,
                                                           synapse_user: Callable[..., MatrixUser],
                                                           tmp_path: Path) -> None:
    """The README's example: a ``.diag`` credentials file with the key and both credentials as printed."""
    import cbor_diag

    gw, provisioned = _gateway_with_key(make_gateway, synapse_user, tmp_path, combined=True)
    device_ccs = cbor_diag.cbor2diag(provisioned.ccs.encoded)
    gateway_ccs = cbor_diag.cbor2diag(provisioned.gateway.credential.encoded)
    credentials = tmp_path / "client.diag"
    credentials.write_text(
        f'{{"coap://127.0.0.1:{gw.port}/*": {{"edhoc-oscore": {{\n'
        f'  "suite": 2, "method": 3, "own_cred_style": "by-key-id",\n'
        f'  "own_cred": {{14: {device_ccs}}}, "peer_cred": {{14: {gateway_ccs}}},\n'
        f'  "private_key": {{1: 2, -1: 1, -4: h\'{provisioned.private.hex()}\'}}}}}}}}\n')
    done = aiocoap_client_cli(["--credentials", str(credentials), gw.uri("time")])
    assert done.returncode == 0, done.stderr
    assert abs(int(done.stdout.decode().strip()) - time.time()) < 300
    room_id = synapse.create_room(provisioned.user.access_token)
    body = json.dumps({"room_id": room_id, "body": "hello over edhoc"})
    done = aiocoap_client_cli(["--credentials", str(credentials), "-m", "POST", "--content-format",
                               "application/cbor", "--payload", body, gw.uri("send")])
    assert done.returncode == 0, done.stderr
    latest = synapse.text_messages(provisioned.user.access_token, room_id, limit=1)[0]
    assert (latest["sender"], latest["content"]["body"]) == (provisioned.user.user_id, "hello over edhoc")
    # Each run was a new exchange; the second replaced the first one's context.
    assert gw.log_text().count(f"EDHOC: OSCORE context for credential {provisioned.ccs.fingerprint}") == 2
