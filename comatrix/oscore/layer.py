"""OSCORE between the CoAP message layer and the site: verify requests, protect answers (RFC 8613 §8).

`OscoreLayer` is the `comatrix.coap.secured.MessageProtection` the CoAP server
calls for every request carrying the OSCORE option.  A verified request goes
on as its decrypted inner message with ``Security("oscore", <recipient id hex>)``;
its answers are protected with the same context.

* Errors of OSCORE itself are answered unprotected (§8.2, §8.3): 4.02 "Failed
  to decode COSE", 4.01 "Security context not found", 4.01 "Replay detected",
  4.00 "Decryption failed", each with Max-Age 0.
* Replay window (§7.4): after a start it is unknown, so the first request of
  each context is answered with a protected 4.01 carrying an Echo option
  (Appendix B.1.2, RFC 9175); the request that returns the Echo value sets the
  window's lower limit.
* Answers reuse the request's nonce (no Partial IV: smallest on air) unless a
  fresh Partial IV is required: answers to Observe registrations and every
  notification (§4.1.3.5.2, §8.3.1), and the Echo challenge (B.1.2).
* Options (§4.1): the outer request keeps only Uri-Host and Uri-Port (Class U);
  every outer Class E option is discarded; outer Block options (a proxy's
  fragmentation, §4.1.3.4.2) are refused with 4.02.  Inner Block options are
  ordinary inner options, so block-wise runs on the decrypted messages.  In
  answers Observe goes outer (its value) and inner (empty); all else is inner.
* The EDHOC + OSCORE request (RFC 9668): a request with the EDHOC option
  carries EDHOC message_3 before the OSCORE ciphertext.  It is handed, with its
  kid (C_R), to the ``combined`` callable, which finishes the exchange (adding
  the context) and returns the ciphertext, or the Response refusing it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Union

from comatrix.coap import wire
from comatrix.coap.amplification import ECHO
from comatrix.coap.message import Response, Security
from comatrix.coap.numbers import Code, ContentFormat, OptionNumber
from comatrix.coap.secured import ProtectionUnavailable, Refused, Unprotected
from comatrix.logs import get_logger
from comatrix.oscore.context import (TAG_LENGTH, DecryptionFailed, SecurityContext, SequenceExhausted,
                                     aad_for, encode_piv)
from comatrix.oscore.contexts import ContextStore
from comatrix.oscore.cose import OscoreOption, decode_plaintext, encode_plaintext

log = get_logger(__name__)

__all__ = ["ECHO_OPTION", "EDHOC_OPTION", "CombinedHandler", "OscoreExchange", "OscoreLayer"]

#: RFC 9175 Echo (Class E).
ECHO_OPTION = ECHO  # RFC 9175 Echo, defined once (comatrix.coap.amplification)
#: Outer request options the server still reads after verification (Class U, §4.1.3.2).
_OUTER_KEPT = frozenset({OptionNumber.URI_HOST, OptionNumber.URI_PORT})
_OUTER_BLOCK = frozenset({OptionNumber.BLOCK1, OptionNumber.BLOCK2})
_ECHO_BYTES = 8
#: RFC 9668 §3.1: the EDHOC option (critical, empty) of a combined request.
EDHOC_OPTION = 21
#: Finishes an EDHOC exchange from (C_R, payload): the OSCORE payload, or a refusal.
CombinedHandler = Callable[[bytes, bytes], Union[bytes, Response]]


@dataclasses.dataclass
class OscoreExchange:
    """What answering one verified request needs (§8: the request's kid and Partial IV)."""

    context: SecurityContext
    request_kid: bytes
    request_piv: bytes
    #: Answers carry a Partial IV of ours instead of reusing the request's nonce.
    fresh_piv: bool = False


def _refuse(code: Code, text: str) -> Refused:
    payload = text.encode("ascii")
    return Refused(Response(code=code, payload=payload, content_format=ContentFormat.TEXT_PLAIN, max_age=0))


class OscoreLayer:
    """Unprotects requests and protects answers for the contexts in a `ContextStore`."""

    def __init__(self, contexts: ContextStore, combined: CombinedHandler | None = None) -> None:
        self.contexts = contexts
        self.combined = combined

    def unprotect(self, message: wire.Datagram) -> Union[Unprotected, Refused]:
        if any(number == EDHOC_OPTION for number, _ in message.options):
            return self._combined(message)
        return self._unprotect(message)

    def _combined(self, message: wire.Datagram) -> Union[Unprotected, Refused]:
        """RFC 9668 §3.3.1: finish EDHOC with the message_3 in front, then go on as OSCORE."""
        if self.combined is None:
            return _refuse(Code.BAD_OPTION, "EDHOC not offered")
        values = [value for number, value in message.options if number == OptionNumber.OSCORE]
        try:
            kid = OscoreOption.decode(values[0]).kid if len(values) == 1 else None
        except ValueError:
            kid = None
        if kid is None:
            return _refuse(Code.BAD_OPTION, "Failed to decode COSE")
        outcome = self.combined(kid, message.payload)
        if isinstance(outcome, Response):
            return Refused(outcome)
        options = [(number, value) for number, value in message.options if number != EDHOC_OPTION]
        return self._unprotect(message._replace(options=options, payload=outcome))

    def _unprotect(self, message: wire.Datagram) -> Union[Unprotected, Refused]:
        values = [value for number, value in message.options if number == OptionNumber.OSCORE]
        try:
            if len(values) != 1:
                raise ValueError("OSCORE option repeated")
            header = OscoreOption.decode(values[0])
        except ValueError:
            return _refuse(Code.BAD_OPTION, "Failed to decode COSE")
        if header.piv is None or header.kid is None or len(message.payload) <= TAG_LENGTH:
            return _refuse(Code.BAD_OPTION, "Failed to decode COSE")
        if any(number in _OUTER_BLOCK for number, _ in message.options):
            return _refuse(Code.BAD_OPTION, "outer block-wise not supported")
        context = self.contexts.find(header.kid, header.kid_context)
        if context is None:
            log.debug("OSCORE request for unknown kid {kid}", kid=header.kid.hex())
            return _refuse(Code.UNAUTHORIZED, "Security context not found")
        sequence = int.from_bytes(header.piv, "big")
        window = context.replay
        if window.established and not window.is_fresh(sequence):
            log.info("OSCORE replay rejected for {context}", context=context)
            return _refuse(Code.UNAUTHORIZED, "Replay detected")
        try:
            plaintext = context.open(context.recipient_nonce(header.piv), message.payload,
                                     aad_for(header.kid, header.piv))
        except DecryptionFailed:
            log.info("OSCORE request for {context} failed to decrypt (tampered, or another key)", context=context)
            return _refuse(Code.BAD_REQUEST, "Decryption failed")
        exchange = OscoreExchange(context, header.kid, header.piv)
        try:
            inner = decode_plaintext(plaintext)
        except ValueError:
            if window.established:
                window.mark(sequence)
            return Refused(Response.text("malformed inner message", Code.BAD_REQUEST), self._fresh(exchange))
        if not window.established:
            echo = next((value for number, value in inner.options if number == ECHO_OPTION), None)
            if context.echo is None or echo != context.echo:
                return self._challenge(exchange)
            context.echo = None
            window.establish(sequence)
            log.info("OSCORE replay window of {context} set by an Echo round trip", context=context)
        else:
            window.mark(sequence)
        options = [(number, value) for number, value in inner.options if number != ECHO_OPTION]
        options += [(number, value) for number, value in message.options if number in _OUTER_KEPT]
        if any(number == OptionNumber.OBSERVE and value == b"" for number, value in inner.options):
            exchange.fresh_piv = True  # a registration: every notification needs its own Partial IV
        decrypted = wire.Datagram(message.mtype, inner.code, message.mid, message.token, options, inner.payload)
        identity = context.identity or Security("oscore", context.recipient_id.hex())
        return Unprotected(decrypted, identity, exchange)

    @staticmethod
    def _fresh(exchange: OscoreExchange) -> OscoreExchange:
        exchange.fresh_piv = True
        return exchange

    def _challenge(self, exchange: OscoreExchange) -> Refused:
        """B.1.2: a protected 4.01 with only an Echo option, under a Partial IV of ours."""
        context = exchange.context
        if context.echo is None:
            context.echo = os.urandom(_ECHO_BYTES)
        response = Response(code=Code.UNAUTHORIZED, extra_options=((ECHO_OPTION, context.echo),))
        return Refused(response, self._fresh(exchange))

    def protect(self, exchange: OscoreExchange, code: int, options: list[wire.RawOption],
                payload: bytes) -> tuple[int, list[wire.RawOption], bytes]:
        context = exchange.context
        inner = [(number, value) for number, value in options if number != OptionNumber.OBSERVE]
        outer: list[wire.RawOption] = []
        observe = next((value for number, value in options if number == OptionNumber.OBSERVE), None)
        if observe is not None:
            inner.append((OptionNumber.OBSERVE, b""))
            outer.append((OptionNumber.OBSERVE, observe))
        if observe is not None or exchange.fresh_piv:
            try:
                piv = encode_piv(context.sequence.take())
            except SequenceExhausted as exc:
                raise ProtectionUnavailable(str(exc)) from None
            nonce = context.sender_nonce(piv)
            outer.append((OptionNumber.OSCORE, OscoreOption(piv=piv).encode()))
        else:
            nonce = context.recipient_nonce(exchange.request_piv)
            outer.append((OptionNumber.OSCORE, b""))
        ciphertext = context.seal(nonce, encode_plaintext(code, inner, payload),
                                  aad_for(exchange.request_kid, exchange.request_piv))
        return (Code.CONTENT if observe is not None else Code.CHANGED), outer, ciphertext
