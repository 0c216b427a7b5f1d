"""Compact sessions against the real Synapse: a cap per device, and idle expiry that logs out.

Each compact session is a Matrix device.  Over ``[limits] max_sessions_per_device``
a login is refused before the gateway logs in, so Synapse gains no device; a
session unused for ``session_idle_timeout`` is closed by the gateway, which logs its
Matrix device out (the token answers 401, the device is gone from the account) --
also when it idled out while the gateway was stopped.  Distinct 127.0.0.x source
addresses stand in for distinct devices.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from typing import Any, Callable

import pytest

from comatrix.client import CoapResponseError, CompactDevice, DeviceState, UdpCoap
from comatrix.coap.numbers import Code, OptionNumber
from comatrix.store import DB_FILENAME
from support.gateway import GatewayProcess
from support.secrets import remember
from support.synapse import MatrixUser, SynapseServer

pytestmark = pytest.mark.integration

#: Rate limits are not under test here.
NO_RATE_LIMITS = "[limits]\ndevice_rate = 0\nglobal_rate = 0\n"
#: Bound of every wait for the gateway's sweep (it runs every quarter of the idle timeout).
SWEEP_DEADLINE = 30.0


def matrix_devices(synapse: SynapseServer, user: MatrixUser) -> set[str]:
    return {device["device_id"] for device in synapse.request("GET", "/_matrix/client/v3/devices",
                                                              token=user.access_token)["devices"]}


def stored_sessions(gateway: GatewayProcess) -> list[tuple[str, str]]:
    """(Matrix access token, device id) of every session in the gateway's store."""
    database = gateway.state_dir / DB_FILENAME
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT access_token, device_id FROM compact_sessions").fetchall()
    return [(remember(token), device_id) for token, device_id in rows]


def token_status(synapse: SynapseServer, token: str) -> int:
    status, _ = synapse.request_raw("GET", "/_matrix/client/v3/account/whoami", token=token)
    return status


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SWEEP_DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {SWEEP_DEADLINE} s: {what}")
        time.sleep(0.2)


def device_at(gateway: GatewayProcess, source: str) -> CompactDevice:
    return CompactDevice(UdpCoap(gateway.uri(), source=source), DeviceState(None))


def test_a_device_over_its_share_is_refused_and_synapse_gains_no_device(
        make_gateway: Callable[..., GatewayProcess], synapse: SynapseServer,
        synapse_user: Callable[..., MatrixUser]) -> None:
    gw = make_gateway(config_text=NO_RATE_LIMITS + "max_sessions_per_device = 2\n")
    user = synapse_user("capped")
    before = matrix_devices(synapse, user)
    device = device_at(gw, "127.0.0.21")
    device.login(user.localpart, user.password)
    device.login(user.localpart, user.password)
    with pytest.raises(CoapResponseError) as refused:
        device.login(user.localpart, user.password)
    reply: Any = refused.value.reply
    assert reply.code == Code.TOO_MANY_REQUESTS
    max_age = dict(reply.options).get(OptionNumber.MAX_AGE)
    assert max_age is not None and int.from_bytes(max_age, "big") >= 1
    assert len(matrix_devices(synapse, user) - before) == 2  # the refused login made no Matrix device

    other = device_at(gw, "127.0.0.22")  # another device has a share of its own
    other.login(user.localpart, user.password)
    assert len(matrix_devices(synapse, user) - before) == 3
    gw.remember_stored_tokens()


def test_an_idle_session_is_closed_and_its_matrix_device_logged_out(
        make_gateway: Callable[..., GatewayProcess], synapse: SynapseServer,
        synapse_user: Callable[..., MatrixUser]) -> None:
    gw = make_gateway(config_text=NO_RATE_LIMITS + "session_idle_timeout = 3\n")
    user = synapse_user("idle")
    room_id = synapse.create_room(user.access_token)
    idle = device_at(gw, "127.0.0.23")
    idle.login(user.localpart, user.password)
    [(token, device_id)] = stored_sessions(gw)
    assert token_status(synapse, token) == 200 and device_id in matrix_devices(synapse, user)

    wait_until(lambda: token_status(synapse, token) == 401, "the idle session's token is logged out")
    assert device_id not in matrix_devices(synapse, user)
    wait_until(lambda: stored_sessions(gw) == [], "the idle session is deleted")
    with pytest.raises(CoapResponseError) as gone:
        idle.join(room_id)
    assert gone.value.reply.code == Code.UNAUTHORIZED


def test_a_session_that_idled_out_while_the_gateway_was_stopped_is_closed_at_start(
        make_gateway: Callable[..., GatewayProcess], synapse: SynapseServer,
        synapse_user: Callable[..., MatrixUser]) -> None:
    gw = make_gateway(config_text=NO_RATE_LIMITS + "session_idle_timeout = 3600\n")
    user = synapse_user("asleep")
    device_at(gw, "127.0.0.24").login(user.localpart, user.password)
    [(token, device_id)] = stored_sessions(gw)
    gw.stop()
    # Two hours pass while the gateway is stopped: its store says so (no waiting for it).
    database = gw.state_dir / DB_FILENAME
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.execute("UPDATE compact_sessions SET last_used = last_used - 7200")
        db.commit()
    assert token_status(synapse, token) == 200
    gw.start()
    wait_until(lambda: token_status(synapse, token) == 401, "the session is logged out at start")
    assert device_id not in matrix_devices(synapse, user)
