"""One OSCORE security context (RFC 8613 §3): derived keys, nonces, AAD, the AEAD and the replay window.

Only AES-CCM-16-64-128 (COSE algorithm 10) with HKDF-SHA-256 is offered, the
mandatory-to-implement pair; the primitives come from the ``cryptography``
library (``AESCCM`` with an 8-byte tag, ``HKDF``), nothing is hand-written.
Keys and the master secret never appear in a repr, a log line or an exception.
"""

from __future__ import annotations

from typing import Callable

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESCCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from comatrix.coap.message import Security

__all__ = ["ALG_AES_CCM_16_64_128", "KEY_LENGTH", "NONCE_LENGTH", "TAG_LENGTH", "MAX_ID_LENGTH",
           "MAX_SEQUENCE", "REPLAY_WINDOW_SIZE", "DecryptionFailed", "SequenceExhausted",
           "derive", "nonce_for", "aad_for", "encode_piv", "ReplayWindow", "SenderSequence",
           "SecurityContext"]

ALG_AES_CCM_16_64_128 = 10
KEY_LENGTH = 16
NONCE_LENGTH = 13
TAG_LENGTH = 8
#: Sender/Recipient IDs fit the nonce (§5.2: nonce length minus 6 bytes).
MAX_ID_LENGTH = NONCE_LENGTH - 6
#: §7.2.1: the Partial IV is at most 5 bytes; AES-CCM-16-64-128 allows 2^40 - 1 (§12.6 bounds it lower
#: only for very long-lived keys, which a provisioned device re-keys long before).
MAX_SEQUENCE = (1 << 40) - 1
#: §3.2.2: the default replay window, a sliding window of 32 sequence numbers.
REPLAY_WINDOW_SIZE = 32


class DecryptionFailed(Exception):
    """The AEAD rejected the ciphertext (wrong key, nonce, AAD, or tampered bytes)."""


class SequenceExhausted(Exception):
    """No sender sequence number may be used until a higher bound is persisted."""


def derive(master_secret: bytes, master_salt: bytes, id_: bytes, id_context: bytes | None,
           kind: str, length: int) -> bytes:
    """§3.2.1: HKDF-SHA-256 over the master secret with info = [id, id_context, alg, type, L]."""
    info = cbor2.dumps([id_, id_context, ALG_AES_CCM_16_64_128, kind, length])
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=master_salt, info=info).derive(master_secret)


def nonce_for(common_iv: bytes, id_piv: bytes, piv: bytes) -> bytes:
    """§5.2: S | padded ID_PIV | padded PIV, XORed with the Common IV."""
    block = bytes((len(id_piv),)) + id_piv.rjust(MAX_ID_LENGTH, b"\0") + piv.rjust(5, b"\0")
    return bytes(a ^ b for a, b in zip(block, common_iv))


def aad_for(request_kid: bytes, request_piv: bytes) -> bytes:
    """§5.4: Enc_structure ["Encrypt0", h'', external_aad] (no Class I options are defined)."""
    external_aad = cbor2.dumps([1, [ALG_AES_CCM_16_64_128], request_kid, request_piv, b""])
    return cbor2.dumps(["Encrypt0", b"", external_aad])


def encode_piv(sequence: int) -> bytes:
    """§5: the sequence number without leading zero bytes (0 is one zero byte)."""
    return sequence.to_bytes(max(1, (sequence.bit_length() + 7) // 8), "big")


class ReplayWindow:
    """§7.4: which of the peer's sequence numbers were already accepted.

    Until `establish` is called the window is unknown (after a start: Appendix
    B.1.2) and the caller must prove freshness otherwise (Echo).
    """

    def __init__(self, size: int = REPLAY_WINDOW_SIZE) -> None:
        self.size = size
        self._top: int | None = None
        self._seen = 0  # bit i set: sequence number top - i was accepted

    @property
    def established(self) -> bool:
        return self._top is not None

    def is_fresh(self, sequence: int) -> bool:
        top = self._top
        if top is None or sequence > top:
            return True
        offset = top - sequence
        return offset < self.size and not (self._seen >> offset) & 1

    def mark(self, sequence: int) -> None:
        top = self._top
        if top is None:
            self.establish(sequence)
        elif sequence > top:
            # A jump past the window forgets it whole: never shift by the jump itself
            # (a Partial IV near 2**40 would build a 2**40-bit integer).
            shift = sequence - top
            self._seen = 1 if shift >= self.size else ((self._seen << shift) | 1) & ((1 << self.size) - 1)
            self._top = sequence
        else:
            self._seen |= 1 << (top - sequence)

    def establish(self, sequence: int) -> None:
        """Appendix B.1.2: ``sequence`` (a request proven fresh) is the window's lower limit."""
        self._top = sequence
        self._seen = (1 << self.size) - 1  # everything at or below it counts as seen


class SenderSequence:
    """The gateway's sender sequence numbers for one context, never reused across restarts.

    Numbers below ``bound`` may be used: ``bound`` is what the persistence layer
    confirmed it wrote.  Half a ``step`` before it is reached, ``reserve`` is asked
    (off the reactor thread) to write ``bound + step``; once that is on disk the
    bound moves up.  After a restart numbering resumes at the written bound, so no
    number is used twice (Appendix B.1.1 with K = ``step`` and F = 0: a number is
    only used once a bound above it is stored).
    """

    def __init__(self, start: int, bound: int, step: int,
                 reserve: Callable[[int], "object"] | None) -> None:
        self.next = start
        self.bound = bound
        self.step = step
        self._reserve = reserve
        self._reserving = False

    def take(self) -> int:
        if self.next >= self.bound or self.next > MAX_SEQUENCE:
            self._ask_more()
            raise SequenceExhausted("sender sequence numbers not yet reserved")
        value = self.next
        self.next += 1
        if self.bound - self.next <= self.step // 2:
            self._ask_more()
        return value

    def _ask_more(self) -> None:
        if self._reserve is None or self._reserving:
            return
        self._reserving = True
        wanted = min(self.bound + self.step, MAX_SEQUENCE + 1)
        result = self._reserve(wanted)
        add_both = getattr(result, "addBoth", None)
        if add_both is None:  # reserved synchronously
            self._reserved(result, wanted)
        else:
            add_both(self._reserved, wanted)

    def _reserved(self, result: object, wanted: int) -> None:
        self._reserving = False
        if result is True:
            self.bound = max(self.bound, wanted)


class SecurityContext:
    """Common, Sender and Recipient Context of one peer (§3.1), with the mutable parts."""

    def __init__(self, sender_id: bytes, recipient_id: bytes, master_secret: bytes,
                 master_salt: bytes = b"", id_context: bytes | None = None, *,
                 sequence: SenderSequence | None = None) -> None:
        if len(sender_id) > MAX_ID_LENGTH or len(recipient_id) > MAX_ID_LENGTH:
            raise ValueError(f"sender and recipient ids are at most {MAX_ID_LENGTH} bytes")
        if sender_id == recipient_id:
            raise ValueError("sender and recipient ids must differ")
        self.sender_id = sender_id
        self.recipient_id = recipient_id
        self.id_context = id_context
        self.sender_key = derive(master_secret, master_salt, sender_id, id_context, "Key", KEY_LENGTH)
        self.recipient_key = derive(master_secret, master_salt, recipient_id, id_context, "Key", KEY_LENGTH)
        self.common_iv = derive(master_secret, master_salt, b"", id_context, "IV", NONCE_LENGTH)
        self._sender = AESCCM(self.sender_key, tag_length=TAG_LENGTH)
        self._recipient = AESCCM(self.recipient_key, tag_length=TAG_LENGTH)
        self.sequence = sequence if sequence is not None else SenderSequence(0, MAX_SEQUENCE + 1, 0, None)
        self.replay = ReplayWindow()
        #: The Echo value a request must carry before the replay window is established (B.1.2).
        self.echo: bytes | None = None
        #: Who requests through this context are, when not its recipient id (EDHOC: the credential).
        self.identity: Security | None = None

    def __repr__(self) -> str:
        return f"<SecurityContext recipient_id={self.recipient_id.hex()!r} sender_id={self.sender_id.hex()!r}>"

    def sender_nonce(self, piv: bytes) -> bytes:
        return nonce_for(self.common_iv, self.sender_id, piv)

    def recipient_nonce(self, piv: bytes) -> bytes:
        return nonce_for(self.common_iv, self.recipient_id, piv)

    def seal(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return self._sender.encrypt(nonce, plaintext, aad)

    def open(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        try:
            return self._recipient.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise DecryptionFailed("decryption failed") from None
