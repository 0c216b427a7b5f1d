"""End-to-end encryption on the device users' behalf: the `RoomCrypto` the gateway installs.

`GatewayCrypto` (vodozemac present) acts for the Matrix device of the token a
request uses (``/account/whoami`` tells which): on first use it makes that
device's Olm account and uploads its identity and one-time keys; sending into an
encrypted room shares the room's Megolm key (Olm, to-device) with every device
of every joined or invited member, then sends ``m.room.encrypted``; reading
decrypts with the room keys received.  To-device events, device list changes and
one-time key counts come from every /sync of the device the gateway makes (the
compact watch loop hands its answers over) and from a /sync of its own with no
room data, made when a room key is missing.

`Unavailable` (no vodozemac) never sends plaintext into an encrypted room: it
refuses with 5.01, and marks encrypted events undecryptable.  Both learn whether
a room is encrypted from its ``m.room.encryption`` state (`RoomSettings`).
Application-service users are not served yet (their sends into encrypted rooms
are refused the same way).
"""

from __future__ import annotations

import hashlib
import secrets
from collections import OrderedDict
from typing import Any, Mapping, Sequence

from twisted.internet import defer

from comatrix.coap.errors import NotImplementedCoap
from comatrix.e2ee import formats
from comatrix.logs import get_logger
from comatrix.matrix import api
from comatrix.matrix.api import AppserviceToken
from comatrix.matrix.client import ENCRYPTED_TYPE, MatrixClient
from comatrix.matrix.errors import MatrixError
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


class GatewayCrypto:
    """E2EE for the Matrix devices of device users (token mode), state kept in a `Vault`."""

    def __init__(self, matrix: MatrixClient, vault: Any, reactor: Any) -> None:
        from comatrix.e2ee.device import DeviceCrypto  # vodozemac: only when E2EE is on

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
            try:
                return await work(device)
            finally:
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

    async def _members(self, token: str, room_id: str) -> set[str]:
        chunk = formats.json_list(await self.matrix.request(api.room_members(token, room_id)), "chunk")
        return {event["state_key"] for event in chunk if isinstance(event, dict)
                and isinstance(event.get("state_key"), str)
                and formats.json_field(event, "content").get("membership") in ("join", "invite")}

    async def _share(self, token: str, device: Any, room_id: str, outbound: Any, members: set[str]) -> None:
        """Send the room key to every device of ``members`` that does not have it yet (Olm, to-device)."""
        unknown = device.unknown(members)
        if unknown:
            device.keys_queried(await self.matrix.request(api.keys_query(token, unknown)), unknown)
        recipients = [d for d in device.devices_of(members) if (d.user_id, d.device_id) not in outbound.shared]
        missing = device.without_olm(recipients)
        if missing:
            wanted: dict[str, list[str]] = {}
            for peer in missing:
                wanted.setdefault(peer.user_id, []).append(peer.device_id)
            device.keys_claimed(await self.matrix.request(api.keys_claim(token, wanted)), missing)
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
