"""The base class of every CoAP resource CoMatrix serves.

A resource subclasses `CoapResource`, sets its link-format attributes and
implements ``render_GET``/``render_POST``/... taking a `Request` and returning a
`Response` or a Deferred firing one.  Raising `CoapError` (or failing the
Deferred) is how a resource answers with an error; the CoAP layer guarantees the
peer gets exactly one response either way.  A request with Proxy-Uri or
Proxy-Scheme is answered 5.05 (RFC 7252 §5.7.2: this server is no forward
proxy) unless the resource sets ``accepts_proxy_uri`` and reads the option itself.

Conditional requests (If-Match, If-None-Match; RFC 7252 §5.10.8) are critical:
they reach only a resource that sets ``conditional_requests = True``, which
then calls `CoapResource.check_preconditions` with the ETag of its current
representation before acting (4.12 Precondition Failed when a condition fails);
every other resource has them refused 4.02 Bad Option before it runs.

When its representation changes, a resource calls `notify_observers` (even
without observers): observers get the new value, and representations kept for
block-wise downloads are dropped, so a peer continuing one gets blocks of the new
representation with its new ETag.  PUT, POST, DELETE, PATCH and iPATCH answered
with a 2.xx drop those of their URI too.  ``confirmable_notifications = True`` makes every
notification a CON (acknowledged); `notify_observers` can ask it for one change.

It subclasses txThings' ``CoAPResource`` so that it plugs into txThings' site
tree, but rendering goes through `render` below, never through txThings'
``render_*`` conventions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Awaitable, Callable, Protocol, Union

from twisted.internet import defer
from comatrix.coap._txthings import txresource

from comatrix.coap.errors import MethodNotAllowed, PreconditionFailed, ProxyingNotSupported
from comatrix.coap.message import Request, Response
from comatrix.coap.numbers import Code, OptionNumber

RenderResult = Union[Response, "defer.Deferred[Response]", Awaitable[Response]]


@dataclasses.dataclass(frozen=True)
class LinkAttributes:
    """RFC 6690 link attributes shown for a resource in ``/.well-known/core``.

    None leaves an attribute out; an empty ``rt`` (``rt=""``) is shown as such.
    """

    rt: str | None = None
    ct: tuple[int, ...] = ()
    title: str | None = None
    interface: str | None = None
    obs: bool = False
    sz: int | None = None


class ObserverNotifier(Protocol):
    """What serves a resource (a `comatrix.coap.server.Site`) and can notify its observers."""

    def notify(self, resource: "CoapResource", only: Callable[[Request], bool] | None = None, *,
               confirmable: bool = False) -> "defer.Deferred[int]": ...

    def observer_requests(self, resource: "CoapResource") -> list[Request]: ...


class CoapResource(txresource.CoAPResource):  # type: ignore[misc]
    """A resource: link attributes plus ``render_<METHOD>(request) -> Response``."""

    link: LinkAttributes = LinkAttributes()
    #: Whether this resource makes sense of Proxy-Uri/Proxy-Scheme (else: 5.05).
    accepts_proxy_uri: bool = False
    #: Whether this resource evaluates If-Match/If-None-Match (see `check_preconditions`; else: 4.02).
    conditional_requests: bool = False
    #: Whether notifications go out as CON (acknowledged, retransmitted) rather than NON.
    confirmable_notifications: bool = False
    #: Whether each Block1 block reaches the resource as it comes (it answers 2.31 Continue itself,
    #: and keeps the reassembly state, bounded) instead of the server reassembling the body
    #: within ``CoapSettings.max_body_size``: for bodies larger than that (media uploads).
    streams_block1: bool = False
    #: Set by ``Site.put``: the sites serving this resource (for `notify_observers`).
    _coap_sites: tuple[ObserverNotifier, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.visible = True

    @property
    def observable(self) -> bool:  # txThings reads this attribute
        return self.link.obs

    def allowed_methods(self) -> tuple[Code, ...]:
        return tuple(code for code in (Code.GET, Code.POST, Code.PUT, Code.DELETE, Code.FETCH,
                                       Code.PATCH, Code.IPATCH)
                     if getattr(self, f"render_{code.name}", None) is not None)

    def notify_observers(self, only: Callable[[Request], bool] | None = None, *,
                         confirmable: bool | None = None) -> "defer.Deferred[int]":
        """The state changed: every observer (or those whose request ``only`` accepts) is notified.

        ``confirmable`` (default: ``confirmable_notifications``) sends CON notifications.
        Fires with the number delivered (acknowledged, for CON); never fails.
        """
        if confirmable is None:
            confirmable = self.confirmable_notifications
        waits = [site.notify(self, only, confirmable=confirmable) for site in self._coap_sites]
        return defer.gatherResults(waits, consumeErrors=True).addCallback(sum)

    @property
    def served(self) -> bool:
        """Whether a site serves this resource (only then can it have observers)."""
        return bool(self._coap_sites)

    @staticmethod
    def check_preconditions(request: Request, current_etag: bytes | None) -> None:
        """Raise 4.12 Precondition Failed unless the request's If-Match/If-None-Match hold.

        ``current_etag``: the ETag of the current representation; None when there is none.
        """
        if not request.preconditions_hold(current_etag):
            raise PreconditionFailed("precondition failed")

    def observer_requests(self) -> list[Request]:
        """The registration requests of the current observers of this resource."""
        return [request for site in self._coap_sites for request in site.observer_requests(self)]

    def render(self, request: Request) -> "defer.Deferred[Response]":  # type: ignore[override]
        """Dispatch to ``render_<METHOD>``; always returns a Deferred (sync errors become failures)."""
        handler: Callable[[Request], Any] | None = getattr(self, f"render_{request.method.name}", None)
        if handler is None:
            return defer.fail(MethodNotAllowed(f"{request.method.name} not allowed"))
        if not self.accepts_proxy_uri and (request.option(OptionNumber.PROXY_URI) is not None
                                           or request.option(OptionNumber.PROXY_SCHEME) is not None):
            return defer.fail(ProxyingNotSupported("proxying not supported"))
        return defer.maybeDeferred(_as_deferred, handler, request)


def _as_deferred(handler: Callable[[Request], Any], request: Request) -> Any:
    result = handler(request)
    if isinstance(result, defer.Deferred):
        return result
    if hasattr(result, "__await__"):
        return defer.ensureDeferred(result)
    return result
