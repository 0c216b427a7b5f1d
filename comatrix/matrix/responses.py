"""Pure parsers from decoded JSON answers to typed, frozen values (no I/O).

Each ``parse_*`` takes the JSON object of a 2xx answer and returns a typed
value, or raises `InvalidResponse` when the shape is wrong.  Secrets in the
results (access tokens) are kept out of their reprs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from comatrix.matrix.errors import InvalidResponse

__all__ = [
    "Event",
    "Invitation",
    "LoginResponse",
    "MessagesPage",
    "RegisterResponse",
    "ResolvedAlias",
    "SyncResponse",
    "UIAFlows",
    "Versions",
    "parse_create_room",
    "parse_event",
    "parse_flows_session",
    "parse_invitations",
    "parse_joined_members",
    "parse_join",
    "parse_joined_rooms",
    "parse_login",
    "parse_messages",
    "parse_register",
    "parse_resolve_alias",
    "parse_send",
    "parse_sync",
    "parse_uia_flows",
    "parse_versions",
    "parse_whoami",
]

JsonObject = Mapping[str, Any]


def _require_object(body: Any, what: str) -> JsonObject:
    if not isinstance(body, Mapping):
        raise InvalidResponse(f"{what}: expected a JSON object, got {type(body).__name__}")
    return body


def _str(body: JsonObject, key: str, what: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidResponse(f"{what}: missing or non-string {key!r}")
    return value


def _opt_str(body: JsonObject, key: str, what: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidResponse(f"{what}: non-string {key!r}")
    return value


def _int(body: JsonObject, key: str, what: str) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidResponse(f"{what}: missing or non-integer {key!r}")
    return value


@dataclass(frozen=True)
class LoginResponse:
    """Result of a login (or a registration that logged in)."""

    user_id: str
    access_token: str = field(repr=False)
    device_id: str | None


@dataclass(frozen=True)
class RegisterResponse:
    """Result of a registration; no token when ``inhibit_login`` was set."""

    user_id: str
    access_token: str | None = field(repr=False)
    device_id: str | None


@dataclass(frozen=True)
class UIAFlows:
    """A 401 User-Interactive Authentication answer: the session and its flows."""

    session: str
    flows: tuple[tuple[str, ...], ...]
    completed: tuple[str, ...] = ()

    def offers_only(self, stage: str) -> bool:
        """True if some flow consists of ``stage`` alone."""
        return (stage,) in self.flows


@dataclass(frozen=True)
class ResolvedAlias:
    """A room alias resolved through the directory."""

    room_id: str
    servers: tuple[str, ...]


@dataclass(frozen=True)
class Event:
    """A client-format room event."""

    event_id: str
    type: str
    sender: str
    origin_server_ts: int
    content: Mapping[str, Any]
    state_key: str | None = None
    room_id: str | None = None

    @property
    def is_state(self) -> bool:
        return self.state_key is not None

    @property
    def is_redacted(self) -> bool:
        return not self.content


@dataclass(frozen=True)
class MessagesPage:
    """One page of ``/rooms/{r}/messages``; ``end`` None means no more events."""

    events: tuple[Event, ...]
    start: str
    end: str | None


@dataclass(frozen=True)
class Versions:
    versions: tuple[str, ...]
    unstable_features: Mapping[str, bool]


@dataclass(frozen=True)
class SyncResponse:
    """``/sync``: the next batch token and the raw body for the caller to walk."""

    next_batch: str
    body: Mapping[str, Any] = field(repr=False)


def parse_login(body: Any) -> LoginResponse:
    what = "login"
    obj = _require_object(body, what)
    return LoginResponse(
        user_id=_str(obj, "user_id", what),
        access_token=_str(obj, "access_token", what),
        device_id=_opt_str(obj, "device_id", what),
    )


def parse_register(body: Any) -> RegisterResponse:
    what = "register"
    obj = _require_object(body, what)
    token = _opt_str(obj, "access_token", what)
    return RegisterResponse(
        user_id=_str(obj, "user_id", what),
        access_token=token or None,
        device_id=_opt_str(obj, "device_id", what),
    )


def parse_uia_flows(body: Any) -> UIAFlows:
    """Parse a 401 UIA body: ``{session, flows: [{stages: [...]}], completed?}``."""
    what = "user-interactive auth"
    obj = _require_object(body, what)
    session = _str(obj, "session", what)
    raw_flows = obj.get("flows")
    if not isinstance(raw_flows, list):
        raise InvalidResponse(f"{what}: missing 'flows'")
    flows: list[tuple[str, ...]] = []
    for flow in raw_flows:
        stages = flow.get("stages") if isinstance(flow, Mapping) else None
        if not isinstance(stages, list) or not all(isinstance(s, str) for s in stages):
            raise InvalidResponse(f"{what}: malformed flow")
        flows.append(tuple(stages))
    completed = obj.get("completed", [])
    if not isinstance(completed, list) or not all(isinstance(s, str) for s in completed):
        raise InvalidResponse(f"{what}: malformed 'completed'")
    return UIAFlows(session, tuple(flows), tuple(completed))


def parse_flows_session(body: Any) -> str:
    """The UIA session id of a 401 registration answer."""
    return _str(_require_object(body, "user-interactive auth"), "session", "user-interactive auth")


def parse_join(body: Any) -> str:
    return _str(_require_object(body, "join"), "room_id", "join")


def parse_create_room(body: Any) -> str:
    return _str(_require_object(body, "createRoom"), "room_id", "createRoom")


def parse_resolve_alias(body: Any) -> ResolvedAlias:
    what = "directory"
    obj = _require_object(body, what)
    servers = obj.get("servers", [])
    if not isinstance(servers, list) or not all(isinstance(s, str) for s in servers):
        raise InvalidResponse(f"{what}: malformed 'servers'")
    return ResolvedAlias(_str(obj, "room_id", what), tuple(servers))


def parse_send(body: Any) -> str:
    return _str(_require_object(body, "send"), "event_id", "send")


def parse_whoami(body: Any) -> str:
    return _str(_require_object(body, "whoami"), "user_id", "whoami")


def parse_joined_rooms(body: Any) -> tuple[str, ...]:
    obj = _require_object(body, "joined_rooms")
    rooms = obj.get("joined_rooms")
    if not isinstance(rooms, list) or not all(isinstance(r, str) for r in rooms):
        raise InvalidResponse("joined_rooms: malformed 'joined_rooms'")
    return tuple(rooms)


def parse_event(body: Any) -> Event:
    what = "event"
    obj = _require_object(body, what)
    content = obj.get("content", {})
    if not isinstance(content, Mapping):
        raise InvalidResponse(f"{what}: non-object 'content'")
    state_key = obj.get("state_key")
    if state_key is not None and not isinstance(state_key, str):
        raise InvalidResponse(f"{what}: non-string 'state_key'")
    return Event(
        event_id=_str(obj, "event_id", what),
        type=_str(obj, "type", what),
        sender=_str(obj, "sender", what),
        origin_server_ts=_int(obj, "origin_server_ts", what),
        content=dict(content),
        state_key=state_key,
        room_id=_opt_str(obj, "room_id", what),
    )


def parse_messages(body: Any) -> MessagesPage:
    """Parse ``/rooms/{r}/messages``.  An empty chunk is not the end; a missing ``end`` is."""
    what = "messages"
    obj = _require_object(body, what)
    chunk = obj.get("chunk")
    if not isinstance(chunk, list):
        raise InvalidResponse(f"{what}: missing 'chunk'")
    return MessagesPage(
        events=tuple(parse_event(e) for e in chunk),
        start=_str(obj, "start", what),
        end=_opt_str(obj, "end", what) or None,
    )


def parse_versions(body: Any) -> Versions:
    what = "versions"
    obj = _require_object(body, what)
    vers = obj.get("versions")
    if not isinstance(vers, list) or not all(isinstance(v, str) for v in vers):
        raise InvalidResponse(f"{what}: malformed 'versions'")
    unstable = obj.get("unstable_features", {})
    if not isinstance(unstable, Mapping):
        raise InvalidResponse(f"{what}: malformed 'unstable_features'")
    return Versions(tuple(vers), {str(k): bool(v) for k, v in unstable.items()})


def parse_sync(body: Any) -> SyncResponse:
    obj = _require_object(body, "sync")
    return SyncResponse(_str(obj, "next_batch", "sync"), obj)


def parse_joined_members(body: Any) -> tuple[str, ...]:
    """The user ids of a ``/joined_members`` answer, sorted."""
    joined = _require_object(body, "joined_members").get("joined")
    if not isinstance(joined, Mapping):
        raise InvalidResponse("joined_members: malformed 'joined'")
    return tuple(sorted(str(user) for user in joined))


@dataclass(frozen=True)
class Invitation:
    """A pending invitation of the syncing user: the room, who invited, the room's name if any."""

    room_id: str
    inviter: str | None
    name: str | None


def parse_invitations(body: Any, user_id: str) -> tuple[Invitation, ...]:
    """The rooms ``user_id`` is invited to, from a ``/sync`` answer's ``rooms.invite`` (stripped state)."""
    rooms = _require_object(body, "sync").get("rooms", {})
    invited = rooms.get("invite", {}) if isinstance(rooms, Mapping) else {}
    if not isinstance(invited, Mapping):
        raise InvalidResponse("sync: malformed 'rooms.invite'")
    found = []
    for room_id, room in invited.items():
        events = room.get("invite_state", {}).get("events", []) if isinstance(room, Mapping) else []
        inviter = name = None
        for event in events if isinstance(events, list) else ():
            if not isinstance(event, Mapping) or not isinstance(event.get("content"), Mapping):
                continue
            if event.get("type") == "m.room.member" and event.get("state_key") == user_id:
                inviter = event.get("sender") if isinstance(event.get("sender"), str) else None
            elif event.get("type") == "m.room.name" and isinstance(event["content"].get("name"), str):
                name = event["content"]["name"] or None
        found.append(Invitation(str(room_id), inviter, name))
    return tuple(sorted(found, key=lambda invitation: invitation.room_id))
