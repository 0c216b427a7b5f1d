"""What ``comatrixctl`` does on the homeserver as the application service: create and deactivate device users.

A command-line tool, not the daemon: the calls block (urllib), one at a time.
Requests are built by the same pure builders the gateway uses
(`comatrix.matrix.api`), with the registration's ``as_token``; a device user is
acted for by identity assertion (`AppserviceToken`).  Errors are `AdminError`
with the homeserver's errcode and text, never a token.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from comatrix.appservice.registration import Registration, load_registration
from comatrix.config import Config
from comatrix.matrix import api

__all__ = ["AdminError", "AppserviceAdmin", "appservice_homeserver"]

HTTP_TIMEOUT = 30.0


class AdminError(Exception):
    """The homeserver refused or could not be reached; one line for the operator."""


def appservice_homeserver(config: Config) -> "AppserviceAdmin":
    """The admin client of the configured application service (`AdminError` when there is none)."""
    if config.appservice is None:
        raise AdminError("no [appservice] in the config: give --user (and its password or token), "
                         "or configure application-service mode")
    return AppserviceAdmin(config.homeserver, load_registration(config.appservice.registration))


class AppserviceAdmin:
    def __init__(self, homeserver: str, registration: Registration) -> None:
        self.homeserver = homeserver.rstrip("/")
        self.registration = registration

    def call(self, req: api.MatrixRequest) -> dict[str, Any]:
        data = json.dumps(req.body).encode("utf-8") if req.body is not None else None
        http = urllib.request.Request(req.url(self.homeserver), data=data, method=req.method,
                                      headers={"Content-Type": "application/json"})
        if req.access_token is not None:
            http.add_header("Authorization", f"Bearer {str.__str__(req.access_token)}")
        where = f"{req.method} /{'/'.join(req.path)}"
        try:
            with urllib.request.urlopen(http, timeout=HTTP_TIMEOUT) as response:
                body = json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            try:
                answer = json.loads(error.read())
            except ValueError:
                answer = {}
            raise AdminError(f"{where}: HTTP {error.code} {answer.get('errcode', '')}: "
                             f"{str(answer.get('error', ''))[:200]}") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise AdminError(f"cannot reach the homeserver at {self.homeserver}: {reason}") from None
        return body if isinstance(body, dict) else {}

    def server_name(self) -> str:
        """The homeserver's name, from the application service's own user."""
        user_id = self.call(api.whoami(self.registration.as_token)).get("user_id", "")
        if ":" not in user_id:
            raise AdminError("the homeserver did not say who the application service is (whoami)")
        return str(user_id).split(":", 1)[1]

    def create_device_user(self, name: str) -> str:
        """``@<prefix>NAME:<server>``, registered (or already there) with NAME as display name."""
        try:
            localpart = self.registration.localpart(name)
        except ValueError as exc:
            raise AdminError(str(exc)) from None
        user_id = f"@{localpart}:{self.server_name()}"
        try:
            self.call(api.register_appservice_user(self.registration.as_token, localpart))
        except AdminError as error:
            if "M_USER_IN_USE" not in str(error):
                raise
        acting = api.AppserviceToken(self.registration.as_token, user_id)
        self.call(api.set_displayname(acting, user_id, name))
        return user_id

    def deactivate(self, user_id: str) -> None:
        self.call(api.deactivate(api.AppserviceToken(self.registration.as_token, user_id)))
