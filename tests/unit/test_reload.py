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
