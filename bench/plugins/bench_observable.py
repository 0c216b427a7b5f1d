"""Benchmark-only drop-in plugin: ``GET /bench-observable``, an observable resource answered locally.

Used by ``bench/gateway_perf.py`` to hold many Observe registrations in a real
gateway process (``--plugin-dir bench/plugins``) and read its memory; the
built-in resources have nothing observable yet.  Not installed by the package.
"""

from __future__ import annotations

from comatrix.coap import ContentFormat, LinkAttributes, Request, Response
from comatrix.coap.resource import CoapResource
from comatrix.interfaces import PluginContext
from comatrix.resources import ResourcePlugin


class BenchObservable(CoapResource):
    link = LinkAttributes(rt="comatrix.bench.observable", ct=(ContentFormat.TEXT_PLAIN,), obs=True,
                          title="Benchmark observable")

    def __init__(self, context: PluginContext) -> None:
        super().__init__()

    def render_GET(self, request: Request) -> Response:
        return Response.text("0")


bench_observable = ResourcePlugin("bench-observable", ("bench-observable",), BenchObservable)
