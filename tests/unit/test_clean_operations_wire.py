"""The byte-by-byte examples of docs/protocol.rst ("Clean form byte by byte"): each request and answer
written out there is what the CoAP encoder and CBOR make of the map shown beside it."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import cbor2

from comatrix.coap import wire
from comatrix.coap.numbers import Code, ContentFormat, MessageType, OptionNumber

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "protocol.rst"
#: The conventions of the section: a room-version-12 room id, an event id, a 40-character token.
ROOM = "!" + base64.urlsafe_b64encode(bytes(range(32))).decode().rstrip("=")
EVENT = "$" + base64.urlsafe_b64encode(bytes(range(32, 64))).decode().rstrip("=")
TOKEN = b"syt_c2Vuc29yMDE_xqTBRkFzqYbPfZXoYedl_1a2b"
MID, CTOKEN = 0x1234, b"\x4a"


def request(method: str, target: str, body: Any) -> bytes:
    """The CON request as libcoap sends it, the token in option 256."""
    path, _, query = target.partition("?")
    options = [(int(OptionNumber.URI_PATH), path.encode())]
    # Uri-Query carries the query percent-decoded (RFC 7252 §6.4), as libcoap sends it.
    options += [(int(OptionNumber.URI_QUERY), unquote(item).encode()) for item in query.split("&") if item]
    payload = b""
    if body is not None:
        options.append((int(OptionNumber.CONTENT_FORMAT), bytes([ContentFormat.CBOR])))
        payload = cbor2.dumps(body)
    options.append((256, TOKEN))
    return wire.encode(MessageType.CON, Code[method], MID, CTOKEN, options, payload)


def response(code: str, body: Any) -> bytes:
    """The piggy-backed ACK answering `request`."""
    options, payload = [], b""
    if body is not None:
        options.append((int(OptionNumber.CONTENT_FORMAT), bytes([ContentFormat.CBOR])))
        payload = cbor2.dumps(body)
    major, minor = code.split(".")
    return wire.encode(MessageType.ACK, int(major) << 5 | int(minor), MID, CTOKEN, options, payload)


def _fill(value: Any) -> Any:
    """The section's placeholders ``ROOM`` and ``EVENT`` replaced by the conventional ids."""
    return json.loads(json.dumps(value).replace('"ROOM"', json.dumps(ROOM)).replace('"EVENT"', json.dumps(EVENT)))


def show(data: bytes) -> str:
    """Hex, the token (if any) written ``<token>``."""
    head, token, tail = data.partition(TOKEN)
    return (head.hex(" ") + (" <token>" if token else "") + (" " + tail.hex(" ") if tail else "")).strip()


def test_the_documented_bytes_are_what_the_encoders_make() -> None:
    text = PROTOCOL.read_text()
    section = text[text.index("Clean form byte by byte"):]
    examples = re.findall(r"^    (GET|POST) (\S+)( \{.*\}|)\n    -> (\d\.\d\d)( \S.*|)\n    (.+)\n    -> (.+)$",
                          section, re.M)
    assert len(examples) == 15
    for method, target, body, code, answer, sent, received in examples:
        target = target.replace("ROOM", ROOM)
        request_body = _fill(json.loads(body)) if body.strip() else None
        answer_body = _fill(json.loads(answer)) if answer.strip() else None
        assert sent.split("  (")[0] == show(request(method, target, request_body)), target
        assert received.split("  (")[0] == show(response(code, answer_body)), target
