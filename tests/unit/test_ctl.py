"""``comatrixctl device add/list/rotate/remove``: files, key material, what the firmware gets."""

from __future__ import annotations

import io
import re
import stat
import tomllib
from pathlib import Path

import lakers
import pytest

from comatrix.config import build_config, read_config_files
from comatrix.ctl import main, render_c_header, render_toml_entry
from comatrix.edhoc.ccs import Ccs, parse_ccs
from comatrix.edhoc.responder import GatewayKey, PendingSessions, Responder, SessionLimits
from comatrix.oscore import ContextStore


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "comatrix.toml"
    path.write_text('ip = "fe80::1%lowpan0"\nport = 5683\nhomeserver = "http://127.0.0.1:8008"\n')
    return path


def ctl(config: Path, *argv: str, stdin: str = "") -> tuple[int, str]:
    out = io.StringIO()
    status = main(["--config", str(config), *argv], out=out, stdin=io.StringIO(stdin))
    return status, out.getvalue()


def entry_of(config: Path, name: str) -> dict[str, object]:
    with open(config.parent / "devices.d" / f"{name}.toml", "rb") as handle:
        [entry] = tomllib.load(handle)["devices"]
    return entry


def test_add_psk_writes_a_private_file_and_prints_firmware_settings(config: Path) -> None:
    status, out = ctl(config, "device", "add", "sensor01", "--psk", "--user", "@sensor01:example.org",
                      "--password-file", "-", stdin="hunter2-long-password\n")
    assert status == 0
    path = config.parent / "devices.d" / "sensor01.toml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    entry = entry_of(config, "sensor01")
    assert entry["psk_identity"] == "sensor01" and entry["password"] == "hunter2-long-password"
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", str(entry["psk"]))  # 16 random bytes, as text for -k
    key_bytes = ", ".join(f"0x{byte:02x}" for byte in str(entry["psk"]).encode())
    assert f"#define COMATRIX_PSK_KEY {{ {key_bytes} }}" in out
    assert '#define COMATRIX_PSK_IDENTITY "sensor01"' in out and "#define COMATRIX_DTLS_PORT 5684" in out
    assert '#define COMATRIX_GATEWAY_ADDR "fe80::1%lowpan0"' in out
    assert "hunter2" not in out  # the Matrix password is the gateway's, never the firmware's
    # The daemon reads what comatrixctl wrote.
    [device] = build_config(read_config_files(config)).devices
    assert device.user == "@sensor01:example.org"


def test_two_oscore_devices_get_distinct_ids_and_fresh_secrets(config: Path) -> None:
    for name in ("a", "b"):
        assert ctl(config, "device", "add", name, "--oscore", "--user", f"@{name}:x",
                   "--access-token-file", "-", stdin="syt_token_" + name)[0] == 0
    a, b = entry_of(config, "a")["oscore"], entry_of(config, "b")["oscore"]
    assert isinstance(a, dict) and isinstance(b, dict)
    assert (a["recipient_id"], b["recipient_id"]) == ("00", "01") and a["sender_id"] == ""
    assert a["master_secret"] != b["master_secret"] and len(bytes.fromhex(a["master_salt"])) == 8


def test_list_rotate_remove(config: Path) -> None:
    ctl(config, "device", "add", "s1", "--psk", "--oscore", "--user", "@s1:x", "--password-file", "-", stdin="pw")
    before = entry_of(config, "s1")
    status, listing = ctl(config, "device", "list")
    assert status == 0 and "s1" in listing and "psk+oscore" in listing
    assert str(before["psk"]) not in listing and "pw" not in listing.split()
    assert ctl(config, "device", "rotate", "s1")[0] == 0
    after = entry_of(config, "s1")
    assert after["psk_identity"] == before["psk_identity"] and after["psk"] != before["psk"]
    assert after["oscore"]["recipient_id"] == before["oscore"]["recipient_id"]  # type: ignore[index]
    assert after["oscore"]["master_secret"] != before["oscore"]["master_secret"]  # type: ignore[index]
    assert ctl(config, "device", "remove", "s1")[0] == 0
    assert not (config.parent / "devices.d" / "s1.toml").exists()
    assert ctl(config, "device", "remove", "s1")[0] == 1


def test_refusals(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl(config, "device", "add", "x", "--user", "@x:y", "--password-file", "-", stdin="pw")[0] == 2
    assert ctl(config, "device", "add", "../x", "--psk", "--user", "@x:y", "--password-file", "-",
               stdin="pw")[0] == 1
    assert ctl(config, "device", "add", "x", "--psk", "--user", "@x:y", "--password-file", "-", stdin="")[0] == 1
    assert ctl(config, "device", "add", "x", "--psk", "--user", "@x:y", "--password-file", "-", stdin="pw")[0] == 0
    assert ctl(config, "device", "add", "x", "--psk", "--user", "@x:y", "--password-file", "-", stdin="pw")[0] == 1
    assert "exists already" in capsys.readouterr().err


def test_rendered_entry_and_header_round_trip() -> None:
    entry = {"name": "n", "user": "@n:x", "psk_identity": "n", "psk_hex": "00ff",
             "oscore": {"recipient_id": "01", "sender_id": "", "master_secret": "aa", "master_salt": "bb"}}
    assert tomllib.loads(render_toml_entry(entry))["devices"] == [entry]
    header = render_c_header("n-1", entry, "fe80::1", 5683, 5684)
    assert "#ifndef COMATRIX_DEVICE_N_1_H" in header
    assert "#define COMATRIX_OSCORE_SENDER_ID { 0x01 }" in header
    assert "#define COMATRIX_OSCORE_RECIPIENT_ID { 0 }" in header and "RECIPIENT_ID_LEN 0" in header


def credential_of(config: Path, name: str) -> Ccs:
    table = entry_of(config, name)["edhoc"]
    assert isinstance(table, dict)
    return parse_ccs(bytes.fromhex(table["credential"]))


def test_add_edhoc_stores_only_the_public_credential_and_prints_a_working_key_pair(config: Path) -> None:
    state = config.parent / "state"
    config.write_text(config.read_text() + f'state_dir = "{state}"\n')
    for name in ("e1", "e2"):
        status, out = ctl(config, "device", "add", name, "--edhoc", "--user", f"@{name}:x",
                          "--password-file", "-", stdin="pw")
        assert status == 0
    key_file = state / "edhoc-key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    gateway = GatewayKey.load_or_create(state)  # the same key the gateway will use
    entry = entry_of(config, "e2")
    assert set(entry) == {"name", "user", "password", "edhoc"}
    credential = credential_of(config, "e2")
    assert credential.kid != credential_of(config, "e1").kid
    private = re.search(r"private key +([0-9a-f]{64})", out)
    assert private is not None and private.group(1) not in (config.parent / "devices.d" / "e2.toml").read_text()
    d = bytes.fromhex(private.group(1))
    assert f"gateway cred   {gateway.credential.encoded.hex()}" in out
    assert f"#define COMATRIX_EDHOC_PRIVATE_KEY {{ {', '.join(f'0x{b:02x}' for b in d)} }}" in out
    assert "#define COMATRIX_EDHOC_KID_I" in out and "COMATRIX_EDHOC_CRED_R_LEN" in out
    # The printed private key belongs to the stored credential: it passes a real exchange.
    [one, two] = build_config(read_config_files(config)).devices
    assert two.edhoc is not None and two.edhoc.credential == credential
    table = [(device.edhoc.identity, device.edhoc.credential.encoded) for device in (one, two) if device.edhoc]
    responder = Responder(gateway, lambda: table, ContextStore(), PendingSessions(SessionLimits(), lambda: 0.0))
    initiator = lakers.EdhocInitiator()
    message_2 = responder.message_1("a:x", bytes(initiator.prepare_message_1(b"\x01")))
    c_r = bytes(initiator.parse_message_2(message_2)[0])
    initiator.verify_message_2(d, credential.encoded, gateway.credential.encoded)
    message_3, _ = initiator.prepare_message_3(lakers.CredentialTransfer.ByReference, [])
    _, context = responder.message_3(c_r, bytes(message_3), message_4=False)
    assert context.identity is not None and context.identity.identity == two.edhoc.identity
    # list shows the kid; rotate makes a new key pair under the same kid.
    assert "edhoc" in ctl(config, "device", "list")[1]
    status, out = ctl(config, "device", "rotate", "e2")
    rotated = credential_of(config, "e2")
    assert status == 0 and rotated.kid == credential.kid and rotated.x != credential.x


def test_edhoc_without_state_dir_is_refused(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl(config, "device", "add", "e", "--edhoc", "--user", "@e:x", "--password-file", "-", stdin="pw")[0] == 1
    assert "state_dir" in capsys.readouterr().err
    assert not (config.parent / "devices.d" / "e.toml").exists()


def test_ids_taken_outside_devices_d_are_not_handed_out_again(config: Path) -> None:
    # An entry of the main config (or the credentials file) holds OSCORE id 00 already.
    config.write_text(config.read_text() + '[[devices]]\nuser = "@old:x"\naccess_token = "t"\n'
                      'oscore = { recipient_id = "00", sender_id = "", master_secret = "' + "ab" * 16 + '" }\n')
    config.chmod(0o600)
    assert ctl(config, "device", "add", "new", "--oscore", "--user", "@new:x", "--password-file", "-",
               stdin="pw")[0] == 0
    assert entry_of(config, "new")["oscore"]["recipient_id"] == "01"  # type: ignore[index]
    assert len(build_config(read_config_files(config)).devices) == 2  # the config still loads
