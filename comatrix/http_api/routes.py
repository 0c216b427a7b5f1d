"""The one table of the HTTP API's endpoints, and the OpenAPI 3.1 document made from it.

Each `Route` names its method, its path under ``/internal/matrix``, the
`comatrix.http_api.endpoints.Endpoints` method that serves it, and the JSON
Schemas of its request and answer bodies (the seed spec's shapes).  The
server matches requests against this table; ``/internal/matrix/openapi.json``
serves `openapi_document`; the tests check real answers against it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

__all__ = ["PREFIX", "ROUTES", "Route", "match", "openapi_document"]

PREFIX = ("internal", "matrix")

Schema = Mapping[str, Any]

_STR: Schema = {"type": "string"}
_ROOM: Schema = {"type": "string", "pattern": "^[!#]"}
_USER: Schema = {"type": "string", "pattern": "^@"}
_EVENT: Schema = {"type": "string", "pattern": "^\\$"}
_STATUS: Schema = {"type": "object", "required": ["status"], "properties": {"status": _STR}}
_EVENT_ID: Schema = {"type": "object", "required": ["event_id"], "properties": {"event_id": _EVENT}}
_MATRIX_EVENT: Schema = {"type": "object", "required": ["type", "event_id", "sender"],
                         "properties": {"type": _STR, "event_id": _EVENT, "sender": _USER,
                                        "content": {"type": "object"}, "origin_server_ts": {"type": "integer"}}}
ERROR: Schema = {"type": "object", "required": ["error", "message"], "properties": {"error": _STR, "message": _STR}}


def _object(required: tuple[str, ...], **properties: Schema) -> Schema:
    return {"type": "object", "required": list(required), "properties": dict(properties)}


@dataclasses.dataclass(frozen=True)
class Route:
    method: str
    #: Path segments after ``/internal/matrix``; ``{name}`` is a parameter.
    template: tuple[str, ...]
    handler: str
    summary: str
    response: Schema
    request: Schema | None = None
    #: Query parameters: (name, required, schema).
    query: tuple[tuple[str, bool, Schema], ...] = ()
    #: The body is multipart/form-data (an upload), not JSON.
    multipart: bool = False

    @property
    def path(self) -> str:
        return "/" + "/".join(PREFIX + self.template)


ROUTES: tuple[Route, ...] = (
    Route("POST", ("create-room",), "create_room", "Create a room", request=_object(
        (), name=_STR, topic=_STR, visibility={"enum": ["public", "private"]}, room_alias_name=_STR, preset=_STR,
        initial_state={"type": "array"}, power_level_content_override={"type": "object"},
        creation_content={"type": "object"}, invite={"type": "array", "items": _USER}, is_direct={"type": "boolean"},
        creator_matrix_id=_USER),
        response=_object(("room_id",), room_id=_ROOM, room_alias={"type": ["string", "null"]})),
    Route("GET", ("rooms", "{roomId}"), "room", "Room details", response=_object(
        ("room_id", "member_count", "joined_members"), room_id=_ROOM, name={"type": ["string", "null"]},
        topic={"type": ["string", "null"]}, avatar_url={"type": ["string", "null"]},
        canonical_alias={"type": ["string", "null"]}, member_count={"type": "integer"},
        joined_members={"type": "integer"}, encryption={"type": ["string", "null"]})),
    Route("PUT", ("rooms", "{roomId}", "name"), "room_name", "Set a room's name",
          request=_object(("name",), name=_STR), response=_EVENT_ID),
    Route("POST", ("send",), "send", "Send a message", request=_object(
        ("room_id", "body"), room_id=_ROOM, sender=_STR, sender_matrix_id=_USER, msgtype=_STR, body=_STR,
        format=_STR, formatted_body=_STR, relates_to={"type": "object"}, url=_STR, info={"type": "object"},
        txn_id=_STR),
        response=_object(("event_id", "sent_at"), event_id=_EVENT, sent_at={"type": "string", "format": "date-time"})),
    Route("POST", ("send-reaction",), "send_reaction", "React to a message", request=_object(
        ("room_id", "event_id", "emoji"), room_id=_ROOM, event_id=_EVENT, reactor=_STR, reactor_matrix_id=_USER,
        emoji=_STR), response=_EVENT_ID),
    Route("POST", ("redact",), "redact", "Redact a message", request=_object(
        ("room_id", "event_id"), room_id=_ROOM, event_id=_EVENT, reason=_STR), response=_EVENT_ID),
    Route("POST", ("invite",), "invite", "Invite a user", request=_object(
        ("room_id", "user_id"), room_id=_ROOM, user_id=_USER, inviter=_STR, inviter_matrix_id=_USER),
        response=_STATUS),
    Route("POST", ("join",), "join", "Join a room", request=_object(("room_id",), room_id=_ROOM, user_id=_USER),
          response=_object(("status", "room_id"), status=_STR, room_id=_ROOM)),
    Route("POST", ("leave",), "leave", "Leave a room", request=_object(("room_id",), room_id=_ROOM, user_id=_USER),
          response=_STATUS),
    Route("POST", ("kick",), "kick", "Kick a user", request=_object(
        ("room_id", "user_id"), room_id=_ROOM, user_id=_USER, kicker=_USER, reason=_STR), response=_STATUS),
    Route("GET", ("sync",), "sync", "Recent events (long-poll)",
          query=(("since", False, _STR), ("timeout", False, {"type": "integer", "minimum": 0}),
                 ("filter", False, _STR)),
          response=_object(("next_batch",), next_batch=_STR, rooms={"type": "object"})),
    Route("POST", ("webhook", "subscribe"), "subscribe", "Subscribe a URL to a room's events", request=_object(
        ("room_id", "webhook_url", "events"), room_id=_ROOM, webhook_url=_STR,
        events={"type": "array", "items": _STR, "minItems": 1}),
        response=_object(("subscription_id",), subscription_id=_STR)),
    Route("DELETE", ("webhook", "subscribe", "{subscriptionId}"), "unsubscribe", "Unsubscribe",
          response=_STATUS),
    Route("POST", ("register-user",), "register_user", "Register a user (shared-secret registration)",
          request=_object(("username", "password"), username=_STR, password=_STR, display_name=_STR,
                          avatar_url=_STR, admin={"type": "boolean"}),
          response=_object(("user_id", "access_token", "device_id"), user_id=_USER, access_token=_STR,
                           device_id=_STR)),
    Route("PUT", ("users", "{userId}", "display-name"), "display_name", "Set a user's display name",
          request=_object(("display_name",), display_name=_STR), response=_STATUS),
    Route("PUT", ("users", "{userId}", "avatar"), "avatar", "Set a user's avatar",
          request=_object(("avatar_url",), avatar_url=_STR), response=_STATUS),
    Route("POST", ("upload",), "upload", "Upload media (multipart/form-data, part 'file')", multipart=True,
          response=_object(("content_uri", "content_type", "size"), content_uri={"type": "string", "pattern": "^mxc://"},
                           content_type=_STR, size={"type": "integer"})),
    Route("GET", ("rooms", "{roomId}", "messages"), "messages", "A page of room history",
          query=(("from", False, _STR), ("dir", False, {"enum": ["b", "f"]}),
                 ("limit", False, {"type": "integer", "minimum": 1, "maximum": 100})),
          response=_object(("start", "chunk"), start=_STR, end={"type": ["string", "null"]},
                           chunk={"type": "array", "items": _MATRIX_EVENT})),
    Route("GET", ("openapi.json",), "openapi", "This document", response={"type": "object"}),
)


def match(method: str, segments: tuple[str, ...]) -> tuple[Route | None, dict[str, str], bool]:
    """(route, path parameters, whether the path exists for another method)."""
    other_method = False
    for route in ROUTES:
        if len(route.template) != len(segments):
            continue
        params: dict[str, str] = {}
        for pattern, segment in zip(route.template, segments):
            if pattern.startswith("{"):
                if not segment:
                    break
                params[pattern[1:-1]] = segment
            elif pattern != segment:
                break
        else:
            if route.method == method:
                return route, params, False
            other_method = True
    return None, {}, other_method


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 (its schemas are JSON Schema 2020-12) for every route."""
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        operation: dict[str, Any] = {
            "operationId": route.handler, "summary": route.summary,
            "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": route.response}}},
                          "default": {"description": "Error",
                                      "content": {"application/json": {"schema": ERROR}}}}}
        parameters = [{"name": name[1:-1], "in": "path", "required": True, "schema": _STR}
                      for name in route.template if name.startswith("{")]
        parameters += [{"name": name, "in": "query", "required": required, "schema": schema}
                       for name, required, schema in route.query]
        if parameters:
            operation["parameters"] = parameters
        if route.request is not None:
            operation["requestBody"] = {"required": True,
                                        "content": {"application/json": {"schema": route.request}}}
        if route.multipart:
            operation["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "contentMediaType": "application/octet-stream"}}}}}}
        if route.handler != "openapi":
            operation["security"] = [{"serviceToken": []}]
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "CoMatrix internal Matrix gateway API", "version": "1.0.0"},
        "paths": paths,
        "components": {"securitySchemes": {"serviceToken": {
            "type": "apiKey", "in": "header", "name": "X-Internal-Service-Token"}}},
    }
