"""Registry of every secret the test run creates, and of the gateway logs that must not contain them.

Helpers call :func:`remember` for each password, access token and shared secret they
create or receive, and :func:`remember_log_file` for each log the gateway writes. At
the end of the session (and when each gateway is torn down) :func:`leaks` looks for
every remembered secret, in the plain form and in the encodings a careless log line
might use, inside every remembered log file.

Nothing here ever prints a secret: findings carry a fingerprint instead.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

__all__ = [
    "Leak",
    "all_secrets",
    "fingerprint",
    "leaks",
    "log_files",
    "remember",
    "remember_if_plausible",
    "remember_log_file",
]

# Shorter strings would match by accident (e.g. a 3-letter password inside a word).
_MIN_SECRET_LENGTH = 6

_lock = threading.Lock()
_secrets: set[str] = set()
_log_files: list[Path] = []


def remember(secret: str | bytes) -> str:
    """Record ``secret`` as something no gateway log may contain; returns it as str."""
    text = secret.decode("utf-8") if isinstance(secret, bytes) else secret
    if len(text) < _MIN_SECRET_LENGTH:
        raise ValueError(
            f"test secrets must be at least {_MIN_SECRET_LENGTH} characters so the "
            "log sweep cannot match them by accident"
        )
    with _lock:
        _secrets.add(text)
    return text


def remember_if_plausible(secret: object) -> bool:
    """Remember ``secret`` if it is a str/bytes long enough to be swept; never raises.

    For values harvested from traffic (a token in option 256, a password in a CBOR
    body) where the test did not choose the value and a short one is not an error.
    """
    if isinstance(secret, bytes):
        try:
            secret = secret.decode("utf-8")
        except UnicodeDecodeError:
            return False
    if not isinstance(secret, str) or len(secret) < _MIN_SECRET_LENGTH:
        return False
    remember(secret)
    return True


def all_secrets() -> frozenset[str]:
    """Every secret remembered so far in this process."""
    with _lock:
        return frozenset(_secrets)


def remember_log_file(path: Path | str) -> Path:
    """Record a gateway log (or captured stdout/stderr) file to be swept for secrets."""
    p = Path(path)
    with _lock:
        if p not in _log_files:
            _log_files.append(p)
    return p


def log_files() -> tuple[Path, ...]:
    """Every log file remembered so far, in registration order."""
    with _lock:
        return tuple(_log_files)


def fingerprint(secret: str) -> str:
    """A printable stand-in for a secret: its length and a short hash, never its text."""
    digest = hashlib.sha256(secret.encode("utf-8")).hexdigest()[:12]
    return f"<secret len={len(secret)} sha256={digest}>"


# (name, needle, compare case-insensitively)
def _encodings(secret: str) -> list[tuple[str, bytes, bool]]:
    raw = secret.encode("utf-8")
    return [
        ("plain", raw, False),
        ("hex", raw.hex().encode("ascii"), True),
        ("base64", base64.b64encode(raw).rstrip(b"="), False),
        ("bytes-escape", "".join(f"\\x{b:02x}" for b in raw).encode("ascii"), True),
    ]


@dataclass(frozen=True)
class Leak:
    """One secret found in one file (the secret itself is never kept here)."""

    path: Path
    secret_fingerprint: str
    encoding: str

    def __str__(self) -> str:
        return f"{self.path}: {self.secret_fingerprint} ({self.encoding})"


def leaks(
    paths: Iterable[Path] | None = None, secrets: Iterable[str] | None = None
) -> list[Leak]:
    """Every (file, secret, encoding) where a secret appears; defaults to the registries.

    Rotated siblings (``gateway.log.1``, as twistd rotates at 1 MB) are swept too.
    Files that do not exist (a gateway that never started) are ignored.
    """
    named = log_files() if paths is None else tuple(paths)
    files: list[Path] = []
    for path in named:
        files.append(path)
        files.extend(sorted(path.parent.glob(path.name + ".*")))
    wanted = all_secrets() if secrets is None else frozenset(secrets)
    found: list[Leak] = []
    for path in files:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        lowered = data.lower()
        for secret in sorted(wanted):
            for name, needle, fold in _encodings(secret):
                if (needle.lower() in lowered) if fold else (needle in data):
                    found.append(Leak(path, fingerprint(secret), name))
                    break
    return found
