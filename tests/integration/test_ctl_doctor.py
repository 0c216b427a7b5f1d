"""``comatrixctl doctor`` and ``comatrixctl register-user`` against the real Synapse and a real gateway.

* doctor, run as the command line (``python -m comatrix.ctl``), against a
  running ``twistd comatrix`` with a token entry, a password entry and a DTLS
  PSK entry: every line OK, exit status 0, no secret printed;
* FAIL (exit status 1) for a homeserver that is not there (a free port), a
  credentials file others may read, and a token the homeserver refuses;
* register-user creates an account through shared-secret registration that
  can then log in with its password (generated and printed once, or read from
  stdin), as an admin with ``--admin``, keeps no login of its own, and a
  second registration of the name is one line with ``M_USER_IN_USE``.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from support import free_port
from support.coap_clients import libcoap
from support.gateway import GatewayProcess
from support.secrets import remember
from support.synapse import MatrixUser, SynapseServer, SynapseHTTPError

pytestmark = pytest.mark.integration


def comatrixctl(config: Path, *argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "comatrix.ctl", "--config", str(config), *argv],
                          input=stdin, capture_output=True, text=True, timeout=120, check=False)


def write_deployment(root: Path, homeserver: str, devices: str, *, credentials_mode: int = 0o640,
                     port: int | None = None, dtls_port: int | None = None) -> Path:
    """comatrix.toml (0644, no secrets) + credentials.toml (the secrets) + a 0700 state dir."""
    root.mkdir(parents=True, exist_ok=True)
    state = root / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    credentials = root / "credentials.toml"
    credentials.touch(mode=0o600)
    credentials.write_text(devices)
    credentials.chmod(credentials_mode)
    config = root / "comatrix.toml"
    config.write_text(f'ip = "127.0.0.1"\nport = {port or free_port("127.0.0.1", socket.SOCK_DGRAM)}\n'
                      f'homeserver = "{homeserver}"\nstate_dir = "{state}"\n'
                      f'credentials_file = "{credentials}"\n'
                      + (f"dtls_port = {dtls_port}\n" if dtls_port else ""))
    config.chmod(0o644)
    return config


def token_entry(address: str, user: MatrixUser, token: str | None = None) -> str:
    return (f'[[devices]]\naddress = "{address}"\nuser = "{user.user_id}"\n'
            f'access_token = "{token or user.access_token}"\n')


def lines_of(done: subprocess.CompletedProcess[str]) -> list[str]:
    return done.stdout.splitlines()


def failed(done: subprocess.CompletedProcess[str], name: str) -> list[str]:
    return [line for line in lines_of(done) if line.startswith(f"FAIL {name}")]


def test_doctor_all_ok_against_a_running_gateway(make_gateway: Callable[..., GatewayProcess],
                                                 synapse: SynapseServer, synapse_user: Callable[..., MatrixUser],
                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    holder, walker, keyed = synapse_user("doctok"), synapse_user("docpw"), synapse_user("docpsk")
    psk = remember(secrets.token_urlsafe(16))
    devices = (token_entry("127.0.0.2", holder)
               + f'[[devices]]\naddress = "127.0.0.3"\nuser = "{walker.user_id}"\npassword = "{walker.password}"\n'
               + f'[[devices]]\npsk_identity = "doc-psk"\npsk = "{psk}"\nuser = "{keyed.user_id}"\n'
                 f'access_token = "{keyed.access_token}"\n')
    workdir = tmp_path_factory.mktemp("doctor-ok")
    port, dtls_port = free_port("127.0.0.1", socket.SOCK_DGRAM), free_port("127.0.0.1", socket.SOCK_DGRAM)
    config = write_deployment(workdir, synapse.base_url, devices, port=port, dtls_port=dtls_port)
    make_gateway(workdir=workdir, port=port, config=config)

    done = comatrixctl(config, "doctor")

    assert done.returncode == 0, done.stdout + done.stderr
    lines = lines_of(done)
    assert lines and all(line.startswith("OK ") for line in lines), done.stdout
    names = [line.split(": ", 1)[0].split(None, 1)[1] for line in lines]
    assert names == ["config", "file modes", "homeserver", "clock", f"device {holder.user_id} (127.0.0.2/32)",
                     f"device {walker.user_id} (127.0.0.3/32)", f"device {keyed.user_id} (dtls:doc-psk)",
                     "interface", "coap port", "dtls port", "state dir"]
    assert f"the gateway answers on udp 127.0.0.1:{port}" in done.stdout
    assert f"device {walker.user_id} (127.0.0.3/32): user exists (password not checked" in done.stdout
    for secret in (holder.access_token, walker.password, keyed.access_token, psk):
        assert secret not in done.stdout + done.stderr

    # Once the gateway has logged in for the password entry (a request from its address),
    # doctor checks the token it kept, still without logging in itself.
    answer = libcoap("get", f"coap://127.0.0.1:{port}/_matrix/client/v3/account/whoami",
                     extra_args=["-a", "127.0.0.3"])
    assert answer.code == "2.05", answer
    again = comatrixctl(config, "doctor")
    assert again.returncode == 0, again.stdout
    assert f"OK   device {walker.user_id} (127.0.0.3/32): kept login token valid ({walker.user_id})" in again.stdout


def test_doctor_fails_for_a_homeserver_that_is_not_there(synapse_user: Callable[..., MatrixUser],
                                                         tmp_path: Path) -> None:
    nowhere = f"http://127.0.0.1:{free_port('127.0.0.1')}"
    config = write_deployment(tmp_path, nowhere, token_entry("127.0.0.2", synapse_user("docdown")))

    done = comatrixctl(config, "doctor")

    assert done.returncode == 1
    [line] = failed(done, "homeserver")
    assert nowhere in line and "unreachable" in line
    assert "WARN devices: credentials not checked" in done.stdout


def test_doctor_fails_for_a_world_readable_credentials_file(synapse: SynapseServer,
                                                            synapse_user: Callable[..., MatrixUser],
                                                            tmp_path: Path) -> None:
    user = synapse_user("docmode")
    config = write_deployment(tmp_path, synapse.base_url, token_entry("127.0.0.2", user), credentials_mode=0o644)

    done = comatrixctl(config, "doctor")

    assert done.returncode == 1
    [line] = failed(done, "file modes")
    assert str(tmp_path / "credentials.toml") in line and "readable by others (mode 0644)" in line
    assert failed(done, "config")  # the gateway would refuse to start too
    assert user.access_token not in done.stdout + done.stderr


def test_doctor_fails_for_a_token_the_homeserver_refuses(synapse: SynapseServer,
                                                         synapse_user: Callable[..., MatrixUser],
                                                         tmp_path: Path) -> None:
    good, revoked = synapse_user("docgood"), synapse_user("docbad")
    wrong = remember("syt_" + secrets.token_urlsafe(24))
    config = write_deployment(tmp_path, synapse.base_url,
                              token_entry("127.0.0.2", good) + token_entry("127.0.0.3", revoked, wrong))

    done = comatrixctl(config, "doctor")

    assert done.returncode == 1
    assert f"OK   device {good.user_id} (127.0.0.2/32): access token valid" in done.stdout
    [line] = failed(done, f"device {revoked.user_id}")
    assert "refused by the homeserver (M_UNKNOWN_TOKEN)" in line
    assert wrong not in done.stdout + done.stderr
    assert "WARN coap port: nothing listens" in done.stdout  # no gateway runs here: a warning only


# ------------------------------------------------------------------ register-user

def shared_secret_file(synapse: SynapseServer) -> Path:
    """The test Synapse's registration_shared_secret, as its operator would keep it (0600)."""
    return synapse.data_dir / "registration_shared_secret"


def plain_config(tmp_path: Path, synapse: SynapseServer) -> Path:
    config = tmp_path / "comatrix.toml"
    config.write_text(f'homeserver = "{synapse.base_url}"\n')
    return config


def test_register_user_creates_a_user_that_can_log_in(synapse: SynapseServer, tmp_path: Path) -> None:
    name = f"regdev{secrets.token_hex(4)}"

    done = comatrixctl(plain_config(tmp_path, synapse), "register-user", name,
                       "--shared-secret-file", str(shared_secret_file(synapse)))

    assert done.returncode == 0, done.stderr
    user_line, password_line = lines_of(done)
    user_id = f"@{name}:{synapse.server_name}"
    assert user_line == user_id
    password = remember(password_line.removeprefix("password "))
    logged_in, token, device_id = synapse.login(name, password)  # urllib POST /login
    assert logged_in == user_id
    # The login register-user got from Synapse was logged out: the account has one device, ours.
    devices = synapse.request("GET", "/_matrix/client/v3/devices", token=token)["devices"]
    assert [device["device_id"] for device in devices] == [device_id]


def test_register_user_admin_with_a_password_from_stdin(synapse: SynapseServer, tmp_path: Path) -> None:
    name, password = f"regadm{secrets.token_hex(4)}", remember(secrets.token_urlsafe(18))
    config = plain_config(tmp_path, synapse)

    done = comatrixctl(config, "register-user", name, "--admin", "--password-file", "-",
                       "--shared-secret-file", str(shared_secret_file(synapse)), stdin=password + "\n")

    assert done.returncode == 0, done.stderr
    assert lines_of(done) == [f"@{name}:{synapse.server_name}"]  # a password given is not printed
    user_id, token, _ = synapse.login(name, password)
    assert synapse.request("GET", f"/_synapse/admin/v2/users/{user_id}", token=token)["admin"] is True

    again = comatrixctl(config, "register-user", name, "--password-file", "-",
                        "--shared-secret-file", str(shared_secret_file(synapse)), stdin=password)
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr.count("\n") == 1 and "M_USER_IN_USE" in again.stderr
    assert password not in again.stderr


def test_register_user_with_a_wrong_secret_creates_nothing(synapse: SynapseServer, tmp_path: Path) -> None:
    name = f"regbad{secrets.token_hex(4)}"
    wrong = tmp_path / "wrong-secret"
    wrong.write_text(remember(secrets.token_hex(24)))

    done = comatrixctl(plain_config(tmp_path, synapse), "register-user", name, "--shared-secret-file", str(wrong))

    assert done.returncode == 1 and done.stdout == ""
    assert "registration refused" in done.stderr and "HMAC incorrect" in done.stderr
    with pytest.raises(SynapseHTTPError):
        synapse.request("GET", f"/_matrix/client/v3/profile/@{name}:{synapse.server_name}")
