"""Rooms and membership in the compact profile: create, room info, name and topic, aliases,
invite, leave, kick, members and the device's pending invitations.

`RoomOperations` acts with a compact session's own login (its Matrix user), on the
rooms the session refers to by its room handles (`CompactService`).  Users travel
as *short references*: a localpart stands for a user of the session user's own
server, anything else is a full user id.  Pending invitations get room handles
too (without a join), so a device accepts one by joining that handle and declines
it by leaving it.  No CoAP here beyond the profile's error types (4.00 for a bad
user reference, 4.04 for an unknown room handle, via the service).
"""

from __future__ import annotations

import re
from typing import Any

from comatrix.coap.errors import BadRequest
from comatrix.compact.codec import Invitation, RoomInfo
from comatrix.compact.service import CompactService
from comatrix.logs import get_logger
from comatrix.store import SessionRecord

__all__ = ["RoomOperations", "full_user_id", "short_user", "MAX_INVITATIONS"]

log = get_logger(__name__)

#: Pending invitations listed (and given room handles) per request: a bound on the session's handles.
MAX_INVITATIONS = 16
#: A user id as the spec's grammar allows it (historical localparts included), and a bare localpart.
_USER_ID = re.compile(r"@[\x21-\x39\x3b-\x7e]+:[A-Za-z0-9.\-\[\]:]+")
_LOCALPART = re.compile(r"[\x21-\x39\x3b-\x3f\x41-\x7e]+")


def _server(user_id: str) -> str:
    return user_id.partition(":")[2]


def full_user_id(reference: str, own_user_id: str) -> str:
    """A short user reference -> a user id: a localpart is a user of ``own_user_id``'s server."""
    if reference.startswith("@"):
        if _USER_ID.fullmatch(reference):
            return reference
    elif _LOCALPART.fullmatch(reference):
        return f"@{reference}:{_server(own_user_id)}"
    raise BadRequest("user must be a localpart or @user:server")


def short_user(user_id: str, own_user_id: str) -> str:
    """A user id as short as a device needs it: the localpart for a user of its own server."""
    local, _, server = user_id[1:].partition(":")
    return local if user_id.startswith("@") and server == _server(own_user_id) else user_id


class RoomOperations:
    """The room and membership operations of compact sessions (one per gateway)."""

    def __init__(self, service: CompactService) -> None:
        self.service = service
        self.matrix = service.matrix

    async def _room_id(self, session: SessionRecord, handle: int) -> str:
        return (await self.service.room(session, handle)).room_id

    async def create(self, session: SessionRecord, *, public: bool, name: str | None, topic: str | None,
                     invite: tuple[str, ...]) -> int:
        """Create a room (the device's user is its creator and admin) and give it a room handle."""
        fields: dict[str, Any] = {"preset": "public_chat" if public else "private_chat"}
        if name is not None:
            fields["name"] = name
        if topic is not None:
            fields["topic"] = topic
        if invite:
            fields["invite"] = [full_user_id(user, session.user_id) for user in invite]
        room_id = await self.matrix.create_room(session.access_token, **fields)
        log.info("Compact session {id} created room {room}", id=session.id, room=room_id)
        return await self.service.joined(session, room_id)

    async def info(self, session: SessionRecord, handle: int) -> RoomInfo:
        details = await self.matrix.room_details(session.access_token, await self._room_id(session, handle),
                                                 user_id=session.user_id)
        return RoomInfo(_text_or_none(details.get("name")), _text_or_none(details.get("topic")),
                        int(details.get("joined_members") or 0), str(details.get("membership") or ""))

    async def resolve(self, session: SessionRecord, reference: str) -> str:
        """An alias (or a room name configured on the gateway) -> its room id (a room id: as it is)."""
        return await self.matrix.resolve_room(session.access_token, self.service.resolve_reference(reference))

    async def set(self, session: SessionRecord, handle: int, name: str | None, topic: str | None) -> None:
        room_id = await self._room_id(session, handle)
        if name is not None:
            await self.matrix.set_room_name(session.access_token, room_id, name)
        if topic is not None:
            await self.matrix.set_room_topic(session.access_token, room_id, topic)

    async def invite(self, session: SessionRecord, handle: int, user: str) -> None:
        room_id = await self._room_id(session, handle)
        await self.matrix.invite(session.access_token, room_id, full_user_id(user, session.user_id))

    async def leave(self, session: SessionRecord, handle: int) -> None:
        """Leave the room, or decline its invitation; the room handle stays (a join takes it again)."""
        await self.matrix.leave(session.access_token, await self._room_id(session, handle))

    async def kick(self, session: SessionRecord, handle: int, user: str, reason: str | None) -> None:
        room_id = await self._room_id(session, handle)
        await self.matrix.kick(session.access_token, room_id, full_user_id(user, session.user_id), reason)

    async def members(self, session: SessionRecord, handle: int) -> list[str]:
        """The joined members, sorted, users of the session's server by their localpart."""
        members = await self.matrix.joined_members(session.access_token, await self._room_id(session, handle))
        return [short_user(user, session.user_id) for user in members]

    async def invitations(self, session: SessionRecord) -> list[Invitation]:
        """The session user's pending invitations (at most `MAX_INVITATIONS`), each with a room handle."""
        pending = await self.matrix.invitations(session.access_token, session.user_id)
        found = []
        for invitation in pending[:MAX_INVITATIONS]:
            handle = await self.service.store.room_handle(session.id, invitation.room_id)
            inviter = short_user(invitation.inviter, session.user_id) if invitation.inviter else None
            found.append(Invitation(handle, inviter, invitation.name))
        return found

    async def accept(self, session: SessionRecord, handle: int) -> int:
        """Join the room of a room handle the session has (an invitation's); the same handle."""
        room_id = await self._room_id(session, handle)
        return await self.service.joined(session, await self.matrix.join(session.access_token, room_id))


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
