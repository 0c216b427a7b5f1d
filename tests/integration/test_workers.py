"""``workers = 2``: real ``twistd comatrix`` supervisors, libcoap peers on distinct 127.0.0.x addresses.

The probe plugin answers ``GET /probe/pid`` with the pid of the worker that served
it, so which worker a peer reached is read from the CoAP answer itself.  Shown
here: a peer (one 4-tuple) always reaches the same worker; a retransmitted CON is
answered from that worker's dedup cache; block-wise in both directions and Observe
work; a peer whose source port changes is still served; a killed worker is started
again and serves its old peers; SIGTERM lets an in-flight request finish and
stops every process.  No Matrix homeserver is needed: nothing here reaches it.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import signal
import socket
import struct
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from support import free_port
from support.coap_clients import libcoap
from support.gateway import GatewayProcess
from support.secrets import remember, remember_log_file

PROBE_PLUGIN = '''
"""Test plugins for the workers tests: who answered, a ticker, 3 KB down, an upload sink, a slow answer."""
import hashlib
import os

from twisted.internet import task
from comatrix.coap import LinkAttributes, Request, Response
from comatrix.coap.resource import CoapResource
from comatrix.resources import ResourcePlugin


class Pid(CoapResource):
    link = LinkAttributes(rt="test.pid")

    def __init__(self, context):
        super().__init__()

    def render_GET(self, request: Request) -> Response:
        return Response.text(str(os.getpid()))


class Ticker(CoapResource):
    link = LinkAttributes(rt="test.ticker", obs=True)

    def __init__(self, context):
        super().__init__()
        self.count = 0
        self.loop = task.LoopingCall(self.tick)
        self.loop.clock = context.reactor
        self.loop.start(0.5, now=False)

    def tick(self):
        self.count += 1
        self.notify_observers()

    def render_GET(self, request: Request) -> Response:
        return Response.text(f"{self.count} {os.getpid()}")


class Big(CoapResource):
    link = LinkAttributes(rt="test.big")

    def __init__(self, context):
        super().__init__()

    def render_GET(self, request: Request) -> Response:
        return Response(payload=bytes(range(256)) * 12)


class Sink(CoapResource):
    link = LinkAttributes(rt="test.sink")

    def __init__(self, context):
        super().__init__()

    def render_PUT(self, request: Request) -> Response:
        return Response.text(f"{len(request.payload)} {hashlib.sha256(request.payload).hexdigest()}")


class Slow(CoapResource):
    link = LinkAttributes(rt="test.slow")

    def __init__(self, context):
        super().__init__()
        self.reactor = context.reactor

    async def render_GET(self, request: Request) -> Response:
        await task.deferLater(self.reactor, 2.0, lambda: None)
        return Response.text("finished")


pid = ResourcePlugin("probe-pid", ("probe", "pid"), Pid)
ticker = ResourcePlugin("probe-ticker", ("probe", "ticker"), Ticker)
big = ResourcePlugin("probe-big", ("probe", "big"), Big)
sink = ResourcePlugin("probe-sink", ("probe", "sink"), Sink)
slow = ResourcePlugin("probe-slow", ("probe", "slow"), Slow)
'''

WORKERS = 2
#: Distinct peers (127.0.0.2 ...): the chance that all hash to one worker is 2 ** -(PEERS - 1).
PEERS = 16
REQUESTS_PER_PEER = 6
BIG = bytes(range(256)) * 12


def _wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


class Supervised:
    """A gateway started with ``--workers 2`` and the probe plugin; its log files are swept for secrets."""

    def __init__(self, workdir: Path, config_text: str | None = None, homeserver: str = "http://127.0.0.1:9") -> None:
        plugins = workdir / "plugins"
        plugins.mkdir(parents=True, exist_ok=True)
        (plugins / "probe.py").write_text(PROBE_PLUGIN)
        self.gateway = GatewayProcess(homeserver, workdir, plugin_dirs=[plugins], log_level="info",
                                      config_text=config_text, extra_args=["--workers", str(WORKERS)])
        self.worker_logs = [remember_log_file(workdir / f"gateway.worker{index}.log") for index in range(WORKERS)]

    def start(self) -> None:
        self.gateway.start()
        for index in range(WORKERS):
            _wait_for(lambda: self.started_pids(index), 30, f"worker {index} started")
        _wait_for(lambda: all("listening on" in self.log(index) for index in range(WORKERS)), 30,
                  "every worker listening")

    def log(self, index: int) -> str:
        path = self.worker_logs[index]
        return path.read_text(errors="replace") if path.exists() else ""

    def started_pids(self, index: int) -> list[int]:
        """Pids of worker ``index``, in the order the supervisor started them."""
        return [int(pid) for pid in re.findall(rf"Worker {index} started \(pid (\d+)\)", self.gateway.log_text())]

    def get(self, path: str, source: tuple[str, int] | None = None, **kwargs: object) -> object:
        extra = ["-a", source[0], "-p", str(source[1])] if source is not None else []
        return libcoap("get", self.gateway.uri(path), extra_args=extra, **kwargs)  # type: ignore[arg-type]

    def pid_for(self, source: tuple[str, int]) -> int:
        result = self.get("probe/pid", source)
        assert result.code == "2.05", result  # type: ignore[attr-defined]
        return int(result.text())  # type: ignore[attr-defined]


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Supervised]:
    running = Supervised(tmp_path)
    running.start()
    try:
        yield running
    finally:
        running.gateway.stop()


def _peers(count: int, first: int = 2) -> list[tuple[str, int]]:
    peers = []
    for number in range(first, first + count):
        address = f"127.0.0.{number}"
        peers.append((address, free_port(address, socket.SOCK_DGRAM)))
    return peers


def test_each_peer_always_reaches_the_same_worker(supervised: Supervised) -> None:
    peers = _peers(PEERS)
    answered: dict[tuple[str, int], set[int]] = {peer: set() for peer in peers}
    for _ in range(REQUESTS_PER_PEER):
        for peer in peers:
            answered[peer].add(supervised.pid_for(peer))
    assert all(len(pids) == 1 for pids in answered.values()), answered
    workers = {pid for pids in answered.values() for pid in pids}
    assert workers == {supervised.started_pids(index)[0] for index in range(WORKERS)}
    # The same address from new source ports: new CoAP endpoints, still answered (by either worker).
    moved = {supervised.pid_for((peers[0][0], free_port(peers[0][0], socket.SOCK_DGRAM))) for _ in range(6)}
    assert moved <= workers


def _con_get(mid: int, token: bytes, path: tuple[str, ...]) -> bytes:
    datagram = struct.pack("!BBH", 0x40 | len(token), 0x01, mid) + token
    previous = 0
    for segment in path:
        raw = segment.encode()
        datagram += bytes([((11 - previous) << 4) | len(raw)]) + raw
        previous = 11
    return datagram


def test_a_retransmitted_con_is_answered_from_the_workers_dedup_cache(supervised: Supervised) -> None:
    """Same MID again from the same 4-tuple: the worker that answered replays its answer, bytes unchanged."""
    request = _con_get(0x5A5A, b"\x01\x02\x03\x04", ("probe", "ticker"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.30", 0))
        peer.settimeout(5)
        peer.sendto(request, ("127.0.0.1", supervised.gateway.port))
        first = peer.recv(2048)
        time.sleep(1.2)  # the ticker moved on: a request handled again would answer another count
        peer.sendto(request, ("127.0.0.1", supervised.gateway.port))
        again = peer.recv(2048)
    assert first[1] == 0x45 and again == first  # 2.05, replayed byte for byte


def test_block_wise_and_observe_with_two_workers(supervised: Supervised) -> None:
    for number, peer in enumerate(_peers(4, first=40)):
        download = supervised.get("probe/big", peer, block_size=64)
        assert download.code == "2.05" and download.payload == BIG  # type: ignore[attr-defined]
        upload = BIG[: 1000 + number]
        stored = libcoap("put", supervised.gateway.uri("probe/sink"), payload=upload, block_size=64,
                         extra_args=["-a", peer[0], "-p", str(peer[1])])
        assert stored.text() == f"{len(upload)} {hashlib.sha256(upload).hexdigest()}"
        observed = supervised.get("probe/ticker", peer, observe_seconds=2)
        values = [pdu.payload.decode().split() for pdu in observed.responses  # type: ignore[attr-defined]
                  if pdu.code == "2.05"]
        assert len(values) >= 3, values  # the registration's answer and notifications
        counts = [int(count) for count, _pid in values]
        assert counts == sorted(counts) and len(set(counts)) == len(counts)
        assert len({pid for _count, pid in values}) == 1  # one worker holds the registration
        assert {pid for _count, pid in values} == {str(supervised.pid_for(peer))}


def test_a_killed_worker_is_started_again_and_serves_its_peers(supervised: Supervised) -> None:
    peers = _peers(PEERS, first=60)
    before = {peer: supervised.pid_for(peer) for peer in peers}
    victim = supervised.started_pids(1)[0]
    os.kill(victim, signal.SIGKILL)
    _wait_for(lambda: len(supervised.started_pids(1)) == 2, 20, "worker 1 started again")
    assert f"Worker 1 (pid {victim}) exited with signal 9" in supervised.gateway.log_text()
    successor = supervised.started_pids(1)[1]
    # The supervisor kept worker 1's socket: the same peers reach the new worker 1.
    after = {peer: supervised.pid_for(peer) for peer in peers}
    assert after == {peer: successor if pid == victim else pid for peer, pid in before.items()}


def test_sigterm_lets_in_flight_requests_finish_and_stops_every_process(supervised: Supervised) -> None:
    pids = [supervised.started_pids(index)[0] for index in range(WORKERS)]
    request = _con_get(0x1234, b"\x09\x08", ("probe", "slow"))
    answers = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.90", 0))
        peer.settimeout(10)
        peer.sendto(request, ("127.0.0.1", supervised.gateway.port))
        answers.append(peer.recv(2048))  # the empty ACK: the request is in flight
        supervised.gateway.signal(signal.SIGTERM)
        answers.append(peer.recv(2048))  # the separate response, sent while the worker drains
    assert answers[0][1] == 0x00 and answers[1][1] == 0x45 and answers[1].endswith(b"finished")
    assert supervised.gateway.wait_exit(20) in (0, -signal.SIGTERM)
    for pid in pids:
        _wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10, f"worker pid {pid} gone")
    assert "Stopping 2 worker(s)" in supervised.gateway.log_text()


def test_dtls_peers_keep_their_worker_too(tmp_path: Path) -> None:
    """The DTLS port is shared the same way: a DTLS session lives in the worker its 4-tuple reaches."""
    dtls_port = free_port("127.0.0.1", socket.SOCK_DGRAM)
    psk = secrets.token_urlsafe(24)
    remember(psk)
    running = Supervised(tmp_path, config_text=(
        f'dtls_port = {dtls_port}\n[[devices]]\npsk_identity = "probe"\npsk = "{psk}"\n'
        f'access_token = "{remember(secrets.token_urlsafe(24))}"\n'))
    running.start()
    try:
        answered: dict[tuple[str, int], set[str]] = {}
        for peer in _peers(12, first=100):
            for _ in range(2):
                result = libcoap("get", f"coaps://127.0.0.1:{dtls_port}/probe/pid", client="coap-client-openssl",
                                 extra_args=["-u", "probe", "-k", psk, "-a", peer[0], "-p", str(peer[1])])
                assert result.code == "2.05", result
                answered.setdefault(peer, set()).add(result.text())
        assert all(len(pids) == 1 for pids in answered.values()), answered
        assert {pid for pids in answered.values() for pid in pids} == {
            str(running.started_pids(index)[0]) for index in range(WORKERS)}
    finally:
        running.gateway.stop()
