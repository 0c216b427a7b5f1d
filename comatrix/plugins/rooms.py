"""Room resources: ``/join``, ``/getmsg``, ``/send`` (original CoMatrix wire format plus a clean form).

join:   POST, room in Proxy-Uri ``/K/<room>`` (or ``/L/<room>``) or CBOR ``{room_id}`` -> 2.04 ``{room_id}``
getmsg: GET, room in Proxy-Uri ``/E/<room>`` -> 2.05 ``{sender, body}`` as the original gateway answered
        (one 802.15.4 frame); ``?room=<room>`` -> 2.05 ``{sender, body, event_id, origin_server_ts}``;
        a device acting through a ``[[devices]]`` entry gets the latest message of its ``allowed_senders``
send:   POST/PUT, Proxy-Uri ``/9/<room>/<type>/<txn>`` or CBOR ``{room_id, txn_id, body[, msgtype, geo_uri,
        format, formatted_body, reply_to | replaces]}``
        -> 2.04 ``{event_id}``; the same txn id never makes a second event.

Rooms may be room ids (``!...``) or aliases (``#name:server``, resolved and cached).
"""

from __future__ import annotations

import secrets
from typing import Any, Callable

from comatrix.coap.errors import BadRequest, NotFound
from comatrix.coap.message import Request, Response
from comatrix.coap.numbers import Code, ContentFormat
from comatrix.coap.resource import LinkAttributes
from comatrix.codec import cbor
from comatrix.credentials import token_from_request
from comatrix.matrix import api
from comatrix.interfaces import PluginContext
from comatrix.policy import sender_filter
from comatrix.resources import MatrixResource, ResourcePlugin, cbor_response

#: Matrix's event size limit is 64 KiB; a device message is far smaller, keep a sane cap.
MAX_BODY_TEXT = 16384
MAX_TXN_ID = 64
LOCATION = "m.location"
MSGTYPES = frozenset({"m.text", "m.notice", "m.emote", LOCATION})
MAX_GEO_URI = 255
MAX_EVENT_ID = 255


class JoinResource(MatrixResource):
    link = LinkAttributes(rt="comatrix.join", ct=(ContentFormat.CBOR,), title="Join a room")
    proxy_codes = frozenset({"K", "L"})
    operation = "join"

    async def render_POST(self, request: Request) -> Response:
        path = self.matrix_path(request)
        body = self.body(request)
        room = self.room_reference(request, body, path)
        room_id = await self.with_token(request, lambda token: self.matrix.join(token, room))
        return cbor_response({"room_id": room_id}, Code.CHANGED)


class GetMessageResource(MatrixResource):
    link = LinkAttributes(rt="comatrix.getmsg", ct=(ContentFormat.CBOR,), title="Latest message of a room")
    proxy_codes = frozenset({"E"})
    operation = "messages"

    async def render_GET(self, request: Request) -> Response:
        path = self.matrix_path(request)
        room = self.room_reference(request, None, path)

        async def latest(token: str) -> Any:
            room_id = await self.matrix.resolve_room(token, room)
            return await self.matrix.last_message(token, room_id, senders=self._senders(request, room_id))

        event = await self.with_token(request, latest)
        if event is None:
            raise NotFound("no message")
        message: dict[str, Any] = {"sender": event.sender, "body": event.content.get("body", "")}
        if path is None:  # the clean form: a device that can use them asked
            message.update(event_id=event.event_id, origin_server_ts=event.origin_server_ts)
        return cbor_response(message)


    def _senders(self, request: Request, room_id: str) -> Callable[[str], bool] | None:
        return allowed_senders(self.context, request, room_id)


def allowed_senders(context: PluginContext, request: Request, room_id: str) -> Callable[[str], bool] | None:
    """The ``allowed_senders`` of the entry a device without a token of its own acts through (its own
    messages and, by default, those of its user's server); None: no entry, no filter."""
    entry = context.credentials.entry_for(request)
    if entry is None or token_from_request(request) is not None:
        return None
    patterns = entry.senders_in(room_id)
    own = entry.user if entry.user is not None and entry.user.startswith("@") else None
    if own is None:  # a bare access_token or localpart: only what the entry lists
        return None if patterns is None else sender_filter(patterns, "")
    return sender_filter(patterns, own)


class SendResource(MatrixResource):
    link = LinkAttributes(rt="comatrix.send", ct=(ContentFormat.CBOR,), title="Send a message")
    proxy_codes = frozenset({"9"})
    operation = "send"

    async def render_POST(self, request: Request) -> Response:
        path = self.matrix_path(request)
        body = self.body(request)
        room = self.room_reference(request, body, path)
        event_type = path.params["eventType"] if path else "m.room.message"
        txn_id = path.params["txnId"] if path else cbor.text(body, "txn_id", max_length=MAX_TXN_ID,
                                                              required=False)
        if txn_id is None:
            # No idempotency key from the device: CoAP deduplication still covers
            # retransmissions; a random id can never collide with another send.
            txn_id = "cm" + secrets.token_urlsafe(12)
        elif len(txn_id) > MAX_TXN_ID:
            raise BadRequest("txn_id too long")
        else:
            txn_id = self.device_txn_id(request, txn_id)
        content = message_content(body)

        async def send(token: str) -> str:
            room_id = await self.matrix.resolve_room(token, room)
            return await self.matrix.send_message(token, room_id, content, txn_id, event_type=event_type)

        event_id = await self.with_token(request, send)
        return cbor_response({"event_id": event_id}, Code.CHANGED)

    render_PUT = render_POST


def message_content(body: dict[str, Any]) -> dict[str, Any]:
    """The m.room.message content a send body describes: ``msgtype`` (``m.location`` with a
    ``geo_uri``), an optional HTML ``formatted_body``, and a reply (``reply_to``) to or an edit
    (``replaces``) of an event id."""
    text = cbor.text(body, "body", max_length=MAX_BODY_TEXT)
    assert text is not None  # required
    msgtype = cbor.text(body, "msgtype", max_length=64, required=False) or "m.text"
    if msgtype not in MSGTYPES:
        raise BadRequest("msgtype must be m.text, m.notice, m.emote or m.location")
    geo_uri = cbor.text(body, "geo_uri", max_length=MAX_GEO_URI, required=msgtype == LOCATION)
    if geo_uri is not None and (msgtype != LOCATION or not geo_uri.startswith("geo:")):
        raise BadRequest("geo_uri: a geo: URI, for m.location only")
    reply_to = _event_id(body, "reply_to")
    replaces = _event_id(body, "replaces")
    if reply_to is not None and replaces is not None:
        raise BadRequest("reply_to or replaces, not both")
    content = api.message_content(msgtype, text, geo_uri=geo_uri, reply_to=reply_to, replaces=replaces)
    formatted = cbor.text(body, "formatted_body", max_length=MAX_BODY_TEXT, required=False)
    if formatted is not None:
        html = {"format": cbor.text(body, "format", max_length=64, required=False) or "org.matrix.custom.html",
                "formatted_body": formatted}
        content.update(html)
        if "m.new_content" in content:
            content["m.new_content"].update(html)
    return content


def _event_id(body: dict[str, Any], key: str) -> str | None:
    event_id = cbor.text(body, key, max_length=MAX_EVENT_ID, required=False)
    if event_id is not None and not event_id.startswith("$"):
        raise BadRequest(f"{key} must be an event id ($...)")
    return event_id


join = ResourcePlugin("join", ("join",), JoinResource)
getmsg = ResourcePlugin("getmsg", ("getmsg",), GetMessageResource)
send = ResourcePlugin("send", ("send",), SendResource)
