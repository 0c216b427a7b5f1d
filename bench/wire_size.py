"""Bytes on air per device operation: compact profile vs clean and original CoMatrix vs MSC3079 vs HTTP,
each in plain CoAP, over DTLS 1.2 (PSK) and with OSCORE.

Starts a real Synapse (server name ``example.org``, so the sender is exactly
``@sensor01:example.org``), a TCP relay in front of it, the gateway pointed at
that relay (``security = "optional"``, a DTLS port, and one ``[[devices]]``
entry for sensor01 with a PSK identity, an OSCORE context and an EDHOC
credential), and UDP relays in front of the gateway's CoAP and DTLS ports.  Each operation is driven
through a UDP relay with the reference device client's CoAP side
(`comatrix.client.UdpCoap`, plain, with ``psk`` or with ``oscore``); the relay
records every datagram, both ways (requests, responses, empty ACKs,
notifications, DTLS handshake flights, EDHOC messages; the EDHOC initiator is
aiocoap's, lakers inside).  The TCP relay records the HTTP/1.1
bytes the gateway exchanged with Synapse meanwhile.  Prints the tables and
writes ``docs/wire-size.rst``::

    .venv/bin/python bench/wire_size.py            # writes docs/wire-size.rst
    .venv/bin/python bench/wire_size.py --no-write # print only

Figures, not assertions (the byte budgets are asserted in the test suite).
"""

from __future__ import annotations

import argparse
import asyncio
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
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from comatrix.client import CompactDevice, DeviceState, OriginalDevice, UdpCoap, oscore_sequence  # noqa: E402
from comatrix.coap import wire  # noqa: E402
from comatrix.coap.numbers import Code, OptionNumber  # noqa: E402
from comatrix.compact.codec import BUDGETS, SendRequest  # noqa: E402
from comatrix.edhoc import responder as edhoc  # noqa: E402
from comatrix.edhoc.ccs import Ccs, generate_key, make_ccs, private_bytes  # noqa: E402
from comatrix.oscore.client import OscoreClient  # noqa: E402
from comatrix.oscore.context import SecurityContext  # noqa: E402
from support import free_port  # noqa: E402
from support.gateway import GatewayProcess  # noqa: E402
from support.images import png  # noqa: E402
from support.synapse import SynapseServer  # noqa: E402

FRAME_PAYLOAD = 80  # bytes of CoAP per IEEE 802.15.4 frame (facts §1)
BODY20 = "temperature=21.5C ok"
OPERATIONS: tuple[str, ...] = ("login", "join", "send", "send NON+NR", "getmsg", "notification", "logout", "time",
                               "react", "react remove", "redact", "read",
                               "upload", "thumbnail", "profile")
OPERATIONS += ("send notice", "send location", "send reply", "send edit", "history")  # issue 13, messages
#: Issue 13's rooms and membership, in the order each form runs them (after its join).
ROOM_OPERATIONS = ("create", "room", "room set", "resolve", "invite", "invitations", "members", "kick", "leave")
OPERATIONS += ROOM_OPERATIONS
FORMS = ("compact", "clean", "original", "msc3079", "http")
SECURITIES = ("plain", "dtls", "oscore")
#: The bench device's provisioning (a [[devices]] entry with both kinds of key material).
PSK_IDENTITY = "sensor01"
OSCORE_SENDER_ID = b"\x01"  # the device's (the entry's recipient_id)
OSCORE_RECIPIENT_ID = b""  # the gateway's
EDHOC_KID = b"\x01"  # the kid of the device's CCS (ID_CRED_I by reference)
#: One reaction key per security mode (each 4 bytes of UTF-8): every run adds a reaction not there yet.
REACTION_KEYS = dict(zip(SECURITIES, ("👍", "👀", "👌")))
GEO = "geo:48.2082,16.3738"
#: Event content of the message operations beyond a text send, given the event replied to / edited.
MESSAGE_CONTENTS: dict[str, Callable[[str], dict[str, Any]]] = {
    "send notice": lambda event_id: {"msgtype": "m.notice"},
    "send location": lambda event_id: {"msgtype": "m.location", "geo_uri": GEO},
    "send reply": lambda event_id: {"m.relates_to": {"m.in_reply_to": {"event_id": event_id}}},
    "send edit": lambda event_id: {"body": "* " + BODY20, "m.new_content": {"msgtype": "m.text", "body": BODY20},
                                   "m.relates_to": {"rel_type": "m.replace", "event_id": event_id}},
}
#: Operation rows whose budget has another name in BUDGETS.
BUDGET_OF = {"send notice": "send-kind", "send location": "send-kind", "send reply": "send-reply",
             "send edit": "send-edit", "room set": "room", "resolve": "room", "invitations": "invite"}
#: The rooms operations' input, the same in every form: the room the device creates, its new topic.
ROOM_NAME, ROOM_TOPIC, NEW_TOPIC = "Lab", "sensors", "temperature log"
#: What the gateway asks Synapse for each compact rooms request (the "http" rows' notes).
ROOM_HTTP = {"create": "POST createRoom", "room": "5 state reads + /members (+ whoami)",
             "room set": "PUT m.room.topic", "resolve": "GET directory (then cached)", "invite": "POST invite",
             "invitations": "filtered /sync", "members": "GET joined_members", "kick": "POST kick",
             "leave": "POST leave"}
#: Rows with no request in a form, and why.
NOT_AVAILABLE = {("room", "msc3079"): "n/a: no summary; /B is the whole state",
                 ("room set", "msc3079"): "n/a: the state key '' has no path code form",
                 ("invitations", "msc3079"): "n/a: invitations come only with /sync"}
#: Goals of issue 11 for the compact send request (bytes up).
GOALS = {"oscore": 64, "dtls": 80}


class UdpRelay:
    """clients <-> relay <-> gateway, recording every datagram as ("up"|"down", bytes).

    Each client address gets its own socket towards the gateway, so the gateway
    sees distinct peers (DTLS sessions are per peer address).
    """

    def __init__(self, target: tuple[str, int], scheme: str = "coap") -> None:
        self.target = target
        self.scheme = scheme
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.backs: dict[Any, socket.socket] = {}
        self.log: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.running = True
        threading.Thread(target=self._run, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.front.getsockname()[1]}"

    def _back(self, client: Any) -> socket.socket:
        back = self.backs.get(client)
        if back is None:
            back = self.backs[client] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            back.connect(self.target)
        return back

    def _run(self) -> None:
        while self.running:
            clients = {back: client for client, back in self.backs.items()}
            ready, _, _ = select.select([self.front, *clients], [], [], 0.2)
            for sock in ready:
                try:
                    if sock is self.front:
                        data, client = self.front.recvfrom(4096)
                        with self.lock:
                            self.log.append(("up", data))
                        self._back(client).send(data)
                    else:
                        data = sock.recv(4096)
                        with self.lock:
                            self.log.append(("down", data))
                        self.front.sendto(data, clients[sock])
                except OSError:
                    continue

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
    """Results by (operation, form, security); each security has its relay."""

    def __init__(self, relays: dict[str, UdpRelay], tcp: TcpRelay) -> None:
        self.relays = relays
        self.tcp = tcp
        self.results: dict[tuple[str, str, str], Row] = {}
        #: Rows of whole exchanges that are not device operations (handshakes), by name.
        self.extra: dict[str, Row] = {}

    def measure(self, op: str, form: str, call: Callable[[], Any], *, security: str = "plain",
                settle: float = 0.3, http_form: str | None = None) -> Any:
        relay = self.relays[security]
        mark = relay.mark()
        http_before = self.tcp.counters()
        try:
            result = call()
            note = ""
        except Exception as exc:  # a form that cannot do an operation: reported in the table
            result, note = None, f"failed: {exc}"[:60]
        time.sleep(settle)  # late datagrams of the exchange (empty ACKs, a separate response)
        self.results[(op, form, security)] = coap_row(relay.since(mark), note)
        if http_form is not None:
            http_after = self.tcp.counters()
            self.results[(op, http_form, "plain")] = Row(up=http_after[0] - http_before[0],
                                                         down=http_after[1] - http_before[1])
        return result

    def measure_extra(self, name: str, security: str, call: Callable[[], Any], note: str = "",
                      keep: Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]] = list) -> Any:
        """One row for an exchange; ``keep`` picks the datagrams that belong to it from all recorded."""
        relay = self.relays[security]
        mark = relay.mark()
        result = call()
        time.sleep(0.3)
        datagrams = keep(relay.since(mark))
        sizes = " ".join(f"{'u' if way == 'up' else 'd'}{len(data)}" for way, data in datagrams)
        self.extra[name] = coap_row(datagrams, f"{note} [{sizes}]" if datagrams else note)
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


@dataclasses.dataclass
class Keys:
    """The bench device's key material (secrets: generated per run, never printed)."""

    psk: str = dataclasses.field(default_factory=lambda: secrets.token_urlsafe(16))
    master_secret: bytes = dataclasses.field(default_factory=lambda: secrets.token_bytes(16))
    master_salt: bytes = dataclasses.field(default_factory=lambda: secrets.token_bytes(8))
    #: The device's EDHOC key pair (P-256, as comatrixctl device add --edhoc makes); the entry
    #: holds only its credential.
    edhoc_key: ec.EllipticCurvePrivateKey = dataclasses.field(default_factory=generate_key)

    @property
    def edhoc_private(self) -> bytes:
        return private_bytes(self.edhoc_key)

    @property
    def edhoc_credential(self) -> Ccs:
        return make_ccs(self.edhoc_key.public_key(), EDHOC_KID, PSK_IDENTITY)

    def device_entry(self, user_id: str, password: str) -> str:
        return (f'[[devices]]\nuser = "{user_id}"\npassword = "{password}"\n'
                f'psk_identity = "{PSK_IDENTITY}"\npsk = "{self.psk}"\n'
                f'oscore = {{ recipient_id = "{OSCORE_SENDER_ID.hex()}", sender_id = "{OSCORE_RECIPIENT_ID.hex()}", '
                f'master_secret = "{self.master_secret.hex()}", master_salt = "{self.master_salt.hex()}" }}\n'
                f'edhoc = {{ credential = "{self.edhoc_credential.encoded.hex()}" }}\n')


def run(write: bool) -> str:
    with tempfile.TemporaryDirectory(prefix="comatrix-wire-") as tmp:
        synapse = SynapseServer(Path(tmp) / "synapse", server_name="example.org")
        synapse.start()
        tcp = TcpRelay(("127.0.0.1", synapse.port))
        password = secrets.token_urlsafe(15)
        sensor_id, sensor_http_token, _ = synapse.register("sensor01", password)
        keys = Keys()
        dtls_port = free_port("127.0.0.1", socket.SOCK_DGRAM)
        state_dir = Path(tmp) / "gateway" / "state"  # GatewayProcess's, under its workdir
        state_dir.mkdir(parents=True)
        gateway_key = edhoc.GatewayKey.load_or_create(state_dir)  # as comatrixctl device add --edhoc does
        gateway = GatewayProcess(tcp.url, Path(tmp) / "gateway", log_level="debug",
                                 config_text=f'security = "optional"\ndtls_port = {dtls_port}\n\n'
                                             "[limits]\ndevice_rate = 0\nglobal_rate = 0\n\n"
                                             + keys.device_entry(sensor_id, password))
        gateway.start()
        try:
            return drive(synapse, gateway, tcp, write, Device(password, sensor_id, sensor_http_token, keys,
                                                              dtls_port, gateway_key.credential))
        finally:
            gateway.stop()
            synapse.stop()


@dataclasses.dataclass
class Device:
    password: str
    user_id: str
    http_token: str
    keys: Keys
    dtls_port: int
    #: The gateway's EDHOC credential (CRED_R), as comatrixctl prints it for a device.
    gateway_edhoc: Ccs
    #: The user the rooms operations invite and kick; the aliases they resolve (the gateway caches
    #: a resolution, so the compact form has its own alias, of the same length, to show its HTTP).
    guest_id: str = ""
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)


class Connector:
    """New `UdpCoap` clients through the relays: plain, DTLS (a handshake each) or OSCORE."""

    def __init__(self, relays: dict[str, UdpRelay], keys: Keys) -> None:
        self.relays = relays
        self.keys = keys
        self.oscore_state = DeviceState(None)  # one sender sequence for every OSCORE client

    def __call__(self, security: str) -> UdpCoap:
        uri = self.relays[security].uri
        if security == "dtls":
            return UdpCoap(uri, psk=(PSK_IDENTITY, self.keys.psk.encode("utf-8")))
        if security == "oscore":
            context = SecurityContext(OSCORE_SENDER_ID, OSCORE_RECIPIENT_ID, self.keys.master_secret,
                                      self.keys.master_salt)
            return UdpCoap(uri, oscore=OscoreClient(context, oscore_sequence(self.oscore_state, "bench")))
        return UdpCoap(uri)


def drive(synapse: SynapseServer, gateway: GatewayProcess, tcp: TcpRelay, write: bool, sensor: Device) -> str:
    plain = UdpRelay(("127.0.0.1", gateway.port))
    relays = {"plain": plain, "oscore": plain, "dtls": UdpRelay(("127.0.0.1", sensor.dtls_port), "coaps")}
    bench = Bench(relays, tcp)
    connect = Connector(relays, sensor.keys)
    owner_id, owner_token, _ = synapse.register("owner" + secrets.token_hex(3), secrets.token_urlsafe(15))
    room_id = synapse.create_room(owner_token)
    synapse.invite(owner_token, room_id, sensor.user_id)
    rooms_setup(synapse, owner_token, room_id, sensor)

    # Exchanges that are not operations: what a secured device pays once.
    first_dtls = bench.measure_extra("DTLS-PSK handshake", "dtls", lambda: connect("dtls"),
                                     "TLS_PSK_WITH_AES_128_CCM_8, cookie exchange; u/d: datagram sizes up/down")
    first_dtls.close()
    time.sleep(0.3)
    first_oscore = connect("oscore")
    bench.measure_extra("OSCORE Echo round trip", "oscore", lambda: first_oscore.request(Code.GET, "z"),
                        "1st request after a gateway start: GET /z, 4.01 Echo, repeat, 2.05")
    first_oscore.close()
    measure_edhoc(bench, sensor)

    versions = UdpCoap(plain.uri).request(Code.GET, "0")
    for security in SECURITIES:
        original_form(bench, connect, security, sensor, room_id)
        clean_form(bench, connect, security, sensor, room_id)
        if versions.ok:
            msc3079_form(bench, connect, security, sensor, room_id)
        compact_form(bench, connect, security, sensor, room_id, gateway, synapse)
    msc_note = "not measured (full /sync pushes)" if versions.ok else "n/a: no MSC3079 endpoint"
    for relay in set(relays.values()):
        relay.running = False
    table = render(bench.results, msc_note) + "\n\n" + render_extra(bench.extra) + "\n\n" + goals(bench.results)
    print(table)
    if write:
        (REPO / "docs" / "wire-size.rst").write_text(document(table))
    return table


def rooms_setup(synapse: SynapseServer, owner_token: str, room_id: str, sensor: Device) -> None:
    """A guest to invite and kick, two aliases of the room, and an invitation of sensor01 left pending."""
    sensor.guest_id = synapse.register("guest" + secrets.token_hex(3), secrets.token_urlsafe(15))[0]
    for form in ("compact", "other"):
        sensor.aliases[form] = synapse.full_alias(f"bench-{form[0]}")
        synapse.set_alias(owner_token, sensor.aliases[form], room_id)
    synapse.invite(owner_token, synapse.create_room(owner_token, name="Lobby"), sensor.user_id)


def measure_edhoc(bench: Bench, sensor: Device) -> None:
    """The EDHOC (RFC 9528) exchange rows: aiocoap's initiator through the CoAP relay, both flows.

    Each flow is a fresh client, so a whole exchange (method 3, cipher suite 2,
    credentials named by kid) followed by ``GET /time`` over the new OSCORE
    context.  Combined (RFC 9668): message_1, message_2, message_3 riding on
    that first OSCORE request, its answer -- all counted.  Separate: message_1,
    message_2, message_3, message_4 are counted; the ``GET /time`` after them is not.
    """
    if not edhoc.available():
        for name in ("EDHOC combined", "EDHOC m3 + m4"):
            bench.extra[name] = Row(note="not measured: lakers-python is not installed")
        return
    uri = bench.relays["oscore"].uri
    bench.measure_extra("EDHOC combined", "oscore", lambda: edhoc_then_time(uri, sensor, combined=True),
                        "RFC 9668: m1, m2, m3 + OSCORE GET /time, its 2.05; u/d: datagram sizes up/down")
    bench.measure_extra("EDHOC m3 + m4", "oscore", lambda: edhoc_then_time(uri, sensor, combined=False),
                        "m1, m2, m3, m4 (the OSCORE GET /time after them not counted)", keep=edhoc_messages)


def edhoc_messages(datagrams: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The datagrams before the first request that is not to /.well-known/edhoc."""
    for index, (way, data) in enumerate(datagrams):
        if way == "up" and (OptionNumber.URI_PATH, b"edhoc") not in wire.decode(data).options:
            return datagrams[:index]
    return datagrams


def edhoc_then_time(uri: str, sensor: Device, *, combined: bool) -> None:
    """A fresh aiocoap client does one EDHOC exchange with the gateway, then GET /time over its context."""
    import aiocoap

    credentials = {f"{uri}/*": {"edhoc-oscore": {
        "suite": 2, "method": 3, "own_cred_style": "by-key-id",
        "own_cred": {14: cbor2.loads(sensor.keys.edhoc_credential.encoded)},
        "private_key": {1: 2, -1: 1, -4: sensor.keys.edhoc_private},
        "peer_cred": {14: cbor2.loads(sensor.gateway_edhoc.encoded)},
        "use_combined_edhoc": combined,
    }}}

    async def go() -> Any:
        context = await aiocoap.Context.create_client_context()
        context.client_credentials.load_from_dict(credentials)
        try:
            request = aiocoap.Message(code=aiocoap.GET, uri=f"{uri}/time")
            return await asyncio.wait_for(context.request(request).response, 30)
        finally:
            await context.shutdown()

    answer = asyncio.run(go())
    if not answer.code.is_successful():
        raise SystemExit(f"GET /time after EDHOC: {answer.code}")


def original_form(bench: Bench, connect: Connector, security: str, sensor: Device, room_id: str) -> None:
    """The original CoMatrix form (its plain HTTP bytes are the "http" column: one homeserver call each)."""
    http = "http" if security == "plain" else None
    original = OriginalDevice(connect(security), DeviceState(None))
    bench.measure("time", "original", original.time, security=security)
    bench.measure("login", "original", lambda: original.login("sensor01", sensor.password),
                  security=security, http_form=http)
    bench.measure("join", "original", lambda: original.join(room_id), security=security, http_form=http)
    event_id = bench.measure("send", "original", lambda: original.send(room_id, BODY20), security=security,
                             http_form=http)
    for op, content in MESSAGE_CONTENTS.items():
        if op == "send location":
            continue  # n/a: the original form's /send takes m.text, m.notice and m.emote only
        bench.measure(op, "original", lambda: original.send(room_id, BODY20, content(str(event_id))),
                      security=security, http_form=http)
    bench.measure("getmsg", "original", lambda: original.getmsg(room_id), security=security, http_form=http)
    bench.measure("history", "original", lambda: original.getmsg(room_id), security=security, http_form=http)
    bench.results[("history", "original", security)].note = "a page of 1 = getmsg (/messages limit 1)"
    bench.measure("logout", "original", original.logout, security=security, http_form=http)
    original.coap.close()


def clean_form(bench: Bench, connect: Connector, security: str, sensor: Device, room_id: str) -> None:
    """The clean form: no Proxy-Uri, CBOR maps with Matrix's names, the token in option 256 (README
    "Resources"; issue 13's operations are ``comatrix/plugins/operations.py``)."""
    coap = connect(security)
    state: dict[str, Any] = {}

    def call(code: int, path: str, body: Any = None, query: tuple[str, ...] = ()) -> Any:
        options = [(OptionNumber.URI_QUERY, item.encode("utf-8")) for item in query]
        if "token" in state:
            options.append((256, state["token"].encode("ascii")))
        reply = coap.request(code, path, payload=b"" if body is None else cbor2.dumps(body),
                             content_format=None if body is None else 60, options=options).checked()
        return cbor2.loads(reply.payload) if reply.payload else None

    def login() -> None:
        state["token"] = call(Code.POST, "login", {"user": "sensor01", "password": sensor.password})["access_token"]

    def send() -> None:
        state["event"] = call(Code.POST, "send", {"room_id": room_id, "txn_id": "c" + secrets.token_hex(4),
                                                  "body": BODY20})["event_id"]

    def create() -> None:
        state["room"] = call(Code.POST, "create", {"name": ROOM_NAME, "topic": ROOM_TOPIC})["room_id"]

    def in_room(**fields: Any) -> dict[str, Any]:
        return {"room_id": state.get("room"), **fields}

    key = REACTION_KEYS[security]
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("login", login), ("join", lambda: call(Code.POST, "join", {"room_id": room_id})),
        ("create", create), ("room", lambda: call(Code.GET, "room", query=(f"room={state.get('room')}",))),
        ("room set", lambda: call(Code.POST, "room", in_room(topic=NEW_TOPIC))),
        ("resolve", lambda: call(Code.GET, "room", query=(f"alias={sensor.aliases['other']}",))),
        ("invite", lambda: call(Code.POST, "invite", in_room(user_id=sensor.guest_id))),
        ("invitations", lambda: call(Code.GET, "invitations")),
        ("members", lambda: call(Code.GET, "members", query=(f"room={state.get('room')}",))),
        ("kick", lambda: call(Code.POST, "kick", in_room(user_id=sensor.guest_id, reason="sensor fault"))),
        ("leave", lambda: call(Code.POST, "leave", in_room())),
        ("send", send),
        ("send notice", lambda: call(Code.POST, "send", {"room_id": room_id, "txn_id": "c" + secrets.token_hex(4),
                                                         "body": BODY20, "msgtype": "m.notice"})),
        ("getmsg", lambda: call(Code.GET, "getmsg", query=(f"room={room_id}",))),
        ("history", lambda: call(Code.GET, "history", query=(f"room={room_id}", "limit=1"))),
        ("react", lambda: call(Code.POST, "react", {"room_id": room_id, "event_id": state.get("event"), "key": key})),
        ("react remove", lambda: call(Code.POST, "react", {"room_id": room_id, "event_id": state.get("event"),
                                                           "key": key, "remove": True})),
        ("read", lambda: call(Code.POST, "read", {"room_id": room_id, "event_id": state.get("event")})),
        ("redact", lambda: call(Code.POST, "redact", {"room_id": room_id, "event_id": state.get("event"),
                                                      "reason": "sensor fault"})),
        ("profile", lambda: call(Code.POST, "profile", {"displayname": "Sensor 01"})),
        ("logout", lambda: call(Code.POST, "logout"))]
    for op, step in steps:
        bench.measure(op, "clean", step, security=security)
    coap.close()


def msc3079_form(bench: Bench, connect: Connector, security: str, sensor: Device, room_id: str) -> None:
    coap = connect(security)
    state: dict[str, Any] = {}
    login_body = {2: "m.login.password", 65: {2: "m.id.user", 66: "sensor01"}, 69: sensor.password}

    def msc_login() -> None:
        state["token"] = msc3079_request(coap, Code.POST, "1", body=login_body)[73]

    bench.measure("login", "msc3079", msc_login, security=security)
    bench.measure("join", "msc3079", lambda: msc3079_request(coap, Code.POST, f"K/{room_id}",
                                                             state.get("token"), {}), security=security)
    msc3079_rooms(bench, coap, security, sensor, state.get("token"))
    txn = "m" + secrets.token_hex(4)

    def msc_send() -> None:
        sent = msc3079_request(coap, Code.PUT, f"9/{room_id}/m.room.message/{txn}", state.get("token"),
                               {28: "m.text", 27: BODY20})
        state["event"] = sent.get(1, sent.get("event_id"))
    bench.measure("send", "msc3079", msc_send, security=security)
    msc3079_relations(bench, coap, security, room_id, state)
    sent = msc3079_request(coap, Code.PUT, f"9/{room_id}/m.room.message/{txn}x", state.get("token"),
                           {28: "m.text", 27: BODY20})
    for op, content in MESSAGE_CONTENTS.items():
        fields = {28: "m.text", 27: BODY20, **_msc3079_keys(content(str((sent or {}).get(1))))}
        bench.measure(op, "msc3079", lambda: msc3079_request(
            coap, Code.PUT, f"9/{room_id}/m.room.message/{secrets.token_hex(4)}", state.get("token"), fields),
            security=security)
    bench.measure("history", "msc3079", lambda: msc3079_request(
        coap, Code.GET, f"E/{room_id}", state.get("token"),
        query=("dir=b", "limit=1", 'filter={"types":["m.room.message"]}')), security=security)
    bench.measure("getmsg", "msc3079", lambda: msc3079_request(
        coap, Code.GET, f"E/{room_id}", state.get("token"),
        query=("dir=b", "limit=1", 'filter={"types":["m.room.message"]}')), security=security)
    bench.measure("logout", "msc3079", lambda: msc3079_request(coap, Code.POST, "3", state.get("token"), {}),
                  security=security)
    coap.close()


def msc3079_rooms(bench: Bench, coap: UdpCoap, security: str, sensor: Device, token: str | None) -> None:
    """Rooms and membership with path codes ``G``, ``H``, ``J``, ``D``, ``O``, ``M`` (key table 1:
    name 56, topic 57, preset 63, user_id 7, reason 53)."""
    room: dict[Any, Any] = {}

    def create() -> None:
        room.update(msc3079_request(coap, Code.POST, "G", token, {56: ROOM_NAME, 57: ROOM_TOPIC, 63: "private_chat"}))

    def call(code: int, path: str, body: Any = None) -> Any:
        return msc3079_request(coap, code, f"{path[0]}/{room.get(5, room.get('room_id'))}{path[1:]}", token, body)

    bench.measure("create", "msc3079", create, security=security)
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("resolve", lambda: msc3079_request(coap, Code.GET, f"H/{sensor.aliases['other']}", token)),
        ("invite", lambda: call(Code.POST, "J", {7: sensor.guest_id})),
        ("members", lambda: call(Code.GET, "D")),
        ("kick", lambda: call(Code.POST, "O", {7: sensor.guest_id, 53: "sensor fault"})),
        ("leave", lambda: call(Code.POST, "M", {}))]
    for op, step in steps:
        bench.measure(op, "msc3079", step, security=security)


def _msc3079_keys(content: dict[str, Any]) -> dict[Any, Any]:
    """Event content with the keys key table 1 has as integers (body 27, msgtype 28, event_id 1)."""
    table = {"body": 27, "msgtype": 28, "event_id": 1}
    return {table.get(key, key): _msc3079_keys(value) if isinstance(value, dict) else value
            for key, value in content.items()}


def msc3079_relations(bench: Bench, coap: UdpCoap, security: str, room_id: str, state: dict[str, Any]) -> None:
    """React, take back, read and redact with MSC3079 path codes ``9``, ``F``, ``Z``: the event id travels."""
    event, token, key = state.get("event"), state.get("token"), REACTION_KEYS[security]
    relates = {"m.relates_to": {"rel_type": "m.annotation", 1: event, "key": key}}
    reaction: dict[str, Any] = {}

    def react() -> None:
        reaction.update(msc3079_request(coap, Code.PUT, f"9/{room_id}/m.reaction/r{secrets.token_hex(4)}",
                                        token, relates))
    bench.measure("react", "msc3079", react, security=security)
    bench.measure("react remove", "msc3079", lambda: msc3079_request(
        coap, Code.PUT, f"F/{room_id}/{reaction.get(1)}/x{secrets.token_hex(4)}", token, {}), security=security)
    bench.results[("react remove", "msc3079", security)].note = "redacts the reaction (its id known from react)"
    bench.measure("read", "msc3079", lambda: msc3079_request(coap, Code.POST, f"Z/{room_id}/m.read/{event}",
                                                             token, {}), security=security)
    bench.measure("redact", "msc3079", lambda: msc3079_request(
        coap, Code.PUT, f"F/{room_id}/{event}/d{secrets.token_hex(4)}", token, {53: "sensor fault"}),
        security=security)


def compact_relations(bench: Bench, device: CompactDevice, security: str, room_id: str, ref: int) -> None:
    """React, take back, read and redact by event reference (the sensor's own message ``ref``)."""
    http = "http" if security == "plain" else None
    key = REACTION_KEYS[security]
    bench.measure("react", "compact", lambda: device.react(room_id, ref, key), security=security, http_form=http)
    bench.measure("react remove", "compact", lambda: device.react(room_id, ref, key, remove=True),
                  security=security, http_form=http)
    bench.measure("read", "compact", lambda: device.read(room_id, ref), security=security, http_form=http)
    bench.measure("redact", "compact", lambda: device.redact(room_id, ref, "sensor fault"), security=security,
                  http_form=http)
    if http is not None:
        for op, calls in (("react", "/relations + PUT send"), ("react remove", "/relations + PUT redact"),
                          ("read", "POST receipt"), ("redact", "PUT redact")):
            bench.results[(op, "http", "plain")].note = f"the gateway's {calls} for the compact request"


def compact_rooms(bench: Bench, device: CompactDevice, security: str, sensor: Device) -> None:
    """Create a room, read and change it, resolve an alias, invite, list invitations, members, kick, leave."""
    http = "http" if security == "plain" else None
    steps: dict[str, Callable[[], Any]] = {
        "create": lambda: device.create(ROOM_NAME, ROOM_TOPIC), "room": lambda: device.room_info(ROOM_NAME),
        "room set": lambda: device.set_room(ROOM_NAME, topic=NEW_TOPIC),
        "resolve": lambda: device.resolve(sensor.aliases["compact"]),
        "invite": lambda: device.invite(ROOM_NAME, sensor.guest_id), "invitations": device.invitations,
        "members": lambda: device.members(ROOM_NAME),
        "kick": lambda: device.kick(ROOM_NAME, sensor.guest_id, "sensor fault"),
        "leave": lambda: device.leave(ROOM_NAME)}
    for op in ROOM_OPERATIONS:
        bench.measure(op, "compact", steps[op], security=security, http_form=http)
        if http is not None:
            bench.results[(op, "http", "plain")].note = f"the gateway's {ROOM_HTTP[op]} for the compact request"


def compact_form(bench: Bench, connect: Connector, security: str, sensor: Device, room_id: str,
                 gateway: GatewayProcess, synapse: SynapseServer) -> None:
    device = CompactDevice(connect(security), DeviceState(None))
    bench.measure("time", "compact", device.time, security=security)
    bench.measure("login", "compact", lambda: device.login("sensor01", sensor.password), security=security)
    bench.results[("login", "compact", security)].note = "login + GET /z (seeds seq)"
    bench.measure("join", "compact", lambda: device.join(room_id), security=security)
    compact_rooms(bench, device, security, sensor)
    reference = bench.measure("send", "compact", lambda: device.send(room_id, BODY20), security=security)
    bench.measure("send notice", "compact", lambda: device.send(room_id, BODY20, 1), security=security)
    bench.measure("send location", "compact", lambda: device.send(room_id, BODY20, GEO), security=security)
    bench.measure("send reply", "compact", lambda: device.send(room_id, BODY20, reply_to=reference),
                  security=security)
    bench.measure("send edit", "compact", lambda: device.send(room_id, BODY20, replaces=reference),
                  security=security)
    bench.measure("history", "compact", lambda: device.history(room_id), security=security)
    bench.results[("history", "compact", security)].note = "a page of 1 from now (FETCH /()"

    def quiet_send() -> None:
        """Fire-and-forget: NON with No-Response 0x02 (RFC 7967); nothing comes back on success."""
        seq = int(device.compact.get("seq", 0)) + 1000
        payload = SendRequest(device.handle, device.compact["rooms"][room_id], seq, BODY20).encode()
        device.coap.send_non(Code.POST, "w", payload=payload, content_format=60,
                             options=[(OptionNumber.NO_RESPONSE, b"\x02")])

    bench.measure("send NON+NR", "compact", quiet_send, security=security, settle=1.0)
    bench.results[("send NON+NR", "compact", security)].note = "NON, No-Response 0x02: no answer on success"
    latest = bench.measure("getmsg", "compact", lambda: device.getmsg(room_id), security=security)
    if latest is not None:
        compact_relations(bench, device, security, room_id, latest.cursor)
    notification(bench, connect, security, device, sensor, room_id, gateway, synapse)
    media(bench, device, room_id, security)
    bench.measure("logout", "compact", device.logout, security=security)
    device.coap.close()


def media(bench: Bench, device: CompactDevice, room_id: str, security: str) -> None:
    """A 1 KB PNG uploaded in 64-byte blocks (as over a radio), a 32x32 thumbnail of it fetched in
    64-byte blocks, a display name set; HTTP: what the gateway exchanged with Synapse for each."""
    image = png(18, 18, seed=1)
    key = device.next_key()
    http = "http" if security == "plain" else None
    calls: list[tuple[str, Callable[[], Any], str, str]] = [
        ("upload", lambda: device.upload(room_id, image, "image/png", None, key, szx=2),
         f"{len(image)}-byte PNG, 64-byte blocks", "media upload + m.image send"),
        ("thumbnail", lambda: device.thumbnail(key, 32, 32, crop=True, szx=2), "32x32 crop, 64-byte blocks",
         "authenticated thumbnail"),
        ("profile", lambda: device.set_profile("Sensor 01"), "set the display name", "PUT displayname")]
    for op, call, note, http_note in calls:
        bench.measure(op, "compact", call, security=security, http_form=http)
        row = bench.results[(op, "compact", security)]
        if not row.note:  # a failure keeps its note
            row.note = note
        if http is not None:
            bench.results[(op, "http", "plain")].note = http_note


def notification(bench: Bench, connect: Connector, security: str, device: CompactDevice, sensor: Device,
                 room_id: str, gateway: GatewayProcess, synapse: SynapseServer) -> None:
    """One Observe notification: the device watches, sensor01 posts the 20-char body over HTTP."""
    watcher = CompactDevice(connect(security), DeviceState(None, {"compact": dict(device.compact)}))
    got: list[Any] = []
    loops_before = gateway.log_text().count("sync loop started")
    thread = threading.Thread(target=lambda: got.extend(watcher.watch(room_id, count=1, timeout=20)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while gateway.log_text().count("sync loop started") == loops_before:  # logged when the observation is made
        if time.monotonic() > deadline:
            raise SystemExit("the observation was not made")
        time.sleep(0.05)
    time.sleep(0.3)  # the registration's answer has gone by
    relay = bench.relays[security]
    mark = relay.mark()
    http_before = bench.tcp.counters()
    sent_at = time.monotonic()
    synapse.send_text(sensor.http_token, room_id, BODY20)
    thread.join(20)
    latency = time.monotonic() - sent_at
    time.sleep(0.3)
    note = f"arrived {latency * 1000:.0f} ms after the HTTP send" if got else "no notification"
    bench.results[("notification", "compact", security)] = coap_row(relay.since(mark), note)
    if security == "plain":
        http_after = bench.tcp.counters()
        bench.results[("notification", "http", "plain")] = Row(
            up=http_after[0] - http_before[0], down=http_after[1] - http_before[1],
            note="the gateway's /sync (+ /messages if walked)")
    watcher.coap.close()
    time.sleep(0.3)  # its DTLS close_notify (both ways) must not count in the next operation


def _cells(rows: list[Row | None], value: Callable[[Row], str]) -> str:
    return "/".join("-" if row is None or row.note.startswith("failed") else value(row) for row in rows)


def render(results: dict[tuple[str, str, str], Row], msc_note: str) -> str:
    header = ("operation", "form", "plain up/down", "DTLS up/down", "OSCORE up/down", "datagrams p/D/O",
              "largest up p/D/O", "frames p/D/O", "note")
    lines: list[tuple[str, ...]] = []
    for op in OPERATIONS:
        for form in FORMS:
            rows = [results.get((op, form, security)) for security in SECURITIES]
            plain = rows[0]
            if all(row is None for row in rows):
                note = msc_note if form == "msc3079" and op == "notification" else NOT_AVAILABLE.get((op, form), "n/a")
                lines.append((op, form, "-", "-", "-", "-", "-", "-", note))
                continue
            if form == "http":
                assert plain is not None
                lines.append((op, form, f"{plain.up}/{plain.down}", "-", "-", "-", "-", "-",
                              plain.note or "HTTP/1.1 to Synapse"))
                continue
            budget = ""
            if form == "compact" and BUDGET_OF.get(op, op) in BUDGETS:
                request_budget, response_budget = BUDGETS[BUDGET_OF.get(op, op)]
                budget = f"budget {request_budget or '-'}/{response_budget}"
            notes = [budget, plain_note(plain)] + [
                f"{security}: {row.note}" for security, row in zip(SECURITIES[1:], rows[1:])
                if row is not None and row.note and row.note != plain_note(plain)]
            lines.append((op, form, *(_cells([row], lambda r: f"{r.up}/{r.down}") for row in rows),
                          _cells(rows, lambda r: str(r.datagrams)), _cells(rows, lambda r: str(r.largest_up)),
                          _cells(rows, lambda r: str(r.frames)), "; ".join(part for part in notes if part)))
    return _table(header, lines)


def plain_note(row: Row | None) -> str:
    return row.note if row is not None else ""


def render_extra(extra: dict[str, Row]) -> str:
    header = ("exchange", "bytes up", "bytes down", "datagrams", "largest up/down", "frames", "note")
    lines: list[tuple[str, ...]] = []
    for name, row in extra.items():
        if not row.datagrams:
            lines.append((name, "-", "-", "-", "-", "-", row.note))
            continue
        lines.append((name, str(row.up), str(row.down), str(row.datagrams), f"{row.largest_up}/{row.largest_down}",
                      str(row.frames), row.note))
    return _table(header, lines)


def goals(results: dict[tuple[str, str, str], Row]) -> str:
    """Issue 11's goals for the compact send request, measured."""
    parts = []
    for security, goal in GOALS.items():
        row = results.get(("send", "compact", security))
        size = row.largest_up if row is not None else None
        verdict = "-" if size is None else ("met" if size <= goal else "NOT met")
        parts.append(f"compact send with {security.upper()}: {size} bytes up (goal <= {goal}: {verdict})")
    return "Goals: " + "; ".join(parts) + "."


def _table(header: tuple[str, ...], lines: list[tuple[str, ...]]) -> str:
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

* **plain / DTLS / OSCORE up/down**: sum of the UDP payloads device → gateway
  and gateway → device, including empty ACKs and separate responses, for the
  same operation in plain CoAP, in CoAP over DTLS 1.2 (``coaps://``, PSK,
  TLS_PSK_WITH_AES_128_CCM_8: each CoAP message is one record, 13 bytes of
  header + 8 of explicit nonce + 8 of tag = 29 bytes more per datagram), and
  with OSCORE (RFC 8613, AES-CCM-16-64-128: the OSCORE option with the
  Partial IV and kid, the 8-byte tag, the inner code; Uri-Path and every other
  option move inside the ciphertext).  Each security mode logs in on its own
  (sessions and tokens bind to the security identity).  **datagrams p/D/O**:
  how many, plain/DTLS/OSCORE; **largest up**: the largest single datagram
  device → gateway (an operation with 4 datagrams where the others have 2 was
  answered separately: Synapse took longer than the gateway's 0.1 s
  piggy-back wait, so an empty ACK, the answer as CON and its ACK went by;
  figures from one run on a shared machine); **frames**: IEEE 802.15.4 frames needed at
  {FRAME_PAYLOAD} bytes of UDP payload per frame (``ceil(size/{FRAME_PAYLOAD})`` per
  datagram; 127-byte frames less MAC, 6LoWPAN IPHC and UDP headers; a larger
  datagram goes as that many 6LoWPAN fragments, RFC 4944, whose fragment
  headers the estimate leaves out).  ``-``: not measured or failed (see the note).
* **Exchanges** (second table): what a secured device pays once, counted the
  same way.  The DTLS-PSK handshake runs once per session (``comatrix-device``
  does one per run; firmware keeps the session): ClientHello, the stateless
  HelloVerifyRequest cookie round, the PSK key exchange and both Finished
  messages.  OSCORE needs no handshake; after a gateway start the first request
  of each device is answered with a 4.01 Echo challenge (RFC 8613 B.1.2) and
  repeated.  EDHOC (RFC 9528) establishes an OSCORE context without a
  pre-shared master secret: aiocoap's initiator (lakers inside) and the
  gateway's responder, method 3 (static DH keys both sides), cipher suite 2
  (P-256, AES-CCM-16-64-128), P-256 credentials (CCS) named by kid, 1-byte
  connection identifiers.  Two flows, each a whole exchange of a fresh
  client: **combined** (RFC 9668, aiocoap's default) counts message_1,
  message_2, message_3 riding in front of the first OSCORE request (here
  ``GET /time``) and that request's answer; **m3 + m4** counts message_1,
  message_2, message_3 and message_4 (key confirmation), not the OSCORE
  request that follows.
* **compact**: the compact profile (``docs/protocol.rst``), with its budgets
  (request/response bytes per message).  **clean**: the clean form (no
  Proxy-Uri; CBOR maps with Matrix key names and the room id or event id whole,
  ``?room=`` for GET, token in option 256; ``README.rst`` "Resources"; upload
  not measured).  **original**: the original CoMatrix
  form (Proxy-Uri with the homeserver URL ``http://[fd00::1]:8008`` and a path
  code, token in option 256, CBOR maps with Matrix key names).  **msc3079**:
  MSC3079 path codes with option 256 (raw token, sent on every request) and
  option 257, integer keys; ``getmsg`` is ``/E/<room>?dir=b&limit=1&filter=...``;
  ``react`` is an ``m.reaction`` sent with ``/9``, ``react remove`` and ``redact``
  are ``/F`` (the event id in the path), ``read`` is ``/Z/<room>/m.read/<event id>``.
  **http**: HTTP/1.1 bytes the gateway exchanged with Synapse for the original
  form's operation (one call each); for ``react``, ``react remove``, ``redact``,
  ``read`` and the rooms and membership operations (no original form), what the
  gateway exchanged for the compact request (a reaction first looks at the
  event's ``/relations``); for ``notification``, during the compact
  notification (the session's ``/sync`` long-poll answer, plus a forward
  ``/messages`` page when the gateway had to walk the room).  The original
  form keeps its Proxy-Uri inside the OSCORE ciphertext (the gateway is the
  origin server, not a proxy).
* **Messages** (issue 13): ``send notice`` (m.notice), ``send location``
  (m.location, ``geo:48.2082,16.3738``), ``send reply`` (``m.in_reply_to``) and
  ``send edit`` (``m.replace``) carry the 20-character body like ``send``; the
  compact form refers to the event replied to or edited by its event reference
  (a uint), the others by its event id (in the MSC3079 rows with the key table's
  integer keys where it has them: body, msgtype, event_id).  ``history``: a page
  of one message from now (compact ``FETCH /(``); the original and MSC3079
  forms have no history operation of their own, so their row is the same
  ``/messages`` call as ``getmsg``; the clean form's is ``GET
  /history?room=&limit=1``.  The original form's ``/send`` takes no
  ``m.location`` (n/a), nor does the clean form's, which has no replies or
  edits either (n/a).
* **Rooms and membership** (issue 13), each form in its own session after its
  ``join``: ``create`` a private room named ``Lab`` with topic ``sensors``
  (MSC3079: ``/G``), ``room`` reads it (compact: name, topic, joined count,
  membership, in 32-byte blocks; clean: ``GET /room?room=``; MSC3079: n/a,
  it has no such summary, a path code cannot carry the empty state key of
  ``m.room.name`` or ``m.room.topic`` for ``/8``, and ``/B``, the whole
  state, is a different and far larger answer),
  ``room set`` changes its topic (MSC3079: n/a, the empty state key again),
  ``resolve`` looks up an alias (``#bench-c:example.org`` for the compact
  form, ``#bench-o:example.org`` for the others: the gateway caches a
  resolution, so the compact form's own alias lets its HTTP row show the
  directory call; MSC3079: ``/H``), ``invite`` invites a second user (``/J``), ``invitations`` lists the device's pending invitations (one, to
  another room; MSC3079: n/a, invitations come only with ``/sync``),
  ``members`` lists the joined members (MSC3079: ``/D``, ``joined_members``),
  ``kick`` (reason ``sensor fault``) takes the invitation back (``/O``) and
  ``leave`` leaves the room (``/M``).  Declining an invitation is the same
  request as ``leave``, with the invited room's handle (compact) or room id.

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
