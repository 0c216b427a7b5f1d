"""The hook through which object security (OSCORE) sits between the message layer and the site.

The CoAP server knows nothing about keys or ciphers.  When it is given a
`MessageProtection`, every request carrying the OSCORE option (9) goes through
``unprotect`` right after deduplication -- before option checks, block-wise
reassembly and routing, which then see the decrypted inner request -- and every
response to such a request (and every notification of an observation it
registered) goes through ``protect`` right before it is encoded.  The message
layer (type, message id, token, retransmission, deduplication) stays outside,
as RFC 8613 §1 puts it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Union

from comatrix.coap.message import Response, Security
from comatrix.coap.wire import Datagram, RawOption

__all__ = ["MessageProtection", "Unprotected", "Refused", "ProtectionUnavailable"]


@dataclasses.dataclass(frozen=True)
class Unprotected:
    """A verified request: the inner message to process, who sent it, and what answers need."""

    message: Datagram
    security: Security
    #: Opaque to the CoAP layer; handed back to `MessageProtection.protect` for every answer.
    exchange: Any


@dataclasses.dataclass(frozen=True)
class Refused:
    """A request answered without reaching the site.

    With ``exchange`` None the response goes out unprotected (an OSCORE error such
    as "Replay detected"); otherwise it is protected like any other answer (e.g. a
    4.01 carrying an Echo challenge).
    """

    response: Response
    exchange: Any = None


class ProtectionUnavailable(Exception):
    """An answer cannot be protected right now (e.g. no sender sequence number is free)."""


class MessageProtection(Protocol):
    def unprotect(self, message: Datagram) -> Union[Unprotected, Refused]:
        """Verify and decrypt a request that carries the OSCORE option."""

    def protect(self, exchange: Any, code: int, options: list[RawOption],
                payload: bytes) -> tuple[int, list[RawOption], bytes]:
        """The outer code, outer options and payload that carry (code, options, payload) protected.

        Raises `ProtectionUnavailable` when it cannot be done now.
        """
