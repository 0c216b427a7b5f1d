"""OSCORE against a real peer: aiocoap's OSCORE client (CLI and Python API), the real gateway and Synapse.

The device's context lives in an aiocoap security context directory
(``settings.json``); the gateway's in a ``[[devices]]`` entry with ``oscore`` and
no address, so the entry can only be found by the OSCORE recipient id.  The
gateway runs with ``security = "required"``: nothing but OSCORE reaches more
than ``/time`` and ``/.well-known/core``.  A `RecordingUdpRelay` sits between
client and gateway, so sizes and replays are measured on the real datagrams.
"""

from __future__ import annotations

import asyncio
import gc
import json
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Coroutine, TypeVar

import cbor2
import pytest

from comatrix.coap import wire
from comatrix.coap.numbers import Code, OptionNumber
from comatrix.compact import codec
from comatrix.compact.codec import PATHS, JoinRequest, LoginRequest, MessagesRequest, SendRequest
from comatrix.oscore.cose import OscoreOption
from support.coap_clients import aiocoap_client_cli
from support.gateway import GatewayProcess
from support.relays import RecordingUdpRelay
from support.secrets import remember
from support.synapse import MatrixUser, SynapseServer

pytestmark = pytest.mark.integration

T = TypeVar("T")
CBOR = 60
RECIPIENT_ID = "01"  # what the device sends as
SENDER_ID = ""  # the gateway's


class Provisioned:
    """One device's OSCORE material: the gateway's credentials file and aiocoap's context directory."""

    def __init__(self, workdir: Path, user: MatrixUser) -> None:
        self.secret = remember(secrets.token_hex(16))
        self.salt = secrets.token_hex(8)
        self.user = user
        self.credentials = workdir / "credentials.toml"
        self.credentials.write_text(
            f'[[devices]]\nuser = "{user.user_id}"\npassword = "{user.password}"\n'
            f'oscore = {{ recipient_id = "{RECIPIENT_ID}", sender_id = "{SENDER_ID}", '
            f'master_secret = "{self.secret}", master_salt = "{self.salt}" }}\n')
        self.credentials.chmod(0o640)
        self.context_dir = workdir / "device-context"
        self.context_dir.mkdir()
        (self.context_dir / "settings.json").write_text(json.dumps({
            "sender-id_hex": RECIPIENT_ID, "recipient-id_hex": SENDER_ID,
            "secret_hex": self.secret, "salt_hex": self.salt}))

    def config_text(self) -> str:
        return f'security = "required"\ncredentials_file = "{self.credentials}"\n'

    def client_credentials(self, port: int) -> dict[str, Any]:
        return {f"coap://127.0.0.1:{port}/*": {"oscore": {"basedir": str(self.context_dir)}}}


class AiocoapDevice:
    """aiocoap's client with the device's OSCORE context, on an event loop of its own thread."""

    def __init__(self, device: Provisioned, port: int) -> None:
        self.base = f"coap://127.0.0.1:{port}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="aiocoap", daemon=True)
        self.thread.start()
        self.context = self.run(self._create(device.client_credentials(port)))

    async def _create(self, credentials: dict[str, Any]) -> Any:
        import aiocoap
        context = await aiocoap.Context.create_client_context()
        context.client_credentials.load_from_dict(credentials)
        return context

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def message(self, method: str, path: str, payload: bytes = b"", content_format: int | None = None,
                **options: Any) -> Any:
        import aiocoap
        message = aiocoap.Message(code=aiocoap.numbers.codes.Code[method], uri=f"{self.base}/{path}",
                                  payload=payload, **options)
        if content_format is not None:
            message.opt.content_format = content_format
        return message

    def request(self, method: str, path: str, payload: bytes = b"", content_format: int | None = None,
                **options: Any) -> Any:
        async def go() -> Any:
            return await asyncio.wait_for(
                self.context.request(self.message(method, path, payload, content_format, **options)).response, 30)
        return self.run(go())

    def close(self) -> None:
        self.run(self.context.shutdown())
        # Let aiocoap write its sequence numbers and drop its lock while the directory exists.
        self.context.client_credentials.clear()
        del self.context
        gc.collect()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def provisioned(synapse_user: Callable[..., MatrixUser], tmp_path: Path) -> Provisioned:
    return Provisioned(tmp_path, synapse_user("osc"))


def _oscore_option(data: bytes) -> OscoreOption | None:
    values = [value for number, value in wire.decode(data).options if number == OptionNumber.OSCORE]
    return OscoreOption.decode(values[0]) if values else None


def test_aiocoap_client_cli_with_a_credentials_file(make_gateway, synapse: SynapseServer,
                                                    provisioned: Provisioned, tmp_path: Path) -> None:
    gw = make_gateway(config_text=provisioned.config_text())
    user = provisioned.user
    room_id = synapse.create_room(user.access_token)
    credentials = tmp_path / "client-credentials.json"
    credentials.write_text(json.dumps(provisioned.client_credentials(gw.port)))
    done = aiocoap_client_cli(["--credentials", str(credentials), gw.uri("time")])
    assert done.returncode == 0, done.stderr
    assert abs(int(done.stdout.decode().strip()) - time.time()) < 300
    done = aiocoap_client_cli(["--credentials", str(credentials), gw.uri(".well-known/core")])
    assert done.returncode == 0, done.stderr
    assert b"/time" in done.stdout and b"/send" in done.stdout
    # The README's send: JSON on the command line, CBOR on the air.
    body = json.dumps({"room_id": room_id, "body": "hello from aiocoap-client"})
    done = aiocoap_client_cli(["--credentials", str(credentials), "-m", "POST", "--content-format",
                               "application/cbor", "--payload", body, gw.uri("send")])
    assert done.returncode == 0, done.stderr
    latest = synapse.text_messages(user.access_token, room_id, limit=1)[0]
    assert (latest["sender"], latest["content"]["body"]) == (user.user_id, "hello from aiocoap-client")
    # The first request after the gateway started went through the Echo round trip.
    assert "replay window of <SecurityContext recipient_id='01'" in gw.log_text()


def test_python_api_journey_through_the_oscore_entry(make_gateway, synapse: SynapseServer,
                                                     synapse_user: Callable[..., MatrixUser],
                                                     provisioned: Provisioned) -> None:
    gw = make_gateway(config_text=provisioned.config_text())
    user = provisioned.user
    room_id = synapse.create_room(user.access_token)
    owner = synapse_user("owner")
    with RecordingUdpRelay(gw.port) as relay:
        device = AiocoapDevice(provisioned, relay.port)
        try:
            assert abs(int(device.request("GET", "time").payload) - time.time()) < 300

            # A send with no token: the gateway acts through the entry found by recipient id.
            mark = relay.mark()
            sent = device.request("POST", "send", cbor2.dumps({"room_id": room_id, "body": "via oscore"}), CBOR)
            assert str(sent.code) == "2.04 Changed", sent
            latest = synapse.text_messages(user.access_token, room_id, limit=1)[0]
            assert (latest["sender"], latest["content"]["body"]) == (user.user_id, "via oscore")
            [(way, request)] = relay.since(mark)[:1]
            assert way == "up" and b"via oscore" not in request and room_id.encode() not in request

            # A byte-for-byte replay of that datagram from another socket: rejected, no second event.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
                attacker.settimeout(5)
                attacker.sendto(request, ("127.0.0.1", gw.port))
                answer = wire.decode(attacker.recv(2048))
            assert (answer.code, answer.payload) == (Code.UNAUTHORIZED, b"Replay detected")
            # Tampered: an unused Partial IV and one flipped ciphertext bit -> 4.00, nothing reaches Matrix.
            captured = wire.decode(request)
            header = _oscore_option(request)
            assert header is not None and header.piv is not None
            forged = OscoreOption(piv=(int.from_bytes(header.piv, "big") + 1000).to_bytes(2, "big"),
                                  kid=header.kid).encode()
            options = [(n, forged if n == OptionNumber.OSCORE else v) for n, v in captured.options]
            payload = captured.payload[:-1] + bytes([captured.payload[-1] ^ 1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
                attacker.settimeout(5)
                attacker.sendto(wire.encode(captured.mtype, captured.code, captured.mid ^ 1, captured.token,
                                            options, payload), ("127.0.0.1", gw.port))
                answer = wire.decode(attacker.recv(2048))
            assert (answer.code, answer.payload) == (Code.BAD_REQUEST, b"Decryption failed")
            bodies = [e["content"]["body"] for e in synapse.text_messages(user.access_token, room_id)]
            assert bodies.count("via oscore") == 1

            got = device.request("GET", f"getmsg?room={room_id}")
            message = cbor2.loads(got.payload)
            assert (message["sender"], message["body"]) == (user.user_id, "via oscore")

            # The compact profile inside OSCORE: login, join, and the send measured on the wire.
            handle = device.request("POST", PATHS["login"], LoginRequest(user.localpart, user.password).encode(),
                                    CBOR).payload
            handle = codec.decode_handle(handle)
            remember(handle.hex())
            room = codec.decode_uint(device.request("POST", PATHS["join"],
                                                    JoinRequest.for_room(handle, room_id).encode(), CBOR).payload)
            mark = relay.mark()
            body20 = "temperature=21.5C ok"
            sent = device.request("POST", PATHS["send"], SendRequest(handle, room, int(time.time()), body20).encode(),
                                  CBOR)
            assert sent.code.is_successful(), sent
            up = [len(d) for way, d in relay.since(mark) if way == "up" and wire.decode(d).code != 0]
            plain = len(wire.encode(0, Code.POST, 1, b"\x00\x01", [(11, PATHS["send"].encode()), (12, b"\x3c")],
                                    SendRequest(handle, room, int(time.time()), body20).encode()))
            print(f"compact send: plain {plain} bytes, OSCORE {up} bytes up")
            assert max(up) <= 64, up  # issue 11: one 802.15.4 frame
            latest = synapse.text_messages(user.access_token, room_id, limit=1)[0]
            assert latest["content"]["body"] == body20

            _observe(device, relay, synapse, owner, user, handle, room_id, room)
            _blockwise(device, relay)
        finally:
            device.close()


def _observe(device: AiocoapDevice, relay: RecordingUdpRelay, synapse: SynapseServer, owner: MatrixUser,
             user: MatrixUser, handle: bytes, room_id: str, room: int) -> None:
    """Observe the compact messages resource: three notifications, each with a fresh Partial IV."""
    synapse.invite(user.access_token, room_id, owner.user_id)
    synapse.join(owner.access_token, room_id)
    mark = relay.mark()
    texts = ["first", "second", "third"]

    async def watch() -> list[str]:
        request = device.context.request(device.message("FETCH", PATHS["messages"],
                                                        MessagesRequest(handle, room).encode(), CBOR, observe=0))
        first = await asyncio.wait_for(request.response, 30)
        assert first.code.is_successful(), first
        seen: list[str] = []
        async for note in request.observation:
            message = codec.decode_message(note.payload)
            if message is not None and message.body in texts and message.body not in seen:
                seen.append(message.body)
            if len(seen) == len(texts):
                request.observation.cancel()
                break
        return seen

    future = asyncio.run_coroutine_threadsafe(watch(), device.loop)
    deadline = time.monotonic() + 20
    while not any(way == "down" for way, _ in relay.since(mark)):
        assert time.monotonic() < deadline, "no answer to the registration"
        time.sleep(0.05)
    for text in texts:
        synapse.send_text(owner.access_token, room_id, text)
        time.sleep(0.3)
    assert future.result(60) == texts
    pivs = [option.piv for way, data in relay.since(mark) if way == "down"
            for option in [_oscore_option(data)] if option is not None and option.piv is not None]
    assert len(pivs) >= 4 and len(set(pivs)) == len(pivs)  # registration answer + notifications, none reused


def _blockwise(device: AiocoapDevice, relay: RecordingUdpRelay) -> None:
    """``/.well-known/core`` in 64-byte inner Block2 pieces: aiocoap fetches them all through OSCORE."""
    from aiocoap.optiontypes import BlockOption
    whole = device.request("GET", ".well-known/core").payload
    assert len(whole) > 3 * 64
    mark = relay.mark()
    pieces = device.request("GET", ".well-known/core", block2=BlockOption.BlockwiseTuple(0, False, 2))
    assert pieces.payload == whole
    downs = [data for way, data in relay.since(mark) if way == "down"]
    assert len(downs) >= len(whole) // 64
    assert all(not any(n == OptionNumber.BLOCK2 for n, _ in wire.decode(d).options) for d in downs)  # inner only


def test_after_a_gateway_restart_the_device_recovers_via_echo(make_gateway, synapse: SynapseServer,
                                                              provisioned: Provisioned) -> None:
    gw = make_gateway(config_text=provisioned.config_text())
    user = provisioned.user
    room_id = synapse.create_room(user.access_token)
    with RecordingUdpRelay(gw.port) as relay:
        device = AiocoapDevice(provisioned, relay.port)
        try:
            def send(text: str) -> list[tuple[str, bytes]]:
                mark = relay.mark()
                answer = device.request("POST", "send", cbor2.dumps({"room_id": room_id, "body": text}), CBOR)
                assert str(answer.code) == "2.04 Changed", answer
                return relay.since(mark)

            first = send("before restart")
            gw.stop()
            gw.start()
            after = send("after restart")
            # Up: the request, then its repeat with the Echo value (empty ACKs aside).
            requests = [data for way, data in after if way == "up" and wire.decode(data).code != 0]
            assert len(requests) == 2
            answers = [_oscore_option(data) for way, data in after if way == "down" and wire.decode(data).code != 0]
            challenge = answers[0]
            assert len(answers) == 2 and challenge is not None and challenge.piv is not None
            # The gateway's sequence numbers went on above everything used before the restart.
            before = [option.piv for way, data in first if way == "down"
                      for option in [_oscore_option(data)] if option is not None and option.piv is not None]
            assert before and int.from_bytes(challenge.piv, "big") > max(int.from_bytes(p, "big") for p in before)
            bodies = [e["content"]["body"] for e in synapse.text_messages(user.access_token, room_id)]
            assert bodies == ["after restart", "before restart"]
        finally:
            device.close()
    assert gw.log_text().count("set by an Echo round trip") == 2
    sequence = json.loads((gw.state_dir / "oscore-sequence.json").read_text())
    assert list(sequence) == ["01:"] and sequence["01:"] >= 200
