"""Provisioning with ``comatrixctl`` and picking it up on SIGHUP, against a real Synapse and libcoap.

The gateway runs as Debian ships it (``security = "required"``) with a DTLS port.
Devices are added, re-keyed and removed with the ``comatrixctl`` command line
while it runs; after a SIGHUP (what ``systemctl reload comatrix`` sends) the new
device completes a send over coaps with ``coap-client-openssl`` as its own Matrix
user, a rotated key replaces the old one, a removed device cannot get in, and
the device that was not touched keeps working throughout.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Callable

import cbor2
import pytest

from support import free_port
from support.coap_clients import CoapNoResponse, CoapResult, libcoap
from support.gateway import GatewayProcess
from support.secrets import remember
from support.synapse import MatrixUser, SynapseServer

pytestmark = pytest.mark.integration

CBOR = 60
CLIENT = "coap-client-openssl"
WAIT = 30.0


def comatrixctl(config: Path, *argv: str, stdin: str = "") -> str:
    done = subprocess.run([sys.executable, "-m", "comatrix.ctl", "--config", str(config), *argv],
                          input=stdin, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def provision(config: Path, name: str, user: MatrixUser, tmp_path: Path) -> str:
    """``comatrixctl device add NAME --psk``; returns the PSK it printed for the firmware."""
    password_file = tmp_path / f"{name}.password"
    password_file.write_text(user.password)
    password_file.chmod(0o600)
    out = comatrixctl(config, "device", "add", name, "--psk", "--user", user.user_id,
                      "--password-file", str(password_file))
    return remember(psk_of(config, name, out))


def psk_of(config: Path, name: str, printed: str) -> str:
    with open(config.parent / "devices.d" / f"{name}.toml", "rb") as handle:
        [entry] = tomllib.load(handle)["devices"]
    assert f"psk            {entry['psk']}" in printed  # what the firmware author is shown
    return str(entry["psk"])


def coaps(port: int, identity: str, psk: str, method: str, path: str, **kwargs: object) -> CoapResult:
    return libcoap(method, f"coaps://127.0.0.1:{port}/{path}", client=CLIENT,
                   extra_args=["-u", identity, "-k", psk], **kwargs)  # type: ignore[arg-type]


def gets_in(port: int, identity: str, psk: str) -> bool:
    try:
        return coaps(port, identity, psk, "get", "time", timeout=3).code == "2.05"
    except (CoapNoResponse, AssertionError):
        return False


def eventually(condition: bool, check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while check() != condition:
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.5)


def send(port: int, identity: str, psk: str, room_id: str, text: str) -> None:
    sent = coaps(port, identity, psk, "post", "send", content_format=CBOR,
                 payload=cbor2.dumps({"room_id": room_id, "body": text, "txn_id": text}))
    assert sent.code == "2.04", sent


def test_devices_provisioned_rotated_and_removed_while_the_gateway_runs(
        synapse: SynapseServer, tmp_path: Path) -> None:
    first_user, second_user = synapse.make_user("prova"), synapse.make_user("provb")
    room_id = synapse.create_room(first_user.access_token)
    synapse.invite(first_user.access_token, room_id, second_user.user_id)
    synapse.join(second_user.access_token, room_id)
    dtls_port = free_port("127.0.0.1", socket.SOCK_DGRAM)
    config = tmp_path / "comatrix.toml"
    config.write_text(f'security = "required"\ndtls_port = {dtls_port}\n')
    first_psk = provision(config, "first", first_user, tmp_path)
    gateway = GatewayProcess(synapse.base_url, tmp_path / "gw", config=config)
    gateway.start()
    try:
        send(dtls_port, "first", first_psk, room_id, "first-1")

        def reload() -> None:
            assert gateway.pid is not None
            os.kill(gateway.pid, signal.SIGHUP)

        second_psk = provision(config, "second", second_user, tmp_path)
        assert not gets_in(dtls_port, "second", second_psk)  # not before the reload
        reload()
        eventually(True, lambda: gets_in(dtls_port, "second", second_psk), "the new device to get in")
        send(dtls_port, "second", second_psk, room_id, "second-1")

        old_psk = first_psk
        first_psk = remember(psk_of(config, "first", comatrixctl(config, "device", "rotate", "first")))
        reload()
        eventually(True, lambda: gets_in(dtls_port, "first", first_psk), "the rotated key to work")
        assert not gets_in(dtls_port, "first", old_psk)

        comatrixctl(config, "device", "remove", "second")
        reload()
        eventually(False, lambda: gets_in(dtls_port, "second", second_psk), "the removed device to be out")
        send(dtls_port, "first", first_psk, room_id, "first-2")  # untouched by the others' changes
        log = gateway.log_text()
        assert "Reloaded devices: 1 added, 0 removed" in log and "0 added, 1 removed" in log
    finally:
        gateway.stop()
    senders = [(event["sender"], event["content"]["body"])
               for event in synapse.text_messages(first_user.access_token, room_id)]
    assert sorted(senders) == sorted([(first_user.user_id, "first-1"), (second_user.user_id, "second-1"),
                                      (first_user.user_id, "first-2")])
