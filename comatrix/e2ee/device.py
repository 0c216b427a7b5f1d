"""One Matrix device's end-to-end encryption state, held by the gateway: vodozemac objects, no I/O.

A `DeviceCrypto` is the device user's Olm account (identity keys, one-time keys),
its Olm sessions with other devices, the Megolm sessions it sends with (one per
room) and the ones it reads with (shared with it by others), and what it knows
of other users' devices.  It builds the bodies the homeserver wants and reads
its answers; `comatrix.e2ee.gateway` does the calls and keeps the state on disk
(`to_state` / `from_state`: vodozemac pickles under the gateway's pickle key).
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any, Iterable, Mapping

import vodozemac as vz

from comatrix.e2ee import formats
from comatrix.logs import get_logger
from comatrix.matrix.responses import Event

__all__ = ["DeviceCrypto", "PeerDevice"]

#: The content key of a relation (reply, edit, reaction): in the clear in an encrypted event.
RELATION = "m.relates_to"
log = get_logger(__name__)

#: Inbound Megolm sessions kept per device user (the oldest go first).
MAX_INBOUND = 4096
#: Olm sessions kept per peer identity key.
MAX_OLM_PER_PEER = 4
#: Users whose device lists are kept per device user.
MAX_TRACKED_USERS = 1024
#: Room key requests of the user's own other devices waiting for an answer, per device user.
MAX_KEY_REQUESTS = 32


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


@dataclasses.dataclass(frozen=True)
class PeerDevice:
    """Another Matrix device as its owner signed it (``/keys/query``)."""

    user_id: str
    device_id: str
    curve25519: str
    ed25519: str


@dataclasses.dataclass
class _Outbound:
    session: vz.GroupSession
    created_ms: int
    sent: int = 0
    #: (user id, device id) of every device the room key went to.
    shared: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    #: The members the session was made for: one of them leaving rotates it.
    members: set[str] = dataclasses.field(default_factory=set)


def verify_signed(value: Mapping[str, Any], user_id: str, key_id: str, ed25519: str) -> bool:
    """Whether ``value`` carries a valid signature of ``user_id``'s ``ed25519:key_id`` key."""
    signature = value.get("signatures", {}).get(user_id, {}).get(f"ed25519:{key_id}")
    if not isinstance(signature, str):
        return False
    try:
        vz.Ed25519PublicKey.from_base64(ed25519).verify_signature(
            formats.canonical_json(formats.unsigned_copy(value)), vz.Ed25519Signature.from_base64(signature))
    except ValueError:
        return False
    return True


class DeviceCrypto:
    """The E2EE state of one Matrix device (user id + device id) the gateway acts as."""

    def __init__(self, user_id: str, device_id: str, account: vz.Account | None = None) -> None:
        self.user_id = user_id
        self.device_id = device_id
        self.account = account if account is not None else vz.Account()
        #: Whether the identity keys are on the homeserver.
        self.uploaded = False
        #: Peer Curve25519 identity key -> Olm sessions, most recently used last.
        self.olm: dict[str, list[vz.Session]] = {}
        self.outbound: dict[str, _Outbound] = {}
        #: (room id, session id) -> (inbound session, the Curve25519 key and the user that shared it).
        self.inbound: dict[tuple[str, str], tuple[vz.InboundGroupSession, str, str]] = {}
        #: user id -> device id -> device; users in `stale` are queried again before use.
        self.devices: dict[str, dict[str, PeerDevice]] = {}
        self.stale: set[str] = set()
        #: The position of the gateway's own key /sync of this device.
        self.sync_since: str | None = None
        #: The user's server-side key backup version in use (None: not found or made yet), the inbound
        #: sessions already in it, and whether a restore from it is due (a state made afresh).
        self.backup_version: str | None = None
        self.backed_up: set[tuple[str, str]] = set()
        self.restore_due = False
        #: Whether the user's self-signing key signed this device on the homeserver.
        self.cross_signed = False
        #: (requesting device id, room id, session id) of the user's own other devices (not kept).
        self.key_requests: list[tuple[str, str, str]] = []

    # ------------------------------------------------------------------ own keys

    @property
    def curve25519(self) -> str:
        return self.account.curve25519_key.to_base64()

    @property
    def ed25519(self) -> str:
        return self.account.ed25519_key.to_base64()

    def _signed(self, value: dict[str, Any]) -> dict[str, Any]:
        signature = self.account.sign(formats.canonical_json(value)).to_base64()
        value["signatures"] = {self.user_id: {f"ed25519:{self.device_id}": signature}}
        return value

    def device_keys(self) -> dict[str, Any]:
        """The signed ``device_keys`` of ``/keys/upload``."""
        return self._signed({
            "user_id": self.user_id, "device_id": self.device_id, "algorithms": list(formats.ALGORITHMS),
            "keys": {f"curve25519:{self.device_id}": self.curve25519, f"ed25519:{self.device_id}": self.ed25519},
        })

    def one_time_keys(self, published: int) -> dict[str, Any]:
        """Signed one-time keys that bring the published count up to `formats.OTK_TARGET` (may be empty);
        `mark_published` once the homeserver has them."""
        missing = formats.OTK_TARGET - published
        if missing > 0 and not self.account.one_time_keys:
            self.account.generate_one_time_keys(missing)
        return {f"signed_curve25519:{key_id}": self._signed({"key": key.to_base64()})
                for key_id, key in self.account.one_time_keys.items()}

    def mark_published(self) -> None:
        self.account.mark_keys_as_published()

    # ------------------------------------------------------------------ other devices

    def devices_of(self, users: Iterable[str]) -> list[PeerDevice]:
        """The known devices of ``users``, this device itself left out."""
        return [device for user in users for device in self.devices.get(user, {}).values()
                if (user, device.device_id) != (self.user_id, self.device_id)]

    def unknown(self, users: Iterable[str]) -> list[str]:
        return sorted(user for user in users if user not in self.devices or user in self.stale)

    def devices_changed(self, users: Iterable[str]) -> None:
        self.stale.update(user for user in users if user in self.devices)

    def keys_queried(self, body: Mapping[str, Any], asked: Iterable[str]) -> None:
        """Take a ``/keys/query`` answer: each device whose keys its own key signed."""
        answered = formats.json_field(body, "device_keys")
        for user in asked:
            devices: dict[str, PeerDevice] = {}
            for device_id, keys in formats.json_field(answered, user).items():
                device = _peer_device(user, device_id, keys)
                if device is not None:
                    devices[device_id] = device
            if user in answered:
                self.devices[user] = devices
                self.stale.discard(user)
        while len(self.devices) > MAX_TRACKED_USERS:
            self.devices.pop(next(iter(self.devices)))

    def without_olm(self, devices: Iterable[PeerDevice]) -> list[PeerDevice]:
        return [device for device in devices if not self.olm.get(device.curve25519)]

    def keys_claimed(self, body: Mapping[str, Any], devices: Iterable[PeerDevice]) -> None:
        """Start an Olm session with each device whose claimed one-time key it signed itself."""
        claimed = formats.json_field(body, "one_time_keys")
        for device in devices:
            for key in formats.json_field(formats.json_field(claimed, device.user_id), device.device_id).values():
                if isinstance(key, Mapping) and isinstance(key.get("key"), str) and verify_signed(
                        key, device.user_id, device.device_id, device.ed25519):
                    session = self.account.create_outbound_session(
                        vz.Curve25519PublicKey.from_base64(device.curve25519),
                        vz.Curve25519PublicKey.from_base64(key["key"]))
                    self._keep_olm(device.curve25519, session)
                    break
            else:
                log.info("No usable one-time key of {user}'s device {device}: it gets no room key",
                         user=device.user_id, device=device.device_id)

    def _keep_olm(self, peer_key: str, session: vz.Session) -> None:
        sessions = self.olm.setdefault(peer_key, [])
        if session in sessions:
            sessions.remove(session)
        sessions.append(session)
        del sessions[:-MAX_OLM_PER_PEER]

    # ------------------------------------------------------------------ Olm (to-device)

    def olm_encrypt(self, device: PeerDevice, event_type: str, content: Mapping[str, Any]) -> dict[str, Any]:
        session = self.olm[device.curve25519][-1]
        payload = formats.olm_payload(event_type, content, sender=self.user_id, sender_device=self.device_id,
                                      sender_ed25519=self.ed25519, recipient=device.user_id,
                                      recipient_ed25519=device.ed25519)
        message_type, ciphertext = session.encrypt(payload).to_parts()
        return formats.olm_content(self.curve25519, device.curve25519, message_type, _b64encode(ciphertext))

    def to_device(self, event: Mapping[str, Any]) -> None:
        """Take one to-device event of a /sync: room keys (inside Olm) are kept, room key requests of the
        user's own other devices noted (`key_requests`), the rest ignored."""
        content = event.get("content")
        if event.get("type") == formats.ROOM_KEY_REQUEST:
            self._key_request(event.get("sender"), content)
            return
        if event.get("type") != formats.ENCRYPTED or not isinstance(content, Mapping) \
                or content.get("algorithm") != formats.OLM:
            return
        sender = event.get("sender")
        sender_key = content.get("sender_key")
        mine = formats.json_field(content, "ciphertext").get(self.curve25519)
        if not isinstance(sender_key, str) or not isinstance(mine, Mapping) or not isinstance(sender, str):
            return
        try:
            plaintext = self._olm_decrypt(sender_key, mine.get("type"), _b64decode(str(mine.get("body", ""))))
            payload = formats.json_object(plaintext)
        except ValueError as error:
            log.info("To-device message from {sender} not decryptable: {error}", sender=sender, error=error)
            return
        if payload.get("sender") != sender or payload.get("recipient") != self.user_id \
                or formats.json_field(payload, "recipient_keys").get("ed25519") != self.ed25519:
            log.warn("To-device message from {sender} not meant for this device: ignored", sender=sender)
            return
        if payload.get("type") == formats.ROOM_KEY:
            self._room_key(payload.get("content"), sender_key, sender)

    def _key_request(self, sender: Any, content: Any) -> None:
        if sender != self.user_id or not isinstance(content, Mapping) or content.get("action") != "request":
            return  # another user's devices are never given this user's room keys
        body = formats.json_field(content, "body")
        requester, room_id, session_id = content.get("requesting_device_id"), body.get("room_id"), \
            body.get("session_id")
        if isinstance(requester, str) and requester != self.device_id and (room_id, session_id) in self.inbound \
                and len(self.key_requests) < MAX_KEY_REQUESTS:
            self.key_requests.append((requester, str(room_id), str(session_id)))

    def forwarded_room_key(self, room_id: str, session_id: str) -> dict[str, Any]:
        """The ``m.forwarded_room_key`` content of an inbound session (from its first known index)."""
        session, sender_key, _sender = self.inbound[(room_id, session_id)]
        exported = session.export_at(session.first_known_index)
        return formats.forwarded_room_key_content(room_id, session_id, sender_key,
                                                  self._claimed_ed25519().get(sender_key, ""),
                                                  exported.to_base64() if exported is not None else "")

    def _claimed_ed25519(self) -> dict[str, str]:
        """Curve25519 identity key -> Ed25519 key of every device known (this one too)."""
        keys = {d.curve25519: d.ed25519 for devices in self.devices.values() for d in devices.values()}
        keys[self.curve25519] = self.ed25519
        return keys

    def _olm_decrypt(self, sender_key: str, message_type: Any, ciphertext: bytes) -> bytes:
        if message_type not in (0, 1):
            raise ValueError("unknown Olm message type")
        message = vz.AnyOlmMessage.from_parts(message_type, ciphertext)
        for session in reversed(self.olm.get(sender_key, [])):
            try:
                plaintext = session.decrypt(message)
            except ValueError:
                continue
            self._keep_olm(sender_key, session)
            return plaintext
        pre_key = message.to_pre_key()
        if pre_key is None:
            raise ValueError("no Olm session with the sender")
        session, plaintext = self.account.create_inbound_session(vz.Curve25519PublicKey.from_base64(sender_key),
                                                                 pre_key)
        self._keep_olm(sender_key, session)
        return plaintext

    def _room_key(self, content: Any, sender_key: str, sender: str) -> None:
        if not isinstance(content, Mapping) or content.get("algorithm") != formats.MEGOLM:
            return
        room_id, session_id, key = content.get("room_id"), content.get("session_id"), content.get("session_key")
        if not (isinstance(room_id, str) and isinstance(session_id, str) and isinstance(key, str)):
            return
        if (room_id, session_id) in self.inbound:
            return  # the first copy (lowest index) wins
        try:
            session = vz.InboundGroupSession(vz.SessionKey(key))
        except ValueError:
            return
        if session.session_id != session_id:
            return
        self._keep_inbound(room_id, session, sender_key, sender)
        log.debug("Room key of {room} received", room=room_id)

    def _keep_inbound(self, room_id: str, session: vz.InboundGroupSession, sender_key: str, sender: str) -> None:
        self.inbound[(room_id, session.session_id)] = (session, sender_key, sender)
        while len(self.inbound) > MAX_INBOUND:
            gone = next(iter(self.inbound))
            del self.inbound[gone]
            self.backed_up.discard(gone)

    # ------------------------------------------------------------------ Megolm (room events)

    def outbound_for(self, room_id: str, rotation: formats.Rotation, members: set[str],
                     now_ms: int) -> _Outbound:
        """The room's outbound session, a new one if it is due (age, count, a member gone)."""
        current = self.outbound.get(room_id)
        if current is not None and not rotation.due(current.created_ms, current.sent, now_ms) \
                and current.members <= members:
            current.members |= members
            return current
        if current is not None:
            log.debug("Megolm session of {room} rotated", room=room_id)
        session = vz.GroupSession()
        self._keep_inbound(room_id, vz.InboundGroupSession(session.session_key), self.curve25519, self.user_id)
        fresh = self.outbound[room_id] = _Outbound(session, now_ms, members=set(members))
        return fresh

    def room_key(self, room_id: str, outbound: _Outbound) -> dict[str, Any]:
        return formats.room_key_content(room_id, outbound.session.session_id,
                                        outbound.session.session_key.to_base64())

    def megolm_encrypt(self, room_id: str, event_type: str, content: Mapping[str, Any]) -> dict[str, Any]:
        outbound = self.outbound[room_id]
        # A relation (reply, edit, reaction) stays in the clear, as the spec asks, so the homeserver
        # can aggregate it; the rest is encrypted.
        relation = content.get(RELATION)
        inner = {key: value for key, value in content.items() if key != RELATION}
        ciphertext = outbound.session.encrypt(formats.megolm_plaintext(room_id, event_type, inner))
        outbound.sent += 1
        envelope = formats.megolm_content(self.curve25519, self.device_id, outbound.session.session_id,
                                          ciphertext.to_base64())
        if relation is not None:
            envelope[RELATION] = relation
        return envelope

    def can_decrypt(self, room_id: str, event: Event) -> bool:
        return (room_id, str(event.content.get("session_id"))) in self.inbound

    def megolm_decrypt(self, room_id: str, event: Event) -> Event:
        """The event as it was before encryption, or `formats.undecryptable`."""
        content = event.content
        if content.get("algorithm") != formats.MEGOLM:
            return formats.undecryptable(event, "unsupported algorithm")
        found = self.inbound.get((room_id, str(content.get("session_id"))))
        if found is None:
            return formats.undecryptable(event, "room key not received")
        if found[2] != event.sender:
            # A member's session used under another member's name: the text would be believed as theirs.
            log.warn("Event {event} of {sender} uses a room key shared by another user: not shown",
                     event=event.event_id, sender=event.sender)
            return formats.undecryptable(event, "room key of another sender")
        try:
            message = vz.MegolmMessage.from_base64(str(content.get("ciphertext")))
            event_type, inner = formats.parse_megolm_plaintext(found[0].decrypt(message).plaintext, room_id)
        except ValueError as error:
            log.info("Event {event} not decryptable: {error}", event=event.event_id, error=error)
            return formats.undecryptable(event, "decryption failed")
        if RELATION in content and RELATION not in inner:
            inner = {**inner, RELATION: content[RELATION]}
        return formats.decrypted(event, event_type, inner)

    # ------------------------------------------------------------------ server-side key backup

    def backup_auth_data(self, public_key: str) -> dict[str, Any]:
        """The ``auth_data`` of a new backup version: its public key, signed by this device."""
        return self._signed({"public_key": public_key})

    def backup_pending(self, public_key: str, limit: int) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """Up to ``limit`` inbound sessions not yet in the backup, encrypted to ``public_key``: the
        ``rooms`` of ``PUT /room_keys/keys`` and the sessions it holds (`backup_stored` once it is done)."""
        to_backup = vz.PkEncryption.from_key(vz.Curve25519PublicKey.from_base64(public_key))
        ed25519 = self._claimed_ed25519()
        rooms: dict[str, Any] = {}
        taken: list[tuple[str, str]] = []
        for (room_id, session_id), (session, sender_key, sender) in self.inbound.items():
            if (room_id, session_id) in self.backed_up:
                continue
            index = session.first_known_index
            exported = session.export_at(index)
            if exported is None:
                continue
            plaintext = formats.backup_plaintext(sender_key, ed25519.get(sender_key), sender, exported.to_base64())
            # By name: the bindings' to_base64 and from_base64 do not take the parts in the same order.
            sealed = to_backup.encrypt(plaintext)
            rooms.setdefault(room_id, {"sessions": {}})["sessions"][session_id] = formats.backup_key_data(
                index, _b64encode(sealed.ciphertext), _b64encode(sealed.mac), _b64encode(sealed.ephemeral_key))
            taken.append((room_id, session_id))
            if len(taken) >= limit:
                break
        return rooms, taken

    def backup_stored(self, taken: Iterable[tuple[str, str]]) -> None:
        self.backed_up.update(taken)

    def backup_lost(self) -> None:
        """The backup version in use is gone (deleted, or replaced): a new one gets everything."""
        self.backup_version = None
        self.backed_up.clear()

    def restore(self, body: Mapping[str, Any], private_key: bytes) -> int:
        """Import the sessions of a ``GET /room_keys/keys`` answer (those this device lacks); how many."""
        from_backup = vz.PkDecryption.from_key(vz.Curve25519SecretKey.from_bytes(private_key))
        count = 0
        for room_id, room in formats.json_field(body, "rooms").items():
            for session_id, entry in formats.json_field(room, "sessions").items():
                data = formats.json_field(entry, "session_data")
                try:
                    message = vz.Message(_b64decode(str(data.get("ciphertext"))), _b64decode(str(data.get("mac"))),
                                         _b64decode(str(data.get("ephemeral"))))
                    sender_key, sender, key = formats.parse_backup_plaintext(from_backup.decrypt(message))
                    session = vz.InboundGroupSession.import_session(vz.ExportedSessionKey(key))
                except ValueError as error:
                    log.info("Backed-up session of {room} not usable: {error}", room=room_id, error=error)
                    continue
                if session.session_id != session_id or (room_id, session_id) in self.inbound:
                    continue
                self._keep_inbound(room_id, session, sender_key, sender)
                self.backed_up.add((room_id, session_id))
                count += 1
        return count

    # ------------------------------------------------------------------ persistence

    def to_state(self, key: bytes) -> dict[str, Any]:
        return {
            "user_id": self.user_id, "device_id": self.device_id, "account": self.account.pickle(key),
            # Public, for `comatrixctl e2ee status` (which needs no vodozemac).
            "curve25519": self.curve25519, "ed25519": self.ed25519,
            "uploaded": self.uploaded, "sync_since": self.sync_since,
            "olm": {peer: [s.pickle(key) for s in sessions] for peer, sessions in self.olm.items()},
            "outbound": {room: {"session": o.session.pickle(key), "created_ms": o.created_ms, "sent": o.sent,
                                "shared": sorted(o.shared), "members": sorted(o.members)}
                         for room, o in self.outbound.items()},
            "inbound": [[room, s.pickle(key), sender_key, sender]
                        for (room, _id), (s, sender_key, sender) in self.inbound.items()],
            "devices": {user: [dataclasses.astuple(d) for d in devices.values()]
                        for user, devices in self.devices.items()},
            "stale": sorted(self.stale),
            "backup_version": self.backup_version, "backed_up": sorted(self.backed_up),
            "restore_due": self.restore_due, "cross_signed": self.cross_signed,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], key: bytes) -> "DeviceCrypto":
        device = cls(state["user_id"], state["device_id"], vz.Account.from_pickle(state["account"], key))
        device.uploaded = bool(state.get("uploaded"))
        device.sync_since = state.get("sync_since")
        device.olm = {peer: [vz.Session.from_pickle(p, key) for p in pickles]
                      for peer, pickles in state.get("olm", {}).items()}
        for room, o in state.get("outbound", {}).items():
            device.outbound[room] = _Outbound(vz.GroupSession.from_pickle(o["session"], key), o["created_ms"],
                                              o["sent"], {tuple(pair) for pair in o["shared"]},  # type: ignore[misc]
                                              set(o["members"]))
        for room, pickle, sender_key, sender in state.get("inbound", []):
            device._keep_inbound(room, vz.InboundGroupSession.from_pickle(pickle, key), sender_key, sender)
        device.devices = {user: {d[1]: PeerDevice(*d) for d in devices}
                          for user, devices in state.get("devices", {}).items()}
        device.stale = set(state.get("stale", []))
        device.backup_version = state.get("backup_version")
        device.backed_up = {(room, session) for room, session in state.get("backed_up", [])}
        device.restore_due = bool(state.get("restore_due"))
        device.cross_signed = bool(state.get("cross_signed"))
        return device


def _peer_device(user_id: str, device_id: str, keys: Any) -> PeerDevice | None:
    """A device of a ``/keys/query`` answer if its ids match and its own key signed it."""
    if not isinstance(keys, Mapping) or keys.get("user_id") != user_id or keys.get("device_id") != device_id:
        return None
    key_map = formats.json_field(keys, "keys")
    curve, ed = key_map.get(f"curve25519:{device_id}"), key_map.get(f"ed25519:{device_id}")
    if not isinstance(curve, str) or not isinstance(ed, str) or not verify_signed(keys, user_id, device_id, ed):
        log.warn("Device {device} of {user}: keys not signed by itself, ignored", device=device_id, user=user_id)
        return None
    return PeerDevice(user_id, device_id, curve, ed)
