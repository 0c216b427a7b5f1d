"""Real third-party CoAP clients for integration tests: libcoap's CLI and aiocoap.

Neither client was written here, which is the point: the gateway must interoperate with
what devices and developers really use.

* :func:`libcoap` runs ``coap-client-notls`` (Debian ``libcoap3-bin``). The response code
  is read from libcoap's own message trace (``-v 6`` prints every PDU sent and received
  on stdout as ``v:1 t:ACK c:2.05 i:<mid> {<token>} [ options ] :: payload``); a 2.xx
  body comes from ``-o FILE`` (exact bytes, block-wise reassembled). libcoap writes
  4.xx/5.xx bodies only to stderr with non-printables replaced, so those are taken from
  the trace instead, which is exact: printable ASCII is quoted, anything else is
  dumped as hex. libcoap exits 0 even when nothing answered, so "no response" is
  detected as "no response PDU in the trace" and raised as :class:`CoapNoResponse`.
* :func:`aiocoap_request` uses aiocoap's client API in a dedicated thread running its own
  event loop, so it can be called from plain tests and (through ``deferToThread``) from
  pytest-twisted tests without touching the reactor.
* :func:`aiocoap_client_cli` runs the ``aiocoap-client`` console script.

Both request helpers are blocking. Never call them on the reactor thread while the
server under test runs in the same process: use ``twisted.internet.threads.deferToThread``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

from support import REPO_ROOT
from support.secrets import remember_if_plausible

__all__ = [
    "CoapClientMissing",
    "CoapNoResponse",
    "CoapResult",
    "LibcoapPdu",
    "OptionValue",
    "aiocoap_client_cli",
    "aiocoap_request",
    "encode_option_value",
    "harvest_secrets",
    "libcoap",
]

LIBCOAP_CLIENT = "coap-client-notls"

#: An option value as tests like to write it: raw bytes, text (UTF-8) or a uint.
OptionValue = Union[bytes, str, int]


class CoapClientMissing(RuntimeError):
    """A CoAP client program is not installed: a setup problem that must fail the test."""


class CoapNoResponse(Exception):
    """The client gave up without receiving any response."""

    def __init__(self, message: str, stdout: str = "", stderr: str = "") -> None:
        super().__init__(message)
        self.stdout = stdout
        self.stderr = stderr


@dataclass(frozen=True)
class LibcoapPdu:
    """One PDU line of libcoap's ``-v 6`` trace (sent or received)."""

    mtype: str  # CON, NON, ACK, RST
    code: str  # "GET", "2.05", "0.00", ...
    mid: int
    token: bytes
    options: str  # libcoap's rendering, e.g. "Content-Format:application/cbor, Max-Age:60"
    payload: bytes

    @property
    def is_response(self) -> bool:
        return bool(re.fullmatch(r"[2-5]\.\d\d", self.code))


@dataclass(frozen=True)
class CoapResult:
    """The final response of one exchange, whichever client produced it."""

    code: str  # dotted, e.g. "2.05"
    payload: bytes
    content_format: int | None = None
    max_age: int | None = None
    #: Every option of the final response as (number, raw value) — aiocoap only.
    options: tuple[tuple[int, bytes], ...] = ()
    #: Every response PDU libcoap saw (block-wise parts, Observe notifications) — libcoap only.
    responses: tuple[LibcoapPdu, ...] = ()
    stdout: str = field(default="", repr=False)
    stderr: str = field(default="", repr=False)

    @property
    def code_class(self) -> int:
        return int(self.code.split(".")[0])

    @property
    def ok(self) -> bool:
        return self.code_class == 2

    def text(self) -> str:
        return self.payload.decode("utf-8")

    def cbor(self) -> Any:
        import cbor2

        return cbor2.loads(self.payload)

    def option(self, number: int) -> list[bytes]:
        return [value for num, value in self.options if num == number]


def encode_option_value(value: OptionValue) -> bytes:
    """bytes as is, str as UTF-8, int as a minimal big-endian uint (RFC 7252 §3.2)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, int) and value >= 0:
        return value.to_bytes((value.bit_length() + 7) // 8, "big")
    raise TypeError(f"unsupported CoAP option value {value!r}")


# Matrix keys whose values are secrets, by name and by MSC3079 integer key (facts §3).
_SECRET_KEYS: frozenset[object] = frozenset({"access_token", "password", "token", 73, 69, 70})
_TOKEN_OPTION = 256
_HARVEST_DEPTH = 8


def _harvest_cbor(payload: bytes) -> None:
    if not payload:
        return
    try:
        import cbor2

        decoded = cbor2.loads(payload)
    except Exception:  # not CBOR (or not only CBOR): nothing to harvest
        return
    _harvest_value(decoded, 0)


def _harvest_value(value: object, depth: int) -> None:
    if depth > _HARVEST_DEPTH:
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if key in _SECRET_KEYS:
                remember_if_plausible(item)
            _harvest_value(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _harvest_value(item, depth + 1)


def harvest_secrets(payload: bytes, options: Iterable[tuple[int, bytes]] = ()) -> None:
    """Remember tokens and passwords seen in CoAP traffic so the log sweep looks for them.

    Tests need not register what went through these clients: the token option (256,
    with or without "Bearer ") and CBOR maps keyed access_token/password/token (or
    their MSC3079 integer keys) are recorded automatically.
    """
    for number, value in options:
        if number == _TOKEN_OPTION:
            remember_if_plausible(value[7:] if value.startswith(b"Bearer ") else value)
    _harvest_cbor(payload)


# -- libcoap -------------------------------------------------------------------------

# libcoap 4.3's display names for the formats we use (coap_debug.c); others print as numbers.
_LIBCOAP_FORMAT_NAMES = {
    "text/plain": 0,
    "text/plain; charset=utf-8": 0,
    "application/link-format": 40,
    "application/xml": 41,
    "application/octet-stream": 42,
    "application/exi": 47,
    "application/json": 50,
    "application/cbor": 60,
    "application/cwt": 61,
    "application/senml+json": 110,
    "application/senml+cbor": 112,
}

_PDU_LINE = re.compile(
    r"^v:1 t:(?P<type>CON|NON|ACK|RST) c:(?P<code>\S+) i:(?P<mid>[0-9a-fA-F]+) "
    r"\{(?P<token>[0-9a-fA-F]*)\} \[ ?(?P<options>.*?) ?\](?: :: (?P<payload>.*))?$"
)
_BINARY_HEADER = re.compile(r"^binary data length (\d+)$")
_HEX_DUMP = re.compile(r"^<<([0-9a-fA-F]*)>>$")


def _parse_trace(stdout: str) -> list[LibcoapPdu]:
    lines = stdout.splitlines()
    pdus: list[LibcoapPdu] = []
    for index, line in enumerate(lines):
        match = _PDU_LINE.match(line)
        if not match:
            continue
        shown = match.group("payload")
        payload = b""
        if shown is not None:
            binary = _BINARY_HEADER.match(shown)
            if binary:
                hex_line = lines[index + 1] if index + 1 < len(lines) else ""
                dump = _HEX_DUMP.match(hex_line)
                if dump is None:
                    raise AssertionError(f"cannot read libcoap's hex dump after {line!r}")
                payload = bytes.fromhex(dump.group(1))
                if len(payload) != int(binary.group(1)):
                    raise AssertionError(f"libcoap's hex dump is truncated after {line!r}")
            elif len(shown) >= 2 and shown[0] == shown[-1] == "'":
                payload = shown[1:-1].encode("ascii")
            else:
                raise AssertionError(f"unexpected libcoap payload rendering in {line!r}")
        pdus.append(
            LibcoapPdu(
                mtype=match.group("type"),
                code=match.group("code"),
                mid=int(match.group("mid"), 16),
                token=bytes.fromhex(match.group("token")),
                options=match.group("options"),
                payload=payload,
            )
        )
    return pdus


def _content_format(options: str) -> int | None:
    match = re.search(r"(?:^|, )Content-Format:(.*?)(?=, [A-Z0-9][\w-]*:|$)", options)
    if not match:
        return None
    shown = match.group(1)
    if shown in _LIBCOAP_FORMAT_NAMES:
        return _LIBCOAP_FORMAT_NAMES[shown]
    if shown.isdigit():
        return int(shown)
    raise AssertionError(f"unknown libcoap Content-Format rendering {shown!r}")


def _max_age(options: str) -> int | None:
    match = re.search(r"(?:^|, )Max-Age:(\d+)", options)
    return int(match.group(1)) if match else None


def libcoap_path(client: str = LIBCOAP_CLIENT) -> str:
    path = shutil.which(client)
    if path is None:
        raise CoapClientMissing(
            f"{client} not found: install Debian's libcoap3-bin (scripts/setup does)"
        )
    return path


def libcoap(
    method: str,
    uri: str,
    *,
    payload: bytes | None = None,
    content_format: int | None = None,
    options: Iterable[tuple[int, OptionValue]] = (),
    accept: int | None = None,
    non: bool = False,
    block_size: int | None = None,
    observe_seconds: int | None = None,
    timeout: float = 10,
    extra_args: Sequence[str] = (),
    client: str = LIBCOAP_CLIENT,
) -> CoapResult:
    """One request with ``coap-client-notls`` (or ``client``); returns the final response.

    ``options`` go out as ``-O num,0x<hex>`` so any bytes survive. With
    ``observe_seconds`` libcoap observes for that long; ``responses`` then holds every
    notification and ``payload`` the last one. Raises :class:`CoapNoResponse` when
    nothing answered within ``timeout`` (libcoap's ``-B``).
    """
    exe = libcoap_path(client)
    encoded = [(number, encode_option_value(value)) for number, value in options]
    harvest_secrets(payload or b"", encoded)
    wait = int(timeout + (observe_seconds or 0) + 0.999)
    with tempfile.TemporaryDirectory(prefix="libcoap-") as tmp:
        out_file = Path(tmp) / "response.bin"
        args = [exe, "-v", "6", "-B", str(wait), "-m", method.lower(), "-o", str(out_file)]
        if payload is not None:
            in_file = Path(tmp) / "request.bin"
            in_file.write_bytes(payload)
            args += ["-f", str(in_file)]
        if content_format is not None:
            args += ["-t", str(content_format)]
        if accept is not None:
            args += ["-A", str(accept)]
        for number, raw in encoded:
            # An empty hex string makes libcoap send a zero-length option.
            args += ["-O", f"{number},0x{raw.hex()}"]
        if non:
            args.append("-N")
        if block_size is not None:
            args += ["-b", str(block_size)]
        if observe_seconds is not None:
            args += ["-s", str(observe_seconds)]
        args += list(extra_args)
        args.append(uri)
        try:
            proc = subprocess.run(
                args, stdin=subprocess.DEVNULL, capture_output=True, timeout=wait + 10,
            )
        except subprocess.TimeoutExpired as exc:
            raise CoapNoResponse(
                f"{client} did not exit within {wait + 10}s",
                _text(exc.stdout), _text(exc.stderr),
            ) from None
        stdout, stderr = _text(proc.stdout), _text(proc.stderr)
        if proc.returncode != 0:
            raise AssertionError(
                f"{client} failed with exit code {proc.returncode}: {stderr[-2000:]}"
            )
        responses = tuple(pdu for pdu in _parse_trace(stdout) if pdu.is_response)
        if not responses:
            raise CoapNoResponse(
                f"no response to {method.upper()} {uri} within {wait}s", stdout, stderr
            )
        final = responses[-1]
        if final.code.startswith("2.") and observe_seconds is None:
            body = out_file.read_bytes() if out_file.exists() else b""
        else:
            body = final.payload
        harvest_secrets(body)
        return CoapResult(
            code=final.code,
            payload=body,
            content_format=_content_format(final.options),
            max_age=_max_age(final.options),
            responses=responses,
            stdout=stdout,
            stderr=stderr,
        )


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode("utf-8", "replace")


# -- aiocoap -------------------------------------------------------------------------


async def _aiocoap_exchange(
    method: str,
    uri: str,
    payload: bytes,
    content_format: int | None,
    options: list[tuple[int, bytes]],
    accept: int | None,
    non: bool,
    timeout: float,
) -> CoapResult:
    import aiocoap
    from aiocoap import error as aiocoap_error
    from aiocoap.optiontypes import OpaqueOption

    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        message_kind: dict[str, Any]
        if hasattr(aiocoap, "Unreliable"):  # aiocoap >= 0.4.8 deprecates mtype=
            message_kind = {"transport_tuning": aiocoap.Unreliable if non else aiocoap.Reliable}
        else:
            message_kind = {"mtype": aiocoap.NON if non else aiocoap.CON}
        request = aiocoap.Message(
            code=aiocoap.numbers.codes.Code[method.upper()],
            uri=uri,
            payload=payload,
            **message_kind,
        )
        if content_format is not None:
            request.opt.content_format = content_format
        if accept is not None:
            request.opt.accept = accept
        for number, value in options:
            # Opaque works for any number, including ones aiocoap knows nothing about.
            request.opt.add_option(OpaqueOption(number, value))
        try:
            response = await asyncio.wait_for(context.request(request).response, timeout)
        except (asyncio.TimeoutError, aiocoap_error.NetworkError) as exc:
            raise CoapNoResponse(
                f"no response to {method.upper()} {uri}: {type(exc).__name__}: {exc}"
            ) from None
        cf = response.opt.content_format
        harvest_secrets(bytes(response.payload))
        return CoapResult(
            code=response.code.dotted,
            payload=bytes(response.payload),
            content_format=None if cf is None else int(cf),
            max_age=response.opt.max_age,
            options=tuple(
                (int(opt.number), bytes(opt.encode())) for opt in response.opt.option_list()
            ),
        )
    finally:
        await context.shutdown()


def aiocoap_request(
    method: str,
    uri: str,
    *,
    payload: bytes = b"",
    content_format: int | None = None,
    options: Iterable[tuple[int, OptionValue]] = (),
    accept: int | None = None,
    non: bool = False,
    timeout: float = 10,
) -> CoapResult:
    """One request through aiocoap's client API, on a fresh thread and event loop.

    Block-wise transfer is aiocoap's automatic one. Raises :class:`CoapNoResponse` when
    nothing answers within ``timeout``.
    """
    encoded = [(number, encode_option_value(value)) for number, value in options]
    harvest_secrets(payload, encoded)

    def run() -> CoapResult:
        return asyncio.run(
            _aiocoap_exchange(
                method, uri, payload, content_format, encoded, accept, non, timeout
            )
        )

    # A thread of our own: the caller's thread may already run an event loop.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run).result(timeout + 30)


def aiocoap_client_cli(
    args: Sequence[str], *, timeout: float = 30, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run the ``aiocoap-client`` console script of the project venv with ``args``."""
    exe = REPO_ROOT / ".venv" / "bin" / "aiocoap-client"
    if not exe.exists():
        raise CoapClientMissing(f"{exe} not found: run scripts/setup (aiocoap is a test extra)")
    return subprocess.run(
        [str(exe), *args],
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
    )
