"""``comatrix-device``: the reference device client, and the executable spec for firmware authors.

It speaks the compact profile (``docs/protocol.rst``) by default and the
original CoMatrix form (Proxy-Uri + option 256, full Matrix key names) with
``--original``::

    comatrix-device --gateway coap://[::1]:5683 login USER PASS
    comatrix-device join '#lab:example.org'       # or a room id, or a configured name
    comatrix-device send '#lab:example.org' 'hello'
    comatrix-device getmsg '#lab:example.org'     # latest; --new: everything since the last seen
    comatrix-device watch '#lab:example.org'      # Observe: print each new message
    comatrix-device time
    comatrix-device upload '#lab:example.org' snapshot.jpg   # Block1; resumable: --key K
    comatrix-device profile --name 'Door camera' --avatar face.png
    comatrix-device logout

Its session handle, seq counter, room handles and cursors live in a small JSON
state file (0600; ``--state FILE``, default ``$XDG_STATE_HOME/comatrix-device/state.json``).

Every command also runs protected, as a provisioned device does::

    comatrix-device --gateway coaps://[::1] --psk-identity sensor01 --psk-key KEY send ROOM hi  # DTLS 1.2 PSK
    comatrix-device --oscore sensor02.toml send ROOM hi                                         # OSCORE

DTLS (`comatrix.dtls.client`): one handshake per run, TLS_PSK_WITH_AES_128_CCM_8,
then every CoAP message is one record.  OSCORE (`comatrix.oscore.client`, context
file format there): requests protected with the device's sender context, the
sender sequence number kept in the state file (stored before use), a gateway's
4.01 Echo challenge answered by repeating the request with the Echo option.

The CoAP side is a deliberately small hand-written UDP client (`UdpCoap`), not
aiocoap: a firmware author should be able to read every byte it sends (2-byte
tokens, only the options the spec names, RFC 7252 retransmission with the same
Message ID, separate responses, Observe), tests and the wire-size bench need
exactly those bytes, and the installed gateway package gains no dependency.
It blocks (plain sockets); it is a command-line tool, never used on a reactor.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import mimetypes
import os
import random
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Deque, Generator, Iterator, Protocol, Sequence
from urllib.parse import quote, unquote, urlsplit

import cbor2

from comatrix.coap import wire
from comatrix.coap.amplification import ECHO
from comatrix.durable import write_durably
from comatrix.coap.blockwise import Block
from comatrix.coap.numbers import Code, ContentFormat, MessageType, OptionNumber, dotted
from comatrix.compact import codec
from comatrix.compact.codec import (PATHS, CreateRequest, EventRequest, HandleRequest, HistoryPage, HistoryRequest,
                                    Invitation, JoinRequest, LoginRequest, Message, MessagesRequest, ReactRequest,
                                    RoomInfo, RoomRequest, SendRequest, SetRoomRequest, UserRequest)
from comatrix.compact.mediawire import (MediaReference, ProfileRequest, ThumbnailRequest, UploadHeader,
                                        decode_display_name)
from comatrix.dtls.client import DtlsClientLink
from comatrix.oscore.client import OscoreClient, OscoreError, load_device_context

__all__ = ["CoapResponseError", "CompactDevice", "DeviceState", "NoResponse", "OriginalDevice", "Reply",
           "UdpCoap", "main"]

#: MSC3079's access-token option, used by the original CoMatrix form.
ACCESS_TOKEN_OPTION = 256
DEFAULT_GATEWAY = "coap://[::1]:5683"
#: RFC 7252 §6.2: the coaps:// default port.
DEFAULT_COAPS_PORT = 5684
#: What the original CoMatrix firmware put in front of the Proxy-Uri path (its homeserver URL).
DEFAULT_PROXY_BASE = "http://[fd00::1]:8008"

#: Longest wait the client accepts from a 4.29's Max-Age before retrying, seconds.
MAX_RATE_LIMIT_WAIT = 5
#: Block size (RFC 7959 SZX) asked for answers of any length: 32 bytes, a first block within 64.
SMALL_BLOCK_SZX = 1
#: Block size of uploads and thumbnails (SZX 6: 1024 bytes; a radio device picks 2, 64 bytes).
UPLOAD_BLOCK_SZX = 6
#: RFC 9175 Request-Tag: which upload a block belongs to (the client sets the upload key).
REQUEST_TAG = 292
#: Called with ("up" | "down", datagram) for every datagram sent or received.
Trace = Callable[[str, bytes], None]


class NoResponse(Exception):
    """Nothing (or nothing complete) came back within the retransmission window."""


class CoapResponseError(Exception):
    """The gateway answered with a 4.xx or 5.xx code."""

    def __init__(self, reply: "Reply") -> None:
        self.reply = reply
        diagnostic = reply.payload.decode("utf-8", "replace") if reply.payload else ""
        super().__init__(f"{reply.code_text} {diagnostic}".strip())


@dataclasses.dataclass(frozen=True)
class Reply:
    code: int
    options: tuple[tuple[int, bytes], ...]
    payload: bytes
    mtype: int

    @property
    def code_text(self) -> str:
        return dotted(self.code)

    @property
    def ok(self) -> bool:
        return 64 <= self.code < 96

    def option(self, number: int) -> bytes | None:
        for num, value in self.options:
            if num == number:
                return value
        return None

    def checked(self) -> "Reply":
        if not self.ok:
            raise CoapResponseError(self)
        return self


class Link(Protocol):
    """Where datagrams go: plain UDP, or a DTLS session (`comatrix.dtls.client.DtlsClientLink`)."""

    sock: socket.socket

    def send(self, data: bytes) -> None: ...

    def receive(self, deadline: float) -> bytes | None: ...

    def close(self) -> None: ...


class UdpLink:
    """Plain CoAP over UDP: one socket, datagrams as they are."""

    def __init__(self, family: int, address: Any, source: str | None = None) -> None:
        self.address = address
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        if source is not None:  # a specific source address (tests: another device on loopback)
            self.sock.bind((source, 0))

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.address)

    def receive(self, deadline: float) -> bytes | None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        self.sock.settimeout(remaining)
        try:
            data, _ = self.sock.recvfrom(2048)
        except socket.timeout:
            return None
        return data

    def close(self) -> None:
        self.sock.close()


def resolve_gateway(gateway: str) -> tuple[str, int, Any]:
    """(scheme, address family, socket address) of a ``coap://`` or ``coaps://`` URI."""
    parts = urlsplit(gateway)
    if parts.scheme not in ("coap", "coaps") or not parts.hostname:
        raise ValueError("gateway must be a coap://host[:port] or coaps://host[:port] URI")
    host = unquote(parts.hostname)
    if "%" not in host and parts.netloc.find("%25") >= 0:  # urlsplit drops an IPv6 zone
        host += "%" + unquote(parts.netloc.split("%25", 1)[1].split("]", 1)[0])
    default_port = DEFAULT_COAPS_PORT if parts.scheme == "coaps" else 5683
    infos = socket.getaddrinfo(host, parts.port or default_port, type=socket.SOCK_DGRAM)
    family, _, _, _, address = infos[0]
    return parts.scheme, family, address


def _uint_option(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


class UdpCoap:
    """A minimal, blocking CoAP-over-UDP client (RFC 7252 CON exchanges, RFC 7641 Observe)."""

    ACK_TIMEOUT = 2.0
    ACK_RANDOM_FACTOR = 1.5
    MAX_RETRANSMIT = 4
    #: How long to wait for a separate response after an empty ACK.
    SEPARATE_TIMEOUT = 60.0
    #: Notifications kept per observation while other exchanges run; beyond it the oldest
    #: go (as if lost: the profile's cursors let a device notice and fetch them).
    PENDING_NOTIFICATIONS = 64

    def __init__(self, gateway: str, *, trace: Trace | None = None, token_length: int = 2,
                 ack_timeout: float | None = None, source: str | None = None,
                 psk: tuple[str, bytes] | None = None, oscore: OscoreClient | None = None,
                 answer_timeout: float | None = None) -> None:
        """``gateway`` is ``coap://`` (plain, or OSCORE with ``oscore``) or ``coaps://`` (DTLS with ``psk``).

        ``answer_timeout``: give up on a request after that many seconds without any answer
        (not even an empty ACK) instead of after RFC 7252's whole retransmission window (up
        to ~68 s with its defaults); None keeps the window.
        """
        scheme, family, address = resolve_gateway(gateway)
        self.gateway = gateway
        self.answer_timeout = answer_timeout
        if (scheme == "coaps") != (psk is not None):
            raise ValueError("coaps:// needs a PSK (--psk-identity/--psk-key), and a PSK needs coaps://")
        if psk is not None and oscore is not None:
            raise ValueError("choose DTLS or OSCORE, not both")
        self.link: Link = (UdpLink(family, address, source) if psk is None
                           else DtlsClientLink(family, address, psk[0], psk[1], source=source))
        self.address: Any = address
        self.oscore = oscore
        self.trace = trace
        self.token_length = token_length
        if ack_timeout is not None:
            self.ACK_TIMEOUT = ack_timeout
        self._mid = random.randrange(0x10000)
        # Token of each live observation -> its notifications that arrived (and were
        # ACKed) during another exchange, for `observe` to hand out next.
        self._observations: dict[bytes, Deque[wire.Datagram]] = {}
        # Token of each exchange under OSCORE -> the Partial IV of its request (answers are bound to it).
        self._request_pivs: dict[bytes, bytes] = {}

    @property
    def sock(self) -> socket.socket:
        """The UDP socket under the link (tests may put a scripted peer in its place)."""
        return self.link.sock

    @sock.setter
    def sock(self, value: socket.socket) -> None:
        self.link.sock = value

    def close(self) -> None:
        self.link.close()

    def __enter__(self) -> "UdpCoap":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- datagrams ------------------------------------------------------------------

    def _next_mid(self) -> int:
        self._mid = (self._mid + 1) & 0xFFFF
        return self._mid

    def _send(self, data: bytes) -> None:
        if self.trace is not None:
            self.trace("up", data)
        self.link.send(data)

    def _receive(self, deadline: float) -> wire.Datagram | None:
        """The next well-formed datagram from the gateway before ``deadline``, else None."""
        while True:
            data = self.link.receive(deadline)
            if data is None:
                return None
            if self.trace is not None:
                self.trace("down", data)
            try:
                return wire.decode(data)
            except wire.FormatError:
                continue

    def _ack(self, message: wire.Datagram) -> None:
        if message.mtype == MessageType.CON:
            self._send(wire.empty(MessageType.ACK, message.mid))

    def _keep_notification(self, message: wire.Datagram) -> bool:
        """Keep a notification of a live observation that arrived during another exchange.

        Dropping it would lose the message until a later one reveals the gap, and
        rejecting a CON one with RST would cancel the observation (RFC 7641 §3.6).
        """
        pending = self._observations.get(message.token)
        if pending is None or message.code == Code.EMPTY:
            return False
        self._ack(message)
        pending.append(message)
        return True

    @staticmethod
    def request_options(path: str, *, content_format: int | None = None, observe: int | None = None,
                        options: Sequence[tuple[int, bytes]] = ()) -> list[tuple[int, bytes]]:
        opts: list[tuple[int, bytes]] = []
        if observe is not None:
            opts.append((OptionNumber.OBSERVE, _uint_option(observe)))
        opts += [(OptionNumber.URI_PATH, segment.encode("utf-8")) for segment in path.split("/") if segment]
        if content_format is not None:
            opts.append((OptionNumber.CONTENT_FORMAT, _uint_option(content_format)))
        opts += list(options)
        opts.sort(key=lambda option: option[0])
        return opts

    @classmethod
    def build(cls, mtype: int, code: int, mid: int, token: bytes, path: str, *, payload: bytes = b"",
              content_format: int | None = None, observe: int | None = None,
              options: Sequence[tuple[int, bytes]] = ()) -> bytes:
        opts = cls.request_options(path, content_format=content_format, observe=observe, options=options)
        return wire.encode(mtype, code, mid, token, opts, payload)

    def _answer(self, message: wire.Datagram) -> Reply | None:
        """The answer as the application sees it: under OSCORE verified and decrypted (None: not valid)."""
        if self.oscore is None:
            return _reply(message)
        try:
            return _reply(self.oscore.unprotect(message, self._request_pivs[message.token]))
        except (KeyError, OscoreError):
            return None

    # -- exchanges ------------------------------------------------------------------

    def request(self, code: int, path: str, *, payload: bytes = b"", content_format: int | None = None,
                observe: int | None = None, options: Sequence[tuple[int, bytes]] = ()) -> Reply:
        """One confirmable request; the final response (piggy-backed or separate).

        Until the gateway has verified this device's address, it keeps its answers
        within 3x the request (RFC 9175 §2.4): a 4.01 with an Echo option is answered
        by repeating the request with that Echo value, and an answer sent block-wise
        (Block2) is completed with one request per block.
        """
        token = secrets.token_bytes(self.token_length)
        reply = self._final(code, path, token, payload, content_format, observe, options)
        return self._rest_of_blocks(code, path, payload, content_format, options, reply)

    def _rest_of_blocks(self, code: int, path: str, payload: bytes, content_format: int | None,
                        options: Sequence[tuple[int, bytes]], first: Reply) -> Reply:
        """``first`` with the payload of every following Block2 block appended (RFC 7959)."""
        raw = first.option(OptionNumber.BLOCK2)
        if raw is None or not first.ok:
            return first
        block = Block.decode(raw)
        body = first.payload
        while block.more:
            asked = Block(len(body) >> (4 + block.szx), False, block.szx)
            following = [option for option in options if option[0] != OptionNumber.BLOCK2]
            following.append((OptionNumber.BLOCK2, asked.encode()))
            reply = self._final(code, path, secrets.token_bytes(self.token_length), payload,
                                content_format, None, following)
            raw = reply.option(OptionNumber.BLOCK2)
            if not reply.ok or raw is None:
                return reply
            block = Block.decode(raw)
            if block.offset != len(body):
                raise NoResponse(f"block at {block.offset}, expected {len(body)}")
            body += reply.payload
        return dataclasses.replace(first, payload=body)

    def _final(self, code: int, path: str, token: bytes, payload: bytes, content_format: int | None,
               observe: int | None, options: Sequence[tuple[int, bytes]]) -> Reply:
        """The final reply of one exchange; its token's OSCORE request state is dropped after."""
        try:
            reply, _ = self._exchange(code, path, token, payload, content_format, observe, options)
        finally:
            self._request_pivs.pop(token, None)
        return reply

    def _exchange(self, code: int, path: str, token: bytes, payload: bytes, content_format: int | None,
                  observe: int | None, options: Sequence[tuple[int, bytes]]) -> tuple[Reply, int]:
        opts = self.request_options(path, content_format=content_format, observe=observe, options=options)
        reply, mid = self._exchange_once(code, path, token, opts, payload)
        echo = reply.option(ECHO)
        if echo is not None and reply.code == Code.UNAUTHORIZED:
            # RFC 9175: the gateway has not verified our address yet (amplification limit) or,
            # over OSCORE, does not know our sequence numbers yet (it restarted, RFC 8613
            # B.1.2); repeating the request once with its Echo value answers both.
            repeat = secrets.token_bytes(self.token_length)  # a late copy of the challenge cannot match it
            try:
                reply, mid = self._exchange_once(code, path, repeat, opts + [(ECHO, echo)], payload)
            finally:
                self._request_pivs.pop(repeat, None)
        return reply, mid

    def _encode_request(self, code: int, mid: int, token: bytes, options: list[tuple[int, bytes]],
                        payload: bytes, mtype: int = MessageType.CON) -> bytes:
        if self.oscore is not None:
            code, options, payload, piv = self.oscore.protect(code, options, payload)
            self._request_pivs[token] = piv
        return wire.encode(mtype, code, mid, token, options, payload)

    def send_non(self, code: int, path: str, *, payload: bytes = b"", content_format: int | None = None,
                 options: Sequence[tuple[int, bytes]] = ()) -> None:
        """One non-confirmable request, not waited for (with No-Response: fire and forget, RFC 7967)."""
        token = secrets.token_bytes(self.token_length)
        opts = self.request_options(path, content_format=content_format, options=options)
        self._send(self._encode_request(code, self._next_mid(), token, opts, payload, MessageType.NON))
        self._request_pivs.pop(token, None)

    def _exchange_once(self, code: int, path: str, token: bytes, options: list[tuple[int, bytes]],
                       payload: bytes) -> tuple[Reply, int]:
        mid = self._next_mid()
        data = self._encode_request(code, mid, token, options, payload)
        timeout = random.uniform(self.ACK_TIMEOUT, self.ACK_TIMEOUT * self.ACK_RANDOM_FACTOR)
        acknowledged = False
        give_up = None if self.answer_timeout is None else time.monotonic() + self.answer_timeout
        for _attempt in range(self.MAX_RETRANSMIT + 1):
            if give_up is not None and time.monotonic() >= give_up:
                break
            self._send(data)
            deadline = time.monotonic() + timeout
            if give_up is not None:
                deadline = min(deadline, give_up)
            while True:
                message = self._receive(deadline)
                if message is None:
                    break
                if message.mtype == MessageType.ACK and message.mid == mid:
                    if message.code == Code.EMPTY:
                        acknowledged = True  # separate response follows
                        break
                    if (reply := self._answer(message)) is not None:
                        return reply, mid
                    continue
                if message.token == token and message.code != Code.EMPTY:
                    if (reply := self._answer(message)) is not None:
                        self._ack(message)
                        return reply, mid
                    continue
                if self._keep_notification(message):
                    continue
                if message.mtype == MessageType.CON:  # not ours: reject
                    self._send(wire.empty(MessageType.RST, message.mid))
            if acknowledged:
                break
            timeout *= 2
        if not acknowledged:
            if give_up is not None:
                raise NoResponse(f"no answer from {self.gateway} after {self.answer_timeout:g} s"
                                 " — is the gateway running?")
            raise NoResponse(f"no answer to {Code(code).name} /{path}")
        deadline = time.monotonic() + self.SEPARATE_TIMEOUT
        while True:
            message = self._receive(deadline)
            if message is None:
                raise NoResponse(f"no separate response to {Code(code).name} /{path}")
            if message.token == token and message.code != Code.EMPTY:
                if (reply := self._answer(message)) is not None:
                    self._ack(message)
                    return reply, mid
                continue
            if self._keep_notification(message):
                continue
            if message.mtype == MessageType.CON:
                self._send(wire.empty(MessageType.RST, message.mid))

    def observe(self, code: int, path: str, *, payload: bytes = b"", content_format: int | None = None,
                timeout: float | None = None) -> Generator[Reply, None, None]:
        """Register (Observe: 0); yields the first response, then each notification.

        Stops after ``timeout`` seconds without a notification (None: never) or when
        the gateway ends the observation (a response without Observe, or an error).
        The caller may run other exchanges between two yields: notifications arriving
        meanwhile are kept and yielded next, in the order they came.
        """
        token = secrets.token_bytes(self.token_length)
        pending: Deque[wire.Datagram] = collections.deque(maxlen=self.PENDING_NOTIFICATIONS)
        self._observations[token] = pending
        try:
            first, _ = self._exchange(code, path, token, payload, content_format, 0, ())
            first = self._rest_of_blocks(code, path, payload, content_format, (), first)
            yield first
            if not first.ok or first.option(OptionNumber.OBSERVE) is None:
                return
            seen: set[int] = set()
            while True:
                if pending:
                    message = pending.popleft()  # ACKed when it was kept
                else:
                    deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
                    received = self._receive(deadline)
                    if received is None:
                        return
                    message = received
                    if message.token != token or message.code == Code.EMPTY:
                        if not self._keep_notification(message) and message.mtype == MessageType.CON:
                            self._send(wire.empty(MessageType.RST, message.mid))
                        continue
                    self._ack(message)
                if message.mid in seen:
                    continue  # a retransmitted CON notification
                seen.add(message.mid)
                reply = self._answer(message)
                if reply is None:
                    continue  # under OSCORE: forged or replayed
                yield reply
                if not reply.ok or reply.option(OptionNumber.OBSERVE) is None:
                    return
        finally:
            del self._observations[token]
            self._request_pivs.pop(token, None)


def _reply(message: wire.Datagram) -> Reply:
    return Reply(message.code, tuple(message.options), message.payload, message.mtype)


# ---------------------------------------------------------------------- state


@dataclasses.dataclass
class DeviceState:
    """What a device keeps between runs (firmware: in flash)."""

    path: Path | None = None
    data: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None) -> "DeviceState":
        if path is None or not path.exists():
            return cls(path, {})
        return cls(path, json.loads(path.read_text()))

    def section(self, name: str) -> dict[str, Any]:
        return self.data.setdefault(name, {})

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # An OSCORE sequence number is stored, durably, before it is used.
        write_durably(self.path, json.dumps(self.data, indent=1, sort_keys=True))


def oscore_sequence(state: DeviceState, context_name: str) -> Callable[[], int]:
    """The OSCORE sender sequence numbers of one context, persisted in the state file.

    RFC 8613 Appendix B.1.1 with K = 1: the next number is written (and fsynced)
    before a number is used, so none is used twice, across crashes too.
    """
    def take() -> int:
        numbers = state.section("oscore")
        value = int(numbers.get(context_name, 0))
        numbers[context_name] = value + 1
        state.save()
        return value
    return take


def default_state_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "comatrix-device" / "state.json"


# ---------------------------------------------------------------------- the compact profile


class CompactDevice:
    """The compact profile, operation by operation (what firmware does, in Python)."""

    def __init__(self, coap: UdpCoap, state: DeviceState, *, retries: int = 2) -> None:
        self.coap = coap
        self.state = state
        self.compact = state.section("compact")
        self.retries = retries

    def _request(self, code: int, op: str, payload: bytes = b"", *, blocks: bool = False) -> Reply:
        """One exchange; a 4.29 is retried after its Max-Age (RFC 8516), at most ``retries`` times.

        ``blocks``: an answer of any length (names, member lists) is asked for in 32-byte blocks
        from the first on, so every frame stays within the profile's 64 bytes.
        """
        options = [(OptionNumber.BLOCK2, Block(0, False, SMALL_BLOCK_SZX).encode())] if blocks else []
        for attempt in range(self.retries + 1):
            reply = self.coap.request(code, PATHS[op], payload=payload, options=options,
                                      content_format=codec.CONTENT_FORMAT if payload else None)
            max_age = reply.option(OptionNumber.MAX_AGE)
            if reply.code != Code.TOO_MANY_REQUESTS or attempt == self.retries:
                break
            time.sleep(min(MAX_RATE_LIMIT_WAIT, int.from_bytes(max_age or b"\x01", "big")))
        return reply.checked()

    def _post(self, op: str, payload: bytes) -> Reply:
        return self._request(Code.POST, op, payload)

    @property
    def handle(self) -> bytes:
        value = self.compact.get("handle")
        if not value:
            raise SystemExit("comatrix-device: not logged in (run: login USER PASS)")
        return bytes.fromhex(value)

    def room_handle(self, room: str) -> int:
        """The room handle of a room joined or created under the name ``room``; a number is a handle."""
        rooms = self.compact.get("rooms", {})
        if room in rooms:
            return int(rooms[room])
        if room.isdigit():
            return int(room)
        raise SystemExit(f"comatrix-device: join {room} first")

    def _remember(self, room: str | None, room_handle: int) -> int:
        if room:
            self.compact.setdefault("rooms", {})[room] = room_handle
            self.state.save()
        return room_handle

    def time(self) -> int:
        return codec.decode_uint(self._request(Code.GET, "time").payload)

    def login(self, user: str, password: str) -> bytes:
        reply = self._post("login", LoginRequest(user, password).encode())
        handle = codec.decode_handle(reply.payload)
        self.compact.clear()
        self.compact.update(handle=handle.hex(), rooms={}, cursors={})
        # Seed the idempotency counter from the gateway clock: larger than any seq
        # this device used before, as long as it sends at most one message a second.
        self.compact["seq"] = self.time()
        self.state.save()
        return handle

    def logout(self) -> None:
        self._post("logout", HandleRequest(self.handle).encode())
        self.compact.clear()
        self.state.save()

    def join(self, room: str) -> int:
        reply = self._post("join", JoinRequest.for_room(self.handle, room).encode())
        room_handle = codec.decode_uint(reply.payload)
        self.compact.setdefault("rooms", {})[room] = room_handle
        self.state.save()
        return room_handle

    def send(self, room: str, body: str, kind: int | str = 0, reply_to: int | None = None,
             replaces: int | None = None) -> int | None:
        """Send once: a retry after a lost answer reuses the seq, so Matrix keeps one event.

        ``kind``: 0 m.text, 1 m.notice, 2 m.emote, or a ``geo:`` URI (m.location, ``body`` its
        description); ``reply_to``/``replaces``: event references.  Returns the new event's
        reference (None from a gateway that answers none)."""
        seq = int(self.compact.get("seq", 0)) + 1
        self.compact["seq"] = seq
        self.state.save()  # a seq is never reused for another message, even after a crash
        payload = SendRequest(self.handle, self.room_handle(room), seq, body, kind, reply_to, replaces).encode()
        for attempt in range(self.retries + 1):
            try:
                reply = self._post("send", payload)
                return codec.decode_uint(reply.payload) if reply.payload else None
            except NoResponse:
                if attempt == self.retries:
                    raise
        return None  # not reached

    def history(self, room: str, start: int | None = None, count: int = -1) -> HistoryPage:
        """``|count|`` messages before (count < 0; ``start`` None: the newest) or after the event
        reference ``start``, oldest first, with the reference the next page starts from."""
        request = HistoryRequest(self.handle, self.room_handle(room), start, count)
        # A page of one short message fits one frame whole; longer pages come in 32-byte blocks.
        reply = self._request(Code.FETCH, "history", request.encode(), blocks=abs(count) > 1)
        return codec.decode_history(reply.payload)

    # -- rooms and membership

    def create(self, name: str | None = None, topic: str | None = None, invite: Sequence[str] = (),
               public: bool = False) -> int:
        """Create a room; its room handle (remembered under ``name``).  Not retried after a lost
        answer: a second create would make a second room."""
        request = CreateRequest(self.handle, public, name, topic, tuple(invite))
        return self._remember(name, codec.decode_uint(self._post("create", request.encode()).payload))

    def room_info(self, room: str) -> RoomInfo:
        request = RoomRequest(self.handle, self.room_handle(room))
        return codec.decode_room_info(self._request(Code.FETCH, "room", request.encode(), blocks=True).payload)

    def resolve(self, alias: str) -> str:
        """The room id of an alias (``#name:server``)."""
        reply = self._request(Code.FETCH, "room", RoomRequest(self.handle, alias).encode())
        return codec.decode_room_id(reply.payload)

    def set_room(self, room: str, name: str | None = None, topic: str | None = None) -> None:
        self._post("room", SetRoomRequest(self.handle, self.room_handle(room), name, topic).encode())

    def invite(self, room: str, user: str) -> None:
        self._post("invite", UserRequest(self.handle, self.room_handle(room), user).encode())

    def kick(self, room: str, user: str, reason: str | None = None) -> None:
        self._post("kick", UserRequest(self.handle, self.room_handle(room), user, reason).encode())

    def leave(self, room: str) -> None:
        self._post("leave", RoomRequest(self.handle, self.room_handle(room)).encode())

    def decline(self, room_handle: int) -> None:
        """Decline the invitation of ``room_handle`` (leave it)."""
        self._post("leave", RoomRequest(self.handle, room_handle).encode())

    def members(self, room: str) -> list[str]:
        request = RoomRequest(self.handle, self.room_handle(room))
        return codec.decode_users(self._request(Code.FETCH, "members", request.encode(), blocks=True).payload)

    def invitations(self) -> list[Invitation]:
        """Pending invitations, each with the room handle to accept (join) or decline (leave) it by."""
        reply = self._request(Code.FETCH, "invite", HandleRequest(self.handle).encode(), blocks=True)
        return codec.decode_invitations(reply.payload)

    def accept(self, room_handle: int, name: str | None = None) -> int:
        """Accept the invitation of ``room_handle`` (join it); remembered under ``name``."""
        reply = self._post("join", JoinRequest(self.handle, room_handle).encode())
        return self._remember(name, codec.decode_uint(reply.payload))

    # -- reactions, redactions, read receipts (``ref``: the cursor getmsg/watch answered)

    def react(self, room: str, ref: int, key: str, remove: bool = False) -> None:
        self._post("react", ReactRequest(self.handle, self.room_handle(room), ref, key, remove).encode())

    def redact(self, room: str, ref: int, reason: str | None = None) -> None:
        self._post("redact", EventRequest(self.handle, self.room_handle(room), ref, reason).encode())

    def read(self, room: str, ref: int) -> None:
        self._post("read", EventRequest(self.handle, self.room_handle(room), ref).encode())

    # -- media and profile

    def _exchange(self, code: int, op: str, payload: bytes, options: list[tuple[int, bytes]]) -> Reply:
        """One exchange retried as a new one (new Message ID) when nothing came back, and after a
        4.29's Max-Age; at most ``retries`` times each."""
        for attempt in range(self.retries + 1):
            try:
                reply = self.coap.request(code, PATHS[op], payload=payload, options=options)
            except NoResponse:
                if attempt == self.retries:
                    raise
                continue
            if reply.code != Code.TOO_MANY_REQUESTS or attempt == self.retries:
                return reply
            time.sleep(min(MAX_RATE_LIMIT_WAIT, int.from_bytes(reply.option(OptionNumber.MAX_AGE) or b"\x01", "big")))
        raise AssertionError("unreachable")

    def next_key(self) -> int:
        """A fresh upload key from the seq counter (kept, so it is never used for other media)."""
        key = int(self.compact.get("seq", 0)) + 1
        self.compact["seq"] = key
        self.state.save()
        return key

    def upload(self, room: str | None, data: bytes, mimetype: str, filename: str | None = None,
               key: int | None = None, szx: int = UPLOAD_BLOCK_SZX) -> int:
        """Upload ``data`` block-wise (Block1) into ``room`` (None: media only, no event); the key.

        Restarted with the same key after an interruption, it never makes a second event:
        a gateway that lost the upload (4.08) gets it again from the first block.
        """
        key = self.next_key() if key is None else key
        room_handle = None if room is None else self.room_handle(room)
        body = UploadHeader(self.handle, room_handle, key, mimetype, filename).encode() + data
        tag = key.to_bytes(max(1, (key.bit_length() + 7) // 8), "big")
        for attempt in range(self.retries + 1):
            reply = self._blocks(body, szx, tag)
            if reply.code != Code.REQUEST_ENTITY_INCOMPLETE or attempt == self.retries:
                reply.checked()
                return key
        return key

    def _blocks(self, body: bytes, szx: int, tag: bytes) -> Reply:
        """Every block of ``body`` in turn (each answered 2.31 Continue), the final answer."""
        size = 16 << szx
        num = 0
        while True:
            more = (num + 1) * size < len(body)
            options = [(OptionNumber.BLOCK1, Block(num, more, szx).encode()), (REQUEST_TAG, tag)]
            if num == 0:
                options.append((OptionNumber.SIZE1, _uint_option(len(body))))
            reply = self._exchange(Code.POST, "upload", body[num * size:(num + 1) * size], options)
            if reply.code != Code.CONTINUE or not more:
                return reply  # the end, an error, or "done before" (2.04 to the first block)
            num += 1

    def set_profile(self, name: str | None = None, avatar: MediaReference | None = None) -> None:
        """Set the display name and/or the avatar (an upload key of this session, an mxc:// URI, or
        (room handle, event reference) of an event that carries an image)."""
        self._post("profile", ProfileRequest(self.handle, name, avatar).encode())

    def display_name(self) -> str | None:
        reply = self._request(Code.FETCH, "profile", HandleRequest(self.handle).encode())
        return decode_display_name(reply.payload)

    def thumbnail(self, media: MediaReference, width: int, height: int, crop: bool = False,
                  szx: int = UPLOAD_BLOCK_SZX) -> Reply:
        """A thumbnail of an upload (its key), an mxc:// URI or the media of an event (room handle,
        event reference), fetched block-wise (Block2)."""
        request = ThumbnailRequest(self.handle, media, width, height, crop).encode()
        options = [(OptionNumber.BLOCK2, Block(0, False, szx).encode())]
        return self.coap.request(Code.FETCH, PATHS["upload"], payload=request, options=options,
                                 content_format=codec.CONTENT_FORMAT).checked()

    def _fetch(self, room: str, cursor: int | None) -> Message | None:
        return self._seen(room, self._fetch_unseen(room, cursor))

    def _fetch_unseen(self, room: str, cursor: int | None) -> Message | None:
        """``FETCH /v`` without recording the answer as seen (the caller does, once it is used)."""
        request = MessagesRequest(self.handle, self.room_handle(room), cursor)
        reply = self._request(Code.FETCH, "messages", request.encode())
        return codec.decode_message(reply.payload)

    def _seen(self, room: str, message: Message | None) -> Message | None:
        if message is not None:
            cursors = self.compact.setdefault("cursors", {})
            cursors[room] = max(int(cursors.get(room, 0)), message.cursor)
            self.state.save()
        return message

    def getmsg(self, room: str) -> Message | None:
        """The latest message of the room (None if it has none)."""
        return self._fetch(room, None)

    def new_messages(self, room: str, limit: int = 100) -> list[Message]:
        """Every message after the last one this device saw, oldest first (at most ``limit``)."""
        found: list[Message] = []
        cursor = self.compact.get("cursors", {}).get(room)
        if cursor is None:
            latest = self._fetch(room, None)
            return [latest] if latest is not None else []
        for message in itertools.islice(self._catch_up(room, int(cursor)), limit):
            self._seen(room, message)
            found.append(message)
        return found

    def _catch_up(self, room: str, cursor: int) -> Iterator[Message]:
        """Every message after ``cursor``, oldest first, fetched one by one until ``[]``."""
        while True:
            message = self._fetch_unseen(room, cursor)
            if message is None or message.cursor <= cursor:  # caught up (or a gateway going backwards)
                return
            yield message
            cursor = message.cursor

    def watch(self, room: str, *, count: int | None = None, timeout: float | None = None) -> Iterator[Message]:
        """Observe the room: yields each new message once, in cursor order, filling gaps via cursors.

        A message is recorded as seen when it is yielded, not when it is fetched, so
        a watch that stops (``count``) resumes after the last message it gave out.
        """
        request = MessagesRequest(self.handle, self.room_handle(room))
        stored = self.compact.get("cursors", {}).get(room)
        last: int | None = None if stored is None else int(stored)
        delivered = 0
        replies = self.coap.observe(Code.FETCH, PATHS["messages"], payload=request.encode(),
                                    content_format=codec.CONTENT_FORMAT, timeout=timeout)
        try:
            for index, reply in enumerate(replies):
                message = codec.decode_message(reply.checked().payload)
                if message is None:
                    continue
                if last is None:
                    if index == 0:  # no cursor yet: the current latest is the starting point
                        self._seen(room, message)
                        last = message.cursor
                        continue
                    batch: Iterator[Message] = iter([message])
                elif message.cursor <= last:
                    continue  # already yielded (e.g. fetched by a catch-up)
                elif message.cursor == last + 1:
                    batch = iter([message])
                else:
                    # Notifications are NON: some were lost.  Fetch from the last one
                    # yielded until caught up (which may go beyond this one); whatever
                    # is notified meanwhile is kept by `UdpCoap` and skipped here by cursor.
                    batch = itertools.chain(self._catch_up(room, last), [message])
                for new in batch:
                    if last is not None and new.cursor <= last:
                        continue
                    self._seen(room, new)
                    last = new.cursor
                    delivered += 1
                    yield new
                    if count is not None and delivered >= count:
                        return
        finally:
            replies.close()  # ends the observation's bookkeeping in `UdpCoap` now, not at garbage collection


# ---------------------------------------------------------------------- the original CoMatrix form


class OriginalDevice:
    """The original CoMatrix wire format (Proxy-Uri with a MSC3079 path code, token in option 256)."""

    def __init__(self, coap: UdpCoap, state: DeviceState, proxy_base: str = DEFAULT_PROXY_BASE) -> None:
        self.coap = coap
        self.state = state
        self.original = state.section("original")
        self.proxy_base = proxy_base.rstrip("/")

    def _proxy(self, *segments: str) -> tuple[int, bytes]:
        path = "/".join(quote(segment, safe="!:") for segment in segments)
        return (OptionNumber.PROXY_URI, f"{self.proxy_base}/{path}".encode("utf-8"))

    def _token(self) -> tuple[int, bytes]:
        token = self.original.get("token")
        if not token:
            raise SystemExit("comatrix-device: not logged in (run: --original login USER PASS)")
        return (ACCESS_TOKEN_OPTION, token.encode("ascii"))

    def room_id(self, room: str) -> str:
        return str(self.original.get("rooms", {}).get(room, room))

    def time(self) -> int:
        return int(self.coap.request(Code.GET, "time").checked().payload.decode("ascii"))

    def login(self, user: str, password: str) -> None:
        body = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user},
                "password": password}
        reply = self.coap.request(Code.POST, "login", payload=cbor2.dumps(body),
                                  content_format=ContentFormat.CBOR, options=[self._proxy("1")]).checked()
        self.original.clear()
        self.original.update(token=cbor2.loads(reply.payload)["access_token"], rooms={}, seq=self.time())
        self.state.save()

    def logout(self) -> None:
        self.coap.request(Code.POST, "logout", options=[self._token(), self._proxy("3")]).checked()
        self.original.clear()
        self.state.save()

    def join(self, room: str) -> str:
        reply = self.coap.request(Code.POST, "join", options=[self._token(), self._proxy("K", room)]).checked()
        room_id = str(cbor2.loads(reply.payload)["room_id"])
        self.original.setdefault("rooms", {})[room] = room_id
        self.state.save()
        return room_id

    def send(self, room: str, body: str, content: dict[str, Any] | None = None) -> str:
        """Send ``body`` as m.text; ``content``: more (or other) fields of the event content."""
        seq = int(self.original.get("seq", 0)) + 1
        self.original["seq"] = seq
        self.state.save()
        reply = self.coap.request(
            Code.POST, "send", payload=cbor2.dumps({"msgtype": "m.text", "body": body, **(content or {})}),
            content_format=ContentFormat.CBOR,
            options=[self._token(), self._proxy("9", self.room_id(room), "m.room.message", str(seq))]).checked()
        return str(cbor2.loads(reply.payload)["event_id"])

    def getmsg(self, room: str) -> Message | None:
        reply = self.coap.request(Code.GET, "getmsg", options=[self._token(), self._proxy("E", self.room_id(room))])
        if reply.code == Code.NOT_FOUND:
            return None
        message = cbor2.loads(reply.checked().payload)
        return Message(message["sender"], message["body"], int(message.get("origin_server_ts", 0)) // 1000, 0)


# ---------------------------------------------------------------------- command line


#: Seconds the command line waits for a first answer from the gateway (``--wait``).
DEFAULT_WAIT = 5.0

DESCRIPTION = """\
The reference device client of CoMatrix: sends what a sensor would send to the
gateway, in the compact profile (or the original CoMatrix form with --original),
over plain CoAP, CoAP over DTLS (PSK) or OSCORE."""

EPILOG = """\
examples:
  comatrix-device --gateway 'coap://[::1]' login sensor01      # password from $COMATRIX_PASSWORD
  comatrix-device send '#lab:example.org' '21.5 C'
  comatrix-device getmsg '#lab:example.org'

The session handle, counters and room handles live in the state file (--state)."""

#: Each subcommand's one-line description (``--help``).
COMMANDS = {
    "login": "log in as USER (password from the argument or $COMATRIX_PASSWORD)",
    "logout": "end the session (the gateway logs its Matrix device out)",
    "join": "join a room (room id, alias or configured name); prints its room handle",
    "send": "send a message to a room: text, a notice, an emote or a location, or a reply to or an edit "
            "of an event reference; prints the new event's reference",
    "history": "print a page of a room's history (newest, --before or --after an event reference): "
               "reference, sender, body; the next page's reference on stderr",
    "getmsg": "print the latest message of a room (--new: every one not yet seen)",
    "watch": "print each new message of a room as it comes (Observe)",
    "time": "print the gateway's clock (Unix seconds)",
    "create": "create a room (the name is how later commands refer to it); prints its room handle",
    "room": "print a room's name, topic, joined members and this device's membership; "
            "--name/--topic set them; an #alias prints its room id",
    "invite": "invite a user (localpart or @user:server) to a room",
    "invitations": "list pending invitations to this device: room handle, inviter, room name",
    "accept": "accept an invitation (its room handle from 'invitations'); prints the room handle",
    "decline": "decline an invitation (its room handle from 'invitations')",
    "leave": "leave a room",
    "kick": "remove a user from a room, with an optional reason",
    "members": "print a room's joined members, one per line",
    "react": "add (--remove: take back) a reaction KEY to a message (REF: its cursor, getmsg --json)",
    "redact": "redact a message (REF: its cursor, getmsg --json), with an optional --reason",
    "read": "send a read receipt up to a message (REF: its cursor, getmsg --json)",
    "upload": "upload a file block-wise into a room as m.image/m.file/m.audio/m.video (resumable: --key)",
    "profile": "set the display name (--name) and/or avatar (--avatar FILE, mxc:// URI or upload key); "
               "without options print the display name",
    "thumbnail": "fetch a thumbnail (block-wise) of an upload key or mxc:// URI into a file",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comatrix-device", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", default=os.environ.get("COMATRIX_GATEWAY"),
                        help=f"gateway URI, coap:// or (DTLS) coaps:// [default: $COMATRIX_GATEWAY or "
                             f"{DEFAULT_GATEWAY}; with --psk-identity coaps://[::1]:{DEFAULT_COAPS_PORT}]")
    security = parser.add_argument_group("security (DTLS 1.2 PSK or OSCORE; default: plain CoAP)")
    security.add_argument("--psk-identity", metavar="ID", help="DTLS PSK identity (needs a coaps:// gateway)")
    security.add_argument("--psk-key", metavar="KEY", default=os.environ.get("COMATRIX_PSK_KEY"),
                          help="DTLS PSK as text, as comatrixctl prints it [default: $COMATRIX_PSK_KEY]")
    security.add_argument("--oscore", metavar="CONTEXT", type=Path,
                          help="OSCORE context file (TOML or JSON: sender_id, recipient_id, master_secret, "
                               "master_salt in hex, the device's view)")
    parser.add_argument("--state", type=Path, default=None,
                        help="state file [default: $XDG_STATE_HOME/comatrix-device/state.json]")
    parser.add_argument("--wait", type=float, default=DEFAULT_WAIT, metavar="SECONDS",
                        help="give up when the gateway does not answer within SECONDS [default: %(default)g]")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no confirmation (sent, logged in as ...) on success")
    parser.add_argument("--original", action="store_true", help="speak the original CoMatrix form")
    parser.add_argument("--proxy-base", default=DEFAULT_PROXY_BASE,
                        help="homeserver URL put in the original form's Proxy-Uri (the gateway ignores its host)")
    parser.add_argument("--json", action="store_true", help="print messages as JSON lines")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    login = _command(commands, "login")
    login.add_argument("user")
    login.add_argument("password", nargs="?")
    _command(commands, "logout")
    for name in ("join", "getmsg", "watch"):
        command = _command(commands, name)
        command.add_argument("room")
        if name == "getmsg":
            command.add_argument("--new", action="store_true", help="every message since the last one seen")
        if name == "watch":
            command.add_argument("--count", type=int, default=None, help="stop after N messages")
            command.add_argument("--timeout", type=float, default=None, help="stop after S quiet seconds")
    _send_command(commands)
    history = _command(commands, "history")
    history.add_argument("room")
    start = history.add_mutually_exclusive_group()
    start.add_argument("--before", type=int, metavar="REF", help="messages before this event reference")
    start.add_argument("--after", type=int, metavar="REF", help="messages after this event reference")
    history.add_argument("--limit", type=int, default=codec.MAX_PAGE // 2, metavar="N",
                         help=f"at most N messages (1-{codec.MAX_PAGE}) [default: %(default)s]")
    _command(commands, "time")
    _room_commands(commands)
    _media_commands(commands)
    return parser


def _media_commands(commands: Any) -> None:
    upload = _command(commands, "upload")
    upload.add_argument("room")
    upload.add_argument("file", type=Path)
    upload.add_argument("--key", type=int, default=None, help="upload key (repeat it to resume) [default: a new one]")
    upload.add_argument("--type", default=None, help="mimetype [default: from the file's name or header]")
    upload.add_argument("--block-size", type=int, choices=[16 << szx for szx in range(7)], default=1024)
    profile = _command(commands, "profile")
    profile.add_argument("--name")
    profile.add_argument("--avatar", metavar="FILE|MXC|KEY", help="an image file (uploaded first), an mxc:// URI "
                                                                   "or the key of an upload of this session")
    thumbnail = _command(commands, "thumbnail")
    thumbnail.add_argument("media", help="upload key or mxc:// URI")
    thumbnail.add_argument("output", type=Path)
    thumbnail.add_argument("--size", default="96x96", metavar="WxH")
    thumbnail.add_argument("--crop", action="store_true")


def _send_command(commands: Any) -> None:
    send = _command(commands, "send")
    send.add_argument("room")
    send.add_argument("text", help="the message (of --location: its description)")
    kind = send.add_mutually_exclusive_group()
    kind.add_argument("--notice", dest="kind", action="store_const", const=1, default=0, help="m.notice")
    kind.add_argument("--emote", dest="kind", action="store_const", const=2, help="m.emote")
    kind.add_argument("--location", dest="kind", metavar="GEO", help="m.location at a geo: URI (geo:LAT,LON)")
    relation = send.add_mutually_exclusive_group()
    relation.add_argument("--reply-to", type=int, metavar="REF", help="reply to this event reference")
    relation.add_argument("--edit", type=int, metavar="REF", help="replace this event reference's text")


def _room_commands(commands: Any) -> None:
    create = _command(commands, "create")
    create.add_argument("name", nargs="?")
    create.add_argument("--topic")
    create.add_argument("--invite", action="append", default=[], metavar="USER", help="repeatable")
    create.add_argument("--public", action="store_true", help="public_chat preset [default: private_chat]")
    room = _command(commands, "room")
    room.add_argument("room")
    room.add_argument("--name")
    room.add_argument("--topic")
    for name in ("invite", "kick"):
        command = _command(commands, name)
        command.add_argument("room")
        command.add_argument("user")
        if name == "kick":
            command.add_argument("reason", nargs="?")
    _command(commands, "invitations")
    accept = _command(commands, "accept")
    accept.add_argument("room_handle", type=int)
    accept.add_argument("name", nargs="?", help="remember the room under this name")
    _command(commands, "decline").add_argument("room_handle", type=int)
    for name in ("leave", "members"):
        _command(commands, name).add_argument("room")
    for name in ("react", "redact", "read"):
        command = _command(commands, name)
        command.add_argument("room")
        command.add_argument("ref", type=int, help="event reference: the message's cursor")
        if name == "react":
            command.add_argument("key", help="the reaction, e.g. an emoji")
            command.add_argument("--remove", action="store_true", help="take the reaction back")
        if name == "redact":
            command.add_argument("--reason")


def _command(commands: Any, name: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(name, help=COMMANDS[name], description=COMMANDS[name])
    return parser


def _confirm(args: argparse.Namespace, text: str) -> None:
    """A short line saying a command that prints nothing else worked (on stderr: stdout is data)."""
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def _show(message: Message, as_json: bool) -> None:
    if as_json:
        print(json.dumps(dataclasses.asdict(message)), flush=True)
    else:
        print(f"{message.sender}: {message.body}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    state = DeviceState.load(args.state or default_state_path())
    try:
        with _connect(args, state) as coap:
            return _run(args, coap, state)
    except CoapResponseError as error:
        print(f"comatrix-device: {error}", file=sys.stderr)
        return 1
    except NoResponse as error:
        print(f"comatrix-device: {error}", file=sys.stderr)
        return 3
    except (OSError, ValueError, codec.CodecError, OscoreError, RuntimeError) as error:
        print(f"comatrix-device: {error}", file=sys.stderr)
        return 2


def _connect(args: argparse.Namespace, state: DeviceState) -> UdpCoap:
    """The CoAP client the options ask for: plain, over DTLS (PSK), or with OSCORE."""
    if args.psk_identity is not None:
        if args.oscore is not None:
            raise ValueError("choose DTLS (--psk-identity) or OSCORE (--oscore), not both")
        if not args.psk_key:
            raise ValueError("DTLS needs both --psk-identity and --psk-key (or $COMATRIX_PSK_KEY)")
        gateway = args.gateway or f"coaps://[::1]:{DEFAULT_COAPS_PORT}"
        return UdpCoap(gateway, psk=(args.psk_identity, args.psk_key.encode("utf-8")), answer_timeout=args.wait)
    oscore = None
    if args.oscore is not None:
        context = load_device_context(args.oscore)
        name = f"{context.sender_id.hex()}:{context.recipient_id.hex()}"
        oscore = OscoreClient(context, oscore_sequence(state, name))
    return UdpCoap(args.gateway or DEFAULT_GATEWAY, oscore=oscore, answer_timeout=args.wait)


def _run(args: argparse.Namespace, coap: UdpCoap, state: DeviceState) -> int:
    command = args.command
    device: CompactDevice | OriginalDevice
    device = OriginalDevice(coap, state, args.proxy_base) if args.original else CompactDevice(coap, state)
    if command == "login":
        password = args.password or os.environ.get("COMATRIX_PASSWORD")
        if not password:
            print("comatrix-device: give a password (argument or $COMATRIX_PASSWORD)", file=sys.stderr)
            return 2
        device.login(args.user, password)
        _confirm(args, f"logged in as {args.user}")
    elif command == "logout":
        device.logout()
        _confirm(args, "logged out")
    elif command == "time":
        print(device.time())
    elif command == "join":
        print(device.join(args.room))
    elif command == "send" and isinstance(device, CompactDevice):
        reference = device.send(args.room, args.text, args.kind, args.reply_to, args.edit)
        if reference is not None:
            print(reference, flush=True)
        _confirm(args, "sent")
    elif command == "send":
        if args.kind != 0 or args.reply_to is not None or args.edit is not None:
            print("comatrix-device: the original form sends text only", file=sys.stderr)
            return 2
        device.send(args.room, args.text)
        _confirm(args, "sent")
    elif command == "getmsg":
        if isinstance(device, CompactDevice) and args.new:
            for message in device.new_messages(args.room):
                _show(message, args.json)
            return 0
        latest = device.getmsg(args.room)
        if latest is None:
            print("comatrix-device: no message", file=sys.stderr)
            return 1
        _show(latest, args.json)
    elif command in MEDIA_COMMANDS:
        if not isinstance(device, CompactDevice):
            print(f"comatrix-device: the original form has no {command}", file=sys.stderr)
            return 2
        _run_media_command(args, device)
    elif command in ROOM_COMMANDS:
        if not isinstance(device, CompactDevice):
            print(f"comatrix-device: the original form has no {command}", file=sys.stderr)
            return 2
        _run_room_command(args, device)
    elif command == "watch":
        if not isinstance(device, CompactDevice):
            print("comatrix-device: the original form has no watch", file=sys.stderr)
            return 2
        for message in device.watch(args.room, count=args.count, timeout=args.timeout):
            _show(message, args.json)
    return 0


ROOM_COMMANDS = frozenset({"create", "room", "invite", "invitations", "accept", "decline", "leave", "kick", "members",
                           "react", "redact", "read", "history"})


MEDIA_COMMANDS = frozenset({"upload", "profile", "thumbnail"})


def guess_mimetype(path: Path, data: bytes) -> str:
    """The mimetype of a file: from its first bytes (PNG, GIF, JPEG), else its name."""
    for magic, mimetype in ((b"\x89PNG", "image/png"), (b"GIF8", "image/gif"), (b"\xff\xd8", "image/jpeg")):
        if data.startswith(magic):
            return mimetype
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def _media(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _run_media_command(args: argparse.Namespace, device: CompactDevice) -> None:
    szx = 6
    if args.command == "upload":
        data = args.file.read_bytes()
        key = args.key if args.key is not None else device.next_key()
        _confirm(args, f"upload key {key} (repeat with --key {key} to resume)")
        szx = (args.block_size.bit_length() - 5)
        device.upload(args.room, data, args.type or guess_mimetype(args.file, data), args.file.name, key, szx)
        _confirm(args, "uploaded")
    elif args.command == "profile":
        avatar: int | str | None = None
        if args.avatar is not None:
            avatar = _media(args.avatar)
            if isinstance(avatar, str) and not avatar.startswith("mxc://"):
                path = Path(avatar)
                data = path.read_bytes()
                avatar = device.upload(None, data, guess_mimetype(path, data), path.name, szx=szx)
        if args.name is None and avatar is None:
            print(device.display_name() or "", flush=True)
            return
        device.set_profile(args.name, avatar)
        _confirm(args, "profile set")
    else:
        width, _, height = args.size.partition("x")
        reply = device.thumbnail(_media(args.media), int(width), int(height or width), args.crop)
        args.output.write_bytes(reply.payload)
        _confirm(args, f"thumbnail: {len(reply.payload)} bytes")


def _run_room_command(args: argparse.Namespace, device: CompactDevice) -> None:
    command = args.command
    if command == "create":
        print(device.create(args.name, args.topic, args.invite, args.public))
    elif command == "room" and args.room.startswith("#") and args.room not in device.compact.get("rooms", {}):
        print(device.resolve(args.room))
    elif command == "room" and (args.name is not None or args.topic is not None):
        device.set_room(args.room, args.name, args.topic)
        _confirm(args, "set")
    elif command == "room":
        info = device.room_info(args.room)
        if args.json:
            print(json.dumps(dataclasses.asdict(info)), flush=True)
        else:
            print(f"name: {info.name or ''}\ntopic: {info.topic or ''}\njoined: {info.joined}\n"
                  f"membership: {info.membership}", flush=True)
    elif command == "invitations":
        for invitation in device.invitations():
            if args.json:
                print(json.dumps(dataclasses.asdict(invitation)), flush=True)
            else:
                print(f"{invitation.room}\t{invitation.inviter or ''}\t{invitation.name or ''}", flush=True)
    elif command == "accept":
        print(device.accept(args.room_handle, args.name))
    elif command == "members":
        for user in device.members(args.room):
            print(user, flush=True)
    elif command == "history":
        _history(args, device)
    elif command in ("react", "redact", "read"):
        _run_relation(args, device)
    else:
        _run_membership(args, device)


def _history(args: argparse.Namespace, device: CompactDevice) -> None:
    if not 1 <= args.limit <= codec.MAX_PAGE:
        raise ValueError(f"--limit must be 1-{codec.MAX_PAGE}")
    start = args.after if args.after is not None else args.before
    page = device.history(args.room, start, args.limit if args.after is not None else -args.limit)
    for event in page.events:
        if args.json:
            print(json.dumps(dataclasses.asdict(event)), flush=True)
        else:
            kind = "" if event.msgtype == "m.text" else f" [{event.msgtype}]"
            print(f"{event.ref}\t{event.sender}: {event.body}{kind}", flush=True)
    _confirm(args, f"next: {'none' if page.next is None else page.next}")


def _run_membership(args: argparse.Namespace, device: CompactDevice) -> None:
    """invite, kick, leave, decline: commands that print nothing but a confirmation."""
    if args.command == "invite":
        device.invite(args.room, args.user)
    elif args.command == "kick":
        device.kick(args.room, args.user, args.reason)
    elif args.command == "leave":
        device.leave(args.room)
    else:
        device.decline(args.room_handle)
    _confirm(args, {"invite": "invited", "kick": "kicked", "leave": "left", "decline": "declined"}[args.command])



def _run_relation(args: argparse.Namespace, device: CompactDevice) -> None:
    """react, redact, read: commands that print nothing but a confirmation."""
    if args.command == "react":
        device.react(args.room, args.ref, args.key, args.remove)
        _confirm(args, "reaction removed" if args.remove else "reacted")
    elif args.command == "redact":
        device.redact(args.room, args.ref, args.reason)
        _confirm(args, "redacted")
    else:
        device.read(args.room, args.ref)
        _confirm(args, "read")


if __name__ == "__main__":
    sys.exit(main())
