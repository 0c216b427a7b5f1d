"""SIGHUP reload: which security state changes when the device entries change."""

from __future__ import annotations

from typing import Any

from comatrix.config import build_config
from comatrix.credentials import Credentials
from comatrix.oscore import ContextStore, OscoreLayer
from comatrix.reload import Reloader, device_changes, settings_needing_restart

SECRET_A, SECRET_B = "00" * 16, "11" * 16


def entries(**changes: Any) -> list[dict[str, Any]]:
    base = [
        {"user": "@a:x", "password": "p", "psk_identity": "a", "psk": "a" * 16},
        {"user": "@b:x", "password": "p", "psk_identity": "b", "psk": "b" * 16},
        {"user": "@c:x", "password": "p", "oscore": {"recipient_id": "01", "sender_id": "", "master_secret": SECRET_A}},
    ]
    for index, entry in changes.items():
        base[int(index[1:])] = entry
    return base


def devices(**changes: Any) -> Any:
    return build_config({"devices": entries(**changes)}).devices


def test_unchanged_devices_change_nothing() -> None:
    assert device_changes(devices(), devices()).empty


def test_a_rekeyed_or_removed_psk_ends_only_its_sessions() -> None:
    rekeyed = {"user": "@a:x", "password": "p", "psk_identity": "a", "psk": "z" * 16}
    changes = device_changes(devices(), devices(_0=rekeyed))
    assert changes.ended_psk_identities == {"a"} and not changes.oscore_added
    removed = device_changes(devices(), devices()[1:])
    assert removed.ended_psk_identities == {"a"} and (removed.added, removed.removed) == (0, 1)


def test_a_rotated_oscore_secret_replaces_the_context() -> None:
    rotated = {"user": "@c:x", "password": "p",
               "oscore": {"recipient_id": "01", "sender_id": "", "master_secret": SECRET_B}}
    changes = device_changes(devices(), devices(_2=rotated))
    assert [c.master_secret.hex() for c in changes.oscore_removed] == [SECRET_A]
    assert [c.master_secret.hex() for c in changes.oscore_added] == [SECRET_B]
    assert not changes.ended_psk_identities


class FakeDtls:
    def __init__(self) -> None:
        self.ended: list[str] = []

    def end_sessions_of(self, identities: Any) -> int:
        self.ended += sorted(identities)
        return len(self.ended)


def test_apply_swaps_credentials_dtls_sessions_and_oscore_contexts() -> None:
    old = build_config({"devices": entries()})
    contexts = ContextStore()
    contexts.add(b"", b"\x01", bytes.fromhex(SECRET_A), persistent=False)
    credentials = Credentials(old.devices, matrix=None, store=None)  # type: ignore[arg-type]
    dtls = FakeDtls()
    reloader = Reloader(old, lambda: old, credentials, dtls=dtls, oscore=OscoreLayer(contexts))  # type: ignore[arg-type]
    new = build_config({"devices": entries()[1:], "port": 1234})
    reloader.apply(new)
    assert credentials.psk_for("a") is None and credentials.psk_for("b") == b"b" * 16
    assert dtls.ended == ["a"]
    assert contexts.find(b"\x01") is not None  # the unchanged context stays (same object)
    assert reloader.config.devices == new.devices and reloader.config.port == old.port
    assert settings_needing_restart(old, new) == ["port"]


def test_a_removed_or_rekeyed_edhoc_credential_loses_its_context_and_others_keep_theirs(tmp_path: Any) -> None:
    from comatrix.edhoc.ccs import generate_key, make_ccs
    from comatrix.edhoc.responder import GatewayKey, PendingSessions, Responder, SessionLimits

    def edhoc_entry(user: str, kid: bytes) -> dict[str, Any]:
        ccs = make_ccs(generate_key().public_key(), kid, user)
        return {"user": user, "password": "p", "edhoc": {"credential": ccs.encoded.hex()}}

    first, second = edhoc_entry("@d:x", b"\x01"), edhoc_entry("@e:x", b"\x02")
    old = build_config({"devices": [first, second]})
    credentials = Credentials(old.devices, matrix=None, store=None)  # type: ignore[arg-type]
    contexts = ContextStore()
    responder = Responder(GatewayKey.load_or_create(tmp_path), credentials.edhoc_credentials, contexts,
                          PendingSessions(SessionLimits(), lambda: 0.0))
    for recipient_id, device in zip((b"\x05", b"\x06"), old.devices):  # as if both had run EDHOC
        assert device.edhoc is not None
        responder._install(device.edhoc.identity, b"\x0a", recipient_id, b"s" * 16, b"")
    reloader = Reloader(old, lambda: old, credentials, oscore=OscoreLayer(contexts), edhoc=responder)
    rekeyed = edhoc_entry("@d:x", b"\x01")
    new = build_config({"devices": [rekeyed, second]})
    reloader.apply(new)
    assert contexts.find(b"\x05") is None and contexts.find(b"\x06") is not None
    assert [identity for identity, _ in credentials.edhoc_credentials()] == [d.edhoc.identity for d in new.devices
                                                                           if d.edhoc is not None]
    # The Matrix device id follows the kid, so a rotated key keeps the account's device.
    assert old.devices[0].login_device_id == new.devices[0].login_device_id
