"""Secret storage (``m.secret_storage.v1.aes-hmac-sha2``): a device user's cross-signing private keys kept,
encrypted, in its account data on the homeserver, under the gateway's key backup key.

So the recovery key (``comatrixctl e2ee backup-key``) brings back the cross-signing
keys too when the gateway's sealed state is lost, and a client that knows the
recovery key can read them.  Per the spec: HKDF-SHA-256 (32 zero bytes of salt,
the secret's name as info) gives an AES-256-CTR key and an HMAC-SHA-256 key; the
key's description holds the MAC of 32 zero bytes encrypted with the empty name.
Primitives are the `cryptography` package's; no I/O here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac as std_hmac
import os
from typing import Any, Mapping

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["ALGORITHM", "DEFAULT_KEY", "decrypt", "describe_key", "encrypt", "key_event", "key_id"]

ALGORITHM = "m.secret_storage.v1.aes-hmac-sha2"
DEFAULT_KEY = "m.secret_storage.default_key"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not base64 text")
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _derive(key: bytes, name: str) -> tuple[bytes, bytes]:
    derived = HKDF(algorithm=hashes.SHA256(), length=64, salt=bytes(32), info=name.encode("utf-8")).derive(key)
    return derived[:32], derived[32:]


def _mac(mac_key: bytes, ciphertext: bytes) -> bytes:
    signer = hmac.HMAC(mac_key, hashes.SHA256())
    signer.update(ciphertext)
    return signer.finalize()


def encrypt(key: bytes, name: str, secret: str, iv: bytes | None = None) -> dict[str, str]:
    """``secret`` (text) encrypted for the account data entry ``name``."""
    aes_key, mac_key = _derive(key, name)
    counter = bytearray(iv if iv is not None else os.urandom(16))
    counter[8] &= 0x7F  # the spec clears bit 63: some implementations count with 64 bits
    encryptor = Cipher(algorithms.AES(aes_key), modes.CTR(bytes(counter))).encryptor()
    ciphertext = encryptor.update(secret.encode("utf-8")) + encryptor.finalize()
    return {"iv": _b64(bytes(counter)), "ciphertext": _b64(ciphertext), "mac": _b64(_mac(mac_key, ciphertext))}


def decrypt(key: bytes, name: str, data: Mapping[str, Any]) -> str:
    """The secret of an encrypted entry; ValueError if the MAC does not match (another key, or altered)."""
    aes_key, mac_key = _derive(key, name)
    ciphertext = _unb64(data.get("ciphertext"))
    if not std_hmac.compare_digest(_mac(mac_key, ciphertext), _unb64(data.get("mac"))):
        raise ValueError("secret storage MAC mismatch")
    decryptor = Cipher(algorithms.AES(aes_key), modes.CTR(_unb64(data.get("iv")))).decryptor()
    return (decryptor.update(ciphertext) + decryptor.finalize()).decode("utf-8")


def key_id(key: bytes) -> str:
    """A stable id of the storage key (not secret: a hash of a hash of it)."""
    return "comatrix" + hashlib.sha256(hashlib.sha256(key).digest()).hexdigest()[:16]


def key_event(key: bytes) -> str:
    return f"m.secret_storage.key.{key_id(key)}"


def describe_key(key: bytes) -> dict[str, str]:
    """The ``m.secret_storage.key.<id>`` content: lets a client check a key it is given."""
    check = encrypt(key, "", "\0" * 32)
    return {"algorithm": ALGORITHM, "iv": check["iv"], "mac": check["mac"]}
