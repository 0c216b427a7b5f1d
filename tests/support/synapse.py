"""A real Synapse homeserver (from PyPI) for integration tests, plus plain-HTTP helpers.

:class:`SynapseServer` generates a config with Synapse's own ``--generate-config`` and
layers a second config file on top (Synapse merges ``-c`` files key by key) that makes it
test-friendly: open registration, no key servers, cheap bcrypt, generous rate limits, a
known registration shared secret, loopback-only listener, SQLite in the data directory.
The listener trusts ``X-Forwarded-For`` (``x_forwarded: true``), as the operator's must:
the gateway names each device there, so per-IP limits apply per device.  With
``default_limits=True`` every ``rc_*`` limit is left as Synapse ships it, for tests
whose point is rate limits.

The HTTP helpers talk straight to Synapse with :mod:`urllib` (blocking, stdlib only).
They are for arranging and checking test state, never a path through the gateway. Every
password and access token they create or receive is recorded with
:func:`support.secrets.remember`.

Run as ``python -m support.synapse write-config DIR --port P`` (with ``tests/`` on
``PYTHONPATH``) to produce the same config for ``scripts/demo``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import os
import secrets as _random
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from support import REPO_ROOT, free_port, terminate
from support.secrets import remember

__all__ = [
    "MatrixUser",
    "SynapseError",
    "SynapseHTTPError",
    "SynapseServer",
    "synapse_python",
    "config_overrides",
    "write_config",
]

DEFAULT_SERVER_NAME = "test.local"
_CLIENT = "/_matrix/client/v3"
_ADMIN = "/_synapse/admin/v1"
_HTTP_TIMEOUT = 30.0
_POLL_INTERVAL = 0.1


class SynapseError(RuntimeError):
    """Synapse could not be found, configured, started or stopped."""


class SynapseHTTPError(Exception):
    """A non-2xx answer from Synapse. Carries no request body and no token."""

    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.body = body
        self.errcode = body.get("errcode") if isinstance(body, dict) else None
        self.error = body.get("error") if isinstance(body, dict) else None
        super().__init__(f"{method} {path} -> HTTP {status} {self.errcode}: {self.error}")


@dataclass(frozen=True)
class MatrixUser:
    """A user created on the test Synapse; secrets stay out of ``repr``."""

    user_id: str
    localpart: str
    password: str = field(repr=False)
    access_token: str = field(repr=False)
    device_id: str


def synapse_python() -> Path:
    """The interpreter that has ``matrix-synapse`` installed; raises if there is none.

    ``COMATRIX_SYNAPSE_PYTHON`` overrides ``<repo>/.venv-synapse/bin/python``.
    """
    configured = os.environ.get("COMATRIX_SYNAPSE_PYTHON")
    path = Path(configured) if configured else REPO_ROOT / ".venv-synapse" / "bin" / "python"
    if not path.exists():
        raise SynapseError(
            f"no Synapse interpreter at {path}: run scripts/setup "
            "(or set COMATRIX_SYNAPSE_PYTHON to a python with matrix-synapse installed)"
        )
    return path


def _generous(rate: float = 10000.0) -> dict[str, float]:
    return {"per_second": rate, "burst_count": rate}


def config_overrides(
    *,
    port: int,
    data_dir: Path,
    shared_secret: str,
    bind_address: str = "127.0.0.1",
    bcrypt_rounds: int = 4,
    rate: float = 10000.0,
    default_limits: bool = False,
) -> dict[str, Any]:
    """The config keys layered over Synapse's generated config (facts §6).

    ``default_limits``: no ``rc_*`` key at all, so Synapse's own defaults apply.
    """
    overrides = {
        "listeners": [
            {
                "port": port,
                "bind_addresses": [bind_address],
                "type": "http",
                "tls": False,
                # The gateway names each device in X-Forwarded-For; only loopback can reach
                # this listener, so nobody else can forge the header.
                "x_forwarded": True,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ],
        "database": {"name": "sqlite3", "args": {"database": str(data_dir / "homeserver.db")}},
        "log_config": str(data_dir / "log.config.yaml"),
        "pid_file": str(data_dir / "homeserver.pid"),
        "media_store_path": str(data_dir / "media_store"),
        "report_stats": False,
        "enable_registration": True,
        "enable_registration_without_verification": True,
        "registration_shared_secret": shared_secret,
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "bcrypt_rounds": bcrypt_rounds,
        "url_preview_enabled": False,
    }
    return overrides if default_limits else {**overrides, **_generous_limits(rate)}


def _generous_limits(rate: float) -> dict[str, Any]:
    """Every ``rc_*`` limit far above what a test sends."""
    big = _generous(rate)
    return {
        "rc_message": big,
        "rc_registration": big,
        "rc_registration_token_validity": big,
        "rc_login": {"address": big, "account": big, "failed_attempts": big},
        "rc_joins": {"local": big, "remote": big},
        "rc_joins_per_room": big,
        "rc_invites": {"per_room": big, "per_user": big, "per_issuer": big},
        "rc_room_creation": big,
        "rc_admin_redaction": big,
        "rc_media_create": big,
        "rc_3pid_validation": big,
        "rc_presence": {"per_user": big},
        "rc_delayed_event_mgmt": big,
        "rc_reports": big,
        "rc_user_directory": big,
        "rc_profile": big,
    }


def _log_config(data_dir: Path) -> dict[str, Any]:
    # Replaces the generated one, which logs relative to the working directory.
    return {
        "version": 1,
        "formatters": {"plain": {"format": "%(asctime)s %(name)s %(levelname)s %(message)s"}},
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "formatter": "plain",
                "filename": str(data_dir / "homeserver.log"),
                "encoding": "utf8",
            }
        },
        "loggers": {"synapse.storage.SQL": {"level": "INFO"}},
        "root": {"level": "INFO", "handlers": ["file"]},
        "disable_existing_loggers": False,
    }


def write_config(
    data_dir: Path,
    *,
    port: int,
    server_name: str = DEFAULT_SERVER_NAME,
    shared_secret: str | None = None,
    python: Path | None = None,
    bcrypt_rounds: int = 4,
    rate: float = 10000.0,
    default_limits: bool = False,
) -> tuple[list[Path], str]:
    """Generate (once) and override (always) a Synapse config in ``data_dir``.

    Returns the ``-c`` files in order and the registration shared secret in force.
    Re-running with another ``port`` keeps the keys, database and users.
    """
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    base = data_dir / "homeserver.yaml"
    if not base.exists():
        exe = python or synapse_python()
        # cwd matters: generated paths that are not absolute land in the cwd.
        proc = subprocess.run(
            [
                str(exe), "-m", "synapse.app.homeserver",
                "--server-name", server_name,
                "--config-path", str(base),
                "--generate-config", "--report-stats=no",
                "--data-directory", str(data_dir),
            ],
            cwd=data_dir, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
        )
        if proc.returncode != 0 or not base.exists():
            raise SynapseError(
                f"synapse --generate-config failed ({proc.returncode}): {proc.stderr[-2000:]}"
            )
    secret_file = data_dir / "registration_shared_secret"
    if shared_secret is None:
        if secret_file.exists():
            shared_secret = secret_file.read_text().strip()
        else:
            shared_secret = _random.token_hex(24)
    secret_file.write_text(shared_secret)
    secret_file.chmod(0o600)
    remember(shared_secret)
    # JSON is YAML, so the stdlib is enough to write these.
    (data_dir / "log.config.yaml").write_text(json.dumps(_log_config(data_dir), indent=2))
    overrides = data_dir / "overrides.yaml"
    overrides.write_text(
        json.dumps(
            config_overrides(
                port=port, data_dir=data_dir, shared_secret=shared_secret,
                bcrypt_rounds=bcrypt_rounds, rate=rate, default_limits=default_limits,
            ),
            indent=2,
        )
    )
    overrides.chmod(0o600)
    return [base, overrides], shared_secret


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


class SynapseServer:
    """One Synapse process with its own data directory and a fixed loopback port.

    ``stop()`` then ``start()`` brings the same server back on the same port with the
    same database, so tests can make the homeserver unreachable and recover.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        server_name: str = DEFAULT_SERVER_NAME,
        port: int | None = None,
        python: Path | None = None,
        default_limits: bool = False,
    ) -> None:
        """``default_limits``: Synapse's own rate limits instead of the generous test ones."""
        self.data_dir = Path(data_dir).resolve()
        self.default_limits = default_limits
        self.server_name = server_name
        self.port = port if port is not None else free_port("127.0.0.1")
        self._python = python
        self._config_files: list[Path] = []
        self._shared_secret: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdout_path = self.data_dir / "synapse.stdout"

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<SynapseServer {self.server_name} {self.base_url} {state}>"

    # -- process lifecycle -------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "homeserver.log"

    def log_text(self) -> str:
        parts = []
        for path in (self._stdout_path, self.log_path):
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def start(self, timeout: float = 60.0) -> None:
        """Start Synapse (generating its config the first time) and wait until it answers."""
        if self.running:
            return
        python = self._python or synapse_python()
        if not self._config_files:
            self._config_files, self._shared_secret = write_config(
                self.data_dir, port=self.port, server_name=self.server_name, python=python,
                default_limits=self.default_limits,
            )
        args = [str(python), "-m", "synapse.app.homeserver"]
        for path in self._config_files:
            args += ["-c", str(path)]
        with open(self._stdout_path, "ab") as out:
            self._proc = subprocess.Popen(
                args, cwd=self.data_dir, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll ``/_matrix/client/versions`` until it answers 200, at most ``timeout`` s."""
        deadline = time.monotonic() + timeout
        url = self.base_url + "/_matrix/client/versions"
        last_error = "no attempt"
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise SynapseError(
                    f"Synapse exited with {self._proc.returncode} before it was ready; "
                    f"log tail:\n{self.log_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2.0) as resp:
                    if resp.status == 200:
                        return
                    last_error = f"HTTP {resp.status}"
            except (urllib.error.URLError, OSError) as exc:
                last_error = str(exc)
            if time.monotonic() >= deadline:
                raise SynapseError(
                    f"Synapse not ready at {url} within {timeout}s ({last_error}); "
                    f"log tail:\n{self.log_text()[-3000:]}"
                )
            time.sleep(_POLL_INTERVAL)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait at most ``timeout`` s, then SIGKILL. Returns the exit code."""
        proc, self._proc = self._proc, None
        return None if proc is None else terminate(proc, timeout)

    def restart(self, timeout: float = 60.0) -> None:
        self.stop()
        self.start(timeout)

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """Context manager: Synapse is down inside the block and back up after it."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    # -- plain HTTP --------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        body: Any = None,
        query: dict[str, str] | None = None,
    ) -> Any:
        """One JSON request to Synapse; returns the decoded body or raises SynapseHTTPError."""
        status, decoded = self.request_raw(method, path, token=token, body=body, query=query)
        if not 200 <= status < 300:
            raise SynapseHTTPError(method, path, status, decoded)
        return decoded

    def request_raw(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        body: Any = None,
        query: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """Like :meth:`request` but returns ``(status, body)`` for any HTTP status."""
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=_HTTP_TIMEOUT) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            decoded = json.loads(raw) if raw else None
        except ValueError:
            decoded = raw
        return status, decoded

    def _remember_session(self, body: dict[str, Any]) -> tuple[str, str, str]:
        token = remember(body["access_token"])
        return body["user_id"], token, body["device_id"]

    def register(self, username: str, password: str) -> tuple[str, str, str]:
        """Register through the real dummy-auth flow: ``(user_id, access_token, device_id)``."""
        remember(password)
        path = f"{_CLIENT}/register"
        request: dict[str, Any] = {"username": username, "password": password}
        status, first = self.request_raw("POST", path, body=request)
        if status == 200:
            return self._remember_session(first)
        if status != 401 or not isinstance(first, dict) or "session" not in first:
            raise SynapseHTTPError("POST", path, status, first)
        request["auth"] = {"type": "m.login.dummy", "session": first["session"]}
        return self._remember_session(self.request("POST", path, body=request))

    def login(
        self, username: str, password: str, *, device_id: str | None = None
    ) -> tuple[str, str, str]:
        """Password login: ``(user_id, access_token, device_id)``."""
        remember(password)
        body: dict[str, Any] = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": username},
            "password": password,
        }
        if device_id is not None:
            body["device_id"] = device_id
        return self._remember_session(self.request("POST", f"{_CLIENT}/login", body=body))

    def logout(self, token: str) -> None:
        self.request("POST", f"{_CLIENT}/logout", token=token, body={})

    def whoami(self, token: str) -> str:
        return str(self.request("GET", f"{_CLIENT}/account/whoami", token=token)["user_id"])

    def make_user(self, prefix: str = "user") -> MatrixUser:
        """A fresh user with a random name and password."""
        localpart = f"{prefix}{_random.token_hex(6)}".lower()
        password = _random.token_urlsafe(18)
        if self.default_limits:
            # Synapse's default rc_registration lets one address register three users at once;
            # shared-secret registration is not rate-limited.
            user_id, token, device_id = self.register_admin(localpart, password, admin=False)
        else:
            user_id, token, device_id = self.register(localpart, password)
        return MatrixUser(user_id, localpart, password, token, device_id)

    def create_room(self, token: str, **body: Any) -> str:
        return str(self.request("POST", f"{_CLIENT}/createRoom", token=token, body=body)["room_id"])

    def set_alias(self, token: str, alias: str, room_id: str) -> None:
        """Map ``#localpart:server`` (a bare localpart gets this server's name) to a room."""
        alias = self.full_alias(alias)
        self.request(
            "PUT", f"{_CLIENT}/directory/room/{_quote(alias)}", token=token,
            body={"room_id": room_id},
        )

    def full_alias(self, alias: str) -> str:
        if not alias.startswith("#"):
            alias = f"#{alias}:{self.server_name}"
        return alias

    def resolve_alias(self, alias: str) -> str:
        path = f"{_CLIENT}/directory/room/{_quote(self.full_alias(alias))}"
        return str(self.request("GET", path)["room_id"])

    def invite(self, token: str, room_id: str, user_id: str) -> None:
        self.request(
            "POST", f"{_CLIENT}/rooms/{_quote(room_id)}/invite", token=token,
            body={"user_id": user_id},
        )

    def join(self, token: str, room_id_or_alias: str) -> str:
        path = f"{_CLIENT}/join/{_quote(room_id_or_alias)}"
        return str(self.request("POST", path, token=token, body={})["room_id"])

    def send_event(
        self,
        token: str,
        room_id: str,
        event_type: str,
        content: dict[str, Any],
        *,
        txn_id: str | None = None,
    ) -> str:
        txn = txn_id or _random.token_hex(8)
        path = f"{_CLIENT}/rooms/{_quote(room_id)}/send/{_quote(event_type)}/{_quote(txn)}"
        return str(self.request("PUT", path, token=token, body=content)["event_id"])

    def send_text(
        self,
        token: str,
        room_id: str,
        body: str,
        *,
        msgtype: str = "m.text",
        txn_id: str | None = None,
    ) -> str:
        return self.send_event(
            token, room_id, "m.room.message", {"msgtype": msgtype, "body": body}, txn_id=txn_id
        )

    def messages(
        self,
        token: str,
        room_id: str,
        limit: int = 10,
        *,
        direction: str = "b",
        types: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Events of ``/messages`` (newest first by default); ``types`` filters by event type."""
        query = {"dir": direction, "limit": str(limit)}
        if types is not None:
            query["filter"] = json.dumps({"types": types})
        path = f"{_CLIENT}/rooms/{_quote(room_id)}/messages"
        return list(self.request("GET", path, token=token, query=query)["chunk"])

    def text_messages(self, token: str, room_id: str, limit: int = 50) -> list[dict[str, Any]]:
        """Only ``m.room.message`` events, newest first."""
        return self.messages(token, room_id, limit, types=["m.room.message"])

    # -- admin API ---------------------------------------------------------------

    def register_admin(
        self, username: str | None = None, password: str | None = None, *, admin: bool = True
    ) -> tuple[str, str, str]:
        """Shared-secret registration (``/_synapse/admin/v1/register``, HMAC-SHA1)."""
        if self._shared_secret is None:
            raise SynapseError("Synapse has not been started, no shared secret yet")
        username = username or f"admin{_random.token_hex(6)}"
        password = remember(password or _random.token_urlsafe(18))
        path = f"{_ADMIN}/register"
        nonce = str(self.request("GET", path)["nonce"])
        mac = hmac.new(self._shared_secret.encode("utf-8"), digestmod=hashlib.sha1)
        mac.update(b"\x00".join(
            part.encode("utf-8")
            for part in (nonce, username, password, "admin" if admin else "notadmin")
        ))
        body = {
            "nonce": nonce,
            "username": username,
            "password": password,
            "admin": admin,
            "mac": mac.hexdigest(),
        }
        return self._remember_session(self.request("POST", path, body=body))

    def set_ratelimit(
        self, admin_token: str, user_id: str, messages_per_second: int, burst_count: int
    ) -> None:
        """Per-user rate-limit override; Synapse takes integers only, 0/0 means unlimited."""
        self.request(
            "POST", f"{_ADMIN}/users/{_quote(user_id)}/override_ratelimit", token=admin_token,
            body={"messages_per_second": messages_per_second, "burst_count": burst_count},
        )

    def clear_ratelimit(self, admin_token: str, user_id: str) -> None:
        self.request(
            "DELETE", f"{_ADMIN}/users/{_quote(user_id)}/override_ratelimit", token=admin_token
        )


def main(argv: list[str] | None = None) -> int:
    """``write-config DIR --port P [...]``: print the config files, one per line."""
    parser = argparse.ArgumentParser(prog="python -m support.synapse")
    sub = parser.add_subparsers(dest="command", required=True)
    wc = sub.add_parser("write-config", help="generate/override a Synapse config in DIR")
    wc.add_argument("data_dir", type=Path)
    wc.add_argument("--port", type=int, required=True)
    wc.add_argument("--server-name", default=DEFAULT_SERVER_NAME)
    wc.add_argument("--rate", type=float, default=100.0, help="rc_* per_second and burst")
    wc.add_argument("--bcrypt-rounds", type=int, default=12)
    args = parser.parse_args(argv)
    files, _ = write_config(
        args.data_dir, port=args.port, server_name=args.server_name,
        bcrypt_rounds=args.bcrypt_rounds, rate=args.rate,
    )
    for path in files:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
