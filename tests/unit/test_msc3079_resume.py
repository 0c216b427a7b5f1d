"""Resume points of MSC3079 /sync observations: in SQLite, and how registrations use them.

The store part runs on a real SQLite file (adbapi thread, real reactor).  The
service part drives the real CoAP layer (Harness) with a scripted long-poll
transport and checks which ``since`` each registration's /sync asks for: an
identical re-registration continues from the last *acknowledged* batch; a new
CoAP token, the client's own ``since``, ``full_state=true``, a deregistration,
a logout or a refused token do not resume.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import task

from comatrix.coap import wire
from comatrix.coap.numbers import Code, MessageType, OptionNumber
from comatrix.coap.server import CoapSettings, Site
from comatrix.coap.testing import Harness
from comatrix.config import build_config
from comatrix.credentials import Credentials
from comatrix.errors import error_response
from comatrix.interfaces import PluginContext
from comatrix.matrix.client import MatrixClient
from comatrix.matrix.errors import MatrixError
from comatrix.matrix.testing import FakeHomeserver, stub_transport
from comatrix.msc3079.resume import ResumePoints, registration_fingerprint
from comatrix.msc3079.service import Msc3079Service
from comatrix.plugins import msc3079 as msc3079_plugin
from comatrix.store import DB_FILENAME, Store, SyncPosition
from support.scripted_sync import ScriptedSync

PEER = ("2001:db8::7", 5683)
NEWS = {"rooms": {"join": {"!r": {"timeline": {"events": [{"type": "m.room.message"}]}}}}}


def batch(name: str) -> dict[str, Any]:
    return {"next_batch": name, **NEWS}


# -- the store ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sync_positions_persist_bounded_and_without_the_token(tmp_path: Path) -> None:
    token_hash = hashlib.sha256(b"syt_very_secret").digest()
    store = Store.for_state_dir(str(tmp_path))
    try:
        assert await store.sync_position(token_hash, b"\x42") is None
        await store.save_sync_position(token_hash, b"\x42", SyncPosition(b"reg", "s1"), 1.0)
        await store.save_sync_position(token_hash, b"\x42", SyncPosition(b"reg", "s2"), 2.0)  # replaces
        await store.save_sync_position(token_hash, b"\x43", SyncPosition(b"other", "t1"), 3.0)
    finally:
        store.close()
    assert b"syt_very_secret" not in (tmp_path / DB_FILENAME).read_bytes()

    store = Store.for_state_dir(str(tmp_path))  # a restart
    try:
        assert await store.sync_position(token_hash, b"\x42") == SyncPosition(b"reg", "s2")
        assert await store.sync_position(token_hash, b"\x43") == SyncPosition(b"other", "t1")
        # Bounded: beyond `keep` the least recently saved go.
        for n in range(4):
            await store.save_sync_position(token_hash, bytes([n]), SyncPosition(b"r", f"p{n}"), 10.0 + n, keep=3)
        assert await store.sync_position(token_hash, b"\x42") is None
        assert await store.sync_position(token_hash, b"\x00") is None
        assert await store.sync_position(token_hash, b"\x03") == SyncPosition(b"r", "p3")
        await store.forget_sync_positions(token_hash, b"\x03")
        assert await store.sync_position(token_hash, b"\x03") is None
        assert await store.sync_position(token_hash, b"\x02") is not None
        await store.forget_sync_positions(token_hash)
        assert await store.sync_position(token_hash, b"\x01") is None
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_resume_points_match_only_the_same_registration(tmp_path: Path) -> None:
    store = Store.for_state_dir(str(tmp_path))
    try:
        points = ResumePoints(store, task.Clock())
        plain = registration_fingerprint([("timeout", "30000")])
        assert plain == registration_fingerprint([])  # the timeout is not part of a registration
        assert plain != registration_fingerprint([("since", "s0")])
        await points.delivered("tok", b"\x42", plain, "s5")
        assert await points.resume_from("tok", b"\x42", plain) == "s5"
        assert await points.resume_from("tok", b"\x42", registration_fingerprint([("since", "s0")])) is None
        assert await points.resume_from("other", b"\x42", plain) is None
        await points.forget("tok")
        assert await points.resume_from("tok", b"\x42", plain) is None
    finally:
        store.close()


# -- registrations --------------------------------------------------------------------------


class Gateway:
    """MSC3079 on the real CoAP layer; /sync goes to a `ScriptedSync`, the rest to a fake homeserver."""

    def __init__(self) -> None:
        self.site = Site(error_response)
        self.h = Harness(self.site, CoapSettings(), understood_options=frozenset({256, 257}))
        clock = self.h.clock
        self.homeserver = FakeHomeserver()
        self.token, _ = self.homeserver.issue_token(self.homeserver.add_user("d", "pw"))
        transport, _ = stub_transport(self.homeserver, clock)
        matrix = MatrixClient(transport, reactor=clock)
        config = build_config({})
        context = PluginContext(config=config, matrix=matrix, credentials=Credentials(config.devices, matrix),
                                state={}, reactor=clock)
        self.sync = ScriptedSync(clock)
        self.service = Msc3079Service(context, long_poll=self.sync)  # type: ignore[arg-type]
        context.state["msc3079"] = self.service
        for path, resource in msc3079_plugin.msc3079.build_routes(context):
            self.site.put(path, resource)

    def register(self, answer: Any, coap_token: bytes = b"\x42", query: tuple[str, ...] = ()) -> str | None:
        """An Observe registration whose /sync gets ``answer``; the ``since`` that /sync asked for."""
        self.sync.outcomes.append(answer)
        calls = len(self.sync.calls)
        [reply] = self.h.send(Code.GET, ("7",), token=coap_token, peer=PEER, query=query,
                              options=[(OptionNumber.OBSERVE, b""), (256, self.token.encode())])
        assert reply.code == Code.CONTENT, reply
        self.h.advance(0)  # the loop starts and long-polls
        return self.sync.since()[calls]

    def push(self, answer: dict[str, Any]) -> wire.Datagram:
        """The loop's hanging long-poll gets ``answer``; the CON notification it pushes."""
        self.sync.answer(answer)
        [notification] = self.h.replies()
        assert notification.mtype == MessageType.CON and notification.code == Code.CONTENT
        return notification

    def ack(self, notification: wire.Datagram) -> None:
        self.h.send_raw(wire.empty(MessageType.ACK, notification.mid), PEER)

    def rst(self, notification: wire.Datagram) -> None:
        self.h.send_raw(wire.empty(MessageType.RST, notification.mid), PEER)


def test_an_identical_re_registration_resumes_from_the_last_acknowledged_batch() -> None:
    gw = Gateway()
    assert gw.register({"next_batch": "s0"}) is None  # an initial sync, as asked
    assert gw.sync.since()[-1] == "s0"
    gw.ack(gw.push(batch("s1")))
    assert gw.sync.since()[-1] == "s1"
    gw.push(batch("s2"))  # not acknowledged (yet): it does not count
    # The client repeats its registration (RFC 7641 re-registration, or after a gateway restart):
    assert gw.register({"next_batch": "s3"}) == "s1"
    assert gw.sync.since()[-1] == "s3" and len(gw.service.loops) == 1
    # Another CoAP token is another observation; the client's own since is served as asked.
    assert gw.register({"next_batch": "s3"}, coap_token=b"\x43") is None
    assert gw.register({"next_batch": "s3"}, coap_token=b"\x44", query=("since=s0",)) == "s0"
    # full_state=true asks for everything: never resumed.
    assert gw.register({"next_batch": "s3"}, query=("full_state=true",)) is None


def test_an_unacknowledged_batch_does_not_move_the_resume_point() -> None:
    gw = Gateway()
    gw.register({"next_batch": "s0"})
    gw.rst(gw.push(batch("s1")))  # the client rejects it: the observation ends, nothing was delivered
    assert gw.service.loops == {}
    assert gw.register({"next_batch": "s1"}) is None


def test_deregistration_logout_and_a_refused_token_drop_the_resume_point() -> None:
    gw = Gateway()
    gw.register({"next_batch": "s0"})
    gw.ack(gw.push(batch("s1")))
    gw.sync.outcomes.append({"next_batch": "s1"})  # a deregistration is answered as a plain /sync
    [answer] = gw.h.send(Code.GET, ("7",), token=b"\x42", peer=PEER, options=[(OptionNumber.OBSERVE, b"\x01")])
    assert answer.code == Code.CONTENT and gw.service.loops == {}
    assert gw.register({"next_batch": "s2"}) is None  # deregistered: a fresh observation

    gw.ack(gw.push(batch("s3")))
    assert gw.register({"next_batch": "s4"}) == "s3"
    gw.ack(gw.push(batch("s5")))
    gw.sync.answer(MatrixError(401, "M_UNKNOWN_TOKEN", "gone"))  # the token died: the loop ends
    [error] = gw.h.replies()
    assert error.code == Code.UNAUTHORIZED
    gw.ack(error)
    assert gw.service.loops == {}
    assert gw.register({"next_batch": "s6"}) is None

    gw.ack(gw.push(batch("s7")))
    [logged_out] = gw.h.send(Code.POST, ("3",), token=b"\x50", peer=PEER)  # sticky token: this device
    assert logged_out.code == Code.CHANGED
    assert gw.register({"next_batch": "s8"}) is None


def test_a_resume_point_the_homeserver_refuses_falls_back_to_the_request() -> None:
    gw = Gateway()
    gw.register({"next_batch": "s0"})
    gw.ack(gw.push(batch("s1")))
    gw.sync.outcomes.append(MatrixError(400, "M_INVALID_PARAM", "unknown since"))
    assert gw.register({"next_batch": "s9"}) == "s1"
    assert gw.sync.since()[-2:] == [None, "s9"]  # served as asked, then the loop goes on
    assert gw.register({"next_batch": "s10"}) is None  # and the refused point is gone
