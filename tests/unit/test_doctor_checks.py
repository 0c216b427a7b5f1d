"""The pure checks of ``comatrixctl doctor`` (`comatrix.doctor`) and the HMAC of ``register-user``.

Each check takes facts and gives one line: the verdict (OK/WARN/FAIL), and a
text that names what to fix and never holds a secret.  Beyond the pure ones:
the file-mode sweep over a config directory on disk (it works even when the
config does not load), the CoAP probe against a loopback UDP socket that
answers or stays silent, and the registration MAC against the value Synapse
computes (RFC 2104 HMAC-SHA1 over ``nonce NUL user NUL password NUL admin``).
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import io
import os
import pwd
import socket
import sqlite3
import threading
from pathlib import Path

import pytest

from comatrix import doctor
from comatrix.coap import wire
from comatrix.config import Config, DeviceCredentials
from comatrix.ctl import main
from comatrix.doctor import FAIL, OK, WARN, Answer, Check
from comatrix.register import RegisterError, localpart_of, new_password, registration_mac

NOW = 1_800_000_000.0
SECRET_TOKEN = "syt_c2VjcmV0_notthetoken"


def http_date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)


# ------------------------------------------------------------------ clock

@pytest.mark.parametrize("skew, status", [(0, OK), (30, OK), (-59, OK), (61, WARN), (-200, WARN),
                                          (301, FAIL), (-3600, FAIL)])
def test_clock_thresholds(skew: float, status: str) -> None:
    check = doctor.clock_check(NOW + skew, http_date(NOW))
    assert check.status == status, check
    if status != OK:
        assert ("ahead of" if skew > 0 else "behind") in check.text


def test_clock_without_a_usable_date_is_a_warning() -> None:
    assert doctor.clock_check(NOW, None).status == WARN
    assert doctor.clock_check(NOW, "yesterday-ish").status == WARN


# ------------------------------------------------------------------ homeserver answers

def test_versions_ok_names_the_newest_version() -> None:
    check = doctor.versions_check("http://hs", Answer(200, {"versions": ["r0.6.1", "v1.11"]}))
    assert check == Check(OK, "homeserver", "http://hs reachable, spec versions up to v1.11")


def test_versions_from_something_that_is_not_a_homeserver_fails() -> None:
    assert doctor.versions_check("http://hs", Answer(404, {})).status == FAIL
    assert doctor.versions_check("http://hs", Answer(200, {"versions": []})).status == FAIL


def test_whoami_verdicts() -> None:
    good = doctor.whoami_check("d", Answer(200, {"user_id": "@a:x"}), "@a:x")
    assert good.status == OK and "@a:x" in good.text
    wrong_user = doctor.whoami_check("d", Answer(200, {"user_id": "@b:x"}), "@a:x")
    assert wrong_user.status == FAIL and "@b:x" in wrong_user.text
    refused = doctor.whoami_check("d", Answer(401, {"errcode": "M_UNKNOWN_TOKEN", "error": SECRET_TOKEN}), "@a:x")
    assert refused.status == FAIL and "M_UNKNOWN_TOKEN" in refused.text
    assert SECRET_TOKEN not in refused.text  # only the errcode of an answer is shown
    assert doctor.whoami_check("d", Answer(502, {}), "@a:x").status == WARN


def test_profile_verdicts_for_a_password_entry() -> None:
    exists = doctor.profile_check("d", Answer(200, {"displayname": "a"}), "@a:x")
    assert exists.status == OK and "password not checked" in exists.text
    assert doctor.profile_check("d", Answer(404, {"errcode": "M_NOT_FOUND"}), "@a:x").status == FAIL
    private = doctor.profile_check("d", Answer(403, {"errcode": "M_FORBIDDEN"}), "@a:x")
    assert private.status == WARN and "not checked without logging in" in private.text


def test_ping_verdicts() -> None:
    assert doctor.ping_check("http://127.0.0.1:8010", Answer(200, {})).status == OK
    assert doctor.ping_check("http://127.0.0.1:8010", Answer(403, {"errcode": "M_FORBIDDEN"})).status == FAIL
    assert doctor.ping_check("http://127.0.0.1:8010", Answer(404, {})).status == FAIL
    assert doctor.ping_check("http://127.0.0.1:8010", None, "refused").status == WARN


# ------------------------------------------------------------------ interface, ports, state dir

def test_interface_verdicts() -> None:
    assert doctor.interface_check(None, "127.0.0.1", False, None).status == OK
    assert doctor.interface_check(None, "::", False, None).status == WARN
    assert doctor.interface_check("lowpan0", "::", False, None).status == FAIL
    assert doctor.interface_check("lowpan0", "::", True, None).status == FAIL
    up = doctor.interface_check("lowpan0", "::", True, "fe80::1%lowpan0")
    assert up.status == OK and "fe80::1%lowpan0" in up.text


def test_port_verdicts() -> None:
    assert doctor.port_check("coap port", "127.0.0.1:5683", True, None).status == OK
    assert doctor.port_check("coap port", "127.0.0.1:5683", False, False).status == WARN
    assert doctor.port_check("coap port", "127.0.0.1:5683", False, True).status == WARN
    assert doctor.port_check("dtls port", "127.0.0.1:5684", False, True).status == OK
    assert doctor.port_check("dtls port", "127.0.0.1:5684", False, False).status == WARN


def test_probe_host_for_wildcards_and_interfaces() -> None:
    assert doctor.probe_host(Config(ip="::")) == "::1"
    assert doctor.probe_host(Config(ip="0.0.0.0")) == "127.0.0.1"
    assert doctor.probe_host(Config(ip="127.0.0.5")) == "127.0.0.5"
    assert doctor.probe_host(Config(interface="no-such-if0")) is None


@pytest.mark.parametrize("mode, status", [(0o40700, OK), (0o40750, OK), (0o40755, WARN), (0o40770, WARN),
                                          (0o40777, FAIL)])
def test_state_dir_modes(mode: int, status: str) -> None:
    assert doctor.state_dir_check("/var/lib/comatrix", mode, "comatrix", True).status == status


def test_state_dir_missing_unset_or_not_writable() -> None:
    assert doctor.state_dir_check(None, None, None, None).status == WARN
    assert doctor.state_dir_check("/nowhere", None, None, None).status == WARN
    denied = doctor.state_dir_check("/var/lib/comatrix", 0o40700, "root", False)
    assert denied.status == FAIL and "not writable by comatrix" in denied.text


def test_writable_by_reads_owner_group_and_other_bits() -> None:
    me = pwd.getpwuid(os.getuid())
    stranger = pwd.struct_passwd(("nobody-here", "x", 54321, 54321, "", "/", "/bin/false"))

    def info(mode: int, uid: int, gid: int) -> os.stat_result:
        return os.stat_result((mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))

    assert doctor.writable_by(info(0o40700, 54321, 0), stranger)
    assert not doctor.writable_by(info(0o40500, 54321, 0), stranger)
    assert doctor.writable_by(info(0o40770, 0, 54321), stranger)
    assert not doctor.writable_by(info(0o40750, 0, 54321), stranger)
    assert not doctor.writable_by(info(0o40775, 0, 0), stranger)
    assert doctor.writable_by(info(0o40777, 0, 0), stranger)
    assert doctor.writable_by(info(0o40700, 1, 1), me) == (me.pw_uid == 0)


# ------------------------------------------------------------------ file modes on disk

def _write(path: Path, text: str, mode: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def test_file_modes_fail_for_every_secret_file_open_to_others(tmp_path: Path) -> None:
    credentials = _write(tmp_path / "credentials.toml",
                         f'[[devices]]\naddress = "::1"\naccess_token = "{SECRET_TOKEN}"\n', 0o644)
    registration = _write(tmp_path / "appservice.yaml", "id: x\n", 0o604)
    config = _write(tmp_path / "comatrix.toml",
                    f'credentials_file = "{credentials}"\n[appservice]\nregistration = "{registration}"\n', 0o644)
    _write(tmp_path / "devices.d" / "s1.toml", '[[devices]]\npsk_identity = "s1"\npsk = "0123456789abcdef"\n'
           'user = "@s1:x"\npassword = "pw"\n', 0o640)
    _write(tmp_path / "conf.d" / "10-key.toml", 'psk = "x"\n', 0o666)
    checks = doctor.check_file_modes(config)
    failed = sorted(check.text.split(" ")[0] for check in checks if check.status == FAIL)
    assert failed == sorted([str(credentials), str(registration), str(tmp_path / "conf.d" / "10-key.toml")])
    assert all("chmod o-rwx" in check.text and SECRET_TOKEN not in check.text for check in checks)


def test_file_modes_ok_when_closed(tmp_path: Path) -> None:
    credentials = _write(tmp_path / "credentials.toml",
                         f'[[devices]]\naddress = "::1"\naccess_token = "{SECRET_TOKEN}"\n', 0o640)
    config = _write(tmp_path / "comatrix.toml", f'credentials_file = "{credentials}"\n', 0o644)
    [check] = doctor.check_file_modes(config)
    assert check.status == OK and "2 config/credential file(s)" in check.text


def test_doctor_on_a_config_that_does_not_load(tmp_path: Path) -> None:
    config = _write(tmp_path / "comatrix.toml", 'no_such_key = 1\n', 0o644)
    out = io.StringIO()
    assert main(["--config", str(config), "doctor"], out=out) == 1
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("FAIL config: ") and "no_such_key" in lines[0]
    assert lines[-1].startswith("WARN the rest: not checked")


def test_device_names_show_no_secret() -> None:
    device = DeviceCredentials(network=None, user="@s1:x", password="pw-secret", psk_identity="s1",
                               psk=b"0123456789abcdef")
    assert doctor.device_name(device) == "device @s1:x (dtls:s1)"


# ------------------------------------------------------------------ the CoAP probe

def _udp_server(answer: bool) -> tuple[socket.socket, threading.Thread]:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(5)

    def serve() -> None:
        try:
            data, peer = server.recvfrom(2048)
        except OSError:
            return
        request = wire.decode(data)
        if answer:  # piggybacked 2.05 in an ACK
            server.sendto(wire.encode(2, 0x45, request.mid, request.token, (), b"1"), peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


@pytest.mark.parametrize("answer", [True, False])
def test_coap_probe_sees_an_answer_or_none(answer: bool) -> None:
    server, thread = _udp_server(answer)
    try:
        port = server.getsockname()[1]
        assert doctor.coap_answers("127.0.0.1", port, timeout=1.0) is answer
        assert doctor.udp_port_bound("127.0.0.1", port) is True
    finally:
        thread.join(5)
        server.close()
    assert doctor.udp_port_bound("127.0.0.1", port) is False


def test_is_reply_ignores_garbage_and_other_exchanges() -> None:
    assert doctor.is_reply(wire.encode(2, 0x45, 7, b"tok1"), 7, b"zzzz")
    assert doctor.is_reply(wire.encode(1, 0x45, 9, b"tok1"), 7, b"tok1")  # a separate response
    assert not doctor.is_reply(wire.encode(2, 0x45, 8, b"tok2"), 7, b"tok1")
    assert not doctor.is_reply(b"\xff\x00", 7, b"tok1")


# ------------------------------------------------------------------ register-user

def test_registration_mac_is_synapses() -> None:
    expected = hmac.new(b"s3cret", b"abc\x00sensor01\x00pw\x00notadmin", hashlib.sha1).hexdigest()
    assert registration_mac("s3cret", "abc", "sensor01", "pw", False) == expected
    assert registration_mac("s3cret", "abc", "sensor01", "pw", True) == hmac.new(
        b"s3cret", b"abc\x00sensor01\x00pw\x00admin", hashlib.sha1).hexdigest()


def test_localparts() -> None:
    assert localpart_of("sensor01") == "sensor01"
    assert localpart_of("@sensor01:example.org") == "sensor01"
    for bad in ("", "Sensor", "a b", "@:x", "x" * 256):
        with pytest.raises(RegisterError):
            localpart_of(bad)


def test_generated_passwords_are_long_and_fresh() -> None:
    first, second = new_password(), new_password()
    assert first != second and len(first) >= 32


def test_register_user_unreachable_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = _write(tmp_path / "secret", "s3cret\n", 0o600)
    config = _write(tmp_path / "comatrix.toml", 'homeserver = "http://127.0.0.1:1"\n', 0o644)
    out = io.StringIO()
    status = main(["--config", str(config), "register-user", "sensor01", "--shared-secret-file", str(secret)],
                  out=out)
    assert status == 1 and out.getvalue() == ""
    error = capsys.readouterr().err
    assert error.startswith("comatrixctl: cannot reach the homeserver at http://127.0.0.1:1")
    assert error.count("\n") == 1 and "s3cret" not in error


def test_register_user_takes_one_secret_from_stdin_only(tmp_path: Path) -> None:
    config = _write(tmp_path / "comatrix.toml", 'homeserver = "http://127.0.0.1:1"\n', 0o644)
    assert main(["--config", str(config), "register-user", "s1", "--password-file", "-",
                 "--shared-secret-file", "-"], out=io.StringIO()) == 2


# ------------------------------------------------------------------ the kept token

def test_kept_token_is_read_without_creating_files(tmp_path: Path) -> None:
    """A stopped gateway's WAL database: reading it must leave no root-owned -wal/-shm behind."""
    device = DeviceCredentials(network=None, user="@s1:x", password="pw", psk_identity="s1", psk=b"k" * 16)
    database = tmp_path / "comatrix.sqlite3"
    writer = sqlite3.connect(database)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("CREATE TABLE device_tokens (user_id TEXT, device_id TEXT, access_token TEXT, updated REAL)")
    writer.execute("INSERT INTO device_tokens VALUES (?, ?, ?, 0)", ("@s1:x", device.login_device_id, "kept"))
    writer.commit()
    assert doctor.kept_token(str(tmp_path), device) == "kept"  # through the WAL of the open writer
    writer.close()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["comatrix.sqlite3"]
    assert doctor.kept_token(str(tmp_path), device) == "kept"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["comatrix.sqlite3"]
    other = DeviceCredentials(network=None, user="@s2:x", password="pw", psk_identity="s2", psk=b"k" * 16)
    assert doctor.kept_token(str(tmp_path), other) is None
    assert doctor.kept_token(str(tmp_path / "missing"), device) is None
