"""What SIGHUP (``systemctl reload comatrix``) changes in a running gateway: its devices.

``comatrixctl device add/rotate/remove`` writes ``devices.d/`` and asks for a
reload.  The gateway then re-reads its config files (in a thread: disk I/O
stays off the reactor) and applies only the ``[[devices]]`` entries:

* `comatrix.credentials.Credentials` gets the new entries; logins that still
  exist keep their tokens, so their devices notice nothing;
* DTLS sessions of a removed or re-keyed PSK identity end (a re-keyed device
  handshakes again with its new key); every other session goes on;
* OSCORE contexts of removed or re-keyed entries go, new ones come.

Every other setting (ports, limits, homeserver) needs a restart; a reload that
finds one changed says so in a WARNING.  A config that does not load is
refused with an ERROR and the running devices are kept as they were.
"""

from __future__ import annotations

import dataclasses
import signal
from typing import TYPE_CHECKING, Any, Callable, Sequence

from twisted.internet import defer, threads

from comatrix.config import Config, ConfigError, DeviceCredentials, OscoreCredentials
from comatrix.credentials import Credentials
from comatrix.dtls.server import DtlsProtocol
from comatrix.logs import get_logger
from comatrix.oscore import OscoreLayer

if TYPE_CHECKING:
    from comatrix.edhoc.responder import Responder

__all__ = ["DeviceChanges", "device_changes", "settings_needing_restart", "Reloader"]

log = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class DeviceChanges:
    """The difference between two device lists, as the security layers need it."""

    #: PSK identities whose DTLS sessions must end (entry removed, or its key changed).
    ended_psk_identities: frozenset[str]
    #: OSCORE contexts to drop (entry removed, or its inputs changed).
    oscore_removed: tuple[OscoreCredentials, ...]
    #: OSCORE contexts to derive (new entry, or new inputs).
    oscore_added: tuple[OscoreCredentials, ...]
    added: int
    removed: int

    @property
    def empty(self) -> bool:
        return not (self.ended_psk_identities or self.oscore_removed or self.oscore_added
                    or self.added or self.removed)


def device_changes(old: Sequence[DeviceCredentials], new: Sequence[DeviceCredentials]) -> DeviceChanges:
    old_psk = {device.psk_identity: device.psk for device in old if device.psk_identity is not None}
    new_psk = {device.psk_identity: device.psk for device in new if device.psk_identity is not None}
    ended = frozenset(identity for identity, key in old_psk.items() if new_psk.get(identity) != key)
    old_oscore = {device.oscore for device in old if device.oscore is not None}
    new_oscore = {device.oscore for device in new if device.oscore is not None}
    # OscoreCredentials compares all its fields (secret included): a rotated secret is a new context.
    removed_contexts = tuple(context for context in old_oscore if context not in new_oscore)
    added_contexts = tuple(context for context in new_oscore if context not in old_oscore)
    old_set, new_set = set(old), set(new)
    return DeviceChanges(ended, removed_contexts, added_contexts,
                         added=len(new_set - old_set), removed=len(old_set - new_set))


def settings_needing_restart(old: Config, new: Config) -> list[str]:
    """Names of settings that differ, besides the devices (a reload does not apply them)."""
    names = []
    for field in dataclasses.fields(Config):
        if field.name == "devices":
            continue
        before: Any = getattr(old, field.name)
        if before != getattr(new, field.name):
            names.append(field.name)
    return names


class Reloader:
    """Re-reads the config on SIGHUP and applies its ``[[devices]]`` to the running gateway."""

    def __init__(self, config: Config, load: Callable[[], Config], credentials: Credentials, *,
                 dtls: DtlsProtocol | None = None, oscore: OscoreLayer | None = None,
                 edhoc: "Responder | None" = None, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.config = config
        self.load = load
        self.credentials = credentials
        self.dtls = dtls
        self.oscore = oscore
        #: EDHOC-made contexts of entries that are gone end on reload; the others stay.
        self.edhoc = edhoc
        self.reactor = reactor

    def install(self) -> None:
        """Reload on SIGHUP (the handler only schedules the work in the reactor)."""
        signal.signal(signal.SIGHUP, lambda signum, frame: self.reactor.callFromThread(self.reload))

    def reload(self) -> "defer.Deferred[DeviceChanges | None]":
        log.info("SIGHUP: reloading the devices from the config files")
        loading: defer.Deferred[Config] = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                                                  self.load)
        return loading.addCallbacks(self.apply, self._refused)

    def _refused(self, failure: Any) -> None:
        if failure.check(ConfigError, SystemExit):
            log.error("Reload refused, the devices stay as they were: {reason}", reason=str(failure.value))
        else:
            log.failure("Reload failed, the devices stay as they were", failure)
        return None

    def apply(self, new: Config) -> DeviceChanges:
        changes = device_changes(self.config.devices, new.devices)
        self.credentials.replace_devices(new.devices)
        ended = self._end_dtls_sessions(changes)
        self._swap_oscore_contexts(changes)
        self._forget_edhoc_contexts(new)
        restart = settings_needing_restart(self.config, new)
        if restart:
            log.warn("Reload applies only [[devices]]; restart for the changed setting(s): {names}",
                     names=", ".join(restart))
        self.config = dataclasses.replace(self.config, devices=new.devices)
        log.info("Reloaded devices: {added} added, {removed} removed, {ended} DTLS session(s) ended, "
                 "{contexts} OSCORE context(s) replaced", added=changes.added, removed=changes.removed,
                 ended=ended, contexts=len(changes.oscore_added))
        return changes

    def _forget_edhoc_contexts(self, new: Config) -> None:
        """EDHOC-made contexts of credentials no entry has any more end; new credentials need EDHOC on."""
        kept = {device.edhoc.identity for device in new.devices if device.edhoc is not None}
        if self.edhoc is not None:
            self.edhoc.forget(lambda identity: identity in kept)
        elif kept:
            log.warn("Reload: EDHOC was not offered at start (no entry had edhoc, lakers-python missing "
                     "or security = off); restart to offer it")

    def _end_dtls_sessions(self, changes: DeviceChanges) -> int:
        if not changes.ended_psk_identities or self.dtls is None:
            return 0
        return self.dtls.end_sessions_of(changes.ended_psk_identities)

    def _swap_oscore_contexts(self, changes: DeviceChanges) -> None:
        if self.oscore is None:
            if changes.oscore_added:
                log.warn("Reload: OSCORE was not enabled at start; restart to offer the new contexts")
            return
        contexts = self.oscore.contexts
        for old in changes.oscore_removed:
            contexts.remove(old.recipient_id)
        for new in changes.oscore_added:
            try:
                contexts.add(new.sender_id, new.recipient_id, new.master_secret, new.master_salt)
            except ValueError as exc:
                log.warn("Reload: OSCORE context {rid} not offered: {reason}", rid=new.recipient_id.hex(),
                         reason=str(exc))
