"""The request and response values that resources see.

The CoAP layer turns each reassembled, deduplicated request into a `Request`
and turns whatever a resource returns (a `Response`) back into one or more
datagrams.  Resources never touch txThings' ``Message`` or raw options.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple
from urllib.parse import unquote

from comatrix.coap.numbers import Code, ContentFormat, MessageType, OptionNumber


@dataclasses.dataclass(frozen=True)
class Security:
    """How a request was protected on its way in; a plain CoAP request has none.

    ``scheme`` names the protection (``"dtls"``, ``"oscore"``); ``identity`` is what
    the peer proved it holds: a DTLS PSK identity, an OSCORE recipient id in hex,
    an EDHOC credential id.  The CoAP layer only carries it; `comatrix.identity`
    turns it into the device that asks.
    """

    scheme: str
    identity: str


class Peer(NamedTuple):
    """A UDP peer.  ``host`` keeps an IPv6 zone id (``fe80::1%lowpan0``)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Request:
    """One complete CoAP request (Block1 already reassembled)."""

    method: Code
    path: tuple[str, ...]
    payload: bytes = b""
    query: tuple[str, ...] = ()
    content_format: int | None = None
    accept: int | None = None
    observe: int | None = None
    token: bytes = b""
    peer: Peer = Peer("::1", 0)
    message_type: MessageType = MessageType.CON
    #: Every option of the request by number, raw values in order of appearance.
    options: Mapping[int, tuple[bytes, ...]] = dataclasses.field(default_factory=dict)
    #: The security context the request came through (None: plain, unprotected CoAP).
    security: Security | None = None

    def option(self, number: int) -> bytes | None:
        """The first value of option ``number``, or None when absent."""
        values = self.options.get(number)
        return values[0] if values else None

    def query_params(self) -> dict[str, str]:
        """Uri-Query as a dict (``room=!abc`` -> ``{"room": "!abc"}``); last value wins."""
        params: dict[str, str] = {}
        for item in self.query:
            key, _, value = item.partition("=")
            params[unquote(key)] = unquote(value)
        return params

    @property
    def if_match(self) -> tuple[bytes, ...]:
        """If-Match values (RFC 7252 §5.10.8.1): ETags, an empty one meaning "any representation"."""
        return tuple(self.options.get(OptionNumber.IF_MATCH, ()))

    @property
    def if_none_match(self) -> bool:
        """If-None-Match (RFC 7252 §5.10.8.2): act only if the target has no representation yet."""
        return OptionNumber.IF_NONE_MATCH in self.options

    @property
    def conditional(self) -> bool:
        return OptionNumber.IF_MATCH in self.options or OptionNumber.IF_NONE_MATCH in self.options

    def preconditions_hold(self, current_etag: bytes | None) -> bool:
        """Whether If-Match/If-None-Match let this request act on the target.

        ``current_etag``: the ETag of the target's current representation, None when
        it has none (it does not exist).  True when the request has neither option.
        """
        if self.if_none_match and current_etag is not None:
            return False
        if_match = self.if_match
        if if_match:
            return current_etag is not None and any(value in (b"", current_etag) for value in if_match)
        return True

    @property
    def proxy_uri(self) -> str | None:
        raw = self.option(OptionNumber.PROXY_URI)
        return raw.decode("utf-8", "replace") if raw is not None else None


@dataclasses.dataclass
class Response:
    """What a resource answers.  The payload must be bytes; a str is a bug caught here."""

    code: Code = Code.CONTENT
    payload: bytes = b""
    content_format: int | None = None
    max_age: int | None = None
    etag: bytes | None = None
    location_path: tuple[str, ...] = ()
    #: Location-Query items (``("id=7",)``), with Location-Path where a POST created something.
    location_query: tuple[str, ...] = ()
    #: Further options as (number, raw value) pairs, e.g. Size1 on 4.13.
    extra_options: tuple[tuple[int, bytes], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.payload, (bytes, bytearray)):
            raise TypeError(f"CoAP payload must be bytes, not {type(self.payload).__name__}")
        self.payload = bytes(self.payload)
        self.code = Code(self.code)

    @classmethod
    def text(cls, text: str, code: Code = Code.CONTENT) -> "Response":
        return cls(code=code, payload=text.encode("utf-8"), content_format=ContentFormat.TEXT_PLAIN)
