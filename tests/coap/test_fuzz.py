"""Property-based fuzzing of CoapServer's datagram handling (hypothesis).

At least `MIN_DATAGRAMS` random and mutated datagrams (bit flips, truncation,
garbage options, bad lengths, tokens longer than 8 bytes, reserved codes,
version != 1, a payload marker with no payload, ...) are fed straight into
``datagramReceived`` of an in-process server with a fake transport and a
`task.Clock`.  Properties:

* ``datagramReceived`` never raises;
* after every batch a valid GET is still answered;
* every datagram the server sends is well-formed and allowed by RFC 7252 for
  the datagram that caused it (see `check_answers`);
* a well-formed CON request always gets an ACK, and a duplicate CON gets the
  very same answer (deduplication, RFC 7252 §4.5).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from zope.interface import implementer

import serve_testsite

CON, NON, ACK, RST = 0, 1, 2, 3
PAYLOAD_MARKER = 0xFF
BATCH_MIN, BATCH_MAX = 25, 40
EXAMPLES = 420
MIN_DATAGRAMS = 10_000
#: Option 258 (No-Response) lets a server stay silent; it is generated, but exempts from "must answer".
NO_RESPONSE = 258


# --------------------------------------------------------------------------- an independent codec


def encode_option_header(delta: int, length: int) -> tuple[int, bytes, int, bytes]:
    def nibble(value: int) -> tuple[int, bytes]:
        if value < 13:
            return value, b""
        if value < 269:
            return 13, bytes([value - 13])
        return 14, struct.pack("!H", value - 269)

    d, dext = nibble(delta)
    ln, lext = nibble(length)
    return d, dext, ln, lext


def encode(mtype: int, code: int, mid: int, token: bytes, options: list[tuple[int, bytes]],
           payload: bytes) -> bytes:
    out = bytearray([0x40 | (mtype << 4) | (len(token) & 0x0F), code]) + struct.pack("!H", mid) + token
    previous = 0
    for number, value in sorted(options, key=lambda o: o[0]):
        d, dext, ln, lext = encode_option_header(number - previous, len(value))
        out += bytes([(d << 4) | ln]) + dext + lext + value
        previous = number
    if payload:
        out += bytes([PAYLOAD_MARKER]) + payload
    return bytes(out)


@dataclasses.dataclass
class Parsed:
    version: int
    mtype: int
    tkl: int
    code: int
    mid: int
    token: bytes | None           # None when the token does not fit in the datagram / tkl > 8
    options: list[tuple[int, bytes]] | None  # None = message format error
    payload: bytes


def parse(data: bytes) -> Parsed | None:
    """Header always (if >= 4 bytes); options/payload strictly per RFC 7252 §3 (None on error)."""
    if len(data) < 4:
        return None
    version, mtype, tkl = data[0] >> 6, (data[0] >> 4) & 3, data[0] & 0x0F
    code, mid = data[1], struct.unpack_from("!H", data, 2)[0]
    token = data[4:4 + tkl] if tkl <= 8 and len(data) >= 4 + tkl else None
    parsed = Parsed(version, mtype, tkl, code, mid, token, None, b"")
    if token is None:
        return parsed
    options: list[tuple[int, bytes]] = []
    number, i = 0, 4 + tkl
    while i < len(data):
        byte = data[i]
        if byte == PAYLOAD_MARKER:
            if i + 1 == len(data):
                return parsed  # marker followed by a zero-length payload: format error
            parsed.payload = data[i + 1:]
            break
        i += 1
        fields = []
        for nibble in (byte >> 4, byte & 0x0F):
            if nibble == 15:
                return parsed
            if nibble == 13:
                if i + 1 > len(data):
                    return parsed
                nibble, i = data[i] + 13, i + 1
            elif nibble == 14:
                if i + 2 > len(data):
                    return parsed
                nibble, i = struct.unpack_from("!H", data, i)[0] + 269, i + 2
            fields.append(nibble)
        delta, length = fields
        if i + length > len(data):
            return parsed
        number += delta
        options.append((number, data[i:i + length]))
        i += length
    if code == 0 and (tkl or len(data) > 4):
        return parsed  # an Empty message with anything after the header is a format error
    parsed.options = options
    return parsed


def code_class(code: int) -> int:
    return code >> 5


def is_well_formed_request(p: Parsed | None) -> bool:
    return (p is not None and p.version == 1 and p.mtype in (CON, NON) and p.options is not None
            and code_class(p.code) == 0 and p.code != 0)


# --------------------------------------------------------------------------- strategies

PATHS = [("echo",), ("upload",), ("download",), ("counter",), ("slow",), (".well-known", "core"), ("nope",), ()]


def uint(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


option_strategy = st.one_of(
    st.tuples(st.just(11), st.sampled_from([b"echo", b"upload", b"download", b"counter", b"x" * 300])),
    st.tuples(st.just(15), st.sampled_from([b"rt=test.counter", b"href=/echo", b"a", b""])),
    st.tuples(st.just(6), st.sampled_from([b"", b"\x01", b"\x02", b"\xff\xff\xff", b"\x00\x00\x00\x00"])),
    st.tuples(st.sampled_from([12, 17, 14, 28, 60]), st.integers(0, 2 ** 32 - 1).map(uint)),
    st.tuples(st.sampled_from([23, 27]), st.integers(0, 2 ** 24 - 1).map(uint)),
    st.tuples(st.sampled_from([1, 4, 5, 8, 20]), st.binary(max_size=9)),
    st.tuples(st.sampled_from([3, 7, 35, 39]), st.binary(max_size=20)),
    # unknown critical / elective / MSC3079 / No-Response options
    st.tuples(st.sampled_from([9, 13, 2049, 65001, 256, 257, 2048, NO_RESPONSE]), st.binary(max_size=12)),
)


@st.composite
def valid_requests(draw: Any) -> bytes:
    mtype = draw(st.sampled_from([CON, CON, NON, ACK, RST]))
    code = draw(st.sampled_from([1, 1, 1, 2, 3, 4, -1]))
    if code < 0:
        code = draw(st.integers(0, 255))
    path = draw(st.sampled_from(PATHS))
    options = [(11, segment.encode()) for segment in path]
    options += draw(st.lists(option_strategy, max_size=4))
    payload = draw(st.one_of(st.just(b""), st.binary(min_size=1, max_size=48)))
    return encode(mtype, code, draw(st.integers(0, 0xFFFF)), draw(st.binary(max_size=8)), options, payload)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 400), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 400)),
    st.tuples(st.just("insert"), st.integers(0, 400), st.binary(min_size=1, max_size=6)),
    st.tuples(st.just("set"), st.integers(0, 400), st.integers(0, 255)),
    st.tuples(st.just("version"), st.sampled_from([0, 2, 3])),
    st.tuples(st.just("tkl"), st.integers(9, 15)),
    st.tuples(st.just("code"), st.sampled_from([0x20, 0x3F, 0x45, 0x84, 0xA0, 0xC0, 0xE1, 0xFF, 0x1F, 0x08])),
    st.tuples(st.just("empty_payload")),
    st.tuples(st.just("bad_option"), st.sampled_from([b"\xf0", b"\x0f", b"\xd0", b"\xe0\x01", b"\x1d", b"\x0e\xff"])),
    st.tuples(st.just("huge_length"), st.integers(1, 12)),
)


def mutate(data: bytes, op: tuple[Any, ...]) -> bytes:
    buf = bytearray(data)
    kind = op[0]
    if kind == "flip" and buf:
        buf[op[1] % len(buf)] ^= 1 << op[2]
    elif kind == "truncate":
        del buf[op[1] % (len(buf) + 1):]
    elif kind == "insert":
        position = op[1] % (len(buf) + 1)
        buf[position:position] = op[2]
    elif kind == "set" and buf:
        buf[op[1] % len(buf)] = op[2]
    elif kind == "version" and buf:
        buf[0] = (buf[0] & 0x3F) | (op[1] << 6)
    elif kind == "tkl" and buf:
        buf[0] = (buf[0] & 0xF0) | op[1]
    elif kind == "code" and len(buf) > 1:
        buf[1] = op[1]
    elif kind == "empty_payload":
        buf.append(PAYLOAD_MARKER)
    elif kind == "bad_option":
        buf += op[1]
    elif kind == "huge_length":
        buf += bytes([0xE0 | 0x0E, 0xFF, 0xFF]) + b"\x00" * op[1]  # delta 14+ext, length claims 65804
    return bytes(buf)


@st.composite
def datagrams(draw: Any) -> tuple[bytes, bool]:
    """A datagram and whether to send it twice from the same peer."""
    if draw(st.integers(0, 9)) == 0:
        data = draw(st.binary(max_size=64))
    else:
        data = draw(valid_requests())
        for op in draw(st.lists(mutation, max_size=3)):
            data = mutate(data, op)
    return data, draw(st.integers(0, 7)) == 0


# --------------------------------------------------------------------------- harness


class FakeUDPTransport:
    """Collects what the server writes; enough of IUDPTransport for a DatagramProtocol."""

    def __init__(self) -> None:
        self.written: list[tuple[bytes, Any]] = []

    def write(self, packet: bytes, addr: Any = None) -> None:
        assert isinstance(packet, bytes), f"server wrote {type(packet).__name__}, not bytes"
        self.written.append((packet, addr))

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", "127.0.0.1", 5683)

    def connect(self, host: str, port: int) -> None:
        raise NotImplementedError

    def stopListening(self) -> None:
        pass

    loseConnection = stopListening

    def setBroadcastAllowed(self, enabled: bool) -> None:
        pass

    def getBroadcastAllowed(self) -> bool:
        return False


class Harness:
    def __init__(self) -> None:
        from comatrix.coap.server import CoapServer, CoapSettings

        self.clock = task.Clock()
        site, self.resources = serve_testsite.build_site(self.clock)
        self.server = CoapServer(site, CoapSettings(), reactor=self.clock)
        self.transport = FakeUDPTransport()
        self.server.makeConnection(self.transport)
        self.peers = itertools.count(1)
        #: How the server reacted, so the test can show the corpus exercised every path.
        self.stats: collections.Counter[str] = collections.Counter()
        self.sent_datagrams = 0
        #: (peer, MID) of well-formed CON requests not acknowledged yet (a delayed empty ACK is owed).
        self.owed_acks: dict[tuple[Any, int], tuple[bytes, bool, bytes]] = {}
        #: (peer, token) of CON requests answered with an empty ACK: a separate response is owed.
        #: Values are the requests, for the failure message.
        self.owed: dict[tuple[Any, bytes], bytes] = {}

    def new_peer(self) -> tuple[str, int]:
        n = next(self.peers)
        return (f"10.{(n >> 16) & 0xFF}.{(n >> 8) & 0xFF}.{n & 0xFF}", 1024 + n % 60000)

    def send(self, data: bytes, peer: tuple[str, int]) -> list[bytes]:
        """Feed one datagram; return what the server wrote because of it (all to ``peer``)."""
        start = len(self.transport.written)
        self.server.datagramReceived(data, peer)  # must never raise
        self.clock.advance(0)
        self.sent_datagrams += 1
        out = self.transport.written[start:]
        for packet, addr in out:
            assert addr == peer, f"answer to {peer} went to {addr}"
        return [packet for packet, _ in out]


def check_well_formed_answer(packet: bytes) -> Parsed:
    p = parse(packet)
    assert p is not None and p.version == 1, f"server sent a malformed datagram {packet.hex()}"
    assert p.token is not None and p.options is not None, f"server sent a malformed datagram {packet.hex()}"
    if p.code == 0:
        assert p.mtype in (ACK, RST) and p.tkl == 0 and not p.options and not p.payload, \
            f"bad empty message {packet.hex()}"
    else:
        assert code_class(p.code) in (2, 4, 5), f"server sent non-response code {p.code:#x}: {packet.hex()}"
        assert p.mtype != RST, f"RST with a code: {packet.hex()}"
    return p


def check_answers(request: bytes, answers: list[bytes], harness: Harness, peer: Any) -> None:
    """RFC 7252 rules for what may be sent in reply to ``request``."""
    req = parse(request)
    if req is None or req.version != 1:
        assert not answers, f"answered a datagram that must be silently ignored: {request.hex()}"
        return
    if req.mtype in (ACK, RST):
        assert not answers, f"answered an {('ACK', 'RST')[req.mtype - 2]}: {request.hex()}"
        return
    parsed = [check_well_formed_answer(a) for a in answers]
    for p in parsed:
        kind = ("CON", "NON", "ACK", "RST")[p.mtype]
        harness.stats[f"{kind} {p.code >> 5}.{p.code & 31:02d}"] += 1
    if not parsed:
        harness.stats["silence"] += 1
    resets = [p for p in parsed if p.mtype == RST]
    acks = [p for p in parsed if p.mtype == ACK]
    responses = [p for p in parsed if p.code != 0]
    for p in resets + acks:
        assert p.mid == req.mid, f"ACK/RST with MID {p.mid} for request MID {req.mid}"
    assert len(resets) <= 1 and len(acks) <= 1, f"several ACK/RST for one datagram: {request.hex()}"
    assert not (resets and (acks or responses)), f"RST and an answer for one datagram: {request.hex()}"
    assert len(responses) <= 1, f"several responses for one datagram: {request.hex()}"
    if req.mtype == NON:
        assert not acks, f"a NON was acknowledged: {request.hex()}"
        assert all(p.mtype == NON for p in responses), f"NON request answered with a CON: {request.hex()}"
    if not is_well_formed_request(req):
        # format errors, pings, responses and reserved-class codes: RST or silence only
        assert not acks and not responses, f"answered a non-request with {answers!r}: {request.hex()}"
        if req.code == 0 and req.mtype == CON and len(request) == 4:
            assert resets, "a CoAP ping (empty CON) must get an RST"
        return
    for p in responses:
        assert p.token == req.token, f"response token {p.token!r} != request token {req.token!r}"
    # No-Response (RFC 7967) may suppress the response, never the ACK of a CON.
    exempt = any(number == NO_RESPONSE for number, _ in req.options or [])
    if req.mtype == CON:
        if not acks and not resets:
            # the ACK may come after the empty-ACK delay
            harness.owed_acks[(peer, req.mid)] = (req.token or b"", exempt, request)
        elif acks and acks[0].code == 0 and not exempt:
            harness.owed[(peer, req.token or b"")] = request


def settle_separate_responses(harness: Harness) -> None:
    """Let delayed resources answer; every owed separate response arrives, carrying a response code."""
    start = len(harness.transport.written)
    for _ in range(20):
        harness.clock.advance(0.25)
    for packet, addr in harness.transport.written[start:]:
        p = check_well_formed_answer(packet)
        if p.mtype == ACK:
            assert (addr, p.mid) in harness.owed_acks, f"late ACK for no pending request: {packet.hex()}"
            token, exempt, request = harness.owed_acks.pop((addr, p.mid))
            if p.code == 0:
                if not exempt:
                    harness.owed[(addr, token)] = request
            else:
                assert p.token == token, f"late piggy-backed response with the wrong token: {packet.hex()}"
        elif p.code != 0:
            assert p.mtype in (CON, NON), f"late answer must be a separate CON/NON: {packet.hex()}"
            harness.owed.pop((addr, p.token or b""), None)
    assert not harness.owed_acks, "well-formed CON requests never acknowledged: " + ", ".join(
        value[2].hex() for value in harness.owed_acks.values())
    assert not harness.owed, "separate responses never sent for: " + ", ".join(
        request.hex() for request in harness.owed.values())


def check_still_serves(harness: Harness) -> None:
    peer = harness.new_peer()
    request = encode(CON, 1, 0x1234, b"ok", [(11, b"echo")], b"")
    answers = harness.send(request, peer)
    assert len(answers) == 1, f"valid GET not answered after a batch: {answers!r}"
    p = check_well_formed_answer(answers[0])
    assert (p.mtype, p.code, p.mid, p.token, p.payload) == (ACK, 0x45, 0x1234, b"ok", b"GET:")


def check_notifications(harness: Harness) -> None:
    """Bumping the observable counter sends only well-formed 2.05 notifications with Observe."""
    start = len(harness.transport.written)
    harness.resources.counter.value += 1
    notify = getattr(harness.resources.counter, "notify_observers", None)
    if notify is not None:
        notify()
    else:
        harness.server.notify(harness.resources.counter)
    harness.clock.advance(0)
    for packet, _ in harness.transport.written[start:]:
        p = check_well_formed_answer(packet)
        assert p.mtype in (CON, NON) and p.code == 0x45
        assert any(number == 6 for number, _ in p.options or []), "notification without Observe"


def test_fuzz_datagrams() -> None:
    harness = Harness()
    errors: list[dict[str, Any]] = []

    @implementer(ILogObserver)
    def observe_errors(event: dict[str, Any]) -> None:
        # datagramReceived catches our own bugs and logs them: those count as failures here.
        if "log_failure" in event or event.get("log_level") in (LogLevel.error, LogLevel.critical):
            errors.append(event)

    globalLogPublisher.addObserver(observe_errors)
    try:
        run_batches(harness, errors)
    finally:
        globalLogPublisher.removeObserver(observe_errors)
    assert harness.sent_datagrams >= MIN_DATAGRAMS, harness.sent_datagrams
    stats = harness.stats
    # Not hollow: the corpus reached the resources, the error paths and the silent drops.
    assert sum(n for kind, n in stats.items() if kind.startswith("ACK 2.")) >= 250, stats
    assert sum(n for kind, n in stats.items() if kind.startswith("ACK 4.")) >= 200, stats
    assert sum(n for kind, n in stats.items() if kind.startswith("NON ")) >= 50, stats
    assert stats["RST 0.00"] >= 200 and stats["silence"] >= 500, stats
    assert stats["ACK 4.02"] > 0 and stats["ACK 2.31"] >= 0, stats


def run_batches(harness: Harness, errors: list[dict[str, Any]]) -> None:

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example])
    @given(st.lists(datagrams(), min_size=BATCH_MIN, max_size=BATCH_MAX))
    def batch(items: list[tuple[bytes, bool]]) -> None:
        # A failed example must not leave its debts to the next one (shrinking would blame those).
        harness.owed_acks.clear()
        harness.owed.clear()
        for data, twice in items:
            peer = harness.new_peer()
            answers = harness.send(data, peer)
            check_answers(data, answers, harness, peer)
            if twice:
                again = harness.send(data, peer)
                first = [a for a in answers if parse(a) is not None and parse(a).mtype == ACK]  # type: ignore[union-attr]
                if first:
                    assert again == first, f"duplicate CON not answered like the original: {data.hex()}"
                else:
                    check_answers(data, again, harness, peer)
        settle_separate_responses(harness)
        check_notifications(harness)
        check_still_serves(harness)
        assert not errors, f"the server logged an error of its own: {formatEvent(errors[0])}"

    batch()


def test_codec_self_check() -> None:
    """The test's own encoder and parser agree (so the fuzz properties mean something)."""
    packet = encode(CON, 1, 7, b"tk", [(11, b"a" * 20), (11, b"b"), (2049, b"x" * 300)], b"pay")
    p = parse(packet)
    assert p is not None and p.options == [(11, b"a" * 20), (11, b"b"), (2049, b"x" * 300)]
    assert (p.mtype, p.code, p.mid, p.token, p.payload) == (CON, 1, 7, b"tk", b"pay")
    truncated = parse(packet[:-3])  # ends in a payload marker with an empty payload
    assert truncated is not None and truncated.options is None
    assert is_well_formed_request(p)
    from aiocoap import Message
    assert Message.decode(packet).opt.uri_path == ("a" * 20, "b")
