"""``comatrixctl register-user``: create a Matrix account through Synapse's shared-secret registration.

``GET /_synapse/admin/v1/register`` gives a nonce; the account is created by
``POST``-ing it with the user name, password, admin flag and an HMAC-SHA1 over
``nonce NUL user NUL password NUL admin|notadmin`` keyed with the homeserver's
``registration_shared_secret`` (read from a file, never from the command line).
The operator's way to create device accounts while open registration is off.

Synapse answers with a login (a Matrix device and an access token); nobody
needs that token, so it is logged out at once.  Blocking (a command-line tool).
"""

from __future__ import annotations

import re
import secrets

from comatrix.doctor import Answer, Unreachable, http_json
from comatrix.matrix import api

__all__ = ["RegisterError", "registration_mac", "register_user", "new_password", "localpart_of"]

ADMIN_REGISTER = "/_synapse/admin/v1/register"
TIMEOUT = 10.0
#: Generated passwords: 24 random bytes, URL-safe text (192 bits).
PASSWORD_BYTES = 24

_LOCALPART = re.compile(r"[a-z0-9._=/+-]{1,255}")


class RegisterError(Exception):
    """The account was not created; one line (an errcode and the homeserver's short text), no secret."""


def registration_mac(secret: str, nonce: str, user: str, password: str, admin: bool) -> str:
    """The HMAC the request carries (the one builder, `comatrix.matrix.api.shared_secret_register`)."""
    body = api.shared_secret_register(secret, nonce, user, password, admin).body
    assert body is not None
    return str(body["mac"])


def localpart_of(name: str) -> str:
    """``sensor01`` from ``sensor01`` or ``@sensor01:example.org``; refused unless Matrix allows it."""
    localpart = name[1:].split(":", 1)[0] if name.startswith("@") else name
    if not _LOCALPART.fullmatch(localpart):
        raise RegisterError(f"{name!r}: a user name is 1-255 characters a-z 0-9 . _ = / + -")
    return localpart


def new_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


def _refused(what: str, answer: Answer) -> RegisterError:
    text = str(answer.body.get("error", ""))[:200]
    return RegisterError(f"{what}: {answer.errcode}{': ' + text if text else ''}")


def register_user(homeserver: str, secret: str, name: str, password: str, admin: bool = False) -> str:
    """Create ``name`` with ``password``; returns its user id."""
    localpart = localpart_of(name)
    url = homeserver.rstrip("/") + ADMIN_REGISTER
    try:
        first = http_json("GET", url, timeout=TIMEOUT)
        if first.status != 200 or not isinstance(first.body.get("nonce"), str):
            raise _refused("the homeserver gave no registration nonce (shared-secret registration off?)", first)
        nonce = first.body["nonce"]
        body = api.shared_secret_register(secret, nonce, localpart, password, admin).body
        created = http_json("POST", url, body=body, timeout=TIMEOUT)
        if created.status != 200:
            raise _refused("registration refused", created)
        token = created.body.get("access_token")
        if isinstance(token, str):
            http_json("POST", homeserver.rstrip("/") + "/_matrix/client/v3/logout", token=token, body={},
                      timeout=TIMEOUT)
    except Unreachable as exc:
        raise RegisterError(f"cannot reach the homeserver at {homeserver}: {exc}") from None
    return str(created.body.get("user_id", f"@{localpart}"))
