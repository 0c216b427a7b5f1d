"""The OSCORE client role of ``comatrix-device`` against the gateway's own `OscoreLayer`, in memory.

Round trips in both directions (the client protects, the layer verifies; the layer
protects, the client verifies), the Echo challenge, notifications with the
gateway's Partial IVs, forged or replayed answers, the sequence number stored
before use, and the context file's format.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from comatrix.client import DeviceState, oscore_sequence
from comatrix.coap import wire
from comatrix.coap.numbers import Code, MessageType, OptionNumber
from comatrix.coap.secured import Refused, Unprotected
from comatrix.oscore.client import OscoreClient, OscoreError, load_device_context
from comatrix.oscore.contexts import ContextStore
from comatrix.oscore.layer import ECHO_OPTION, OscoreLayer

SECRET = secrets.token_bytes(16)
SALT = secrets.token_bytes(8)


def _pair(tmp_path: Path) -> tuple[OscoreLayer, OscoreClient, DeviceState]:
    store = ContextStore()
    store.add(b"", b"\x05", SECRET, SALT, persistent=False)  # the gateway: sends as "", receives from 05
    path = tmp_path / "ctx.toml"
    path.write_text(f'sender_id = "05"\nrecipient_id = ""\nmaster_secret = "{SECRET.hex()}"\n'
                    f'master_salt = "{SALT.hex()}"\n')
    state = DeviceState(tmp_path / "state.json")
    return OscoreLayer(store), OscoreClient(load_device_context(path), oscore_sequence(state, "05:")), state


def _request(client: OscoreClient, options: list[wire.RawOption], payload: bytes = b"",
             code: int = Code.POST) -> tuple[wire.Datagram, bytes]:
    outer_code, outer, ciphertext, piv = client.protect(code, options, payload)
    data = wire.encode(MessageType.CON, outer_code, 7, b"\x42", outer, ciphertext)
    return wire.decode(data), piv


def _answer(layer: OscoreLayer, exchange: object, code: int, options: list[wire.RawOption],
            payload: bytes) -> wire.Datagram:
    outer_code, outer, ciphertext = layer.protect(exchange, code, options, payload)  # type: ignore[arg-type]
    return wire.decode(wire.encode(MessageType.ACK, outer_code, 7, b"\x42", outer, ciphertext))


def test_echo_then_a_verified_round_trip_with_the_sequence_stored_first(tmp_path: Path) -> None:
    layer, client, state = _pair(tmp_path)
    path = [(OptionNumber.URI_PATH, b"w"), (OptionNumber.CONTENT_FORMAT, b"\x3c")]
    message, piv = _request(client, path, b"payload")
    assert json.loads(state.path.read_text())["oscore"]["05:"] == 1  # on disk before the datagram exists
    challenge = layer.unprotect(message)
    assert isinstance(challenge, Refused) and challenge.exchange is not None
    answer = _answer(layer, challenge.exchange, challenge.response.code,
                     list(challenge.response.extra_options), b"")
    inner = client.unprotect(answer, piv)
    echo = [value for number, value in inner.options if number == ECHO_OPTION]
    assert inner.code == Code.UNAUTHORIZED and len(echo) == 1

    message, piv = _request(client, path + [(ECHO_OPTION, echo[0])], b"payload")
    verified = layer.unprotect(message)
    assert isinstance(verified, Unprotected)
    assert verified.message.payload == b"payload" and verified.security.identity == "05"
    assert [value for number, value in verified.message.options if number == OptionNumber.URI_PATH] == [b"w"]
    inner = client.unprotect(_answer(layer, verified.exchange, Code.CHANGED, [], b"ok"), piv)
    assert (inner.code, inner.payload) == (Code.CHANGED, b"ok")
    # A replay of that request is refused by the gateway; an answer bound to another request fails here.
    assert isinstance(layer.unprotect(message), Refused)
    with pytest.raises(OscoreError):
        client.unprotect(_answer(layer, verified.exchange, Code.CHANGED, [], b"ok"), b"\x63")


def test_notifications_must_move_forward_and_unprotected_success_is_refused(tmp_path: Path) -> None:
    layer, client, _ = _pair(tmp_path)
    layer.contexts.find(b"\x05").replay.establish(client.take_sequence())  # type: ignore[union-attr]
    message, piv = _request(client, [(OptionNumber.OBSERVE, b""), (OptionNumber.URI_PATH, b"v")], code=Code.FETCH)
    assert message.code == Code.FETCH and (OptionNumber.OBSERVE, b"") in message.options
    verified = layer.unprotect(message)
    assert isinstance(verified, Unprotected)
    first = _answer(layer, verified.exchange, Code.CONTENT, [(OptionNumber.OBSERVE, b"\x02")], b"n1")
    second = _answer(layer, verified.exchange, Code.CONTENT, [(OptionNumber.OBSERVE, b"\x03")], b"n2")
    assert client.unprotect(first, piv).payload == b"n1"
    inner = client.unprotect(second, piv)
    assert inner.payload == b"n2" and (OptionNumber.OBSERVE, b"\x03") in inner.options
    with pytest.raises(OscoreError, match="replayed"):
        client.unprotect(first, piv)
    plain = wire.decode(wire.encode(MessageType.ACK, Code.CONTENT, 7, b"\x42", [], b"forged"))
    with pytest.raises(OscoreError, match="unprotected"):
        client.unprotect(plain, piv)
    error = wire.decode(wire.encode(MessageType.ACK, Code.UNAUTHORIZED, 7, b"\x42", [], b"Replay detected"))
    assert client.unprotect(error, piv).code == Code.UNAUTHORIZED  # the gateway's OSCORE errors are plain


def test_the_sequence_resumes_from_the_state_file(tmp_path: Path) -> None:
    state = DeviceState(tmp_path / "state.json")
    take = oscore_sequence(state, "05:")
    assert [take(), take()] == [0, 1]
    again = oscore_sequence(DeviceState.load(tmp_path / "state.json"), "05:")
    assert again() == 2


@pytest.mark.parametrize("text, problem", [
    ('sender_id = "05"\nrecipient_id = ""\n', "missing keys"),
    ('sender_id = "05"\nrecipient_id = ""\nmaster_secret = "zz"\n', "not a hex string"),
    ('sender_id = "05"\nrecipient_id = "05"\nmaster_secret = "00ff"\n', "must differ"),
    ('sender_id = "05"\nrecipient_id = ""\nmaster_secret = "00ff"\nkid = "1"\n', "unknown keys"),
    ('{"sender_id": 5, "recipient_id": "", "master_secret": "00ff"}', "not a hex string"),
    ("[not toml", "neither JSON nor TOML"),
])
def test_bad_context_files_say_what_is_wrong_without_the_secret(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "ctx"
    path.write_text(text)
    with pytest.raises(OscoreError, match=problem) as caught:
        load_device_context(path)
    assert "00ff" not in str(caught.value)


def test_json_context_files_work_too(tmp_path: Path) -> None:
    path = tmp_path / "ctx.json"
    path.write_text(json.dumps({"sender_id": "05", "recipient_id": "", "master_secret": SECRET.hex()}))
    context = load_device_context(path)
    assert (context.sender_id, context.recipient_id) == (b"\x05", b"")
    assert SECRET.hex() not in repr(context)
