"""What a request may do: the registration switch and least privilege for shared credentials.

Every operation the gateway performs on Matrix has a name, and every name one
category (`OPERATIONS`, the one table).  Two rules use it:

* **Registration** (category ``registration``) is refused with 4.03 unless the
  operator opened it with ``allow_registration``; the homeserver never sees a
  refused request.  It covers ``/register`` and every MSC3079 path that reaches
  the homeserver's ``register`` endpoints (code ``/4``, any API version).
* **Shared credentials**: a request acting through a ``[[devices]]`` entry
  (it sent no token of its own) may use the ``device`` operations -- send,
  read, join, sync, the compact profile, drop-in plugins -- and otherwise only
  what the entry's ``allow`` list names (operations or whole categories).  A
  datagram forged from inside the entry's prefix must not be able to add a
  pusher, log the account out everywhere, fetch OpenID tokens or create rooms.
  A device with a token of its own keeps the full API.

Paths map to operations by method: ``CODE_OPERATIONS`` gives the (read, write)
operation of every MSC3079 path code (its full ``/_matrix/client/<v>/`` path is
the same endpoint), ``FULL_PATHS`` the endpoints outside the code table the
gateway also passes on; anything else is ``other``.  The rules are enforced
where the decision can be taken and cannot be skipped: the registration switch
before a resource renders (`comatrix.resources.MatrixResource`) or forwards
(MSC3079), the shared-credentials rule where the shared token is handed out
(`comatrix.credentials.Credentials.token_for`).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

from comatrix.coap.errors import Forbidden

__all__ = ["DEVICE", "REGISTRATION", "OPERATIONS", "CATEGORIES", "CODE_OPERATIONS", "FULL_PATHS",
           "operation_for", "expand_allow", "check_registration", "check_shared", "user_allowed",
           "sender_filter"]

#: The category shared credentials may always use.
DEVICE = "device"
#: The category governed by ``allow_registration`` (not by ``allow`` lists).
REGISTRATION = "registration"
#: The operation of a drop-in plugin's resource (``MatrixResource.operation`` by default).
PLUGIN = "plugin"
#: Endpoints no table names.
OTHER = "other"

#: Operation -> category.  The one table of what is what.
OPERATIONS: Mapping[str, str] = {
    # What a device needs: its own messages in, the rooms' messages out.
    "versions": DEVICE, "login": DEVICE, "capabilities": DEVICE, "whoami": DEVICE,
    "filter": DEVICE, "filter/set": DEVICE, "sync": DEVICE,
    "state": DEVICE, "event": DEVICE, "members": DEVICE, "messages": DEVICE, "context": DEVICE,
    "joined_rooms": DEVICE, "alias": DEVICE, "room_visibility": DEVICE,
    "send": DEVICE, "join": DEVICE, "typing": DEVICE, "receipt": DEVICE, "read_markers": DEVICE,
    "profile": DEVICE, "presence": DEVICE, "compact": DEVICE, "thumbnail": DEVICE, PLUGIN: DEVICE,
    # Creating accounts.
    "register": REGISTRATION,
    # The account's logins (a logout ends the login every device of the entry shares).
    "logout": "sessions", "logout/all": "sessions", "devices": "sessions", "devices/set": "sessions",
    "delete_devices": "sessions",
    # Where the homeserver sends notifications to.
    "pushers": "push", "pushers/set": "push", "pushrules": "push", "pushrules/set": "push",
    "notifications": "push",
    # The account itself.
    "password": "account", "deactivate": "account", "3pid": "account",
    "openid": "openid",
    "account_data": "private_data", "account_data/set": "private_data",
    "tags": "private_data", "tags/set": "private_data",
    "keys/upload": "encryption", "keys/query": "encryption", "keys/claim": "encryption",
    "keys/changes": "encryption", "cross_signing": "encryption", "room_keys": "encryption",
    "send_to_device": "encryption",
    "admin": "admin",
    # Rooms beyond sending and reading.
    "create_room": "rooms", "invite": "rooms", "leave": "rooms", "forget": "rooms", "invitations": "rooms",
    "state/set": "rooms", "room_upgrade": "rooms",
    "redact": "moderation", "kick": "moderation", "ban": "moderation", "unban": "moderation",
    "report": "moderation",
    "alias/set": "directory", "room_visibility/set": "directory", "room_aliases": "directory",
    "public_rooms": "directory", "user_search": "directory",
    "search": "search",
    "profile/set": "status", "presence/set": "status",
    "turn_server": "voip",
    "upload": "media",
    OTHER: OTHER,
}

CATEGORIES: frozenset[str] = frozenset(OPERATIONS.values())

#: MSC3079 path code -> (operation for GET, operation for POST/PUT/DELETE).
CODE_OPERATIONS: Mapping[str, tuple[str, str]] = {
    "0": ("versions", "versions"), "1": ("login", "login"), "2": ("capabilities", "capabilities"),
    "3": ("logout", "logout"), "4": ("register", "register"),
    "5": ("filter", "filter/set"), "6": ("filter", "filter/set"), "7": ("sync", "sync"),
    "8": ("state", "state/set"), "9": ("send", "send"), "A": ("event", "event"),
    "B": ("state", "state/set"), "C": ("members", "members"), "D": ("members", "members"),
    "E": ("messages", "messages"), "F": ("redact", "redact"), "G": ("create_room", "create_room"),
    "H": ("alias", "alias/set"), "I": ("joined_rooms", "joined_rooms"), "J": ("invite", "invite"),
    "K": ("join", "join"), "L": ("join", "join"), "M": ("leave", "leave"), "N": ("forget", "forget"),
    "O": ("kick", "kick"), "P": ("ban", "ban"), "Q": ("unban", "unban"),
    "R": ("room_visibility", "room_visibility/set"), "S": ("public_rooms", "public_rooms"),
    "T": ("user_search", "user_search"),
    "U": ("profile", "profile/set"), "V": ("profile", "profile/set"), "W": ("profile", "profile/set"),
    "X": ("turn_server", "turn_server"), "Y": ("typing", "typing"), "Z": ("receipt", "receipt"),
    "a": ("read_markers", "read_markers"), "b": ("presence", "presence/set"),
    "c": ("send_to_device", "send_to_device"),
    "d": ("devices", "devices"), "e": ("devices", "devices/set"), "f": ("delete_devices", "delete_devices"),
    "g": ("keys/upload", "keys/upload"), "h": ("keys/query", "keys/query"), "i": ("keys/claim", "keys/claim"),
    "j": ("keys/changes", "keys/changes"),
    "k": ("pushers", "pushers"), "l": ("pushers/set", "pushers/set"),
    "m": ("notifications", "notifications"), "n": ("pushrules", "pushrules/set"), "o": ("search", "search"),
    "p": ("tags", "tags"), "q": ("tags", "tags/set"),
    "r": ("account_data", "account_data/set"), "s": ("account_data", "account_data/set"),
    "t": ("context", "context"), "u": ("report", "report"),
}

#: Endpoints outside the code table, by their path after ``/_matrix/client/<version>/``:
#: (prefix, GET operation, other methods' operation); ``*`` is any one segment; first match wins.
FULL_PATHS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("register",), "register", "register"),
    (("logout", "all"), "logout/all", "logout/all"),
    (("account", "whoami"), "whoami", "whoami"),
    (("account", "password"), "password", "password"),
    (("account", "deactivate"), "deactivate", "deactivate"),
    (("account", "3pid"), "3pid", "3pid"),
    (("user", "*", "openid"), "openid", "openid"),
    (("rooms", "*", "state"), "state", "state/set"),
    (("rooms", "*", "upgrade"), "room_upgrade", "room_upgrade"),
    (("rooms", "*", "aliases"), "room_aliases", "room_aliases"),
    (("keys",), "cross_signing", "cross_signing"),
    (("room_keys",), "room_keys", "room_keys"),
    (("pushrules",), "pushrules", "pushrules/set"),
    (("admin",), "admin", "admin"),
)

_READ_METHODS = frozenset({"GET", "FETCH"})


def operation_for(method: str, code: str | None, rest: tuple[str, ...]) -> str:
    """The operation of an MSC3079 request: its path code if the endpoint has one, else
    the path after ``/_matrix/client/<version>/`` (``rest``)."""
    read = method in _READ_METHODS
    if code is not None:
        get, write = CODE_OPERATIONS[code]
        return get if read else write
    for prefix, get, write in FULL_PATHS:
        if len(rest) >= len(prefix) and all(p in ("*", s) for p, s in zip(prefix, rest)):
            return get if read else write
    return OTHER


def expand_allow(names: Iterable[str]) -> frozenset[str]:
    """The operations an ``allow`` list grants (names are operations or categories).

    `ValueError` (one line) for a name no table knows, and for registration, which
    the ``allow_registration`` switch governs.
    """
    granted: set[str] = set()
    for name in names:
        if name in (REGISTRATION, "register"):
            raise ValueError("registration is governed by allow_registration, not allow")
        if name in CATEGORIES:
            granted.update(op for op, category in OPERATIONS.items() if category == name)
        elif name in OPERATIONS:
            granted.add(name)
        else:
            known = ", ".join(sorted(CATEGORIES - {DEVICE, REGISTRATION}))
            raise ValueError(f"unknown operation or category {name[:40]!r} (categories: {known})")
    return frozenset(granted)


def check_registration(allow_registration: bool, operation: str) -> None:
    """4.03 for an operation that creates accounts while registration is closed."""
    if not allow_registration and OPERATIONS.get(operation) == REGISTRATION:
        raise Forbidden("registration closed")


def check_shared(allowed: frozenset[str], operation: str) -> None:
    """4.03 unless shared credentials may perform ``operation`` (device ops, or ``allowed``)."""
    if OPERATIONS.get(operation, OTHER) != DEVICE and operation not in allowed:
        raise Forbidden("not allowed for shared credentials")


def user_allowed(patterns: Sequence[str] | None, owner: str, user: str) -> bool:
    """Whether ``user`` matches ``patterns`` (user ids, ``*:server``, ``*``) set for ``owner``'s device.

    None -- nothing configured -- means users of ``owner``'s own server: the default of both
    ``allow_invites_from`` and ``allowed_senders``.
    """
    if patterns is None:
        patterns = ("*:" + owner.partition(":")[2],)
    server = user.partition(":")[2]
    return any(pattern in ("*", user) or (pattern.startswith("*:") and server == pattern[2:])
               for pattern in patterns)


def sender_filter(patterns: Sequence[str] | None, own_user: str) -> Callable[[str], bool]:
    """Whether a message of a sender reaches ``own_user``'s device: its own, or one ``allowed_senders``
    (``patterns``; None: the default, users of its own server) allows."""
    return lambda sender: sender == own_user or user_allowed(patterns, own_user, sender)
