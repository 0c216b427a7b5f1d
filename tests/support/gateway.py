"""The CoMatrix gateway as a real ``twistd comatrix`` subprocess, for integration tests.

:class:`GatewayProcess` runs ``<repo>/.venv/bin/twistd -n --pidfile= --logfile LOG comatrix
--ip IP --port PORT --homeserver URL --state-dir DIR [--config F] [--plugin-dir D ...]``
from the working tree (``PYTHONPATH`` starts with the repo root, so the code under test
is this checkout's, however the venv was installed), waits until ``GET /time`` gets any
CoAP answer over UDP, and stops it with SIGTERM. Its log files are registered with
:mod:`support.secrets` so the secret sweep covers them.

The readiness probe is a hand-built confirmable GET on a plain UDP socket: it needs
nothing but the stdlib, so it cannot be fooled by a client library quirk.
"""

from __future__ import annotations

import contextlib
import os
import secrets as _random
import signal
import socket
import sqlite3
import struct
import subprocess
import time
from pathlib import Path
from typing import Sequence

from support import REPO_ROOT, free_port, terminate
from comatrix.store import DB_FILENAME
from support.secrets import remember_if_plausible, remember_log_file

__all__ = ["GatewayError", "GatewayProcess", "coap_probe"]

_POLL_INTERVAL = 0.1


class GatewayError(RuntimeError):
    """The gateway did not start, did not become ready, or did not stop."""


def _sockaddr(host: str, port: int) -> tuple[int, tuple[object, ...]]:
    """(family, sockaddr) for an IPv4 or IPv6 literal; an IPv6 zone id is resolved."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM,
                               flags=socket.AI_NUMERICHOST)
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def coap_probe(host: str, port: int, timeout: float = 0.5, path: str = "time") -> bytes | None:
    """Send one CON GET ``/path``; return the first matching datagram or None.

    Any reply (ACK, RST, separate response, even 4.04) shows the socket is served.
    """
    family, sockaddr = _sockaddr(host, port)
    mid = _random.randbits(16)
    token = _random.token_bytes(4)
    segment = path.encode("ascii")
    if len(segment) > 12:
        raise ValueError("probe path must be one short segment")
    # Version 1, type CON, TKL 4; code 0.01 GET; Uri-Path (option 11) with a 4-bit length.
    datagram = struct.pack("!BBH", 0x40 | len(token), 0x01, mid) + token
    datagram += bytes([(11 << 4) | len(segment)]) + segment
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(datagram, sockaddr)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                reply = sock.recv(2048)
                if len(reply) >= 4:
                    reply_mid = struct.unpack("!H", reply[2:4])[0]
                    tkl = reply[0] & 0x0F
                    if reply_mid == mid or reply[4:4 + tkl] == token:
                        return reply
        except (socket.timeout, ConnectionRefusedError):
            return None
    return None


class GatewayProcess:
    """One ``twistd -n comatrix`` process with its own port, state dir and log file."""

    def __init__(
        self,
        homeserver: str,
        workdir: Path,
        *,
        ip: str = "127.0.0.1",
        port: int | None = None,
        config: Path | None = None,
        config_text: str | None = None,
        plugin_dirs: Sequence[Path] = (),
        log_level: str | None = "debug",
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        allow_registration: bool = False,
    ) -> None:
        """``config_text`` (TOML) is written to ``workdir/comatrix.toml`` (0600) and passed as --config.

        ``log_level`` defaults to debug so the secret sweep sees the chattiest output.
        Registration stays closed, as in production, unless ``allow_registration``
        (``--allow-registration``) is given.
        """
        if config is not None and config_text is not None:
            raise ValueError("give config or config_text, not both")
        self.homeserver = homeserver
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ip = ip
        self.port = port if port is not None else free_port(ip, socket.SOCK_DGRAM)
        self.state_dir = self.workdir / "state"
        self.log_path = remember_log_file(self.workdir / "gateway.log")
        self.output_path = remember_log_file(self.workdir / "gateway.output")
        if config_text is not None:
            # 0600 before anything is written: a config holding a password or token
            # that others may read makes the gateway refuse to start.
            config = self.workdir / "comatrix.toml"
            config.touch(mode=0o600)
            config.chmod(0o600)
            config.write_text(config_text)
        self.config = config
        self.plugin_dirs = [Path(p) for p in plugin_dirs]
        self.log_level = log_level
        self.extra_args = list(extra_args) + (["--allow-registration"] if allow_registration else [])
        self._env = env
        self._proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else f"stopped ({self.returncode})"
        return f"<GatewayProcess {self.uri()} {state}>"

    # -- addressing --------------------------------------------------------------

    @property
    def host_for_uri(self) -> str:
        if ":" in self.ip:
            return "[" + self.ip.replace("%", "%25") + "]"
        return self.ip

    def uri(self, path: str = "") -> str:
        """``coap://ip:port/path`` (path may carry a ``?query``)."""
        return f"coap://{self.host_for_uri}:{self.port}/{path.lstrip('/')}"

    # -- lifecycle ---------------------------------------------------------------

    def command(self) -> list[str]:
        twistd = REPO_ROOT / ".venv" / "bin" / "twistd"
        args = [
            str(twistd), "-n", "--pidfile=", "--logfile", str(self.log_path),
            "comatrix",
            "--ip", self.ip,
            "--port", str(self.port),
            "--homeserver", self.homeserver,
            "--state-dir", str(self.state_dir),
        ]
        if self.config is not None:
            args += ["--config", str(self.config)]
        for directory in self.plugin_dirs:
            args += ["--plugin-dir", str(directory)]
        if self.log_level is not None:
            args += ["--log-level", self.log_level]
        return args + self.extra_args

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self, timeout: float = 30.0, *, wait: bool = True) -> None:
        """Launch twistd; with ``wait`` (default) block until it answers CoAP."""
        if self.running:
            raise GatewayError("gateway already running")
        twistd = REPO_ROOT / ".venv" / "bin" / "twistd"
        if not twistd.exists():
            raise GatewayError(f"{twistd} not found: run scripts/setup")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ if self._env is None else self._env)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.returncode = None
        with open(self.output_path, "ab") as out:
            self._proc = subprocess.Popen(
                self.command(), cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        if wait:
            try:
                self.wait_ready(timeout)
            except BaseException:
                self.stop()
                raise

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll with a CoAP GET /time until any answer arrives, at most ``timeout`` s."""
        deadline = time.monotonic() + timeout
        host = self.ip
        while True:
            if self._proc is None:
                raise GatewayError("gateway not started")
            code = self._proc.poll()
            if code is not None:
                self.returncode = code
                raise GatewayError(
                    f"gateway exited with {code} before answering; output:\n"
                    f"{self.output_text()[-3000:]}\nlog:\n{self.log_text()[-3000:]}"
                )
            if coap_probe(host, self.port, timeout=0.3) is not None:
                return
            if time.monotonic() >= deadline:
                raise GatewayError(
                    f"gateway not answering CoAP on {self.uri()} within {timeout}s; log:\n"
                    f"{self.log_text()[-3000:]}"
                )
            time.sleep(_POLL_INTERVAL)

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit by itself (e.g. after a bind failure)."""
        if self._proc is None:
            raise GatewayError("gateway not started")
        try:
            self.returncode = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise GatewayError(f"gateway still running after {timeout}s") from None
        return self.returncode

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait at most ``timeout`` s, SIGKILL if needed; the exit code (None if never started)."""
        if self._proc is None:
            return self.returncode
        self.returncode = terminate(self._proc, timeout)
        return self.returncode

    @property
    def exited_cleanly(self) -> bool:
        """Stopped by SIGTERM the orderly way.

        twistd re-raises the signal that stopped its reactor, so a clean SIGTERM
        shutdown shows as exit code -15, not 0.
        """
        return self.returncode in (0, -signal.SIGTERM)

    def signal(self, signum: int) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signum)

    def remember_stored_tokens(self) -> int:
        """Register the Matrix tokens the gateway keeps in its store as secrets; how many.

        A compact login hands the device a short handle while the gateway keeps the
        session's access token, and a ``[[devices]]`` login's token never leaves the
        gateway: the test sees neither, so without this the sweep could not find them
        in a log.  (Tokens already dropped -- a compact logout -- are not seen here.)
        """
        database = self.state_dir / DB_FILENAME
        if not database.exists():
            return 0
        tokens: list[str] = []
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            # The schema is created with the store's first connection: a gateway that never
            # needed its store has an empty file.
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            for table in ("compact_sessions", "device_tokens"):
                if table in tables:
                    tokens += [row[0] for row in db.execute(f"SELECT access_token FROM {table}")]
        return sum(1 for token in tokens if remember_if_plausible(token))

    def state_files_holding(self, secrets: dict[str, bytes]) -> dict[str, list[str]]:
        """Which of ``secrets`` (name -> bytes) occur in which file under ``state_dir``.

        Every file is read as bytes, the SQLite database with its ``-wal`` and
        ``-shm`` files and anything else the gateway writes there: a secret kept in a
        write-ahead log or in free pages counts as stored.
        """
        found: dict[str, list[str]] = {}
        for path in sorted(self.state_dir.rglob("*")):
            if path.is_file():
                data = path.read_bytes()
                for name, secret in secrets.items():
                    if secret in data:
                        found.setdefault(name, []).append(path.name)
        return found

    # -- logs --------------------------------------------------------------------

    def log_text(self) -> str:
        """twistd's log file (``--logfile``) so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def output_text(self) -> str:
        """What the process wrote to stdout/stderr (tracebacks before logging starts)."""
        if not self.output_path.exists():
            return ""
        return self.output_path.read_text(errors="replace")
