"""Property-based round trips of the compact profile's layouts, and the exact sizes of the spec examples."""

from __future__ import annotations

import base64

import cbor2
import pytest
from hypothesis import given, strategies as st

from comatrix.client import UdpCoap
from comatrix.coap.numbers import Code, MessageType
from comatrix.compact import codec
from comatrix.compact.codec import (BUDGETS, PATHS, HandleRequest, JoinRequest, LoginRequest, Message,
                                    MessagesRequest, SendRequest)

handles = st.binary(min_size=8, max_size=8)
uints = st.integers(min_value=0, max_value=codec.MAX_UINT)
texts = st.text(min_size=1, max_size=200)
room_hashes = st.binary(min_size=32, max_size=32)

SPEC_ROOM = "!" + base64.urlsafe_b64encode(bytes(range(32))).decode().rstrip("=")
SPEC_SENDER = "@sensor01:example.org"
BODY20 = "temperature=21.5C ok"
TOKEN = b"\x4a\x7e"  # two-byte CoAP token, as the reference client and gcoap use
HANDLE = bytes.fromhex("8c1f3a9e02d47b65")


@given(handles, uints, uints, texts)
def test_send_round_trip(handle: bytes, room: int, seq: int, body: str) -> None:
    request = SendRequest(handle, room, seq, body)
    assert SendRequest.decode(request.encode()) == request


@given(handles, uints, st.none() | uints)
def test_messages_round_trip(handle: bytes, room: int, cursor: int | None) -> None:
    request = MessagesRequest(handle, room, cursor)
    assert MessagesRequest.decode(request.encode()) == request


@given(st.text(), st.text(), uints, uints)
def test_message_round_trip(sender: str, body: str, ts: int, cursor: int) -> None:
    message = Message(sender, body, ts, cursor)
    assert codec.decode_message(codec.encode_message(message)) == message
    assert codec.decode_message(codec.encode_message(None)) is None


@given(texts, texts, handles)
def test_login_logout_round_trip(user: str, password: str, handle: bytes) -> None:
    assert LoginRequest.decode(LoginRequest(user, password).encode()) == LoginRequest(user, password)
    assert HandleRequest.decode(HandleRequest(handle).encode()) == HandleRequest(handle)
    assert codec.decode_handle(codec.encode_handle(handle)) == handle


@given(handles, room_hashes)
def test_room_ids_of_version_12_travel_as_their_hash(handle: bytes, raw: bytes) -> None:
    room_id = codec.room_id_from_hash(raw)
    assert len(room_id) == 44 and codec.room_id_to_hash(room_id) == raw
    join = JoinRequest.for_room(handle, room_id)
    assert join.room == raw
    decoded = JoinRequest.decode(join.encode())
    assert decoded == join and decoded.room_text() == room_id


@given(handles, st.sampled_from(["#lab:example.org", "!old:example.org", "lab", "!short"]))
def test_other_room_references_travel_as_text(handle: bytes, room: str) -> None:
    join = JoinRequest.for_room(handle, room)
    assert join.room == room and JoinRequest.decode(join.encode()).room_text() == room


@pytest.mark.parametrize("payload", [
    b"", b"\xff", cbor2.dumps({"a": 1}), cbor2.dumps([b"short", 0, 1, "x"]),
    cbor2.dumps([HANDLE, -1, 1, "x"]), cbor2.dumps([HANDLE, True, 1, "x"]), cbor2.dumps([HANDLE, 0, 1, ""]),
    cbor2.dumps([HANDLE, 0, 1, b"bytes"]), cbor2.dumps([HANDLE, 0, 1]), cbor2.dumps([HANDLE, 0, 2 ** 64, "x"]),
    cbor2.dumps([HANDLE, 0, 1, "x" * (codec.MAX_BODY + 1)]),
])
def test_malformed_send_is_a_codec_error(payload: bytes) -> None:
    with pytest.raises(codec.CodecError):
        SendRequest.decode(payload)


def test_malformed_join_and_messages() -> None:
    for payload in (cbor2.dumps([HANDLE, b"x" * 31]), cbor2.dumps([HANDLE, -5]), cbor2.dumps([HANDLE])):
        with pytest.raises(codec.CodecError):
            JoinRequest.decode(payload)
    for payload in (cbor2.dumps([HANDLE]), cbor2.dumps([HANDLE, 0, 1, 2]), cbor2.dumps([HANDLE, 0, -3])):
        with pytest.raises(codec.CodecError):
            MessagesRequest.decode(payload)
    with pytest.raises(codec.CodecError):
        codec.decode_message(cbor2.dumps([1, "b", 2, 3]))


def test_paths_are_one_character_and_no_msc3079_code() -> None:
    from comatrix.codec.msc3079 import PATH_CODES

    assert all(len(path) == 1 for path in PATHS.values()) and not set(PATHS.values()) & set(PATH_CODES)


def test_non_canonical_room_id_is_sent_as_text() -> None:
    canonical = codec.room_id_from_hash(bytes(32))
    tweaked = canonical[:-1] + "B"  # same 32 bytes would not re-encode to this
    assert codec.room_id_to_hash(tweaked) is None


def _datagram(code: int, path: str, payload: bytes = b"", observe: int | None = None) -> bytes:
    return UdpCoap.build(MessageType.CON, code, 0x1234, TOKEN, path, payload=payload,
                         content_format=codec.CONTENT_FORMAT if payload else None, observe=observe)


def _response(code: int, payload: bytes = b"", observe: bytes | None = None) -> bytes:
    from comatrix.coap import wire

    options = [(6, observe)] if observe is not None else []
    if payload:
        options.append((12, bytes([codec.CONTENT_FORMAT])))
    return wire.encode(MessageType.ACK if observe is None else MessageType.NON, code, 0x1234, TOKEN,
                       options, payload)


def test_spec_examples_fit_their_budgets() -> None:
    """The examples of docs/protocol.rst, byte-exact, against the budgets."""
    seq = 1_763_700_000  # seeded from /t: a five-byte CBOR uint
    message = Message(SPEC_SENDER, BODY20, 1_763_700_123, 7)
    sizes = {
        "send": (_datagram(Code.POST, PATHS["send"], SendRequest(HANDLE, 0, seq, BODY20).encode()),
                 _response(Code.CHANGED, codec.encode_uint(7))),
        "getmsg": (_datagram(Code.FETCH, PATHS["messages"], MessagesRequest(HANDLE, 0).encode()),
                   _response(Code.CONTENT, codec.encode_message(message))),
        "notification": (b"", _response(Code.CONTENT, codec.encode_message(message), observe=b"\x00\x12\x34")),
        "join": (_datagram(Code.POST, PATHS["join"], JoinRequest.for_room(HANDLE, SPEC_ROOM).encode()),
                 _response(Code.CHANGED, codec.encode_uint(0))),
        "login": (_datagram(Code.POST, PATHS["login"], LoginRequest("sensor01", "correct-horse-battery").encode()),
                  _response(Code.CREATED, codec.encode_handle(HANDLE))),
        "logout": (_datagram(Code.POST, PATHS["logout"], HandleRequest(HANDLE).encode()), _response(Code.CHANGED)),
        "time": (_datagram(Code.GET, PATHS["time"]), _response(Code.CONTENT, codec.encode_uint(1_763_700_000))),
    }
    measured = {op: (len(up), len(down)) for op, (up, down) in sizes.items()}
    assert measured == {
        "send": (48, 10), "getmsg": (22, 59), "notification": (0, 63), "join": (55, 10),
        "login": (43, 18), "logout": (21, 6), "time": (8, 14),
    }
    for op, (up, down) in measured.items():
        assert up <= BUDGETS[op][0] and down <= BUDGETS[op][1], op
