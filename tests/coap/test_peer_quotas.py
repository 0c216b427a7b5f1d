"""Per-peer shares of the CoAP layer's bounded tables: Observe registrations and Block1 uploads.

One peer (by default a source address; the gateway injects a per-device key)
may hold only its share of each table, and a full table refuses the newcomer:
nobody already in it is evicted.
"""

from __future__ import annotations

from typing import Any

from comatrix.coap import wire
from comatrix.coap.blockwise import Block
from comatrix.coap.errors import decode_uint
from comatrix.coap.message import Peer, Request, Response
from comatrix.coap.numbers import Code, ContentFormat, OptionNumber
from comatrix.coap.resource import CoapResource, LinkAttributes
from comatrix.coap.amplification import ECHO
from comatrix.coap.server import CoapSettings, Site, address_key
from comatrix.coap.testing import Harness, option

BLOCK1, OBSERVE, MAX_AGE = OptionNumber.BLOCK1, OptionNumber.OBSERVE, OptionNumber.MAX_AGE


class Counter(CoapResource):
    link = LinkAttributes(rt="counter", obs=True)

    def __init__(self) -> None:
        super().__init__()
        self.value = 0

    def render_GET(self, request: Request) -> Response:
        return Response(payload=str(self.value).encode(), content_format=ContentFormat.TEXT_PLAIN)


class Upload(CoapResource):
    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def render_PUT(self, request: Request) -> Response:
        self.bodies.append(request.payload)
        return Response(code=Code.CHANGED)


def harness(settings: CoapSettings, **kwargs: Any) -> tuple[Harness, Counter, Upload]:
    site, counter, upload = Site(), Counter(), Upload()
    site.put(("counter",), counter)
    site.put(("up",), upload)
    return Harness(site, settings, **kwargs), counter, upload


def peer(n: int) -> tuple[str, int]:
    return (f"2001:db8::{n:x}", 40000 + n)


def observe(h: Harness, who: tuple[str, int], token: bytes) -> bool:
    """Register; whether the answer carried Observe (the registration took)."""
    [reply] = h.send(Code.GET, ["counter"], token=token, options=[(OBSERVE, b"")], peer=who)
    assert reply.code == Code.CONTENT
    return option(reply, OBSERVE) is not None


def notified(h: Harness, counter: Counter) -> set[tuple[Any, bytes]]:
    """(address, token) of every notification one change sends."""
    start = len(h.transport.written)
    counter.value += 1
    counter.notify_observers()
    h.replies()
    return {(addr, wire.decode(data).token) for data, addr in h.transport.written[start:]}


# ---------------------------------------------------------------- observers


def test_one_peer_cannot_take_more_than_its_share_of_observers() -> None:
    h, counter, _ = harness(CoapSettings(max_observers=8, max_observers_per_peer=2))
    greedy, other = peer(1), peer(2)
    assert observe(h, greedy, b"a") and observe(h, greedy, b"b")
    assert not observe(h, greedy, b"c")                     # beyond its share: answered, not registered
    assert not observe(h, (greedy[0], greedy[1] + 1), b"d")  # another port of the same address: same share
    assert observe(h, greedy, b"a")                          # re-registering an observation it holds is fine
    assert observe(h, other, b"a") and observe(h, other, b"b")
    assert h.server.observer_count() == 4
    assert notified(h, counter) == {(greedy, b"a"), (greedy, b"b"), (other, b"a"), (other, b"b")}

    [cancelled] = h.send(Code.GET, ["counter"], token=b"b", options=[(OBSERVE, b"\x01")], peer=greedy)
    assert option(cancelled, OBSERVE) is None
    assert observe(h, greedy, b"c")  # a freed place of its share can be taken again


def test_a_full_table_refuses_the_newcomer_and_keeps_everyone_in_it() -> None:
    h, counter, _ = harness(CoapSettings(max_observers=4, max_observers_per_peer=2))
    for n in (1, 2):
        assert observe(h, peer(n), b"x") and observe(h, peer(n), b"y")
    assert not observe(h, peer(3), b"x")
    assert h.server.observer_count() == 4
    assert {addr for addr, _ in notified(h, counter)} == {peer(1), peer(2)}


def test_shares_follow_the_injected_peer_key() -> None:
    # The gateway injects its device key; here a key that makes one device of a whole /64.
    def by_prefix(request: Request) -> Any:
        return request.peer.host.rsplit(":", 1)[0]

    h, counter, _ = harness(CoapSettings(max_observers=8, max_observers_per_peer=2), peer_key=by_prefix)
    assert h.server.peer_key is by_prefix
    same_device = [("2001:db8::1", 1000), ("2001:db8::2", 1000), ("2001:db8::3", 1000)]
    assert observe(h, same_device[0], b"a") and observe(h, same_device[1], b"a")
    assert not observe(h, same_device[2], b"a")
    assert observe(h, ("2001:db8:1::1", 1000), b"a")
    assert h.server.observer_count() == 3
    assert address_key(Request(Code.GET, (), peer=Peer("fe80::1%lowpan0", 5683))) == "fe80::1%lowpan0"


# ---------------------------------------------------------------- Block1 uploads


def block1(h: Harness, who: tuple[str, int], token: bytes, num: int, more: bool,
           payload: bytes = b"x" * 16) -> wire.Datagram:
    """One Block1 block of 16 bytes (SZX 0): about 30 bytes on the wire, as a flood would send."""
    [reply] = h.send(Code.PUT, ["up"], token=token, payload=payload, peer=who,
                     options=[(BLOCK1, Block(num, more, 0).encode())])
    return reply


def test_a_flood_of_upload_starts_never_evicts_an_upload_in_progress() -> None:
    settings = CoapSettings()  # 256 upload slots, 4 per peer
    h, _, upload = harness(settings)
    device = ("2001:db8:1::1", 5683)
    assert block1(h, device, b"up", 0, True, b"a" * 16).code == Code.CONTINUE
    assert block1(h, device, b"up", 1, True, b"b" * 16).code == Code.CONTINUE

    codes: dict[int, int] = {}
    max_ages = set()
    for n in range(1, 257):  # 256 unauthenticated 30-byte starts, each from its own address
        reply = block1(h, peer(n), bytes([n & 0xFF]), 0, True)
        codes[reply.code] = codes.get(reply.code, 0) + 1
        if reply.code == Code.SERVICE_UNAVAILABLE:
            max_ages.add(decode_uint(option(reply, MAX_AGE) or b""))
    assert codes == {Code.CONTINUE: 255, Code.SERVICE_UNAVAILABLE: 1}
    assert max_ages and all(1 <= age <= settings.exchange_lifetime + 1 for age in max_ages)

    done = block1(h, device, b"up", 2, False, b"c")
    assert done.code == Code.CHANGED and upload.bodies == [b"a" * 16 + b"b" * 16 + b"c"]
    assert block1(h, peer(999), b"n", 0, True).code == Code.CONTINUE  # the slot it freed


def test_forged_starts_fill_half_the_table_and_a_real_device_gets_in_through_echo() -> None:
    # Unverified addresses (anyone can forge them) hold at most half of the upload slots; past
    # that a newcomer is challenged with Echo, which a real device answers and a forger cannot.
    h, _, upload = harness(CoapSettings(blockwise_state_capacity=16), verify_peers=False)
    codes = [block1(h, peer(n), b"f", 0, True).code for n in range(1, 13)]
    assert codes == [Code.CONTINUE] * 8 + [Code.UNAUTHORIZED] * 4
    device = ("2001:db8:1::1", 5683)
    challenge = block1(h, device, b"d", 0, True, b"a" * 16)
    echo = option(challenge, ECHO)
    assert challenge.code == Code.UNAUTHORIZED and echo is not None
    [again] = h.send(Code.PUT, ["up"], token=b"d", payload=b"a" * 16, peer=device,
                     options=[(BLOCK1, Block(0, True, 0).encode()), (ECHO, echo)])
    assert again.code == Code.CONTINUE
    assert block1(h, device, b"d", 1, False, b"b").code == Code.CHANGED
    assert upload.bodies == [b"a" * 16 + b"b"]
    # The forged ones still hold their half: nobody was evicted for the device.
    assert sum(1 for _ in h.server._uploads.expiries()) == 8


def test_abandoned_uploads_still_expire_and_free_their_slots() -> None:
    settings = CoapSettings(blockwise_state_capacity=4, max_uploads_per_peer=1)
    h, _, upload = harness(settings)
    for n in range(1, 5):
        assert block1(h, peer(n), b"t", 0, True).code == Code.CONTINUE
    refused = block1(h, peer(5), b"t", 0, True)
    assert refused.code == Code.SERVICE_UNAVAILABLE
    wait = decode_uint(option(refused, MAX_AGE) or b"")
    assert 1 <= wait <= settings.exchange_lifetime + 1
    h.advance(wait)
    assert block1(h, peer(5), b"t", 0, True).code == Code.CONTINUE
    assert block1(h, peer(5), b"t", 1, False, b"!").code == Code.CHANGED
    assert upload.bodies == [b"x" * 16 + b"!"]
    assert block1(h, peer(1), b"t", 1, False).code == Code.REQUEST_ENTITY_INCOMPLETE  # expired: restart


def test_one_peer_gets_only_its_share_of_concurrent_uploads() -> None:
    h, _, upload = harness(CoapSettings(blockwise_state_capacity=16, max_uploads_per_peer=2))
    greedy = peer(1)
    assert block1(h, greedy, b"1", 0, True).code == Code.CONTINUE
    assert block1(h, greedy, b"2", 0, True).code == Code.CONTINUE
    refused = block1(h, greedy, b"3", 0, True)
    assert refused.code == Code.TOO_MANY_REQUESTS and decode_uint(option(refused, MAX_AGE) or b"") >= 1
    assert block1(h, greedy, b"1", 0, True).code == Code.CONTINUE   # restarting one it holds is fine
    assert block1(h, peer(2), b"3", 0, True).code == Code.CONTINUE  # another peer has its own share
    assert block1(h, greedy, b"1", 1, False, b"!").code == Code.CHANGED
    assert block1(h, greedy, b"3", 0, True).code == Code.CONTINUE   # the finished one freed a place
    assert upload.bodies == [b"x" * 16 + b"!"]
