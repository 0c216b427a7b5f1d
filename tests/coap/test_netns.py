"""Link-local CoAP across network namespaces: the gateway on ``fe80::1%lowpan0``.

Two fresh namespaces joined by a veth pair stand in for a 6LoWPAN border router
and a device: the gateway end is named ``lowpan0`` and the only addresses are
``fe80::1`` (gateway) and ``fe80::2`` (device), plus a decoy uplink ``eth0``
(``fe80::a``) on the gateway whose fe80::/64 route comes first, so replies reach the device only
if the server keeps the zone id of link-local peers from receive to reply (facts
§7.17).  The server (``serve_testsite.py``) runs in the gateway namespace bound
to ``fe80::1%lowpan0`` and, in a second round, to ``::``; libcoap's ``coap-client-notls`` and ``aiocoap-client``
run in the device namespace against ``coap://[fe80::1%veth1]:PORT/``.  Both
clients take the zone raw (``%veth1``), not percent-encoded (``%25veth1``).

Needs root.  If namespaces cannot be made, the test FAILS (never skips).
"""

from __future__ import annotations

import hashlib
import os
import selectors
import subprocess
import sys
import time
import uuid
from typing import Iterator

import pytest

from conftest import SERVE_TESTSITE, aiocoap_client_path, libcoap_client_path, subprocess_env
from serve_testsite import DOWNLOAD

pytestmark = pytest.mark.netns

PORT = 5683
GATEWAY, DEVICE, DECOY = "fe80::1", "fe80::2", "fe80::a"
READY_TIMEOUT = 20.0
CLIENT_TIMEOUT = 30.0
UPLOAD = hashlib.shake_256(b"comatrix netns upload").digest(3 * 1024)


def ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if result.returncode != 0:
        pytest.fail(f"`ip {' '.join(args)}` failed ({result.returncode}): {result.stderr.strip()} "
                    "-- this test needs root and network namespaces; it does not skip")


class Namespaces:
    """Two namespaces (gateway, device) with a veth pair lowpan0 <-> veth1, fe80:: only."""

    def __init__(self) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.gateway = f"cmx-gw-{suffix}"
        self.device = f"cmx-dev-{suffix}"
        self.created: list[str] = []

    def create(self) -> None:
        for name in (self.gateway, self.device):
            ip("netns", "add", name)
            self.created.append(name)
        # A decoy uplink created first: its fe80::/64 route comes first, so a reply to
        # fe80::2 that lost its zone leaves on eth0 instead of lowpan0 (as on a real router).
        ip("-n", self.gateway, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
        for dev in ("eth0", "eth0p"):
            ip("-n", self.gateway, "link", "set", dev, "addrgenmode", "none")
        ip("-n", self.gateway, "addr", "add", f"{DECOY}/64", "dev", "eth0", "nodad")
        for dev in ("eth0", "eth0p"):
            ip("-n", self.gateway, "link", "set", dev, "up")
        ip("link", "add", "lowpan0", "netns", self.gateway, "type", "veth", "peer", "name", "veth1",
           "netns", self.device)
        for ns, dev, address in ((self.gateway, "lowpan0", GATEWAY), (self.device, "veth1", DEVICE)):
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", dev, "addrgenmode", "none")  # no EUI-64 address: fe80::1/::2 only
            ip("-n", ns, "addr", "add", f"{address}/64", "dev", dev, "nodad")
            ip("-n", ns, "link", "set", dev, "up")

    def destroy(self) -> None:
        for name in self.created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
        self.created.clear()

    def addresses(self, ns: str) -> str:
        return subprocess.run(["ip", "-n", ns, "-6", "addr"], capture_output=True, text=True,
                              timeout=20).stdout


def start_server(ns: Namespaces, host: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns.gateway, sys.executable, SERVE_TESTSITE,
         "--host", host, "--port", str(PORT), "--tick", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + READY_TIMEOUT
    try:
        while time.monotonic() < deadline:
            if selector.select(timeout=0.2):
                line = proc.stdout.readline()
                if line.startswith("READY "):
                    return proc
                if not line:
                    break
            if proc.poll() is not None:
                break
    finally:
        selector.close()
    proc.kill()
    _, err = proc.communicate(timeout=10)
    pytest.fail(f"test server did not start in {ns.gateway}: {err[-2000:]}")


# Bound to fe80::1%lowpan0 the kernel ties the socket to lowpan0, so even a reply without
# the zone would leave on lowpan0.  Bound to "::" (how the daemon is usually started) a reply
# to fe80::2 without the zone fails: that variant proves the zone is kept from receive to reply.
@pytest.fixture(params=[f"{GATEWAY}%lowpan0", "::"], ids=["bound-fe80::1%lowpan0", "bound-::"])
def link_local(request: pytest.FixtureRequest) -> Iterator[Namespaces]:
    ns = Namespaces()
    server: subprocess.Popen[str] | None = None
    try:
        ns.create()
        server = start_server(ns, request.param)
        yield ns
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        ns.destroy()


def in_device(ns: Namespaces, *args: str, timeout: float = CLIENT_TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["ip", "netns", "exec", ns.device, *args], capture_output=True, timeout=timeout,
                          env=subprocess_env())


def uri(path: str) -> str:
    return f"coap://[{GATEWAY}%veth1]:{PORT}/{path}"


def payload_of(result: subprocess.CompletedProcess[bytes]) -> bytes:
    out = result.stdout
    return out[:-1] if out.endswith(b"\n") else out


def test_only_link_local_addresses(link_local: Namespaces) -> None:
    for ns, expected in ((link_local.gateway, [GATEWAY, DECOY]), (link_local.device, [DEVICE])):
        addresses = link_local.addresses(ns)
        for address in expected:
            assert f"inet6 {address}/64 scope link" in addresses
        assert "scope global" not in addresses
        assert addresses.count("scope link") == len(expected), addresses


@pytest.mark.parametrize("non", [False, True], ids=["CON", "NON"])
def test_libcoap_methods(link_local: Namespaces, non: bool) -> None:
    for method in ("get", "post", "put", "delete"):
        args = [libcoap_client_path(), "-B", "10", "-m", method, "-e", "zone", uri("echo")]
        if non:
            args.insert(1, "-N")
        result = in_device(link_local, *args)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert payload_of(result) == method.upper().encode() + b":zone", (method, result)


def test_libcoap_blockwise(link_local: Namespaces, tmp_path: object) -> None:
    target = os.path.join(str(tmp_path), "download.bin")
    source = os.path.join(str(tmp_path), "upload.bin")
    with open(source, "wb") as f:
        f.write(UPLOAD)
    result = in_device(link_local, libcoap_client_path(), "-B", "10", "-b", "64", "-o", target, uri("download"))
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    with open(target, "rb") as f:
        assert f.read() == DOWNLOAD
    result = in_device(link_local, libcoap_client_path(), "-B", "10", "-m", "put", "-b", "64", "-f", source,
                       uri("upload"))
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert payload_of(result) == hashlib.sha256(UPLOAD).hexdigest().encode()


def test_libcoap_observe(link_local: Namespaces) -> None:
    """Notifications (sent by the server on its own, not as replies) also find the zoned peer."""
    result = in_device(link_local, libcoap_client_path(), "-B", "10", "-s", "3", "-w", uri("counter"))
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    values = [int(v) for v in result.stdout.split()]
    assert len(values) >= 4, values
    assert values == sorted(values)


def test_aiocoap_client(link_local: Namespaces) -> None:
    for method in ("GET", "POST", "PUT", "DELETE"):
        result = in_device(link_local, aiocoap_client_path(), "-m", method, "--payload", "zone", uri("echo"))
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert payload_of(result) == method.encode() + b":zone"
    result = in_device(link_local, aiocoap_client_path(), uri("download"))
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == DOWNLOAD
