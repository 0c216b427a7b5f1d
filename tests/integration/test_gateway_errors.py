"""Every error row of the gateway, against a real Synapse and real CoAP clients.

Homeserver trouble (down, hanging), Matrix errors (forbidden, not found, user in
use, rate limited), bad input (content-format, CBOR, critical options, size),
credentials, shutdown and bind failures.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import cbor2
import pytest

from support.coap_clients import aiocoap_request, libcoap, libcoap_path
from support.gateway import GatewayProcess
from support.secrets import remember
from support.synapse import MatrixUser, SynapseServer

pytestmark = pytest.mark.integration

CBOR = 60
TOKEN = 256
REPO = Path(__file__).resolve().parents[2]


def send_body(room_id: str, text: str = "x", **extra: object) -> bytes:
    return cbor2.dumps({"room_id": room_id, "body": text, **extra})


def test_bad_input_is_answered_and_never_forwarded(gateway: GatewayProcess, synapse_user) -> None:
    device = synapse_user("dev")
    auth = [(TOKEN, device.access_token)]
    cases = [
        (dict(payload=b"\xa1\x64body", content_format=CBOR), "4.00", b"malformed CBOR"),
        (dict(payload=cbor2.dumps({"body": "no room"}), content_format=CBOR), "4.00", b"missing room_id"),
        (dict(payload=cbor2.dumps({"room_id": "!r", "body": 42}), content_format=CBOR), "4.00",
         b"body must be a text string"),
        (dict(payload=b'{"room_id": "!r"}', content_format=50), "4.15", b"expected application/cbor (60)"),
    ]
    for kwargs, code, diagnostic in cases:
        answer = libcoap("post", gateway.uri("send"), options=auth, **kwargs)
        assert (answer.code, answer.payload) == (code, diagnostic)
    unknown_critical = libcoap("post", gateway.uri("send"), options=auth + [(65001, "x")],
                               payload=send_body("!r"), content_format=CBOR)
    assert unknown_critical.code == "4.02"
    wrong_method = libcoap("delete", gateway.uri("send"), options=auth)
    assert wrong_method.code == "4.05"
    assert libcoap("get", gateway.uri("nothing-here")).code == "4.04"


def test_matrix_errors_map_to_coap(gateway: GatewayProcess, synapse: SynapseServer, synapse_user) -> None:
    device, owner = synapse_user("dev"), synapse_user("owner")
    private_room = synapse.create_room(owner.access_token, preset="private_chat")
    forbidden = libcoap("post", gateway.uri("join"), options=[(TOKEN, device.access_token)],
                        content_format=CBOR, payload=cbor2.dumps({"room_id": private_room}))
    assert (forbidden.code, errcode(forbidden.payload)) == ("4.03", b"M_FORBIDDEN")
    missing_alias = synapse.full_alias("nope" + secrets.token_hex(4))
    not_found = libcoap("get", gateway.uri(f"getmsg?room={missing_alias.replace('#', '%23')}"),
                        options=[(TOKEN, device.access_token)])
    assert (not_found.code, errcode(not_found.payload)) == ("4.04", b"M_NOT_FOUND")
    taken = libcoap("post", gateway.uri("register"), content_format=CBOR,
                    payload=cbor2.dumps({"username": device.localpart, "password": remember("pw-" + secrets.token_hex(8))}))
    assert (taken.code, errcode(taken.payload)) == ("4.00", b"M_USER_IN_USE")
    invalid = libcoap("post", gateway.uri("register"), content_format=CBOR,
                      payload=cbor2.dumps({"username": "Bad Name!", "password": remember("pw-" + secrets.token_hex(8))}))
    assert (invalid.code, errcode(invalid.payload)) == ("4.00", b"M_INVALID_USERNAME")
    unknown_token = libcoap("get", gateway.uri(f"getmsg?room={private_room}"), options=[(TOKEN, "syt_bogus")])
    assert (unknown_token.code, errcode(unknown_token.payload)) == ("4.01", b"M_UNKNOWN_TOKEN")
    no_token = libcoap("get", gateway.uri(f"getmsg?room={private_room}"))
    assert (no_token.code, no_token.payload) == ("4.01", b"no credentials")


def errcode(diagnostic: bytes) -> bytes:
    """The errcode of a Matrix error's diagnostic (``M_FORBIDDEN: <the homeserver's text>``)."""
    return diagnostic.partition(b":")[0]


def test_diagnostics_carry_the_homeserver_text(gateway: GatewayProcess, synapse_user) -> None:
    device = synapse_user("dev")
    wrong = libcoap("post", gateway.uri("login"), content_format=CBOR,
                    payload=cbor2.dumps({"user": device.localpart, "password": remember("wrong-" + secrets.token_hex(8))}))
    assert (wrong.code, wrong.payload) == ("4.03", b"M_FORBIDDEN: Invalid username or password")
    # An unencoded "#" in the URI: libcoap takes it for a fragment and sends "room=" only.
    cut = libcoap("get", gateway.uri("getmsg?room=#demo:localhost"), options=[(TOKEN, device.access_token)])
    assert (cut.code, cut.payload) == ("4.00", b"room is empty (encode # as %23)")
    empty = libcoap("post", gateway.uri("login"), content_format=CBOR, payload=b"")
    assert (empty.code, empty.payload) == ("4.00", b"empty body: expected a CBOR map with user")


def test_rate_limited_send_is_429_with_max_age(gateway: GatewayProcess, synapse: SynapseServer,
                                               synapse_user) -> None:
    device = synapse_user("dev")
    room_id = synapse.create_room(device.access_token)
    _admin_id, admin_token, _ = synapse.register_admin()
    synapse.set_ratelimit(admin_token, device.user_id, messages_per_second=1, burst_count=1)
    try:
        answers = [aiocoap_request("POST", gateway.uri("send"), content_format=CBOR,
                                   options=[(TOKEN, device.access_token)], payload=send_body(room_id, f"m{i}"))
                   for i in range(4)]
    finally:
        synapse.clear_ratelimit(admin_token, device.user_id)
    limited = [a for a in answers if a.code == "4.29"]
    assert limited, [a.code for a in answers]
    assert all(a.max_age is not None and a.max_age >= 1 for a in limited)
    assert errcode(limited[0].payload) == b"M_LIMIT_EXCEEDED"


def test_homeserver_down_is_502_and_recovers(gateway: GatewayProcess, synapse: SynapseServer,
                                             synapse_user) -> None:
    device = synapse_user("dev")
    room_id = synapse.create_room(device.access_token)
    with synapse.stopped():
        down = libcoap("post", gateway.uri("send"), content_format=CBOR,
                       options=[(TOKEN, device.access_token)], payload=send_body(room_id, "lost?"))
        assert (down.code, down.payload) == ("5.02", b"homeserver unreachable")
        assert libcoap("get", gateway.uri("time")).code == "2.05"  # local resources keep answering
    back = libcoap("post", gateway.uri("send"), content_format=CBOR,
                   options=[(TOKEN, device.access_token)], payload=send_body(room_id, "back"))
    assert back.code == "2.04"




def test_hanging_homeserver_is_504_at_the_deadline(make_gateway, hanging_homeserver: str) -> None:
    gw = make_gateway(homeserver=hanging_homeserver, extra_args=["--request-timeout", "1"])
    started = time.monotonic()
    answer = libcoap("post", gw.uri("send"), content_format=CBOR, options=[(TOKEN, "t")],
                     payload=send_body("!r"))
    assert (answer.code, answer.payload) == ("5.04", b"homeserver timeout")
    assert time.monotonic() - started < 10  # answered at the gateway's deadline, not the client's


class SilentHomeserver:
    """A homeserver that reads each HTTP request and never answers; `received` is set once one came.

    A test that needs a request "in flight" at the gateway waits on `received`: the
    request has then really left the gateway for the homeserver.
    """

    def __init__(self) -> None:
        self.received = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.connections: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                continue
            connection.settimeout(10)
            self.connections.append(connection)  # kept open, unanswered, until close()
            head = b""
            while b"\r\n\r\n" not in head:
                try:
                    chunk = connection.recv(4096)
                except OSError:
                    break
                if not chunk:
                    break
                head += chunk
            if b"\r\n\r\n" in head:
                self.received.set()

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        for connection in self.connections:
            connection.close()
        self.listener.close()


@pytest.fixture
def silent_homeserver() -> Iterator[SilentHomeserver]:
    server = SilentHomeserver()
    try:
        yield server
    finally:
        server.close()


def test_sigterm_answers_in_flight_requests_with_503(make_gateway, silent_homeserver: SilentHomeserver,
                                                     tmp_path: Path) -> None:
    gw = make_gateway(homeserver=silent_homeserver.url, extra_args=["--request-timeout", "30"],
                      config_text="shutdown_grace = 1\n")
    body = tmp_path / "send.cbor"
    body.write_bytes(send_body("!r", "in flight"))
    client = subprocess.Popen(
        [libcoap_path(), "-m", "post", "-v", "6", "-B", "20", "-O", f"{TOKEN},t", "-t", "60", "-f", str(body),
         gw.uri("send")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # In flight: the gateway has passed the request on to the homeserver, which holds it.
        assert silent_homeserver.received.wait(timeout=20), "the send never reached the homeserver"
        # twistd re-raises SIGTERM after a clean shutdown, which is what systemd expects.
        assert gw.stop() in (0, -15)
        output, _ = client.communicate(timeout=30)
    finally:
        client.kill()
    assert "c:5.03" in output
    assert "Server Shut Down" in gw.log_text()


def configured_device_gateway(make_gateway, synapse: SynapseServer, synapse_user,
                              tmp_path: Path) -> tuple[MatrixUser, str, GatewayProcess]:
    """A user with a room of its own, and a gateway holding its password for 127.0.0.0/8."""
    device = synapse_user("dev")
    room_id = synapse.create_room(device.access_token)
    credentials = tmp_path / "credentials.toml"
    credentials.write_text(f'[[devices]]\naddress = "127.0.0.0/8"\nuser = "{device.user_id}"\n'
                           f'password = "{device.password}"\n')
    credentials.chmod(0o640)
    return device, room_id, make_gateway(config_text=f'credentials_file = "{credentials}"\n')


def test_device_credentials_from_config(make_gateway, synapse: SynapseServer, synapse_user, tmp_path: Path) -> None:
    device, room_id, gw = configured_device_gateway(make_gateway, synapse, synapse_user, tmp_path)
    answer = libcoap("post", gw.uri("send"), content_format=CBOR, payload=send_body(room_id, "no token sent"))
    assert answer.code == "2.04"
    latest = synapse.text_messages(device.access_token, room_id, limit=1)[0]
    assert (latest["sender"], latest["content"]["body"]) == (device.user_id, "no token sent")


def test_configured_device_retry_across_a_restart_is_not_duplicated(make_gateway, synapse: SynapseServer,
                                                                     synapse_user, tmp_path: Path) -> None:
    device, room_id, gw = configured_device_gateway(make_gateway, synapse, synapse_user, tmp_path)
    body = send_body(room_id, "reading 17", txn_id="dev-17")
    first = libcoap("post", gw.uri("send"), content_format=CBOR, payload=body)
    assert first.code == "2.04"
    gw.stop()
    gw.start()
    # The device never heard the answer and retries the same send after the restart:
    # the gateway logs in again, as the same Matrix device, so the txn id still holds.
    retried = libcoap("post", gw.uri("send"), content_format=CBOR, payload=body)
    assert retried.code == "2.04"
    assert cbor2.loads(retried.payload)["event_id"] == cbor2.loads(first.payload)["event_id"]
    # Another sensor behind the same entry, with the same counter value: its own message.
    other = libcoap("post", gw.uri("send"), content_format=CBOR, extra_args=["-a", "127.0.0.2"],
                    payload=send_body(room_id, "other sensor 17", txn_id="dev-17"))
    assert other.code == "2.04"
    assert cbor2.loads(other.payload)["event_id"] != cbor2.loads(first.payload)["event_id"]
    bodies = [event["content"]["body"] for event in synapse.text_messages(device.access_token, room_id)]
    assert bodies == ["other sensor 17", "reading 17"]  # newest first, each once
    devices = synapse.request("GET", "/_matrix/client/v3/devices", token=device.access_token)["devices"]
    gateway_devices = [d for d in devices if d["device_id"].startswith("COMATRIX")]
    assert len(gateway_devices) == 1, devices  # one device for the entry, not one per restart
    assert gateway_devices[0]["display_name"] == "CoMatrix gateway"
    # The restarted gateway reused the token it kept in its store: one login in all.
    log_text = gw.log_text()
    assert log_text.count(" listening on ") == 2  # the log holds both runs
    assert log_text.count("Logging in configured device credentials") == 1
    assert gw.remember_stored_tokens() == 1


def test_dropin_plugin_is_served(make_gateway, synapse: SynapseServer, synapse_user, tmp_path: Path) -> None:
    device = synapse_user("dev")
    room_id = synapse.create_room(device.access_token)
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "sensor.py").write_text((REPO / "examples" / "plugins" / "sensor.py").read_text())
    gw = make_gateway(plugin_dirs=[plugin_dir], config_text=f'[plugins.sensor]\nroom = "{room_id}"\n')
    core = libcoap("get", gw.uri(".well-known/core?rt=comatrix.example.sensor")).text()
    assert core.startswith("</sensor>")
    posted = libcoap("post", gw.uri("sensor"), content_format=CBOR, options=[(TOKEN, device.access_token)],
                     payload=cbor2.dumps({"temp": 21.5, "hum": 40, "seq": 7}))
    assert posted.code == "2.04"
    latest = synapse.messages(device.access_token, room_id, limit=1, types=["m.room.message"])[0]
    assert latest["content"]["body"] == "temp=21.5 hum=40"
    assert latest["content"]["org.comatrix.readings"] == {"temp": "21.5", "hum": 40}


def test_bind_failure_exits_with_one_line(make_gateway) -> None:
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", 0))
    try:
        gw = make_gateway(start=False, port=busy.getsockname()[1])
        gw.start(wait=False)
        assert gw.wait_exit(30) != 0
        lines = [line for line in gw.output_text().splitlines() if line.strip()]
        assert lines == [f"comatrix: cannot listen on [127.0.0.1]:{gw.port}: Address already in use"]
    finally:
        busy.close()


def test_credentials_open_to_others_refuse_the_start_with_one_line(make_gateway, synapse_user,
                                                                   tmp_path: Path) -> None:
    device = synapse_user("dev")
    credentials = tmp_path / "credentials.toml"
    credentials.write_text(f'[[devices]]\naddress = "127.0.0.0/8"\nuser = "{device.user_id}"\n'
                           f'password = "{device.password}"\n')
    credentials.chmod(0o644)
    gw = make_gateway(start=False, config_text=f'credentials_file = "{credentials}"\n')
    gw.start(wait=False)
    assert gw.wait_exit(30) != 0
    lines = [line for line in gw.output_text().splitlines() if line.strip()]
    assert lines == [f"comatrix: {credentials} holds secrets and is readable by others (mode 0644); "
                     "chmod o-rwx it"]
    credentials.chmod(0o640)
    gw.start()
    assert gw.running
