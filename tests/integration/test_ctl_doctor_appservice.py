"""``comatrixctl doctor`` in application-service mode, against a real Synapse that loaded the registration.

The gateway runs with ``[appservice]``; a device user is made with
``comatrixctl device add``.  doctor finds the registration loadable, its
``as_token`` valid, the gateway's transaction API answering the ``hs_token``
ping and the device user valid (all OK); with a registration whose tokens are
not the ones Synapse and the gateway use, it fails the ``as_token``, the ping
and the device user, and prints neither token.
"""

from __future__ import annotations

import io
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from comatrix import ctl
from comatrix.appservice.registration import load_registration
from support import free_port
from support.gateway import GatewayProcess
from support.secrets import leaks, remember
from support.synapse import SynapseServer

pytestmark = pytest.mark.integration


def doctor(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "comatrix.ctl", "--config", str(config), "doctor"],
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def pan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, str]]:
    """(the gateway in appservice mode, running; its device user)."""
    root = tmp_path_factory.mktemp("doctor-appservice")
    synapse_url = f"http://127.0.0.1:{free_port('127.0.0.1')}"
    workdir = root / "gateway"
    workdir.mkdir()
    (workdir / "state").mkdir(mode=0o700)
    registration = workdir / "appservice.yaml"
    appservice_port = free_port("127.0.0.1")
    config_text = (f'ip = "127.0.0.1"\nhomeserver = "{synapse_url}"\nstate_dir = "{workdir / "state"}"\n'
                   f'[appservice]\nregistration = "{registration}"\nport = {appservice_port}\n')
    gateway = GatewayProcess(synapse_url, workdir, config_text=config_text)
    assert gateway.config is not None
    gateway.config.write_text(f"port = {gateway.port}\n" + config_text)
    out = io.StringIO()
    assert ctl.main(["appservice", "generate", "--url", f"http://127.0.0.1:{appservice_port}",
                     "-o", str(registration)], out=out) == 0, out.getvalue()
    loaded = load_registration(registration)
    remember(loaded.as_token)
    remember(loaded.hs_token)
    synapse = SynapseServer(root / "synapse", port=int(synapse_url.rsplit(":", 1)[1]),
                            extra_config={"app_service_config_files": [str(registration)]})
    synapse.start()
    try:
        out = io.StringIO()
        assert ctl.main(["--config", str(gateway.config), "device", "add", "doc01", "--address", "127.0.0.9"],
                        out=out) == 0, out.getvalue()
        user_id = next(line.split()[1] for line in out.getvalue().splitlines() if line.startswith("created "))
        gateway.start()
        yield gateway, user_id
    finally:
        gateway.stop()
        synapse.stop()
    found = leaks([gateway.log_path, gateway.output_path])
    assert not found, f"secrets in gateway logs: {found}"


def test_doctor_all_ok_in_appservice_mode(pan: tuple[GatewayProcess, str]) -> None:
    gateway, user_id = pan
    assert gateway.config is not None

    done = doctor(gateway.config)

    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert all(line.startswith("OK ") for line in lines), done.stdout
    for expected in ("OK   appservice: registration ", "OK   appservice token: as_token valid (@comatrix:",
                     "OK   appservice ping: the gateway's transaction API at http://127.0.0.1:",
                     f"OK   device {user_id} (127.0.0.9/32): appservice user valid ({user_id})"):
        assert expected in done.stdout, done.stdout


def test_doctor_fails_for_tokens_nobody_uses(pan: tuple[GatewayProcess, str], tmp_path: Path) -> None:
    gateway, user_id = pan
    assert gateway.config is not None
    text = (gateway.workdir / "appservice.yaml").read_text()
    registration = load_registration(gateway.workdir / "appservice.yaml")
    forged_as, forged_hs = remember(secrets.token_urlsafe(32)), remember(secrets.token_urlsafe(32))
    forged = tmp_path / "appservice.yaml"
    forged.touch(mode=0o600)
    forged.write_text(text.replace(registration.as_token, forged_as).replace(registration.hs_token, forged_hs))
    config = tmp_path / "comatrix.toml"
    config.write_text(gateway.config.read_text().replace(str(gateway.workdir / "appservice.yaml"), str(forged)))
    (tmp_path / "devices.d").mkdir()
    for entry in (gateway.workdir / "devices.d").glob("*.toml"):
        (tmp_path / "devices.d" / entry.name).write_text(entry.read_text())

    done = doctor(config)

    assert done.returncode == 1
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert [line.split(": ", 1)[0] for line in failed] == [
        "FAIL appservice token", "FAIL appservice ping", f"FAIL device {user_id} (127.0.0.9/32)"], done.stdout
    assert "refused the hs_token" in failed[1]
    for token in (forged_as, forged_hs, registration.as_token, registration.hs_token):
        assert token not in done.stdout + done.stderr
