"""``workers`` / ``--workers`` parsing and validation, and the supervisor's restart and stop logic (no real processes)."""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import error, task
from twisted.logger import LogPublisher
from twisted.python.failure import Failure

from comatrix.config import ConfigError, build_config
from comatrix.coap.transport import bind_shared
from comatrix.tap import Options, load_config
from comatrix.workers import (COAP_FD, RestartPolicy, Supervisor, name_worker_logs, worker_command,
                              worker_log_file)


def test_workers_default_to_one_process() -> None:
    assert build_config().workers == 1


def test_the_command_line_overrides_the_configured_workers(tmp_path: Path) -> None:
    config = tmp_path / "comatrix.toml"
    config.write_text(f'workers = 3\nstate_dir = "{tmp_path}"\n')
    options = Options()
    options.parseOptions(["--config", str(config)])
    assert load_config(options).workers == 3
    options = Options()
    options.parseOptions(["--config", str(config), "--workers", "2"])
    assert load_config(options).workers == 2


@pytest.mark.parametrize("value", [0, -1, 65, "two", 1.5, True])
def test_a_bad_worker_count_is_refused(value: Any) -> None:
    with pytest.raises(ConfigError, match="workers"):
        build_config({"workers": value, "state_dir": "/tmp/x"})


def test_several_workers_need_a_state_dir_to_share() -> None:
    with pytest.raises(ConfigError, match="state_dir"):
        build_config({"workers": 2})
    assert build_config({"workers": 2, "state_dir": "/tmp/x"}).workers == 2


def test_several_workers_refuse_oscore_devices_and_the_appservice(tmp_path: Path) -> None:
    oscore = {"address": "fd00::1", "access_token": "t", "oscore": {
        "recipient_id": "01", "sender_id": "02", "master_secret": "00" * 16}}
    with pytest.raises(ConfigError, match="oscore or edhoc"):
        build_config({"workers": 2, "state_dir": "/tmp/x", "devices": [oscore]})
    registration = tmp_path / "registration.yaml"
    with pytest.raises(ConfigError, match="appservice"):
        build_config({"workers": 2, "state_dir": "/tmp/x", "appservice": {"registration": str(registration)}})
    assert build_config({"devices": [oscore]}).workers == 1


def test_a_worker_gets_the_options_given_and_its_index() -> None:
    options = Options()
    options.parseOptions(["--ip", "::1", "--port", "5700", "--plugin-dir", "/a", "--plugin-dir", "/b",
                          "--disable-plugin", "x", "--allow-registration", "--workers", "2", "--log-level", "warn"])
    args = options.worker_args()
    assert args == ["--ip", "::1", "--port", "5700", "--log-level", "warn", "--plugin-dir", "/a",
                    "--plugin-dir", "/b", "--disable-plugin", "x", "--allow-registration"]
    argv = worker_command({"logfile": "/var/log/comatrix.log"}, args, 1)
    assert argv[0] == sys.executable and argv[-2:] == ["--worker", "1"]
    assert argv[argv.index("--logfile") + 1] == "/var/log/comatrix.worker1.log"
    assert "--nodaemon" in argv and "--pidfile=" in argv and "--workers" not in argv
    parsed = Options()
    parsed.parseOptions(argv[argv.index("comatrix") + 1:])
    assert parsed["worker"] == 1 and parsed.cli_values()["port"] == 5700


def test_worker_logs_follow_the_supervisors() -> None:
    assert worker_log_file(None, 0) is None
    assert worker_log_file("-", 1) == "-"
    assert worker_log_file("gateway.log", 2) == "gateway.worker2.log"
    syslog = worker_command({"syslog": True, "prefix": "comatrix"}, [], 0)
    assert syslog[syslog.index("--prefix") + 1] == "comatrix-worker0" and "--logfile" not in syslog


def test_log_lines_name_the_worker() -> None:
    publisher = LogPublisher()
    name_worker_logs(3, publisher)
    seen: list[dict[str, Any]] = []
    publisher.addObserver(seen.append)
    from twisted.logger import Logger
    Logger(namespace="comatrix", observer=publisher).info("hello")
    publisher({"log_system": "-", "log_format": "legacy"})
    assert [event["log_system"] for event in seen] == ["worker3 comatrix#info", "worker3 -"]


def test_restart_delay_doubles_for_quick_deaths_and_resets_after_a_stable_run() -> None:
    policy = RestartPolicy(first=0.5, longest=4.0, stable=30.0)
    assert [policy.delay(1.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert policy.delay(60.0) == 0.5
    assert policy.delay(0.1) == 0.5


class FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[int] = []

    def signalProcess(self, number: int) -> None:
        self.signals.append(number)


class FakeSpawner(task.Clock):
    """A clock that records spawnProcess calls; a test ends a process with `end`."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict[int, Any]]] = []

    def spawnProcess(self, proto: Any, executable: str, args: list[str], env: Any = None,
                     childFDs: Any = None) -> FakeTransport:
        transport = FakeTransport(1000 + len(self.spawned))
        proto.makeConnection(transport)
        self.spawned.append((proto, args, childFDs))
        return transport

    def end(self, number: int, how: Any) -> None:
        self.spawned[number][0].processEnded(Failure(how))


def make_supervisor(clock: FakeSpawner, sockets: list[list[socket.socket]]) -> Supervisor:
    supervisor = Supervisor(2, lambda index: ["python", "worker", str(index)], sockets, clock, stop_timeout=7.0)
    supervisor.startService()
    return supervisor


@pytest.fixture
def shared_sockets() -> Any:
    sockets = bind_shared("127.0.0.1", 0, 2)
    yield [[skt] for skt in sockets]
    for skt in sockets:
        skt.close()


def test_the_supervisor_hands_each_worker_its_socket_and_restarts_a_dead_one(shared_sockets: Any) -> None:
    previous = signal.getsignal(signal.SIGHUP)
    try:
        clock = FakeSpawner()
        supervisor = make_supervisor(clock, shared_sockets)
        assert [args[-1] for _proto, args, _fds in clock.spawned] == ["0", "1"]
        assert [fds[COAP_FD] for _proto, _args, fds in clock.spawned] == [group[0].fileno()
                                                                         for group in shared_sockets]
        clock.advance(1)
        clock.end(1, error.ProcessTerminated(signal=9))
        assert len(clock.spawned) == 2
        clock.advance(0.5)  # the first quick death: started again after 0.5 s
        assert clock.spawned[2][1][-1] == "1" and supervisor.restarts == 1
        clock.end(2, error.ProcessTerminated(exitCode=1))
        clock.advance(0.5)
        assert len(clock.spawned) == 3  # the second quick death in a row waits 1 s
        clock.advance(0.5)
        assert len(clock.spawned) == 4
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_stopping_sends_sigterm_then_kills_what_is_left_and_starts_nothing(shared_sockets: Any) -> None:
    previous = signal.getsignal(signal.SIGHUP)
    try:
        clock = FakeSpawner()
        supervisor = make_supervisor(clock, shared_sockets)
        clock.end(0, error.ProcessTerminated(signal=9))  # a restart is pending when the stop comes
        stopped = supervisor.stopService()
        worker1 = clock.spawned[1][0]
        assert worker1.transport.signals == [signal.SIGTERM]
        clock.advance(6.9)
        assert not stopped.called and worker1.transport.signals == [signal.SIGTERM]
        clock.advance(0.2)  # stop_timeout passed: killed
        assert worker1.transport.signals == [signal.SIGTERM, signal.SIGKILL]
        clock.end(1, error.ProcessTerminated(signal=9))
        assert stopped.called and len(clock.spawned) == 2  # the pending restart was cancelled
        assert all(group[0].fileno() == -1 for group in shared_sockets)  # the supervisor's sockets closed
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_sighup_reaches_every_worker(shared_sockets: Any) -> None:
    previous = signal.getsignal(signal.SIGHUP)
    try:
        clock = FakeSpawner()
        supervisor = make_supervisor(clock, shared_sockets)
        supervisor.signal_all(signal.SIGHUP)
        assert [proto.transport.signals for proto, _a, _f in clock.spawned] == [[signal.SIGHUP]] * 2
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_shared_sockets_join_one_port_and_a_port_taken_without_reuse_is_refused() -> None:
    sockets = bind_shared("127.0.0.1", 0, 3)
    try:
        ports = {skt.getsockname()[1] for skt in sockets}
        assert len(ports) == 1
        assert all(skt.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for skt in sockets)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain:
            plain.bind(("127.0.0.1", 0))
            with pytest.raises(error.CannotListenError):
                bind_shared("127.0.0.1", plain.getsockname()[1], 2)
    finally:
        for skt in sockets:
            skt.close()


def test_twistd_comatrix_with_two_workers_binds_both_ports_twice_and_serves_nothing_itself(tmp_path: Path) -> None:
    from twisted.internet import reactor

    from comatrix.tap import makeService
    from support import free_port
    dtls_port = free_port("127.0.0.1", socket.SOCK_DGRAM)
    options = Options()
    options.parseOptions(["--ip", "127.0.0.1", "--port", "0", "--dtls-port", str(dtls_port),
                          "--state-dir", str(tmp_path), "--workers", "2"])
    supervisor = makeService(options, reactor)
    try:
        assert isinstance(supervisor, Supervisor) and supervisor.count == 2
        coap_ports = {group[0].getsockname()[1] for group in supervisor.sockets}
        dtls_ports = {group[1].getsockname()[1] for group in supervisor.sockets}
        assert len(coap_ports) == 1 and dtls_ports == {dtls_port}
        argv = supervisor.command(1)
        assert argv[-2:] == ["--worker", "1"] and "--dtls-port" in argv
    finally:
        for group in supervisor.sockets:
            for skt in group:
                skt.close()
