"""A flood of Block1 upload starts cannot evict a real device's upload in progress (real gateway, Synapse).

A device sends a message to ``/send`` block-wise, 16 bytes a block.  Halfway, 256
unauthenticated 30-byte Block1 starts arrive, each from its own loopback address
(standing in for forged link addresses).  Unverified addresses may fill only half
of the upload table -- the newcomers beyond that get a 4.01 Echo challenge, which a
forger cannot answer -- and the device's upload stays: it finishes and the message
reaches Synapse.  A second device starting an upload during the flood answers the
challenge (RFC 9175 Echo), gets a slot of the other half and completes too.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
from typing import Callable, Iterator

import cbor2
import pytest

from comatrix.coap import wire
from comatrix.coap.amplification import ECHO
from comatrix.coap.blockwise import Block
from comatrix.coap.numbers import Code, ContentFormat, MessageType, OptionNumber
from support.gateway import GatewayProcess
from support.synapse import MatrixUser, SynapseServer

pytestmark = pytest.mark.integration

CON = MessageType.CON
FLOOD = 256
REPLY_TIMEOUT = 5.0


@contextlib.contextmanager
def udp_from(address: str) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((address, 0))
        sock.settimeout(REPLY_TIMEOUT)
        yield sock
    finally:
        sock.close()


def exchange(sock: socket.socket, gateway: GatewayProcess, data: bytes) -> wire.Datagram:
    """Send one CON and return its answer, piggy-backed or separate (loopback: nothing is lost)."""
    sent = wire.decode(data)
    sock.sendto(data, (gateway.ip, gateway.port))
    reply = wire.decode(sock.recv(2048))
    if reply.mtype == MessageType.ACK and reply.code == Code.EMPTY:  # a separate response follows
        reply = wire.decode(sock.recv(2048))
        assert reply.mtype == CON and reply.token == sent.token, reply
        sock.sendto(wire.empty(MessageType.ACK, reply.mid), (gateway.ip, gateway.port))
    return reply


def block(mid: int, token: bytes, num: int, more: bool, payload: bytes,
          extra: list[tuple[int, bytes]] | None = None) -> bytes:
    options = [(OptionNumber.URI_PATH, b"send"), (OptionNumber.CONTENT_FORMAT, bytes([ContentFormat.CBOR])),
               (OptionNumber.BLOCK1, Block(num, more, 0).encode())] + (extra or [])
    return wire.encode(CON, Code.POST, mid, token, options, payload)


def flood_addresses() -> list[str]:
    return [f"127.0.{1 + n // 250}.{1 + n % 250}" for n in range(FLOOD)]


def test_a_flood_of_upload_starts_does_not_evict_a_device_upload(
        make_gateway: Callable[..., GatewayProcess], synapse: SynapseServer,
        synapse_user: Callable[..., MatrixUser]) -> None:
    gw = make_gateway(log_level="info")
    user = synapse_user("uploader")
    room_id = synapse.create_room(user.access_token)
    text = "uploaded in 16-byte blocks while a flood tries to evict it"
    body = cbor2.dumps({"room_id": room_id, "txn_id": secrets.token_hex(8), "body": text})
    pieces = [body[offset:offset + 16] for offset in range(0, len(body), 16)]
    assert len(pieces) >= 4
    auth = [(256, user.access_token.encode())]

    with udp_from("127.0.0.31") as device:
        token = secrets.token_bytes(4)
        for num in range(2):
            reply = exchange(device, gw, block(num + 1, token, num, True, pieces[num], auth))
            assert reply.code == Code.CONTINUE

        codes: dict[int, int] = {}
        for n, address in enumerate(flood_addresses()):
            with udp_from(address) as attacker:
                start = wire.encode(CON, Code.POST, n, bytes([n & 0xFF]),
                                    [(OptionNumber.URI_PATH, b"send"), (OptionNumber.BLOCK1, Block(0, True, 0).encode())],
                                    b"\x00" * 16)
                assert len(start) == 30
                reply = exchange(attacker, gw, start)
            codes[reply.code] = codes.get(reply.code, 0) + 1
            if reply.code == Code.UNAUTHORIZED:
                assert any(number == ECHO for number, _ in reply.options), reply
        # 256 upload slots, half of them for unverified addresses: the device holds one of those,
        # the flood gets the rest of that half, and every later newcomer is challenged.
        assert codes == {Code.CONTINUE: FLOOD // 2 - 1, Code.UNAUTHORIZED: FLOOD // 2 + 1}

        with udp_from("127.0.0.32") as second:
            second_token = secrets.token_bytes(4)
            challenge = exchange(second, gw, block(1, second_token, 0, True, pieces[0], auth))
            echo = next((value for number, value in challenge.options if number == ECHO), None)
            assert challenge.code == Code.UNAUTHORIZED and echo is not None
            for num in range(len(pieces)):
                more = num < len(pieces) - 1
                extra = auth + ([(ECHO, echo)] if num == 0 else [])
                reply = exchange(second, gw, block(num + 2, second_token, num, more, pieces[num], extra))
                assert reply.code == (Code.CONTINUE if more else Code.CHANGED), reply

        for num in range(2, len(pieces)):
            more = num < len(pieces) - 1
            reply = exchange(device, gw, block(num + 1, token, num, more, pieces[num], auth))
            assert reply.code == (Code.CONTINUE if more else Code.CHANGED), reply
    bodies = [event["content"]["body"] for event in synapse.text_messages(user.access_token, room_id)]
    assert text in bodies
