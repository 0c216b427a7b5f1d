"""Every homeserver call made for a device names it in ``X-Forwarded-For`` (StubTreq, no sockets).

The address is the device's as it was when the call was *requested*: a call that
waits in the upstream queue starts later from another call's completion, in
that call's context, and must still name its own device.  Loops started for a
device (MSC3079 Observe, compact watches) keep naming it; calls the gateway makes
for itself name nobody.
"""

from __future__ import annotations

from treq.testing import StubTreq
from twisted.internet import task

from comatrix.coap.message import Peer, Request
from comatrix.coap.numbers import Code, OptionNumber
from comatrix.coap.server import CoapSettings, Site
from comatrix.coap.testing import Harness
from comatrix.compact.service import CompactService
from comatrix.config import build_config
from comatrix.credentials import Credentials
from comatrix.errors import error_response
from comatrix.interfaces import PluginContext
from comatrix.identity import Device, acting_as, device_of
from comatrix.longpoll import STATE_KEY, LongPoller
from comatrix.matrix import api
from comatrix.matrix.client import MatrixClient
from comatrix.matrix.testing import FakeHomeserver, RecordedRequest, ScriptedAnswer, result_of, stub_transport
from comatrix.plugins import msc3079 as msc3079_plugin
from comatrix.ratelimit import LimitedTransport, UpstreamLimiter
from comatrix.store import SessionRecord

SYNC = ("_matrix", "client", "v3", "sync")


def forwarded(seen: RecordedRequest) -> tuple[list[bytes] | None, list[bytes] | None]:
    return seen.headers.get(b"X-Forwarded-For"), seen.headers.get(b"X-Forwarded-Proto")


def device_at(host: str) -> Device:
    return device_of(Request(method=Code.POST, path=("send",), peer=Peer(host, 5683)))


def test_a_call_for_a_device_names_its_address_and_the_gateways_own_call_names_none() -> None:
    hs = FakeHomeserver()
    transport, _ = stub_transport(hs, task.Clock())
    with acting_as(device_at("2001:db8::7")):
        result_of(transport.request(api.versions()))
    result_of(transport.request(api.versions()))  # no current device: the gateway's own call
    for_device, own = hs.requests
    # The stub homeserver's URL is https: the proto the gateway itself speaks to it.
    assert forwarded(for_device) == ([b"2001:db8::7"], [b"https"])
    assert forwarded(own) == (None, None)


def test_the_zone_id_is_stripped_and_a_mapped_ipv4_address_is_plain() -> None:
    hs = FakeHomeserver()
    transport, _ = stub_transport(hs, task.Clock())
    for host in ("fe80::1%lowpan0", "::ffff:192.0.2.9", "127.0.0.3"):
        with acting_as(device_at(host)):
            result_of(transport.request(api.versions()))
    # A device known by its security context still has its address for the homeserver.
    with acting_as(Device(key="dtls:sensor01", address="fe80::2%wpan0", secured=True)):
        result_of(transport.request(api.versions()))
    assert [forwarded(seen)[0] for seen in hs.requests] == [
        [b"fe80::1"], [b"192.0.2.9"], [b"127.0.0.3"], [b"fe80::2"]]


def test_a_device_whose_address_is_not_an_ip_literal_names_nothing() -> None:
    hs = FakeHomeserver()
    transport, _ = stub_transport(hs, task.Clock())
    with acting_as(Device(key="a:x", address="evil\r\nX-Injected: 1")):
        result_of(transport.request(api.versions()))
    assert forwarded(hs.requests[0]) == (None, None)


def test_a_queued_call_names_the_device_that_asked_not_the_one_whose_call_freed_the_slot() -> None:
    clock = task.Clock()
    hs = FakeHomeserver()
    hs.script("GET", ("_matrix", "client", "versions"), None)  # the first call hangs: the slot stays taken
    transport = LimitedTransport("https://hs.test.local", reactor=clock, http_client=StubTreq(hs),
                                 limiter=UpstreamLimiter(max_active=1, max_queue=4, queue_timeout=30, clock=clock))
    with acting_as(device_at("127.0.0.2")):
        first = transport.request(api.versions())
    with acting_as(device_at("127.0.0.3")):
        queued = transport.request(api.versions())
    assert len(hs.requests) == 1 and transport.limiter.queued == 1
    first.addErrback(lambda failure: None)
    # The slot frees inside another device's context (here: the first call's deadline timer
    # fires while a third device is current); the queued call starts from there.
    with acting_as(device_at("127.0.0.4")):
        clock.advance(10)
    result_of(queued)
    assert [forwarded(seen)[0] for seen in hs.requests] == [[b"127.0.0.2"], [b"127.0.0.3"]]


def long_poll_context(hs: FakeHomeserver, clock: task.Clock) -> PluginContext:
    """A gateway context whose Matrix client and long-poll pool both reach ``hs``."""
    transport, _ = stub_transport(hs, clock, timeout=3600)
    matrix = MatrixClient(transport, reactor=clock)
    config = build_config({})
    context = PluginContext(config=config, matrix=matrix, credentials=Credentials(config.devices, matrix),
                            state={}, reactor=clock)
    context.state[STATE_KEY] = LongPoller(transport, clock)
    return context


def test_an_msc3079_observe_loop_keeps_naming_its_device() -> None:
    site = Site(error_response)
    harness = Harness(site, CoapSettings(), understood_options=frozenset({256, 257}))
    hs = FakeHomeserver()
    context = long_poll_context(hs, harness.clock)
    for path, resource in msc3079_plugin.msc3079.build_routes(context):
        site.put(path, resource)
    hs.script("GET", SYNC, ScriptedAnswer(200, b'{"next_batch": "s0"}', {"Content-Type": "application/json"}))
    hs.script("GET", SYNC, None)  # the loop's long-poll hangs
    [registered] = harness.send(Code.GET, ("7",), token=b"\x42", peer=("2001:db8::9", 5683),
                                options=[(OptionNumber.OBSERVE, b""), (256, b"tok")])
    assert registered.code == Code.CONTENT
    harness.advance(0)  # the loop starts from a timer: no request's context
    assert len(hs.requests) == 2 and hs.requests[1].query["since"] == ["s0"]
    assert [forwarded(seen)[0] for seen in hs.requests] == [[b"2001:db8::9"]] * 2
    context.state["msc3079"].shutdown()


def test_a_compact_watch_keeps_naming_its_device_across_a_retry() -> None:
    clock = task.Clock()
    hs = FakeHomeserver()
    transport, _ = stub_transport(hs, clock, timeout=3600)
    service = CompactService(MatrixClient(transport, reactor=clock), None, clock,  # type: ignore[arg-type]
                             long_polls=LongPoller(transport, clock), jitter=lambda: 0.0)
    service.is_observed = lambda session: True
    hs.script("GET", SYNC, ScriptedAnswer(502, b"<html>bad gateway</html>"))
    hs.script("GET", SYNC, None)  # after the back-off, the loop's /sync hangs
    session = SessionRecord(1, b"\x00" * 32, "tok", "@d:test.local", "DEV", "2001:db8::5")
    with acting_as(device_at("2001:db8::5")):  # as the messages resource does for an Observe FETCH
        service.watch(session)
    clock.advance(60)  # the retry starts from the back-off timer, outside any request
    assert len(hs.requests) == 2
    assert [forwarded(seen)[0] for seen in hs.requests] == [[b"2001:db8::5"]] * 2
    service.stop()
