"""Fixtures for tests that talk CoAP to a real `CoapServer`.

``live_server`` starts an in-process `comatrix.coap.server.CoapServer` on
loopback (the reactor runs in the test's main thread under pytest-twisted), with
the resources of ``serve_testsite.py``.  It records every datagram the server
receives and sends, so tests can check what went over the wire without a packet
capture.  Peers (aiocoap, ``aiocoap-client``, ``coap-client-notls``) must run in
worker threads or subprocesses so the reactor keeps serving: see `in_thread`,
`run_command` and `run_aiocoap`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import subprocess
import sys
from typing import Any, Awaitable, Callable, Iterator, TypeVar, cast

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import serve_testsite  # noqa: E402  (needs the path above)

T = TypeVar("T")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_BIN = os.path.dirname(sys.executable)
SERVE_TESTSITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_testsite.py")
#: Generous bound for anything that should take well under a second.
POLL_TIMEOUT = 15.0


def aiocoap_client_path() -> str:
    """The ``aiocoap-client`` CLI of the venv running the tests; missing = failure, not skip."""
    path = os.path.join(VENV_BIN, "aiocoap-client")
    if not os.access(path, os.X_OK):
        pytest.fail(f"aiocoap-client not found at {path}: install the 'test' extra (aiocoap)")
    return path


def libcoap_client_path() -> str:
    """libcoap's ``coap-client-notls``; missing = failure, not skip."""
    path = shutil.which("coap-client-notls")
    if path is None:
        pytest.fail("coap-client-notls not found: install Debian package libcoap3-bin")
    return path


def subprocess_env() -> dict[str, str]:
    """Environment for child Pythons: the repository importable, no output buffering."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def poll(predicate: Callable[[], bool], what: str, timeout: float = POLL_TIMEOUT,
               interval: float = 0.02) -> None:
    """Let the reactor run until ``predicate()`` holds; fail after ``timeout`` seconds."""
    for _ in range(int(timeout / interval) + 1):
        if predicate():
            return
        await sleep(interval)
    if not predicate():
        raise AssertionError(f"timed out after {timeout} s waiting for: {what}")


def in_thread(func: Callable[..., T], *args: Any, **kwargs: Any) -> "defer.Deferred[T]":
    """Start blocking ``func`` in the reactor's thread pool now; the reactor keeps serving."""
    return threads.deferToThread(func, *args, **kwargs)


def run_command(args: list[str], timeout: float = 60.0,
                stdin: bytes | None = None) -> "defer.Deferred[subprocess.CompletedProcess[bytes]]":
    """Start a peer program now (waited on in a thread); the Deferred fires when it exits."""
    return in_thread(subprocess.run, args, input=stdin, capture_output=True, timeout=timeout,
                     env=subprocess_env())


def run_aiocoap(body: Callable[..., Awaitable[T]], *args: Any, timeout: float = 60.0) -> T:
    """Blocking: ``await body(context, *args)`` with a fresh aiocoap client context in a new event loop.

    Call through `in_thread`: aiocoap needs its own asyncio loop, the main thread runs Twisted.
    """
    import aiocoap

    async def main() -> T:
        context = await aiocoap.Context.create_client_context()
        try:
            return await asyncio.wait_for(body(context, *args), timeout)
        finally:
            await context.shutdown()

    return asyncio.run(main())


@dataclasses.dataclass
class Datagram:
    data: bytes
    addr: tuple[Any, ...]


class LiveServer:
    """An in-process CoapServer listening on loopback, plus what it saw and sent."""

    def __init__(self, host: str, settings: Any = None) -> None:
        from comatrix.coap.server import CoapServer, CoapSettings, listen_udp

        self.host = host
        self.site, self.resources = serve_testsite.build_site(reactor)  # type: ignore[arg-type]
        self.server = CoapServer(self.site, settings if settings is not None else CoapSettings(),
                                 reactor=reactor)
        # The concrete udp.Port (not just IListeningPort): the spy below wraps its write().
        self.port: Any = cast(Any, listen_udp(self.server, host, 0))
        self.portnum: int = self.port.getHost().port
        self.received: list[Datagram] = []
        self.sent: list[Datagram] = []
        #: Datagrams the server wrote that the test chose to lose (see `lose_next`).
        self.lost: list[Datagram] = []
        self._lose: list[Callable[[bytes], bool]] = []
        self._spy()

    def _spy(self) -> None:
        # Wrap the instance's entry and exit points; the class stays untouched.
        protocol = self.port.protocol
        original_receive = protocol.datagramReceived
        original_write = self.port.write

        def receive(data: bytes, addr: tuple[Any, ...]) -> Any:
            self.received.append(Datagram(data, addr))
            return original_receive(data, addr)

        def write(data: bytes, addr: Any = None) -> Any:
            for index, matches in enumerate(self._lose):
                if matches(data):
                    del self._lose[index]
                    self.lost.append(Datagram(data, addr))
                    return None
            self.sent.append(Datagram(data, addr))
            return original_write(data, addr)

        protocol.datagramReceived = receive
        self.port.write = write

    def lose_next(self, matches: Callable[[bytes], bool]) -> None:
        """Simulate loss: the next datagram the server sends for which ``matches`` holds is dropped."""
        self._lose.append(matches)

    def verify(self, host: str | None = None) -> None:
        """Count ``host`` (default: the bound address, which is the loopback client's) as verified.

        Tests of other features use it to see a verified peer's behaviour, which the
        amplification limit leaves unchanged; without it every peer starts unverified.
        """
        self.server.verify_peer(host or self.host)

    def bytes_to(self, host: str) -> tuple[int, int]:
        """(bytes received from, bytes sent to) ``host``, from the recorded datagrams."""
        return (sum(len(d.data) for d in self.received if d.addr[0] == host),
                sum(len(d.data) for d in self.sent if d.addr[0] == host))

    def uri(self, path: str = "", host: str | None = None) -> str:
        """``coap://`` URI of ``path`` on this server (``host`` overrides the bound address)."""
        host = host or self.host
        literal = f"[{host}]" if ":" in host else host
        return f"coap://{literal}:{self.portnum}/{path}"

    def observer_count(self, resource: Any = None) -> int:
        return int(self.server.observer_count(resource))

    def bump_counter(self, big: bool = False) -> int:
        """Change the observable counter (or ``/bigcounter``) and notify its observers."""
        counter = self.resources.bigcounter if big else self.resources.counter
        counter.value += 1
        counter.notify_observers()
        return int(counter.value)

    def decoded(self, datagrams: list[Datagram]) -> list[Any]:
        """aiocoap's decoding of datagrams (an independent parser); undecodable ones are left out."""
        from aiocoap import Message

        messages = []
        for datagram in datagrams:
            try:
                messages.append(Message.decode(datagram.data))
            except Exception:  # noqa: BLE001 - a peer's garbage is not our failure here
                continue
        return messages

    def stop(self) -> None:
        result = self.port.stopListening()
        if result is not None:
            pytest_twisted.blockon(result)
        self.server.close()  # cancels retransmission timers left on the real reactor


@pytest.fixture
def make_live_server() -> Iterator[Callable[..., LiveServer]]:
    """Factory: ``make_live_server(host="127.0.0.1", settings=None)``; all stopped at teardown."""
    started: list[LiveServer] = []

    def make(host: str = "127.0.0.1", settings: Any = None) -> LiveServer:
        server = LiveServer(host, settings)
        started.append(server)
        return server

    try:
        yield make
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def live_server(make_live_server: Callable[..., LiveServer]) -> LiveServer:
    """A fresh in-process server on 127.0.0.1 with default settings."""
    return make_live_server("127.0.0.1")


@pytest.fixture
def live_server_v6(make_live_server: Callable[..., LiveServer]) -> LiveServer:
    """A fresh in-process server on ::1 with default settings."""
    return make_live_server("::1")
