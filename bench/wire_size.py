"""Bytes on air per device operation: compact profile vs original CoMatrix vs MSC3079 vs HTTP.

Starts a real Synapse (server name ``example.org``, so the sender is exactly
``@sensor01:example.org``), a TCP relay in front of it, the gateway pointed at
that relay, and a UDP relay in front of the gateway.  Each operation is driven
through the UDP relay with the reference device client's CoAP side
(`comatrix.client.UdpCoap`); the relay records every datagram, both ways
(requests, responses, empty ACKs, notifications).  The TCP relay records the
HTTP/1.1 bytes the gateway exchanged with Synapse meanwhile.  Prints one table
and writes ``docs/wire-size.rst``::

    .venv/bin/python bench/wire_size.py            # writes docs/wire-size.rst
    .venv/bin/python bench/wire_size.py --no-write # print only

Figures, not assertions (the byte budgets are asserted in the test suite).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import secrets
import select
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import cbor2  # noqa: E402

from comatrix.client import CompactDevice, DeviceState, OriginalDevice, UdpCoap  # noqa: E402
from comatrix.coap import wire  # noqa: E402
from comatrix.coap.numbers import Code, MessageType, OptionNumber  # noqa: E402
from comatrix.compact.codec import BUDGETS, SendRequest  # noqa: E402
from support.gateway import GatewayProcess  # noqa: E402
from support.synapse import SynapseServer  # noqa: E402

FRAME_PAYLOAD = 80  # bytes of CoAP per IEEE 802.15.4 frame (facts §1)
BODY20 = "temperature=21.5C ok"
OPERATIONS = ("login", "join", "send", "send NON+NR", "getmsg", "notification", "logout", "time")
FORMS = ("compact", "original", "msc3079", "http")


class UdpRelay:
    """client <-> relay <-> gateway, recording every datagram as ("up"|"down", bytes)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.back.connect(target)
        self.client: Any = None
        self.log: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.running = True
        threading.Thread(target=self._run, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"coap://127.0.0.1:{self.front.getsockname()[1]}"

    def _run(self) -> None:
        while self.running:
            ready, _, _ = select.select([self.front, self.back], [], [], 0.2)
            for sock in ready:
                if sock is self.front:
                    data, self.client = self.front.recvfrom(4096)
                    with self.lock:
                        self.log.append(("up", data))
                    self.back.send(data)
                else:
                    data = self.back.recv(4096)
                    with self.lock:
                        self.log.append(("down", data))
                    if self.client is not None:
                        self.front.sendto(data, self.client)

    def mark(self) -> int:
        with self.lock:
            return len(self.log)

    def since(self, mark: int) -> list[tuple[str, bytes]]:
        with self.lock:
            return list(self.log[mark:])


class TcpRelay:
    """gateway <-> relay <-> Synapse; counts bytes each way."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.up = 0
        self.down = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, server, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "down"), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                with self.lock:
                    if direction == "up":
                        self.up += len(data)
                    else:
                        self.down += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def counters(self) -> tuple[int, int]:
        with self.lock:
            return self.up, self.down


@dataclasses.dataclass
class Row:
    up: int = 0
    down: int = 0
    datagrams: int = 0
    largest_up: int = 0
    largest_down: int = 0
    frames: int = 0
    note: str = ""


def coap_row(datagrams: list[tuple[str, bytes]], note: str = "") -> Row:
    row = Row(note=note)
    for way, data in datagrams:
        if way == "up":
            row.up += len(data)
            row.largest_up = max(row.largest_up, len(data))
        else:
            row.down += len(data)
            row.largest_down = max(row.largest_down, len(data))
        row.datagrams += 1
        row.frames += math.ceil(len(data) / FRAME_PAYLOAD)
    return row


class Bench:
    def __init__(self, udp: UdpRelay, tcp: TcpRelay) -> None:
        self.udp = udp
        self.tcp = tcp
        self.results: dict[tuple[str, str], Row] = {}

    def measure(self, op: str, form: str, call: Callable[[], Any], *, settle: float = 0.3,
                http_form: str | None = None) -> Any:
        mark = self.udp.mark()
        http_before = self.tcp.counters()
        try:
            result = call()
            note = ""
        except Exception as exc:  # a form that cannot do an operation: reported in the table
            result, note = None, f"failed: {exc}"[:60]
        time.sleep(settle)  # late datagrams of the exchange (empty ACKs, a separate response)
        self.results[(op, form)] = coap_row(self.udp.since(mark), note)
        if http_form is not None:
            http_after = self.tcp.counters()
            self.results[(op, http_form)] = Row(up=http_after[0] - http_before[0],
                                                down=http_after[1] - http_before[1])
        return result


def msc3079_request(coap: UdpCoap, code: int, path: str, token: str | None = None, body: Any = None,
                    query: tuple[str, ...] = ()) -> Any:
    """One MSC3079 request: path code, option 256 (token) and 257 (key table 1), integer keys."""
    options: list[tuple[int, bytes]] = [(257, b"\x01")]
    if token is not None:
        options.append((256, token.encode("ascii")))
    options += [(OptionNumber.URI_QUERY, item.encode("utf-8")) for item in query]
    reply = coap.request(code, path, payload=cbor2.dumps(body) if body is not None else b"",
                         content_format=60 if body is not None else None, options=options).checked()
    return cbor2.loads(reply.payload) if reply.payload else None


def run(write: bool) -> str:
    with tempfile.TemporaryDirectory(prefix="comatrix-wire-") as tmp:
        synapse = SynapseServer(Path(tmp) / "synapse", server_name="example.org")
        synapse.start()
        tcp = TcpRelay(("127.0.0.1", synapse.port))
        gateway = GatewayProcess(tcp.url, Path(tmp) / "gateway", log_level="debug",
                                 config_text="[limits]\ndevice_rate = 0\nglobal_rate = 0\n")
        gateway.start()
        try:
            return drive(synapse, gateway, tcp, write)
        finally:
            gateway.stop()
            synapse.stop()


def drive(synapse: SynapseServer, gateway: GatewayProcess, tcp: TcpRelay, write: bool) -> str:
    udp = UdpRelay(("127.0.0.1", gateway.port))
    bench = Bench(udp, tcp)
    password = secrets.token_urlsafe(15)
    sensor_id, sensor_http_token, _ = synapse.register("sensor01", password)
    owner_id, owner_token, _ = synapse.register("owner" + secrets.token_hex(3), secrets.token_urlsafe(15))
    room_id = synapse.create_room(owner_token)
    synapse.invite(owner_token, room_id, sensor_id)

    # Original CoMatrix form (its HTTP bytes are the "http" column: one homeserver call each).
    original = OriginalDevice(UdpCoap(udp.uri), DeviceState(None))
    bench.measure("time", "original", original.time)
    bench.measure("login", "original", lambda: original.login("sensor01", password), http_form="http")
    bench.measure("join", "original", lambda: original.join(room_id), http_form="http")
    bench.measure("send", "original", lambda: original.send(room_id, BODY20), http_form="http")
    bench.measure("getmsg", "original", lambda: original.getmsg(room_id), http_form="http")
    bench.measure("logout", "original", original.logout, http_form="http")

    # MSC3079, if the gateway serves it (/0 versions).
    coap = UdpCoap(udp.uri)
    versions = coap.request(Code.GET, "0")
    if versions.ok:
        state: dict[str, Any] = {}
        login_body = {2: "m.login.password", 65: {2: "m.id.user", 66: "sensor01"}, 69: password}

        def msc_login() -> None:
            state["token"] = msc3079_request(coap, Code.POST, "1", body=login_body)[73]

        bench.measure("login", "msc3079", msc_login)
        bench.measure("join", "msc3079", lambda: msc3079_request(coap, Code.POST, f"K/{room_id}",
                                                                 state.get("token"), {}))
        txn = "m" + secrets.token_hex(4)
        bench.measure("send", "msc3079", lambda: msc3079_request(
            coap, Code.PUT, f"9/{room_id}/m.room.message/{txn}", state.get("token"), {28: "m.text", 27: BODY20}))
        bench.measure("getmsg", "msc3079", lambda: msc3079_request(
            coap, Code.GET, f"E/{room_id}", state.get("token"),
            query=("dir=b", "limit=1", 'filter={"types":["m.room.message"]}')))
        bench.measure("logout", "msc3079", lambda: msc3079_request(coap, Code.POST, "3", state.get("token"), {}))
    msc_note = "not measured (full /sync pushes)" if versions.ok else "n/a: no MSC3079 endpoint"

    # The compact profile.
    device = CompactDevice(UdpCoap(udp.uri), DeviceState(None))
    bench.measure("time", "compact", device.time)
    bench.measure("login", "compact", lambda: device.login("sensor01", password))
    bench.results[("login", "compact")].note = "login + GET /z (seeds seq)"
    bench.measure("join", "compact", lambda: device.join(room_id))
    bench.measure("send", "compact", lambda: device.send(room_id, BODY20))

    def quiet_send() -> None:
        """Fire-and-forget: NON with No-Response 0x02 (RFC 7967); nothing comes back on success."""
        seq = int(device.compact.get("seq", 0)) + 1000
        payload = SendRequest(device.handle, device.compact["rooms"][room_id], seq, BODY20).encode()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(wire.encode(MessageType.NON, Code.POST, 0x5157, b"\x51",
                                    [(OptionNumber.URI_PATH, b"w"), (OptionNumber.CONTENT_FORMAT, b"\x3c"),
                                     (OptionNumber.NO_RESPONSE, b"\x02")], payload),
                        udp.front.getsockname())

    bench.measure("send NON+NR", "compact", quiet_send, settle=1.0)
    bench.results[("send NON+NR", "compact")].note = "NON, No-Response 0x02: no answer on success"
    bench.measure("getmsg", "compact", lambda: device.getmsg(room_id))

    # One Observe notification: the device watches, sensor01 posts the 20-char body over HTTP.
    watch_coap = UdpCoap(udp.uri)
    watcher = CompactDevice(watch_coap, DeviceState(None, {"compact": dict(device.compact)}))
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.extend(watcher.watch(room_id, count=1, timeout=20)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while "sync loop started" not in gateway.log_text():  # logged when the observation is made
        if time.monotonic() > deadline:
            raise SystemExit("the observation was not made")
        time.sleep(0.05)
    mark = udp.mark()
    http_before = tcp.counters()
    sent_at = time.monotonic()
    synapse.send_text(sensor_http_token, room_id, BODY20)
    thread.join(20)
    latency = time.monotonic() - sent_at
    time.sleep(0.3)
    pushed = [(way, data) for way, data in udp.since(mark)]
    bench.results[("notification", "compact")] = coap_row(pushed, f"arrived {latency * 1000:.0f} ms after the HTTP send")
    http_after = tcp.counters()
    bench.results[("notification", "http")] = Row(up=http_after[0] - http_before[0],
                                                  down=http_after[1] - http_before[1],
                                                  note="the gateway's /sync (+ /messages if walked)")
    bench.measure("logout", "compact", device.logout)
    udp.running = False
    table = render(bench.results, msc_note)
    print(table)
    if write:
        (REPO / "docs" / "wire-size.rst").write_text(document(table))
    return table


def render(results: dict[tuple[str, str], Row], msc_note: str) -> str:
    header = ("operation", "form", "bytes up", "bytes down", "datagrams", "largest up/down", "frames", "note")
    lines: list[tuple[str, ...]] = []
    for op in OPERATIONS:
        for form in FORMS:
            row = results.get((op, form))
            if row is None:
                note = msc_note if form == "msc3079" and op == "notification" else "n/a"
                lines.append((op, form, "-", "-", "-", "-", "-", note))
                continue
            if form == "http":
                lines.append((op, form, str(row.up), str(row.down), "-", "-", "-", row.note or "HTTP/1.1 to Synapse"))
                continue
            budget = ""
            if form == "compact" and op in BUDGETS:
                request_budget, response_budget = BUDGETS[op]
                budget = f"budget {request_budget or '-'}/{response_budget}"
            lines.append((op, form, str(row.up), str(row.down), str(row.datagrams),
                          f"{row.largest_up}/{row.largest_down}", str(row.frames),
                          "; ".join(part for part in (budget, row.note) if part)))
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) for i in range(len(header))]
    rule = "  ".join("=" * width for width in widths)

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    return "\n".join([rule, fmt(header), rule, *(fmt(line) for line in lines), rule])


def document(table: str) -> str:
    return f"""Wire size per operation
=======================

Measured by ``bench/wire_size.py`` (see ``bench/README.rst``) on
{time.strftime('%Y-%m-%d')}: real datagrams through a UDP relay between the
reference device client and the gateway, and real HTTP/1.1 bytes through a TCP
relay between the gateway and Synapse {_synapse_version()} (server name
``example.org``, so the sender is ``@sensor01:example.org``; room version 12,
so room ids are ``!`` + 43 characters; 20-character message body).

* **bytes up / down**: sum of the UDP payloads (whole CoAP messages, no
  DTLS/OSCORE) device → gateway and gateway → device, including empty ACKs and
  separate responses; **datagrams**: how many; **largest**: the largest single
  datagram each way; **frames**: IEEE 802.15.4 frames needed at
  {FRAME_PAYLOAD} bytes of CoAP per frame (``ceil(size/{FRAME_PAYLOAD})`` per datagram).
* **compact**: the compact profile (``docs/protocol.rst``), with its budgets
  (request/response bytes per message).  **original**: the original CoMatrix
  form (Proxy-Uri with the homeserver URL ``http://[fd00::1]:8008`` and a path
  code, token in option 256, CBOR maps with Matrix key names).  **msc3079**:
  MSC3079 path codes with option 256 (raw token, sent on every request) and
  option 257, integer keys; ``getmsg`` is ``/E/<room>?dir=b&limit=1&filter=...``.
  **http**: HTTP/1.1 bytes the gateway exchanged with Synapse for the original
  form's operation (one call each); for ``notification``, during the compact
  notification (the session's ``/sync`` long-poll answer, plus a forward
  ``/messages`` page when the gateway had to walk the room).

::

{_indent(table)}
"""


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def _synapse_version() -> str:
    try:
        import subprocess
        python = REPO / ".venv-synapse" / "bin" / "python"
        out = subprocess.run([str(python), "-c", "import synapse; print(synapse.__version__.split()[0])"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or "?"
    except Exception:
        return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true", help="do not write docs/wire-size.rst")
    args = parser.parse_args()
    run(write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
