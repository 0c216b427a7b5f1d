"""Site subtrees, targeted/confirmable notifications with delivery counts, and observer_removed."""

from __future__ import annotations

from typing import Any

import pytest

from comatrix.coap import wire
from comatrix.coap.errors import NotFound
from comatrix.coap.message import Request, Response
from comatrix.coap.numbers import Code, MessageType, OptionNumber
from comatrix.coap.resource import CoapResource, LinkAttributes
from comatrix.coap.server import Site
from comatrix.coap.testing import Harness, option

CON, NON, ACK, RST = MessageType.CON, MessageType.NON, MessageType.ACK, MessageType.RST


class Echo(CoapResource):
    link = LinkAttributes(obs=True)

    def __init__(self, name: str, subtree: bool = False) -> None:
        super().__init__()
        self.name = name
        self.subtree = subtree
        self.removed: list[Request] = []

    def render_GET(self, request: Request) -> Response:
        return Response(payload=(self.name + ":" + "/".join(request.path)).encode())

    def observer_removed(self, request: Request) -> None:
        self.removed.append(request)


def test_subtree_resolution_longest_prefix_and_exact_first() -> None:
    site = Site()
    root, deep, exact, plain = Echo("root", True), Echo("deep"), Echo("exact"), Echo("plain")
    site.put(("a",), root)
    site.put(("a", "b"), deep, subtree=True)
    site.put(("a", "b", "c"), exact)
    site.put(("p",), plain)
    assert site.resolve(("a",)) is root
    assert site.resolve(("a", "x", "y")) is root
    assert site.resolve(("a", "b", "x")) is deep
    assert site.resolve(("a", "b", "c")) is exact
    assert site.resolve(("a", "b", "c", "d")) is deep
    with pytest.raises(NotFound):
        site.resolve(("p", "below"))  # not a subtree
    with pytest.raises(NotFound):
        site.resolve(("b",))
    site.put(("a",), root, subtree=False)
    with pytest.raises(NotFound):
        site.resolve(("a", "x"))


def test_subtree_resource_sees_the_full_path() -> None:
    site = Site()
    site.put(("m",), Echo("m", subtree=True))
    h = Harness(site)
    [reply] = h.send(Code.GET, ("m", "!room", "x"))
    assert reply.payload == b"m:m/!room/x"
    assert h.send(Code.GET, (".well-known", "core"))[0].payload == b"</m>;obs"


def register(h: Harness, token: bytes, peer: Any = ("2001:db8::1", 40000)) -> None:
    [reply] = h.send(Code.GET, ("r",), token=token, options=[(OptionNumber.OBSERVE, b"")], peer=peer)
    assert option(reply, OptionNumber.OBSERVE) is not None


def test_targeted_confirmable_notification_fires_when_acknowledged() -> None:
    site = Site()
    resource = Echo("r")
    site.put(("r",), resource)
    h = Harness(site)
    register(h, b"\x01")
    register(h, b"\x02")
    counts: list[int] = []
    site.notify(resource, lambda request: request.token == b"\x02", confirmable=True).addCallback(counts.append)
    [pushed] = h.replies()
    assert (pushed.mtype, pushed.token) == (CON, b"\x02") and counts == []
    h.send_raw(wire.empty(ACK, pushed.mid))
    assert counts == [1]
    site.notify(resource).addCallback(counts.append)  # NON, both observers: delivered when sent
    assert [p.mtype for p in h.replies()] == [NON, NON] and counts == [1, 2]


def test_reset_give_up_and_deregistration_call_observer_removed() -> None:
    site = Site()
    resource = Echo("r")
    site.put(("r",), resource)
    h = Harness(site)
    register(h, b"\x01")
    counts: list[int] = []
    site.notify(resource, confirmable=True).addCallback(counts.append)
    h.send_raw(wire.empty(RST, h.replies()[0].mid))
    assert counts == [0] and [r.token for r in resource.removed] == [b"\x01"]
    register(h, b"\x02")
    site.notify(resource, confirmable=True).addCallback(counts.append)
    for _ in range(6):
        h.advance(60)
    assert counts == [0, 0] and [r.token for r in resource.removed] == [b"\x01", b"\x02"]
    register(h, b"\x03")
    h.send(Code.GET, ("r",), token=b"\x03", options=[(OptionNumber.OBSERVE, b"\x01")])
    assert [r.token for r in resource.removed][-1] == b"\x03" and h.server.observer_count() == 0
    site.notify(resource).addCallback(counts.append)
    assert counts == [0, 0, 0]  # nobody left
