"""CoMatrix's CoAP layer: a correct, bounded CoAP server built on txThings.

Nothing here knows about Matrix.  Upper layers use `Site`, `CoapServer`,
`CoapSettings`, `listen_udp`, `CoapResource`/`LinkAttributes`, the `Request`/
`Response` values and the `CoapError` family.
"""

from comatrix.coap import _txthings  # noqa: F401  (first: silences txThings' import warnings)
from comatrix.coap.blockwise import etag_for
from comatrix.coap.errors import CoapError, ErrorAdapter, PreconditionFailed, default_error_adapter
from comatrix.coap.message import Peer, Request, Response, Security
from comatrix.coap.numbers import Code, ContentFormat, MessageType, OptionNumber
from comatrix.coap.resource import CoapResource, LinkAttributes
from comatrix.coap.server import CoapServer, CoapSettings, ResponseHook, Site, listen_udp

__all__ = [
    "CoapError", "ErrorAdapter", "PreconditionFailed", "default_error_adapter", "etag_for",
    "Peer", "Request", "Response", "Security",
    "Code", "ContentFormat", "MessageType", "OptionNumber",
    "CoapResource", "LinkAttributes",
    "CoapServer", "CoapSettings", "ResponseHook", "Site", "listen_udp",
]
