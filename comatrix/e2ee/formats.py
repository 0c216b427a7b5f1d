"""Pure shapes of Matrix end-to-end encryption: event contents, signed JSON, rotation rules (no I/O, no crypto).

What goes over the wire is built and read here (Client-Server spec, "End-to-end
encryption"): the Olm to-device envelope and the payload inside it, the Megolm
room event and its plaintext, the ``m.room.encryption`` rotation settings, and the
event that stands in for one the gateway cannot decrypt.  The cryptography itself
is vodozemac's (`comatrix.e2ee.device`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

from comatrix.matrix.responses import Event

__all__ = [
    "ENCRYPTED", "MEGOLM", "OLM", "UNDECRYPTABLE_BODY", "UNDECRYPTABLE_MSGTYPE", "Rotation",
    "canonical_json", "decrypted", "json_field", "json_list", "json_object", "megolm_content", "room_key_content", "megolm_plaintext", "olm_content", "olm_payload",
    "parse_megolm_plaintext", "rotation_of", "undecryptable", "unsigned_copy",
]

ENCRYPTED = "m.room.encrypted"
OLM = "m.olm.v1.curve25519-aes-sha2"
MEGOLM = "m.megolm.v1.aes-sha2"
ALGORITHMS = (OLM, MEGOLM)
ROOM_KEY = "m.room_key"
#: One-time keys kept published: half of what an account holds (as other clients do).
OTK_TARGET = 25
#: What a device reads in place of a message the gateway cannot decrypt (the docs name it).
UNDECRYPTABLE_BODY = "[undecryptable]"
UNDECRYPTABLE_MSGTYPE = "m.bad.encrypted"
#: The spec's defaults when ``m.room.encryption`` does not say: a week, or 100 messages.
DEFAULT_ROTATION_MS = 7 * 24 * 3600 * 1000
DEFAULT_ROTATION_MSGS = 100


def canonical_json(value: Any) -> bytes:
    """Matrix canonical JSON: sorted keys, no spaces, UTF-8 (what signatures cover)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def unsigned_copy(value: Mapping[str, Any]) -> dict[str, Any]:
    """``value`` without ``signatures`` and ``unsigned``: the part a signature covers."""
    return {k: v for k, v in value.items() if k not in ("signatures", "unsigned")}


@dataclasses.dataclass(frozen=True)
class Rotation:
    """When an outbound Megolm session of a room is replaced (``m.room.encryption``)."""

    period_ms: int = DEFAULT_ROTATION_MS
    messages: int = DEFAULT_ROTATION_MSGS

    def due(self, created_ms: int, sent: int, now_ms: int) -> bool:
        return sent >= self.messages or now_ms - created_ms >= self.period_ms


def rotation_of(content: Mapping[str, Any]) -> Rotation:
    """The rotation settings of an ``m.room.encryption`` content (bad or missing values: the defaults)."""
    def positive(key: str, default: int) -> int:
        value = content.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default
    return Rotation(positive("rotation_period_ms", DEFAULT_ROTATION_MS),
                    positive("rotation_period_msgs", DEFAULT_ROTATION_MSGS))


def megolm_plaintext(room_id: str, event_type: str, content: Mapping[str, Any]) -> bytes:
    return canonical_json({"type": event_type, "content": dict(content), "room_id": room_id})


def megolm_content(sender_key: str, device_id: str, session_id: str, ciphertext: str) -> dict[str, Any]:
    return {"algorithm": MEGOLM, "sender_key": sender_key, "device_id": device_id,
            "session_id": session_id, "ciphertext": ciphertext}


def json_field(value: Any, key: str) -> Mapping[str, Any]:
    """``value[key]`` if both are JSON objects, else an empty one (a malformed answer holds nothing)."""
    found = value.get(key) if isinstance(value, Mapping) else None
    return found if isinstance(found, Mapping) else {}


def json_list(value: Any, key: str) -> list[Any]:
    """``value[key]`` if it is a JSON array (in a JSON object), else an empty one."""
    found = value.get(key) if isinstance(value, Mapping) else None
    return found if isinstance(found, list) else []


def json_object(data: bytes) -> dict[str, Any]:
    """A JSON object from decrypted bytes; ValueError if they are not one."""
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def parse_megolm_plaintext(plaintext: bytes, room_id: str) -> tuple[str, Mapping[str, Any]]:
    """The event type and content inside a decrypted Megolm payload; ValueError if it is not one of
    this room (a payload replayed from another room must not be believed)."""
    payload = json_object(plaintext)
    if payload.get("room_id") != room_id:
        raise ValueError("Megolm payload of another room")
    event_type, content = payload.get("type"), payload.get("content")
    if not isinstance(event_type, str) or not isinstance(content, dict):
        raise ValueError("Megolm payload without type or content")
    return event_type, content


def olm_payload(event_type: str, content: Mapping[str, Any], *, sender: str, sender_device: str,
                sender_ed25519: str, recipient: str, recipient_ed25519: str) -> bytes:
    """The plaintext of an Olm to-device message (its sender and recipient keys bind it)."""
    return canonical_json({"type": event_type, "content": dict(content), "sender": sender,
                           "sender_device": sender_device, "keys": {"ed25519": sender_ed25519},
                           "recipient": recipient, "recipient_keys": {"ed25519": recipient_ed25519}})


def olm_content(sender_key: str, recipient_key: str, message_type: int, body: str) -> dict[str, Any]:
    return {"algorithm": OLM, "sender_key": sender_key,
            "ciphertext": {recipient_key: {"type": message_type, "body": body}}}


def room_key_content(room_id: str, session_id: str, session_key: str) -> dict[str, Any]:
    return {"algorithm": MEGOLM, "room_id": room_id, "session_id": session_id, "session_key": session_key}


def undecryptable(event: Event, reason: str) -> Event:
    """An ``m.room.message`` standing in for an encrypted event the gateway could not decrypt:
    body `UNDECRYPTABLE_BODY`, msgtype `UNDECRYPTABLE_MSGTYPE` and the reason (never dropped)."""
    content = {"msgtype": UNDECRYPTABLE_MSGTYPE, "body": UNDECRYPTABLE_BODY, "reason": reason}
    return dataclasses.replace(event, type="m.room.message", content=content)


def decrypted(event: Event, event_type: str, content: Mapping[str, Any]) -> Event:
    return dataclasses.replace(event, type=event_type, content=content)
