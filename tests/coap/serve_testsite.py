"""The CoAP test site used by the interop, fuzz and link-local tests.

`build_site()` returns a `comatrix.coap.server.Site` with a few resources whose
behaviour the tests know exactly:

``/echo``      GET/POST/PUT/DELETE: answers ``<METHOD>:<request payload>``
``/upload``    PUT/POST store the (Block1-reassembled) body and answer its SHA-256;
               GET returns what was stored; DELETE forgets it (``/upload2``: a second one)
``/download``  GET: `DOWNLOAD` (3 KB of binary data, served block-wise)
``/e``         the same at a one-letter path: the smallest request for a large answer
``/counter``   observable GET: the decimal value of a counter the test bumps
               (``--tick`` bumps it periodically when run as a script)
``/bigcounter`` like ``/counter`` but 128 bytes (the value repeated): Observe + Block2
``/slow``      GET answered after `SLOW_DELAY` seconds (a separate response)

Run as a script it serves that site on one address, which is how the
network-namespace test starts a server inside a namespace::

    python tests/coap/serve_testsite.py --host 'fe80::1%lowpan0' --port 5683

The script prints ``READY <port>`` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

from comatrix.coap.message import Request, Response
from comatrix.coap.numbers import Code, ContentFormat
from comatrix.coap.resource import CoapResource, LinkAttributes

#: 3 KB that is not text and not periodic in any block size we test (16/64/1024).
DOWNLOAD = hashlib.shake_256(b"comatrix interop download").digest(3 * 1024)
SLOW_DELAY = 0.5  # longer than any sane ACK delay, so the answer is a separate response


class Echo(CoapResource):
    link = LinkAttributes(rt="test.echo", ct=(ContentFormat.OCTET_STREAM,), title="Echo")

    def _echo(self, request: Request, code: Code) -> Response:
        return Response(code=code, payload=request.method.name.encode() + b":" + request.payload,
                        content_format=ContentFormat.OCTET_STREAM)

    def render_GET(self, request: Request) -> Response:
        return self._echo(request, Code.CONTENT)

    def render_POST(self, request: Request) -> Response:
        return self._echo(request, Code.CHANGED)

    def render_PUT(self, request: Request) -> Response:
        return self._echo(request, Code.CHANGED)

    def render_DELETE(self, request: Request) -> Response:
        return self._echo(request, Code.DELETED)


class Upload(CoapResource):
    link = LinkAttributes(rt="test.upload", ct=(ContentFormat.OCTET_STREAM,), title="Upload")

    def __init__(self) -> None:
        super().__init__()
        self.stored: bytes | None = None
        #: Every body received, in order, so tests can check what arrived.
        self.received: list[bytes] = []

    def _store(self, request: Request) -> Response:
        self.stored = request.payload
        self.received.append(request.payload)
        digest = hashlib.sha256(request.payload).hexdigest().encode()
        return Response(code=Code.CHANGED, payload=digest, content_format=ContentFormat.TEXT_PLAIN)

    def render_PUT(self, request: Request) -> Response:
        return self._store(request)

    def render_POST(self, request: Request) -> Response:
        return self._store(request)

    def render_GET(self, request: Request) -> Response:
        if self.stored is None:
            return Response(code=Code.NOT_FOUND)
        return Response(payload=self.stored, content_format=ContentFormat.OCTET_STREAM)

    def render_DELETE(self, request: Request) -> Response:
        self.stored = None
        return Response(code=Code.DELETED)


class Download(CoapResource):
    link = LinkAttributes(rt="test.download", ct=(ContentFormat.OCTET_STREAM,), title="3 KB blob",
                          sz=len(DOWNLOAD))

    def render_GET(self, request: Request) -> Response:
        return Response(payload=DOWNLOAD, content_format=ContentFormat.OCTET_STREAM)


class Counter(CoapResource):
    link = LinkAttributes(rt="test.counter", ct=(ContentFormat.TEXT_PLAIN,), obs=True, title="Counter")

    def __init__(self) -> None:
        super().__init__()
        self.value = 0
        #: The Observe option of every GET that reached the resource (None when absent).
        self.observe_values: list[int | None] = []

    def render_GET(self, request: Request) -> Response:
        self.observe_values.append(request.observe)
        return Response.text(str(self.value))


class BigCounter(Counter):
    """Observable, and larger than small blocks: each representation is one value repeated."""

    link = LinkAttributes(rt="test.bigcounter", ct=(ContentFormat.TEXT_PLAIN,), obs=True)
    REPEAT = 16

    def render_GET(self, request: Request) -> Response:
        self.observe_values.append(request.observe)
        return Response.text(f"{self.value:08d}" * self.REPEAT)


class Slow(CoapResource):
    link = LinkAttributes(rt="test.slow", ct=(ContentFormat.TEXT_PLAIN,), title="Slow")

    def __init__(self, clock: IReactorTime) -> None:
        super().__init__()
        self.clock = clock

    def render_GET(self, request: Request) -> "defer.Deferred[Response]":
        return task.deferLater(self.clock, SLOW_DELAY, Response.text, "slow")  # type: ignore[arg-type]


class TestResources:
    """The resource instances of one test site, for tests to inspect and drive."""

    __test__ = False  # not a pytest test class

    def __init__(self, clock: IReactorTime) -> None:
        self.echo = Echo()
        self.upload = Upload()
        self.upload2 = Upload()
        self.download = Download()
        self.counter = Counter()
        self.bigcounter = BigCounter()
        self.slow = Slow(clock)


def build_site(clock: IReactorTime) -> tuple[Any, TestResources]:
    """A fresh `Site` with the test resources, and the resources themselves."""
    from comatrix.coap.server import Site

    resources = TestResources(clock)
    site = Site()
    site.put(("echo",), resources.echo)
    site.put(("upload",), resources.upload)
    site.put(("upload2",), resources.upload2)
    site.put(("download",), resources.download)
    site.put(("e",), resources.download)
    site.put(("counter",), resources.counter)
    site.put(("bigcounter",), resources.bigcounter)
    site.put(("slow",), resources.slow)
    return site, resources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the CoAP test site.")
    parser.add_argument("--host", default="::1", help="address to bind, may carry a zone (fe80::1%%lowpan0)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tick", type=float, default=0.0,
                        help="bump /counter (and notify its observers) every TICK seconds")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    from comatrix.coap.server import CoapServer, CoapSettings, listen_udp

    site, resources = build_site(reactor)  # type: ignore[arg-type]
    server = CoapServer(site, CoapSettings(), reactor=reactor)
    port = listen_udp(server, args.host, args.port)
    if args.tick > 0:
        def tick() -> None:
            resources.counter.value += 1
            resources.counter.notify_observers()

        task.LoopingCall(tick).start(args.tick, now=False)
    sys.stdout.write(f"READY {port.getHost().port}\n")  # type: ignore[attr-defined]
    sys.stdout.flush()
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
