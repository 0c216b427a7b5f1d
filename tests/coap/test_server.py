"""CoapServer unit tests: message layer, dedup, CON/NON, block-wise, Observe, shutdown, hooks."""

from __future__ import annotations

import gc
from typing import Any

from twisted.internet import defer
from twisted.logger import globalLogPublisher

from comatrix.coap import wire
from comatrix.coap.blockwise import Block, etag_for
from comatrix.coap.errors import NotAcceptable, decode_uint
from comatrix.coap.message import Request, Response
from comatrix.coap.numbers import Code, ContentFormat, MessageType, OptionNumber
from comatrix.coap.resource import CoapResource, LinkAttributes
from comatrix.coap.server import REQUEST_TAG, CoapSettings, Site
from comatrix.coap.testing import DEFAULT_PEER, PendingResource, Harness, option

CON, NON, ACK, RST = MessageType.CON, MessageType.NON, MessageType.ACK, MessageType.RST


class Counter(CoapResource):
    link = LinkAttributes(rt="counter", obs=True)

    def __init__(self) -> None:
        super().__init__()
        self.value = 0
        self.renders = 0

    def render_GET(self, request: Request) -> Response:
        self.renders += 1
        if self.value < 0:
            raise NotAcceptable("negative")
        return Response(payload=str(self.value).encode(), content_format=ContentFormat.TEXT_PLAIN)


class Store(CoapResource):
    def __init__(self, body: bytes = b"") -> None:
        super().__init__()
        self.body = body
        self.requests: list[Request] = []

    def render_GET(self, request: Request) -> Response:
        self.requests.append(request)
        return Response(payload=self.body, content_format=ContentFormat.OCTET_STREAM)

    def render_PUT(self, request: Request) -> Response:
        self.requests.append(request)
        self.body = request.payload
        return Response(code=Code.CHANGED)

    def render_POST(self, request: Request) -> Response:
        self.requests.append(request)
        return Response(code=Code.CHANGED, payload=request.payload)


Deferring = PendingResource


def make(settings: CoapSettings = CoapSettings(), **kwargs: Any) -> tuple[Harness, dict[str, CoapResource]]:
    resources: dict[str, CoapResource] = {"counter": Counter(), "store": Store(bytes(range(256)) * 12),
                                          "slow": Deferring()}
    site = Site()
    for name, resource in resources.items():
        site.put((name,), resource)
    return Harness(site, settings, **kwargs), resources


def block(message: wire.Datagram, number: int = OptionNumber.BLOCK2) -> Block:
    raw = option(message, number)
    assert raw is not None
    return Block.decode(raw)


# ---------------------------------------------------------------- message layer


def test_con_piggybacked_when_fast() -> None:
    h, _ = make()
    [reply] = h.send(Code.GET, ["counter"], mid=42, token=b"tok")
    assert (reply.mtype, reply.mid, reply.token, reply.code, reply.payload) == (ACK, 42, b"tok", Code.CONTENT, b"0")
    assert h.clock.getDelayedCalls() == []


def test_con_separate_response_retransmitted_until_acked() -> None:
    h, resources = make()
    assert h.send(Code.GET, ["slow"], mid=5, token=b"t") == []
    [ack] = h.advance(0.1)
    assert (ack.mtype, ack.code, ack.mid) == (ACK, 0, 5)
    resources["slow"].pending[0].callback(Response(payload=b"late"))  # type: ignore[attr-defined]
    [response] = h.replies()
    assert (response.mtype, response.code, response.token, response.payload) == (CON, Code.CONTENT, b"t", b"late")
    [again] = h.advance(3.0)
    assert again.mid == response.mid
    h.send_raw(wire.empty(ACK, response.mid))
    assert h.advance(100) == []
    assert h.clock.getDelayedCalls() == []


def test_a_forgotten_peer_gets_no_retransmission_and_no_late_answer() -> None:
    # A security session ended (comatrix.dtls): nothing of it may reach the next one from that address.
    h, resources = make()
    slow = resources["slow"]
    h.send(Code.GET, ["slow"], mid=5, token=b"t")
    h.advance(0.1)
    slow.pending[0].callback(Response(payload=b"late"))  # type: ignore[attr-defined]
    [response] = h.replies()
    assert response.mtype == CON
    h.send(Code.GET, ["slow"], mid=6, token=b"u")  # still being answered when the session ends
    h.replies()
    h.server.forget_peer(DEFAULT_PEER)
    assert h.server.in_flight() == 0
    slow.pending[1].callback(Response(payload=b"too late"))  # type: ignore[attr-defined]
    assert h.advance(100) == []
    assert h.clock.getDelayedCalls() == []


def test_separate_responses_respect_nstart_per_peer() -> None:
    h, resources = make()
    slow: Deferring = resources["slow"]  # type: ignore[assignment]
    h.send(Code.GET, ["slow"], token=b"1")
    h.send(Code.GET, ["slow"], token=b"2")
    assert len(h.advance(0.2)) == 2  # two empty ACKs
    slow.pending[0].callback(Response(payload=b"a"))
    slow.pending[1].callback(Response(payload=b"b"))
    [first] = h.replies()  # the second waits for the first to be acknowledged
    [second] = h.send_raw(wire.empty(ACK, first.mid))
    assert (first.token, second.token) == (b"1", b"2")


def test_duplicate_con_gets_same_response_and_is_not_rendered_twice() -> None:
    h, resources = make()
    counter: Counter = resources["counter"]  # type: ignore[assignment]
    data = wire.encode(CON, Code.GET, 9, b"x", [(11, b"counter")])
    first = h.send_raw(data)
    counter.value = 7
    again = h.send_raw(data)
    assert first == again and counter.renders == 1
    assert h.send_raw(data, peer=("2001:db8::2", 40000))[0].payload == b"7"  # other peer, new exchange


def test_duplicate_con_while_pending_gets_nothing_then_empty_ack() -> None:
    h, _ = make()
    data = wire.encode(CON, Code.GET, 9, b"x", [(11, b"slow")])
    h.send_raw(data)
    assert h.send_raw(data) == []
    [ack] = h.advance(0.1)
    assert h.send_raw(data) == [ack]


def test_duplicate_non_ignored() -> None:
    h, _ = make()
    data = wire.encode(NON, Code.GET, 9, b"x", [(11, b"counter")])
    assert len(h.send_raw(data)) == 1
    assert h.send_raw(data) == []


def test_dedup_entries_expire_after_exchange_lifetime() -> None:
    h, resources = make()
    data = wire.encode(CON, Code.GET, 9, b"x", [(11, b"counter")])
    h.send_raw(data)
    h.clock.advance(CoapSettings().exchange_lifetime + 1)
    resources["counter"].value = 3  # type: ignore[attr-defined]
    h.send(Code.GET, ["counter"], mid=10)  # any insert sweeps expired entries
    assert h.send_raw(data)[0].payload == b"3"


def test_ping_gets_rst_and_responses_get_rst_or_silence() -> None:
    h, _ = make()
    [rst] = h.send_raw(bytes([0x40, 0, 0, 77]))  # empty CON = ping
    assert (rst.mtype, rst.mid) == (RST, 77)
    [rst] = h.send_raw(wire.encode(CON, Code.CONTENT, 78, b"t"))
    assert (rst.mtype, rst.mid) == (RST, 78)
    assert h.send_raw(wire.encode(NON, Code.CONTENT, 79, b"t")) == []
    assert h.send_raw(wire.encode(ACK, Code.GET, 80, b"t")) == []  # request in an ACK: ignored
    assert h.send_raw(bytes([0x80, 1, 0, 1])) == []  # version 2: silently ignored


def test_proxy_options_get_5_05_unless_the_resource_takes_them() -> None:
    harness, resources = make()
    for proxy in [(OptionNumber.PROXY_URI, b"coap://other.example/store"), (OptionNumber.PROXY_SCHEME, b"coap")]:
        [reply] = harness.send(Code.GET, ("store",), options=[proxy])
        assert reply.code == Code.PROXYING_NOT_SUPPORTED
    assert resources["store"].requests == []  # type: ignore[attr-defined]
    resources["store"].accepts_proxy_uri = True
    [reply] = harness.send(Code.GET, ("store",), options=[(OptionNumber.PROXY_URI, b"coap://x/y")])
    assert reply.code == Code.CONTENT and len(resources["store"].requests) == 1  # type: ignore[attr-defined]


def test_unknown_method_gets_4_05_and_missing_resource_4_04() -> None:
    h, _ = make()
    [reply] = h.send(9, ["counter"])
    assert reply.code == Code.METHOD_NOT_ALLOWED
    [reply] = h.send(Code.DELETE, ["counter"])
    assert reply.code == Code.METHOD_NOT_ALLOWED
    [reply] = h.send(Code.GET, ["nope"])
    assert reply.code == Code.NOT_FOUND


def test_critical_options_and_understood_options() -> None:
    h, resources = make(understood_options=frozenset({257}))
    [reply] = h.send(Code.GET, ["store"], options=[(257, b"\x01"), (256, b"token")])
    assert reply.code == Code.CONTENT
    seen = resources["store"].requests[-1]  # type: ignore[attr-defined]
    assert seen.option(256) == b"token" and seen.option(257) == b"\x01"
    [reply] = h.send(Code.GET, ["store"], options=[(259, b"")])
    assert reply.code == Code.BAD_OPTION
    [reply] = h.send(Code.GET, ["store"], options=[(17, b"\x00"), (17, b"\x32")])  # repeated Accept
    assert reply.code == Code.BAD_OPTION
    [reply] = h.send(Code.GET, ["store"], options=[(17, b"\x00\x00\x01")])  # Accept too long
    assert reply.code == Code.BAD_OPTION
    [reply] = h.send(Code.GET, [], options=[(11, b"\xff")])  # Uri-Path not UTF-8
    assert reply.code == Code.BAD_REQUEST


def test_on_response_hook_called_once_per_request() -> None:
    calls: list[tuple[Request, Response, float]] = []
    h, resources = make(on_response=lambda req, resp, ms: calls.append((req, resp, ms)))
    h.send(Code.GET, ["counter"])
    h.send(Code.GET, ["nope"])
    h.send(Code.GET, ["slow"])
    h.advance(1.5)
    resources["slow"].pending[0].callback(Response(payload=b"x"))  # type: ignore[attr-defined]
    assert [(c[0].path, c[1].code) for c in calls] == [
        (("counter",), Code.CONTENT), (("nope",), Code.NOT_FOUND), (("slow",), Code.CONTENT)]
    assert calls[2][2] == 1500.0


def test_stop_accepting_and_wait_idle() -> None:
    h, resources = make()
    slow: Deferring = resources["slow"]  # type: ignore[assignment]
    h.send(Code.GET, ["slow"], mtype=NON, token=b"a")
    h.send(Code.GET, ["slow"], mtype=NON, token=b"b")
    assert h.server.in_flight() == 2
    h.server.stop_accepting()
    [refused] = h.send(Code.GET, ["counter"], mtype=NON)
    assert refused.code == Code.SERVICE_UNAVAILABLE
    done: list[None] = []
    h.server.wait_idle(10).addCallback(done.append)
    slow.pending[0].callback(Response(payload=b"ok"))
    assert h.replies()[0].payload == b"ok" and not done
    [late] = h.advance(10)
    assert (late.token, late.code) == (b"b", Code.SERVICE_UNAVAILABLE) and done == [None]
    assert h.server.in_flight() == 0
    slow.pending[1].callback(Response(payload=b"too late"))
    assert h.replies() == []


def test_retransmission_parameters_come_from_settings() -> None:
    h, resources = make(CoapSettings(ack_timeout=1.0, ack_random_factor=1.0, max_retransmit=1, empty_ack_delay=0.5))
    h.send(Code.GET, ["slow"])
    assert h.advance(0.4) == []
    assert len(h.advance(0.1)) == 1
    resources["slow"].pending[0].callback(Response())  # type: ignore[attr-defined]
    assert len(h.replies()) == 1
    assert len(h.advance(1.0)) == 1
    assert h.advance(2.0) == [] and h.server._outgoing == {}


# ---------------------------------------------------------------- block-wise


def test_block2_default_size_size2_and_etag() -> None:
    h, resources = make()
    body = resources["store"].body  # type: ignore[attr-defined]
    [first] = h.send(Code.GET, ["store"])
    assert block(first) == Block(0, True, 6) and first.payload == body[:1024]
    assert decode_uint(option(first, OptionNumber.SIZE2) or b"") == len(body)
    assert option(first, OptionNumber.ETAG) == etag_for(body, ContentFormat.OCTET_STREAM)
    parts = [first.payload]
    for num in (1, 2):
        [reply] = h.send(Code.GET, ["store"], options=[(23, Block(num, False, 6).encode())])
        assert option(reply, OptionNumber.ETAG) == option(first, OptionNumber.ETAG)
        assert option(reply, OptionNumber.SIZE2) is None
        parts.append(reply.payload)
    assert block(reply).more is False and b"".join(parts) == body


def test_block2_every_size_and_smaller_follow_up() -> None:
    h, resources = make()
    body = resources["store"].body  # type: ignore[attr-defined]
    for szx in range(7):
        size = 16 << szx
        [reply] = h.send(Code.GET, ["store"], options=[(23, Block(0, False, szx).encode())])
        assert block(reply) == Block(0, True, szx) and len(reply.payload) == size
    [reply] = h.send(Code.GET, ["store"], options=[(23, Block(3, False, 4).encode())])
    assert reply.payload == body[768:1024]
    [reply] = h.send(Code.GET, ["store"], options=[(23, Block(9999, False, 4).encode())])
    assert reply.code == Code.BAD_OPTION



def test_block2_follow_ups_served_from_kept_representation_until_block0_again() -> None:
    h, resources = make()
    store: Store = resources["store"]  # type: ignore[assignment]
    old = store.body
    h.send(Code.GET, ["store"])
    store.body = b"n" * 3000
    [reply] = h.send(Code.GET, ["store"], options=[(23, Block(1, False, 6).encode())])
    assert reply.payload == old[1024:2048] and len(store.requests) == 1
    [reply] = h.send(Code.GET, ["store"], options=[(23, Block(0, False, 6).encode())])
    assert reply.payload == b"n" * 1024


def test_small_response_with_size2_request_and_block2() -> None:
    h, _ = make()
    [reply] = h.send(Code.GET, ["counter"], options=[(23, Block(0, False, 2).encode()), (28, b"")])
    assert block(reply) == Block(0, False, 2) and decode_uint(option(reply, 28) or b"") == 1


def test_block1_upload_then_block2_download_in_one_exchange() -> None:
    h, resources = make()
    data = bytes(range(200))
    replies = []
    for num in range(4):
        chunk = data[num * 64:(num + 1) * 64]
        more = (num + 1) * 64 < len(data)
        [reply] = h.send(Code.POST, ["store"], token=b"up", payload=chunk,
                         options=[(27, Block(num, more, 2).encode()), (23, Block(0, False, 2).encode())])
        replies.append(reply)
    assert [r.code for r in replies] == [Code.CONTINUE] * 3 + [Code.CHANGED]
    assert block(replies[-1], OptionNumber.BLOCK1) == Block(3, False, 2)
    assert block(replies[-1]) == Block(0, True, 2) and replies[-1].payload == data[:64]
    [reply] = h.send(Code.POST, ["store"], token=b"up2", options=[(23, Block(1, False, 2).encode())])
    assert reply.payload == data[64:128] and len(resources["store"].requests) == 1  # type: ignore[attr-defined]


def test_block1_out_of_order_gets_4_08_and_size_change_allowed() -> None:
    h, resources = make()
    [reply] = h.send(Code.PUT, ["store"], payload=b"x" * 16, options=[(27, Block(1, True, 0).encode())])
    assert reply.code == Code.REQUEST_ENTITY_INCOMPLETE
    h.send(Code.PUT, ["store"], payload=b"a" * 64, options=[(27, Block(0, True, 2).encode())])
    [reply] = h.send(Code.PUT, ["store"], payload=b"b" * 16, options=[(27, Block(5, True, 0).encode())])
    assert reply.code == Code.REQUEST_ENTITY_INCOMPLETE  # offset 80 != 64
    h.send(Code.PUT, ["store"], payload=b"a" * 64, options=[(27, Block(0, True, 2).encode())])
    [reply] = h.send(Code.PUT, ["store"], payload=b"b" * 16, options=[(27, Block(4, False, 0).encode())])
    assert reply.code == Code.CHANGED and resources["store"].body == b"a" * 64 + b"b" * 16  # type: ignore[attr-defined]


def test_block1_token_change_between_blocks_and_request_tag() -> None:
    h, resources = make()
    h.send(Code.PUT, ["store"], token=b"1", payload=b"a" * 16, options=[(27, Block(0, True, 0).encode())])
    [reply] = h.send(Code.PUT, ["store"], token=b"2", payload=b"b", options=[(27, Block(1, False, 0).encode())])
    assert reply.code == Code.CHANGED and resources["store"].body == b"a" * 16 + b"b"  # type: ignore[attr-defined]
    for tag, fill in ((b"T1", b"c"), (b"T2", b"d")):
        h.send(Code.PUT, ["store"], token=tag, payload=fill * 16,
               options=[(27, Block(0, True, 0).encode()), (REQUEST_TAG, tag)])
    [reply] = h.send(Code.PUT, ["store"], token=b"new", payload=b"!",
                     options=[(27, Block(1, False, 0).encode()), (REQUEST_TAG, b"T1")])
    assert reply.code == Code.CHANGED and resources["store"].body == b"c" * 16 + b"!"  # type: ignore[attr-defined]


def test_block1_intermediate_block_of_wrong_size_is_bad_request() -> None:
    h, _ = make()
    [reply] = h.send(Code.PUT, ["store"], payload=b"x" * 10, options=[(27, Block(0, True, 0).encode())])
    assert reply.code == Code.BAD_REQUEST


def test_blockwise_state_is_bounded() -> None:
    h, _ = make(CoapSettings(blockwise_state_capacity=8))
    for i in range(100):
        h.send(Code.PUT, ["store"], token=i.to_bytes(2, "big"), payload=b"x" * 16,
               options=[(27, Block(0, True, 0).encode())])
        h.send(Code.GET, ["store"], peer=("2001:db8::9", 1000 + i))
    assert len(h.server._uploads) <= 8 and len(h.server._representations) <= 8
    assert len(h.server._upload_index) <= 16


# ---------------------------------------------------------------- observe


def register(h: Harness, token: bytes = b"o", peer: Any = ("2001:db8::1", 40000),
             mtype: int = CON) -> wire.Datagram:
    [reply] = h.send(Code.GET, ["counter"], token=token, options=[(6, b"")], peer=peer, mtype=mtype)
    return reply


def test_observe_lifecycle_sequence_numbers_and_non_notifications() -> None:
    h, resources = make()
    counter: Counter = resources["counter"]  # type: ignore[assignment]
    reply = register(h)
    assert reply.code == Code.CONTENT and option(reply, 6) is not None
    assert h.server.observer_count(counter) == 1 and h.server.observer_count() == 1
    seqs = [decode_uint(option(reply, 6) or b"")]
    for value in (1, 2, 3):
        counter.value = value
        counter.notify_observers()
        [note] = h.replies()
        assert (note.mtype, note.token, note.payload) == (NON, b"o", str(value).encode())
        seqs.append(decode_uint(option(note, 6) or b""))
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    [reply] = h.send(Code.GET, ["counter"], token=b"o", options=[(6, b"\x01")])
    assert option(reply, 6) is None and h.server.observer_count() == 0
    counter.notify_observers()
    assert h.replies() == []


def test_rst_to_non_notification_deregisters() -> None:
    h, resources = make()
    counter: Counter = resources["counter"]  # type: ignore[assignment]
    register(h)
    counter.notify_observers()
    [note] = h.replies()
    h.send_raw(wire.empty(RST, note.mid))
    assert h.server.observer_count() == 0


def test_reregistration_same_token_replaces_and_cap_applies() -> None:
    h, resources = make(CoapSettings(max_observers=2))
    counter: Counter = resources["counter"]  # type: ignore[assignment]
    register(h, b"a")
    register(h, b"a")
    assert h.server.observer_count(counter) == 1
    register(h, b"b")
    reply = register(h, b"c")
    assert reply.code == Code.CONTENT and option(reply, 6) is None
    assert h.server.observer_count() == 2
    counter.notify_observers()
    assert sorted(m.token for m in h.replies()) == [b"a", b"b"]


def test_observe_only_for_observable_get_with_success() -> None:
    h, resources = make()
    [reply] = h.send(Code.GET, ["store"], options=[(6, b"")])
    assert option(reply, 6) is None and h.server.observer_count() == 0
    resources["counter"].value = -1  # type: ignore[attr-defined]
    reply = register(h)
    assert reply.code == Code.NOT_ACCEPTABLE and h.server.observer_count() == 0


def test_periodic_con_notification_and_ack_keeps_observer() -> None:
    h, resources = make(CoapSettings(con_notification_interval=60.0))
    counter: Counter = resources["counter"]  # type: ignore[assignment]
    register(h)
    counter.notify_observers()
    assert h.replies()[0].mtype == NON
    h.clock.advance(61)
    counter.notify_observers()
    [con] = h.replies()
    assert con.mtype == CON
    h.send_raw(wire.empty(ACK, con.mid))
    counter.notify_observers()
    assert h.replies()[0].mtype == NON and h.server.observer_count() == 1


def test_cancelling_a_wait_for_a_notification_leaves_its_delivery_alone() -> None:
    # An MSC3079 sync loop that stops mid-push cancels its wait: the CON notification still
    # completes, and no delivery Deferred is left with an unhandled failure (logged CRITICAL).
    h, resources = make(CoapSettings(con_notification_interval=0.0))
    counter: Counter = resources["counter"]  # type: ignore[assignment]
    register(h)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        waiting = h.server.notify(counter, confirmable=True)
        [con] = h.replies()
        waiting.cancel()
        outcome: list[Any] = []
        waiting.addBoth(outcome.append)
        [again] = h.advance(3.0)
        assert (again.mtype, again.mid) == (CON, con.mid)  # still retransmitted
        h.send_raw(wire.empty(ACK, con.mid))
        del waiting
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert len(outcome) == 1 and outcome[0].check(defer.CancelledError)
    assert h.server.observer_count() == 1
    assert [e for e in events if e.get("log_failure") is not None] == []


def test_newer_notification_replaces_pending_con() -> None:
    h, resources = make(CoapSettings(con_notification_interval=0.0))
    counter: Counter = resources["counter"]  # type: ignore[assignment]
    register(h)
    counter.notify_observers()
    [first] = h.replies()
    counter.value = 5
    counter.notify_observers()
    [second] = h.replies()
    assert second.mtype == CON and second.payload == b"5" and second.mid != first.mid
    assert len(h.server._outgoing) == 1
    [retransmitted] = h.advance(3.0)
    assert retransmitted.payload == b"5"


def test_large_notification_sent_as_first_block() -> None:
    h, resources = make()
    store = resources["store"]
    store.link = LinkAttributes(obs=True)
    [reply] = h.send(Code.GET, ["store"], token=b"s", options=[(6, b""), (23, Block(0, False, 2).encode())])
    assert option(reply, 6) is not None and block(reply) == Block(0, True, 2)
    store.body = b"z" * 300  # type: ignore[attr-defined]
    store.notify_observers()
    [note] = h.replies()
    assert block(note) == Block(0, True, 2) and note.payload == b"z" * 64 and option(note, 6) is not None
    [rest] = h.send(Code.GET, ["store"], token=b"t", options=[(23, Block(1, False, 2).encode())])
    assert rest.payload == b"z" * 64 and option(rest, OptionNumber.ETAG) == option(note, OptionNumber.ETAG)


def test_error_response_to_block_request_is_not_replaced_by_block_error() -> None:
    h, _ = make()
    [reply] = h.send(Code.GET, ["nope"], options=[(23, Block(3, False, 2).encode())])
    assert reply.code == Code.NOT_FOUND and option(reply, 23) is None


def test_continue_carries_no_block2() -> None:
    h, _ = make()
    [reply] = h.send(Code.PUT, ["store"], payload=b"x" * 16,
                     options=[(27, Block(0, True, 0).encode()), (23, Block(0, False, 0).encode())])
    assert reply.code == Code.CONTINUE and option(reply, 23) is None


# ---------------------------------------------------------------- No-Response (RFC 7967)

NOT_2XX, NOT_4XX = b"\x02", b"\x08"


def test_no_response_non_send_gets_nothing_on_success_but_errors_still_arrive() -> None:
    h, resources = make()
    store: Store = resources["store"]  # type: ignore[assignment]
    assert h.send(Code.POST, ["store"], mtype=NON, payload=b"21.5",
                  options=[(OptionNumber.NO_RESPONSE, NOT_2XX)]) == []
    assert store.requests[-1].payload == b"21.5"  # rendered, only the answer was left out
    [error] = h.send(Code.POST, ["nowhere"], mtype=NON, options=[(OptionNumber.NO_RESPONSE, NOT_2XX)])
    assert error.code == Code.NOT_FOUND
    assert h.send(Code.POST, ["nowhere"], mtype=NON, options=[(OptionNumber.NO_RESPONSE, NOT_4XX)]) == []


def test_no_response_con_still_gets_its_ack_once_and_again_for_a_duplicate() -> None:
    h, resources = make()
    data = wire.encode(CON, Code.POST, 77, b"n", [(11, b"store"), (OptionNumber.NO_RESPONSE, NOT_2XX)], b"x")
    [ack] = h.send_raw(data)
    assert (ack.mtype, ack.code, ack.mid, ack.payload) == (ACK, Code.EMPTY, 77, b"")
    assert h.send_raw(data) == [ack]
    assert len(resources["store"].requests) == 1  # type: ignore[attr-defined]


def test_no_response_separate_answer_is_left_out_after_the_empty_ack() -> None:
    h, resources = make()
    assert h.send(Code.GET, ["slow"], token=b"s", options=[(OptionNumber.NO_RESPONSE, NOT_2XX)]) == []
    [ack] = h.advance(0.1)
    assert (ack.mtype, ack.code) == (ACK, Code.EMPTY)
    resources["slow"].pending[0].callback(Response(payload=b"late"))  # type: ignore[attr-defined]
    assert h.replies() == [] and h.advance(100) == []


def test_no_response_is_ignored_on_an_observe_registration() -> None:
    h, _ = make()
    [reply] = h.send(Code.GET, ["counter"], options=[(OptionNumber.OBSERVE, b""), (OptionNumber.NO_RESPONSE, NOT_2XX)])
    assert reply.code == Code.CONTENT and option(reply, OptionNumber.OBSERVE) is not None
