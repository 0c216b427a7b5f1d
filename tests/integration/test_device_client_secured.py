"""``comatrix-device`` over DTLS 1.2 (PSK) and over OSCORE, against the real gateway and Synapse.

Each gateway runs with ``security = "required"`` (plain CoAP reaches only
``/time`` and ``/.well-known/core``) and one ``[[devices]]`` entry found by its
security context: a PSK identity, or an OSCORE recipient id.  The device client
runs as a program (``python -m comatrix.client``) with its own state file and
does the compact journey; each send must appear in Synapse as the entry's user.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from support import REPO_ROOT, free_port
from support.gateway import GatewayProcess
from support.secrets import remember
from support.synapse import MatrixUser, SynapseServer

pytestmark = pytest.mark.integration

Cli = Callable[..., subprocess.CompletedProcess[str]]


def device_cli(gateway_uri: str, state: Path, *security: str, env_extra: dict[str, str] | None = None) -> Cli:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), **(env_extra or {}))

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "comatrix.client", "--gateway", gateway_uri,
                                 "--state", str(state), *security, *args],
                                capture_output=True, text=True, env=env, timeout=90)
        if check:
            assert result.returncode == 0, (args[0], result.returncode, result.stderr)
        return result
    return run


def _room_for(synapse: SynapseServer, device: MatrixUser, owner: MatrixUser) -> str:
    room_id = synapse.create_room(owner.access_token)
    synapse.invite(owner.access_token, room_id, device.user_id)
    return room_id


def _journey(run: Cli, synapse: SynapseServer, device: MatrixUser, owner: MatrixUser, room_id: str) -> None:
    assert abs(int(run("time").stdout) - time.time()) < 300
    run("login", "--", device.localpart, device.password)
    assert run("join", room_id).stdout.strip() == "0"
    text = "secured " + secrets.token_hex(4)
    run("send", room_id, text)
    latest = synapse.text_messages(owner.access_token, room_id, limit=1)[0]
    assert (latest["sender"], latest["content"]["body"]) == (device.user_id, text)
    assert run("getmsg", room_id).stdout.strip() == f"{device.user_id}: {text}"


def test_every_compact_operation_over_dtls(make_gateway: Callable[..., GatewayProcess], synapse: SynapseServer,
                                           synapse_user: Callable[..., MatrixUser], tmp_path: Path) -> None:
    device, owner = synapse_user("dtlscli"), synapse_user("owner")
    room_id = _room_for(synapse, device, owner)
    identity = "cli-" + secrets.token_hex(4)
    psk = remember(secrets.token_urlsafe(16))
    dtls_port = free_port("127.0.0.1", socket.SOCK_DGRAM)
    gw = make_gateway(config_text=(
        f'security = "required"\ndtls_port = {dtls_port}\n\n[[devices]]\nuser = "{device.user_id}"\n'
        f'password = "{device.password}"\npsk_identity = "{identity}"\npsk = "{psk}"\n'))
    state = tmp_path / "state.json"
    # The key from the environment, so it is not on the command line.
    run = device_cli(f"coaps://127.0.0.1:{dtls_port}", state, "--psk-identity", identity,
                     env_extra={"COMATRIX_PSK_KEY": psk})
    _journey(run, synapse, device, owner, room_id)
    assert f"dtls:{identity}" in gw.log_text()

    # Plain CoAP with the same state (a sniffed session handle) is refused.
    plain = device_cli(gw.uri(), state)("send", room_id, "plain", check=False)
    assert plain.returncode == 1 and "4.01" in plain.stderr
    # A wrong key: the handshake fails, nothing is sent.
    wrong = device_cli(f"coaps://127.0.0.1:{dtls_port}", state, "--psk-identity", identity,
                       "--psk-key=" + remember(secrets.token_urlsafe(16)))("send", room_id, "wrong", check=False)
    assert wrong.returncode == 2 and "DTLS handshake failed" in wrong.stderr
    bodies = [event["content"]["body"] for event in synapse.text_messages(owner.access_token, room_id, limit=3)]
    assert "plain" not in bodies and "wrong" not in bodies


def test_every_compact_operation_over_oscore_and_after_a_restart(
        make_gateway: Callable[..., GatewayProcess], synapse: SynapseServer,
        synapse_user: Callable[..., MatrixUser], tmp_path: Path) -> None:
    device, owner = synapse_user("oscli"), synapse_user("owner")
    room_id = _room_for(synapse, device, owner)
    secret, salt = remember(secrets.token_hex(16)), secrets.token_hex(8)
    credentials = tmp_path / "credentials.toml"
    credentials.write_text(
        f'[[devices]]\nuser = "{device.user_id}"\npassword = "{device.password}"\n'
        f'oscore = {{ recipient_id = "07", sender_id = "", master_secret = "{secret}", master_salt = "{salt}" }}\n')
    credentials.chmod(0o640)
    # The device's view, as comatrixctl prints it: its sender id is the entry's recipient_id.
    context = tmp_path / "device-context.toml"
    context.write_text(f'sender_id = "07"\nrecipient_id = ""\nmaster_secret = "{secret}"\n'
                       f'master_salt = "{salt}"\n')
    gw = make_gateway(config_text=f'security = "required"\ncredentials_file = "{credentials}"\n')
    state = tmp_path / "state.json"
    run = device_cli(gw.uri(), state, "--oscore", str(context))
    _journey(run, synapse, device, owner, room_id)
    assert "oscore:07" in gw.log_text()
    used = json.loads(state.read_text())["oscore"]["07:"]
    assert used >= 6  # time, login (+ its /z), join, send, getmsg, and the Echo round trips

    # After a restart the gateway's replay window is unknown: the client answers its Echo.
    gw.stop()
    gw.start()
    text = "after restart " + secrets.token_hex(3)
    run("send", room_id, text)
    assert synapse.text_messages(owner.access_token, room_id, limit=1)[0]["content"]["body"] == text
    assert json.loads(state.read_text())["oscore"]["07:"] > used
