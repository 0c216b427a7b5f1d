"""Reliability against a real Synapse: exactly-once under loss, outages, restarts, overload, bad input.

* 200 numbered sends through a lossy, reordering UDP relay (30% loss each way,
  seeded) with retransmissions and retries (new Message ID, same txn_id): the
  room holds exactly those 200 bodies, once each, in order.  The same for 100
  compact ``/w`` sends of the reference device client (same seq on a retry).
* Synapse stopped mid-run: 5.02 fast, local resources keep answering, the next
  send after Synapse is back succeeds without restarting the gateway, and a
  send retried across the outage is not duplicated.
* A hanging upstream: 5.04 at the configured deadline for every waiting device,
  the concurrency cap queues and then sheds (5.03) beyond its bound; /time, /z
  and /.well-known/core answer meanwhile.  A homeserver that takes no TCP
  connection: 5.02 when the connect timeout expires, long before the deadline.
* A chatty device is held to its rate (4.29 with Max-Age) while a device at
  another address is served.
* The gateway restarted between a login and a send: the old token works, and a
  send retried across the restart is not duplicated.
* Bad input through the real gateway: 4.xx, and a counting TCP relay in front of
  Synapse shows that not one connection was made for it.

The CoAP client here is a small raw-socket one (on the project's wire codec), so
retransmission timing and Message IDs are under the test's control.
"""

from __future__ import annotations

import json
import random
import secrets
import selectors
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import cbor2
import pytest

from comatrix.client import CompactDevice, DeviceState, UdpCoap
from comatrix.coap import wire
from comatrix.coap.numbers import MessageType
from comatrix.compact.codec import PATHS
from support.relays import CountingTcpRelay, RelayThread
from support.secrets import remember
from support.synapse import SynapseServer

pytestmark = pytest.mark.integration

CBOR = 60
TOKEN = 256
CONTENT_FORMAT = 12
MAX_AGE = 14
URI_PATH = 11
URI_QUERY = 15
CON, NON, ACK, RST = 0, 1, 2, 3
CODE_NAMES = {0x01: "GET", 0x02: "POST", 0x03: "PUT"}


# --------------------------------------------------------------------------- a raw CoAP client


@dataclass
class Reply:
    code: str
    payload: bytes
    options: list[tuple[int, bytes]] = field(default_factory=list)

    def option(self, number: int) -> bytes | None:
        return next((value for num, value in self.options if num == number), None)

    @property
    def max_age(self) -> int | None:
        raw = self.option(MAX_AGE)
        return None if raw is None else int.from_bytes(raw, "big")

    def cbor(self) -> Any:
        return cbor2.loads(self.payload)


class NoAnswer(Exception):
    pass


class RawCoapClient:
    """CON requests with retransmission (same MID); separate responses are acknowledged."""

    def __init__(self, host: str, port: int, *, ack_timeout: float = 0.1, max_transmissions: int = 8,
                 source: str = "127.0.0.1") -> None:
        self.server = (host, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((source, 0))
        self.ack_timeout = ack_timeout
        self.max_transmissions = max_transmissions
        self._mid = random.Random(port).randrange(0x10000)
        self.transmissions = 0

    def close(self) -> None:
        self.sock.close()

    def next_mid(self) -> int:
        self._mid = (self._mid + 1) & 0xFFFF
        return self._mid

    def request(self, method: str, path: str, payload: bytes = b"", *,
                options: Sequence[tuple[int, bytes]] = (),
                content_format: int | None = None, wait: float = 30.0) -> Reply:
        """One exchange: a fresh MID and token, retransmitted until answered; ``wait`` bounds
        the wait for a separate response after an empty ACK."""
        code = {"GET": 1, "POST": 2, "PUT": 3, "DELETE": 4}[method]
        path, _, query = path.partition("?")
        all_options = [(URI_PATH, segment.encode()) for segment in path.split("/") if segment]
        all_options += [(URI_QUERY, item.encode()) for item in query.split("&") if item]
        all_options += list(options)
        if content_format is not None:
            all_options.append((CONTENT_FORMAT, bytes([content_format]) if content_format else b""))
        mid, token = self.next_mid(), secrets.token_bytes(4)
        datagram = wire.encode(CON, code, mid, token, all_options, payload)
        acked = False
        sent = 0
        deadline = time.monotonic() + wait
        next_send = time.monotonic()
        while True:
            now = time.monotonic()
            if not acked and now >= next_send:
                if sent >= self.max_transmissions:
                    raise NoAnswer(f"{method} /{path}: no answer after {sent} transmissions")
                self.sock.sendto(datagram, self.server)
                sent += 1
                self.transmissions += 1
                next_send = now + self.ack_timeout
            if acked and now >= deadline:
                raise NoAnswer(f"{method} /{path}: no separate response within {wait} s")
            self.sock.settimeout(max(0.001, (next_send if not acked else deadline) - now))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            mtype, rcode, rmid, rtoken, roptions, rpayload = wire.decode(data)
            if mtype == CON:  # a separate response (maybe a retransmission of one): acknowledge it
                self.sock.sendto(wire.empty(MessageType.ACK, rmid), self.server)
            if mtype == ACK and rmid == mid and rcode == 0:
                acked = True
                continue
            if rtoken == token and rcode != 0 and mtype in (ACK, CON, NON):
                return Reply(f"{rcode >> 5}.{rcode & 0x1F:02d}", rpayload, roptions)


# --------------------------------------------------------------------------- relays


class LossyRelay(RelayThread):
    """A UDP proxy between one client and the gateway that drops and reorders datagrams.

    Each direction drops ``loss`` of the datagrams (seeded RNG) and holds back
    ``reorder`` of the survivors until the next datagram in that direction has
    passed (or 50 ms have gone by).
    """

    HOLD = 0.05
    name = "lossy-relay"

    def __init__(self, target: tuple[str, int], *, loss: float, reorder: float, seed: int) -> None:
        self.target = target
        self.loss, self.reorder = loss, reorder
        self.random = random.Random(seed)
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.back.bind(("127.0.0.1", 0))
        self.port = self.front.getsockname()[1]
        self.client: tuple[str, int] | None = None
        #: Per direction ("up": to the gateway, "down": to the client): what happened to datagrams.
        self.stats = {way: {"forwarded": 0, "dropped": 0, "reordered": 0} for way in ("up", "down")}
        #: Message IDs of the CON POST requests the client sent (before any loss).
        self.posted_mids: set[bytes] = set()
        self._held: dict[str, tuple[bytes, float] | None] = {"up": None, "down": None}
        super().__init__(self.front, self.back)

    def _emit(self, direction: str, data: bytes) -> None:
        if direction == "up":
            self.back.sendto(data, self.target)
        elif self.client is not None:
            self.front.sendto(data, self.client)
        self.stats[direction]["forwarded"] += 1

    def _pass(self, direction: str, data: bytes) -> None:
        if self.random.random() < self.loss:
            self.stats[direction]["dropped"] += 1
            return
        held = self._held[direction]
        if held is None and self.random.random() < self.reorder:
            self._held[direction] = (data, time.monotonic())
            self.stats[direction]["reordered"] += 1
            return
        self._emit(direction, data)
        if held is not None:
            self._held[direction] = None
            self._emit(direction, held[0])  # the held one now arrives after a later one

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.front, selectors.EVENT_READ, "up")
        selector.register(self.back, selectors.EVENT_READ, "down")
        while not self._stop.is_set():
            for key, _ in selector.select(timeout=0.01):
                data, addr = key.fileobj.recvfrom(65536)  # type: ignore[union-attr]
                if key.data == "up":
                    self.client = addr
                    if len(data) >= 4 and data[0] >> 4 == 0x4 and data[1] == 0x02:  # v1 CON, POST
                        self.posted_mids.add(data[2:4])
                self._pass(key.data, data)
            now = time.monotonic()
            for direction, held in self._held.items():
                if held is not None and now - held[1] > self.HOLD:
                    self._held[direction] = None
                    self._emit(direction, held[0])
        selector.close()


# --------------------------------------------------------------------------- helpers


def send_body(room_id: str, text: str, txn_id: str | None = None) -> bytes:
    body: dict[str, Any] = {"room_id": room_id, "body": text}
    if txn_id is not None:
        body["txn_id"] = txn_id
    return cbor2.dumps(body)


def all_text_bodies(synapse: SynapseServer, token: str, room_id: str) -> list[str]:
    """Every m.room.message body of the room, oldest first (paginating /messages forwards)."""
    bodies: list[str] = []
    path = f"/_matrix/client/v3/rooms/{urllib.parse.quote(room_id)}/messages"
    query = {"dir": "f", "limit": "100", "filter": json.dumps({"types": ["m.room.message"]})}
    for _ in range(100):
        page = synapse.request("GET", path, token=token, query=query)
        bodies += [event["content"]["body"] for event in page["chunk"]]
        if "end" not in page or not page["chunk"] and page.get("end") == query.get("from"):
            return bodies
        query["from"] = page["end"]
    raise AssertionError("room history did not end within 100 pages")


def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


FAST_COAP = "[coap]\nack_timeout = 0.3\n"
NO_LIMITS = "[limits]\ndevice_rate = 0\nglobal_rate = 0\n"


# --------------------------------------------------------------------------- tests


def test_exactly_once_in_order_through_a_lossy_reordering_link(make_gateway, synapse: SynapseServer,
                                                               synapse_user) -> None:
    device = synapse_user("lossy")
    room_id = synapse.create_room(device.access_token)
    gw = make_gateway(config_text=FAST_COAP + NO_LIMITS, log_level="info")
    count = 200
    outer_retries = 0
    with LossyRelay(("127.0.0.1", gw.port), loss=0.3, reorder=0.1, seed=20240601) as relay:
        client = RawCoapClient("127.0.0.1", relay.port, ack_timeout=0.1, max_transmissions=6)
        try:
            for n in range(count):
                body = send_body(room_id, f"reading {n}", txn_id=f"lossy-{n}")
                for attempt in range(20):
                    try:
                        # A new Message ID each attempt (a device that timed out and retries);
                        # the txn_id is what makes the retry idempotent.
                        reply = client.request("POST", "send", body, content_format=CBOR,
                                               options=[(TOKEN, device.access_token.encode())], wait=5)
                    except NoAnswer:
                        outer_retries += 1
                        continue
                    assert reply.code == "2.04", (n, reply)
                    break
                else:
                    raise AssertionError(f"message {n} never acknowledged")
        finally:
            client.close()
        stats = relay.stats
    for way in ("up", "down"):  # 30 % lost each way (seeded), and some reordered each way
        assert stats[way]["dropped"] > 0.2 * (stats[way]["dropped"] + stats[way]["forwarded"]), stats
        assert stats[way]["reordered"] > 0, stats
    assert outer_retries > 0  # the new-MID retry path was exercised, not just retransmissions
    assert all_text_bodies(synapse, device.access_token, room_id) == [f"reading {n}" for n in range(count)]


def test_compact_sends_exactly_once_in_order_through_a_lossy_reordering_link(make_gateway, synapse: SynapseServer,
                                                                             synapse_user) -> None:
    # The same link, the device profile: the reference client's /w sends, CoAP retransmissions
    # (same MID) and whole-exchange retries (new MID, same seq) through 30 % loss each way.
    user = synapse_user("lossyc")
    room_id = synapse.create_room(user.access_token)
    gw = make_gateway(config_text=FAST_COAP + NO_LIMITS, log_level="info")
    state = DeviceState(None)
    with UdpCoap(gw.uri()) as direct:
        setup = CompactDevice(direct, state)
        setup.login(user.localpart, user.password)
        setup.join(room_id)
    count = 100
    with LossyRelay(("127.0.0.1", gw.port), loss=0.3, reorder=0.1, seed=20261201) as relay:
        with UdpCoap(f"coap://127.0.0.1:{relay.port}", ack_timeout=0.1) as lossy:
            device = CompactDevice(lossy, state, retries=10)
            for n in range(count):
                device.send(room_id, f"compact {n}")
        stats, mids = relay.stats, relay.posted_mids
    for way in ("up", "down"):
        assert stats[way]["dropped"] > 0.2 * (stats[way]["dropped"] + stats[way]["forwarded"]), stats
    assert len(mids) > count  # some sends were retried as new exchanges, not only retransmitted
    assert all_text_bodies(synapse, user.access_token, room_id) == [f"compact {n}" for n in range(count)]


def test_synapse_outage_mid_run_then_recovery_without_restart(make_gateway, synapse: SynapseServer,
                                                              synapse_user) -> None:
    device = synapse_user("outage")
    room_id = synapse.create_room(device.access_token)
    gw = make_gateway(config_text="request_timeout = 5\n")
    client = RawCoapClient("127.0.0.1", gw.port, ack_timeout=0.5)
    auth = [(TOKEN, device.access_token.encode())]
    try:
        for n in range(3):  # keep-alive connections to Synapse are pooled by now
            assert client.request("POST", "send", send_body(room_id, f"before {n}", f"o-{n}"),
                                  content_format=CBOR, options=auth).code == "2.04"
        with synapse.stopped():
            for n in range(3, 6):
                started = time.monotonic()
                down = client.request("POST", "send", send_body(room_id, f"during {n}", f"o-{n}"),
                                      content_format=CBOR, options=auth)
                assert (down.code, down.payload) == ("5.02", b"homeserver unreachable")
                # Refused at once: well inside the connect timeout, far from the 5 s deadline.
                assert time.monotonic() - started < 2.5
            assert_local_resources_answer(client)
        # Synapse is back; the gateway was not restarted.  The devices retry what failed.
        assert gw.running
        for n in range(3, 8):
            text = f"during {n}" if n < 6 else f"after {n}"
            back = client.request("POST", "send", send_body(room_id, text, f"o-{n}"),
                                  content_format=CBOR, options=auth)
            assert back.code == "2.04", back
        # A retry of an already delivered message after the outage is not duplicated.
        again = client.request("POST", "send", send_body(room_id, "before 2", "o-2"),
                               content_format=CBOR, options=auth)
        assert again.code == "2.04"
    finally:
        client.close()
    expected = [f"before {n}" for n in range(3)] + [f"during {n}" for n in range(3, 6)] + ["after 6", "after 7"]
    assert all_text_bodies(synapse, device.access_token, room_id) == expected


def test_hanging_upstream_504_at_deadline_with_queue_and_shedding(make_gateway, hanging_homeserver: str) -> None:
    deadline = 2.0
    gw = make_gateway(homeserver=hanging_homeserver, extra_args=["--request-timeout", str(deadline)],
                      config_text="[limits]\nmax_upstream = 2\nupstream_queue = 1\nqueue_timeout = 30\n")
    #: device -> (reply, when it was sent, when it was answered), monotonic seconds.
    results: dict[int, tuple[Reply, float, float]] = {}

    def device(n: int) -> None:
        client = RawCoapClient("127.0.0.1", gw.port, ack_timeout=0.5)
        started = time.monotonic()
        try:
            reply = client.request("POST", "send", send_body("!r:test.local", f"m{n}", f"h-{n}"),
                                   content_format=CBOR, options=[(TOKEN, b"syt_hanging_test")], wait=20)
            results[n] = (reply, started, time.monotonic())
        finally:
            client.close()

    threads = [threading.Thread(target=device, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)  # arrival order: two calls go upstream, one queues, the fourth is shed
    local = RawCoapClient("127.0.0.1", gw.port, ack_timeout=0.5)
    try:
        assert_local_resources_answer(local)  # while every upstream slot hangs
    finally:
        local.close()
    for thread in threads:
        thread.join(30)
    codes = sorted(reply.code for reply, _, _ in results.values())
    assert codes == ["5.03", "5.04", "5.04", "5.04"], codes
    shed = next(reply for reply, _, _ in results.values() if reply.code == "5.03")
    assert shed.payload == b"upstream busy" and shed.max_age is not None and shed.max_age >= 1
    timed_out = sorted((answered, sent) for reply, sent, answered in results.values() if reply.code == "5.04")
    assert all(reply.payload == b"homeserver timeout" for reply, _, _ in results.values() if reply.code == "5.04")
    (first_end, first_sent), (second_end, second_sent), (queued_end, _queued_sent) = timed_out
    # The two calls that went upstream end at their deadline, never before it; the queued
    # one waited for the first slot to free and then had a deadline of its own.
    for end, sent in ((first_end, first_sent), (second_end, second_sent)):
        assert deadline - 0.1 <= end - sent <= deadline + 1.0, timed_out
    assert first_end + deadline - 0.1 <= queued_end <= first_end + deadline + 1.0, timed_out


def test_homeserver_taking_no_connection_is_502_within_the_connect_timeout(
        make_gateway, connectionless_homeserver: str) -> None:
    # A homeserver host that is down (SYNs unanswered) is "down", not "slow": 5.02 when the
    # connect timeout expires, well before the request deadline.
    gw = make_gateway(homeserver=connectionless_homeserver,
                      config_text="request_timeout = 8\nconnect_timeout = 1\n")
    client = RawCoapClient("127.0.0.1", gw.port, ack_timeout=0.5)
    try:
        started = time.monotonic()
        reply = client.request("POST", "send", send_body("!r:test.local", "m", "c-1"),
                               content_format=CBOR, options=[(TOKEN, b"syt_blackholed_test")], wait=20)
        elapsed = time.monotonic() - started
        assert (reply.code, reply.payload) == ("5.02", b"homeserver unreachable")
        assert 0.9 <= elapsed <= 3.0, elapsed
        assert_local_resources_answer(client)
    finally:
        client.close()


def assert_local_resources_answer(client: RawCoapClient) -> None:
    """``/time``, the compact ``/z`` and ``/.well-known/core`` need no homeserver: they always answer."""
    assert client.request("GET", "time").code == "2.05"
    assert client.request("GET", PATHS["time"]).code == "2.05"
    core = client.request("GET", ".well-known/core")
    assert core.code == "2.05" and core.payload.startswith(b"</")  # its first block


def test_a_chatty_device_is_held_to_its_rate_while_another_is_served(make_gateway, synapse: SynapseServer,
                                                                     synapse_user) -> None:
    device = synapse_user("chatty")
    room_id = synapse.create_room(device.access_token)
    gw = make_gateway(config_text="[limits]\ndevice_rate = 0.5\ndevice_burst = 3\n")
    auth = [(TOKEN, device.access_token.encode())]
    chatty = RawCoapClient("127.0.0.1", gw.port, ack_timeout=0.5)
    quiet = RawCoapClient("127.0.0.1", gw.port, ack_timeout=0.5, source="127.0.0.2")
    try:
        codes = [chatty.request("POST", "send", send_body(room_id, f"chatty {n}", f"c-{n}"),
                                content_format=CBOR, options=auth) for n in range(5)]
        assert [reply.code for reply in codes] == ["2.04"] * 3 + ["4.29"] * 2
        limited = codes[-1]
        assert limited.max_age is not None and 1 <= limited.max_age <= 3  # 0.5/s: a token in 2 s
        # The burst of one address does not touch another's bucket.
        assert quiet.request("POST", "send", send_body(room_id, "quiet 0", "q-0"),
                             content_format=CBOR, options=auth).code == "2.04"
        assert chatty.request("GET", "time").code == "2.05"  # local resources are never limited
    finally:
        chatty.close()
        quiet.close()
    # Nothing refused reached the room; what was sent arrived once.
    assert all_text_bodies(synapse, device.access_token, room_id) == ["chatty 0", "chatty 1", "chatty 2",
                                                                    "quiet 0"]


def test_gateway_restart_between_login_and_send(make_gateway, synapse: SynapseServer, synapse_user) -> None:
    device = synapse_user("restart")
    room_id = synapse.create_room(device.access_token)
    gw = make_gateway()
    client = RawCoapClient("127.0.0.1", gw.port, ack_timeout=0.5)
    try:
        login = client.request("POST", "login", cbor2.dumps({"user": device.localpart,
                                                             "password": device.password}),
                               content_format=CBOR)
        assert login.code == "2.04"
        token = remember(login.cbor()["access_token"])
        first = client.request("POST", "send", send_body(room_id, "before restart", "r-1"),
                               content_format=CBOR, options=[(TOKEN, token.encode())])
        assert first.code == "2.04"
        gw.stop()
        assert gw.exited_cleanly
        gw.start()
        after = client.request("POST", "send", send_body(room_id, "after restart", "r-2"),
                               content_format=CBOR, options=[(TOKEN, token.encode())])
        assert after.code == "2.04", after  # the session survived the restart
        retried = client.request("POST", "send", send_body(room_id, "before restart", "r-1"),
                                 content_format=CBOR, options=[(TOKEN, token.encode())])
        assert retried.code == "2.04"
        assert retried.cbor()["event_id"] == first.cbor()["event_id"]
    finally:
        client.close()
    assert all_text_bodies(synapse, device.access_token, room_id) == ["before restart", "after restart"]


BAD_INPUTS: list[tuple[dict[str, Any], str]] = [
    (dict(payload=b"\xa2\x67room_id", content_format=CBOR), "4.00"),            # truncated CBOR
    (dict(payload=b"\xff\xff", content_format=CBOR), "4.00"),                    # not CBOR at all
    (dict(payload=cbor2.dumps(["room_id", "body"]), content_format=CBOR), "4.00"),  # not a map
    (dict(payload=cbor2.dumps({"body": "no room"}), content_format=CBOR), "4.00"),  # missing field
    (dict(payload=cbor2.dumps({"room_id": "!r", "body": 2**70}), content_format=CBOR), "4.00"),
    (dict(payload=cbor2.dumps({"room_id": "!" + "x" * 300, "body": "y"}), content_format=CBOR), "4.00"),
    (dict(payload=b"\xa2\x67room_id\x62!r\x64body\x62\xc3\x28", content_format=CBOR), "4.00"),  # bad UTF-8
    (dict(payload=b"\xa1\x64body" + b"\x81" * 500 + b"\x00", content_format=CBOR), "4.00"),  # deep
    (dict(payload=cbor2.dumps({"room_id": "!r", "body": "y", "txn_id": "t" * 100}), content_format=CBOR),
     "4.00"),                                                                   # oversized string
    (dict(payload=b'{"room_id": "!r", "body": "json"}', content_format=50), "4.15"),
    (dict(payload=cbor2.dumps({"room_id": "!r", "body": "x", "msgtype": ["m.text"]}), content_format=CBOR),
     "4.00"),
]


def test_bad_input_through_the_gateway_never_reaches_synapse(make_gateway, synapse: SynapseServer,
                                                             synapse_user) -> None:
    device = synapse_user("badin")
    room_id = synapse.create_room(device.access_token)
    auth = [(TOKEN, device.access_token.encode())]
    with CountingTcpRelay(synapse.port) as relay:
        gw = make_gateway(homeserver=relay.url)
        client = RawCoapClient("127.0.0.1", gw.port, ack_timeout=0.5)
        try:
            for kwargs, code in BAD_INPUTS:
                reply = client.request("POST", "send", options=auth, **kwargs)
                assert reply.code == code, (kwargs, reply)
                assert 0 < len(reply.payload) <= 64
            for path, payload in (("join", cbor2.dumps({"room_id": 42})),
                                  ("login", cbor2.dumps({"user": ["d"], "password": "p"})),
                                  ("register", cbor2.dumps({"username": "u" * 300, "password": "p"})),
                                  ("logout", b"\x9f\x9f")):
                reply = client.request("POST", path, payload, content_format=CBOR, options=auth)
                assert reply.code.startswith("4."), (path, reply)
            bad_room = client.request("GET", "getmsg?room=%FF%FE", options=auth)
            assert bad_room.code == "4.00"
            assert (relay.connections, relay.requests) == (0, [])  # Synapse saw nothing
            # The relay path works: a valid send goes through and is counted.
            good = client.request("POST", "send", send_body(room_id, "valid", "bad-input-ok"),
                                  content_format=CBOR, options=auth)
            assert good.code == "2.04"
            # (With E2EE on, a GET of the room's m.room.encryption state comes first.)
            until(lambda: any(r.startswith(b"PUT /_matrix/client/v3/rooms/") for r in relay.requests), 5,
                  "the relay saw the valid send")
            assert relay.connections >= 1
        finally:
            client.close()
    assert "Traceback" not in gw.log_text()
    assert all_text_bodies(synapse, device.access_token, room_id) == ["valid"]
