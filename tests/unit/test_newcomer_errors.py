"""Errors a newcomer meets say what went wrong (issue 17, findings 1 and 3).

The homeserver's own ``error`` text reaches the device after the errcode, cut to
fit (64 bytes; 48 in the compact profile, so its error datagram keeps within the
64-byte response budget), never with a secret in it; an empty body or an empty
``?room=`` (an unencoded ``#`` cuts the URI) is named as such.
"""

from __future__ import annotations

from typing import Any


from comatrix.coap import wire
from comatrix.coap.numbers import Code
from comatrix.errors import COMPACT_DIAGNOSTIC_BYTES, matrix_error_response
from comatrix.matrix.errors import MatrixError
from comatrix.plugins import accounts, rooms
from support.world import World

from test_compact_sessions import DEVICE_A, SessionWorld
from test_resources import render, req


def test_a_wrong_password_says_what_the_homeserver_said() -> None:
    world = World()
    response = render(accounts.login.build(world.context()),
                      req(Code.POST, {"user": "d", "password": "wrong-password"}))
    assert (response.code, response.payload) == (Code.FORBIDDEN, b"M_FORBIDDEN: Invalid username or password")


def test_the_homeserver_text_is_cut_on_a_character_boundary_and_scrubbed() -> None:
    secret = "correct-horse-battery"
    error = MatrixError(403, "M_FORBIDDEN", f"password {secret} and token syt_abc_def " + "é" * 40,
                        secrets=[secret])
    payload = matrix_error_response(error).payload
    assert len(payload) <= 64 and payload.startswith(b"M_FORBIDDEN: password <redacted>")
    payload.decode("utf-8")  # no half character at the cut
    assert secret.encode() not in payload and b"syt_" not in payload
    # No errcode (an HTML page from a proxy): the status is the useful part.
    assert matrix_error_response(MatrixError(502, None, "<html>")).payload == b"HTTP 502"


def test_compact_errors_keep_within_the_profile_budget() -> None:
    world = SessionWorld()
    reply = world.send("+", ["d", "not-the-password"], DEVICE_A)
    assert reply.code == Code.FORBIDDEN
    assert reply.payload.startswith(b"M_FORBIDDEN: Invalid username")
    assert len(reply.payload) <= COMPACT_DIAGNOSTIC_BYTES
    datagram = wire.encode(reply.mtype, reply.code, reply.mid, reply.token, reply.options, reply.payload)
    assert len(datagram) <= 64


def _register(world: World, payload: Any) -> Any:
    resource = accounts.register.build(world.context(allow_registration=True))
    return render(resource, req(Code.POST, payload))


def test_an_empty_body_is_called_empty_not_a_missing_field() -> None:
    world = World()
    response = _register(world, b"")
    assert (response.code, response.payload) == (Code.BAD_REQUEST,
                                                 b"empty body: expected a CBOR map with username")
    # A body that is there but lacks the field still names the field.
    assert _register(world, {"password": "x" * 12}).payload == b"missing username"
    send = rooms.send.build(world.context())
    assert render(send, req(Code.POST, b"", options=world.auth)).payload.startswith(b"empty body: ")
    assert world.homeserver.requests == []


def test_an_empty_room_query_says_how_to_encode_the_hash() -> None:
    world = World()
    getmsg = rooms.getmsg.build(world.context())
    # `coap-client ".../getmsg?room=#lab:..."` sends "room=": the client cut the URI at the "#".
    response = render(getmsg, req(Code.GET, options=world.auth, query=("room=",)))
    assert (response.code, response.payload) == (Code.BAD_REQUEST, b"room is empty (encode # as %23)")
    send = rooms.send.build(world.context())
    response = render(send, req(Code.POST, {"room_id": "", "body": "x"}, options=world.auth))
    assert (response.code, response.payload) == (Code.BAD_REQUEST, b"room_id is empty")
    assert world.homeserver.requests == []
    encoded = render(getmsg, req(Code.GET, options=world.auth, query=("room=%23lab:" + world.alias.split(":")[1],)))
    assert encoded.code in (Code.CONTENT, Code.NOT_FOUND), encoded
