"""The bounded table of DTLS sessions: per source address and in total, with idle expiry.

Pure bookkeeping (no OpenSSL, no I/O), so its bounds can be tested on their own.
A session counts against its host (the address without the port: one device
that reboots and comes back from a new source port must not crowd out others).
"""

from __future__ import annotations

import dataclasses
from typing import Generic, Iterator, TypeVar

Address = tuple[str, int]
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class DtlsSettings:
    """Limits of the DTLS port (the ``[dtls]`` config table)."""

    #: Sessions (established or in handshake) at once, all peers together.
    max_sessions: int = 256
    #: Sessions one host (address without port) may hold at once.
    sessions_per_address: int = 4
    #: Seconds without a datagram in either direction after which a session ends.
    idle_timeout: float = 900.0
    #: Seconds a handshake may take before its half-open session is dropped.
    handshake_timeout: float = 30.0
    #: Largest datagram OpenSSL builds for a handshake flight (IPv6 minimum MTU minus headers).
    mtu: int = 1232

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or self.sessions_per_address < 1:
            raise ValueError("max_sessions and sessions_per_address must be at least 1")
        if self.idle_timeout <= 0 or self.handshake_timeout <= 0:
            raise ValueError("idle_timeout and handshake_timeout must be positive")
        if not 256 <= self.mtu <= 65507:
            raise ValueError("mtu must be between 256 and 65507")


@dataclasses.dataclass(eq=False)
class Entry(Generic[T]):
    """One session as the table sees it: its value, when it started and was last active."""

    address: Address
    value: T
    started: float
    last_active: float
    established: bool = False


class SessionTable(Generic[T]):
    """Sessions by peer address, with a per-host share and a total bound."""

    def __init__(self, settings: DtlsSettings) -> None:
        self.settings = settings
        self._entries: dict[Address, Entry[T]] = {}
        self._per_host: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(list(self._entries.values()))

    def get(self, address: Address) -> Entry[T] | None:
        return self._entries.get(address)

    def host_count(self, host: str) -> int:
        return self._per_host.get(host, 0)

    def has_room(self, address: Address) -> bool:
        """Whether a new session for ``address`` fits (one it replaces is not counted)."""
        existing = 1 if address in self._entries else 0
        if len(self._entries) - existing >= self.settings.max_sessions:
            return False
        return self.host_count(address[0]) - existing < self.settings.sessions_per_address

    def add(self, address: Address, value: T, now: float) -> Entry[T]:
        """Add a session; the caller checked `has_room` and removed any old one for ``address``."""
        if address in self._entries:
            raise KeyError(f"a session for {address} exists")
        entry = Entry(address, value, started=now, last_active=now)
        self._entries[address] = entry
        self._per_host[address[0]] = self.host_count(address[0]) + 1
        return entry

    def remove(self, address: Address) -> Entry[T] | None:
        entry = self._entries.pop(address, None)
        if entry is not None:
            left = self._per_host[address[0]] - 1
            if left:
                self._per_host[address[0]] = left
            else:
                del self._per_host[address[0]]
        return entry

    def expired(self, now: float) -> list[Entry[T]]:
        """Sessions idle too long, and handshakes that took too long (not removed here)."""
        settings = self.settings
        return [entry for entry in self._entries.values()
                if now - entry.last_active >= settings.idle_timeout
                or (not entry.established and now - entry.started >= settings.handshake_timeout)]
