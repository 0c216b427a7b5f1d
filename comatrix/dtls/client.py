"""A blocking DTLS 1.2 PSK client session over one UDP socket, for ``comatrix-device`` (coaps://).

The same `comatrix.dtls.libssl.Connection` as the gateway's, in the connect
state, with the socket driven here: the handshake runs at construction, with
OpenSSL's retransmission timer (RFC 6347 §4.2.4) and a bounded total time; then
each CoAP message is one application-data record in one datagram (RFC 7252 §9.1).
This blocks on its socket: it is for command-line clients, never for the reactor.
"""

from __future__ import annotations

import collections
import socket
import time
from typing import Any, Deque

from comatrix.dtls.libssl import ClientContext, Connection, HandshakeFailed

__all__ = ["DtlsClientLink", "DtlsSessionError", "HANDSHAKE_TIMEOUT"]

#: Give up a handshake after this many seconds: OpenSSL's timer starts at 1 s and doubles, so
#: this allows the first flight and 3 retransmissions.  A gateway stays silent to a wrong
#: PSK (it drops the Finished it cannot verify), so this is also how long that takes to tell.
HANDSHAKE_TIMEOUT = 15.0
#: Record size limit told to OpenSSL: the IPv6 minimum MTU less IPv6 and UDP headers.
MTU = 1232


class DtlsSessionError(ConnectionError):
    """The handshake failed (wrong PSK, unknown identity, no answer) or the session ended."""


class DtlsClientLink:
    """A DTLS session to one gateway: ``send`` and ``receive`` carry plaintext datagrams."""

    def __init__(self, family: int, address: Any, identity: str, key: bytes, *, source: str | None = None,
                 timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self._context: ClientContext | None = None
        self._connection: Connection | None = None
        try:
            if source is not None:
                self.sock.bind((source, 0))
            self.sock.connect(address)
            self._context = ClientContext(identity, key)
            self._connection = Connection(self._context, MTU)
            self._received: Deque[bytes] = collections.deque()
            self._handshake(time.monotonic() + timeout)
        except BaseException:
            self.close(notify=False)
            raise

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            raise DtlsSessionError("DTLS session closed")
        return self._connection

    def cipher(self) -> str:
        return self.connection.cipher()

    def _handshake(self, deadline: float) -> None:
        connection = self.connection
        while True:
            try:
                done = connection.handshake()
            except HandshakeFailed as failed:
                self._send_raw(failed.output)
                raise DtlsSessionError("DTLS handshake failed (wrong PSK or identity?)") from None
            self._send_raw(connection.take_output())
            if done:
                return
            now = time.monotonic()
            if now >= deadline:
                raise DtlsSessionError("DTLS handshake failed: no answer (wrong PSK or identity, or no DTLS port)")
            wait = connection.timeout()
            self.sock.settimeout(max(0.001, min(wait if wait is not None else 1.0, deadline - now)))
            try:
                connection.feed(self.sock.recv(65535))
            except socket.timeout:
                output, alive = connection.handle_timeout()
                self._send_raw(output)
                if not alive:
                    raise DtlsSessionError("DTLS handshake gave up") from None
            except ConnectionRefusedError:
                raise DtlsSessionError("nothing listens on the gateway's DTLS port") from None

    def _send_raw(self, data: bytes) -> None:
        if data:
            self.sock.send(data)

    def send(self, plaintext: bytes) -> None:
        record = self.connection.encrypt(plaintext)
        if not record:
            raise DtlsSessionError("DTLS session cannot send")
        self.sock.send(record)

    def receive(self, deadline: float) -> bytes | None:
        """The next application datagram before ``deadline`` (monotonic), else None."""
        while not self._received:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65535)
            except socket.timeout:
                return None
            except ConnectionRefusedError:
                continue  # an ICMP error for an earlier datagram: the gateway may be back
            try:
                records, closed = self.connection.receive(data)
            except HandshakeFailed:
                raise DtlsSessionError("the DTLS session failed") from None
            self._received.extend(records)
            if closed and not self._received:
                raise DtlsSessionError("the gateway closed the DTLS session")
        return self._received.popleft()

    def close(self, notify: bool = True) -> None:
        if self._connection is not None:
            if notify and self._connection.established:
                try:
                    self._send_raw(self._connection.close_notify())
                except OSError:
                    pass
            self._connection.free()
            self._connection = None
        if self._context is not None:
            self._context.free()
            self._context = None
        self.sock.close()
