"""CoAP datagram parsing (strict, ours) and encoding (through txThings).

txThings' ``Message.decode`` raises on malformed input, accepts truncated
options and yields ``''`` for an empty payload (facts §7.11-13), so incoming
datagrams are parsed here and every violation of RFC 7252 §3 becomes one
`FormatError`.  Encoding is sound in txThings as long as every option is
handed over pre-encoded as an ``OpaqueOption`` (its ``BlockOption`` length is
broken, §7.12), so `encode` does exactly that.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

from comatrix.coap._txthings import txcoap
from comatrix.coap.numbers import MessageType

#: An option as it appears on the wire: (number, raw value).
RawOption = tuple[int, bytes]


class FormatError(ValueError):
    """A datagram that violates RFC 7252 §3.

    ``mtype``/``mid`` are set when the fixed header was readable, so that a
    malformed CON can be rejected with RST (RFC 7252 §4.2).
    """

    def __init__(self, reason: str, mtype: int | None = None, mid: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.mtype = mtype
        self.mid = mid


class Datagram(NamedTuple):
    mtype: int
    code: int
    mid: int
    token: bytes
    options: list[RawOption]
    payload: bytes



def _extended(nibble: int, data: bytes, pos: int, what: str, mtype: int, mid: int) -> tuple[int, int]:
    """An option delta or length nibble with its extended bytes (RFC 7252 §3.1) -> (value, new pos)."""
    if nibble < 13:
        return nibble, pos
    if nibble == 15:
        raise FormatError(f"option {what} 15 is reserved", mtype, mid)
    extra = 1 if nibble == 13 else 2
    if pos + extra > len(data):
        raise FormatError(f"truncated option {what}", mtype, mid)
    if extra == 1:
        return data[pos] + 13, pos + 1
    return ((data[pos] << 8) | data[pos + 1]) + 269, pos + 2

def decode(data: bytes) -> Datagram:
    """Parse one datagram; raises `FormatError` for anything malformed."""
    size = len(data)
    if size < 4:
        raise FormatError("shorter than the fixed header")
    first = data[0]
    if first >> 6 != 1:
        # RFC 7252 §3: unknown versions are silently ignored, so no mtype/mid.
        raise FormatError("unknown version")
    mtype = (first >> 4) & 3
    tkl = first & 0x0F
    code = data[1]
    mid = (data[2] << 8) | data[3]
    if tkl > 8:
        raise FormatError("token length 9-15 is reserved", mtype, mid)
    if code == 0 and size != 4:
        raise FormatError("empty message with token, options or payload", mtype, mid)
    pos = 4 + tkl
    if pos > size:
        raise FormatError("truncated token", mtype, mid)
    token = data[4:pos]
    options: list[RawOption] = []
    number = 0
    payload = b""
    while pos < size:
        byte = data[pos]
        pos += 1
        if byte == 0xFF:
            if pos == size:
                raise FormatError("payload marker without payload", mtype, mid)
            payload = data[pos:]
            break
        delta, pos = _extended(byte >> 4, data, pos, "delta", mtype, mid)
        length, pos = _extended(byte & 0x0F, data, pos, "length", mtype, mid)
        end = pos + length
        if end > size:
            raise FormatError("truncated option value", mtype, mid)
        number += delta
        options.append((number, data[pos:end]))
        pos = end
    return Datagram(mtype, code, mid, token, options, payload)


def encode(mtype: int, code: int, mid: int, token: bytes = b"",
           options: Iterable[RawOption] = (), payload: bytes = b"") -> bytes:
    """One datagram.  Options may come in any order; equal numbers keep theirs."""
    message = txcoap.Message(mtype=mtype, mid=mid, code=code, payload=payload, token=token)
    add = message.opt.addOption
    for number, value in options:
        add(txcoap.OpaqueOption(number, value))
    data: bytes = message.encode()
    return data


def _extended_size(value: int) -> int:
    return 0 if value < 13 else 1 if value < 269 else 2


def encoded_size(token: bytes, options: Iterable[RawOption], payload: bytes) -> int:
    """The length `encode` gives for these parts, computed without encoding."""
    size = 4 + len(token) + (1 + len(payload) if payload else 0)
    previous = 0
    for number, value in sorted(options, key=lambda option: option[0]):
        size += 1 + _extended_size(number - previous) + _extended_size(len(value)) + len(value)
        previous = number
    return size


def empty(mtype: MessageType, mid: int) -> bytes:
    """An empty ACK or RST (4 bytes, no token)."""
    return bytes((0x40 | (mtype << 4), 0, mid >> 8, mid & 0xFF))
