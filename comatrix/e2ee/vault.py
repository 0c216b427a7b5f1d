"""Crypto state at rest: one AES-GCM-sealed file per device user, under a key kept in the state directory.

The key is ``<state_dir>/e2ee.key`` (32 random bytes, 0600, made at the first
start); each device user's state is ``<state_dir>/e2ee/<hash>.state`` (0600, in a
0700 directory): base64 of nonce + AES-256-GCM ciphertext, the file name as
associated data (a file copied over another one does not open).  Inside, the
vodozemac pickles are sealed once more with the same key.  Reads and writes run
in a thread (`write_durably`: temporary file, fsync, rename), never on the reactor.

The key backup's private key is ``<state_dir>/e2ee-backup.key`` (32 bytes, 0600),
kept apart from the sealed state so that losing the state does not lose it.

Without a state directory the state is kept in memory only: the device keys
then change at every start (logged at start).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet import threads

from comatrix.durable import write_durably

__all__ = ["BACKUP_KEY_FILENAME", "KEY_FILENAME", "Vault", "load_or_create_key", "read_backup_key", "read_states",
           "write_key"]

KEY_FILENAME = "e2ee.key"
#: The private key of the device users' server-side key backups: apart from the sealed state, so losing
#: that (``e2ee.key``, ``e2ee/``) leaves what reads the backups.
BACKUP_KEY_FILENAME = "e2ee-backup.key"
STATE_DIRNAME = "e2ee"
KEY_SIZE = 32
NONCE_SIZE = 12


def load_or_create_key(state_dir: str | Path, filename: str = KEY_FILENAME) -> bytes:
    """The gateway's E2EE storage key (or, with `BACKUP_KEY_FILENAME`, its key backup's private key),
    created (0600) the first time.  Blocking: call at start."""
    path = Path(state_dir) / filename
    Path(state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = os.urandom(KEY_SIZE)
        write_key(path, key)
    if len(key) != KEY_SIZE:
        raise ValueError(f"{path} is not a {KEY_SIZE}-byte key")
    return key


def write_key(path: Path, key: bytes) -> None:
    """A new key file (0600); FileExistsError if there is one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key)
        out.flush()
        os.fsync(out.fileno())


def read_backup_key(state_dir: str | Path) -> bytes | None:
    """The key backup's private key, None if the gateway made none (for ``comatrixctl``)."""
    try:
        key = (Path(state_dir) / BACKUP_KEY_FILENAME).read_bytes()
    except FileNotFoundError:
        return None
    if len(key) != KEY_SIZE:
        raise ValueError(f"{BACKUP_KEY_FILENAME} is not a {KEY_SIZE}-byte key")
    return key


def seal(key: bytes, name: str, state: Mapping[str, Any]) -> str:
    nonce = os.urandom(NONCE_SIZE)
    sealed = AESGCM(key).encrypt(nonce, json.dumps(state).encode("utf-8"), name.encode("utf-8"))
    return base64.b64encode(nonce + sealed).decode("ascii")


def unseal(key: bytes, name: str, text: str) -> dict[str, Any]:
    raw = base64.b64decode(text)
    state = json.loads(AESGCM(key).decrypt(raw[:NONCE_SIZE], raw[NONCE_SIZE:], name.encode("utf-8")))
    if not isinstance(state, dict):
        raise ValueError("E2EE state is not an object")
    return state


def read_states(state_dir: str | Path) -> list[dict[str, Any]]:
    """Every device user's state in ``state_dir`` (none if E2EE never ran there).  Blocking: for
    ``comatrixctl``, which reads what the gateway wrote and creates nothing."""
    try:
        key = (Path(state_dir) / KEY_FILENAME).read_bytes()
    except FileNotFoundError:
        return []
    directory = Path(state_dir) / STATE_DIRNAME
    paths = sorted(directory.glob("*.state")) if directory.is_dir() else []
    states = []
    for path in paths:
        try:
            states.append(unseal(key, path.name, path.read_text()))
        except (ValueError, InvalidTag):
            raise ValueError(f"{path} does not open with {KEY_FILENAME}") from None
    return states


class Vault:
    """Where each device user's crypto state is kept (a directory, or memory without ``state_dir``)."""

    def __init__(self, state_dir: str | Path | None, key: bytes | None = None) -> None:
        self.directory = None if state_dir is None else Path(state_dir) / STATE_DIRNAME
        if key is None:
            key = os.urandom(KEY_SIZE) if state_dir is None else load_or_create_key(state_dir)
        #: Also the vodozemac pickle key.
        self.key = key
        self._memory: dict[str, str] = {}
        if self.directory is not None:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    @staticmethod
    def name_of(user_id: str, device_id: str) -> str:
        return hashlib.sha256(f"{user_id}\0{device_id}".encode("utf-8")).hexdigest()[:32] + ".state"

    async def load(self, user_id: str, device_id: str) -> dict[str, Any] | None:
        name = self.name_of(user_id, device_id)
        if self.directory is None:
            text = self._memory.get(name)
        else:
            text = await threads.deferToThread(_read, self.directory / name)
        return None if text is None else unseal(self.key, name, text)

    async def save(self, user_id: str, device_id: str, state: Mapping[str, Any]) -> None:
        name = self.name_of(user_id, device_id)
        text = seal(self.key, name, state)
        if self.directory is None:
            self._memory[name] = text
        else:
            await threads.deferToThread(write_durably, self.directory / name, text)

    async def forget(self, user_id: str, device_id: str) -> None:
        """Drop a logged-out device's state (its room keys live on in the key backup)."""
        name = self.name_of(user_id, device_id)
        if self.directory is None:
            self._memory.pop(name, None)
        else:
            await threads.deferToThread((self.directory / name).unlink, missing_ok=True)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
