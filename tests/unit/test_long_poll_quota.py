"""Long-poll quotas (`comatrix.longpoll.LongPollQuota`): per device and in total, sized under the
open-file limit; a plain MSC3079 /7 long-poll, an MSC3079 Observe loop and a compact watch each
hold one slot of their device, and a long-poll beyond a share is answered at once with Max-Age."""

from __future__ import annotations

import resource
from typing import Any

import pytest
from twisted.internet import task

from comatrix.coap.errors import ServiceUnavailable, TooManyRequests, decode_uint
from comatrix.coap.message import Peer, Request
from comatrix.coap.numbers import Code, OptionNumber
from comatrix.coap.server import CoapSettings, Site
from comatrix.coap.testing import Harness, option
from comatrix.compact.service import CompactService
from comatrix.config import ConfigError, build_config
from comatrix.credentials import Credentials
from comatrix.errors import error_response
from comatrix.identity import Device, acting_for
from comatrix.interfaces import PluginContext
from comatrix.longpoll import (FD_RESERVE, FD_SHARE, LONG_POLL_RETRY_AFTER, STATE_KEY, LongPoller,
                               LongPollQuota, open_file_limit)
from comatrix.matrix.client import MatrixClient
from comatrix.matrix.testing import FakeHomeserver, ScriptedAnswer, stub_transport
from comatrix.plugins import msc3079 as msc3079_plugin
from comatrix.store import RoomRecord, SessionRecord

SYNC = ("_matrix", "client", "v3", "sync")
A, B, C = ("2001:db8::a", 40000), ("2001:db8::b", 40000), ("2001:db8::c", 40000)


def device(n: int) -> Device:
    return Device(key=f"a:10.0.0.{n}", address=f"10.0.0.{n}")


# -- the quota itself ----------------------------------------------------------------------


def test_a_device_gets_its_share_and_the_total_is_shared() -> None:
    quota = LongPollQuota(per_device=2, total=3)
    first, second = quota.lease(device(1)), quota.lease(device(1))
    with pytest.raises(TooManyRequests) as over_share:
        quota.lease(device(1))
    answer = over_share.value.to_response()
    assert answer.code == Code.TOO_MANY_REQUESTS and answer.max_age == LONG_POLL_RETRY_AFTER
    other = quota.lease(device(2))  # the greedy device did not take another's share
    with pytest.raises(ServiceUnavailable) as full:
        quota.lease(device(3))
    answer = full.value.to_response()
    assert answer.code == Code.SERVICE_UNAVAILABLE and answer.max_age == LONG_POLL_RETRY_AFTER
    with pytest.raises(ServiceUnavailable):
        quota.lease(None)  # the gateway's own long-polls count against the total
    first.release()
    first.release()  # idempotent
    assert quota.in_use == 2 and quota.held_by(device(1).key) == 1
    quota.lease(device(3))
    second.release()
    other.release()
    assert quota._held == {device(3).key: 1}  # only devices holding long-polls are in the table


def test_the_total_is_sized_under_the_open_file_limit() -> None:
    config = build_config({"limits": {"max_long_polls": 1000, "long_polls_per_device": 4}})
    client = max(config.max_connections, config.limits.max_upstream)
    sized = LongPollQuota.for_process(config, 1024)
    assert sized.total == int(1024 * FD_SHARE) - FD_RESERVE - client
    assert sized.total + client + FD_RESERVE <= 0.8 * 1024 and sized.per_device == 4
    assert LongPollQuota.for_process(config, None).total == 1000  # no limit: as configured
    assert LongPollQuota.for_process(build_config({}), 65536).total == 256  # the default fits
    tiny = LongPollQuota.for_process(config, 64)
    assert (tiny.total, tiny.per_device) == (1, 1)  # never nothing at all, never share > total
    assert open_file_limit() in (resource.getrlimit(resource.RLIMIT_NOFILE)[0], None)


def test_config_keys_are_checked() -> None:
    limits = build_config({"limits": {"long_polls_per_device": 2, "max_long_polls": 50}}).limits
    assert (limits.long_polls_per_device, limits.max_long_polls) == (2, 50)
    for bad in ({"long_polls_per_device": 0}, {"long_polls_per_device": 9, "max_long_polls": 8},
                {"max_long_polls": 1.5}):
        with pytest.raises(ConfigError):
            build_config({"limits": bad})


# -- MSC3079 through the CoAP layer -----------------------------------------------------------


class Msc3079Gateway:
    """The MSC3079 resources on a harness, their long-polls on an in-memory homeserver."""

    def __init__(self, quota: LongPollQuota, settings: CoapSettings = CoapSettings()) -> None:
        self.site = Site(error_response)
        self.harness = Harness(self.site, settings, understood_options=frozenset({256, 257}))
        self.homeserver = FakeHomeserver()
        self.token, _ = self.homeserver.issue_token(self.homeserver.add_user("d", "pw"))
        transport, self.stub = stub_transport(self.homeserver, self.harness.clock, timeout=3600)
        matrix = MatrixClient(transport, reactor=self.harness.clock)
        config = build_config({})
        self.context = PluginContext(config=config, matrix=matrix, credentials=Credentials((), matrix),
                                     state={}, reactor=self.harness.clock)
        self.quota = quota
        self.context.state[STATE_KEY] = LongPoller(transport, self.harness.clock, quota)
        for path, resource_ in msc3079_plugin.msc3079.build_routes(self.context):
            self.site.put(path, resource_)
        self._tokens = iter(range(1, 10_000))

    def long_poll(self, peer: Any) -> list[Any]:
        """GET /7?timeout=30000&since=s0 with the token; the datagrams the gateway sent at once."""
        return self.harness.send(Code.GET, ("7",), token=next(self._tokens).to_bytes(2, "big"),
                                 query=("timeout=30000", "since=s0"),
                                 options=[(256, self.token.encode())], peer=peer)

    def answer_first_hanging(self) -> None:
        request = self.homeserver.hanging.pop(0)
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"application/json")
        request.write(b'{"next_batch": "s1"}')
        request.finish()
        self.stub.flush()


def refused(datagrams: list[Any], code: Code) -> bytes:
    [answer] = datagrams
    assert answer.code == code
    assert decode_uint(option(answer, OptionNumber.MAX_AGE) or b"") == LONG_POLL_RETRY_AFTER
    return bytes(answer.payload)


def test_plain_long_polls_beyond_the_share_or_the_total_are_answered_at_once() -> None:
    gateway = Msc3079Gateway(LongPollQuota(per_device=2, total=3))
    for _ in range(4):
        gateway.homeserver.script("GET", SYNC, None)  # every long-poll that gets through hangs
    assert gateway.long_poll(A) == [] and gateway.long_poll(A) == []
    assert len(gateway.homeserver.hanging) == 2
    for _ in range(50):
        assert refused(gateway.long_poll(A), Code.TOO_MANY_REQUESTS) == b"too many long-polls of this device"
    assert len(gateway.homeserver.hanging) == 2  # none of them reached the homeserver
    assert gateway.long_poll(B) == []  # another device still gets its long-poll
    assert refused(gateway.long_poll(C), Code.SERVICE_UNAVAILABLE) == b"too many long-polls"
    gateway.answer_first_hanging()
    answered = [d for d in gateway.harness.replies() if d.code == Code.CONTENT]
    assert len(answered) == 1 and gateway.quota.in_use == 2  # the slot came back with the answer
    assert gateway.long_poll(A) == [] and len(gateway.homeserver.hanging) == 3


def test_an_observe_loop_holds_a_slot_of_its_device_until_it_ends() -> None:
    gateway = Msc3079Gateway(LongPollQuota(per_device=1, total=4))
    gateway.homeserver.script("GET", SYNC, ScriptedAnswer(200, b'{"next_batch": "s0"}',
                                                          {"Content-Type": "application/json"}))
    gateway.homeserver.script("GET", SYNC, None)  # the loop's long-poll hangs
    [registered] = gateway.harness.send(Code.GET, ("7",), token=b"\x42", peer=A,
                                        options=[(OptionNumber.OBSERVE, b""), (256, gateway.token.encode())])
    assert registered.code == Code.CONTENT
    gateway.harness.advance(0)
    assert len(gateway.homeserver.hanging) == 1 and gateway.quota.held_by("a:2001:db8::a") == 1
    refused(gateway.long_poll(A), Code.TOO_MANY_REQUESTS)
    [second] = gateway.harness.send(Code.GET, ("7",), token=b"\x43", peer=A,
                                    options=[(OptionNumber.OBSERVE, b""), (256, gateway.token.encode())])
    assert second.code == Code.TOO_MANY_REQUESTS  # a second observation needs a second slot
    gateway.context.state["msc3079"].shutdown()
    assert gateway.quota.in_use == 0


# -- compact watches -------------------------------------------------------------------------


class OneRoomStore:
    async def room(self, session_id: int, handle: int) -> RoomRecord | None:
        return RoomRecord(session_id, 0, "!r:test.local", 0, None) if handle == 0 else None

    async def rooms(self, session_id: int) -> list[RoomRecord]:
        return [RoomRecord(session_id, 0, "!r:test.local", 0, None)]


def fetch_from(peer: tuple[str, int]) -> Request:
    return Request(method=Code.FETCH, path=("m",), peer=Peer(*peer))


def test_a_compact_watch_holds_a_slot_of_the_device_that_started_it() -> None:
    clock = task.Clock()
    homeserver = FakeHomeserver()
    user_id = homeserver.add_user("d", "pw")
    token, device_id = homeserver.issue_token(user_id)
    transport, _ = stub_transport(homeserver, clock, timeout=3600)
    quota = LongPollQuota(per_device=1, total=2)
    service = CompactService(MatrixClient(transport, reactor=clock), OneRoomStore(),  # type: ignore[arg-type]
                             clock, long_polls=LongPoller(transport, clock, quota))
    service.is_observed = lambda session: True
    sessions = [SessionRecord(n, bytes([n]) * 32, token, user_id, device_id, "::1") for n in (1, 2, 3)]
    for _ in range(3):
        homeserver.script("GET", SYNC, None)
    with acting_for(fetch_from(A)):
        service.watch(sessions[0])
        service.watch(sessions[0])  # its loop runs already: no second slot
        with pytest.raises(TooManyRequests):
            service.watch(sessions[1])
    assert not service.watching(sessions[1].id)
    with acting_for(fetch_from(B)):
        service.watch(sessions[1])
    with acting_for(fetch_from(C)), pytest.raises(ServiceUnavailable):
        service.watch(sessions[2])
    assert quota.in_use == 2 and len(homeserver.hanging) == 2
    service.stop()
    assert quota.in_use == 0


def test_an_observe_loop_the_coap_layer_did_not_register_gives_its_slot_back() -> None:
    gateway = Msc3079Gateway(LongPollQuota(per_device=1, total=4), CoapSettings(max_observers=0))
    gateway.homeserver.script("GET", SYNC, ScriptedAnswer(200, b'{"next_batch": "s0"}',
                                                          {"Content-Type": "application/json"}))
    gateway.harness.send(Code.GET, ("7",), token=b"\x42", peer=A,
                         options=[(OptionNumber.OBSERVE, b""), (256, gateway.token.encode())])
    gateway.harness.advance(0)  # the loop starts, finds no observation, and ends
    assert gateway.quota.in_use == 0 and gateway.context.state["msc3079"].loops == {}
    assert len(gateway.homeserver.calls("sync")) == 1  # the registration's own /sync, no long-poll after it
