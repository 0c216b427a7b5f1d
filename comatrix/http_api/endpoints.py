"""Each endpoint of the HTTP API: decode the call, run one Matrix operation, encode the answer.

No Matrix logic lives here: the operations are `MatrixClient`'s, the same the
CoAP resources call.  A call acts as its service's Matrix user; a call that
names another user (``sender_matrix_id``, ``reactor_matrix_id``,
``inviter_matrix_id``, ``kicker``, ``user_id`` of join/leave, ``{userId}`` of
the profile endpoints) acts as that user only in application-service mode and
only inside the gateway's namespace, else 403.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.parser
import fnmatch
import email.policy
import hashlib
import secrets
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, TypeVar

from twisted.internet import threads

from comatrix.appservice.registration import Registration
from comatrix.config import HttpApiSettings, ServiceCredentials
from comatrix.credentials import Credentials
from comatrix.http_api.errors import ApiError
from comatrix.http_api.routes import openapi_document
from comatrix.identity import Device, acting_as
from comatrix.longpoll import DEADLINE_MARGIN, LongPoller
from comatrix.matrix import api
from comatrix.matrix.client import MatrixClient
from comatrix.matrix.errors import MatrixError
from comatrix.webhooks import ServiceEvents, WebhookRefused, Webhooks

if TYPE_CHECKING:
    from comatrix.http_api.feeds import ServiceTokens

__all__ = ["Call", "Endpoints", "MAX_SYNC_TIMEOUT_MS", "MESSAGE_TYPES"]

T = TypeVar("T")

#: msgtypes a service may send (the spec's, plus emote).
MESSAGE_TYPES = frozenset({"m.text", "m.notice", "m.emote", "m.image", "m.file", "m.audio", "m.video"})
_MEDIA_TYPES = frozenset({"m.image", "m.file", "m.audio", "m.video"})
#: Longest /sync long-poll passed on (the spec's default is 30 s).
MAX_SYNC_TIMEOUT_MS = 30000
_CREATE_KEYS = ("name", "topic", "visibility", "room_alias_name", "preset", "initial_state",
                "power_level_content_override", "creation_content", "invite", "is_direct")


@dataclasses.dataclass
class Call:
    """One authenticated request: who, what, with which parameters."""

    service: ServiceCredentials
    params: Mapping[str, str]
    query: Mapping[str, str]
    body: Mapping[str, Any]
    content_type: str = ""
    raw: bytes = b""

    def text(self, key: str, *, required: bool = True) -> str | None:
        value = self.body.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            raise ApiError(400, "M_BAD_JSON", f"{key} must be a non-empty string")
        return value


class Endpoints:
    """The handlers named by `comatrix.http_api.routes.ROUTES`."""

    def __init__(self, matrix: MatrixClient, credentials: Credentials, settings: HttpApiSettings,
                 long_polls: LongPoller, reactor: Any, registration: Registration | None = None,
                 webhooks: "Webhooks | None" = None, feeds: "tuple[ServiceTokens, ServiceEvents] | None" = None,
                 events: Any = None) -> None:
        """``webhooks`` and, in token mode, ``feeds`` (the service logins and their /sync loops);
        ``events``: the appservice event stream (a subscription there needs its user in the room)."""
        self.matrix = matrix
        self.credentials = credentials
        self.settings = settings
        self.long_polls = long_polls
        self.reactor = reactor
        self.registration = registration
        self.webhooks = webhooks
        self.feeds = feeds

    # -- acting -----------------------------------------------------------------------------

    def _acting_user(self, call: Call, user_id: str | None) -> str | None:
        """None: the service's own user; else a namespace user its ``users`` patterns name (403 otherwise)."""
        if user_id is None or user_id == call.service.user:
            return None
        if (self.registration is not None and self.registration.owns(user_id)
                and any(fnmatch.fnmatchcase(user_id, pattern) for pattern in call.service.users)):
            return user_id
        raise ApiError(403, "M_FORBIDDEN", "a service acts as its own user, or as the namespace users "
                                           "its users setting names (application-service mode)")

    @staticmethod
    def _room(call: Call, key: str = "room_id") -> str:
        """The room a call names (body ``room_id`` or path ``roomId``), if the service may act in it."""
        room = call.params.get("roomId") if key == "roomId" else call.text(key)
        assert room is not None
        if call.service.rooms and room not in call.service.rooms:
            raise ApiError(403, "M_FORBIDDEN", "not one of this service's rooms")
        return room

    async def _as(self, call: Call, user_id: str | None, operation: Callable[[str], Awaitable[T]]) -> T:
        """Run ``operation(token)`` as ``user_id`` (None: the service's user); a refused kept login is renewed once."""
        acting = self._acting_user(call, user_id)
        with acting_as(Device(key=f"svc:{call.service.name}", address="127.0.0.1", secured=True)):
            if acting is not None:
                return await operation(self.credentials.acting_token(acting))
            entry = call.service.as_device()
            token = await self.credentials.token_of(entry)
            try:
                return await operation(token)
            except MatrixError as error:
                if error.http_status != 401 or not self.credentials.forget_token_of(entry, token):
                    raise
            return await operation(await self.credentials.token_of(entry))

    # -- rooms ------------------------------------------------------------------------------

    async def create_room(self, call: Call) -> dict[str, Any]:
        fields = {key: call.body[key] for key in _CREATE_KEYS if key in call.body}
        room_id = await self._as(call, call.text("creator_matrix_id", required=False),
                                 lambda token: self.matrix.create_room(token, **fields))
        alias = fields.get("room_alias_name")
        server = call.service.user.split(":", 1)[1]
        return {"room_id": room_id, "room_alias": f"#{alias}:{server}" if isinstance(alias, str) else None}

    async def room(self, call: Call) -> dict[str, Any]:
        room_id = self._room(call, "roomId")
        return await self._as(call, None, lambda token: self.matrix.room_details(token, room_id))

    async def room_name(self, call: Call) -> dict[str, Any]:
        name = call.text("name")
        assert name is not None
        event_id = await self._as(call, None, lambda token: self.matrix.set_room_name(
            token, self._room(call, "roomId"), name))
        return {"event_id": event_id}

    # -- messages ---------------------------------------------------------------------------

    async def send(self, call: Call) -> dict[str, Any]:
        room = self._room(call)
        assert room is not None
        msgtype = call.text("msgtype", required=False) or "m.text"
        if msgtype not in MESSAGE_TYPES:
            raise ApiError(400, "M_BAD_JSON", f"msgtype must be one of {', '.join(sorted(MESSAGE_TYPES))}")
        content: dict[str, Any] = {"msgtype": msgtype, "body": call.text("body")}
        if msgtype in _MEDIA_TYPES:
            url = call.text("url")
            assert url is not None
            if not url.startswith("mxc://"):
                raise ApiError(400, "M_BAD_JSON", "url must be an mxc:// URI (POST /internal/matrix/upload)")
            content["url"] = url
            if isinstance(call.body.get("info"), dict):
                content["info"] = call.body["info"]
        if call.body.get("formatted_body") is not None:
            content["format"] = call.text("format", required=False) or "org.matrix.custom.html"
            content["formatted_body"] = call.text("formatted_body")
        relates_to = call.body.get("relates_to")
        if relates_to is not None:
            if not isinstance(relates_to, dict):
                raise ApiError(400, "M_BAD_JSON", "relates_to must be an object")
            content["m.relates_to"] = relates_to
        txn_id = self._txn_id(call)

        async def send(token: str) -> str:
            room_id = await self.matrix.resolve_room(token, room)
            return await self.matrix.send_message(token, room_id, content, txn_id)
        event_id = await self._as(call, call.text("sender_matrix_id", required=False), send)
        sent_at = datetime.datetime.fromtimestamp(self.reactor.seconds(), datetime.timezone.utc)
        return {"event_id": event_id, "sent_at": sent_at.strftime("%Y-%m-%dT%H:%M:%SZ")}

    def _txn_id(self, call: Call) -> str:
        """The service's idempotency key (``txn_id``), made its own; else a fresh one."""
        chosen = call.body.get("txn_id")
        if chosen is None:
            return "h" + secrets.token_urlsafe(12)
        if not isinstance(chosen, str) or not 0 < len(chosen) <= 64:
            raise ApiError(400, "M_BAD_JSON", "txn_id must be a string of 1-64 characters")
        return f"s{hashlib.sha256(call.service.name.encode()).hexdigest()[:8]}.{chosen}"

    async def send_reaction(self, call: Call) -> dict[str, Any]:
        room_id, event_id, emoji = self._room(call), call.text("event_id"), call.text("emoji")
        assert room_id is not None and event_id is not None and emoji is not None
        reaction = await self._as(call, call.text("reactor_matrix_id", required=False),
                                  lambda token: self.matrix.react(token, room_id, event_id, emoji, self._txn_id(call)))
        return {"event_id": reaction}

    async def redact(self, call: Call) -> dict[str, Any]:
        room_id, event_id = self._room(call), call.text("event_id")
        assert room_id is not None and event_id is not None
        reason = call.text("reason", required=False)
        redaction = await self._as(call, None, lambda token: self.matrix.redact(
            token, room_id, event_id, self._txn_id(call), reason))
        return {"event_id": redaction}

    async def messages(self, call: Call) -> dict[str, Any]:
        direction = call.query.get("dir", "b")
        if direction not in ("b", "f"):
            raise ApiError(400, "M_INVALID_PARAM", "dir must be b or f")
        limit = _integer(call.query.get("limit", "10"), "limit", 1, 100)
        request = lambda token: self.matrix.request(api.room_messages(  # noqa: E731
            token, self._room(call, "roomId"), from_token=call.query.get("from"), dir=direction, limit=limit))
        page = await self._as(call, None, request)
        return {"start": page.get("start"), "end": page.get("end"), "chunk": page.get("chunk", [])}

    # -- membership -------------------------------------------------------------------------

    async def invite(self, call: Call) -> dict[str, Any]:
        room_id, user_id = self._room(call), call.text("user_id")
        assert room_id is not None and user_id is not None
        await self._as(call, call.text("inviter_matrix_id", required=False),
                       lambda token: self.matrix.invite(token, room_id, user_id))
        return {"status": "invited"}

    async def join(self, call: Call) -> dict[str, Any]:
        room = self._room(call)
        assert room is not None
        room_id = await self._as(call, call.text("user_id", required=False),
                                 lambda token: self.matrix.join(token, room))
        return {"status": "joined", "room_id": room_id}

    async def leave(self, call: Call) -> dict[str, Any]:
        room_id = self._room(call)
        assert room_id is not None
        await self._as(call, call.text("user_id", required=False), lambda token: self.matrix.leave(token, room_id))
        return {"status": "left"}

    async def kick(self, call: Call) -> dict[str, Any]:
        room_id, user_id = self._room(call), call.text("user_id")
        assert room_id is not None and user_id is not None
        reason = call.text("reason", required=False)
        await self._as(call, call.text("kicker", required=False),
                       lambda token: self.matrix.kick(token, room_id, user_id, reason))
        return {"status": "kicked"}

    # -- events -----------------------------------------------------------------------------

    async def sync(self, call: Call) -> dict[str, Any]:
        timeout_ms = min(_integer(call.query.get("timeout", str(MAX_SYNC_TIMEOUT_MS)), "timeout", 0, 2**31),
                         MAX_SYNC_TIMEOUT_MS)
        since, sync_filter = call.query.get("since"), call.query.get("filter")

        async def sync(token: str) -> dict[str, Any]:
            request = api.sync(token, since=since, timeout_ms=timeout_ms, filter=sync_filter)
            _status, body = await self.long_polls.request(request, timeout_ms / 1000.0 + DEADLINE_MARGIN)
            return body
        return await self._as(call, None, sync)

    async def subscribe(self, call: Call) -> dict[str, Any]:
        if self.webhooks is None:
            raise ApiError(501, "M_UNRECOGNIZED", "webhooks are not available")
        room_id, url = self._room(call), call.text("webhook_url")
        assert room_id is not None and url is not None
        events = call.body.get("events", [])
        if not isinstance(events, list) or not all(isinstance(event, str) for event in events):
            raise ApiError(400, "M_BAD_JSON", "events must be a list of event types")
        # Only rooms the service's user is in: the events it may read (one call, as that user).
        joined = await self._as(call, None, lambda token: self.matrix.request(api.joined_rooms(token)))
        if room_id not in (joined.get("joined_rooms") or []):
            raise ApiError(403, "M_FORBIDDEN", "the service's user is not in that room")
        if self.feeds is not None:
            await self.feeds[0].ensure(call.service.name)  # its /sync loop acts with the service's login
        try:
            subscription = await self.webhooks.subscribe(call.service.name, room_id, url, events)
        except WebhookRefused as exc:
            raise ApiError(exc.status, "M_FORBIDDEN" if exc.status == 403 else
                           "M_LIMIT_EXCEEDED" if exc.status == 429 else "M_INVALID_PARAM", str(exc)) from None
        return {"subscription_id": subscription}

    async def unsubscribe(self, call: Call) -> dict[str, Any]:
        if self.webhooks is None or not await self.webhooks.unsubscribe(call.service.name,
                                                                         call.params["subscriptionId"]):
            raise ApiError(404, "M_NOT_FOUND", "no such subscription")
        return {"status": "unsubscribed"}

    # -- users ------------------------------------------------------------------------------

    async def register_user(self, call: Call) -> dict[str, Any]:
        path = self.settings.registration_shared_secret_file
        if path is None:
            raise ApiError(501, "M_UNRECOGNIZED", "no registration_shared_secret_file in [http_api]")
        username, password = call.text("username"), call.text("password")
        assert username is not None and password is not None
        admin = call.body.get("admin", False)
        if not isinstance(admin, bool):
            raise ApiError(400, "M_BAD_JSON", "admin must be true or false")
        if admin and not call.service.register_admins:
            raise ApiError(403, "M_FORBIDDEN", "this service may not create server admins (register_admins)")
        secret = await threads.deferToThread(_read_secret, path)
        with acting_as(Device(key=f"svc:{call.service.name}", address="127.0.0.1", secured=True)):
            nonce = (await self.matrix.request(api.shared_secret_nonce())).get("nonce")
            if not isinstance(nonce, str):
                raise ApiError(502, "M_UNKNOWN", "the homeserver gave no registration nonce")
            answer = await self.matrix.request(api.shared_secret_register(secret, nonce, username, password, admin))
        token = str(answer.get("access_token", ""))
        for key, setter in (("display_name", self.matrix.set_displayname),
                            ("avatar_url", self.matrix.set_avatar_url)):
            value = call.body.get(key)
            if isinstance(value, str) and value:
                await setter(token, str(answer["user_id"]), value)
        return {"user_id": answer.get("user_id"), "access_token": token, "device_id": answer.get("device_id")}

    async def display_name(self, call: Call) -> dict[str, Any]:
        return await self._profile(call, "display_name", self.matrix.set_displayname)

    async def avatar(self, call: Call) -> dict[str, Any]:
        return await self._profile(call, "avatar_url", self.matrix.set_avatar_url)

    async def _profile(self, call: Call, key: str,
                       setter: Callable[[str, str, str], Awaitable[None]]) -> dict[str, Any]:
        value = call.text(key)
        assert value is not None
        user_id = call.params["userId"]
        await self._as(call, user_id, lambda token: setter(token, user_id, value))
        return {"status": "updated"}

    async def upload(self, call: Call) -> dict[str, Any]:
        data, content_type, filename = _file_part(call.content_type, call.raw)
        uri = await self._as(call, None, lambda token: self.matrix.upload(token, data, content_type, filename))
        return {"content_uri": uri, "content_type": content_type, "size": len(data)}

    async def openapi(self, call: Call) -> dict[str, Any]:
        return openapi_document()


def _integer(text: str, name: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ApiError(400, "M_INVALID_PARAM", f"{name} must be an integer") from None
    if not low <= value <= high:
        raise ApiError(400, "M_INVALID_PARAM", f"{name} must be between {low} and {high}")
    return value


def _read_secret(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read().strip()


def _file_part(content_type: str, raw: bytes) -> tuple[bytes, str, str | None]:
    """(data, content type, file name) of the ``file`` part of a multipart/form-data body."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(400, "M_BAD_JSON", "upload must be multipart/form-data with a 'file' part")
    header = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + raw)
    for part in message.iter_parts() if message.is_multipart() else ():
        if part.get_param("name", header="content-disposition") == "file":
            data = part.get_payload(decode=True)
            if not isinstance(data, bytes):
                break
            return data, part.get_content_type() or "application/octet-stream", part.get_filename()
    raise ApiError(400, "M_BAD_JSON", "no 'file' part in the upload")

