"""Which Matrix access token a request acts with.

A device may send its own token (CoAP option 256, raw or ``Bearer ...``).  A
device that sends none acts with the credentials of its ``[[devices]]`` entry:
the one its security context names (a DTLS PSK identity, an OSCORE recipient
id), else the one configured for its source address (longest matching prefix):
a fixed access token, or a user/password the gateway logs in with once and
keeps.  No token and no matching entry -> 4.01.

Every login of one entry names the same Matrix device (`DeviceCredentials.login_device_id`):
Matrix scopes send txnIds to the device, so a device retrying a send with the same
txn id after a gateway restart still gets the original event, not a second one.
With a store, the token of that login outlives the process: a restart reuses it,
and only a token the homeserver refuses leads to a new login.
All the devices an entry covers (a prefix) are that one Matrix device, so a txn id
one of them chooses is made its own with `address_scoped_txn_id`: two sensors that
both seed their counters from ``/time`` must not swallow each other's messages.
Such a shared token is handed out only for the operations `comatrix.policy`
lets the entry use (least privilege: forging a source address inside the prefix
must not give away the whole account).

An entry with ``appservice = true`` (application-service mode) acts as its
``user`` with the gateway's ``as_token`` (`AppserviceToken`): nothing to log in,
nothing kept, nothing secret on the air.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import time
from typing import TYPE_CHECKING, Sequence

from twisted.internet import defer

from twisted.python.failure import Failure

from comatrix.logs import get_logger
from comatrix.coap.errors import Unauthorized
from comatrix.coap.message import Request, Security
from comatrix.codec.msc3079 import ACCESS_TOKEN_OPTION
from comatrix.config import DeviceCredentials, host_address
from comatrix.matrix.api import AppserviceToken
from comatrix.policy import check_shared

if TYPE_CHECKING:
    from comatrix.matrix.client import MatrixClient
    from comatrix.store import Store

log = get_logger(__name__)

#: The schemes of `Security` (an IPv6 address never starts with one and a colon: no hex digits).
SECURITY_SCHEMES = ("dtls", "oscore", "edhoc")
#: Longest token accepted in option 256; Synapse tokens are ~40 bytes, macaroons ~250.
MAX_TOKEN_BYTES = 1024
#: What a token may hold: visible ASCII, no space (it goes in an HTTP header as it is).
_VISIBLE_ASCII = re.compile("[!-~]+")


def token_from_request(request: Request) -> str | None:
    """The token a device sent in option 256, without any ``Bearer `` prefix."""
    raw = request.option(ACCESS_TOKEN_OPTION)
    if raw is None:
        return None
    if len(raw) > MAX_TOKEN_BYTES:
        raise Unauthorized("token too long")
    try:
        token = raw.decode("ascii")
    except UnicodeDecodeError:
        raise Unauthorized("token must be ASCII") from None
    if token[:7].lower() == "bearer ":
        token = token[7:]
    token = token.strip(" ")  # spaces only: a tab or line break in a token is malformed, not trimmed
    if not token:
        raise Unauthorized("empty token")
    if _VISIBLE_ASCII.fullmatch(token) is None:
        raise Unauthorized("malformed token")  # it would not survive an HTTP header
    return token


def address_scoped_txn_id(request: Request, txn_id: str) -> str:
    """The Matrix txnId for a device-chosen ``txn_id``.

    A device with a token of its own has its own Matrix device: its txn id is used
    as it is.  One that sends no token acts through a ``[[devices]]`` entry shared
    with every address the entry covers: its txn id gets a tag of its source address.
    """
    if request.option(ACCESS_TOKEN_OPTION) is not None:
        return txn_id
    security = request.security
    # A secured device keeps its tag when it moves to another address.
    who = request.peer.host if security is None else f"{security.scheme}:{security.identity}"
    tag = hashlib.sha256(who.encode("utf-8")).hexdigest()[:10]
    return f"{tag}.{txn_id}"


#: One Matrix login of a ``[[devices]]`` entry: (user, device id).
LoginKey = tuple[str | None, str]


def _login_key(device: DeviceCredentials) -> LoginKey:
    return (device.user, device.login_device_id)


class Credentials:
    """Resolves the access token for a request; logs configured devices in on demand."""

    def __init__(self, devices: Sequence[DeviceCredentials], matrix: "MatrixClient",
                 store: "Store | None" = None, services: Sequence[DeviceCredentials] = ()) -> None:
        """``services``: the Matrix identities of the HTTP API's ``[[services]]`` (`token_of`)."""
        self._matrix = matrix
        self._store = store
        self._services = list(services)
        # Keyed by the Matrix login (user, device id), not the entry: an entry re-read on
        # SIGHUP keeps its token, and its login in progress.
        self._tokens: dict[LoginKey, str] = {}
        #: Per login: the token the homeserver last refused (a kept copy of it is not reused).
        self._refused: dict[LoginKey, str] = {}
        self._waiters: dict[LoginKey, list[defer.Deferred[str]]] = {}
        #: The application service's as_token (application-service mode), else None.
        self._as_token: str | None = None
        self.replace_devices(devices)

    def act_as_appservice(self, as_token: str) -> None:
        """Application-service mode: entries with ``appservice = true`` act with ``as_token``."""
        self._as_token = as_token

    def acting_token(self, user_id: str) -> AppserviceToken:
        """The token that acts as ``user_id`` of the namespace (application-service mode only)."""
        if self._as_token is None:
            raise Unauthorized("application-service mode is off")
        return AppserviceToken(self._as_token, user_id)

    def appservice_entry(self, user_id: str) -> DeviceCredentials | None:
        """The provisioned device whose user is ``user_id`` (application-service mode)."""
        return self._by_appservice_user.get(user_id)

    def replace_devices(self, devices: Sequence[DeviceCredentials]) -> None:
        """Use these entries from now on (SIGHUP).  Tokens of logins no entry names any more
        are forgotten; the others' tokens stay, so their devices notice nothing."""
        # Longest prefix first, so a single address beats the prefix it belongs to.
        self._devices = sorted(devices, key=lambda device: -1 if device.network is None else device.network.prefixlen,
                               reverse=True)
        # Entries of one address each are found by a dict lookup (10,000 provisioned devices: one
        # lookup, not 10,000 prefix tests per request); only prefixes are tested in turn.
        self._by_address: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, DeviceCredentials] = {}
        for device in self._devices:
            if device.network is not None and device.network.num_addresses == 1:
                self._by_address.setdefault(device.network.network_address, device)
        self._prefixes = [device for device in self._devices
                          if device.network is not None and device.network.num_addresses > 1]
        # Identities are unique across entries (checked by the config): one lookup per request.
        self._by_security = {security: device for device in devices for security in device.securities}
        self._by_appservice_user = {device.user: device for device in devices
                                    if device.appservice and device.user is not None}
        logins = {_login_key(device) for device in [*devices, *self._services]}
        for table in (self._tokens, self._refused):
            for key in [key for key in table if key not in logins]:
                del table[key]

    def edhoc_credentials(self) -> list[tuple[str, bytes]]:
        """(identity, CCS) of every current entry with ``edhoc``, for the EDHOC responder."""
        return [(device.edhoc.identity, device.edhoc.credential.encoded)
                for device in self._devices if device.edhoc is not None]

    async def drop_unconfigured_tokens(self) -> None:
        """Forget kept tokens of logins no entry asks for any more (removed, or now a fixed token)."""
        if self._store is None:
            return
        logins = [(device.user, device.login_device_id) for device in [*self._devices, *self._services]
                  if device.user is not None and not device.access_token]
        dropped = await self._store.keep_device_tokens_of(logins)
        if dropped:
            log.info("Dropped {count} kept token(s) of device entries no longer configured", count=dropped)

    def device_for(self, host: str) -> DeviceCredentials | None:
        """The entry of the longest ``address`` prefix holding ``host`` (a single address first)."""
        address = host_address(host)
        if address is None:
            return None
        device = self._by_address.get(address)
        if device is not None:
            return device
        for device in self._prefixes:
            if device.contains(address):
                return device
        return None

    def psk_for(self, identity: str) -> bytes | None:
        """The DTLS PSK of ``identity`` (None: no such entry, the handshake fails)."""
        device = self._by_security.get(Security("dtls", identity))
        return device.psk if device is not None else None

    def entry_for(self, request: Request) -> DeviceCredentials | None:
        """The entry a request acts through: found by its security identity first, then its address."""
        security = request.security
        if security is not None:
            device = self._by_security.get(security)
            if device is not None:
                return device
        return self.device_for(request.peer.host)

    def entry_for_binding(self, binding: str) -> DeviceCredentials | None:
        """The entry of what a compact session is bound to: ``scheme:identity`` of the security
        context it was opened through, else the device's address."""
        scheme, _, identity = binding.partition(":")
        if scheme in SECURITY_SCHEMES:
            return self._by_security.get(Security(scheme, identity))
        return self.device_for(binding)

    async def token_for(self, request: Request, *, operation: str) -> str:
        """The token ``request`` acts with for ``operation`` (a name of `comatrix.policy.OPERATIONS`).

        A shared entry's token is handed out only for what the entry may do: 4.03 otherwise.
        """
        token = token_from_request(request)
        if token is not None:
            return token
        device = self.entry_for(request)
        if device is None:
            raise Unauthorized("no credentials")
        check_shared(device.allow, operation)
        if device.appservice and device.user is not None:
            return self.acting_token(device.user)
        if device.access_token:
            return device.access_token
        return await self._login(device)

    async def token_of(self, entry: DeviceCredentials) -> str:
        """The token an entry that is no device's acts with (a service): fixed, or its kept login."""
        if entry.access_token:
            return entry.access_token
        return await self._login(entry)

    def forget(self, request: Request, token: str) -> bool:
        """Drop a gateway-held token the homeserver refused; True if it was ours (retry worth it)."""
        device = self.entry_for(request)
        if device is None or token_from_request(request) is not None:
            return False
        return self.forget_token_of(device, token)

    def forget_token_of(self, device: DeviceCredentials, token: str) -> bool:
        """`forget` for an entry: True if ``token`` was its kept login's (a new login is worth a retry)."""
        if device.access_token or device.appservice:
            return False
        key = _login_key(device)
        if self._tokens.get(key) != token:
            # Another request that held the same token was refused first and has dropped it
            # already: a retry (with the new login) is worth it for this one too.
            return self._refused.get(key) == token
        del self._tokens[key]
        self._refused[key] = token
        if self._store is not None and device.user is not None:
            forgotten = defer.ensureDeferred(
                self._store.forget_device_token(device.user, device.login_device_id, token))
            forgotten.addErrback(lambda failure: log.failure("Could not drop a refused device token", failure))
        return True

    async def _login(self, device: DeviceCredentials) -> str:
        key = _login_key(device)
        if key in self._tokens:
            return self._tokens[key]
        if key in self._waiters:  # a login for this device is under way: wait for its result
            waiter: defer.Deferred[str] = defer.Deferred()
            self._waiters[key].append(waiter)
            return await waiter
        self._waiters[key] = []
        try:
            token = await self._do_login(device)
        except BaseException:
            failure = Failure()
            for waiter in self._waiters.pop(key):
                waiter.errback(failure)
            raise
        for waiter in self._waiters.pop(key):
            waiter.callback(token)
        return token

    async def _do_login(self, device: DeviceCredentials) -> str:
        assert device.user is not None and device.password is not None
        key, device_id = _login_key(device), device.login_device_id
        # The store only spares logins: when it fails, the gateway logs in (and keeps the
        # token in memory) as it would without one.
        if self._store is not None:
            try:
                kept = await self._store.device_token(device.user, device_id)
            except Exception:
                log.failure("Could not read the kept token of a configured device; logging in")
                kept = None
            if kept is not None and kept != self._refused.get(key):
                self._tokens[key] = kept
                return kept
        log.info("Logging in configured device credentials for {user}", user=device.user)
        session = await self._matrix.login(device.user, device.password, device_id=device_id,
                                           initial_device_display_name="CoMatrix gateway")
        self._tokens[key] = session.access_token
        if self._store is not None:
            try:
                await self._store.save_device_token(device.user, device_id, session.access_token, time.time())
            except Exception:
                log.failure("Could not keep the token of a configured device; it lives in memory only")
        return session.access_token

