"""The gateway's own failed-login limit per device (`comatrix.ratelimit.FailedLogins`).

A homeserver that sees only the gateway's address (no ``x_forwarded``) counts
every device's logins as one client's: a device guessing passwords would lock
out every other device.  The gateway therefore counts wrong-password answers
per device over every login path -- ``/login``, MSC3079 ``/1`` and the full r0
and v3 paths, compact ``/+`` -- and refuses that device alone (4.29 with
Max-Age) once it has had its share, without calling the homeserver.
"""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from treq.testing import StubTreq
from twisted.internet import defer, task

from comatrix.coap import wire
from comatrix.coap.errors import TooManyRequests, decode_uint
from comatrix.coap.numbers import Code, ContentFormat, OptionNumber
from comatrix.coap.server import CoapSettings, Site
from comatrix.coap.testing import Harness, option
from comatrix.compact.service import CompactService
from comatrix.config import ConfigError, LimitSettings, build_config
from comatrix.credentials import Credentials
from comatrix.errors import error_response
from comatrix.identity import Device, acting_as
from comatrix.interfaces import PluginContext
from comatrix.matrix import api
from comatrix.matrix.client import MatrixClient
from comatrix.matrix.errors import MatrixError
from comatrix.matrix.testing import FakeHomeserver, result_of
from comatrix.plugins import accounts, compact, msc3079
from comatrix.plugins.compact import STATE_KEY as COMPACT_STATE
from comatrix.ratelimit import FailedLogins, LimitedTransport, UpstreamLimiter, is_login
from test_bad_input_profiles import MemoryStore

ATTACKER, VICTIM = ("127.0.0.66", 40000), ("127.0.0.2", 40001)
CBOR = [(OptionNumber.CONTENT_FORMAT, bytes([ContentFormat.CBOR]))]


class Gateway:
    """Every login path of the gateway over a `LimitedTransport` with `FailedLogins`."""

    def __init__(self, limits: LimitSettings = LimitSettings()) -> None:
        self.site = Site(error_response)
        self.harness = Harness(self.site, CoapSettings(), understood_options=frozenset({256, 257}))
        clock = self.harness.clock
        self.hs = FakeHomeserver()
        self.hs.add_user("target", "right")
        self.hs.add_user("victim", "pw")
        self.logins = FailedLogins(limits, clock)
        self.transport = LimitedTransport("https://hs.test.local", reactor=clock, http_client=StubTreq(self.hs),
                                          limiter=UpstreamLimiter(16, 16, 10, clock), logins=self.logins)
        matrix = MatrixClient(self.transport, reactor=clock)
        config = build_config({})
        context = PluginContext(config=config, matrix=matrix, credentials=Credentials((), matrix),
                                state={}, reactor=clock)
        # A compact login asks the store first (the per-device session cap), then the homeserver.
        context.state[COMPACT_STATE] = CompactService(matrix, MemoryStore(), clock)
        self.site.put(("login",), accounts.login.build(context))
        self.site.put(("+",), compact.compact_login.build(context))
        for path, resource in msc3079.msc3079.build_routes(context):
            self.site.put(path, resource)

    def homeserver_logins(self) -> int:
        return len(self.hs.calls("login"))

    def login(self, how: str, password: str, peer: Any = ATTACKER, user: str = "target") -> wire.Datagram:
        """One login by ``how``: "login", "/1", "r0", "v3" or "+" (compact)."""
        if how == "+":
            path, payload = ("+",), cbor2.dumps([user, password])
        else:
            path = {"login": ("login",), "/1": ("1",), "r0": ("_matrix", "client", "r0", "login"),
                    "v3": ("_matrix", "client", "v3", "login")}[how]
            payload = cbor2.dumps({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user},
                                   "password": password})
        [reply] = self.harness.send(Code.POST, path, payload=payload, options=CBOR, peer=peer)
        return reply


def max_age(reply: wire.Datagram) -> int:
    return decode_uint(option(reply, OptionNumber.MAX_AGE) or b"")


def test_the_sixth_wrong_login_is_refused_by_the_gateway_on_any_path_and_only_for_that_device() -> None:
    gw = Gateway()
    for how in ("login", "/1", "r0", "v3", "+"):  # every login path counts towards one share
        assert gw.login(how, "guess").code == Code.FORBIDDEN, how
    assert gw.homeserver_logins() == 5
    for how in ("login", "/1", "r0", "v3", "+"):
        refused = gw.login(how, "guess")
        assert refused.code == Code.TOO_MANY_REQUESTS, how
        assert 0 < max_age(refused) <= 300
    # Even the right password: the device is refused before anything is checked.
    assert gw.login("login", "right").code == Code.TOO_MANY_REQUESTS
    assert gw.homeserver_logins() == 5  # the homeserver saw none of the refused attempts
    # Another device is not affected, on any path.
    assert gw.login("login", "pw", peer=VICTIM, user="victim").code == Code.CHANGED
    assert gw.login("v3", "pw", peer=VICTIM, user="victim").code == Code.CHANGED
    # Another source port of the attacker's address is the same device.
    assert gw.login("login", "guess", peer=(ATTACKER[0], 50000)).code == Code.TOO_MANY_REQUESTS


def test_max_age_is_the_time_until_the_oldest_failure_leaves_the_window() -> None:
    gw = Gateway(LimitSettings(login_failures=3, login_failure_window=60))
    for _ in range(3):
        assert gw.login("login", "guess").code == Code.FORBIDDEN
        gw.harness.advance(10)
    refused = gw.login("login", "guess")
    assert refused.code == Code.TOO_MANY_REQUESTS and max_age(refused) == 30  # 0 + 60 - 30
    gw.harness.advance(30)
    assert gw.login("login", "guess").code == Code.FORBIDDEN  # one more try once the oldest expired
    assert max_age(gw.login("login", "guess")) == 10  # the next oldest (t=10) leaves at t=70
    assert gw.homeserver_logins() == 4


def test_a_successful_login_resets_the_count() -> None:
    gw = Gateway(LimitSettings(login_failures=3))
    for _ in range(2):
        assert gw.login("/1", "guess").code == Code.FORBIDDEN
    assert gw.login("/1", "right").code == Code.CHANGED
    assert gw.logins.tracked_devices() == 0  # nothing left to remember
    for _ in range(2):
        assert gw.login("/1", "guess").code == Code.FORBIDDEN
    assert gw.login("/1", "right").code == Code.CHANGED


def test_other_refusals_do_not_count() -> None:
    clock = task.Clock()
    logins = FailedLogins(LimitSettings(login_failures=1), clock)
    device = Device(key="a:127.0.0.9", address="127.0.0.9")
    for status, errcode in ((429, "M_LIMIT_EXCEEDED"), (403, "M_USER_DEACTIVATED"), (400, "M_BAD_JSON"),
                            (502, None)):
        failed = logins.guard(device, lambda: defer.fail(MatrixError(status, errcode, "no")))
        failed.addErrback(lambda failure: None)
    assert result_of(logins.guard(device, lambda: defer.succeed("ok"))) == "ok"
    failed = logins.guard(device, lambda: defer.fail(MatrixError(401, "M_UNAUTHORIZED", "wrong")))
    failed.addErrback(lambda failure: None)
    with pytest.raises(TooManyRequests):
        result_of(logins.guard(device, lambda: defer.succeed("never")))


def test_logins_in_flight_count_so_a_burst_cannot_overshoot() -> None:
    clock = task.Clock()
    logins = FailedLogins(LimitSettings(login_failures=2), clock)
    device = Device(key="a:127.0.0.9", address="127.0.0.9")
    answers: list[defer.Deferred[Any]] = []

    def hanging() -> defer.Deferred[Any]:
        answers.append(defer.Deferred())
        return answers[-1]

    first, second = logins.guard(device, hanging), logins.guard(device, hanging)
    with pytest.raises(TooManyRequests):
        result_of(logins.guard(device, hanging))
    assert len(answers) == 2  # the third was never sent
    for answer, outcome in zip(answers, (first, second)):
        outcome.addErrback(lambda failure: None)
        answer.errback(MatrixError(403, "M_FORBIDDEN", "wrong"))
    with pytest.raises(TooManyRequests):
        result_of(logins.guard(device, hanging))


def test_the_gateways_own_logins_are_not_counted_and_off_means_off() -> None:
    clock = task.Clock()
    logins = FailedLogins(LimitSettings(login_failures=1), clock)
    for _ in range(3):
        failed = logins.guard(None, lambda: defer.fail(MatrixError(403, "M_FORBIDDEN", "wrong")))
        failed.addErrback(lambda failure: None)
    assert logins.tracked_devices() == 0
    off = FailedLogins(LimitSettings(login_failures=0), clock)
    device = Device(key="a:127.0.0.9", address="127.0.0.9")
    for _ in range(10):
        failed = off.guard(device, lambda: defer.fail(MatrixError(403, "M_FORBIDDEN", "wrong")))
        failed.addErrback(lambda failure: None)
    assert result_of(off.guard(device, lambda: defer.succeed("ok"))) == "ok"


def test_the_table_is_bounded_least_recently_seen_first() -> None:
    clock = task.Clock()
    logins = FailedLogins(LimitSettings(login_failures=1, max_devices=3), clock)
    for n in range(10):
        device = Device(key=f"a:127.0.1.{n}", address=f"127.0.1.{n}")
        failed = logins.guard(device, lambda: defer.fail(MatrixError(403, "M_FORBIDDEN", "wrong")))
        failed.addErrback(lambda failure: None)
    assert logins.tracked_devices() == 3
    newest = Device(key="a:127.0.1.9", address="127.0.1.9")
    with pytest.raises(TooManyRequests):
        result_of(logins.guard(newest, lambda: defer.succeed("never")))


def test_only_password_logins_are_guarded() -> None:
    assert is_login(api.login_password("u", "p"))
    assert is_login(api.generic("POST", ("_matrix", "client", "r0", "login"), None, (), {}))
    assert not is_login(api.generic("GET", ("_matrix", "client", "v3", "login"), None, (), None))
    assert not is_login(api.register("u", "p"))
    assert not is_login(api.generic("POST", ("_matrix", "client", "v3", "login", "get_token"), None, (), {}))


def test_logins_the_gateway_makes_for_itself_are_never_refused() -> None:
    gw = Gateway(LimitSettings(login_failures=1))
    for _ in range(3):  # no current device: e.g. a [[devices]] entry's login outside any request
        failed = gw.transport.request(api.login_password("target", "wrong"))
        failed.addErrback(lambda failure: None)
    with acting_as(Device(key="a:127.0.0.9", address="127.0.0.9")):
        for _ in range(3):
            gw.transport.request(api.login_password("target", "wrong")).addErrback(lambda failure: None)
    assert gw.homeserver_logins() == 4  # three for the gateway, one for the device before its refusal


def test_limits_table_has_the_login_keys() -> None:
    config = build_config({"limits": {"login_failures": 3, "login_failure_window": 120}})
    assert (config.limits.login_failures, config.limits.login_failure_window) == (3, 120.0)
    assert (LimitSettings().login_failures, LimitSettings().login_failure_window) == (5, 300.0)
    for bad in ({"login_failures": 2.5}, {"login_failures": -1}, {"login_failure_window": 0},
                {"login_failure_window": "long"}):
        with pytest.raises(ConfigError):
            build_config({"limits": bad})
