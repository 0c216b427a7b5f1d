"""Resume points of MSC3079 ``/sync`` observations, kept in SQLite so they survive a gateway restart.

An observation is identified as MSC3079 says: by (access token, CoAP token)
-- here SHA-256 of the access token, never the token itself.  Its *resume
point* is the ``next_batch`` of the last batch the client **acknowledged** (a
CON notification's ACK), together with a fingerprint of the registration
request it belongs to (its query without ``timeout``: ``since``, ``filter``,
``set_presence``...).

When a registration arrives for an observation with a resume point and the
same fingerprint -- the client repeats its registration request, as RFC 7641
§3.3.1 re-registration does, or after the gateway restarted and its
observations were lost -- the registration answer is the ``/sync`` *from the
resume point*, not from the request's own (stale, or absent) ``since``: the
client gets what it has not acknowledged yet, nothing twice and nothing lost.
A registration with another ``since`` (the client resumes from its own
``next_batch``) or ``full_state=true`` is served as asked.

Only acknowledged batches move the point: a batch in flight when the gateway
stopped, or a registration answer the gateway cannot know arrived, is sent
again (at least once; Matrix clients drop events they already have by
``event_id``).  The point is dropped when the client deregisters (Observe: 1),
logs out through the gateway, or the homeserver refuses the token; the table
is bounded (`comatrix.store.SYNC_POSITIONS_KEPT`).  Without a store (a
hand-built context) the points live in memory only.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any, Iterable

from comatrix.matrix.api import acting_identity
from comatrix.store import SYNC_POSITIONS_KEPT, Store, SyncPosition

__all__ = ["ResumePoints", "registration_fingerprint"]

#: Query parameters that do not change what a registration's stream is.
_NOT_PART_OF_THE_REGISTRATION = frozenset({"timeout"})


def registration_fingerprint(query: Iterable[tuple[str, str]]) -> bytes:
    """SHA-256 over the registration's query parameters (in order, repeats kept) except ``timeout``."""
    items = [[key, value] for key, value in query if key not in _NOT_PART_OF_THE_REGISTRATION]
    return hashlib.sha256(json.dumps(items, separators=(",", ":")).encode("utf-8")).digest()


def _token_hash(access_token: str) -> bytes:
    return hashlib.sha256(acting_identity(access_token).encode("utf-8")).digest()


class ResumePoints:
    """Where each observation got to, in the store (or in memory without one)."""

    def __init__(self, store: Store | None, clock: Any, keep: int = SYNC_POSITIONS_KEPT) -> None:
        self._store = store
        self._clock = clock
        self._keep = keep
        self._memory: OrderedDict[tuple[bytes, bytes], SyncPosition] = OrderedDict()

    async def resume_from(self, access_token: str, observer: bytes, registration: bytes) -> str | None:
        """The ``since`` to serve this registration from, or None to serve it as asked."""
        key = (_token_hash(access_token), observer)
        if self._store is not None:
            saved = await self._store.sync_position(*key)
        else:
            saved = self._memory.get(key)
        if saved is None or saved.registration != registration:
            return None
        return saved.position

    async def delivered(self, access_token: str, observer: bytes, registration: bytes, position: str) -> None:
        """The client acknowledged the batch whose ``next_batch`` is ``position``."""
        key = (_token_hash(access_token), observer)
        saved = SyncPosition(registration, position)
        if self._store is not None:
            await self._store.save_sync_position(key[0], key[1], saved, self._clock.seconds(), self._keep)
            return
        self._memory[key] = saved
        self._memory.move_to_end(key)
        while len(self._memory) > self._keep:
            self._memory.popitem(last=False)

    async def forget(self, access_token: str, observer: bytes | None = None) -> None:
        """Drop one observation's point, or (``observer`` None) every point of the token."""
        token_hash = _token_hash(access_token)
        if self._store is not None:
            await self._store.forget_sync_positions(token_hash, observer)
            return
        for key in [key for key in self._memory if key[0] == token_hash and observer in (None, key[1])]:
            del self._memory[key]
