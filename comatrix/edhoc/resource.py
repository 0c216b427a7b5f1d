"""``POST /.well-known/edhoc`` (RFC 9528 Appendix A.2) and the RFC 9668 combined request.

A request whose payload starts with CBOR ``true`` carries message_1 and is
answered 2.04 with message_2; one that starts with C_R carries message_3 and is
answered 2.04 with message_4 (key confirmation: the device knows the context
works before its first OSCORE request).  A combined EDHOC + OSCORE request
(message_3 in front of the OSCORE ciphertext, `comatrix.oscore.layer`) gets
no message_4: its protected answer confirms the keys.  Failures are answered
with an EDHOC error message (ERR_CODE 1, a short text), 4.00; no free
connection identifier with 5.03 and Max-Age.
"""

from __future__ import annotations

from typing import Callable, Union

import cbor2

from comatrix.coap.message import Request, Response
from comatrix.coap.numbers import Code
from comatrix.coap.resource import CoapResource, LinkAttributes
from comatrix.edhoc.responder import Busy, EdhocError, Responder, split_bstr, split_connection_id
from comatrix.identity import device_of

__all__ = ["EDHOC_PATH", "EDHOC_CBOR_SEQ", "EdhocResource", "combined_handler", "edhoc_error"]

EDHOC_PATH = (".well-known", "edhoc")
#: application/edhoc+cbor-seq (RFC 9528 §10.9).
EDHOC_CBOR_SEQ = 64
_CBOR_TRUE = b"\xf5"
_ERR_UNSPECIFIED = 1


def edhoc_error(text: str, code: Code = Code.BAD_REQUEST, max_age: int | None = None) -> Response:
    """RFC 9528 §6: an EDHOC error message (ERR_CODE 1, ERR_INFO text)."""
    return Response(code=code, payload=cbor2.dumps(_ERR_UNSPECIFIED) + cbor2.dumps(text),
                    content_format=EDHOC_CBOR_SEQ, max_age=max_age)


def _busy(exc: Busy) -> Response:
    return edhoc_error("no free connection identifier, retry later", Code.SERVICE_UNAVAILABLE, exc.retry_after)


class EdhocResource(CoapResource):
    link = LinkAttributes(rt="core.edhoc", title="EDHOC")

    def __init__(self, responder: Responder) -> None:
        super().__init__()
        self.responder = responder

    def render_POST(self, request: Request) -> Response:
        payload = request.payload
        try:
            if payload[:1] == _CBOR_TRUE:
                reply = self.responder.message_1(device_of(request).key, payload[1:])
            else:
                c_r, message_3 = split_connection_id(payload)
                reply, _ = self.responder.message_3(c_r, message_3, message_4=True)
        except EdhocError as exc:
            return edhoc_error(str(exc))
        except Busy as exc:
            return _busy(exc)
        return Response(code=Code.CHANGED, payload=reply, content_format=EDHOC_CBOR_SEQ)


def combined_handler(responder: Responder) -> Callable[[bytes, bytes], Union[bytes, Response]]:
    """The `comatrix.oscore.layer.CombinedHandler`: message_3 off the front, the context added."""

    def finish(c_r: bytes, payload: bytes) -> Union[bytes, Response]:
        try:
            _, rest = split_bstr(payload)
            responder.message_3(c_r, payload[:len(payload) - len(rest)], message_4=False)
        except EdhocError as exc:
            return edhoc_error(str(exc))
        if not rest:
            return edhoc_error("no OSCORE payload after message_3")
        return rest

    return finish
