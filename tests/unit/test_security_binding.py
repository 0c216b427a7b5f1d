"""State bound to a device is bound to its security context when it has one, not to its address.

A plain datagram forged with the address and port of a DTLS device must not reach
that device's sticky MSC3079 token, Observe loop or compact session.
"""

from __future__ import annotations

from typing import Any

import pytest

from comatrix.coap.errors import Forbidden
from comatrix.coap.message import Peer, Request, Security
from comatrix.coap.numbers import Code
from comatrix.codec.msc3079 import ACCESS_TOKEN_OPTION
from comatrix.compact.service import CompactService
from comatrix.matrix.testing import run
from comatrix.msc3079.peers import PeerTable
from comatrix.msc3079.service import loop_key
from comatrix.store import SessionRecord
from support.world import World

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


class SessionsInMemory:
    def __init__(self) -> None:
        self.sessions: dict[bytes, SessionRecord] = {}

    async def create_session(self, handle_hash: bytes, access_token: str, user_id: str, device_id: str | None,
                             peer_host: str, now: float) -> int:
        record = SessionRecord(len(self.sessions) + 1, handle_hash, access_token, user_id, device_id, peer_host)
        self.sessions[handle_hash] = record
        return record.id

    async def session_by_handle(self, handle_hash: bytes) -> SessionRecord | None:
        return self.sessions.get(handle_hash)


def test_a_compact_session_opened_over_dtls_is_bound_to_the_psk_identity() -> None:
    world = World()
    context = world.context()
    store: Any = SessionsInMemory()
    service = CompactService(context.matrix, store, context.reactor)
    handle = run(service.login("d", "pw", PEER, DTLS))
    assert [record.peer_host for record in store.sessions.values()] == ["dtls:sensor01"]
    assert run(service.session(handle, Peer("fe80::8", 1), DTLS)).user_id == world.user_id  # new address: fine
    for peer, security in ((PEER, None), (PEER, Security("dtls", "other"))):
        with pytest.raises(Forbidden):
            run(service.session(handle, peer, security))
    plain = run(service.login("d", "pw", PEER))
    assert run(service.session(plain, PEER)).peer_host == PEER.host
    with pytest.raises(Forbidden):
        run(service.session(plain, PEER, DTLS))
