"""The compact profile's room and membership layouts: round trips, refusals, and the exact sizes
of the examples in docs/protocol.rst (every request and answer within one 64-byte frame)."""

from __future__ import annotations

import base64

import cbor2
import pytest
from hypothesis import given, strategies as st

from comatrix.coap import wire
from comatrix.coap.blockwise import Block
from comatrix.coap.numbers import Code, MessageType, OptionNumber
from comatrix.compact import codec
from comatrix.compact.codec import (BUDGETS, PATHS, CreateRequest, HandleRequest, Invitation, JoinRequest,
                                    RoomInfo, RoomRequest, SetRoomRequest, UserRequest)
from test_compact_codec import HANDLE, _datagram, _response

handles = st.binary(min_size=8, max_size=8)
uints = st.integers(min_value=0, max_value=codec.MAX_UINT)
names = st.none() | st.text(min_size=1, max_size=60)
users = st.text(min_size=1, max_size=40)

#: A room id of room version 12 ('!' + 43 characters): only an alias resolution answers with one.
SPEC_ROOM = "!" + base64.urlsafe_b64encode(bytes(range(32))).decode().rstrip("=")
#: What a 40-character event id would cost if a layout carried one: none of these does.
EVENT_ID = "$" + "a" * 39


@given(handles, st.booleans(), names, names, st.lists(users, max_size=codec.MAX_INVITES))
def test_create_round_trip(handle: bytes, public: bool, name: str | None, topic: str | None,
                           invite: list[str]) -> None:
    request = CreateRequest(handle, public, name, topic, tuple(invite))
    assert CreateRequest.decode(request.encode()) == request


@given(handles, uints | st.sampled_from(["#lab:example.org", "lab"]))
def test_room_request_round_trip(handle: bytes, room: int | str) -> None:
    request = RoomRequest(handle, room)
    assert RoomRequest.decode(request.encode(), alias=True) == request
    if isinstance(room, str):  # only the room resource resolves aliases
        with pytest.raises(codec.CodecError):
            RoomRequest.decode(request.encode())


@given(handles, uints, names, names)
def test_set_room_round_trip(handle: bytes, room: int, name: str | None, topic: str | None) -> None:
    request = SetRoomRequest(handle, room, name, topic)
    if name is None and topic is None:
        with pytest.raises(codec.CodecError, match="nothing to set"):
            SetRoomRequest.decode(request.encode())
    else:
        assert SetRoomRequest.decode(request.encode()) == request


@given(handles, uints, users, st.none() | st.text(min_size=1, max_size=100))
def test_user_request_round_trip(handle: bytes, room: int, user: str, reason: str | None) -> None:
    request = UserRequest(handle, room, user, reason)
    assert UserRequest.decode(request.encode(), reason=True) == request
    if reason is None:
        assert UserRequest.decode(request.encode()) == request


@given(names, names, uints, st.sampled_from(codec.MEMBERSHIPS + ("",)))
def test_room_info_round_trip(name: str | None, topic: str | None, joined: int, membership: str) -> None:
    info = RoomInfo(name, topic, joined, membership)
    assert codec.decode_room_info(codec.encode_room_info(info)) == info


@given(st.lists(st.builds(Invitation, uints, st.none() | users, names), max_size=5), st.lists(users))
def test_invitations_and_members_round_trip(invitations: list[Invitation], members: list[str]) -> None:
    assert codec.decode_invitations(codec.encode_invitations(invitations)) == invitations
    assert codec.decode_users(codec.encode_users(members)) == members


@given(st.binary(min_size=32, max_size=32))
def test_a_resolved_v12_room_id_travels_as_its_hash(raw: bytes) -> None:
    room_id = codec.room_id_from_hash(raw)
    assert codec.encode_room_id(room_id) == cbor2.dumps(raw)
    assert codec.decode_room_id(codec.encode_room_id(room_id)) == room_id
    assert codec.decode_room_id(codec.encode_room_id("!old:example.org")) == "!old:example.org"


def test_a_join_with_a_room_handle_accepts_an_invitation() -> None:
    join = JoinRequest.decode(cbor2.dumps([HANDLE, 1]))
    assert join.room == 1
    with pytest.raises(codec.CodecError):
        join.room_text()
    for bad in ([HANDLE, -1], [HANDLE, True], [HANDLE, 2 ** 64]):
        with pytest.raises(codec.CodecError):
            JoinRequest.decode(cbor2.dumps(bad))


@pytest.mark.parametrize("decoder, body", [
    (CreateRequest.decode, [HANDLE]),
    (CreateRequest.decode, [HANDLE, 2]),
    (CreateRequest.decode, [HANDLE, 0, 5]),
    (CreateRequest.decode, [HANDLE, 0, "n", "t", "alice"]),
    (CreateRequest.decode, [HANDLE, 0, "n", "t", ["u"] * (codec.MAX_INVITES + 1)]),
    (CreateRequest.decode, [HANDLE, 0, "n", "t", [""]]),
    (CreateRequest.decode, [HANDLE, 0, "n" * (codec.MAX_NAME + 1)]),
    (CreateRequest.decode, [HANDLE, 0, "n", "t", [], 1]),
    (RoomRequest.decode, [HANDLE, "#a:b"]),
    (RoomRequest.decode, [HANDLE, -1]),
    (RoomRequest.decode, [b"short", 0]),
    (SetRoomRequest.decode, [HANDLE, 0]),
    (SetRoomRequest.decode, [HANDLE, 0, None, None]),
    (SetRoomRequest.decode, [HANDLE, 0, 7]),
    (SetRoomRequest.decode, [HANDLE, 0, "n", "t" * (codec.MAX_TOPIC + 1)]),
    (UserRequest.decode, [HANDLE, 0]),
    (UserRequest.decode, [HANDLE, 0, ""]),
    (UserRequest.decode, [HANDLE, 0, "bob", "reason"]),  # invite takes no reason
    (UserRequest.decode, [HANDLE, 0, b"bob"]),
    (HandleRequest.decode, [HANDLE, 0]),
])
def test_malformed_room_requests_are_codec_errors(decoder: object, body: list[object]) -> None:
    with pytest.raises(codec.CodecError):
        decoder(cbor2.dumps(body))  # type: ignore[operator]


def test_malformed_answers_are_codec_errors() -> None:
    for payload in (cbor2.dumps(["n", "t", 1, 9]), cbor2.dumps(["n", "t", -1, 0]), cbor2.dumps(["n", "t", 1])):
        with pytest.raises(codec.CodecError):
            codec.decode_room_info(payload)
    for payload in (cbor2.dumps([[1, "a"]]), cbor2.dumps({"a": 1}), cbor2.dumps([[-1, "a", None]])):
        with pytest.raises(codec.CodecError):
            codec.decode_invitations(payload)
    with pytest.raises(codec.CodecError):
        codec.decode_users(cbor2.dumps([1]))


def _block_request(path: str, payload: bytes, num: int) -> bytes:
    """A FETCH asking for 32-byte blocks (SZX 1) from the first one on, as the reference client does."""
    from comatrix.client import UdpCoap

    return UdpCoap.build(MessageType.CON, Code.FETCH, 0x1234, b"\x4a\x7e", path, payload=payload,
                         content_format=codec.CONTENT_FORMAT,
                         options=[(OptionNumber.BLOCK2, Block(num, False, 1).encode())])


def _block_response(body: bytes, num: int, etag: bytes) -> bytes:
    """Block ``num`` (32 bytes) of ``body`` as the gateway sends it: ETag, Block2, and Size2 in the first."""
    more = (num + 1) * 32 < len(body)
    options = [(OptionNumber.ETAG, etag), (OptionNumber.CONTENT_FORMAT, bytes([codec.CONTENT_FORMAT])),
               (OptionNumber.BLOCK2, Block(num, more, 1).encode())]
    if num == 0:
        options.append((OptionNumber.SIZE2, bytes([len(body)])))
    return wire.encode(MessageType.ACK, Code.CONTENT, 0x1234, b"\x4a\x7e", options, body[num * 32:(num + 1) * 32])


#: The examples of docs/protocol.rst ("Rooms and membership byte by byte").
CREATE = CreateRequest(HANDLE, False, "Greenhouse", "air and soil", ("alice",))
INFO = RoomInfo("Greenhouse", "air and soil", 2, "join")
INVITATIONS = [Invitation(1, "alice", "Greenhouse")]
MEMBERS = ["alice", "sensor01", "@bob:matrix.org", "carol"]


def examples() -> dict[str, tuple[bytes, bytes]]:
    return {
        "create": (_datagram(Code.POST, PATHS["create"], CREATE.encode()), _response(Code.CREATED, codec.encode_uint(0))),
        "room": (_datagram(Code.FETCH, PATHS["room"], RoomRequest(HANDLE, 0).encode()),
                 _response(Code.CONTENT, codec.encode_room_info(INFO))),
        "resolve": (_datagram(Code.FETCH, PATHS["room"], RoomRequest(HANDLE, "#greenhouse:example.org").encode()),
                    _response(Code.CONTENT, codec.encode_room_id(SPEC_ROOM))),
        "set name": (_datagram(Code.POST, PATHS["room"], SetRoomRequest(HANDLE, 0, "Greenhouse 2").encode()),
                     _response(Code.CHANGED)),
        "set topic": (_datagram(Code.POST, PATHS["room"], SetRoomRequest(HANDLE, 0, None, "soil moisture").encode()),
                      _response(Code.CHANGED)),
        "invite": (_datagram(Code.POST, PATHS["invite"], UserRequest(HANDLE, 0, "alice").encode()),
                   _response(Code.CHANGED)),
        "invitations": (_datagram(Code.FETCH, PATHS["invite"], HandleRequest(HANDLE).encode()),
                        _response(Code.CONTENT, codec.encode_invitations(INVITATIONS))),
        "accept": (_datagram(Code.POST, PATHS["join"], cbor2.dumps([HANDLE, 1])), _response(Code.CHANGED, codec.encode_uint(1))),
        "leave": (_datagram(Code.POST, PATHS["leave"], RoomRequest(HANDLE, 1).encode()), _response(Code.CHANGED)),
        "kick": (_datagram(Code.POST, PATHS["kick"], UserRequest(HANDLE, 0, "bob", "left the project").encode()),
                 _response(Code.CHANGED)),
        "members": (_block_request(PATHS["members"], RoomRequest(HANDLE, 0).encode(), 0),
                    _block_response(codec.encode_users(MEMBERS), 0, bytes(4))),
        "members, block 1": (_block_request(PATHS["members"], RoomRequest(HANDLE, 0).encode(), 1),
                             _block_response(codec.encode_users(MEMBERS), 1, bytes(4))),
    }


def test_spec_examples_fit_one_frame_each() -> None:
    measured = {name: (len(up), len(down)) for name, (up, down) in examples().items()}
    assert measured == {
        "create": (53, 10), "room": (22, 36), "resolve": (45, 43), "set name": (35, 6), "set topic": (37, 6),
        "invite": (28, 6), "invitations": (21, 29), "accept": (22, 10), "leave": (22, 6), "kick": (43, 6),
        "members": (24, 50), "members, block 1": (24, 22),
    }
    for name, (up, down) in measured.items():
        op = {"resolve": "room", "set": "room", "invitations": "invite", "accept": "join"}.get(name.split()[0],
                                                                                          name.split(",")[0])
        assert up <= BUDGETS[op][0] and down <= BUDGETS[op][1], name


def test_no_layout_carries_an_event_id_and_only_resolve_a_room_id() -> None:
    """Rooms travel as room handles, users as localparts: the v12 room id appears in one answer only
    (as its 32 bytes), and the frames stay within budget even with a 40-character event id to spare."""
    for name, (up, down) in examples().items():
        assert SPEC_ROOM.encode() not in up + down and EVENT_ID.encode() not in up + down
        assert (bytes(range(32)) in down) == (name == "resolve"), name
        assert len(up) <= 64 and len(down) <= 64, name
