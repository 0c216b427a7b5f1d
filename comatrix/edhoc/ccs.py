"""EDHOC credentials by value: CWT Claims Sets (CCS, RFC 8392) holding a P-256 COSE_Key.

A CCS is ``{2: subject, 8: {1: COSE_Key}}`` (sub, cnf); the COSE_Key is
``{1: 2 (EC2), 2: kid, -1: 1 (P-256), -2: x, -3: y}``.  Its exact bytes are
what both sides feed EDHOC (RFC 9528 §3.5.2), so a CCS is kept and compared as
bytes, never re-encoded.  Pure: nothing here needs lakers.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["Ccs", "parse_ccs", "make_ccs", "generate_key", "private_bytes"]

_KTY, _KID, _CRV, _X, _Y = 1, 2, -1, -2, -3
_EC2, _P256 = 2, 1
_SUB, _CNF, _COSE_KEY = 2, 8, 1
#: Longest kid accepted: it is sent in every message_3 that names the credential by reference.
MAX_KID_BYTES = 8


@dataclasses.dataclass(frozen=True)
class Ccs:
    """A parsed CCS: its encoded bytes, the key id and the public key's coordinates."""

    encoded: bytes
    kid: bytes
    x: bytes
    y: bytes

    @property
    def fingerprint(self) -> str:
        """A short stable name for the credential (the identity of requests that use it)."""
        return hashlib.sha256(self.encoded).hexdigest()[:16]


def parse_ccs(encoded: bytes) -> Ccs:
    """Check that ``encoded`` is one CCS with a P-256 COSE_Key and a kid; ValueError if not."""
    try:
        claims = cbor2.loads(encoded)
    except Exception:
        raise ValueError("not CBOR") from None
    if cbor2.dumps(claims) != encoded:
        raise ValueError("not one CBOR item in preferred encoding")
    key = claims.get(_CNF, {}).get(_COSE_KEY) if isinstance(claims, dict) else None
    if not isinstance(key, dict) or not isinstance(key.get(_KID), bytes):
        raise ValueError("not a CCS with cnf / COSE_Key and a kid")
    kid, x, y = key[_KID], key.get(_X), key.get(_Y)
    if key.get(_KTY) != _EC2 or key.get(_CRV) != _P256:
        raise ValueError("the COSE_Key is not an EC2 P-256 key")
    if not (isinstance(x, bytes) and isinstance(y, bytes) and len(x) == len(y) == 32):
        raise ValueError("the COSE_Key needs 32-byte x and y")
    if not 1 <= len(kid) <= MAX_KID_BYTES:
        raise ValueError(f"the kid is 1-{MAX_KID_BYTES} bytes")
    try:
        ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"),
                                      ec.SECP256R1()).public_key()
    except ValueError:
        raise ValueError("x, y is not a point on P-256") from None
    return Ccs(encoded, kid, x, y)


def make_ccs(public_key: ec.EllipticCurvePublicKey, kid: bytes, subject: str) -> Ccs:
    """The CCS of ``public_key``, in the order RFC 9529's examples use."""
    numbers = public_key.public_numbers()
    cose_key: dict[int, Any] = {_KTY: _EC2, _KID: kid, _CRV: _P256,
                                _X: numbers.x.to_bytes(32, "big"), _Y: numbers.y.to_bytes(32, "big")}
    return parse_ccs(cbor2.dumps({_SUB: subject, _CNF: {_COSE_KEY: cose_key}}))


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 key pair from the OS CSPRNG (through OpenSSL)."""
    return ec.generate_private_key(ec.SECP256R1())


def private_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The 32-byte scalar d, as EDHOC implementations take it."""
    return key.private_numbers().private_value.to_bytes(32, "big")
