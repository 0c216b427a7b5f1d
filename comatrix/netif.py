"""Finding an interface's IPv6 link-local address (Linux ``/proc/net/if_inet6``).

Used at start-up when the config names an ``interface`` (``lowpan0`` on a border
router) instead of an ``ip``: the gateway binds to ``fe80::...%lowpan0`` once the
address exists and has left the tentative (DAD) state.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

IF_INET6 = "/proc/net/if_inet6"
_SCOPE_LINK = 0x20
_IFA_F_TENTATIVE = 0x40
_IFA_F_DADFAILED = 0x08


def link_local_address(interface: str, lines: Iterable[str]) -> str | None:
    """``fe80::...%interface`` for the first usable link-local address of ``interface``."""
    for line in lines:
        fields = line.split()
        if len(fields) != 6 or fields[5] != interface:
            continue
        raw, _index, _prefix, scope, flags, _name = fields
        if int(scope, 16) != _SCOPE_LINK or int(flags, 16) & (_IFA_F_TENTATIVE | _IFA_F_DADFAILED):
            continue
        address = ipaddress.IPv6Address(bytes.fromhex(raw))
        return f"{address}%{interface}"
    return None


def read_link_local_address(interface: str, path: str = IF_INET6) -> str | None:
    try:
        with open(path, encoding="ascii") as table:
            return link_local_address(interface, table.read().splitlines())
    except OSError:
        return None
