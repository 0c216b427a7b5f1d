"""One typed `Config` for the gateway, built from defaults < config file(s) < command line.

The config file is TOML (read with the standard library).  Its keys mirror the
command-line options one to one (``--plugin-dir`` <-> ``plugin_dirs``); a
``conf.d/`` directory beside the file is merged after it, in lexical order, so
packagers and admins can add fragments without editing the main file.  Device
credentials may live in a separate ``credentials_file`` (kept 0640) with the
same ``[[devices]]`` tables.  Any of these files that holds a secret and is open
to "others" is refused, so every entry point (twistd, tools) gets the check.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any, Iterable, Mapping

from comatrix.coap.message import Security
from comatrix.coap.server import CoapSettings
from comatrix.dtls.sessions import DtlsSettings
from comatrix.edhoc.ccs import Ccs, parse_ccs
from comatrix.policy import expand_allow
from comatrix.protection import SECURITY_MODES


#: The IANA port of "coaps" (CoAP over DTLS, RFC 7252 §12.7).
DEFAULT_DTLS_PORT = 5684

#: Directory beside the config file with one provisioned device per file (`comatrix.ctl`).
DEVICES_DIR = "devices.d"


class ConfigError(ValueError):
    """A config value is missing, of the wrong type, or makes no sense (one line, no secrets)."""


#: OSCORE ids fit the AEAD nonce (RFC 8613 §5.2: 13 - 6 bytes); master secrets have at least 128 bits.
OSCORE_MAX_ID_BYTES = 7
OSCORE_MIN_SECRET_BYTES = 16


@dataclasses.dataclass(frozen=True)
class OscoreCredentials:
    """The ``oscore = {...}`` table of a ``[[devices]]`` entry: RFC 8613 §3.1 inputs, ids in hex.

    ``recipient_id`` is the id the device sends as (the kid of its requests),
    ``sender_id`` the gateway's.  The secret and salt never appear in a repr.
    """

    recipient_id: bytes
    sender_id: bytes
    master_secret: bytes = dataclasses.field(repr=False)
    master_salt: bytes = dataclasses.field(default=b"", repr=False)


@dataclasses.dataclass(frozen=True)
class EdhocCredentials:
    """The ``edhoc = {...}`` table of a ``[[devices]]`` entry: the device's CCS (public, RFC 9528 §3.5.2)."""

    credential: Ccs

    @property
    def identity(self) -> str:
        return self.credential.fingerprint


@dataclasses.dataclass(frozen=True)
class DeviceCredentials:
    """Matrix credentials the gateway uses for devices that send no token of their own.

    ``network`` is an address or prefix; the longest matching prefix wins.  An
    entry with ``oscore`` is (also) found by its OSCORE recipient id, one with a
    ``psk_identity`` by the PSK identity a device proves over DTLS, one with
    ``edhoc`` by the credential it proves in EDHOC; such an entry needs no address.
    Either ``access_token`` or ``user`` + ``password`` is given.
    """

    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    user: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    access_token: str | None = dataclasses.field(default=None, repr=False)
    #: The Matrix device the gateway logs in as for ``user``: the same one at every
    #: login, so Matrix's per-device txnId scope spans gateway restarts and the
    #: account does not gain a device per restart.  Derived when not configured.
    device_id: str | None = None
    #: Operations beyond the device ones that devices acting through this entry may use
    #: (the ``allow`` list, categories expanded; see `comatrix.policy`).
    allow: frozenset[str] = frozenset()
    oscore: OscoreCredentials | None = None
    #: DTLS PSK identity and key (RFC 7925); the key is never shown.
    psk_identity: str | None = None
    psk: bytes | None = dataclasses.field(default=None, repr=False)
    edhoc: EdhocCredentials | None = None
    #: A device user of the application service (``appservice = true``): the gateway acts as
    #: ``user`` with the ``as_token``; no password, no token, no login.
    appservice: bool = False
    #: Who may invite the device's user (``allow_invites_from``): user ids, ``*:server`` or ``*``.
    #: None: users of the device user's own server.
    allow_invites_from: tuple[str, ...] | None = None
    #: Whose messages the device's watches and history deliver (``allowed_senders``): user ids,
    #: ``*:server`` or ``*``; its own always.  None: users of the device user's own server.
    allowed_senders: tuple[str, ...] | None = None
    #: Per-room lists (``[devices.rooms."!room"] allowed_senders``) as (room id, patterns) pairs;
    #: each replaces ``allowed_senders`` in its room.
    room_senders: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def senders_in(self, room_id: str) -> tuple[str, ...] | None:
        """The sender patterns that apply in ``room_id`` (None: the default, the user's own server)."""
        for room, patterns in self.room_senders:
            if room == room_id:
                return patterns
        return self.allowed_senders

    @property
    def login_device_id(self) -> str:
        if self.device_id:
            return self.device_id
        seed = f"{self.user}\0{self.label}".encode("utf-8")
        return "COMATRIX" + hashlib.sha256(seed).hexdigest()[:12].upper()

    @property
    def label(self) -> str:
        """Which devices the entry is for, in one stable phrase: its address or prefix, else the
        identity it is found by (for EDHOC the kid, which survives a key rotation)."""
        if self.network is not None:
            return str(self.network)
        if self.oscore is not None:
            return f"oscore:{self.oscore_identity}"
        if self.edhoc is not None:
            return f"edhoc-kid:{self.edhoc.credential.kid.hex()}"
        return f"dtls:{self.psk_identity}"

    @property
    def oscore_identity(self) -> str | None:
        """The identity of requests through this entry's OSCORE context (its recipient id in hex)."""
        return self.oscore.recipient_id.hex() if self.oscore is not None else None

    @property
    def securities(self) -> frozenset[Security]:
        """The security contexts a request of this entry's device can come through."""
        found = set()
        if self.psk_identity is not None:
            found.add(Security("dtls", self.psk_identity))
        if self.oscore_identity is not None:
            found.add(Security("oscore", self.oscore_identity))
        if self.edhoc is not None:
            found.add(Security("edhoc", self.edhoc.identity))
        return frozenset(found)

    def identifies(self, security: Security) -> bool:
        """Whether a request that came through ``security`` is this entry's device."""
        return security in self.securities

    def matches(self, host: str) -> bool:
        address = host_address(host)
        return address is not None and self.contains(address)

    def contains(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Whether ``address`` (from `host_address`) is in this entry's ``address`` prefix."""
        return self.network is not None and address.version == self.network.version and address in self.network


def host_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A peer's host as an address (zone id dropped, IPv4-mapped IPv6 as IPv4); None if it is not one."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


#: ``[http_api] port`` when not configured (the port of the spec's examples).
DEFAULT_HTTP_API_PORT = 7003
#: Shortest ``X-Internal-Service-Token`` accepted (a shared secret, not a password to remember).
MIN_SERVICE_TOKEN = 16


@dataclasses.dataclass(frozen=True)
class WebhookSettings:
    """The webhook keys of ``[http_api]`` (`WEBHOOK_KEYS`; used by `comatrix.webhooks`)."""

    #: Deadline of one delivery attempt (connect + request + answer), milliseconds.
    webhook_timeout_ms: int = 5000
    #: Destination hosts a subscription URL may name, literally (IPv6 without brackets).
    webhook_hosts: tuple[str, ...] = ("127.0.0.1", "::1", "localhost")
    #: Retries after a failed first attempt; the delay before the n-th is webhook_backoff * 2**(n-1) s.
    webhook_retries: int = 3
    webhook_backoff: float = 1.0
    max_subscriptions_per_service: int = 64
    max_subscriptions: int = 1024
    #: Deliveries queued (not yet taken by their receiver) of one service, and in all.
    max_deliveries_per_service: int = 10000
    max_deliveries: int = 100000

    def __post_init__(self) -> None:
        if not 1 <= self.webhook_timeout_ms <= 600_000:
            raise ValueError("webhook_timeout_ms must be between 1 and 600000")
        if not self.webhook_hosts or not all(isinstance(h, str) and h and h == h.lower().strip("[]")
                                             for h in self.webhook_hosts):
            raise ValueError("webhook_hosts must be a non-empty list of lower-case host names or addresses")
        if not 0 <= self.webhook_retries <= 10:
            raise ValueError("webhook_retries must be between 0 and 10")
        if not 0 < self.webhook_backoff <= 3600:
            raise ValueError("webhook_backoff must be positive (at most 3600 s)")
        if not 1 <= self.max_subscriptions_per_service <= self.max_subscriptions:
            raise ValueError("max_subscriptions_per_service must be between 1 and max_subscriptions")
        if not 1 <= self.max_deliveries_per_service <= self.max_deliveries:
            raise ValueError("max_deliveries_per_service must be between 1 and max_deliveries")

    @property
    def timeout(self) -> float:
        return self.webhook_timeout_ms / 1000.0

    def delay(self, failures: int) -> float:
        """Seconds before the retry that follows the ``failures``-th failed attempt."""
        return float(self.webhook_backoff * 2 ** (failures - 1))

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> "WebhookSettings":
        """Settings from the `WEBHOOK_KEYS` of an ``[http_api]`` table (others ignored); ValueError names the key."""
        values: dict[str, Any] = {}
        for key in WEBHOOK_KEYS:
            if key not in table:
                continue
            value, default = table[key], getattr(cls, key)
            if key == "webhook_hosts":
                if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                    raise ValueError("webhook_hosts must be a list of host names or addresses")
                values[key] = tuple(item.lower().strip("[]") for item in value)
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{key} must be a number")
            elif isinstance(default, int) and value != int(value):
                raise ValueError(f"{key} must be an integer")
            else:
                values[key] = type(default)(value)
        return cls(**values)


WEBHOOK_KEYS = tuple(field.name for field in dataclasses.fields(WebhookSettings))


@dataclasses.dataclass(frozen=True)
class HttpApiSettings:
    """The ``[http_api]`` table: the internal HTTP/JSON API for services on the border router."""

    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = DEFAULT_HTTP_API_PORT
    #: Largest request body (a media upload), bytes.
    max_body_bytes: int = 10 * 1024 * 1024
    #: Synapse's registration shared secret, for ``register-user`` (None: that endpoint answers 501).
    registration_shared_secret_file: str | None = None
    webhooks: WebhookSettings = WebhookSettings()


@dataclasses.dataclass(frozen=True)
class ServiceCredentials:
    """One ``[[services]]`` entry: a local service, its shared secret and the Matrix user it acts as."""

    name: str
    token: str = dataclasses.field(repr=False)
    user: str
    password: str | None = dataclasses.field(default=None, repr=False)
    access_token: str | None = dataclasses.field(default=None, repr=False)
    #: Requests per second the service may make, sustained, and its burst.
    rate: float = 100.0
    burst: int = 200
    #: Application-service mode: the namespace users it may act for (shell patterns, e.g.
    #: ``@comatrix_door*``); empty: only its own user.
    users: tuple[str, ...] = ()
    #: The rooms (ids or aliases, as requests name them) it may act in; empty: any its users are in.
    rooms: tuple[str, ...] = ()
    #: Whether ``register-user`` may create server admins for it.
    register_admins: bool = False

    def as_device(self) -> "DeviceCredentials":
        """The service's Matrix identity as the credentials layer keeps logins: one Matrix device."""
        device_id = "COMATRIXSVC" + hashlib.sha256(f"{self.name}\0{self.user}".encode("utf-8")).hexdigest()[:10].upper()
        return DeviceCredentials(network=None, user=self.user, password=self.password,
                                 access_token=self.access_token, device_id=device_id)


#: ``[appservice] port`` when not configured.
DEFAULT_APPSERVICE_PORT = 8010


@dataclasses.dataclass(frozen=True)
class AppserviceSettings:
    """The ``[appservice]`` table: the registration file, and where the homeserver pushes transactions."""

    registration: str
    bind: str = "127.0.0.1"
    port: int = DEFAULT_APPSERVICE_PORT


#: ``[metrics] port`` when not configured (the usual port of Prometheus exporters of OpenTelemetry).
DEFAULT_METRICS_PORT = 9464


@dataclasses.dataclass(frozen=True)
class MetricsSettings:
    """The ``[metrics]`` table: the Prometheus endpoint (`comatrix.metrics`), off unless enabled."""

    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = DEFAULT_METRICS_PORT


#: Longest PSK identity accepted (RFC 4279 allows 2^16-1; devices use a few bytes).
MAX_PSK_IDENTITY = 128
#: PSK lengths accepted: at least 128 bits, at most what OpenSSL's callback takes.
PSK_BYTES = (16, 64)

#: What identifies a device for its rate limit (``[limits] device_key``).
DEVICE_KEYS = ("address", "token")


@dataclasses.dataclass(frozen=True)
class LimitSettings:
    """The ``[limits]`` table (used by `comatrix.ratelimit`).  A rate of 0 turns that limit off."""

    #: Requests per second one device may send upstream, sustained, and its burst.
    device_rate: float = 10.0
    device_burst: int = 20
    #: What identifies a device: its source address, or its access token (option 256)
    #: when it sends one (the address otherwise).
    device_key: str = "address"
    #: Requests per second all devices together may send upstream, and the burst.
    global_rate: float = 100.0
    global_burst: int = 200
    #: Devices whose buckets are remembered (least recently seen forgotten first).
    max_devices: int = 4096
    #: Homeserver calls in flight at once; further calls queue (FIFO).
    max_upstream: int = 16
    #: Calls that may wait for a slot; beyond this, 5.03 at once.
    upstream_queue: int = 256
    #: Longest a call waits in the queue before it is answered 5.03, seconds.
    queue_timeout: float = 10.0
    #: Wrong-password logins one device may make within ``login_failure_window``
    #: seconds; after that its logins are answered 4.29 by the gateway itself until
    #: the oldest failure leaves the window (a successful login resets it).  0: off.
    login_failures: int = 5
    login_failure_window: float = 300.0
    #: Live compact sessions (each a Matrix device) one device may hold (beyond: 4.29), and all
    #: devices together (beyond: 5.03); refused before the homeserver login is made.
    max_sessions_per_device: int = 4
    max_sessions: int = 1024
    #: Seconds a compact session may go unused before it is closed and its Matrix device logged out.
    session_idle_timeout: float = 604800.0
    #: Homeserver long-polls (``/sync``: plain MSC3079 long-polls, Observe loops, compact
    #: watches) one device may hold at once; the next is answered 4.29 with Max-Age.
    long_polls_per_device: int = 4
    #: Long-polls all devices together may hold (each is one TCP connection to the
    #: homeserver); capped at start to fit the process's open-file limit (`comatrix.longpoll`).
    max_long_polls: int = 256
    #: Largest media a compact upload (``comatrix.c.upload``) may carry, bytes (beyond: 4.13 with
    #: Size1); the memory its Block1 reassembly buffers may take, all devices together and one
    #: device's share (beyond: 5.03 / 4.29 with Max-Age).
    max_upload_size: int = 262144
    upload_memory: int = 4194304
    upload_memory_per_device: int = 524288

    def __post_init__(self) -> None:
        if self.device_rate < 0 or self.global_rate < 0:
            raise ValueError("rates must not be negative")
        if self.device_burst < 1 or self.global_burst < 1:
            raise ValueError("bursts must be at least 1")
        if self.device_key not in DEVICE_KEYS:
            raise ValueError("device_key must be 'address' or 'token'")
        if self.max_devices < 1 or self.max_upstream < 1 or self.upstream_queue < 0:
            raise ValueError("max_devices and max_upstream must be >= 1, upstream_queue >= 0")
        if self.queue_timeout <= 0:
            raise ValueError("queue_timeout must be positive")
        if self.login_failure_window <= 0:
            raise ValueError("login_failure_window must be positive")
        if self.max_sessions_per_device < 1 or self.max_sessions < 1:
            raise ValueError("max_sessions_per_device and max_sessions must be >= 1")
        if self.session_idle_timeout <= 0:
            raise ValueError("session_idle_timeout must be positive")
        if not 1 <= self.long_polls_per_device <= self.max_long_polls:
            raise ValueError("long_polls_per_device must be between 1 and max_long_polls")
        if not 1 <= self.max_upload_size <= self.upload_memory_per_device <= self.upload_memory:
            raise ValueError("1 <= max_upload_size <= upload_memory_per_device <= upload_memory required")


@dataclasses.dataclass(frozen=True)
class Config:
    ip: str = "::"
    port: int = 5683
    interface: str | None = None
    homeserver: str = "http://127.0.0.1:8008"
    plugin_dirs: tuple[str, ...] = ()
    disabled_plugins: tuple[str, ...] = ()
    state_dir: str | None = None
    credentials_file: str | None = None
    devices: tuple[DeviceCredentials, ...] = ()
    log_level: str = "info"
    #: Which requests need a security context (`comatrix.protection`): "required",
    #: "optional" (plain CoAP too: unsafe on a radio) or "off".
    security: str = "optional"
    #: Whether devices may create Matrix accounts through the gateway (an unsafe mode: anyone on
    #: the link could).  Off, every way to register answers 4.03 (`comatrix.policy`).
    allow_registration: bool = False
    #: Deadline for one homeserver call (connect + answer), seconds.  With the
    #: upstream queue's wait it stays below the CoAP EXCHANGE_LIFETIME.
    request_timeout: float = 10.0
    #: Seconds for the TCP connection to the homeserver, below ``request_timeout``.
    #: A homeserver that does not take the connection in time is down: 5.02, not 5.04.
    #: When not configured: 5 s, or half of a shorter ``request_timeout``.
    connect_timeout: float = 5.0
    max_connections: int = 8
    #: Seconds to let in-flight requests finish on SIGTERM before answering 5.03.
    shutdown_grace: float = 5.0
    #: Seconds to wait for ``interface`` to get a usable link-local address.
    interface_wait: float = 60.0
    alias_cache_ttl: float = 300.0
    coap: CoapSettings = CoapSettings()
    limits: LimitSettings = LimitSettings()
    #: The CoAP-over-DTLS port, None when DTLS is off.  Configured, or 5684 as soon as
    #: a ``[[devices]]`` entry has a PSK.
    dtls_port: int | None = None
    dtls: DtlsSettings = DtlsSettings()
    #: Application-service mode (`comatrix.appservice`), None when off.
    appservice: AppserviceSettings | None = None
    http_api: HttpApiSettings = HttpApiSettings()
    #: ``[[services]]``: who may use the HTTP API, each acting as its own Matrix user.
    services: tuple[ServiceCredentials, ...] = ()
    metrics: MetricsSettings = MetricsSettings()
    #: Worker processes sharing the CoAP (and DTLS) port with SO_REUSEPORT (`comatrix.workers`);
    #: 1 is one process, as before.
    workers: int = 1
    #: ``[plugins.<name>]`` tables, handed to the plugin of that name untouched.
    plugins: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def plugin_settings(self, name: str) -> Mapping[str, Any]:
        return self.plugins.get(name, {})

    def coap_settings(self) -> CoapSettings:
        return self.coap


#: Keys of the ``[coap]`` table, mapped onto CoapSettings fields of the same name.
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")

_COAP_KEYS = {field.name: field.type for field in dataclasses.fields(CoapSettings)}


#: Keys whose value is a secret, wherever they appear in a config file.
SECRET_KEYS = frozenset({"password", "access_token", "psk", "psk_hex", "master_secret", "token"})


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read one TOML file; errors become ConfigError naming the file.

    A file that holds a secret must not be open to others (see `check_secret_file_mode`).
    """
    raw, mode = read_file_and_mode(path, "config file")
    try:
        values = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"invalid TOML in {path}: {exc}") from None
    check_secret_file_mode(path, mode, values)
    return values


def read_file_and_mode(path: str | Path, what: str) -> tuple[bytes, int]:
    """A file's bytes and its mode, read through one open file (no race between the two)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(), os.fstat(handle.fileno()).st_mode
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def check_secret_file_mode(path: str | Path, mode: int, values: Any) -> None:
    """Refuse a file holding a secret key that others may read or write, as OpenSSH does with keys.

    Any local user could read the secret, or plant credentials the gateway would use.
    Files without secrets are not checked: the packaged comatrix.toml is 0644.
    """
    exposed = stat.S_IMODE(mode) & 0o007
    if not exposed or not _holds_secret(values):
        return
    access = " and ".join(word for bit, word in ((0o004, "readable"), (0o002, "writable")) if exposed & bit)
    raise ConfigError(f"{path} holds secrets and is {access or 'accessible'} by others "
                      f"(mode {stat.S_IMODE(mode):04o}); chmod o-rwx it")


def _holds_secret(value: Any) -> bool:
    if isinstance(value, dict):
        return any(key in SECRET_KEYS or _holds_secret(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_holds_secret(item) for item in value)
    return False


def read_config_files(path: str | Path) -> dict[str, Any]:
    """The main file merged with ``conf.d/*.toml`` beside it (later files win, tables merged),
    and the ``[[devices]]`` of every ``devices.d/*.toml`` beside it (written by comatrixctl)."""
    merged = load_toml(path)
    for directory in ("conf.d", DEVICES_DIR):
        fragments = Path(path).parent / directory
        if fragments.is_dir():
            for fragment in sorted(fragments.glob("*.toml")):
                values = load_toml(fragment)
                if directory == DEVICES_DIR:
                    values = {"devices": values.get("devices", [])}
                merged = _merge(merged, values)
    return merged


def build_config(file_values: Mapping[str, Any] | None = None,
                 cli_values: Mapping[str, Any] | None = None) -> Config:
    """defaults < file < command line.  ``cli_values`` holds only options actually given.

    ``ip`` wins over ``interface`` when both end up set, except that an
    ``interface`` given on the command line beats an ``ip`` from the file.
    """
    values: dict[str, Any] = dict(file_values or {})
    cli = {key: value for key, value in (cli_values or {}).items() if value is not None}
    if "interface" in cli and "ip" not in cli:
        values.pop("ip", None)
    for key, value in cli.items():
        if key == "plugin_dirs":
            # Command-line plugin directories add to the configured ones.
            values[key] = list(values.get(key, [])) + list(value)
        else:
            values[key] = value
    if "ip" in values:
        values.pop("interface", None)
    return _from_mapping(values)


def _from_mapping(values: Mapping[str, Any]) -> Config:
    known = {field.name for field in dataclasses.fields(Config)} | {"credentials_file"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    kwargs: dict[str, Any] = {}
    for key in ("ip", "interface", "homeserver", "state_dir", "credentials_file"):
        if key in values:
            kwargs[key] = _string(values, key)
    if "log_level" in values:
        level = _string(values, "log_level").lower()
        if level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        kwargs["log_level"] = level
    if "security" in values:
        mode = _string(values, "security").lower()
        if mode not in SECURITY_MODES:
            raise ConfigError(f"security must be one of {', '.join(SECURITY_MODES)}")
        kwargs["security"] = mode
    if "port" in values:
        port = _integer(values, "port")
        if not 0 <= port <= 65535:
            raise ConfigError("port must be between 0 and 65535")
        kwargs["port"] = port
    if "dtls_port" in values:
        dtls_port = _integer(values, "dtls_port")
        if not 1 <= dtls_port <= 65535:
            raise ConfigError("dtls_port must be between 1 and 65535")
        kwargs["dtls_port"] = dtls_port
    if "dtls" in values:
        kwargs["dtls"] = _dtls_settings(values["dtls"])
    if "appservice" in values:
        kwargs["appservice"] = _appservice_settings(values["appservice"])
    if "http_api" in values:
        kwargs["http_api"] = _http_api_settings(values["http_api"])
    if "metrics" in values:
        kwargs["metrics"] = _metrics_settings(values["metrics"])
    for key in ("request_timeout", "connect_timeout", "shutdown_grace", "interface_wait", "alias_cache_ttl"):
        if key in values:
            number = _number(values, key)
            if number <= 0:
                raise ConfigError(f"{key} must be positive")
            kwargs[key] = number
    if "allow_registration" in values:
        if not isinstance(values["allow_registration"], bool):
            raise ConfigError("allow_registration must be true or false")
        kwargs["allow_registration"] = values["allow_registration"]
    if "max_connections" in values:
        kwargs["max_connections"] = _integer(values, "max_connections")
    if "workers" in values:
        workers = _integer(values, "workers")
        if not 1 <= workers <= MAX_WORKERS:
            raise ConfigError(f"workers must be between 1 and {MAX_WORKERS}")
        kwargs["workers"] = workers
    for key in ("plugin_dirs", "disabled_plugins"):
        if key in values:
            kwargs[key] = tuple(_string_list(values, key))
    homeserver = kwargs.get("homeserver", Config.homeserver)
    if not homeserver.startswith(("http://", "https://")):
        raise ConfigError("homeserver must be an http:// or https:// URL")
    kwargs["homeserver"] = homeserver.rstrip("/")
    if "coap" in values:
        kwargs["coap"] = _coap_settings(values["coap"])
    if "limits" in values:
        kwargs["limits"] = _limit_settings(values["limits"])
    if "plugins" in values:
        tables = values["plugins"]
        if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
            raise ConfigError("[plugins.<name>] entries must be tables")
        kwargs["plugins"] = tables
    devices = list(_devices(values.get("devices", []), "devices"))
    credentials_file = kwargs.get("credentials_file")
    if credentials_file:
        devices += _devices(load_toml(credentials_file).get("devices", []), credentials_file)
    kwargs["devices"] = tuple(devices)
    services = _services(values.get("services", []), "services")
    if credentials_file:
        services += _services(load_toml(credentials_file).get("services", []), credentials_file)
    _check_services(services)
    kwargs["services"] = tuple(services)
    if "appservice" not in kwargs and any(device.appservice for device in devices):
        raise ConfigError("[[devices]] entries with appservice = true need an [appservice] table")
    if kwargs.get("security") == "off":
        kwargs.pop("dtls_port", None)  # "off" opens no secured way in, even when configured
    elif "dtls_port" not in kwargs and any(device.psk for device in devices):
        kwargs["dtls_port"] = DEFAULT_DTLS_PORT
    if "connect_timeout" not in kwargs:
        kwargs["connect_timeout"] = min(Config.connect_timeout,
                                        kwargs.get("request_timeout", Config.request_timeout) / 2)
    config = Config(**kwargs)
    _check_deadlines(config)
    _check_device_ids(config.devices)
    _check_oscore_ids(config.devices)
    _check_edhoc_kids(config.devices)
    _check_psk_identities(config.devices)
    if config.dtls_port is not None and config.dtls_port == config.port:
        raise ConfigError("dtls_port must differ from port")
    if config.workers > 1:
        _check_workers(config)
    return config


#: Most worker processes (one per core is the sense; a border router has a few).
MAX_WORKERS = 64


def _check_workers(config: Config) -> None:
    """What several worker processes cannot share yet, refused rather than silently wrong.

    OSCORE sequence numbers and replay windows, and EDHOC-derived contexts, live in
    one process: two workers with one context would reuse nonces.  The appservice
    event stream is received by one worker but must reach Observe registrations in
    every worker.  Without ``state_dir`` each worker's store would be its own memory.
    """
    if config.state_dir is None:
        raise ConfigError("workers > 1 needs state_dir: the workers share their state through its database")
    if any(device.oscore is not None or device.edhoc is not None for device in config.devices):
        raise ConfigError("workers > 1 cannot serve [[devices]] with oscore or edhoc (their sequence numbers "
                          "and replay windows live in one process): set workers = 1")
    if config.appservice is not None:
        raise ConfigError("workers > 1 cannot be combined with [appservice] (its events reach one worker's "
                          "watchers only): set workers = 1")


def _check_deadlines(config: Config) -> None:
    """Deadlines that make sense together.

    One homeserver call, queued and then sent, ends while the device's CoAP exchange
    is still alive (a request that needs several calls in a row can take longer);
    and a connection attempt gives up before the call's deadline, or a host that is
    down would look merely slow (5.04 instead of 5.02).
    """
    longest = config.request_timeout + config.limits.queue_timeout
    lifetime = config.coap.exchange_lifetime
    if longest >= lifetime:
        raise ConfigError(f"request_timeout + [limits] queue_timeout ({longest:g} s) must stay below "
                          f"the CoAP EXCHANGE_LIFETIME of the [coap] settings ({lifetime:g} s)")
    if config.connect_timeout >= config.request_timeout:
        raise ConfigError(f"connect_timeout ({config.connect_timeout:g} s) must be below "
                          f"request_timeout ({config.request_timeout:g} s)")


def _check_device_ids(devices: Iterable[DeviceCredentials]) -> None:
    """Two entries logging in as one Matrix device would share its txnId scope (and tokens)."""
    seen: set[tuple[str, str]] = set()
    for device in devices:
        if device.user is None or device.access_token:
            continue
        key = (device.user, device.login_device_id)
        if key in seen:
            raise ConfigError(f"devices: two entries log in as {device.user} with device_id "
                              f"{device.login_device_id}; give each its own device_id")
        seen.add(key)


def _check_psk_identities(devices: Iterable[DeviceCredentials]) -> None:
    seen: set[str] = set()
    for device in devices:
        if device.psk_identity is None:
            continue
        if device.psk_identity in seen:
            raise ConfigError(f"devices: two entries have psk_identity {device.psk_identity!r}")
        seen.add(device.psk_identity)


_DTLS_KEYS = {field.name: field.type for field in dataclasses.fields(DtlsSettings)}


def _dtls_settings(table: Any) -> DtlsSettings:
    if not isinstance(table, dict):
        raise ConfigError("[dtls] must be a table")
    unknown = sorted(set(table) - set(_DTLS_KEYS))
    if unknown:
        raise ConfigError(f"unknown [dtls] key(s): {', '.join(unknown)}")
    settings: dict[str, Any] = {}
    for key, value in table.items():
        default = getattr(DtlsSettings(), key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"dtls.{key} must be a non-negative number")
        if isinstance(default, int) and value != int(value):
            raise ConfigError(f"dtls.{key} must be an integer")
        settings[key] = type(default)(value)
    try:
        return DtlsSettings(**settings)
    except ValueError as exc:
        raise ConfigError(f"[dtls]: {exc}") from None


def _check_oscore_ids(devices: Iterable[DeviceCredentials]) -> None:
    """A request names its context by recipient id alone: two entries cannot share one."""
    seen: set[bytes] = set()
    for device in devices:
        if device.oscore is None:
            continue
        if device.oscore.recipient_id in seen:
            raise ConfigError(f"devices: two entries have the OSCORE recipient_id {device.oscore_identity!r}")
        seen.add(device.oscore.recipient_id)


def _check_edhoc_kids(devices: Iterable[DeviceCredentials]) -> None:
    """A device may name its credential by kid alone: two entries cannot share one."""
    seen: set[bytes] = set()
    for device in devices:
        if device.edhoc is None:
            continue
        kid = device.edhoc.credential.kid
        if kid in seen:
            raise ConfigError(f"devices: two entries have EDHOC credentials with the kid {kid.hex()!r}")
        seen.add(kid)


def _http_api_settings(table: Any) -> HttpApiSettings:
    if not isinstance(table, dict):
        raise ConfigError("[http_api] must be a table")
    unknown = sorted(set(table) - {field.name for field in dataclasses.fields(HttpApiSettings)}
                     - {"webhooks"} - set(WEBHOOK_KEYS))
    if unknown:
        raise ConfigError(f"[http_api]: unknown key(s) {', '.join(unknown)}")
    try:
        webhooks = WebhookSettings.from_table(table)
    except ValueError as exc:
        raise ConfigError(f"[http_api]: {exc}") from None
    kwargs: dict[str, Any] = {}
    if "enabled" in table:
        if not isinstance(table["enabled"], bool):
            raise ConfigError("[http_api] enabled must be true or false")
        kwargs["enabled"] = table["enabled"]
    kwargs["bind"], kwargs["port"] = _bind_and_port(table, "http_api", HttpApiSettings.bind, DEFAULT_HTTP_API_PORT)
    if "max_body_bytes" in table:
        kwargs["max_body_bytes"] = _integer(table, "max_body_bytes")
        if kwargs["max_body_bytes"] < 1024:
            raise ConfigError("[http_api] max_body_bytes must be at least 1024")
    if "registration_shared_secret_file" in table:
        kwargs["registration_shared_secret_file"] = _string(table, "registration_shared_secret_file")
    return HttpApiSettings(webhooks=webhooks, **kwargs)


_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _services(entries: Any, where: str) -> list[ServiceCredentials]:
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ConfigError(f"{where}: services must be an array of tables ([[services]])")
    services = []
    for index, entry in enumerate(entries):
        label = f"{where}: services[{index}]"
        unknown = sorted(set(entry) - {"name", "token", "user", "password", "access_token", "rate", "burst",
                                       "users", "rooms", "register_admins"})
        if unknown:
            raise ConfigError(f"{label}: unknown key(s) {', '.join(unknown)}")
        for key in ("name", "token", "user"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise ConfigError(f"{label}: {key} must be a non-empty string")
        if not _SERVICE_NAME.fullmatch(entry["name"]):
            raise ConfigError(f"{label}: name must be 1-64 characters A-Z a-z 0-9 . _ -")
        if len(entry["token"]) < MIN_SERVICE_TOKEN or not entry["token"].isprintable():
            raise ConfigError(f"{label}: token must be at least {MIN_SERVICE_TOKEN} printable characters")
        password, token = entry.get("password"), entry.get("access_token")
        if not (isinstance(password, str) and password) and not (isinstance(token, str) and token):
            raise ConfigError(f"{label}: give password or access_token for its user")
        rate = _number(entry, "rate") if "rate" in entry else ServiceCredentials.rate
        burst = _integer(entry, "burst") if "burst" in entry else ServiceCredentials.burst
        if rate < 0 or burst < 1:
            raise ConfigError(f"{label}: rate must be >= 0 and burst >= 1")
        register_admins = entry.get("register_admins", False)
        if not isinstance(register_admins, bool):
            raise ConfigError(f"{label}: register_admins must be true or false")
        services.append(ServiceCredentials(name=entry["name"], token=entry["token"], user=entry["user"],
                                           password=password or None, access_token=token or None,
                                           rate=rate, burst=burst, users=tuple(_string_list(entry, "users") if "users" in entry else ()),
                                           rooms=tuple(_string_list(entry, "rooms") if "rooms" in entry else ()),
                                           register_admins=register_admins))
    return services


def _check_services(services: Iterable[ServiceCredentials]) -> None:
    names: set[str] = set()
    tokens: set[str] = set()
    for service in services:
        if service.name in names:
            raise ConfigError(f"two [[services]] are named {service.name}")
        if service.token in tokens:
            raise ConfigError(f"[[services]] {service.name}: its token is another service's too")
        names.add(service.name)
        tokens.add(service.token)


def _appservice_settings(table: Any) -> AppserviceSettings:
    if not isinstance(table, dict):
        raise ConfigError("[appservice] must be a table")
    unknown = sorted(set(table) - {"registration", "bind", "port"})
    if unknown:
        raise ConfigError(f"[appservice]: unknown key(s) {', '.join(unknown)}")
    if "registration" not in table:
        raise ConfigError("[appservice]: registration (the registration file's path) is required")
    registration = _string(table, "registration")
    if not registration:
        raise ConfigError("[appservice]: registration must name the registration file")
    bind, port = _bind_and_port(table, "appservice", AppserviceSettings.bind, DEFAULT_APPSERVICE_PORT)
    return AppserviceSettings(registration=registration, bind=bind, port=port)


def _metrics_settings(table: Any) -> MetricsSettings:
    if not isinstance(table, dict):
        raise ConfigError("[metrics] must be a table")
    unknown = sorted(set(table) - {"enabled", "bind", "port"})
    if unknown:
        raise ConfigError(f"[metrics]: unknown key(s) {', '.join(unknown)}")
    enabled = table.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError("[metrics] enabled must be true or false")
    bind, port = _bind_and_port(table, "metrics", MetricsSettings.bind, DEFAULT_METRICS_PORT)
    return MetricsSettings(enabled=enabled, bind=bind, port=port)


def _bind_and_port(table: Mapping[str, Any], section: str, bind: str, port: int) -> tuple[str, int]:
    """A listener's ``bind`` (an IP address) and ``port`` (0-65535) in ``[section]``, else the defaults."""
    bind = _string(table, "bind") if "bind" in table else bind
    try:
        ipaddress.ip_address(bind)
    except ValueError:
        raise ConfigError(f"[{section}] bind must be an IP address") from None
    port = _integer(table, "port") if "port" in table else port
    if not 0 <= port <= 65535:
        raise ConfigError(f"[{section}] port must be between 0 and 65535")
    return bind, port


_INVITER = re.compile(r"\*|\*:[^\s:]+(:[0-9]+)?|@[^\s:]+:[^\s:]+(:[0-9]+)?")


def inviter_patterns(value: Any, label: str, key: str = "allow_invites_from") -> tuple[str, ...]:
    """An ``allow_invites_from`` (or ``allowed_senders``) list, checked (`ConfigError` names ``label``)."""
    if not isinstance(value, list) or not all(isinstance(item, str) and _INVITER.fullmatch(item) for item in value):
        raise ConfigError(f"{label}: {key} must be a list of user ids, \"*:server\" or \"*\"")
    return tuple(value)


_ROOM_ID = re.compile(r"![\x21-\x7e]{1,254}")


def _room_senders(value: Any, label: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The ``rooms`` table of a ``[[devices]]`` entry: room id -> ``{allowed_senders = [...]}``."""
    if not isinstance(value, dict):
        raise ConfigError(f"{label}: rooms must be a table of room ids")
    found = []
    for room_id, table in value.items():
        if not _ROOM_ID.fullmatch(room_id):
            raise ConfigError(f"{label}: rooms: {room_id!r} is not a room id (!...)")
        if not isinstance(table, dict) or set(table) != {"allowed_senders"}:
            raise ConfigError(f"{label}: rooms.{room_id!r} must be a table with allowed_senders only")
        found.append((room_id, inviter_patterns(table["allowed_senders"], f"{label}: rooms.{room_id!r}",
                                                "allowed_senders")))
    return tuple(found)


def _coap_settings(table: Any) -> CoapSettings:
    if not isinstance(table, dict):
        raise ConfigError("[coap] must be a table")
    unknown = sorted(set(table) - set(_COAP_KEYS))
    if unknown:
        raise ConfigError(f"unknown [coap] key(s): {', '.join(unknown)}")
    settings: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"coap.{key} must be a non-negative number")
        default = getattr(CoapSettings(), key)
        settings[key] = type(default)(value)
    try:
        return CoapSettings(**settings)
    except ValueError as exc:
        raise ConfigError(f"[coap]: {exc}") from None


_LIMIT_KEYS = {field.name for field in dataclasses.fields(LimitSettings)}


def _limit_settings(table: Any) -> LimitSettings:
    if not isinstance(table, dict):
        raise ConfigError("[limits] must be a table")
    unknown = sorted(set(table) - _LIMIT_KEYS)
    if unknown:
        raise ConfigError(f"unknown [limits] key(s): {', '.join(unknown)}")
    settings: dict[str, Any] = {}
    for key, value in table.items():
        default = getattr(LimitSettings(), key)
        if isinstance(default, str):
            if not isinstance(value, str):
                raise ConfigError(f"limits.{key} must be a string")
            settings[key] = value
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"limits.{key} must be a non-negative number")
        if isinstance(default, int) and value != int(value):
            raise ConfigError(f"limits.{key} must be an integer")
        settings[key] = type(default)(value)
    try:
        return LimitSettings(**settings)
    except ValueError as exc:
        raise ConfigError(f"[limits]: {exc}") from None


#: Device ids the gateway asks the homeserver for: short, and safe in a URL path and a log line.
_DEVICE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _devices(entries: Any, where: str) -> list[DeviceCredentials]:
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: devices must be an array of tables ([[devices]])")
    devices = []
    for index, entry in enumerate(entries):
        label = f"{where}: devices[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{label} must be a table")
        unknown = sorted(set(entry) - {"name", "address", "user", "password", "access_token", "device_id",
                                       "allow", "oscore", "psk_identity", "psk", "psk_hex", "edhoc",
                                       "appservice", "allow_invites_from", "allowed_senders", "rooms"})
        if unknown:
            raise ConfigError(f"{label}: unknown key(s) {', '.join(unknown)}")
        oscore = _oscore(entry["oscore"], label) if "oscore" in entry else None
        psk_identity, psk = _psk(entry, label)
        edhoc = _edhoc(entry["edhoc"], label) if "edhoc" in entry else None
        network = None
        if "address" in entry or (oscore is None and psk_identity is None and edhoc is None):
            try:
                network = ipaddress.ip_network(str(entry.get("address", "")).split("%", 1)[0], strict=False)
            except ValueError:
                raise ConfigError(f"{label}: address must be an IP address or prefix") from None
        token, user, password = entry.get("access_token"), entry.get("user"), entry.get("password")
        appservice = entry.get("appservice", False)
        if not isinstance(appservice, bool):
            raise ConfigError(f"{label}: appservice must be true or false")
        if appservice and (token or password or not user):
            raise ConfigError(f"{label}: an appservice device has a user and neither password nor access_token")
        if not appservice and not token and not (user and password):
            raise ConfigError(f"{label}: give access_token, or user and password (or appservice = true)")
        inviters = inviter_patterns(entry["allow_invites_from"], label) if "allow_invites_from" in entry else None
        senders = (inviter_patterns(entry["allowed_senders"], label, "allowed_senders")
                   if "allowed_senders" in entry else None)
        device_id = entry.get("device_id")
        for key, value in (("access_token", token), ("user", user), ("password", password),
                           ("device_id", device_id)):
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{label}: {key} must be a string")
        if device_id is not None and not _DEVICE_ID.fullmatch(device_id):
            raise ConfigError(f"{label}: device_id must be 1-64 characters A-Z a-z 0-9 . _ -")
        devices.append(DeviceCredentials(network=network, user=user, password=password,
                                         access_token=token, device_id=device_id,
                                         allow=_allow(entry.get("allow", []), label), oscore=oscore,
                                         psk_identity=psk_identity, psk=psk, edhoc=edhoc,
                                         appservice=appservice, allow_invites_from=inviters,
                                         allowed_senders=senders,
                                         room_senders=_room_senders(entry.get("rooms", {}), label)))
    return devices


def _psk(entry: Mapping[str, Any], label: str) -> tuple[str | None, bytes | None]:
    """``psk_identity`` with ``psk`` (text) or ``psk_hex``; errors never show the key."""
    identity = entry.get("psk_identity")
    has_key = "psk" in entry or "psk_hex" in entry
    if identity is None:
        if has_key:
            raise ConfigError(f"{label}: psk needs a psk_identity")
        return None, None
    if not isinstance(identity, str) or not 1 <= len(identity.encode("utf-8")) <= MAX_PSK_IDENTITY:
        raise ConfigError(f"{label}: psk_identity must be a string of 1-{MAX_PSK_IDENTITY} bytes")
    if ("psk" in entry) == ("psk_hex" in entry):
        raise ConfigError(f"{label}: give psk or psk_hex (one of them) with psk_identity")
    if "psk" in entry:
        if not isinstance(entry["psk"], str):
            raise ConfigError(f"{label}: psk must be a string")
        key = entry["psk"].encode("utf-8")
    else:
        try:
            key = bytes.fromhex(entry["psk_hex"]) if isinstance(entry["psk_hex"], str) else b""
        except ValueError:
            key = b""
        if not key:
            raise ConfigError(f"{label}: psk_hex must be hexadecimal digits")
    low, high = PSK_BYTES
    if not low <= len(key) <= high:
        raise ConfigError(f"{label}: the PSK must be {low}-{high} bytes")
    return identity, key


def _allow(names: Any, label: str) -> frozenset[str]:
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ConfigError(f"{label}: allow must be a list of operation or category names")
    try:
        return expand_allow(names)
    except ValueError as exc:
        raise ConfigError(f"{label}: allow: {exc}") from None


_OSCORE_KEYS = ("recipient_id", "sender_id", "master_secret", "master_salt")


def _oscore(table: Any, label: str) -> OscoreCredentials:
    """``oscore = { recipient_id, sender_id, master_secret, master_salt }``, all hex; no value in errors."""
    if not isinstance(table, dict):
        raise ConfigError(f"{label}: oscore must be a table")
    unknown = sorted(set(table) - set(_OSCORE_KEYS))
    if unknown:
        raise ConfigError(f"{label}: unknown oscore key(s) {', '.join(unknown)}")
    values: dict[str, bytes] = {}
    for key in _OSCORE_KEYS:
        if key not in table:
            if key == "master_salt":
                continue
            raise ConfigError(f"{label}: oscore needs {key}")
        raw = table[key]
        try:
            if not isinstance(raw, str):
                raise ValueError
            values[key] = bytes.fromhex(raw)
        except ValueError:
            raise ConfigError(f"{label}: oscore.{key} must be a hex string") from None
    for key in ("recipient_id", "sender_id"):
        if len(values[key]) > OSCORE_MAX_ID_BYTES:
            raise ConfigError(f"{label}: oscore.{key} is at most {OSCORE_MAX_ID_BYTES} bytes")
    if values["recipient_id"] == values["sender_id"]:
        raise ConfigError(f"{label}: oscore.recipient_id and sender_id must differ")
    if len(values["master_secret"]) < OSCORE_MIN_SECRET_BYTES:
        raise ConfigError(f"{label}: oscore.master_secret needs at least {OSCORE_MIN_SECRET_BYTES} bytes")
    return OscoreCredentials(**values)


def _edhoc(table: Any, label: str) -> EdhocCredentials:
    """``edhoc = { credential = "<hex CCS>" }``: the device's public credential."""
    if not isinstance(table, dict):
        raise ConfigError(f"{label}: edhoc must be a table")
    unknown = sorted(set(table) - {"credential"})
    if unknown:
        raise ConfigError(f"{label}: unknown edhoc key(s) {', '.join(unknown)}")
    raw = table.get("credential")
    try:
        encoded = bytes.fromhex(raw) if isinstance(raw, str) else None
    except ValueError:
        encoded = None
    if encoded is None:
        raise ConfigError(f"{label}: edhoc needs credential, the device's CCS in hex")
    try:
        return EdhocCredentials(parse_ccs(encoded))
    except ValueError as exc:
        raise ConfigError(f"{label}: edhoc.credential: {exc}") from None


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        elif key == "devices" and isinstance(value, list) and isinstance(merged.get(key), list):
            merged[key] = merged[key] + value
        else:
            merged[key] = value
    return merged


def _string(values: Mapping[str, Any], key: str) -> str:
    value = values[key]
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string")
    return value


def _integer(values: Mapping[str, Any], key: str) -> int:
    value = values[key]
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer")
    return value


def _number(values: Mapping[str, Any], key: str) -> float:
    value = values[key]
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number")
    return float(value)


def _string_list(values: Mapping[str, Any], key: str) -> Iterable[str]:
    value = values[key]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{key} must be a list of strings")
    return value
