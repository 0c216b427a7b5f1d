"""``comatrixctl doctor``: checks a deployment and prints one ``OK``/``WARN``/``FAIL`` line per check.

What is checked: the config (it loads), the files holding secrets (not open to
others), the homeserver (reachable, ``/versions``, its clock against ours from
the HTTP ``Date`` header), the credentials of every ``[[devices]]`` entry
(``whoami`` for tokens; a password entry is never logged in with -- that would
make a Matrix device and count against login limits -- its kept token is tried,
else the user's profile shows it exists), application-service mode (the
registration loads, its ``as_token`` is valid, the gateway's transaction API
answers a ping with the ``hs_token``), the radio interface and its link-local
address, the CoAP and DTLS ports, and the state directory.

A command-line tool, not the daemon: every call blocks (urllib, plain sockets)
with a timeout of a few seconds.  The check functions that take facts and
return a `Check` are pure, for the unit tests; the ``probe_*`` and `diagnose`
functions gather the facts.  No line ever holds a secret: tokens and passwords
go only into request headers and bodies, and homeserver answers are reduced to
their errcode.
"""

from __future__ import annotations

import dataclasses
import email.utils
import errno
import grp
import ipaddress
import json
import os
import pwd
import secrets
import socket
import sqlite3
import stat
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence, TextIO

from comatrix.appservice.registration import Registration, load_registration
from comatrix.coap import wire
from comatrix.coap.numbers import MessageType
from comatrix.config import (DEVICES_DIR, Config, ServiceCredentials, ConfigError, DeviceCredentials, build_config,
                             check_secret_file_mode, read_config_files, read_file_and_mode)
from comatrix.netif import read_link_local_address
from comatrix.store import DB_FILENAME

__all__ = ["Check", "OK", "WARN", "FAIL", "diagnose", "render", "exit_status", "http_json", "Answer",
           "Unreachable"]

OK, WARN, FAIL = "OK", "WARN", "FAIL"

#: Seconds one HTTP call or one UDP probe may take.
TIMEOUT = 3.0
#: Clock skew against the homeserver: beyond the first a warning, beyond the second a failure.
CLOCK_WARN = 60.0
CLOCK_FAIL = 300.0
#: The user the packaged service runs as (owner of the state directory).
SERVICE_USER = "comatrix"

_GET, _CON = 0x01, int(MessageType.CON)
_URI_PATH = 11


@dataclasses.dataclass(frozen=True)
class Check:
    """One line of the report: its verdict, what was checked, and a short text (never a secret)."""

    status: str
    name: str
    text: str

    def line(self) -> str:
        return f"{self.status:<4} {self.name}: {self.text}"


def render(checks: Iterable[Check]) -> str:
    return "".join(check.line() + "\n" for check in checks)


def exit_status(checks: Sequence[Check]) -> int:
    """1 when any check failed, else 0 (warnings do not fail)."""
    return 1 if any(check.status == FAIL for check in checks) else 0


# ------------------------------------------------------------------ HTTP (blocking)

class Unreachable(Exception):
    """No HTTP answer at all (refused, timed out, name unknown); the text names no secret."""


@dataclasses.dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]
    date: str | None = None

    @property
    def errcode(self) -> str:
        return str(self.body.get("errcode") or f"HTTP {self.status}")


def http_json(method: str, url: str, *, token: str | None = None, body: Any = None,
              timeout: float = TIMEOUT) -> Answer:
    """One JSON call; any HTTP status is an `Answer`, no answer at all is `Unreachable`."""
    data = json.dumps(body).encode("utf-8") if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw, date = response.status, response.read(), response.headers.get("Date")
    except urllib.error.HTTPError as error:
        status, raw, date = error.code, error.read(), error.headers.get("Date")
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise Unreachable(str(reason) or type(reason).__name__) from None
    try:
        decoded = json.loads(raw) if raw else {}
    except ValueError:
        decoded = {}
    return Answer(status, decoded if isinstance(decoded, dict) else {}, date)


def _client(base: str, *segments: str, query: Mapping[str, str] | None = None) -> str:
    path = "/".join(urllib.parse.quote(segment, safe="") for segment in segments)
    url = f"{base.rstrip('/')}/_matrix/client/{path}"
    return url + ("?" + urllib.parse.urlencode(query) if query else "")


# ------------------------------------------------------------------ pure checks

def config_check(path: Path, config: Config | None, error: str | None) -> Check:
    if config is None:
        return Check(FAIL, "config", error or f"{path} does not load")
    return Check(OK, "config", f"{path} loads ({len(config.devices)} device entr"
                               f"{'y' if len(config.devices) == 1 else 'ies'})")


def secret_file_problem(path: Path | str, mode: int, values: Any) -> str | None:
    """Why a file holding secrets is open to others (`check_secret_file_mode`), or None."""
    try:
        check_secret_file_mode(path, mode, values)
    except ConfigError as exc:
        return str(exc)
    return None


def registration_mode_problem(path: Path | str, mode: int, holds: str = "the appservice tokens") -> str | None:
    """A file that always holds a secret (the appservice registration, Synapse's shared secret):
    no access for others at all."""
    if stat.S_IMODE(mode) & 0o007:
        return f"{path} holds {holds} and is open to others (mode {stat.S_IMODE(mode):04o}); chmod o-rwx it"
    return None


def listener_check(name: str, where: str, answer: Answer | None, reason: str | None = None) -> Check:
    """An HTTP listener of the gateway (HTTP API, metrics): answering 200, or not there."""
    if answer is None:
        return Check(WARN, name, f"nothing answers at {where} (gateway not running?): {reason}")
    if answer.status == 200:
        return Check(OK, name, f"the gateway answers at {where}")
    return Check(FAIL, name, f"{where} answered {answer.errcode}: another program holds the port?")


def file_modes_check(problems: Sequence[str], checked: int) -> list[Check]:
    if problems:
        return [Check(FAIL, "file modes", problem) for problem in problems]
    return [Check(OK, "file modes", f"{checked} config/credential file(s), none with secrets open to others")]


def versions_check(base: str, answer: Answer) -> Check:
    versions = answer.body.get("versions")
    if answer.status != 200 or not isinstance(versions, list) or not versions:
        return Check(FAIL, "homeserver", f"{base}/_matrix/client/versions answered {answer.errcode}, "
                                         f"not a Matrix homeserver?")
    return Check(OK, "homeserver", f"{base} reachable, spec versions up to {versions[-1]}")


def clock_check(local: float, date_header: str | None) -> Check:
    """Our clock against the homeserver's ``Date`` (HTTP dates have whole seconds: 1 s slack)."""
    if not date_header:
        return Check(WARN, "clock", "the homeserver sent no Date header: not compared")
    try:
        remote = email.utils.parsedate_to_datetime(date_header).timestamp()
    except (TypeError, ValueError):
        return Check(WARN, "clock", "the homeserver's Date header does not parse: not compared")
    skew = local - remote
    text = f"local clock {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} the homeserver's"
    if abs(skew) > CLOCK_FAIL:
        return Check(FAIL, "clock", f"{text} (over {CLOCK_FAIL:.0f} s: tokens and OSCORE/EDHOC need "
                                    f"sane time; check NTP, timedatectl)")
    if abs(skew) > CLOCK_WARN:
        return Check(WARN, "clock", f"{text} (over {CLOCK_WARN:.0f} s; check NTP)")
    return Check(OK, "clock", f"within {max(abs(skew), 1.0):.0f} s of the homeserver's")


def device_name(device: DeviceCredentials) -> str:
    return f"device {device.user or '?'} ({device.label})"


def whoami_check(name: str, answer: Answer, expected_user: str | None, what: str = "access token") -> Check:
    if answer.status == 200:
        user = answer.body.get("user_id")
        if expected_user and user != expected_user:
            return Check(FAIL, name, f"{what} belongs to {user}, not {expected_user}")
        return Check(OK, name, f"{what} valid ({user})")
    if answer.status in (401, 403):
        return Check(FAIL, name, f"{what} refused by the homeserver ({answer.errcode})")
    return Check(WARN, name, f"whoami answered {answer.errcode}: not checked")


def profile_check(name: str, answer: Answer, user: str) -> Check:
    """A password entry: the user exists (its password is not tried: that would be a login)."""
    if answer.status == 200:
        return Check(OK, name, "user exists (password not checked: doctor does not log in)")
    if answer.status == 404:
        return Check(FAIL, name, f"no user {user} on the homeserver ({answer.errcode})")
    return Check(WARN, name, f"password not checked without logging in (profile: {answer.errcode})")


def interface_check(interface: str | None, ip: str, exists: bool, link_local: str | None) -> Check:
    if interface is None:
        try:
            unspecified = ipaddress.ip_address(ip.split("%", 1)[0]).is_unspecified
        except ValueError:
            unspecified = False
        if unspecified:
            return Check(WARN, "interface", f"none configured: listening on every address ({ip}), "
                                            f"not only the radio's (set interface = \"lowpan0\")")
        return Check(OK, "interface", f"none configured, bound to ip {ip}")
    if not exists:
        return Check(FAIL, "interface", f"{interface} does not exist (radio not up? ip link show)")
    if link_local is None:
        return Check(FAIL, "interface", f"{interface} has no usable link-local address (down, or still in "
                                        f"duplicate address detection)")
    return Check(OK, "interface", f"{interface} has {link_local}")


def port_check(name: str, where: str, answered: bool, bound: bool | None) -> Check:
    """``answered``: a CoAP reply came; ``bound``: something holds the UDP port (None: unknown)."""
    if answered:
        return Check(OK, name, f"the gateway answers on udp {where}")
    if bound:
        return Check(OK if name == "dtls port" else WARN, name,
                     f"udp {where} is bound" + ("" if name == "dtls port" else " but nothing answered CoAP"))
    if bound is None:
        return Check(WARN, name, f"no answer on udp {where}")
    return Check(WARN, name, f"nothing listens on udp {where} (gateway not running? systemctl status comatrix)")


def state_dir_check(path: str | None, mode: int | None, owner: str | None, writable: bool | None,
                    writer: str = SERVICE_USER) -> Check:
    """``mode`` None: missing; ``owner``: its owner's name; ``writable``: by ``writer``, None: unknown."""
    if path is None:
        return Check(WARN, "state dir", "no state_dir: sessions and tokens are kept in memory only")
    if mode is None:
        return Check(WARN, "state dir", f"{path} does not exist yet (the gateway makes it, 0700)")
    bits = stat.S_IMODE(mode)
    if bits & 0o002:
        return Check(FAIL, "state dir", f"{path} is writable by others (mode {bits:04o}); chmod 0700 it")
    if writable is False:
        return Check(FAIL, "state dir", f"{path} is not writable by {writer} (owner {owner})")
    if bits & 0o025:
        return Check(WARN, "state dir", f"{path} is open to others or group-writable (mode {bits:04o}); "
                                        f"0700 or 0750 expected")
    return Check(OK, "state dir", f"{path} mode {bits:04o}, owner {owner}"
                                  + ("" if writable is None else f", writable by {writer}"))


def ping_check(where: str, answer: Answer | None, reason: str | None = None) -> Check:
    name = "appservice ping"
    if answer is None:
        return Check(WARN, name, f"nothing answers at {where} (gateway not running?): {reason}")
    if answer.status == 200:
        return Check(OK, name, f"the gateway's transaction API at {where} accepts the hs_token")
    if answer.status in (401, 403):
        return Check(FAIL, name, f"the gateway at {where} refused the hs_token ({answer.errcode}): "
                                 f"it runs with another registration; restart it")
    return Check(FAIL, name, f"{where} answered {answer.errcode}: not the gateway's transaction API?")


# ------------------------------------------------------------------ probes

def is_reply(datagram: bytes, mid: int, token: bytes) -> bool:
    """Whether ``datagram`` answers our probe (same message id, or same token)."""
    try:
        reply = wire.decode(datagram)
    except wire.FormatError:
        return False
    return reply.mid == mid or (bool(reply.token) and reply.token == token)


def coap_answers(host: str, port: int, timeout: float = TIMEOUT) -> bool:
    """A confirmable GET /time: any CoAP answer (even an error or a reset) shows a server."""
    mid, token = secrets.randbits(16), secrets.token_bytes(4)
    probe = wire.encode(_CON, _GET, mid, token, [(_URI_PATH, b"time")])
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM,
                                                  flags=socket.AI_NUMERICHOST)[0]
    deadline = time.monotonic() + timeout
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(probe, address)
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                if is_reply(sock.recv(2048), mid, token):
                    return True
        except OSError:  # timeout, or ICMP port unreachable (refused)
            return False
    return False


def udp_port_bound(host: str, port: int) -> bool | None:
    """Whether something holds ``host``:``port`` (our bind fails), None when we cannot tell."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM,
                                                  flags=socket.AI_NUMERICHOST)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(address)
        except OSError as exc:
            return True if exc.errno == errno.EADDRINUSE else None
    return False


def probe_host(config: Config) -> str | None:
    """Where to send probes: the interface's link-local address, loopback for a wildcard ip."""
    if config.interface:
        return read_link_local_address(config.interface)
    try:
        address = ipaddress.ip_address(config.ip.split("%", 1)[0])
    except ValueError:
        return None
    if address.is_unspecified:
        return "::1" if address.version == 6 else "127.0.0.1"
    return config.ip


def kept_token(state_dir: str | None, device: DeviceCredentials) -> str | None:
    """The token the gateway kept for a password entry's login (read-only; None when there is none)."""
    if state_dir is None or device.user is None:
        return None
    path = Path(state_dir) / DB_FILENAME
    if not path.is_file():
        return None
    # A read-only connection to a WAL database whose -wal/-shm files are gone (no gateway running)
    # creates them, owned by whoever runs doctor (root): the gateway could then not open its own
    # database.  Without them the database is whole (checkpointed at the last close) and is read
    # as immutable, which creates nothing; with them (a gateway running) it is read through them.
    running = all(Path(f"{path}{suffix}").exists() for suffix in ("-wal", "-shm"))
    uri = f"file:{urllib.parse.quote(str(path))}?{'mode=ro' if running else 'immutable=1'}"
    try:
        connection = sqlite3.connect(uri, uri=True, timeout=1.0)
        try:
            row = connection.execute("SELECT access_token FROM device_tokens WHERE user_id = ? AND device_id = ?",
                                     (device.user, device.login_device_id)).fetchone()
        finally:
            connection.close()
    except sqlite3.Error:
        return None
    return str(row[0]) if row else None


# ------------------------------------------------------------------ the checks, in order

def load(path: Path) -> tuple[Config | None, str | None]:
    try:
        return build_config(read_config_files(path)), None
    except ConfigError as exc:
        return None, str(exc)


def _raw_values(path: Path) -> tuple[dict[str, Any], int] | None:
    try:
        raw, mode = read_file_and_mode(path, "file")
        return tomllib.loads(raw.decode("utf-8")), mode
    except (ConfigError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None


def _config_files(config_path: Path) -> tuple[list[Path], list[Path]]:
    """(the files with settings: the config and conf.d/, the devices.d/ files), as the loader finds them."""
    conf_d, devices_d = (config_path.parent / name for name in ("conf.d", DEVICES_DIR))
    settings = [config_path] + (sorted(conf_d.glob("*.toml")) if conf_d.is_dir() else [])
    return settings, sorted(devices_d.glob("*.toml")) if devices_d.is_dir() else []


def _referenced_problem(key: str, value: Any) -> str | None:
    """The credentials file or the appservice registration a setting names, checked raw."""
    if key == "credentials_file" and isinstance(value, str):
        found = _raw_values(Path(value))
        return secret_file_problem(value, found[1], found[0]) if found else None
    named = {"appservice": ("registration", "the appservice tokens"),
             "http_api": ("registration_shared_secret_file", "Synapse's registration shared secret")}.get(key)
    path = value.get(named[0]) if named is not None and isinstance(value, dict) else None
    if named is not None and isinstance(path, str):
        try:
            return registration_mode_problem(path, os.stat(path).st_mode, named[1])
        except OSError:
            return None  # missing: the check of what uses it says so
    return None


def check_file_modes(config_path: Path) -> list[Check]:
    """Every file that may hold a secret, read raw: they are checked even when the config does not load."""
    settings, devices = _config_files(config_path)
    problems: list[str | None] = []
    referenced: dict[str, Any] = {}
    for path in settings + devices:
        found = _raw_values(path)
        if found is not None:
            problems.append(secret_file_problem(path, found[1], found[0]))
            if path in settings:  # as the loader: devices.d files give [[devices]] only
                referenced.update({key: found[0][key] for key in ("credentials_file", "appservice", "http_api")
                                   if key in found[0]})
    problems += [_referenced_problem(key, value) for key, value in referenced.items()]
    return file_modes_check([problem for problem in problems if problem],
                            len(settings) + len(devices) + len(referenced))


def check_homeserver(config: Config) -> tuple[list[Check], bool]:
    """(checks, whether the homeserver answered): versions, then the clock from the same answer."""
    base = config.homeserver
    try:
        answer = http_json("GET", _client(base, "versions"))
    except Unreachable as exc:
        return [Check(FAIL, "homeserver", f"{base} unreachable: {exc}")], False
    return [versions_check(base, answer), clock_check(time.time(), answer.date)], answer.status == 200


def check_device(base: str, device: DeviceCredentials, config: Config,
                 registration: Registration | None) -> Check:
    name = device_name(device)
    try:
        if device.access_token:
            return whoami_check(name, http_json("GET", _client(base, "v3", "account", "whoami"),
                                                token=device.access_token), device.user)
        if device.appservice:
            if registration is None:
                return Check(WARN, name, "appservice user not checked: the registration does not load")
            answer = http_json("GET", _client(base, "v3", "account", "whoami",
                                              query={"user_id": str(device.user)}), token=registration.as_token)
            return whoami_check(name, answer, device.user, "appservice user")
        token = kept_token(config.state_dir, device)
        if token is not None:
            kept = whoami_check(name, http_json("GET", _client(base, "v3", "account", "whoami"), token=token),
                                device.user, "kept login token")
            if kept.status == OK:
                return kept
        return profile_check(name, http_json("GET", _client(base, "v3", "profile", str(device.user))),
                             str(device.user))
    except Unreachable as exc:
        return Check(FAIL, name, f"homeserver unreachable: {exc}")


def check_appservice(config: Config) -> tuple[list[Check], Registration | None]:
    if config.appservice is None:
        return [], None
    settings = config.appservice
    try:
        registration = load_registration(settings.registration)
    except ConfigError as exc:
        return [Check(FAIL, "appservice", str(exc))], None
    checks = [Check(OK, "appservice", f"registration {settings.registration} loads (id {registration.id})")]
    try:
        checks.append(whoami_check("appservice token", http_json(
            "GET", _client(config.homeserver, "v3", "account", "whoami"), token=registration.as_token),
            None, "as_token"))
    except Unreachable as exc:
        checks.append(Check(FAIL, "appservice token", f"homeserver unreachable: {exc}"))
    host = settings.bind
    if ipaddress.ip_address(host).is_unspecified:
        host = "::1" if ":" in host else "127.0.0.1"
    where = f"http://{'[' + host + ']' if ':' in host else host}:{settings.port}"
    try:
        answer = http_json("POST", f"{where}/_matrix/app/v1/ping", token=registration.hs_token, body={})
        checks.append(ping_check(where, answer))
    except Unreachable as exc:
        checks.append(ping_check(where, None, str(exc)))
    return checks, registration


def check_service(base: str, service: ServiceCredentials, config: Config) -> Check:
    """A ``[[services]]`` entry's Matrix user, checked as a device entry's is (never by logging in)."""
    return dataclasses.replace(check_device(base, service.as_device(), config, None), name=f"service {service.name}")


def check_listeners(config: Config) -> list[Check]:
    """The HTTP API and the metrics endpoint, when enabled: something of the gateway's answers there."""
    probes = []
    if config.http_api.enabled:
        probes.append(("http api", config.http_api.bind, config.http_api.port, "/internal/matrix/openapi.json"))
    if config.metrics.enabled:
        probes.append(("metrics", config.metrics.bind, config.metrics.port, "/metrics"))
    checks = []
    for name, bind, port, path in probes:
        host = ("::1" if ":" in bind else "127.0.0.1") if ipaddress.ip_address(bind).is_unspecified else bind
        where = f"http://{'[' + host + ']' if ':' in host else host}:{port}{path}"
        try:
            checks.append(listener_check(name, where, http_json("GET", where)))
        except Unreachable as exc:
            checks.append(listener_check(name, where, None, str(exc)))
    return checks


def check_interface(config: Config) -> Check:
    exists = False
    if config.interface:
        try:
            socket.if_nametoindex(config.interface)
            exists = True
        except OSError:
            pass
    link_local = read_link_local_address(config.interface) if exists and config.interface else None
    return interface_check(config.interface, config.ip, exists, link_local)


def check_ports(config: Config) -> list[Check]:
    host = probe_host(config)
    ports = [("coap port", config.port)] + ([("dtls port", config.dtls_port)] if config.dtls_port else [])
    if host is None:
        return [Check(WARN, name, f"udp {port} not probed: no address to reach it at") for name, port in ports]
    checks = []
    for name, port in ports:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        answered = name == "coap port" and coap_answers(host, port)
        checks.append(port_check(name, where, answered, None if answered else udp_port_bound(host, port)))
    return checks


def _service_account() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return None


def writable_by(info: os.stat_result, account: pwd.struct_passwd) -> bool:
    """Whether ``account`` may write the directory ``info`` describes (by its mode bits)."""
    bits = stat.S_IMODE(info.st_mode)
    if account.pw_uid == 0:
        return True
    if info.st_uid == account.pw_uid:
        return bool(bits & 0o200)
    groups = {account.pw_gid} | {group.gr_gid for group in _groups_of(account.pw_name)}
    if info.st_gid in groups:
        return bool(bits & 0o020)
    return bool(bits & 0o002)


def _groups_of(user: str) -> Iterator[Any]:
    return (group for group in grp.getgrall() if user in group.gr_mem)


def check_state_dir(config: Config) -> Check:
    path = config.state_dir
    if path is None:
        return state_dir_check(None, None, None, None)
    try:
        info = os.stat(path)
    except OSError:
        return state_dir_check(path, None, None, None)
    try:
        owner = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        owner = str(info.st_uid)
    account = _service_account()
    if account is None:  # no service user (a checkout): the user running doctor runs the gateway too
        return state_dir_check(path, info.st_mode, owner, os.access(path, os.W_OK), "this user")
    return state_dir_check(path, info.st_mode, owner, writable_by(info, account), account.pw_name)


def diagnose(config_path: Path) -> list[Check]:
    """All checks, in the order an operator fixes things."""
    config, error = load(config_path)
    checks = [config_check(config_path, config, error), *check_file_modes(config_path)]
    if config is None:
        return checks + [Check(WARN, "the rest", "not checked: the config does not load")]
    homeserver, up = check_homeserver(config)
    checks += homeserver
    appservice, registration = check_appservice(config)
    checks += appservice
    if up:
        checks += [check_device(config.homeserver, device, config, registration) for device in config.devices]
        checks += [check_service(config.homeserver, service, config) for service in config.services]
    elif config.devices or config.services:
        checks.append(Check(WARN, "devices", "credentials not checked: the homeserver is unreachable"))
    return checks + [check_interface(config), *check_ports(config), *check_listeners(config),
                     check_state_dir(config)]


def run(config_path: Path, out: TextIO) -> int:
    checks = diagnose(config_path)
    out.write(render(checks))
    return exit_status(checks)
