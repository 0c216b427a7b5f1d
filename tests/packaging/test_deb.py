"""The Debian package, end to end: build, lintian, apt install on Debian's own Python packages,
run the installed gateway, link-local bind in network namespaces, upgrade/remove/purge.

Slow (a few minutes: apt, dpkg-buildpackage) and changes the machine, so it needs
root (CI has it) and cleans up after itself by purging the packages.  The
tests share one installation and run in file order; the lifecycle test that
purges comes last.  The gateway always runs from the installed files:
/usr/bin/twistd3 (Debian's name for twistd) under /usr/bin/python3, as the
``comatrix`` user, with a working directory outside the checkout.

Everything Debian-side runs with a plain system PATH and no virtualenv or pyenv
variables, as on a real border router, so apt's maintainer scripts and triggers
use /usr/bin/python3; the project's .venv is never touched.  Missing root or
tools make the tests fail, never skip.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import re
import secrets
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import cbor2
import pytest

from support import REPO_ROOT, free_port
from support.coap_clients import CoapNoResponse, CoapResult, libcoap
from support.secrets import remember, remember_log_file

pytestmark = [pytest.mark.packaging, pytest.mark.integration]

PACKAGES = ("comatrix", "python3-txthings")
#: Generous bounds for slow apt mirrors; a normal build + install takes ~30 s.
APT_TIMEOUT = 600
BUILD_TIMEOUT = 600


def debian_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment like a root shell on a plain Debian system (keeps pip/proxy settings)."""
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
    }
    for key, value in os.environ.items():
        if key.startswith("PIP_") or key.lower() in ("http_proxy", "https_proxy", "no_proxy"):
            env[key] = value
    env.update(extra or {})
    return env


def run(cmd: Sequence[str], *, timeout: float = 120, check: bool = True, cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command with the Debian environment; on failure the assertion shows its output."""
    result = subprocess.run(list(cmd), cwd=cwd, env=dict(env or debian_env()), timeout=timeout,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    if check:
        assert result.returncode == 0, f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout[-6000:]}"
    return result


def require_root_and_tools() -> None:
    assert os.geteuid() == 0, "the packaging tests install a .deb: run them as root (CI does)"
    for tool in ("apt-get", "dpkg-buildpackage", "git", "ip", "setpriv", "coap-client-notls"):
        assert shutil.which(tool, path=debian_env()["PATH"]), f"{tool} is missing"


def apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    return run(["apt-get", "-y", "-o", "Dpkg::Use-Pty=0", *args], timeout=APT_TIMEOUT)


def installed(package: str) -> bool:
    result = run(["dpkg-query", "-W", "-f=${db:Status-Status}", package], check=False)
    return result.returncode == 0 and result.stdout.strip() == "installed"


@dataclasses.dataclass(frozen=True)
class DebBuild:
    source: Path          # the copy of the checkout that was built
    debs: tuple[Path, ...]
    changes: Path

    def deb(self, package: str) -> Path:
        return next(deb for deb in self.debs if deb.name.startswith(package + "_"))


def copy_checkout(dest: Path) -> Path:
    """The working tree as git sees it (tracked + untracked, minus ignored files) copied to dest."""
    listed = run(["git", "-C", str(REPO_ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"])
    for name in filter(None, listed.stdout.split("\0")):
        source = REPO_ROOT / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree, not yet in git
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    return dest


def install_build_deps(source: Path) -> None:
    result = run(["apt-get", "-y", "-o", "Dpkg::Use-Pty=0", "build-dep", str(source)],
                 timeout=APT_TIMEOUT, check=False)
    if result.returncode != 0:  # a fresh machine has no package lists yet
        apt_get("update")
        apt_get("build-dep", str(source))
    apt_get("install", "--no-install-recommends", "lintian", "systemd", "adduser")


def build_debs(source: Path) -> DebBuild:
    run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=source, timeout=BUILD_TIMEOUT)
    out = source.parent
    debs = tuple(sorted(out.glob("*.deb")))
    assert {deb.name.split("_")[0] for deb in debs} == set(PACKAGES), debs
    return DebBuild(source=source, debs=debs, changes=next(out.glob("*.changes")))


@pytest.fixture(scope="session")
def deb_build(tmp_path_factory: pytest.TempPathFactory) -> DebBuild:
    """comatrix_*.deb and python3-txthings_*.deb built from a copy of the checkout."""
    require_root_and_tools()
    source = copy_checkout(tmp_path_factory.mktemp("deb") / "comatrix")
    install_build_deps(source)
    return build_debs(source)


@pytest.fixture(scope="session")
def deb_upgrade_build(deb_build: DebBuild, tmp_path_factory: pytest.TempPathFactory) -> DebBuild:
    """The same tree built again as a newer version, to test upgrades."""
    source = tmp_path_factory.mktemp("deb-upgrade") / "comatrix"
    shutil.copytree(deb_build.source, source, symlinks=True)
    changelog = source / "debian" / "changelog"
    first = changelog.read_text().splitlines()[0]
    version = first.split("(", 1)[1].split(")", 1)[0]
    trailer = next(line for line in changelog.read_text().splitlines() if line.startswith(" -- "))
    entry = (f"comatrix ({version}+upgradetest1) unstable; urgency=medium\n\n"
             f"  * Upgrade test build.\n\n{trailer}\n\n")
    changelog.write_text(entry + changelog.read_text())
    return build_debs(source)


def purge_all() -> None:
    present = [package for package in PACKAGES
               if run(["dpkg-query", "-W", package], check=False).returncode == 0]
    if present:
        apt_get("purge", *present)


@pytest.fixture(scope="session")
def installed_comatrix(deb_build: DebBuild) -> Iterator[DebBuild]:
    """The built packages installed with apt (dependencies from Debian); purged afterwards."""
    purge_all()
    apt_get("install", *(str(deb) for deb in deb_build.debs))
    try:
        yield deb_build
    finally:
        purge_all()

TWISTD = "/usr/bin/twistd3"
CONFIG = "/etc/comatrix/comatrix.toml"
CREDENTIALS = Path("/etc/comatrix/credentials.toml")
STATE_DIR = Path("/var/lib/comatrix")
UNIT = "/lib/systemd/system/comatrix.service"
SITE = Path("/usr/lib/python3/dist-packages")
CONTENT_FORMAT_CBOR = 60
ACCESS_TOKEN_OPTION = 256
#: How long the gateway may take to answer after its address became usable.
READY_TIMEOUT = 30.0


# --- helpers ----------------------------------------------------------------------------

class InstalledGateway:
    """``twistd3 comatrix`` from the installed files, as user comatrix, optionally in a netns."""

    def __init__(self, log_path: Path, args: Sequence[str] = (), netns: str | None = None) -> None:
        command = ["setpriv", "--reuid=comatrix", "--regid=comatrix", "--init-groups", "--",
                   TWISTD, "--nodaemon", "--pidfile=", "comatrix", "--config", CONFIG, *args]
        if netns is not None:
            command = ["ip", "netns", "exec", netns, *command]
        self.log_path = remember_log_file(log_path)
        self._log = open(log_path, "wb")
        # cwd=/ so nothing from the checkout can be imported by accident.
        self.process = subprocess.Popen(command, cwd="/", env=debian_env(), stdin=subprocess.DEVNULL,
                                        stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def assert_running(self) -> None:
        assert self.process.poll() is None, f"gateway exited {self.process.returncode}:\n{self.log()}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


T = TypeVar("T")


def poll(check: Callable[[], T | None], timeout: float, interval: float = 0.2, what: str = "condition") -> T:
    """Call ``check`` until it returns a truthy value or ``timeout`` passes (then fail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(interval)


def netns_time(netns: str, uri: str) -> str | None:
    """GET /time with coap-client-notls inside ``netns``; the decimal answer or None."""
    result = subprocess.run(["ip", "netns", "exec", netns, "coap-client-notls", "-B", "2", "-m", "get", uri],
                            env=debian_env(), stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    answer = result.stdout.decode(errors="replace").strip()
    return answer if answer.isdigit() else None


def mode_owner(path: Path) -> tuple[int, str, str]:
    st = path.stat()
    return stat.S_IMODE(st.st_mode), pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name


def user_exists(name: str) -> bool:
    return run(["getent", "passwd", name], check=False).returncode == 0


def group_exists(name: str) -> bool:
    return run(["getent", "group", name], check=False).returncode == 0


def package_files(package: str) -> list[Path]:
    return [Path(line) for line in run(["dpkg", "-L", package]).stdout.splitlines() if line.startswith("/")]


# --- static checks ----------------------------------------------------------------------

def test_changelog_version_matches_setup_cfg() -> None:
    changelog = (REPO_ROOT / "debian" / "changelog").read_text().splitlines()[0]
    deb_version = changelog.split("(", 1)[1].split(")", 1)[0]
    setup_version = re.search(r"^version\s*=\s*(\S+)", (REPO_ROOT / "setup.cfg").read_text(), re.M)
    assert setup_version is not None
    assert deb_version.split("-")[0] == setup_version.group(1)


def test_lintian_is_clean(deb_build: DebBuild) -> None:
    result = run(["lintian", "--pedantic", "--info", str(deb_build.changes)], check=False)
    problems = [line for line in result.stdout.splitlines() if re.match(r"[EW]: ", line)]
    assert not problems, result.stdout
    assert result.returncode == 0, result.stdout


def test_package_contents(deb_build: DebBuild) -> None:
    listing = run(["dpkg-deb", "-c", str(deb_build.deb("comatrix"))]).stdout
    names = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    for wanted in ("/etc/comatrix/comatrix.toml", "/etc/comatrix/conf.d/", "/etc/comatrix/plugins/",
                   UNIT, "/usr/lib/python3/dist-packages/twisted/plugins/comatrix_plugin.py",
                   "/usr/lib/python3/dist-packages/comatrix/tap.py", "/usr/share/comatrix/credentials.toml",
                   "/usr/share/doc/comatrix/README.Debian", "/usr/share/doc/comatrix/examples/sensor.py"):
        assert wanted in names, f"{wanted} missing from comatrix.deb"
    for unwanted in ("/usr/lib/python3/dist-packages/twisted/__init__.py",
                     "/usr/lib/python3/dist-packages/twisted/plugins/__init__.py",
                     "/usr/lib/python3/dist-packages/twisted/plugins/dropin.cache",
                     "/etc/comatrix/credentials.toml"):
        assert unwanted not in names, f"comatrix.deb must not ship {unwanted}"
    conffiles = run(["dpkg-deb", "-f", str(deb_build.deb("comatrix")), "Conffiles"], check=False).stdout
    control = run(["dpkg-deb", "-I", str(deb_build.deb("comatrix")), "conffiles"]).stdout
    assert control.split() == ["/etc/comatrix/comatrix.toml"], (conffiles, control)
    for deb in deb_build.debs:
        assert run(["dpkg-deb", "-f", str(deb), "Architecture"]).stdout.strip() == "all"


# --- installed package ------------------------------------------------------------------

def test_installed_layout(installed_comatrix: DebBuild) -> None:
    assert user_exists("comatrix") and group_exists("comatrix")
    account = pwd.getpwnam("comatrix")
    assert account.pw_uid < 1000 and account.pw_shell == "/usr/sbin/nologin"
    assert mode_owner(STATE_DIR) == (0o750, "comatrix", "comatrix")
    assert mode_owner(CREDENTIALS) == (0o640, "root", "comatrix")
    assert Path("/etc/comatrix/conf.d").is_dir() and Path("/etc/comatrix/plugins").is_dir()
    # python3-twisted's trigger rebuilt the twisted plugin cache with our dropin in it.
    assert b"comatrix_plugin" in (SITE / "twisted/plugins/dropin.cache").read_bytes()
    assert (SITE / "comatrix/plugins/dropin.cache").is_file()


def test_twistd_help_from_installed_files(installed_comatrix: DebBuild, tmp_path: Path) -> None:
    where = run(["/usr/bin/python3", "-c", "import comatrix, txthings; print(comatrix.__file__, txthings.__file__)"],
                cwd=tmp_path).stdout.split()
    assert where == [str(SITE / "comatrix/__init__.py"), str(SITE / "txthings/__init__.py")]
    result = run([TWISTD, "comatrix", "--help"], cwd=tmp_path)
    assert "Usage: twistd [options] comatrix" in result.stdout
    assert "--config" in result.stdout and "--homeserver" in result.stdout


def test_unit_verifies_and_scores_ok(installed_comatrix: DebBuild) -> None:
    # Both the checkout's unit and the installed copy (they are the same file).
    for unit in (str(REPO_ROOT / "systemd" / "comatrix.service"), UNIT):
        verify = run(["systemd-analyze", "verify", unit], check=False)
        assert verify.returncode == 0 and not verify.stdout.strip(), verify.stdout
    security = run(["systemd-analyze", "security", "--offline=yes", "--no-pager", UNIT], check=False)
    match = re.search(r"Overall exposure level for comatrix\.service: ([\d.]+) (\w+)", security.stdout)
    assert match, security.stdout
    print(f"systemd-analyze security: {match.group(1)} {match.group(2)}")
    assert match.group(2) in ("PERFECT", "SAFE", "OK"), security.stdout[-3000:]


# --- the installed gateway against the test Synapse ------------------------------------
# This part depends on the wire format of the built-in resources (comatrix/plugins/); keep
# it in step with them.

def coap_cbor(port: int, method: str, path: str, body: object, token: str | None = None) -> CoapResult:
    options = [(ACCESS_TOKEN_OPTION, token.encode())] if token else []
    return libcoap(method, f"coap://[::1]:{port}/{path}", payload=cbor2.dumps(body),
                   content_format=CONTENT_FORMAT_CBOR, options=options)


@pytest.fixture
def loopback_gateway(installed_comatrix: DebBuild, synapse: Any,
                     tmp_path: Path) -> Iterator[tuple[InstalledGateway, int]]:
    port = free_port("::1", kind=socket.SOCK_DGRAM)
    gateway = InstalledGateway(tmp_path / "gateway.log",
                               ["--ip", "::1", "--port", str(port), "--homeserver", synapse.base_url,
                                "--allow-registration", "--security", "optional"])
    try:
        def answers() -> bool:
            gateway.assert_running()
            try:
                return libcoap("get", f"coap://[::1]:{port}/time", timeout=2).ok
            except CoapNoResponse:
                return False
        poll(answers, READY_TIMEOUT, what="the installed gateway to answer GET /time")
        yield gateway, port
    finally:
        gateway.stop()


def test_installed_gateway_round_trip(loopback_gateway: tuple[InstalledGateway, int], synapse: Any) -> None:
    gateway, port = loopback_gateway
    username = "deb" + secrets.token_hex(4)
    password = remember("pw-" + secrets.token_hex(12))

    registered = coap_cbor(port, "post", "register", {"username": username, "password": password})
    assert registered.code == "2.04", registered
    session = registered.cbor()
    assert {"access_token", "user_id", "device_id"} <= set(session)
    assert session["user_id"].startswith(f"@{username}:")

    logged_in = coap_cbor(port, "post", "login", {"user": username, "password": password})
    assert logged_in.code == "2.04", logged_in
    token = remember(logged_in.cbor()["access_token"])

    room_id = synapse.create_room(token)
    text = "hello from the installed package " + secrets.token_hex(4)
    sent = coap_cbor(port, "post", "send",
                     {"room_id": room_id, "txn_id": secrets.token_hex(8), "msgtype": "m.text", "body": text},
                     token=token)
    assert sent.code == "2.04", sent
    bodies = [event["content"]["body"] for event in synapse.text_messages(token, room_id)]
    assert text in bodies
    gateway.assert_running()


def test_installed_gateway_serves_coaps_with_a_psk(installed_comatrix: DebBuild, synapse: Any,
                                                  tmp_path: Path) -> None:
    """A device provisioned with the installed ``comatrixctl`` sends over coaps (Debian's python3
    and libssl3, nothing compiled), as the operator would do it."""
    device = synapse.make_user("debdtls")
    room_id = synapse.create_room(device.access_token)
    name = "deb-" + secrets.token_hex(3)
    password_file = tmp_path / "password"
    password_file.write_text(device.password)
    password_file.chmod(0o600)
    printed = run(["/usr/bin/comatrixctl", "device", "add", name, "--psk", "--user", device.user_id,
                   "--password-file", str(password_file)]).stdout
    entry_file = Path("/etc/comatrix/devices.d") / f"{name}.toml"
    mode = entry_file.stat()
    assert (stat.S_IMODE(mode.st_mode), mode.st_uid, grp.getgrgid(mode.st_gid).gr_name) == (0o640, 0, "comatrix")
    psk = remember(re.search(r"^  psk            (\S+)$", printed, re.M).group(1))  # type: ignore[union-attr]
    assert f'#define COMATRIX_PSK_IDENTITY "{name}"' in printed and device.password not in printed
    assert name in run(["/usr/bin/comatrixctl", "device", "list"]).stdout
    port, dtls_port = free_port("::1", kind=socket.SOCK_DGRAM), free_port("::1", kind=socket.SOCK_DGRAM)
    gateway = InstalledGateway(tmp_path / "gateway.log", ["--ip", "::1", "--port", str(port), "--dtls-port",
                                                         str(dtls_port), "--homeserver", synapse.base_url])
    try:
        def coaps(method: str, path: str, **kwargs: Any) -> CoapResult:
            return libcoap(method, f"coaps://[::1]:{dtls_port}/{path}", client="coap-client-openssl",
                           extra_args=["-u", name, "-k", psk], **kwargs)

        def answers() -> bool:
            gateway.assert_running()
            try:
                return coaps("get", "time", timeout=2).ok
            except CoapNoResponse:
                return False
        poll(answers, READY_TIMEOUT, what="the installed gateway to answer GET /time over coaps")
        text = "over coaps from the installed package " + secrets.token_hex(4)
        sent = coaps("post", "send", content_format=CONTENT_FORMAT_CBOR,
                     payload=cbor2.dumps({"room_id": room_id, "body": text}))
        assert sent.code == "2.04", sent
        latest = synapse.text_messages(device.access_token, room_id, limit=1)[0]
        assert (latest["sender"], latest["content"]["body"]) == (device.user_id, text)
        assert f"identity {name}, PSK-AES128-CCM8" in gateway.log()
        # The packaged default (security = "required"): plain CoAP gets no further than /time.
        plain = coap_cbor(port, "post", "send", {"room_id": room_id, "body": "plain"}, token=device.access_token)
        assert (plain.code, plain.payload) == ("4.01", b"security required")
    finally:
        gateway.stop()
        run(["/usr/bin/comatrixctl", "device", "remove", name])
    assert not entry_file.exists()


# --- link-local bind on lowpan0 in network namespaces -----------------------------------

@pytest.fixture
def lowpan_namespaces() -> Iterator[tuple[str, str]]:
    """(gateway netns, client netns) joined by a veth pair: ``lowpan0`` <-> ``cl0``.

    lowpan0 gets no automatic address (addrgenmode none), so the test decides when
    its fe80:: address appears; the client side gets fe80::2 without DAD.
    """
    suffix = f"{os.getpid()}-{secrets.token_hex(2)}"
    gw, cl = f"cmx-gw-{suffix}", f"cmx-cl-{suffix}"
    try:
        for command in (["ip", "netns", "add", gw], ["ip", "netns", "add", cl],
                        ["ip", "-n", gw, "link", "add", "lowpan0", "type", "veth", "peer", "name", "cl0",
                         "netns", cl],
                        ["ip", "-n", gw, "link", "set", "lowpan0", "addrgenmode", "none"],
                        ["ip", "-n", cl, "link", "set", "cl0", "addrgenmode", "none"],
                        ["ip", "-n", gw, "link", "set", "lo", "up"],
                        ["ip", "-n", gw, "link", "set", "lowpan0", "up"],
                        ["ip", "-n", cl, "link", "set", "cl0", "up"],
                        ["ip", "-n", cl, "addr", "add", "fe80::2/64", "dev", "cl0", "nodad"]):
            run(command)  # fails (never skips) when namespaces cannot be made
        yield gw, cl
    finally:
        for namespace in (gw, cl):
            run(["ip", "netns", "del", namespace], check=False)


@pytest.mark.netns
def test_default_config_binds_lowpan0_link_local_when_it_appears(
        installed_comatrix: DebBuild, lowpan_namespaces: tuple[str, str], tmp_path: Path) -> None:
    gw, cl = lowpan_namespaces
    # The shipped default config, untouched: interface = "lowpan0", port 5683.
    gateway = InstalledGateway(tmp_path / "gateway-netns.log", netns=gw)
    try:
        # Let the gateway get going while lowpan0 has no address at all: it must wait,
        # not fail. Its first output line (the wait notice) shows it reached that point.
        def started() -> str:
            gateway.assert_running()
            return gateway.log().strip()

        poll(started, 20, what="the gateway to start and wait for lowpan0")
        # The scenario itself: the address shows up a few seconds after the start
        # (a deliberate delay, not a readiness wait).
        time.sleep(3)
        gateway.assert_running()
        # With DAD on (the default), the address is tentative for about a second first.
        run(["ip", "-n", gw, "addr", "add", "fe80::1/64", "dev", "lowpan0"])
        def answer_from_link_local() -> str | None:
            gateway.assert_running()
            return netns_time(cl, "coap://[fe80::1%cl0]:5683/time")

        answer = poll(answer_from_link_local, READY_TIMEOUT, what="a CoAP answer from fe80::1%lowpan0")
        assert abs(int(answer) - time.time()) < 3600
        gateway.assert_running()
        assert "fe80::1%lowpan0" in gateway.log()
    finally:
        gateway.stop()


# --- upgrade, remove, purge (last: it uninstalls) ---------------------------------------

def test_upgrade_keeps_edits_remove_keeps_config_purge_removes_all(
        installed_comatrix: DebBuild, deb_upgrade_build: DebBuild) -> None:
    conffile = Path(CONFIG)
    edited = conffile.read_text() + "\n# local edit kept across upgrades\n"
    conffile.write_text(edited)
    fragment = Path("/etc/comatrix/conf.d/50-local.toml")
    fragment.write_text('homeserver = "https://matrix.example.org"\n')
    credentials = CREDENTIALS.read_text() + "\n# local credentials\n"
    CREDENTIALS.write_text(credentials)
    state = STATE_DIR / "state-probe"
    state.write_text("kept")

    apt_get("install", *(str(deb) for deb in deb_upgrade_build.debs))
    version = run(["dpkg-query", "-W", "-f=${Version}", "comatrix"]).stdout
    assert version.endswith("+upgradetest1")
    assert conffile.read_text() == edited
    assert fragment.exists() and state.read_text() == "kept"
    assert CREDENTIALS.read_text() == credentials
    assert mode_owner(CREDENTIALS) == (0o640, "root", "comatrix")

    files = [path for path in package_files("comatrix") + package_files("python3-txthings")
             if not path.is_dir()]
    apt_get("remove", "comatrix", "python3-txthings")
    assert not installed("comatrix")
    assert conffile.read_text() == edited and fragment.exists()
    assert CREDENTIALS.exists() and state.exists() and user_exists("comatrix")
    assert b"comatrix_plugin" not in (SITE / "twisted/plugins/dropin.cache").read_bytes()

    purge_all()
    assert run(["dpkg-query", "-W", "comatrix"], check=False).returncode != 0
    for path in (Path("/etc/comatrix"), STATE_DIR, SITE / "comatrix", SITE / "txthings"):
        assert not path.exists(), f"{path} left after purge"
    assert not user_exists("comatrix") and not group_exists("comatrix")
    left = [path for path in files if path.exists() or path.is_symlink()]
    assert not left, f"left after purge: {left}"
