"""``CompactDevice.watch`` against a scripted gateway: catch-up and notifications yield every message once, in order.

The gateway here is a fake socket put under a real `UdpCoap`: each datagram the
client sends is decoded and answered at once from a scripted room, so the tests
see the exact interleavings that matter (a notification overtaking the answer of
a catch-up FETCH, messages numbered between the registration and the catch-up)
without a network, threads or waiting.  When the script has nothing more to say
the fake reports a receive timeout, which ends the watch.
"""

from __future__ import annotations

import collections
import itertools
import socket
from typing import Any, Callable

import pytest

from comatrix.client import CompactDevice, DeviceState, UdpCoap
from comatrix.coap import wire
from comatrix.coap.numbers import Code, MessageType, OptionNumber
from comatrix.compact import codec
from comatrix.compact.codec import Message, MessagesRequest

ROOM = "#lab:example.org"
HANDLE = bytes(range(8))
#: Upper bound on datagrams one test may send: a runaway loop fails instead of hanging.
MAX_DATAGRAMS = 200

Hook = Callable[["ScriptedGateway"], None]


def message(cursor: int) -> Message:
    return Message("@owner:example.org", f"m{cursor}", 1_700_000_000 + cursor, cursor)


class ScriptedGateway:
    """The gateway's ``/v`` as a socket: answers FETCHes from ``room``, pushes notifications on cue.

    ``hooks[cursor]`` runs when a FETCH with that cursor (None: the registration) has
    been answered; for a catch-up FETCH, before the answer is queued, so anything it
    pushes reaches the client first, as a notification overtaking a response would.
    """

    def __init__(self, count: int, hooks: dict[int | None, Hook] | None = None) -> None:
        self.room = [message(cursor) for cursor in range(1, count + 1)]
        self.hooks = dict(hooks or {})
        self.inbox: collections.deque[bytes] = collections.deque()
        self.fetched: list[int | None] = []
        self.acks: list[int] = []
        self.resets: list[int] = []
        self.sent = 0
        self.observation: bytes | None = None
        self._observe_seq = itertools.count(2)
        self._mid = itertools.count(0x7000)

    # -- the socket the client uses -------------------------------------------------

    def settimeout(self, timeout: float | None) -> None:
        pass

    def close(self) -> None:
        pass

    def recvfrom(self, size: int) -> tuple[bytes, Any]:
        if not self.inbox:
            raise socket.timeout("the script has nothing more to send")
        return self.inbox.popleft(), ("127.0.0.1", 5683)

    def sendto(self, data: bytes, address: Any) -> int:
        self.sent += 1
        assert self.sent <= MAX_DATAGRAMS, "the client keeps sending"
        request = wire.decode(data)
        if request.code == Code.EMPTY:
            (self.acks if request.mtype == MessageType.ACK else self.resets).append(request.mid)
            return len(data)
        assert request.code == Code.FETCH and request.mtype == MessageType.CON
        options = dict(request.options)
        assert options[OptionNumber.URI_PATH] == codec.PATHS["messages"].encode()
        fetch = MessagesRequest.decode(request.payload)
        registering = options.get(OptionNumber.OBSERVE) == b""
        if registering:
            assert fetch.cursor is None
            self.observation = request.token
        self.fetched.append(fetch.cursor)
        reply = [(OptionNumber.OBSERVE, b"\x01")] if registering else []
        answer = wire.encode(MessageType.ACK, Code.CONTENT, request.mid, request.token, reply,
                             codec.encode_message(self._answer(fetch.cursor)))
        if registering:  # its notifications share its token: they come after it
            self.inbox.append(answer)
        hook = self.hooks.pop(fetch.cursor, None)
        if hook is not None:
            hook(self)
        if not registering:
            self.inbox.append(answer)
        return len(data)

    # -- the script -----------------------------------------------------------------

    def _answer(self, cursor: int | None) -> Message | None:
        if cursor is None:
            return self.room[-1] if self.room else None
        return next((m for m in self.room if m.cursor > cursor), None)

    def number(self) -> Message:
        """A new message reaches the room and gets the next cursor (its notification is lost)."""
        new = message(len(self.room) + 1)
        self.room.append(new)
        return new

    def push(self, new: Message, mtype: MessageType = MessageType.NON) -> int:
        """Send the notification of ``new``; its Message ID."""
        assert self.observation is not None
        mid = next(self._mid)
        seq = next(self._observe_seq).to_bytes(1, "big")
        self.inbox.append(wire.encode(mtype, Code.CONTENT, mid, self.observation,
                                      [(OptionNumber.OBSERVE, seq)], codec.encode_message(new)))
        return mid


def device_on(gateway: ScriptedGateway, last: int | None) -> CompactDevice:
    coap = UdpCoap("coap://127.0.0.1:5683")
    coap.sock.close()  # never used: every datagram goes to the script
    coap.sock = gateway  # type: ignore[assignment]
    compact: dict[str, Any] = {"handle": HANDLE.hex(), "rooms": {ROOM: 0}, "cursors": {}}
    if last is not None:
        compact["cursors"][ROOM] = last
    return CompactDevice(coap, DeviceState(None, {"compact": compact}))


def cursors(device: CompactDevice) -> list[int]:
    return [m.cursor for m in device.watch(ROOM)]


def test_catch_up_yields_messages_beyond_the_registration_answer() -> None:
    # The device last saw 1; the registration answers 3, and 4 and 5 arrive before
    # the catch-up runs (their notifications lost): the catch-up returns 2..5.
    def meanwhile(gw: ScriptedGateway) -> None:
        gw.number()
        gw.number()

    gateway = ScriptedGateway(3, {None: meanwhile})
    device = device_on(gateway, last=1)
    assert cursors(device) == [2, 3, 4, 5]
    assert gateway.fetched == [None, 1, 2, 3, 4, 5]
    assert device.compact["cursors"][ROOM] == 5


@pytest.mark.parametrize("mtype", [MessageType.NON, MessageType.CON], ids=["NON", "CON"])
def test_notification_during_a_catch_up_exchange_is_kept(mtype: MessageType) -> None:
    # The catch-up FETCH after 3 is answered [] (computed before 4 was numbered), but
    # 4's notification overtakes that answer: it must come out after 3, once.
    pushed: list[int] = []
    gateway = ScriptedGateway(3, {3: lambda gw: pushed.append(gw.push(gw.number(), mtype))})
    device = device_on(gateway, last=1)
    assert cursors(device) == [2, 3, 4]
    assert gateway.fetched == [None, 1, 2, 3]
    assert device.compact["cursors"][ROOM] == 4
    if mtype == MessageType.CON:
        assert pushed[0] in gateway.acks
    assert gateway.resets == []  # the observation was never cancelled


def test_notifications_also_fetched_by_the_catch_up_are_yielded_once() -> None:
    # 4 and 5 are numbered and pushed while the catch-up runs, so the catch-up fetches
    # them too; then 6 arrives as an ordinary notification.
    def during_catch_up(gw: ScriptedGateway) -> None:
        gw.push(gw.number())
        gw.push(gw.number())

    def after_catch_up(gw: ScriptedGateway) -> None:
        gw.push(gw.number())

    gateway = ScriptedGateway(3, {1: during_catch_up, 5: after_catch_up})
    device = device_on(gateway, last=1)
    assert cursors(device) == [2, 3, 4, 5, 6]
    assert gateway.fetched == [None, 1, 2, 3, 4, 5]


def test_a_first_watch_starts_from_the_latest_and_follows_notifications() -> None:
    # No cursor yet: the registration's answer is the starting point (not yielded).
    def later(gw: ScriptedGateway) -> None:
        for _ in range(3):
            gw.push(gw.number())

    gateway = ScriptedGateway(2, {None: later})
    device = device_on(gateway, last=None)
    assert cursors(device) == [3, 4, 5]
    assert gateway.fetched == [None]


def test_a_lost_notification_is_fetched_and_count_stops_the_watch() -> None:
    def later(gw: ScriptedGateway) -> None:
        gw.number()  # 3: its notification is lost
        gw.push(gw.number())  # 4: reveals the gap
        gw.push(gw.number())  # 5

    gateway = ScriptedGateway(2, {None: later})
    device = device_on(gateway, last=2)
    assert [m.cursor for m in device.watch(ROOM, count=2)] == [3, 4]
    assert device.compact["cursors"][ROOM] == 4
    assert gateway.fetched == [None, 2, 3]
    # The watch is over: a notification reaching a later exchange is refused, not kept.
    late: list[int] = []
    gateway.hooks[None] = lambda gw: late.append(gw.push(gw.number(), MessageType.CON))
    latest = device.getmsg(ROOM)
    assert latest is not None and latest.cursor == 5
    assert gateway.resets == late
