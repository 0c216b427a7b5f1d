"""What ``comatrixctl e2ee status NAME`` shows: a device user's keys, sessions and backup state (pure).

It reads the sealed state files the gateway wrote (`comatrix.e2ee.vault.read_states`)
and needs no vodozemac: the public identity keys are kept beside the pickles.
Nothing secret is shown (no pickle, no session key).
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

__all__ = ["describe"]


def _when(ms: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000)) if isinstance(ms, int) else "?"


def describe(user_id: str, states: Sequence[Mapping[str, Any]]) -> str:
    """The status text of ``user_id``'s Matrix devices among ``states``."""
    mine = [state for state in states if state.get("user_id") == user_id]
    if not mine:
        return f"{user_id}: no E2EE state (no device of this user was used in an encrypted room or joined)\n"
    lines: list[str] = []
    for state in sorted(mine, key=lambda s: str(s.get("device_id"))):
        olm = state.get("olm") or {}
        outbound = state.get("outbound") or {}
        lines += [
            f"{user_id} device {state.get('device_id')}",
            f"  identity keys      curve25519 {state.get('curve25519', '?')}",
            f"                     ed25519    {state.get('ed25519', '?')}",
            f"  keys uploaded      {'yes' if state.get('uploaded') else 'no'}",
            f"  olm sessions       {sum(len(s) for s in olm.values())} with {len(olm)} devices",
            f"  inbound megolm     {len(state.get('inbound') or [])} sessions",
            f"  tracked users      {len(state.get('devices') or {})} ({len(state.get('stale') or [])} to query again)",
            f"  outbound megolm    {len(outbound)} rooms",
        ]
        for room, session in sorted(outbound.items()):
            lines.append(f"    {room}: {session.get('sent', 0)} messages since {_when(session.get('created_ms'))}, "
                         f"shared with {len(session.get('shared') or [])} devices")
        lines += ["  cross-signing      not done yet (the device shows unverified)",
                  "  key backup         none (not done yet): losing state_dir loses these keys"]
    return "\n".join(lines) + "\n"
