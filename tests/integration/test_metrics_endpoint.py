"""``/metrics`` of a real gateway against the real Synapse: the counters move with real CoAP requests.

The gateway runs with ``[metrics] enabled`` on a free loopback port; requests in
the clean, original (Proxy-Uri) and MSC3079 forms go out with libcoap and aiocoap;
the exposition is parsed with prometheus_client's own parser before and after.
"""

from __future__ import annotations

import secrets
import urllib.error
import urllib.request
from typing import Callable

import cbor2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import free_port
from support.coap_clients import aiocoap_request, libcoap
from support.gateway import GatewayProcess
from support.synapse import SynapseServer

pytestmark = pytest.mark.integration

CBOR = 60
TOKEN_OPTION = 256
PROXY_URI = 35

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        text = answer.read().decode("utf-8")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def request_count(samples: Samples, resource: str, form: str, code: str) -> float:
    key = ("comatrix_requests_total", (("code", code), ("form", form), ("resource", resource)))
    return samples.get(key, 0.0)


def test_metrics_count_requests_by_resource_form_and_code(
        make_gateway: Callable[..., GatewayProcess], synapse: SynapseServer, synapse_user) -> None:
    port = free_port("127.0.0.1")
    gateway = make_gateway(config_text=f"[metrics]\nenabled = true\nport = {port}\n")
    device = synapse_user("metrics")
    room_id = synapse.create_room(device.access_token)
    token = device.access_token
    before = scrape(port)  # the readiness probes (GET /time) are counted already

    clean = libcoap("post", gateway.uri("send"), content_format=CBOR, options=[(TOKEN_OPTION, token)],
                    payload=cbor2.dumps({"room_id": room_id, "txn_id": secrets.token_hex(4), "body": "clean"}))
    original = libcoap("put", gateway.uri("send"), content_format=CBOR, options=[
        (TOKEN_OPTION, token), (PROXY_URI, f"coap://h/9/{room_id}/m.room.message/{secrets.token_hex(4)}")],
        payload=cbor2.dumps({"msgtype": "m.text", "body": "original"}))
    msc3079 = aiocoap_request("PUT", gateway.uri(f"9/{room_id}/m.room.message/{secrets.token_hex(4)}"),
                              content_format=CBOR, options=[(TOKEN_OPTION, token)],
                              payload=cbor2.dumps({"msgtype": "m.text", "body": "msc3079"}))
    missing = libcoap("get", gateway.uri("no-such-resource"))
    assert (clean.code, original.code, msc3079.code, missing.code) == ("2.04", "2.04", "2.04", "4.04")
    bodies = {event["content"]["body"] for event in synapse.text_messages(token, room_id)}
    assert {"clean", "original", "msc3079"} <= bodies

    after = scrape(port)
    for resource, form, code in (("/send", "clean", "2.04"), ("/send", "original", "2.04"),
                                 ("/9", "msc3079", "2.04"), ("other", "clean", "4.04")):
        moved = request_count(after, resource, form, code) - request_count(before, resource, form, code)
        assert moved == 1.0, (resource, form, code)
    # No room id, token or raw path ever becomes a label value.
    labels = " ".join(value for (_, pairs) in after for _, value in pairs)
    assert room_id not in labels and token not in labels and "no-such-resource" not in labels
    device_side = sum(value for (name, _), value in after.items()
                      if name == "comatrix_request_duration_seconds_count")
    assert device_side >= sum(value for (name, _), value in after.items() if name == "comatrix_requests_total")
    homeserver = ("comatrix_homeserver_request_duration_seconds_count", (("outcome", "2xx"),))
    assert after[homeserver] - before.get(homeserver, 0.0) >= 3  # one PUT /send per message at least
    assert after[("comatrix_active_devices", ())] >= 1
    assert after[("comatrix_active_devices_limit", ())] == 4096
    assert after[("comatrix_upstream_queue_depth", ())] == 0
    assert after[("comatrix_upstream_queue_depth_limit", ())] == 256
    assert after[("comatrix_long_polls_limit", ())] >= 1
    assert after[("comatrix_observers_limit", ())] >= 1
    assert after[("comatrix_compact_sessions", ())] == 0  # counted once at start: no session yet

    # Only /metrics is served, and only on the configured loopback address.
    with pytest.raises(urllib.error.HTTPError) as other:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
    assert other.value.code == 404
    assert f"Prometheus metrics on http://127.0.0.1:{port}/metrics" in gateway.log_text()
