"""The gateway keys the CoAP layer's per-peer shares (observers, uploads) on the device."""

from __future__ import annotations

from typing import Any

import pytest

from comatrix import tap
from comatrix.coap.message import Peer, Request, Security
from comatrix.coap.numbers import Code


def test_the_share_key_is_the_device_security_context_first() -> None:
    plain = Request(Code.GET, (), peer=Peer("fe80::1%lowpan0", 61616))
    assert tap.device_key(plain) == "a:fe80::1"  # zone id and port left out
    secured = Request(Code.GET, (), peer=Peer("fe80::1%lowpan0", 61616), security=Security("dtls", "sensor01"))
    assert tap.device_key(secured) == "dtls:sensor01"


def test_make_service_injects_the_device_key(made_stores: list[Any]) -> None:
    options = tap.Options()
    options.parseOptions(["--ip", "127.0.0.1", "--port", "0", "--homeserver", "http://127.0.0.1:9"])
    gateway: Any = tap.makeService(options)
    try:
        assert gateway.server.peer_key is tap.device_key
    finally:
        gateway.port.stopListening()
