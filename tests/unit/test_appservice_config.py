"""Application-service mode in the config: the ``[appservice]`` table and provisioned ``[[devices]]``.

``[appservice]`` takes ``registration`` (required), ``bind`` (default
127.0.0.1: only this host's homeserver reaches it) and ``port`` (default 8010);
nothing else.  A ``[[devices]]`` entry with ``appservice = true`` names its
``user`` and holds no password or token; ``allow_invites_from`` takes user
ids, ``*:server`` and ``*``.  Such entries need ``[appservice]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from comatrix.config import DEFAULT_APPSERVICE_PORT, AppserviceSettings, ConfigError, build_config, read_config_files

REGISTRATION = "/etc/comatrix/appservice.yaml"
SENSOR = "@comatrix_sensor01:example.org"


def config(appservice: Any = None, *devices: dict[str, Any]) -> Any:
    values: dict[str, Any] = {"devices": list(devices)}
    if appservice is not None:
        values["appservice"] = appservice
    return build_config(values)


def test_appservice_defaults_to_loopback_and_port_8010() -> None:
    assert build_config().appservice is None  # off unless configured
    settings = config({"registration": REGISTRATION}).appservice
    assert settings == AppserviceSettings(registration=REGISTRATION, bind="127.0.0.1", port=8010)
    assert DEFAULT_APPSERVICE_PORT == 8010
    assert config({"registration": REGISTRATION, "bind": "::1", "port": 9009}).appservice == AppserviceSettings(
        REGISTRATION, "::1", 9009)


@pytest.mark.parametrize("table, message", [
    ({}, "registration .* is required"),
    ({"bind": "127.0.0.1"}, "registration .* is required"),
    ({"registration": REGISTRATION, "hs_token": "x"}, "unknown key.*hs_token"),
    ({"registration": REGISTRATION, "url": "http://x"}, "unknown key.*url"),
    ({"registration": REGISTRATION, "port": 70000}, "port must be between 0 and 65535"),
    ({"registration": REGISTRATION, "port": -1}, "port must be between 0 and 65535"),
    ({"registration": REGISTRATION, "port": "http"}, "port must be an integer"),
    ({"registration": REGISTRATION, "port": True}, "port must be an integer"),
    ({"registration": 7}, "registration must be a string"),
    ({"registration": ""}, "registration"),
    ({"registration": REGISTRATION, "bind": 127}, "bind must be"),
    ({"registration": REGISTRATION, "bind": "localhost"}, "bind must be an IP address"),
    ({"registration": REGISTRATION, "bind": "0.0.0.0:8010"}, "bind must be an IP address"),
    ("appservice.yaml", r"\[appservice\] must be a table"),
])
def test_a_bad_appservice_table_is_refused(table: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(table)


def test_a_provisioned_device_is_a_user_without_password_or_token() -> None:
    [device] = config({"registration": REGISTRATION},
                      {"name": "sensor01", "address": "2001:db8::1", "user": SENSOR, "appservice": True}).devices
    assert device.appservice and device.user == SENSOR and device.password is None and device.access_token is None
    assert device.allow_invites_from is None  # the default: users of the device user's own server
    [ordinary] = config(None, {"address": "2001:db8::2", "user": "@d:example.org", "password": "pw"}).devices
    assert not ordinary.appservice


@pytest.mark.parametrize("entry, message", [
    ({"address": "2001:db8::1", "appservice": True}, "an appservice device has a user"),
    ({"address": "2001:db8::1", "user": SENSOR, "appservice": True, "password": "pw"}, "neither password"),
    ({"address": "2001:db8::1", "user": SENSOR, "appservice": True, "access_token": "syt_x"},
     "neither password nor access_token"),
    ({"address": "2001:db8::1", "user": SENSOR, "appservice": "yes"}, "appservice must be true or false"),
    ({"address": "2001:db8::1", "user": SENSOR, "appservice": 1}, "appservice must be true or false"),
    ({"address": "2001:db8::1", "user": SENSOR, "appservice": False}, "give access_token, or user and password"),
    ({"address": "2001:db8::1", "user": SENSOR}, r"or appservice = true"),
])
def test_a_bad_provisioned_device_is_refused(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config({"registration": REGISTRATION}, entry)


@pytest.mark.parametrize("patterns", [
    ["@alice:example.org"], ["*:example.org"], ["*"], ["*:example.org:8448", "@bob:other.example:8448"], [],
])
def test_allow_invites_from_takes_user_ids_server_patterns_and_star(patterns: list[str]) -> None:
    [device] = config({"registration": REGISTRATION}, {"address": "2001:db8::1", "user": SENSOR,
                                                       "appservice": True, "allow_invites_from": patterns}).devices
    assert device.allow_invites_from == tuple(patterns)


@pytest.mark.parametrize("patterns", [
    "*", ["alice"], ["@alice"], ["*example.org"], ["*:"], ["@alice:example.org "],
    ["@al ice:example.org"], [7], ["*:exa mple.org"], ["**"], [["*"]],
])
def test_a_bad_allow_invites_from_is_refused(patterns: Any) -> None:
    with pytest.raises(ConfigError, match="allow_invites_from must be a list of user ids"):
        config({"registration": REGISTRATION}, {"address": "2001:db8::1", "user": SENSOR, "appservice": True,
                                                "allow_invites_from": patterns})


def test_provisioned_devices_need_the_appservice_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"appservice = true need an \[appservice\] table"):
        config(None, {"address": "2001:db8::1", "user": SENSOR, "appservice": True})
    # As comatrixctl writes them: devices.d/ beside the config file.
    main = tmp_path / "comatrix.toml"
    main.write_text('homeserver = "http://127.0.0.1:8008"\n')
    (tmp_path / "devices.d").mkdir()
    device = tmp_path / "devices.d" / "sensor01.toml"
    device.write_text(f'[[devices]]\nname = "sensor01"\naddress = "::1"\nuser = "{SENSOR}"\nappservice = true\n'
                      'allow_invites_from = ["*:example.org"]\n')
    device.chmod(0o640)
    with pytest.raises(ConfigError, match=r"need an \[appservice\] table"):
        build_config(read_config_files(main))
    main.write_text(f'homeserver = "http://127.0.0.1:8008"\n[appservice]\nregistration = "{REGISTRATION}"\n')
    loaded = build_config(read_config_files(main))
    assert loaded.appservice is not None and loaded.appservice.registration == REGISTRATION
    [entry] = loaded.devices
    assert entry.appservice and entry.user == SENSOR and entry.allow_invites_from == ("*:example.org",)
