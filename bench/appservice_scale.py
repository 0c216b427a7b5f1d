"""Application-service mode at scale (issue 12): 10,000 device users, 1,000 watchers.  Figures, not pass/fail.

One run, on loopback, against one real Synapse (``tests/support/synapse.py``,
SQLite) that loads a registration made by
``comatrix.appservice.registration.generate`` (what ``comatrixctl appservice
generate`` writes; file 0600) through ``app_service_config_files``:

1. **Provisioning**: ``--provisioned`` device users (default 10,000) are
   registered through the application service (``POST /register`` with
   ``m.login.application_service`` and ``inhibit_login``, the ``as_token``;
   ``--http-concurrency`` requests in flight on kept-alive connections) and
   written as ``[[devices]]`` entries, one ``devices.d/NAME.toml`` each (what
   ``comatrixctl device add NAME --address ADDR`` writes: ``user``,
   ``appservice = true``, ``address``), device *i* bound to its own loopback
   address 127.10.x.y.  (``device add`` also sets a display name: one more
   request per device, left out here.)
2. **Application-service mode**: the gateway (``twistd comatrix``,
   ``tests/support/gateway.py``) starts with ``[appservice]`` and those
   entries (its start time and RSS are measured).  A person creates a public
   room and invites ``--watchers`` of the device users (spread over the
   10,000 entries); the gateway accepts each invitation from the transactions
   (the wait until all are members is reported).  Each watcher is its own UDP
   socket bound to its device's address; all of them are driven by one
   selector loop (``push_latency.Fleet``): compact login ``[user, ""]``
   (``/+``, no password), join by room id (``/x``), ``FETCH /v`` with
   Observe: 0.  The person then sends ``--messages`` messages straight to
   Synapse, one at a time (``push_latency.measure_messages``).
3. **Today's /sync mode**, same run, same person, same number of messages,
   in a second public room of the same shape (one room of 2,000 members would
   make Synapse's work per message, and each join, costlier in this phase
   alone): ``--watchers`` ordinary users with passwords (registered with
   ``m.login.dummy``), a fresh gateway without ``[appservice]`` and without
   entries; each watcher from its own address 127.20.x.y logs in with its
   password (``/+``), joins (``/x``) and observes; each watch is one ``/sync``
   long-poll of the gateway.

Compact requests answered 5.xx (Synapse slow to take a join) are sent again,
up to 3 rounds; the gateways' ``request_timeout`` is 60 s, as joins queue
behind Synapse's per-room lock.

Per mode: p50/p99 latency from Synapse's 200 for the PUT to each
notification's arrival (kernel receive timestamp), notifications lost (missing
when the message's wait ended, and how many of those came late) and
duplicated, the gateway's RSS (``/proc/<pid>/status`` VmRSS after start, and
the largest sample), and its TCP connections to Synapse's port (ESTABLISHED
sockets among ``/proc/<pid>/fd``, from ``/proc/net/tcp``), sampled every
``SAMPLE_INTERVAL`` s from the gateway's start to the last message (largest
sample, and the largest during the messages alone).

The gateway runs with ``--log-level warn``, rate limits off, ``max_upstream``
= ``--max-upstream`` (default 16, the shipped default), ``[coap]
max_observers`` above the watchers, ``[limits] max_sessions`` and
``max_long_polls`` above the watchers (so /sync mode is not capped by them).

Usage (from the repository root)::

    .venv/bin/python bench/appservice_scale.py                  # 10,000 provisioned, 1,000 watchers, 20 messages
    .venv/bin/python bench/appservice_scale.py --quick          # 500 provisioned, 50 watchers, 5 messages
    .venv/bin/python bench/appservice_scale.py --write docs/performance.rst
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import http.client
import json
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Sequence

import cbor2

ROOT = Path(__file__).resolve().parents[1]
for _entry in (str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT)):
    if _entry not in sys.path:
        sys.path.insert(0, _entry)

import gateway_perf  # noqa: E402  (bench/gateway_perf.py: machine, figures block)
import push_latency  # noqa: E402  (bench/push_latency.py: the observer fleet, the sender, the measurement)
from comatrix.appservice.registration import Registration, generate  # noqa: E402
from comatrix.compact.codec import CONTENT_FORMAT, PATHS  # noqa: E402
from comatrix.ctl import write_device_file  # noqa: E402
from comatrix.matrix import api  # noqa: E402

__all__ = ["ModeFigures", "main"]

SAMPLE_INTERVAL = 0.5
HTTP_TIMEOUT = 60.0
#: Compact requests outstanding at once (logins, joins, registrations of the watchers).
WINDOW = 32
#: Longest wait for a round of compact requests: this, plus so much per request (joins queue
#: behind Synapse's per-room lock, a few a second in a room of 1,000 members).
ROUND_TIMEOUT = 120.0
#: Longest wait for Synapse's answer to the person's PUT (a failed one is reported, not measured).
PUT_TIMEOUT = 60.0
ROUND_TIMEOUT_EACH = 0.3
FIGURES_BEGIN = ".. figures: begin (written by bench/appservice_scale.py --write)"

_POST, _CREATED, _CHANGED = 2, 0x41, 0x44
_URI_PATH, _CONTENT_FORMAT = 11, 12


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


# --------------------------------------------------------------------------- HTTP to Synapse, many at once


class HttpFanout:
    """Many JSON requests to Synapse from a few threads, each on its own kept-alive connection."""

    def __init__(self, port: int, concurrency: int) -> None:
        self.port = port
        self.concurrency = concurrency
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=HTTP_TIMEOUT)
        return conn

    def call(self, req: api.MatrixRequest) -> tuple[int, Any]:
        """One request (``MatrixRequest`` from the gateway's own builders): (status, decoded body)."""
        headers = {"Content-Type": "application/json"}
        if req.access_token is not None:
            headers["Authorization"] = f"Bearer {str.__str__(req.access_token)}"
        body = json.dumps(req.body) if req.body is not None else None
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request(req.method, req.url(""), body=body, headers=headers)
                response = conn.getresponse()
                raw = response.read()
                break
            except (http.client.HTTPException, OSError):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
        try:
            return response.status, json.loads(raw) if raw else None
        except ValueError:
            return response.status, raw

    def run(self, requests: Sequence[Callable[["HttpFanout"], Any]]) -> list[Any]:
        """Run each ``request(self)`` (which may make several calls), ``concurrency`` at once; results in order."""
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda request: request(self), requests))


def expect(status_body: tuple[int, Any], *ok: int) -> Any:
    status, body = status_body
    if status not in (ok or (200,)):
        errcode = body.get("errcode") if isinstance(body, dict) else None
        raise RuntimeError(f"Synapse answered HTTP {status} {errcode}")
    return body


def register_device_user(registration: Registration, name: str) -> Callable[[HttpFanout], str]:
    def call(http: HttpFanout) -> str:
        localpart = registration.localpart(name)
        expect(http.call(api.register_appservice_user(registration.as_token, localpart)))
        return localpart
    return call


def register_password_user(localpart: str, password: str) -> Callable[[HttpFanout], None]:
    """The ordinary flow: 401 with a UIA session, then the ``m.login.dummy`` stage."""
    def call(http: HttpFanout) -> None:
        first = expect(http.call(api.register(localpart, password, inhibit_login=True)), 401)
        expect(http.call(api.register(localpart, password, session=first["session"], inhibit_login=True)))
    return call


def invite_user(token: str, room_id: str, user_id: str) -> Callable[[HttpFanout], None]:
    return lambda http: expect(http.call(api.invite(token, room_id, user_id)))


# --------------------------------------------------------------------------- the gateway process, watched


def loopback(block: int, index: int) -> str:
    """Device ``index``'s own source address: 127.<block>.x.y (Linux routes all of 127/8 to lo)."""
    return f"127.{block + index // 50_000}.{(index // 200) % 250}.{index % 200 + 1}"


def tcp_connections(pid: int, remote_port: int) -> int:
    """ESTABLISHED TCP sockets of ``pid`` whose remote port is ``remote_port`` (its connections there)."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as lines:
                next(lines)
                for line in lines:
                    fields = line.split()
                    if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == remote_port \
                            and fields[9] in inodes:
                        count += 1
        except FileNotFoundError:
            continue
    return count


class Sampler:
    """A thread reading the gateway's RSS and its connections to Synapse every `SAMPLE_INTERVAL` s."""

    def __init__(self, pid: int, synapse_port: int) -> None:
        self.pid = pid
        self.synapse_port = synapse_port
        self.max_rss = 0.0
        self.max_connections = 0
        #: The largest connection count since `mark` (the message phase).
        self.max_connections_marked = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def mark(self) -> None:
        self.max_connections_marked = 0

    def sample(self) -> int:
        connections = tcp_connections(self.pid, self.synapse_port)
        self.max_connections = max(self.max_connections, connections)
        self.max_connections_marked = max(self.max_connections_marked, connections)
        self.max_rss = max(self.max_rss, gateway_perf.rss_mib(self.pid))
        self.samples += 1
        return connections

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            try:
                self.sample()
            except (OSError, RuntimeError):
                return  # the gateway is gone


def gateway_config(watchers: int, max_upstream: int, appservice: str = "") -> str:
    # request_timeout 60 s: joins wait behind Synapse's per-room lock (not what is measured here).
    return ("request_timeout = 60\n"
            "[coap]\n"
            f"max_observers = {watchers + 16}\n"
            "[limits]\n"
            "device_rate = 0\nglobal_rate = 0\n"
            f"max_upstream = {max_upstream}\nupstream_queue = 1024\n"
            f"max_sessions = {watchers + 64}\nmax_long_polls = {watchers + 64}\n" + appservice)


@dataclasses.dataclass
class ModeFigures:
    """One mode's figures; times in seconds unless named ``_ms``."""

    mode: str
    devices: int                   # [[devices]] entries the gateway started with
    gateway_start: float           # twistd start -> answering CoAP
    rss_start: float               # MB, just after start
    rss_max: float                 # MB, largest sample during the run
    connections_max: int           # to Synapse's port, largest sample from start to the last message
    connections_messages: int      # the same, during the messages only
    samples: int
    membership: float              # appservice: first invitation -> all watchers joined by the gateway
    logins: float                  # all compact logins
    joins: float                   # all compact joins (/x)
    registrations: float           # all Observe registrations
    logged_in: int
    joined: int
    push: push_latency.PushFigures | None = None
    errors: list[str] = dataclasses.field(default_factory=list)


# --------------------------------------------------------------------------- watchers


def compact_round(fleet: push_latency.Fleet, path: str, payloads: dict[int, Any], expected: int,
                  errors: list[str], tries: int = 3) -> dict[int, Any]:
    """One compact POST per watcher, ``WINDOW`` at a time; the decoded answers of those answered ``expected``.

    A request answered 5.xx (the homeserver slow or overloaded) is sent again, up to ``tries`` rounds.
    """
    options = [(_URI_PATH, PATHS[path].encode()), (_CONTENT_FORMAT, bytes([CONTENT_FORMAT]))]
    decoded: dict[int, Any] = {}
    refused: dict[str, int] = {}
    left = dict(payloads)
    for _ in range(tries):
        requests = {index: (_POST, options, cbor2.dumps(payload)) for index, payload in left.items()}
        answers = fleet.exchange(requests, WINDOW, timeout=ROUND_TIMEOUT + ROUND_TIMEOUT_EACH * len(requests))
        retry = {}
        for index, message in answers.items():
            if message.code == expected:
                decoded[index] = cbor2.loads(message.payload)
                continue
            key = f"{message.code >> 5}.{message.code & 31:02d} {message.payload[:60]!r}"
            refused[key] = refused.get(key, 0) + 1
            if message.code >> 5 == 5:
                retry[index] = left[index]
        if len(answers) < len(requests):
            errors.append(f"/{PATHS[path]}: {len(requests) - len(answers)} unanswered")
        if not retry:
            break
        left = retry
    errors += [f"/{PATHS[path]}: {count} answered {key}" for key, count in refused.items()]
    return decoded


def watch(fleet: push_latency.Fleet, users: Sequence[str], passwords: Sequence[str], room_id: str,
          figures: ModeFigures) -> None:
    """Log every watcher in, join it to ``room_id`` and register its observation; timings into ``figures``."""
    started = time.monotonic()
    handles = compact_round(fleet, "login", {i: [users[i], passwords[i]] for i in range(len(users))},
                            _CREATED, figures.errors)
    figures.logins, figures.logged_in = time.monotonic() - started, len(handles)
    progress(f"  {len(handles)}/{len(users)} compact logins in {figures.logins:.1f} s")
    started = time.monotonic()
    rooms = compact_round(fleet, "join", {i: [handle, room_id] for i, handle in handles.items()},
                          _CHANGED, figures.errors)
    figures.joins, figures.joined = time.monotonic() - started, len(rooms)
    progress(f"  {len(rooms)}/{len(handles)} compact joins in {figures.joins:.1f} s")
    started = time.monotonic()
    observers = fleet.observers
    fleet.observers = [observer for observer in observers if observer.index in rooms]
    try:
        fleet.register([handles.get(i, b"") for i in range(len(observers))],
                       [rooms.get(i, 0) for i in range(len(observers))], window=WINDOW,
                       timeout=ROUND_TIMEOUT + ROUND_TIMEOUT_EACH * len(rooms))
    finally:
        fleet.observers = observers
    figures.registrations = time.monotonic() - started
    progress(f"  {len(fleet.registered())}/{len(rooms)} observations registered in {figures.registrations:.1f} s")


def measure_mode(figures: ModeFigures, gw: Any, synapse: Any, sources: Sequence[str], users: Sequence[str],
                 passwords: Sequence[str], room_id: str, person: Any, args: argparse.Namespace,
                 before_watching: Callable[[], None] = lambda: None) -> None:
    """Watchers in, messages out, with the gateway sampled throughout."""
    fleet = push_latency.Fleet(len(users), ("127.0.0.1", gw.port), sources)
    sender = push_latency.Sender(synapse.port, person.access_token, room_id, timeout=PUT_TIMEOUT)
    try:
        with Sampler(gw.pid, synapse.port) as sampler:
            try:
                before_watching()
                watch(fleet, users, passwords, room_id, figures)
                sampler.sample()
                sampler.mark()
                progress(f"  {args.messages} messages (after {args.warmup} unmeasured), "
                         f"{sampler.max_connections} connection(s) to Synapse so far")
                figures.push = push_latency.measure_messages(fleet, sender, len(users), args.messages,
                                                             warmup=args.warmup, timeout=args.timeout,
                                                             pace=args.pace)
                sampler.sample()
                figures.errors += figures.push.errors
            except Exception as error:  # the other mode's figures still count: report this one's failure
                figures.errors.append(f"the run failed: {type(error).__name__}: {str(error)[:200]}")
                progress(f"  {figures.mode}: {figures.errors[-1]}")
        figures.rss_max, figures.samples = sampler.max_rss, sampler.samples
        figures.connections_max, figures.connections_messages = (sampler.max_connections,
                                                                 sampler.max_connections_marked)
        figures.errors += push_latency._gateway_problems(gw)
        if figures.push is not None:
            progress(f"  {figures.mode}: " + push_latency._row(figures.push))
    finally:
        sender.close()
        fleet.close()


def start_gateway(synapse: Any, workdir: Path, config_text: str, devices: int, mode: str) -> tuple[Any, ModeFigures]:
    from support.gateway import GatewayProcess

    gw = GatewayProcess(synapse.base_url, workdir, config_text=config_text, log_level="warn")
    started = time.monotonic()
    gw.start(timeout=300.0)
    elapsed = time.monotonic() - started
    figures = ModeFigures(mode=mode, devices=devices, gateway_start=elapsed, rss_start=gateway_perf.rss_mib(gw.pid),
                          rss_max=0.0, connections_max=0, connections_messages=0, samples=0, membership=0.0,
                          logins=0.0, joins=0.0, registrations=0.0, logged_in=0, joined=0)
    progress(f"{mode}: gateway with {devices} [[devices]] entries answering CoAP after {elapsed:.1f} s, "
             f"RSS {figures.rss_start:.1f} MB")
    return gw, figures


# --------------------------------------------------------------------------- the two modes


@dataclasses.dataclass
class Provisioned:
    registration: Registration
    registration_path: Path
    appservice_port: int
    names: list[str]
    users: list[str]
    seconds: float                 # registering the users
    files_seconds: float           # writing devices.d


def provision(synapse: Any, provisioned: Provisioned, count: int, workdir: Path, concurrency: int) -> None:
    names = [f"d{index:05d}" for index in range(count)]
    http = HttpFanout(synapse.port, concurrency)
    started = time.monotonic()
    localparts = http.run([register_device_user(provisioned.registration, name) for name in names])
    provisioned.seconds = time.monotonic() - started
    provisioned.names = names
    provisioned.users = [f"@{localpart}:{synapse.server_name}" for localpart in localparts]
    progress(f"provisioned {count} device users through the application service in {provisioned.seconds:.1f} s "
             f"({count / provisioned.seconds:.0f}/s, {concurrency} requests in flight)")
    started = time.monotonic()
    devices = workdir / "devices.d"
    for index, (name, user) in enumerate(zip(names, provisioned.users)):
        write_device_file(devices / f"{name}.toml",
                          {"name": name, "user": user, "appservice": True, "address": loopback(10, index) + "/32"})
    provisioned.files_seconds = time.monotonic() - started
    progress(f"wrote {count} devices.d entries in {provisioned.files_seconds:.1f} s")


def watcher_indexes(provisioned: int, watchers: int) -> list[int]:
    """Watchers spread evenly over the provisioned devices (the gateway looks entries up by address)."""
    return [index * provisioned // watchers for index in range(watchers)]


def appservice_mode(synapse: Any, provisioned: Provisioned, person: Any, room_id: str, workdir: Path,
                    args: argparse.Namespace) -> ModeFigures:
    table = (f"[appservice]\nregistration = \"{provisioned.registration_path}\"\n"
             f"bind = \"127.0.0.1\"\nport = {provisioned.appservice_port}\n")
    gw, figures = start_gateway(synapse, workdir, gateway_config(args.watchers, args.max_upstream, table),
                                len(provisioned.users), "appservice")
    chosen = watcher_indexes(len(provisioned.users), args.watchers)
    users = [provisioned.users[index] for index in chosen]

    def invite_all() -> None:
        started = time.monotonic()
        HttpFanout(synapse.port, args.http_concurrency).run(
            [invite_user(person.access_token, room_id, user) for user in users])
        invited = time.monotonic() - started
        progress(f"  {len(users)} invitations sent in {invited:.1f} s; waiting for the gateway to accept them")
        joined = wait_members(synapse, person.access_token, room_id, set(users), args.join_timeout)
        figures.membership = time.monotonic() - started
        progress(f"  {joined}/{len(users)} device users joined {figures.membership:.1f} s after the first invitation")
        if joined < len(users):
            figures.errors.append(f"{len(users) - joined} invitations not accepted within {args.join_timeout:.0f} s")

    try:
        measure_mode(figures, gw, synapse, [loopback(10, index) for index in chosen], users, [""] * len(users),
                     room_id, person, args, before_watching=invite_all)
    finally:
        gw.stop()
    return figures


def wait_members(synapse: Any, token: str, room_id: str, wanted: set[str], timeout: float) -> int:
    """Poll the room's joined members until all of ``wanted`` are in (at most ``timeout`` s); how many are."""
    path = f"/_matrix/client/v3/rooms/{urllib.parse.quote(room_id, safe='')}/joined_members"
    deadline = time.monotonic() + timeout
    while True:
        members = set(synapse.request("GET", path, token=token)["joined"])
        count = len(wanted & members)
        if count == len(wanted) or time.monotonic() > deadline:
            return count
        time.sleep(2.0)


def sync_mode(synapse: Any, person: Any, room_id: str, workdir: Path, args: argparse.Namespace) -> ModeFigures:
    localparts = [f"w{index:04d}{secrets.token_hex(2)}" for index in range(args.watchers)]
    passwords = [secrets.token_urlsafe(12) for _ in localparts]
    started = time.monotonic()
    HttpFanout(synapse.port, args.http_concurrency).run(
        [register_password_user(user, password) for user, password in zip(localparts, passwords)])
    progress(f"/sync: registered {len(localparts)} users with passwords in {time.monotonic() - started:.1f} s")
    gw, figures = start_gateway(synapse, workdir, gateway_config(args.watchers, args.max_upstream), 0, "/sync")
    try:
        measure_mode(figures, gw, synapse, [loopback(20, index) for index in range(args.watchers)], localparts,
                     passwords, room_id, person, args)
    finally:
        gw.stop()
    return figures


# --------------------------------------------------------------------------- report


def report(modes: Sequence[ModeFigures], provisioned: Provisioned, args: argparse.Namespace, info: dict[str, str],
           command: str, load: tuple[str, str]) -> str:
    count = len(provisioned.users)
    lines = [f"Machine: {info['cpus']} CPUs ({info['model']}), {info['ram']} RAM, shared with other work "
             f"(load average {load[0]} before, {load[1]} after); Linux {info['kernel']}, Python {info['python']}, "
             f"Twisted {info['twisted']}, Synapse {info['synapse']} (SQLite).",
             f"Command: ``{command}``; gateways with ``max_upstream = {args.max_upstream}``.", "",
             "Provisioning and start::", "",
             f"    {f'register {count} device users (m.login.application_service, {args.http_concurrency} in flight)':<66}"
             f"{provisioned.seconds:7.1f} s  ({count / provisioned.seconds:.0f}/s)",
             f"    {f'write {count} devices.d entries':<66}{provisioned.files_seconds:7.1f} s"]
    for f in modes:
        label = f"gateway start, {f.mode} mode, {f.devices or 'no'} [[devices]] entries"
        lines.append(f"    {label:<66}{f.gateway_start:7.1f} s  RSS {f.rss_start:.1f} MB")
    lines += ["", f"{args.watchers} watchers, one room, {args.messages} messages (latency: Synapse's 200 for the PUT "
                  "-> each notification)::", "",
              "    mode        invited  logins   joins  observe   p50 ms   p99 ms   max ms  missing (late)  dup  "
              "RSS start/max MB  conns max (messages)"]
    for f in modes:
        p = f.push
        if p is None:
            lines.append(f"    {f.mode:<10} failed: {f.errors[-1] if f.errors else '?'}")
            continue
        invited = f"{f.membership:7.1f}s" if f.membership else "       -"
        lines.append(f"    {f.mode:<10} {invited} {f.logins:6.1f}s {f.joins:6.1f}s {f.registrations:7.1f}s "
                     f"{p.p50:8.1f} {p.p99:8.1f} {p.max:8.1f}  {p.missing:7} ({p.late:4})  {p.duplicates:3}  "
                     f"{f.rss_start:7.1f}/{f.rss_max:<7.1f}  {f.connections_max:9} ({f.connections_messages})")
    for f in modes:
        p = f.push
        if p is None:
            continue
        lines.append(f"    ({f.mode}: {f.logged_in} logged in, {f.joined} joined, {p.registered} observing; "
                     f"{p.received}/{p.expected} notifications on time, CON/NON {p.con}/{p.non}, "
                     f"fan-out p50 {p.spread_p50:.1f} ms, PUT p50 {p.put_p50:.0f} ms"
                     + (f", {p.failed_puts} PUTs failed (not measured)" if p.failed_puts else "")
                     + f"; {f.samples} samples)")
    lines += ["", "(invited: from the first invitation to the last device user joined by the gateway; logins, joins,",
              "observe: all watchers' compact ``/+``, ``/x`` and Observe registrations, 32 at a time; conns: "
              "ESTABLISHED",
              "TCP connections of the gateway to Synapse, largest sample from its start to the last message, and "
              "during the messages.)"]
    return "\n".join(lines)


@dataclasses.dataclass
class Run:
    provisioned: Provisioned
    modes: list[ModeFigures]


def run(args: argparse.Namespace, base: Path) -> Run:
    from support import free_port
    from support.synapse import SynapseServer

    push_latency._raise_fd_limit(2 * args.watchers + 1024)
    port = free_port("127.0.0.1")
    registration = generate(f"http://127.0.0.1:{port}", prefix="comatrix_")
    path = base / "appservice.yaml"
    path.touch(mode=0o600)
    path.write_text(registration.to_yaml())
    provisioned = Provisioned(registration, path, port, [], [], 0.0, 0.0)
    synapse = SynapseServer(base / "synapse", extra_config={"app_service_config_files": [str(path)]})
    modes: list[ModeFigures] = []
    try:
        synapse.start(timeout=300.0)  # a loaded machine: Synapse may take minutes to start
        progress(f"Synapse on {synapse.base_url} with the application service {registration.id}")
        provision(synapse, provisioned, args.provisioned, base / "gw-appservice", args.http_concurrency)
        person = synapse.make_user("person")
        # One room per mode, of the same shape (the person and the watchers): Synapse's work per message
        # is the same in both, and the stopped appservice gateway has no interest in the second.
        room_id = synapse.create_room(person.access_token, preset="public_chat")
        modes.append(appservice_mode(synapse, provisioned, person, room_id, base / "gw-appservice", args))
        room_id = synapse.create_room(person.access_token, preset="public_chat")
        modes.append(sync_mode(synapse, person, room_id, base / "gw-sync", args))
    finally:
        synapse.stop()
    return Run(provisioned, modes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--provisioned", type=int, default=10_000, help="device users provisioned [10000]")
    parser.add_argument("--watchers", type=int, default=1000, help="watching devices per mode [1000]")
    parser.add_argument("--messages", type=int, default=20, help="measured messages per mode [20]")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured messages first [1]")
    parser.add_argument("--timeout", type=float, default=15.0, help="wait per message, seconds [15]")
    parser.add_argument("--pace", type=float, default=0.2, help="pause before each message, seconds [0.2]")
    parser.add_argument("--max-upstream", type=int, default=16, help="the gateways' [limits] max_upstream [16]")
    parser.add_argument("--http-concurrency", type=int, default=8, help="Synapse requests in flight when "
                        "provisioning, inviting, registering [8]")
    parser.add_argument("--join-timeout", type=float, default=600.0,
                        help="longest wait for the gateway to accept the invitations, seconds [600]")
    parser.add_argument("--quick", action="store_true", help="500 provisioned, 50 watchers, 5 messages")
    parser.add_argument("--write", metavar="RST", help="write the figures to this file (docs/performance.rst)")
    parser.add_argument("--workdir", metavar="DIR", type=Path,
                        help="keep Synapse's and the gateways' files and logs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.quick:
        args.provisioned, args.watchers, args.messages = 500, 50, 5
    if args.watchers > args.provisioned:
        parser.error("--watchers must not exceed --provisioned")
    signal.signal(signal.SIGTERM, push_latency._interrupt)
    command = "python bench/appservice_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    info = gateway_perf.machine()
    load_before = push_latency._load()
    progress(f"load average before: {load_before}")
    started = time.monotonic()
    try:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            result = run(args, args.workdir.resolve())
        else:
            with tempfile.TemporaryDirectory(prefix="comatrix-appservice-") as tmp:
                result = run(args, Path(tmp))
    except KeyboardInterrupt:
        print("interrupted: Synapse and the gateways were stopped", file=sys.stderr)
        return 130
    progress(f"done in {time.monotonic() - started:.0f} s")
    text = report(result.modes, result.provisioned, args, info, command.strip(), (load_before, push_latency._load()))
    print()
    print(text)
    for figures in result.modes:
        for error, count in collections.Counter(figures.errors).items():
            print(f"  [{figures.mode}] {error}" + (f" (x{count})" if count > 1 else ""))
    if args.write:
        gateway_perf.write_figures(Path(args.write), text, FIGURES_BEGIN)
        print(f"\nwritten to {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
