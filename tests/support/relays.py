"""Relays that record what passes (to a real homeserver over TCP, to the gateway over UDP), so tests can prove it."""

from __future__ import annotations

import selectors
import socket
import threading

from typing import Any

__all__ = ["RelayThread", "CountingTcpRelay", "RecordingUdpRelay"]


class RelayThread:
    """What every relay shares: a daemon thread running ``_run`` while the ``with`` block lasts.

    ``_run`` loops until ``self._stop`` is set; the sockets in ``self._sockets`` are closed
    when the block ends.
    """

    name = "relay"

    def __init__(self, *sockets: socket.socket) -> None:
        self._sockets = sockets
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self._sockets:
            sock.close()


class CountingTcpRelay(RelayThread):
    """A TCP relay in front of Synapse that counts connections and HTTP requests passing through."""

    name = "tcp-relay"

    METHODS = (b"GET ", b"PUT ", b"POST ", b"DELETE ", b"HEAD ", b"OPTIONS ")

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.requests: list[bytes] = []
        super().__init__(self.listener)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.listener, selectors.EVENT_READ, None)
        peers: dict[socket.socket, socket.socket] = {}
        while not self._stop.is_set():
            for key, _ in selector.select(timeout=0.05):
                sock = key.fileobj
                if sock is self.listener:
                    client, _ = self.listener.accept()
                    upstream = socket.create_connection(("127.0.0.1", self.target_port))
                    self.connections += 1
                    peers[client], peers[upstream] = upstream, client
                    selector.register(client, selectors.EVENT_READ, "client")
                    selector.register(upstream, selectors.EVENT_READ, "upstream")
                    continue
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    other = peers.pop(sock)
                    peers.pop(other, None)
                    for s in (sock, other):
                        selector.unregister(s)
                        s.close()
                    continue
                if key.data == "client" and data.startswith(self.METHODS):
                    self.requests.append(data.split(b" HTTP/")[0][:200])
                peers[sock].sendall(data)
        for sock in peers:
            sock.close()
        selector.close()


class RecordingUdpRelay(RelayThread):
    """A UDP relay in front of the gateway that records every datagram as ("up"|"down", bytes).

    One client at a time (answers go to whoever sent last).  The gateway sees the
    relay's address, not the client's: what identifies the device must be in the
    datagrams themselves.
    """

    name = "udp-relay"

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.listener.bind((host, 0))
        self.port = self.listener.getsockname()[1]
        self.upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.upstream.bind((host, 0))
        self.upstream.connect((host, target_port))
        self.datagrams: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._client: tuple[str, int] | None = None
        super().__init__(self.listener, self.upstream)

    def mark(self) -> int:
        with self._lock:
            return len(self.datagrams)

    def since(self, mark: int = 0) -> list[tuple[str, bytes]]:
        with self._lock:
            return self.datagrams[mark:]

    def _record(self, way: str, data: bytes) -> None:
        with self._lock:
            self.datagrams.append((way, data))

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.listener, selectors.EVENT_READ, "up")
        selector.register(self.upstream, selectors.EVENT_READ, "down")
        while not self._stop.is_set():
            for key, _ in selector.select(timeout=0.05):
                # Recorded before it is forwarded: once a peer has an answer, the relay has it too.
                try:
                    if key.data == "up":
                        data, self._client = self.listener.recvfrom(65536)
                        self._record("up", data)
                        self.upstream.send(data)
                    else:
                        data = self.upstream.recv(65536)
                        self._record("down", data)
                        if self._client is not None:
                            self.listener.sendto(data, self._client)
                except OSError:
                    continue  # e.g. ICMP port unreachable while the gateway restarts
        selector.close()
