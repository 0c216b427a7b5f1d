"""``comatrixctl`` in application-service mode: the registration file, device users made and removed.

* ``appservice generate --url URL -o FILE`` writes a 0640 registration the
  gateway reads back, and never overwrites one (its tokens are in use).
* ``device add NAME`` without ``--user`` creates ``@<prefix>NAME:<server>``
  through the application service (register, display name, as the user by
  identity assertion) and writes an ``appservice = true`` entry the daemon
  reads; ``device remove`` deactivates that user first.
* `AppserviceAdmin` on the wire (a loopback HTTP server): the ``as_token`` as
  bearer, ``user_id=`` when acting as a device user, the homeserver's errcode
  in the error and never a token.
"""

from __future__ import annotations

import http.server
import io
import json
import stat
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from comatrix.appservice.admin import AdminError, AppserviceAdmin
from comatrix.appservice.registration import Registration, generate, load_registration
from comatrix.config import build_config, read_config_files
from comatrix.ctl import main
from comatrix.matrix import api
from comatrix.matrix.api import AppserviceToken

SERVER = "test.local"


def ctl(config: Path, *argv: str, stdin: str = "") -> tuple[int, str]:
    out = io.StringIO()
    status = main(["--config", str(config), *argv], out=out, stdin=io.StringIO(stdin))
    return status, out.getvalue()


def device_file(config: Path, name: str) -> Path:
    return config.parent / "devices.d" / f"{name}.toml"


# ---------------------------------------------------------------- appservice generate


def test_generate_writes_a_private_registration_the_gateway_reads(tmp_path: Path) -> None:
    output = tmp_path / "appservice.yaml"
    status, out = ctl(tmp_path / "no-config-yet.toml", "appservice", "generate", "--url", "http://127.0.0.1:8010",
                      "--prefix", "pan1_", "-o", str(output))
    assert status == 0 and str(output) in out and "@pan1_.*" in out
    assert stat.S_IMODE(output.stat().st_mode) == 0o640
    registration = load_registration(output)
    assert (registration.url, registration.prefix, registration.id) == ("http://127.0.0.1:8010", "pan1_", "comatrix")
    assert registration.as_token not in out and registration.hs_token not in out  # tokens only in the file
    assert [p.name for p in tmp_path.iterdir()] == ["appservice.yaml"]  # no temporary file left


def test_generate_never_overwrites_a_registration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "appservice.yaml"
    assert ctl(tmp_path / "c.toml", "appservice", "generate", "--url", "http://127.0.0.1:8010", "-o", str(output))[0] == 0
    before = output.read_bytes()
    status, _ = ctl(tmp_path / "c.toml", "appservice", "generate", "--url", "http://127.0.0.1:8010", "-o", str(output))
    assert status == 1 and "exists already" in capsys.readouterr().err
    assert output.read_bytes() == before


def test_generate_to_stdout_and_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out = ctl(tmp_path / "c.toml", "appservice", "generate", "--url", "http://gw.example:8010", "--id", "gw7")
    assert status == 0 and "id: gw7" in out and "rate_limited: false" in out and "sender_localpart: gw7" in out
    assert ctl(tmp_path / "c.toml", "appservice", "generate", "--url", "gw.example")[0] == 1
    assert "--url" in capsys.readouterr().err
    assert ctl(tmp_path / "c.toml", "appservice", "generate", "--url", "http://x", "--prefix", "Bad Prefix")[0] == 1
    assert "--prefix" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- device add / remove


class Homeserver:
    """Stands in for `AppserviceAdmin.call`: records each request, answers like Synapse."""

    def __init__(self) -> None:
        self.requests: list[api.MatrixRequest] = []
        self.refuse: dict[str, str] = {}  # path tail -> errcode

    def call(self, admin: AppserviceAdmin, req: api.MatrixRequest) -> dict[str, Any]:
        self.requests.append(req)
        tail = "/".join(req.path[3:])
        for name, errcode in self.refuse.items():
            if tail.startswith(name):
                raise AdminError(f"{req.method} /{'/'.join(req.path)}: HTTP 400 {errcode}: refused")
        if tail == "account/whoami":
            return {"user_id": f"@{admin.registration.sender_localpart}:{SERVER}"}
        return {}

    def made(self) -> list[tuple[str, str, Any, str | None]]:
        """(method, path tail, body, asserted user) of each request."""
        return [(r.method, "/".join(r.path[3:]), r.body,
                 r.access_token.user_id if isinstance(r.access_token, AppserviceToken) else None)
                for r in self.requests]


@pytest.fixture
def homeserver(monkeypatch: pytest.MonkeyPatch) -> Homeserver:
    fake = Homeserver()
    monkeypatch.setattr(AppserviceAdmin, "call", lambda admin, req: fake.call(admin, req))
    return fake


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A gateway config in application-service mode, with its registration beside it."""
    registration = tmp_path / "appservice.yaml"
    assert ctl(tmp_path / "c.toml", "appservice", "generate", "--url", "http://127.0.0.1:8010",
               "-o", str(registration))[0] == 0
    path = tmp_path / "comatrix.toml"
    path.write_text(f'ip = "::1"\nhomeserver = "http://127.0.0.1:8008"\n'
                    f'[appservice]\nregistration = "{registration}"\n')
    return path


def registration_of(config: Path) -> Registration:
    return load_registration(config.parent / "appservice.yaml")


def test_device_add_creates_the_user_through_the_appservice(config: Path, homeserver: Homeserver) -> None:
    status, out = ctl(config, "device", "add", "Sensor01", "--address", "::1",
                      "--allow-invites-from", "@alice:test.local", "--allow-invites-from", "*:lab.example")
    assert status == 0, out
    user = f"@comatrix_sensor01:{SERVER}"
    assert f"created {user}" in out
    assert homeserver.made() == [
        ("GET", "account/whoami", None, None),
        ("POST", "register", {"type": "m.login.application_service", "username": "comatrix_sensor01",
                              "inhibit_login": True}, None),
        ("PUT", f"profile/{user}/displayname", {"displayname": "Sensor01"}, user),
    ]
    as_token = registration_of(config).as_token
    assert all(str.__str__(req.access_token) == as_token for req in homeserver.requests)  # type: ignore[arg-type]
    assert as_token not in out

    path = device_file(config, "Sensor01")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    [device] = build_config(read_config_files(config)).devices  # the daemon reads what was written
    assert device.appservice and device.user == user and device.password is None and device.access_token is None
    assert str(device.network) == "::1/128"
    assert device.allow_invites_from == ("@alice:test.local", "*:lab.example")


def test_a_user_that_exists_already_is_taken_over(config: Path, homeserver: Homeserver) -> None:
    homeserver.refuse["register"] = "M_USER_IN_USE"
    assert ctl(config, "device", "add", "sensor02", "--address", "2001:db8::/64")[0] == 0
    assert [m[1] for m in homeserver.made()][-1] == f"profile/@comatrix_sensor02:{SERVER}/displayname"
    [device] = build_config(read_config_files(config)).devices
    assert device.user == f"@comatrix_sensor02:{SERVER}" and str(device.network) == "2001:db8::/64"


def test_a_refusal_of_the_homeserver_writes_nothing(config: Path, homeserver: Homeserver,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    homeserver.refuse["register"] = "M_EXCLUSIVE"
    assert ctl(config, "device", "add", "sensor03", "--address", "::1")[0] == 1
    assert "M_EXCLUSIVE" in capsys.readouterr().err
    assert not device_file(config, "sensor03").exists()


@pytest.mark.parametrize("argv, message", [
    (("--address", "not-an-address"), "--address must be an IP address"),
    (("--address", "::1", "--allow-invites-from", "alice"), "allow_invites_from"),
])
def test_bad_options_are_refused_before_the_homeserver_is_asked(config: Path, homeserver: Homeserver,
                                                                capsys: pytest.CaptureFixture[str],
                                                                argv: tuple[str, ...], message: str) -> None:
    assert ctl(config, "device", "add", "sensor04", *argv)[0] == 1
    assert message in capsys.readouterr().err
    assert homeserver.requests == [] and not device_file(config, "sensor04").exists()
    assert build_config(read_config_files(config)).devices == ()  # the config still loads


def test_device_add_without_user_needs_appservice_mode(tmp_path: Path, homeserver: Homeserver,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "comatrix.toml"
    plain.write_text('homeserver = "http://127.0.0.1:8008"\n')
    assert ctl(plain, "device", "add", "sensor05", "--address", "::1")[0] == 1
    assert "no [appservice]" in capsys.readouterr().err
    assert ctl(plain, "device", "add", "sensor05")[0] == 2  # nothing binds the device
    assert homeserver.requests == []


def test_device_remove_deactivates_the_user(config: Path, homeserver: Homeserver) -> None:
    assert ctl(config, "device", "add", "sensor06", "--address", "::1")[0] == 0
    homeserver.requests.clear()
    status, out = ctl(config, "device", "remove", "sensor06")
    user = f"@comatrix_sensor06:{SERVER}"
    assert status == 0 and f"deactivated {user}" in out
    assert homeserver.made() == [("POST", "account/deactivate", {"erase": False}, user)]
    assert not device_file(config, "sensor06").exists()


def test_a_failed_deactivation_keeps_the_device(config: Path, homeserver: Homeserver) -> None:
    assert ctl(config, "device", "add", "sensor07", "--address", "::1")[0] == 0
    homeserver.refuse["account/deactivate"] = "M_UNKNOWN"
    assert ctl(config, "device", "remove", "sensor07")[0] == 1
    assert device_file(config, "sensor07").exists()  # removing it would orphan an active user


def test_removing_an_ordinary_device_deactivates_nobody(config: Path, homeserver: Homeserver) -> None:
    assert ctl(config, "device", "add", "plain", "--psk", "--user", "@plain:test.local",
               "--access-token-file", "-", stdin="syt_plain")[0] == 0
    assert ctl(config, "device", "remove", "plain")[0] == 0
    assert homeserver.requests == []


# ---------------------------------------------------------------- AppserviceAdmin on the wire


class Recorded(http.server.BaseHTTPRequestHandler):
    requests: list[tuple[str, str, str | None, bytes]] = []
    answers: dict[str, tuple[int, bytes]] = {}

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.requests.append((self.command, self.path, self.headers.get("Authorization"), self.rfile.read(length)))
        status, body = next((answer for prefix, answer in self.answers.items() if self.path.startswith(prefix)),
                            (200, b"{}"))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def wire() -> Iterator[tuple[str, type[Recorded]]]:
    Recorded.requests, Recorded.answers = [], {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorded)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", Recorded
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_the_admin_sends_the_as_token_and_asserts_the_device_user(wire: tuple[str, type[Recorded]]) -> None:
    base, recorded = wire
    registration = generate("http://127.0.0.1:8010")
    recorded.answers["/_matrix/client/v3/account/whoami"] = (200, b'{"user_id": "@comatrix:test.local"}')
    admin = AppserviceAdmin(base, registration)
    assert admin.create_device_user("s1") == "@comatrix_s1:test.local"
    admin.deactivate("@comatrix_s1:test.local")
    bearer = f"Bearer {registration.as_token}"
    assert [(method, path, auth) for method, path, auth, _body in recorded.requests] == [
        ("GET", "/_matrix/client/v3/account/whoami", bearer),
        ("POST", "/_matrix/client/v3/register?kind=user", bearer),
        ("PUT", "/_matrix/client/v3/profile/%40comatrix_s1%3Atest.local/displayname"
                "?user_id=%40comatrix_s1%3Atest.local", bearer),
        ("POST", "/_matrix/client/v3/account/deactivate?user_id=%40comatrix_s1%3Atest.local", bearer),
    ]
    assert json.loads(recorded.requests[1][3])["type"] == "m.login.application_service"


def test_the_admin_reports_the_errcode_and_never_the_token(wire: tuple[str, type[Recorded]]) -> None:
    base, recorded = wire
    registration = generate("http://127.0.0.1:8010")
    recorded.answers["/_matrix/client/v3/account/whoami"] = (
        401, json.dumps({"errcode": "M_UNKNOWN_TOKEN", "error": f"bad {registration.as_token[:4]}"}).encode())
    with pytest.raises(AdminError, match="HTTP 401 M_UNKNOWN_TOKEN") as refused:
        AppserviceAdmin(base, registration).server_name()
    assert registration.as_token not in str(refused.value)
    recorded.answers["/_matrix/client/v3/account/whoami"] = (500, b"<html>oops</html>")
    with pytest.raises(AdminError, match="HTTP 500"):
        AppserviceAdmin(base, registration).server_name()
    recorded.answers["/_matrix/client/v3/account/whoami"] = (200, b'{"user_id": "no-server"}')
    with pytest.raises(AdminError, match="did not say who"):
        AppserviceAdmin(base, registration).server_name()


def test_an_unreachable_homeserver_is_one_line(tmp_path: Path) -> None:
    import socket
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(AdminError, match=f"cannot reach the homeserver at http://127.0.0.1:{port}"):
        AppserviceAdmin(f"http://127.0.0.1:{port}", generate("http://x")).server_name()
