"""A bounded, expiring mapping without one timer per entry.

Used for message deduplication, block-wise state and notification message
ids.  Entries leave in insertion order, either when the capacity is exceeded
or lazily once their lifetime has passed (checked on every insert), so memory
is bounded by the capacity and no DelayedCall is created per message.
txThings keeps every message plus a DelayedCall for 247 s (facts §7.16).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Iterator, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """FIFO-evicting, lazily expiring dict: ``capacity`` entries for ``lifetime`` seconds."""

    def __init__(self, capacity: int, lifetime: float, clock: Callable[[], float]) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.lifetime = lifetime
        self._clock = clock
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return self.get(key) is not None  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._data))

    def get(self, key: K) -> V | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._data[key]
            return None
        return entry[1]

    def put(self, key: K, value: V) -> None:
        """Insert (or re-insert at the young end, with a fresh lifetime)."""
        now = self._clock()
        data = self._data
        if key in data:
            del data[key]
        data[key] = (now + self.lifetime, value)
        while len(data) > self.capacity:
            data.popitem(last=False)
        if data[next(iter(data))][0] <= now:
            self._expire(now)

    def replace(self, key: K, value: V) -> bool:
        """Change the value of a live entry, keeping its position and expiry."""
        entry = self._data.get(key)
        if entry is None:
            return False
        self._data[key] = (entry[0], value)
        return True

    def pop(self, key: K) -> V | None:
        entry = self._data.pop(key, None)
        return entry[1] if entry is not None else None

    def expire(self) -> None:
        """Drop every entry whose lifetime has passed now (instead of on the next insert)."""
        self._expire(self._clock())

    def expiries(self) -> list[tuple[float, V]]:
        """(expiry time, value) of every entry, the soonest to expire first."""
        return list(self._data.values())

    def clear(self) -> None:
        self._data.clear()

    def _expire(self, now: float) -> None:
        data = self._data
        while data:
            key = next(iter(data))
            if data[key][0] > now:
                return
            del data[key]
