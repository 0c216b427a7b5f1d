"""A small ctypes binding to OpenSSL's ``libssl.so.3``: what a DTLS 1.2 PSK server (and client) needs.

Why ctypes and not pyOpenSSL: pyOpenSSL has no public PSK API in any version,
and its private cffi bindings differ between Debian 12 (pyOpenSSL 23.0 on
cryptography 38, which lacks ``DTLSv1_get_timeout``) and current releases (which
are removing those bindings).  ``libssl.so.3`` is on every Debian 12 system (the
Python interpreter itself links it) and keeps its ABI across OpenSSL 3.x, so a
binding to it works the same in the test venv and in the ``Architecture: all``
package, with nothing compiled.

Each `Connection` owns one ``SSL`` object with two memory BIOs: the caller feeds
received datagrams in and sends what comes out, so no socket and no thread is
involved.  Everything here is non-blocking and runs in the reactor thread.
Secrets (PSKs) pass only through the PSK callback into OpenSSL's buffer.

`ClientContext` is the client side (``comatrix-device``'s coaps:// link): the same
`Connection`, in the connect state, offering the one RFC 7925 suite.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import hmac
import os
from typing import Callable

__all__ = ["DtlsUnavailable", "ServerContext", "ClientContext", "Connection", "HandshakeFailed",
           "RFC7925_CIPHERS"]

#: PSK suites in server preference order: RFC 7925's mandatory CCM_8 first (8-byte tag,
#: the least overhead on air), then the other AES-CCM/GCM PSK suites OpenSSL offers.
RFC7925_CIPHERS = ("PSK-AES128-CCM8", "PSK-AES256-CCM8", "PSK-AES128-CCM", "PSK-AES256-CCM",
                   "PSK-AES128-GCM-SHA256", "PSK-AES256-GCM-SHA384")

_DTLS1_2_VERSION = 0xFEFD
_SSL_CTRL_SET_MTU = 17
_DTLS_CTRL_GET_TIMEOUT = 73
_DTLS_CTRL_HANDLE_TIMEOUT = 74
_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_SESS_CACHE_OFF = 0
_SSL_CTRL_SET_SIGALGS_LIST = 98
_SSL_CTRL_SET_MIN_PROTO_VERSION = 123
_SSL_CTRL_SET_MAX_PROTO_VERSION = 124
_SSL_OP_NO_QUERY_MTU = 1 << 12
_SSL_OP_COOKIE_EXCHANGE = 1 << 13
_SSL_OP_NO_TICKET = 1 << 14
_SSL_OP_NO_COMPRESSION = 1 << 17
_SSL_OP_NO_ENCRYPT_THEN_MAC = 1 << 19
_SSL_OP_CIPHER_SERVER_PREFERENCE = 1 << 22
_SSL_OP_NO_RENEGOTIATION = 1 << 30
_SSL_ERROR_SSL = 1
_SSL_ERROR_WANT_READ = 2
_SSL_ERROR_WANT_WRITE = 3
_SSL_ERROR_SYSCALL = 5
_SSL_ERROR_ZERO_RETURN = 6

#: Bytes of the cookie: a truncated HMAC of the peer's address.  16 keeps the
#: HelloVerifyRequest (13 + 12 + 3 + 16 = 44 bytes) below the smallest ClientHello.
COOKIE_BYTES = 16
_PSK_MAX = 64

_PSK_CB = ctypes.CFUNCTYPE(ctypes.c_uint, ctypes.c_void_p, ctypes.c_char_p,
                           ctypes.POINTER(ctypes.c_ubyte), ctypes.c_uint)
_PSK_CLIENT_CB = ctypes.CFUNCTYPE(ctypes.c_uint, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p,
                                  ctypes.c_uint, ctypes.c_void_p, ctypes.c_uint)
_COOKIE_GEN_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_ubyte),
                                  ctypes.POINTER(ctypes.c_uint))
_COOKIE_VERIFY_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_ubyte),
                                     ctypes.c_uint)


class DtlsUnavailable(RuntimeError):
    """libssl.so.3 cannot be loaded (or lacks a function this binding needs)."""


class HandshakeFailed(Exception):
    """The DTLS session failed (bad PSK, bad record, alert); ``output`` holds the alert to send."""

    def __init__(self, output: bytes) -> None:
        super().__init__("DTLS session failed")
        self.output = output


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "DTLS_server_method": (ctypes.c_void_p, []),
    "DTLS_client_method": (ctypes.c_void_p, []),
    "SSL_CTX_set_psk_client_callback": (None, [ctypes.c_void_p, _PSK_CLIENT_CB]),
    "SSL_set_connect_state": (None, [ctypes.c_void_p]),
    "SSL_CTX_new": (ctypes.c_void_p, [ctypes.c_void_p]),
    "SSL_CTX_free": (None, [ctypes.c_void_p]),
    "SSL_CTX_ctrl": (ctypes.c_long, [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]),
    "SSL_CTX_set_options": (ctypes.c_uint64, [ctypes.c_void_p, ctypes.c_uint64]),
    "SSL_CTX_set_cipher_list": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p]),
    "SSL_CTX_set_psk_server_callback": (None, [ctypes.c_void_p, _PSK_CB]),
    "SSL_CTX_set_cookie_generate_cb": (None, [ctypes.c_void_p, _COOKIE_GEN_CB]),
    "SSL_CTX_set_cookie_verify_cb": (None, [ctypes.c_void_p, _COOKIE_VERIFY_CB]),
    "SSL_new": (ctypes.c_void_p, [ctypes.c_void_p]),
    "SSL_free": (None, [ctypes.c_void_p]),
    "SSL_set_bio": (None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]),
    "SSL_set_accept_state": (None, [ctypes.c_void_p]),
    "SSL_ctrl": (ctypes.c_long, [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]),
    "SSL_set_options": (ctypes.c_uint64, [ctypes.c_void_p, ctypes.c_uint64]),
    "SSL_do_handshake": (ctypes.c_int, [ctypes.c_void_p]),
    "SSL_is_init_finished": (ctypes.c_int, [ctypes.c_void_p]),
    "SSL_read": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]),
    "SSL_write": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]),
    "SSL_shutdown": (ctypes.c_int, [ctypes.c_void_p]),
    "SSL_get_error": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
    "SSL_get_psk_identity": (ctypes.c_char_p, [ctypes.c_void_p]),
    "SSL_get_current_cipher": (ctypes.c_void_p, [ctypes.c_void_p]),
    "SSL_CIPHER_get_name": (ctypes.c_char_p, [ctypes.c_void_p]),
    "DTLSv1_listen": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p]),
    "BIO_s_mem": (ctypes.c_void_p, []),
    "BIO_new": (ctypes.c_void_p, [ctypes.c_void_p]),
    "BIO_write": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]),
    "BIO_read": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]),
    "BIO_ctrl_pending": (ctypes.c_size_t, [ctypes.c_void_p]),
    "BIO_ADDR_new": (ctypes.c_void_p, []),
    "BIO_ADDR_free": (None, [ctypes.c_void_p]),
    "ERR_clear_error": (None, []),
}

_lib: ctypes.CDLL | None = None


def load() -> ctypes.CDLL:
    """The loaded libssl with typed functions; `DtlsUnavailable` when it is missing."""
    global _lib
    if _lib is not None:
        return _lib
    names = ["libssl.so.3"]
    found = ctypes.util.find_library("ssl")
    if found and found not in names:
        names.append(found)
    library = None
    for name in names:
        try:
            library = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if library is None:
        raise DtlsUnavailable("libssl.so.3 not found (Debian: apt install libssl3)")
    try:
        for function, (restype, argtypes) in _SIGNATURES.items():
            entry = getattr(library, function)
            entry.restype = restype
            entry.argtypes = argtypes
    except AttributeError as exc:
        raise DtlsUnavailable(f"libssl lacks {exc}") from None
    _lib = library
    return library


class _Context:
    """One DTLS 1.2-only ``SSL_CTX`` (either role) with the given PSK suites."""

    def __init__(self, method: str, ciphers: tuple[str, ...], options: int) -> None:
        lib = self._lib = load()
        #: The peer whose datagram is being listened to (servers: set by `Connection.listen`).
        self.cookie_peer = b""
        ctx = lib.SSL_CTX_new(getattr(lib, method)())
        if not ctx:
            raise DtlsUnavailable("SSL_CTX_new failed")
        self.ctx = ctx
        lib.SSL_CTX_ctrl(ctx, _SSL_CTRL_SET_MIN_PROTO_VERSION, _DTLS1_2_VERSION, None)
        lib.SSL_CTX_ctrl(ctx, _SSL_CTRL_SET_MAX_PROTO_VERSION, _DTLS1_2_VERSION, None)
        lib.SSL_CTX_set_options(ctx, _SSL_OP_NO_QUERY_MTU | _SSL_OP_NO_TICKET | _SSL_OP_NO_COMPRESSION
                                | _SSL_OP_NO_RENEGOTIATION | options)
        # No resumption (no cache, no tickets): a server then sends an empty session id,
        # 32 bytes less in every ServerHello.
        lib.SSL_CTX_ctrl(ctx, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None)
        if lib.SSL_CTX_set_cipher_list(ctx, ":".join(ciphers).encode("ascii")) != 1:
            lib.ERR_clear_error()
            self.free()
            raise DtlsUnavailable("libssl offers none of the RFC 7925 PSK cipher suites")

    def free(self) -> None:
        if self.ctx:
            self._lib.SSL_CTX_free(self.ctx)
            self.ctx = None


class ServerContext(_Context):
    """One ``SSL_CTX``: DTLS 1.2 only, the PSK suites, PSK lookup and address-bound cookies.

    ``psk_for(identity)`` returns the key for a PSK identity, or None for an unknown one.
    Cookies are an HMAC of the peer address under a secret that `rotate_cookie_secret`
    replaces; a cookie made under the previous secret still counts.
    """

    def __init__(self, psk_for: Callable[[str], bytes | None],
                 ciphers: tuple[str, ...] = RFC7925_CIPHERS) -> None:
        super().__init__("DTLS_server_method", ciphers, _SSL_OP_COOKIE_EXCHANGE | _SSL_OP_CIPHER_SERVER_PREFERENCE)
        lib, ctx = self._lib, self.ctx
        self._psk_for = psk_for
        self._secrets = [os.urandom(32), os.urandom(32)]
        # The callbacks must outlive the SSL_CTX: keep references on self.
        self._psk_cb = _PSK_CB(self._psk_callback)
        self._gen_cb = _COOKIE_GEN_CB(self._cookie_generate)
        self._verify_cb = _COOKIE_VERIFY_CB(self._cookie_verify)
        lib.SSL_CTX_set_psk_server_callback(ctx, self._psk_cb)
        lib.SSL_CTX_set_cookie_generate_cb(ctx, self._gen_cb)
        lib.SSL_CTX_set_cookie_verify_cb(ctx, self._verify_cb)

    def rotate_cookie_secret(self) -> None:
        self._secrets = [os.urandom(32), self._secrets[0]]

    def cookie(self, peer: bytes, secret_index: int = 0) -> bytes:
        return hmac.new(self._secrets[secret_index], peer, hashlib.sha256).digest()[:COOKIE_BYTES]

    def _psk_callback(self, ssl: int, identity: bytes | None, out: "ctypes._Pointer[ctypes.c_ubyte]",
                      max_len: int) -> int:
        try:
            key = self._psk_for(identity.decode("utf-8")) if identity is not None else None
        except Exception:  # never let an exception unwind through C
            key = None
        if not key or len(key) > min(max_len, _PSK_MAX):
            return 0
        ctypes.memmove(out, key, len(key))
        return len(key)

    def _cookie_generate(self, ssl: int, out: "ctypes._Pointer[ctypes.c_ubyte]",
                         length: "ctypes._Pointer[ctypes.c_uint]") -> int:
        cookie = self.cookie(self.cookie_peer)
        ctypes.memmove(out, cookie, len(cookie))
        length[0] = len(cookie)
        return 1

    def _cookie_verify(self, ssl: int, cookie: "ctypes._Pointer[ctypes.c_ubyte]", length: int) -> int:
        if length != COOKIE_BYTES:
            return 0
        given = ctypes.string_at(cookie, length)
        return int(any(hmac.compare_digest(given, self.cookie(self.cookie_peer, index))
                       for index in (0, 1)))


class ClientContext(_Context):
    """A client ``SSL_CTX`` that offers one PSK identity and key (RFC 7925: CCM_8 only by default)."""

    def __init__(self, identity: str, key: bytes, ciphers: tuple[str, ...] = RFC7925_CIPHERS[:1]) -> None:
        encoded = identity.encode("utf-8")
        if not encoded or b"\0" in encoded or not key or len(key) > _PSK_MAX:
            raise ValueError(f"a PSK identity (no NUL) and a key of 1-{_PSK_MAX} bytes are needed")
        # Bytes on air: encrypt-then-MAC means nothing to an AEAD suite, and a PSK suite
        # signs nothing, so the ClientHello names one signature algorithm, not 21 (-42 bytes).
        super().__init__("DTLS_client_method", ciphers, _SSL_OP_NO_ENCRYPT_THEN_MAC)
        sigalgs = ctypes.c_char_p(b"ECDSA+SHA256")
        self._lib.SSL_CTX_ctrl(self.ctx, _SSL_CTRL_SET_SIGALGS_LIST, 0, ctypes.cast(sigalgs, ctypes.c_void_p))
        self._identity = encoded
        self._key = key
        self._psk_cb = _PSK_CLIENT_CB(self._psk_callback)  # must outlive the SSL_CTX
        self._lib.SSL_CTX_set_psk_client_callback(self.ctx, self._psk_cb)

    def __repr__(self) -> str:
        return "<ClientContext>"

    def _psk_callback(self, ssl: int, hint: bytes | None, identity_out: int, max_identity: int,
                      psk_out: int, max_psk: int) -> int:
        if len(self._identity) + 1 > max_identity or len(self._key) > max_psk:
            return 0
        ctypes.memmove(identity_out, self._identity + b"\0", len(self._identity) + 1)
        ctypes.memmove(psk_out, self._key, len(self._key))
        return len(self._key)


_buffers: list[ctypes.Array[ctypes.c_char]] = []


def _read_buffer() -> "ctypes.Array[ctypes.c_char]":
    """One 64 KiB buffer for every read: all of this runs in the reactor thread, one call at a time."""
    if not _buffers:
        _buffers.append(ctypes.create_string_buffer(65536))
    return _buffers[0]


class Connection:
    """One ``SSL`` object between two memory BIOs (server side unless the context is a `ClientContext`)."""

    def __init__(self, context: _Context, mtu: int) -> None:
        lib = self._lib = context._lib
        self.context = context
        ssl = lib.SSL_new(context.ctx)
        if not ssl:
            raise DtlsUnavailable("SSL_new failed")
        self.ssl = ssl
        self._rbio = lib.BIO_new(lib.BIO_s_mem())
        self._wbio = lib.BIO_new(lib.BIO_s_mem())
        lib.SSL_set_bio(ssl, self._rbio, self._wbio)  # the SSL owns both BIOs from here on
        lib.SSL_ctrl(ssl, _SSL_CTRL_SET_MTU, mtu, None)
        if isinstance(context, ClientContext):
            lib.SSL_set_connect_state(ssl)
        else:
            lib.SSL_set_accept_state(ssl)
        self._buffer = _read_buffer()
        #: The peer address this connection's cookie was made for (set by `listen`).
        self.peer = b""

    # ----------------------------------------------------------------- cookie exchange

    def listen(self, datagram: bytes, peer: bytes) -> tuple[bool, bytes]:
        """Run ``DTLSv1_listen`` on one datagram: (cookie valid, what to send back).

        Nothing per peer is kept: a ClientHello without a valid cookie gets a
        HelloVerifyRequest and leaves this object as it was.
        """
        lib = self._lib
        self.peer = peer
        self.context.cookie_peer = peer
        self._feed(datagram)
        address = lib.BIO_ADDR_new()
        try:
            result = lib.DTLSv1_listen(self.ssl, address)
        finally:
            lib.BIO_ADDR_free(address)
            self.context.cookie_peer = b""
        self._drain_input()
        if result <= 0:
            lib.ERR_clear_error()
        return result > 0, self.take_output()

    # ----------------------------------------------------------------- session

    def handshake(self) -> bool:
        """Advance the handshake; True once it is complete.  `HandshakeFailed` on failure."""
        lib = self._lib
        # OpenSSL checks the cookie of the ClientHello once more when it processes it.
        self.context.cookie_peer = self.peer
        try:
            result = lib.SSL_do_handshake(self.ssl)
        finally:
            self.context.cookie_peer = b""
        if result == 1:
            return True
        error = lib.SSL_get_error(self.ssl, result)
        if error in (_SSL_ERROR_WANT_READ, _SSL_ERROR_WANT_WRITE):
            return False
        lib.ERR_clear_error()
        raise HandshakeFailed(self.take_output())

    @property
    def established(self) -> bool:
        return bool(self._lib.SSL_is_init_finished(self.ssl))

    def receive(self, datagram: bytes) -> tuple[list[bytes], bool]:
        """Feed one datagram of an established session: (application records, peer closed)."""
        lib = self._lib
        self._feed(datagram)
        records = []
        while True:
            count = lib.SSL_read(self.ssl, self._buffer, len(self._buffer))
            if count > 0:
                records.append(ctypes.string_at(self._buffer, count))
                continue
            error = lib.SSL_get_error(self.ssl, count)
            if error == _SSL_ERROR_WANT_READ:
                self._drain_input()
                return records, False
            lib.ERR_clear_error()
            self._drain_input()
            if error == _SSL_ERROR_ZERO_RETURN:
                return records, True
            if error == _SSL_ERROR_SSL or error == _SSL_ERROR_SYSCALL:
                raise HandshakeFailed(self.take_output())
            return records, False

    def feed(self, datagram: bytes) -> None:
        self._feed(datagram)

    def encrypt(self, plaintext: bytes) -> bytes:
        """One application-data record carrying ``plaintext``."""
        lib = self._lib
        if lib.SSL_write(self.ssl, plaintext, len(plaintext)) <= 0:
            lib.ERR_clear_error()
            return b""
        return self.take_output()

    def close_notify(self) -> bytes:
        """Our close_notify alert (sent when we end the session)."""
        self._lib.SSL_shutdown(self.ssl)
        self._lib.ERR_clear_error()
        return self.take_output()

    def timeout(self) -> float | None:
        """Seconds until the handshake retransmission timer fires (None: no timer running)."""
        value = _Timeval()
        if self._lib.SSL_ctrl(self.ssl, _DTLS_CTRL_GET_TIMEOUT, 0, ctypes.byref(value)) <= 0:
            return None
        return value.tv_sec + value.tv_usec / 1e6

    def handle_timeout(self) -> tuple[bytes, bool]:
        """Let OpenSSL retransmit its last flight: (datagram to send, still alive)."""
        result = self._lib.SSL_ctrl(self.ssl, _DTLS_CTRL_HANDLE_TIMEOUT, 0, None)
        if result < 0:
            self._lib.ERR_clear_error()
            return self.take_output(), False
        return self.take_output(), True

    def psk_identity(self) -> str | None:
        raw = self._lib.SSL_get_psk_identity(self.ssl)
        return raw.decode("utf-8", "replace") if raw is not None else None

    def cipher(self) -> str:
        cipher = self._lib.SSL_get_current_cipher(self.ssl)
        name = self._lib.SSL_CIPHER_get_name(cipher) if cipher else None
        return name.decode("ascii") if name else "?"

    def take_output(self) -> bytes:
        """Everything OpenSSL wrote since the last call (records of one flight)."""
        lib = self._lib
        pending = lib.BIO_ctrl_pending(self._wbio)
        if not pending:
            return b""
        buffer = ctypes.create_string_buffer(pending)
        count = lib.BIO_read(self._wbio, buffer, pending)
        return buffer.raw[:max(count, 0)]

    def free(self) -> None:
        if self.ssl:
            self._lib.SSL_free(self.ssl)
            self.ssl = None

    def _feed(self, datagram: bytes) -> None:
        self._drain_input()
        if datagram:
            self._lib.BIO_write(self._rbio, datagram, len(datagram))

    def _drain_input(self) -> None:
        # A datagram OpenSSL left unread must not merge with the next one.
        lib = self._lib
        pending = lib.BIO_ctrl_pending(self._rbio)
        while pending:
            lib.BIO_read(self._rbio, self._buffer, min(pending, len(self._buffer)))
            pending = lib.BIO_ctrl_pending(self._rbio)
