"""An in-memory fake homeserver for unit tests of anything built on the Matrix layer.

`FakeHomeserver` is a small `twisted.web` resource that plays the parts of
Synapse the gateway uses (UIA registration with ``m.login.dummy`` + session,
password login, tokens, createRoom with room-version-12 style ids, aliases,
invite/join, idempotent send, filtered ``/messages`` that can return empty
chunks, forward ``/messages`` walks, ``/context``, ``/joined_rooms``, whoami, logout, leave; room state
(read and set), ``/members``, ``/joined_members``, kick; an application service's ``as_token`` acting
as a user of its namespace by ``user_id=``).  Tests can queue scripted answers (429, 502 pages...)
and make requests hang.  `stub_transport` wires it to a `MatrixTransport`
through `treq.testing.StubTreq`: no sockets, everything synchronous.

It is a test double, not a homeserver: integration tests use a real Synapse.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any, Coroutine, TypeVar, cast
from urllib.parse import parse_qs, unquote

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from comatrix.matrix.transport import HttpClientLike, MatrixTransport

T = TypeVar("T")

__all__ = [
    "FakeHomeserver", "RecordedRequest", "ScriptedAnswer", "result_of", "run", "stub_transport",
]


@dataclass
class RecordedRequest:
    method: str
    uri: bytes  # as received, still percent-encoded
    path: tuple[str, ...]  # decoded segments
    query: dict[str, list[str]]
    headers: dict[bytes, list[bytes]]
    body: Any


@dataclass
class ScriptedAnswer:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


class _Reply(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def _err(status: int, errcode: str, error: str, **extra: Any) -> _Reply:
    return _Reply(status, {"errcode": errcode, "error": error, **extra})


class FakeHomeserver(Resource):
    """A tiny Synapse look-alike.  Inspect ``requests``; script with `script`."""

    isLeaf = True

    def __init__(self, server_name: str = "test.local", scan_window: int = 3) -> None:
        super().__init__()
        self.server_name = server_name
        #: How many raw timeline events one /messages call examines; with a
        #: types filter this yields empty chunks that are not the end, as Synapse does.
        self.scan_window = scan_window
        self.requests: list[RecordedRequest] = []
        self.passwords: dict[str, str] = {}
        self.tokens: dict[str, tuple[str, str]] = {}  # token -> (user_id, device_id)
        self.soft_logged_out: set[str] = set()
        self.rooms: dict[str, list[dict[str, Any]]] = {}
        self.members: dict[str, set[str]] = {}
        self.aliases: dict[str, str] = {}
        self.uia_sessions: set[str] = set()
        self.txns: dict[tuple[str, str, str, str], str] = {}
        #: Read receipts: (room id, user id) -> (receipt type, event id).
        self.receipts: dict[tuple[str, str], tuple[str, str]] = {}
        self.hanging: list[Request] = []
        #: Application services: as_token -> the user regex of their namespace (`add_appservice`).
        self.appservices: dict[str, str] = {}
        #: Uploaded media: media id -> (content, content type); profiles: user id -> fields.
        self.media: dict[str, tuple[bytes, str]] = {}
        self.profiles: dict[str, dict[str, str]] = {}
        self._scripts: list[tuple[str, tuple[str, ...], ScriptedAnswer | None]] = []
        self._counter = itertools.count(1)
        self._ts = itertools.count(1_700_000_000_000, 1000)

    # -- test controls ------------------------------------------------------

    def script(self, method: str, path_prefix: tuple[str, ...], answer: ScriptedAnswer | None) -> None:
        """Answer the next ``method`` request whose path starts with ``path_prefix`` with
        ``answer`` (None: never answer; the request hangs in ``hanging``)."""
        self._scripts.append((method, path_prefix, answer))

    def add_user(self, localpart: str, password: str) -> str:
        user_id = f"@{localpart}:{self.server_name}"
        self.passwords[user_id] = password
        return user_id

    def add_appservice(self, as_token: str, user_regex: str) -> None:
        """Accept ``as_token`` acting as any user matching ``user_regex`` (identity assertion)."""
        self.appservices[as_token] = user_regex

    def issue_token(self, user_id: str, device_id: str | None = None) -> tuple[str, str]:
        n = next(self._counter)
        device = device_id or f"DEV{n}"
        token = f"syt_{hashlib.sha256(f'{user_id}{n}'.encode()).hexdigest()[:24]}_{n}"
        self.tokens[token] = (user_id, device)
        return token, device

    def add_event(self, room_id: str, sender: str, event_type: str, content: dict[str, Any],
                  state_key: str | None = None) -> str:
        event_id = f"${hashlib.sha256(str(next(self._counter)).encode()).hexdigest()[:43]}"
        event: dict[str, Any] = {
            "event_id": event_id, "type": event_type, "sender": sender,
            "origin_server_ts": next(self._ts), "content": content, "room_id": room_id,
            "unsigned": {"age": 1},
        }
        if state_key is not None:
            event["state_key"] = state_key
        self.rooms.setdefault(room_id, []).append(event)
        return event_id

    def new_room(self, creator: str, alias_local: str | None = None) -> str:
        # Room version 12 style: '!' + 43 chars, no ':server' part.
        room_id = "!" + hashlib.sha256(str(next(self._counter)).encode()).hexdigest()[:43]
        self.rooms[room_id] = []
        self.members[room_id] = {creator}
        self.add_event(room_id, creator, "m.room.create", {"room_version": "12"}, "")
        self.add_event(room_id, creator, "m.room.member", {"membership": "join"}, creator)
        if alias_local:
            self.aliases[f"#{alias_local}:{self.server_name}"] = room_id
        return room_id

    def calls(self, *path_suffix: str) -> list[RecordedRequest]:
        """Recorded requests whose path after ``/_matrix/client/v3`` starts with ``path_suffix``."""
        n = len(path_suffix)
        return [r for r in self.requests if r.path[3:3 + n] == path_suffix]

    # -- twisted.web ------------------------------------------------------------

    def render(self, request: Request) -> bytes | int:
        raw_path = (request.path or b"").decode("ascii")
        segments = tuple(unquote(s) for s in raw_path.split("/")[1:])
        query = parse_qs((request.uri or b"").partition(b"?")[2].decode("ascii"),
                         keep_blank_values=True)
        method = (request.method or b"").decode("ascii")
        raw_body = request.content.read() if request.content is not None else b""
        try:
            body = json.loads(raw_body) if raw_body else None
        except ValueError:
            body = raw_body
        self.requests.append(RecordedRequest(
            method, request.uri or b"", segments, query,
            {k: list(v) for k, v in request.requestHeaders.getAllRawHeaders()}, body,
        ))
        for i, (m, prefix, answer) in enumerate(self._scripts):
            if m == method and segments[: len(prefix)] == prefix:
                del self._scripts[i]
                if answer is None:
                    self.hanging.append(request)
                    return NOT_DONE_YET
                request.setResponseCode(answer.status)
                for k, v in answer.headers.items():
                    request.setHeader(k, v)
                return answer.body
        if segments[:5] == ("_matrix", "client", "v1", "media", "thumbnail") and len(segments) == 7:
            return self._thumbnail(request, segments[6])
        if segments[:4] == ("_matrix", "media", "v3", "upload"):
            body = raw_body
        try:
            status, reply = 200, self._dispatch(method, segments, query, request, body)
        except _Reply as r:
            status, reply = r.status, r.body
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(reply).encode("utf-8")

    def _auth(self, request: Request) -> tuple[str, str, str]:
        header = request.getHeader(b"Authorization")
        if header is None:
            raise _err(401, "M_MISSING_TOKEN", "Missing access token.")
        token = header.decode("ascii").removeprefix("Bearer ")
        if token in self.appservices:
            return self._asserted(request, token)
        if token not in self.tokens:
            raise _err(401, "M_UNKNOWN_TOKEN", "Unrecognised access token.",
                       soft_logout=token in self.soft_logged_out)
        user_id, device = self.tokens[token]
        return token, user_id, device

    def _asserted(self, request: Request, as_token: str) -> tuple[str, str, str]:
        """An application service acting as the ``user_id`` of the query, as Synapse checks it."""
        query = parse_qs((request.uri or b"").partition(b"?")[2].decode("ascii"))
        asserted = query.get("user_id", [])
        if len(asserted) != 1 or not re.fullmatch(self.appservices[as_token] + r":.+", asserted[0]):
            raise _err(403, "M_FORBIDDEN", "Application service cannot masquerade as this user")
        return as_token, asserted[0], "AS"

    def _dispatch(self, method: str, path: tuple[str, ...], query: dict[str, list[str]],
                  request: Request, body: Any) -> dict[str, Any]:
        if path == ("_matrix", "client", "versions"):
            return {"versions": ["v1.11", "v1.12"], "unstable_features": {}}
        if path[:3] == ("_matrix", "client", "v1") and len(path) == 9 and path[5] == "relations" and method == "GET":
            self._auth(request)
            return self._relations(path[4], *path[6:])
        if path == ("_matrix", "media", "v3", "upload") and method == "POST" and isinstance(body, bytes):
            self._auth(request)
            media_id = f"m{next(self._counter)}"
            content_type = (request.getHeader(b"Content-Type") or b"application/octet-stream").decode("latin-1")
            self.media[media_id] = (body, content_type)
            return {"content_uri": f"mxc://{self.server_name}/{media_id}"}
        if path[:3] != ("_matrix", "client", "v3"):
            raise _err(404, "M_UNRECOGNIZED", "Unrecognized request")
        route = path[3:]
        body = body if isinstance(body, dict) else {}
        if route == ("register",) and method == "POST":
            return self._register(body)
        if route == ("login",) and method == "POST":
            ident = body.get("identifier", {})
            user = ident.get("user", "")
            user_id = user if user.startswith("@") else f"@{user}:{self.server_name}"
            password = body.get("password")
            if not isinstance(password, str) or self.passwords.get(user_id) != password:
                raise _err(403, "M_FORBIDDEN", "Invalid username or password")
            token, device = self.issue_token(user_id, body.get("device_id"))
            return {"user_id": user_id, "access_token": token, "device_id": device}
        if route[:2] == ("directory", "room") and method == "GET":
            room_id = self.aliases.get(route[2])
            if room_id is None:
                raise _err(404, "M_NOT_FOUND", f"Room alias {route[2]} not found")
            return {"room_id": room_id, "servers": [self.server_name]}
        token, user_id, device = self._auth(request)
        if route == ("logout",) and method == "POST":
            del self.tokens[token]
            return {}
        if route == ("account", "whoami"):
            return {"user_id": user_id, "device_id": device}
        if route == ("joined_rooms",) and method == "GET":
            return {"joined_rooms": [room for room, members in self.members.items() if user_id in members]}
        if route == ("createRoom",) and method == "POST":
            room_id = self.new_room(user_id, body.get("room_alias_name"))
            for event_type, key in (("m.room.name", "name"), ("m.room.topic", "topic")):
                if key in body:
                    self.add_event(room_id, user_id, event_type, {key: body[key]}, "")
            for invitee in body.get("invite", []):
                self.add_event(room_id, user_id, "m.room.member", {"membership": "invite"}, invitee)
            return {"room_id": room_id}
        if route[:1] == ("join",) and method == "POST":
            room_id = self.aliases.get(route[1], route[1])
            if room_id not in self.rooms:
                raise _err(404, "M_NOT_FOUND", "No known servers")
            self.members[room_id].add(user_id)
            self.add_event(room_id, user_id, "m.room.member", {"membership": "join"}, user_id)
            return {"room_id": room_id}
        if route[:1] == ("profile",) and len(route) == 3:
            return self._profile(method, route[1], route[2], user_id, body)
        if route[:1] == ("rooms",) and len(route) >= 3:
            return self._room(method, route[1], route[2:], query, user_id, token, device, body)
        raise _err(404, "M_UNRECOGNIZED", "Unrecognized request")

    def _profile(self, method: str, user: str, field: str, user_id: str, body: dict[str, Any]) -> dict[str, Any]:
        if method == "PUT":
            if user != user_id:
                raise _err(403, "M_FORBIDDEN", "Cannot set another user's profile")
            self.profiles.setdefault(user, {})[field] = body[field]
            return {}
        value = self.profiles.get(user, {}).get(field)
        if value is None:
            raise _err(404, "M_NOT_FOUND", "Profile field not set")
        return {field: value}

    def _thumbnail(self, request: Request, media_id: str) -> bytes:
        """The media itself stands in for its thumbnail (authenticated, as Synapse's)."""
        try:
            self._auth(request)
        except _Reply as r:
            request.setResponseCode(r.status)
            return json.dumps(r.body).encode("utf-8")
        if media_id not in self.media:
            request.setResponseCode(404)
            return json.dumps({"errcode": "M_NOT_FOUND", "error": "Not found"}).encode("utf-8")
        content, content_type = self.media[media_id]
        request.setHeader(b"Content-Type", content_type.encode("latin-1"))
        return content

    def _register(self, body: dict[str, Any]) -> dict[str, Any]:
        auth = body.get("auth")
        if not isinstance(auth, dict) or auth.get("session") not in self.uia_sessions:
            session = f"sess{next(self._counter)}"
            self.uia_sessions.add(session)
            raise _Reply(401, {"session": session, "params": {},
                               "flows": [{"stages": ["m.login.dummy"]}]})
        if auth.get("type") != "m.login.dummy":
            raise _err(400, "M_UNRECOGNIZED", "Unknown auth type")
        self.uia_sessions.discard(auth["session"])
        user_id = f"@{body.get('username')}:{self.server_name}"
        if user_id in self.passwords:
            raise _err(400, "M_USER_IN_USE", "User ID already taken.")
        self.passwords[user_id] = body.get("password", "")
        if body.get("inhibit_login"):
            return {"user_id": user_id}
        token, device = self.issue_token(user_id, body.get("device_id"))
        return {"user_id": user_id, "access_token": token, "device_id": device}

    def _room(self, method: str, room_id: str, rest: tuple[str, ...], query: dict[str, list[str]],
              user_id: str, token: str, device: str, body: dict[str, Any]) -> dict[str, Any]:
        if room_id not in self.rooms:
            raise _err(404, "M_NOT_FOUND", "Unknown room")
        if rest == ("invite",) and method == "POST":
            self.add_event(room_id, user_id, "m.room.member", {"membership": "invite"},
                           body["user_id"])
            return {}
        if rest == ("leave",) and method == "POST":  # also how an invitation is declined
            self.members[room_id].discard(user_id)
            self.add_event(room_id, user_id, "m.room.member", {"membership": "leave"}, user_id)
            return {}
        if user_id not in self.members[room_id]:
            raise _err(403, "M_FORBIDDEN", f"User {user_id} not in room {room_id}")
        if rest[0] == "state" and len(rest) in (2, 3):
            return self._state(method, room_id, rest[1], rest[2] if len(rest) == 3 else "", user_id, body)
        if rest == ("members",) and method == "GET":
            return {"chunk": list(self.state_events(room_id, "m.room.member").values())}
        if rest == ("joined_members",) and method == "GET":
            return {"joined": {member: {} for member in sorted(self.members[room_id])}}
        if rest == ("kick",) and method == "POST":
            self.members[room_id].discard(body["user_id"])
            self.add_event(room_id, user_id, "m.room.member", {"membership": "leave"}, body["user_id"])
            return {}
        if rest[0] == "send" and len(rest) == 3 and method == "PUT":
            key = (device, room_id, rest[1], rest[2])
            if key not in self.txns:
                self.txns[key] = self.add_event(room_id, user_id, rest[1], body)
            return {"event_id": self.txns[key]}
        if rest[0] == "redact" and len(rest) == 3 and method == "PUT":
            key = (device, room_id, "redact/" + rest[1], rest[2])
            if key not in self.txns:
                self.txns[key] = self._redact(room_id, user_id, rest[1], body)
            return {"event_id": self.txns[key]}
        if rest[0] == "receipt" and len(rest) == 3 and method == "POST":
            self.receipts[(room_id, user_id)] = (rest[1], rest[2])
            return {}
        if rest == ("messages",) and method == "GET":
            return self._messages(room_id, query)
        if rest[0] == "context" and len(rest) == 2 and method == "GET":
            positions = [n for n, event in enumerate(self.rooms[room_id]) if event["event_id"] == rest[1]]
            if not positions:
                raise _err(404, "M_NOT_FOUND", "Event not found.")
            event = self.rooms[room_id][positions[0]]
            return {"event": event, "events_before": [], "events_after": [], "state": [],
                    "start": f"t{positions[0]}", "end": f"t{positions[0] + 1}"}
        raise _err(404, "M_UNRECOGNIZED", "Unrecognized request")

    def _redact(self, room_id: str, user_id: str, event_id: str, body: dict[str, Any]) -> str:
        """An ``m.room.redaction`` of ``event_id``; the event loses its content."""
        for event in self.rooms[room_id]:
            if event["event_id"] == event_id:
                event["content"] = {}
                event["unsigned"]["redacted_because"] = {"sender": user_id}
        redaction = self.add_event(room_id, user_id, "m.room.redaction", dict(body))
        self.rooms[room_id][-1]["redacts"] = event_id
        return redaction

    def _relations(self, room_id: str, event_id: str, rel_type: str, event_type: str) -> dict[str, Any]:
        """``/relations``: the live events of ``event_type`` relating to ``event_id`` by ``rel_type``."""
        if room_id not in self.rooms:
            raise _err(404, "M_NOT_FOUND", "Unknown room")
        chunk = [event for event in self.rooms[room_id] if event["type"] == event_type
                 and event["content"].get("m.relates_to", {}).get("event_id") == event_id
                 and event["content"]["m.relates_to"].get("rel_type") == rel_type]
        return {"chunk": chunk}

    def state_events(self, room_id: str, event_type: str) -> dict[str, dict[str, Any]]:
        """The current state events of ``event_type`` in the room, by state key."""
        return {event["state_key"]: event for event in self.rooms[room_id]
                if event["type"] == event_type and "state_key" in event}

    def _state(self, method: str, room_id: str, event_type: str, state_key: str, user_id: str,
               body: dict[str, Any]) -> dict[str, Any]:
        if method == "PUT":
            return {"event_id": self.add_event(room_id, user_id, event_type, body, state_key)}
        event = self.state_events(room_id, event_type).get(state_key)
        if event is None:
            raise _err(404, "M_NOT_FOUND", "Event not found.")
        return dict(event["content"])

    def _messages(self, room_id: str, query: dict[str, list[str]]) -> dict[str, Any]:
        timeline = self.rooms[room_id]
        limit = int(query.get("limit", ["10"])[0])
        types = None
        if "filter" in query:
            types = json.loads(query["filter"][0]).get("types")
        start = int(query["from"][0][1:]) if "from" in query else len(timeline)
        if query.get("dir") == ["f"]:
            return self._messages_forward(timeline, start, limit, types)
        chunk: list[dict[str, Any]] = []
        pos = start
        scanned = 0
        while pos > 0 and len(chunk) < limit and scanned < self.scan_window:
            pos -= 1
            scanned += 1
            event = timeline[pos]
            if types is None or event["type"] in types:
                chunk.append(event)
        reply: dict[str, Any] = {"chunk": chunk, "start": f"t{start}"}
        if pos > 0:
            reply["end"] = f"t{pos}"
        return reply

    def _messages_forward(self, timeline: list[dict[str, Any]], start: int, limit: int,
                          types: list[str] | None) -> dict[str, Any]:
        """``dir=f`` from token ``t<n>`` (between events n-1 and n), oldest first; no ``end`` once caught up."""
        chunk: list[dict[str, Any]] = []
        pos = start
        while pos < len(timeline) and len(chunk) < limit and pos - start < self.scan_window:
            if types is None or timeline[pos]["type"] in types:
                chunk.append(timeline[pos])
            pos += 1
        reply: dict[str, Any] = {"chunk": chunk, "start": f"t{start}"}
        if chunk or pos < len(timeline):
            reply["end"] = f"t{pos}"
        return reply


def stub_transport(resource: Resource, reactor: Any, *, timeout: float = 10.0) -> tuple[MatrixTransport, StubTreq]:
    """A `MatrixTransport` whose HTTP goes to ``resource`` in memory; timers run on ``reactor``."""
    stub = StubTreq(resource)
    transport = MatrixTransport(
        "https://hs.test.local", reactor=reactor, timeout=timeout,
        http_client=cast(HttpClientLike, stub),
    )
    return transport, stub


def result_of(d: "Deferred[T]") -> T:
    """The result of an already-fired Deferred; re-raises its failure; fails if unfired."""
    out: list[Any] = []
    d.addBoth(out.append)
    if not out:
        raise AssertionError("Deferred has not fired")
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return cast(T, out[0])


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that completes synchronously (StubTreq) and return its result."""
    return result_of(ensureDeferred(coro))
