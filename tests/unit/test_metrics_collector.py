"""`Metrics` on real gateway parts (Site, CoAP server, limits, transport on a FakeHomeserver):
what the text exposition says after a known sequence of requests, parsed by prometheus_client."""

from __future__ import annotations

from typing import Any

import cbor2
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet import task

from comatrix.coap.numbers import Code, ContentFormat, OptionNumber
from comatrix.coap.server import CoapSettings, Site
from comatrix.coap.testing import Harness
from comatrix.config import LimitSettings, build_config
from comatrix.credentials import Credentials
from comatrix.errors import error_response
from comatrix.interfaces import PluginContext
from comatrix.longpoll import LongPollQuota
from comatrix.matrix.client import MatrixClient
from comatrix.matrix.testing import FakeHomeserver
from comatrix.metrics import Metrics, SessionCount, instrument
from comatrix.plugins import clock as clock_plugin, rooms
from comatrix.ratelimit import Admission, LimitedTransport, UpstreamLimiter, install


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, keyed by name and sorted labels."""
    text = generate_latest(metrics.registry).decode("utf-8")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


class _Store:
    def __init__(self, count: int) -> None:
        self.count = count

    async def session_count(self) -> int:
        return self.count


def gateway(metrics: Metrics, limits: LimitSettings) -> tuple[Harness, FakeHomeserver, str, str, Any]:
    clock = task.Clock()
    homeserver = FakeHomeserver()
    user_id = homeserver.add_user("d", "pw")
    token, _ = homeserver.issue_token(user_id)
    room = homeserver.new_room(user_id)
    limiter = UpstreamLimiter(limits.max_upstream, limits.upstream_queue, limits.queue_timeout, clock)
    transport = LimitedTransport("https://hs.test.local", reactor=clock, limiter=limiter,
                                 http_client=StubTreq(homeserver))
    matrix = MatrixClient(transport, reactor=clock)
    config = build_config({"limits": {"device_rate": limits.device_rate, "device_burst": limits.device_burst,
                                      "global_rate": 0}})
    context = PluginContext(config=config, matrix=matrix, credentials=Credentials((), matrix), state={},
                            reactor=clock, metrics=metrics)
    site = Site(error_response)
    site.put(("send",), rooms.send.build(context))
    site.put(("time",), clock_plugin.time.build(context))
    admission = Admission(config.limits, clock)
    install(site, admission)
    harness = Harness(site, CoapSettings(discovery_burst=100), on_response=metrics.coap_request)
    instrument(metrics, config=config, site=site, admission=admission, limiter=limiter, transport=transport,
               servers=lambda: [harness.server], long_polls=type("Poller", (), {"quota": LongPollQuota(2, 5)}),
               store=_Store(3), reactor=clock)
    return harness, homeserver, token, room, limiter


def test_requests_latencies_refusals_and_gauges_are_exposed() -> None:
    metrics = Metrics()
    harness, homeserver, token, room, limiter = gateway(metrics, LimitSettings(device_rate=0.5, device_burst=2))
    for n in range(3):  # two sent, the third over the device's burst: 4.29
        body = cbor2.dumps({"room_id": room, "txn_id": f"t{n}", "body": f"m{n}"})
        harness.send(Code.POST, ("send",), payload=body,
                     options=[(OptionNumber.CONTENT_FORMAT, bytes([ContentFormat.CBOR])), (256, token.encode())])
    harness.send(Code.GET, ("time",))
    harness.send(Code.GET, ("rooms", room, "nowhere"))  # 4.04: no resource, no room id in a label
    found = samples(metrics)
    requests = {labels: value for (name, labels), value in found.items() if name == "comatrix_requests_total"}
    assert requests == {
        (("code", "2.04"), ("form", "clean"), ("resource", "/send")): 2.0,
        (("code", "4.29"), ("form", "clean"), ("resource", "/send")): 1.0,
        (("code", "2.05"), ("form", "clean"), ("resource", "/time")): 1.0,
        (("code", "4.04"), ("form", "clean"), ("resource", "other")): 1.0,
    }
    assert found[("comatrix_too_many_requests_responses_total", (("form", "clean"),))] == 1.0
    assert found[("comatrix_request_duration_seconds_count", (("form", "clean"),))] == 5.0
    # Two sends reached the homeserver, each one call answered 2xx.
    assert found[("comatrix_homeserver_request_duration_seconds_count", (("outcome", "2xx"),))] == 2.0
    assert len(homeserver.calls("rooms")) == 2
    assert found[("comatrix_active_devices", ())] == 1.0
    assert found[("comatrix_active_devices_limit", ())] == 4096.0
    assert found[("comatrix_upstream_queue_depth", ())] == 0.0
    assert found[("comatrix_upstream_queue_depth_limit", ())] == float(limiter.max_queue)
    assert found[("comatrix_upstream_active_limit", ())] == float(limiter.max_active)
    assert found[("comatrix_observers", ())] == 0.0
    assert found[("comatrix_observers_limit", ())] == float(CoapSettings().max_observers)
    assert (found[("comatrix_long_polls", ())], found[("comatrix_long_polls_limit", ())]) == (0.0, 5.0)
    assert found[("comatrix_compact_sessions", ())] == -1.0  # not counted yet (no reactor running)


def test_webhook_counters_and_5_0x_move_through_the_api() -> None:
    metrics = Metrics()
    metrics.webhook_delivered()
    metrics.webhook_retried()
    metrics.webhook_retried()
    metrics.webhook_dead_lettered()
    metrics.request("/internal/matrix/send", "http_api", "200", 0.01)
    metrics.request("/9", "msc3079", "5.04", 10.0)
    found = samples(metrics)
    assert found[("comatrix_webhook_deliveries_total", ())] == 1.0
    assert found[("comatrix_webhook_retries_total", ())] == 2.0
    assert found[("comatrix_webhook_dead_letters_total", ())] == 1.0
    assert found[("comatrix_server_error_responses_total", (("code", "5.04"),))] == 1.0
    assert found[("comatrix_requests_total", (("code", "200"), ("form", "http_api"),
                                               ("resource", "/internal/matrix/send")))] == 1.0


def test_a_failing_gauge_source_is_left_out_and_registries_are_separate() -> None:
    first, second = Metrics(), Metrics()

    def broken() -> float:
        raise RuntimeError("table gone")

    first.watch("comatrix_broken", "never shown", broken)
    first.watch("comatrix_fine", "shown", lambda: 7, lambda: 9)
    found = samples(first)
    assert found[("comatrix_fine", ())] == 7.0 and found[("comatrix_fine_limit", ())] == 9.0
    assert not any(name.startswith("comatrix_broken") for name, _ in found)
    assert not any(name == "comatrix_fine" for name, _ in samples(second))


def test_the_session_count_is_refreshed_from_the_store() -> None:
    store = _Store(3)
    clock = task.Clock()
    count = SessionCount(store, clock)
    count.start()
    assert count.value == 3
    store.count = 5
    clock.advance(15)
    assert count.value == 5
    count.stop()
