"""Which requests must come through a security context: the ``security`` setting.

``security = "required"`` (the Debian default): a plain, unprotected CoAP
request reaches only the resources that carry no secret and stay within the
amplification budget -- ``/.well-known/core`` and ``/time`` -- and everything
else is answered 4.01 "security required" before any option (a token in
option 256, a password in a body, a compact handle) is read.  Requests that
came through DTLS or OSCORE (`Request.security` set) are not limited here.

``/.well-known/edhoc`` is reachable too when EDHOC is offered: the exchange
needs no prior security and carries no secret in clear.

``"optional"`` also serves plain CoAP, for original CoMatrix and MSC3079
clients that cannot do DTLS or OSCORE: passwords, tokens and handles then cross
the radio in clear.  ``"off"`` serves plain CoAP only and opens no secured way
in.  Both are unsafe on a real radio and are logged as such at start.
"""

from __future__ import annotations

from typing import Any

from comatrix.coap.errors import Unauthorized
from comatrix.coap.message import Request

__all__ = ["SECURITY_MODES", "PLAIN_PATHS", "SecurityPolicy"]

#: Values of the ``security`` config key.
SECURITY_MODES = ("required", "optional", "off")

#: What plain CoAP may reach under ``security = "required"``: small, secret-free answers, and
#: EDHOC, which is how a device gets its OSCORE context (its messages protect themselves).
PLAIN_PATHS = frozenset({(".well-known", "core"), ("time",), (".well-known", "edhoc")})


class SecurityPolicy:
    """The request guard of the CoAP servers (see `comatrix.coap.server.RequestGuard`)."""

    def __init__(self, mode: str) -> None:
        if mode not in SECURITY_MODES:
            raise ValueError(f"security must be one of {', '.join(SECURITY_MODES)}")
        self.mode = mode

    @property
    def secured_ways_in(self) -> bool:
        """Whether DTLS/OSCORE may be offered at all."""
        return self.mode != "off"

    def check(self, request: Request) -> None:
        if self.mode == "required" and request.security is None and request.path not in PLAIN_PATHS:
            raise Unauthorized("security required")

    def announce(self, log: Any) -> None:
        """One line at start saying what plain CoAP may do."""
        if self.mode == "required":
            log.info("security = required: plain CoAP serves only /time, /.well-known/core and "
                     "/.well-known/edhoc; everything else needs DTLS or OSCORE")
        elif self.mode == "optional":
            log.warn("security = optional: plain CoAP is served too; passwords, tokens and session "
                     "handles of plain requests cross the radio in clear")
        else:
            log.warn("security = off: no DTLS or OSCORE; passwords, tokens and session handles "
                     "cross the radio in clear")
