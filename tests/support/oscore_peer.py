"""A minimal OSCORE client side for in-memory tests of the gateway's OSCORE layer.

Built on `comatrix.oscore`'s primitives (whose results the unit tests pin to the
RFC 8613 Appendix C vectors); the real-peer tests use aiocoap's OSCORE client.
"""

from __future__ import annotations

from comatrix.coap import wire
from comatrix.coap.numbers import Code, MessageType, OptionNumber
from comatrix.oscore.context import SecurityContext, aad_for, encode_piv
from comatrix.oscore.cose import OscoreOption, decode_plaintext, encode_plaintext
from comatrix.oscore.layer import ECHO_OPTION

__all__ = ["OscorePeer", "ECHO_OPTION"]


class OscorePeer:
    """The device's side of one context: protects requests, verifies answers."""

    def __init__(self, sender_id: bytes, recipient_id: bytes, master_secret: bytes,
                 master_salt: bytes = b"", sequence: int = 0) -> None:
        self.context = SecurityContext(sender_id, recipient_id, master_secret, master_salt)
        self.sequence = sequence
        self.last_piv = b""

    def request(self, code: int, path: tuple[str, ...] = (), *, options: list[wire.RawOption] | None = None,
                payload: bytes = b"", mid: int = 1, token: bytes = b"\x01",
                mtype: int = MessageType.CON) -> bytes:
        """One protected request datagram; ``self.last_piv`` is its Partial IV."""
        inner = [(int(OptionNumber.URI_PATH), segment.encode()) for segment in path] + list(options or [])
        piv = encode_piv(self.sequence)
        self.sequence += 1
        self.last_piv = piv
        kid = self.context.sender_id
        ciphertext = self.context.seal(self.context.sender_nonce(piv), encode_plaintext(code, inner, payload),
                                       aad_for(kid, piv))
        outer: list[wire.RawOption] = [(OptionNumber.OSCORE, OscoreOption(piv=piv, kid=kid).encode())]
        observe = [value for number, value in inner if number == OptionNumber.OBSERVE]
        if observe:
            outer.append((OptionNumber.OBSERVE, observe[0]))
        outer_code = Code.FETCH if observe else Code.POST
        return wire.encode(mtype, outer_code, mid, token, outer, ciphertext)

    def verify(self, message: wire.Datagram, request_piv: bytes | None = None) -> wire.Datagram:
        """The inner response of a protected answer to the request with ``request_piv`` (default: the last)."""
        request_piv = self.last_piv if request_piv is None else request_piv
        values = [value for number, value in message.options if number == OptionNumber.OSCORE]
        assert len(values) == 1, f"answer not protected: {message}"
        header = OscoreOption.decode(values[0])
        if header.piv is not None:
            nonce = self.context.recipient_nonce(header.piv)
        else:
            nonce = self.context.sender_nonce(request_piv)
        plaintext = self.context.open(nonce, message.payload, aad_for(self.context.sender_id, request_piv))
        return decode_plaintext(plaintext)
