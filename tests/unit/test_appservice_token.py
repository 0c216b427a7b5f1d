"""Provisioned device users act with the ``as_token`` and identity assertion (`AppserviceToken`).

* `MatrixRequest.url` adds ``user_id=<the token's user>`` and drops whatever
  ``user_id`` / ``device_id`` a device put in the query: a device acts as its
  own user only.
* The transport sends the ``as_token`` itself as the bearer token.
* Tokens acting as different users are different keys; the repr names no token.
* `Credentials.token_for` hands a provisioned entry's device an `AppserviceToken`
  for the entry's user (after the shared-credentials check); ``forget`` never
  drops it (there is no login to redo).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from comatrix.coap.errors import Forbidden, Unauthorized
from comatrix.coap.message import Peer, Request, Security
from comatrix.coap.numbers import Code
from comatrix.config import build_config
from comatrix.credentials import Credentials
from comatrix.matrix import api
from comatrix.matrix.api import AppserviceToken
from comatrix.matrix.client import MatrixClient
from comatrix.matrix.testing import FakeHomeserver, run, stub_transport
from twisted.internet import task

import test_msc3079_gateway as msc3079
from test_msc3079_gateway import TOKEN

AS_TOKEN = "as_token_0123456789abcdefghijklmnopqrstuvwxyz"
SENSOR = "@comatrix_sensor01:test.local"
OTHER = "@comatrix_sensor02:test.local"
APPSERVICE = {"registration": "/etc/comatrix/appservice.yaml"}


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query, keep_blank_values=True)


# ---------------------------------------------------------------- the token


def test_url_asserts_the_tokens_user_and_drops_what_the_device_asserted() -> None:
    token = AppserviceToken(AS_TOKEN, SENSOR)
    forged = api.generic("GET", ("_matrix", "client", "v3", "rooms", "!r", "messages"), token,
                         (("user_id", "@admin:test.local"), ("dir", "b"), ("device_id", "ADMINDEVICE"),
                          ("org.matrix.msc3202.device_id", "ADMINDEVICE"), ("limit", "5")))
    url = forged.url("https://hs.example/")
    assert url.startswith("https://hs.example/_matrix/client/v3/rooms/%21r/messages?")
    assert query_of(url) == {"dir": ["b"], "limit": ["5"], "user_id": [SENSOR]}
    # Without a query: the assertion is the query.
    assert query_of(api.whoami(token).url("https://hs.example")) == {"user_id": [SENSOR]}
    # An ordinary token is not touched: the homeserver ignores user_id for it.
    plain = api.generic("GET", ("_matrix", "client", "v3", "sync"), "syt_plain", (("user_id", "@x:y"),))
    assert query_of(plain.url("https://hs.example")) == {"user_id": ["@x:y"]}


def test_tokens_acting_as_different_users_are_different_keys() -> None:
    sensor, again, other = AppserviceToken(AS_TOKEN, SENSOR), AppserviceToken(AS_TOKEN, SENSOR), \
        AppserviceToken(AS_TOKEN, OTHER)
    assert sensor == again and hash(sensor) == hash(again) and not sensor != again
    assert sensor != other and other != sensor
    assert sensor != AS_TOKEN and AS_TOKEN != sensor  # nor the bare as_token, either way round
    assert len({sensor, again, other, AS_TOKEN}) == 3
    assert {sensor: 1, other: 2}[AppserviceToken(AS_TOKEN, OTHER)] == 2
    assert str.__str__(sensor) == AS_TOKEN and sensor.user_id == SENSOR


def test_the_repr_names_the_user_and_no_token() -> None:
    token = AppserviceToken(AS_TOKEN, SENSOR)
    assert repr(token) == f"<AppserviceToken for {SENSOR}>"
    assert AS_TOKEN not in repr(api.send_event(token, "!r", "m.room.message", "t1", {"body": "x"}))
    assert AS_TOKEN not in f"{[token]!r} {token!r}"


def test_the_transport_sends_the_as_token_as_bearer_and_the_user_in_the_query() -> None:
    homeserver = FakeHomeserver()
    homeserver.add_appservice(AS_TOKEN, "@comatrix_.*")
    clock = task.Clock()
    transport, _stub = stub_transport(homeserver, clock)
    matrix = MatrixClient(transport, reactor=clock)
    request = api.generic("GET", ("_matrix", "client", "v3", "account", "whoami"), AppserviceToken(AS_TOKEN, SENSOR),
                          (("user_id", "@d:test.local"),))
    assert run(matrix.request(request))["user_id"] == SENSOR
    [sent] = homeserver.requests
    assert sent.headers[b"Authorization"] == [f"Bearer {AS_TOKEN}".encode()]
    assert sent.query == {"user_id": [SENSOR]}


# ---------------------------------------------------------------- credentials


def credentials(*entries: dict[str, Any], as_token: str | None = AS_TOKEN) -> Credentials:
    config = build_config({"devices": list(entries), "appservice": APPSERVICE})
    clock = task.Clock()
    transport, _ = stub_transport(FakeHomeserver(), clock)
    creds = Credentials(config.devices, MatrixClient(transport, reactor=clock))
    if as_token is not None:
        creds.act_as_appservice(as_token)
    return creds


def coap(host: str, security: Security | None = None, token: bytes | None = None) -> Request:
    options = {256: (token,)} if token is not None else {}
    return Request(method=Code.POST, path=("send",), peer=Peer(host, 5683), security=security, options=options)


def test_token_for_a_provisioned_device_acts_as_its_user() -> None:
    creds = credentials({"name": "sensor01", "address": "2001:db8::1", "user": SENSOR, "appservice": True},
                        {"name": "sensor02", "psk_identity": "sensor02", "psk": "k" * 22, "user": OTHER,
                         "appservice": True})
    token = run(creds.token_for(coap("2001:db8::1"), operation="send"))
    assert isinstance(token, AppserviceToken) and token == AppserviceToken(AS_TOKEN, SENSOR)
    # A security context binds a device too, wherever it sends from.
    secured = run(creds.token_for(coap("2001:db8::99", Security("dtls", "sensor02")), operation="messages"))
    assert secured == AppserviceToken(AS_TOKEN, OTHER)
    # A device that sends a token of its own acts with it.
    assert run(creds.token_for(coap("2001:db8::1", token=b"syt_own"), operation="send")) == "syt_own"
    with pytest.raises(Unauthorized):
        run(creds.token_for(coap("2001:db8::2"), operation="send"))  # no entry for that address
    assert creds.appservice_entry(SENSOR) is not None and creds.appservice_entry("@d:test.local") is None
    assert creds.acting_token(OTHER) == AppserviceToken(AS_TOKEN, OTHER)


def test_the_shared_credentials_rule_still_applies() -> None:
    creds = credentials({"address": "2001:db8::/64", "user": SENSOR, "appservice": True},
                        {"address": "2001:db9::1", "user": OTHER, "appservice": True, "allow": ["deactivate"]})
    for operation in ("deactivate", "pushers/set", "logout/all", "create_room", "register"):
        with pytest.raises(Forbidden):
            run(creds.token_for(coap("2001:db8::5"), operation=operation))
    assert run(creds.token_for(coap("2001:db9::1"), operation="deactivate")) == AppserviceToken(AS_TOKEN, OTHER)


def test_forget_never_drops_an_appservice_token() -> None:
    creds = credentials({"address": "2001:db8::1", "user": SENSOR, "appservice": True})
    request = coap("2001:db8::1")
    token = run(creds.token_for(request, operation="send"))
    assert creds.forget(request, token) is False
    assert run(creds.token_for(request, operation="send")) == token


def test_without_appservice_mode_an_appservice_entry_acts_for_nobody() -> None:
    creds = credentials({"address": "2001:db8::1", "user": SENSOR, "appservice": True}, as_token=None)
    with pytest.raises(Unauthorized):
        run(creds.token_for(coap("2001:db8::1"), operation="send"))


def test_a_token_less_send_goes_out_as_the_device_user_whatever_the_device_asserts() -> None:
    """Through the real CoAP layer and the MSC3079 forwarding: identity assertion end to end."""
    s = msc3079.Setup(devices=[{"address": "2001:db8::7", "user": SENSOR, "appservice": True}],
                      appservice=APPSERVICE)
    s.service.context.credentials.act_as_appservice(AS_TOKEN)
    reply = s.send(Code.PUT, ("9", "!room", "m.room.message", "t1"), {28: "m.text", 27: "hi"},
                   query=["user_id=@admin:hs", "device_id=ADMIN"])
    assert reply.code == Code.CHANGED
    method, path, query, body, auth = s.hs.requests[-1]
    assert (method, auth, query) == ("PUT", f"Bearer {AS_TOKEN}", {"user_id": [SENSOR]})
    assert path.startswith("/_matrix/client/v3/rooms/!room/send/m.room.message/")
    # Its own token: acts with it, and the query is the device's (no assertion added).
    reply = s.send(Code.PUT, ("9", "!room", "m.room.message", "t2"), {28: "m.text", 27: "hi"},
                   options=[(TOKEN, b"syt_own")])
    assert reply.code == Code.CHANGED and s.hs.requests[-1][4] == "Bearer syt_own"
    assert s.hs.requests[-1][2] == {}


# ---------------------------------------------------------------- tables keyed by token


@pytest.mark.parametrize("with_store", [False, True])
def test_msc3079_resume_points_of_device_users_are_kept_apart(with_store: bool) -> None:
    """One as_token acts for every device user: a table keyed by the token must key by its user too."""
    from comatrix.msc3079.resume import ResumePoints, registration_fingerprint
    from test_bad_input_profiles import MemoryStore

    points = ResumePoints(MemoryStore() if with_store else None, task.Clock())
    sensor, other = AppserviceToken(AS_TOKEN, SENSOR), AppserviceToken(AS_TOKEN, OTHER)
    plain = registration_fingerprint([])
    run(points.delivered(sensor, b"\x01", plain, "s_sensor"))
    assert run(points.resume_from(other, b"\x01", plain)) is None  # the same CoAP token, another device user
    run(points.delivered(other, b"\x01", plain, "s_other"))
    assert run(points.resume_from(sensor, b"\x01", plain)) == "s_sensor"
    run(points.forget(other))  # e.g. that device logged out
    assert run(points.resume_from(sensor, b"\x01", plain)) == "s_sensor"
    assert run(points.resume_from(other, b"\x01", plain)) is None


def test_a_reload_adds_and_removes_device_users() -> None:
    from comatrix.reload import Reloader

    first = {"address": "2001:db8::1", "user": SENSOR, "appservice": True}
    creds = credentials(first)
    config = build_config({"devices": [first], "appservice": APPSERVICE})
    new = build_config({"devices": [{"address": "2001:db8::2", "user": OTHER, "appservice": True}],
                        "appservice": APPSERVICE})
    Reloader(config, lambda: new, creds, reactor=task.Clock()).apply(new)
    assert creds.appservice_entry(SENSOR) is None and creds.appservice_entry(OTHER) is not None
    assert run(creds.token_for(coap("2001:db8::2"), operation="send")) == AppserviceToken(AS_TOKEN, OTHER)
    with pytest.raises(Unauthorized):
        run(creds.token_for(coap("2001:db8::1"), operation="send"))
