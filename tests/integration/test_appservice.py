"""Application-service mode end to end (issue 12), against a real Synapse loaded with generated registrations.

One Synapse, two gateways ("pan A" with the default id and prefix, "pan B" with
``--id pan2 --prefix pan2_``), each its own application service.  Device users
are created with ``comatrixctl device add`` through the application service;
devices are stood in for by distinct loopback source addresses, with libcoap
(a peer no one here wrote) for the clean-form send and the reference client
(``comatrix.client``) for the fifty compact watchers.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import secrets
import socket
import threading
import time
import urllib.error
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import cbor2
import pytest

from comatrix import ctl
from comatrix.appservice.registration import Registration, load_registration
from comatrix.client import CompactDevice, DeviceState, UdpCoap
from comatrix.coap.numbers import Code
from comatrix.compact import codec
from comatrix.compact.codec import MessagesRequest
from support import free_port
from support.coap_clients import libcoap
from support.gateway import GatewayProcess
from support.secrets import leaks, remember
from support.synapse import MatrixUser, SynapseServer

pytestmark = pytest.mark.integration

CBOR = 60
WATCHERS = 50
#: Longest wait for something the homeserver pushes (a transaction after an invite or a send).
PUSH_WAIT = 30.0


@dataclass
class Pan:
    """One gateway in application-service mode and its registration."""

    gateway: GatewayProcess
    registration: Registration
    appservice_port: int
    devices: dict[str, str] = field(default_factory=dict)  # name -> user id

    @property
    def config(self) -> Path:
        assert self.gateway.config is not None
        return self.gateway.config

    def ctl(self, *args: str) -> str:
        out = io.StringIO()
        assert ctl.main(["--config", str(self.config), *args], out=out) == 0, out.getvalue()
        return out.getvalue()

    def add_device(self, name: str, address: str, *extra: str) -> str:
        printed = self.ctl("device", "add", name, "--address", address, *extra)
        user_id = next(line.split()[1] for line in printed.splitlines() if line.startswith("created "))
        self.devices[name] = user_id
        return user_id

    def coap(self, host: str, path: str) -> str:
        return f"coap://{host}:{self.gateway.port}/{path}"


def _make_pan(root: Path, synapse_url: str, name: str, *, id: str | None = None,
              prefix: str | None = None) -> Pan:
    workdir = root / name
    workdir.mkdir()
    port = free_port("127.0.0.1")
    registration_path = workdir / "appservice.yaml"
    config = (f'homeserver = "{synapse_url}"\n'
              "[limits]\ndevice_rate = 0\nglobal_rate = 0\n"
              f'[appservice]\nregistration = "{registration_path}"\nport = {port}\n')
    gateway = GatewayProcess(synapse_url, workdir, ip="::", config_text=config)
    out = io.StringIO()
    args = ["appservice", "generate", "--url", f"http://127.0.0.1:{port}", "-o", str(registration_path)]
    args += ["--id", id] if id else []
    args += ["--prefix", prefix] if prefix else []
    assert ctl.main(args, out=out) == 0, out.getvalue()
    registration = load_registration(registration_path)
    remember(registration.as_token)
    remember(registration.hs_token)
    return Pan(gateway, registration, port)


def _add_service(synapse: SynapseServer, pan: Pan) -> None:
    """Pan A also serves the HTTP API, to one service (its own Matrix user, a person's account)."""
    user = synapse.make_user("service")
    pan.service_token = remember(secrets.token_urlsafe(24))  # type: ignore[attr-defined]
    pan.http_port = free_port("127.0.0.1")  # type: ignore[attr-defined]
    pan.config.write_text(pan.config.read_text() + (
        f"[http_api]\nenabled = true\nport = {pan.http_port}\n"  # type: ignore[attr-defined]
        f'[[services]]\nname = "svc"\ntoken = "{pan.service_token}"\nuser = "{user.user_id}"\n'  # type: ignore[attr-defined]
        f'password = "{user.password}"\nusers = ["@comatrix_sensor01:*"]\n'))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SynapseServer, Pan, Pan]]:
    root = tmp_path_factory.mktemp("appservice")
    synapse_port = free_port("127.0.0.1")
    url = f"http://127.0.0.1:{synapse_port}"
    pan_a = _make_pan(root, url, "pan-a")
    pan_b = _make_pan(root, url, "pan-b", id="pan2", prefix="pan2_")
    synapse = SynapseServer(root / "synapse", port=synapse_port, extra_config={
        "app_service_config_files": [str(pan.gateway.workdir / "appservice.yaml") for pan in (pan_a, pan_b)]})
    synapse.start()
    try:
        pan_a.add_device("sensor01", "::1")
        pan_a.add_device("guarded", "127.0.0.2", "--allow-invites-from", "@nobody:test.local")
        pan_a.add_device("msc", "127.0.0.4")
        for index in range(WATCHERS):
            pan_a.add_device(f"w{index:02d}", f"127.0.0.{10 + index}")
        pan_b.add_device("sensor", "127.0.0.3")
        _add_service(synapse, pan_a)
        for pan in (pan_a, pan_b):
            pan.gateway.start()
        yield synapse, pan_a, pan_b
    finally:
        for pan in (pan_a, pan_b):
            pan.gateway.stop()
        synapse.stop()
    found = leaks([path for pan in (pan_a, pan_b) for path in (pan.gateway.log_path, pan.gateway.output_path)])
    assert not found, f"secrets in gateway logs: {found}"


def _quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _membership(synapse: SynapseServer, token: str, room_id: str, user_id: str) -> str | None:
    status, body = synapse.request_raw("GET", f"/_matrix/client/v3/rooms/{_quote(room_id)}/state/"
                                              f"m.room.member/{_quote(user_id)}", token=token)
    return body.get("membership") if status == 200 and isinstance(body, dict) else None


def _wait_membership(synapse: SynapseServer, token: str, room_id: str, user_ids: list[str],
                     wanted: str) -> None:
    deadline = time.monotonic() + PUSH_WAIT
    pending = list(user_ids)
    while pending:
        pending = [user for user in pending if _membership(synapse, token, room_id, user) != wanted]
        if not pending:
            return
        assert time.monotonic() < deadline, f"{len(pending)} user(s) not {wanted}: {pending[:3]}"
        time.sleep(0.2)


def _room_with(synapse: SynapseServer, person: MatrixUser, users: list[str]) -> str:
    room_id = synapse.create_room(person.access_token, preset="private_chat")
    for user_id in users:
        synapse.invite(person.access_token, room_id, user_id)
    return room_id


def test_synapse_pings_the_gateway(world: tuple[SynapseServer, Pan, Pan]) -> None:
    synapse, pan_a, pan_b = world
    for pan in (pan_a, pan_b):
        answer = synapse.request("POST", f"/_matrix/client/v1/appservice/{pan.registration.id}/ping",
                                 token=pan.registration.as_token, body={"transaction_id": "ping-test"})
        assert isinstance(answer.get("duration_ms"), int)
    assert "Ping from the homeserver" in pan_a.gateway.log_text()


def test_device_users_exist_with_their_names(world: tuple[SynapseServer, Pan, Pan]) -> None:
    synapse, pan_a, pan_b = world
    assert pan_a.devices["sensor01"] == "@comatrix_sensor01:test.local"
    assert pan_b.devices["sensor"] == "@pan2_sensor:test.local"
    profile = synapse.request("GET", f"/_matrix/client/v3/profile/{_quote(pan_a.devices['sensor01'])}")
    assert profile["displayname"] == "sensor01"


def test_tokenless_send_acts_as_the_device_user(world: tuple[SynapseServer, Pan, Pan],
                                                synapse_person: MatrixUser) -> None:
    synapse, pan_a, _ = world
    user_id = pan_a.devices["sensor01"]
    room_id = _room_with(synapse, synapse_person, [user_id])
    _wait_membership(synapse, synapse_person.access_token, room_id, [user_id], "join")  # auto-accepted

    body = f"hello from ::1 {secrets.token_hex(4)}"
    result = libcoap("post", pan_a.coap("[::1]", "send"), content_format=CBOR,
                     payload=cbor2.dumps({"room_id": room_id, "txn_id": "t1", "body": body}),
                     extra_args=["-a", "::1"])
    assert result.code == "2.04", result
    events = synapse.messages(synapse_person.access_token, room_id, limit=10)
    sent = [event for event in events if event.get("content", {}).get("body") == body]
    assert len(sent) == 1 and sent[0]["sender"] == user_id


def test_msc3079_requests_act_as_the_device_user_only(world: tuple[SynapseServer, Pan, Pan]) -> None:
    """An MSC3079 pass-through from the device asks whoami; a user_id it adds to the query is dropped."""
    _, pan_a, _ = world
    own, other = pan_a.devices["sensor01"], pan_a.devices["w00"]
    for query in ("", f"?user_id={_quote(other)}"):
        result = libcoap("get", pan_a.coap("[::1]", f"_matrix/client/v3/account/whoami{query}"),
                         extra_args=["-a", "::1"])
        assert result.code == "2.05", result
        assert own.encode() in result.payload and other.encode() not in result.payload


def test_msc3079_sync_observation_is_woken_by_transactions(world: tuple[SynapseServer, Pan, Pan],
                                                           synapse_person: MatrixUser) -> None:
    """An MSC3079 /sync Observe of a provisioned device: each message comes as a notification,
    and the gateway syncs only when told there is news (timeout=0), never long-polling."""
    synapse, pan_a, _ = world
    user_id = pan_a.devices["msc"]
    room_id = _room_with(synapse, synapse_person, [user_id])
    _wait_membership(synapse, synapse_person.access_token, room_id, [user_id], "join")
    bodies = [f"msc3079 push {index} {secrets.token_hex(3)}" for index in range(2)]

    def send_later() -> None:
        for body in bodies:
            time.sleep(3)
            synapse.send_text(synapse_person.access_token, room_id, body)
    sender = threading.Thread(target=send_later)
    sender.start()
    try:
        result = libcoap("get", pan_a.coap("127.0.0.1", "7"), observe_seconds=10, extra_args=["-a", "127.0.0.4"])
    finally:
        sender.join()
    notified = [pdu.payload for pdu in result.responses[1:]]
    for body in bodies:
        assert sum(body.encode() in payload for payload in notified) == 1, (body, len(notified))
    syncs = [line for line in synapse.log_text().splitlines() if "/_matrix/client/v3/sync" in line]
    assert syncs and all("timeout=0" in line for line in syncs), [line[-160:] for line in syncs[-3:]]


def test_the_http_api_acts_for_device_users_of_the_namespace_only(world: tuple[SynapseServer, Pan, Pan],
                                                                  synapse_person: MatrixUser) -> None:
    """In appservice mode a service may name a device user as the sender; anyone else is still 403."""
    import urllib.request
    synapse, pan_a, _ = world
    device_user = pan_a.devices["sensor01"]
    room_id = _room_with(synapse, synapse_person, [device_user])
    _wait_membership(synapse, synapse_person.access_token, room_id, [device_user], "join")

    def send(sender: str) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{pan_a.http_port}/internal/matrix/send", method="POST",  # type: ignore[attr-defined]
            data=json.dumps({"room_id": room_id, "body": f"as {sender}", "sender_matrix_id": sender}).encode(),
            headers={"X-Internal-Service-Token": pan_a.service_token,  # type: ignore[attr-defined]
                     "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    status, answer = send(device_user)
    assert status == 200, answer
    event = next(e for e in synapse.messages(synapse_person.access_token, room_id, limit=5)
                 if e["event_id"] == answer["event_id"])
    assert event["sender"] == device_user
    status, answer = send(synapse_person.user_id)  # a person outside the namespace
    assert status == 403 and answer["error"] == "M_FORBIDDEN"
    status, answer = send(pan_a.devices["w00"])  # in the namespace, but not one of the service's users
    assert status == 403 and answer["error"] == "M_FORBIDDEN"


def test_invites_from_disallowed_users_are_declined(world: tuple[SynapseServer, Pan, Pan],
                                                    synapse_person: MatrixUser) -> None:
    synapse, pan_a, _ = world
    guarded = pan_a.devices["guarded"]  # allow_invites_from = ["@nobody:test.local"]
    room_id = _room_with(synapse, synapse_person, [guarded])
    _wait_membership(synapse, synapse_person.access_token, room_id, [guarded], "leave")
    assert "declined the invitation" in pan_a.gateway.log_text()


@pytest.fixture(scope="module")
def synapse_person(world: tuple[SynapseServer, Pan, Pan]) -> MatrixUser:
    return world[0].make_user("person")


class Watcher:
    """One compact device observing a room's messages from its own source address."""

    def __init__(self, pan: Pan, address: str, user_id: str) -> None:
        self.pan, self.address, self.user_id = pan, address, user_id
        self.state = DeviceState(None, {})
        self.bodies: list[str] = []
        self.cursors: list[int] = []
        self.registered = threading.Event()
        self._connect()

    def _connect(self) -> None:
        self.coap = UdpCoap(self.pan.coap(self.address, ""), source=self.address, ack_timeout=1.0)
        self.device = CompactDevice(self.coap, self.state)

    def start(self, room_id: str) -> None:
        self.device.login(self.user_id, "")  # a provisioned device user: no password
        self.room_handle = self.device.join(room_id)

    def watch(self, cursor: int | None) -> None:
        """Observe until `close`.  The first answer is the latest message (skipped), or with
        ``cursor`` the message after it (kept: it arrived while the device was not watching)."""
        request = MessagesRequest(self.device.handle, self.room_handle, cursor).encode()
        try:
            for index, reply in enumerate(self.coap.observe(Code.FETCH, codec.PATHS["messages"], payload=request,
                                                            content_format=codec.CONTENT_FORMAT)):
                if index == 0:
                    self.registered.set()
                    if cursor is None:
                        continue
                message = codec.decode_message(reply.payload)
                if message is not None:
                    self.bodies.append(message.body)
                    self.cursors.append(message.cursor)
        except OSError:
            pass  # closed: the watch is over

    def close(self) -> None:
        # shutdown() wakes the thread blocked in recvfrom (close() alone would not); once the
        # socket is closed its next recvfrom raises, which ends the watch.
        with contextlib.suppress(OSError):
            self.coap.sock.shutdown(socket.SHUT_RDWR)
        self.coap.close()

    def reconnect(self) -> None:
        self._connect()


@contextlib.contextmanager
def watching(watchers: list[Watcher], cursors: list[int | None] | None = None) -> Iterator[None]:
    """Every watcher observing in a thread of its own until the block ends."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(watchers))
    futures = [pool.submit(watcher.watch, cursors[index] if cursors else None)
               for index, watcher in enumerate(watchers)]
    try:
        for watcher in watchers:
            assert watcher.registered.wait(PUSH_WAIT), "an observation was not registered"
        yield
    finally:
        for watcher in watchers:
            watcher.close()
        for future in futures:
            future.result(timeout=PUSH_WAIT)
        pool.shutdown()
        for watcher in watchers:
            watcher.registered.clear()
            watcher.reconnect()


def _wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + PUSH_WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _sync_requests(synapse: SynapseServer) -> int:
    return synapse.log_text().count("/_matrix/client/v3/sync")


def test_fifty_watchers_each_get_every_message_once(world: tuple[SynapseServer, Pan, Pan],
                                                     synapse_person: MatrixUser) -> None:
    synapse, pan_a, pan_b = world
    users = [pan_a.devices[f"w{index:02d}"] for index in range(WATCHERS)]
    room_id = _room_with(synapse, synapse_person, users)
    _wait_membership(synapse, synapse_person.access_token, room_id, users, "join")
    watchers = [Watcher(pan_a, f"127.0.0.{10 + index}", user) for index, user in enumerate(users)]
    for watcher in watchers:
        watcher.start(room_id)
    syncs_before = _sync_requests(synapse)

    with watching(watchers):
        first = f"to all fifty {secrets.token_hex(3)}"
        event_id = synapse.send_text(synapse_person.access_token, room_id, first)
        _wait_for(lambda: all(first in watcher.bodies for watcher in watchers), "every watcher to get it")

        # The homeserver pushes the same transaction again (it never saw our 200), and then the
        # same event in a transaction of another id: nobody gets it a second time.
        event = next(event for event in synapse.messages(synapse_person.access_token, room_id, limit=5)
                     if event["event_id"] == event_id)
        for txn_id in ("replayed-1", "replayed-1", "replayed-2"):
            _push_transaction(pan_a, txn_id, [event])
        second = f"and one more {secrets.token_hex(3)}"
        synapse.send_text(synapse_person.access_token, room_id, second)
        _wait_for(lambda: all(second in watcher.bodies for watcher in watchers), "the second message")

    for watcher in watchers:
        assert watcher.bodies == [first, second], watcher.bodies
    assert _sync_requests(synapse) == syncs_before, "the gateway made /sync requests while devices watched"
    assert room_id not in pan_b.gateway.log_text()  # pan B's namespace has no member in this room

    # A gateway restart: what is sent while it is down arrives after it, once, in order.
    few = watchers[:5]
    cursors: list[int | None] = [watcher.cursors[-1] for watcher in few]
    pan_a.gateway.stop()
    while_down = f"while the gateway was down {secrets.token_hex(3)}"
    synapse.send_text(synapse_person.access_token, room_id, while_down)
    pan_a.gateway.start()
    with watching(few, cursors):
        after = f"after the restart {secrets.token_hex(3)}"
        synapse.send_text(synapse_person.access_token, room_id, after)
        _wait_for(lambda: all(after in watcher.bodies for watcher in few), "the message after the restart")
    for watcher in few:
        assert watcher.bodies == [first, second, while_down, after], watcher.bodies
        assert watcher.cursors == sorted(set(watcher.cursors))
    assert _sync_requests(synapse) == syncs_before


def _push_transaction(pan: Pan, txn_id: str, events: list[dict[str, Any]]) -> None:
    """PUT a transaction to the gateway as the homeserver does (its hs_token)."""
    import urllib.request
    request = urllib.request.Request(
        f"http://127.0.0.1:{pan.appservice_port}/_matrix/app/v1/transactions/{txn_id}",
        data=json.dumps({"events": events}).encode(), method="PUT",
        headers={"Authorization": f"Bearer {pan.registration.hs_token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def test_two_gateways_see_only_their_own_devices(world: tuple[SynapseServer, Pan, Pan],
                                                 synapse_person: MatrixUser) -> None:
    synapse, pan_a, pan_b = world
    room_b = _room_with(synapse, synapse_person, [pan_b.devices["sensor"]])
    _wait_membership(synapse, synapse_person.access_token, room_b, [pan_b.devices["sensor"]], "join")
    watcher = Watcher(pan_b, "127.0.0.3", pan_b.devices["sensor"])
    watcher.start(room_b)
    with watching([watcher]):
        text = f"for pan B only {secrets.token_hex(3)}"
        synapse.send_text(synapse_person.access_token, room_b, text)
        _wait_for(lambda: text in watcher.bodies, "pan B's device to get its message")
    assert watcher.bodies == [text]
    assert room_b in pan_b.gateway.log_text()
    assert room_b not in pan_a.gateway.log_text()


def test_device_remove_deactivates_the_user(world: tuple[SynapseServer, Pan, Pan]) -> None:
    synapse, pan_a, _ = world
    user_id = pan_a.add_device("short-lived", "127.0.0.200")
    pan_a.ctl("device", "remove", "short-lived")
    status, body = synapse.request_raw("POST", "/_matrix/client/v3/register",
                                       token=pan_a.registration.as_token,
                                       body={"type": "m.login.application_service",
                                             "username": user_id[1:].split(":")[0]})
    assert status == 400 and body["errcode"] == "M_USER_IN_USE"  # the user stays, deactivated
    _admin, admin_token, _device = synapse.register_admin()
    account = synapse.request("GET", f"/_synapse/admin/v2/users/{_quote(user_id)}", token=admin_token)
    assert account["deactivated"] is True
    assert not (pan_a.config.parent / "devices.d" / "short-lived.toml").exists()
