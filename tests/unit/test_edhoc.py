"""EDHOC responder (RFC 9528): exchanges driven by lakers' own initiator, the session bounds, the config.

The initiator is lakers-python's `EdhocInitiator` (real third-party code); the
real-peer test with aiocoap's EDHOC client is in
``tests/integration/test_edhoc_aiocoap.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cbor2
import lakers
import pytest

from comatrix.coap import wire
from comatrix.coap.message import Request, Response, Security
from comatrix.coap.numbers import Code, OptionNumber
from comatrix.coap.resource import CoapResource
from comatrix.coap.server import Site
from comatrix.coap.testing import Harness, option
from comatrix.config import ConfigError, build_config
from comatrix.credentials import Credentials
from comatrix.edhoc.ccs import generate_key, make_ccs, parse_ccs, private_bytes
from comatrix.edhoc.resource import EDHOC_PATH, EdhocResource, combined_handler, edhoc_error
from comatrix.edhoc.responder import (Busy, EdhocError, GatewayKey, PendingSessions, Responder, SessionLimits,
                                      split_connection_id)
from comatrix.oscore import ContextStore, OscoreLayer
from comatrix.oscore.context import SecurityContext
from comatrix.oscore.layer import EDHOC_OPTION
from support.oscore_peer import OscorePeer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Device:
    """A device's key pair and CCS, and lakers' initiator for it."""

    def __init__(self, kid: bytes = b"\x05") -> None:
        key = generate_key()
        self.private = private_bytes(key)
        self.ccs = make_ccs(key.public_key(), kid, "sensor")

    def message_1(self, c_i: bytes = b"\x0a") -> tuple[lakers.EdhocInitiator, bytes]:
        initiator = lakers.EdhocInitiator()
        return initiator, bytes(initiator.prepare_message_1(c_i))

    def message_3(self, initiator: lakers.EdhocInitiator, message_2: bytes,
                  gateway: GatewayKey) -> tuple[bytes, bytes]:
        """(C_R, message_3)."""
        c_r, _id_cred_r, _ead_2 = initiator.parse_message_2(message_2)
        initiator.verify_message_2(self.private, self.ccs.encoded, gateway.credential.encoded)
        message_3, _ = initiator.prepare_message_3(lakers.CredentialTransfer.ByReference, [])
        return bytes(c_r), bytes(message_3)


@pytest.fixture
def gateway(tmp_path: Path) -> GatewayKey:
    return GatewayKey.load_or_create(tmp_path)


def _responder(gateway: GatewayKey, devices: list[Device], clock: Clock | None = None,
               limits: SessionLimits = SessionLimits()) -> Responder:
    table = [(device.ccs.fingerprint, device.ccs.encoded) for device in devices]
    return Responder(gateway, lambda: table, ContextStore(), PendingSessions(limits, clock or Clock()))


def _oscore_pair(initiator: lakers.EdhocInitiator, c_i: bytes, c_r: bytes) -> SecurityContext:
    """The device's OSCORE context as RFC 9528 Appendix A.1 derives it, from lakers' exporter."""
    secret = bytes(initiator.edhoc_exporter(0, [], 16))
    salt = bytes(initiator.edhoc_exporter(1, [], 8))
    return SecurityContext(c_r, c_i, secret, salt)


def test_gateway_key_is_made_once_0600_and_kept(tmp_path: Path) -> None:
    first = GatewayKey.load_or_create(tmp_path)
    assert (tmp_path / "edhoc-key.pem").stat().st_mode & 0o777 == 0o600
    assert GatewayKey.load_or_create(tmp_path) == first
    assert first.private.hex() not in repr(first)


def test_an_exchange_ends_in_an_oscore_context_bound_to_the_credential(gateway: GatewayKey) -> None:
    device = Device()
    responder = _responder(gateway, [Device(b"\x06"), device])
    initiator, message_1 = device.message_1()
    message_2 = responder.message_1("a:127.0.0.2", message_1)
    c_r, message_3 = device.message_3(initiator, message_2, gateway)
    message_4, context = responder.message_3(c_r, message_3, message_4=True)
    initiator.process_message_4(message_4)
    assert context.identity == Security("edhoc", device.ccs.fingerprint)
    assert context.recipient_id == c_r and context.sender_id == b"\x0a"
    mine = _oscore_pair(initiator, b"\x0a", c_r)
    assert mine.sender_key == context.recipient_key and mine.recipient_key == context.sender_key
    assert responder.contexts.find(c_r) is context
    assert context.replay.is_fresh(0)  # fresh keys: no Echo round trip first
    assert len(responder.sessions) == 0
    # A second exchange of the same device replaces its context.
    initiator, message_1 = device.message_1(b"\x0b")
    c_r2, message_3 = device.message_3(initiator, responder.message_1("a:127.0.0.2", message_1), gateway)
    responder.message_3(c_r2, message_3, message_4=False)
    assert responder.contexts.find(c_r2) is not None and len(responder.contexts) == 1
    # An entry removed on reload loses its context.
    assert responder.forget(lambda identity: False) == 1 and len(responder.contexts) == 0


def test_unknown_credential_replayed_or_garbled_messages_fail_cleanly(gateway: GatewayKey) -> None:
    stranger = Device(b"\x07")
    responder = _responder(gateway, [Device()])
    initiator, message_1 = stranger.message_1()
    c_r, message_3 = stranger.message_3(initiator, responder.message_1("a:127.0.0.2", message_1), gateway)
    with pytest.raises(EdhocError, match="unknown credential"):
        responder.message_3(c_r, message_3, message_4=True)
    with pytest.raises(EdhocError, match="no EDHOC session"):  # the session is gone after one try
        responder.message_3(c_r, message_3, message_4=True)
    assert len(responder.contexts) == 0
    with pytest.raises(EdhocError, match="message_1 rejected"):
        responder.message_1("a:127.0.0.2", b"\x03\x02garbage")
    with pytest.raises(EdhocError, match="no device has an EDHOC credential"):
        _responder(gateway, []).message_1("a:127.0.0.2", stranger.message_1()[1])
    device = Device()
    responder = _responder(gateway, [device])
    initiator, message_1 = device.message_1()
    c_r, message_3 = device.message_3(initiator, responder.message_1("a:127.0.0.2", message_1), gateway)
    tampered = message_3[:-1] + bytes((message_3[-1] ^ 1,))
    with pytest.raises(EdhocError):
        responder.message_3(c_r, tampered, message_4=True)
    assert len(responder.contexts) == 0


def test_pending_sessions_are_bounded_per_address_and_in_total_and_expire(gateway: GatewayKey) -> None:
    clock = Clock()
    device = Device()
    responder = _responder(gateway, [device], clock, SessionLimits(total=4, per_address=2, lifetime=30))
    # The device starts an exchange, then a flood from one address keeps only its newest two sessions.
    initiator, message_1 = device.message_1()
    c_r, message_3 = device.message_3(initiator, responder.message_1("a:127.0.0.2", message_1), gateway)
    for _ in range(10):
        responder.message_1("a:127.0.0.9", device.message_1()[1])
    assert len(responder.sessions) == 3 and responder.sessions.evicted == 0
    responder.message_3(c_r, message_3, message_4=False)  # the device was not displaced
    # A flood from forged addresses: the table stays at its total, the oldest sessions go.
    initiator, message_1 = device.message_1(b"\x0b")
    c_r, message_3 = device.message_3(initiator, responder.message_1("a:127.0.0.3", message_1), gateway)
    for number in range(4):
        responder.message_1(f"a:10.0.0.{number}", device.message_1()[1])
    assert len(responder.sessions) == 4 and responder.sessions.evicted >= 1
    with pytest.raises(EdhocError, match="no EDHOC session"):
        responder.message_3(c_r, message_3, message_4=False)
    clock.now += 31
    assert len(responder.sessions) == 0
    # An exchange older than the lifetime is gone.
    initiator, message_1 = device.message_1(b"\x0c")
    c_r, message_3 = device.message_3(initiator, responder.message_1("a:127.0.0.12", message_1), gateway)
    clock.now += 31
    with pytest.raises(EdhocError, match="no EDHOC session"):
        responder.message_3(c_r, message_3, message_4=False)


def test_no_free_connection_identifier_is_busy(gateway: GatewayKey, monkeypatch: pytest.MonkeyPatch) -> None:
    device = Device()
    responder = _responder(gateway, [device], limits=SessionLimits(total=1000, per_address=1000))
    monkeypatch.setattr("comatrix.edhoc.responder.secrets.token_bytes", lambda n: b"\x01\x02")
    for _ in range(48):  # 47 one-byte ids (the 48th is C_I), then the only two-byte one the stub offers
        responder.message_1("a:127.0.0.2", device.message_1()[1])
    with pytest.raises(Busy):
        responder.message_1("a:127.0.0.2", device.message_1()[1])
    assert len(responder.sessions) == 48


def test_combined_request_payload_and_connection_ids(gateway: GatewayKey) -> None:
    device = Device()
    responder = _responder(gateway, [device])
    initiator, message_1 = device.message_1()
    c_r, message_3 = device.message_3(initiator, responder.message_1("a:127.0.0.2", message_1), gateway)
    finish = combined_handler(responder)
    assert finish(c_r, message_3 + b"ciphertext") == b"ciphertext"
    assert responder.contexts.find(c_r) is not None
    refused = finish(c_r, message_3 + b"again")
    assert not isinstance(refused, bytes) and refused.code.dotted() == "4.00"
    assert cbor2.loads(refused.payload[:1]) == 1  # ERR_CODE 1, then ERR_INFO text
    assert split_connection_id(b"\x05rest") == (b"\x05", b"rest")
    assert split_connection_id(b"\x42\x01\x02rest") == (b"\x01\x02", b"rest")
    for bad in (b"", b"\xf5", b"\x43\x01"):
        with pytest.raises(EdhocError):
            split_connection_id(bad)
    assert edhoc_error("x").content_format == 64


def test_config_edhoc_entries(tmp_path: Path) -> None:
    one, two = Device(b"\x01"), Device(b"\x01")
    entry = {"user": "@a:x", "password": "p", "edhoc": {"credential": one.ccs.encoded.hex()}}
    config = build_config({"devices": [entry]}, {})
    (device,) = config.devices
    assert device.network is None and device.edhoc is not None
    assert device.identifies(Security("edhoc", one.ccs.fingerprint))
    assert not device.identifies(Security("oscore", one.ccs.fingerprint))
    for bad, reason in (({"credential": "zz"}, "hex"), ({"credential": "a0"}, "COSE_Key"),
                        ({"credential": one.ccs.encoded.hex(), "key": "x"}, "unknown edhoc key")):
        with pytest.raises(ConfigError, match=reason):
            build_config({"devices": [dict(entry, edhoc=bad)]}, {})
    twin = dict(entry, user="@b:x", edhoc={"credential": two.ccs.encoded.hex()})
    with pytest.raises(ConfigError, match="kid"):
        build_config({"devices": [entry, twin]}, {})
    assert parse_ccs(one.ccs.encoded) == one.ccs


def _edhoc_config(tmp_path: Path, state_dir: bool = True) -> Any:
    entry = {"user": "@a:x", "password": "p", "edhoc": {"credential": Device().ccs.encoded.hex()}}
    return build_config({"devices": [entry], **({"state_dir": str(tmp_path / "state")} if state_dir else {})})


def test_without_lakers_edhoc_is_not_offered_with_one_warning(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from twisted.internet import reactor
    from twisted.logger import LogLevel, globalLogPublisher

    from comatrix.edhoc import responder as module
    from comatrix.tap import build_edhoc

    config = _edhoc_config(tmp_path)
    site = Site(lambda failure: None)
    oscore = OscoreLayer(ContextStore())
    monkeypatch.setattr(module, "lakers", None)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert build_edhoc(config, Credentials(config.devices, None), oscore, site, reactor) is None
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [event for event in events if event.get("log_level") == LogLevel.warn]
    assert len(warnings) == 1 and "lakers-python is not installed" in warnings[0]["log_format"]
    assert all(path != EDHOC_PATH for path, _ in site.resources()) and oscore.combined is None
    assert not (tmp_path / "state" / "edhoc-key.pem").exists()


def test_with_lakers_the_gateway_serves_edhoc_and_needs_a_state_dir(tmp_path: Path) -> None:
    from twisted.internet import reactor

    from comatrix.tap import build_edhoc

    site = Site(lambda failure: None)
    oscore = OscoreLayer(ContextStore())
    with pytest.raises(SystemExit, match="need state_dir"):
        config = _edhoc_config(tmp_path, state_dir=False)
        build_edhoc(config, Credentials(config.devices, None), oscore, site, reactor)
    config = _edhoc_config(tmp_path)
    responder = build_edhoc(config, Credentials(config.devices, None), oscore, site, reactor)
    assert responder is not None and oscore.combined is not None
    assert any(path == EDHOC_PATH for path, _ in site.resources())
    assert (tmp_path / "state" / "edhoc-key.pem").stat().st_mode & 0o777 == 0o600


class Asking(CoapResource):
    """Records who asked."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Request] = []

    def render_GET(self, request: Request) -> Response:
        self.seen.append(request)
        return Response.text("ok")


def _served(gateway: GatewayKey, devices: list[Device]) -> tuple[Harness, Asking, Responder]:
    """The real CoAP server with /.well-known/edhoc, the OSCORE layer with the combined handler, /thing."""
    responder = _responder(gateway, devices)
    site = Site()
    site.put(EDHOC_PATH, EdhocResource(responder))
    asking = Asking()
    site.put(("thing",), asking)
    return Harness(site, protection=OscoreLayer(responder.contexts, combined_handler(responder))), asking, responder


def test_over_coap_message_1_2_then_a_combined_request_reaches_the_site_as_the_credential(
        gateway: GatewayKey) -> None:
    device = Device()
    harness, asking, responder = _served(gateway, [device])
    initiator, message_1 = device.message_1()
    [reply] = harness.send(Code.POST, EDHOC_PATH, payload=b"\xf5" + message_1)
    assert (reply.code, option(reply, OptionNumber.CONTENT_FORMAT)) == (Code.CHANGED, b"\x40")
    c_r, message_3 = device.message_3(initiator, reply.payload, gateway)
    initiator.completed_without_message_4()
    peer = OscorePeer(c_r, b"\x0a", bytes(initiator.edhoc_exporter(0, [], 16)),
                      bytes(initiator.edhoc_exporter(1, [], 8)))  # RFC 9528 Appendix A.1, device side
    request = wire.decode(peer.request(Code.GET, ("thing",)))
    combined = wire.encode(request.mtype, request.code, 7, request.token,
                           sorted(request.options + [(EDHOC_OPTION, b"")]), message_3 + request.payload)
    [reply] = harness.send_raw(combined)
    assert peer.verify(reply).payload == b"ok"
    [seen] = asking.seen
    assert seen.security == Security("edhoc", device.ccs.fingerprint)
    # The same combined request again (another message id): its EDHOC session is gone -> 4.00, nothing served.
    [reply] = harness.send_raw(combined[:2] + b"\x00\x08" + combined[4:])
    assert reply.code == Code.BAD_REQUEST
    assert cbor2.loads(reply.payload[1:]) == "no EDHOC session for this C_R (expired or unknown)"
    assert len(asking.seen) == 1


def test_over_coap_message_3_gets_message_4_and_garbage_gets_an_edhoc_error(gateway: GatewayKey) -> None:
    device = Device()
    harness, _, responder = _served(gateway, [device])
    initiator, message_1 = device.message_1()
    [reply] = harness.send(Code.POST, EDHOC_PATH, payload=b"\xf5" + message_1)
    c_r, message_3 = device.message_3(initiator, reply.payload, gateway)
    [reply] = harness.send(Code.POST, EDHOC_PATH, payload=c_r + message_3)
    assert reply.code == Code.CHANGED
    initiator.process_message_4(reply.payload)  # lakers accepts it: key confirmation
    assert responder.contexts.find(c_r) is not None
    for garbage in (b"", b"\xf5", b"\xf5\x03\x02", b"\x17" + message_3, b"\xff"):
        [reply] = harness.send(Code.POST, EDHOC_PATH, payload=garbage)
        assert reply.code == Code.BAD_REQUEST, garbage
        assert option(reply, OptionNumber.CONTENT_FORMAT) == b"\x40" and cbor2.loads(reply.payload[:1]) == 1
    [reply] = harness.send(Code.GET, EDHOC_PATH)
    assert reply.code == Code.METHOD_NOT_ALLOWED
    # Without a combined handler the EDHOC option is a critical option nobody understands.
    plain = Harness(Site(), protection=OscoreLayer(ContextStore()))
    [reply] = plain.send(Code.GET, ("thing",), options=[(9, b"\x09\x00\x05"), (EDHOC_OPTION, b"")],
                         payload=b"x" * 12)
    assert reply.code == Code.BAD_OPTION
