"""Abuse benchmark (issue 10): each flood of one hostile device, next to a legitimate one.

Figures, not pass/fail.  On loopback, against a real Synapse
(``tests/support/synapse.py``), with a fresh ``twistd comatrix`` per scenario
(``tests/support/gateway.py``, its default limits, ``RLIMIT_NOFILE`` 4096 like
the systemd unit).  Distinct 127.0.0.x source addresses stand in for distinct
devices: the legitimate device is 127.0.0.2, attackers use other addresses.

Per scenario the legitimate device probes the gateway 4 times a second (a clean
``POST /send`` with its own token, and up to three times the operation the flood
aims at: a login, an Observe registration, a block-wise upload ...) while the
flood runs, and the table shows: its share of 2.xx answers and p50/p99 latency,
the gateway's peak RSS and open files (``/proc/<pid>``, against its limit), and
the worst amplification seen by an unauthenticated raw client that never ACKs
(UDP payload bytes the gateway sent to one source address / bytes received from
it, over the flood and a tail that catches retransmitted separate responses).

Usage (from the repository root)::

    .venv/bin/python bench/abuse.py                      # every scenario, ~4 min
    .venv/bin/python bench/abuse.py --only junk,amplification

The login-flood scenario runs last, on Synapse's default ``rc_login`` limits
(the others use the test harness's generous ones).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import resource
import secrets
import selectors
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import cbor2

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import coap_throughput  # noqa: E402  (vm_kib)
import gateway_perf  # noqa: E402  (percentile)
from comatrix.client import NoResponse, UdpCoap  # noqa: E402
from comatrix.coap.blockwise import Block  # noqa: E402
from comatrix.coap.numbers import Code, MessageType, OptionNumber, dotted  # noqa: E402

LEGIT = "127.0.0.2"
CBOR = 60
TOKEN = 256
FD_LIMIT = 4096  # systemd/comatrix.service LimitNOFILE
DURATION = 10.0  # seconds of flood per scenario
PROBE_INTERVAL = 0.25
#: Synapse's built-in rc_login (the harness raises every limit; this scenario needs the real one).
SYNAPSE_RC_LOGIN = {"address": {"per_second": 0.003, "burst_count": 5},
                    "account": {"per_second": 0.003, "burst_count": 5},
                    "failed_attempts": {"per_second": 0.17, "burst_count": 3}}


def addresses(third: int, count: int) -> list[str]:
    """``count`` distinct loopback addresses from 127.0.<third>.1 on."""
    return [f"127.0.{third + n // 250}.{1 + n % 250}" for n in range(count)]


class Raw:
    """Raw CoAP clients at given source addresses; bytes counted per address both ways.

    An authenticated flood ``acks`` every CON it gets (else the gateway's NSTART = 1 would
    hold its answers back); an unauthenticated one never ACKs, like a spoofed source.
    """

    def __init__(self, port: int, hosts: Sequence[str], acks: bool = False, token_length: int = 4) -> None:
        self.gateway, self.acks, self.token_length = ("127.0.0.1", port), acks, token_length
        self.socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in hosts]
        for sock, host in zip(self.socks, hosts):
            sock.bind((host, 0))
            sock.setblocking(False)
        self.sent, self.received = dict.fromkeys(hosts, 0), dict.fromkeys(hosts, 0)
        self.codes: dict[str, int] = {}
        self.observed = 0  # answers carrying an Observe option
        self.mid = secrets.randbits(16)
        self._halt = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def send(self, index: int, code: int, path: str, payload: bytes = b"", **options: Any) -> None:
        self.mid = (self.mid + 1) & 0xFFFF
        data = UdpCoap.build(MessageType.CON, code, self.mid, secrets.token_bytes(self.token_length), path,
                             payload=payload, **options)
        sock = self.socks[index % len(self.socks)]
        with contextlib.suppress(OSError):
            sock.sendto(data, self.gateway)
            self.sent[sock.getsockname()[0]] += len(data)

    def _read(self) -> None:
        with selectors.DefaultSelector() as selector:
            for sock in self.socks:
                selector.register(sock, selectors.EVENT_READ)
            while not self._halt.is_set():
                for key, _ in selector.select(0.2):
                    self._drain(key.fileobj)  # type: ignore[arg-type]

    def _drain(self, sock: socket.socket) -> None:
        for _ in range(64):
            try:
                data = sock.recv(2048)
            except (BlockingIOError, ConnectionRefusedError):
                return
            self.received[sock.getsockname()[0]] += len(data)
            if len(data) < 4:
                continue
            if self.acks and data[0] >> 4 & 3 == MessageType.CON:
                sock.sendto(bytes([0x60, 0]) + data[2:4], self.gateway)
            if data[1]:
                self.codes[dotted(data[1])] = self.codes.get(dotted(data[1]), 0) + 1
                self.observed += gateway_perf._has_observe(data)

    def worst_ratio(self) -> float | None:
        ratios = [self.received[host] / sent for host, sent in self.sent.items() if sent]
        return max(ratios) if ratios and not self.acks else None

    def summary(self) -> str:
        return " ".join(f"{code}x{count}" for code, count in sorted(self.codes.items())) or "no answers"

    def close(self) -> None:
        self._halt.set()
        self._reader.join(2)
        for sock in self.socks:
            sock.close()


class Sampler(threading.Thread):
    """Peak RSS and open files of a process, every 0.2 s, until stopped (a vanished process ends it)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.rss_mib, self.files, self.gone = pid, 0.0, 0, False
        with open(f"/proc/{pid}/limits", encoding="ascii") as limits:
            self.limit = next(int(line.split()[3]) for line in limits if line.startswith("Max open files"))
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._halt.wait(0.2):
            try:
                self.files = max(self.files, len(os.listdir(f"/proc/{self.pid}/fd")))
                self.rss_mib = max(self.rss_mib, coap_throughput.vm_kib(self.pid, "VmRSS") / 1024)
            except (OSError, ValueError, RuntimeError):  # RuntimeError: a zombie has no VmRSS
                self.gone = True
                return

    def close(self) -> None:
        self._halt.set()
        self.join(2)


class Device:
    """A well-behaved device: its own Matrix user and room; blocking exchanges with short retries."""

    def __init__(self, port: int, user: Any, room_id: str, host: str = LEGIT) -> None:
        self.coap = UdpCoap(f"coap://127.0.0.1:{port}", ack_timeout=1.0, source=host)
        self.coap.MAX_RETRANSMIT, self.coap.SEPARATE_TIMEOUT = 2, 15.0
        self.user, self.room_id = user, room_id
        self.handle: bytes | None = None
        self.room_handle: int | None = None
        self.specials = 0  # targeted operations done so far

    def request(self, code: int, path: str, body: Any = None, token: bool = False, raw: bytes | None = None,
                options: Sequence[tuple[int, bytes]] = (), **kw: Any) -> int | None:
        options = list(options) + ([(TOKEN, self.user.access_token.encode())] if token else [])
        payload = raw if raw is not None else b"" if body is None else cbor2.dumps(body)
        try:
            self.last = self.coap.request(code, path, payload=payload, options=options,
                                          content_format=None if not payload else CBOR, **kw)
        except NoResponse:
            return None
        return self.last.code

    def send(self) -> int | None:
        return self.request(Code.POST, "send", {"room_id": self.room_id, "txn_id": secrets.token_hex(6),
                                                "body": "legit"}, token=True)

    def login(self) -> int | None:
        return self.request(Code.POST, "login", {"user": self.user.localpart, "password": self.user.password})

    def compact_login(self) -> int | None:
        code = self.request(Code.POST, "+", [self.user.localpart, self.user.password])
        self.handle = cbor2.loads(self.last.payload) if code == Code.CREATED else self.handle
        return code

    def compact_join(self) -> int | None:
        code = self.request(Code.POST, "x", [self.handle, self.room_id])
        self.room_handle = cbor2.loads(self.last.payload) if code == Code.CHANGED else self.room_handle
        return code

    def observe(self) -> int | None:
        if self.room_handle is None:  # first time: log in and join in the compact profile
            self.compact_login()
            self.compact_join()
        code = self.request(Code.FETCH, "v", [self.handle, self.room_handle], observe=0)
        # Over the cap the gateway answers without Observe: not what the device asked for (0).
        return code if code is None or self.last.option(OptionNumber.OBSERVE) is not None else 0

    def block_send(self) -> int | None:
        """POST /send in 16-byte Block1 blocks, half a second apart (a slow radio)."""
        body = cbor2.dumps({"room_id": self.room_id, "txn_id": secrets.token_hex(6), "body": "legit"})
        chunks = [body[at:at + 16] for at in range(0, len(body), 16)]
        for num, chunk in enumerate(chunks):
            more = num < len(chunks) - 1
            code = self.request(Code.POST, "send", raw=chunk, token=True,
                                options=[(OptionNumber.BLOCK1, Block(num, more, 0).encode())])
            if not more or code != Code.CONTINUE:
                return code
            time.sleep(0.5)
        return None

    def close(self) -> None:
        self.coap.close()


@dataclasses.dataclass
class Scenario:
    name: str
    flood: Callable[["Context"], str]
    special: Callable[[Device], int | None] | None = None
    special_at: range = range(3, 12, 4)  # probes that are the targeted operation; the others /send
    lead: float = 1.0  # seconds the flood runs before the first probe
    tail: float = 0.0  # seconds to keep counting after it (separate responses, retransmissions)


@dataclasses.dataclass
class Context:
    synapse: Any
    port: int
    stop: threading.Event
    raws: list[Raw] = dataclasses.field(default_factory=list)

    def raw(self, hosts: Sequence[str], acks: bool = False, token_length: int = 4) -> Raw:
        self.raws.append(Raw(self.port, hosts, acks, token_length))
        return self.raws[-1]

    def attacker(self, host: str) -> Device:
        user = self.synapse.make_user("abuser")
        return Device(self.port, user, self.synapse.create_room(user.access_token), host)

    def paced(self, count: int, action: Callable[[int], Any], seconds: float = DURATION) -> int:
        """``action(n)`` for n < count spread over ``seconds``, until the stop; how many ran."""
        started = time.monotonic()
        for n in range(count):
            if self.stop.is_set():
                return n
            action(n)
            time.sleep(max(0.0, started + seconds * (n + 1) / count - time.monotonic()))
        return count


def _tally(codes: list[int | None]) -> str:
    names = ["no-answer" if code is None else "not-observed" if code == 0 else dotted(code) for code in codes]
    return " ".join(f"{name}x{names.count(name)}" for name in sorted(set(names)))


def flood_login(ctx: Context) -> str:
    attacker = ctx.attacker("127.0.0.10")
    wrong = {"user": attacker.user.localpart, "password": "wrong-" + secrets.token_hex(4)}
    codes = [attacker.request(Code.POST, "login", wrong) for _ in range(5)]
    ctx.paced(5, lambda n: codes.append(attacker.request(Code.POST, "login", wrong)))
    attacker.close()
    return f"wrong logins: {_tally(codes)}"


def flood_register(ctx: Context) -> str:
    attacker = Device(ctx.port, None, "", "127.0.0.11")
    paths = ["register", "4", "_matrix/client/v3/register", "_matrix/client/r0/register"]
    codes: list[int | None] = []
    ctx.paced(20, lambda n: codes.append(attacker.request(Code.POST, paths[n % 4], {
        "username": "abuse" + secrets.token_hex(5), "password": secrets.token_urlsafe(12),
        "auth": {"type": "m.login.dummy"}})))
    attacker.close()
    created = sum(1 for code in codes if code is not None and 64 <= code < 96)
    return f"accounts created {created}/{len(codes)}"


def flood_longpolls(ctx: Context) -> str:
    user = ctx.synapse.make_user("poller")
    raw = ctx.raw(["127.0.0.12"] * 10, acks=True)
    since = ctx.synapse.request("GET", "/_matrix/client/v3/sync", token=user.access_token,
                                query={"timeout": "0"})["next_batch"]
    options = [(OptionNumber.URI_QUERY, f"since={since}".encode()), (OptionNumber.URI_QUERY, b"timeout=60000"),
               (TOKEN, user.access_token.encode())]
    ctx.paced(300, lambda n: raw.send(n, Code.GET, "7", options=options))
    ctx.stop.wait(DURATION)
    return f"300 GET /7: {raw.summary()}"


def flood_observers(ctx: Context) -> str:
    attacker = ctx.attacker("127.0.0.13")
    attacker.compact_login()
    attacker.compact_join()
    raw = ctx.raw(["127.0.0.13"] * 4, acks=True)
    body = cbor2.dumps([attacker.handle, attacker.room_handle])
    sent = ctx.paced(320, lambda n: raw.send(n, Code.FETCH, "v", body, content_format=CBOR, observe=0),
                     seconds=16.0)
    ctx.stop.wait(DURATION)
    attacker.close()
    return f"{sent} registrations, {raw.observed} observed: {raw.summary()}"


def flood_block1(ctx: Context) -> str:
    raw = ctx.raw(addresses(1, 300))
    start = [(OptionNumber.BLOCK1, Block(0, True, 0).encode())]
    sent = ctx.paced(6000, lambda n: raw.send(n, Code.POST, "send", b"\xa1" + b"x" * 15, content_format=CBOR,
                                              options=start))
    return f"{sent} starts from 300 addresses: {raw.summary()}"


def flood_sessions(ctx: Context) -> str:
    attacker = ctx.attacker("127.0.0.14")
    codes: list[int | None] = []
    ctx.paced(200, lambda n: codes.append(attacker.compact_login()))
    attacker.close()
    return f"compact logins: {_tally(codes)}"


JUNK: list[tuple[int, str, bytes, dict[str, Any]]] = [
    (Code.POST, "send", cbor2.dumps({"room_id": "!r:x", "body": "j"}), {"content_format": CBOR}),  # no token
    (Code.POST, "send", b"junk", {"content_format": 0}),  # not CBOR
    (Code.GET, "nope", b"", {}),  # no such resource
    (Code.POST, "send", b"\xff\xfe", {"content_format": CBOR, "options": [(TOKEN, b"junk")]}),  # bad CBOR
]


def flood_junk(ctx: Context) -> str:
    raw = ctx.raw(addresses(3, 60))

    def tick(n: int) -> None:
        for index in range(60):
            code, path, payload, options = JUNK[(n + index) % len(JUNK)]
            raw.send(index, code, path, payload, **options)

    ticks = ctx.paced(int(DURATION * 20), tick)
    return f"{ticks * 60} junk requests: {raw.summary()}"


def flood_amplification(ctx: Context) -> str:
    # One address per resource; empty tokens: the smallest requests (6 bytes for GET /0).
    raw = ctx.raw(["127.0.0.15", "127.0.0.16"], token_length=0)
    ctx.paced(300, lambda n: raw.send(n, Code.GET, ("0", ".well-known/core")[n % 2]), seconds=3.0)
    return f"150 GET /0 + 150 /.well-known/core in 3 s: {raw.summary()}"


SCENARIOS = [
    Scenario("register", flood_register),
    Scenario("longpolls", flood_longpolls, Device.compact_login, range(3, 8, 4), lead=5.0),
    Scenario("observers", flood_observers, Device.observe, range(27, 40, 6), lead=10.0),
    Scenario("block1", flood_block1, Device.block_send, range(10**6), tail=3.0),
    Scenario("sessions", flood_sessions, Device.compact_login, range(3, 8, 4)),
    Scenario("junk", flood_junk, tail=3.0),
    Scenario("amplification", flood_amplification, tail=8.0),
    Scenario("login", flood_login, lambda device: device.compact_login() if device.specials % 2 else device.login()),
]


class Row(NamedTuple):
    name: str
    codes: list[int | None]
    latencies: list[float]
    sampler: Sampler | None
    amplification: float | None
    note: str


def probe(device: Device, scenario: Scenario, stop: threading.Event) -> tuple[list[int | None], list[float]]:
    codes: list[int | None] = []
    latencies: list[float] = []
    started = time.monotonic()
    for n in itertools.count():
        if stop.is_set() or time.monotonic() - started >= DURATION:
            break
        began = time.perf_counter()
        if scenario.special is not None and n in scenario.special_at:
            code = scenario.special(device)
            device.specials += 1
        else:
            code = device.send()
        codes.append(code)
        if code:
            latencies.append(time.perf_counter() - began)
        stop.wait(max(0.0, PROBE_INTERVAL - (time.perf_counter() - began)))
    return codes, latencies


def run_scenario(scenario: Scenario, synapse: Any, workdir: Path) -> Row:
    from support.gateway import GatewayProcess

    gw = GatewayProcess(synapse.base_url, workdir / scenario.name, log_level="warn")
    stop, note, device, sampler = threading.Event(), "", None, None
    ctx = Context(synapse, gw.port, stop)
    codes: list[int | None] = []
    latencies: list[float] = []
    try:
        gw.start()
        sampler = Sampler(gw.pid or 0)
        user = synapse.make_user("legit")
        device = Device(gw.port, user, synapse.create_room(user.access_token))
        result: list[str] = []

        def flood() -> None:
            try:
                result.append(scenario.flood(ctx))
            except Exception as exc:  # the row says so; the run goes on
                result.append(f"flood failed: {exc!r}"[:120])

        thread = threading.Thread(target=flood, daemon=True)
        thread.start()
        time.sleep(scenario.lead)  # the flood is under way before the first probe
        codes, latencies = probe(device, scenario, threading.Event())
        stop.set()
        thread.join(30)
        time.sleep(scenario.tail)
        note = result[0] if result else "flood still running"
        if sampler.gone or not gw.running:
            note += "; GATEWAY DIED"
    except Exception as exc:
        note = f"{note} error: {exc!r}"[:160]
    finally:
        stop.set()
        gw.stop()
        for closable in ([sampler] if sampler else []) + ctx.raws + ([device] if device else []):
            closable.close()
    ratios = [ratio for raw in ctx.raws if (ratio := raw.worst_ratio()) is not None]
    return Row(scenario.name, codes, latencies, sampler, max(ratios, default=None), note)


def table(rows: Sequence[Row]) -> str:
    lines = [f"{'scenario':<14} {'legit 2.xx':>12} {'p50 ms':>7} {'p99 ms':>7} {'RSS MB':>7} "
             f"{'open files':>11} {'amplif.':>8}  note",
             "-" * 110]
    for row in rows:
        ok = sum(1 for code in row.codes if code is not None and 64 <= code < 96)
        share = f"{ok}/{len(row.codes)} {100 * ok / len(row.codes):3.0f}%" if row.codes else "-"
        p50, p99 = ((f"{gateway_perf.percentile(row.latencies, p) * 1000:7.1f}" for p in (50, 99))
                    if row.latencies else ("      -", "      -"))
        amp = f"{row.amplification:7.1f}x" if row.amplification is not None else "       -"
        gw = f"{row.sampler.rss_mib:7.1f} {row.sampler.files:>5}/{row.sampler.limit:<5}" if row.sampler else " " * 19
        failed = _tally([code for code in row.codes if code is None or not 64 <= code < 96])
        lines.append(f"{row.name:<14} {share:>12} {p50} {p99} {gw} {amp}  {row.note}"
                     + (f"; legit failed: {failed}" if failed else ""))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from support.synapse import SynapseServer

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", help="comma-separated scenario names: " + ",".join(s.name for s in SCENARIOS))
    args = parser.parse_args(argv)
    wanted = args.only.split(",") if args.only else [s.name for s in SCENARIOS]
    scenarios = [s for s in SCENARIOS if s.name in wanted]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # inherited by the gateway
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT if hard == resource.RLIM_INFINITY
                                                else min(FD_LIMIT, hard), hard))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="comatrix-abuse-") as tmp:
        synapse = SynapseServer(Path(tmp) / "synapse")
        try:
            synapse.start()
            for scenario in scenarios:
                print(f"  {scenario.name} ...", flush=True)
                try:
                    if scenario.name == "login":
                        synapse.extra_config = {"rc_login": SYNAPSE_RC_LOGIN}
                        synapse.restart()
                    rows.append(run_scenario(scenario, synapse, Path(tmp)))
                except Exception as exc:  # Synapse itself failed: the table still comes
                    rows.append(Row(scenario.name, [], [], None, None, f"error: {exc!r}"[:160]))
        finally:
            synapse.stop()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
