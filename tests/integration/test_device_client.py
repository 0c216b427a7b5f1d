"""``comatrix-device`` as a program: every command against the real gateway and Synapse.

Runs ``python -m comatrix.client`` (what the ``comatrix-device`` console script
calls) in a subprocess with its own state file, as a user would.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from support import REPO_ROOT
from support.gateway import GatewayProcess
from support.secrets import remember
from support.synapse import MatrixUser, SynapseServer

pytestmark = pytest.mark.integration


@pytest.fixture
def gateway(unlimited_gateway: GatewayProcess) -> GatewayProcess:
    """These tests send bursts from one address: use the gateway with rate limits off."""
    return unlimited_gateway


def device_cli(gateway: GatewayProcess, state: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "comatrix.client", "--gateway", gateway.uri(),
                                 "--state", str(state), *args],
                                capture_output=True, text=True, env=env, timeout=60)
        if check:
            assert result.returncode == 0, (args[0], result.returncode, result.stderr)
        return result
    return run


def test_compact_commands(gateway: GatewayProcess, synapse: SynapseServer,
                          synapse_user: Callable[..., MatrixUser], tmp_path: Path) -> None:
    device, owner = synapse_user("dev"), synapse_user("owner")
    room_id = synapse.create_room(owner.access_token)
    synapse.invite(owner.access_token, room_id, device.user_id)
    alias = synapse.full_alias("cli" + secrets.token_hex(4))
    synapse.set_alias(owner.access_token, alias, room_id)
    state = tmp_path / "device.json"
    run = device_cli(gateway, state)

    assert abs(int(run("time").stdout) - time.time()) < 300
    wrong = run("login", device.localpart, "not-the-password", check=False)
    # The homeserver's own words, cut to the compact profile's error budget.
    assert wrong.returncode == 1 and "4.03 M_FORBIDDEN: Invalid username" in wrong.stderr, wrong.stderr
    assert run("login", "--", device.localpart, device.password).stderr == f"logged in as {device.localpart}\n"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    saved = json.loads(state.read_text())["compact"]
    remember(saved["handle"])
    assert len(bytes.fromhex(saved["handle"])) == 8 and saved["seq"] > 1_600_000_000
    assert run("join", alias).stdout.strip() == "0"
    assert run("-q", "send", alias, "quietly").stderr == ""
    assert run("send", alias, "hello from the cli").stderr == "sent\n"
    assert synapse.text_messages(owner.access_token, room_id, limit=1)[0]["content"]["body"] == "hello from the cli"
    assert run("getmsg", alias).stdout.strip() == f"{device.user_id}: hello from the cli"

    synapse.send_text(owner.access_token, room_id, "news 1")
    synapse.send_text(owner.access_token, room_id, "news 2")
    lines = run("--json", "getmsg", "--new", alias).stdout.splitlines()
    assert [json.loads(line)["body"] for line in lines] == ["news 1", "news 2"]

    # watch: the registration answers with the latest message; then one push from HTTP
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    loops_before = gateway.log_text().count("sync loop started")
    watcher = subprocess.Popen([sys.executable, "-m", "comatrix.client", "--gateway", gateway.uri(),
                                "--state", str(state), "--json", "watch", alias, "--count", "1",
                                "--timeout", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    try:
        # The gateway logs the start of the session's /sync loop when the observation is made.
        deadline = time.monotonic() + 20
        while gateway.log_text().count("sync loop started") == loops_before:
            assert time.monotonic() < deadline and watcher.poll() is None, watcher.stderr
            time.sleep(0.05)
        synapse.send_text(owner.access_token, room_id, "pushed")
        out, err = watcher.communicate(timeout=30)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 0, err
    assert [json.loads(line)["body"] for line in out.splitlines()] == ["pushed"]

    run("logout")
    assert "handle" not in json.loads(state.read_text())["compact"]
    refused = run("getmsg", alias, check=False)
    assert refused.returncode != 0


def test_original_form(gateway: GatewayProcess, synapse: SynapseServer,
                       synapse_user: Callable[..., MatrixUser], tmp_path: Path) -> None:
    device, owner = synapse_user("dev"), synapse_user("owner")
    room_id = synapse.create_room(owner.access_token)
    synapse.invite(owner.access_token, room_id, device.user_id)
    state = tmp_path / "original.json"
    run = device_cli(gateway, state)
    run("--original", "login", "--", device.localpart, device.password)
    remember(json.loads(state.read_text())["original"]["token"])
    assert run("--original", "join", room_id).stdout.strip() == room_id
    run("--original", "send", room_id, "hello original")
    assert run("--original", "getmsg", room_id).stdout.strip() == f"{device.user_id}: hello original"
    assert run("--original", "time").stdout.strip().isdigit()
    assert run("--original", "watch", room_id, check=False).returncode == 2
    run("--original", "logout")
