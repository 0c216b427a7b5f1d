"""MSC3079 pure parts: path mapping, integer keys both ways, option 257, success codes."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import given, strategies as st

from comatrix.coap.errors import BadOption, BadRequest, NotFound
from comatrix.coap.numbers import Code
from comatrix.codec.cbor import CodecError
from comatrix.codec.msc3079 import KEY_TABLE_V1, KEY_TABLE_V1_REVERSE
from comatrix.msc3079.peers import key_table_version
from comatrix.msc3079.translate import (json_from_request, keys_for_client, map_path, success_code,
                                        sync_is_empty, uses_integer_keys)

V3 = ("_matrix", "client", "v3")


@pytest.mark.parametrize("path, segments, code", [
    (("9", "!r", "m.room.message", "t1"), V3 + ("rooms", "!r", "send", "m.room.message", "t1"), "9"),
    (("7",), V3 + ("sync",), "7"),
    (("0",), ("_matrix", "client", "versions"), "0"),
    (("K", "#a:b"), V3 + ("rooms", "#a:b", "join"), "K"),
    (("n",), V3 + ("pushrules", ""), "n"),
    (("_matrix", "client", "r0", "rooms", "!r", "send", "m.room.message", "t"),
     V3 + ("rooms", "!r", "send", "m.room.message", "t"), "9"),
    (("_matrix", "client", "unstable", "sync"), V3 + ("sync",), "7"),
    (("_matrix", "client", "versions"), ("_matrix", "client", "versions"), "0"),
    # not in the code table: r0 becomes v3, other versions stay
    (("_matrix", "client", "r0", "account", "whoami"), V3 + ("account", "whoami"), None),
    (("_matrix", "client", "v1", "rooms", "!r", "relations", "$e"),
     ("_matrix", "client", "v1", "rooms", "!r", "relations", "$e"), None),
    # a segment with a slash or a percent sign stays one segment, unchanged
    (("9", "!r", "a/b", "100%25"), V3 + ("rooms", "!r", "send", "a/b", "100%25"), "9"),
])
def test_map_path(path: tuple[str, ...], segments: tuple[str, ...], code: str | None) -> None:
    target = map_path(path)
    assert target.segments == segments
    assert target.code == code


@pytest.mark.parametrize("path, error, diagnostic", [
    (("_matrix", "media", "v3", "upload"), NotFound, "media is HTTP only"),
    (("_matrix", "client", "v1", "media", "download", "s", "m"), NotFound, "media is HTTP only"),
    (("_matrix", "federation", "v1", "send", "t"), NotFound, "only /_matrix/client"),
    (("_matrix", "client", "r9", "sync"), NotFound, "unknown client API version"),
    (("_matrix",), NotFound, "only /_matrix/client"),
    (("z",), NotFound, "unknown path code 'z'"),
    (("9", "!r"), NotFound, "path code 9 takes 3 parameter(s)"),
    (("7", "extra"), NotFound, "path code 7 takes 0 parameter(s)"),
    (("_matrix", "client", "v3", "..", "..", "_synapse"), BadRequest, "empty or dot path segment"),
])
def test_map_path_refuses(path: tuple[str, ...], error: type, diagnostic: str) -> None:
    with pytest.raises(error) as caught:
        map_path(path)
    assert caught.value.diagnostic == diagnostic


def test_takes_token_and_kinds() -> None:
    assert not map_path(("0",)).takes_token
    assert not map_path(("1",)).takes_token and not map_path(("4",)).takes_token
    assert not map_path(("_matrix", "client", "r0", "register", "available")).takes_token
    assert map_path(("9", "!r", "t", "x")).takes_token
    assert map_path(("3",)).is_logout and map_path(("_matrix", "client", "v3", "logout", "all")).is_logout
    assert map_path(("_matrix", "client", "r0", "sync")).is_sync


def test_integer_keys_named_at_every_level_values_untouched() -> None:
    body = {2: "m.room.message", 3: {27: "hi", 28: "m.text", "custom": {5: 27}}, "8": 8, 13: [{1: "$e"}]}
    assert json_from_request(body, KEY_TABLE_V1) == {
        "type": "m.room.message", "content": {"body": "hi", "msgtype": "m.text", "custom": {"room_id": 27}},
        "8": 8, "events": [{"event_id": "$e"}]}


def test_string_key_wins_over_its_integer_key() -> None:
    assert json_from_request({27: "int", "body": "str"}, KEY_TABLE_V1) == {"body": "str"}
    assert json_from_request({"body": "str", 27: "int"}, KEY_TABLE_V1) == {"body": "str"}


@pytest.mark.parametrize("body, diagnostic", [
    ({500: "x"}, "unknown integer key 500"),
    ({3: {-1: "x"}}, "unknown integer key -1"),
    ({b"k": 1}, "map keys must be text or integers"),
    ({"k": b"bytes"}, "value not representable in JSON"),
    ({"k": float("nan")}, "non-finite number"),
    ({"k": cbor2.CBORTag(1, 5)}, "value not representable in JSON"),
])
def test_request_bodies_json_cannot_carry_are_refused(body: dict[Any, Any], diagnostic: str) -> None:
    with pytest.raises(CodecError, match=diagnostic):
        json_from_request(body, KEY_TABLE_V1)


def test_answers_get_integer_keys_only_for_version_1() -> None:
    answer = {"event_id": "$e", "unsigned": {"age": 5, "x-custom": 1}, "chunk": [{"body": "b"}]}
    assert keys_for_client(answer, 1) == {1: "$e", 9: {17: 5, "x-custom": 1}, 91: [{27: "b"}]}
    assert keys_for_client(answer, 0) is answer


def test_uses_integer_keys() -> None:
    assert uses_integer_keys({"a": [{"b": {27: 1}}]})
    assert not uses_integer_keys({"a": [1, 2], "27": {True: 1}})


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**53, 2**53), st.text(max_size=8))
json_keys = st.one_of(st.sampled_from(sorted(KEY_TABLE_V1_REVERSE)), st.text(max_size=6))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(json_keys, inner, max_size=4)), max_leaves=20)


@given(st.dictionaries(json_keys, json_values, max_size=6))
def test_round_trip_through_integer_keys_and_cbor(answer: dict[str, Any]) -> None:
    on_air = cbor2.loads(cbor2.dumps(keys_for_client(answer, 1)))
    assert json_from_request(on_air, KEY_TABLE_V1) == answer


@pytest.mark.parametrize("raw, version", [(b"", 0), (b"\x01", 1), (b"\x02", 1), (b"\x00\x00\x00\x07", 1)])
def test_key_table_version_option(raw: bytes, version: int) -> None:
    assert key_table_version(raw) == version


def test_key_table_version_too_long_is_bad_option() -> None:
    with pytest.raises(BadOption):
        key_table_version(b"\x00" * 5)


@pytest.mark.parametrize("method, status, code", [
    (Code.GET, 200, Code.CONTENT), (Code.POST, 200, Code.CHANGED), (Code.PUT, 200, Code.CHANGED),
    (Code.POST, 201, Code.CREATED), (Code.PUT, 204, Code.CHANGED), (Code.DELETE, 204, Code.DELETED),
    (Code.DELETE, 200, Code.DELETED), (Code.GET, 204, Code.CHANGED), (Code.POST, 202, Code.CHANGED),
])
def test_success_codes(method: Code, status: int, code: Code) -> None:
    assert success_code(method, status) == code


def test_sync_is_empty() -> None:
    assert sync_is_empty({"next_batch": "s2", "rooms": {"join": {}}, "presence": {"events": []}})
    assert not sync_is_empty({"next_batch": "s2", "rooms": {"join": {"!r": {}}}})
    assert not sync_is_empty({"next_batch": "s2", "to_device": {"events": [{}]}})
    assert not sync_is_empty({"next_batch": "s2", "device_lists": {"changed": ["@u:x"]}})


def test_with_txn_id_rewrites_only_the_txn_id_parameter() -> None:
    from comatrix.msc3079.translate import with_txn_id

    def scope(txn: str) -> str:
        return "tag." + txn

    send = map_path(("9", "!r", "m.room.message", "t1"))
    assert with_txn_id(send, scope).segments[-1] == "tag.t1"
    assert with_txn_id(send, scope).segments[:-1] == send.segments[:-1]
    full = map_path(("_matrix", "client", "v3", "rooms", "!r", "redact", "$e", "t2"))
    assert with_txn_id(full, scope).segments[-2:] == ("$e", "tag.t2")
    to_device = map_path(("c", "m.x", "t3"))
    assert with_txn_id(to_device, scope).segments[-1] == "tag.t3"
    no_txn = map_path(("K", "!r"))
    assert with_txn_id(no_txn, scope) == no_txn
