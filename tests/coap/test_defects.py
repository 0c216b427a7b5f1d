"""One test per txThings 0.3.0 defect (facts §7): each would fail on plain txThings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet import defer

from comatrix.coap import wire
from comatrix.coap._txthings import txcoap
from comatrix.coap.blockwise import Block
from comatrix.coap.errors import BadGateway, decode_uint
from comatrix.coap.message import Request, Response
from comatrix.coap.numbers import Code, ContentFormat, MessageType, OptionNumber
from comatrix.coap.resource import CoapResource, LinkAttributes
from comatrix.coap.server import CoapSettings, Site
from comatrix.coap.testing import PendingResource, Harness, option

CON, NON, ACK, RST = MessageType.CON, MessageType.NON, MessageType.ACK, MessageType.RST


class Raises(CoapResource):
    def render_GET(self, request: Request) -> Response:
        raise RuntimeError("boom")


class FailsLater(CoapResource):
    def __init__(self) -> None:
        super().__init__()
        self.pending: defer.Deferred[Response] = defer.Deferred()

    def render_GET(self, request: Request) -> "defer.Deferred[Response]":
        return self.pending


class ReturnsStr(CoapResource):
    def render_GET(self, request: Request) -> str:
        return "text"


class Echo(CoapResource):
    link = LinkAttributes(rt="echo", ct=(ContentFormat.TEXT_PLAIN, ContentFormat.JSON), obs=True)

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Request] = []
        self.value = b"v"

    def render_GET(self, request: Request) -> Response:
        self.seen.append(request)
        return Response(payload=self.value, content_format=request.accept or 0)

    def render_POST(self, request: Request) -> Response:
        self.seen.append(request)
        return Response(code=Code.CHANGED, payload=request.payload)

    def render_PUT(self, request: Request) -> Response:
        self.seen.append(request)
        return Response(code=Code.CHANGED)


Slow = PendingResource


class Big(CoapResource):
    link = LinkAttributes(ct=(ContentFormat.OCTET_STREAM,))
    body = bytes(range(256)) * 12  # 3072 bytes

    def render_GET(self, request: Request) -> Response:
        return Response(payload=self.body, content_format=ContentFormat.OCTET_STREAM)


def harness(**resources: CoapResource) -> Harness:
    site = Site()
    for name, resource in resources.items():
        site.put(tuple(name.split("__")), resource)
    return Harness(site)


def test_defect_01_exception_in_render_gets_a_response() -> None:
    h = harness(boom=Raises())
    [reply] = h.send(Code.GET, ["boom"])
    assert (reply.mtype, reply.code) == (ACK, Code.INTERNAL_SERVER_ERROR)


def test_defect_01_deferred_failing_later_gets_separate_error_response() -> None:
    resource = FailsLater()
    h = harness(late=resource)
    assert h.send(Code.GET, ["late"], mid=7) == []
    [empty_ack] = h.advance(0.2)
    assert (empty_ack.mtype, empty_ack.code, empty_ack.mid) == (ACK, Code.EMPTY, 7)
    resource.pending.errback(BadGateway("upstream down"))
    [separate] = h.replies()
    assert (separate.mtype, separate.code, separate.token) == (CON, Code.BAD_GATEWAY, b"\x01")
    assert h.server.in_flight() == 0


def test_defect_02_str_payload_impossible() -> None:
    with pytest.raises(TypeError):
        Response(payload="text")  # type: ignore[arg-type]
    h = harness(s=ReturnsStr())
    [reply] = h.send(Code.GET, ["s"])
    assert reply.code == Code.INTERNAL_SERVER_ERROR


def test_defect_03_well_known_core_works_with_nested_paths() -> None:
    h = harness(sensors__temp=Echo())
    [reply] = h.send(Code.GET, [".well-known", "core"])
    assert reply.code == Code.CONTENT
    assert decode_uint(option(reply, OptionNumber.CONTENT_FORMAT) or b"") == ContentFormat.LINK_FORMAT
    assert reply.payload == b'</sensors/temp>;rt="echo";ct="0 50";obs'


def test_defect_04_accept_is_option_17_decoded_as_int() -> None:
    resource = Echo()
    h = harness(echo=resource)
    [reply] = h.send(Code.GET, ["echo"], options=[(17, b"\x32")])
    assert reply.code == Code.CONTENT and resource.seen[-1].accept == 50
    [reply] = h.send(Code.GET, ["echo"], options=[(17, b"\x3c")])
    assert reply.code == Code.NOT_ACCEPTABLE
    assert txcoap.options.get(17) == "Accept" and txcoap.option_formats.get(17) is None  # the defect itself


def test_defect_05_observe_1_deregisters_and_errors_remove_observers() -> None:
    resource = Echo()
    h = harness(echo=resource)
    [reply] = h.send(Code.GET, ["echo"], token=b"a", options=[(6, b"\x01")])
    assert option(reply, 6) is None and h.server.observer_count(resource) == 0
    [reply] = h.send(Code.GET, ["echo"], token=b"a", options=[(6, b"")])
    assert option(reply, 6) is not None and h.server.observer_count(resource) == 1
    [reply] = h.send(Code.GET, ["echo"], token=b"a", options=[(6, b"\x01")])
    assert h.server.observer_count(resource) == 0
    h.send(Code.GET, ["echo"], token=b"b", options=[(6, b"")])
    assert h.server.observer_count(resource) == 1
    resource.render_GET = lambda request: (_ for _ in ()).throw(BadGateway("x"))  # type: ignore[method-assign]
    resource.notify_observers()
    [notification] = h.replies()
    assert notification.code == Code.BAD_GATEWAY and option(notification, 6) is None
    assert h.server.observer_count(resource) == 0


def test_defect_06_rst_and_exhausted_con_notification_remove_observer() -> None:
    resource = Echo()
    site = Site()
    site.put(("echo",), resource)
    h = Harness(site, CoapSettings(con_notification_interval=0.0))
    h.send(Code.GET, ["echo"], token=b"a", options=[(6, b"")])
    resource.notify_observers()
    [notification] = h.replies()
    assert notification.mtype == CON
    h.send_raw(wire.empty(RST, notification.mid))
    assert h.server.observer_count(resource) == 0

    h.send(Code.GET, ["echo"], token=b"b", options=[(6, b"")])
    resource.notify_observers()
    [first] = h.replies()
    retransmissions = h.advance(3) + h.advance(6) + h.advance(12) + h.advance(24)
    assert [m.mid for m in retransmissions] == [first.mid] * 4
    assert h.server.observer_count(resource) == 1
    assert h.advance(48) == []
    assert h.server.observer_count(resource) == 0


def test_defect_07_non_request_gets_no_empty_ack() -> None:
    resource = Slow()
    h = harness(slow=resource)
    assert h.send(Code.GET, ["slow"], mtype=NON, token=b"n") == []
    assert h.advance(5) == []
    resource.pending[0].callback(Response(payload=b"done"))
    [reply] = h.replies()
    assert (reply.mtype, reply.code, reply.token, reply.payload) == (NON, Code.CONTENT, b"n", b"done")


def test_defect_08_block2_random_access_and_client_size() -> None:
    h = harness(big=Big())
    [reply] = h.send(Code.GET, ["big"], options=[(23, Block(2, False, 2).encode())])
    assert Block.decode(option(reply, 23) or b"") == Block(2, True, 2)
    assert reply.payload == Big.body[128:192]
    [reply] = h.send(Code.GET, ["big"], options=[(23, Block(1, False, 6).encode())])
    assert Block.decode(option(reply, 23) or b"") == Block(1, True, 6)
    assert reply.payload == Big.body[1024:2048]


def test_defect_09_intermediate_block1_gets_2_31_continue() -> None:
    resource = Echo()
    h = harness(echo=resource)
    [reply] = h.send(Code.POST, ["echo"], options=[(27, Block(0, True, 0).encode())], payload=b"x" * 16)
    assert reply.code == Code.CONTINUE
    assert Block.decode(option(reply, 27) or b"") == Block(0, True, 0)
    [reply] = h.send(Code.POST, ["echo"], options=[(27, Block(1, False, 0).encode())], payload=b"yy")
    assert reply.code == Code.CHANGED and reply.payload == b"x" * 16 + b"yy"


def test_defect_10_concurrent_block1_transfers_with_different_tokens_do_not_collide() -> None:
    resource = Echo()
    h = harness(echo=resource)
    first = Block(0, True, 0).encode()
    h.send(Code.POST, ["echo"], token=b"A", options=[(27, first)], payload=b"a" * 16)
    h.send(Code.POST, ["echo"], token=b"B", options=[(27, first)], payload=b"b" * 16)
    [reply_a] = h.send(Code.POST, ["echo"], token=b"A", options=[(27, Block(1, False, 0).encode())], payload=b"A")
    [reply_b] = h.send(Code.POST, ["echo"], token=b"B", options=[(27, Block(1, False, 0).encode())], payload=b"B")
    assert reply_a.payload == b"a" * 16 + b"A"
    assert reply_b.payload == b"b" * 16 + b"B"


def test_defect_11_request_without_payload_has_bytes_payload() -> None:
    resource = Echo()
    h = harness(echo=resource)
    h.send(Code.PUT, ["echo"])
    assert resource.seen[-1].payload == b"" and isinstance(resource.seen[-1].payload, bytes)


@pytest.mark.parametrize("num", [0, 1, 15, 16, 255, 256, 4095, 4096, 65535, (1 << 20) - 1])
def test_defect_12_block_option_encoding_does_not_corrupt_following_options(num: int) -> None:
    block = Block(num, True, 6)
    data = wire.encode(ACK, Code.CONTENT, 1, b"t", [(23, block.encode()), (28, b"\x10\x00")], b"p")
    message = wire.decode(data)
    assert message.options == [(23, block.encode()), (28, b"\x10\x00")]
    assert Block.decode(message.options[0][1]) == block


def test_defect_13_malformed_datagrams_do_not_raise_and_unknown_critical_gets_4_02() -> None:
    h = harness(echo=Echo())
    assert h.send_raw(b"\x40") == []  # too short, header unreadable: dropped
    [rst] = h.send_raw(bytes([0x40, 0x01, 0x12, 0x34, 0xF0]))  # CON, reserved option delta 15
    assert (rst.mtype, rst.code, rst.mid) == (RST, 0, 0x1234)
    assert h.send_raw(bytes([0x50, 0x01, 0x12, 0x35, 0xF0])) == []  # same as NON: ignored
    [reply] = h.send(Code.GET, ["echo"], options=[(9, b"")])  # OSCORE, critical, not understood
    assert reply.code == Code.BAD_OPTION
    [reply] = h.send(Code.GET, ["echo"], options=[(65000, b"x")])  # elective unknown: ignored
    assert reply.code == Code.CONTENT


def test_defect_14_location_path_segments_encode_as_utf8() -> None:
    class Creates(CoapResource):
        def render_POST(self, request: Request) -> Response:
            return Response(code=Code.CREATED, location_path=("rooms", "räum"))

    h = harness(c=Creates())
    [reply] = h.send(Code.POST, ["c"], payload=b"{}")
    assert [v for n, v in reply.options if n == OptionNumber.LOCATION_PATH] == [b"rooms", "räum".encode()]


def test_defect_15_import_is_free_of_syntax_warnings(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPYCACHEPREFIX=str(tmp_path))  # forces compilation from source
    plain = subprocess.run([sys.executable, "-W", "error::SyntaxWarning", "-c", "import txthings.coap"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0 and "SyntaxError" in plain.stderr  # the defect exists upstream
    ours = subprocess.run([sys.executable, "-W", "error::SyntaxWarning", "-c", "import comatrix.coap.server"],
                          env=dict(env, PYTHONPYCACHEPREFIX=str(tmp_path / "ours")),
                          capture_output=True, text=True, timeout=60)
    assert ours.returncode == 0, ours.stderr


def test_defect_16_dedup_cache_is_bounded_without_per_message_timers() -> None:
    site = Site()
    site.put(("echo",), Echo())
    h = Harness(site, CoapSettings(dedup_capacity=1000))
    for i in range(20_000):
        h.send(Code.GET, ["echo"], mid=i & 0xFFFF, peer=("2001:db8::1", 1024 + i // 60000 + (i % 50)))
        if i % 1000 == 0:
            assert len(h.server._dedup) <= 1000
    assert len(h.server._dedup) <= 1000
    assert len(h.clock.getDelayedCalls()) == 0
    h.transport.written.clear()


def test_defect_16_block1_reassembly_is_capped_with_4_13() -> None:
    site = Site()
    site.put(("echo",), Echo())
    h = Harness(site, CoapSettings(max_body_size=100))
    for num in range(10):  # 7 * 16 > 100
        [reply] = h.send(Code.POST, ["echo"], options=[(27, Block(num, True, 0).encode())], payload=b"x" * 16)
        if reply.code != Code.CONTINUE:
            break
    assert reply.code == Code.REQUEST_ENTITY_TOO_LARGE
    assert decode_uint(option(reply, OptionNumber.SIZE1) or b"") == 100
    [reply] = h.send(Code.POST, ["echo"], options=[(27, Block(0, True, 0).encode()), (60, b"\x01\x00")],
                     payload=b"x" * 16)
    assert reply.code == Code.REQUEST_ENTITY_TOO_LARGE


def test_defect_17_zone_id_kept_from_receive_to_reply() -> None:
    resource = Echo()
    h = harness(echo=resource)
    peer = ("fe80::2%lowpan0", 5683)
    h.send(Code.GET, ["echo"], peer=peer)
    assert resource.seen[-1].peer.host == "fe80::2%lowpan0"
    assert h.addresses()[-1] == peer
