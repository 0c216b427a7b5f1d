"""End-to-end encryption done by the gateway for its device users (issue 15).

A device cannot run Olm/Megolm; the gateway, inside the border router's trust
boundary, does it on the device's behalf with vodozemac (an optional dependency,
extra ``e2ee``).  `install` puts the right `comatrix.matrix.client.RoomCrypto`
into the Matrix client: `gateway.GatewayCrypto` with vodozemac, else
`gateway.Unavailable` (sends into encrypted rooms refused, their messages
reported undecryptable).  Layers: `formats` (pure wire shapes) < `device`
(vodozemac state of one device) < `vault` (state at rest) < `gateway` (the calls).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from comatrix.logs import get_logger
from comatrix.matrix.client import MatrixClient

__all__ = ["available", "install"]

log = get_logger(__name__)


def available() -> bool:
    """Whether vodozemac (the Olm/Megolm implementation) can be imported."""
    try:
        import vodozemac  # noqa: F401
    except ImportError:
        return False
    return True


def install(matrix: MatrixClient, state_dir: str | Path | None, reactor: Any, *,
            single_process: bool = True) -> None:
    """Give ``matrix`` its end-to-end encryption (blocking at start: reads or makes the storage key).

    ``single_process`` False (``workers`` > 1): each worker would hold its own copy of a device
    user's Olm and Megolm state and write the same sealed file, so E2EE is off there.
    """
    from comatrix.e2ee.gateway import GatewayCrypto, Unavailable

    if not available() or not single_process:
        why = "vodozemac not installed" if single_process else "not with workers > 1"
        log.warn("E2EE unavailable ({why}): sends into encrypted rooms are refused, "
                 "their messages read as [undecryptable]", why=why)
        matrix.crypto = Unavailable(matrix, reactor)
        return
    from comatrix.e2ee.vault import Vault

    if state_dir is None:
        log.warn("E2EE keys kept in memory only (no state_dir): device users get new device keys at every start")
    matrix.crypto = GatewayCrypto(matrix, Vault(state_dir), reactor)
    log.info("E2EE on: the gateway encrypts and decrypts in encrypted rooms for its device users")
