"""Gateway benchmarks: overhead against Synapse, throughput ceiling, memory.  Figures, not pass/fail.

Everything runs on loopback, in one run, side by side:

1. overhead -- p50/p99 latency of a message send through the gateway over CoAP,
   in the compact profile (``/w``) and in the clean CBOR form (``/send``),
   versus the same send straight to Synapse over HTTP on a kept-alive
   connection, with 1 and 16 concurrent senders (one user and room each; the
   three paths take turns);
2. ceiling -- requests/s of the gateway forwarding sends to a stub homeserver
   (a ``twisted.web`` server with canned Matrix answers, in a subprocess) versus
   plain txThings answering a trivial resource (``bench/coap_throughput.py``'s
   server and load generator);
3. memory -- the gateway's RSS idle, after ``--requests`` forwarded requests,
   and holding ``--observers`` Observe registrations on an observable resource
   (``bench/plugins/bench_observable.py``);
4. push -- latency from a message reaching Synapse to the CoAP notification
   reaching each of 100, then 1,000 observers (``bench/push_latency.py``).

Usage (from the repository root)::

    .venv/bin/python bench/gateway_perf.py                       # full counts
    .venv/bin/python bench/gateway_perf.py --quick               # a smoke run
    .venv/bin/python bench/gateway_perf.py --write docs/performance.rst

The gateway runs as ``twistd comatrix`` (``--log-level warn``, rate limits off,
``max_upstream = 64``, ``max_connections = 32``, ``max_observers`` and ``max_observers_per_peer`` raised).
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import platform
import secrets
import selectors
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import cbor2

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import coap_throughput  # noqa: E402  (bench/coap_throughput.py, another benchmark's server + load generator)

TOKEN_OPTION = 256
READY_TIMEOUT = 30.0
STUB_TOKEN = "syt_bench_stub_token"
STUB_ROOM = "!benchroom:bench.local"


# --------------------------------------------------------------------------- stub homeserver


def serve_stub(port: int, delay: float = 0.0) -> None:
    """A twisted.web server with canned Matrix answers (subprocess entry point).

    With ``delay`` every answer is held back that long (a homeserver's own time,
    spent idle here), so the gateway and the stub sleep between requests as they
    do in front of Synapse.
    """
    from twisted.internet import reactor
    from twisted.web import resource, server

    class Canned(resource.Resource):
        isLeaf = True

        def render(self, request: Any) -> Any:
            if not delay:
                return self.answer(request)

            def finish() -> None:
                request.write(self.answer(request))
                request.finish()

            reactor.callLater(delay, finish)  # type: ignore[attr-defined]
            return server.NOT_DONE_YET

        def answer(self, request: Any) -> bytes:
            request.setHeader(b"Content-Type", b"application/json")
            path = request.path or b""
            if b"/send/" in path:
                return b'{"event_id":"$benchEventId0000000000000000000000000000000000"}'
            if path.endswith(b"/login"):
                return ('{"access_token":"%s","user_id":"@bench:bench.local","device_id":"BENCH"}'
                        % STUB_TOKEN).encode()
            if b"/join/" in path:
                return ('{"room_id":"%s"}' % STUB_ROOM).encode()
            if path.endswith(b"/messages"):
                return b'{"chunk":[],"start":"s0","end":"s0"}'
            if path.endswith(b"/versions"):
                return b'{"versions":["v1.11"]}'
            return b"{}"

    site = server.Site(Canned())
    site.noisy = False
    listening: Any = reactor.listenTCP(port, site, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
    print(f"READY {listening.getHost().port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


def start_stub(delay_ms: float = 0.0) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve-stub", "--stub-delay-ms", str(delay_ms)],
                            stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError("stub homeserver did not start")
    return proc, int(line.split()[1])


# --------------------------------------------------------------------------- gateway


def gateway_config(max_observers: int) -> str:
    # Every benchmark observer comes from 127.0.0.1, one device to the gateway: its share is the whole table.
    return ("max_connections = 32\n"
            f"[coap]\nmax_observers = {max_observers}\nmax_observers_per_peer = {max_observers}\n"
            "[limits]\ndevice_rate = 0\nglobal_rate = 0\nmax_upstream = 64\nupstream_queue = 1024\n"
            # The 16 compact senders all log in from 127.0.0.1: one device to the gateway.
            "max_sessions_per_device = 64\n")


def start_gateway(homeserver: str, workdir: Path, max_observers: int = 256, workers: int = 1, *,
                  code: Path | None = None, profile: Path | None = None) -> Any:
    """``twistd comatrix`` in front of ``homeserver`` with ``workers`` workers; the comatrix package of the
    checkout ``code`` (default: this one), under cProfile writing to ``profile`` when given."""
    from support.gateway import GatewayProcess

    class Gateway(GatewayProcess):
        def command(self) -> list[str]:
            args = super().command()
            if profile is not None:
                args[1:1] = ["--profile", str(profile), "--profiler", "cprofile", "--savestats"]
            if code is not None:
                args[:0] = ["env", f"PYTHONPATH={code}"]
            return args

    gw = Gateway(homeserver, workdir, config_text=gateway_config(max_observers), log_level="warn",
                 plugin_dirs=[ROOT / "bench" / "plugins"],
                 extra_args=["--workers", str(workers)] if workers > 1 else [])
    gw.start()
    if workers > 1:  # every worker serving, not only the first to answer
        logs = [workdir / f"gateway.worker{index}.log" for index in range(workers)]
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(log.exists() and "Starting protocol" in log.read_text() for log in logs):
            if time.monotonic() > deadline:
                gw.stop()
                raise RuntimeError("the gateway's workers did not all start")
            time.sleep(0.1)
    return gw


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a supervisor's workers)."""
    found = [pid]
    for task_dir in Path(f"/proc/{pid}/task").iterdir():
        children = (task_dir / "children").read_text().split()
        for child in children:
            found += process_tree(int(child))
    return found


def tree_cpu_seconds(pid: int) -> float:
    return sum(coap_throughput.cpu_seconds(member) for member in process_tree(pid))


def rss_mib(pid: int) -> float:
    return coap_throughput.vm_kib(pid, "VmRSS") / 1024


# --------------------------------------------------------------------------- a blocking CoAP client


def coap_datagram(mid: int, token: bytes, path: bytes, options: list[tuple[int, bytes]], payload: bytes,
                  code: int = 2) -> bytes:
    """CON request; ``options`` must have numbers > 11 (Uri-Path is added first).

    Built by hand rather than with ``comatrix.coap.wire``: the load generator must
    cost far less per request than the server it loads.
    """
    out = struct.pack("!BBH", 0x40 | len(token), code, mid) + token
    out += bytes([(11 << 4) | len(path)]) + path
    last = 11
    for number, value in sorted(options):
        delta = number - last
        last = number
        head, ext = (delta, b"") if delta < 13 else ((13, bytes([delta - 13])) if delta < 269
                                                       else (14, struct.pack("!H", delta - 269)))
        length = len(value)
        lhead, lext = (length, b"") if length < 13 else (13, bytes([length - 13]))
        out += bytes([(head << 4) | lhead]) + ext + lext + value
    return out + (b"\xff" + payload if payload else b"")


def coap_exchange(sock: socket.socket, port: int, datagram: bytes, token: bytes) -> tuple[int, bytes]:
    """Send one CON request and wait for its answer (ACKing a separate response); (code, payload)."""
    sock.sendto(datagram, ("127.0.0.1", port))
    for _ in range(1000):
        try:
            data = sock.recv(2048)
        except socket.timeout:
            sock.sendto(datagram, ("127.0.0.1", port))  # loopback loss is rare; retransmit
            continue
        mtype, code = (data[0] >> 4) & 3, data[1]
        if mtype == 0:
            sock.sendto(bytes([0x60, 0]) + data[2:4], ("127.0.0.1", port))
        if code != 0 and data[4:4 + (data[0] & 0x0F)] == token:
            marker = data.find(b"\xff", 4 + (data[0] & 0x0F))
            return code, data[marker + 1:] if marker >= 0 else b""
    raise RuntimeError("no answer")


class _CoapDevice:
    """A UDP socket of its own, like one device."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(2.0)
        self.mid = secrets.randbits(16)

    def post(self, path: bytes, options: list[tuple[int, bytes]], body: bytes, expected: int) -> bytes:
        self.mid = (self.mid + 1) & 0xFFFF
        token = secrets.token_bytes(4)
        code, payload = coap_exchange(self.sock, self.port,
                                      coap_datagram(self.mid, token, path, [(12, b"\x3c")] + options, body),
                                      token)
        if code != expected:
            raise RuntimeError(f"/{path.decode()} answered {code >> 5}.{code & 31:02d}: {payload[-40:]!r}")
        return payload

    def close(self) -> None:
        self.sock.close()


class CoapSender(_CoapDevice):
    """One device using the clean CBOR form: CON POST /send with the token in option 256."""

    def __init__(self, port: int, user: Any, room_id: str) -> None:
        super().__init__(port)
        self.token = user.access_token.encode()
        self.room_id = room_id

    def send(self, n: int) -> float:
        body = cbor2.dumps({"room_id": self.room_id, "txn_id": f"b{secrets.token_hex(6)}-{n}",
                            "body": f"bench {n}"})
        started = time.perf_counter()
        self.post(b"send", [(TOKEN_OPTION, self.token)], body, 0x44)
        return time.perf_counter() - started


class CompactSender(_CoapDevice):
    """One device using the compact profile: logs in (``/+``) and joins (``/x``) once, then ``/w``."""

    def __init__(self, port: int, user: Any, room_id: str) -> None:
        super().__init__(port)
        self.handle = cbor2.loads(self.post(b"+", [], cbor2.dumps([user.localpart, user.password]), 0x41))
        self.room = cbor2.loads(self.post(b"x", [], cbor2.dumps([self.handle, room_id]), 0x44))
        self.seq = int(time.time())  # what a device seeds from /z

    def send(self, n: int) -> float:
        self.seq += 1
        body = cbor2.dumps([self.handle, self.room, self.seq, f"bench {n}"])
        started = time.perf_counter()
        self.post(b"w", [], body, 0x44)
        return time.perf_counter() - started


class HttpSender:
    """The same send straight to Synapse on one kept-alive HTTP/1.1 connection."""

    def __init__(self, port: int, token: str, room_id: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.path = f"/_matrix/client/v3/rooms/{room_id}/send/m.room.message/"

    def send(self, n: int) -> float:
        body = json.dumps({"msgtype": "m.text", "body": f"bench {n}"})
        started = time.perf_counter()
        self.conn.request("PUT", self.path + f"h{secrets.token_hex(6)}-{n}", body=body, headers=self.headers)
        response = self.conn.getresponse()
        response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        return elapsed

    def close(self) -> None:
        self.conn.close()


class CoapReader(_CoapDevice):
    """One device reading a room's latest message in the clean form: CON GET /getmsg?room=..."""

    def __init__(self, port: int, user: Any, room_id: str) -> None:
        super().__init__(port)
        self.token = user.access_token.encode()
        self.query = b"room=" + room_id.encode()

    def read(self) -> float:
        self.mid = (self.mid + 1) & 0xFFFF
        token = secrets.token_bytes(4)
        datagram = coap_datagram(self.mid, token, b"getmsg", [(15, self.query), (TOKEN_OPTION, self.token)],
                                 b"", code=1)
        started = time.perf_counter()
        code, payload = coap_exchange(self.sock, self.port, datagram, token)
        elapsed = time.perf_counter() - started
        if code != 0x45:
            raise RuntimeError(f"/getmsg answered {code >> 5}.{code & 31:02d}: {payload[-40:]!r}")
        return elapsed


class HttpReader:
    """The same read straight to Synapse, as the gateway asks it (``/messages``, dir=b, limit=1,
    filtered to m.room.message), on one kept-alive HTTP/1.1 connection."""

    def __init__(self, port: int, token: str, room_id: str) -> None:
        from urllib.parse import quote

        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.headers = {"Authorization": f"Bearer {token}"}
        self.path = (f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/messages?dir=b&limit=1&filter="
                     + quote('{"types":["m.room.message"]}', safe=""))

    def read(self) -> float:
        started = time.perf_counter()
        self.conn.request("GET", self.path, headers=self.headers)
        response = self.conn.getresponse()
        response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        return elapsed

    def close(self) -> None:
        self.conn.close()


def run_readers(readers: Sequence[Any], reads: int) -> tuple[float, list[float]]:
    """Every reader in its own thread, ``reads`` reads one after the other, all at once:
    (reads per second over the whole run, latencies in seconds)."""
    latencies: list[float] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(readers) + 1)
    lock = threading.Lock()

    def work(reader: Any) -> None:
        mine = []
        try:
            barrier.wait()
            for _ in range(reads):
                mine.append(reader.read())
        except BaseException as exc:  # reported below
            errors.append(exc)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=work, args=(reader,)) for reader in readers]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if errors:
        raise errors[0]
    return len(latencies) / seconds, latencies


def run_senders(groups: Sequence[Sequence[Any]], per_sender: int, warmup: int = 10) -> list[list[float]]:
    """Each group of senders (one per path, same user and room) runs in its own thread and takes
    the paths in turn, ``per_sender`` sends on each; returns all latencies (seconds) per path.

    Taking turns removes drift (Synapse gets slower as rooms grow, caches warm up)
    from the comparison: every path sees the same homeserver state at the same time.
    The order rotates from one send to the next so no path always follows another.
    """
    paths = len(groups[0])
    latencies: list[list[float]] = [[] for _ in range(paths)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(groups))
    lock = threading.Lock()

    def work(group: Sequence[Any]) -> None:
        mine: list[list[float]] = [[] for _ in range(paths)]
        try:
            for n in range(warmup):
                for sender in group:
                    sender.send(-1 - n)
            barrier.wait()
            for n in range(per_sender):
                for k in range(paths):
                    path = (n + k) % paths
                    mine[path].append(group[path].send(n))
        except BaseException as exc:  # reported below
            errors.append(exc)
            barrier.abort()
        with lock:
            for path in range(paths):
                latencies[path].extend(mine[path])

    threads = [threading.Thread(target=work, args=(group,)) for group in groups]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return latencies


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


# --------------------------------------------------------------------------- the gateway's load generator


class SendLoad(coap_throughput.LoadGenerator):
    """coap_throughput's load generator, sending POST /send (clean form) and expecting 2.04."""

    def __init__(self, port: int, total: int, inflight: int, token_base: int) -> None:
        super().__init__(port, total, inflight, token_base)
        self.body = cbor2.dumps({"room_id": STUB_ROOM, "body": "bench"})
        #: Response codes that were not 2.04, "c.dd" -> count (with a sample payload).
        self.bad_codes: dict[str, int] = {}
        self.bad_samples: dict[str, bytes] = {}

    def build(self, mid: int, token: int) -> bytes:
        return coap_datagram(mid, struct.pack("!I", token), b"send",
                             [(12, b"\x3c"), (TOKEN_OPTION, STUB_TOKEN.encode())], self.body)

    def answered_well(self, code: int, data: bytes) -> bool:
        if code == 0x44:
            return True
        name = f"{code >> 5}.{code & 31:02d}"
        self.bad_codes[name] = self.bad_codes.get(name, 0) + 1
        self.bad_samples.setdefault(name, data[-60:])
        return False


class SpreadSendLoad(SendLoad):
    """`SendLoad` from `WORKER_PEERS` sockets: as many peers (4-tuples), spread over the workers by the kernel."""

    def __init__(self, port: int, total: int, inflight: int, token_base: int) -> None:
        super().__init__(port, total, inflight, token_base)
        for sock in self.socks:
            self.selector.unregister(sock)
            sock.close()
        self.socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(WORKER_PEERS)]
        for index, sock in enumerate(self.socks):
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self.selector.register(sock, selectors.EVENT_READ, index)
        # A new socket may get the port of one closed a moment ago (the warm-up's): message ids
        # starting elsewhere keep the gateway's dedup cache from answering with the old exchange.
        self.mid_offset = secrets.randbits(16)

    def build(self, mid: int, token: int) -> bytes:
        return super().build((mid + self.mid_offset) & 0xFFFF, token)


#: Client sockets of the workers ceiling run.
WORKER_PEERS = 64


def load(generator_class: Callable[..., Any], port: int, total: int, inflight: int) -> Any:
    generator = generator_class(port, total, inflight, token_base=secrets.randbits(31))
    try:
        result = generator.run()
    finally:
        generator.close()
    for name, count in sorted(getattr(generator, "bad_codes", {}).items()):
        print(f"    {count} answers {name}, e.g. ...{generator.bad_samples[name]!r}", flush=True)
    return result


# --------------------------------------------------------------------------- observers


def register_observers(port: int, count: int) -> int:
    """``count`` Observe registrations (distinct tokens over a few sockets); how many were accepted."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(max(1, count // 200))]
    accepted = 0
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(2.0)
        for n in range(count):
            sock = socks[n % len(socks)]
            token = struct.pack("!I", n)
            path = b"bench-observable"
            # CON GET, Observe (6) = register (empty value), then Uri-Path (delta 5, 13 + 3 bytes).
            datagram = (struct.pack("!BBH", 0x44, 1, n & 0xFFFF) + token + b"\x60"
                        + bytes([(5 << 4) | 13, len(path) - 13]) + path)
            sock.sendto(datagram, ("127.0.0.1", port))
            data = sock.recv(2048)
            if data[1] == 0x45 and _has_observe(data):
                accepted += 1
    finally:
        for sock in socks:
            sock.close()
    return accepted


def _has_observe(data: bytes) -> bool:
    tkl = data[0] & 0x0F
    pos, number = 4 + tkl, 0
    while pos < len(data) and data[pos] != 0xFF:
        delta, length = data[pos] >> 4, data[pos] & 0x0F
        pos += 1
        if delta == 13:
            delta = data[pos] + 13
            pos += 1
        if length == 13:
            length = data[pos] + 13
            pos += 1
        number += delta
        if number == 6:
            return True
        pos += length
    return False


# --------------------------------------------------------------------------- orchestration


@dataclasses.dataclass
class Figures:
    overhead: dict[int, dict[str, tuple[float, float, int]]] = dataclasses.field(default_factory=dict)
    ceiling: dict[str, tuple[float, int, float]] = dataclasses.field(default_factory=dict)
    memory: dict[str, float] = dataclasses.field(default_factory=dict)
    observers_accepted: int = 0
    #: The same latency comparison against the stub homeserver: the gateway's own share.
    overhead_stub: dict[str, tuple[float, float, int]] = dataclasses.field(default_factory=dict)
    #: Idle-gap control: stub answer delay (ms) -> (path -> (p50 ms, p99 ms, sends)), and
    #: delay -> (gateway CPU us per forwarded send, stub CPU us per request).
    idle_gap: dict[float, dict[str, tuple[float, float, int]]] = dataclasses.field(default_factory=dict)
    idle_gap_cpu: dict[float, tuple[float, float]] = dataclasses.field(default_factory=dict)
    push: list[Any] = dataclasses.field(default_factory=list)
    #: Workers ceiling, in run order: (workers, requests/s, bad answers, CPU us per request of all processes,
    #: load average).
    workers: list[tuple[int, float, int, float, float]] = dataclasses.field(default_factory=list)
    #: Concurrent readers in front of Synapse: path -> (reads/s, p50 ms, p99 ms, reads); gateway CPU us/read.
    readers: dict[str, tuple[float, float, float, int]] = dataclasses.field(default_factory=dict)
    readers_cpu: float = 0.0
    readers_count: int = 0
    #: cProfile summaries: label -> (component -> share of own time, Python calls per forwarded send).
    profiles: dict[str, tuple[dict[str, float], float]] = dataclasses.field(default_factory=dict)


OVERHEAD_PATHS = ("direct", "compact", "clean")


def bench_overhead(figures: Figures, sends_single: int, sends_each: int, workdir: Path,
                   reads_each: int = 0) -> None:
    from support.synapse import SynapseServer

    synapse = SynapseServer(workdir / "synapse")
    synapse.start()
    gw = None
    try:
        gw = start_gateway(synapse.base_url, workdir / "gw-synapse")
        for concurrency, count in ((1, sends_single), (16, sends_each)):
            users = [synapse.make_user("bench") for _ in range(concurrency)]
            rooms = [synapse.create_room(user.access_token) for user in users]
            row: dict[str, tuple[float, float, int]] = {}
            groups = [(HttpSender(synapse.port, user.access_token, room),
                       CompactSender(gw.port, user, room),
                       CoapSender(gw.port, user, room)) for user, room in zip(users, rooms)]
            try:
                measured = run_senders(groups, count)
            finally:
                for group in groups:
                    for sender in group:
                        sender.close()
            for name, values in zip(OVERHEAD_PATHS, measured):
                row[name] = (percentile(values, 50) * 1000, percentile(values, 99) * 1000, len(values))
                print(f"  overhead  {concurrency:>2} sender(s)  {name:<8} p50 {row[name][0]:7.2f} ms  "
                      f"p99 {row[name][1]:7.2f} ms  ({len(values)} sends)", flush=True)
            figures.overhead[concurrency] = row
        if reads_each:
            bench_readers(figures, synapse.port, gw, users, rooms, reads_each)
    finally:
        if gw is not None:
            gw.stop()
        synapse.stop()


def bench_readers(figures: Figures, synapse_port: int, gw: Any, users: Sequence[Any], rooms: Sequence[str],
                  reads_each: int) -> None:
    """``len(users)`` concurrent readers of their room's latest message, straight to Synapse and through
    the gateway (clean ``/getmsg?room=``), in the order direct, gateway, gateway, direct (drift cancels)."""
    direct = [HttpReader(synapse_port, user.access_token, room) for user, room in zip(users, rooms)]
    gateway = [CoapReader(gw.port, user, room) for user, room in zip(users, rooms)]
    try:
        for reader in direct + gateway:
            for _ in range(5):
                reader.read()  # warm-up: connections, caches
        rates: dict[str, list[float]] = {"direct": [], "clean": []}
        latencies: dict[str, list[float]] = {"direct": [], "clean": []}
        cpu = 0.0
        for name in ("direct", "clean", "clean", "direct"):
            before = coap_throughput.cpu_seconds(gw.pid)
            rate, values = run_readers(direct if name == "direct" else gateway, reads_each // 2)
            if name == "clean":
                cpu += coap_throughput.cpu_seconds(gw.pid) - before
            rates[name].append(rate)
            latencies[name].extend(values)
    finally:
        for reader in direct:
            reader.close()
        for gateway_reader in gateway:
            gateway_reader.close()
    for name in ("direct", "clean"):
        values = latencies[name]
        figures.readers[name] = (sum(rates[name]) / len(rates[name]), percentile(values, 50) * 1000,
                                 percentile(values, 99) * 1000, len(values))
        print(f"  readers   {len(users):>2} readers  {name:<8} {figures.readers[name][0]:7.0f} reads/s  "
              f"p50 {figures.readers[name][1]:7.2f} ms  p99 {figures.readers[name][2]:7.2f} ms", flush=True)
    figures.readers_cpu = cpu / len(latencies["clean"]) * 1e6
    figures.readers_count = len(users)


def stub_latencies(stub: subprocess.Popen[str], stub_port: int, gateway: Any, sends: int,
                   warmup: int = 100) -> tuple[dict[str, tuple[float, float, int]], tuple[float, float]]:
    """One sender, the three paths in turn, against a stub: per path (p50 ms, p99 ms, sends), and
    (gateway CPU us per forwarded send, stub CPU us per request) over the measured sends."""
    user = StubUser()
    group = (HttpSender(stub_port, STUB_TOKEN, STUB_ROOM), CompactSender(gateway.port, user, STUB_ROOM),
             CoapSender(gateway.port, user, STUB_ROOM))
    try:
        run_senders([group], 0, warmup=warmup)
        gateway_cpu, stub_cpu = coap_throughput.cpu_seconds(gateway.pid), coap_throughput.cpu_seconds(stub.pid)
        measured = run_senders([group], sends, warmup=0)
        gateway_cpu = coap_throughput.cpu_seconds(gateway.pid) - gateway_cpu
        stub_cpu = coap_throughput.cpu_seconds(stub.pid) - stub_cpu
    finally:
        for sender in group:
            sender.close()
    row = {name: (percentile(values, 50) * 1000, percentile(values, 99) * 1000, len(values))
           for name, values in zip(OVERHEAD_PATHS, measured)}
    forwarded = sum(len(values) for values in measured[1:])
    return row, (gateway_cpu / forwarded * 1e6, stub_cpu / sum(len(values) for values in measured) * 1e6)


def bench_stub_overhead(figures: Figures, stub: subprocess.Popen[str], stub_port: int, gateway: Any,
                        sends: int) -> None:
    """One sender, the three paths in turn, against the stub: latency Synapse does not blur."""
    figures.overhead_stub, figures.idle_gap_cpu[0.0] = stub_latencies(stub, stub_port, gateway, sends)
    for name, (p50, p99, _n) in figures.overhead_stub.items():
        print(f"  overhead  stub homeserver  {name:<8} p50 {p50:7.3f} ms  p99 {p99:7.3f} ms", flush=True)


def bench_idle_gap(figures: Figures, delay_ms: float, sends: int, workdir: Path) -> None:
    """The stub comparison again with every stub answer held back ``delay_ms`` (Synapse's time).

    Nothing but the idle time between requests changes: what the gateway adds on top of
    the at-once figures is what sleeping between requests costs a process on this machine.
    """
    stub, stub_port = start_stub(delay_ms)
    gw = None
    try:
        gw = start_gateway(f"http://127.0.0.1:{stub_port}", workdir / "gw-slow-stub")
        row, cpu = stub_latencies(stub, stub_port, gw, sends, warmup=20)
    finally:
        if gw is not None:
            gw.stop()
        stub.terminate()
        stub.wait(10)
    figures.idle_gap[delay_ms], figures.idle_gap_cpu[delay_ms] = row, cpu
    for name, (p50, p99, _n) in row.items():
        print(f"  idle gap  stub +{delay_ms:g} ms  {name:<8} p50 {p50:7.3f} ms  p99 {p99:7.3f} ms", flush=True)
    print(f"  idle gap  stub +{delay_ms:g} ms  gateway {cpu[0]:.0f} us CPU/send, stub {cpu[1]:.0f} us CPU/req",
          flush=True)


@dataclasses.dataclass
class StubUser:
    """The stub homeserver's one user (it accepts any password)."""
    localpart: str = "bench"
    password: str = "stub"
    access_token: str = STUB_TOKEN


def bench_ceiling_and_memory(figures: Figures, requests: int, inflight: int, observers: int,
                             workdir: Path, latency_sends: int = 2000) -> None:
    stub, stub_port = start_stub()
    gw = None
    try:
        gw = start_gateway(f"http://127.0.0.1:{stub_port}", workdir / "gw-stub", max_observers=observers + 16)
        time.sleep(1.0)  # let the freshly started process settle before the idle reading
        figures.memory["idle"] = rss_mib(gw.pid)
        bench_stub_overhead(figures, stub, stub_port, gw, latency_sends)
        load(SendLoad, gw.port, 500, inflight)  # warm-up
        cpu_before = coap_throughput.cpu_seconds(gw.pid)
        result = load(SendLoad, gw.port, requests, inflight)
        cpu = coap_throughput.cpu_seconds(gw.pid) - cpu_before
        figures.ceiling["gateway"] = (requests / result.seconds, result.bad_responses, cpu / requests * 1e6)
        figures.memory["after"] = rss_mib(gw.pid)
        print(f"  ceiling   gateway -> stub    {requests / result.seconds:8.0f} req/s  "
              f"(bad {result.bad_responses}, retx {result.retransmissions}, sep {result.separate_responses}, "
              f"{cpu / requests * 1e6:.0f} us CPU/req)", flush=True)
        figures.observers_accepted = register_observers(gw.port, observers)
        figures.memory["observers"] = rss_mib(gw.pid)
        figures.memory["peak"] = coap_throughput.vm_kib(gw.pid, "VmHWM") / 1024
        print(f"  memory    idle {figures.memory['idle']:.1f} MB, after {requests} requests "
              f"{figures.memory['after']:.1f} MB, with {figures.observers_accepted} observers "
              f"{figures.memory['observers']:.1f} MB", flush=True)
    finally:
        if gw is not None:
            gw.stop()
        stub.terminate()
        stub.wait(10)
    proc, port = coap_throughput.start_server("txthings")
    try:
        load(coap_throughput.LoadGenerator, port, 500, inflight)
        cpu_before = coap_throughput.cpu_seconds(proc.pid)
        result = load(coap_throughput.LoadGenerator, port, requests, inflight)
        cpu = coap_throughput.cpu_seconds(proc.pid) - cpu_before
        figures.ceiling["txthings"] = (requests / result.seconds, result.bad_responses, cpu / requests * 1e6)
        print(f"  ceiling   plain txThings     {requests / result.seconds:8.0f} req/s  "
              f"({cpu / requests * 1e6:.0f} us CPU/req)", flush=True)
    finally:
        proc.terminate()
        proc.wait(10)


def bench_workers(figures: Figures, counts: Sequence[int], requests: int, inflight: int, workdir: Path) -> None:
    """The forwarding ceiling against the stub with each worker count, the same load from `WORKER_PEERS` peers."""
    stub, stub_port = start_stub()
    try:
        for count in counts:
            gw = start_gateway(f"http://127.0.0.1:{stub_port}", workdir / f"gw-workers{count}", workers=count)
            try:
                load(SpreadSendLoad, gw.port, 500 * count, inflight)  # warm-up: every worker's connections
                cpu_before, stub_before, own_before = tree_cpu_seconds(gw.pid), coap_throughput.cpu_seconds(
                    stub.pid), time.process_time()
                result = load(SpreadSendLoad, gw.port, requests, inflight)
                cpu = tree_cpu_seconds(gw.pid) - cpu_before
                others = (coap_throughput.cpu_seconds(stub.pid) - stub_before, time.process_time() - own_before)
            finally:
                gw.stop()
            figures.workers.append((count, requests / result.seconds, result.bad_responses, cpu / requests * 1e6,
                                    os.getloadavg()[0]))
            print(f"  workers   {count} worker(s) -> stub {requests / result.seconds:8.0f} req/s  "
                  f"(bad {result.bad_responses}, retx {result.retransmissions}, {cpu / requests * 1e6:.0f} us "
                  f"CPU/req, all processes; cores busy: gateway {cpu / result.seconds:.2f}, stub "
                  f"{others[0] / result.seconds:.2f}, load generator {others[1] / result.seconds:.2f}; "
                  f"load average {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        stub.terminate()
        stub.wait(10)


def workers_report(figures: Figures) -> list[str]:
    """The workers ceiling as RST lines (empty when not measured)."""
    if not figures.workers:
        return []
    lines = ["Workers ceiling (forwarded sends to the stub homeserver, %d client sockets)::" % WORKER_PEERS, "",
             "    workers     req/s   bad   us CPU/req   load avg   vs the 1-worker run before"]
    single = 0.0
    for count, rate, bad, us, load_average in figures.workers:
        single = rate if count == 1 else single
        ratio = f"{rate / single:10.2f}x" if single and count > 1 else ""
        lines.append(f"    {count:>7} {rate:9.0f} {bad:5} {us:12.0f} {load_average:10.1f}  {ratio}")
    return lines + [""]


#: Where a function's own time goes, by the file it is defined in (first match wins).
PROFILE_COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("CoMatrix", ("/comatrix/",)),
    ("txThings", ("/txthings/",)),
    ("treq", ("/treq/",)),
    ("twisted.web client", ("/twisted/web/",)),
    ("Deferreds", ("/twisted/internet/defer.py",)),
    ("reactor", ("/twisted/internet/", "/twisted/python/", "/twisted/logger/", "/twisted/protocols/")),
    ("hyperlink/urllib", ("/hyperlink/", "/urllib/", "/idna/")),
    ("sockets/builtins", ("~",)),
)


def component_of(filename: str) -> str:
    for name, markers in PROFILE_COMPONENTS:
        if any(marker in filename or (marker == "~" and filename == "~") for marker in markers):
            return name
    return "other (json, cbor2, zope, stdlib)"


def profile_summary(stats_path: Path, sends: int) -> tuple[dict[str, float], float]:
    """Share of own (tottime) CPU per component, and Python calls per forwarded send."""
    import pstats

    stats: Any = pstats.Stats(str(stats_path)).stats
    own: dict[str, float] = {}
    calls = 0
    for (filename, _line, _func), (_primitive, total_calls, tottime, _cum, _callers) in stats.items():
        key = component_of(filename)
        own[key] = own.get(key, 0.0) + tottime
        calls += total_calls
    total = sum(own.values()) or 1.0
    return {key: value / total for key, value in sorted(own.items(), key=lambda kv: -kv[1])}, calls / sends


def bench_profile(figures: Figures, sends: int, inflight: int, workdir: Path, label: str,
                  code: Path | None = None) -> None:
    """cProfile (twistd --profile) of the gateway (checkout ``code``) forwarding ``sends`` POST /send to the stub."""
    stats_path = workdir / f"gateway-{label}.pstats"
    stub, stub_port = start_stub()
    try:
        gw = start_gateway(f"http://127.0.0.1:{stub_port}", workdir / f"gw-profile-{label}", code=code,
                           profile=stats_path)
        try:
            load(SendLoad, gw.port, sends, inflight)
        finally:
            gw.stop(timeout=60)
    finally:
        stub.terminate()
        stub.wait(10)
    shares, calls = profile_summary(stats_path, sends)
    figures.profiles[label] = (shares, calls)
    print(f"  profile   {label}: {sends} forwarded sends, {calls:.0f} Python calls per send: "
          + ", ".join(f"{name} {share * 100:.1f} %" for name, share in shares.items()), flush=True)


def bench_baseline_ceiling(figures: Figures, requests: int, inflight: int, workdir: Path, code: Path) -> None:
    """The ceiling run of the checkout ``code`` (the code before a change), same load, same machine."""
    stub, stub_port = start_stub()
    gw = None
    try:
        gw = start_gateway(f"http://127.0.0.1:{stub_port}", workdir / "gw-baseline", code=code)
        load(SendLoad, gw.port, 500, inflight)
        cpu_before = coap_throughput.cpu_seconds(gw.pid)
        result = load(SendLoad, gw.port, requests, inflight)
        cpu = coap_throughput.cpu_seconds(gw.pid) - cpu_before
        figures.ceiling["baseline"] = (requests / result.seconds, result.bad_responses, cpu / requests * 1e6)
        print(f"  ceiling   baseline -> stub   {requests / result.seconds:8.0f} req/s  "
              f"({cpu / requests * 1e6:.0f} us CPU/req)", flush=True)
    finally:
        if gw is not None:
            gw.stop()
        stub.terminate()
        stub.wait(10)


def machine() -> dict[str, str]:
    model = "?"
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        total_kib = int(meminfo.readline().split()[1])
    import twisted
    import treq
    synapse_version = subprocess.run(
        [str(ROOT / ".venv-synapse" / "bin" / "python"), "-c", "import synapse; print(synapse.__version__.split()[0])"],
        capture_output=True, text=True).stdout.strip() or "?"
    return {"cpus": str(os.cpu_count()), "model": model, "ram": f"{total_kib / 1024 / 1024:.1f} GiB",
            "kernel": platform.release(), "python": platform.python_version(),
            "twisted": twisted.__version__, "treq": treq.__version__, "cbor2": _version("cbor2"),
            "synapse": synapse_version}


def _version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


def report(figures: Figures, info: dict[str, str], command: str, requests: int, observers: int) -> str:
    lines = []
    lines.append(f"Machine: {info['cpus']} CPUs ({info['model']}), {info['ram']} RAM, Linux {info['kernel']}; "
                 f"Python {info['python']}, Twisted {info['twisted']}, treq {info['treq']}, "
                 f"cbor2 {info['cbor2']}, Synapse {info['synapse']} (SQLite).")
    lines.append(f"Command: ``{command}``")
    lines.append("")
    if figures.overhead:
        lines.append("Overhead (message send, p50/p99 in ms)::")
        lines.append("")
        lines.append("    senders  path       p50 ms   p99 ms   sends   path/direct p50  p99   added p50")
        for concurrency, row in sorted(figures.overhead.items()):
            d = row["direct"]
            for name in OVERHEAD_PATHS:
                p50, p99, n = row[name]
                extra = "" if name == "direct" else \
                    f"   {p50 / d[0]:12.2f}  {p99 / d[1]:5.2f}   {p50 - d[0]:+6.2f} ms"
                lines.append(f"    {concurrency:>7}  {name:<8} {p50:8.2f} {p99:8.2f} {n:7}{extra}")
        lines.append("")
        lines.append("(direct: PUT straight to Synapse on a kept-alive connection; compact: CoAP ``/w``;")
        lines.append("clean: CoAP ``/send`` with a CBOR map and the token in option 256.)")
        lines.append("")
    if figures.readers:
        d, c = figures.readers["direct"], figures.readers["clean"]
        lines.append(f"{figures.readers_count} concurrent readers of their room's latest message (direct: "
                     "GET /messages on a kept-alive connection; clean: CoAP ``GET /getmsg?room=``)::")
        lines.append("")
        lines.append("    path       reads/s   p50 ms   p99 ms   reads")
        for name, (rate, p50, p99, n) in (("direct", d), ("clean", c)):
            lines.append(f"    {name:<8} {rate:9.0f} {p50:8.2f} {p99:8.2f} {n:7}")
        lines.append(f"    ratio clean/direct {c[0] / d[0]:.2f}, added p50 {c[1] - d[1]:+.2f} ms, "
                     f"gateway CPU {figures.readers_cpu:.0f} us per getmsg")
        lines.append("")
    if figures.overhead_stub:
        lines.append("The same, one sender, against the stub homeserver (direct = the stub's own time)::")
        lines.append("")
        lines.append("    path       p50 ms   p99 ms   sends   added p50   added p99")
        d = figures.overhead_stub["direct"]
        for name in OVERHEAD_PATHS:
            p50, p99, n = figures.overhead_stub[name]
            extra = "" if name == "direct" else f"   {p50 - d[0]:+6.3f} ms  {p99 - d[1]:+6.3f} ms"
            lines.append(f"    {name:<8} {p50:8.3f} {p99:8.3f} {n:7}{extra}")
        lines.append("")
    if figures.idle_gap:
        lines.append("Idle-gap control (one sender, the stub again; it answers at once, or holds every")
        lines.append("answer back as long as Synapse takes, so every process sleeps between requests)::")
        lines.append("")
        lines.append("    stub answers     path      p50 ms   added p50   gateway CPU/send   stub CPU/req")
        rows = [(0.0, figures.overhead_stub)] + sorted(figures.idle_gap.items())
        for delay, row in rows:
            gateway_us, stub_us = figures.idle_gap_cpu[delay]
            label = "at once" if not delay else f"after {delay:g} ms"
            for name in OVERHEAD_PATHS:
                p50 = row[name][0]
                added = "" if name == "direct" else f"{p50 - row['direct'][0]:+8.3f} ms"
                cpu = f"{gateway_us:10.0f} us   {stub_us:10.0f} us" if name == "direct" else ""
                lines.append(f"    {label:<16} {name:<8} {p50:8.3f}   {added:<11}   {cpu}".rstrip())
        lines.append("")
    lines.append("Ceiling (requests/s)::")
    lines.append("")
    for name, label in (("baseline", "baseline POST /send -> stub homeserver"),
                        ("gateway", "gateway POST /send -> stub homeserver"),
                        ("txthings", "plain txThings GET /hello")):
        if name not in figures.ceiling:
            continue
        rate, bad, us = figures.ceiling[name]
        lines.append(f"    {label:<40} {rate:8.0f} req/s  {us:5.0f} us server CPU/req  (bad answers: {bad})")
    ratio = figures.ceiling["gateway"][0] / figures.ceiling["txthings"][0]
    lines.append(f"    ratio gateway/txThings: {ratio:.2f}")
    if "baseline" in figures.ceiling:
        lines.append(f"    ratio baseline/txThings: "
                     f"{figures.ceiling['baseline'][0] / figures.ceiling['txthings'][0]:.2f}")
    lines.append("")
    if figures.profiles:
        names = list(dict.fromkeys(name for shares, _calls in figures.profiles.values() for name in shares))
        labels = list(figures.profiles)
        lines.append("Profile of forwarded sends (cProfile, share of own time per component)::")
        lines.append("")
        lines.append("    component                          " + "".join(f"{label:>10}" for label in labels))
        for name in names:
            lines.append(f"    {name:<35}" + "".join(
                f"{figures.profiles[label][0].get(name, 0.0) * 100:9.1f}%" for label in labels))
        lines.append(f"    {'Python calls per send':<35}" + "".join(
            f"{figures.profiles[label][1]:10.0f}" for label in labels))
    lines.append("")
    lines.append("Memory (gateway RSS)::")
    lines.append("")
    mem = figures.memory
    lines.append(f"    idle                              {mem['idle']:6.1f} MB")
    lines.append(f"    after {requests:>7} forwarded sends     {mem['after']:6.1f} MB  "
                 f"(growth {mem['after'] - mem['idle']:+.1f} MB)")
    lines.append(f"    with {figures.observers_accepted:>5} observers              {mem['observers']:6.1f} MB  "
                 f"(growth {mem['observers'] - mem['idle']:+.1f} MB, {observers} registrations sent)")
    lines.append(f"    peak (VmHWM)                      {mem['peak']:6.1f} MB")
    if figures.push:
        import push_latency  # imports this module: import late

        lines.append("")
        lines.append(push_latency.report(figures.push))
    return "\n".join(lines)


FIGURES_BEGIN = ".. figures: begin (written by bench/gateway_perf.py --write)"
FIGURES_END = ".. figures: end"


def write_figures(path: Path, text: str, begin_marker: str = FIGURES_BEGIN) -> None:
    """Replace the figures between ``begin_marker`` and the next end marker of ``path``; the prose
    around stays (other benchmarks write their own blocks, each with its own begin marker)."""
    document = path.read_text()
    begin = document.index(begin_marker)
    end = document.index(FIGURES_END, begin)
    path.write_text(document[:begin] + begin_marker + "\n\n" + text + "\n\n" + document[end:])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sends", type=int, default=1000, help="sends for the 1-sender overhead run")
    parser.add_argument("--sends-each", type=int, default=100, help="sends per sender with 16 senders")
    parser.add_argument("--requests", type=int, default=100_000, help="requests for the ceiling/memory run")
    parser.add_argument("--inflight", type=int, default=32)
    parser.add_argument("--observers", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="small counts (smoke run)")
    parser.add_argument("--push-observers", type=int, nargs="*", default=[100, 1000],
                        help="observer counts for the push benchmark (none: skip it)")
    parser.add_argument("--write", metavar="RST", help="write the figures to this file (docs/performance.rst)")
    parser.add_argument("--idle-gap-ms", type=float, default=18.0,
                        help="stub answer delay for the idle-gap control, about Synapse's time per send (0: skip)")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="also measure the forwarding ceiling with 1 and N workers (0: skip)")
    parser.add_argument("--only-workers", action="store_true", help="measure only that (needs --workers)")
    parser.add_argument("--workers-rounds", type=int, default=1, help="alternate 1 and N workers this many times")
    parser.add_argument("--reads-each", type=int, default=200,
                        help="reads per reader with 16 concurrent readers in front of Synapse (0: skip)")
    parser.add_argument("--profile-sends", type=int, default=20_000,
                        help="forwarded sends under cProfile for the profile summary (0: skip)")
    parser.add_argument("--baseline", metavar="CHECKOUT", type=Path,
                        help="another checkout (e.g. a git worktree of main): its ceiling and profile too")
    parser.add_argument("--no-overhead", action="store_true", help="skip the runs in front of Synapse")
    parser.add_argument("--serve-stub", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stub-delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_stub:
        serve_stub(0, args.stub_delay_ms / 1000)
        return 0
    if args.quick:
        args.sends, args.sends_each, args.requests, args.observers = 100, 10, 5000, 200
        args.reads_each, args.profile_sends = 20, 2000
        args.push_observers = [10, 100]
    command = "python bench/gateway_perf.py " + " ".join(argv if argv is not None else sys.argv[1:])
    info = machine()
    figures = Figures()
    with tempfile.TemporaryDirectory(prefix="comatrix-bench-") as tmp:
        workdir = Path(tmp)
        if args.workers > 1:
            bench_workers(figures, (1, args.workers) * args.workers_rounds, args.requests, args.inflight, workdir)
        if args.only_workers:
            print()
            print("\n".join(workers_report(figures)))
            return 0
        if not args.no_overhead:
            bench_overhead(figures, args.sends, args.sends_each, workdir, reads_each=args.reads_each)
        if args.baseline is not None:
            bench_baseline_ceiling(figures, args.requests, args.inflight, workdir, args.baseline.resolve())
        bench_ceiling_and_memory(figures, args.requests, args.inflight, args.observers, workdir,
                                 latency_sends=args.sends * 2)
        if args.profile_sends:
            if args.baseline is not None:
                bench_profile(figures, args.profile_sends, args.inflight, workdir, "baseline",
                              args.baseline.resolve())
            bench_profile(figures, args.profile_sends, args.inflight, workdir, "now")
        if args.idle_gap_ms > 0:
            bench_idle_gap(figures, args.idle_gap_ms, args.sends // 2, workdir)
        if args.push_observers:
            import push_latency  # imports this module: import late

            figures.push = push_latency.run_push(args.push_observers, messages=5 if args.quick else None,
                                                 workdir=workdir / "push")
    text = report(figures, info, command.strip(), args.requests, args.observers)
    if figures.workers:
        text += "\n\n" + "\n".join(workers_report(figures))
    print()
    print(text)
    if args.write:
        write_figures(Path(args.write), text)
        print(f"\nwritten to {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
