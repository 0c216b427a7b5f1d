"""Push latency: from a message reaching Synapse to its CoAP notification reaching each observer.

Issue 6, benchmark 4.  Figures, not pass/fail.  One run, on loopback:

1. a real Synapse (``tests/support/synapse.py``, ``.venv-synapse``) with a
   device user and a sender user;
2. per observer count N (default 100, then 1,000): a fresh gateway
   (``twistd comatrix`` as a subprocess, ``tests/support/gateway.py``;
   ``--log-level warn``, rate limits off, ``[coap] max_observers`` and
   ``max_observers_per_peer`` = N + 16;
   ``gateway_perf.gateway_config``) and a fresh room the sender creates and
   invites the device user to.  The device logs in and joins through the
   compact profile (``POST /+``, ``POST /x``, with the reference client
   ``comatrix.client.CompactDevice``), which yields the session handle and the
   room handle;
3. N observers, each its own UDP socket on 127.0.0.1 (its own CoAP endpoint),
   register ``FETCH /v [handle, room-handle]`` with Observe: 0.  A compact
   session is bound to the device's source *host*, not its port, so all of
   them share the one handle (one session, one ``/sync`` loop in the gateway).
   Registrations go out ``REGISTER_WINDOW`` at a time, with RFC 7252
   retransmissions and separate responses handled;
4. after ``--warmup`` unmeasured messages, M messages (``--messages``), one at a
   time: the sender PUTs ``/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}``
   straight to Synapse (one kept-alive HTTP/1.1 connection), and the bench waits
   until all N notifications of that message arrived (at most ``--timeout`` s)
   before the next one, ``--pace`` s later.

"The message reaches Synapse" is the moment Synapse's HTTP 200 for the PUT is
received (the moment just before the PUT is sent is recorded too: the
``from PUT`` column).  A notification's arrival is the kernel's receive
timestamp of its datagram (``SO_TIMESTAMPNS``), so the time this one Python
process needs to read 1,000 sockets does not inflate the figures; both are
wall-clock (``CLOCK_REALTIME``) readings on the same machine.  Latency =
arrival - 200.  Per N: p50/p99/max over all (observer, message) pairs,
notifications missing when a message's wait ended (and how many of those came
later), CON vs NON notifications (CON ones are acknowledged at once, else the
gateway would retransmit), the PUT round trip, and the fan-out spread (first to
last notification of one message).  The chain measured: Synapse wakes the
gateway's ``/sync`` long-poll, the gateway walks the room forward
(``/messages``), then renders and sends one notification per observer.

Usage (from the repository root)::

    .venv/bin/python bench/push_latency.py                          # 100 and 1,000 observers
    .venv/bin/python bench/push_latency.py --observers 100 --messages 50
    .venv/bin/python bench/push_latency.py --quick                  # 10 and 100 observers, 5 messages

``run_push(observer_counts, messages)`` returns one `PushFigures` per count and
``report(figures)`` renders them, for ``bench/gateway_perf.py`` and
``docs/performance.rst``.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import resource
import secrets
import selectors
import signal
import socket
import struct
import sys
import tempfile
import time
import urllib.parse
from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

import cbor2

ROOT = Path(__file__).resolve().parents[1]
for _entry in (str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT)):
    if _entry not in sys.path:
        sys.path.insert(0, _entry)

import gateway_perf  # noqa: E402  (bench/gateway_perf.py: the benchmark gateway config, percentile, machine)
from comatrix.coap import wire  # noqa: E402
from comatrix.coap.numbers import Code, MessageType, OptionNumber  # noqa: E402
from comatrix.compact.codec import CONTENT_FORMAT, PATHS  # noqa: E402

__all__ = ["PushFigures", "run_push", "report", "main"]

DEFAULT_OBSERVERS = (100, 1000)
#: Registrations outstanding at once (the gateway's socket buffer must not overflow).
REGISTER_WINDOW = 32
REGISTER_TIMEOUT = 120.0
#: RFC 7252 ACK_TIMEOUT for the registrations' retransmissions (doubling, MAX_RETRANSMIT 4).
ACK_TIMEOUT = 2.0
MAX_RETRANSMIT = 4
HTTP_TIMEOUT = 30.0
#: Linux ``SO_TIMESTAMPNS`` (``SO_TIMESTAMPNS_OLD``): a ``struct timespec`` with each datagram.
SO_TIMESTAMPNS = int(getattr(socket, "SO_TIMESTAMPNS", 35))

_CON, _NON, _ACK = int(MessageType.CON), int(MessageType.NON), int(MessageType.ACK)
_FETCH, _EMPTY, _CONTENT = int(Code.FETCH), int(Code.EMPTY), int(Code.CONTENT)
_OBSERVE, _URI_PATH, _CONTENT_FORMAT = (int(OptionNumber.OBSERVE), int(OptionNumber.URI_PATH),
                                        int(OptionNumber.CONTENT_FORMAT))


def default_messages(observers: int) -> int:
    return 20 if observers <= 100 else 10


def _kernel_time(ancillary: list[tuple[int, int, bytes]]) -> float | None:
    for level, kind, value in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            # struct timespec: two longs (8 bytes each on 64-bit Linux, 4 on 32-bit ARM).
            seconds, nanos = struct.unpack("=qq", value[:16]) if len(value) >= 16 else struct.unpack("=ii", value[:8])
            return float(seconds + nanos / 1e9)
    return None


# --------------------------------------------------------------------------- observers


class Observer:
    """One observing endpoint: its own UDP socket, one Observe registration."""

    __slots__ = ("index", "sock", "token", "mid", "datagram", "sent_at", "tries", "acked", "state")

    def __init__(self, index: int, source: str = "127.0.0.1") -> None:
        self.index = index
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((source, 0))
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.token = struct.pack("!HH", index & 0xFFFF, secrets.randbits(16))
        self.mid = secrets.randbits(16)
        self.datagram = b""
        self.sent_at = 0.0
        self.tries = 0
        self.acked = False
        #: "new", "pending", "registered", "rejected" (answered without Observe) or "failed".
        self.state = "new"


class Fleet:
    """N observers read through one epoll selector; every CON that arrives is acknowledged.

    ``sources``: each observer's own source address (one device each); default: all 127.0.0.1.
    """

    def __init__(self, count: int, gateway: tuple[str, int], sources: Sequence[str] | None = None) -> None:
        self.gateway = gateway
        self.observers: list[Observer] = []
        self.selector = selectors.DefaultSelector()
        self.con = 0
        self.non = 0
        self.errors: list[str] = []
        try:
            for index in range(count):
                observer = Observer(index, sources[index] if sources is not None else "127.0.0.1")
                self.observers.append(observer)
                self.selector.register(observer.sock, selectors.EVENT_READ, observer)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for observer in self.observers:
            try:
                self.selector.unregister(observer.sock)
            except (KeyError, ValueError):
                pass
            observer.sock.close()
        self.selector.close()

    def poll(self, timeout: float, handle: Callable[[Observer, wire.Datagram, float], None]) -> None:
        """Read every datagram ready within ``timeout`` s; ``handle(observer, message, arrival)``."""
        for key, _ in self.selector.select(max(0.0, timeout)):
            observer: Observer = key.data
            for _ in range(64):
                try:
                    data, ancillary, _, _ = observer.sock.recvmsg(2048, socket.CMSG_SPACE(16))
                except (BlockingIOError, InterruptedError):
                    break
                except ConnectionRefusedError:  # an ICMP error for an earlier datagram
                    continue
                arrival = _kernel_time(ancillary) or time.time()
                try:
                    message = wire.decode(data)
                except wire.FormatError:
                    continue
                if message.mtype == _CON:
                    observer.sock.sendto(wire.empty(MessageType.ACK, message.mid), self.gateway)
                handle(observer, message, arrival)

    # requests

    def exchange(self, requests: dict[int, tuple[int, list[tuple[int, bytes]], bytes]],
                 window: int = REGISTER_WINDOW, timeout: float = REGISTER_TIMEOUT) -> dict[int, wire.Datagram]:
        """One CON request per observer index, (code, options, payload), ``window`` outstanding at once,
        with RFC 7252 retransmissions and separate responses; the answers by index (none: failed).

        Each request gets a fresh token and Message ID (the observer keeps the token: an Observe
        registration's notifications carry it).
        """
        queue = deque(self.observers[index] for index in requests)
        pending: dict[int, Observer] = {}
        answers: dict[int, wire.Datagram] = {}
        deadline = time.monotonic() + timeout

        def on_message(observer: Observer, message: wire.Datagram, arrival: float) -> None:
            if observer.state != "pending":
                return
            if message.mtype == _ACK and message.code == _EMPTY and message.mid == observer.mid:
                observer.acked = True  # a separate response follows
                return
            if message.token != observer.token or message.code == _EMPTY:
                return
            answers[observer.index] = message
            observer.state = "answered"
            pending.pop(observer.index, None)

        while queue or pending:
            now = time.monotonic()
            if now > deadline:
                self.errors.append(f"{len(pending) + len(queue)} requests unanswered after {timeout:.0f} s")
                for observer in list(pending.values()) + list(queue):
                    observer.state = "failed"
                return answers
            while queue and len(pending) < window:
                observer = queue.popleft()
                code, options, payload = requests[observer.index]
                observer.mid = (observer.mid + 1) & 0xFFFF
                observer.token = struct.pack("!HH", observer.index & 0xFFFF, secrets.randbits(16))
                observer.datagram = wire.encode(_CON, code, observer.mid, observer.token, options, payload)
                observer.state = "pending"
                observer.acked = False
                observer.tries = 0
                observer.sent_at = now
                pending[observer.index] = observer
                observer.sock.sendto(observer.datagram, self.gateway)
            for observer in list(pending.values()):
                if not observer.acked and now - observer.sent_at > ACK_TIMEOUT * 2 ** observer.tries:
                    if observer.tries >= MAX_RETRANSMIT:
                        observer.state = "failed"
                        del pending[observer.index]
                        continue
                    observer.tries += 1
                    observer.sent_at = now
                    observer.sock.sendto(observer.datagram, self.gateway)  # same MID: a retransmission
            self.poll(0.05, on_message)
        return answers

    def register(self, handle: bytes | Sequence[bytes], room_handle: int | Sequence[int],
                 window: int = REGISTER_WINDOW, timeout: float = REGISTER_TIMEOUT) -> None:
        """``FETCH /v [handle, room handle]`` with Observe: 0 from every observer (one handle for all,
        or one per observer); an observer's state ends "registered", "rejected" (answered without
        Observe) or "failed"."""
        options = [(_OBSERVE, b""), (_URI_PATH, PATHS["messages"].encode()),
                   (_CONTENT_FORMAT, bytes([CONTENT_FORMAT]))]
        requests = {}
        for observer in self.observers:
            mine = handle if isinstance(handle, bytes) else handle[observer.index]
            room = room_handle if isinstance(room_handle, int) else room_handle[observer.index]
            requests[observer.index] = (_FETCH, options, cbor2.dumps([mine, room]))
        answers = self.exchange(requests, window, timeout)
        for observer in self.observers:
            message = answers.get(observer.index)
            if message is None:
                observer.state = "failed"
            elif message.code == _CONTENT:
                observe = any(number == _OBSERVE for number, _ in message.options)
                observer.state = "registered" if observe else "rejected"
            else:
                observer.state = "failed"
                self.errors.append(f"registration answered {message.code >> 5}.{message.code & 31:02d} "
                                   f"{message.payload[:64]!r}")

    def registered(self) -> list[Observer]:
        return [observer for observer in self.observers if observer.state == "registered"]


# --------------------------------------------------------------------------- the sender


class Sender:
    """PUTs m.room.message events straight to Synapse on one kept-alive HTTP/1.1 connection."""

    def __init__(self, port: int, token: str, room_id: str, timeout: float = HTTP_TIMEOUT) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.path = f"/_matrix/client/v3/rooms/{urllib.parse.quote(room_id, safe='')}/send/m.room.message/"

    def send(self, body: str) -> tuple[float, float]:
        """(wall clock just before the PUT, wall clock when its 200 arrived)."""
        data = json.dumps({"msgtype": "m.text", "body": body})
        txn = "p" + secrets.token_hex(8)
        before = time.time()
        self.conn.request("PUT", self.path + txn, body=data, headers=self.headers)
        response = self.conn.getresponse()
        response_body = response.read()
        done = time.time()
        if response.status != 200:
            raise RuntimeError(f"PUT send answered HTTP {response.status}: {response_body[:200]!r}")
        return before, done

    def close(self) -> None:
        self.conn.close()


# --------------------------------------------------------------------------- one observer count


@dataclasses.dataclass
class PushFigures:
    """Push latency for one observer count; times in milliseconds."""

    observers: int                 # observers asked for
    registered: int                # registrations the gateway accepted with Observe
    messages: int                  # measured messages
    warmup: int                    # unmeasured messages sent first
    expected: int                  # registered * messages
    received: int                  # notifications that arrived before their message's wait ended
    missing: int                   # expected - received
    late: int                      # of the missing, how many arrived later during the run
    duplicates: int                # a second notification of the same message to the same observer
    con: int                       # CON notifications (acknowledged)
    non: int                       # NON notifications
    p50: float                     # from Synapse's 200 to the notification, over all pairs
    p99: float
    max: float
    min: float
    p50_from_put: float            # from just before the PUT
    put_p50: float                 # Synapse's PUT round trip
    spread_p50: float              # first to last notification of one message (fan-out), median
    spread_max: float
    errors: list[str] = dataclasses.field(default_factory=list)
    failed_puts: int = 0           # messages whose PUT failed (timed out): not measured


def _percentile(values: list[float], p: float) -> float:
    return gateway_perf.percentile(values, p) if values else float("nan")


def measure_messages(fleet: Fleet, sender: Sender, observers: int, messages: int, *, warmup: int = 1,
                     timeout: float = 10.0, pace: float = 0.1) -> PushFigures:
    """Send ``warmup`` + ``messages`` messages one at a time, each once all registered observers got the
    previous one (or its wait of ``timeout`` s ended), ``pace`` s apart; the figures of the measured ones."""
    registered = fleet.registered()
    nonce = secrets.token_hex(3)
    total = warmup + messages
    #: arrivals[k][observer index] = kernel arrival time of message k's notification.
    arrivals: list[dict[int, float]] = [{} for _ in range(total)]
    body_index = {f"push {k} {nonce}": k for k in range(total)}
    counting = [False]
    duplicates = [0]
    failed_puts = [0]

    def on_message(observer: Observer, message: wire.Datagram, arrival: float) -> None:
        if message.code != _CONTENT or message.mtype not in (_CON, _NON) or message.token != observer.token:
            return  # a late registration answer (ACK), an empty message, an error
        if counting[0]:
            if message.mtype == _CON:
                fleet.con += 1
            else:
                fleet.non += 1
        try:
            body = cbor2.loads(message.payload)[1]
        except (ValueError, LookupError, TypeError, cbor2.CBORDecodeError):
            return
        k = body_index.get(body) if isinstance(body, str) else None
        if k is None:
            return
        if observer.index in arrivals[k]:
            duplicates[0] += 1
            return
        arrivals[k][observer.index] = arrival

    expected_each = len(registered)
    on_time: list[int] = []
    latencies: list[float] = []
    from_put: list[float] = []
    puts: list[float] = []
    spreads: list[float] = []
    for k in range(total):
        counting[0] = k >= warmup
        fleet.poll(0.0, on_message)  # anything stray before the send
        if pace > 0:
            pace_end = time.monotonic() + pace
            while time.monotonic() < pace_end:
                fleet.poll(pace_end - time.monotonic(), on_message)
        try:
            before, done = sender.send(f"push {k} {nonce}")
        except (OSError, http.client.HTTPException, RuntimeError) as error:
            # Synapse too busy to answer (or refusing): this message is not measured.
            fleet.errors.append(f"message {k}: PUT failed ({type(error).__name__}: {str(error)[:80]})")
            sender.close()  # http.client connects again for the next PUT
            failed_puts[0] += 1 if k >= warmup else 0
            continue
        deadline = time.monotonic() + timeout
        while len(arrivals[k]) < expected_each and time.monotonic() < deadline:
            fleet.poll(min(0.5, deadline - time.monotonic()), on_message)
        if k < warmup:
            continue
        got = dict(arrivals[k])
        on_time.append(len(got))
        latencies += [(arrival - done) * 1000 for arrival in got.values()]
        from_put += [(arrival - before) * 1000 for arrival in got.values()]
        puts.append((done - before) * 1000)
        if got:
            spreads.append((max(got.values()) - min(got.values())) * 1000)
    # Late arrivals of the last message(s): a short bounded drain.
    drain_end = time.monotonic() + min(2.0, timeout)
    while time.monotonic() < drain_end:
        fleet.poll(drain_end - time.monotonic(), on_message)
    expected = expected_each * (messages - failed_puts[0])
    received = sum(on_time)
    eventually = sum(len(arrivals[k]) for k in range(warmup, total))
    return PushFigures(
        observers=observers, registered=expected_each, messages=messages, warmup=warmup, expected=expected,
        received=received, missing=expected - received, late=eventually - received,
        duplicates=duplicates[0], con=fleet.con, non=fleet.non,
        p50=_percentile(latencies, 50), p99=_percentile(latencies, 99),
        max=max(latencies, default=float("nan")), min=min(latencies, default=float("nan")),
        p50_from_put=_percentile(from_put, 50), put_p50=_percentile(puts, 50),
        spread_p50=_percentile(spreads, 50), spread_max=max(spreads, default=float("nan")),
        errors=list(fleet.errors), failed_puts=failed_puts[0])


def measure_count(synapse: Any, device_user: Any, sender_user: Any, observers: int, messages: int,
                  workdir: Path, *, warmup: int = 1, timeout: float = 10.0, pace: float = 0.1,
                  progress: Callable[[str], None] = print) -> PushFigures:
    """One gateway, one room, ``observers`` observers, ``messages`` measured messages."""
    from comatrix.client import CompactDevice, DeviceState, UdpCoap
    from support.gateway import GatewayProcess

    room_id = synapse.create_room(sender_user.access_token, invite=[device_user.user_id])
    gw = GatewayProcess(synapse.base_url, workdir, config_text=gateway_perf.gateway_config(observers + 16),
                        log_level="warn")
    fleet: Fleet | None = None
    sender: Sender | None = None
    coap: UdpCoap | None = None
    try:
        gw.start()
        coap = UdpCoap(gw.uri(), source="127.0.0.1")
        device = CompactDevice(coap, DeviceState(None))
        device.login(device_user.localpart, device_user.password)
        room_handle = device.join(room_id)
        handle = device.handle
        coap.close()
        coap = None

        fleet = Fleet(observers, ("127.0.0.1", gw.port))
        started = time.monotonic()
        fleet.register(handle, room_handle)
        registered = fleet.registered()
        progress(f"  {observers:>5} observers: {len(registered)} registered in "
                 f"{time.monotonic() - started:.1f} s"
                 + (f" ({sum(o.state == 'rejected' for o in fleet.observers)} without Observe, "
                    f"{sum(o.state == 'failed' for o in fleet.observers)} failed)"
                    if len(registered) != observers else ""))

        sender = Sender(synapse.port, sender_user.access_token, room_id)
        figures = measure_messages(fleet, sender, observers, messages, warmup=warmup, timeout=timeout, pace=pace)
        figures.errors += _gateway_problems(gw)
        return figures
    finally:
        if sender is not None:
            sender.close()
        if fleet is not None:
            fleet.close()
        if coap is not None:
            coap.close()
        gw.stop()


def _gateway_problems(gw: Any) -> list[str]:
    """WARNING/ERROR lines the gateway logged (it runs at --log-level warn), at most five."""
    lines = [line for line in gw.log_text().splitlines() if "[" in line and ("warn" in line.lower()
                                                                             or "error" in line.lower()
                                                                             or "critical" in line.lower())]
    return [f"gateway log: {line[:200]}" for line in lines[:5]] + (
        [f"gateway log: ... {len(lines) - 5} more"] if len(lines) > 5 else [])


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            raise RuntimeError(f"need {needed} file descriptors, the hard limit is {hard}")


def run_push(observer_counts: Sequence[int] = DEFAULT_OBSERVERS, messages: int | Sequence[int] | None = None,
             *, warmup: int = 1, timeout: float = 10.0, pace: float = 0.1, workdir: Path | None = None,
             progress: Callable[[str], None] = print) -> list[PushFigures]:
    """Measure push latency for each observer count; one Synapse for all, a fresh gateway per count.

    ``messages``: one count for all, one per observer count, or None for
    `default_messages` (20 up to 100 observers, else 10).
    """
    from support.synapse import SynapseServer

    counts = list(observer_counts)
    if messages is None:
        per_count = [default_messages(n) for n in counts]
    elif isinstance(messages, int):
        per_count = [messages] * len(counts)
    else:
        per_count = list(messages)
        if len(per_count) != len(counts):
            raise ValueError("give one message count, or one per observer count")
    _raise_fd_limit(max(counts, default=0) + 256)
    with tempfile.TemporaryDirectory(prefix="comatrix-push-") as tmp:
        base = workdir or Path(tmp)
        synapse = SynapseServer(base / "synapse")
        results: list[PushFigures] = []
        try:
            synapse.start()
            device_user = synapse.make_user("device")
            sender_user = synapse.make_user("sender")
            for index, (count, m) in enumerate(zip(counts, per_count)):
                figures = measure_count(synapse, device_user, sender_user, count, m, base / f"gw-{index}-{count}",
                                        warmup=warmup, timeout=timeout, pace=pace, progress=progress)
                progress("  " + _row(figures))
                results.append(figures)
        finally:
            synapse.stop()
    return results


# --------------------------------------------------------------------------- report


HEADER = ("observers  notifications (expected)  missing (late)  CON/NON        p50 ms   p99 ms   max ms  "
          "from PUT p50  PUT p50  fan-out p50/max ms")


def _row(f: PushFigures) -> str:
    return (f"{f.registered:>9}  {f.received:>13} ({f.expected:>6})  {f.missing:>7} ({f.late:>4})  "
            f"{f.con:>5}/{f.non:<6}  {f.p50:8.1f} {f.p99:8.1f} {f.max:8.1f}  {f.p50_from_put:12.1f}  "
            f"{f.put_p50:7.1f}  {f.spread_p50:8.1f}/{f.spread_max:.1f}")


def report(figures: Sequence[PushFigures]) -> str:
    """A literal block (reStructuredText) of the figures, one line per observer count."""
    lines = ["Push latency (Synapse's 200 for the PUT -> the notification at each observer)::", "",
             "    " + HEADER]
    lines += ["    " + _row(f) for f in figures]
    for f in figures:
        if f.registered != f.observers:
            lines.append(f"    ({f.observers} observers asked for, {f.registered} registered)")
        if f.messages:
            lines.append(f"    ({f.registered} observers: {f.messages} messages after {f.warmup} unmeasured, "
                         f"min {f.min:.1f} ms, {f.duplicates} duplicates)")
    return "\n".join(lines)


def _load() -> str:
    with open("/proc/loadavg", encoding="ascii") as loadavg:
        return " ".join(loadavg.read().split()[:3])


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM takes the same path as Ctrl-C, so Synapse and the gateway are stopped."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--observers", type=int, nargs="+", default=list(DEFAULT_OBSERVERS),
                        help="observer counts, each measured with a fresh gateway (default: 100 1000)")
    parser.add_argument("--messages", type=int, nargs="+",
                        help="measured messages: one count for all or one per observer count "
                             "(default: 20 up to 100 observers, else 10)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured messages first (default 1)")
    parser.add_argument("--timeout", type=float, default=10.0, help="wait per message, seconds (default 10)")
    parser.add_argument("--pace", type=float, default=0.1,
                        help="pause before each PUT once the previous message is complete, seconds (default 0.1)")
    parser.add_argument("--quick", action="store_true", help="10 and 100 observers, 5 messages each")
    args = parser.parse_args(argv)
    if args.quick:
        args.observers, args.messages = [10, 100], [5]
    messages = None if args.messages is None else (args.messages[0] if len(args.messages) == 1 else args.messages)
    signal.signal(signal.SIGTERM, _interrupt)
    command = "python bench/push_latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load_before = _load()
    print(f"load average before: {load_before}", flush=True)
    try:
        figures = run_push(args.observers, messages, warmup=args.warmup, timeout=args.timeout, pace=args.pace,
                           progress=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("interrupted: Synapse and the gateway were stopped", file=sys.stderr)
        return 130
    print()
    print(f"Command: ``{command.strip()}``; load average before {load_before}, after {_load()}; "
          f"{os.cpu_count()} CPUs.")
    print()
    print(report(figures))
    for f in figures:
        for error in f.errors:
            print(f"  [{f.observers}] {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
