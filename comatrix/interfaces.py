"""The plugin contract: `IResourcePlugin`, and the `PluginContext` every plugin's factory receives.

Every CoAP resource CoMatrix serves, the built-in ones included, is a plugin:
a module-level object providing `IResourcePlugin`, found by
``twisted.plugin.getPlugins`` either in ``comatrix.plugins`` or in a drop-in
plugin directory.  A minimal third-party plugin::

    from zope.interface import implementer
    from twisted.plugin import IPlugin
    from comatrix.interfaces import IResourcePlugin
    from comatrix.coap import CoapResource, LinkAttributes, Response

    class Hello(CoapResource):
        link = LinkAttributes(rt="example.hello", ct=(0,), title="Hello")
        def render_GET(self, request):
            return Response.text("hello")

    @implementer(IPlugin, IResourcePlugin)
    class HelloPlugin:
        name = "hello"
        path = ("hello",)
        link = Hello.link
        def build(self, context):
            return Hello()

    plugin = HelloPlugin()
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from comatrix.appservice.stream import EventStream
    from comatrix.config import Config
    from comatrix.credentials import Credentials
    from comatrix.metrics import Metrics
    from comatrix.matrix.client import MatrixClient
    from comatrix.store import Store


class IResourcePlugin(Interface):
    """A CoAP resource the gateway serves."""

    name = Attribute("Unique short name (str); listed in `disabled_plugins` to turn the plugin off.")
    path = Attribute("Uri-Path segments (tuple of str) the resource is served at, e.g. ('send',).")
    link = Attribute("comatrix.coap.LinkAttributes: rt, ct, obs, title shown in /.well-known/core.")

    def build(context: "PluginContext") -> Any:
        """Return the resource (a comatrix.coap.CoapResource) for this gateway instance."""


class IMultiPathPlugin(IResourcePlugin):
    """A plugin that serves several paths, e.g. a whole protocol (MSC3079's path codes).

    ``path`` is its main path (listed in ``/.well-known/core``); ``paths`` lists
    every path it serves, ``path`` included, so clashes are found before anything
    is built; `build_routes` builds the resources.  Disabling the plugin by name
    removes all of its paths.
    """

    paths = Attribute("Every Uri-Path (tuple of str) this plugin serves, the main `path` included.")

    def build_routes(context: "PluginContext") -> Any:
        """Return an iterable of (path, resource) pairs, one for each of `paths`."""


@dataclasses.dataclass(frozen=True)
class PluginContext:
    """What a plugin may use: the config, the Matrix client, device credentials, state, the reactor."""

    config: "Config"
    matrix: "MatrixClient"
    credentials: "Credentials"
    #: Per-gateway scratch space shared by plugins (plugin name -> anything); persistent state comes later.
    state: dict[str, Any]
    reactor: Any
    #: The gateway's persistent state (SQLite under ``state_dir``); None in hand-built contexts.
    store: "Store | None" = None
    #: Application-service mode: the one stream of new events (``events.subscribe(listener)``
    #: calls ``listener(room_id, events)`` for every room with news); None in the other modes.
    events: "EventStream | None" = None
    #: The gateway's Prometheus metrics (`comatrix.metrics`): record webhook deliveries, requests of
    #: other faces...; None when ``[metrics] enabled`` is false, and everything must work without it.
    metrics: "Metrics | None" = None
