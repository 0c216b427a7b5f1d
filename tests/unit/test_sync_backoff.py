"""/sync loops back off exponentially with jitter after homeserver trouble, and keep their position.

`comatrix.longpoll.Backoff` on its own, then the compact session loop and the
MSC3079 Observe loop driven by a `task.Clock`: the exact instants of their
/sync calls show the delays (jittered with a fixed random sequence), that they
grow and are capped, that a 429's Retry-After wins when longer, that a success
starts the back-off over, and that every retry asks from the last position.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator

import pytest
from twisted.internet import task

from comatrix.coap.numbers import Code, MessageType, OptionNumber
from comatrix.coap.server import CoapSettings, Site
from comatrix.coap.testing import Harness
from comatrix.coap import wire
from comatrix.compact.service import CompactService
from comatrix.config import build_config
from comatrix.credentials import Credentials
from comatrix.errors import error_response
from comatrix.interfaces import PluginContext
from comatrix.longpoll import BACKOFF_CAP, BACKOFF_FIRST, Backoff, LongPoller
from comatrix.matrix.client import MatrixClient
from comatrix.matrix.errors import HomeserverTimeout, HomeserverUnreachable, InvalidResponse, MatrixError
from comatrix.matrix.testing import FakeHomeserver, stub_transport
from comatrix.msc3079.service import Msc3079Service
from comatrix.plugins import msc3079 as msc3079_plugin
from comatrix.store import RoomRecord, SessionRecord
from support.scripted_sync import ScriptedSync

#: The "random" draws the loops get, in order (a fixed sequence: the delays are exact).
DRAWS = (0.0, 0.5, 0.9, 0.25, 0.75, 0.1, 0.6, 0.3, 0.95, 0.4)


def draws() -> Iterator[float]:
    return itertools.cycle(DRAWS)


def expected_delays(count: int, start_failures: int = 0) -> list[float]:
    """Equal jitter: the n-th delay is d/2 + r*d/2, d = min(cap, first * 2**n)."""
    out = []
    source = draws()
    for n in range(start_failures, start_failures + count):
        ceiling = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** n)
        out.append(ceiling / 2 + next(source) * ceiling / 2)
    return out


def call_times_after(clock: task.Clock, upstream: ScriptedSync, delays: list[float], *,
                     last_succeeds: bool = False) -> list[float]:
    """Advance the clock through ``delays``, asserting no /sync comes early and one comes on time.

    With ``last_succeeds`` the last retry succeeds, so the loop long-polls again at once.
    """
    gaps = []
    for n, delay in enumerate(delays):
        before = len(upstream.calls)
        start = clock.seconds()
        clock.advance(delay - 1e-3)
        assert len(upstream.calls) == before, "a retry came before its back-off delay"
        clock.advance(2e-3)
        calls = 2 if last_succeeds and n == len(delays) - 1 else 1
        assert len(upstream.calls) == before + calls, "no retry at the end of the back-off delay"
        gaps.append(upstream.calls[before][0] - start)
    return gaps


def approx(values: list[float]) -> Any:
    return pytest.approx(values, abs=2e-3)


# -- Backoff -------------------------------------------------------------------------------


def test_backoff_grows_is_capped_is_jittered_and_resets() -> None:
    backoff = Backoff(random=draws().__next__)
    delays = [backoff.next() for _ in range(10)]
    assert delays == pytest.approx(expected_delays(10))
    ceilings = [min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** n) for n in range(10)]
    # Every delay lies in [d/2, d]; the lower bounds double, so the delays grow...
    assert all(d / 2 <= delay <= d for delay, d in zip(delays, ceilings))
    assert delays[-1] > delays[0] * 16
    # ...up to the cap, and are spread (not all at a fixed point of their range).
    assert max(delays) <= BACKOFF_CAP and delays[-1] >= BACKOFF_CAP / 2
    assert len({round(delay / d, 6) for delay, d in zip(delays, ceilings)}) > 5
    backoff.reset()
    assert backoff.next() == pytest.approx(BACKOFF_FIRST / 2 + DRAWS[0] * BACKOFF_FIRST / 2)


def test_backoff_extremes_of_the_random_source() -> None:
    low, high = Backoff(random=lambda: 0.0), Backoff(random=lambda: 0.999999)
    for n in range(200):  # a very long outage: no overflow, still capped
        ceiling = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** min(n, 64))
        assert low.next() == pytest.approx(ceiling / 2)
        assert high.next() == pytest.approx(ceiling, rel=1e-5)
    with pytest.raises(ValueError):
        Backoff(first=0)


# -- the compact session loop ------------------------------------------------------------


class QuietStore:
    """The compact service's store for a session with no rooms (the loop only asks for rooms)."""

    async def rooms(self, session_id: int) -> list[RoomRecord]:
        return []


SESSION = SessionRecord(1, b"\x00" * 32, "syt_tok", "@d:test.local", "DEV", "::1")


def compact_loop(clock: task.Clock) -> tuple[CompactService, ScriptedSync]:
    upstream = ScriptedSync(clock)
    transport, _ = stub_transport(FakeHomeserver(), clock)
    service = CompactService(MatrixClient(transport, reactor=clock), QuietStore(), clock,  # type: ignore[arg-type]
                             long_polls=LongPoller(upstream, clock),  # type: ignore[arg-type]
                             jitter=draws().__next__)
    service.is_observed = lambda session: True
    return service, upstream


def test_compact_sync_loop_backs_off_with_jitter_and_resumes_from_its_position() -> None:
    clock = task.Clock()
    service, upstream = compact_loop(clock)
    trouble = [HomeserverUnreachable("refused"), HomeserverTimeout("slow"), InvalidResponse("junk"),
               MatrixError(502, None, "bad gateway")] * 2 + [HomeserverUnreachable("refused")]
    upstream.outcomes = [{"next_batch": "s1"}, *trouble, {"next_batch": "s2"}, HomeserverUnreachable("again")]
    service.watch(SESSION)
    assert [call[1].get("since") for call in upstream.calls] == [None, "s1"]  # first catch-up, then s1
    assert upstream.calls[0][1]["timeout"] == "0" and upstream.calls[1][1]["timeout"] == "25000"

    gaps = call_times_after(clock, upstream, expected_delays(len(trouble)), last_succeeds=True)
    assert gaps == approx(expected_delays(len(trouble)))
    assert gaps[-1] == pytest.approx(BACKOFF_CAP / 2 + DRAWS[8] * BACKOFF_CAP / 2, abs=2e-3)  # 2**8 s: capped at 60
    # Every retry asked from the last position the loop had; after the success it moves on.
    assert [call[1]["since"] for call in upstream.calls[1:]] == ["s1"] * (len(trouble) + 1) + ["s2"]
    # The success started the back-off over: the next trouble waits within [first/2, first] again
    # (the loop's random source goes on with its next draw).
    draw = DRAWS[len(trouble) % len(DRAWS)]
    call_times_after(clock, upstream, [BACKOFF_FIRST / 2 + draw * BACKOFF_FIRST / 2])
    assert upstream.calls[-1][1]["since"] == "s2" and service.watching(SESSION.id)
    service.stop()
    assert not service.watching(SESSION.id) and clock.getDelayedCalls() == []


def test_compact_sync_loop_honours_a_longer_retry_after_and_stops_on_401() -> None:
    clock = task.Clock()
    service, upstream = compact_loop(clock)
    upstream.outcomes = [{"next_batch": "s1"}, MatrixError(429, "M_LIMIT_EXCEEDED", retry_after=90.0),
                         MatrixError(401, "M_UNKNOWN_TOKEN")]
    service.watch(SESSION)
    assert call_times_after(clock, upstream, [90.0]) == approx([90.0])  # not the ~1 s back-off
    assert not service.watching(SESSION.id) and clock.getDelayedCalls() == []


def test_compact_sync_loop_does_not_skip_news_it_could_not_walk() -> None:
    """The homeserver fails while new messages are walked: the next /sync asks from the same position."""
    clock = task.Clock()
    service, upstream = compact_loop(clock)
    news = {"rooms": {"join": {"!r": {"timeline": {"events": [{"type": "m.room.message"}]}}}}}
    upstream.outcomes = [{"next_batch": "s1"}, {"next_batch": "s2", **news}, {"next_batch": "s2", **news}]
    walked: list[set[str]] = []

    async def messages_arrived(session: SessionRecord, rooms: set[str], timelines: Any = None) -> None:
        walked.append(rooms)
        if len(walked) == 1:
            raise HomeserverUnreachable("gone while walking")

    service.messages_arrived = messages_arrived  # type: ignore[method-assign]
    service.watch(SESSION)
    assert upstream.since() == [None, "s1"] and walked == [{"!r"}]
    call_times_after(clock, upstream, expected_delays(1), last_succeeds=True)
    assert upstream.since() == [None, "s1", "s1", "s2"] and walked == [{"!r"}, {"!r"}]
    service.stop()


# -- the MSC3079 Observe loop -------------------------------------------------------------


def test_msc3079_sync_observation_backs_off_with_jitter_and_keeps_its_since() -> None:
    site = Site(error_response)
    harness = Harness(site, CoapSettings(), understood_options=frozenset({256, 257}))
    clock = harness.clock
    upstream = ScriptedSync(clock)
    config = build_config({})
    transport, _ = stub_transport(FakeHomeserver(), clock)
    matrix = MatrixClient(transport, reactor=clock)
    context = PluginContext(config=config, matrix=matrix, credentials=Credentials(config.devices, matrix),
                            state={}, reactor=clock)
    context.state["msc3079"] = Msc3079Service(context, long_poll=upstream,  # type: ignore[arg-type]
                                              jitter=draws().__next__)
    for path, resource in msc3079_plugin.msc3079.build_routes(context):
        site.put(path, resource)
    trouble = [HomeserverUnreachable("refused"), MatrixError(503, None, "restarting"),
               HomeserverTimeout("slow")] * 3
    upstream.outcomes = [{"next_batch": "s0"}, *trouble, MatrixError(429, "M_LIMIT_EXCEEDED", retry_after=75.0),
                         {"next_batch": "s1", "rooms": {"join": {"!r": {"timeline": {"events": [{"type": "x"}]}}}}}]
    [registered] = harness.send(Code.GET, ("7",), token=b"\x42",
                                options=[(OptionNumber.OBSERVE, b""), (256, b"syt_tok")])
    assert registered.code == Code.CONTENT
    harness.advance(0)  # the loop starts after the registration answer
    assert [call[1].get("since") for call in upstream.calls] == [None, "s0"]

    gaps = call_times_after(clock, upstream, expected_delays(len(trouble)) + [75.0])
    assert gaps == approx(expected_delays(len(trouble)) + [75.0])
    assert all(call[1]["since"] == "s0" for call in upstream.calls[1:])
    # The batch after the trouble is pushed (CON); once acknowledged the loop asks from s1.
    [pushed] = harness.replies()
    assert (pushed.mtype, pushed.code) == (MessageType.CON, Code.CONTENT)
    harness.send_raw(wire.empty(MessageType.ACK, pushed.mid))
    assert upstream.calls[-1][1]["since"] == "s1"
    context.state["msc3079"].shutdown()
    assert context.state["msc3079"].loops == {}
