"""Config precedence (defaults < file < conf.d < command line) and validation."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from comatrix.coap.message import Security
from comatrix.config import Config, ConfigError, build_config, read_config_files
from comatrix.tap import Options, load_config


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    """A config file, 0600 unless told: files holding secrets must not be open to others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def test_defaults() -> None:
    config = build_config()
    assert config == Config()
    assert (config.ip, config.port, config.homeserver) == ("::", 5683, "http://127.0.0.1:8008")


def test_file_overrides_defaults_and_cli_overrides_file(tmp_path: Path) -> None:
    config_file = write(tmp_path / "comatrix.toml", 'ip = "127.0.0.1"\nport = 6000\n'
                        'homeserver = "http://hs.example:8008/"\nplugin_dirs = ["/a"]\n')
    options = Options()
    options.parseOptions(["--config", str(config_file), "--port", "7000", "--plugin-dir", "/b"])
    config = load_config(options)
    assert config.ip == "127.0.0.1"  # from the file
    assert config.port == 7000  # the command line wins
    assert config.homeserver == "http://hs.example:8008"  # trailing slash dropped
    assert config.plugin_dirs == ("/a", "/b")  # command-line directories add to the file's


def test_conf_d_fragments_merge_in_lexical_order(tmp_path: Path) -> None:
    main = write(tmp_path / "comatrix.toml", 'port = 6000\n[coap]\nmax_observers = 10\n')
    write(tmp_path / "conf.d" / "20-late.toml", "port = 6002\n")
    write(tmp_path / "conf.d" / "10-early.toml", "port = 6001\n[coap]\ndedup_capacity = 99\n")
    config = build_config(read_config_files(main))
    assert config.port == 6002
    assert config.coap.max_observers == 10 and config.coap.dedup_capacity == 99


def test_ip_wins_over_interface_but_cli_interface_beats_file_ip() -> None:
    assert build_config({"ip": "::1", "interface": "lowpan0"}).interface is None
    config = build_config({"ip": "::1"}, {"interface": "lowpan0"})
    assert (config.interface, config.ip) == ("lowpan0", "::")


def test_cli_ip_beats_configured_interface(tmp_path: Path) -> None:
    main = write(tmp_path / "comatrix.toml", 'interface = "lowpan0"\n')
    options = Options()
    options.parseOptions(["--config", str(main), "--ip", "::1"])
    config = load_config(options)
    assert config.interface is None and config.ip == "::1"


@pytest.mark.parametrize("text, message", [
    ("port = 70000", "port"),
    ('port = "x"', "port"),
    ('homeserver = "ftp://x"', "homeserver"),
    ("bogus = 1", "unknown config key"),
    ('log_level = "loud"', "log_level"),
    ("[coap]\nnope = 1", r"unknown \[coap\] key"),
    ('[[devices]]\naddress = "not an address"\naccess_token = "t"', "address"),
    ('[[devices]]\naddress = "::1"', "access_token"),
    ("connect_timeout = 0", "connect_timeout"),
    ("request_timeout = 4\nconnect_timeout = 4", "connect_timeout"),
    ('[[devices]]\naddress = "fe80::/64"\nuser = "u"\npassword = "p"\ndevice_id = "D"\n'
     '[[devices]]\naddress = "fd00::/64"\nuser = "u"\npassword = "p"\ndevice_id = "D"', "device_id D"),
    ("request_timeout = 200\n[limits]\nqueue_timeout = 60", "EXCHANGE_LIFETIME"),
    ("request_timeout = 195\n[coap]\nack_timeout = 0.5\nmax_retransmit = 0", "EXCHANGE_LIFETIME"),
    ('[[devices]]\naddress = "::1"\nuser = "u"\npassword = "p"\ndevice_id = "a/b"', "device_id"),
    ('[[devices]]\naddress = "::1"\nuser = "u"\npassword = "p"\ndevice_id = 7', "device_id"),
])
def test_invalid_values_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "c.toml", text + "\n")
    with pytest.raises(ConfigError, match=message) as info:
        build_config(read_config_files(path))
    assert "\n" not in str(info.value)


def test_broken_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "port = = 1\n")
    with pytest.raises(ConfigError, match="c.toml"):
        read_config_files(path)


def test_devices_from_credentials_file_and_secrets_not_in_repr(tmp_path: Path) -> None:
    creds = write(tmp_path / "credentials.toml",
                  '[[devices]]\naddress = "2001:db8::/64"\nuser = "@s:example.org"\n'
                  'password = "hunter2-secret"\n')
    main = write(tmp_path / "comatrix.toml",
                 f'credentials_file = "{creds}"\n[[devices]]\naddress = "fe80::1%lowpan0"\n'
                 'access_token = "tok-secret-123"\n')
    config = build_config(read_config_files(main))
    assert [str(d.network) for d in config.devices] == ["fe80::1/128", "2001:db8::/64"]
    assert config.devices[0].matches("fe80::1%lowpan0")
    assert config.devices[1].matches("2001:db8::42") and not config.devices[1].matches("2001:db9::1")
    assert "hunter2-secret" not in repr(config) and "tok-secret-123" not in repr(config)


def test_ipv4_device_matches_v4_mapped_peer() -> None:
    config = build_config({"devices": [{"address": "192.0.2.0/24", "access_token": "t"}]})
    assert config.devices[0].network == ipaddress.ip_network("192.0.2.0/24")
    assert config.devices[0].matches("::ffff:192.0.2.7")


def test_each_device_entry_logs_in_as_one_stable_matrix_device() -> None:
    entries = [{"address": "fe80::/64", "user": "@s:example.org", "password": "p"},
               {"address": "fd00::/64", "user": "@s:example.org", "password": "p"},
               {"address": "fd01::/64", "user": "@s:example.org", "password": "p", "device_id": "KITCHEN"}]
    first, second, named = build_config({"devices": entries}).devices
    again = build_config({"devices": entries}).devices[0]
    assert first.login_device_id == again.login_device_id  # the same device after a restart
    assert first.login_device_id.startswith("COMATRIX") and len(first.login_device_id) == 20
    assert first.login_device_id != second.login_device_id  # one device per entry
    assert named.login_device_id == "KITCHEN"


def test_plugin_settings_are_passed_through() -> None:
    config = build_config({"plugins": {"sensor": {"room": "#s:example.org"}}})
    assert config.plugin_settings("sensor") == {"room": "#s:example.org"}
    assert config.plugin_settings("other") == {}


def test_deadlines_within_the_default_exchange_lifetime_are_accepted() -> None:
    config = build_config({"request_timeout": 195, "connect_timeout": 3})
    assert (config.request_timeout, config.connect_timeout) == (195, 3)
    assert config.request_timeout + config.limits.queue_timeout < config.coap.exchange_lifetime


@pytest.mark.parametrize("with_state_dir", [False, True])
def test_a_gateway_without_state_dir_warns_that_its_state_is_volatile(tmp_path: Path, with_state_dir: bool,
                                                                     made_stores: list[Any]) -> None:
    from twisted.logger import LogLevel, globalLogPublisher

    from comatrix.tap import makeService

    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    args = ["--ip", "127.0.0.1", "--port", "0", "--homeserver", "http://127.0.0.1:9"]
    if with_state_dir:
        args += ["--state-dir", str(tmp_path)]
    options = Options()
    options.parseOptions(args)
    try:
        gateway = makeService(options)
    finally:
        globalLogPublisher.removeObserver(events.append)
    gateway.port.stopListening()  # type: ignore[attr-defined]
    warned = [e for e in events if e.get("log_level") == LogLevel.warn
              and "No state_dir" in str(e.get("log_format"))]
    assert len(warned) == (0 if with_state_dir else 1)


def test_connect_timeout_defaults_below_a_short_request_timeout() -> None:
    assert build_config({}).connect_timeout == 5.0
    assert build_config({"request_timeout": 4}).connect_timeout == 2.0
    assert build_config({"request_timeout": 4, "connect_timeout": 1}).connect_timeout == 1.0


PSK_ENTRY = {"user": "@s:example.org", "password": "p", "psk_identity": "sensor01",
             "psk": "a-long-enough-psk-secret"}


def test_a_psk_entry_needs_no_address_and_turns_dtls_on() -> None:
    config = build_config({"devices": [PSK_ENTRY]})
    (device,) = config.devices
    assert device.network is None and not device.matches("127.0.0.1")
    assert (device.psk_identity, device.psk) == ("sensor01", b"a-long-enough-psk-secret")
    assert config.dtls_port == 5684
    assert "a-long-enough-psk-secret" not in repr(config)
    hexed = build_config({"devices": [{**{k: v for k, v in PSK_ENTRY.items() if k != "psk"},
                                       "psk_hex": "00" * 16}], "dtls_port": "6000"})
    assert hexed.devices[0].psk == bytes(16) and hexed.dtls_port == 6000


def test_dtls_is_off_without_psk_and_port_and_the_cli_sets_the_port() -> None:
    assert build_config({}).dtls_port is None
    # security = "off" opens no secured way in, even when configured.
    assert build_config({"security": "off", "dtls_port": 5700, "devices": [PSK_ENTRY]}).dtls_port is None
    options = Options()
    options.parseOptions(["--dtls-port", "5999"])
    assert load_config(options).dtls_port == 5999


def test_bad_psk_entries_are_refused_without_showing_the_key() -> None:
    secret = "short-secret"
    cases = [
        ({**PSK_ENTRY, "psk": secret}, "16-64 bytes"),
        ({**PSK_ENTRY, "psk_hex": "zz" + secret}, "one of them"),
        ({k: v for k, v in PSK_ENTRY.items() if k != "psk_identity"}, "needs a psk_identity"),
        ({k: v for k, v in PSK_ENTRY.items() if k != "psk"}, "give psk or psk_hex"),
        ({**PSK_ENTRY, "psk_identity": ""}, "psk_identity must be"),
    ]
    for entry, reason in cases:
        with pytest.raises(ConfigError, match=reason) as caught:
            build_config({"devices": [entry]})
        assert secret not in str(caught.value)
    with pytest.raises(ConfigError, match="two entries have psk_identity"):
        build_config({"devices": [PSK_ENTRY, {**PSK_ENTRY, "device_id": "OTHER"}]})
    with pytest.raises(ConfigError, match="dtls_port must"):
        build_config({"dtls_port": 0})
    with pytest.raises(ConfigError, match="differ"):
        build_config({"dtls_port": 5683})


def test_dtls_table_is_checked() -> None:
    config = build_config({"dtls": {"max_sessions": 8, "idle_timeout": 60}})
    assert (config.dtls.max_sessions, config.dtls.idle_timeout) == (8, 60.0)
    for table in ({"nope": 1}, {"max_sessions": 0}, {"max_sessions": 1.5}, {"mtu": True}):
        with pytest.raises(ConfigError):
            build_config({"dtls": table})


def test_per_device_shares_are_config_keys_and_validated() -> None:
    config = build_config({"coap": {"max_observers_per_peer": 4, "max_uploads_per_peer": 2},
                           "limits": {"max_sessions_per_device": 2, "max_sessions": 50,
                                      "session_idle_timeout": 3600}})
    assert (config.coap.max_observers_per_peer, config.coap.max_uploads_per_peer) == (4, 2)
    limits = config.limits
    assert (limits.max_sessions_per_device, limits.max_sessions, limits.session_idle_timeout) == (2, 50, 3600.0)
    defaults = build_config()
    assert defaults.coap.max_observers_per_peer < defaults.coap.max_observers
    assert defaults.coap.max_uploads_per_peer < defaults.coap.blockwise_state_capacity
    assert defaults.limits.max_sessions_per_device < defaults.limits.max_sessions
    assert 0 < defaults.limits.session_idle_timeout <= 7 * 86400
    for table, key, value in (("coap", "max_observers_per_peer", 0), ("coap", "max_uploads_per_peer", 0),
                              ("limits", "max_sessions_per_device", 0), ("limits", "max_sessions", 0),
                              ("limits", "session_idle_timeout", 0), ("limits", "max_sessions", 1.5)):
        with pytest.raises(ConfigError, match=key):
            build_config({table: {key: value}})
OSCORE_SECRET = "00112233445566778899aabbccddeeff"


@pytest.mark.parametrize("table, message", [
    ('{ recipient_id = "01", sender_id = "" }', "oscore needs master_secret"),
    (f'{{ recipient_id = "01", sender_id = "", master_secret = "{OSCORE_SECRET}", extra = "x" }}',
     "unknown oscore key"),
    (f'{{ recipient_id = "zz", sender_id = "", master_secret = "{OSCORE_SECRET}" }}', "oscore.recipient_id"),
    (f'{{ recipient_id = "0102030405060708", sender_id = "", master_secret = "{OSCORE_SECRET}" }}',
     "at most 7 bytes"),
    (f'{{ recipient_id = "01", sender_id = "01", master_secret = "{OSCORE_SECRET}" }}', "must differ"),
    ('{ recipient_id = "01", sender_id = "", master_secret = "0011" }', "at least 16 bytes"),
    (f'{{ recipient_id = "01", sender_id = "", master_secret = "{OSCORE_SECRET}", master_salt = 5 }}',
     "oscore.master_salt must be a hex string"),
    ('"01"', "oscore must be a table"),
])
def test_invalid_oscore_tables_never_echo_the_secret(tmp_path: Path, table: str, message: str) -> None:
    path = write(tmp_path / "c.toml", f'[[devices]]\nuser = "u"\npassword = "p"\noscore = {table}\n')
    with pytest.raises(ConfigError, match=message) as info:
        build_config(read_config_files(path))
    assert OSCORE_SECRET not in str(info.value)


def test_oscore_entry_needs_no_address_and_hides_its_secret(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml",
                 '[[devices]]\nuser = "@s:example.org"\npassword = "p"\n'
                 f'oscore = {{ recipient_id = "01", sender_id = "", master_secret = "{OSCORE_SECRET}", '
                 'master_salt = "9e7ca92223786340" }\n'
                 '[[devices]]\naddress = "::1"\naccess_token = "t"\n'
                 f'oscore = {{ recipient_id = "02", sender_id = "", master_secret = "{OSCORE_SECRET}" }}\n')
    entry, both = build_config(read_config_files(path)).devices
    assert entry.network is None and not entry.matches("::1")
    assert entry.oscore is not None and entry.oscore.recipient_id == b"\x01"
    assert entry.oscore.master_salt == bytes.fromhex("9e7ca92223786340")
    assert entry.identifies(Security("oscore", "01")) and not entry.identifies(Security("dtls", "01"))
    assert entry.login_device_id != both.login_device_id
    assert both.matches("::1") and both.oscore is not None and both.oscore.master_salt == b""
    assert OSCORE_SECRET not in repr(entry) and "9e7ca922" not in repr(entry)


def test_two_entries_cannot_share_a_recipient_id() -> None:
    oscore = {"recipient_id": "01", "sender_id": "", "master_secret": OSCORE_SECRET}
    entries = [{"user": "a", "password": "p", "oscore": oscore}, {"user": "b", "password": "p", "oscore": oscore}]
    with pytest.raises(ConfigError, match="recipient_id '01'"):
        build_config({"devices": entries})


SECRET_LINES = [
    '[[devices]]\naddress = "::1"\nuser = "u"\npassword = "p"\n',
    '[[devices]]\naddress = "::1"\naccess_token = "t"\n',
    '[plugins.dtls]\nkeys = [{identity = "a", psk = "k"}]\n',  # nested, in an array: still found
    '[plugins.dtls.peer]\npsk_hex = "00ff"\n',
    '[plugins.oscore]\nmaster_secret = "00ff"\n',
]


@pytest.mark.parametrize("text", SECRET_LINES)
@pytest.mark.parametrize("mode, access", [(0o644, "readable"), (0o646, "readable and writable"),
                                          (0o602, "writable"), (0o641, "accessible")])
def test_secrets_in_a_file_open_to_others_are_refused(tmp_path: Path, text: str, mode: int, access: str) -> None:
    path = write(tmp_path / "credentials.toml", text, mode)
    with pytest.raises(ConfigError) as info:
        read_config_files(path)
    assert str(info.value) == (f"{path} holds secrets and is {access} by others (mode {mode:04o}); "
                               "chmod o-rwx it")
    for secret in ('"p"', '"t"', '"k"', "00ff"):
        assert secret not in str(info.value)


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o660, 0o400])
def test_secrets_in_a_file_closed_to_others_are_read(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path / "credentials.toml", SECRET_LINES[0], mode)
    assert read_config_files(path)["devices"][0]["password"] == "p"


def test_files_without_secrets_are_not_checked(tmp_path: Path) -> None:
    main = write(tmp_path / "comatrix.toml", 'port = 6000\n# password = "only a comment"\n', 0o644)
    write(tmp_path / "conf.d" / "10-listen.toml", 'ip = "::1"\n', 0o666)
    config = build_config(read_config_files(main))
    assert (config.ip, config.port) == ("::1", 6000)


def test_every_file_with_secrets_is_checked(tmp_path: Path) -> None:
    """The main file, a conf.d fragment and the credentials file, also through twistd's options."""
    creds = write(tmp_path / "credentials.toml", SECRET_LINES[1], 0o640)
    main = write(tmp_path / "comatrix.toml", f'credentials_file = "{creds}"\n', 0o644)
    fragment = write(tmp_path / "conf.d" / "50-token.toml", SECRET_LINES[0], 0o600)
    options = Options()
    options.parseOptions(["--config", str(main)])
    assert len(load_config(options).devices) == 2
    for path in (creds, fragment):
        path.chmod(0o644)
        with pytest.raises(ConfigError, match=f"^{path} holds secrets"):
            load_config(options)
        path.chmod(0o640)
    main.write_text(f'credentials_file = "{creds}"\n' + SECRET_LINES[0].replace("::1", "::2"))
    with pytest.raises(ConfigError, match=f"^{main} holds secrets"):
        load_config(options)
