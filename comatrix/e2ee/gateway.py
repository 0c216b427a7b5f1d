"""End-to-end encryption on the device users' behalf: the `RoomCrypto` the gateway installs.

`GatewayCrypto` (vodozemac present) acts for the Matrix device of the token a
request uses (``/account/whoami`` tells which): on first use it makes that
device's Olm account and uploads its identity and one-time keys; sending into an
encrypted room shares the room's Megolm key (Olm, to-device) with every device
of every joined or invited member, then sends ``m.room.encrypted``; reading
decrypts with the room keys received.  To-device events, device list changes and
one-time key counts come from every /sync of the device the gateway makes (the
compact watch loop hands its answers over) and from a /sync of its own with no
room data, made when a room key is missing.  Beyond that, per device user: the
user's cross-signing keys (made once, kept sealed and in secret storage) sign
each of its devices; every room key goes into the user's server-side key backup
(restored into a state made afresh); room key requests of the user's own other
devices are answered.

`Unavailable` (no vodozemac) never sends plaintext into an encrypted room: it
refuses with 5.01, and marks encrypted events undecryptable.  Both learn whether
a room is encrypted from its ``m.room.encryption`` state (`RoomSettings`).
Application-service users are not served yet (their sends into encrypted rooms
are refused the same way).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections import OrderedDict
from typing import Any, Mapping, Sequence

from twisted.internet import defer

from comatrix.coap.errors import NotImplementedCoap
from comatrix.e2ee import formats, secret_storage
from comatrix.e2ee.cross_signing import CrossSigning
from comatrix.logs import get_logger
from comatrix.matrix import api
from comatrix.matrix.api import AppserviceToken
from comatrix.matrix.client import ENCRYPTED_TYPE, MatrixClient
from comatrix.matrix.errors import HomeserverError, MatrixError
from comatrix.matrix.responses import Event

__all__ = ["GatewayCrypto", "RoomSettings", "Unavailable"]

log = get_logger(__name__)

#: How long a room seen unencrypted is believed so (s); an encrypted room stays encrypted.
PLAIN_ROOM_TTL = 30.0
#: The filter of the gateway's own key /sync: no room data at all.
KEYS_SYNC_FILTER: Mapping[str, Any] = {
    "presence": {"types": []}, "account_data": {"types": []},
    "room": {"rooms": [], "account_data": {"types": []}},
}
MAX_ROOMS_CACHED = 4096
#: Device users' identities and states kept in memory (the least recently used leave; states reload
#: from the vault).
MAX_IDENTITIES = 4096
MAX_DEVICES_CACHED = 256
#: Longest time (s) a send goes without a key /sync first: device list changes (a member's new
#: device) and room keys waiting in the inbox are seen at least this often by a device that sends.
KEYS_SYNC_INTERVAL = 60.0
#: Sessions put into the key backup per call (the rest go with the device's next use).
BACKUP_BATCH = 256
#: The secret storage name of the key backup's private key.
BACKUP_SECRET = "m.megolm_backup.v1"
#: How long (s) a device user's key backup is left alone after it failed or is someone else's.
BACKUP_RETRY = 300.0


class RoomSettings:
    """Room id -> its ``m.room.encryption`` content (None: not encrypted), read from the room state."""

    def __init__(self, matrix: MatrixClient, reactor: Any) -> None:
        self.matrix = matrix
        self.reactor = reactor
        self._known: dict[str, tuple[Mapping[str, Any] | None, float]] = {}

    async def encryption(self, token: str, room_id: str) -> Mapping[str, Any] | None:
        known = self._known.get(room_id)
        now = self.reactor.seconds()
        if known is not None and (known[0] is not None or now < known[1]):
            return known[0]
        try:
            content: Mapping[str, Any] | None = await self.matrix.request(
                api.room_state_event(token, room_id, "m.room.encryption"))
        except MatrixError as error:
            if error.http_status != 404:
                raise
            content = None
        if content is not None and not content.get("algorithm"):
            content = None
        if len(self._known) >= MAX_ROOMS_CACHED:
            self._known.pop(next(iter(self._known)))
        self._known[room_id] = (content, now + PLAIN_ROOM_TTL)
        return content


def _unreadable(events: Sequence[Event], why: str) -> list[Event]:
    return [formats.undecryptable(e, why) if e.type == ENCRYPTED_TYPE else e for e in events]


def _refuse(why: str) -> NotImplementedCoap:
    return NotImplementedCoap(f"encrypted room: {why}")


class Unavailable:
    """No E2EE (vodozemac missing): refuse sends into encrypted rooms, mark encrypted events undecryptable."""

    def __init__(self, matrix: MatrixClient, reactor: Any) -> None:
        self.rooms = RoomSettings(matrix, reactor)

    async def outgoing(self, token: str, room_id: str, event_type: str,
                       content: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
        if await self.rooms.encryption(token, room_id) is not None:
            log.info("Send into encrypted room {room} refused: E2EE unavailable", room=room_id)
            raise _refuse("E2EE unavailable")
        return event_type, content

    async def incoming(self, token: str, room_id: str, events: Sequence[Event]) -> list[Event]:
        return _unreadable(events, "E2EE unavailable")

    async def ready(self, token: str) -> None:
        return None

    async def sync_arrived(self, token: str, body: Mapping[str, Any]) -> None:
        return None

    async def device_of(self, token: str) -> tuple[str, str] | None:
        return None

    async def forget(self, identity: tuple[str, str]) -> None:
        return None


class GatewayCrypto:
    """E2EE for the Matrix devices of device users (token mode), state kept in a `Vault`."""

    def __init__(self, matrix: MatrixClient, vault: Any, reactor: Any, backup_key: bytes | None = None) -> None:
        from comatrix.e2ee.device import DeviceCrypto  # vodozemac: only when E2EE is on
        import vodozemac as vz

        self._device_class = DeviceCrypto
        self.matrix = matrix
        self.vault = vault
        self.reactor = reactor
        self.rooms = RoomSettings(matrix, reactor)
        #: SHA-256 of a token -> (user id, device id): never the token itself.
        self._identities: OrderedDict[bytes, tuple[str, str]] = OrderedDict()
        self._devices: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._locks: dict[tuple[str, str], defer.DeferredLock] = {}
        #: (user id, device id) -> when its last key /sync was (not kept: the first send syncs).
        self._synced: dict[tuple[str, str], float] = {}
        #: The key backup's private key (the operator keeps its recovery key) and public key.
        self._backup_key = backup_key
        self._backup_public = None if backup_key is None else \
            vz.Curve25519SecretKey.from_bytes(backup_key).public_key().to_base64()
        #: (user id, device id) -> until when its backup is left alone.
        self._backup_off: dict[tuple[str, str], float] = {}
        #: user id -> its cross-signing keys (also in the vault, under the device id ""), and the lock
        #: that keeps two of its devices from making two sets; (user id, device id) -> until when its
        #: signing is left alone.
        self._cross: OrderedDict[str, CrossSigning] = OrderedDict()
        self._user_locks: dict[str, defer.DeferredLock] = {}
        self._signing_off: dict[tuple[str, str], float] = {}

    # ------------------------------------------------------------------ the RoomCrypto hooks

    async def outgoing(self, token: str, room_id: str, event_type: str,
                       content: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
        settings = await self.rooms.encryption(token, room_id)
        if settings is None:
            return event_type, content
        if settings.get("algorithm") != formats.MEGOLM:
            raise _refuse("unsupported algorithm")
        if isinstance(token, AppserviceToken):
            raise _refuse("E2EE not yet for appservice users")
        identity = await self._identity(token)

        async def encrypt(device: Any) -> dict[str, Any]:
            if self.reactor.seconds() - self._synced.get(identity, -KEYS_SYNC_INTERVAL) >= KEYS_SYNC_INTERVAL:
                await self._keys_sync(token, device)
            members = await self._members(token, room_id)
            outbound = device.outbound_for(room_id, formats.rotation_of(settings), members,
                                           int(self.reactor.seconds() * 1000))
            await self._share(token, device, room_id, outbound, members)
            return device.megolm_encrypt(room_id, event_type, content)  # type: ignore[no-any-return]
        return ENCRYPTED_TYPE, await self._with_device(token, identity, encrypt)

    async def incoming(self, token: str, room_id: str, events: Sequence[Event]) -> list[Event]:
        if isinstance(token, AppserviceToken):
            return _unreadable(events, "E2EE not yet for appservice users")
        try:
            identity = await self._identity(token)
        except NotImplementedCoap:
            return _unreadable(events, "the token has no Matrix device")

        async def decrypt(device: Any) -> list[Event]:
            encrypted = [e for e in events if e.type == ENCRYPTED_TYPE]
            if any(not device.can_decrypt(room_id, e) for e in encrypted):
                await self._keys_sync(token, device)  # a room key may wait in the device's inbox
            return [device.megolm_decrypt(room_id, e) if e.type == ENCRYPTED_TYPE else e for e in events]
        return await self._with_device(token, identity, decrypt)  # type: ignore[no-any-return]

    async def ready(self, token: str) -> None:
        if isinstance(token, AppserviceToken):
            return
        identity = await self._identity(token)

        async def nothing(device: Any) -> None:
            return None
        await self._with_device(token, identity, nothing)

    async def sync_arrived(self, token: str, body: Mapping[str, Any]) -> None:
        if isinstance(token, AppserviceToken) or not _has_crypto_news(body):
            return
        identity = await self._identity(token)

        async def take(device: Any) -> None:
            await self._take_sync(token, device, body)
        await self._with_device(token, identity, take)

    async def device_of(self, token: str) -> tuple[str, str] | None:
        if isinstance(token, AppserviceToken):
            return None
        try:
            return await self._identity(token)
        except (MatrixError, NotImplementedCoap):
            return None  # a dead token, or one without a Matrix device: nothing of ours to drop

    async def forget(self, identity: tuple[str, str]) -> None:
        lock = self._locks.setdefault(identity, defer.DeferredLock())
        await lock.acquire()
        try:
            self._devices.pop(identity, None)
            self._synced.pop(identity, None)
            for digest in [digest for digest, known in self._identities.items() if known == identity]:
                del self._identities[digest]
            await self.vault.forget(*identity)
        finally:
            lock.release()
            if not lock.locked and not lock.waiting and self._locks.get(identity) is lock:
                del self._locks[identity]
        log.info("Crypto state of {user}'s logged-out device {device} dropped", user=identity[0], device=identity[1])

    # ------------------------------------------------------------------ devices

    async def _identity(self, token: str) -> tuple[str, str]:
        digest = hashlib.sha256(api.acting_identity(token).encode("utf-8")).digest()
        identity = self._identities.get(digest)
        if identity is None:
            body = await self.matrix.request(api.whoami(token))
            user_id, device_id = body.get("user_id"), body.get("device_id")
            if not isinstance(user_id, str) or not isinstance(device_id, str):
                raise _refuse("the token has no Matrix device")
            identity = self._identities[digest] = (user_id, device_id)
            while len(self._identities) > MAX_IDENTITIES:
                self._identities.popitem(last=False)
        self._identities.move_to_end(digest)
        return identity

    async def _with_device(self, token: str, identity: tuple[str, str], work: Any) -> Any:
        """Run ``work(device)`` alone for the device, with its keys on the homeserver, then save it."""
        lock = self._locks.setdefault(identity, defer.DeferredLock())
        await lock.acquire()
        try:
            device = await self._load(identity)
            if not device.uploaded:
                await self._upload(token, device, published=0)
            await self._cross_sign(token, device)
            await self._backup_start(token, device)
            try:
                return await work(device)
            finally:
                await self._backup_upload(token, device)
                await self._save(device)
        finally:
            lock.release()

    async def _load(self, identity: tuple[str, str]) -> Any:
        device = self._devices.get(identity)
        if device is not None:
            self._devices.move_to_end(identity)
            return device
        state = await self.vault.load(*identity)
        if state is None:
            device = self._device_class(*identity)
            device.restore_due = True  # the user's key backup may hold what an earlier state knew
            await self._save(device)  # the keys are kept before the homeserver sees them
            log.info("E2EE: new identity keys for {user}'s device {device}", user=identity[0], device=identity[1])
        else:
            device = self._device_class.from_state(state, self.vault.key)
        self._devices[identity] = device
        while len(self._devices) > MAX_DEVICES_CACHED:
            # Saved at the end of every use, so the vault has what leaves memory.
            gone, _state = self._devices.popitem(last=False)
            self._synced.pop(gone, None)
            lock = self._locks.get(gone)
            if lock is not None and not lock.locked:
                del self._locks[gone]
        return device

    async def _save(self, device: Any) -> None:
        await self.vault.save(device.user_id, device.device_id, device.to_state(self.vault.key))

    async def _upload(self, token: str, device: Any, published: int) -> None:
        """Upload the identity keys (once) and one-time keys up to the target."""
        keys = device.one_time_keys(published)
        if device.uploaded and not keys:
            return
        device_keys = None if device.uploaded else device.device_keys()
        await self._save(device)
        await self.matrix.request(api.keys_upload(token, device_keys=device_keys, one_time_keys=keys))
        device.mark_published()
        device.uploaded = True
        log.debug("E2EE: {count} one-time keys uploaded for {user}", count=len(keys), user=device.user_id)

    async def _cross_sign(self, token: str, device: Any) -> None:
        """Sign the device with its user's self-signing key (made and uploaded first if the user has none)."""
        identity = (device.user_id, device.device_id)
        if device.cross_signed or self.reactor.seconds() < self._signing_off.get(identity, 0.0):
            return
        lock = self._user_locks.setdefault(device.user_id, defer.DeferredLock())
        await lock.acquire()
        try:
            cross = await self._cross_signing(token, device.user_id)
            if cross is not None:
                signed = cross.sign("self_signing", device.device_keys())
                answer = await self.matrix.request(api.signatures_upload(
                    token, {device.user_id: {device.device_id: signed}}))
                if formats.json_field(answer, "failures"):
                    raise ValueError(f"signature refused: {dict(formats.json_field(answer, 'failures'))}")
                device.cross_signed = True
                log.info("E2EE: {user}'s device {device} signed by the user's self-signing key",
                         user=device.user_id, device=device.device_id)
                return
        except (HomeserverError, ValueError) as error:
            log.warn("E2EE: {user}'s device {device} not cross-signed: {error}", user=device.user_id,
                     device=device.device_id, error=error)
        finally:
            lock.release()
        self._signing_off[identity] = self.reactor.seconds() + BACKUP_RETRY

    async def _cross_signing(self, token: str, user_id: str) -> CrossSigning | None:
        """The user's cross-signing keys, on the homeserver; None if it has others the gateway lacks."""
        cross = self._cross.get(user_id)
        if cross is None:
            state = await self.vault.load(user_id, "")
            cross = None if state is None else CrossSigning.from_state(state)
        if cross is None:
            answer = await self.matrix.request(api.keys_query(token, [user_id]))
            master = formats.json_field(formats.json_field(answer, "master_keys"), user_id)
            if master:
                cross = await self._recover_cross_signing(token, user_id, master)
                if cross is None:
                    log.warn("E2EE: {user} has cross-signing keys the gateway does not hold: its devices stay "
                             "unsigned", user=user_id)
                    return None
                log.info("E2EE: cross-signing keys of {user} recovered from secret storage", user=user_id)
            else:
                cross = CrossSigning.generate(user_id)
            await self.vault.save(user_id, "", cross.to_state())  # kept before the homeserver sees them
        if not cross.uploaded:
            await self.matrix.request(api.device_signing_upload(token, cross.upload_body()))
            cross.uploaded = True
            await self.vault.save(user_id, "", cross.to_state())
            log.info("E2EE: cross-signing keys of {user} uploaded (master key {master})", user=user_id,
                     master=cross.public("master"))
            await self._store_secrets(token, cross)
        self._cross[user_id] = cross
        self._cross.move_to_end(user_id)
        while len(self._cross) > MAX_DEVICES_CACHED:
            gone, _keys = self._cross.popitem(last=False)
            lock = self._user_locks.get(gone)
            if lock is not None and not lock.locked:
                del self._user_locks[gone]
        return cross

    async def _store_secrets(self, token: str, cross: CrossSigning) -> None:
        """Keep the cross-signing private keys in the user's secret storage, under the backup key."""
        key = self._backup_key
        if key is None:
            return
        # The backup key too, as clients keep it: the recovery key then opens everything in a client.
        kept = {**cross.secrets(), BACKUP_SECRET: base64.b64encode(key).decode("ascii").rstrip("=")}
        entries: dict[str, Mapping[str, Any]] = {
            name: {"encrypted": {secret_storage.key_id(key): secret_storage.encrypt(key, name, secret)}}
            for name, secret in kept.items()}
        entries[secret_storage.key_event(key)] = secret_storage.describe_key(key)
        entries[secret_storage.DEFAULT_KEY] = {"key": secret_storage.key_id(key)}
        try:
            for event_type, content in entries.items():
                await self.matrix.request(api.set_account_data(token, cross.user_id, event_type, content))
        except HomeserverError as error:
            log.warn("E2EE: cross-signing keys of {user} not put into secret storage: {error}", user=cross.user_id,
                     error=error)

    async def _recover_cross_signing(self, token: str, user_id: str,
                                     master: Mapping[str, Any]) -> CrossSigning | None:
        """The user's cross-signing keys from its secret storage under the backup key, if they are the
        homeserver's ones (None otherwise)."""
        key = self._backup_key
        if key is None:
            return None
        found: dict[str, str] = {}
        try:
            for role in ("master", "self_signing", "user_signing"):
                name = f"m.cross_signing.{role}"
                content = await self.matrix.request(api.account_data(token, user_id, name))
                entry = formats.json_field(formats.json_field(content, "encrypted"), secret_storage.key_id(key))
                found[name] = secret_storage.decrypt(key, name, entry)
            cross = CrossSigning.from_secrets(user_id, found)
        except (HomeserverError, ValueError, KeyError) as error:
            log.info("E2EE: no cross-signing keys of {user} in secret storage under the backup key: {error}",
                     user=user_id, error=error)
            return None
        if list(formats.json_field(master, "keys").values()) != [cross.public("master")]:
            return None
        cross.uploaded = True
        return cross

    async def _backup_start(self, token: str, device: Any) -> None:
        """Find the user's key backup under the gateway's key (restoring from it if the state is new), or
        make one; a backup under another key is left alone (logged)."""
        identity = (device.user_id, device.device_id)
        if self._backup_public is None or device.backup_version is not None \
                or self.reactor.seconds() < self._backup_off.get(identity, 0.0):
            return
        try:
            current = await self._current_backup(token)
            if current is None:
                auth_data = device.backup_auth_data(self._backup_public)
                cross = self._cross.get(device.user_id)
                if cross is not None and cross.uploaded:
                    auth_data = cross.sign("master", auth_data)
                made = await self.matrix.request(api.room_keys_version_create(token, formats.BACKUP, auth_data))
                device.backup_version = str(made.get("version"))
                log.info("E2EE: key backup version {version} made for {user}", version=device.backup_version,
                         user=device.user_id)
            elif current.get("algorithm") == formats.BACKUP \
                    and formats.json_field(current, "auth_data").get("public_key") == self._backup_public:
                version = str(current.get("version"))
                if device.restore_due:
                    count = device.restore(await self.matrix.request(api.room_keys_get(token, version)),
                                           self._backup_key)
                    log.info("E2EE: {count} room keys of {user} restored from key backup version {version}",
                             count=count, user=device.user_id, version=version)
                device.backup_version = version
            else:
                log.warn("E2EE: {user}'s key backup is not under the gateway's backup key: its room keys are "
                         "not backed up", user=device.user_id)
                self._backup_off[identity] = self.reactor.seconds() + BACKUP_RETRY
                return
            device.restore_due = False
        except HomeserverError as error:
            log.warn("E2EE: key backup of {user} not reachable: {error}", user=device.user_id, error=error)
            self._backup_off[identity] = self.reactor.seconds() + BACKUP_RETRY

    async def _current_backup(self, token: str) -> Mapping[str, Any] | None:
        try:
            return await self.matrix.request(api.room_keys_version(token))  # type: ignore[no-any-return]
        except MatrixError as error:
            if error.http_status == 404:
                return None
            raise

    async def _backup_upload(self, token: str, device: Any) -> None:
        """Put the room keys the backup lacks into it (a failure is logged: they go at the next use)."""
        if self._backup_public is None or device.backup_version is None:
            return
        rooms, taken = device.backup_pending(self._backup_public, BACKUP_BATCH)
        if not taken:
            return
        try:
            await self.matrix.request(api.room_keys_put(token, device.backup_version, rooms))
        except MatrixError as error:
            if error.errcode == "M_WRONG_ROOM_KEYS_VERSION" or error.http_status == 404:
                log.warn("E2EE: key backup version {version} of {user} is gone: a new one is looked for",
                         version=device.backup_version, user=device.user_id)
                device.backup_lost()
            else:
                log.warn("E2EE: room keys of {user} not backed up: {error}", user=device.user_id, error=error)
            return
        except HomeserverError as error:
            log.warn("E2EE: room keys of {user} not backed up: {error}", user=device.user_id, error=error)
            return
        device.backup_stored(taken)
        log.debug("E2EE: {count} room keys of {user} backed up", count=len(taken), user=device.user_id)

    async def _members(self, token: str, room_id: str) -> set[str]:
        chunk = formats.json_list(await self.matrix.request(api.room_members(token, room_id)), "chunk")
        return {event["state_key"] for event in chunk if isinstance(event, dict)
                and isinstance(event.get("state_key"), str)
                and formats.json_field(event, "content").get("membership") in ("join", "invite")}

    async def _share(self, token: str, device: Any, room_id: str, outbound: Any, members: set[str]) -> None:
        """Send the room key to every device of ``members`` that does not have it yet (Olm, to-device)."""
        await self._query(token, device, device.unknown(members))
        recipients = [d for d in device.devices_of(members) if (d.user_id, d.device_id) not in outbound.shared]
        await self._olm_with(token, device, recipients)
        messages: dict[str, dict[str, Any]] = {}
        room_key = device.room_key(room_id, outbound)
        sent_to = [d for d in recipients if device.olm.get(d.curve25519)]
        for peer in sent_to:
            messages.setdefault(peer.user_id, {})[peer.device_id] = device.olm_encrypt(peer, formats.ROOM_KEY,
                                                                                      room_key)
        if not messages:
            return
        await self._save(device)  # the Olm ratchets moved: kept before anything leaves
        await self.matrix.request(api.send_to_device(token, ENCRYPTED_TYPE, "e2ee" + secrets.token_urlsafe(12),
                                                     messages))
        outbound.shared.update((d.user_id, d.device_id) for d in sent_to)
        log.debug("E2EE: room key of {room} sent to {count} devices", room=room_id, count=len(sent_to))

    async def _query(self, token: str, device: Any, users: Sequence[str]) -> None:
        if users:
            device.keys_queried(await self.matrix.request(api.keys_query(token, users)), users)

    async def _olm_with(self, token: str, device: Any, peers: Sequence[Any]) -> None:
        """Olm sessions with ``peers`` (their one-time keys claimed where there is none yet)."""
        missing = device.without_olm(peers)
        if missing:
            wanted: dict[str, list[str]] = {}
            for peer in missing:
                wanted.setdefault(peer.user_id, []).append(peer.device_id)
            device.keys_claimed(await self.matrix.request(api.keys_claim(token, wanted)), missing)

    async def _answer_key_requests(self, token: str, device: Any) -> None:
        """Forward the room keys the user's own other devices asked for (Olm, to-device), one by one."""
        requests, device.key_requests = device.key_requests, []
        try:
            await self._forward(token, device, requests)
        except HomeserverError as error:
            log.warn("E2EE: room key requests of {user}'s devices not answered: {error}", user=device.user_id,
                     error=error)

    async def _forward(self, token: str, device: Any, requests: Sequence[tuple[str, str, str]]) -> None:
        await self._query(token, device, [device.user_id])  # the requesting device may be new
        own = device.devices.get(device.user_id, {})
        for requester, room_id, session_id in requests:
            peer = own.get(requester)
            if peer is None:
                log.warn("E2EE: room key request of {user}'s unknown device {device}: not answered",
                         user=device.user_id, device=requester)
                continue
            await self._olm_with(token, device, [peer])
            if not device.olm.get(peer.curve25519):
                continue
            content = device.olm_encrypt(peer, formats.FORWARDED_ROOM_KEY, device.forwarded_room_key(room_id,
                                                                                                  session_id))
            await self._save(device)
            await self.matrix.request(api.send_to_device(token, ENCRYPTED_TYPE, "e2ee" + secrets.token_urlsafe(12),
                                                         {device.user_id: {requester: content}}))
            log.info("E2EE: room key of {room} forwarded to {user}'s own device {device}", room=room_id,
                     user=device.user_id, device=requester)

    async def _keys_sync(self, token: str, device: Any) -> None:
        """One /sync of the device with no room data: its inbox of to-device events (room keys)."""
        body = await self.matrix.request(api.sync(token, since=device.sync_since, filter=KEYS_SYNC_FILTER))
        self._synced[(device.user_id, device.device_id)] = self.reactor.seconds()
        await self._take_sync(token, device, body)
        next_batch = body.get("next_batch")
        if isinstance(next_batch, str):
            device.sync_since = next_batch

    async def _take_sync(self, token: str, device: Any, body: Mapping[str, Any]) -> None:
        for event in formats.json_list(formats.json_field(body, "to_device"), "events"):
            if isinstance(event, Mapping):
                device.to_device(event)
        if device.key_requests:
            await self._answer_key_requests(token, device)
        device.devices_changed(user for user in formats.json_list(formats.json_field(body, "device_lists"), "changed")
                               if isinstance(user, str))
        counts = body.get("device_one_time_keys_count")
        if isinstance(counts, Mapping) and isinstance(counts.get("signed_curve25519", 0), int):
            await self._upload(token, device, published=counts.get("signed_curve25519", 0))


def _has_crypto_news(body: Mapping[str, Any]) -> bool:
    """Whether a /sync answer holds anything for the device's crypto state (most hold nothing)."""
    counts = body.get("device_one_time_keys_count")
    published = counts.get("signed_curve25519", 0) if isinstance(counts, Mapping) else formats.OTK_TARGET
    return bool(formats.json_list(formats.json_field(body, "to_device"), "events")
                or formats.json_list(formats.json_field(body, "device_lists"), "changed")
                or (isinstance(published, int) and published < formats.OTK_TARGET))
