"""The ``security`` policy: what plain CoAP may reach, checked before anything is read."""

from __future__ import annotations

import pytest

from comatrix.coap.message import Request, Response, Security
from comatrix.coap.numbers import Code, ContentFormat
from comatrix.coap.resource import CoapResource
from comatrix.coap.server import Site
from comatrix.coap.testing import Harness
from comatrix.config import ConfigError, build_config
from comatrix.protection import SecurityPolicy


class Recorder(CoapResource):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Request] = []

    def render_POST(self, request: Request) -> Response:
        self.seen.append(request)
        return Response(code=Code.CHANGED)

    def render_GET(self, request: Request) -> Response:
        self.seen.append(request)
        return Response(payload=b"1", content_format=ContentFormat.TEXT_PLAIN)


def _harness(mode: str) -> tuple[Harness, dict[str, Recorder]]:
    site = Site()
    resources = {"send": Recorder(), "time": Recorder()}
    for name, resource in resources.items():
        site.put((name,), resource)
    return Harness(site, guard=SecurityPolicy(mode).check), resources


def test_required_refuses_plain_requests_before_the_resource_sees_them() -> None:
    harness, resources = _harness("required")
    [reply] = harness.send(Code.POST, ["send"], payload=b"\xa1\x64body\x62hi", options=[(256, b"syt_secret")])
    assert reply.code == Code.UNAUTHORIZED and reply.payload == b"security required"
    assert resources["send"].seen == []


def test_required_serves_time_and_well_known_core_in_plain() -> None:
    harness, resources = _harness("required")
    [reply] = harness.send(Code.GET, ["time"])
    assert reply.code == Code.CONTENT and len(resources["time"].seen) == 1
    [reply] = harness.send(Code.GET, [".well-known", "core"])
    assert reply.code == Code.CONTENT and b"</send>" in reply.payload


def test_required_refuses_block1_uploads_at_their_first_block() -> None:
    harness, resources = _harness("required")
    [reply] = harness.send(Code.POST, ["send"], payload=b"x" * 16, options=[(27, b"\x08")])  # Block1 0/M/16
    assert reply.code == Code.UNAUTHORIZED and resources["send"].seen == []


@pytest.mark.parametrize("mode", ["optional", "off"])
def test_optional_and_off_serve_plain_requests(mode: str) -> None:
    harness, resources = _harness(mode)
    [reply] = harness.send(Code.POST, ["send"])
    assert reply.code == Code.CHANGED and len(resources["send"].seen) == 1


def test_secured_requests_pass_under_required() -> None:
    request = Request(method=Code.POST, path=("send",), security=Security("dtls", "sensor01"))
    SecurityPolicy("required").check(request)  # no exception


def test_security_config_key() -> None:
    assert build_config({"security": "Required"}).security == "required"
    assert build_config({}, {"security": "off"}).security == "off"
    with pytest.raises(ConfigError, match="security must be one of"):
        build_config({"security": "maybe"})
