"""The gateway's OSCORE security contexts, found by the kid (and kid context) a request names.

Contexts come from ``[[devices]]`` entries (`ContextStore.add` at start) and
may be added later by a key exchange (EDHOC: ``persistent=False``, since a new
exchange after a restart derives new keys, so its sender sequence numbers need
not survive).  A persistent context keeps its sender sequence numbers in a
`SequenceFile`: numbering resumes above the last reserved bound after a restart.

Why a small file and not the SQLite store: the bound must be on disk *before* a
number at or above it is used, on every path including the first answer after a
start; one fsynced JSON file of a few bytes per context, rewritten whole every
`SEQUENCE_STEP` messages off the reactor thread, is simpler to reason about than
a second writer to the session database, and it has no secret in it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads

from comatrix.durable import write_durably
from comatrix.logs import get_logger
from comatrix.oscore.context import MAX_SEQUENCE, SecurityContext, SenderSequence

log = get_logger(__name__)

__all__ = ["SEQUENCE_FILENAME", "SEQUENCE_STEP", "SequenceFile", "ContextStore"]

SEQUENCE_FILENAME = "oscore-sequence.json"
#: Appendix B.1.1's K: sender sequence numbers reserved per write.
SEQUENCE_STEP = 100


class SequenceFile:
    """``{context key: bound}``: no sender sequence number at or above ``bound`` was ever used."""

    def __init__(self, path: str | Path, reactor: Any) -> None:
        self.path = Path(path)
        self.reactor = reactor
        self._bounds: dict[str, int] = {}
        self._lock = defer.DeferredLock()

    def load(self) -> None:
        """Read the file (blocking: call it at start, before the reactor runs)."""
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return
        values = json.loads(raw)
        if not isinstance(values, dict) or not all(
                isinstance(key, str) and isinstance(value, int) and 0 <= value <= MAX_SEQUENCE + 1
                for key, value in values.items()):
            raise ValueError(f"{self.path}: not a map of context keys to sequence numbers")
        self._bounds = dict(values)

    def bound(self, key: str) -> int:
        return self._bounds.get(key, 0)

    def set(self, key: str, bound: int) -> None:
        self._bounds[key] = max(bound, self._bounds.get(key, 0))

    def write_now(self) -> None:
        """Write the bounds (blocking: at start only)."""
        self._write(dict(self._bounds))

    def reserve(self, key: str, bound: int) -> "defer.Deferred[bool]":
        """Write ``bound`` for ``key`` off the reactor thread; fires True once it is on disk."""
        self.set(key, bound)
        return self._lock.run(self._write_off_thread)

    def _write_off_thread(self) -> "defer.Deferred[bool]":
        written: defer.Deferred[Any] = threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), self._write, dict(self._bounds))

        def failed(failure: Any) -> bool:
            log.failure("Could not write the OSCORE sequence number file {path}", failure, path=str(self.path))
            return False

        return written.addCallbacks(lambda _: True, failed)

    def _write(self, bounds: dict[str, int]) -> None:
        write_durably(self.path, json.dumps(bounds, sort_keys=True))


def context_key(context: SecurityContext) -> str:
    key = f"{context.recipient_id.hex()}:{context.sender_id.hex()}"
    return key if context.id_context is None else f"{key}:{context.id_context.hex()}"


class ContextStore:
    """Security contexts by (recipient id, id context)."""

    def __init__(self, sequences: SequenceFile | None = None, step: int = SEQUENCE_STEP) -> None:
        self.sequences = sequences
        self.step = step
        self._contexts: dict[tuple[bytes, bytes | None], SecurityContext] = {}

    def add(self, sender_id: bytes, recipient_id: bytes, master_secret: bytes, master_salt: bytes = b"",
            id_context: bytes | None = None, *, persistent: bool = True) -> SecurityContext:
        """Derive and keep a context; a persistent one needs a `SequenceFile`.

        A persistent context can answer once its first bound is written: `write_bounds`
        at start, or the first (failed, 5.03) answer's reservation at run time.
        """
        context = SecurityContext(sender_id, recipient_id, master_secret, master_salt, id_context)
        if persistent:
            if self.sequences is None:
                raise ValueError("a persistent OSCORE context needs a sequence number file")
            sequences, key = self.sequences, context_key(context)
            start = sequences.bound(key)
            context.sequence = SenderSequence(start, start, self.step,
                                              lambda bound: sequences.reserve(key, bound))
        lookup = (recipient_id, id_context)
        if lookup in self._contexts:
            raise ValueError(f"two OSCORE contexts with recipient id {recipient_id.hex()!r}")
        self._contexts[lookup] = context
        return context

    def write_bounds(self) -> None:
        """At start (blocking): reserve the first `step` numbers of every persistent context."""
        if self.sequences is None:
            return
        waiting = [context.sequence for context in self._contexts.values()
                   if context.sequence.bound <= context.sequence.next <= MAX_SEQUENCE]
        for context in self._contexts.values():
            if context.sequence in waiting:
                self.sequences.set(context_key(context), context.sequence.next + self.step)
        self.sequences.write_now()
        for sequence in waiting:  # only once the bounds are on disk
            sequence.bound = min(sequence.next + self.step, MAX_SEQUENCE + 1)

    def find(self, kid: bytes, kid_context: bytes | None = None) -> SecurityContext | None:
        return self._contexts.get((kid, kid_context))

    def remove(self, recipient_id: bytes, id_context: bytes | None = None) -> None:
        self._contexts.pop((recipient_id, id_context), None)

    def __len__(self) -> int:
        return len(self._contexts)
