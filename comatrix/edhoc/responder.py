"""The gateway's EDHOC responder (RFC 9528, method 3, cipher suite 2) that ends in an OSCORE context.

Both sides authenticate with static P-256 DH keys named by CCS credentials:
the gateway's own key (`GatewayKey`, generated once in ``state_dir``) and each
device's credential from its ``[[devices]]`` entry.  The protocol itself is
lakers' (`lakers-python`); this module keeps the sessions between message_1 and
message_3, picks connection identifiers, finds the device by ``ID_CRED_I`` and
turns the finished exchange into an OSCORE context (RFC 9528 Appendix A.1):
master secret = EDHOC_Exporter(0, h'', 16), master salt = EDHOC_Exporter(1, h'', 8),
the gateway's Recipient ID is C_R and its Sender ID C_I.

Pending sessions (a responder waiting for message_3) are bounded in total and
per source address and expire, so a flood of forged message_1s costs a bounded
amount of memory: an address at its share loses its oldest session (a device
that lost message_2 and starts again gets through), and a full table its
oldest session overall.  Established contexts are
bounded by the entries: one per credential, a new exchange replaces the old one.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Iterable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from comatrix.coap.message import Security
from comatrix.edhoc.ccs import Ccs, generate_key, make_ccs, private_bytes
from comatrix.logs import get_logger
from comatrix.oscore.context import SecurityContext
from comatrix.oscore.contexts import ContextStore

try:
    import lakers
except ImportError:  # lakers-python is optional (not in Debian): no EDHOC then
    lakers = None

log = get_logger(__name__)

__all__ = ["available", "KEY_FILENAME", "GATEWAY_KID", "GatewayKey", "EdhocError", "Busy",
           "SessionLimits", "PendingSessions", "Responder", "split_connection_id", "split_bstr"]

KEY_FILENAME = "edhoc-key.pem"
GATEWAY_KID = b"\x00"
GATEWAY_SUBJECT = "comatrix gateway"
#: RFC 9528 Appendix A.1: AES-CCM-16-64-128 keys and the default 8-byte salt.
MASTER_SECRET_BYTES = 16
MASTER_SALT_BYTES = 8
#: Connection identifiers that encode as one CBOR byte (the integers -24..23).
_COMPACT_IDS = tuple(bytes((value,)) for value in (*range(0x00, 0x18), *range(0x20, 0x38)))


def available() -> bool:
    """Whether lakers-python imports, i.e. whether EDHOC can be offered."""
    return lakers is not None


class EdhocError(Exception):
    """An exchange that cannot go on; the text (no secret) goes into the EDHOC error message."""


class Busy(Exception):
    """No connection identifier is free now; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("no free connection identifier")
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class GatewayKey:
    """The gateway's static DH key pair and its CCS (what devices are given)."""

    private: bytes = dataclasses.field(repr=False)
    credential: Ccs

    @classmethod
    def load_or_create(cls, state_dir: str | Path) -> "GatewayKey":
        """Read ``edhoc-key.pem`` from ``state_dir``, creating it (0600) the first time.  Blocking."""
        path = Path(state_dir) / KEY_FILENAME
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            key = generate_key()
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"{path} is not a P-256 private key")
        return cls(private_bytes(key), make_ccs(key.public_key(), GATEWAY_KID, GATEWAY_SUBJECT))


@dataclasses.dataclass(frozen=True)
class SessionLimits:
    total: int = 64
    per_address: int = 2
    #: Seconds a session waits for message_3 (a device retransmits message_1 within EXCHANGE_LIFETIME).
    lifetime: float = 60.0


@dataclasses.dataclass
class _Pending:
    responder: Any  # lakers.EdhocResponder after message_2
    c_i: bytes
    address: str
    expires: float


class PendingSessions:
    """Responders waiting for message_3, by C_R; bounded in total and per address, with expiry."""

    def __init__(self, limits: SessionLimits, clock: Callable[[], float]) -> None:
        self.limits = limits
        self.clock = clock
        self._sessions: dict[bytes, _Pending] = {}
        #: Sessions dropped because the table was full (a sign of a message_1 flood).
        self.evicted = 0

    def __len__(self) -> int:
        self._expire()
        return len(self._sessions)

    def __contains__(self, c_r: bytes) -> bool:
        return c_r in self._sessions

    def add(self, c_r: bytes, session: _Pending) -> None:
        self._expire()
        mine = [key for key, pending in self._sessions.items() if pending.address == session.address]
        if len(mine) >= self.limits.per_address:
            del self._sessions[mine[0]]  # insertion order: the oldest first
        elif len(self._sessions) >= self.limits.total:
            # The oldest session anywhere goes: refusing instead would let a slow flood from
            # forged addresses lock every device out for a whole lifetime, while this way a
            # flood must outpace a real device's message_2 -> message_3 round trip.
            del self._sessions[next(iter(self._sessions))]
            self.evicted += 1
        self._sessions[c_r] = session

    def take(self, c_r: bytes) -> _Pending | None:
        self._expire()
        return self._sessions.pop(c_r, None)

    def _expire(self) -> None:
        now = self.clock()
        for key in [key for key, pending in self._sessions.items() if pending.expires <= now]:
            del self._sessions[key]


def split_connection_id(data: bytes) -> tuple[bytes, bytes]:
    """RFC 9528 A.2: (C_R, the rest) from a request that starts with C_R as a CBOR int or bstr."""
    if not data:
        raise EdhocError("empty message")
    first = data[0]
    if first <= 0x17 or 0x20 <= first <= 0x37:
        return data[:1], data[1:]
    if 0x40 <= first <= 0x57:
        return split_bstr(data)
    raise EdhocError("C_R is not a CBOR integer or short byte string")


def split_bstr(data: bytes) -> tuple[bytes, bytes]:
    """(value, rest) of a CBOR byte string at the start of ``data`` (a message_3 in RFC 9668's payload)."""
    if not data or not 0x40 <= data[0] <= 0x59:
        raise EdhocError("not a CBOR byte string")
    head, length = 1, data[0] - 0x40
    if data[0] == 0x58:
        head, length = 2, data[1] if len(data) > 1 else -1
    elif data[0] == 0x59:
        head, length = 3, int.from_bytes(data[1:3], "big") if len(data) > 2 else -1
    if length < 0 or len(data) < head + length:
        raise EdhocError("truncated CBOR byte string")
    return data[head:head + length], data[head + length:]


class Responder:
    """Runs the responder side of exchanges and adds the resulting OSCORE contexts to ``contexts``.

    ``credentials`` returns the current devices' (identity, CCS bytes) pairs, so a
    SIGHUP that adds or removes an entry is seen by the next message_3.
    """

    def __init__(self, key: GatewayKey, credentials: Callable[[], Iterable[tuple[str, bytes]]],
                 contexts: ContextStore, sessions: PendingSessions) -> None:
        if lakers is None:
            raise RuntimeError("lakers-python is not installed")
        self.key = key
        self.credentials = credentials
        self.contexts = contexts
        self.sessions = sessions
        #: identity -> recipient id of its current EDHOC context
        self._established: dict[str, bytes] = {}

    def message_1(self, address: str, message_1: bytes) -> bytes:
        """message_2 for ``message_1`` (without the leading CBOR true)."""
        if not any(True for _ in self.credentials()):  # no key work for nobody (entries gone on reload)
            raise EdhocError("no device has an EDHOC credential")
        responder = lakers.EdhocResponder(self.key.private, self.key.credential.encoded)
        c_i, ead_1 = self._call(responder.process_message_1, message_1, failure="message_1 rejected")
        if any(item.is_critical() for item in ead_1):
            raise EdhocError("critical EAD item not supported")
        c_i = bytes(c_i)
        c_r = self._pick_c_r(c_i)
        message_2 = self._call(responder.prepare_message_2, lakers.CredentialTransfer.ByReference, c_r, [],
                               failure="cannot prepare message_2")
        self.sessions.add(c_r, _Pending(responder, c_i, address,
                                        self.sessions.clock() + self.sessions.limits.lifetime))
        return bytes(message_2)

    def message_3(self, c_r: bytes, message_3: bytes, *, message_4: bool) -> tuple[bytes, SecurityContext]:
        """Finish the exchange C_R names: (message_4 or b"", the new OSCORE context)."""
        pending = self.sessions.take(c_r)
        if pending is None:
            raise EdhocError("no EDHOC session for this C_R (expired or unknown)")
        responder = pending.responder
        id_cred_i, ead_3 = self._call(responder.parse_message_3, message_3, failure="message_3 rejected")
        if any(item.is_critical() for item in ead_3):
            raise EdhocError("critical EAD item not supported")
        identity, credential = self._device_for(bytes(id_cred_i))
        self._call(responder.verify_message_3, credential, failure="message_3 does not verify")
        reply = b""
        if message_4:
            reply = bytes(self._call(responder.prepare_message_4, [], failure="cannot prepare message_4"))
        else:
            self._call(responder.completed_without_message_4, failure="cannot complete")
        secret = bytes(responder.edhoc_exporter(0, [], MASTER_SECRET_BYTES))
        salt = bytes(responder.edhoc_exporter(1, [], MASTER_SALT_BYTES))
        return reply, self._install(identity, pending.c_i, c_r, secret, salt)

    def forget(self, keep: Callable[[str], bool]) -> int:
        """Remove the contexts of identities ``keep`` rejects (entries gone after a SIGHUP)."""
        gone = [identity for identity in self._established if not keep(identity)]
        for identity in gone:
            self.contexts.remove(self._established.pop(identity))
        return len(gone)

    def _install(self, identity: str, c_i: bytes, c_r: bytes, secret: bytes, salt: bytes) -> SecurityContext:
        old = self._established.pop(identity, None)
        if old is not None:
            self.contexts.remove(old)
        if self.contexts.find(c_r) is not None:  # an entry's static context took the id meanwhile
            raise EdhocError("connection identifier taken")
        try:
            context = self.contexts.add(c_i, c_r, secret, salt, persistent=False)
        except ValueError as exc:  # C_I == C_R, or an id too long for OSCORE
            raise EdhocError(f"no OSCORE context: {exc}") from None
        context.identity = Security("edhoc", identity)
        context.replay.establish(-1)  # fresh keys: nothing was received under them, no Echo needed
        self._established[identity] = c_r
        log.info("EDHOC: OSCORE context for credential {identity} (recipient id {rid})",
                 identity=identity, rid=c_r.hex())
        return context

    def _device_for(self, id_cred_i: bytes) -> tuple[str, bytes]:
        for identity, credential in self.credentials():
            try:
                lakers.credential_check_or_fetch(id_cred_i, credential)
            except Exception:
                continue
            return identity, credential
        log.info("EDHOC: message_3 names a credential no [[devices]] entry has")
        raise EdhocError("unknown credential")

    def _pick_c_r(self, c_i: bytes) -> bytes:
        def free(candidate: bytes) -> bool:
            return (candidate != c_i and candidate not in self.sessions
                    and self.contexts.find(candidate) is None)

        compact = [candidate for candidate in _COMPACT_IDS if free(candidate)]
        if compact:
            return secrets.choice(compact)
        for _ in range(64):
            candidate = secrets.token_bytes(2)
            if free(candidate):
                return candidate
        raise Busy(1)

    @staticmethod
    def _call(method: Callable[..., Any], *args: Any, failure: str) -> Any:
        """A lakers call; its exceptions (which say nothing secret, but a lot) become one short reason."""
        try:
            return method(*args)
        except Exception as exc:
            log.debug("EDHOC: {failure}: {error}", failure=failure, error=str(exc))
            raise EdhocError(failure) from None
