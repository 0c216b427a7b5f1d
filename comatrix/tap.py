"""``twistd comatrix``: command-line options and `makeService`, which builds the running gateway.

The UDP socket is bound inside `makeService`, before the reactor runs, so a bind
failure ends the process at once with a one-line reason and a non-zero exit
status instead of leaving a daemon with no socket.  When the config names an
``interface`` the gateway first waits (bounded) for that interface's link-local
address to exist and leave DAD, logging why it waits.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort

from twisted.python import usage

from comatrix import __version__
from comatrix.logs import enabled as log_enabled, get_logger, set_level
from comatrix.coap.message import Request, Response
from comatrix.coap.secured import MessageProtection
from comatrix.coap.server import CoapServer, listen_udp
from comatrix.codec.msc3079 import ACCESS_TOKEN_OPTION, KEY_TABLE_VERSION_OPTION
from comatrix.config import Config, ConfigError, DeviceCredentials, build_config, read_config_files
from comatrix.credentials import Credentials
from comatrix.discovery import PluginError, build_site, discover
from comatrix.dtls.libssl import DtlsUnavailable
from comatrix.dtls.server import listen_dtls
from comatrix.errors import error_response
from comatrix.identity import device_of
from comatrix.interfaces import PluginContext
from comatrix.longpoll import long_poller
from comatrix.metrics import Metrics, instrument, serve as serve_metrics
from comatrix.matrix.client import MatrixClient
from comatrix.msc3079.translate import VERSIONS_PATHS
from comatrix.protection import SecurityPolicy
from comatrix.reload import Reloader
from comatrix.ratelimit import Admission, FailedLogins, LimitedTransport, UpstreamLimiter, install
from comatrix.netif import read_link_local_address
from comatrix.oscore import SEQUENCE_FILENAME, ContextStore, OscoreLayer, SequenceFile
from comatrix.edhoc import responder as edhoc
from comatrix.edhoc.resource import EDHOC_PATH, EdhocResource, combined_handler
from comatrix.edhoc.responder import Responder
from comatrix.store import Store
from comatrix import e2ee
from comatrix.appservice.invites import Invitations
from comatrix.appservice.registration import Registration, load_registration
from comatrix.appservice.server import AppserviceResource
from comatrix.appservice.stream import EventStream
from comatrix.http_api.endpoints import Endpoints
from comatrix.http_api.feeds import ServiceTokens, start_feeds
from comatrix.http_api.server import InternalApi
from comatrix.webhooks import ServiceEvents, Webhooks
from comatrix.coap.transport import bind_shared
from comatrix.workers import (COAP_FD, DTLS_FD, STOP_MARGIN, SUPERVISOR_ENV, Supervisor, die_with_supervisor,
                              inherited_socket, name_worker_logs, stop_once_on_signals, worker_command)
from twisted.web import server as web_server

log = get_logger("comatrix")

#: Poll interval while waiting for the configured interface's address.
INTERFACE_POLL_SECONDS = 0.5


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("CoMatrix: a CoAP/CBOR gateway that lets constrained devices use the Matrix "
                "Client-Server API.  Every option can also be set in the TOML config file "
                "(same name, dashes as underscores); the command line wins.")
    optParameters = [
        ["config", "c", None, "TOML config file (a conf.d/ directory beside it is merged too)."],
        ["ip", "i", None, "Address to listen on: IPv4, IPv6 or fe80::1%lowpan0 [default: ::]."],
        ["port", "p", None, "UDP port to listen on [default: 5683].", int],
        ["dtls-port", None, None, "UDP port for CoAP over DTLS (coaps) [default: 5684 when a "
         "[[devices]] entry has a psk, else off].", int],
        ["interface", None, None,
         "Listen on this interface's IPv6 link-local address (e.g. lowpan0), waiting for it "
         "to appear; ignored when --ip is given."],
        ["homeserver", "H", None, "Matrix homeserver base URL [default: http://127.0.0.1:8008]."],
        ["state-dir", None, None, "Directory for persistent state."],
        ["credentials-file", None, None, "TOML file with [[devices]] credentials (keep it 0640)."],
        ["request-timeout", None, None, "Seconds to wait for the homeserver [default: 10].", float],
        ["security", None, None, "required, optional or off: whether plain CoAP may reach more than "
         "/time and /.well-known/core [default: optional]."],
        ["log-level", None, None, "Minimum level of CoMatrix log lines: debug, info, warn, error "
         "[default: info]."],
        ["workers", None, None, "Worker processes sharing the CoAP port (SO_REUSEPORT), supervised by "
         "this one [default: 1, a single process].", int],
        # Internal: set by the supervisor on the processes it starts (comatrix.workers).
        ["worker", None, None, None, int],
    ]
    optFlags = [["version", "V", "Print the version and exit."],
                ["allow-registration", None, "Let devices create Matrix accounts through the gateway "
                 "(unsafe: anyone on the link could) [default: closed]."]]

    def __init__(self) -> None:
        super().__init__()
        self["plugin_dirs"] = []
        self["disabled_plugins"] = []

    def opt_plugin_dir(self, directory: str) -> None:
        """Add a drop-in plugin directory (repeatable)."""
        self["plugin_dirs"].append(directory)

    def opt_disable_plugin(self, name: str) -> None:
        """Do not serve the plugin of this name (repeatable)."""
        self["disabled_plugins"].append(name)

    def opt_version(self) -> None:
        print(f"comatrix {__version__}")
        sys.exit(0)

    def cli_values(self) -> dict[str, Any]:
        """Only the options actually given, keyed like the config file."""
        values: dict[str, Any] = {
            "ip": self["ip"],
            "port": self["port"],
            "dtls_port": self["dtls-port"],
            "interface": self["interface"],
            "homeserver": self["homeserver"],
            "state_dir": self["state-dir"],
            "credentials_file": self["credentials-file"],
            "request_timeout": self["request-timeout"],
            "log_level": self["log-level"],
            "security": self["security"],
            "allow_registration": True if self["allow-registration"] else None,
            "workers": self["workers"],
        }
        if self["plugin_dirs"]:
            values["plugin_dirs"] = list(self["plugin_dirs"])
        if self["disabled_plugins"]:
            values["disabled_plugins"] = list(self["disabled_plugins"])
        return {key: value for key, value in values.items() if value is not None}


    def worker_args(self) -> list[str]:
        """The options given to this process, as the command line of one of its workers."""
        args: list[str] = []
        for name in ("config", "ip", "port", "dtls-port", "interface", "homeserver", "state-dir",
                     "credentials-file", "request-timeout", "security", "log-level"):
            if self[name] is not None:
                args += [f"--{name}", str(self[name])]
        args += [arg for directory in self["plugin_dirs"] for arg in ("--plugin-dir", directory)]
        args += [arg for name in self["disabled_plugins"] for arg in ("--disable-plugin", name)]
        return args + (["--allow-registration"] if self["allow-registration"] else [])


def load_config(options: Options) -> Config:
    file_values = read_config_files(options["config"]) if options["config"] else {}
    return build_config(file_values, options.cli_values())


class GatewayService(service.Service):
    """Owns the listening port, the CoAP server and the Matrix client; stops them gracefully."""

    def __init__(self, config: Config, server: CoapServer, port: IListeningPort,
                 matrix: MatrixClient, credentials: Credentials, store: Store | None = None,
                 dtls: tuple[CoapServer, IListeningPort] | None = None,
                 reloader: Reloader | None = None, appservice: IListeningPort | None = None,
                 http_api: IListeningPort | None = None) -> None:
        self.config = config
        self.appservice = appservice
        self.http_api = http_api
        self.reloader = reloader
        self.server = server
        self.port = port
        self.matrix = matrix
        self.credentials = credentials
        self.store = store
        self.dtls = dtls

    def startService(self) -> None:
        super().startService()
        address = self.port.getHost()
        log.info("CoMatrix {version} listening on {host} port {port}, homeserver {homeserver}",
                 version=__version__, host=getattr(address, "host", "?"), port=getattr(address, "port", "?"),
                 homeserver=self.config.homeserver)
        log_policy(self.config)
        if self.store is not None:
            # Its files are opened now, while descriptors are plenty, and kept (comatrix.store).
            self.store.open().addErrback(lambda failure: log.failure("Could not open the store", failure))
        if self.dtls is not None:
            devices = sum(1 for device in self.config.devices if device.psk_identity)
            log.info("CoAP over DTLS (PSK) on port {port} for {count} device(s)",
                     port=self.config.dtls_port, count=devices)
            if not devices:
                log.warn("dtls_port is set but no [[devices]] entry has a psk: every DTLS handshake fails")
        defer.ensureDeferred(self.credentials.drop_unconfigured_tokens()).addErrback(
            lambda failure: log.failure("Could not drop kept tokens of removed device entries", failure))
        if self.reloader is not None:
            self.reloader.install()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        servers = [self.server] + ([self.dtls[0]] if self.dtls is not None else [])
        log.info("Stopping: finishing {count} in-flight request(s)",
                 count=sum(server.in_flight() for server in servers))
        for server in servers:
            server.stop_accepting()
        if self.appservice is not None:
            # The homeserver keeps what it could not push, and pushes it after the restart.
            yield defer.maybeDeferred(self.appservice.stopListening)
        if self.http_api is not None:
            yield defer.maybeDeferred(self.http_api.stopListening)
        yield defer.gatherResults([server.wait_idle(self.config.shutdown_grace) for server in servers])
        if self.dtls is not None:
            yield defer.maybeDeferred(self.dtls[1].stopListening)
        yield defer.maybeDeferred(self.port.stopListening)
        yield defer.ensureDeferred(self.matrix.close())


def log_policy(config: Config) -> None:
    """Say at start what devices may do beyond the safe defaults (`comatrix.policy`)."""
    if config.allow_registration:
        log.warn("Registration is OPEN (allow_registration): anyone who can reach the gateway can "
                 "create Matrix accounts on {homeserver}", homeserver=config.homeserver)
    else:
        log.info("Registration is closed: every register path answers 4.03 (allow_registration = false)")
    for device in config.devices:
        if device.allow:
            log.info("Devices of {entry} may also use, with shared credentials: {operations}",
                     entry=device.label, operations=", ".join(sorted(device.allow)))


def _log_request(request: Request, response: Response, elapsed_ms: float) -> None:
    if not log_enabled("info"):  # log_level = "warn" on a busy router: not even the line's values
        return
    log.info("{peer} {method} /{path} {code} {ms:.1f}ms", peer=str(request.peer),
             method=request.method.name, path="/".join(request.path), code=response.code.dotted(),
             ms=elapsed_ms)


def _response_hook(metrics: Metrics | None) -> Callable[[Request, Response, float], None]:
    """The CoAP server's ``on_response``: the access-log line, and the request counted when metrics are on."""
    if metrics is None:
        return _log_request

    def hook(request: Request, response: Response, elapsed_ms: float) -> None:
        _log_request(request, response, elapsed_ms)
        metrics.coap_request(request, response, elapsed_ms)
    return hook


def listen_metrics(config: Config, metrics: Metrics, reactor: Any) -> IListeningPort:
    """``GET /metrics`` on ``[metrics] bind``:``port`` until shutdown; a port in use ends the process."""
    settings = config.metrics
    port = _listen(lambda: serve_metrics(metrics, settings.bind, settings.port, reactor), settings.bind, settings.port)
    reactor.addSystemEventTrigger("before", "shutdown", port.stopListening)
    host = settings.bind if ":" not in settings.bind else f"[{settings.bind}]"
    where = f"http://{host}:{getattr(port.getHost(), 'port', settings.port)}/metrics"
    if ipaddress.ip_address(settings.bind).is_loopback:
        log.info("Prometheus metrics on {where}", where=where)
    else:
        log.warn("Prometheus metrics on {where}: reachable beyond this host ([metrics] bind is not "
                 "a loopback address); they show traffic, devices and limits", where=where)
    return port


def device_key(request: Request) -> str:
    """Whose share of the CoAP layer's observers and uploads a request counts against: its device."""
    return device_of(request).key


def resolve_listen_address(config: Config, clock: Any = time) -> str:
    """The address to bind: ``ip``, or the link-local address of ``interface`` once it is usable."""
    if not config.interface:
        return config.ip
    deadline = clock.monotonic() + config.interface_wait
    announced = False
    while True:
        address = read_link_local_address(config.interface)
        if address is not None:
            if announced:
                print(f"comatrix: {config.interface} has {address}, starting", file=sys.stderr)
            return address
        if clock.monotonic() >= deadline:
            raise SystemExit(f"comatrix: no usable link-local address on {config.interface} "
                             f"after {config.interface_wait:.0f}s")
        if not announced:
            print(f"comatrix: waiting up to {config.interface_wait:.0f}s for a link-local "
                  f"address on {config.interface} (missing or still tentative)", file=sys.stderr)
            announced = True
        clock.sleep(INTERFACE_POLL_SECONDS)


def build_oscore(devices: Sequence[DeviceCredentials], state_dir: str | None, reactor: Any) -> OscoreLayer:
    """The OSCORE layer with one context per ``[[devices]]`` entry that has ``oscore``.

    Blocking (reads and writes the sequence number file): call it before the reactor runs.
    """
    entries = [device for device in devices if device.oscore is not None]
    sequences = None
    if entries:
        if state_dir is None:
            raise SystemExit("comatrix: [[devices]] entries with oscore need state_dir: the gateway's "
                             "OSCORE sequence numbers must survive a restart")
        sequences = SequenceFile(Path(state_dir) / SEQUENCE_FILENAME, reactor)
        try:
            Path(state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
            sequences.load()
        except (OSError, ValueError) as exc:
            raise SystemExit(f"comatrix: cannot read the OSCORE sequence numbers: {exc}") from None
    contexts = ContextStore(sequences)
    for device in entries:
        oscore = device.oscore
        assert oscore is not None
        contexts.add(oscore.sender_id, oscore.recipient_id, oscore.master_secret, oscore.master_salt)
    try:
        contexts.write_bounds()
    except OSError as exc:
        raise SystemExit(f"comatrix: cannot write the OSCORE sequence numbers: {exc}") from None
    if entries:
        log.info("OSCORE: {count} security context(s)", count=len(entries))
    return OscoreLayer(contexts)


def build_edhoc(config: Config, credentials: Credentials, oscore: OscoreLayer | None, site: Any,
                reactor: Any) -> Responder | None:
    """The EDHOC responder at /.well-known/edhoc when an entry has ``edhoc`` and lakers imports.

    Blocking (reads or creates the gateway's key): call it before the reactor runs.
    """
    if not any(device.edhoc is not None for device in config.devices):
        return None
    if not edhoc.available():
        log.warn("[[devices]] entries have edhoc, but lakers-python is not installed: EDHOC is not "
                 "offered (pip install lakers-python); everything else works")
        return None
    if oscore is None:
        log.warn("security = off: the edhoc credentials of [[devices]] entries are not offered")
        return None
    if config.state_dir is None:
        raise SystemExit("comatrix: [[devices]] entries with edhoc need state_dir: the gateway's "
                         "EDHOC key pair is kept there")
    try:
        Path(config.state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        key = edhoc.GatewayKey.load_or_create(config.state_dir)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"comatrix: cannot read or create the EDHOC key: {exc}") from None
    sessions = edhoc.PendingSessions(edhoc.SessionLimits(), reactor.seconds)
    responder = edhoc.Responder(key, credentials.edhoc_credentials, oscore.contexts, sessions)
    site.put(EDHOC_PATH, EdhocResource(responder))
    oscore.combined = combined_handler(responder)
    log.info("EDHOC at /.well-known/edhoc for {count} device(s); the gateway's credential: {ccs}",
             count=len(credentials.edhoc_credentials()), ccs=key.credential.encoded.hex())
    return responder


class _QuietSite(web_server.Site):
    """The appservice API's site: no access log line per transaction (the stream logs what matters)."""

    def log(self, request: Any) -> None:
        pass


def build_appservice(config: Config, credentials: Credentials, matrix: MatrixClient, store: Store,
                     reactor: Any) -> tuple[Registration, EventStream] | None:
    """Application-service mode, when ``[appservice]`` is configured: its registration and event stream.

    Blocking (reads the registration): call it before the reactor runs.
    """
    settings = config.appservice
    if settings is None:
        return None
    try:
        registration = load_registration(settings.registration)
    except ConfigError as exc:
        raise SystemExit(f"comatrix: {exc}") from None
    try:
        check_device_users(config, registration)
    except ConfigError as exc:
        raise SystemExit(f"comatrix: {exc}") from None
    credentials.act_as_appservice(registration.as_token)
    stream = EventStream(store, reactor)
    stream.subscribe(Invitations(credentials, matrix))
    return registration, stream


def check_device_users(config: Config, registration: Registration) -> None:
    """`ConfigError` for a provisioned device whose user is outside the namespace (at start and on reload)."""
    for device in config.devices:
        if device.appservice and (device.user is None or not registration.owns(device.user)):
            raise ConfigError(f"[[devices]] {device.label}: {device.user} is not in the appservice "
                              f"namespace {registration.user_regex}")


def listen_appservice(config: Config, registration: Registration, stream: EventStream,
                      credentials: Credentials, reactor: Any) -> IListeningPort:
    settings = config.appservice
    assert settings is not None
    api = AppserviceResource(registration.hs_token, stream,
                             lambda user_id: credentials.appservice_entry(user_id) is not None)
    port = _listen(lambda: reactor.listenTCP(settings.port, _QuietSite(api), interface=settings.bind),
                   settings.bind, settings.port)
    devices = sum(1 for device in config.devices if device.appservice)
    log.info("Application service {id}: transactions on http://{bind}:{port}, namespace {regex}, "
             "{count} device user(s)", id=registration.id, bind=settings.bind, port=getattr(port.getHost(), "port", settings.port),
             regex=registration.user_regex, count=devices)
    return port


def listen_http_api(config: Config, context: PluginContext, registration: Registration | None,
                    reactor: Any) -> IListeningPort | None:
    """The internal HTTP API (`comatrix.http_api`), when ``[http_api] enabled``."""
    settings = config.http_api
    if not settings.enabled:
        if config.services:
            log.info("[[services]] are configured but the HTTP API is off ([http_api] enabled = false)")
        return None
    if not config.services:
        log.warn("[http_api] is enabled but no [[services]] are configured: every request is answered 401")
    assert context.store is not None
    services = {service.name: service for service in config.services}
    webhooks = Webhooks(context.store, reactor, settings.webhooks,
                        lambda name: services[name].token.encode("utf-8") if name in services else None)
    tokens = ServiceTokens(config.services, context.credentials)
    service_events = (ServiceEvents(webhooks, long_poller(context), reactor, tokens)
                      if context.events is None else None)
    endpoints = Endpoints(context.matrix, context.credentials, settings, long_poller(context), reactor,
                          registration, webhooks, (tokens, service_events) if service_events else None)
    reactor.callWhenRunning(lambda: start_feeds(webhooks, context.events, tokens, service_events).addErrback(
        lambda failure: log.failure("Could not start webhook deliveries", failure)))
    reactor.addSystemEventTrigger("before", "shutdown", webhooks.stop)
    if service_events is not None:
        reactor.addSystemEventTrigger("before", "shutdown", service_events.stop)
    webhooks.metrics = context.metrics
    api = InternalApi(config.services, endpoints, settings, reactor, context.metrics)
    port = _listen(lambda: reactor.listenTCP(settings.port, _QuietSite(api), interface=settings.bind),
                   settings.bind, settings.port)
    if not ipaddress.ip_address(settings.bind).is_loopback:
        log.warn("The HTTP API listens on {bind}, beyond this host: only the service tokens protect it",
                 bind=settings.bind)
    log.info("HTTP API on http://{bind}:{port}/internal/matrix for {count} service(s)", bind=settings.bind,
             port=getattr(port.getHost(), "port", settings.port), count=len(config.services))
    return port


def makeService(options: Options, reactor: Any = None) -> service.IService:
    if reactor is None:
        from twisted.internet import reactor
    try:
        config = load_config(options)
    except ConfigError as exc:
        raise SystemExit(f"comatrix: {exc}") from None
    set_level(config.log_level)
    worker = options["worker"]
    if worker is None and config.workers > 1:
        return build_supervisor(options, config, reactor)
    if worker is not None:
        name_worker_logs(worker)
        die_with_supervisor(int(os.environ.get(SUPERVISOR_ENV, os.getppid())))
        reactor.callWhenRunning(stop_once_on_signals, reactor)
    # Worker 0 alone serves the HTTP API and the metrics (their ports are not shared).
    serves_http = worker in (None, 0)
    try:
        plugins = discover(config.plugin_dirs, config.disabled_plugins)
    except PluginError as exc:
        raise SystemExit(f"comatrix: {exc}") from None
    limits = config.limits
    limiter = UpstreamLimiter(limits.max_upstream, limits.upstream_queue, limits.queue_timeout, reactor)
    transport = LimitedTransport(config.homeserver, limiter=limiter, logins=FailedLogins(limits, reactor),
                                 reactor=reactor, timeout=config.request_timeout, connect_timeout=config.connect_timeout,
                                 max_connections_per_host=config.max_connections)
    if config.state_dir is None:
        log.warn("No state_dir: sessions, room handles and resume points are kept in memory only "
                 "and are lost when the gateway stops")
    matrix = MatrixClient(transport, alias_cache_ttl=config.alias_cache_ttl, reactor=reactor)
    e2ee.install(matrix, config.state_dir, reactor, single_process=worker is None)
    store = Store.for_state_dir(config.state_dir, reactor, shared=worker is not None)
    credentials = Credentials(config.devices, matrix, store, [entry.as_device() for entry in config.services])
    appservice = build_appservice(config, credentials, matrix, store, reactor)
    metrics = Metrics() if config.metrics.enabled and serves_http else None
    context = PluginContext(config=config, matrix=matrix, credentials=credentials,
                            state={}, reactor=reactor, store=store,
                            events=appservice[1] if appservice is not None else None, metrics=metrics)
    long_polls = long_poller(context)  # sized to the open-file limit now, and logged, whatever plugins use it
    site = build_site(plugins, context, error_response)
    admission = Admission(limits, reactor)
    install(site, admission)
    policy = SecurityPolicy(config.security)
    oscore = build_oscore(config.devices, config.state_dir, reactor) if policy.secured_ways_in else None
    if oscore is None and any(device.oscore is not None for device in config.devices):
        log.warn("security = off: the oscore contexts of [[devices]] entries are not offered")
    edhoc_responder = build_edhoc(config, credentials, oscore, site, reactor)

    def coap_server(protection: MessageProtection | None = None) -> CoapServer:
        return CoapServer(site, config.coap_settings(), reactor=reactor,
                          understood_options=frozenset({ACCESS_TOKEN_OPTION, KEY_TABLE_VERSION_OPTION}),
                          on_response=_response_hook(metrics), guard=policy.check, peer_key=device_key,
                          protection=protection, discovery_paths=(*VERSIONS_PATHS, EDHOC_PATH))

    server = coap_server(oscore)
    address = resolve_listen_address(config)
    port = _listen(lambda: listen_udp(server, address, config.port, reactor=reactor,
                                      adopt=_inherited(worker, COAP_FD)), address, config.port)
    dtls = None
    if config.dtls_port is not None:
        dtls_server = coap_server()  # the same Site: every resource, Observe and block-wise alike
        dtls_port = config.dtls_port
        dtls = (dtls_server, _listen(lambda: listen_dtls(dtls_server, credentials.psk_for, config.dtls,
                                                         address, dtls_port, reactor=reactor,
                                                         adopt=_inherited(worker, DTLS_FD)),
                                     address, dtls_port))
    policy.announce(log)
    if metrics is not None:
        instrument(metrics, config=config, site=site, admission=admission, limiter=limiter, transport=transport,
                   servers=lambda: [server] + ([dtls[0]] if dtls is not None else []),
                   long_polls=long_polls, store=store, reactor=reactor)
        listen_metrics(config, metrics, reactor)
    appservice_port = (listen_appservice(config, *appservice, credentials, reactor)
                       if appservice is not None else None)
    http_api_port = (listen_http_api(config, context, appservice[0] if appservice is not None else None, reactor)
                     if serves_http else None)
    def reload_config() -> Config:
        new = load_config(options)
        if appservice is not None:
            check_device_users(new, appservice[0])
        return new
    reloader = Reloader(config, reload_config, credentials,
                        dtls=getattr(dtls[1], "protocol") if dtls is not None else None,  # a udp.Port's
                        oscore=oscore, edhoc=edhoc_responder, reactor=reactor)
    return GatewayService(config, server, port, matrix, credentials, store, dtls, reloader, appservice_port,
                          http_api_port)


def build_supervisor(options: Options, config: Config, reactor: Any) -> Supervisor:
    """``workers`` > 1: bind every worker's share of the port(s) now, and start the workers (`comatrix.workers`)."""
    address = resolve_listen_address(config)
    count = config.workers
    coap = _listen(lambda: bind_shared(address, config.port, count), address, config.port)
    dtls: list[Any] = []
    if config.dtls_port is not None:
        dtls_port = config.dtls_port
        dtls = _listen(lambda: bind_shared(address, dtls_port, count), address, dtls_port)
    groups = [[coap[index]] + dtls[index:index + 1] for index in range(count)]
    twistd, plugin_args = getattr(options, "parent", None), options.worker_args()
    log.info("CoMatrix {version}: {count} workers on {host} port {port}", version=__version__, count=count,
             host=address, port=coap[0].getsockname()[1])
    return Supervisor(count, lambda index: worker_command(twistd, plugin_args, index), groups, reactor,
                      config.shutdown_grace + STOP_MARGIN)


def _inherited(worker: int | None, fd: int) -> Any:
    """A worker's share of a port, handed over by the supervisor; None in a single process."""
    return inherited_socket(fd) if worker is not None else None


_Bound = TypeVar("_Bound")


def _listen(bind: Callable[[], _Bound], address: str, number: int) -> _Bound:
    """Bind now; a port that cannot be bound ends the process with a one-line reason."""
    try:
        return bind()
    except CannotListenError as exc:
        reason = getattr(exc.socketError, "strerror", None) or str(exc.socketError)
        raise SystemExit(f"comatrix: cannot listen on [{address}]:{number}: {reason}") from None
    except DtlsUnavailable as exc:
        raise SystemExit(f"comatrix: cannot serve CoAP over DTLS: {exc}") from None
