"""The daemon's wiring of application-service mode (`comatrix.tap.makeService` with ``[appservice]``).

The transaction API listens where ``[appservice]`` says, checks the
registration's ``hs_token`` and records what it handled in the gateway's
store; a provisioned device outside the namespace, or a registration others
may read, stops the start with one clear line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq

from comatrix import tap
from comatrix.appservice.registration import Registration, generate


def gateway_config(tmp_path: Path, *, device_user: str = "@comatrix_sensor01:test.local",
                   registration_mode: int = 0o640) -> tuple[Path, Registration]:
    registration = generate("http://127.0.0.1:8010")
    path = tmp_path / "appservice.yaml"
    path.write_text(registration.to_yaml())
    path.chmod(registration_mode)
    state = tmp_path / "state"
    config = tmp_path / "comatrix.toml"
    config.write_text(f'ip = "127.0.0.1"\nport = 0\nhomeserver = "http://127.0.0.1:9"\nstate_dir = "{state}"\n'
                      f'[appservice]\nregistration = "{path}"\nbind = "127.0.0.1"\nport = 0\n'
                      f'[[devices]]\naddress = "127.0.0.5"\nuser = "{device_user}"\nappservice = true\n')
    config.chmod(0o600)
    return config, registration


def make(config: Path) -> Any:
    options = tap.Options()
    options.parseOptions(["--config", str(config)])
    return tap.makeService(options)


@pytest_twisted.ensureDeferred
async def test_the_gateway_serves_the_transaction_api_with_the_registrations_hs_token(
        tmp_path: Path, made_stores: list[Any]) -> None:
    config, registration = gateway_config(tmp_path)
    gateway = make(config)
    try:
        assert gateway.appservice is not None
        host = gateway.appservice.getHost()
        assert host.host == "127.0.0.1"
        base = f"http://127.0.0.1:{host.port}/_matrix/app/v1"

        async def call(method: str, path: str, token: str, body: Any) -> tuple[int, Any]:
            response = await treq.request(method, base + path, data=json.dumps(body).encode(), persistent=False,
                                          headers={"Authorization": [f"Bearer {token}"]})
            return response.code, json.loads(await response.content())

        assert await call("POST", "/ping", registration.hs_token, {}) == (200, {})
        assert (await call("POST", "/ping", registration.as_token, {}))[0] == 403  # the other token is not it
        event = {"event_id": "$e1", "type": "m.room.message", "sender": "@a:test.local", "room_id": "!r",
                 "origin_server_ts": 1, "content": {"body": "x"}}
        assert await call("PUT", "/transactions/t1", registration.hs_token, {"events": [event]}) == (200, {})
        [store] = made_stores
        assert await store.last_appservice_transaction() == "t1"
        assert (await call("GET", "/users/%40comatrix_sensor01%3Atest.local", registration.hs_token, None))[0] == 200
        assert (await call("GET", "/users/%40comatrix_other%3Atest.local", registration.hs_token, None))[0] == 404
    finally:
        await gateway.appservice.stopListening()
        await gateway.port.stopListening()


def test_a_device_user_outside_the_namespace_stops_the_start(tmp_path: Path, made_stores: list[Any]) -> None:
    config, _ = gateway_config(tmp_path, device_user="@sensor01:test.local")
    with pytest.raises(SystemExit, match="not in the appservice namespace @comatrix_"):
        make(config)


def test_a_registration_others_may_read_stops_the_start(tmp_path: Path, made_stores: list[Any]) -> None:
    config, registration = gateway_config(tmp_path, registration_mode=0o644)
    with pytest.raises(SystemExit, match="open to others") as stopped:
        make(config)
    assert registration.as_token not in str(stopped.value) and registration.hs_token not in str(stopped.value)


@pytest_twisted.ensureDeferred
async def test_a_reload_with_a_device_user_outside_the_namespace_is_refused(
        tmp_path: Path, made_stores: list[Any]) -> None:
    config, _ = gateway_config(tmp_path)
    gateway = make(config)
    await gateway.appservice.stopListening()
    await gateway.port.stopListening()
    config.write_text(config.read_text() + '[[devices]]\naddress = "127.0.0.6"\nuser = "@intruder:test.local"\n'
                                           'appservice = true\n')
    assert await gateway.reloader.reload() is None  # refused: the running devices stay
    assert gateway.credentials.appservice_entry("@intruder:test.local") is None
    assert gateway.credentials.appservice_entry("@comatrix_sensor01:test.local") is not None
