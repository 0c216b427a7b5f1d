"""/sync long-polls do not hold slots of the upstream cap: with ``max_upstream = 1`` a send still goes.

The gateway's Matrix client is capped (`LimitedTransport`, here one call at a
time and no queue, so a second concurrent call is refused 5.03 at once).  A
watching compact session and an MSC3079 Observe registration each keep a
/sync hanging on the homeserver; a send must still reach it.  The control
shows the test has teeth: a compact service whose /sync goes through the
capped client (the wiring before the long-poll pool) refuses the send.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import cbor2
import pytest
from treq.testing import StubTreq
from twisted.internet import task

import support.world
from comatrix.coap.numbers import Code, OptionNumber
from comatrix.coap.server import CoapSettings, Site
from comatrix.coap.testing import Harness
from comatrix.compact.service import CompactService
from comatrix.config import build_config
from comatrix.credentials import Credentials
from comatrix.errors import error_response
from comatrix.interfaces import PluginContext
from comatrix.longpoll import STATE_KEY, LongPoller, long_poller
from comatrix.matrix.client import MatrixClient
from comatrix.matrix.testing import FakeHomeserver, ScriptedAnswer, run, stub_transport
from comatrix.plugins import msc3079 as msc3079_plugin
from comatrix.plugins.compact import compact_service
from comatrix.ratelimit import LimitedTransport, UpstreamBusy, UpstreamLimiter
from comatrix.store import RoomRecord, SessionRecord, StoredMessage

SYNC = ("_matrix", "client", "v3", "sync")


class OneRoomStore:
    """The compact service's store with one session that has room handle 0."""

    def __init__(self, room_id: str) -> None:
        self.room_id = room_id

    async def room(self, session_id: int, handle: int) -> RoomRecord | None:
        return RoomRecord(session_id, 0, self.room_id, 0, None) if handle == 0 else None

    async def rooms(self, session_id: int) -> list[RoomRecord]:
        return [RoomRecord(session_id, 0, self.room_id, 0, None)]

    async def append_messages(self, arrivals: Any) -> list[list[StoredMessage]]:
        """A send numbers its own event (cursor 1 here)."""
        return [[dataclasses.replace(message, cursor=1) for message in messages] for _s, _h, messages in arrivals]


class World:
    """A capped gateway context; ``compact``: with the compact store (MSC3079 keeps no state there)."""

    def __init__(self, clock: task.Clock, *, compact: bool = True) -> None:
        self.clock = clock
        self.homeserver = FakeHomeserver()
        user_id = self.homeserver.add_user("d", "pw")
        self.token, device_id = self.homeserver.issue_token(user_id)
        self.room = self.homeserver.new_room(user_id)
        self.session = SessionRecord(1, b"\x00" * 32, self.token, user_id, device_id, "::1")
        self.limiter = UpstreamLimiter(max_active=1, max_queue=0, queue_timeout=5, clock=clock)
        capped = LimitedTransport("https://hs.test.local", reactor=clock, limiter=self.limiter,
                                  http_client=StubTreq(self.homeserver))
        self.matrix = MatrixClient(capped, reactor=clock)
        config = build_config({"limits": {"max_upstream": 1}})
        self.context = PluginContext(config=config, matrix=self.matrix,
                                     credentials=Credentials(config.devices, self.matrix), state={},
                                     reactor=clock,
                                     store=OneRoomStore(self.room) if compact else None)  # type: ignore[arg-type]
        # The gateway's long-poll pool, on the same in-memory homeserver (no sockets).
        transport, _ = stub_transport(self.homeserver, clock, timeout=3600)
        self.context.state[STATE_KEY] = LongPoller(transport, clock)

    def bodies(self) -> list[Any]:
        return [event["content"].get("body") for event in self.homeserver.rooms[self.room]
                if event["type"] == "m.room.message"]


def test_a_watching_compact_session_does_not_block_a_send_with_max_upstream_1() -> None:
    world = World(task.Clock())
    service = compact_service(world.context)  # the plugin's wiring
    assert service.long_polls is long_poller(world.context)
    service.is_observed = lambda session: True
    world.homeserver.script("GET", SYNC, None)  # the session's /sync hangs: a long-poll in progress
    service.watch(world.session)
    assert len(world.homeserver.hanging) == 1 and service.watching(world.session.id)
    assert world.limiter.active == 0  # the long-poll holds no slot of the cap

    run(service.send(world.session, 0, 1, "sent while watching"))
    assert world.bodies()[-1] == "sent while watching"
    service.stop()
    assert world.clock.getDelayedCalls() == []


def test_control_a_sync_through_the_capped_client_would_block_the_send() -> None:
    world = World(task.Clock())
    service = CompactService(world.matrix, world.context.store, world.clock)  # type: ignore[arg-type]
    service.is_observed = lambda session: True
    world.homeserver.script("GET", SYNC, None)
    service.watch(world.session)
    assert world.limiter.active == 1
    with pytest.raises(UpstreamBusy):
        run(service.send(world.session, 0, 1, "never sent"))
    assert "never sent" not in world.bodies()
    service.stop()
    assert world.limiter.active == 0


def test_an_msc3079_sync_observation_does_not_block_a_send_with_max_upstream_1() -> None:
    site = Site(error_response)
    harness = Harness(site, CoapSettings(), understood_options=frozenset({256, 257}))
    world = World(harness.clock, compact=False)
    for path, resource in msc3079_plugin.msc3079.build_routes(world.context):
        site.put(path, resource)
    world.homeserver.script("GET", SYNC, ScriptedAnswer(200, b'{"next_batch": "s0"}',
                                                        {"Content-Type": "application/json"}))
    world.homeserver.script("GET", SYNC, None)  # the loop's long-poll hangs
    [registered] = harness.send(Code.GET, ("7",), token=b"\x42",
                                options=[(OptionNumber.OBSERVE, b""), (256, world.token.encode())])
    assert registered.code == Code.CONTENT
    harness.advance(0)  # the observation's loop starts
    assert len(world.homeserver.hanging) == 1 and world.limiter.active == 0

    body = cbor2.dumps({28: "m.text", 27: "sent while observing"})
    [sent] = harness.send(Code.PUT, ("9", world.room, "m.room.message", "t1"), token=b"\x43", payload=body,
                          options=[(OptionNumber.CONTENT_FORMAT, b"\x3c")])  # the token is sticky
    assert sent.code == Code.CHANGED
    assert world.bodies()[-1] == "sent while observing"
    world.context.state["msc3079"].shutdown()
    assert world.context.state["msc3079"].loops == {}


def test_long_polls_connect_within_the_gateways_connect_timeout() -> None:
    # A homeserver host that is down must show as "unreachable" to the sync loops too, after
    # the gateway's connect timeout -- not after the long-poll transport's hour-long backstop.
    context = support.world.World().context()
    context.matrix.transport.connect_timeout = 1.5
    poller = long_poller(context)
    assert poller.transport.connect_timeout == 1.5
    assert poller.transport.timeout > 1.5
