"""Record a real gateway's ``/metrics`` under test traffic, and draw the dashboard's panels from it.

The picture in the README (``docs/metrics-dashboard.png``) is made with this
script; it is not a Grafana screenshot, but the same panels drawn with
matplotlib from values scraped from a real gateway (the test Synapse, the
test helpers of ``tests/support``, real libcoap requests)::

    .venv/bin/python contrib/grafana/snapshot.py record /tmp/scrapes.json   # ~2 minutes
    python3 contrib/grafana/snapshot.py draw /tmp/scrapes.json docs/metrics-dashboard.png

``record`` needs the checkout's ``.venv`` and ``.venv-synapse`` (``scripts/setup``);
``draw`` needs matplotlib (Debian: python3-matplotlib) and nothing else.
"""

from __future__ import annotations

import json
import random
import secrets
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEVICES = [f"127.0.0.{n}" for n in range(2, 8)]  # distinct source addresses stand in for devices
SCRAPE_SECONDS = 2.0


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode("utf-8")
    return [(s.name, dict(s.labels), s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def record(output: Path, seconds: float = 120.0) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import cbor2
    from support import free_port
    from support.coap_clients import CoapNoResponse, libcoap
    from support.gateway import GatewayProcess
    from support.synapse import SynapseServer

    work = Path(tempfile.mkdtemp(prefix="comatrix-snapshot-"))
    synapse = SynapseServer(work / "synapse")
    synapse.start()
    port = free_port("127.0.0.1")
    gateway = GatewayProcess(synapse.base_url, work / "gw", log_level="info", config_text=(
        f"[metrics]\nenabled = true\nport = {port}\n[limits]\ndevice_rate = 2\ndevice_burst = 4\n"))
    gateway.start()
    user, password = "snap" + secrets.token_hex(3), secrets.token_urlsafe(12)
    _user_id, token, _device = synapse.register(user, password)
    room = synapse.create_room(token)
    scrapes: list[dict[str, Any]] = []
    stop = threading.Event()

    def observer(address: str) -> None:
        while not stop.is_set():  # an MSC3079 /sync observation: an observer and a long-poll
            try:
                libcoap("get", gateway.uri("7"), options=[(256, token)], observe_seconds=20,
                        extra_args=["-a", address])
            except CoapNoResponse:
                pass

    def send(address: str, n: int) -> None:
        body = f"reading {n}"
        form = random.choice(("clean", "original", "msc3079"))
        txn = secrets.token_hex(4)
        if form == "clean":
            libcoap("post", gateway.uri("send"), content_format=60, options=[(256, token)], extra_args=["-a", address],
                    payload=cbor2.dumps({"room_id": room, "txn_id": txn, "body": body}))
        elif form == "original":
            libcoap("put", gateway.uri("send"), content_format=60, extra_args=["-a", address],
                    options=[(256, token), (35, f"coap://h/9/{room}/m.room.message/{txn}")],
                    payload=cbor2.dumps({"msgtype": "m.text", "body": body}))
        else:
            libcoap("put", gateway.uri(f"9/{room}/m.room.message/{txn}"), content_format=60,
                    options=[(256, token)], extra_args=["-a", address],
                    payload=cbor2.dumps({"msgtype": "m.text", "body": body}))

    def attempt(address: str, n: int) -> None:
        try:
            send(address, n)
        except CoapNoResponse:
            pass

    watchers = [threading.Thread(target=observer, args=(address,), daemon=True) for address in DEVICES[:3]]
    for thread in watchers:
        thread.start()
    started = time.monotonic()
    n = 0
    try:
        while time.monotonic() - started < seconds:
            elapsed = time.monotonic() - started
            if 60 <= elapsed < 80:  # one device sends 8 at once, beyond its burst of 4: 4.29s
                flood = [threading.Thread(target=attempt, args=(DEVICES[0], n + i)) for i in range(8)]
                for thread in flood:
                    thread.start()
                for thread in flood:
                    thread.join()
                n += 8
            for address in DEVICES:
                n += 1
                attempt(address, n)
            libcoap("get", gateway.uri("time"))
            scrapes.append({"t": round(time.monotonic() - started, 2), "samples": scrape(port)})
            time.sleep(max(0.0, SCRAPE_SECONDS - (time.monotonic() - started - scrapes[-1]["t"])))
    finally:
        stop.set()
        gateway.stop()
        synapse.stop()
    output.write_text(json.dumps(scrapes))
    print(f"{len(scrapes)} scrapes written to {output}")


# -- drawing ------------------------------------------------------------------------------------


def _value(samples: list[Any], name: str, **labels: str) -> float:
    return sum(v for n, l, v in samples if n == name and all(l.get(k) == x for k, x in labels.items()))


def _by(samples: list[Any], name: str, label: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for n, l, v in samples:
        if n == name:
            found[l[label]] = found.get(l[label], 0.0) + v
    return found


def _rates(scrapes: list[Any], name: str, label: str) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    for before, after in zip(scrapes, scrapes[1:]):
        span = after["t"] - before["t"]
        old = _by(before["samples"], name, label)
        for key, value in _by(after["samples"], name, label).items():
            series.setdefault(key, []).append((after["t"], (value - old.get(key, 0.0)) / span))
    return series


def _quantile(scrapes: list[Any], name: str, q: float, window: int = 5) -> list[tuple[float, float]]:
    """histogram_quantile over ``window`` scrapes, as PromQL interpolates within a bucket."""
    points = []
    for before, after in zip(scrapes, scrapes[window:]):
        def buckets(samples: list[Any]) -> dict[float, float]:
            found: dict[float, float] = {}
            for n, l, v in samples:
                if n == name + "_bucket":
                    found[float(l["le"])] = found.get(float(l["le"]), 0.0) + v
            return found
        old, new = buckets(before["samples"]), buckets(after["samples"])
        counts = sorted((le, new[le] - old.get(le, 0.0)) for le in new)
        total = counts[-1][1] if counts else 0.0
        if total <= 0:
            continue
        rank, lower, below = q * total, 0.0, 0.0
        for le, count in counts:
            if count >= rank:
                upper = le if le != float("inf") else lower
                share = (rank - below) / (count - below) if count > below else 1.0
                points.append((after["t"], lower + (upper - lower) * share))
                break
            lower, below = le, count
    return points


def draw(source: Path, output: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scrapes = json.loads(source.read_text())
    figure, axes = plt.subplots(3, 3, figsize=(15, 10))
    figure.suptitle("CoMatrix gateway: the contrib/grafana/comatrix.json panels, drawn from a real test run's "
                    "/metrics scrapes (not a Grafana screenshot)", fontsize=11)

    end = scrapes[-1]["t"]

    def series(ax: Any, data: dict[str, list[tuple[float, float]]], title: str, unit: str,
               zeros: bool = False) -> None:
        for key, points in sorted(data.items()):
            if zeros or any(v for _, v in points):
                ax.plot([t for t, _ in points], [v for _, v in points], label=key)
        ax.set_xlim(0, end)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit, fontsize=8)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)

    series(axes[0][0], _rates(scrapes, "comatrix_requests_total", "form"), "Requests by form", "req/s")
    series(axes[0][1], _rates(scrapes, "comatrix_requests_total", "code"), "Responses by code", "req/s")
    series(axes[0][2], _rates(scrapes, "comatrix_requests_total", "resource"), "Requests by resource", "req/s")
    series(axes[1][0], {f"p{int(q * 100)}": _quantile(scrapes, "comatrix_request_duration_seconds", q)
                        for q in (0.5, 0.95, 0.99)}, "Device-side latency", "s")
    series(axes[1][1], {f"p{int(q * 100)}": _quantile(scrapes, "comatrix_homeserver_request_duration_seconds", q)
                        for q in (0.5, 0.95, 0.99)}, "Homeserver-side latency", "s")
    refusals = _rates(scrapes, "comatrix_too_many_requests_responses_total", "form")
    refusals = {f"4.29 {k}": v for k, v in refusals.items()}
    refusals.update(_rates(scrapes, "comatrix_server_error_responses_total", "code"))
    series(axes[1][2], refusals or {"none": [(s["t"], 0.0) for s in scrapes]}, "4.29 and 5.0x", "req/s")
    last = scrapes[-1]["samples"]
    gauges = [("Active devices", "comatrix_active_devices"), ("Compact sessions", "comatrix_compact_sessions"),
              ("Observers", "comatrix_observers"), ("Long-polls", "comatrix_long_polls"),
              ("Upstream in flight", "comatrix_upstream_active"), ("Upstream queue", "comatrix_upstream_queue_depth")]
    shares = [max(0.0, _value(last, name)) / max(1.0, _value(last, name + "_limit")) for _, name in gauges]
    ax = axes[2][0]
    ax.barh([label for label, _ in gauges], shares, color=["red" if s > 0.9 else "orange" if s > 0.7 else "green"
                                                            for s in shares])
    for y, (share, (_, name)) in enumerate(zip(shares, gauges)):
        ax.text(0.01, y, f"{_value(last, name):g} / {_value(last, name + '_limit'):g}", va="center", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_title("Tables against their limits (last scrape)", fontsize=10)
    ax.tick_params(labelsize=8)
    upstream = {label: [(s["t"], _value(s["samples"], name)) for s in scrapes]
                for label, name in (("in flight", "comatrix_upstream_active"), ("queued", "comatrix_upstream_queue_depth"))}
    series(axes[2][1], upstream, "Upstream", "calls", zeros=True)
    live = {label: [(s["t"], _value(s["samples"], name)) for s in scrapes] for label, name in gauges[:4]}
    series(axes[2][2], live, "Live tables", "count", zeros=True)
    for row in axes:
        for ax in row:
            ax.tick_params(labelsize=7)
    axes[2][1].set_xlabel("seconds into the test run", fontsize=8)
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    figure.savefig(output, dpi=80)
    print(f"wrote {output}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "record":
        record(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "draw":
        draw(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        raise SystemExit(__doc__)
