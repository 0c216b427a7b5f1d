"""What devices may do, against a real Synapse through real CoAP clients (libcoap).

* Registration is closed by default on every path -- ``/register`` (clean and
  original form), MSC3079 ``/4``, ``/_matrix/client/r0/register`` and
  ``.../v3/register`` -- and Synapse sees no register request; open, each creates
  an account.
* A device acting through a ``[[devices]]`` entry gets 4.03 for ``pushers/set``
  (path code ``l``) and ``logout/all`` (full path) and the account is untouched;
  once its entry's ``allow`` names them, both work.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any, Callable

import cbor2
import pytest

from support.coap_clients import libcoap
from support.gateway import GatewayProcess
from support.relays import CountingTcpRelay
from support.secrets import remember
from support.synapse import MatrixUser, SynapseServer

pytestmark = pytest.mark.integration

CBOR = 60
TOKEN = 256
PROXY_URI = 35
LOGOUT_ALL = "_matrix/client/v3/logout/all"
#: Synapse's access log line of a register call (any API version), e.g.
#: ``"POST /_matrix/client/v3/register HTTP/1.1"``.
REGISTER_CALL = re.compile(r'"POST /_matrix/client/[^/ ]+/register[ ?]')


def register_calls(synapse: SynapseServer) -> int:
    return len(REGISTER_CALL.findall(synapse.log_text()))


def registration_forms(username: str, password: str) -> list[tuple[str, list[tuple[int, str]], dict[str, Any]]]:
    """(path, options, body) of every way in to the homeserver's /register."""
    plain = {"username": username, "password": password}
    dummy = dict(plain, auth={"type": "m.login.dummy"})
    return [
        ("register", [], plain),                                        # clean form
        ("register", [(PROXY_URI, "coap://hs.example/4")], dummy),      # original CoMatrix form
        ("4", [], dummy),                                               # MSC3079 path code
        ("_matrix/client/r0/register", [], dummy),
        ("_matrix/client/v3/register", [], dummy),
    ]


def post(gw: GatewayProcess, path: str, body: Any = None, options: Any = ()) -> Any:
    return libcoap("post", gw.uri(path), options=list(options), content_format=CBOR,
                   payload=cbor2.dumps(body if body is not None else {}))


def test_registration_is_closed_by_default_on_every_path(make_gateway, synapse: SynapseServer) -> None:
    username = "closed" + secrets.token_hex(4)
    password = remember("pw-" + secrets.token_hex(10))
    before = register_calls(synapse)
    with CountingTcpRelay(synapse.port) as relay:
        gw = make_gateway(homeserver=relay.url)
        for path, options, body in registration_forms(username, password):
            answer = post(gw, path, body, options)
            assert (answer.code, answer.payload) == ("4.03", b"registration closed"), (path, answer)
        # Nothing reached Synapse: no request through the relay, no register call in its log,
        # and the name is still free.
        assert (relay.connections, relay.requests) == (0, [])
    assert register_calls(synapse) == before
    available = synapse.request("GET", "/_matrix/client/v3/register/available", query={"username": username})
    assert available == {"available": True}
    assert "Registration is closed" in gw.log_text()


def test_registration_works_on_every_path_when_switched_on(make_gateway, synapse: SynapseServer) -> None:
    gw = make_gateway(allow_registration=True)
    before = register_calls(synapse)
    for index, (path, options, body) in enumerate(registration_forms("x", "y")):
        username = f"open{index}" + secrets.token_hex(4)
        body = dict(body, username=username, password=remember("pw-" + secrets.token_hex(10)))
        answer = post(gw, path, body, options)
        assert answer.code == "2.04", (path, answer)
        assert synapse.whoami(remember(answer.cbor()["access_token"])) == f"@{username}:{synapse.server_name}"
    assert register_calls(synapse) >= before + 5  # the count above does see register calls
    assert re.search(r"\[comatrix#warn\] Registration is OPEN", gw.log_text())


# -- least privilege for shared credentials ------------------------------------------------------

def shared_gateway(make_gateway: Callable[..., GatewayProcess], device: MatrixUser, tmp_path: Path,
                   allow: list[str]) -> GatewayProcess:
    """A gateway holding ``device``'s password for 127.0.0.0/8, its entry allowing ``allow``."""
    credentials = tmp_path / f"credentials-{len(allow)}.toml"
    credentials.write_text(f'[[devices]]\naddress = "127.0.0.0/8"\nuser = "{device.user_id}"\n'
                           f'password = "{device.password}"\nallow = {allow!r}\n'.replace("'", '"'))
    credentials.chmod(0o640)
    return make_gateway(config_text=f'credentials_file = "{credentials}"\n')


def pusher(pushkey: str) -> dict[str, Any]:
    return {"kind": "http", "app_id": "org.example.sensor", "pushkey": pushkey, "app_display_name": "S",
            "device_display_name": "S", "lang": "en",
            "data": {"url": "http://127.0.0.1:9/_matrix/push/v1/notify"}}


def pushkeys(synapse: SynapseServer, device: MatrixUser) -> list[str]:
    return [p["pushkey"] for p in synapse.request("GET", "/_matrix/client/v3/pushers",
                                                   token=device.access_token)["pushers"]]


def test_shared_credentials_cannot_add_pushers_or_log_out_everywhere_unless_allowed(
        make_gateway, synapse: SynapseServer, synapse_user, tmp_path: Path) -> None:
    device = synapse_user("shared")
    room_id = synapse.create_room(device.access_token)
    gw = shared_gateway(make_gateway, device, tmp_path, [])
    # Device operations work: a send through the shared entry.
    sent = post(gw, "send", {"room_id": room_id, "txn_id": "p1", "body": "21.5 C"})
    assert sent.code == "2.04", sent
    for path, body in (("l", pusher("forged")), (LOGOUT_ALL, {})):
        refused = post(gw, path, body, options=[])
        assert (refused.code, refused.payload) == ("4.03", b"not allowed for shared credentials"), (path, refused)
    assert pushkeys(synapse, device) == []
    assert synapse.whoami(device.access_token) == device.user_id  # nobody was logged out
    # The same address with the account's own token keeps the full API.
    own = libcoap("get", gw.uri("k"), options=[(TOKEN, device.access_token)])
    assert own.code == "2.05" and own.cbor() == {"pushers": []}

    allowed = shared_gateway(make_gateway, device, tmp_path, ["pushers/set", "logout/all"])
    added = post(allowed, "l", pusher("allowed"))
    assert added.code == "2.04", added
    assert pushkeys(synapse, device) == ["allowed"]
    created = post(allowed, "G", {"name": "x"})
    assert created.code == "4.03"  # still not named in the entry
    logged_out = post(allowed, LOGOUT_ALL)
    assert logged_out.code == "2.04", logged_out
    status, _ = synapse.request_raw("GET", "/_matrix/client/v3/account/whoami", token=device.access_token)
    assert status == 401  # every token of the account is gone
