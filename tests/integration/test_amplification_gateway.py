"""Amplification limit of the real gateway: what an unverified address gets for what it sent.

Each request comes from its own loopback address (127.0.0.x stands for a forged
source) through a raw UDP socket that never acknowledges anything, so separate
responses are retransmitted as far as the budget allows.  The socket sees every
datagram the gateway sends to that address; the test compares bytes out with
bytes in (RFC 9175 §2.4: at most 3x until the address is verified).
"""

from __future__ import annotations

import secrets
import select
import socket
import time
from typing import Iterable

import cbor2
import pytest

from comatrix.coap import wire
from comatrix.coap.amplification import ECHO
from comatrix.coap.blockwise import Block
from comatrix.coap.numbers import Code, MessageType, OptionNumber
from support.gateway import GatewayProcess
from support.secrets import remember

pytestmark = pytest.mark.integration

CON, ACK = MessageType.CON, MessageType.ACK
CBOR = b"\x3c"
#: Short retransmission timers, so the whole retransmission span fits a short wait.
FAST_COAP = "[coap]\nack_timeout = 0.3\nempty_ack_delay = 0.05\n"
#: Long enough for the slowest answer plus every retransmission of FAST_COAP.
COLLECT_SECONDS = 8.0


def request(code: Code, path: str, *, token: bytes = b"\x01\x02", payload: bytes = b"",
            cbor: bool = False, query: Iterable[str] = ()) -> bytes:
    options = [(int(OptionNumber.URI_PATH), segment.encode()) for segment in path.split("/") if segment]
    options += [(int(OptionNumber.URI_QUERY), item.encode()) for item in query]
    if cbor:
        options.append((int(OptionNumber.CONTENT_FORMAT), CBOR))
    return wire.encode(CON, code, secrets.randbelow(0x10000), token, options, payload)


def unauthenticated_requests() -> dict[str, bytes]:
    """Every resource that answers without credentials, with the smallest request a peer could send."""
    wrong = remember("wrong-" + secrets.token_hex(4))
    return {
        "time": request(Code.GET, "time"),
        "compact time": request(Code.GET, "z"),
        "well-known core": request(Code.GET, ".well-known/core", token=b""),
        "msc3079 versions": request(Code.GET, "0", token=b""),
        "full versions path": request(Code.GET, "_matrix/client/versions"),
        "register, bad body": request(Code.POST, "register", payload=b"\xff", cbor=True),
        "login, wrong password": request(Code.POST, "login", cbor=True,
                                         payload=cbor2.dumps({"user": "nobody", "password": wrong})),
        "compact login, wrong password": request(Code.POST, "+", cbor=True, payload=cbor2.dumps(["nobody", wrong])),
        "msc3079 login, wrong password": request(Code.POST, "1", cbor=True, payload=cbor2.dumps(
            {"type": "m.login.password", "user": "nobody", "password": wrong})),
        "compact send, unknown handle": request(Code.POST, "w", cbor=True,
                                                payload=cbor2.dumps([b"\0" * 8, 1, 1, "x"])),
        "compact logout, unknown handle": request(Code.POST, "-", cbor=True, payload=cbor2.dumps([b"\0" * 8])),
        "compact join, unknown handle": request(Code.POST, "x", cbor=True, payload=cbor2.dumps([b"\0" * 8, "!r"])),
        "compact read, unknown handle": request(Code.FETCH, "v", cbor=True, payload=cbor2.dumps([b"\0" * 8, 0])),
        "msc3079 register, bad body": request(Code.POST, "4", payload=b"\xff", cbor=True),
        "msc3079 capabilities without token": request(Code.GET, "2"),
        "getmsg without token": request(Code.GET, "getmsg", query=["room=!r"]),
        "msc3079 sync without token": request(Code.GET, "7"),
        "unknown path": request(Code.GET, "nothing-here"),
    }


def flood_once(gw: GatewayProcess, requests: dict[str, bytes], first_host: int = 10) -> dict[str, tuple[int, int, list[wire.Datagram]]]:
    """Each request from its own address, never acknowledging; -> name: (bytes in, bytes out, datagrams)."""
    sockets = {}
    for offset, (name, data) in enumerate(requests.items()):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((f"127.0.0.{first_host + offset}", 0))
        sock.sendto(data, (gw.ip, gw.port))
        sockets[sock] = name
    received: dict[str, list[bytes]] = {name: [] for name in requests}
    deadline = time.monotonic() + COLLECT_SECONDS
    try:
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(list(sockets), [], [], left)
            for sock in ready:
                received[sockets[sock]].append(sock.recv(65535))
    finally:
        for sock in sockets:
            sock.close()
    return {name: (len(requests[name]), sum(map(len, received[name])), [wire.decode(d) for d in received[name]])
            for name in requests}


def assert_within_budget(results: dict[str, tuple[int, int, list[wire.Datagram]]]) -> None:
    for name, (bytes_in, bytes_out, datagrams) in results.items():
        assert datagrams, f"{name}: no answer at all"
        assert bytes_out <= 3 * bytes_in, f"{name}: {bytes_out} bytes out for {bytes_in} in: {datagrams}"


def test_every_unauthenticated_resource_stays_within_3x(make_gateway) -> None:
    gw = make_gateway(config_text=FAST_COAP)
    results = flood_once(gw, unauthenticated_requests())
    assert_within_budget(results)
    # The large answers went block-wise (or became an Echo challenge, or nothing fitted), never whole.
    for name in ("well-known core", "msc3079 versions"):
        for answer in results[name][2]:
            block = next((Block.decode(v) for n, v in answer.options if n == OptionNumber.BLOCK2), None)
            assert answer.code != Code.CONTENT or (block is not None and block.more), (name, answer)


def test_slow_homeserver_separate_responses_stay_within_3x(make_gateway, hanging_homeserver: str) -> None:
    gw = make_gateway(homeserver=hanging_homeserver, config_text=FAST_COAP,
                      extra_args=["--request-timeout", "1"])
    results = flood_once(gw, {
        "msc3079 versions": request(Code.GET, "0", token=b""),
        "full versions path": request(Code.GET, "_matrix/client/versions"),
        "login": request(Code.POST, "login", cbor=True, payload=cbor2.dumps({"user": "u", "password": "p"})),
        "compact login": request(Code.POST, "+", cbor=True, payload=cbor2.dumps(["u", "p"])),
    })
    assert_within_budget(results)
    _, _, datagrams = results["msc3079 versions"]
    assert (datagrams[0].mtype, datagrams[0].code) == (ACK, 0)  # empty ACK, then the late 5.04
    late = [d for d in datagrams if d.mtype == CON]
    assert late and all(d.code == Code.GATEWAY_TIMEOUT for d in late)
    assert len(late) < 5  # the first transmission and fewer than max_retransmit repeats


def exchange(sock: socket.socket, gw: GatewayProcess, data: bytes) -> wire.Datagram:
    sock.sendto(data, (gw.ip, gw.port))
    sock.settimeout(5)
    while True:
        answer = wire.decode(sock.recv(65535))
        if answer.code != 0:
            return answer


def test_verified_peer_gets_the_unchanged_answer(make_gateway) -> None:
    """After an Echo round trip the address is verified: /0 comes whole (or in 1024-byte blocks)."""
    gw = make_gateway(config_text=FAST_COAP)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.40", 0))
        challenge = exchange(sock, gw, request(Code.GET, "0", token=b""))
        assert challenge.code == Code.UNAUTHORIZED
        echo = next(value for number, value in challenge.options if number == ECHO)
        options = [(int(OptionNumber.URI_PATH), b"0"), (ECHO, echo)]
        answer = exchange(sock, gw, wire.encode(CON, Code.GET, 7, b"", options))
    assert answer.code == Code.CONTENT
    block = next((Block.decode(v) for n, v in answer.options if n == OptionNumber.BLOCK2), None)
    assert block is None or block.szx == 6
    versions = cbor2.loads(answer.payload) if block is None else None
    assert versions is None or "org.matrix.msc3079.low_bandwidth" in str(versions)


@pytest.mark.parametrize("path", [".well-known/core", "0", "_matrix/client/versions"])
def test_discovery_paths_rate_limited_per_address(make_gateway, path: str) -> None:
    gw = make_gateway(config_text=FAST_COAP)
    codes = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.50", 0))
        for _ in range(14):
            answer = exchange(sock, gw, request(Code.GET, path, token=b"\x01\x02\x03\x04"))
            codes.append(answer.code)
        assert Code.TOO_MANY_REQUESTS in codes
        limited = answer if answer.code == Code.TOO_MANY_REQUESTS else None
        assert limited is not None and any(n == OptionNumber.MAX_AGE for n, _ in limited.options)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.bind(("127.0.0.51", 0))
        assert exchange(other, gw, request(Code.GET, path, token=b"\x01\x02\x03\x04")).code \
            != Code.TOO_MANY_REQUESTS


@pytest.mark.parametrize("form", ["compact", "original"])
def test_reference_device_reads_a_long_message_from_an_unverified_address(
        make_gateway, synapse, synapse_user, form: str) -> None:
    """A message too long for 3x the request comes block-wise; ``comatrix-device`` completes it."""
    from comatrix.client import CompactDevice, DeviceState, OriginalDevice, UdpCoap

    # Every answer piggy-backed: no separate response whose ACK would verify the device on the way.
    gw = make_gateway(config_text="[coap]\nempty_ack_delay = 5\n")
    device, owner = synapse_user("dev"), synapse_user("owner")
    room_id = synapse.create_room(owner.access_token)
    synapse.invite(owner.access_token, room_id, device.user_id)
    long_text = "reading " + "0123456789" * 300
    down: list[bytes] = []
    source = "127.0.0.61" if form == "compact" else "127.0.0.62"
    with UdpCoap(gw.uri(), source=source, trace=lambda way, data: down.append(data) if way == "down" else None,
                 ack_timeout=3) as coap:
        client = (CompactDevice if form == "compact" else OriginalDevice)(coap, DeviceState(None))
        client.login(device.localpart, device.password)
        client.join(room_id)
        synapse.send_text(owner.access_token, room_id, long_text)
        message = client.getmsg(room_id)
    assert message is not None and message.body == long_text
    assert any(number == OptionNumber.BLOCK2 for data in down for number, _ in wire.decode(data).options)
    assert not any(wire.decode(data).mtype == CON for data in down)  # never verified by an ACK
