"""/.well-known/core link-format (RFC 6690): attributes, filtering, block-wise delivery."""

from __future__ import annotations

from comatrix.coap.blockwise import Block
from comatrix.coap.linkformat import format_link, link_format, link_matches
from comatrix.coap.message import Request, Response
from comatrix.coap.numbers import Code
from comatrix.coap.resource import CoapResource, LinkAttributes
from comatrix.coap.server import Site
from comatrix.coap.testing import Harness, option


class R(CoapResource):
    def __init__(self, link: LinkAttributes) -> None:
        super().__init__()
        self.link = link

    def render_GET(self, request: Request) -> Response:
        return Response()


def site() -> Site:
    s = Site()
    s.put(("sensors", "temp"), R(LinkAttributes(rt="temperature-c", ct=(0,), obs=True, title='Temp "C"',
                                                interface="sensor", sz=12)))
    s.put(("sensors", "light"), R(LinkAttributes(rt="light-lux core.s", ct=(0, 60))))
    s.put(("time",), R(LinkAttributes()))
    hidden = R(LinkAttributes(rt="hidden"))
    hidden.visible = False
    s.put(("hidden",), hidden)
    return s


def test_format_link_all_attributes_and_quoting() -> None:
    link = LinkAttributes(rt="temperature-c", ct=(0,), obs=True, title='Temp "C"', interface="sensor", sz=12)
    assert format_link(("sensors", "temp"), link) == \
        '</sensors/temp>;rt="temperature-c";if="sensor";ct=0;sz=12;title="Temp \\"C\\"";obs'
    assert format_link(("a b",), LinkAttributes(ct=(0, 60))) == '</a%20b>;ct="0 60"'


def test_filtering() -> None:
    resources = site().resources()

    def hrefs(*query: str) -> list[str]:
        return [link.split(">")[0][1:] for link in link_format(resources, query).split(",") if link]

    assert hrefs() == ["/sensors/temp", "/sensors/light", "/time"]
    assert hrefs("rt=temperature-c") == ["/sensors/temp"]
    assert hrefs("rt=core.s") == ["/sensors/light"]
    assert hrefs("rt=temp*") == ["/sensors/temp"]
    assert hrefs("href=/sensors/*") == ["/sensors/temp", "/sensors/light"]
    assert hrefs("href=/time") == ["/time"]
    assert hrefs("ct=60") == ["/sensors/light"]
    assert hrefs("obs") == ["/sensors/temp"]
    assert hrefs("title=nothing") == []
    assert link_matches(("x",), LinkAttributes(), ())


def test_well_known_core_served_with_query_and_blockwise() -> None:
    s = site()
    for i in range(60):
        s.put(("many", f"resource{i:02d}"), R(LinkAttributes(rt="many.thing")))
    h = Harness(s)
    [reply] = h.send(Code.GET, [".well-known", "core"], query=["rt=temperature-c"])
    assert reply.payload.decode().startswith("</sensors/temp>") and "," not in reply.payload.decode()
    full = link_format(s.resources()).encode()
    assert len(full) > 1024
    parts, num = [], 0
    while True:
        [reply] = h.send(Code.GET, [".well-known", "core"], options=[(23, Block(num, False, 2).encode())])
        assert reply.code == Code.CONTENT
        parts.append(reply.payload)
        if not Block.decode(option(reply, 23) or b"").more:
            break
        num += 1
    assert b"".join(parts) == full
    [reply] = h.send(Code.GET, [".well-known", "core"], options=[(17, b"\x32")])
    assert reply.code == Code.NOT_ACCEPTABLE
