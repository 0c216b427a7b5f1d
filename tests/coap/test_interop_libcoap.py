"""Interop: libcoap's ``coap-client-notls`` (Debian libcoap3-bin) against CoapServer.

libcoap is a C implementation no one here wrote.  The server runs in-process
(``live_server`` in conftest.py); each client run is a subprocess waited on in a
worker thread, so the Twisted reactor keeps serving.  A missing
``coap-client-notls`` fails the tests (it is a test dependency, not optional).
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import pytest_twisted

from conftest import LiveServer, libcoap_client_path, poll, run_command, sleep
from serve_testsite import DOWNLOAD

from aiocoap import numbers as an
from aiocoap.util import linkformat

UPLOAD = hashlib.shake_256(b"comatrix libcoap upload").digest(3 * 1024)
BLOCK_SIZES = (16, 64, 1024)
#: Seconds libcoap keeps an observation before deregistering it with Observe=1.
OBSERVE_SECONDS = 4


def client(*args: str) -> list[str]:
    # -B bounds how long libcoap waits for anything; -v 3 keeps warnings on stderr.
    return [libcoap_client_path(), "-B", "20", "-v", "3", *args]


def stdout_of(result: Any) -> bytes:
    """What libcoap printed as the payload (it ends its stdout output with a newline)."""
    out: bytes = result.stdout
    return out[:-1] if out.endswith(b"\n") else out


def stderr_of(result: Any) -> str:
    return str(result.stderr.decode(errors="replace"))


def sizes(live: LiveServer, which: str, datagrams: Any) -> set[int]:
    return {2 ** (getattr(m.opt, which).size_exponent + 4) for m in live.decoded(datagrams)
            if getattr(m.opt, which) is not None}


@pytest.mark.parametrize("non", [False, True], ids=["CON", "NON"])
@pytest.mark.parametrize("method,code", [("get", an.CONTENT), ("post", an.CHANGED), ("put", an.CHANGED),
                                         ("delete", an.DELETED)])
@pytest_twisted.ensureDeferred
async def test_methods(live_server: LiveServer, method: str, code: Any, non: bool) -> None:
    args = client("-m", method, "-e", "hi", live_server.uri("echo"))
    if non:
        args.insert(1, "-N")
    result = await run_command(args)
    assert result.returncode == 0, stderr_of(result)
    assert stdout_of(result) == method.upper().encode() + b":hi"
    sent = live_server.decoded(live_server.sent)
    assert [m.code for m in sent] == [code]
    assert sent[0].mtype == (an.NON if non else an.ACK)


@pytest_twisted.ensureDeferred
async def test_ipv6_loopback(live_server_v6: LiveServer) -> None:
    result = await run_command(client(live_server_v6.uri("echo")))
    assert result.returncode == 0, stderr_of(result)
    assert stdout_of(result) == b"GET:"


@pytest_twisted.ensureDeferred
async def test_dual_stack_any_address(make_live_server: Any) -> None:
    """Bound to ``::`` the server answers IPv4 (mapped) and IPv6 peers, each at its own address."""
    live_server = make_live_server("::")
    for host in ("127.0.0.1", "::1"):
        result = await run_command(client("-m", "post", "-e", host, live_server.uri("echo", host=host)))
        assert result.returncode == 0, stderr_of(result)
        assert stdout_of(result) == b"POST:" + host.encode()
    assert [d.addr[0] for d in live_server.sent] == [d.addr[0] for d in live_server.received]
    assert {d.addr[0] for d in live_server.sent} == {"::ffff:127.0.0.1", "::1"}


@pytest_twisted.ensureDeferred
async def test_not_found(live_server: LiveServer) -> None:
    result = await run_command(client(live_server.uri("missing")))
    assert [m.code for m in live_server.decoded(live_server.sent)] == [an.NOT_FOUND]
    assert b"4.04" in result.stderr + result.stdout


@pytest_twisted.ensureDeferred
async def test_separate_response(live_server: LiveServer) -> None:
    result = await run_command(client(live_server.uri("slow")))
    assert result.returncode == 0, stderr_of(result)
    assert stdout_of(result) == b"slow"
    sent = live_server.decoded(live_server.sent)
    assert [(m.mtype, m.code) for m in sent] == [(an.ACK, an.EMPTY), (an.CON, an.CONTENT)]


@pytest.mark.parametrize("size", BLOCK_SIZES)
@pytest_twisted.ensureDeferred
async def test_block2_download(live_server: LiveServer, size: int, tmp_path: Any) -> None:
    live_server.verify()  # a verified peer gets the block size it asks for
    target = tmp_path / "download.bin"
    result = await run_command(client("-b", str(size), "-o", str(target), live_server.uri("download")))
    assert result.returncode == 0, stderr_of(result)
    assert target.read_bytes() == DOWNLOAD
    assert sizes(live_server, "block2", live_server.sent) == {size}


@pytest.mark.parametrize("non", [False, True], ids=["CON", "NON"])
@pytest.mark.parametrize("size", BLOCK_SIZES)
@pytest_twisted.ensureDeferred
async def test_block1_upload(live_server: LiveServer, size: int, non: bool, tmp_path: Any) -> None:
    source = tmp_path / "upload.bin"
    source.write_bytes(UPLOAD)
    args = client("-m", "put", "-b", str(size), "-f", str(source), live_server.uri("upload"))
    if non:
        args.insert(1, "-N")
    result = await run_command(args)
    assert result.returncode == 0, stderr_of(result)
    assert stdout_of(result) == hashlib.sha256(UPLOAD).hexdigest().encode()
    assert live_server.resources.upload.received == [UPLOAD]
    assert sizes(live_server, "block1", live_server.received) == {size}
    continues = [m for m in live_server.decoded(live_server.sent)
                 if m.opt.block1 is not None and m.opt.block1.more]
    assert continues and all(m.code == an.CONTINUE for m in continues)


@pytest.mark.parametrize("size", BLOCK_SIZES)
@pytest_twisted.ensureDeferred
async def test_block1_post_then_block2_get(live_server: LiveServer, size: int, tmp_path: Any) -> None:
    source = tmp_path / "upload.bin"
    source.write_bytes(UPLOAD)
    target = tmp_path / "back.bin"
    posted = await run_command(client("-m", "post", "-b", str(size), "-f", str(source), live_server.uri("upload")))
    assert posted.returncode == 0, stderr_of(posted)
    fetched = await run_command(client("-b", str(size), "-o", str(target), live_server.uri("upload")))
    assert fetched.returncode == 0, stderr_of(fetched)
    assert target.read_bytes() == UPLOAD
    deleted = await run_command(client("-m", "delete", live_server.uri("upload")))
    assert deleted.returncode == 0, stderr_of(deleted)
    assert live_server.resources.upload.stored is None


@pytest.mark.parametrize("non", [False, True], ids=["CON", "NON"])
@pytest_twisted.ensureDeferred
async def test_observe_deregister_with_observe_1(live_server: LiveServer, non: bool) -> None:
    """libcoap observes for OBSERVE_SECONDS, then deregisters with a GET carrying Observe=1."""
    live_server.verify()  # an unverified observer's first answer is CON (see test_unverified_observer)
    counter = live_server.resources.counter
    args = client("-s", str(OBSERVE_SECONDS), "-w", live_server.uri("counter"))
    if non:
        args.insert(1, "-N")
    done = run_command(args)
    await poll(lambda: live_server.observer_count(counter) == 1, "libcoap's observation registered")
    assert live_server.observer_count() == 1

    def notifications_sent() -> int:
        return sum(1 for m in live_server.decoded(live_server.sent)
                   if m.opt.observe is not None and m.code == an.CONTENT) - 1

    for _ in range(3):
        before = notifications_sent()
        live_server.bump_counter()
        await poll(lambda: notifications_sent() > before, "a notification sent")
        await sleep(0.05)
    result = await done
    assert result.returncode == 0, stderr_of(result)
    await poll(lambda: live_server.observer_count() == 0, "observer removed after Observe=1")
    assert live_server.observer_count(counter) == 0
    assert counter.observe_values[0] == 0
    assert 1 in counter.observe_values, "libcoap's deregistration (Observe=1) did not reach the resource"
    values = [int(line) for line in result.stdout.split()]
    # The first answer plus three notifications (the deregistration answer may add one more).
    assert values[:4] == [0, 1, 2, 3]
    notifications = [m for m in live_server.decoded(live_server.sent) if m.opt.observe is not None]
    sequence = [m.opt.observe for m in notifications]
    assert sequence == sorted(sequence) and len(set(sequence)) == len(sequence)
    if non:
        assert all(m.mtype == an.NON for m in notifications)


@pytest.mark.parametrize("block", [None, 16], ids=["whole", "block16"])
@pytest_twisted.ensureDeferred
async def test_well_known_core(live_server: LiveServer, block: int | None) -> None:
    args = client(live_server.uri(".well-known/core"))
    if block:
        args[1:1] = ["-b", str(block)]
    result = await run_command(args)
    assert result.returncode == 0, stderr_of(result)
    links = {link.href: dict(link.attr_pairs) for link in linkformat.parse(stdout_of(result).decode()).links}
    assert {"/echo", "/upload", "/download", "/counter", "/slow"} <= set(links)
    assert links["/counter"]["rt"] == "test.counter"
    assert "obs" in links["/counter"]
    if block:
        assert sizes(live_server, "block2", live_server.sent) == {block}


# --------------------------------------------------------------------------- loss and block-wise Observe


def mtype_code(data: bytes) -> tuple[int, int]:
    return (data[0] >> 4) & 0x3, data[1]


@pytest_twisted.ensureDeferred
async def test_lost_ack_is_replayed_from_dedup(live_server: LiveServer) -> None:
    """The piggy-backed answer to a POST is lost; libcoap retransmits; the server replays, not re-executes."""
    live_server.verify()  # the 64-byte answer whole, not block-wise as to an unverified peer
    live_server.lose_next(lambda data: mtype_code(data) == (int(an.ACK), int(an.CHANGED)))
    result = await run_command(client("-m", "post", "-e", "once", live_server.uri("upload")))
    assert result.returncode == 0, stderr_of(result)
    assert stdout_of(result) == hashlib.sha256(b"once").hexdigest().encode()
    assert len(live_server.lost) == 1
    assert live_server.resources.upload.received == [b"once"]  # executed exactly once
    requests = live_server.decoded(live_server.received)
    assert len(requests) == 2 and requests[0].mid == requests[1].mid  # a retransmission
    assert [d.data for d in live_server.sent] == [live_server.lost[0].data]  # the same answer


@pytest_twisted.ensureDeferred
async def test_lost_separate_response_is_retransmitted(live_server: LiveServer) -> None:
    live_server.lose_next(lambda data: mtype_code(data) == (int(an.CON), int(an.CONTENT)))
    result = await run_command(client(live_server.uri("slow")))
    assert result.returncode == 0, stderr_of(result)
    assert stdout_of(result) == b"slow"
    lost = live_server.decoded(live_server.lost)[0]
    sent = live_server.decoded(live_server.sent)
    assert [(m.mtype, m.code) for m in sent] == [(an.ACK, an.EMPTY), (an.CON, an.CONTENT)]
    assert sent[1].mid == lost.mid and sent[1].token == lost.token
    # libcoap acknowledged the retransmission; the server must stop retransmitting.
    acks = [m for m in live_server.decoded(live_server.received) if m.mtype == an.ACK]
    assert [m.mid for m in acks] == [lost.mid]
    assert not live_server.server._outgoing  # no retransmission timer left


@pytest_twisted.ensureDeferred
async def test_observe_blockwise_resource(live_server: LiveServer) -> None:
    """Observe a resource larger than the block size: every notification is reassembled consistently."""
    big = live_server.resources.bigcounter
    done = run_command(client("-b", "16", "-s", str(OBSERVE_SECONDS), "-w", live_server.uri("bigcounter")))
    await poll(lambda: live_server.observer_count(big) == 1, "libcoap's observation registered")

    def notifications_sent() -> int:
        return sum(1 for m in live_server.decoded(live_server.sent)
                   if m.opt.observe is not None and m.code == an.CONTENT) - 1

    def last_blocks_sent() -> int:
        return sum(1 for m in live_server.decoded(live_server.sent)
                   if m.opt.block2 is not None and not m.opt.block2.more)

    await poll(lambda: last_blocks_sent() >= 1, "libcoap fetched the whole first representation")
    for _ in range(3):
        before, whole = notifications_sent(), last_blocks_sent()
        live_server.bump_counter(big=True)
        await poll(lambda: notifications_sent() > before, "a notification sent")
        # The next change only once libcoap has fetched every block of this one (however slow the machine).
        await poll(lambda: last_blocks_sent() > whole, "libcoap fetched the whole representation")
    result = await done
    assert result.returncode == 0, stderr_of(result)
    await poll(lambda: live_server.observer_count() == 0, "observer removed after Observe=1")
    representations = result.stdout.split()
    assert len(representations) >= 4, result.stdout
    for text in representations:
        assert len(text) == 8 * big.REPEAT and text == text[:8] * big.REPEAT, text
    assert [int(text[:8]) for text in representations][:4] == [0, 1, 2, 3]
    assert sizes(live_server, "block2", live_server.sent) == {16}


@pytest_twisted.ensureDeferred
async def test_observe_con_notifications_latest_state_wins(make_live_server: Any) -> None:
    """Every notification CON; bursts of changes faster than libcoap's ACKs: libcoap ends on the latest value.

    RFC 7641 §4.5.2: a newer notification replaces one still awaiting its ACK, so
    a burst must neither queue up stale states nor lose the final one.
    """
    from comatrix.coap.server import CoapSettings

    live_server = make_live_server(settings=CoapSettings(con_notification_interval=0.0))
    counter = live_server.resources.counter
    done = run_command(client("-s", str(OBSERVE_SECONDS), "-w", live_server.uri("counter")))
    await poll(lambda: live_server.observer_count(counter) == 1, "libcoap's observation registered")
    for _ in range(10):
        live_server.bump_counter()
    last = counter.value

    def latest_acknowledged() -> bool:
        sent = {m.mid: m for m in live_server.decoded(live_server.sent)
                if m.mtype == an.CON and m.opt.observe is not None}
        acked = [sent[m.mid] for m in live_server.decoded(live_server.received)
                 if m.mtype == an.ACK and m.mid in sent]
        return any(m.payload == str(last).encode() for m in acked)

    await poll(latest_acknowledged, "libcoap acknowledged the latest notification")
    result = await done
    assert result.returncode == 0, stderr_of(result)
    values = [int(v) for v in result.stdout.split()]
    assert values[0] == 0 and values[-1] == last, values
    assert values == sorted(values), values
    notifications = [m for m in live_server.decoded(live_server.sent) if m.opt.observe is not None][1:]
    assert notifications and all(m.mtype == an.CON for m in notifications)
    await poll(lambda: live_server.observer_count() == 0, "observer removed after Observe=1")


# --------------------------------------------------------------------------- amplification limit (unverified peer)


def within_budget(live: LiveServer, host: str = "127.0.0.1") -> bool:
    received, sent = live.bytes_to(host)
    return 0 < sent <= 3 * received


@pytest_twisted.ensureDeferred
async def test_unverified_large_download_is_blockwise_within_budget(live_server: LiveServer,
                                                                    tmp_path: Any) -> None:
    target = tmp_path / "download.bin"
    result = await run_command(client("-o", str(target), live_server.uri("download")))
    assert result.returncode == 0, stderr_of(result)
    assert target.read_bytes() == DOWNLOAD
    assert max(sizes(live_server, "block2", live_server.sent)) < 1024  # shrunk to fit
    assert within_budget(live_server) and not live_server.server.peer_verified("127.0.0.1")


@pytest_twisted.ensureDeferred
async def test_unverified_well_known_core_within_budget(live_server: LiveServer) -> None:
    result = await run_command(client(live_server.uri(".well-known/core")))
    assert result.returncode == 0, stderr_of(result)
    assert "/download" in stdout_of(result).decode()
    assert within_budget(live_server)


@pytest_twisted.ensureDeferred
async def test_libcoap_answers_an_echo_challenge(live_server: LiveServer, tmp_path: Any) -> None:
    """GET /e: 7 bytes in cannot pay for even a 16-byte block; libcoap repeats with the Echo value."""
    target = tmp_path / "e.bin"
    result = await run_command(client("-o", str(target), live_server.uri("e")))
    assert result.returncode == 0, stderr_of(result)
    assert target.read_bytes() == DOWNLOAD
    sent = live_server.decoded(live_server.sent)
    assert sent[0].code == an.UNAUTHORIZED and sent[0].opt.echo is not None
    repeated = live_server.decoded(live_server.received)[1]
    assert repeated.opt.echo == sent[0].opt.echo
    assert len(live_server.sent[0].data) <= 3 * len(live_server.received[0].data)
    assert live_server.server.peer_verified("127.0.0.1")


@pytest.mark.parametrize("non", [False, True], ids=["CON", "NON"])
@pytest_twisted.ensureDeferred
async def test_unverified_observer_is_verified_by_its_ack(live_server: LiveServer, non: bool) -> None:
    """The first answer to an unverified observer is CON; libcoap's ACK verifies it; notifications flow."""
    counter = live_server.resources.counter
    args = client("-s", str(OBSERVE_SECONDS), "-w", live_server.uri("counter"))
    if non:
        args.insert(1, "-N")
    done = run_command(args)
    await poll(lambda: live_server.server.peer_verified("127.0.0.1"), "libcoap acknowledged the first answer")
    assert live_server.observer_count(counter) == 1
    for _ in range(2):
        live_server.bump_counter()
        await sleep(0.2)
    result = await done
    assert result.returncode == 0, stderr_of(result)
    assert [int(line) for line in result.stdout.split()][:3] == [0, 1, 2]
    first = [m for m in live_server.decoded(live_server.sent) if m.code == an.CONTENT][0]
    assert first.mtype == an.CON and first.opt.observe is not None
