"""README's walk-through, pasted into a fresh shell against the real ``scripts/demo`` (issue 17).

The test starts ``scripts/demo`` as a newcomer does (it runs ``scripts/setup``, starts
its own Synapse, registers its users, makes and shares its room, starts the gateway),
only with its state in a temporary directory and on free ports.  It then takes the
``.. code-block:: shell`` blocks of README's "First steps" section, after the
``.. walk-through:`` comment, and runs them in order in one ``bash`` with a clean
environment (``env -i``, no profile or rc files), in a directory holding only the
demo's ``.demo`` and the checkout's ``.venv`` -- what "a second terminal in the
checkout" offers.  Each group of ``#>`` lines is what the commands since the previous
group print: every one must match a line of that output (``*`` matches anything), and
every command must succeed (``set -e -o pipefail``).  The demo's progress lines are
checked on the way.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from support.gateway import coap_probe

REPO = Path(__file__).resolve().parents[2]
#: Sections with a `MARKER`: each one's blocks after it run, in README order, in one shell.
SECTIONS = ("First steps: a walk-through", "Resources", "The compact device profile: one frame per operation",
            "Native MSC3079 (low-bandwidth Matrix clients)", "Services on the border router: the HTTP API")
MARKER = ".. walk-through:"
STEP = "@@walk-through step {}@@"
#: Bounds: the demo's start after setup (Synapse, bcrypt registrations, three comatrixctl
#: provisions) and the walk-through itself.
DEMO_START_TIMEOUT = 240
WALK_TIMEOUT = 180


@dataclasses.dataclass
class Step:
    """Shell lines, and the lines their output must contain (patterns, ``*`` a wildcard)."""

    lines: list[str] = dataclasses.field(default_factory=list)
    expected: list[str] = dataclasses.field(default_factory=list)


def _is_title(lines: list[str], index: int) -> bool:
    return bool(lines[index].strip()) and index + 1 < len(lines) and set(lines[index + 1] or "x") == {"="}


def marked_regions(readme: str) -> dict[str, list[str]]:
    """Section title -> its lines from its `MARKER` line to the section's end, in README order."""
    lines = readme.splitlines()
    regions: dict[str, list[str]] = {}
    for start, line in enumerate(lines):
        if not line.startswith(MARKER):
            continue
        title = next(lines[index] for index in range(start, -1, -1) if _is_title(lines, index))
        end = next((index for index in range(start + 1, len(lines)) if _is_title(lines, index)), len(lines))
        regions[title] = lines[start:end]
    return regions


def shell_blocks(lines: list[str]) -> list[list[str]]:
    """The ``.. code-block:: shell`` blocks of ``lines``, dedented."""
    blocks: list[list[str]] = []
    index = 0
    while index < len(lines):
        if lines[index].strip() != ".. code-block:: shell":
            index += 1
            continue
        index += 1
        block: list[str] = []
        while index < len(lines) and (not lines[index].strip() or lines[index].startswith("    ")):
            block.append(lines[index][4:])
            index += 1
        while block and not block[-1].strip():
            block.pop()
        blocks.append(block)
    return blocks


def steps(blocks: list[list[str]]) -> list[Step]:
    """Split the blocks at each group of ``#>`` lines."""
    found = [Step()]
    for line in (line for block in blocks for line in block):
        if line.lstrip().startswith("#>"):
            found[-1].expected.append(line.lstrip()[2:].strip())
        else:
            if found[-1].expected:
                found.append(Step())
            found[-1].lines.append(line)
    return found


def script(walk: list[Step]) -> str:
    body = ["exec 2>&1", "set -e -o pipefail"]
    for number, step in enumerate(walk):
        body += step.lines
        body.append(f"echo '{STEP.format(number)}'")
    return "\n".join(body) + "\n"


def matches(pattern: str, line: str) -> bool:
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, line.strip()) is not None


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
        probe.bind(("::1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclasses.dataclass
class Demo:
    place: Path
    port: int
    process: subprocess.Popen[str]
    errors: Path


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    """``scripts/demo`` running with its ``.demo`` in ``tmp_path`` (the walk-through's directory)."""
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    port, dtls_port = free_udp_port(), free_udp_port()
    env = dict(os.environ, COMATRIX_DEMO_DIR=str(tmp_path / ".demo"), COMATRIX_DEMO_IP="::1",
               COMATRIX_DEMO_PORT=str(port), COMATRIX_DEMO_DTLS_PORT=str(dtls_port),
               COMATRIX_DEMO_HTTP_PORT=str(free_tcp_port()))
    errors = tmp_path / "demo.stderr"
    with open(tmp_path / "demo.stdout", "w") as out, open(errors, "w") as err:
        process = subprocess.Popen(["bash", str(REPO / "scripts" / "demo")], env=env, stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=err, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + DEMO_START_TIMEOUT
        while coap_probe("::1", port) is None:
            assert process.poll() is None, f"scripts/demo exited:\n{errors.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"scripts/demo not ready:\n{errors.read_text()[-3000:]}"
            time.sleep(0.5)
        yield Demo(tmp_path, port, process, errors)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # the demo stops its gateway, then Synapse
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # its own process group (start_new_session)
                process.wait(timeout=10)


def test_the_readme_walk_through_runs_as_written(demo: Demo) -> None:
    progress = demo.errors.read_text()
    for number in range(1, 7):
        assert f"demo: step {number} of 6: " in progress
    assert "the first run takes about 2 minutes" in progress
    assert "setup: step 3 of 3: " in progress

    regions = marked_regions((REPO / "README.rst").read_text())
    assert tuple(regions) == SECTIONS
    walk = steps([block for region in regions.values() for block in shell_blocks(region)])
    assert len(walk) >= 8 and all(step.lines for step in walk)
    home = demo.place / "home"
    home.mkdir()
    clean = {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "TERM": "dumb"}
    result = subprocess.run(["env", "-i", *(f"{key}={value}" for key, value in clean.items()),
                             "bash", "--noprofile", "--norc"], input=script(walk), cwd=demo.place,
                            capture_output=True, text=True, timeout=WALK_TIMEOUT)
    chunks = re.split(r"@@walk-through step \d+@@\n", result.stdout)
    assert result.returncode == 0 and len(chunks) == len(walk) + 1, result.stdout + result.stderr
    for step, chunk in zip(walk, chunks):
        for pattern in step.expected:
            assert any(matches(pattern, line) for line in chunk.splitlines()), (
                f"after\n{chr(10).join(step.lines)}\nexpected {pattern!r} in:\n{chunk}")
    assert not re.search(r"^[45]\.\d\d ", result.stdout, re.MULTILINE), result.stdout  # no CoAP error

    # The operator's check of the same deployment: every line OK or WARN, exit status 0.
    doctor = subprocess.run([str(REPO / ".venv" / "bin" / "comatrixctl"), "--config",
                             str(demo.place / ".demo" / "comatrix.toml"), "doctor"],
                            capture_output=True, text=True, timeout=120)
    assert doctor.returncode == 0 and "FAIL" not in doctor.stdout, doctor.stdout + doctor.stderr
    for name in ("config", "homeserver", "service demo-service", "coap port", "http api", "state dir"):
        assert re.search(rf"^OK +{name}", doctor.stdout, re.MULTILINE), doctor.stdout
