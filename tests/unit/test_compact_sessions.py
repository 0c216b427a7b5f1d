"""Compact sessions are a bounded resource: a cap per device and in total, and idle expiry.

Each session is a Matrix device on the homeserver.  A login over a cap is refused
before the homeserver is asked (so no Matrix device is made); a session unused for
``[limits] session_idle_timeout`` is closed and its Matrix device logged out.
The sites run through the real CoAP layer on a `Clock`, with the real store's SQL
(in memory) and the in-repo fake homeserver.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import cbor2
import pytest_twisted

from comatrix import longpoll
from comatrix.coap import wire
from comatrix.coap.errors import decode_uint
from comatrix.coap.numbers import Code, OptionNumber
from comatrix.coap.testing import Harness, option
from comatrix.compact.service import CompactService
from comatrix.config import build_config
from comatrix.discovery import build_site
from comatrix.errors import error_response
from comatrix.matrix.testing import ScriptedAnswer, stub_transport
from comatrix.plugins.compact import STATE_KEY
from comatrix.store import Store

import support.world
from test_bad_input_profiles import CBOR, COMPACT_PLUGINS, CF, MemoryStore

LOGIN = ("_matrix", "client", "v3", "login")
LOGOUT = ("_matrix", "client", "v3", "logout")
DEVICE_A, DEVICE_B, DEVICE_C = ("2001:db8::a", 5683), ("2001:db8::b", 5683), ("2001:db8::c", 5683)


class SessionWorld(support.world.World):
    """A compact site whose ``[limits]`` are ``limits``; user ``@d`` (password ``pw``)."""

    def __init__(self, **limits: Any) -> None:
        super().__init__()
        context = dataclasses.replace(self.context(), config=build_config({"limits": limits}), store=MemoryStore())
        transport, _ = stub_transport(self.homeserver, context.reactor)
        context.state[longpoll.STATE_KEY] = longpoll.LongPoller(transport, context.reactor)
        self.harness = Harness(build_site(COMPACT_PLUGINS, context, error_response))
        self.clock = self.harness.clock = context.reactor
        self.service: CompactService = context.state[STATE_KEY]

    def send(self, path: str, body: Any, peer: Any) -> wire.Datagram:
        [reply] = self.harness.send(Code.POST, (path,), payload=cbor2.dumps(body), peer=peer,
                                    options=[(CF, bytes([CBOR]))])
        return reply

    def login(self, peer: Any) -> wire.Datagram:
        return self.send("+", ["d", "pw"], peer)

    def handle(self, peer: Any) -> bytes:
        reply = self.login(peer)
        assert reply.code == Code.CREATED, reply
        handle: bytes = cbor2.loads(reply.payload)
        return handle

    def logins(self) -> int:
        return len(self.homeserver.calls("login"))


def max_age(reply: wire.Datagram) -> int:
    return decode_uint(option(reply, OptionNumber.MAX_AGE) or b"")


# ---------------------------------------------------------------- caps


def test_a_device_over_its_share_is_refused_before_the_homeserver_login() -> None:
    world = SessionWorld(max_sessions_per_device=2, session_idle_timeout=3600)
    first = world.handle(DEVICE_A)
    world.clock.advance(100)
    world.handle(DEVICE_A)
    tokens = len(world.homeserver.tokens)
    refused = world.login(DEVICE_A)
    assert refused.code == Code.TOO_MANY_REQUESTS
    assert max_age(refused) == 3600 - 100  # when its least recently used session would idle out
    assert world.logins() == 2 and len(world.homeserver.tokens) == tokens  # no Matrix device made
    assert world.login(("2001:db8::a", 6000)).code == Code.TOO_MANY_REQUESTS  # same device, other port

    assert world.login(DEVICE_B).code == Code.CREATED  # another device has its own share
    assert world.send("-", [first], DEVICE_A).code == Code.CHANGED  # a logout frees a place
    assert world.login(DEVICE_A).code == Code.CREATED


def test_all_sessions_together_are_capped_too() -> None:
    world = SessionWorld(max_sessions_per_device=2, max_sessions=2)
    world.handle(DEVICE_A)
    world.handle(DEVICE_B)
    refused = world.login(DEVICE_C)
    assert refused.code == Code.SERVICE_UNAVAILABLE and max_age(refused) >= 1
    assert world.logins() == 2


def test_concurrent_logins_of_one_device_cannot_both_slip_under_the_cap() -> None:
    world = SessionWorld(max_sessions_per_device=1)
    world.homeserver.script("POST", LOGIN, None)  # the first login is still with the homeserver
    assert world.harness.send(Code.POST, ("+",), payload=cbor2.dumps(["d", "pw"]), peer=DEVICE_A,
                              options=[(CF, bytes([CBOR]))]) == []
    assert world.login(DEVICE_A).code == Code.TOO_MANY_REQUESTS
    assert world.logins() == 1


# ---------------------------------------------------------------- idle expiry


def test_an_idle_session_is_closed_and_its_matrix_device_logged_out() -> None:
    world = SessionWorld(session_idle_timeout=100)
    world.service.start_expiry()  # sweeps at once, then every 25 s (a quarter of the timeout)
    idle, used = world.handle(DEVICE_A), world.handle(DEVICE_B)
    idle_token, used_token = list(world.homeserver.tokens)[-2:]
    for _ in range(8):  # DEVICE_B keeps using its session; DEVICE_A does not
        world.clock.advance(20)
        assert world.send("x", [used, world.alias], DEVICE_B).code == Code.CHANGED
    assert world.clock.seconds() - 1_700_000_000 == 160

    logouts = world.homeserver.calls("logout")
    assert [r.headers[b"Authorization"] for r in logouts] == [[f"Bearer {idle_token}".encode()]]
    assert idle_token not in world.homeserver.tokens and used_token in world.homeserver.tokens
    assert world.send("x", [idle, world.alias], DEVICE_A).code == Code.UNAUTHORIZED  # the handle is gone
    assert world.send("x", [used, world.alias], DEVICE_B).code == Code.CHANGED
    world.service.stop()
    assert world.clock.getDelayedCalls() == []


def test_a_logout_the_homeserver_fails_keeps_the_session_for_the_next_sweep() -> None:
    world = SessionWorld(session_idle_timeout=100)
    handle = world.handle(DEVICE_A)
    world.clock.advance(101)
    world.homeserver.script("POST", LOGOUT, ScriptedAnswer(502, b"bad gateway"))
    world.service.start_expiry()
    assert len(world.homeserver.calls("logout")) == 1
    assert world.send("x", [handle, world.alias], DEVICE_A).code == Code.CHANGED  # kept (and now used again)
    world.clock.advance(101 + 25)
    assert len(world.homeserver.calls("logout")) == 2
    assert world.send("x", [handle, world.alias], DEVICE_A).code == Code.UNAUTHORIZED
    world.service.stop()


def test_a_session_that_idled_out_while_the_gateway_was_down_is_closed_at_start() -> None:
    world = SessionWorld(session_idle_timeout=100)
    world.handle(DEVICE_A)
    world.clock.advance(3600)  # the gateway was stopped: nothing swept
    assert world.homeserver.calls("logout") == []
    world.service.start_expiry()
    assert len(world.homeserver.calls("logout")) == 1
    world.service.stop()


def test_a_watched_session_counts_as_used() -> None:
    world = SessionWorld(session_idle_timeout=100)
    handle = world.handle(DEVICE_A)
    assert world.send("x", [handle, world.alias], DEVICE_A).code == Code.CHANGED
    world.homeserver.script("GET", ("_matrix", "client", "v3", "sync"), None)  # the loop's /sync hangs
    [observed] = world.harness.send(Code.FETCH, ("v",), payload=cbor2.dumps([handle, 0]), peer=DEVICE_A,
                                    options=[(OptionNumber.OBSERVE, b""), (CF, bytes([CBOR]))])
    assert option(observed, OptionNumber.OBSERVE) is not None
    world.service.start_expiry()
    world.clock.advance(250)  # the device only listens
    assert world.homeserver.calls("logout") == []
    world.service.stop()


# ---------------------------------------------------------------- existing databases


def _old_database(path: Path) -> None:
    """A state database as the previous release made it (no device key, no last use)."""
    path.parent.mkdir(mode=0o700)
    connection = sqlite3.connect(path)
    connection.execute("""CREATE TABLE compact_sessions (id INTEGER PRIMARY KEY AUTOINCREMENT,
        handle_hash BLOB NOT NULL UNIQUE, access_token TEXT NOT NULL, user_id TEXT NOT NULL, device_id TEXT,
        peer_host TEXT NOT NULL, created REAL NOT NULL)""")
    connection.execute("INSERT INTO compact_sessions (handle_hash, access_token, user_id, device_id, peer_host,"
                       " created) VALUES (?, 'syt_old', '@d:test.local', 'OLD', 'fe80::1%lowpan0', 50.0)",
                       (hashlib.sha256(b"old").digest(),))
    connection.commit()
    connection.close()
    path.chmod(0o600)


@pytest_twisted.ensureDeferred
async def test_a_database_of_the_previous_release_keeps_working(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    _old_database(state_dir / "comatrix.sqlite3")
    store = Store.for_state_dir(str(state_dir))
    try:
        record = await store.session_by_handle(hashlib.sha256(b"old").digest())
        assert record is not None and record.device_id == "OLD"
        usage = await store.session_usage("a:fe80::1")  # keyed on its address, as plain CoAP devices are
        assert (usage.device, usage.device_oldest, usage.total) == (1, 50.0, 1)  # last used: when made
        assert [s.id for s in await store.idle_sessions(51.0, 10)] == [record.id]
        await store.touch_session(record.id, 60.0)
    finally:
        store.close()
    reopened = Store.for_state_dir(str(state_dir))  # migrated already: nothing is backfilled again
    try:
        assert (await reopened.session_usage("a:fe80::1")).device_oldest == 60.0
        assert await reopened.idle_sessions(51.0, 10) == []
    finally:
        reopened.close()
