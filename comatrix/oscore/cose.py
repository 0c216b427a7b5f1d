"""The compressed COSE object of OSCORE (RFC 8613 §5.3, §6): the OSCORE option value and the plaintext.

Pure codecs: bytes in, values out, `ValueError` for anything malformed.
"""

from __future__ import annotations

import dataclasses

from comatrix.coap import wire

__all__ = ["OscoreOption", "encode_plaintext", "decode_plaintext"]

#: §6.1 flag bits of the first byte.
_PIV_LENGTH_MASK = 0x07
_KID_FLAG = 0x08
_KID_CONTEXT_FLAG = 0x10
_RESERVED = 0xE0


@dataclasses.dataclass(frozen=True)
class OscoreOption:
    """The OSCORE option value: Partial IV, kid context and kid, each None when absent."""

    piv: bytes | None = None
    kid: bytes | None = None
    kid_context: bytes | None = None

    def encode(self) -> bytes:
        piv = self.piv or b""
        if len(piv) > 5:
            raise ValueError("Partial IV longer than 5 bytes")
        flags = len(piv)
        tail = b""
        if self.kid_context is not None:
            if len(self.kid_context) > 255:
                raise ValueError("kid context longer than 255 bytes")
            flags |= _KID_CONTEXT_FLAG
            tail += bytes((len(self.kid_context),)) + self.kid_context
        if self.kid is not None:
            flags |= _KID_FLAG
            tail += self.kid
        if flags == 0:
            return b""  # §2: no flag set -> empty option value
        return bytes((flags,)) + piv + tail

    @classmethod
    def decode(cls, value: bytes) -> "OscoreOption":
        if not value:
            return cls()
        flags = value[0]
        if flags & _RESERVED:
            raise ValueError("reserved OSCORE flag bits set")
        n = flags & _PIV_LENGTH_MASK
        if n > 5:
            raise ValueError("reserved Partial IV length")
        pos = 1 + n
        if pos > len(value):
            raise ValueError("truncated Partial IV")
        piv = value[1:pos] if n else None
        kid_context = None
        if flags & _KID_CONTEXT_FLAG:
            if pos >= len(value):
                raise ValueError("truncated kid context")
            size = value[pos]
            end = pos + 1 + size
            if end > len(value):
                raise ValueError("truncated kid context")
            kid_context = value[pos + 1:end]
            pos = end
        if flags & _KID_FLAG:
            return cls(piv, value[pos:], kid_context)
        if pos != len(value):
            raise ValueError("trailing bytes in the OSCORE option")
        return cls(piv, None, kid_context)


def encode_plaintext(code: int, options: list[wire.RawOption], payload: bytes) -> bytes:
    """§5.3: Code, the Class E options (delta-encoded) and, if any, 0xFF + payload."""
    message = wire.encode(0, code, 0, b"", options, payload)
    return message[1:2] + message[4:]


def decode_plaintext(plaintext: bytes) -> wire.Datagram:
    """The inner code, options and payload as a `wire.Datagram` (type, mid and token zero)."""
    if not plaintext:
        raise ValueError("empty plaintext")
    try:
        return wire.decode(b"\x40" + plaintext[:1] + b"\0\0" + plaintext[1:])
    except wire.FormatError as exc:
        raise ValueError(exc.reason) from None
