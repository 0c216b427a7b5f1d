"""Writing a small file so that it is on disk, whole, before anything relies on it.

OSCORE sequence numbers (the gateway's bounds, a device's next number) must
never go back after a crash or a power loss, or an AES-CCM nonce is used twice:
write a temporary file, fsync it, rename it over the old one, fsync the
directory (the rename itself must be durable).  Blocking: the gateway calls it
off the reactor thread; the command-line client may block.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_durably"]


def write_durably(path: Path, text: str, mode: int = 0o600) -> None:
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(temporary, mode)  # O_CREAT's mode does not apply to a temporary file left by a crash
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
