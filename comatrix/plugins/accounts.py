"""Account resources: ``/register``, ``/login``, ``/logout`` (original CoMatrix wire format).

register: POST CBOR ``{username, password[, auth, device_id]}`` -> 2.04 ``{access_token, user_id, device_id}``;
          4.03 "registration closed" unless ``allow_registration`` (`comatrix.policy`)
login:    POST CBOR ``{type, identifier: {type, user}, password}`` or ``{user, password}`` -> 2.04 same map
logout:   POST with the token (option 256) -> 2.04, the token is dead afterwards
"""

from __future__ import annotations

from typing import Any, Mapping

from comatrix.coap.errors import BadRequest
from comatrix.coap.message import Request, Response
from comatrix.coap.numbers import Code, ContentFormat
from comatrix.coap.resource import LinkAttributes
from comatrix.codec import cbor
from comatrix.matrix.responses import LoginResponse
from comatrix.resources import MatrixResource, ResourcePlugin, cbor_response

#: Matrix user localparts and passwords are short; reject anything absurd before the homeserver sees it.
MAX_USERNAME = 255
MAX_PASSWORD = 512


def session_map(session: LoginResponse) -> dict[str, Any]:
    return {"access_token": session.access_token, "user_id": session.user_id,
            "device_id": session.device_id}


def _optional_device_id(body: Mapping[str, Any]) -> str | None:
    return cbor.text(body, "device_id", max_length=255, required=False)


class RegisterResource(MatrixResource):
    link = LinkAttributes(rt="comatrix.register", ct=(ContentFormat.CBOR,), title="Register a Matrix user")
    proxy_codes = frozenset({"4"})
    operation = "register"

    async def render_POST(self, request: Request) -> Response:
        self.matrix_path(request)
        body = self.body(request)
        username = cbor.text(body, "username", max_length=MAX_USERNAME)
        password = cbor.text(body, "password", max_length=MAX_PASSWORD)
        assert username is not None and password is not None
        session = await self.matrix.register(username, password, device_id=_optional_device_id(body))
        return cbor_response(session_map(session), Code.CHANGED)


class LoginResource(MatrixResource):
    link = LinkAttributes(rt="comatrix.login", ct=(ContentFormat.CBOR,), title="Log in")
    proxy_codes = frozenset({"1"})
    operation = "login"

    async def render_POST(self, request: Request) -> Response:
        self.matrix_path(request)
        body = self.body(request)
        login_type = body.get("type", "m.login.password")
        if login_type != "m.login.password":
            raise BadRequest("only m.login.password")
        identifier = cbor.mapping(body, "identifier")
        if identifier is not None:
            if identifier.get("type", "m.id.user") != "m.id.user":
                raise BadRequest("only m.id.user identifiers")
            user = cbor.text(identifier, "user", max_length=MAX_USERNAME)
        else:
            user = cbor.text(body, "user", max_length=MAX_USERNAME)
        password = cbor.text(body, "password", max_length=MAX_PASSWORD)
        assert user is not None and password is not None
        session = await self.matrix.login(user, password, device_id=_optional_device_id(body))
        return cbor_response(session_map(session), Code.CHANGED)


class LogoutResource(MatrixResource):
    link = LinkAttributes(rt="comatrix.logout", title="Log out (invalidate the token)")
    proxy_codes = frozenset({"3"})
    operation = "logout"

    async def render_POST(self, request: Request) -> Response:
        self.matrix_path(request)
        self.body(request)  # no fields, but a malformed body is still an error
        await self.with_token(request, self.matrix.logout)
        return Response(code=Code.CHANGED)


register = ResourcePlugin("register", ("register",), RegisterResource)
login = ResourcePlugin("login", ("login",), LoginResource)
logout = ResourcePlugin("logout", ("logout",), LogoutResource)
