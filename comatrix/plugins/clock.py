"""``GET /time``: the gateway's Unix time in seconds, so devices can seed txn-id counters.

text/plain by default (original CoMatrix); a CBOR integer when Accept is 60.
"""

from __future__ import annotations

from comatrix.coap.errors import NotAcceptable
from comatrix.coap.message import Request, Response
from comatrix.coap.numbers import ContentFormat
from comatrix.coap.resource import CoapResource, LinkAttributes
from comatrix.interfaces import PluginContext
from comatrix.resources import ResourcePlugin, cbor_response


class TimeResource(CoapResource):
    link = LinkAttributes(rt="comatrix.time", ct=(ContentFormat.TEXT_PLAIN, ContentFormat.CBOR),
                          title="Unix time (s)")
    #: Original CoMatrix clients may send their Proxy-Uri with every request; /time has
    #: nothing to proxy and answers from the gateway's clock either way.
    accepts_proxy_uri = True

    def __init__(self, context: PluginContext) -> None:
        super().__init__()
        self.reactor = context.reactor

    def render_GET(self, request: Request) -> Response:
        now = int(self.reactor.seconds())
        if request.accept in (None, ContentFormat.TEXT_PLAIN):
            return Response.text(str(now))
        if request.accept == ContentFormat.CBOR:
            return cbor_response(now)
        raise NotAcceptable("text/plain (0) or cbor (60)")


time = ResourcePlugin("time", ("time",), TimeResource)
