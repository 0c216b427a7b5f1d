"""Test-side helpers for CoMatrix: a real Synapse, real CoAP clients, the gateway as a subprocess.

Import these as ``support`` (``from support.synapse import SynapseServer``), never as
``tests.support``: pytest puts ``tests/`` on ``sys.path`` for ``tests/conftest.py``, and a
second import under another name would create a second secret registry that the
end-of-session log sweep would never see.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

if __name__ != "support":
    raise ImportError(
        f"import the CoMatrix test helpers as 'support', not {__name__!r} "
        "(a second copy would split the secret registry)"
    )

__all__ = ["REPO_ROOT", "free_port", "terminate"]

#: The repository root (``tests/support/__init__.py`` is two levels below it).
REPO_ROOT: Path = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port the kernel just reported free on ``host`` for ``kind`` (TCP or UDP).

    There is an unavoidable window between closing the probe socket and the real
    server binding it; servers started on it report a bind failure loudly.
    """
    # getaddrinfo resolves an IPv6 zone ("fe80::1%lowpan0") into the scope id.
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, 0, type=kind, flags=socket.AI_NUMERICHOST
    )[0]
    with socket.socket(family, kind) as probe:
        probe.bind(sockaddr)
        return int(probe.getsockname()[1])


def terminate(proc: "subprocess.Popen[bytes]", timeout: float) -> int:
    """SIGTERM, wait at most ``timeout`` s, then SIGKILL; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode
