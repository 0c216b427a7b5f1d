"""``[metrics]``: off by default, loopback on port 9464; typed, and unknown keys refused."""

from __future__ import annotations

from typing import Any

import pytest

from comatrix.config import DEFAULT_METRICS_PORT, ConfigError, MetricsSettings, build_config


def test_metrics_are_off_by_default_and_loopback_when_enabled() -> None:
    assert build_config().metrics == MetricsSettings(enabled=False, bind="127.0.0.1", port=9464)
    config = build_config({"metrics": {"enabled": True}})
    assert (config.metrics.enabled, config.metrics.bind, config.metrics.port) == (True, "127.0.0.1", DEFAULT_METRICS_PORT)


def test_metrics_bind_and_port_are_taken() -> None:
    config = build_config({"metrics": {"enabled": True, "bind": "::1", "port": 9100}})
    assert config.metrics == MetricsSettings(enabled=True, bind="::1", port=9100)


@pytest.mark.parametrize("table, message", [
    ({"enabled": "yes"}, "[metrics] enabled must be true or false"),
    ({"bind": "localhost"}, "[metrics] bind must be an IP address"),
    ({"port": 70000}, "[metrics] port must be between 0 and 65535"),
    ({"port": "nine"}, "port must be an integer"),
    ({"path": "/metrics"}, "[metrics]: unknown key(s) path"),
    ("on", "[metrics] must be a table"),
])
def test_a_bad_metrics_table_is_refused(table: Any, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        build_config({"metrics": table})
    assert message in str(raised.value)
