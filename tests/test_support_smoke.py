"""Proof that the test helpers work before the gateway exists.

The CoAP client wrappers are checked against real servers on loopback: libcoap's own
``coap-server-notls`` (which serves ``/time``, ``/.well-known/core`` and a writable
``/example_data``) and an aiocoap echo server defined here that reports back exactly
what arrived (method, message type, options, payload). The Synapse helper is checked
against a real Synapse, the readiness probe against a real CoAP server, and the secret
sweep against files with planted secrets.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any, Iterator

import cbor2
import pytest
import pytest_twisted

from support import free_port
from support.coap_clients import (
    CoapNoResponse,
    aiocoap_client_cli,
    aiocoap_request,
    libcoap,
    libcoap_path,
)
from support.gateway import GatewayError, GatewayProcess, coap_probe
from support.secrets import all_secrets, leaks, remember
from support.synapse import SynapseHTTPError, SynapseServer

BIG = bytes(range(256)) * 12  # 3072 bytes: needs Block2 at any block size
TOKEN = b"syt_c21va2U_smoketoken_0abc12"
PROXY_URI = b"coap://elsewhere.example/_matrix/client/r0/9/!room/m.room.message/7"


def _wait_for_coap(host: str, port: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    for _ in range(100):  # bounded: 100 probes of <= 0.1 s
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"CoAP server exited with {proc.returncode}")
        if coap_probe(host, port, timeout=0.1) is not None:
            return
    raise RuntimeError(f"no CoAP server answering on {host}:{port}")


# -- servers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def libcoap_server() -> Iterator[str]:
    """``coap-server-notls`` on a free loopback port; yields its base URI."""
    server = Path(libcoap_path()).with_name("coap-server-notls")
    assert server.exists(), "coap-server-notls missing: install libcoap3-bin"
    port = free_port("127.0.0.1", socket.SOCK_DGRAM)
    proc = subprocess.Popen(
        [str(server), "-A", "127.0.0.1", "-p", str(port), "-d", "5"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_coap("127.0.0.1", port, proc)
        yield f"coap://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


class _EchoServer:
    """An aiocoap server on its own thread and loop that describes each request in CBOR.

    ``/big`` answers 3072 bytes (block-wise), ``/slow-down`` a 4.29 with Max-Age 7 and
    a text diagnostic; every other path echoes the request.
    """

    def __init__(self) -> None:
        self.port = free_port("127.0.0.1", socket.SOCK_DGRAM)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._context: Any = None

    def start(self) -> None:
        import aiocoap
        import aiocoap.resource

        class Echo(aiocoap.resource.Resource):  # type: ignore[misc]
            async def needs_blockwise_assembly(self, request: Any) -> bool:
                return True

            async def render(self, request: Any) -> Any:
                path = list(request.opt.uri_path)
                if path == ["big"]:
                    return aiocoap.Message(code=aiocoap.CONTENT, payload=BIG)
                if path == ["slow-down"]:
                    return aiocoap.Message(
                        code=aiocoap.numbers.codes.Code.TOO_MANY_REQUESTS,
                        payload=b"retry in 7 s", max_age=7, content_format=0,
                    )
                described = {
                    "method": request.code.name,
                    "mtype": request.mtype.name,
                    "payload": request.payload,
                    "options": [[int(o.number), o.encode()] for o in request.opt.option_list()],
                }
                return aiocoap.Message(
                    code=aiocoap.CONTENT, payload=cbor2.dumps(described), content_format=60
                )

        self._thread.start()
        self._context = asyncio.run_coroutine_threadsafe(
            aiocoap.Context.create_server_context(
                Echo(), bind=("127.0.0.1", self.port), transports=["udp6"]
            ),
            self._loop,
        ).result(10)

    def stop(self) -> None:
        if self._context is not None:
            asyncio.run_coroutine_threadsafe(self._context.shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture(scope="module")
def echo_server() -> Iterator[str]:
    server = _EchoServer()
    server.start()
    try:
        _wait_for_coap("127.0.0.1", server.port)
        yield f"coap://127.0.0.1:{server.port}"
    finally:
        server.stop()


CLIENTS = [pytest.param(libcoap, id="libcoap"), pytest.param(aiocoap_request, id="aiocoap")]


# -- both clients against the echo server ---------------------------------------------


@pytest.mark.parametrize("client", CLIENTS)
def test_request_carries_method_payload_formats_and_custom_options(
    client: Any, echo_server: str
) -> None:
    result = client(
        "post",
        echo_server + "/send/x?room=abc",
        payload=b"\xa1\x00\xff",
        content_format=60,
        accept=60,
        options=[(256, TOKEN), (257, 1), (35, PROXY_URI)],
    )
    assert result.code == "2.05"
    assert result.content_format == 60
    seen = result.cbor()
    assert seen["method"] == "POST"
    assert seen["mtype"] == "CON"
    assert seen["payload"] == b"\xa1\x00\xff"
    options = [(number, value) for number, value in seen["options"]]
    assert (11, b"send") in options and (11, b"x") in options
    assert (15, b"room=abc") in options
    assert (12, b"<") in options  # Content-Format 60
    assert (17, b"<") in options  # Accept 60
    assert (256, TOKEN) in options
    assert (257, b"\x01") in options
    assert (35, PROXY_URI) in options
    assert TOKEN.decode() in all_secrets()  # harvested from option 256


@pytest.mark.parametrize("client", CLIENTS)
def test_option_values_empty_and_text(client: Any, echo_server: str) -> None:
    result = client("put", echo_server + "/o", options=[(256, b""), (258, "é")])
    options = [(number, value) for number, value in result.cbor()["options"]]
    assert (256, b"") in options
    assert (258, "é".encode()) in options
    assert result.cbor()["method"] == "PUT"


@pytest.mark.parametrize("client", CLIENTS)
def test_non_confirmable(client: Any, echo_server: str) -> None:
    result = client("get", echo_server + "/n", non=True)
    assert result.code == "2.05"
    assert result.cbor()["mtype"] == "NON"


@pytest.mark.parametrize("client", CLIENTS)
def test_blockwise_response_is_reassembled(client: Any, echo_server: str) -> None:
    result = client("get", echo_server + "/big")
    assert result.code == "2.05"
    assert result.payload == BIG


@pytest.mark.parametrize("client", CLIENTS)
def test_error_response_code_payload_and_max_age(client: Any, echo_server: str) -> None:
    result = client("get", echo_server + "/slow-down")
    assert result.code == "4.29"
    assert result.payload == b"retry in 7 s"
    assert result.max_age == 7
    assert result.content_format == 0
    assert not result.ok


@pytest.mark.parametrize("client", CLIENTS)
def test_no_server_raises_no_response(client: Any) -> None:
    port = free_port("127.0.0.1", socket.SOCK_DGRAM)
    with pytest.raises(CoapNoResponse):
        client("get", f"coap://127.0.0.1:{port}/time", timeout=1)


def test_secrets_in_cbor_bodies_are_harvested(echo_server: str) -> None:
    password = "pw-harvest-" + secrets.token_hex(8)
    libcoap(
        "post", echo_server + "/register", content_format=60,
        payload=cbor2.dumps({"username": "u", "password": password,
                             "auth": {"type": "m.login.dummy"}}),
    )
    assert password in all_secrets()


# -- libcoap against libcoap's server -------------------------------------------------


def test_libcoap_get_time_and_not_found(libcoap_server: str) -> None:
    ok = libcoap("get", libcoap_server + "/time")
    assert ok.code == "2.05"
    assert ok.payload  # a date string
    missing = libcoap("get", libcoap_server + "/no-such-resource")
    assert missing.code == "4.04"
    assert missing.payload == b"Not Found"


def test_libcoap_small_blocks_and_link_format(libcoap_server: str) -> None:
    whole = libcoap("get", libcoap_server + "/.well-known/core")
    blocked = libcoap("get", libcoap_server + "/.well-known/core", block_size=16)
    assert blocked.code == whole.code == "2.05"
    assert blocked.content_format == 40
    assert blocked.payload == whole.payload
    assert b"</time>" in blocked.payload
    assert len(blocked.responses) > 1  # really went block by block


def test_libcoap_binary_put_roundtrip(libcoap_server: str) -> None:
    body = bytes(range(256))
    put = libcoap("put", libcoap_server + "/example_data", payload=body, content_format=42)
    assert put.code in ("2.01", "2.04")  # created the first time, changed after
    got = libcoap("get", libcoap_server + "/example_data")
    assert got.code == "2.05"
    assert got.payload == body
    assert got.content_format == 42


def test_libcoap_observe(libcoap_server: str) -> None:
    result = libcoap("get", libcoap_server + "/time", observe_seconds=1)
    assert result.code == "2.05"
    assert "Observe:" in result.responses[0].options
    assert result.payload == result.responses[-1].payload


def test_aiocoap_cli(libcoap_server: str) -> None:
    proc = aiocoap_client_cli([libcoap_server + "/time"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


# -- gateway helper parts that do not need the gateway --------------------------------


def test_probe_sees_real_server_and_not_an_empty_port(libcoap_server: str) -> None:
    port = int(libcoap_server.rsplit(":", 1)[1])
    assert coap_probe("127.0.0.1", port, timeout=2) is not None
    assert coap_probe("127.0.0.1", free_port("127.0.0.1", socket.SOCK_DGRAM), timeout=0.2) is None


def test_gateway_uri_and_command(tmp_path: Path) -> None:
    gw = GatewayProcess(
        "http://127.0.0.1:1", tmp_path, ip="fe80::1%lowpan0", port=5683,
        config_text="[gateway]\n", plugin_dirs=[tmp_path / "p1", tmp_path / "p2"],
    )
    assert gw.uri("time") == "coap://[fe80::1%25lowpan0]:5683/time"
    cmd = gw.command()
    assert cmd[1:5] == ["-n", "--pidfile=", "--logfile", str(gw.log_path)]
    assert cmd[cmd.index("comatrix") + 1:cmd.index("comatrix") + 5] == [
        "--ip", "fe80::1%lowpan0", "--port", "5683"
    ]
    assert cmd.count("--plugin-dir") == 2
    assert cmd[cmd.index("--config") + 1] == str(tmp_path / "comatrix.toml")
    # A config that may hold a password is never open to others (the gateway would refuse it).
    assert (tmp_path / "comatrix.toml").stat().st_mode & 0o777 == 0o600


def test_gateway_that_exits_is_reported_not_awaited(tmp_path: Path) -> None:
    # An option twistd rejects whether or not the comatrix plugin exists yet.
    gw = GatewayProcess("http://127.0.0.1:1", tmp_path, extra_args=["--no-such-option-x"])
    with pytest.raises(GatewayError, match="exited with"):
        gw.start(timeout=30)
    assert gw.returncode not in (None, 0)


# -- the secret sweep ------------------------------------------------------------------


def test_sweep_finds_planted_secrets_in_any_encoding(tmp_path: Path) -> None:
    secret = remember("syt_planted_secret_for_sweep_test")
    clean = tmp_path / "clean.log"
    clean.write_text("request from [::1] POST /send 2.04 12ms\n")
    plain = tmp_path / "plain.log"
    plain.write_text(f"token={secret}\n")
    hexed = tmp_path / "hex.log"
    hexed.write_text(f"opt 256: {secret.encode().hex().upper()}\n")
    rotated = tmp_path / "clean.log.1"
    rotated.write_text(f"old line {secret}\n")
    found = leaks([clean, plain, hexed, tmp_path / "never-written.log"], [secret])
    assert {(leak.path.name, leak.encoding) for leak in found} == {
        ("plain.log", "plain"), ("hex.log", "hex"), ("clean.log.1", "plain"),
    }
    assert all(secret not in str(leak) for leak in found)


def test_short_secrets_are_refused() -> None:
    with pytest.raises(ValueError):
        remember("abc")


# -- real Synapse ----------------------------------------------------------------------


def test_synapse_register_room_send_and_read(
    synapse: SynapseServer, synapse_user: Any
) -> None:
    alice = synapse_user("alice")
    bob = synapse_user("bob")
    assert alice.user_id.endswith(":" + synapse.server_name)
    assert alice.access_token in all_secrets() and alice.password in all_secrets()
    assert alice.password not in repr(alice) and alice.access_token not in repr(alice)
    room = synapse.create_room(alice.access_token, preset="private_chat")
    synapse.set_alias(alice.access_token, "smoke" + alice.localpart, room)
    assert synapse.resolve_alias("smoke" + alice.localpart) == room
    synapse.invite(alice.access_token, room, bob.user_id)
    assert synapse.join(bob.access_token, room) == room
    first = synapse.send_text(bob.access_token, room, "hello from bob", txn_id="smoke-1")
    again = synapse.send_text(bob.access_token, room, "hello from bob", txn_id="smoke-1")
    assert first == again  # Synapse's txnId idempotency, which the gateway relies on
    texts = synapse.text_messages(alice.access_token, room)
    assert [(e["sender"], e["content"]["body"]) for e in texts] == [(bob.user_id, "hello from bob")]


def test_synapse_login_logout_and_admin_ratelimit(
    synapse: SynapseServer, synapse_user: Any
) -> None:
    carol = synapse_user("carol")
    user_id, token, _ = synapse.login(carol.localpart, carol.password)
    assert synapse.whoami(token) == user_id == carol.user_id
    synapse.logout(token)
    with pytest.raises(SynapseHTTPError) as refused:
        synapse.whoami(token)
    assert refused.value.status == 401 and refused.value.errcode == "M_UNKNOWN_TOKEN"
    assert token not in str(refused.value)

    _, admin_token, _ = synapse.register_admin()
    room = synapse.create_room(carol.access_token)
    synapse.set_ratelimit(admin_token, carol.user_id, 1, 1)
    errors = []
    for n in range(5):  # burst 1: at least one of 5 back-to-back sends is refused
        try:
            synapse.send_text(carol.access_token, room, f"m{n}")
        except SynapseHTTPError as exc:
            errors.append(exc)
    assert errors and all(e.status == 429 and e.errcode == "M_LIMIT_EXCEEDED" for e in errors)
    synapse.clear_ratelimit(admin_token, carol.user_id)


def test_synapse_stop_and_restart_keeps_port_and_data(
    synapse: SynapseServer, synapse_user: Any
) -> None:
    dave = synapse_user("dave")
    url = synapse.base_url
    with synapse.stopped():
        assert not synapse.running
        with pytest.raises(OSError):  # urllib's URLError is an OSError
            synapse.whoami(dave.access_token)
    assert synapse.base_url == url
    assert synapse.whoami(dave.access_token) == dave.user_id


@pytest_twisted.ensureDeferred
async def test_tokens_the_gateway_keeps_in_its_store_are_swept(tmp_path: Path) -> None:
    from comatrix.store import Store

    gw = GatewayProcess("http://127.0.0.1:9", tmp_path)
    token = "syt_c3RvcmVk_" + secrets.token_urlsafe(16)
    store = Store.for_state_dir(str(gw.state_dir))
    await store.create_session(b"\x01" * 32, token, "@s:test.local", "DEV", "127.0.0.1", 0.0)
    store.close()
    assert token not in all_secrets()
    assert gw.remember_stored_tokens() == 1
    assert token in all_secrets()
