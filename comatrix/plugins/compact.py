"""The compact device profile's resources: ``/+ /- /x /w /v /z``, for rooms and membership
``/* /y /@ /~ /! /&``, for reactions, redactions and read receipts ``/) /_ /,``, and history ``/(``
(``docs/protocol.rst``).

One character per path, positional CBOR bodies, an 8-byte session handle
instead of the access token, small room handles instead of room ids: every
operation of a device fits one 802.15.4 frame.  The layouts live in
`comatrix.compact.codec`, the state in `comatrix.compact.service`; this module
only binds them to CoAP methods and codes.

Settings (``[plugins.compact]`` in the config file)::

    [plugins.compact.rooms]
    lab = "#lab:example.org"     # a device may join "lab"

How many sessions a device may hold and how long an unused one lives are
``[limits]`` settings (``max_sessions_per_device``, ``max_sessions``,
``session_idle_timeout``): see `comatrix.compact.service`.  Whose messages a session's
watches and history deliver is the ``allowed_senders`` of the ``[[devices]]`` entry the
session was opened through (by its security identity, else its address), per room where
the entry's ``rooms`` table names one; without either, users of the session user's own server.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

from twisted.internet import defer
from twisted.python.failure import Failure

from comatrix.coap.errors import BadRequest, Forbidden, UnsupportedContentFormat
from comatrix.coap.message import Request, Response
from comatrix.coap.numbers import Code
from comatrix.coap.resource import CoapResource, LinkAttributes
from comatrix.compact import codec
from comatrix.compact.codec import (CONTENT_FORMAT, PATHS, RESOURCE_TYPES, CreateRequest, EventRequest,
                                    HandleRequest, HistoryEvent, HistoryPage, HistoryRequest, JoinRequest,
                                    LoginRequest, Message, MessagesRequest, ReactRequest, RoomRequest, SendRequest,
                                    SetRoomRequest, UserRequest)
from comatrix.compact.relations import RelationOperations
from comatrix.compact.rooms import RoomOperations, short_user
from comatrix.compact.service import CompactService, handle_hash
from comatrix.config import ConfigError, DeviceCredentials
from comatrix.credentials import Credentials
from comatrix.errors import COMPACT_DIAGNOSTIC_BYTES, matrix_error_response
from comatrix.identity import device_of
from comatrix.interfaces import PluginContext
from comatrix.logs import get_logger
from comatrix.longpoll import long_poller
from comatrix.matrix.errors import MatrixError
from comatrix.resources import MatrixResource, ResourcePlugin
from comatrix.store import SessionRecord, Store, StoredMessage

log = get_logger(__name__)

#: Key of the shared `CompactService` in ``PluginContext.state``.
STATE_KEY = "compact"
#: ``[[devices]]`` entries whose allowed_senders are logged one by one at start (the rest are counted).
MAX_LOGGED_ENTRIES = 20
SETTINGS_NAME = "compact"


def compact_service(context: PluginContext) -> CompactService:
    """The one `CompactService` of this gateway (made by whichever compact resource is built first)."""
    service = context.state.get(STATE_KEY)
    if isinstance(service, CompactService):
        return service
    settings = context.config.plugin_settings(SETTINGS_NAME)
    rooms = settings.get("rooms", {})
    if not isinstance(rooms, Mapping) or not all(
            isinstance(name, str) and isinstance(target, str) and target[:1] in ("!", "#")
            for name, target in rooms.items()):
        raise ConfigError("[plugins.compact.rooms] maps names to room ids (!...) or aliases (#...)")
    store = context.store if context.store is not None else Store.for_state_dir(
        context.config.state_dir, context.reactor)
    # /sync long-polls use the gateway's uncapped long-poll pool (shared with MSC3079), each with
    # its own deadline: watching devices must not hold the upstream cap's slots.
    events = context.events
    service = CompactService(context.matrix, store, context.reactor, rooms=rooms,
                             long_polls=long_poller(context), limits=context.config.limits,
                             acting=context.credentials.acting_token if events is not None else None)
    if events is not None:
        events.subscribe(service.rooms_arrived)  # watches of device users are fed by transactions
    service.allowed_senders = functools.partial(_allowed_senders, context.credentials)
    _log_allowed_senders(context.config.devices)
    context.state[STATE_KEY] = service
    add_trigger = getattr(context.reactor, "addSystemEventTrigger", None)
    if add_trigger is not None:
        # Idle sessions are swept once the reactor runs (first those that idled out while stopped).
        add_trigger("after", "startup", service.start_expiry)
        add_trigger("before", "shutdown", service.stop)
    return service


def _allowed_senders(credentials: Credentials, session: SessionRecord, room_id: str) -> Sequence[str] | None:
    """The ``allowed_senders`` of the entry ``session`` was opened through, in ``room_id``."""
    entry = credentials.entry_for_binding(session.peer_host)
    return entry.senders_in(room_id) if entry is not None else None


def _log_allowed_senders(devices: Sequence[DeviceCredentials]) -> None:
    """Say at start whose messages reach devices (the default, and each entry that sets its own)."""
    configured = [device for device in devices if device.allowed_senders is not None or device.room_senders]
    log.info("Compact watches and history deliver a device's own messages and those of users of its own "
             "server, unless its [[devices]] entry sets allowed_senders ({count} of {total} do)",
             count=len(configured), total=len(devices))
    for device in configured[:MAX_LOGGED_ENTRIES]:
        log.info("Device {label}: allowed_senders {senders}{rooms}", label=device.label,
                 senders=list(device.allowed_senders) if device.allowed_senders is not None else "(own server)",
                 rooms="".join(f"; in {room}: {list(patterns)}" for room, patterns in device.room_senders))
    for device in configured:
        if "*" in (device.allowed_senders or ()) or any("*" in patterns for _room, patterns in device.room_senders):
            log.warn("Device {label}: allowed_senders \"*\": messages of anyone in its rooms reach it",
                     label=device.label)


def _link(op: str, title: str, *, obs: bool = False) -> LinkAttributes:
    return LinkAttributes(rt=RESOURCE_TYPES[op], ct=(CONTENT_FORMAT,), title=title, obs=obs)


def _compact_matrix_error(failure: Failure) -> Response:
    failure.trap(MatrixError)  # anything else goes on to the gateway's error adapter
    return matrix_error_response(failure.value, COMPACT_DIAGNOSTIC_BYTES)  # type: ignore[arg-type]


def _cbor(payload: bytes, code: Code) -> Response:
    return Response(code=code, payload=payload, content_format=CONTENT_FORMAT)


class CompactResource(MatrixResource):
    """Base of the compact resources: the shared service and the CBOR payload check."""

    operation = "compact"  # sessions of the device's own login, never shared credentials

    def __init__(self, context: PluginContext) -> None:
        super().__init__(context)
        self.service = compact_service(context)

    def render(self, request: Request) -> "defer.Deferred[Response]":
        # The homeserver's error text, cut shorter than elsewhere: the profile's error
        # datagram must fit its 64-byte response budget too.
        return super().render(request).addErrback(_compact_matrix_error)

    @staticmethod
    def payload(request: Request) -> bytes:
        if request.content_format not in (None, CONTENT_FORMAT):
            raise UnsupportedContentFormat("expected application/cbor (60)")
        return request.payload


class LoginResource(CompactResource):
    link = _link("login", "Compact login: [user, password] -> session handle")

    async def render_POST(self, request: Request) -> Response:
        login = LoginRequest.decode(self.payload(request))
        device_key = device_of(request).key
        if login.password:
            handle = await self.service.login(login.user, login.password, request.peer, device_key,
                                              request.security)
        else:
            handle = await self.service.open_appservice_session(self._device_user(request, login.user),
                                                                request.peer, device_key, request.security)
        return _cbor(codec.encode_handle(handle), Code.CREATED)

    def _device_user(self, request: Request, user: str) -> str:
        """The user of a provisioned device that logs in without a password (application-service mode)."""
        entry = self.context.credentials.entry_for(request)
        if entry is None or not entry.appservice or entry.user is None:
            raise BadRequest("password must be a non-empty text string")
        if user not in (entry.user, entry.user[1:].split(":", 1)[0]):
            raise Forbidden("not this device's user")
        return entry.user


class LogoutResource(CompactResource):
    link = _link("logout", "Compact logout: [handle]")

    async def render_POST(self, request: Request) -> Response:
        logout = HandleRequest.decode(self.payload(request))
        session = await self.service.session(logout.handle, request.peer, request.security)
        await self.service.logout(session)
        _registration.cache_clear()  # it holds registration bodies, and so handles: drop the revoked one
        return Response(code=Code.CHANGED)


class JoinResource(CompactResource):
    link = _link("join", "Compact join: [handle, room] -> room handle")

    def __init__(self, context: PluginContext) -> None:
        super().__init__(context)
        self.rooms = RoomOperations(self.service)

    async def render_POST(self, request: Request) -> Response:
        join = JoinRequest.decode(self.payload(request))
        session = await self.service.session(join.handle, request.peer, request.security)
        if isinstance(join.room, int):  # a room handle the session has: accepts its invitation
            room_handle = await self.rooms.accept(session, join.room)
        else:
            room_handle = await self.service.join(session, join.room_text())
        return _cbor(codec.encode_uint(room_handle), Code.CHANGED)


class SendResource(CompactResource):
    link = _link("send", "Compact send: [handle, room, seq, body(, kind(, reply-to(, replaces)))] -> reference")

    async def render_POST(self, request: Request) -> Response:
        send = SendRequest.decode(self.payload(request))
        session = await self.service.session(send.handle, request.peer, request.security)
        reference = await self.service.send(session, send.room, send.seq, send.body, send.kind, send.reply_to,
                                            send.replaces)
        return _cbor(codec.encode_uint(reference), Code.CHANGED)


class HistoryResource(CompactResource):
    link = _link("history", "Compact history: [handle, room, from, count] -> [next, [ref, sender, body, ts]...]")

    async def render_FETCH(self, request: Request) -> Response:
        fetch = HistoryRequest.decode(self.payload(request))
        session = await self.service.session(fetch.handle, request.peer, request.security)
        following, messages = await self.service.history(session, fetch.room, fetch.start, fetch.count)
        events = tuple(HistoryEvent(message.cursor, short_user(message.sender, session.user_id), message.body,
                                    message.ts // 1000, message.msgtype) for message in messages)
        return _cbor(codec.encode_history(HistoryPage(following, events)), Code.CONTENT)


def _device_message(message: StoredMessage | None) -> bytes:
    if message is None:
        return codec.encode_message(None)
    return codec.encode_message(Message(message.sender, message.body, message.ts // 1000, message.cursor))


class MessagesResource(CompactResource):
    """FETCH [handle, room(, cursor)]; observable: each new message of the room is pushed."""

    link = _link("messages", "Compact messages: latest, or since a cursor; observable", obs=True)

    def __init__(self, context: PluginContext) -> None:
        super().__init__(context)
        #: While a message is being pushed: (session handle hash, room handle, encoded message).
        self._pushing: tuple[bytes, int, bytes] | None = None
        #: While a batch is being pushed: (session handle hash, room handle) -> encoded message.
        self._pushing_batch: dict[tuple[bytes, int], bytes] = {}
        self.service.on_message = self._push
        self.service.on_messages = self._push_batch
        self.service.is_observed = self._observed

    def render_FETCH(self, request: Request) -> Any:
        pushing = self._pushing
        if pushing is not None and _selects(request, pushing[0], pushing[1]):
            # A notification: the pushed message (rendered synchronously inside notify).
            return _cbor(pushing[2], Code.CONTENT)
        if self._pushing_batch:
            message = self._pushing_batch.get(_registration(request.payload) or (b"", -1))
            if message is not None:
                return _cbor(message, Code.CONTENT)
        return self._fetch(request)

    async def _fetch(self, request: Request) -> Response:
        fetch = MessagesRequest.decode(self.payload(request))
        session = await self.service.session(fetch.handle, request.peer, request.security)
        if fetch.cursor is None:
            message = await self.service.latest(session, fetch.room)
        else:
            message = await self.service.since(session, fetch.room, fetch.cursor)
        if request.observe == 0:
            # Started last, just before the response: the observation is registered
            # before the loop's first /sync can possibly return.
            self.service.watch(session)
        return _cbor(_device_message(message), Code.CONTENT)

    def _push(self, session: SessionRecord, room_handle: int, message: StoredMessage) -> None:
        self._pushing = (session.handle_hash, room_handle, _device_message(message))
        try:
            self.notify_observers(lambda request: _selects(request, session.handle_hash, room_handle))
        finally:
            self._pushing = None

    def _push_batch(self, batch: Sequence[tuple[SessionRecord, int, StoredMessage]]) -> set[int]:
        """Push many sessions' messages with one pass over the observers per round (a round holds
        at most one message per session and room, oldest first); returns the sessions no observer took."""
        queues: dict[tuple[bytes, int], list[bytes]] = {}
        sessions: dict[bytes, int] = {}
        for session, room_handle, message in batch:
            queues.setdefault((session.handle_hash, room_handle), []).append(_device_message(message))
            sessions[session.handle_hash] = session.id
        taken: set[bytes] = set()

        def selects(request: Request) -> bool:
            registration = _registration(request.payload)
            if registration is None or registration not in self._pushing_batch:
                return False
            taken.add(registration[0])
            return True
        for round_number in range(max(len(queue) for queue in queues.values())):
            self._pushing_batch = {key: queue[round_number] for key, queue in queues.items()
                                   if round_number < len(queue)}
            try:
                self.notify_observers(selects)
            finally:
                self._pushing_batch = {}
        return {session_id for hash_, session_id in sessions.items() if hash_ not in taken}

    def _observed(self, session: SessionRecord) -> bool:
        return any(_selects(request, session.handle_hash, None) for request in self.observer_requests())


def _selects(request: Request, wanted_hash: bytes, room_handle: int | None) -> bool:
    """Whether an observation's registration request is for this session (and room)."""
    registration = _registration(request.payload)
    return (registration is not None and registration[0] == wanted_hash
            and (room_handle is None or registration[1] == room_handle))


@functools.lru_cache(maxsize=1024)
def _registration(payload: bytes) -> tuple[bytes, int] | None:
    """(handle hash, room handle) of a registration's FETCH body, decoded once per distinct body.

    A push tests every observation twice (``only`` and the render), and ``_observed``
    after every /sync answer: with 1,000 observers, CBOR decoding and hashing was a
    third of the gateway's time per notification.
    """
    try:
        fetch = MessagesRequest.decode(payload)
    except codec.CodecError:
        return None
    return handle_hash(fetch.handle), fetch.room


class RoomsResource(CompactResource):
    """Base of the room and membership resources (`comatrix.compact.rooms`)."""

    def __init__(self, context: PluginContext) -> None:
        super().__init__(context)
        self.rooms = RoomOperations(self.service)

    async def session_of(self, request: Request, handle: bytes) -> SessionRecord:
        return await self.service.session(handle, request.peer, request.security)


class CreateResource(RoomsResource):
    link = _link("create", "Compact create: [handle, public, name, topic, [user]] -> room handle")

    async def render_POST(self, request: Request) -> Response:
        create = CreateRequest.decode(self.payload(request))
        session = await self.session_of(request, create.handle)
        room_handle = await self.rooms.create(session, public=create.public, name=create.name, topic=create.topic,
                                              invite=create.invite)
        return _cbor(codec.encode_uint(room_handle), Code.CREATED)


class RoomResource(RoomsResource):
    """FETCH: room info (by room handle) or an alias resolved; POST: set name and topic."""

    link = _link("room", "Compact room: info, alias -> room id; POST sets name/topic")

    async def render_FETCH(self, request: Request) -> Response:
        fetch = RoomRequest.decode(self.payload(request), alias=True)
        session = await self.session_of(request, fetch.handle)
        if isinstance(fetch.room, str):
            return _cbor(codec.encode_room_id(await self.rooms.resolve(session, fetch.room)), Code.CONTENT)
        return _cbor(codec.encode_room_info(await self.rooms.info(session, fetch.room)), Code.CONTENT)

    async def render_POST(self, request: Request) -> Response:
        change = SetRoomRequest.decode(self.payload(request))
        session = await self.session_of(request, change.handle)
        await self.rooms.set(session, change.room, change.name, change.topic)
        return Response(code=Code.CHANGED)


class InviteResource(RoomsResource):
    """POST: invite a user; FETCH: the device's pending invitations (accept: join, decline: leave)."""

    link = _link("invite", "Compact invite: [handle, room, user]; FETCH [handle]: invitations")

    async def render_POST(self, request: Request) -> Response:
        invite = UserRequest.decode(self.payload(request))
        session = await self.session_of(request, invite.handle)
        await self.rooms.invite(session, invite.room, invite.user)
        return Response(code=Code.CHANGED)

    async def render_FETCH(self, request: Request) -> Response:
        fetch = HandleRequest.decode(self.payload(request))
        session = await self.session_of(request, fetch.handle)
        return _cbor(codec.encode_invitations(await self.rooms.invitations(session)), Code.CONTENT)


class LeaveResource(RoomsResource):
    link = _link("leave", "Compact leave (or decline): [handle, room]")

    async def render_POST(self, request: Request) -> Response:
        leave = RoomRequest.decode(self.payload(request))
        session = await self.session_of(request, leave.handle)
        await self.rooms.leave(session, int(leave.room))
        return Response(code=Code.CHANGED)


class KickResource(RoomsResource):
    link = _link("kick", "Compact kick: [handle, room, user, reason]")

    async def render_POST(self, request: Request) -> Response:
        kick = UserRequest.decode(self.payload(request), reason=True)
        session = await self.session_of(request, kick.handle)
        await self.rooms.kick(session, kick.room, kick.user, kick.reason)
        return Response(code=Code.CHANGED)


class MembersResource(RoomsResource):
    link = _link("members", "Compact members: [handle, room] -> [user]; block-wise")

    async def render_FETCH(self, request: Request) -> Response:
        fetch = RoomRequest.decode(self.payload(request))
        session = await self.session_of(request, fetch.handle)
        return _cbor(codec.encode_users(await self.rooms.members(session, int(fetch.room))), Code.CONTENT)


class RelationsResource(CompactResource):
    """Base of the react, redact and read resources (`comatrix.compact.relations`)."""

    def __init__(self, context: PluginContext) -> None:
        super().__init__(context)
        self.relations = RelationOperations(self.service)


class ReactResource(RelationsResource):
    link = _link("react", "Compact react: [handle, room, ref, key(, remove)]")

    async def render_POST(self, request: Request) -> Response:
        react = ReactRequest.decode(self.payload(request))
        session = await self.service.session(react.handle, request.peer, request.security)
        await self.relations.react(session, react.room, react.ref, react.key, remove=react.remove)
        return Response(code=Code.CHANGED)


class RedactResource(RelationsResource):
    link = _link("redact", "Compact redact: [handle, room, ref(, reason)]")

    async def render_POST(self, request: Request) -> Response:
        redact = EventRequest.decode(self.payload(request), reason=True)
        session = await self.service.session(redact.handle, request.peer, request.security)
        await self.relations.redact(session, redact.room, redact.ref, redact.reason)
        return Response(code=Code.CHANGED)


class ReadResource(RelationsResource):
    link = _link("read", "Compact read receipt: [handle, room, ref]")

    async def render_POST(self, request: Request) -> Response:
        read = EventRequest.decode(self.payload(request))
        session = await self.service.session(read.handle, request.peer, request.security)
        await self.relations.read(session, read.room, read.ref)
        return Response(code=Code.CHANGED)


class TimeResource(CoapResource):
    """GET -> Unix seconds as a CBOR uint (seeds the device's seq counter)."""

    link = _link("time", "Unix time (s), CBOR")

    def __init__(self, context: PluginContext) -> None:
        super().__init__()
        self.reactor = context.reactor

    def render_GET(self, request: Request) -> Response:
        return _cbor(codec.encode_uint(int(self.reactor.seconds())), Code.CONTENT)


compact_login = ResourcePlugin("compact-login", (PATHS["login"],), LoginResource)
compact_logout = ResourcePlugin("compact-logout", (PATHS["logout"],), LogoutResource)
compact_join = ResourcePlugin("compact-join", (PATHS["join"],), JoinResource)
compact_send = ResourcePlugin("compact-send", (PATHS["send"],), SendResource)
compact_messages = ResourcePlugin("compact-messages", (PATHS["messages"],), MessagesResource)
compact_time = ResourcePlugin("compact-time", (PATHS["time"],), TimeResource)
compact_create = ResourcePlugin("compact-create", (PATHS["create"],), CreateResource)
compact_room = ResourcePlugin("compact-room", (PATHS["room"],), RoomResource)
compact_invite = ResourcePlugin("compact-invite", (PATHS["invite"],), InviteResource)
compact_leave = ResourcePlugin("compact-leave", (PATHS["leave"],), LeaveResource)
compact_kick = ResourcePlugin("compact-kick", (PATHS["kick"],), KickResource)
compact_members = ResourcePlugin("compact-members", (PATHS["members"],), MembersResource)
compact_react = ResourcePlugin("compact-react", (PATHS["react"],), ReactResource)
compact_redact = ResourcePlugin("compact-redact", (PATHS["redact"],), RedactResource)
compact_read = ResourcePlugin("compact-read", (PATHS["read"],), ReadResource)
compact_history = ResourcePlugin("compact-history", (PATHS["history"],), HistoryResource)
