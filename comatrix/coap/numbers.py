"""CoAP protocol numbers: message types, codes, option numbers, content-formats.

The one table of CoAP constants for the whole project (RFC 7252, 7641, 7959,
8516).  Everything else refers to these names instead of bare integers.
"""

from __future__ import annotations

import enum


class MessageType(enum.IntEnum):
    CON = 0
    NON = 1
    ACK = 2
    RST = 3


def _code(class_: int, detail: int) -> int:
    return (class_ << 5) | detail


class Code(enum.IntEnum):
    """Method and response codes; ``str(code)`` gives the dotted form ``"4.04"``."""

    EMPTY = 0
    GET = 1
    POST = 2
    PUT = 3
    DELETE = 4
    FETCH = 5
    PATCH = 6
    IPATCH = 7

    CREATED = _code(2, 1)
    DELETED = _code(2, 2)
    VALID = _code(2, 3)
    CHANGED = _code(2, 4)
    CONTENT = _code(2, 5)
    CONTINUE = _code(2, 31)

    BAD_REQUEST = _code(4, 0)
    UNAUTHORIZED = _code(4, 1)
    BAD_OPTION = _code(4, 2)
    FORBIDDEN = _code(4, 3)
    NOT_FOUND = _code(4, 4)
    METHOD_NOT_ALLOWED = _code(4, 5)
    NOT_ACCEPTABLE = _code(4, 6)
    REQUEST_ENTITY_INCOMPLETE = _code(4, 8)
    CONFLICT = _code(4, 9)
    PRECONDITION_FAILED = _code(4, 12)
    REQUEST_ENTITY_TOO_LARGE = _code(4, 13)
    UNSUPPORTED_CONTENT_FORMAT = _code(4, 15)
    UNPROCESSABLE_ENTITY = _code(4, 22)
    TOO_MANY_REQUESTS = _code(4, 29)

    INTERNAL_SERVER_ERROR = _code(5, 0)
    NOT_IMPLEMENTED = _code(5, 1)
    BAD_GATEWAY = _code(5, 2)
    SERVICE_UNAVAILABLE = _code(5, 3)
    GATEWAY_TIMEOUT = _code(5, 4)
    PROXYING_NOT_SUPPORTED = _code(5, 5)

    @property
    def is_request(self) -> bool:
        return 1 <= self.value < 32

    @property
    def is_response(self) -> bool:
        return 64 <= self.value < 192

    @property
    def is_success(self) -> bool:
        return 64 <= self.value < 96

    def dotted(self) -> str:
        return dotted(self.value)

    def __str__(self) -> str:
        return self.dotted() if self.value >= 64 else self.name


def dotted(code: int) -> str:
    """``0x84`` -> ``"4.04"``; works for codes that have no enum member."""
    return f"{code >> 5}.{code & 0x1F:02d}"


METHODS = frozenset({Code.GET, Code.POST, Code.PUT, Code.DELETE, Code.FETCH, Code.PATCH, Code.IPATCH})


class OptionNumber(enum.IntEnum):
    IF_MATCH = 1
    URI_HOST = 3
    ETAG = 4
    IF_NONE_MATCH = 5
    OBSERVE = 6
    URI_PORT = 7
    LOCATION_PATH = 8
    OSCORE = 9
    URI_PATH = 11
    CONTENT_FORMAT = 12
    MAX_AGE = 14
    URI_QUERY = 15
    HOP_LIMIT = 16
    ACCEPT = 17
    LOCATION_QUERY = 20
    BLOCK2 = 23
    BLOCK1 = 27
    SIZE2 = 28
    PROXY_URI = 35
    PROXY_SCHEME = 39
    SIZE1 = 60
    NO_RESPONSE = 258

    @property
    def is_critical(self) -> bool:
        return is_critical(self.value)


def is_critical(option_number: int) -> bool:
    """RFC 7252 §5.4.6: odd option numbers are critical."""
    return bool(option_number & 1)


class ContentFormat(enum.IntEnum):
    TEXT_PLAIN = 0
    LINK_FORMAT = 40
    OCTET_STREAM = 42
    JSON = 50
    CBOR = 60
