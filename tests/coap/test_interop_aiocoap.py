"""Interop: aiocoap (client API and the ``aiocoap-client`` CLI) against CoapServer.

aiocoap is a CoAP implementation no one here wrote.  The server runs in-process
(``live_server`` in conftest.py); aiocoap runs in a worker thread with its own
asyncio loop, the CLI in a subprocess, so the Twisted reactor keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from typing import Any

import pytest
import pytest_twisted

from conftest import (LiveServer, aiocoap_client_path, in_thread, poll, run_aiocoap, run_command,
                      sleep)
from serve_testsite import DOWNLOAD, SLOW_DELAY

import aiocoap
from aiocoap import numbers as an
from aiocoap.optiontypes import BlockOption
from aiocoap.util import linkformat

UPLOAD = hashlib.shake_256(b"comatrix interop upload").digest(3 * 1024)
BLOCK_SIZES = {16: 0, 64: 2, 1024: 6}  # bytes -> SZX

METHODS = [
    (an.GET, an.CONTENT),
    (an.POST, an.CHANGED),
    (an.PUT, an.CHANGED),
    (an.DELETE, an.DELETED),
]


def block2_sizes(live: LiveServer) -> set[int]:
    """Block sizes (bytes) of every Block2 option the server sent."""
    return {2 ** (m.opt.block2.size_exponent + 4) for m in live.decoded(live.sent)
            if m.opt.block2 is not None}


def block1_sizes_received(live: LiveServer) -> set[int]:
    return {2 ** (m.opt.block1.size_exponent + 4) for m in live.decoded(live.received)
            if m.opt.block1 is not None}


# --------------------------------------------------------------------------- client API


@pytest.mark.parametrize("mtype", [an.CON, an.NON], ids=["CON", "NON"])
@pytest.mark.parametrize("method,code", METHODS, ids=[m.name for m, _ in METHODS])
@pytest_twisted.ensureDeferred
async def test_methods(live_server: LiveServer, mtype: Any, method: Any, code: Any) -> None:
    async def body(context: aiocoap.Context) -> tuple[Any, bytes, Any]:
        tuning = aiocoap.Reliable if mtype == an.CON else aiocoap.Unreliable
        request = aiocoap.Message(transport_tuning=tuning, code=method, uri=live_server.uri("echo"),
                                  payload=b"hello")
        response = await context.request(request).response
        return response.code, response.payload, response.mtype

    got_code, payload, got_mtype = await in_thread(run_aiocoap, body)
    assert got_code == code
    assert payload == method.name.encode() + b":hello"
    # CON -> piggy-backed in the ACK; NON -> a NON response and never an (empty) ACK.
    assert got_mtype == (an.ACK if mtype == an.CON else an.NON)
    if mtype == an.NON:
        assert all(m.mtype != an.ACK for m in live_server.decoded(live_server.sent))


@pytest_twisted.ensureDeferred
async def test_ipv6_loopback_get(live_server_v6: LiveServer) -> None:
    async def body(context: aiocoap.Context) -> tuple[Any, bytes]:
        response = await context.request(aiocoap.Message(code=an.GET, uri=live_server_v6.uri("echo"))).response
        return response.code, response.payload

    assert await in_thread(run_aiocoap, body) == (an.CONTENT, b"GET:")


@pytest_twisted.ensureDeferred
async def test_unknown_path_is_404(live_server: LiveServer) -> None:
    async def body(context: aiocoap.Context) -> Any:
        return (await context.request(aiocoap.Message(code=an.GET, uri=live_server.uri("nope"))).response).code

    assert await in_thread(run_aiocoap, body) == an.NOT_FOUND


@pytest_twisted.ensureDeferred
async def test_separate_response(live_server: LiveServer) -> None:
    """A CON request answered after the ACK delay: empty ACK first, then a CON response."""
    async def body(context: aiocoap.Context) -> tuple[Any, bytes]:
        response = await context.request(aiocoap.Message(code=an.GET, uri=live_server.uri("slow"))).response
        return response.code, response.payload

    assert SLOW_DELAY > 0.2
    assert await in_thread(run_aiocoap, body) == (an.CONTENT, b"slow")
    sent = live_server.decoded(live_server.sent)
    assert [m.mtype for m in sent] == [an.ACK, an.CON]
    assert sent[0].code == an.EMPTY and sent[1].code == an.CONTENT


@pytest.mark.parametrize("size", sorted(BLOCK_SIZES))
@pytest_twisted.ensureDeferred
async def test_block2_download(live_server: LiveServer, size: int) -> None:
    live_server.verify()  # a verified peer gets the block size it asks for
    async def body(context: aiocoap.Context) -> tuple[Any, bytes]:
        request = aiocoap.Message(code=an.GET, uri=live_server.uri("download"))
        request.opt.block2 = BlockOption.BlockwiseTuple(0, False, BLOCK_SIZES[size])
        response = await context.request(request).response
        return response.code, response.payload

    code, payload = await in_thread(run_aiocoap, body)
    assert code == an.CONTENT
    assert payload == DOWNLOAD
    assert block2_sizes(live_server) == {size}


# aiocoap 0.4 takes the Block1 size from a block1 option on the request (deprecated, still the
# only per-request way: the remote's size limit does not exist before the request is sent).
@pytest.mark.filterwarnings("ignore:Setting a block1 option:DeprecationWarning")
@pytest.mark.parametrize("size", sorted(BLOCK_SIZES))
@pytest_twisted.ensureDeferred
async def test_block1_upload_then_download(live_server: LiveServer, size: int) -> None:
    szx = BLOCK_SIZES[size]

    async def body(context: aiocoap.Context) -> tuple[Any, bytes, Any, bytes]:
        put = aiocoap.Message(code=an.PUT, uri=live_server.uri("upload"), payload=UPLOAD)
        put.opt.block1 = BlockOption.BlockwiseTuple(0, False, szx)
        stored = await context.request(put).response
        get = aiocoap.Message(code=an.GET, uri=live_server.uri("upload"))
        get.opt.block2 = BlockOption.BlockwiseTuple(0, False, szx)
        fetched = await context.request(get).response
        return stored.code, stored.payload, fetched.code, fetched.payload

    put_code, digest, get_code, fetched = await in_thread(run_aiocoap, body)
    assert put_code == an.CHANGED
    assert live_server.resources.upload.received == [UPLOAD]
    assert digest == hashlib.sha256(UPLOAD).hexdigest().encode()
    assert get_code == an.CONTENT and fetched == UPLOAD
    assert block1_sizes_received(live_server) == {size}
    # Intermediate Block1 replies are 2.31 Continue (RFC 7959 §2.3).
    continues = [m for m in live_server.decoded(live_server.sent) if m.opt.block1 is not None and m.opt.block1.more]
    assert continues and all(m.code == an.CONTINUE for m in continues)
    assert block2_sizes(live_server) == {size}


@pytest_twisted.ensureDeferred
async def test_observe_then_cancel_by_rst(make_live_server: Any) -> None:
    """Register, get >= 3 notifications, cancel in aiocoap; its RST must remove the observer.

    aiocoap cancels an observation by forgetting the token and rejecting the next
    *CON* notification with RST (it ignores unknown NON ones), so this server sends
    every notification as CON (``con_notification_interval=0``) and the test keeps
    notifying until the server has got the RST and dropped the observer.
    """
    from comatrix.coap.server import CoapSettings

    live_server = make_live_server(settings=CoapSettings(con_notification_interval=0.0))
    registered = threading.Event()
    cancelled = threading.Event()
    finish = threading.Event()
    counter = live_server.resources.counter

    async def body(context: aiocoap.Context) -> list[bytes]:
        request = context.request(aiocoap.Message(code=an.GET, uri=live_server.uri("counter"), observe=0))
        first = await request.response
        assert first.opt.observe is not None, "server did not accept the observation"
        payloads = [first.payload]
        registered.set()
        async for notification in request.observation:
            payloads.append(notification.payload)
            if len(payloads) >= 4:
                break
        request.observation.cancel()
        cancelled.set()
        # Stay alive (the socket open) so the server's next CON notification gets our RST.
        await asyncio.get_running_loop().run_in_executor(None, finish.wait, 60)
        return payloads

    done = in_thread(run_aiocoap, body)
    try:
        await poll(registered.is_set, "aiocoap's observation accepted")
        assert live_server.observer_count(counter) == 1
        assert live_server.observer_count() == 1
        for _ in range(200):
            if cancelled.is_set():
                break
            live_server.bump_counter()
            await sleep(0.05)
        assert cancelled.is_set(), "aiocoap did not receive 3 notifications"
        # Notify until the server sends a CON notification, gets aiocoap's RST and forgets the observer.
        for _ in range(400):
            if live_server.observer_count(counter) == 0:
                break
            live_server.bump_counter()
            await sleep(0.05)
        assert live_server.observer_count(counter) == 0
        assert live_server.observer_count() == 0
    finally:
        finish.set()
        payloads = await done
    values = [int(p) for p in payloads]
    assert len(values) >= 4
    assert values == sorted(values) and len(set(values)) == len(values)
    assert any(m.mtype == an.RST for m in live_server.decoded(live_server.received))
    # The observer went away through the RST, not through a deregistration request.
    assert counter.observe_values.count(1) == 0
    notifications = [m for m in live_server.decoded(live_server.sent) if m.opt.observe is not None]
    assert all(m.mtype == an.CON for m in notifications[1:])


@pytest_twisted.ensureDeferred
async def test_well_known_core_parsed_by_aiocoap(live_server: LiveServer) -> None:
    async def body(context: aiocoap.Context) -> tuple[Any, Any, str]:
        response = await context.request(
            aiocoap.Message(code=an.GET, uri=live_server.uri(".well-known/core"))).response
        return response.code, response.opt.content_format, response.payload.decode("utf-8")

    code, content_format, text = await in_thread(run_aiocoap, body)
    assert code == an.CONTENT
    assert content_format == 40
    links = {link.href: dict(link.attr_pairs) for link in linkformat.parse(text).links}
    assert {"/echo", "/upload", "/download", "/counter", "/slow"} <= set(links)
    counter = links["/counter"]
    assert counter["rt"] == "test.counter"
    assert counter["ct"] == "0"
    assert counter["title"] == "Counter"
    assert "obs" in counter and counter["obs"] is None
    download = links["/download"]
    assert download["rt"] == "test.download"
    assert download["ct"] == "42"
    assert download["title"] == "3 KB blob"
    assert download.get("sz") == str(len(DOWNLOAD))
    assert "obs" not in download


@pytest.mark.parametrize("query,expected", [
    ("rt=test.counter", ["/counter"]),
    ("rt=test.*counter", []),  # '*' is only a trailing prefix wildcard (RFC 6690 §4.1)
    ("rt=test.up*", ["/upload", "/upload2"]),
    ("href=/echo", ["/echo"]),
    ("href=/up*", ["/upload", "/upload2"]),
    ("title=Counter", ["/counter"]),
], ids=lambda value: str(value))
@pytest_twisted.ensureDeferred
async def test_well_known_core_filters(live_server: LiveServer, query: str, expected: list[str]) -> None:
    async def body(context: aiocoap.Context) -> tuple[Any, str]:
        response = await context.request(
            aiocoap.Message(code=an.GET, uri=live_server.uri(f".well-known/core?{query}"))).response
        return response.code, response.payload.decode("utf-8")

    code, text = await in_thread(run_aiocoap, body)
    assert code == an.CONTENT
    links = linkformat.parse(text).links if text else []
    assert sorted(link.href for link in links) == expected


# --------------------------------------------------------------------------- aiocoap-client CLI


@pytest.mark.parametrize("non", [False, True], ids=["CON", "NON"])
@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE"])
@pytest_twisted.ensureDeferred
async def test_cli_methods(live_server: LiveServer, method: str, non: bool) -> None:
    args = [aiocoap_client_path(), "-m", method, "--payload", "hi", live_server.uri("echo")]
    if non:
        args.insert(1, "--non")
    result = await run_command(args)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout.rstrip(b"\n") == method.encode() + b":hi"
    sent = live_server.decoded(live_server.sent)
    assert sent and all(m.mtype == (an.NON if non else an.ACK) for m in sent)


@pytest.mark.parametrize("size", sorted(BLOCK_SIZES))
@pytest_twisted.ensureDeferred
async def test_cli_block1_upload(live_server: LiveServer, size: int, tmp_path: Any) -> None:
    source = tmp_path / "upload.bin"
    source.write_bytes(UPLOAD)
    result = await run_command([aiocoap_client_path(), "-m", "PUT", "--payload", f"@{source}",
                                "--payload-initial-szx", str(BLOCK_SIZES[size]), live_server.uri("upload")])
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout.strip() == hashlib.sha256(UPLOAD).hexdigest().encode()
    assert live_server.resources.upload.received == [UPLOAD]
    assert block1_sizes_received(live_server) == {size}


@pytest_twisted.ensureDeferred
async def test_cli_block2_download(live_server: LiveServer, tmp_path: Any) -> None:
    # aiocoap-client has no option for the Block2 size; the sizes are covered by the API tests.
    result = await run_command([aiocoap_client_path(), live_server.uri("download")])
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == DOWNLOAD
    assert len(block2_sizes(live_server)) == 1


@pytest_twisted.ensureDeferred
async def test_cli_well_known_core(live_server: LiveServer) -> None:
    result = await run_command([aiocoap_client_path(), "--no-pretty-print", live_server.uri(".well-known/core")])
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    hrefs = {link.href for link in linkformat.parse(result.stdout.decode().strip()).links}
    assert {"/echo", "/upload", "/download", "/counter", "/slow"} <= hrefs


# --------------------------------------------------------------------------- concurrency, limits


@pytest.mark.filterwarnings("ignore:Setting a block1 option:DeprecationWarning")
@pytest.mark.parametrize("same_path", [False, True], ids=["two-paths", "same-path-request-tag"])
@pytest_twisted.ensureDeferred
async def test_concurrent_block1_uploads_from_one_peer(live_server: LiveServer, same_path: bool) -> None:
    """Two interleaved block-wise uploads from one aiocoap context (one source port).

    aiocoap changes the token on every block, so two uploads to the *same*
    resource can only be told apart with RFC 9175 Request-Tag, which aiocoap
    does not add by itself: the same-path case sets it explicitly.
    """
    bodies = [hashlib.shake_256(bytes([n])).digest(2048) for n in range(2)]
    paths = ["upload", "upload"] if same_path else ["upload", "upload2"]

    async def body(context: aiocoap.Context) -> list[tuple[Any, bytes]]:
        async def put(n: int) -> tuple[Any, bytes]:
            request = aiocoap.Message(code=an.POST, uri=live_server.uri(paths[n]), payload=bodies[n])
            request.opt.block1 = BlockOption.BlockwiseTuple(0, False, 0)  # 16-byte blocks: many rounds
            if same_path:
                request.opt.request_tag = [bytes([n + 1])]  # a repeatable option in aiocoap
            response = await context.request(request).response
            return response.code, response.payload
        return list(await asyncio.gather(put(0), put(1)))

    results = await in_thread(run_aiocoap, body)
    assert results == [(an.CHANGED, hashlib.sha256(data).hexdigest().encode()) for data in bodies]
    received = live_server.resources.upload.received + live_server.resources.upload2.received
    assert sorted(received) == sorted(bodies)
    tokens = {m.token for m in live_server.decoded(live_server.received)}
    assert len(tokens) > 2  # the interleaving really happened with changing tokens


@pytest_twisted.ensureDeferred
async def test_concurrent_block2_downloads_from_one_peer(live_server: LiveServer) -> None:
    async def body(context: aiocoap.Context) -> list[bytes]:
        async def get() -> bytes:
            request = aiocoap.Message(code=an.GET, uri=live_server.uri("download"))
            request.opt.block2 = BlockOption.BlockwiseTuple(0, False, 0)
            return (await context.request(request).response).payload
        return list(await asyncio.gather(get(), get(), get()))

    assert await in_thread(run_aiocoap, body) == [DOWNLOAD] * 3


@pytest_twisted.ensureDeferred
async def test_upload_over_the_cap_is_4_13(live_server: LiveServer) -> None:
    too_big = bytes(live_server.server.settings.max_body_size + 1)

    async def body(context: aiocoap.Context) -> tuple[Any, Any]:
        response = await context.request(
            aiocoap.Message(code=an.PUT, uri=live_server.uri("upload"), payload=too_big)).response
        return response.code, response.opt.size1

    code, size1 = await in_thread(run_aiocoap, body)
    assert code == an.REQUEST_ENTITY_TOO_LARGE
    assert size1 == live_server.server.settings.max_body_size
    assert live_server.resources.upload.received == []


@pytest_twisted.ensureDeferred
async def test_accept_not_available_is_4_06(live_server: LiveServer) -> None:
    async def body(context: aiocoap.Context) -> list[Any]:
        codes = []
        for accept in (42, 60):
            request = aiocoap.Message(code=an.GET, uri=live_server.uri("echo"))
            request.opt.accept = accept
            codes.append((await context.request(request).response).code)
        return codes

    assert await in_thread(run_aiocoap, body) == [an.CONTENT, an.NOT_ACCEPTABLE]


@pytest_twisted.ensureDeferred
async def test_observe_blockwise_resource(live_server: LiveServer) -> None:
    """aiocoap observes a resource larger than its 16-byte blocks; each notification reassembles consistently."""
    big = live_server.resources.bigcounter
    registered = threading.Event()
    got = threading.Event()
    payloads: list[bytes] = []

    async def body(context: aiocoap.Context) -> None:
        message = aiocoap.Message(code=an.GET, uri=live_server.uri("bigcounter"), observe=0)
        message.opt.block2 = BlockOption.BlockwiseTuple(0, False, 0)
        request = context.request(message)
        payloads.append((await request.response).payload)
        registered.set()
        async for notification in request.observation:
            payloads.append(notification.payload)
            got.set()
            if len(payloads) >= 4:
                break
        request.observation.cancel()

    done = in_thread(run_aiocoap, body)
    await poll(registered.is_set, "aiocoap's observation accepted")
    for _ in range(3):
        got.clear()
        live_server.bump_counter(big=True)
        await poll(got.is_set, "aiocoap reassembled a notification")
    await done
    assert len(payloads) == 4
    for n, payload in enumerate(payloads):
        assert payload == f"{n:08d}".encode() * big.REPEAT
    assert block2_sizes(live_server) == {16}


@pytest.mark.parametrize("mtype", [an.CON, an.NON], ids=["CON", "NON"])
@pytest_twisted.ensureDeferred
async def test_many_concurrent_separate_responses(live_server: LiveServer, mtype: Any) -> None:
    """20 slow requests at once from one peer: with NSTART=1 the CON answers queue, but all arrive."""
    async def body(context: aiocoap.Context) -> list[tuple[Any, bytes]]:
        tuning = aiocoap.Reliable if mtype == an.CON else aiocoap.Unreliable

        async def get() -> tuple[Any, bytes]:
            request = aiocoap.Message(transport_tuning=tuning, code=an.GET, uri=live_server.uri("slow"))
            response = await context.request(request).response
            return response.code, response.payload
        return list(await asyncio.gather(*(get() for _ in range(20))))

    assert await in_thread(run_aiocoap, body) == [(an.CONTENT, b"slow")] * 20
    sent = live_server.decoded(live_server.sent)
    if mtype == an.CON:
        assert sum(1 for m in sent if m.mtype == an.ACK and m.code == an.EMPTY) == 20
        assert sum(1 for m in sent if m.mtype == an.CON and m.code == an.CONTENT) >= 20
    else:
        assert [m.mtype for m in sent] == [an.NON] * 20


# --------------------------------------------------------------------------- amplification limit (unverified peer)


def within_budget(live: LiveServer, host: str = "127.0.0.1") -> bool:
    received, sent = live.bytes_to(host)
    return 0 < sent <= 3 * received


@pytest_twisted.ensureDeferred
async def test_unverified_blockwise_download_within_budget(live_server: LiveServer) -> None:
    async def body(context: aiocoap.Context) -> tuple[Any, bytes]:
        response = await context.request(aiocoap.Message(code=an.GET, uri=live_server.uri("download"))).response
        return response.code, response.payload

    code, payload = await in_thread(run_aiocoap, body)
    assert (code, payload) == (an.CONTENT, DOWNLOAD)
    assert max(block2_sizes(live_server)) < 1024 and within_budget(live_server)


@pytest_twisted.ensureDeferred
async def test_unverified_cli_well_known_core_and_download_within_budget(live_server: LiveServer) -> None:
    result = await run_command([aiocoap_client_path(), "--no-pretty-print", live_server.uri(".well-known/core")])
    assert result.returncode == 0 and b"/download" in result.stdout
    result = await run_command([aiocoap_client_path(), live_server.uri("download")])
    assert result.returncode == 0 and result.stdout == DOWNLOAD
    assert within_budget(live_server)


@pytest_twisted.ensureDeferred
async def test_aiocoap_gets_the_echo_challenge_and_can_repeat_it(live_server: LiveServer) -> None:
    """aiocoap 0.4.17 does not repeat a request after 4.01 + Echo itself (only OSCORE's recovery does).

    The application sees the 4.01 with the Echo option and repeats with it.
    """
    async def body(context: aiocoap.Context) -> tuple[Any, Any, Any, bytes]:
        first = await context.request(aiocoap.Message(code=an.GET, uri=live_server.uri("e"))).response
        again = aiocoap.Message(code=an.GET, uri=live_server.uri("e"))
        again.opt.echo = first.opt.echo
        second = await context.request(again).response
        return first.code, first.opt.echo, second.code, second.payload

    first_code, echo, second_code, payload = await in_thread(run_aiocoap, body)
    assert first_code == an.UNAUTHORIZED and echo is not None
    assert (second_code, payload) == (an.CONTENT, DOWNLOAD)
    assert live_server.server.peer_verified("127.0.0.1")
