"""A resource that sets ``streams_block1`` gets each Block1 block as it comes (bodies beyond the
server's ``max_body_size``, its own bounded state); every other resource still gets the body
reassembled by the server, within that cap."""

from __future__ import annotations

from comatrix.coap.blockwise import Block
from comatrix.coap.message import Request, Response
from comatrix.coap.numbers import Code, OptionNumber
from comatrix.coap.resource import CoapResource
from comatrix.coap.server import CoapSettings, Site
from comatrix.coap.testing import Harness, option


class Streaming(CoapResource):
    streams_block1 = True

    def __init__(self) -> None:
        super().__init__()
        self.blocks: list[tuple[Block, bytes]] = []

    def render_POST(self, request: Request) -> Response:
        block = Block.decode(request.option(OptionNumber.BLOCK1) or b"")
        self.blocks.append((block, request.payload))
        return Response(code=Code.CONTINUE if block.more else Code.CHANGED)


class Whole(CoapResource):
    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def render_POST(self, request: Request) -> Response:
        self.bodies.append(request.payload)
        return Response(code=Code.CHANGED)


def _upload(harness: Harness, path: str, body: bytes, szx: int = 2) -> list[int]:
    size = 16 << szx
    codes = []
    for num in range(-(-len(body) // size)):
        more = (num + 1) * size < len(body)
        [reply] = harness.send(Code.POST, (path,), payload=body[num * size:(num + 1) * size],
                               options=[(OptionNumber.BLOCK1, Block(num, more, szx).encode())])
        codes.append(reply.code)
        if reply.code == Code.CONTINUE or reply.code == Code.CHANGED:
            assert Block.decode(option(reply, OptionNumber.BLOCK1) or b"") == Block(num, more, szx)
    return codes


def test_a_streaming_resource_gets_every_block_beyond_the_servers_body_cap() -> None:
    site = Site()
    streaming, whole = Streaming(), Whole()
    site.put(("s",), streaming)
    site.put(("w",), whole)
    harness = Harness(site, CoapSettings(max_body_size=256))
    body = bytes(range(256)) * 3
    codes = _upload(harness, "s", body)
    assert codes == [Code.CONTINUE] * 11 + [Code.CHANGED]
    assert b"".join(payload for _, payload in streaming.blocks) == body
    assert [block.num for block, _ in streaming.blocks] == list(range(12))
    # The same body to a resource that does not stream: reassembled by the server, within its cap.
    refused = [code for code in _upload(harness, "w", body) if code != Code.CONTINUE]
    assert refused[0] == Code.REQUEST_ENTITY_TOO_LARGE and whole.bodies == []
    assert _upload(harness, "w", body[:200])[-1] == Code.CHANGED and whole.bodies == [body[:200]]
