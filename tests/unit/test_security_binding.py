"""State bound to a device is bound to its security context when it has one, not to its address.

A plain datagram forged with the address and port of a DTLS device must not reach
that device's sticky MSC3079 token, Observe loop or compact session.
"""

from __future__ import annotations

import pytest

from comatrix.coap.errors import Forbidden
from comatrix.coap.message import Peer, Request, Security
from comatrix.coap.numbers import Code
from comatrix.codec.msc3079 import ACCESS_TOKEN_OPTION
from comatrix.compact.service import CompactService
from comatrix.matrix.testing import run
from comatrix.msc3079.peers import PeerTable
from comatrix.msc3079.service import loop_key
from support.world import World
from test_bad_input_profiles import MemoryStore

PEER = Peer("fe80::7", 5684)
DTLS = Security("dtls", "sensor01")


def request(security: Security | None, token: bytes | None = None) -> Request:
    options = {ACCESS_TOKEN_OPTION: (token,)} if token is not None else {}
    return Request(method=Code.GET, path=("7",), peer=PEER, options=options, security=security, token=b"t")


def test_a_sticky_token_set_over_dtls_is_not_seen_by_a_plain_forgery_of_its_address() -> None:
    table = PeerTable(16, 100, lambda: 0.0)
    assert table.update(request(DTLS, b"secret-token")).token == "secret-token"
    assert table.update(request(DTLS)).token == "secret-token"  # sticky within the session
    assert table.update(request(None)).token is None  # same address and port, no DTLS
    assert table.update(request(Security("dtls", "other"))).token is None
    table.forget_token(request(DTLS), "secret-token")
    assert table.update(request(DTLS)).token is None


def test_observe_loops_of_one_address_differ_by_security_context() -> None:
    assert loop_key(request(DTLS)) != loop_key(request(None))


def test_a_compact_session_opened_over_dtls_is_bound_to_the_psk_identity() -> None:
    world = World()
    context = world.context()
    service = CompactService(context.matrix, MemoryStore(), context.reactor)  # type: ignore[arg-type]
    handle = run(service.login("d", "pw", PEER, "dtls:sensor01", security=DTLS))
    assert run(service.session(handle, Peer("fe80::8", 1), DTLS)).peer_host == "dtls:sensor01"
    for peer, security in ((PEER, None), (PEER, Security("dtls", "other"))):
        with pytest.raises(Forbidden):
            run(service.session(handle, peer, security))
    plain = run(service.login("d", "pw", PEER))
    assert run(service.session(plain, PEER)).peer_host == PEER.host
    with pytest.raises(Forbidden):
        run(service.session(plain, PEER, DTLS))
