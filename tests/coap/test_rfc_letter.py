"""CoAP corners checked against the letter of the RFCs (issue 17, findings 6-10).

ETag on a 2.03 Valid (RFC 7252 §5.9.1.3), SZX 7 answered 4.00 (RFC 7959 §2.2),
Block2 continuations after a change get the current representation (RFC 7959
§2.4), conditional requests for resources that opt in (RFC 7252 §5.10.8), and
the public plugin API for CON notifications, Location-Query and an empty ``rt``.
"""

from __future__ import annotations

from typing import Any

from comatrix.coap import wire
from comatrix.coap.blockwise import Block, etag_for
from comatrix.coap.linkformat import format_link, link_format, link_matches
from comatrix.coap.message import Request, Response
from comatrix.coap.numbers import Code, ContentFormat, MessageType, OptionNumber
from comatrix.coap.resource import CoapResource, LinkAttributes
from comatrix.coap.server import CoapSettings, Site
from comatrix.coap.testing import Harness, option, options

CON, NON, ACK = MessageType.CON, MessageType.NON, MessageType.ACK
IF_MATCH, ETAG, IF_NONE_MATCH, OBSERVE = 1, 4, 5, 6
BLOCK2, BLOCK1, LOCATION_PATH, LOCATION_QUERY = 23, 27, 8, 20
OTHER_PEER = ("2001:db8::2", 40001)


class Document(CoapResource):
    """A stored document: its ETag is that of its body; GET with a matching ETag is 2.03 Valid."""

    link = LinkAttributes(rt="example.document", obs=True)

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body: bytes | None = body
        self.renders = 0

    @property
    def etag(self) -> bytes | None:
        return None if self.body is None else etag_for(self.body, ContentFormat.OCTET_STREAM)

    def render_GET(self, request: Request) -> Response:
        self.renders += 1
        if self.body is None:
            return Response(code=Code.NOT_FOUND)
        if request.option(ETAG) == self.etag:
            return Response(code=Code.VALID, etag=self.etag)
        return Response(payload=self.body, content_format=ContentFormat.OCTET_STREAM, etag=self.etag)

    def render_PUT(self, request: Request) -> Response:
        self.check_preconditions(request, self.etag)
        created = self.body is None
        self.body = request.payload
        return Response(code=Code.CREATED if created else Code.CHANGED)

    def render_DELETE(self, request: Request) -> Response:
        self.check_preconditions(request, self.etag)
        self.body = None
        return Response(code=Code.DELETED)


class Conditional(Document):
    conditional_requests = True


class Echo(CoapResource):
    def render_POST(self, request: Request) -> Response:
        return Response(code=Code.CHANGED, payload=request.payload)


def make(**resources: CoapResource) -> Harness:
    resources.setdefault("echo", Echo())
    site = Site()
    for name, resource in resources.items():
        site.put((name,), resource)
    return Harness(site, CoapSettings())


def blocks(num: int, szx: int = 2) -> list[tuple[int, bytes]]:
    return [(BLOCK2, Block(num, False, szx).encode())]


# ---------------------------------------------------------------- 6: ETag without payload


def test_valid_without_payload_carries_its_etag() -> None:
    document = Document(b"v1")
    h = make(doc=document)
    [first] = h.send(Code.GET, ["doc"])
    assert (first.code, option(first, ETAG)) == (Code.CONTENT, document.etag)
    [valid] = h.send(Code.GET, ["doc"], options=[(ETAG, document.etag or b"")])
    assert (valid.code, valid.payload, option(valid, ETAG)) == (Code.VALID, b"", document.etag)
    assert options(valid, ETAG) == [document.etag]  # once, not twice


def test_etag_of_a_blockwise_response_is_sent_once() -> None:
    document = Document(b"x" * 100)
    h = make(doc=document)
    for num in range(2):
        [reply] = h.send(Code.GET, ["doc"], options=blocks(num))
        assert options(reply, ETAG) == [document.etag]


# ---------------------------------------------------------------- 7: SZX 7


def test_reserved_block_size_is_a_bad_request() -> None:
    document = Document(b"x" * 100)
    h = make(doc=document)
    [reply] = h.send(Code.GET, ["doc"], options=[(BLOCK2, bytes([0x0F]))])
    assert reply.code == Code.BAD_REQUEST and reply.payload
    [reply] = h.send(Code.PUT, ["doc"], payload=b"y" * 16, options=[(BLOCK1, bytes([0x0F]))])
    assert reply.code == Code.BAD_REQUEST
    assert document.body == b"x" * 100
    [reply] = h.send(Code.GET, ["doc"], options=[(BLOCK2, b"\x00\x00\x00\x06")])  # 4 bytes: malformed
    assert reply.code == Code.BAD_OPTION


# ---------------------------------------------------------------- 8: Block2 after a change


def test_block2_continued_after_a_put_gets_the_current_representation() -> None:
    document = Conditional(b"a" * 100)
    h = make(doc=document)
    [first] = h.send(Code.GET, ["doc"], options=blocks(0))
    old_etag = option(first, ETAG)
    assert first.payload == b"a" * 64 and old_etag == document.etag
    [changed] = h.send(Code.PUT, ["doc"], payload=b"b" * 100, peer=OTHER_PEER)
    assert changed.code == Code.CHANGED
    assert len(h.server._representations) == 0
    [later] = h.send(Code.GET, ["doc"], options=blocks(1))
    assert later.payload == b"b" * 36  # the new representation's second block ...
    assert option(later, ETAG) == document.etag != old_etag  # ... with its ETag: the client sees the change


def test_block2_continued_after_a_notified_change_gets_the_current_representation() -> None:
    document = Document(b"a" * 100)
    h = make(doc=document)
    [first] = h.send(Code.GET, ["doc"], options=blocks(0))
    [observed] = h.send(Code.GET, ["doc"], token=b"o", options=[(OBSERVE, b"")] + blocks(0), peer=OTHER_PEER)
    assert option(observed, OBSERVE) is not None
    document.body = b"c" * 100
    delivered = document.notify_observers()
    [note] = h.replies()
    assert note.payload == b"c" * 64 and option(note, ETAG) == document.etag
    assert self_result(delivered) == 1
    [later] = h.send(Code.GET, ["doc"], options=blocks(1))
    assert later.payload == b"c" * 36 and option(later, ETAG) == document.etag != option(first, ETAG)
    [rest] = h.send(Code.GET, ["doc"], token=b"p", options=blocks(1), peer=OTHER_PEER)
    assert rest.payload == b"c" * 36 and option(rest, ETAG) == option(note, ETAG)


def test_a_change_for_other_requests_keeps_a_representation_in_transfer() -> None:
    document = Document(b"a" * 100)
    h = make(doc=document)
    h.send(Code.GET, ["doc"], options=blocks(0))
    renders = document.renders
    document.notify_observers(lambda request: False)  # changed only for requests this one is not
    [later] = h.send(Code.GET, ["doc"], options=blocks(1))
    assert later.payload == b"a" * 36 and document.renders == renders


def test_a_put_drops_only_representations_of_its_own_target() -> None:
    document, other = Conditional(b"a" * 100), Document(b"o" * 100)
    h = make(doc=document, other=other)
    h.send(Code.GET, ["other"], options=blocks(0))
    [answer] = h.send(Code.POST, ["echo"], token=b"p", payload=b"e" * 100, options=blocks(0))
    assert answer.payload == b"e" * 64
    h.send(Code.PUT, ["doc"], payload=b"b" * 100, peer=OTHER_PEER)
    h.send(Code.POST, ["echo"], payload=b"f", peer=OTHER_PEER)
    [rest] = h.send(Code.GET, ["other"], options=blocks(1))
    assert rest.payload == b"o" * 36 and other.renders == 1
    [rest] = h.send(Code.POST, ["echo"], token=b"q", options=blocks(1))  # its own answer, not re-run
    assert rest.code == Code.CHANGED and rest.payload == b"e" * 36


def test_a_failed_put_keeps_the_representation_in_transfer() -> None:
    document = Conditional(b"a" * 100)
    h = make(doc=document)
    h.send(Code.GET, ["doc"], options=blocks(0))
    [refused] = h.send(Code.PUT, ["doc"], payload=b"b", options=[(IF_MATCH, b"nope")], peer=OTHER_PEER)
    assert refused.code == Code.PRECONDITION_FAILED and document.body == b"a" * 100
    assert len(h.server._representations) == 1


# ---------------------------------------------------------------- 9: conditional requests


def test_conditional_request_to_a_resource_that_did_not_opt_in_is_refused_unrun() -> None:
    document = Document(b"a")
    h = make(doc=document)
    for conditional in ([(IF_MATCH, document.etag or b"")], [(IF_NONE_MATCH, b"")]):
        [reply] = h.send(Code.PUT, ["doc"], payload=b"b", options=conditional)
        assert reply.code == Code.BAD_OPTION
    [reply] = h.send(Code.GET, ["doc"], options=[(IF_MATCH, b"")])
    assert reply.code == Code.BAD_OPTION
    assert document.body == b"a" and document.renders == 0


def test_if_match_on_an_opted_in_resource() -> None:
    document = Conditional(b"a")
    h = make(doc=document)
    old = document.etag or b""
    [stale] = h.send(Code.PUT, ["doc"], payload=b"b", options=[(IF_MATCH, b"\x00\x01")])
    assert stale.code == Code.PRECONDITION_FAILED and document.body == b"a"
    [matched] = h.send(Code.PUT, ["doc"], payload=b"b", options=[(IF_MATCH, b"\x00\x01"), (IF_MATCH, old)])
    assert matched.code == Code.CHANGED and document.body == b"b"
    [again] = h.send(Code.PUT, ["doc"], payload=b"c", options=[(IF_MATCH, old)])  # lost update prevented
    assert again.code == Code.PRECONDITION_FAILED and document.body == b"b"
    [any_] = h.send(Code.PUT, ["doc"], payload=b"c", options=[(IF_MATCH, b"")])
    assert any_.code == Code.CHANGED and document.body == b"c"
    h.send(Code.DELETE, ["doc"])
    [absent] = h.send(Code.PUT, ["doc"], payload=b"d", options=[(IF_MATCH, b"")])
    assert absent.code == Code.PRECONDITION_FAILED and document.body is None


def test_if_none_match_creates_only_once() -> None:
    document = Conditional(b"")
    document.body = None
    h = make(doc=document)
    [created] = h.send(Code.PUT, ["doc"], payload=b"first", options=[(IF_NONE_MATCH, b"")])
    assert created.code == Code.CREATED and document.body == b"first"
    [refused] = h.send(Code.PUT, ["doc"], payload=b"second", options=[(IF_NONE_MATCH, b"")])
    assert refused.code == Code.PRECONDITION_FAILED and document.body == b"first"


def test_malformed_conditional_options_are_bad_options() -> None:
    document = Conditional(b"a")
    h = make(doc=document)
    for bad in ([(IF_NONE_MATCH, b"x")], [(IF_NONE_MATCH, b""), (IF_NONE_MATCH, b"")], [(IF_MATCH, b"123456789")]):
        [reply] = h.send(Code.PUT, ["doc"], payload=b"b", options=bad)
        assert reply.code == Code.BAD_OPTION, bad
    assert document.body == b"a"


def test_preconditions_hold() -> None:
    def request(*conditions: tuple[int, bytes]) -> Request:
        grouped: dict[int, tuple[bytes, ...]] = {}
        for number, value in conditions:
            grouped[number] = grouped.get(number, ()) + (value,)
        return Request(method=Code.PUT, path=("doc",), options=grouped)

    assert request().preconditions_hold(None) and request().preconditions_hold(b"e")
    assert request((IF_MATCH, b"e")).preconditions_hold(b"e")
    assert not request((IF_MATCH, b"e")).preconditions_hold(b"f")
    assert not request((IF_MATCH, b"")).preconditions_hold(None)
    assert request((IF_NONE_MATCH, b"")).preconditions_hold(None)
    assert not request((IF_NONE_MATCH, b"")).preconditions_hold(b"e")


# ---------------------------------------------------------------- 10: public plugin API


def self_result(deferred: Any) -> Any:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "Deferred has not fired"
    return results[0]


def test_notify_observers_confirmable_on_request_and_by_attribute() -> None:
    document = Document(b"a")
    h = make(doc=document)
    [registered] = h.send(Code.GET, ["doc"], token=b"o", options=[(OBSERVE, b"")])
    assert option(registered, OBSERVE) is not None
    document.body = b"b"
    plain = document.notify_observers()
    [note] = h.replies()
    assert note.mtype == NON and self_result(plain) == 1
    document.body = b"c"
    confirmed = document.notify_observers(confirmable=True)
    [note] = h.replies()
    assert note.mtype == CON and not confirmed.called  # fires when acknowledged
    h.send_raw(wire.empty(ACK, note.mid))
    assert self_result(confirmed) == 1
    document.confirmable_notifications = True
    document.body = b"d"
    by_attribute = document.notify_observers()
    [note] = h.replies()
    assert note.mtype == CON and note.payload == b"d"
    h.send_raw(wire.empty(ACK, note.mid))
    assert self_result(by_attribute) == 1
    assert document.served and not Document(b"").served


def test_response_location_query() -> None:
    class Creator(CoapResource):
        def render_POST(self, request: Request) -> Response:
            return Response(code=Code.CREATED, location_path=("items", "7"), location_query=("rev=2", "a b"))

    h = make(items=Creator())
    [reply] = h.send(Code.POST, ["items"], payload=b"x")
    assert reply.code == Code.CREATED
    assert options(reply, LOCATION_PATH) == [b"items", b"7"]
    assert options(reply, LOCATION_QUERY) == [b"rev=2", b"a b"]


def test_link_attributes_empty_rt() -> None:
    empty = LinkAttributes(rt="")
    assert format_link(("a",), empty) == '</a>;rt=""'
    assert format_link(("a",), LinkAttributes()) == "</a>"
    assert link_matches(("a",), empty, ("rt=",)) and not link_matches(("a",), LinkAttributes(), ("rt=",))

    class Typed(CoapResource):
        link = empty

    assert link_format([(("a",), Typed())]) == '</a>;rt=""'
