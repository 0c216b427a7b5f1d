"""OSCORE client role (RFC 8613 §8.1, §8.4) for ``comatrix-device``: the device's view of one context.

The crypto, the nonce/AAD construction and the COSE/option codecs are the
gateway's own (`comatrix.oscore.context`, `comatrix.oscore.cose`); this module
only arranges them the other way round: protect a request under the device's
sender context, verify the answer (which either reuses the request's nonce or
carries the gateway's Partial IV), and refuse an old notification replayed.

Sender sequence numbers come from a ``take_sequence`` callable that must
persist the next number before returning one (Appendix B.1.1 with K = 1):
``comatrix-device`` keeps it in its state file, fsynced.

The context file (``--oscore FILE``) is TOML or JSON with four hex strings,
the device's view (the names ``comatrixctl device add --oscore`` prints)::

    sender_id = "01"            # the id the device sends as (the entry's recipient_id)
    recipient_id = ""           # the gateway's id (the entry's sender_id)
    master_secret = "<32 hex>"
    master_salt = "<16 hex>"    # optional, default empty
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Callable

from comatrix.coap import wire
from comatrix.coap.numbers import Code, OptionNumber
from comatrix.oscore.context import DecryptionFailed, SecurityContext, aad_for, encode_piv
from comatrix.oscore.cose import OscoreOption, decode_plaintext, encode_plaintext

__all__ = ["OscoreClient", "OscoreError", "load_device_context", "CONTEXT_KEYS"]

CONTEXT_KEYS = ("sender_id", "recipient_id", "master_secret", "master_salt")
_REQUIRED = ("sender_id", "recipient_id", "master_secret")


class OscoreError(Exception):
    """An answer that is not a valid protected answer to our request (or a context file that is wrong)."""


def load_device_context(path: Path) -> SecurityContext:
    """The device's security context from a TOML or JSON context file (see the module docstring)."""
    text = path.read_text(encoding="utf-8")
    try:
        values: Any = json.loads(text) if text.lstrip().startswith("{") else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise OscoreError(f"{path}: neither JSON nor TOML ({exc.__class__.__name__})") from None
    if not isinstance(values, dict):
        raise OscoreError(f"{path}: expected a table of {', '.join(CONTEXT_KEYS)}")
    unknown = sorted(set(values) - set(CONTEXT_KEYS))
    missing = [key for key in _REQUIRED if key not in values]
    if unknown or missing:
        raise OscoreError(f"{path}: unknown keys {unknown}, missing keys {missing}"
                          if unknown else f"{path}: missing keys {missing}")
    raw: dict[str, bytes] = {}
    for key in CONTEXT_KEYS:
        value = values.get(key, "")
        try:
            if not isinstance(value, str):
                raise ValueError(key)
            raw[key] = bytes.fromhex(value)
        except ValueError:
            raise OscoreError(f"{path}: {key} is not a hex string") from None
    if not raw["master_secret"]:
        raise OscoreError(f"{path}: master_secret is empty")
    try:
        return SecurityContext(raw["sender_id"], raw["recipient_id"], raw["master_secret"], raw["master_salt"])
    except ValueError as exc:
        raise OscoreError(f"{path}: {exc}") from None


def _ordered(options: list[wire.RawOption]) -> list[wire.RawOption]:
    """By option number, keeping the order of repeated options (Uri-Path segments)."""
    return sorted(options, key=lambda option: option[0])


class OscoreClient:
    """Protects requests and verifies answers with one device-side `SecurityContext`."""

    def __init__(self, context: SecurityContext, take_sequence: Callable[[], int]) -> None:
        self.context = context
        self.take_sequence = take_sequence
        #: Highest Partial IV of the gateway's seen per request (its notifications must grow).
        self._answer_pivs: dict[bytes, int] = {}

    def protect(self, code: int, options: list[wire.RawOption],
                payload: bytes) -> tuple[int, list[wire.RawOption], bytes, bytes]:
        """(outer code, outer options, ciphertext, request Partial IV) for one request.

        Every option goes inside; Observe also outside with the same value (§4.1.3.5.1),
        and then the outer code is FETCH (§4.2), else POST.
        """
        context = self.context
        piv = encode_piv(self.take_sequence())
        kid = context.sender_id
        ciphertext = context.seal(context.sender_nonce(piv), encode_plaintext(code, _ordered(options), payload),
                                  aad_for(kid, piv))
        outer: list[wire.RawOption] = [(OptionNumber.OSCORE, OscoreOption(piv=piv, kid=kid).encode())]
        observe = [value for number, value in options if number == OptionNumber.OBSERVE]
        if observe:
            outer.insert(0, (OptionNumber.OBSERVE, observe[0]))
        return (Code.FETCH if observe else Code.POST), outer, ciphertext, piv

    def unprotect(self, message: wire.Datagram, request_piv: bytes) -> wire.Datagram:
        """The inner answer (outer Observe kept, for ordering), or `OscoreError`.

        An unprotected answer is passed on only when it is an error (the gateway's
        OSCORE errors are unprotected by design, §8.2); an unprotected success is refused.
        """
        values = [value for number, value in message.options if number == OptionNumber.OSCORE]
        if not values:
            if message.code >= 128:
                return message
            raise OscoreError("unprotected answer to a protected request")
        try:
            header = OscoreOption.decode(values[0])
        except ValueError:
            raise OscoreError("bad OSCORE option in the answer") from None
        context = self.context
        if header.piv is not None:
            nonce = context.recipient_nonce(header.piv)
        else:
            nonce = context.sender_nonce(request_piv)
        try:
            plaintext = context.open(nonce, message.payload, aad_for(context.sender_id, request_piv))
            inner = decode_plaintext(plaintext)
        except (DecryptionFailed, ValueError):
            raise OscoreError("answer failed OSCORE verification") from None
        if header.piv is not None:
            self._check_fresh(request_piv, int.from_bytes(header.piv, "big"))
        outer_observe = [(number, value) for number, value in message.options if number == OptionNumber.OBSERVE]
        options = [(number, value) for number, value in inner.options if number != OptionNumber.OBSERVE]
        return wire.Datagram(message.mtype, inner.code, message.mid, message.token,
                             _ordered(options + outer_observe), inner.payload)

    def _check_fresh(self, request_piv: bytes, sequence: int) -> None:
        """§7.4.1: answers with a Partial IV to one request (notifications) only move forward."""
        last = self._answer_pivs.get(request_piv)
        if last is not None and sequence <= last:
            raise OscoreError("replayed OSCORE answer")
        self._answer_pivs[request_piv] = sequence
