"""A device user's cross-signing keys (master, self-signing, user-signing) and the signatures they make.

The gateway makes them once per device user (`generate`), uploads their public
halves (``POST /keys/device_signing/upload``: the self-signing and user-signing
keys signed by the master key) and signs each Matrix device of the user with the
self-signing key (``POST /keys/signatures/upload``), so a person who verifies the
user once sees its devices verified.  Ed25519 is the `cryptography` package's
(vodozemac's bindings sign with an Olm account only); no I/O here: the private
keys go into the sealed vault state (`to_state` / `from_state`).
"""

from __future__ import annotations

import base64
from typing import Any, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from comatrix.e2ee import formats

__all__ = ["KIND", "CrossSigning"]

#: What marks this state among the vault's (a user's, not a device's).
KIND = "cross-signing"
ROLES = ("master", "self_signing", "user_signing")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


class CrossSigning:
    """The three cross-signing keys of one user."""

    def __init__(self, user_id: str, private: Mapping[str, Ed25519PrivateKey]) -> None:
        self.user_id = user_id
        self._private = dict(private)
        #: Whether the homeserver has the public keys.
        self.uploaded = False

    @classmethod
    def generate(cls, user_id: str) -> "CrossSigning":
        return cls(user_id, {role: Ed25519PrivateKey.generate() for role in ROLES})

    def public(self, role: str) -> str:
        return _b64(self._private[role].public_key().public_bytes_raw())

    def sign(self, role: str, value: Mapping[str, Any]) -> dict[str, Any]:
        """``value`` with the signature of the ``role`` key added (the others it had kept)."""
        signature = _b64(self._private[role].sign(formats.canonical_json(formats.unsigned_copy(value))))
        signed = dict(value)
        signatures = {user: dict(keys) for user, keys in formats.json_field(value, "signatures").items()
                      if isinstance(keys, Mapping)}
        signatures.setdefault(self.user_id, {})[f"ed25519:{self.public(role)}"] = signature
        signed["signatures"] = signatures
        return signed

    def _key(self, role: str, usage: str) -> dict[str, Any]:
        return {"user_id": self.user_id, "usage": [usage], "keys": {f"ed25519:{self.public(role)}": self.public(role)}}

    def upload_body(self) -> dict[str, Any]:
        """The body of ``POST /keys/device_signing/upload``."""
        return {"master_key": self._key("master", "master"),
                "self_signing_key": self.sign("master", self._key("self_signing", "self_signing")),
                "user_signing_key": self.sign("master", self._key("user_signing", "user_signing"))}

    def secrets(self) -> dict[str, str]:
        """Secret storage name -> private key (unpadded base64), as clients keep them."""
        return {f"m.cross_signing.{role}": _b64(key.private_bytes_raw()) for role, key in self._private.items()}

    @classmethod
    def from_secrets(cls, user_id: str, secrets: Mapping[str, str]) -> "CrossSigning":
        return cls(user_id, {role: Ed25519PrivateKey.from_private_bytes(_unb64(secrets[f"m.cross_signing.{role}"]))
                             for role in ROLES})

    def to_state(self) -> dict[str, Any]:
        return {"kind": KIND, "user_id": self.user_id, "uploaded": self.uploaded,
                "private": {role: _b64(key.private_bytes_raw()) for role, key in self._private.items()},
                # Public, for `comatrixctl e2ee status`.
                "public": {role: self.public(role) for role in ROLES}}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "CrossSigning":
        private = {role: Ed25519PrivateKey.from_private_bytes(_unb64(text)) for role, text in state["private"].items()}
        keys = cls(state["user_id"], private)
        keys.uploaded = bool(state.get("uploaded"))
        return keys
