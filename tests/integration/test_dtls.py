"""CoAP over DTLS 1.2 (PSK) against real peers: libcoap's OpenSSL and GnuTLS clients.

One gateway (with a real Synapse, ``security = "required"`` as Debian ships it)
has a ``[[devices]]`` entry found only by its PSK identity -- no address -- and
two test plugins: ``/dtlsprobe/ticker``
(observable, notifies every second) and ``/dtlsprobe/big`` (3 KB, block-wise).
Every operation a device does over plain CoAP is done here over coaps, and the
event the gateway sends appears in Synapse as the entry's user.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import socket
from typing import Any, Iterator

import cbor2
import pytest

from support import free_port
from support.coap_clients import CoapNoResponse, libcoap
from support.dtls import HELLO_VERIFY_REQUEST, client_hello, cookie_of, handshake_type
from support.gateway import GatewayProcess
from support.secrets import remember
from support.synapse import MatrixUser, SynapseServer

pytestmark = pytest.mark.integration

CBOR = 60
CLIENTS = ("coap-client-openssl", "coap-client-gnutls")
BIG = bytes(range(256)) * 12  # 3 KB

PROBE_PLUGIN = '''
"""Test plugins for the DTLS tests: an observable ticker and a 3 KB representation."""
from twisted.internet import task
from comatrix.coap import LinkAttributes, Request, Response
from comatrix.coap.resource import CoapResource
from comatrix.identity import device_of
from comatrix.resources import ResourcePlugin


class Ticker(CoapResource):
    link = LinkAttributes(rt="test.ticker", obs=True)

    def __init__(self, context):
        super().__init__()
        self.count = 0
        self.loop = task.LoopingCall(self.tick)
        self.loop.clock = context.reactor
        self.loop.start(1.0, now=False)

    def tick(self):
        self.count += 1
        self.notify_observers()

    def render_GET(self, request: Request) -> Response:
        return Response.text(f"{self.count} {device_of(request).key}")


class Big(CoapResource):
    link = LinkAttributes(rt="test.big")

    def __init__(self, context):
        super().__init__()

    def render_GET(self, request: Request) -> Response:
        return Response(payload=bytes(range(256)) * 12)


ticker = ResourcePlugin("dtlsprobe-ticker", ("dtlsprobe", "ticker"), Ticker)
big = ResourcePlugin("dtlsprobe-big", ("dtlsprobe", "big"), Big)
'''


@dataclasses.dataclass
class DtlsGateway:
    gateway: GatewayProcess
    device: MatrixUser
    room_id: str
    identity: str
    psk: str = dataclasses.field(repr=False)
    dtls_port: int

    def uri(self, path: str) -> str:
        return f"coaps://127.0.0.1:{self.dtls_port}/{path}"

    def request(self, client: str, method: str, path: str, *, identity: str | None = None,
                psk: str | None = None, **kwargs: Any) -> Any:
        credentials = ["-u", identity or self.identity, "-k", psk or self.psk]
        extra = credentials + list(kwargs.pop("extra_args", ()))
        return libcoap(method, self.uri(path), client=client, extra_args=extra, **kwargs)


@pytest.fixture(scope="module")
def dtls_gateway(synapse: SynapseServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DtlsGateway]:
    device = synapse.make_user("dtls")
    room_id = synapse.create_room(device.access_token)
    identity = "sensor-" + secrets.token_hex(4)
    psk = remember(secrets.token_urlsafe(24))
    workdir = tmp_path_factory.mktemp("dtls-gw")
    plugins = workdir / "plugins"
    plugins.mkdir()
    (plugins / "dtlsprobe.py").write_text(PROBE_PLUGIN)
    dtls_port = free_port("127.0.0.1", socket.SOCK_DGRAM)
    # The Debian default: plain CoAP reaches only /time and /.well-known/core.
    config = (f"security = \"required\"\ndtls_port = {dtls_port}\n\n[[devices]]\nuser = \"{device.user_id}\"\n"
              f"password = \"{device.password}\"\npsk_identity = \"{identity}\"\npsk = \"{psk}\"\n")
    gateway = GatewayProcess(synapse.base_url, workdir, config_text=config, plugin_dirs=[plugins])
    gateway.start()
    try:
        yield DtlsGateway(gateway, device, room_id, identity, psk, dtls_port)
    finally:
        gateway.stop()


@pytest.mark.parametrize("client", CLIENTS)
def test_every_operation_over_coaps(dtls_gateway: DtlsGateway, synapse: SynapseServer, client: str) -> None:
    gw = dtls_gateway
    now = gw.request(client, "get", "time")
    assert now.code == "2.05" and now.text().isdigit()
    core = gw.request(client, "get", ".well-known/core").text()
    assert "</send>" in core and "</dtlsprobe/ticker>" in core
    text = f"over {client} {secrets.token_hex(3)}"
    sent = gw.request(client, "post", "send", content_format=CBOR,
                      payload=cbor2.dumps({"room_id": gw.room_id, "body": text, "txn_id": text}))
    assert sent.code == "2.04", sent.payload
    latest = synapse.text_messages(gw.device.access_token, gw.room_id, limit=1)[0]
    assert (latest["sender"], latest["content"]["body"]) == (gw.device.user_id, text)
    got = gw.request(client, "get", f"getmsg?room={gw.room_id.replace('!', '%21')}")
    assert got.code == "2.05"
    assert cbor2.loads(got.payload)["body"] == text
    assert cbor2.loads(got.payload)["sender"] == gw.device.user_id


@pytest.mark.parametrize("client", CLIENTS)
def test_observe_and_block2_over_coaps(dtls_gateway: DtlsGateway, client: str) -> None:
    gw = dtls_gateway
    observed = gw.request(client, "get", "dtlsprobe/ticker", observe_seconds=4)
    values = [pdu.payload.decode() for pdu in observed.responses if pdu.code == "2.05"]
    assert len(values) >= 4, values  # the registration's answer and 3 notifications
    counts = [int(value.split()[0]) for value in values]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    # The resource saw the device by its PSK identity, not its address.
    assert {value.split()[1] for value in values} == {f"dtls:{gw.identity}"}
    download = gw.request(client, "get", "dtlsprobe/big", block_size=64)
    assert download.code == "2.05" and download.payload == BIG
    assert len([pdu for pdu in download.responses if pdu.code == "2.05"]) == len(BIG) // 64


def _requests_logged(gw: DtlsGateway) -> int:
    return len(re.findall(r" GET /dtlsprobe/big 2\.05", gw.gateway.log_text()))


@pytest.mark.parametrize("client", CLIENTS)
def test_wrong_psk_or_unknown_identity_gets_no_application_data_through(dtls_gateway: DtlsGateway,
                                                                         client: str) -> None:
    gw = dtls_gateway
    before = _requests_logged(gw)
    wrong = remember(secrets.token_urlsafe(24))
    for credentials in ({"psk": wrong}, {"identity": "nobody-" + secrets.token_hex(3)}):
        with pytest.raises((CoapNoResponse, AssertionError)):
            gw.request(client, "get", "dtlsprobe/big", timeout=3, **credentials)
    assert _requests_logged(gw) == before
    assert "DTLS handshake with" in gw.gateway.log_text()


def test_plain_coap_from_the_same_address_gets_nothing_of_the_device(dtls_gateway: DtlsGateway) -> None:
    gw = dtls_gateway
    plain = libcoap("post", gw.gateway.uri("send"), content_format=CBOR,
                    payload=cbor2.dumps({"room_id": gw.room_id, "body": "plain"}))
    assert (plain.code, plain.payload) == ("4.01", b"security required")
    assert libcoap("get", gw.gateway.uri("time")).code == "2.05"


def test_versions_advertise_the_listening_dtls_port(dtls_gateway: DtlsGateway) -> None:
    answer = dtls_gateway.request("coap-client-openssl", "get", "0")
    assert answer.code == "2.05"
    assert answer.cbor()["org.matrix.msc3079.low_bandwidth"]["dtls"] == dtls_gateway.dtls_port


def test_a_forged_client_hello_gets_one_small_hello_verify_request(dtls_gateway: DtlsGateway) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as forger:
        forger.bind(("127.0.0.3", 0))
        forger.settimeout(1.0)
        hello = client_hello()
        forger.sendto(hello, ("127.0.0.1", dtls_gateway.dtls_port))
        answer = forger.recv(65535)
        assert handshake_type(answer) == HELLO_VERIFY_REQUEST and len(answer) <= len(hello)
        # A cookie made for this address and port does not work from another port.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
            other.bind(("127.0.0.3", 0))
            other.settimeout(1.0)
            other.sendto(client_hello(cookie_of(answer), 1, 1), ("127.0.0.1", dtls_gateway.dtls_port))
            assert handshake_type(other.recv(65535)) == HELLO_VERIFY_REQUEST
        with pytest.raises(socket.timeout):
            forger.recv(65535)  # nothing else came: no retransmission, no session
    assert "127.0.0.3" not in dtls_gateway.gateway.log_text()


def test_gateway_log_names_the_session_and_never_the_key(dtls_gateway: DtlsGateway) -> None:
    log_text = dtls_gateway.gateway.log_text()
    assert f"identity {dtls_gateway.identity}, PSK-AES128-CCM8" in log_text
    assert "closed its session" in log_text  # libcoap ends with a close_notify
    assert dtls_gateway.psk not in log_text


def test_a_busy_dtls_port_ends_the_start_with_one_line(make_gateway) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        taken = busy.getsockname()[1]
        gw = make_gateway(start=False, extra_args=["--dtls-port", str(taken)])
        gw.start(wait=False)
        assert gw.wait_exit(30) != 0
        lines = [line for line in gw.output_text().splitlines() if line.strip()]
        assert lines == [f"comatrix: cannot listen on [127.0.0.1]:{taken}: Address already in use"]
