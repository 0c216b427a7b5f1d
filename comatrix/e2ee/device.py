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
        """Take one to-device event of a /sync: room keys (inside Olm) are kept, the rest ignored."""
        content = event.get("content")
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
            self.inbound.pop(next(iter(self.inbound)))

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
