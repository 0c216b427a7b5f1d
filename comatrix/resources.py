"""The toolkit for writing resources: `ResourcePlugin` and the `MatrixResource` base class.

`MatrixResource` does, once for every resource, what plugins must not do by
hand: check the content-format, decode the CBOR body (integer MSC3079 keys are
accepted too), read the original CoMatrix Proxy-Uri (its host is ignored: only
the configured homeserver is ever called), find the room a request names, and
pick the access token.  `ResourcePlugin` turns a resource class into a plugin
object that ``twisted.plugin.getPlugins`` finds.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, TypeVar

from twisted.internet import defer
from twisted.plugin import IPlugin
from zope.interface import implementer

from comatrix.coap.errors import BadRequest, UnsupportedContentFormat
from comatrix.coap.message import Request, Response
from comatrix.coap.numbers import Code, ContentFormat, OptionNumber
from comatrix.coap.resource import CoapResource, LinkAttributes
from comatrix.codec import cbor
from comatrix.codec.msc3079 import MatrixPath, UnknownPath, keys_to_names, parse_matrix_path
from comatrix.credentials import address_scoped_txn_id
from comatrix.identity import acting_for
from comatrix.interfaces import IResourcePlugin, PluginContext
from comatrix.matrix.errors import MatrixError
from comatrix.policy import PLUGIN, check_registration

if TYPE_CHECKING:
    from comatrix.ratelimit import Admission

T = TypeVar("T")

#: Longest room id or alias accepted (Matrix limits identifiers to 255 bytes).
MAX_ROOM_REFERENCE = 255


@implementer(IPlugin, IResourcePlugin)
@dataclasses.dataclass(frozen=True)
class ResourcePlugin:
    """A plugin serving ``resource_class(context)`` at ``path``."""

    name: str
    path: tuple[str, ...]
    resource_class: Callable[[PluginContext], CoapResource]

    @property
    def link(self) -> LinkAttributes:
        return getattr(self.resource_class, "link", LinkAttributes())

    def build(self, context: PluginContext) -> CoapResource:
        return self.resource_class(context)


def _strict_utf8(raw: bytes | None) -> bool:
    try:
        (raw or b"").decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def cbor_response(value: Any, code: Code = Code.CONTENT) -> Response:
    return Response(code=code, payload=cbor.encode(value), content_format=ContentFormat.CBOR)


class MatrixResource(CoapResource):
    """Base class of resources that act on Matrix for a device."""

    #: MSC3079 path codes this resource accepts in a Proxy-Uri (empty: no Proxy-Uri allowed).
    proxy_codes: frozenset[str] = frozenset()
    #: What the resource does, by its name in `comatrix.policy.OPERATIONS`: it decides whether
    #: devices acting through shared credentials may use it, and whether it is registration.
    operation: str = PLUGIN
    #: Rate limits, set by the gateway (`comatrix.ratelimit.install`); None: unlimited.
    admission: "Admission | None" = None

    def __init__(self, context: PluginContext) -> None:
        super().__init__()
        self.context = context
        self.matrix = context.matrix
        if self.proxy_codes:  # the original CoMatrix form: `matrix_path` reads and checks the Proxy-Uri
            self.accepts_proxy_uri = True

    def render(self, request: Request) -> "defer.Deferred[Response]":
        try:
            check_registration(self.context.config.allow_registration, self.operation)
        except Exception:
            return defer.fail()
        # Observe registrations are exempt: the CoAP layer re-renders them for
        # notifications, which the gateway triggers, not the device.
        if self.admission is None or (request.observe == 0 and self.link.obs):
            with acting_for(request):
                return super().render(request)
        try:
            ticket = self.admission.check(request)
        except Exception:
            return defer.fail()
        # Everything the handler starts (homeserver calls included) acts for this device, and
        # its first homeserver call pays the global bucket (`comatrix.ratelimit.Ticket`).
        with acting_for(request), ticket.current():
            return super().render(request).addBoth(ticket.close)

    # -- request decoding -------------------------------------------------------------

    def body(self, request: Request) -> dict[str, Any]:
        """The CBOR map of the request (4.15 for another content-format, 4.00 if malformed)."""
        if request.content_format not in (None, ContentFormat.CBOR):
            raise UnsupportedContentFormat("expected application/cbor (60)")
        # A body without Content-Format is read as CBOR too: it is the only format we take.
        return keys_to_names(cbor.decode_map(request.payload))

    def matrix_path(self, request: Request) -> MatrixPath | None:
        """The endpoint named by the Proxy-Uri, if any; it must be one this resource serves."""
        proxy_uri = request.proxy_uri
        if proxy_uri is None:
            return None
        if "\ufffd" in proxy_uri and not _strict_utf8(request.option(OptionNumber.PROXY_URI)):
            raise BadRequest("Proxy-Uri not UTF-8")
        try:
            path = parse_matrix_path(proxy_uri)
        except UnknownPath as exc:
            raise BadRequest(f"Proxy-Uri: {exc}") from None
        if path.code not in self.proxy_codes:
            raise BadRequest("Proxy-Uri names another operation")
        return path

    def room_reference(self, request: Request, body: Mapping[str, Any] | None = None,
                       path: MatrixPath | None = None) -> str:
        """The room a request names: Proxy-Uri parameter, then body ``room_id``, then ``?room=``."""
        room: Any = None
        if path is not None:
            room = path.params.get("roomId") or path.params.get("roomIdOrAlias")
            if isinstance(room, str) and "\ufffd" in room:
                raise BadRequest("room not UTF-8")  # percent-encoded bytes that are not UTF-8
        if room is None and body is not None:
            for key in ("room_id", "room", "room_alias"):
                if body.get(key) is not None:
                    room = body[key]
                    break
        if room is None:
            room = request.query_params().get("room")
            if room is not None and "\ufffd" in room:
                raise BadRequest("room not UTF-8")  # percent-encoded bytes that are not UTF-8
            if room == "":  # most often an unencoded "#": URI clients drop it and what follows
                raise BadRequest("room is empty (encode # as %23)")
        if room is None:
            raise BadRequest("empty body: expected a CBOR map with room_id" if body == {} else "missing room_id")
        if not isinstance(room, str):
            raise BadRequest("room_id must be a text string")
        if not room:
            raise BadRequest("room_id is empty")
        if len(room.encode("utf-8")) > MAX_ROOM_REFERENCE:
            raise BadRequest("room_id too long")
        if room[0] not in "!#":
            raise BadRequest("room must be a room id (!) or alias (#)")
        return room

    # -- acting on Matrix ---------------------------------------------------------------

    @staticmethod
    def device_txn_id(request: Request, txn_id: str) -> str:
        """The Matrix txnId for an idempotency key the device chose (`address_scoped_txn_id`)."""
        return address_scoped_txn_id(request, txn_id)

    async def with_token(self, request: Request, call: Callable[[str], Awaitable[T]],
                         operation: str | None = None) -> T:
        """Run ``call(token)`` as ``operation`` (default `operation`, for resources whose methods
        differ); a gateway-held token the homeserver refused is renewed once."""
        credentials = self.context.credentials
        operation = operation or self.operation
        token = await credentials.token_for(request, operation=operation)
        try:
            return await call(token)
        except MatrixError as error:
            if error.http_status != 401 or not credentials.forget(request, token):
                raise
        return await call(await credentials.token_for(request, operation=operation))
