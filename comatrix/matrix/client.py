"""`MatrixClient`: the Matrix operations plugins call, over one `MatrixTransport`.

Combines the pure builders (`comatrix.matrix.api`), the transport and the pure
parsers (`comatrix.matrix.responses`) into coroutines, and adds what needs
state: the two-step registration flow, a bounded TTL cache of resolved room
aliases, and the backwards paging that finds the latest message.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence



from twisted.internet import defer

from comatrix.logs import get_logger
from comatrix.matrix import api
from comatrix.matrix.api import MatrixRequest
from comatrix.matrix.errors import InvalidResponse, InvalidRoomReference, MatrixError
from comatrix.matrix.responses import (
    Event,
    Invitation,
    LoginResponse,
    MessagesPage,
    SyncResponse,
    parse_create_room,
    parse_invitations,
    parse_join,
    parse_joined_members,
    parse_login,
    parse_messages,
    parse_register,
    parse_resolve_alias,
    parse_send,
    parse_sync,
    parse_uia_flows,
    parse_whoami,
)
from comatrix.matrix.transport import MatrixTransport

__all__ = ["ENCRYPTED_TYPE", "MatrixClient", "RoomCrypto", "check_room_reference"]

#: The event type of every end-to-end encrypted room event.
ENCRYPTED_TYPE = "m.room.encrypted"


class RoomCrypto(Protocol):
    """End-to-end encryption of room events, done for the acting token's Matrix device
    (`comatrix.e2ee` installs one in `MatrixClient.crypto`)."""

    async def outgoing(self, token: str, room_id: str, event_type: str,
                       content: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
        """The event to send instead (encrypted in an encrypted room), or a CoAP error refusing it."""

    async def incoming(self, token: str, room_id: str, events: Sequence[Event]) -> list[Event]:
        """``events`` with the encrypted ones decrypted or marked undecryptable, never dropped."""

    async def ready(self, token: str) -> None:
        """Make sure the token's device has its keys on the homeserver (others can then encrypt for it)."""

    async def sync_arrived(self, token: str, body: Mapping[str, Any]) -> None:
        """A /sync answer of the token's device: its to-device events, device list changes, key counts."""

    async def device_of(self, token: str) -> tuple[str, str] | None:
        """The (user id, device id) whose crypto state ``token`` uses, None if none (asked before a logout)."""

    async def forget(self, identity: tuple[str, str]) -> None:
        """The Matrix device ``identity`` was logged out: drop its crypto state, in memory and at rest."""


log = get_logger(__name__)

#: Matrix identifiers are at most 255 bytes (spec, "Identifier Grammar").
_MAX_ID_BYTES = 255
#: Whitespace (Unicode's, as str.isspace) or a control character: never in a room reference.
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")


def check_room_reference(room: str) -> str:
    """Return ``room`` if it looks like a room id or alias, else raise `InvalidRoomReference`.

    Room ids are ``!`` + opaque text; room version 12 ids have no ``:server``
    part, so nothing beyond the sigil is checked.  Aliases are ``#local:server``.
    """
    if not isinstance(room, str) or len(room) < 2 or len(room.encode("utf-8")) > _MAX_ID_BYTES:
        raise InvalidRoomReference("room must be a room id (!...) or an alias (#name:server)")
    if _SPACE_OR_CONTROL.search(room):
        raise InvalidRoomReference("room reference contains whitespace or control characters")
    if room[0] == "!":
        return room
    if room[0] == "#":
        local, sep, server = room[1:].partition(":")
        if local and sep and server:
            return room
    raise InvalidRoomReference("room must be a room id (!...) or an alias (#name:server)")


#: A /sync filter that leaves only ``rooms.invite`` (stripped state is not filtered by type).
INVITATIONS_FILTER: Mapping[str, Any] = {
    "presence": {"types": []}, "account_data": {"types": []},
    "room": {"timeline": {"limit": 0}, "state": {"types": []}, "ephemeral": {"types": []},
             "account_data": {"types": []}},
}

#: How many distinct /sync timeouts (ms) the invitation listing cycles through (about 11.5 days).
INVITATIONS_TIMEOUT_SPREAD = 10**9


class _AliasCache:
    """A bounded LRU map alias -> room id whose entries expire after ``ttl`` seconds."""

    def __init__(self, ttl: float, max_entries: int, clock: Any) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def get(self, alias: str) -> str | None:
        entry = self._entries.get(alias)
        if entry is None:
            return None
        room_id, expires = entry
        if self._clock.seconds() >= expires:
            del self._entries[alias]
            return None
        self._entries.move_to_end(alias)
        return room_id

    def put(self, alias: str, room_id: str) -> None:
        if self._ttl <= 0 or self._max <= 0:
            return
        self._entries[alias] = (room_id, self._clock.seconds() + self._ttl)
        self._entries.move_to_end(alias)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class MatrixClient:
    """High-level Matrix operations; every method may raise the errors of `comatrix.matrix.errors`."""

    def __init__(
        self,
        transport: MatrixTransport,
        *,
        alias_cache_ttl: float = 300.0,
        alias_cache_size: int = 1024,
        reactor: Any = None,
        max_message_pages: int = 5,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.transport = transport
        self._reactor = reactor
        self._aliases = _AliasCache(alias_cache_ttl, alias_cache_size, reactor)
        self._max_message_pages = max_message_pages
        #: End-to-end encryption (None: events go out and come in as they are).
        self.crypto: RoomCrypto | None = None

    async def request(self, req: MatrixRequest) -> dict[str, Any]:
        """Send any request (pass-through); return the JSON object of the 2xx answer."""
        _status, body = await self.transport.request(req)
        return body

    def readable_types(self, types: Iterable[str]) -> tuple[str, ...]:
        """The event types to ask for when ``types`` are wanted: messages may arrive encrypted."""
        wanted = tuple(types)
        if self.crypto is not None and "m.room.message" in wanted and ENCRYPTED_TYPE not in wanted:
            wanted += (ENCRYPTED_TYPE,)
        return wanted

    async def decrypt(self, token: str, room_id: str, events: Sequence[Event]) -> list[Event]:
        """``events`` as the device reads them (see `RoomCrypto.incoming`)."""
        if self.crypto is None or not any(event.type == ENCRYPTED_TYPE for event in events):
            return list(events)
        return await self.crypto.incoming(token, room_id, events)

    async def sync_arrived(self, token: str, body: Mapping[str, Any]) -> None:
        if self.crypto is not None:
            await self.crypto.sync_arrived(token, body)

    async def versions(self) -> dict[str, Any]:
        return await self.request(api.versions())

    async def register(
        self,
        username: str,
        password: str,
        *,
        device_id: str | None = None,
        initial_device_display_name: str | None = None,
    ) -> LoginResponse:
        """Register and log in, following Synapse's real flow.

        The first POST has no ``auth``; the homeserver answers 401 with its
        flows and a session; the second POST completes ``m.login.dummy``.
        """
        first = api.register(
            username, password, device_id=device_id,
            initial_device_display_name=initial_device_display_name,
        )
        try:
            body = await self.request(first)
        except MatrixError as e:
            if e.http_status != 401 or "flows" not in e.body:
                raise
            flows = parse_uia_flows(e.body)
            if not flows.offers_only("m.login.dummy"):
                stages = sorted({s for flow in flows.flows for s in flow})
                raise MatrixError(
                    401, e.errcode,
                    "registration needs auth stages the gateway cannot complete: "
                    + ", ".join(stages),
                ) from None
            body = await self.request(
                api.register(
                    username, password, session=flows.session, device_id=device_id,
                    initial_device_display_name=initial_device_display_name,
                )
            )
        reg = parse_register(body)
        if reg.access_token is None:
            raise InvalidResponse("register: no access_token although login was not inhibited")
        return LoginResponse(reg.user_id, reg.access_token, reg.device_id)

    async def login(
        self,
        user: str,
        password: str,
        *,
        device_id: str | None = None,
        initial_device_display_name: str | None = None,
    ) -> LoginResponse:
        """Log in with a password; pass the old ``device_id`` after a soft logout."""
        return parse_login(
            await self.request(
                api.login_password(
                    user, password, device_id=device_id,
                    initial_device_display_name=initial_device_display_name,
                )
            )
        )

    async def logout(self, token: str) -> None:
        """Log ``token`` out; its Matrix device's crypto state goes with it (room keys stay in the backup)."""
        identity = await self.crypto.device_of(token) if self.crypto is not None else None
        await self.request(api.logout(token))
        if identity is not None and self.crypto is not None:
            await self.crypto.forget(identity)

    async def whoami(self, token: str) -> str:
        return parse_whoami(await self.request(api.whoami(token)))

    async def resolve_room(self, token: str | None, room: str) -> str:
        """Return the room id for a room id (as is) or an alias (directory API, cached)."""
        room = check_room_reference(room)
        if room[0] == "!":
            return room
        cached = self._aliases.get(room)
        if cached is not None:
            return cached
        resolved = parse_resolve_alias(await self.request(api.resolve_alias(room, token=token)))
        self._aliases.put(room, resolved.room_id)
        log.debug("resolved {alias} -> {room_id}", alias=room, room_id=resolved.room_id)
        return resolved.room_id

    async def join(self, token: str, room: str, *, via: Iterable[str] = ()) -> str:
        """Join a room by id or alias; return its room id.

        ``/join/{roomIdOrAlias}`` lets the homeserver resolve the alias itself
        (over federation if need be), so an alias costs one call, not two; the
        answer also fills the alias cache.
        """
        room = check_room_reference(room)
        target = self._aliases.get(room) if room[0] == "#" else None
        room_id = parse_join(await self.request(api.join(token, target or room, via=via)))
        if room[0] == "#":
            self._aliases.put(room, room_id)
        if self.crypto is not None:
            await self._crypto_ready(token)
        return room_id

    async def _crypto_ready(self, token: str) -> None:
        """Publish the device's keys after a join, so members can encrypt for it; the join stands
        whatever happens (a later send or read tries again)."""
        assert self.crypto is not None
        try:
            await self.crypto.ready(token)
        except defer.CancelledError:
            raise
        except Exception as error:
            log.info("E2EE keys of a device not published after its join: {error}", error=type(error).__name__)

    async def leave(self, token: str, room_id: str) -> None:
        await self.request(api.leave(token, room_id))

    async def last_message(
        self, token: str, room_id: str, *, types: Iterable[str] = ("m.room.message",),
        senders: Callable[[str], bool] | None = None,
    ) -> Event | None:
        """The latest event of ``types`` in the room (of a sender ``senders`` allows), or None if there is none.

        State events and redacted events are skipped.  A filtered page may be
        empty without being the end (facts §5), so pages backwards until a
        match, a missing ``end``, or ``max_message_pages`` pages.
        """
        type_list = tuple(types)
        from_token: str | None = None
        limit = 1
        for _ in range(self._max_message_pages):
            page = parse_messages(
                await self.request(
                    api.last_messages(
                        token, room_id, limit=limit, types=self.readable_types(type_list), from_token=from_token
                    )
                )
            )
            for event in await self.decrypt(token, room_id, page.events):  # dir=b: newest first
                if event.type in type_list and not event.is_state and not event.is_redacted and (
                        senders is None or senders(event.sender)):
                    return event
            if page.end is None or page.end == from_token:
                return None
            from_token = page.end
            limit = 20  # the newest event was not usable; look further per call
        log.info("no message in the last {pages} pages of {room_id}",
                 pages=self._max_message_pages, room_id=room_id)
        return None

    async def message_page(self, token: str, room_id: str, *, direction: str = "b", from_token: str | None = None,
                           limit: int = 10) -> MessagesPage:
        """One page of the room's ``m.room.message`` events (decrypted; state and redacted events left
        out), and the position after it (``end``; None: nothing further)."""
        page = parse_messages(await self.request(api.last_messages(
            token, room_id, limit=limit, types=self.readable_types(("m.room.message",)), from_token=from_token,
            dir=direction)))
        events = [event for event in await self.decrypt(token, room_id, page.events)
                  if event.type == "m.room.message" and not event.is_state and not event.is_redacted]
        return MessagesPage(tuple(events), page.start, page.end)

    async def send_message(
        self,
        token: str,
        room_id: str,
        content: Mapping[str, Any],
        txn_id: str,
        event_type: str = "m.room.message",
    ) -> str:
        """Send an event (encrypted in an encrypted room); retrying with the same ``txn_id`` never
        duplicates it.  Returns the event id."""
        if self.crypto is not None:
            event_type, content = await self.crypto.outgoing(token, room_id, event_type, content)
        return parse_send(
            await self.request(api.send_event(token, room_id, event_type, txn_id, content))
        )

    async def create_room(self, token: str, **fields: Any) -> str:
        return parse_create_room(await self.request(api.create_room(token, **fields)))

    async def invite(self, token: str, room_id: str, user_id: str) -> None:
        await self.request(api.invite(token, room_id, user_id))

    async def sync(
        self,
        token: str,
        *,
        since: str | None = None,
        timeout_ms: int = 0,
        filter: str | Mapping[str, Any] | None = None,
    ) -> SyncResponse:
        return parse_sync(
            await self.request(api.sync(token, since=since, timeout_ms=timeout_ms, filter=filter))
        )

    async def room_details(self, token: str, room_id: str, user_id: str | None = None) -> dict[str, Any]:
        """Name, topic, avatar, canonical alias, encryption and member counts of a room (state read in
        parallel); with ``user_id`` also that user's ``membership`` (None: none)."""
        wanted = (("name", "m.room.name", "name"), ("topic", "m.room.topic", "topic"),
                  ("avatar_url", "m.room.avatar", "url"), ("canonical_alias", "m.room.canonical_alias", "alias"),
                  ("encryption", "m.room.encryption", "algorithm"))

        async def state_value(event_type: str, key: str) -> Any:
            try:
                content = await self.request(api.room_state_event(token, room_id, event_type))
            except MatrixError as error:
                if error.http_status == 404:
                    return None
                raise
            return content.get(key)

        async def members() -> list[Any]:
            chunk = (await self.request(api.room_members(token, room_id))).get("chunk")
            return chunk if isinstance(chunk, list) else []

        results = await defer.gatherResults(
            [defer.ensureDeferred(state_value(event_type, key)) for _name, event_type, key in wanted]
            + [defer.ensureDeferred(members())], consumeErrors=True)
        details: dict[str, Any] = {"room_id": room_id}
        details.update({name: value for (name, _type, _key), value in zip(wanted, results)})
        memberships = [event.get("content", {}).get("membership") for event in results[-1] if isinstance(event, dict)]
        details["member_count"] = sum(1 for m in memberships if m in ("join", "invite"))
        details["joined_members"] = sum(1 for m in memberships if m == "join")
        if user_id is not None:
            details["membership"] = next((event.get("content", {}).get("membership") for event in results[-1]
                                          if isinstance(event, dict) and event.get("state_key") == user_id), None)
        return details

    async def set_room_topic(self, token: str, room_id: str, topic: str) -> str:
        return parse_send(await self.request(api.send_state_event(token, room_id, "m.room.topic", {"topic": topic})))

    async def joined_members(self, token: str, room_id: str) -> tuple[str, ...]:
        """The user ids of the room's joined members, sorted."""
        return parse_joined_members(await self.request(api.joined_members(token, room_id)))

    async def invitations(self, token: str, user_id: str) -> tuple[Invitation, ...]:
        """The rooms ``user_id`` (the token's user) is invited to: one ``/sync`` that carries nothing else."""
        # Synapse keeps a /sync answer for minutes (caches.sync_response_cache_duration) under its
        # request, timeout included, and a sync without ``since`` never waits: a timeout that differs
        # per call (the clock's milliseconds) gets the invitations of now, not a list cached earlier.
        timeout_ms = 1 + int(self._reactor.seconds() * 1000) % INVITATIONS_TIMEOUT_SPREAD
        body = await self.request(api.sync(token, filter=INVITATIONS_FILTER, timeout_ms=timeout_ms))
        return parse_invitations(body, user_id)

    async def set_room_name(self, token: str, room_id: str, name: str) -> str:
        return parse_send(await self.request(api.send_state_event(token, room_id, "m.room.name", {"name": name})))

    async def react(self, token: str, room_id: str, event_id: str, key: str, txn_id: str) -> str:
        """An ``m.reaction`` annotation (encrypted in an encrypted room, its relation in the clear)."""
        return await self.send_message(token, room_id, api.reaction_content(event_id, key), txn_id,
                                       event_type="m.reaction")

    async def redact(self, token: str, room_id: str, event_id: str, txn_id: str, reason: str | None = None) -> str:
        return parse_send(await self.request(api.redact(token, room_id, event_id, txn_id, reason)))

    async def read_receipt(self, token: str, room_id: str, event_id: str) -> None:
        await self.request(api.receipt(token, room_id, event_id))

    async def reactions(self, token: str, room_id: str, event_id: str, *, pages: int = 4) -> list[dict[str, Any]]:
        """The ``m.reaction`` annotations of ``event_id`` (raw events; at most ``pages`` pages of 50)."""
        found: list[dict[str, Any]] = []
        position: str | None = None
        for _ in range(pages):
            body = await self.request(api.relations(token, room_id, event_id, "m.annotation", "m.reaction",
                                                    from_token=position))
            chunk = body.get("chunk")
            found += [event for event in chunk if isinstance(event, dict)] if isinstance(chunk, list) else []
            position = body.get("next_batch")
            if not isinstance(position, str) or not position:
                break
        return found

    async def kick(self, token: str, room_id: str, user_id: str, reason: str | None = None) -> None:
        await self.request(api.kick(token, room_id, user_id, reason))

    async def set_displayname(self, token: str, user_id: str, name: str) -> None:
        await self.request(api.set_displayname(token, user_id, name))

    async def set_avatar_url(self, token: str, user_id: str, avatar_url: str) -> None:
        await self.request(api.set_avatar_url(token, user_id, avatar_url))

    async def profile(self, token: str, user_id: str) -> dict[str, Any]:
        """``{displayname, avatar_url}`` of a user (None for what is not set)."""
        async def field(request: MatrixRequest, key: str) -> Any:
            try:
                return (await self.request(request)).get(key)
            except MatrixError as error:
                if error.http_status == 404:
                    return None
                raise

        return {"displayname": await field(api.displayname(token, user_id), "displayname"),
                "avatar_url": await field(api.avatar_url(token, user_id), "avatar_url")}

    async def upload(self, token: str, data: bytes, content_type: str, filename: str | None = None) -> str:
        """Upload media; its ``mxc://`` URI."""
        uri = (await self.request(api.upload(token, data, content_type, filename))).get("content_uri")
        if not isinstance(uri, str) or not uri.startswith("mxc://"):
            raise InvalidResponse("upload answer without content_uri")
        return uri

    async def close(self) -> None:
        await self.transport.close()
