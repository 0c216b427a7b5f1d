"""Block-wise transfer pieces (RFC 7959): the block option value, slicing, ETags.

The server keeps the state (uploads being reassembled, representations being
downloaded) in bounded caches; this module holds the pure parts.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

from comatrix.coap.errors import decode_uint, encode_uint

#: RFC 7959: SZX 0..6 means 16..1024 bytes; 7 is reserved.
MAX_SZX = 6


class ReservedBlockSize(ValueError):
    """SZX 7 in a Block1/Block2 option: a malformed request, answered 4.00 (RFC 7959 §2.2)."""


class Block(NamedTuple):
    """A Block1/Block2 value: block number, more flag, size exponent."""

    num: int
    more: bool
    szx: int

    @property
    def size(self) -> int:
        return 16 << self.szx

    @property
    def offset(self) -> int:
        return self.num * (16 << self.szx)

    def encode(self) -> bytes:
        return encode_uint((self.num << 4) | (8 if self.more else 0) | self.szx)

    @classmethod
    def decode(cls, raw: bytes) -> "Block":
        """Raises ValueError for an over-long value, `ReservedBlockSize` for the reserved SZX 7."""
        if len(raw) > 3:
            raise ValueError("block option longer than 3 bytes")
        value = decode_uint(raw)
        szx = value & 7
        if szx == 7:
            raise ReservedBlockSize("block size exponent 7 is reserved")
        return cls(value >> 4, bool(value & 8), szx)


def szx_for_size(size: int) -> int:
    """The largest SZX whose block fits in ``size`` bytes (at least 0)."""
    szx = 0
    while szx < MAX_SZX and (32 << szx) <= size:
        szx += 1
    return szx


def etag_for(payload: bytes, content_format: int | None) -> bytes:
    """A short strong validator for one representation (4 bytes are plenty per resource)."""
    digest = hashlib.blake2s(payload, digest_size=4)
    if content_format is not None:
        digest.update(content_format.to_bytes(2, "big"))
    return digest.digest()
