"""Several worker processes on one CoAP port (``workers = N``): the supervisor and the worker side.

With ``workers`` above 1, ``twistd comatrix`` becomes a supervisor.  Before the
reactor runs it binds N sockets to the CoAP port (and N to the DTLS port) with
``SO_REUSEPORT`` (`comatrix.coap.transport.bind_shared`), then starts N copies of
itself in worker mode (``--worker I``), each handed its own socket(s) as file
descriptors `COAP_FD` and `DTLS_FD`, and serves nothing itself.

Linux picks the socket of a group for each datagram by a hash of the 4-tuple
(source and destination address and port), so a peer keeps reaching the same
worker: the dedup cache, block-wise transfers and Observe registrations, kept
per worker, stay correct.  A peer whose source port changes is a new CoAP
endpoint (RFC 7252 §5.3.2, §4.5: matching and deduplication are per endpoint),
so it may land on another worker and loses nothing it could keep; what must
survive such a move (compact sessions, tokens, positions) is in the shared
SQLite store.  The supervisor keeps the sockets for the life of the service, so
the group never shrinks or grows: a restarted worker serves the very socket its
predecessor did, the same peers reach it, and datagrams that arrive while it
starts wait in that socket's buffer.

A worker that dies is started again after a delay that doubles with each quick
death (`RestartPolicy`).  SIGTERM stops the supervisor: it sends SIGTERM to every
worker (each drains as a single gateway does), waits a bounded time and kills
what is left.  SIGHUP is passed on (each worker reloads its devices).  Worker 0
alone serves the HTTP API and the metrics endpoint, so their ports do not clash.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.logger import globalLogPublisher

from comatrix.logs import get_logger

log = get_logger(__name__)

__all__ = ["COAP_FD", "DTLS_FD", "RestartPolicy", "Supervisor", "die_with_supervisor", "inherited_socket",
           "name_worker_logs", "stop_once_on_signals", "worker_command", "worker_log_file"]

#: The descriptors a worker finds its share of the CoAP and the DTLS port on.
COAP_FD = 3
DTLS_FD = 4

#: Environment variable telling a worker its supervisor's pid (`die_with_supervisor`).
SUPERVISOR_ENV = "COMATRIX_SUPERVISOR_PID"

#: Seconds a stopping worker gets beyond ``shutdown_grace`` before it is killed.
STOP_MARGIN = 5.0


@dataclasses.dataclass
class RestartPolicy:
    """How long to wait before starting a worker again: ``first`` seconds, doubled per quick death.

    A worker that ran ``stable`` seconds or more died of something rare: it comes
    back after ``first`` seconds.  One that keeps dying at once (a broken plugin, a
    port taken) is retried ever more slowly, at most every ``longest`` seconds.
    """

    first: float = 0.5
    longest: float = 30.0
    stable: float = 30.0
    quick_deaths: int = 0

    def delay(self, lived: float) -> float:
        """The wait before the next start, after a worker that ran ``lived`` seconds died."""
        self.quick_deaths = 0 if lived >= self.stable else self.quick_deaths + 1
        return float(min(self.longest, self.first * 2 ** max(0, self.quick_deaths - 1)))


def worker_log_file(logfile: str | None, index: int) -> str | None:
    """Worker ``index``'s log file beside the supervisor's (``gateway.log`` -> ``gateway.worker1.log``)."""
    if not logfile or logfile == "-":
        return logfile
    path = Path(logfile)
    return str(path.with_name(f"{path.stem}.worker{index}{path.suffix}"))


def worker_command(twistd_options: Any, plugin_args: Sequence[str], index: int) -> list[str]:
    """The argv of worker ``index``: this Python running twistd in the foreground, no pidfile.

    Where the supervisor logs, the worker logs too (its own file beside a log file).
    """
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "--nodaemon", "--pidfile="]
    options = twistd_options if twistd_options is not None else {}
    logfile = worker_log_file(options.get("logfile"), index)
    if logfile:
        argv += ["--logfile", logfile]
    if options.get("syslog"):
        argv += ["--syslog", "--prefix", f"{options.get('prefix') or 'twisted'}-worker{index}"]
    return argv + ["comatrix", *plugin_args, "--worker", str(index)]


def inherited_socket(fd: int) -> socket.socket:
    """The bound socket the supervisor handed this worker on ``fd``."""
    try:
        return socket.socket(fileno=fd)
    except OSError as exc:
        raise SystemExit(f"comatrix: worker mode needs the supervisor's socket on descriptor {fd}: "
                         f"{exc.strerror}") from None


def name_worker_logs(index: int, publisher: Any = globalLogPublisher) -> None:
    """Make every log line of this process name the worker (``[worker1 comatrix#info]``)."""
    prefix = f"worker{index}"

    def observer(event: dict[str, Any]) -> None:
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{getattr(level, 'name', '-')}"
        if not str(system).startswith(prefix):
            event["log_system"] = f"{prefix} {system}"
    publisher.addObserver(observer)


def die_with_supervisor(supervisor: int) -> None:
    """Have the kernel SIGTERM this worker if its supervisor (pid ``supervisor``) dies, e.g. killed.

    Otherwise an orphaned worker would keep its share of the port and serve on, unsupervised.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() != supervisor:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


#: prctl(2) option: the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1


def stop_once_on_signals(reactor: Any) -> None:
    """In a worker: SIGTERM stops the reactor once (a second is not an error); SIGINT is the supervisor's.

    Called when the reactor runs, after Twisted installed its own handlers.
    """
    def terminate(signum: int, frame: Any) -> None:
        reactor.callFromThread(stop)

    def stop() -> None:
        if reactor.running:
            try:
                reactor.stop()
            except error.ReactorNotRunning:
                pass
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _WorkerProtocol(protocol.ProcessProtocol):
    """One running worker; tells the supervisor when it ends."""

    def __init__(self, index: int, on_end: Callable[[int, "_WorkerProtocol", Any], None]) -> None:
        self.index = index
        self.on_end = on_end
        self.started = 0.0
        self.pid: int | None = None
        self.ended: defer.Deferred[None] = defer.Deferred()

    def processEnded(self, reason: Any) -> None:
        self.on_end(self.index, self, reason.value)
        self.ended.callback(None)


def _exit_description(value: Any) -> str:
    if getattr(value, "signal", None):
        return f"signal {value.signal}"
    return f"status {getattr(value, 'exitCode', '?')}"


class Supervisor(service.Service):
    """Starts the workers, starts again those that die, stops them all (bounded) on shutdown."""

    def __init__(self, count: int, command: Callable[[int], list[str]],
                 sockets: Sequence[Sequence[socket.socket]], reactor: Any, stop_timeout: float,
                 policy: Callable[[], RestartPolicy] = RestartPolicy) -> None:
        """``sockets[i]``: worker i's sockets, handed to it as descriptors 3, 4, ..."""
        self.count = count
        self.command = command
        self.sockets = sockets
        self.reactor = reactor
        self.stop_timeout = stop_timeout
        self.policies = [policy() for _ in range(count)]
        self.workers: dict[int, _WorkerProtocol] = {}
        self.pending: dict[int, Any] = {}
        self.restarts = 0
        self.stopping = False

    def startService(self) -> None:
        super().startService()
        log.info("Supervising {count} worker processes sharing the CoAP port (SO_REUSEPORT)", count=self.count)
        for index in range(self.count):
            self.spawn(index)
        signal.signal(signal.SIGHUP, lambda signum, frame: self.reactor.callFromThread(self.signal_all, signal.SIGHUP))

    def spawn(self, index: int) -> None:
        self.pending.pop(index, None)
        if self.stopping:
            return
        worker = _WorkerProtocol(index, self._ended)
        child_fds: dict[int, Any] = {0: 0, 1: 1, 2: 2}
        for offset, skt in enumerate(self.sockets[index]):
            child_fds[COAP_FD + offset] = skt.fileno()
        argv = self.command(index)
        worker.started = self.reactor.seconds()
        env = dict(os.environ, **{SUPERVISOR_ENV: str(os.getpid())})
        process = self.reactor.spawnProcess(worker, argv[0], argv, env=env, childFDs=child_fds)
        worker.pid = getattr(process, "pid", None)
        self.workers[index] = worker
        log.info("Worker {index} started (pid {pid})", index=index, pid=worker.pid)

    def _ended(self, index: int, worker: _WorkerProtocol, value: Any) -> None:
        if self.workers.get(index) is worker:
            del self.workers[index]
        if self.stopping:
            log.info("Worker {index} stopped ({how})", index=index, how=_exit_description(value))
            return
        delay = self.policies[index].delay(self.reactor.seconds() - worker.started)
        self.restarts += 1
        log.warn("Worker {index} (pid {pid}) exited with {how}; starting it again in {delay:.1f} s",
                 index=index, pid=worker.pid, how=_exit_description(value), delay=delay)
        self.pending[index] = self.reactor.callLater(delay, self.spawn, index)

    def signal_all(self, number: int) -> None:
        for worker in list(self.workers.values()):
            if worker.transport is None:
                continue
            try:
                worker.transport.signalProcess(number)
            except (error.ProcessExitedAlready, OSError):
                pass

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        self.stopping = True
        for call in self.pending.values():
            if call.active():
                call.cancel()
        self.pending.clear()
        running = list(self.workers.values())
        log.info("Stopping {count} worker(s)", count=len(running))
        self.signal_all(signal.SIGTERM)
        yield self._wait(running, self.stop_timeout)
        left = [worker for worker in running if not worker.ended.called]
        if left:
            log.warn("{count} worker(s) still running after {seconds:.0f} s: killing them", count=len(left),
                     seconds=self.stop_timeout)
            self.signal_all(signal.SIGKILL)
            yield self._wait(left, STOP_MARGIN)
        for group in self.sockets:
            for skt in group:
                skt.close()

    def _wait(self, workers: Sequence[_WorkerProtocol], seconds: float) -> "defer.Deferred[None]":
        """Fires when every one of ``workers`` ended, or after ``seconds``."""
        done: defer.Deferred[None] = defer.Deferred()

        def finish(_: Any = None) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)
        timer = self.reactor.callLater(seconds, finish)
        defer.DeferredList([worker.ended for worker in workers if not worker.ended.called]).addBoth(finish)
        return done
