"""The compact profile's react, redact and read layouts: round trips, refusals, and the examples of
docs/protocol.rst ("Reactions, redactions and read receipts byte by byte"), byte for byte, each
within its budget."""

from __future__ import annotations

import re
from pathlib import Path

import cbor2
import pytest
from hypothesis import given, strategies as st

from comatrix.coap.numbers import Code
from comatrix.compact import codec
from comatrix.compact.codec import BUDGETS, PATHS, EventRequest, ReactRequest
from test_compact_codec import HANDLE, _datagram, _response

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "protocol.rst"
handles = st.binary(min_size=8, max_size=8)
uints = st.integers(min_value=0, max_value=codec.MAX_UINT)
keys = st.text(min_size=1, max_size=16)


@given(handles, uints, uints, keys, st.booleans())
def test_react_round_trip(handle: bytes, room: int, ref: int, key: str, remove: bool) -> None:
    request = ReactRequest(handle, room, ref, key, remove)
    assert ReactRequest.decode(request.encode()) == request


@given(handles, uints, uints, st.none() | st.text(min_size=1, max_size=100))
def test_event_request_round_trip(handle: bytes, room: int, ref: int, reason: str | None) -> None:
    request = EventRequest(handle, room, ref, reason)
    assert EventRequest.decode(request.encode(), reason=True) == request
    if reason is None:
        assert EventRequest.decode(request.encode()) == request


@pytest.mark.parametrize("decoder, body", [
    (ReactRequest.decode, [HANDLE, 0, 3]),
    (ReactRequest.decode, [HANDLE, 0, 3, ""]),
    (ReactRequest.decode, [HANDLE, 0, 3, "k" * (codec.MAX_REACTION_KEY + 1)]),
    (ReactRequest.decode, [HANDLE, 0, 3, "👍", 2]),
    (ReactRequest.decode, [HANDLE, 0, 3, "👍", True]),
    (ReactRequest.decode, [HANDLE, 0, -3, "👍"]),
    (ReactRequest.decode, [HANDLE, 0, 3, b"k"]),
    (ReactRequest.decode, [HANDLE, 0, 3, "👍", 0, 0]),
    (EventRequest.decode, [HANDLE, 0]),
    (EventRequest.decode, [HANDLE, 0, 3, "reason"]),  # a read receipt takes no reason
    (EventRequest.decode, [HANDLE, 0, 2 ** 64]),
    (EventRequest.decode, [b"short", 0, 3]),
])
def test_malformed_requests_are_codec_errors(decoder: object, body: list[object]) -> None:
    with pytest.raises(codec.CodecError):
        decoder(cbor2.dumps(body))  # type: ignore[operator]


def test_a_redaction_reason_is_text_of_at_most_255_bytes() -> None:
    for reason in (7, "r" * (codec.MAX_REASON + 1)):
        with pytest.raises(codec.CodecError):
            EventRequest.decode(cbor2.dumps([HANDLE, 0, 3, reason]), reason=True)


#: The examples of docs/protocol.rst.
EXAMPLES = {
    "react": (_datagram(Code.POST, PATHS["react"], ReactRequest(HANDLE, 0, 3, "👍").encode()),
              _response(Code.CHANGED)),
    "react remove": (_datagram(Code.POST, PATHS["react"], ReactRequest(HANDLE, 0, 3, "👍", True).encode()),
                     _response(Code.CHANGED)),
    "redact": (_datagram(Code.POST, PATHS["redact"], EventRequest(HANDLE, 0, 5, "sensor fault").encode()),
               _response(Code.CHANGED)),
    "read": (_datagram(Code.POST, PATHS["read"], EventRequest(HANDLE, 0, 3).encode()), _response(Code.CHANGED)),
}


def _hex(text: str) -> str:
    """The hex bytes of ``text`` without layout (spaces, line breaks, comments after two spaces)."""
    return "".join(re.findall(r"\b[0-9a-f]{2}\b", text))


def test_the_spec_examples_are_the_codes_bytes_and_fit_their_budgets() -> None:
    assert {name: (len(up), len(down)) for name, (up, down) in EXAMPLES.items()} == {
        "react": (28, 6), "react remove": (29, 6), "redact": (36, 6), "read": (23, 6)}
    section = PROTOCOL.read_text(encoding="utf-8").split("Reactions, redactions and read receipts byte by byte")[1]
    dumped = _hex(section.split("\nLimits\n")[0])
    for name, (up, down) in EXAMPLES.items():
        assert up.hex() in dumped and down.hex() in dumped, name
        op = name.split()[0]
        assert len(up) <= BUDGETS[op][0] and len(down) <= BUDGETS[op][1], name
