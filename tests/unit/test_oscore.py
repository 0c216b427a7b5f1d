"""OSCORE (RFC 8613): Appendix C test vectors, the option codec, and the layer inside the real CoAP server.

The in-memory tests drive `comatrix.coap.server.CoapServer` through the test
`Harness` with `OscoreLayer` as its protection; the device's side is
`support.oscore_peer.OscorePeer`.  Real-peer tests (aiocoap) live in
``tests/integration/test_oscore_aiocoap.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from comatrix.coap import wire
from comatrix.coap.blockwise import Block
from comatrix.coap.message import Request, Response, Security
from comatrix.coap.numbers import Code, ContentFormat, MessageType, OptionNumber
from comatrix.coap.resource import CoapResource, LinkAttributes
from comatrix.coap.secured import Refused, Unprotected
from comatrix.coap.server import Site
from comatrix.coap.testing import Harness, option
from comatrix.oscore import ContextStore, OscoreLayer, SequenceFile
from comatrix.oscore.context import (REPLAY_WINDOW_SIZE, ReplayWindow, SecurityContext, SequenceExhausted,
                                     aad_for, derive, encode_piv)
from comatrix.oscore.cose import OscoreOption, decode_plaintext, encode_plaintext
from comatrix.oscore.layer import ECHO_OPTION, OscoreExchange
from support.oscore_peer import OscorePeer

H = bytes.fromhex
SECRET = H("0102030405060708090a0b0c0d0e0f10")
SALT = H("9e7ca92223786340")
ID_CONTEXT = H("37cbf3210017a2d3")


# ---------------------------------------------------------------- Appendix C.1-C.3: key derivation

@pytest.mark.parametrize("salt, sender, recipient, id_context, sender_key, recipient_key, common_iv, "
                         "sender_nonce, recipient_nonce", [
    # C.1 (client side; the server side is the same with ids and keys swapped)
    (SALT, b"", b"\x01", None, "f0910ed7295e6ad4b54fc793154302ff", "ffb14e093c94c9cac9471648b4f98710",
     "4622d4dd6d944168eefb54987c", "4622d4dd6d944168eefb54987c", "4722d4dd6d944169eefb54987c"),
    (SALT, b"\x01", b"", None, "ffb14e093c94c9cac9471648b4f98710", "f0910ed7295e6ad4b54fc793154302ff",
     "4622d4dd6d944168eefb54987c", "4722d4dd6d944169eefb54987c", "4622d4dd6d944168eefb54987c"),
    # C.2: no master salt
    (b"", b"\x00", b"\x01", None, "321b26943253c7ffb6003b0b64d74041", "e57b5635815177cd679ab4bcec9d7dda",
     "be35ae297d2dace910c52e99f9", "bf35ae297d2dace910c52e99f9", "bf35ae297d2dace810c52e99f9"),
    (b"", b"\x01", b"\x00", None, "e57b5635815177cd679ab4bcec9d7dda", "321b26943253c7ffb6003b0b64d74041",
     "be35ae297d2dace910c52e99f9", "bf35ae297d2dace810c52e99f9", "bf35ae297d2dace910c52e99f9"),
    # C.3: with an ID Context
    (SALT, b"", b"\x01", ID_CONTEXT, "af2a1300a5e95788b356336eeecd2b92", "e39a0c7c77b43f03b4b39ab9a268699f",
     "2ca58fb85ff1b81c0b7181b85e", "2ca58fb85ff1b81c0b7181b85e", "2da58fb85ff1b81d0b7181b85e"),
    (SALT, b"\x01", b"", ID_CONTEXT, "e39a0c7c77b43f03b4b39ab9a268699f", "af2a1300a5e95788b356336eeecd2b92",
     "2ca58fb85ff1b81c0b7181b85e", "2da58fb85ff1b81d0b7181b85e", "2ca58fb85ff1b81c0b7181b85e"),
])
def test_key_derivation_vectors(salt: bytes, sender: bytes, recipient: bytes, id_context: bytes | None,
                                sender_key: str, recipient_key: str, common_iv: str,
                                sender_nonce: str, recipient_nonce: str) -> None:
    context = SecurityContext(sender, recipient, SECRET, salt, id_context)
    assert context.sender_key.hex() == sender_key
    assert context.recipient_key.hex() == recipient_key
    assert context.common_iv.hex() == common_iv
    assert context.sender_nonce(b"\x00").hex() == sender_nonce
    assert context.recipient_nonce(b"\x00").hex() == recipient_nonce


def test_derivation_info_matches_c1() -> None:
    # The info structure itself (C.1.1): the derived bytes above depend on exactly this.
    import cbor2
    assert cbor2.dumps([b"", None, 10, "Key", 16]).hex() == "8540f60a634b657910"
    assert cbor2.dumps([b"", None, 10, "IV", 13]).hex() == "8540f60a6249560d"
    assert derive(SECRET, SALT, b"", None, "IV", 13).hex() == "4622d4dd6d944168eefb54987c"


def test_aad_example_of_section_5_4() -> None:
    assert aad_for(b"\x00", b"\x25").hex() == "8368456e63727970743040498501810a4100412540"


# ---------------------------------------------------------------- Appendix C.4-C.6: protected requests

REQUEST_VECTORS = [
    # (salt, client sender id, id context, unprotected request, OSCORE option, ciphertext, protected request)
    (SALT, b"", None, "44015d1f00003974396c6f63616c686f737483747631", "0914", "612f1092f1776f1c1668b3825e",
     "44025d1f00003974396c6f63616c686f7374620914ff612f1092f1776f1c1668b3825e"),
    (b"", b"\x00", None, "440171c30000b932396c6f63616c686f737483747631", "091400", "4ed339a5a379b0b8bc731fffb0",
     "440271c30000b932396c6f63616c686f737463091400ff4ed339a5a379b0b8bc731fffb0"),
    (SALT, b"", ID_CONTEXT, "44012f8eef9bbf7a396c6f63616c686f737483747631", "19140837cbf3210017a2d3",
     "72cd7273fd331ac45cffbe55c3",
     "44022f8eef9bbf7a396c6f63616c686f73746b19140837cbf3210017a2d3ff72cd7273fd331ac45cffbe55c3"),
]


def _client_protects(salt: bytes, sender: bytes, id_context: bytes | None, unprotected: bytes) -> bytes:
    """What a client does (§8.1) with sequence number 20, built from our primitives."""
    client = SecurityContext(sender, b"\x01" if sender != b"\x01" else b"\x00", SECRET, salt, id_context)
    message = wire.decode(unprotected)
    outer = [(n, v) for n, v in message.options if n == OptionNumber.URI_HOST]
    inner = [(n, v) for n, v in message.options if n != OptionNumber.URI_HOST]
    piv = encode_piv(20)
    plaintext = encode_plaintext(message.code, inner, message.payload)
    assert plaintext.hex() == "01b3747631"
    ciphertext = client.seal(client.sender_nonce(piv), plaintext, aad_for(sender, piv))
    outer.append((OptionNumber.OSCORE, OscoreOption(piv=piv, kid=sender, kid_context=id_context).encode()))
    return wire.encode(message.mtype, Code.POST, message.mid, message.token, outer, ciphertext)


@pytest.mark.parametrize("salt, sender, id_context, unprotected, option_value, ciphertext, protected",
                         REQUEST_VECTORS)
def test_request_vectors(salt: bytes, sender: bytes, id_context: bytes | None, unprotected: str,
                         option_value: str, ciphertext: str, protected: str) -> None:
    assert _client_protects(salt, sender, id_context, H(unprotected)).hex() == protected
    message = wire.decode(H(protected))
    assert OscoreOption.decode(option(message, OptionNumber.OSCORE) or b"").encode().hex() == option_value
    assert message.payload.hex() == ciphertext
    # The gateway's side: its recipient id is the client's sender id.
    store = ContextStore()
    server = store.add(b"\x01" if sender != b"\x01" else b"\x00", sender, SECRET, salt, id_context,
                       persistent=False)
    server.replay.establish(19)
    outcome = OscoreLayer(store).unprotect(message)
    assert isinstance(outcome, Unprotected)
    assert outcome.security == Security("oscore", sender.hex())
    inner = outcome.message
    assert (inner.code, inner.mid, inner.token) == (Code.GET, message.mid, message.token)
    assert sorted(inner.options) == [(OptionNumber.URI_HOST, b"localhost"), (OptionNumber.URI_PATH, b"tv1")]


# ---------------------------------------------------------------- Appendix C.7-C.8: protected responses

def _c4_exchange(sequence_start: int = 0) -> tuple[OscoreLayer, OscoreExchange]:
    store = ContextStore()
    server = store.add(b"\x01", b"", SECRET, SALT, persistent=False)
    server.sequence.next = sequence_start
    return OscoreLayer(store), OscoreExchange(server, b"", b"\x14")


def test_response_vector_reusing_the_request_nonce() -> None:  # C.7
    layer, exchange = _c4_exchange()
    code, options, payload = layer.protect(exchange, Code.CONTENT, [], b"Hello World!")
    data = wire.encode(MessageType.ACK, code, 0x5D1F, H("00003974"), options, payload)
    assert data.hex() == "64445d1f0000397490ffdbaad1e9a7e7b2a813d3c31524378303cdafae119106"


def test_response_vector_with_partial_iv() -> None:  # C.8
    layer, exchange = _c4_exchange()
    exchange.fresh_piv = True
    code, options, payload = layer.protect(exchange, Code.CONTENT, [], b"Hello World!")
    data = wire.encode(MessageType.ACK, code, 0x5D1F, H("00003974"), options, payload)
    assert data.hex() == "64445d1f00003974920100ff4d4c13669384b67354b2b6175ff4b8658c666a6cf88e"
    assert exchange.context.sequence.next == 1


# ---------------------------------------------------------------- codecs and the replay window

@pytest.mark.parametrize("value", ["", "0914", "091400", "19140837cbf3210017a2d3", "0100", "0d0102030405"])
def test_option_round_trip(value: str) -> None:
    assert OscoreOption.decode(H(value)).encode().hex() == value


@pytest.mark.parametrize("value", ["20", "06", "07", "0501", "10", "1005ab", "0114ff"])
def test_malformed_option_values(value: str) -> None:
    with pytest.raises(ValueError):
        OscoreOption.decode(H(value))


def test_plaintext_round_trip_and_garbage() -> None:
    plaintext = encode_plaintext(Code.POST, [(11, b"send"), (12, b"\x3c")], b"\xa1\x01\x02")
    inner = decode_plaintext(plaintext)
    assert (inner.code, inner.options, inner.payload) == (Code.POST, [(11, b"send"), (12, b"\x3c")], b"\xa1\x01\x02")
    for garbage in (b"", b"\x02\xff", b"\x02\xf0"):
        with pytest.raises(ValueError):
            decode_plaintext(garbage)


def test_replay_window_slides_over_32() -> None:
    window = ReplayWindow()
    assert not window.established
    window.establish(100)
    assert not window.is_fresh(100) and not window.is_fresh(80)  # at or below the lower limit
    for seq in (105, 103, 140):
        assert window.is_fresh(seq)
        window.mark(seq)
        assert not window.is_fresh(seq)
    assert window.is_fresh(139) and window.is_fresh(140 - REPLAY_WINDOW_SIZE + 1)
    assert not window.is_fresh(140 - REPLAY_WINDOW_SIZE)  # fell out of the window
    assert not window.is_fresh(105)


def test_a_jump_to_the_largest_partial_iv_costs_a_small_window() -> None:
    window = ReplayWindow()
    window.establish(5)
    top = (1 << 40) - 1  # the largest 5-byte Partial IV, from a device with the key
    window.mark(top)
    assert not window.is_fresh(top) and window.is_fresh(top - 1) and not window.is_fresh(6)
    assert window._seen.bit_length() <= REPLAY_WINDOW_SIZE


# ---------------------------------------------------------------- the layer inside the CoAP server

RID, SID = b"\x01", b""


class Echoing(CoapResource):
    """POST echoes who asked; GET answers a large body (block-wise); observable."""

    link = LinkAttributes(obs=True)

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Request] = []
        self.body = b"0123456789abcdef" * 40

    def render_POST(self, request: Request) -> Response:
        self.seen.append(request)
        return Response(code=Code.CHANGED, payload=request.payload[::-1], content_format=ContentFormat.OCTET_STREAM)

    def render_GET(self, request: Request) -> Response:
        self.seen.append(request)
        return Response(payload=self.body, content_format=ContentFormat.OCTET_STREAM)


def _gateway(window_known: bool = True) -> tuple[Harness, Echoing, SecurityContext]:
    site = Site()
    resource = Echoing()
    site.put(("thing",), resource)
    store = ContextStore()
    context = store.add(SID, RID, SECRET, SALT, persistent=False)
    if window_known:
        context.replay.establish(0)
    harness = Harness(site, protection=OscoreLayer(store))
    return harness, resource, context


def _peer(sequence: int = 1) -> OscorePeer:
    return OscorePeer(RID, SID, SECRET, SALT, sequence=sequence)


def _text(message: wire.Datagram) -> bytes:
    return message.payload


def test_a_protected_request_reaches_the_site_with_its_security_and_the_answer_is_protected() -> None:
    harness, resource, _ = _gateway()
    peer = _peer()
    [reply] = harness.send_raw(peer.request(Code.POST, ("thing",), payload=b"abc"))
    assert reply.code == Code.CHANGED  # the outer code of every non-Observe answer
    assert option(reply, OptionNumber.OSCORE) == b""  # the request's nonce is reused: no Partial IV
    inner = peer.verify(reply)
    assert (inner.code, inner.payload) == (Code.CHANGED, b"cba")
    assert (OptionNumber.CONTENT_FORMAT, b"\x2a") in inner.options
    [request] = resource.seen
    assert request.security == Security("oscore", "01") and request.path == ("thing",)
    # Outer overhead of this answer: the empty OSCORE option (1 byte) and the 8-byte tag.


def test_replayed_datagram_from_elsewhere_is_rejected_and_reaches_nothing() -> None:
    harness, resource, _ = _gateway()
    data = _peer().request(Code.POST, ("thing",), payload=b"abc")
    harness.send_raw(data)
    # The same bytes again from another port (past the message layer's deduplication).
    [reply] = harness.send_raw(data, ("2001:db8::66", 5555))
    assert (reply.code, reply.payload) == (Code.UNAUTHORIZED, b"Replay detected")
    assert option(reply, OptionNumber.OSCORE) is None  # OSCORE errors go out unprotected
    assert len(resource.seen) == 1
    # The same datagram from the same peer and message id is a CoAP duplicate: the cached answer.
    [again] = harness.send_raw(data)
    assert again.code == Code.CHANGED and len(resource.seen) == 1


def test_tampered_ciphertext_unknown_kid_and_garbage_option() -> None:
    harness, resource, _ = _gateway()
    peer = _peer()
    data = bytearray(peer.request(Code.POST, ("thing",), payload=b"abc", mid=7))
    data[-1] ^= 0x01
    [reply] = harness.send_raw(bytes(data))
    assert (reply.code, reply.payload) == (Code.BAD_REQUEST, b"Decryption failed")
    stranger = OscorePeer(b"\x42", SID, SECRET, SALT)
    [reply] = harness.send_raw(stranger.request(Code.POST, ("thing",), mid=8))
    assert (reply.code, reply.payload) == (Code.UNAUTHORIZED, b"Security context not found")
    [reply] = harness.send(Code.POST, mid=9, options=[(OptionNumber.OSCORE, b"\xe0")], payload=b"x" * 12)
    assert (reply.code, reply.payload) == (Code.BAD_OPTION, b"Failed to decode COSE")
    assert resource.seen == []
    # The tampered request's sequence number was not consumed: the genuine one still works.
    retry = OscorePeer(RID, SID, SECRET, SALT, sequence=1)
    [reply] = harness.send_raw(retry.request(Code.POST, ("thing",), payload=b"abc", mid=10))
    assert retry.verify(reply).payload == b"cba"


def test_without_a_layer_option_9_is_still_a_bad_option() -> None:
    site = Site()
    site.put(("thing",), Echoing())
    [reply] = Harness(site).send_raw(_peer().request(Code.POST, ("thing",)))
    assert reply.code == Code.BAD_OPTION


def test_after_a_start_the_first_request_gets_an_echo_challenge_and_the_repeat_sets_the_window() -> None:
    harness, resource, context = _gateway(window_known=False)
    peer = _peer(sequence=50)
    [challenge] = harness.send_raw(peer.request(Code.POST, ("thing",), payload=b"one", mid=1))
    oscore = OscoreOption.decode(option(challenge, OptionNumber.OSCORE) or b"")
    assert oscore.piv is not None  # B.1.2: a Partial IV of the gateway's own
    inner = peer.verify(challenge)
    assert inner.code == Code.UNAUTHORIZED and inner.payload == b""
    echo = option(inner, ECHO_OPTION)
    assert echo is not None and len(echo) == 8
    assert resource.seen == []
    # An old request replayed now is challenged too, never served.
    old = OscorePeer(RID, SID, SECRET, SALT, sequence=3)
    [reply] = harness.send_raw(old.request(Code.POST, ("thing",), payload=b"old", mid=2))
    assert option(old.verify(reply), ECHO_OPTION) == echo and resource.seen == []
    # The repeat with the Echo value is served and sets the replay window.
    [reply] = harness.send_raw(peer.request(Code.POST, ("thing",), payload=b"one",
                                            options=[(ECHO_OPTION, echo)], mid=3))
    assert peer.verify(reply).payload == b"eno" and len(resource.seen) == 1
    assert (ECHO_OPTION, echo) not in resource.seen[0].options.items()
    [reply] = harness.send_raw(old.request(Code.POST, ("thing",), payload=b"old", mid=4))
    assert reply.payload == b"Replay detected"  # below the window's new lower limit
    [reply] = harness.send_raw(peer.request(Code.POST, ("thing",), payload=b"two", mid=5))
    assert peer.verify(reply).payload == b"owt"


def test_observe_notifications_carry_fresh_partial_ivs() -> None:
    harness, resource, context = _gateway()
    peer = _peer()
    [first] = harness.send_raw(peer.request(Code.GET, ("thing",), options=[(OptionNumber.OBSERVE, b"")],
                                            token=b"\x0b"))
    registration_piv = peer.last_piv
    assert first.code == Code.CONTENT and option(first, OptionNumber.OBSERVE) is not None
    pivs = [OscoreOption.decode(option(first, OptionNumber.OSCORE) or b"").piv]
    inner = peer.verify(first, registration_piv)
    assert option(inner, OptionNumber.OBSERVE) == b""  # §4.1.3.5.2: the inner Observe is empty
    for _ in range(3):
        resource.notify_observers()
        [note] = harness.replies()
        assert note.token == b"\x0b"
        pivs.append(OscoreOption.decode(option(note, OptionNumber.OSCORE) or b"").piv)
        assert peer.verify(note, registration_piv).payload[:16] == b"0123456789abcdef"
    assert None not in pivs and len(set(pivs)) == 4
    assert [int.from_bytes(p or b"", "big") for p in pivs] == sorted(int.from_bytes(p or b"", "big") for p in pivs)


def test_blockwise_download_inside_oscore() -> None:
    harness, resource, _ = _gateway()
    peer = _peer()
    body = b""
    for num in range(20):
        block = Block(num, False, 2)  # 64-byte blocks, inner Block2
        [reply] = harness.send_raw(peer.request(Code.GET, ("thing",), options=[(OptionNumber.BLOCK2, block.encode())],
                                                mid=100 + num))
        inner = peer.verify(reply)
        body += inner.payload
        got = Block.decode(option(inner, OptionNumber.BLOCK2) or b"")
        assert option(reply, OptionNumber.BLOCK2) is None  # never outer
        if not got.more:
            break
    assert body == resource.body


def test_outer_block_options_are_refused() -> None:
    harness, resource, _ = _gateway()
    data = wire.decode(_peer().request(Code.POST, ("thing",), payload=b"abc"))
    outer = data.options + [(OptionNumber.BLOCK1, Block(0, True, 2).encode())]
    [reply] = harness.send_raw(wire.encode(data.mtype, data.code, data.mid, data.token, outer, data.payload))
    assert reply.code == Code.BAD_OPTION and resource.seen == []


def test_a_plain_request_cannot_fetch_blocks_of_a_protected_representation() -> None:
    harness, resource, _ = _gateway()
    peer = _peer()
    [reply] = harness.send_raw(peer.request(Code.GET, ("thing",), options=[(OptionNumber.BLOCK2, Block(0, False, 2).encode())]))
    assert Block.decode(option(peer.verify(reply), OptionNumber.BLOCK2) or b"").more
    [plain] = harness.send(Code.GET, ("thing",), options=[(OptionNumber.BLOCK2, Block(1, False, 2).encode())],
                           mid=99)
    assert option(plain, OptionNumber.OSCORE) is None
    assert len(resource.seen) == 2  # rendered afresh for the plain request, not served from the protected cache


# ---------------------------------------------------------------- sender sequence numbers across restarts

def test_sequence_numbers_wait_for_their_bound() -> None:
    store = ContextStore(SequenceFile("/nonexistent/never-written", reactor))
    context = store.add(SID, RID, SECRET, SALT)
    with pytest.raises(SequenceExhausted):
        context.sequence.take()  # nothing reserved on disk yet: no number may be used


@pytest_twisted.ensureDeferred
async def test_sequence_numbers_persist_with_a_jump_and_never_repeat(tmp_path: Path) -> None:
    path = tmp_path / "oscore-sequence.json"

    def start() -> SecurityContext:
        sequences = SequenceFile(path, reactor)
        sequences.load()
        store = ContextStore(sequences, step=10)
        context = store.add(SID, RID, SECRET, SALT)
        store.write_bounds()
        return context

    context = start()
    assert json.loads(path.read_text()) == {"01:": 10}
    used = []
    for _ in range(30):
        try:
            used.append(context.sequence.take())
        except SequenceExhausted:
            pass
        await _settle()
    assert used[:8] == list(range(8))
    assert json.loads(path.read_text())["01:"] > max(used)
    # "Restart": a new context from the same file resumes above everything used.
    after = start()
    first_after = after.sequence.take()
    assert first_after > max(used)
    assert json.loads(path.read_text())["01:"] > first_after


async def _settle() -> None:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(0.01, d.callback, None)
    await d


def test_refused_outcome_of_unknown_kid_is_unprotected() -> None:
    store = ContextStore()
    outcome = OscoreLayer(store).unprotect(wire.decode(_peer().request(Code.POST, ("thing",))))
    assert isinstance(outcome, Refused) and outcome.exchange is None
    assert outcome.response.max_age == 0


def test_oscore_entries_without_a_state_dir_stop_the_start(tmp_path: Path) -> None:
    from comatrix.config import build_config
    from comatrix.tap import build_oscore
    oscore = {"recipient_id": "01", "sender_id": "", "master_secret": SECRET.hex()}
    devices = build_config({"devices": [{"access_token": "t", "oscore": oscore}]}).devices
    with pytest.raises(SystemExit, match="need state_dir"):
        build_oscore(devices, None, reactor)
    layer = build_oscore(devices, str(tmp_path / "state"), reactor)
    assert layer.contexts.find(b"\x01") is not None
    assert json.loads((tmp_path / "state" / "oscore-sequence.json").read_text()) == {"01:": 100}
    assert SECRET.hex() not in (tmp_path / "state" / "oscore-sequence.json").read_text()


def test_a_compact_session_opened_through_oscore_is_bound_to_the_context_not_the_address() -> None:
    import cbor2
    import support.world
    from comatrix.discovery import build_site
    from comatrix.errors import error_response
    from test_bad_input_profiles import COMPACT_PLUGINS, site_context

    world = support.world.World()
    store = ContextStore()
    store.add(SID, RID, SECRET, SALT, persistent=False).replay.establish(0)
    harness = Harness(build_site(COMPACT_PLUGINS, site_context(world), error_response), protection=OscoreLayer(store))
    peer = _peer()
    cbor = [(int(OptionNumber.CONTENT_FORMAT), b"\x3c")]
    [reply] = harness.send_raw(peer.request(Code.POST, ("+",), payload=cbor2.dumps(["d", "pw"]), options=cbor))
    login = peer.verify(reply)
    assert login.code == Code.CREATED, login
    handle = cbor2.loads(login.payload)
    join = cbor2.dumps([handle, world.alias])
    # The handle in plain CoAP from the very address the login came from: refused.
    [plain] = harness.send(Code.POST, ("x",), payload=join, options=cbor, mid=500)
    assert plain.code == Code.FORBIDDEN
    # Through the context from another address: the session's own device.
    [reply] = harness.send_raw(peer.request(Code.POST, ("x",), payload=join, options=cbor, mid=501),
                               ("2001:db8::99", 1234))
    assert peer.verify(reply).code == Code.CHANGED


def test_plain_requests_cannot_cancel_or_take_over_a_protected_observation() -> None:
    harness, resource, _ = _gateway()
    peer = _peer()
    [first] = harness.send_raw(peer.request(Code.GET, ("thing",), options=[(OptionNumber.OBSERVE, b"")],
                                            token=b"\x0b", mid=1))
    registration = peer.last_piv
    assert harness.server.observer_count(resource) == 1
    harness.send(Code.GET, ("thing",), token=b"\x0b", options=[(OptionNumber.OBSERVE, b"\x01")], mid=2)
    harness.send(Code.GET, ("thing",), token=b"\x0b", options=[(OptionNumber.OBSERVE, b"")], mid=3)
    assert harness.server.observer_count(resource) == 2  # the plain one is its own observation
    resource.notify_observers()
    notes = harness.replies()
    protected = [n for n in notes if option(n, OptionNumber.OSCORE) is not None]
    assert len(protected) == 1 and peer.verify(protected[0], registration).code == Code.CONTENT
