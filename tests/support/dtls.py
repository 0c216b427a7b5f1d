"""DTLS 1.2 handshake records built byte by byte, as a forger on the link would send them.

RFC 6347 §4.2.1 (cookie exchange) and RFC 5246 §7.4.1.2 (ClientHello); only what
the tests need: a ClientHello offering TLS_PSK_WITH_AES_128_CCM_8, and the cookie
of a HelloVerifyRequest.
"""

from __future__ import annotations

import os
import struct

PSK_AES128_CCM8 = 0xC0A8
HANDSHAKE, CLIENT_HELLO, SERVER_HELLO, HELLO_VERIFY_REQUEST = 22, 1, 2, 3


def client_hello(cookie: bytes = b"", message_seq: int = 0, record_seq: int = 0) -> bytes:
    body = (b"\xfe\xfd" + os.urandom(32) + b"\x00" + bytes([len(cookie)]) + cookie
            + struct.pack("!HH", 2, PSK_AES128_CCM8) + b"\x01\x00")
    handshake = (bytes([CLIENT_HELLO]) + len(body).to_bytes(3, "big") + struct.pack("!H", message_seq)
                 + (0).to_bytes(3, "big") + len(body).to_bytes(3, "big") + body)
    return (bytes([HANDSHAKE]) + b"\xfe\xfd" + struct.pack("!H", 0) + record_seq.to_bytes(6, "big")
            + struct.pack("!H", len(handshake)) + handshake)


def handshake_type(record: bytes) -> int | None:
    """The handshake message type of a plaintext handshake record (None for anything else)."""
    return record[13] if len(record) > 13 and record[0] == HANDSHAKE else None


def cookie_of(hello_verify_request: bytes) -> bytes:
    assert handshake_type(hello_verify_request) == HELLO_VERIFY_REQUEST
    length = hello_verify_request[27]
    return hello_verify_request[28:28 + length]


class PskClient:
    """A DTLS 1.2 PSK client on memory BIOs (`comatrix.dtls.libssl.ClientContext`), for unit tests."""

    def __init__(self, identity: str, key: bytes, ciphers: str = "PSK-AES128-CCM8") -> None:
        from comatrix.dtls import libssl

        self.context = libssl.ClientContext(identity, key, tuple(ciphers.split(":")))
        self.failed = False
        #: Every flight this client sent, in order (the tests replay some).
        self.sent: list[bytes] = []
        self.connection = libssl.Connection(self.context, 1232)

    def step(self, received: list[bytes]) -> bytes:
        """Feed what the server sent, advance the handshake, return what to send."""
        from comatrix.dtls.libssl import HandshakeFailed

        for datagram in received or [b""]:
            self.connection.feed(datagram)
            try:
                self.connection.handshake()
            except HandshakeFailed as failed:
                self.failed = True
                return failed.output
        return self.connection.take_output()

    def close(self) -> None:
        self.connection.free()
        self.context.free()
