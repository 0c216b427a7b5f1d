"""Native MSC3079 (Low Bandwidth CS API): one plugin serving ``/_matrix/...`` and every path code.

It is a multi-path plugin (`comatrix.interfaces.IMultiPathPlugin`) named
``msc3079``: disabling that one name removes the whole endpoint.  Its routes
share one `comatrix.msc3079.service.Msc3079Service` (sticky peers, /sync loops):

* ``/_matrix`` -- the subtree of full ``/_matrix/client/...`` paths;
* ``/7`` and the full /sync paths -- long-poll and Observe;
* ``/<code>`` -- the subtree of each other path code (``/9/<room>/<type>/<txn>``...).

Path codes are single characters, as are the paths of the compact device
profile (``comatrix.compact.codec.PATHS``); the two alphabets do not overlap,
and a code the compact profile took would only be reachable by full path.  Only
``/_matrix``, ``/0`` and ``/7`` are listed in ``/.well-known/core``; the other
codes would only lengthen it.
"""

from __future__ import annotations

from typing import Iterable

from twisted.plugin import IPlugin
from zope.interface import implementer

from comatrix.coap.resource import CoapResource, LinkAttributes
from comatrix.codec.msc3079 import PATH_CODES
from comatrix.compact.codec import PATHS as COMPACT_PATHS
from comatrix.interfaces import IMultiPathPlugin, PluginContext
from comatrix.msc3079.service import Msc3079Resource, Msc3079Service, SyncResource

Path = tuple[str, ...]

_LISTED = frozenset({("_matrix",), ("0",), ("7",)})
#: Path codes served in short form: all but any the compact profile uses.
SHORT_CODES = tuple(code for code in PATH_CODES if code not in set(COMPACT_PATHS.values()))
SYNC_PATHS: tuple[Path, ...] = tuple(
    [("7",)] if "7" in SHORT_CODES else []) + (("_matrix", "client", "r0", "sync"),
                                               ("_matrix", "client", "v3", "sync"))
PASS_THROUGH_PATHS: tuple[Path, ...] = (("_matrix",),) + tuple((code,) for code in SHORT_CODES if code != "7")


@implementer(IPlugin, IMultiPathPlugin)
class Msc3079Plugin:
    name = "msc3079"
    path: Path = ("_matrix",)
    paths: tuple[Path, ...] = PASS_THROUGH_PATHS + SYNC_PATHS
    link: LinkAttributes = Msc3079Resource.link

    def build(self, context: PluginContext) -> CoapResource:
        """The main resource alone (``/_matrix``); the gateway uses `build_routes`."""
        return dict(self.build_routes(context))[self.path]

    def build_routes(self, context: PluginContext) -> Iterable[tuple[Path, CoapResource]]:
        service = Msc3079Service.of(context)
        routes: list[tuple[Path, CoapResource]] = []
        for path in PASS_THROUGH_PATHS:
            routes.append((path, Msc3079Resource(context, service, visible=path in _LISTED)))
        for path in SYNC_PATHS:
            routes.append((path, SyncResource(context, service, visible=path in _LISTED)))
        return routes


msc3079 = Msc3079Plugin()
