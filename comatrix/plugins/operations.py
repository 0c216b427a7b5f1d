"""The clean form of issue 13's operations: rooms, membership, history, relations, profile and media.

Named CBOR maps in and out (Content-Format 60), the token in option 256, like ``/send``:

create:      POST ``{name?, topic?, invite?: [users], preset?}`` -> 2.01 ``{room_id}``
room:        GET ``?room=`` -> 2.05 ``{room_id, name, topic, joined, membership}``; GET ``?alias=``
             -> 2.05 ``{room_id}``; POST ``{room_id, name?, topic?}`` -> 2.04
invite:      POST ``{room_id, user_id}``; leave: POST ``{room_id}``; kick: POST ``{room_id, user_id, reason?}``
members:     GET ``?room=`` -> 2.05 ``[user ids]`` (Block2 when long)
invitations: GET -> 2.05 ``[{room_id, inviter, name}]``
history:     GET ``?room=&dir=b|f&from=&limit=`` -> 2.05 ``{chunk: [{event_id, sender, body, msgtype, ts}], end}``
react:       POST ``{room_id, event_id, key, remove?, txn_id?}`` -> 2.04 ``{event_id}`` (of the reaction, or
             of the last redaction removing it)
redact:      POST ``{room_id, event_id, reason?, txn_id?}`` -> 2.04 ``{event_id}``
read:        POST ``{room_id, event_id}`` -> 2.04
profile:     GET -> 2.05 ``{displayname, avatar_url}``; POST ``{displayname?, avatar_url?}`` -> 2.04
upload:      POST ``?type=&name=&room=&txn_id=``, the media as payload (Block1, reassembled by the CoAP
             layer) -> 2.04 ``{content_uri, event_id?}``

Each method acts as one operation of `comatrix.policy` (`METHOD_OPERATIONS`), so a device acting
through shared credentials gets what the entry's ``allow`` grants, as it would through MSC3079.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any, Callable, Mapping

from comatrix.coap.errors import BadRequest, NotFound, UnsupportedContentFormat
from comatrix.coap.message import Request, Response
from comatrix.coap.numbers import Code, ContentFormat
from comatrix.coap.resource import LinkAttributes
from comatrix.codec import cbor
from comatrix.compact.mediawire import MAX_THUMBNAIL_SIDE, content_format_of, image_size, is_mxc, msgtype_for
from comatrix.compact.relations import own_reactions
from comatrix.matrix import api
from comatrix.plugins.rooms import MAX_TXN_ID, allowed_senders
from comatrix.policy import OTHER
from comatrix.resources import ResourcePlugin, MatrixResource, cbor_response

#: Matrix identifiers (users, events, rooms) are at most 255 bytes.
MAX_ID = 255
MAX_NAME = 255
MAX_TOPIC = 4096
MAX_REASON = 512
MAX_KEY = 64
MAX_INVITES = 32
MAX_HISTORY = 50
PRESETS = frozenset({"private_chat", "public_chat"})

#: (resource, method) -> the `comatrix.policy.OPERATIONS` name it acts as: the same as the MSC3079
#: endpoint it calls, so both forms grant the same to shared credentials.  Two are not methods: ``alias``
#: (GET with ``?alias=``) and ``remove`` (a react with ``remove``: it redacts).
METHOD_OPERATIONS: Mapping[tuple[str, str], str] = {
    ("create", "POST"): "create_room",
    ("room", "GET"): "state", ("room", "alias"): "alias", ("room", "POST"): "state/set",
    ("invite", "POST"): "invite", ("leave", "POST"): "leave", ("kick", "POST"): "kick",
    ("members", "GET"): "members", ("invitations", "GET"): "invitations", ("history", "GET"): "messages",
    ("react", "POST"): "send", ("react", "remove"): "redact", ("redact", "POST"): "redact",
    ("read", "POST"): "receipt", ("profile", "GET"): "profile", ("profile", "POST"): "profile/set",
    ("upload", "POST"): "upload", ("upload", "GET"): "thumbnail",
}


def _identifier(body: Mapping[str, Any], key: str, sigil: str, *, required: bool = True) -> str | None:
    value = cbor.text(body, key, max_length=MAX_ID, required=required)
    if value is not None and (value[0] != sigil or len(value) < 2):
        raise BadRequest(f"{key} must start with {sigil}")
    return value


def _user_id(body: Mapping[str, Any], key: str = "user_id") -> str:
    value = _identifier(body, key, "@")
    assert value is not None
    if ":" not in value:
        raise BadRequest(f"{key} must be @user:server")
    return value


def _event_id(body: Mapping[str, Any]) -> str:
    value = _identifier(body, "event_id", "$")
    assert value is not None
    return value


def _flag(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be true or false")
    return value


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


class OperationResource(MatrixResource):
    """A clean-form resource whose methods act as the operations `METHOD_OPERATIONS` names."""

    #: The resource's path and its key in `METHOD_OPERATIONS`.
    name = ""
    #: A resource the table does not name is ``other``: refused to shared credentials unless allowed.
    operation = OTHER

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.operation = next((op for (name, _), op in METHOD_OPERATIONS.items() if name == cls.name), OTHER)

    async def act(self, request: Request, call: Callable[[str], Any]) -> Any:
        """``call(token)`` as the operation of this request's method."""
        return await self.with_token(request, call, METHOD_OPERATIONS[self.name, request.method.name])

    def txn_id(self, request: Request, body: Mapping[str, Any]) -> str:
        """The device's ``txn_id`` (scoped to its address, as ``/send``), else a random one."""
        txn_id = cbor.text(body, "txn_id", max_length=MAX_TXN_ID, required=False)
        return "cm" + secrets.token_urlsafe(12) if txn_id is None else self.device_txn_id(request, txn_id)

    def query_room(self, request: Request) -> str:
        return self.room_reference(request, None)


def _link(name: str, title: str) -> LinkAttributes:
    return LinkAttributes(rt=f"comatrix.{name}", ct=(ContentFormat.CBOR,), title=title)


# -- rooms ---------------------------------------------------------------------------------


class CreateResource(OperationResource):
    name = "create"
    link = _link(name, "Create a room")

    async def render_POST(self, request: Request) -> Response:
        fields = create_fields(self.body(request))
        room_id = await self.act(request, lambda token: self.matrix.create_room(token, **fields))
        return cbor_response({"room_id": room_id}, Code.CREATED)


def create_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """The ``/createRoom`` body of a create request (private chat unless asked otherwise)."""
    preset = cbor.text(body, "preset", max_length=16, required=False) or "private_chat"
    if preset not in PRESETS:
        raise BadRequest("preset must be private_chat or public_chat")
    fields: dict[str, Any] = {"preset": preset}
    for key, limit in (("name", MAX_NAME), ("topic", MAX_TOPIC)):
        value = cbor.text(body, key, max_length=limit, required=False)
        if value is not None:
            fields[key] = value
    invite = body.get("invite")
    if invite is not None:
        if not isinstance(invite, list) or len(invite) > MAX_INVITES:
            raise BadRequest(f"invite must be a list of at most {MAX_INVITES} user ids")
        fields["invite"] = [_user_id({"invite": user}, "invite") for user in invite]
    return fields


class RoomResource(OperationResource):
    name = "room"
    link = _link(name, "Room details, name and topic; ?alias= resolves an alias")

    async def render_GET(self, request: Request) -> Response:
        alias = request.query_params().get("alias")
        if alias is not None:
            _identifier({"alias": alias}, "alias", "#")
            if ":" not in alias:
                raise BadRequest("alias must be #name:server (encode # as %23)")
            room_id = await self.with_token(request, lambda token: self.matrix.resolve_room(token, alias),
                                            METHOD_OPERATIONS[self.name, "alias"])
            return cbor_response({"room_id": room_id})
        room = self.query_room(request)

        async def details(token: str) -> dict[str, Any]:
            room_id = await self.matrix.resolve_room(token, room)
            return await self.matrix.room_details(token, room_id, await self.matrix.whoami(token))

        found = await self.act(request, details)
        return cbor_response({"room_id": found["room_id"], "name": found["name"], "topic": found["topic"],
                              "joined": found["joined_members"], "membership": found.get("membership")})

    async def render_POST(self, request: Request) -> Response:
        body = self.body(request)
        room = self.room_reference(request, body)
        name = cbor.text(body, "name", max_length=MAX_NAME, required=False)
        topic = cbor.text(body, "topic", max_length=MAX_TOPIC, required=False)
        if name is None and topic is None:
            raise BadRequest("expected name or topic")

        async def change(token: str) -> None:
            room_id = await self.matrix.resolve_room(token, room)
            if name is not None:
                await self.matrix.set_room_name(token, room_id, name)
            if topic is not None:
                await self.matrix.set_room_topic(token, room_id, topic)

        await self.act(request, change)
        return Response(code=Code.CHANGED)


# -- membership ----------------------------------------------------------------------------


class MembershipResource(OperationResource):
    """POST ``{room_id[, user_id, reason]}``: one membership change, `change` (token, room id, body)."""

    async def change(self, token: str, room_id: str, body: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def check(self, body: Mapping[str, Any]) -> None:
        """Refuse a malformed body before the homeserver is asked."""

    async def render_POST(self, request: Request) -> Response:
        body = self.body(request)
        room = self.room_reference(request, body)
        self.check(body)

        async def change(token: str) -> None:
            await self.change(token, await self.matrix.resolve_room(token, room), body)

        await self.act(request, change)
        return Response(code=Code.CHANGED)


class InviteResource(MembershipResource):
    name = "invite"
    link = _link(name, "Invite a user to a room")

    def check(self, body: Mapping[str, Any]) -> None:
        _user_id(body)

    async def change(self, token: str, room_id: str, body: Mapping[str, Any]) -> None:
        await self.matrix.invite(token, room_id, body["user_id"])


class LeaveResource(MembershipResource):
    name = "leave"
    link = _link(name, "Leave a room, or decline its invitation")

    async def change(self, token: str, room_id: str, body: Mapping[str, Any]) -> None:
        await self.matrix.leave(token, room_id)


class KickResource(MembershipResource):
    name = "kick"
    link = _link(name, "Kick a user from a room")

    def check(self, body: Mapping[str, Any]) -> None:
        _user_id(body)
        cbor.text(body, "reason", max_length=MAX_REASON, required=False)

    async def change(self, token: str, room_id: str, body: Mapping[str, Any]) -> None:
        await self.matrix.kick(token, room_id, body["user_id"], body.get("reason"))


class MembersResource(OperationResource):
    name = "members"
    link = _link(name, "Joined members of a room")

    async def render_GET(self, request: Request) -> Response:
        room = self.query_room(request)

        async def members(token: str) -> tuple[str, ...]:
            return await self.matrix.joined_members(token, await self.matrix.resolve_room(token, room))

        return cbor_response(list(await self.act(request, members)))


class InvitationsResource(OperationResource):
    name = "invitations"
    link = _link(name, "Pending invitations of the device's user")

    async def render_GET(self, request: Request) -> Response:
        async def pending(token: str) -> Any:
            return await self.matrix.invitations(token, await self.matrix.whoami(token))

        invitations = await self.act(request, pending)
        return cbor_response([{"room_id": invitation.room_id, "inviter": invitation.inviter,
                               "name": invitation.name} for invitation in invitations])


# -- history -------------------------------------------------------------------------------


class HistoryResource(OperationResource):
    name = "history"
    link = _link(name, "Pages of a room's messages, backwards or forwards")

    async def render_GET(self, request: Request) -> Response:
        room = self.query_room(request)
        query = request.query_params()
        direction = query.get("dir", "b")
        if direction not in ("b", "f"):
            raise BadRequest("dir must be b or f")
        position = query.get("from") or None
        if position is not None and (len(position) > MAX_ID or "\ufffd" in position):
            raise BadRequest("from: not a pagination token")
        limit = _limit(query.get("limit"))

        async def page(token: str) -> tuple[Any, ...]:
            room_id = await self.matrix.resolve_room(token, room)
            found = await self.matrix.message_page(token, room_id, direction=direction, from_token=position,
                                                   limit=limit)
            senders = allowed_senders(self.context, request, room_id)
            events = [event for event in found.events if senders is None or senders(event.sender)]
            return tuple(events), found.end

        events, end = await self.act(request, page)
        return cbor_response({"chunk": [{"event_id": event.event_id, "sender": event.sender,
                                         "body": event.content.get("body"), "msgtype": event.content.get("msgtype"),
                                         "ts": event.origin_server_ts} for event in events], "end": end})


def _limit(raw: str | None) -> int:
    if raw is None:
        return 10
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_HISTORY:
        raise BadRequest(f"limit must be 1 to {MAX_HISTORY}")
    return int(raw)


# -- reactions, redactions, receipts -------------------------------------------------------


class ReactResource(OperationResource):
    name = "react"
    link = _link(name, "Add or remove a reaction")

    async def render_POST(self, request: Request) -> Response:
        body = self.body(request)
        room = self.room_reference(request, body)
        event_id = _event_id(body)
        key = cbor.text(body, "key", max_length=MAX_KEY)
        assert key is not None
        if _flag(body, "remove"):
            return await self._remove(request, room, event_id, key)
        txn_id = self.txn_id(request, body)

        async def react(token: str) -> str:
            room_id = await self.matrix.resolve_room(token, room)
            return await self.matrix.react(token, room_id, event_id, key, txn_id)

        return cbor_response({"event_id": await self.act(request, react)}, Code.CHANGED)

    async def _remove(self, request: Request, room: str, event_id: str, key: str) -> Response:
        async def remove(token: str) -> list[str]:
            room_id = await self.matrix.resolve_room(token, room)
            mine = own_reactions(await self.matrix.reactions(token, room_id, event_id),
                                 await self.matrix.whoami(token), key)
            # The txn id follows from the reaction: a retried removal makes no second redaction.
            return [await self.matrix.redact(token, room_id, reaction, "cx" + _digest(reaction))
                    for reaction in mine]

        redactions = await self.with_token(request, remove, METHOD_OPERATIONS[self.name, "remove"])
        if not redactions:
            raise NotFound("no such reaction of this user")
        return cbor_response({"event_id": redactions[-1]}, Code.CHANGED)


class RedactResource(OperationResource):
    name = "redact"
    link = _link(name, "Redact an event")

    async def render_POST(self, request: Request) -> Response:
        body = self.body(request)
        room = self.room_reference(request, body)
        event_id = _event_id(body)
        reason = cbor.text(body, "reason", max_length=MAX_REASON, required=False)
        txn_id = self.txn_id(request, body)

        async def redact(token: str) -> str:
            room_id = await self.matrix.resolve_room(token, room)
            return await self.matrix.redact(token, room_id, event_id, txn_id, reason)

        return cbor_response({"event_id": await self.act(request, redact)}, Code.CHANGED)


class ReadResource(OperationResource):
    name = "read"
    link = _link(name, "Read receipt up to an event")

    async def render_POST(self, request: Request) -> Response:
        body = self.body(request)
        room = self.room_reference(request, body)
        event_id = _event_id(body)

        async def read(token: str) -> None:
            await self.matrix.read_receipt(token, await self.matrix.resolve_room(token, room), event_id)

        await self.act(request, read)
        return Response(code=Code.CHANGED)


# -- profile and media ---------------------------------------------------------------------


class ProfileResource(OperationResource):
    name = "profile"
    link = _link(name, "Display name and avatar of the device's user")

    async def render_GET(self, request: Request) -> Response:
        async def profile(token: str) -> dict[str, Any]:
            return await self.matrix.profile(token, await self.matrix.whoami(token))

        return cbor_response(await self.act(request, profile))

    async def render_POST(self, request: Request) -> Response:
        body = self.body(request)
        name = cbor.text(body, "displayname", max_length=MAX_NAME, required=False)
        avatar = cbor.text(body, "avatar_url", max_length=MAX_ID, required=False)
        if avatar is not None and not avatar.startswith("mxc://"):
            raise BadRequest("avatar_url must be an mxc:// URI")
        if name is None and avatar is None:
            raise BadRequest("expected displayname or avatar_url")

        async def change(token: str) -> None:
            user_id = await self.matrix.whoami(token)
            if name is not None:
                await self.matrix.set_displayname(token, user_id, name)
            if avatar is not None:
                await self.matrix.set_avatar_url(token, user_id, avatar)

        await self.act(request, change)
        return Response(code=Code.CHANGED)


class UploadResource(OperationResource):
    name = "upload"
    link = LinkAttributes(rt="comatrix.upload",
                          title="Upload media (Block1), optionally sent to a room; GET: a thumbnail")

    async def render_POST(self, request: Request) -> Response:
        if request.content_format not in (None, ContentFormat.OCTET_STREAM):
            raise UnsupportedContentFormat("expected no Content-Format or 42, the media as it is")
        query = request.query_params()
        mimetype = _mimetype(query.get("type"))
        filename = query.get("name") or None
        if filename is not None and (len(filename.encode("utf-8")) > MAX_NAME or "\ufffd" in filename):
            raise BadRequest("name too long or not UTF-8")
        room = self.query_room(request) if "room" in query else None
        txn = query.get("txn_id") or None
        if txn is not None and len(txn) > MAX_TXN_ID:
            raise BadRequest("txn_id too long")
        media = request.payload
        if not media:
            raise BadRequest("no media")

        async def upload(token: str) -> dict[str, Any]:
            room_id = None if room is None else await self.matrix.resolve_room(token, room)
            uri = await self.matrix.upload(token, media, mimetype, filename)
            if room_id is None:
                return {"content_uri": uri}
            txn_id = "cm" + secrets.token_urlsafe(12) if txn is None else self.device_txn_id(request, txn)
            content = media_content(media, mimetype, filename, uri)
            return {"content_uri": uri, "event_id": await self.matrix.send_message(token, room_id, content, txn_id)}

        return cbor_response(await self.act(request, upload), Code.CHANGED)

    async def render_GET(self, request: Request) -> Response:
        """A thumbnail of ``?mxc=`` (authenticated media), ``width`` x ``height``, ``method`` scale or crop;
        block-wise (Block2) when larger than a block."""
        query = request.query_params()
        mxc = query.get("mxc") or ""
        if not is_mxc(mxc):
            raise BadRequest("mxc must be an mxc:// URI")
        width, height = (_side(query.get(name), name) for name in ("width", "height"))
        method = query.get("method") or "scale"
        if method not in ("scale", "crop"):
            raise BadRequest("method must be scale or crop")

        async def thumbnail(token: str) -> Mapping[str, Any]:
            answer: Mapping[str, Any] = await self.matrix.request(api.thumbnail(token, mxc, width, height, method))
            return answer

        answer = await self.act(request, thumbnail)
        data = answer.get("content")
        if not isinstance(data, bytes):
            raise NotFound("no thumbnail")
        return Response(code=Code.CONTENT, payload=data,
                        content_format=content_format_of(str(answer.get("content_type") or "")))


def _side(value: str | None, name: str) -> int:
    if value is None or not value.isdigit() or not 1 <= int(value) <= MAX_THUMBNAIL_SIDE:
        raise BadRequest(f"{name} must be 1 to {MAX_THUMBNAIL_SIDE}")
    return int(value)


def _mimetype(value: str | None) -> str:
    if value is None:
        return "application/octet-stream"
    major, slash, minor = value.partition("/")
    if not slash or not major or not minor or len(value) > 127 or not value.isascii() or " " in value:
        raise BadRequest("type must be a MIME type such as image/png")
    return value


def media_content(media: bytes, mimetype: str, filename: str | None, uri: str) -> dict[str, Any]:
    """The ``m.image``/``m.file``/``m.audio``/``m.video`` content carrying an upload (pure)."""
    info: dict[str, Any] = {"mimetype": mimetype, "size": len(media)}
    size = image_size(media) if mimetype.startswith("image/") else None
    if size is not None:
        info["w"], info["h"] = size
    return {"msgtype": msgtype_for(mimetype), "body": filename or "upload", "url": uri, "info": info}


def _plugin(resource: type[OperationResource]) -> ResourcePlugin:
    return ResourcePlugin(resource.name, (resource.name,), resource)


create = _plugin(CreateResource)
room = _plugin(RoomResource)
invite = _plugin(InviteResource)
leave = _plugin(LeaveResource)
kick = _plugin(KickResource)
members = _plugin(MembersResource)
invitations = _plugin(InvitationsResource)
history = _plugin(HistoryResource)
react = _plugin(ReactResource)
redact = _plugin(RedactResource)
read = _plugin(ReadResource)
profile = _plugin(ProfileResource)
upload = _plugin(UploadResource)
