"""Shared pytest fixtures: a real Synapse, the gateway as a subprocess, and the secret sweep.

Fixtures:

* ``synapse`` (session): one real Synapse on a free 127.0.0.1 port, SQLite in a temp dir.
  Use ``with synapse.stopped(): ...`` to make it unreachable for a while.
* ``synapse_default_limits`` (session): another real Synapse, started only when asked for,
  with Synapse's own default rate limits (``rc_login`` etc.), for tests about rate limits.
  Its ``make_user`` registers through the admin API (not rate-limited).
* ``synapse_user`` (function): a factory, ``synapse_user(prefix="user") -> MatrixUser``.
* ``gateway`` (session): one ``twistd comatrix`` subprocess pointed at ``synapse``, with
  registration open (``--allow-registration``); other gateways keep it closed by default.
* ``make_gateway`` (function): ``make_gateway(**GatewayProcess options, start=True)`` for
  tests that need their own config, plugin dir, address or a failing start; every
  gateway it made is stopped at teardown.

Secret sweep: every password/token the helpers create or see goes into
:mod:`support.secrets`, every gateway log file too. Each gateway fixture checks its own
logs when torn down (an error attributed to the test that used it), and
``pytest_sessionfinish`` sweeps all logs once more after every fixture is torn down and
fails the run if anything leaked. A hook rather than a last-running test module: it
runs whatever subset, order or ``-k`` selection was used, and after the session-scoped
gateway has stopped and written its final log lines.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from support.gateway import GatewayProcess
from support.secrets import leaks
from support.synapse import MatrixUser, SynapseServer


@pytest.fixture(scope="session")
def synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapseServer]:
    server = SynapseServer(tmp_path_factory.mktemp("synapse"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def synapse_default_limits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapseServer]:
    """Another real Synapse, with every rate limit (``rc_login`` ...) as Synapse ships it."""
    server = SynapseServer(tmp_path_factory.mktemp("synapse-default-limits"), default_limits=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def synapse_user(synapse: SynapseServer) -> Callable[..., MatrixUser]:
    """Factory for fresh users with random names: ``synapse_user(prefix="user")``."""
    return synapse.make_user


def _fail_on_leaks(gateways: list[GatewayProcess]) -> None:
    for gw in gateways:
        gw.remember_stored_tokens()
    found = leaks([p for gw in gateways for p in (gw.log_path, gw.output_path)])
    if found:
        pytest.fail(
            "secrets found in gateway logs:\n" + "\n".join(f"  {leak}" for leak in found),
            pytrace=False,
        )


def _running(gw: GatewayProcess) -> Iterator[GatewayProcess]:
    """Start ``gw`` for the fixture's lifetime; afterwards stop it and check its log for secrets."""
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()
    _fail_on_leaks([gw])


@pytest.fixture(scope="session")
def gateway(
    synapse: SynapseServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    # Registration is open on this one: the device journeys register over CoAP.
    yield from _running(GatewayProcess(synapse.base_url, tmp_path_factory.mktemp("gateway"),
                                       allow_registration=True))


@pytest.fixture(scope="session")
def unlimited_gateway(
    synapse: SynapseServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """A gateway with rate limits off, for tests that send bursts from one address.

    Those tests also log in to the compact profile many times from that one address
    over the session: the per-device session cap is raised (it is tested on its own).
    """
    yield from _running(GatewayProcess(synapse.base_url, tmp_path_factory.mktemp("unlimited-gw"),
                                       config_text="[limits]\ndevice_rate = 0\nglobal_rate = 0\n"
                                                   "max_sessions_per_device = 256\n"))


@pytest.fixture
def make_gateway(
    synapse: SynapseServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., GatewayProcess]]:
    made: list[GatewayProcess] = []

    def make(*, start: bool = True, **options: Any) -> GatewayProcess:
        homeserver = options.pop("homeserver", synapse.base_url)
        workdir = options.pop("workdir", None) or tmp_path_factory.mktemp("gw")
        gw = GatewayProcess(homeserver, Path(workdir), **options)
        made.append(gw)
        if start:
            gw.start()
        return gw

    try:
        yield make
    finally:
        for gw in made:
            gw.stop()
    _fail_on_leaks(made)


@pytest.fixture
def hanging_homeserver() -> Iterator[str]:
    """A homeserver URL whose TCP port accepts connections (kernel backlog) and never answers."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


@pytest.fixture
def connectionless_homeserver() -> Iterator[str]:
    """A homeserver URL whose TCP port takes no new connection (its accept queue is full).

    The kernel drops further SYNs, so a connect hangs as to a host that is down or
    blackholed -- on loopback, without touching any route.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname(), timeout=5)
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        # The premise, checked: a further connection attempt is not taken.
        with pytest.raises(socket.timeout):
            probe.connect(listener.getsockname())
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        probe.close()
        filler.close()
        listener.close()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    found = leaks()
    if not found:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"SECRET LEAK: {leak}" for leak in found]
    if reporter is not None:
        reporter.section("secrets in gateway logs", sep="!", red=True, bold=True)
        for line in lines:
            reporter.write_line(line, red=True)
    else:
        print("\n".join(lines))
    # Only ever make the status worse (interrupted/internal errors keep theirs).
    if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
