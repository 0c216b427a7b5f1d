"""Invitations to device users: accepted when the inviter is allowed, declined otherwise.

Each provisioned device's ``allow_invites_from`` lists who may invite it: user
ids, ``*:server`` (anyone on that server) or ``*``.  Without it, users of the
device user's own homeserver may.  An accepted invitation is joined as the
device's user, so the device can send, read and watch the room with no step of
its own; any other invitation is declined (a leave), so it does not linger.
"""

from __future__ import annotations

from typing import Sequence

from twisted.internet import defer

from comatrix.coap.errors import ServiceUnavailable
from comatrix.credentials import Credentials
from comatrix.logs import get_logger
from comatrix.matrix.client import MatrixClient
from comatrix.matrix.errors import HomeserverError
from comatrix.matrix.responses import Event
from comatrix.policy import user_allowed
from comatrix.appservice.stream import member_events, membership

log = get_logger(__name__)

__all__ = ["INVITATIONS_AT_ONCE", "Invitations", "inviter_allowed", "server_of"]

#: Invitations of one transaction answered at once (well below the upstream cap and its queue).
INVITATIONS_AT_ONCE = 8


def server_of(user_id: str) -> str:
    """The server name of a user id (everything after the first colon)."""
    return user_id.split(":", 1)[1] if ":" in user_id else ""


def inviter_allowed(patterns: Sequence[str] | None, invitee: str, inviter: str) -> bool:
    """Whether ``inviter`` may invite ``invitee`` under ``patterns`` (None: the invitee's own server)."""
    return user_allowed(patterns, invitee, inviter)


class Invitations:
    """A room listener of the event stream that answers invitations of device users."""

    def __init__(self, credentials: Credentials, matrix: MatrixClient) -> None:
        self._credentials = credentials
        self._matrix = matrix

    async def __call__(self, room_id: str, events: Sequence[Event]) -> None:
        # Answered several at a time, not one after another: a transaction inviting a thousand
        # device users must be acknowledged before the homeserver's own timeout, or it is pushed
        # again and every event behind it waits.  Bounded, so the upstream queue never overflows.
        answers = []
        limit = defer.DeferredSemaphore(INVITATIONS_AT_ONCE)
        for event in member_events(events):
            if membership(event) != "invite" or event.state_key is None:
                continue
            entry = self._credentials.appservice_entry(event.state_key)
            if entry is None:
                continue
            accept = inviter_allowed(entry.allow_invites_from, event.state_key, event.sender)
            answers.append(limit.run(self._answer, room_id, event.state_key, event.sender, accept))
        if answers:
            await defer.gatherResults(answers, consumeErrors=True)

    async def _answer(self, room_id: str, invitee: str, inviter: str, accept: bool) -> None:
        token = self._credentials.acting_token(invitee)
        try:
            if accept:
                await self._matrix.join(token, room_id)
                log.info("{user} accepted the invitation of {inviter} to {room}", user=invitee,
                         inviter=inviter, room=room_id)
            else:
                await self._matrix.leave(token, room_id)
                log.info("{user} declined the invitation of {inviter} to {room} (not in allow_invites_from)",
                         user=invitee, inviter=inviter, room=room_id)
        except (HomeserverError, ServiceUnavailable) as error:
            log.warn("Could not answer the invitation of {user} to {room}: {error}", user=invitee,
                     room=room_id, error=str(error))
