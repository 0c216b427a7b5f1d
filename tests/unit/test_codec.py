"""CBOR decoding limits, MSC3079 path parsing and key tables."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, strategies as st

from comatrix.codec import cbor
from comatrix.codec.msc3079 import (KEY_TABLE_V1, PATH_CODES, UnknownPath, keys_to_names, names_to_keys,
                                    parse_matrix_path)


@pytest.mark.parametrize("payload, message", [
    (b"\xff", "malformed"),
    (b"\xa1\x61a", "malformed"),  # truncated
    (b"\xa0\x00", "trailing"),
    (cbor2.dumps([1, 2]), "must be a CBOR map"),
    (b"\xa1\x61a\x62\xff\xfe", "malformed"),  # invalid UTF-8 in a text string
    (cbor2.dumps({"a": [[[[[[[[[[1]]]]]]]]]]}), "deep"),
])
def test_bad_bodies(payload: bytes, message: str) -> None:
    with pytest.raises(cbor.CodecError, match=message):
        cbor.decode_map(payload)


def test_empty_body_is_empty_map() -> None:
    assert cbor.decode_map(b"") == {}


def test_text_field_checks() -> None:
    body = {"a": "x", "n": 5, "e": "", "long": "y" * 10}
    assert cbor.text(body, "a") == "x"
    assert cbor.text(body, "missing", required=False) is None
    for key, message in (("missing", "missing"), ("n", "text string"), ("e", "empty"), ("long", "too long")):
        with pytest.raises(cbor.CodecError, match=message):
            cbor.text(body, key, max_length=5)


def test_path_codes_cover_the_msc_table() -> None:
    assert len(PATH_CODES) == 57
    assert PATH_CODES["9"] == ("rooms", "{roomId}", "send", "{eventType}", "{txnId}")
    assert PATH_CODES["K"] == ("rooms", "{roomId}", "join")


@pytest.mark.parametrize("uri, code, params", [
    ("/9/!r:x/m.room.message/42", "9", {"roomId": "!r:x", "eventType": "m.room.message", "txnId": "42"}),
    ("coap://attacker.example:1234/4", "4", {}),
    ("http://hs:8008/_matrix/client/r0/rooms/%21r/messages?dir=b", "E", {"roomId": "!r"}),
    ("/_matrix/client/v3/join/#room:server", "L", {"roomIdOrAlias": "#room:server"}),
    ("/_matrix/client/versions", "0", {}),
    ("/K/!AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "K",
     {"roomId": "!AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}),
])
def test_parse_matrix_path(uri: str, code: str, params: dict[str, str]) -> None:
    path = parse_matrix_path(uri)
    assert (path.code, dict(path.params)) == (code, params)


@pytest.mark.parametrize("uri", ["/", "/Z9", "/9/!r", "/_matrix/client/r9/login", "/_matrix/client/r0/nope"])
def test_unknown_paths(uri: str) -> None:
    with pytest.raises(UnknownPath):
        parse_matrix_path(uri)


def test_key_table_string_key_wins_and_nesting() -> None:
    value = {27: "int form", "body": "string form", 3: {28: "m.text", 99: [{1: "$e"}]}}
    assert keys_to_names(value) == {"body": "string form",
                                    "content": {"msgtype": "m.text", "unstable_features": [{"event_id": "$e"}]}}
    assert len(KEY_TABLE_V1) == 104


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(sorted(KEY_TABLE_V1.values())) | st.text(max_size=6), children, max_size=4),
    max_leaves=20)


@given(json_values)
def test_key_table_round_trip(value: object) -> None:
    assert keys_to_names(names_to_keys(value)) == value
