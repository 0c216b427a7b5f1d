"""The amplification limit (RFC 7252 §11.3, RFC 9175 §2.4) in the CoAP layer, on the in-memory harness.

Peers here are unverified (``verify_peers=False``): for each one the test keeps
the bytes it sent and the bytes the server wrote back to its address, and checks
the server never sends more than 3x what it received until the address is
verified (Echo, ACK of a CON we sent, security context).
"""

from __future__ import annotations

from typing import Any

import pytest
from comatrix.coap import wire
from comatrix.coap.amplification import ECHO, MAX_STRAYS, PeerGuard
from comatrix.coap.blockwise import Block
from comatrix.coap.errors import decode_uint
from comatrix.coap.message import Request, Response, Security
from comatrix.coap.numbers import Code, ContentFormat, MessageType, OptionNumber
from comatrix.coap.resource import CoapResource, LinkAttributes
from comatrix.coap.server import CoapSettings, Site
from comatrix.coap.testing import Harness, PendingResource, option
from comatrix.config import ConfigError, _coap_settings

CON, NON, ACK, RST = MessageType.CON, MessageType.NON, MessageType.ACK, MessageType.RST
BODY = bytes(range(256)) * 8  # 2 KiB


class Big(CoapResource):
    link = LinkAttributes(rt="big", obs=True)

    def __init__(self) -> None:
        super().__init__()
        self.renders = 0

    def render_GET(self, request: Request) -> Response:
        self.renders += 1
        return Response(payload=BODY, content_format=ContentFormat.OCTET_STREAM)

    def render_POST(self, request: Request) -> Response:
        self.renders += 1
        return Response(code=Code.CHANGED, payload=BODY[:300], content_format=ContentFormat.OCTET_STREAM)


class Small(CoapResource):
    link = LinkAttributes(rt="small", obs=True)

    def __init__(self) -> None:
        super().__init__()
        self.value = 0

    def render_GET(self, request: Request) -> Response:
        return Response.text(str(self.value))


class Failing(CoapResource):
    def render_GET(self, request: Request) -> Response:
        return Response.text("x" * 200, code=Code.BAD_REQUEST)


class Tally:
    """The harness, counting the bytes each host sent to the server (the server's writes are recorded)."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.received: dict[str, int] = {}
        send_raw = h.send_raw

        def counting(data: bytes, peer: Any = ("2001:db8::7", 40000)) -> list[wire.Datagram]:
            self.received[peer[0]] = self.received.get(peer[0], 0) + len(data)
            return send_raw(data, peer)

        h.send_raw = counting  # type: ignore[method-assign]

    def send(self, *args: Any, **kwargs: Any) -> list[wire.Datagram]:
        kwargs.setdefault("peer", PEER)
        return self.h.send(*args, **kwargs)

    def out(self, host: str) -> int:
        return sum(len(data) for data, addr in self.h.transport.written if addr[0] == host)

    def ratio_ok(self, host: str) -> bool:
        return self.out(host) <= 3 * self.received[host]


PEER = ("2001:db8::7", 40000)


def make(settings: CoapSettings = CoapSettings(), **kwargs: Any) -> tuple[Tally, dict[str, CoapResource]]:
    resources: dict[str, CoapResource] = {"big": Big(), "small": Small(), "slow": PendingResource(),
                                          "fail": Failing()}
    site = Site()
    for name, resource in resources.items():
        site.put((name,), resource)
    return Tally(Harness(site, settings, verify_peers=False, **kwargs)), resources


def block2(message: wire.Datagram) -> Block | None:
    raw = option(message, OptionNumber.BLOCK2)
    return Block.decode(raw) if raw is not None else None


#: A token as long as libcoap's and aiocoap's: a request this size can pay for a 16-byte block.
TOKEN = b"\x05" * 8


def fetch_blockwise(t: Tally, path: str, token: bytes = TOKEN, peer: Any = PEER) -> bytes:
    """Follow Block2 as a client does: each next block with its own request, in the size the server chose."""
    [reply] = t.send(Code.GET, [path], token=token, peer=peer)
    assert reply.code == Code.CONTENT, reply
    body = reply.payload
    block = block2(reply)
    while block is not None and block.more:
        following = Block(block.num + 1, False, block.szx)
        [reply] = t.send(Code.GET, [path], token=token, peer=peer,
                         options=[(OptionNumber.BLOCK2, following.encode())])
        assert reply.code == Code.CONTENT, reply
        block = block2(reply)
        assert block is not None and block.offset == len(body)
        body += reply.payload
    return body


def test_small_answer_to_unverified_peer_is_unchanged() -> None:
    t, _ = make()
    [reply] = t.send(Code.GET, ["small"], token=b"\x01\x02")
    assert (reply.mtype, reply.code, reply.payload) == (ACK, Code.CONTENT, b"0")
    assert option(reply, ECHO) is None and t.ratio_ok(PEER[0])


def test_large_answer_goes_blockwise_within_budget_and_completes() -> None:
    t, resources = make()
    assert fetch_blockwise(t, "big") == BODY
    assert t.ratio_ok(PEER[0])
    [first] = [wire.decode(data) for data, _ in t.h.transport.written[:1]]
    first_block = block2(first)
    assert first_block is not None and first_block.size < 1024  # smaller than the default, to fit
    assert resources["big"].renders == 1  # later blocks come from the kept representation


def test_smaller_block_than_the_client_asked_for_is_kept() -> None:
    t, _ = make()
    [reply] = t.send(Code.GET, ["big"], token=TOKEN, options=[(OptionNumber.BLOCK2, Block(0, False, 0).encode())])
    assert block2(reply) == Block(0, True, 0) and len(reply.payload) == 16


def test_answer_that_cannot_fit_even_one_block_is_an_echo_challenge_then_served() -> None:
    t, resources = make()
    [reply] = t.send(Code.GET, ["big"], token=b"")  # 8 bytes in: 24 out at most
    assert (reply.mtype, reply.code, reply.payload) == (ACK, Code.UNAUTHORIZED, b"")
    echo = option(reply, ECHO)
    assert echo is not None and 1 <= len(echo) <= 40
    assert t.ratio_ok(PEER[0])
    [reply] = t.send(Code.GET, ["big"], token=b"", options=[(ECHO, echo)])
    assert reply.code == Code.CONTENT and block2(reply) == Block(0, True, 6)  # verified: the default size
    assert t.h.server.peer_verified(PEER[0])


def test_stale_or_foreign_echo_gets_a_fresh_challenge() -> None:
    t, _ = make(CoapSettings(echo_lifetime=60.0))
    [reply] = t.send(Code.GET, ["big"], token=b"")
    echo = option(reply, ECHO)
    assert echo is not None
    other = ("2001:db8::8", 1)
    [reply] = t.send(Code.GET, ["big"], token=b"", options=[(ECHO, echo)], peer=other)
    assert reply.code == Code.UNAUTHORIZED and option(reply, ECHO) not in (None, echo)
    t.h.clock.advance(61)
    [reply] = t.send(Code.GET, ["big"], token=b"", options=[(ECHO, echo)])
    assert reply.code == Code.UNAUTHORIZED and option(reply, ECHO) != echo
    assert not t.h.server.peer_verified(PEER[0])
    [reply] = t.send(Code.GET, ["big"], token=b"", options=[(ECHO, b"\x00" * 10)])
    assert reply.code == Code.UNAUTHORIZED
    assert t.ratio_ok(PEER[0]) and t.ratio_ok(other[0])


def test_error_diagnostic_dropped_when_it_does_not_fit() -> None:
    t, _ = make()
    [reply] = t.send(Code.GET, ["fail"])
    assert reply.code == Code.BAD_REQUEST and reply.payload == b"" and t.ratio_ok(PEER[0])


def test_unsafe_request_answered_by_a_challenge_acts_once_and_its_repeat_gets_the_answer() -> None:
    t, resources = make()
    [reply] = t.send(Code.POST, ["big"], token=b"")  # 8 bytes in: not even a 16-byte block fits
    assert reply.code == Code.UNAUTHORIZED and resources["big"].renders == 1 and t.ratio_ok(PEER[0])
    echo = option(reply, ECHO) or b""
    [reply] = t.send(Code.POST, ["big"], token=b"\x02", options=[(ECHO, echo)])
    assert (reply.code, reply.payload) == (Code.CHANGED, BODY[:300])
    assert resources["big"].renders == 1  # the kept answer, not a second effect
    [reply] = t.send(Code.POST, ["big"], token=b"\x03", options=[(ECHO, echo)])
    assert reply.code == Code.CHANGED and resources["big"].renders == 2  # a new request acts again


def test_kept_answer_is_only_for_the_same_request() -> None:
    t, resources = make()
    [reply] = t.send(Code.POST, ["big"], token=b"")
    echo = option(reply, ECHO) or b""
    [reply] = t.send(Code.POST, ["big"], token=b"", payload=b"other", options=[(ECHO, echo)])
    assert reply.code == Code.CHANGED and resources["big"].renders == 2


def test_unsafe_request_with_budget_for_a_block_acts_once_and_answers_blockwise() -> None:
    t, resources = make()
    payload = b"p" * 20
    [reply] = t.send(Code.POST, ["big"], token=b"\x09", payload=payload)
    block = block2(reply)
    assert reply.code == Code.CHANGED and block is not None and block.more and t.ratio_ok(PEER[0])
    body = reply.payload
    while block is not None and block.more:
        following = Block(block.num + 1, False, block.szx).encode()
        [reply] = t.send(Code.POST, ["big"], token=b"\x09", payload=payload,
                         options=[(OptionNumber.BLOCK2, following)])
        block = block2(reply)
        body += reply.payload
    assert body == BODY[:300] and resources["big"].renders == 1 and t.ratio_ok(PEER[0])


def test_separate_response_to_a_peer_that_never_acks_stays_within_budget() -> None:
    t, resources = make()
    slow: PendingResource = resources["slow"]  # type: ignore[assignment]
    [ack] = t.send(Code.GET, ["slow"], token=b"\x01\x02\x03\x04") + t.h.advance(0.2)
    assert (ack.mtype, ack.code) == (ACK, 0)
    slow.pending[0].callback(Response(payload=b"s" * 30))
    first = t.h.replies()
    for _ in range(10):
        t.h.advance(60)
    sent = first + t.h.replies()
    assert sent and all(message.mtype == CON for message in sent)
    assert len(sent) < 5  # fewer than 1 + max_retransmit transmissions
    assert t.ratio_ok(PEER[0]) and not t.h.server._outgoing


def test_acknowledged_separate_response_verifies_the_peer() -> None:
    t, resources = make()
    slow: PendingResource = resources["slow"]  # type: ignore[assignment]
    t.send(Code.GET, ["slow"], token=b"\x01\x02")
    t.h.advance(0.2)
    slow.pending[0].callback(Response(payload=b"ok"))
    [response] = t.h.replies()
    assert response.mtype == CON
    t.h.send_raw(wire.empty(ACK, response.mid), PEER)
    assert t.h.server.peer_verified(PEER[0])
    [reply] = t.send(Code.GET, ["big"], token=b"")
    assert block2(reply) == Block(0, True, 6)  # unchanged behaviour once verified


def test_guessed_acks_stop_verifying_an_address() -> None:
    t, resources = make()
    slow: PendingResource = resources["slow"]  # type: ignore[assignment]
    t.send(Code.GET, ["slow"], token=b"\x01\x02")
    t.h.advance(0.2)
    slow.pending[0].callback(Response(payload=b"ok"))
    [response] = t.h.replies()
    guesses = [mid for mid in range(0x10000) if mid != response.mid][:MAX_STRAYS + 1]
    for mid in guesses:
        t.h.send_raw(wire.empty(ACK, mid), PEER)
    t.h.send_raw(wire.empty(ACK, response.mid), PEER)  # the right one, after too many guesses
    assert not t.h.server.peer_verified(PEER[0])


def test_message_ids_towards_different_peers_are_offset_by_a_secret() -> None:
    guard = PeerGuard(lambda: 0.0)
    offsets = {guard.mid_offset(f"2001:db8::{n}") for n in range(32)}
    assert len(offsets) > 24  # per-address, not one global sequence an attacker could read
    assert PeerGuard(lambda: 0.0).mid_offset("2001:db8::1") != guard.mid_offset("2001:db8::1") or \
        PeerGuard(lambda: 0.0).mid_offset("2001:db8::2") != guard.mid_offset("2001:db8::2")


def test_security_context_verifies() -> None:
    t, _ = make()
    server = t.h.server
    request = Request(method=Code.GET, path=("big",), security=Security("oscore", "01"))
    assert not server.peer_verified(PEER[0])

    class Incoming:
        addr = PEER
        block2 = None
        block1 = None
        token = b""
        mtype = CON
    assert server._gate(Incoming(), request) is False  # type: ignore[arg-type]
    assert server.peer_verified(PEER[0])


def test_observe_registration_of_unverified_peer_is_confirmable_and_its_ack_verifies() -> None:
    t, resources = make()
    small: Small = resources["small"]  # type: ignore[assignment]
    replies = t.send(Code.GET, ["small"], token=b"o", options=[(OptionNumber.OBSERVE, b"")])
    assert [(m.mtype, m.code) for m in replies] == [(ACK, 0), (CON, Code.CONTENT)]
    assert option(replies[1], OptionNumber.OBSERVE) is not None
    t.h.send_raw(wire.empty(ACK, replies[1].mid), PEER)
    assert t.h.server.peer_verified(PEER[0])
    small.value = 1
    small.notify_observers()
    [note] = t.h.replies()
    assert (note.mtype, note.payload) == (NON, b"1")


def test_observer_that_never_acks_gets_notifications_only_within_budget() -> None:
    t, resources = make()
    big: Big = resources["big"]  # type: ignore[assignment]
    t.send(Code.GET, ["big"], token=b"o", options=[(OptionNumber.OBSERVE, b"")])
    for _ in range(5):
        big.notify_observers()
        t.h.advance(100)
    assert t.ratio_ok(PEER[0])
    assert t.h.server.observer_count() == 0  # a notification that cannot be sent ends the observation


def test_discovery_rate_per_address_answers_4_29_with_max_age() -> None:
    t, _ = make(CoapSettings(discovery_rate=1.0, discovery_burst=3))
    t.h.verify_peers = True  # the rate applies whatever the verification
    codes = [t.send(Code.GET, [".well-known", "core"], token=b"\x01")[0].code for _ in range(4)]
    assert codes == [Code.CONTENT] * 3 + [Code.TOO_MANY_REQUESTS]
    [limited] = t.send(Code.GET, [".well-known", "core"], token=b"\x01")
    assert decode_uint(option(limited, OptionNumber.MAX_AGE) or b"") >= 1
    [other] = t.send(Code.GET, [".well-known", "core"], token=b"\x01", peer=("2001:db8::9", 5))
    assert other.code == Code.CONTENT
    t.h.clock.advance(1.0)
    assert t.send(Code.GET, [".well-known", "core"], token=b"\x01")[0].code == Code.CONTENT
    assert t.send(Code.GET, ["small"], token=b"\x01")[0].code == Code.CONTENT  # other paths: not limited


def test_injected_discovery_paths_are_limited_too() -> None:
    t, _ = make(CoapSettings(discovery_rate=1.0, discovery_burst=1), discovery_paths=[("small",)])
    codes = [t.send(Code.GET, ["small"], token=b"\x01")[0].code for _ in range(2)]
    assert codes == [Code.CONTENT, Code.TOO_MANY_REQUESTS]


def test_peer_table_is_bounded() -> None:
    t, _ = make(CoapSettings(peer_table_capacity=8))
    for n in range(50):
        t.send(Code.GET, ["small"], token=b"\x01", peer=(f"10.0.0.{n}", 1))
    assert len(t.h.server._peers) == 8


def test_verification_expires() -> None:
    t, _ = make(CoapSettings(verified_lifetime=100.0))
    t.h.server.verify_peer(PEER[0])
    t.h.clock.advance(101)
    assert not t.h.server.peer_verified(PEER[0])


def test_budget_holds_for_duplicates_and_many_requests() -> None:
    t, _ = make()
    for n in range(20):
        t.send(Code.GET, ["big"], token=bytes([n]), mid=7)  # one MID: duplicates replay the answer
    assert t.ratio_ok(PEER[0])


@pytest.mark.parametrize("key, value", [("amplification_factor", 0.5), ("discovery_rate", 0),
                                        ("discovery_burst", 0), ("peer_table_capacity", 0)])
def test_coap_keys_are_validated(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=r"\[coap\]"):
        _coap_settings({key: value})


def test_coap_keys_are_accepted() -> None:
    settings = _coap_settings({"amplification_factor": 2, "verified_lifetime": 600, "echo_lifetime": 30,
                               "peer_table_capacity": 100, "discovery_rate": 0.5, "discovery_burst": 4})
    assert settings.amplification_factor == 2.0 and settings.discovery_burst == 4


def test_echo_values_are_bound_to_address_and_time() -> None:
    now = [1000.0]
    guard = PeerGuard(lambda: now[0], echo_lifetime=10)
    value = guard.echo_value("fe80::1%lowpan0")
    assert len(value) == 10 and guard.echo_valid("fe80::1%lowpan0", value)
    assert not guard.echo_valid("fe80::2%lowpan0", value)
    now[0] += 11
    assert not guard.echo_valid("fe80::1%lowpan0", value)
