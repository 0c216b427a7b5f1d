"""Rate limits and the upstream concurrency cap (comatrix.ratelimit), on a task.Clock."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from treq.testing import StubTreq
from twisted.internet import defer, task

from comatrix.coap.errors import ServiceUnavailable, TooManyRequests
from comatrix.coap.message import Peer, Request
from comatrix.coap.numbers import Code, ContentFormat, OptionNumber
from comatrix.coap.server import Site
from comatrix.coap.testing import Harness, option
from comatrix.coap.errors import decode_uint
from comatrix.config import ConfigError, LimitSettings, build_config
from comatrix.credentials import Credentials
from comatrix.errors import error_response
from comatrix.interfaces import PluginContext
from comatrix.matrix.api import MatrixRequest
from comatrix.matrix.client import MatrixClient
from comatrix.matrix.testing import FakeHomeserver
from comatrix.plugins import clock as clock_plugin, rooms
from comatrix.ratelimit import (Admission, LimitedTransport, TokenBucket, UpstreamBusy,
                                UpstreamLimiter, install)


def request(host: str = "2001:db8::1", token: bytes | None = None, port: int = 5683) -> Request:
    options = {256: (token,)} if token is not None else {}
    return Request(method=Code.POST, path=("send",), peer=Peer(host, port), options=options)


def refused(admission: Admission, req: Request) -> TooManyRequests:
    with pytest.raises(TooManyRequests) as info:
        admission.check(req)
    return info.value


# -- token bucket -----------------------------------------------------------------------


def test_bucket_burst_then_refill_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    for _ in range(3):
        assert bucket.wait(0.0) == 0
        bucket.take(0.0)
    assert bucket.wait(0.0) == pytest.approx(0.5)
    assert bucket.wait(0.25) == pytest.approx(0.25)
    assert bucket.wait(0.5) == 0
    bucket.take(0.5)
    assert not bucket.full(0.5)
    assert bucket.full(100.0)  # refills to the burst, never beyond
    for _ in range(3):
        bucket.take(100.0)
    assert bucket.wait(100.0) > 0


def test_bucket_ignores_a_clock_going_backwards() -> None:
    bucket = TokenBucket(rate=1.0, burst=1, now=10.0)
    bucket.take(10.0)
    assert bucket.wait(5.0) == pytest.approx(1.0)
    assert bucket.wait(11.0) == 0


# -- admission ------------------------------------------------------------------------


def test_device_limit_is_per_source_address_and_max_age_is_the_wait() -> None:
    clock = task.Clock()
    admission = Admission(LimitSettings(device_rate=0.25, device_burst=2, global_rate=0), clock)
    chatty, quiet = request("2001:db8::1"), request("2001:db8::2")
    admission.check(chatty)
    admission.check(request("2001:db8::1", port=9999))  # another source port is the same device
    error = refused(admission, chatty)
    assert error.to_response().code == Code.TOO_MANY_REQUESTS
    assert error.to_response().max_age == 4  # 1 token at 0.25/s
    admission.check(quiet)  # the chatty device did not starve the quiet one
    clock.advance(2.5)
    assert refused(admission, chatty).max_age == 2  # ceil(1.5)
    clock.advance(1.5)
    admission.check(chatty)


def test_refused_requests_cost_no_budget() -> None:
    clock = task.Clock()
    admission = Admission(LimitSettings(device_rate=1, device_burst=1, global_rate=0), clock)
    admission.check(request())
    for _ in range(50):
        refused(admission, request())
    clock.advance(1.0)
    admission.check(request())


def test_global_limit_spans_devices_and_is_paid_by_the_first_homeserver_call() -> None:
    clock = task.Clock()
    admission = Admission(LimitSettings(device_rate=1, device_burst=1, global_rate=1, global_burst=3),
                          clock)
    for n in range(3):
        ticket = admission.check(request(f"2001:db8::{n + 1}"))
        ticket.pay()
        ticket.pay()  # a request's further homeserver calls are free
    last = admission.check(request("2001:db8::99"))  # admitted: its own bucket has a token
    with pytest.raises(TooManyRequests) as info:
        last.pay()
    assert info.value.diagnostic == "gateway rate limit" and info.value.max_age == 1
    # The device refused by the global bucket got its own token back (its burst is 1).
    admission.check(request("2001:db8::99"))
    clock.advance(1.0)
    admission.check(request("2001:db8::98")).pay()


def test_a_request_that_never_reaches_the_homeserver_costs_no_global_token() -> None:
    clock = task.Clock()
    admission = Admission(LimitSettings(device_rate=1, device_burst=1, global_rate=0.001, global_burst=1),
                          clock)
    for n in range(100):
        admission.check(request(f"10.1.0.{n + 1}")).close(None)  # answered (4.00, 4.01...) unpaid
    ticket = admission.check(request("10.9.9.9"))
    ticket.pay()  # the one global token is still there
    closed = admission.check(request("10.9.9.8"))
    closed.close(None)
    closed.pay()  # work left running after the answer is not charged to the request


def test_device_key_token_separates_devices_behind_one_address() -> None:
    clock = task.Clock()
    admission = Admission(LimitSettings(device_rate=1, device_burst=1, global_rate=0, device_key="token"),
                          clock)
    admission.check(request("10.0.0.1", b"Bearer syt_aaaa"))
    admission.check(request("10.0.0.1", b"syt_bbbb"))
    refused(admission, request("10.0.0.2", b"syt_aaaa"))  # the token follows the device
    admission.check(request("10.0.0.1"))  # no token: by address
    # Tokens are never kept as table keys.
    assert not any("syt_" in key for key in admission._devices)


def test_device_table_is_bounded() -> None:
    clock = task.Clock()
    admission = Admission(LimitSettings(device_rate=1, device_burst=1, global_rate=0, max_devices=8), clock)
    for n in range(1000):
        admission.check(request(f"10.0.{n // 256}.{n % 256}"))
    assert admission.tracked_devices() == 8


def test_zero_rates_disable_the_limits() -> None:
    admission = Admission(LimitSettings(device_rate=0, global_rate=0), task.Clock())
    for _ in range(10_000):
        admission.check(request())


# -- resources -------------------------------------------------------------------------


def gateway_site(limits: LimitSettings, reactor: task.Clock) -> tuple[Site, FakeHomeserver, str, str]:
    homeserver = FakeHomeserver()
    user_id = homeserver.add_user("d", "pw")
    token, _ = homeserver.issue_token(user_id)
    room = homeserver.new_room(user_id)
    transport = LimitedTransport("https://hs.test.local", reactor=reactor,
                                 limiter=UpstreamLimiter(limits.max_upstream, limits.upstream_queue,
                                                         limits.queue_timeout, reactor),
                                 http_client=StubTreq(homeserver))
    matrix = MatrixClient(transport, reactor=reactor)
    config = build_config({})
    context = PluginContext(config=config, matrix=matrix, credentials=Credentials((), matrix), state={},
                            reactor=reactor)
    site = Site(error_response)
    site.put(("send",), rooms.send.build(context))
    site.put(("time",), clock_plugin.time.build(context))
    assert install(site, Admission(limits, reactor)) == 1
    return site, homeserver, token, room


def test_limited_resource_answers_429_and_local_resources_never_are() -> None:
    limits = LimitSettings(device_rate=0.5, device_burst=2, global_rate=0)
    clock = task.Clock()  # drives the limits and the Matrix layer; the harness has its own
    site, homeserver, token, room = gateway_site(limits, clock)
    harness = Harness(site)

    def send(n: int) -> Any:
        body = cbor2.dumps({"room_id": room, "txn_id": f"t{n}", "body": f"m{n}"})
        [reply] = harness.send(Code.POST, ("send",), payload=body,
                               options=[(OptionNumber.CONTENT_FORMAT, bytes([ContentFormat.CBOR])),
                                        (256, token.encode())])
        return reply

    assert [send(n).code for n in range(2)] == [Code.CHANGED, Code.CHANGED]
    limited = send(2)
    assert limited.code == Code.TOO_MANY_REQUESTS
    assert decode_uint(option(limited, OptionNumber.MAX_AGE) or b"") == 2
    forwarded = len(homeserver.calls("rooms"))
    assert forwarded == 2  # the refused request never reached the homeserver
    clock.advance(2)
    assert send(3).code == Code.CHANGED
    for _ in range(20):
        [reply] = harness.send(Code.GET, ("time",))
        assert reply.code == Code.CONTENT
        [reply] = harness.send(Code.GET, (".well-known", "core"))
        assert reply.code == Code.CONTENT


def test_junk_from_many_addresses_does_not_drain_the_global_bucket() -> None:
    # 60 addresses send junk at 20/s each; every junk request is admitted by its sender's own
    # bucket and fails before any homeserver call, so the global bucket (20 tokens, 1/s) -- which
    # the 720 junk requests would have emptied many times over if admission charged it -- is
    # left to the legitimate device: 12 of 12 sends go through.
    limits = LimitSettings(device_rate=20, device_burst=20, global_rate=1, global_burst=20)
    clock = task.Clock()
    site, homeserver, token, room = gateway_site(limits, clock)
    harness = Harness(site)
    cbor_format = (OptionNumber.CONTENT_FORMAT, bytes([ContentFormat.CBOR]))
    good = cbor2.dumps({"room_id": room, "body": "junk-free"})
    junk = [  # (payload, options, expected code)
        (b"\xff\x00", [cbor_format, (256, token.encode())], Code.BAD_REQUEST),  # malformed CBOR
        (good, [cbor_format], Code.UNAUTHORIZED),  # no credentials
        (good, [(OptionNumber.CONTENT_FORMAT, bytes([ContentFormat.JSON])), (256, token.encode())],
         Code.UNSUPPORTED_CONTENT_FORMAT),
    ]
    legitimate = []
    for round_ in range(12):
        for n in range(60):
            payload, options, expected = junk[(round_ + n) % len(junk)]
            [reply] = harness.send(Code.POST, ("send",), payload=payload, options=options,
                                   peer=(f"2001:db8:6::{n + 1}", 5683))
            assert reply.code == expected
        body = cbor2.dumps({"room_id": room, "txn_id": f"legit{round_}", "body": f"m{round_}"})
        [reply] = harness.send(Code.POST, ("send",), payload=body, options=[cbor_format, (256, token.encode())],
                               peer=("2001:db8::1", 5683))
        legitimate.append(reply.code)
        clock.advance(0.05)
    assert legitimate == [Code.CHANGED] * 12
    assert len(homeserver.calls("rooms")) == 12  # no junk reached the homeserver


def test_the_global_refusal_comes_from_the_first_homeserver_call_with_max_age() -> None:
    limits = LimitSettings(device_rate=20, device_burst=20, global_rate=0.5, global_burst=1)
    clock = task.Clock()
    site, homeserver, token, room = gateway_site(limits, clock)
    harness = Harness(site)

    def send(host: str, n: int) -> Any:
        body = cbor2.dumps({"room_id": room, "txn_id": f"t{n}", "body": f"m{n}"})
        [reply] = harness.send(Code.POST, ("send",), payload=body, peer=(host, 5683),
                               options=[(OptionNumber.CONTENT_FORMAT, bytes([ContentFormat.CBOR])),
                                        (256, token.encode())])
        return reply

    assert send("2001:db8::1", 1).code == Code.CHANGED
    refused_reply = send("2001:db8::2", 2)
    assert refused_reply.code == Code.TOO_MANY_REQUESTS and refused_reply.payload == b"gateway rate limit"
    assert decode_uint(option(refused_reply, OptionNumber.MAX_AGE) or b"") == 2
    assert len(homeserver.calls("rooms")) == 1
    clock.advance(2)
    assert send("2001:db8::2", 3).code == Code.CHANGED


# -- upstream concurrency cap -------------------------------------------------------------


def test_limiter_runs_at_most_max_active_and_queues_fifo() -> None:
    clock = task.Clock()
    limiter = UpstreamLimiter(max_active=2, max_queue=2, queue_timeout=5, clock=clock)
    calls: list[defer.Deferred[str]] = []
    started: list[int] = []

    def call(n: int) -> Any:
        def start() -> defer.Deferred[str]:
            started.append(n)
            d: defer.Deferred[str] = defer.Deferred()
            calls.append(d)
            return d
        return start

    results: list[Any] = []
    for n in range(4):
        limiter.run(call(n)).addBoth(results.append)
    assert started == [0, 1] and limiter.active == 2 and limiter.queued == 2
    busy = limiter.run(call(4))
    failure: list[Any] = []
    busy.addErrback(failure.append)
    assert failure and failure[0].check(UpstreamBusy)
    assert failure[0].value.to_response().code == Code.SERVICE_UNAVAILABLE
    assert failure[0].value.to_response().max_age is not None
    calls[1].callback("one")
    assert started == [0, 1, 2]  # first queued, first started
    calls[0].errback(RuntimeError("boom"))  # a failed call frees its slot too
    assert started == [0, 1, 2, 3]
    calls[2].callback("two")
    calls[3].callback("three")
    assert limiter.active == 0 and limiter.queued == 0
    # In completion order.
    assert results[0] == "one" and results[1].check(RuntimeError)
    assert results[2:] == ["two", "three"]


def test_queued_call_times_out_with_503_and_cancel_leaves_the_queue() -> None:
    clock = task.Clock()
    limiter = UpstreamLimiter(max_active=1, max_queue=4, queue_timeout=3, clock=clock)
    blocker: defer.Deferred[None] = defer.Deferred()
    limiter.run(lambda: blocker)
    waiting = limiter.run(lambda: defer.succeed("never"))
    cancelled = limiter.run(lambda: defer.succeed("never either"))
    outcomes: list[Any] = []
    waiting.addBoth(outcomes.append)
    cancelled.addErrback(lambda f: outcomes.append(f.type))
    cancelled.cancel()
    assert limiter.queued == 1
    clock.advance(2.9)
    assert len(outcomes) == 1
    clock.advance(0.2)
    assert isinstance(outcomes[1].value, ServiceUnavailable)
    assert limiter.queued == 0
    blocker.callback(None)
    assert limiter.active == 0 and not clock.getDelayedCalls()


def test_limited_transport_caps_real_homeserver_calls() -> None:
    clock = task.Clock()
    homeserver = FakeHomeserver()
    user_id = homeserver.add_user("d", "pw")
    token, _ = homeserver.issue_token(user_id)
    transport = LimitedTransport("https://hs.test.local", reactor=clock, http_client=StubTreq(homeserver),
                                 limiter=UpstreamLimiter(1, 1, 60, clock))
    for _ in range(3):
        homeserver.script("GET", ("_matrix", "client", "v3", "account"), None)  # hang
    whoami = MatrixRequest("GET", ("_matrix", "client", "v3", "account", "whoami"), access_token=token)
    first, second, third = (transport.request(whoami) for _ in range(3))
    assert len(homeserver.hanging) == 1  # only one call reached the homeserver
    errors: list[Any] = []
    third.addErrback(errors.append)
    assert errors[0].check(UpstreamBusy)
    for d in (first, second):
        d.addErrback(lambda f: None)
    clock.advance(10)  # the first call times out (transport deadline) and frees its slot
    assert len(homeserver.hanging) == 2


# -- config -----------------------------------------------------------------------------


def test_limits_table_in_config() -> None:
    config = build_config({"limits": {"device_rate": 2, "device_burst": 5, "device_key": "token",
                                      "max_upstream": 4}})
    assert config.limits == LimitSettings(device_rate=2.0, device_burst=5, device_key="token", max_upstream=4)
    assert build_config({}).limits == LimitSettings()
    for bad in ({"nope": 1}, {"device_rate": "fast"}, {"device_key": "mac"}, {"device_burst": 0},
                {"max_upstream": 1.5}, {"device_rate": True}):
        with pytest.raises(ConfigError):
            build_config({"limits": bad})
    with pytest.raises(ConfigError):
        build_config({"limits": 3})

