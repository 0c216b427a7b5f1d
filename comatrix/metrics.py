"""Prometheus metrics of one gateway: what an operator watches to see its health at a glance.

`Metrics` owns a `prometheus_client.CollectorRegistry` of its own (never the
process-wide default, so several gateways can live in one test process) and is
what other modules call, when metrics are on:

* `Metrics.request` -- one answered CoAP (or HTTP API) request: counted by
  resource, form and response code, its latency observed (the device side);
* `Metrics.homeserver_answer` -- one homeserver call of the Matrix transport
  (the homeserver side);
* `Metrics.webhook_delivered` / `webhook_retried` / `webhook_dead_lettered`;
* `Metrics.watch` -- a live gauge (and its limit) read at scrape time only: the
  tables themselves (rate-limit buckets, observers, long-polls, the upstream
  queue) are never touched on their hot paths.

Modules receive the `Metrics` object (``PluginContext.metrics``, None when
``[metrics] enabled`` is false) and must work without it.  Labels are bounded:
resources are the paths resources are served at (`Routes`), never raw request
paths with room ids in them; response codes and forms are small fixed sets.

`serve` puts ``GET /metrics`` on a twisted.web site in the gateway's reactor
(`prometheus_client.twisted.MetricsResource`: the text is generated in the
reactor's thread pool, so a scrape never blocks the CoAP server).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from comatrix.codec.msc3079 import PATH_CODES
from comatrix.compact.codec import PATHS as COMPACT_PATHS

__all__ = ["Metrics", "Routes", "request_form", "serve", "FORMS"]

#: The request forms, as the ``form`` label spells them.
FORMS = ("original", "clean", "compact", "msc3079", "http_api")

_COMPACT_SEGMENTS = frozenset(COMPACT_PATHS.values())
_MSC3079_SEGMENTS = frozenset(PATH_CODES) | {"_matrix"}

#: Latency buckets, seconds: sub-millisecond local answers up to long-polls.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: The ``resource`` label of a request no resource serves (its path is not a label value).
UNROUTED = "other"


def request_form(path: tuple[str, ...], proxy_uri: bool) -> str:
    """Which of the device-facing forms a CoAP request uses (`FORMS`, all but ``http_api``).

    A Proxy-Uri is the original CoMatrix form; one-character compact paths are the
    compact profile; MSC3079 path codes and ``/_matrix/...`` are MSC3079; anything
    else (``/rooms/...``, ``/time``...) is the clean form.  The two one-character
    alphabets do not overlap (`comatrix.plugins.msc3079`).
    """
    if proxy_uri:
        return "original"
    first = path[0] if path else ""
    if first in _COMPACT_SEGMENTS:
        return "compact"
    if first in _MSC3079_SEGMENTS:
        return "msc3079"
    return "clean"


class Routes:
    """Request path -> the path its resource is served at (the ``resource`` label).

    Mirrors `comatrix.coap.server.Site.resolve`: an exact path, else the longest
    subtree prefix; anything else is `UNROUTED`.
    """

    def __init__(self, routes: Iterable[tuple[tuple[str, ...], Any]]) -> None:
        self._exact: dict[tuple[str, ...], str] = {}
        self._subtrees: set[tuple[str, ...]] = set()
        for path, resource in routes:
            self._exact[tuple(path)] = "/" + "/".join(path)
            if getattr(resource, "subtree", False):
                self._subtrees.add(tuple(path))
        self._exact.setdefault((".well-known", "core"), "/.well-known/core")

    def template(self, path: tuple[str, ...]) -> str:
        found = self._exact.get(path)
        if found is not None:
            return found
        for length in range(len(path) - 1, 0, -1):
            if path[:length] in self._subtrees:
                return self._exact[path[:length]]
        return UNROUTED


@dataclasses.dataclass(frozen=True)
class LiveGauge:
    """A gauge read at scrape time, with the limit it runs against (None: no limit)."""

    name: str
    documentation: str
    value: Callable[[], float]
    limit: Callable[[], float] | None = None


class LiveGauges(Collector):
    """Collects every `LiveGauge` when scraped (``<name>`` and ``<name>_limit``).

    A source that fails is left out of that scrape, never the whole answer.
    """

    def __init__(self) -> None:
        self._gauges: list[LiveGauge] = []

    def add(self, gauge: LiveGauge) -> None:
        self._gauges.append(gauge)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for gauge in list(self._gauges):
            try:
                value = float(gauge.value())
                limit = float(gauge.limit()) if gauge.limit is not None else None
            except Exception:
                continue
            yield GaugeMetricFamily(gauge.name, gauge.documentation, value=value)
            if limit is not None:
                yield GaugeMetricFamily(gauge.name + "_limit", f"The limit of {gauge.name}.", value=limit)


def homeserver_outcome(result: Any) -> str:
    """A homeserver call's outcome label: ``2xx``/``4xx``/``5xx`` by HTTP status, else what failed."""
    from twisted.python.failure import Failure

    if not isinstance(result, Failure):
        return "2xx"
    status = getattr(result.value, "http_status", None)
    if isinstance(status, int):
        return f"{status // 100}xx"
    name = type(result.value).__name__
    return {"HomeserverTimeout": "timeout", "HomeserverUnreachable": "unreachable",
            "CancelledError": "cancelled"}.get(name, "error")


class Metrics:
    """The metrics of one gateway, in a registry of its own (module docstring)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("comatrix_requests", "Requests answered, by resource, form and response code.",
                                ("resource", "form", "code"), registry=registry)
        self.request_seconds = Histogram(
            "comatrix_request_duration_seconds",
            "Device side: from a request's arrival to its response being sent, by form.",
            ("form",), buckets=LATENCY_BUCKETS, registry=registry)
        self.homeserver_seconds = Histogram(
            "comatrix_homeserver_request_duration_seconds",
            "Homeserver side: one call of the gateway's Matrix transport (long-polls excluded), by outcome.",
            ("outcome",), buckets=LATENCY_BUCKETS, registry=registry)
        self.too_many_requests = Counter("comatrix_too_many_requests_responses",
                                         "4.29 Too Many Requests responses, by form.", ("form",), registry=registry)
        self.server_errors = Counter("comatrix_server_error_responses",
                                     "5.0x responses, by code.", ("code",), registry=registry)
        self.webhook_deliveries = Counter("comatrix_webhook_deliveries",
                                          "Webhook events delivered (receiver answered 2xx).", registry=registry)
        self.webhook_retries = Counter("comatrix_webhook_retries",
                                       "Webhook delivery attempts that failed and are tried again.",
                                       registry=registry)
        self.webhook_dead_letters = Counter("comatrix_webhook_dead_letters",
                                            "Webhook events given up after the last retry (dead-letter log).",
                                            registry=registry)
        self.live = LiveGauges()
        registry.register(self.live)
        self.routes = Routes(())

    def request(self, resource: str, form: str, code: str, seconds: float) -> None:
        """One answered request; ``code`` dotted for CoAP ("2.05"), the HTTP status for the HTTP API."""
        self.requests.labels(resource, form, code).inc()
        self.request_seconds.labels(form).observe(seconds)
        if code in ("4.29", "429"):
            self.too_many_requests.labels(form).inc()
        elif code[:1] == "5":  # CoAP 5.0x, HTTP 5xx
            self.server_errors.labels(code).inc()

    def coap_request(self, request: Any, response: Any, elapsed_ms: float) -> None:
        """`request` for a CoAP exchange (the CoAP server's ``on_response`` hook)."""
        path = tuple(request.path)
        self.request(self.routes.template(path), request_form(path, request.proxy_uri is not None),
                     response.code.dotted(), elapsed_ms / 1000.0)

    def homeserver_answer(self, seconds: float, result: Any) -> None:
        """One homeserver call ended after ``seconds`` with ``result`` (an answer or a Failure)."""
        self.homeserver_seconds.labels(homeserver_outcome(result)).observe(seconds)

    def webhook_delivered(self) -> None:
        self.webhook_deliveries.inc()

    def webhook_retried(self) -> None:
        self.webhook_retries.inc()

    def webhook_dead_lettered(self) -> None:
        self.webhook_dead_letters.inc()

    def watch(self, name: str, documentation: str, value: Callable[[], float],
              limit: Callable[[], float] | None = None) -> None:
        """Export ``value()`` as gauge ``name`` (and ``limit()`` as ``name_limit``), read at scrape time."""
        self.live.add(LiveGauge(name, documentation, value, limit))


def serve(metrics: Metrics, bind: str, port: int, reactor: Any) -> Any:
    """Listen on ``bind``:``port`` (TCP) with ``GET /metrics``; returns the listening port."""
    from prometheus_client.twisted import MetricsResource
    from twisted.web import resource, server

    class QuietSite(server.Site):
        def log(self, request: Any) -> None:
            pass  # no log line per scrape

    root = resource.Resource()
    root.putChild(b"metrics", MetricsResource(registry=metrics.registry))
    return reactor.listenTCP(port, QuietSite(root), interface=bind)


#: Seconds between two counts of the compact sessions (a query of the store, never on the hot path).
SESSION_COUNT_SECONDS = 15.0


class SessionCount:
    """The store's count of open compact sessions, refreshed every `SESSION_COUNT_SECONDS` (-1: not yet)."""

    def __init__(self, store: Any, reactor: Any) -> None:
        from twisted.internet import task

        self.store = store
        self.value = -1
        self._loop = task.LoopingCall(self.refresh)
        self._loop.clock = reactor

    def refresh(self) -> Any:
        from twisted.internet import defer

        def keep(count: int) -> None:
            self.value = count

        d = defer.ensureDeferred(self.store.session_count()).addCallback(keep)
        return d.addErrback(lambda failure: None)  # kept as it was; tried again at the next tick

    def start(self) -> None:
        self._loop.start(SESSION_COUNT_SECONDS, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()


def instrument(metrics: Metrics, *, config: Any, site: Any, admission: Any, limiter: Any, transport: Any,
               servers: Callable[[], list[Any]], long_polls: Any, store: Any, reactor: Any) -> None:
    """Wire ``metrics`` to the gateway's parts: resource paths, the transport's hook, the live gauges."""
    limits = config.limits
    metrics.routes = Routes(site.resources())
    transport.on_answer = metrics.homeserver_answer
    metrics.watch("comatrix_active_devices", "Devices with a rate-limit bucket (recently active).",
                  admission.tracked_devices, lambda: limits.max_devices)
    metrics.watch("comatrix_observers", "CoAP observations registered (every listener).",
                  lambda: sum(server.observer_count() for server in servers()),
                  lambda: config.coap.max_observers * len(servers()))
    metrics.watch("comatrix_long_polls", "Long-polls to the homeserver in use (MSC3079 /sync, Observe, "
                  "compact watches).", lambda: long_polls.quota.in_use, lambda: long_polls.quota.total)
    metrics.watch("comatrix_upstream_active", "Homeserver calls in flight.",
                  lambda: limiter.active, lambda: limiter.max_active)
    metrics.watch("comatrix_upstream_queue_depth", "Homeserver calls waiting for a slot.",
                  lambda: limiter.queued, lambda: limiter.max_queue)
    sessions = SessionCount(store, reactor)
    metrics.watch("comatrix_compact_sessions", f"Open compact sessions (counted every "
                  f"{SESSION_COUNT_SECONDS:g} s; -1 before the first count).",
                  lambda: sessions.value, lambda: limits.max_sessions)
    trigger = getattr(reactor, "addSystemEventTrigger", None)
    if trigger is not None:  # counted while the reactor runs (a test clock has no triggers: no count)
        trigger("after", "startup", sessions.start)
        trigger("before", "shutdown", sessions.stop)
