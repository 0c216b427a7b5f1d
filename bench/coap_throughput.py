"""Throughput and memory benchmark: plain txThings versus the comatrix/coap/ layer.

Not a test.  One run starts, one after the other, two server subprocesses on
loopback that serve the same trivial GET resource (``/hello`` -> 11 bytes of
text/plain):

* ``txthings``: plain txThings 0.3.0 (``txthings.coap.Coap`` + ``CoAPResource``);
* ``comatrix``: the same resource through ``comatrix.coap.server.CoapServer``.

A raw-socket load generator (this process; not aiocoap, which is slower than the
servers) sends ``--requests`` distinct CON GETs with ``--inflight`` outstanding,
after a short warm-up, and measures requests/s and the growth of the server's
VmRSS (``/proc/<pid>/status``) across the run.  Distinct (source port, MID)
pairs are guaranteed by spreading requests over several client sockets, so the
servers' deduplication never short-circuits a request.

Usage::

    .venv/bin/python bench/coap_throughput.py                  # 100,000 requests
    .venv/bin/python bench/coap_throughput.py --requests 5000  # quick try
    .venv/bin/python bench/coap_throughput.py --only comatrix
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import selectors
import socket
import struct
import subprocess
import sys
import time
from typing import Sequence

PAYLOAD = b"hello world"
PATH = b"hello"
#: Each client socket sends at most this many requests, so MIDs never repeat on it.
REQUESTS_PER_SOCKET = 60_000
WARMUP_REQUESTS = 500
#: A request without an answer after this long is sent again (same MID: a retransmission).
RETRANSMIT_AFTER = 2.0
MAX_TRIES = 5
READY_TIMEOUT = 20.0


# --------------------------------------------------------------------------- servers


def serve_txthings(port: int) -> None:
    """Plain txThings: the baseline."""
    from twisted.internet import defer, reactor
    from txthings import coap, resource

    class Hello(resource.CoAPResource):  # type: ignore[misc]
        def __init__(self) -> None:
            resource.CoAPResource.__init__(self)
            self.visible = True

        def render_GET(self, request: coap.Message) -> "defer.Deferred[coap.Message]":
            response = coap.Message(code=coap.CONTENT, payload=PAYLOAD)
            response.opt.content_format = 0
            return defer.succeed(response)

    root = resource.CoAPResource()
    root.putChild(PATH, Hello())
    listening = reactor.listenUDP(port, coap.Coap(resource.Endpoint(root)),  # type: ignore[attr-defined]
                                  interface="127.0.0.1")
    _announce(listening.getHost().port)
    reactor.run()  # type: ignore[attr-defined]


def serve_comatrix(port: int) -> None:
    """The same resource through comatrix.coap."""
    from twisted.internet import reactor

    from comatrix.coap.message import Request, Response
    from comatrix.coap.numbers import ContentFormat
    from comatrix.coap.resource import CoapResource, LinkAttributes
    from comatrix.coap.server import CoapServer, CoapSettings, Site, listen_udp

    class Hello(CoapResource):
        link = LinkAttributes(ct=(ContentFormat.TEXT_PLAIN,))

        def render_GET(self, request: Request) -> Response:
            return Response(payload=PAYLOAD, content_format=ContentFormat.TEXT_PLAIN)

    site = Site()
    site.put((PATH.decode(),), Hello())
    server = CoapServer(site, CoapSettings(), reactor=reactor)
    listening = listen_udp(server, "127.0.0.1", port)
    _announce(listening.getHost().port)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def _announce(port: int) -> None:
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()


SERVERS = {"txthings": serve_txthings, "comatrix": serve_comatrix}


# --------------------------------------------------------------------------- client


def build_request(mid: int, token: int) -> bytes:
    """CON GET /hello with a 4-byte token."""
    header = struct.pack("!BBHI", 0x44, 0x01, mid, token)
    return header + bytes([0xB0 | len(PATH)]) + PATH


@dataclasses.dataclass
class Outstanding:
    sock_index: int
    datagram: bytes
    sent_at: float
    tries: int = 1


@dataclasses.dataclass
class LoadResult:
    requests: int
    seconds: float
    retransmissions: int
    separate_responses: int
    bad_responses: int


class LoadGenerator:
    """Keeps ``inflight`` CON GETs outstanding until ``total`` have been answered."""

    def __init__(self, port: int, total: int, inflight: int, token_base: int) -> None:
        self.port = port
        self.total = total
        self.inflight = inflight
        self.token_base = token_base
        count = max(1, math.ceil(total / REQUESTS_PER_SOCKET))
        self.socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
        self.selector = selectors.DefaultSelector()
        for index, sock in enumerate(self.socks):
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self.selector.register(sock, selectors.EVENT_READ, index)
        self.outstanding: dict[int, Outstanding] = {}
        self.sent = 0
        self.done = 0
        self.retransmissions = 0
        self.separate = 0
        self.bad = 0

    def close(self) -> None:
        self.selector.close()
        for sock in self.socks:
            sock.close()

    def build(self, mid: int, token: int) -> bytes:
        """The request datagram (a subclass sends another request)."""
        return build_request(mid, token)

    def answered_well(self, code: int, data: bytes) -> bool:
        """Whether an answer is the expected one (a subclass expects another)."""
        return code == 0x45 and data.endswith(b"\xff" + PAYLOAD)

    def _send_next(self) -> None:
        index = self.sent
        self.sent += 1
        sock_index = index % len(self.socks)
        mid = (index // len(self.socks)) & 0xFFFF
        token = (self.token_base + index) & 0xFFFFFFFF
        datagram = self.build(mid, token)
        self.outstanding[token] = Outstanding(sock_index, datagram, time.monotonic())
        self.socks[sock_index].sendto(datagram, ("127.0.0.1", self.port))

    def _on_datagram(self, sock_index: int, data: bytes) -> None:
        if len(data) < 4:
            self.bad += 1
            return
        mtype = (data[0] >> 4) & 0x3
        tkl = data[0] & 0x0F
        code = data[1]
        if code == 0:  # empty ACK: a separate response will follow
            return
        if mtype == 0:  # CON separate response: acknowledge it
            self.socks[sock_index].sendto(bytes([0x60, 0]) + data[2:4], ("127.0.0.1", self.port))
            self.separate += 1
        if tkl != 4 or len(data) < 8:
            self.bad += 1
            return
        (token,) = struct.unpack_from("!I", data, 4)
        if token not in self.outstanding:
            return  # a duplicate answer to a retransmission
        if not self.answered_well(code, data):
            self.bad += 1
        del self.outstanding[token]
        self.done += 1

    def _retransmit_overdue(self, now: float) -> None:
        for entry in self.outstanding.values():
            if now - entry.sent_at > RETRANSMIT_AFTER:
                if entry.tries >= MAX_TRIES:
                    raise RuntimeError("server stopped answering (request lost after retransmissions)")
                entry.tries += 1
                entry.sent_at = now
                self.retransmissions += 1
                self.socks[entry.sock_index].sendto(entry.datagram, ("127.0.0.1", self.port))

    def run(self) -> LoadResult:
        start = time.perf_counter()
        last_check = time.monotonic()
        while self.done < self.total:
            while self.sent < self.total and len(self.outstanding) < self.inflight:
                self._send_next()
            for key, _ in self.selector.select(timeout=0.5):
                sock = self.socks[key.data]
                while True:
                    try:
                        data = sock.recv(2048)
                    except BlockingIOError:
                        break
                    self._on_datagram(key.data, data)
            now = time.monotonic()
            if now - last_check > 0.5:
                last_check = now
                self._retransmit_overdue(now)
        return LoadResult(self.total, time.perf_counter() - start, self.retransmissions,
                          self.separate, self.bad)


# --------------------------------------------------------------------------- orchestration


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found for pid {pid}")


@dataclasses.dataclass
class BenchResult:
    name: str
    load: LoadResult
    rss_before_kib: int
    rss_after_kib: int
    hwm_kib: int
    server_cpu: float

    @property
    def rate(self) -> float:
        return self.load.requests / self.load.seconds

    @property
    def growth_mib(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / 1024


def start_server(name: str) -> tuple[subprocess.Popen[str], int]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", name],
                            stdout=subprocess.PIPE, text=True, cwd=root, env=env)
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if selector.select(timeout=0.2):
            line = proc.stdout.readline()
            if line.startswith("READY "):
                selector.close()
                return proc, int(line.split()[1])
            if not line and proc.poll() is not None:
                break
    selector.close()
    proc.kill()
    raise RuntimeError(f"{name} server did not start (exit code {proc.poll()})")


def bench_one(name: str, total: int, inflight: int) -> BenchResult:
    proc, port = start_server(name)
    try:
        warm = LoadGenerator(port, WARMUP_REQUESTS, inflight, token_base=0x10000000)
        try:
            warm.run()
        finally:
            warm.close()
        before = vm_kib(proc.pid, "VmRSS")
        cpu_before = cpu_seconds(proc.pid)
        load = LoadGenerator(port, total, inflight, token_base=0x20000000)
        try:
            result = load.run()
        finally:
            load.close()
        after = vm_kib(proc.pid, "VmRSS")
        hwm = vm_kib(proc.pid, "VmHWM")
        return BenchResult(name, result, before, after, hwm, cpu_seconds(proc.pid) - cpu_before)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def print_table(results: Sequence[BenchResult]) -> None:
    header = (f"{'server':<10} {'requests':>9} {'seconds':>8} {'req/s':>8} {'RSS before':>11} "
              f"{'RSS after':>10} {'growth':>9} {'peak':>9} {'srv CPU':>8} {'us/req':>7} {'retx':>5} {'sep':>5} {'bad':>4}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.name:<10} {r.load.requests:>9} {r.load.seconds:>8.2f} {r.rate:>8.0f} "
              f"{r.rss_before_kib / 1024:>9.1f}MB {r.rss_after_kib / 1024:>8.1f}MB "
              f"{r.growth_mib:>7.1f}MB {r.hwm_kib / 1024:>7.1f}MB {r.server_cpu:>7.2f}s "
              f"{r.server_cpu / r.load.requests * 1e6:>7.0f} {r.load.retransmissions:>5} "
              f"{r.load.separate_responses:>5} {r.load.bad_responses:>4}")
    by_name = {r.name: r for r in results}
    if "txthings" in by_name and "comatrix" in by_name:
        ratio = by_name["comatrix"].rate / by_name["txthings"].rate
        print(f"\nthroughput ratio comatrix/txthings: {ratio:.2f} (goal >= 0.90)")
        cpu_ratio = (by_name["txthings"].server_cpu / by_name["txthings"].load.requests) / max(
            1e-9, by_name["comatrix"].server_cpu / by_name["comatrix"].load.requests)
        print(f"server CPU per request, txthings/comatrix: {cpu_ratio:.2f} "
              "(req/s can be capped by this load generator; CPU per request is not)")
        print(f"RSS growth: txthings {by_name['txthings'].growth_mib:.1f} MB, "
              f"comatrix {by_name['comatrix'].growth_mib:.1f} MB (goal <= 20 MB per 100,000 requests)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=100_000, help="requests per server (default 100000)")
    parser.add_argument("--inflight", type=int, default=32, help="requests outstanding at once (default 32)")
    parser.add_argument("--only", choices=sorted(SERVERS), help="benchmark one server only")
    parser.add_argument("--serve", choices=sorted(SERVERS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        SERVERS[args.serve](args.port)
        return 0
    names = [args.only] if args.only else ["txthings", "comatrix"]
    print(f"{args.requests} CON GETs per server, {args.inflight} in flight, loopback, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}\n")
    results = [bench_one(name, args.requests, args.inflight) for name in names]
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
