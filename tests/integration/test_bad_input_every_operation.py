"""Bad input to every operation of the compact profile and of the clean form, through the real
gateway in front of the real Synapse behind a counting relay: each answer is 4.00 with a short
text diagnostic (4.05 for a method the resource does not take, 4.15 for a Content-Format it
does not take), and the homeserver sees
nothing at all.  Requests come from libcoap, a peer nobody here wrote."""

from __future__ import annotations

from typing import Any, Callable

import cbor2
import pytest

from comatrix.compact.codec import PATHS
from support.coap_clients import libcoap
from support.gateway import GatewayProcess
from support.relays import CountingTcpRelay
from support.synapse import MatrixUser, SynapseServer

pytestmark = pytest.mark.integration

CBOR = 60
TOKEN_OPTION = 256
#: Compact bodies that no layout accepts: the wrong shape, a handle of the wrong size, not CBOR.
COMPACT_BAD = (cbor2.dumps(["x"]), cbor2.dumps([b"short", 1, 2, "x"]), b"\xff\x00")
#: Clean-form requests missing a field or giving one of the wrong type.
CLEAN_BAD: tuple[tuple[str, str, Any], ...] = (
    ("post", "create", {"preset": "trusted_private_chat"}),
    ("post", "room", {"room_id": 7}),
    ("post", "invite", {"room_id": "!r:localhost"}),
    ("post", "leave", {}),
    ("post", "kick", {"room_id": "!r:localhost", "user_id": ["a"]}),
    ("get", "members", None),
    ("get", "history?room=!r:localhost&limit=500", None),
    ("post", "react", {"room_id": "!r:localhost", "event_id": "notanid", "key": "+"}),
    ("post", "redact", {"room_id": "!r:localhost"}),
    ("post", "read", {"event_id": "$e"}),
    ("post", "profile", {"avatar_url": "https://example.org/a.png"}),
    ("post", "upload?type=not-a-type", b"media"),
    ("get", "upload?mxc=mxc://localhost/abc&width=0&height=32", None),
    ("post", "send", {"room_id": "!r:localhost", "body": "x", "msgtype": "m.location"}),
    ("post", "send", {"room_id": "!r:localhost", "body": "x", "reply_to": "$a", "replaces": "$b"}),
    ("post", "join", {"room_id": 42}),
)


def _diagnosed(result: Any) -> bool:
    return result.code == "4.00" and 0 < len(result.payload) <= 64


def test_every_operation_refuses_bad_input_before_the_homeserver(
        make_gateway: Callable[..., GatewayProcess], synapse: SynapseServer,
        synapse_user: Callable[..., MatrixUser]) -> None:
    user = synapse_user("badops")
    token = [(TOKEN_OPTION, user.access_token)]
    with CountingTcpRelay(synapse.port) as relay:
        # ~90 requests from one address in a few seconds: above the default per-device rate.
        gw = make_gateway(homeserver=relay.url, config_text="[limits]\ndevice_rate = 1000.0\ndevice_burst = 1000\n")
        for operation, path in sorted(PATHS.items()):
            if operation == "time":
                continue
            answers = {method: libcoap(method, gw.uri(path), payload=payload, content_format=CBOR)
                       for method in ("post", "fetch") for payload in COMPACT_BAD[:1]}
            assert all(a.code in ("4.00", "4.05", "4.15") for a in answers.values()), (operation, answers)
            method = next(m for m, a in answers.items() if a.code == "4.00")
            for payload in COMPACT_BAD:
                result = libcoap(method, gw.uri(path), payload=payload, content_format=CBOR)
                assert _diagnosed(result), (operation, payload, result)
        # The upload's body is a CBOR header then the media, with no Content-Format (or 42).
        for payload in COMPACT_BAD:
            assert _diagnosed(libcoap("post", gw.uri(PATHS["upload"]), payload=payload)), payload
        for method, path, body in CLEAN_BAD:
            raw = isinstance(body, bytes)
            result = libcoap(method, gw.uri(path), options=token,
                             payload=body if raw else None if body is None else cbor2.dumps(body),
                             content_format=None if raw or body is None else CBOR)
            assert _diagnosed(result), (path, body, result)
        assert (relay.connections, relay.requests) == (0, [])  # Synapse saw nothing
    assert "Traceback" not in gw.log_text()
