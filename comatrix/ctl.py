"""``comatrixctl``: the gateway's admin tool -- provisioning devices with key material.

It reads the same config as the daemon (``--config PATH``, default
``/etc/comatrix/comatrix.toml``).  Each provisioned device is one file
``devices.d/NAME.toml`` beside that config, holding one ``[[devices]]`` entry
(mode 0640, group ``comatrix`` when that group exists, as the credentials
file), so adding, rotating and removing a device never rewrites a file an
operator edits by hand.  Key material comes from the OS CSPRNG (`secrets`).

::

    comatrixctl device add sensor01 --psk --user @sensor01:example.org --password-file -
    comatrixctl device add sensor02 --oscore --user @sensor02:example.org --password-file pw.txt
    comatrixctl device add sensor03 --edhoc --user @sensor03:example.org --password-file pw.txt
    comatrixctl device list
    comatrixctl device rotate sensor01
    comatrixctl device remove sensor02

In application-service mode (``[appservice]`` in the config) a device needs no
Matrix account of its own: ``device add NAME`` (without ``--user``) creates
``@<prefix>NAME:<server>`` through the application service and sets its display
name; ``--address ADDR|PREFIX`` binds it to a source address for plain CoAP
(a security context binds it otherwise); ``device remove`` deactivates the
user.  ``appservice generate`` writes the registration the homeserver loads::

    comatrixctl appservice generate --url http://127.0.0.1:8010 -o /etc/comatrix/appservice.yaml
    comatrixctl device add sensor01 --address fe80::1234

``doctor`` checks a deployment (`comatrix.doctor`), one ``OK``/``WARN``/``FAIL``
line per check; ``e2ee status`` shows a device user's end-to-end encryption keys,
sessions and backup state (`comatrix.e2ee.status`); ``register-user`` creates a Matrix account through Synapse's
shared-secret registration (`comatrix.register`)::

    comatrixctl doctor
    comatrixctl e2ee status sensor01
    comatrixctl register-user sensor01 --shared-secret-file /etc/matrix-synapse/registration_shared_secret

``add`` and ``rotate`` print what the firmware needs (identity, key, gateway
address and port) as text and as a C header.  The running gateway picks the
change up on SIGHUP (``systemctl reload comatrix``).

With ``--edhoc`` the entry holds only the device's *public* credential (a CCS);
the device's private key is printed once and kept nowhere.  The gateway's own
EDHOC key pair lives in ``state_dir`` (made here, or by the gateway, on first
use; 0600, owned by the service user) and its credential is printed too.
"""

from __future__ import annotations

import argparse
import dataclasses
import grp
import ipaddress
import json
import os
import re
import secrets
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from comatrix.config import (DEFAULT_DTLS_PORT, DEVICES_DIR, Config, ConfigError, DeviceCredentials,
                             build_config, inviter_patterns, read_config_files)
from comatrix.edhoc.ccs import generate_key, make_ccs, parse_ccs, private_bytes
from comatrix.edhoc.responder import KEY_FILENAME, GatewayKey
from comatrix.e2ee import status as e2ee_status
from comatrix.e2ee.vault import read_states
from comatrix.appservice.admin import AdminError, appservice_homeserver
from comatrix.appservice.registration import DEFAULT_ID, DEFAULT_PREFIX, generate
from comatrix.netif import read_link_local_address
from comatrix import doctor
from comatrix.register import RegisterError, new_password, register_user

__all__ = ["main", "DEVICES_DIR", "DeviceFile", "render_toml_entry", "render_c_header"]

DEFAULT_CONFIG = "/etc/comatrix/comatrix.toml"
#: Group that may read secrets (the service's); files stay root-owned.
SERVICE_GROUP = "comatrix"
#: The service user, owner of what lives in state_dir (the gateway's EDHOC key).
SERVICE_USER = "comatrix"
FILE_MODE = 0o640

#: Key sizes: a PSK of 16 random bytes written as 22 URL-safe characters (128 bits, as
#: RFC 7925 §4.2 asks; text, so ``coap-client-openssl -k`` and firmware take it as it is),
#: an OSCORE master secret of 16 bytes and salt of 8 (RFC 8613 §3.1, its test vectors' sizes).
PSK_BYTES = 16
OSCORE_SECRET_BYTES = 16
OSCORE_SALT_BYTES = 8

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class CtlError(Exception):
    """Something the operator must fix; printed as one line, exit status 1."""


@dataclasses.dataclass
class DeviceFile:
    """One ``devices.d/NAME.toml``: its path and its single ``[[devices]]`` entry."""

    path: Path
    entry: dict[str, Any] = dataclasses.field(repr=False)  # holds passwords and keys

    @property
    def name(self) -> str:
        return str(self.entry.get("name") or self.path.stem)

    def kinds(self) -> list[str]:
        found = []
        if "psk_identity" in self.entry:
            found.append("psk")
        if "oscore" in self.entry:
            found.append("oscore")
        if "edhoc" in self.entry:
            found.append("edhoc")
        return found


@dataclasses.dataclass(frozen=True)
class EdhocMaterial:
    """What an EDHOC device needs besides its entry: its private key (printed, never stored)."""

    private_key: bytes = dataclasses.field(repr=False)
    gateway_credential: bytes


# ------------------------------------------------------------------ pure rendering

def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is JSON's string syntax
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {_toml_value(item)}" for key, item in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def render_toml_entry(entry: dict[str, Any]) -> str:
    """The file text for one provisioned device (read back with `tomllib`)."""
    lines = ["# Written by comatrixctl; holds secrets: keep it 0640 root:comatrix.",
             "[[devices]]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in entry.items()]
    return "\n".join(lines) + "\n"


def _c_bytes(raw: bytes) -> str:
    return "{ " + ", ".join(f"0x{byte:02x}" for byte in raw) + " }" if raw else "{ 0 }"


def _c_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def render_c_header(name: str, entry: dict[str, Any], gateway: str, port: int, dtls_port: int,
                    edhoc: EdhocMaterial | None = None) -> str:
    """A C header with everything the firmware of ``name`` needs to reach the gateway."""
    guard = f"COMATRIX_DEVICE_{_c_name(name)}_H"
    lines = [f"/* CoMatrix device {name}: generated by comatrixctl. Holds secrets. */",
             f"#ifndef {guard}", f"#define {guard}", "",
             f'#define COMATRIX_GATEWAY_ADDR "{gateway}"',
             f"#define COMATRIX_GATEWAY_PORT {port}"]
    if "psk_identity" in entry:
        psk = psk_bytes(entry)
        lines += ["", "/* CoAP over DTLS 1.2, PSK (TLS_PSK_WITH_AES_128_CCM_8) */",
                  f"#define COMATRIX_DTLS_PORT {dtls_port}",
                  f'#define COMATRIX_PSK_IDENTITY "{entry["psk_identity"]}"',
                  f"#define COMATRIX_PSK_KEY {_c_bytes(psk)}",
                  f"#define COMATRIX_PSK_KEY_LEN {len(psk)}"]
    if "oscore" in entry:
        oscore = entry["oscore"]
        # The device's sender id is the id the gateway receives with (recipient_id), and back.
        device_sender, device_recipient = (bytes.fromhex(oscore["recipient_id"]),
                                           bytes.fromhex(oscore["sender_id"]))
        secret, salt = bytes.fromhex(oscore["master_secret"]), bytes.fromhex(oscore["master_salt"])
        lines += ["", "/* OSCORE (RFC 8613), AES-CCM-16-64-128, HKDF-SHA-256, on the CoAP port */",
                  f"#define COMATRIX_OSCORE_SENDER_ID {_c_bytes(device_sender)}",
                  f"#define COMATRIX_OSCORE_SENDER_ID_LEN {len(device_sender)}",
                  f"#define COMATRIX_OSCORE_RECIPIENT_ID {_c_bytes(device_recipient)}",
                  f"#define COMATRIX_OSCORE_RECIPIENT_ID_LEN {len(device_recipient)}",
                  f"#define COMATRIX_OSCORE_MASTER_SECRET {_c_bytes(secret)}",
                  f"#define COMATRIX_OSCORE_MASTER_SECRET_LEN {len(secret)}",
                  f"#define COMATRIX_OSCORE_MASTER_SALT {_c_bytes(salt)}",
                  f"#define COMATRIX_OSCORE_MASTER_SALT_LEN {len(salt)}"]
    if "edhoc" in entry and edhoc is not None:
        credential = bytes.fromhex(entry["edhoc"]["credential"])
        lines += ["", "/* EDHOC (RFC 9528) method 3, cipher suite 2, credentials by CCS; then OSCORE */",
                  f"#define COMATRIX_EDHOC_PRIVATE_KEY {_c_bytes(edhoc.private_key)}",
                  f"#define COMATRIX_EDHOC_CRED_I {_c_bytes(credential)}",
                  f"#define COMATRIX_EDHOC_CRED_I_LEN {len(credential)}",
                  f"#define COMATRIX_EDHOC_KID_I {_c_bytes(parse_ccs(credential).kid)}",
                  f"#define COMATRIX_EDHOC_CRED_R {_c_bytes(edhoc.gateway_credential)}",
                  f"#define COMATRIX_EDHOC_CRED_R_LEN {len(edhoc.gateway_credential)}"]
    lines += ["", f"#endif /* {guard} */"]
    return "\n".join(lines) + "\n"


def render_text(name: str, entry: dict[str, Any], gateway: str, port: int, dtls_port: int,
                edhoc: EdhocMaterial | None = None) -> str:
    lines = [f"device {name}", f"  gateway        {gateway}"]
    if "psk_identity" in entry:
        lines += [f"  coaps          port {dtls_port}",
                  f"  psk identity   {entry['psk_identity']}",
                  f"  psk            {entry['psk']}" if "psk" in entry else "  psk            (binary)",
                  f"  psk (hex)      {psk_bytes(entry).hex()}"]
    if "oscore" in entry:
        oscore = entry["oscore"]
        lines += [f"  oscore         port {port}",
                  f"  sender id      {oscore['recipient_id'] or '(empty)'}   (the device's)",
                  f"  recipient id   {oscore['sender_id'] or '(empty)'}   (the gateway's)",
                  f"  master secret  {oscore['master_secret']}",
                  f"  master salt    {oscore['master_salt']}"]
    if "edhoc" in entry and edhoc is not None:
        lines += [f"  edhoc          POST coap://[gateway]:{port}/.well-known/edhoc (method 3, suite 2)",
                  f"  private key    {edhoc.private_key.hex()}   (the device's P-256 d; kept nowhere else)",
                  f"  credential     {entry['edhoc']['credential']}   (CRED_I, CCS)",
                  f"  gateway cred   {edhoc.gateway_credential.hex()}   (CRED_R, CCS)"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ key material

def new_psk() -> dict[str, str]:
    return {"psk": secrets.token_urlsafe(PSK_BYTES)}


def psk_bytes(entry: dict[str, Any]) -> bytes:
    return bytes.fromhex(entry["psk_hex"]) if "psk_hex" in entry else str(entry["psk"]).encode("utf-8")


def new_oscore_secrets() -> dict[str, str]:
    return {"master_secret": secrets.token_bytes(OSCORE_SECRET_BYTES).hex(),
            "master_salt": secrets.token_bytes(OSCORE_SALT_BYTES).hex()}


def free_recipient_id(devices: Sequence[DeviceCredentials], gateway_sender_id: str = "") -> str:
    """The shortest OSCORE id no configured device sends with yet (1 byte for 256 devices).

    ``devices`` are all the gateway's entries (config, credentials file, devices.d):
    an id taken anywhere would make the config refuse to load.
    """
    taken = {device.oscore_identity for device in devices}
    for length in (1, 2, 3):
        for number in range(256 ** length):
            candidate = number.to_bytes(length, "big").hex()
            if candidate not in taken and candidate != gateway_sender_id:
                return candidate
    raise CtlError("no free OSCORE recipient id")


def _edhoc_kid(entry: dict[str, Any]) -> bytes | None:
    try:
        return parse_ccs(bytes.fromhex(entry["edhoc"]["credential"])).kid
    except (KeyError, TypeError, ValueError):
        return None


def free_edhoc_kid(devices: Sequence[DeviceCredentials]) -> bytes:
    """A kid no configured device's credential has: one byte (a one-byte ID_CRED_I) while they last."""
    taken = {device.edhoc.credential.kid for device in devices if device.edhoc is not None}
    for value in (*range(0x00, 0x18), *range(0x20, 0x38)):
        if bytes((value,)) not in taken:
            return bytes((value,))
    for number in range(256 ** 2):
        if number.to_bytes(2, "big") not in taken:
            return number.to_bytes(2, "big")
    raise CtlError("no free EDHOC kid")


def new_edhoc_key(name: str, kid: bytes) -> tuple[dict[str, str], bytes]:
    """(the entry's edhoc table, the device's private key) for a fresh P-256 key pair."""
    key = generate_key()
    return {"credential": make_ccs(key.public_key(), kid, name).encoded.hex()}, private_bytes(key)


def gateway_edhoc_key(config: Config) -> GatewayKey:
    """The gateway's EDHOC key from state_dir, made (0600, the service user's) if it is not there yet."""
    if config.state_dir is None:
        raise CtlError("EDHOC needs state_dir in the config: the gateway's key pair is kept there")
    path = Path(config.state_dir) / KEY_FILENAME
    existed = path.exists()
    Path(config.state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    key = GatewayKey.load_or_create(config.state_dir)
    if not existed and os.geteuid() == 0:
        try:
            import pwd
            user = pwd.getpwnam(SERVICE_USER)
            os.chown(path, user.pw_uid, user.pw_gid)
        except KeyError:
            pass  # no service user (a checkout, not the package)
    return key


# ------------------------------------------------------------------ files

def devices_dir(config_path: Path) -> Path:
    return config_path.parent / DEVICES_DIR


def read_devices(directory: Path) -> list[DeviceFile]:
    found = []
    for path in sorted(directory.glob("*.toml")) if directory.is_dir() else []:
        try:
            with open(path, "rb") as handle:
                entries = tomllib.load(handle).get("devices", [])
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise CtlError(f"cannot read {path}: {exc}") from None
        if len(entries) != 1 or not isinstance(entries[0], dict):
            raise CtlError(f"{path}: expected exactly one [[devices]] entry")
        found.append(DeviceFile(path, entries[0]))
    return found


def _give_to_service_group(descriptor: int, *, close: bool = True) -> None:
    """root:comatrix, so the service (group comatrix) can read what root wrote."""
    try:
        if os.geteuid() == 0:
            try:
                os.fchown(descriptor, 0, grp.getgrnam(SERVICE_GROUP).gr_gid)
            except KeyError:
                pass  # no service group on this machine (a checkout, not the package)
    finally:
        if close:
            os.close(descriptor)


def write_device_file(path: Path, entry: dict[str, Any]) -> None:
    """Write atomically (temp file + rename) with the credentials file's owner and mode."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o750, parents=True)
        _give_to_service_group(os.open(path.parent, os.O_RDONLY))
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        os.fchmod(handle, FILE_MODE)
        _give_to_service_group(handle, close=False)
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(render_toml_entry(entry))
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


# ------------------------------------------------------------------ commands

def _read_secret(source: str, stdin: TextIO) -> str:
    text = stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    secret = text.strip()
    if not secret:
        raise CtlError(f"{'standard input' if source == '-' else source} is empty")
    return secret


def _gateway_address(config: Config) -> str:
    if config.interface:
        found = read_link_local_address(config.interface)
        return found or f"fe80::…%{config.interface} (not up yet)"
    try:
        if ipaddress.ip_address(config.ip.split("%", 1)[0]).is_unspecified:
            return "(any address of this host; ip is unspecified)"
    except ValueError:
        pass
    return config.ip


def _find(devices: Sequence[DeviceFile], name: str) -> DeviceFile:
    for device in devices:
        if device.name == name:
            return device
    raise CtlError(f"no device named {name}")


def _print_material(out: TextIO, name: str, entry: dict[str, Any], config: Config,
                    edhoc: EdhocMaterial | None = None) -> None:
    gateway = _gateway_address(config)
    dtls_port = config.dtls_port or DEFAULT_DTLS_PORT
    out.write(render_text(name, entry, gateway, config.port, dtls_port, edhoc))
    out.write("\n")
    out.write(render_c_header(name, entry, gateway, config.port, dtls_port, edhoc))
    out.write("\nThen: systemctl reload comatrix\n")


def cmd_add(args: argparse.Namespace, config: Config, directory: Path, out: TextIO, stdin: TextIO) -> None:
    if not _NAME.fullmatch(args.name):
        raise CtlError("NAME must be 1-64 characters A-Z a-z 0-9 . _ - (not starting with . _ -)")
    devices = read_devices(directory)
    if any(device.name == args.name for device in devices):
        raise CtlError(f"a device named {args.name} exists already (rotate or remove it)")
    # What the operator typed is checked before the homeserver is asked to create anything.
    bound: dict[str, Any] = {}
    if args.allow_invites_from:
        bound["allow_invites_from"] = list(inviter_patterns(args.allow_invites_from, "--allow-invites-from"))
    if args.address:
        try:
            bound["address"] = str(ipaddress.ip_network(args.address.split("%", 1)[0], strict=False))
        except ValueError:
            raise CtlError("--address must be an IP address or prefix") from None
    entry: dict[str, Any] = {"name": args.name}
    if args.user is None:
        entry["user"] = appservice_homeserver(config).create_device_user(args.name)
        entry["appservice"] = True
        out.write(f"created {entry['user']} through the application service\n")
    else:
        entry["user"] = args.user
        if args.password_file:
            entry["password"] = _read_secret(args.password_file, stdin)
        elif args.access_token_file:
            entry["access_token"] = _read_secret(args.access_token_file, stdin)
        else:
            raise CtlError("--user needs --password-file or --access-token-file")
    entry.update(bound)
    if args.psk:
        entry["psk_identity"] = args.name
        entry.update(new_psk())
    if args.oscore:
        entry["oscore"] = {"recipient_id": free_recipient_id(config.devices), "sender_id": "",
                           **new_oscore_secrets()}
    edhoc = None
    if args.edhoc:
        gateway_key = gateway_edhoc_key(config)
        entry["edhoc"], private_key = new_edhoc_key(args.name, free_edhoc_kid(config.devices))
        edhoc = EdhocMaterial(private_key, gateway_key.credential.encoded)
    write_device_file(directory / f"{args.name}.toml", entry)
    _print_material(out, args.name, entry, config, edhoc)


def cmd_rotate(args: argparse.Namespace, config: Config, directory: Path, out: TextIO, stdin: TextIO) -> None:
    device = _find(read_devices(directory), args.name)
    entry = dict(device.entry)
    if "psk_identity" in entry:
        entry.pop("psk_hex", None)
        entry.update(new_psk())
    if "oscore" in entry:
        entry["oscore"] = {**entry["oscore"], **new_oscore_secrets()}
    edhoc = None
    if "edhoc" in entry:
        kid = _edhoc_kid(entry) or free_edhoc_kid(config.devices)
        entry["edhoc"], private_key = new_edhoc_key(args.name, kid)
        edhoc = EdhocMaterial(private_key, gateway_edhoc_key(config).credential.encoded)
    if not device.kinds():
        raise CtlError(f"{args.name} has no key material to rotate")
    write_device_file(device.path, entry)
    _print_material(out, args.name, entry, config, edhoc)


def cmd_remove(args: argparse.Namespace, config: Config, directory: Path, out: TextIO, stdin: TextIO) -> None:
    device = _find(read_devices(directory), args.name)
    if device.entry.get("appservice"):
        user = str(device.entry["user"])
        appservice_homeserver(config).deactivate(user)
        out.write(f"deactivated {user}\n")
    device.path.unlink()
    out.write(f"removed {args.name} ({device.path})\nThen: systemctl reload comatrix\n")


def cmd_list(args: argparse.Namespace, config: Config, directory: Path, out: TextIO, stdin: TextIO) -> None:
    devices = read_devices(directory)
    if not devices:
        out.write(f"no provisioned devices in {directory}\n")
        return
    out.write(f"{'NAME':<20} {'SECURITY':<12} {'IDENTITY':<20} USER\n")
    for device in devices:
        entry = device.entry
        kid = _edhoc_kid(entry) if "edhoc" in entry else None
        identity = entry.get("psk_identity") or (entry["oscore"]["recipient_id"] if "oscore" in entry else
                                                 f"kid {kid.hex()}" if kid is not None else "-")
        out.write(f"{device.name:<20} {'+'.join(device.kinds()) or '-':<12} {identity:<20} "
                  f"{entry.get('user', '-')}\n")


def cmd_e2ee_status(args: argparse.Namespace, config: Config, directory: Path, out: TextIO,
                    stdin: TextIO) -> None:
    """Keys, sessions and backup state of a device user (a provisioned NAME, or a user id)."""
    if args.name.startswith("@"):
        user = args.name
    else:
        user = _find(read_devices(directory), args.name).entry.get("user") or ""
        if not user:
            raise CtlError(f"{args.name} has no Matrix user")
    if config.state_dir is None:
        raise CtlError("no state_dir in the config: E2EE state is kept in the gateway's memory only")
    try:
        states = read_states(config.state_dir)
    except ValueError as error:
        raise CtlError(str(error)) from None
    out.write(e2ee_status.describe(str(user), states))


def cmd_appservice_generate(args: argparse.Namespace, config: Config, directory: Path, out: TextIO,
                            stdin: TextIO) -> None:
    try:
        registration = generate(args.url, id=args.id, prefix=args.prefix)
    except ValueError as exc:
        raise CtlError(str(exc)) from None
    text = registration.to_yaml()
    if args.output in (None, "-"):
        out.write(text)
        return
    path = Path(args.output)
    if path.exists():
        raise CtlError(f"{path} exists already: the tokens in it are in use (remove it first to replace them)")
    write_durably_private(path, text)
    out.write(f"wrote {path} (id {registration.id}, users {registration.user_regex})\n"
              f"Then: add it to the homeserver's app_service_config_files, restart the homeserver, and set\n"
              f"  [appservice]\n  registration = \"{path}\"\n"
              f"in the gateway's config.\n")


def write_durably_private(path: Path, text: str) -> None:
    """A new file that only its owner (and the service group) may read, written whole or not at all."""
    handle, temporary = tempfile.mkstemp(dir=path.parent or Path("."), prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, FILE_MODE)
        _give_to_service_group(handle, close=False)
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def cmd_register_user(args: argparse.Namespace, config: Config, directory: Path, out: TextIO,
                      stdin: TextIO) -> None:
    secret = _read_secret(args.shared_secret_file, stdin)
    generated = args.password_file is None
    password = new_password() if generated else _read_secret(args.password_file, stdin)
    user_id = register_user(config.homeserver, secret, args.name, password, admin=args.admin)
    out.write(f"{user_id}\n")
    if generated:
        out.write(f"password {password}\n")


Command = Callable[[argparse.Namespace, Config, Path, TextIO, TextIO], None]


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="comatrixctl", description="CoMatrix gateway administration.")
    top.add_argument("--config", default=DEFAULT_CONFIG, help=f"the gateway's config [{DEFAULT_CONFIG}]")
    groups = top.add_subparsers(dest="group", required=True)
    device = groups.add_parser("device", help="provision devices (key material for DTLS / OSCORE / EDHOC)")
    actions = device.add_subparsers(dest="action", required=True)

    add = actions.add_parser("add", help="provision a new device and print its firmware settings")
    add.add_argument("name")
    kinds = add.add_argument_group("security (one or more)")
    kinds.add_argument("--psk", action="store_true", help="DTLS 1.2 PSK (identity = NAME)")
    kinds.add_argument("--oscore", action="store_true", help="OSCORE master secret and ids")
    kinds.add_argument("--edhoc", action="store_true",
                       help="EDHOC key pair (P-256): OSCORE keys agreed at run time, no shared secret")
    add.add_argument("--user", help="the Matrix user the device acts as (without it, in appservice mode: "
                     "@<prefix>NAME, created through the application service)")
    add.add_argument("--allow-invites-from", metavar="USER|*:SERVER", action="append",
                     help="who may invite the device's user, repeatable [users of its own server]")
    add.add_argument("--address", metavar="ADDR|PREFIX", help="bind the device to this source address "
                     "or prefix for plain CoAP")
    secret = add.add_mutually_exclusive_group()
    secret.add_argument("--password-file", metavar="FILE", help="the user's password ('-': stdin)")
    secret.add_argument("--access-token-file", metavar="FILE", help="an access token ('-': stdin)")
    add.set_defaults(run=cmd_add)

    for name, run, text in (("rotate", cmd_rotate, "new key material, same identity"),
                            ("remove", cmd_remove, "delete a provisioned device")):
        action = actions.add_parser(name, help=text)
        action.add_argument("name")
        action.set_defaults(run=run)
    actions.add_parser("list", help="provisioned devices (no secrets)").set_defaults(run=cmd_list)

    appservice = groups.add_parser("appservice", help="application-service mode")
    appservice_actions = appservice.add_subparsers(dest="action", required=True)
    generate_parser = appservice_actions.add_parser(
        "generate", help="write the registration file for the homeserver's app_service_config_files")
    generate_parser.add_argument("--url", required=True,
                                 help="where the homeserver reaches the gateway ([appservice] bind and port)")
    generate_parser.add_argument("--id", default=DEFAULT_ID, help=f"the application service's id [{DEFAULT_ID}]")
    generate_parser.add_argument("--prefix", default=DEFAULT_PREFIX,
                                 help=f"device users are @<prefix>NAME [{DEFAULT_PREFIX}]")
    generate_parser.add_argument("-o", "--output", metavar="FILE", help="write here (0640) instead of stdout")
    generate_parser.set_defaults(run=cmd_appservice_generate)

    e2ee = groups.add_parser("e2ee", help="end-to-end encryption done by the gateway for device users")
    e2ee_actions = e2ee.add_subparsers(dest="action", required=True)
    status = e2ee_actions.add_parser("status", help="a device user's keys, sessions and backup state (no secrets)")
    status.add_argument("name", help="a provisioned device's NAME, or a Matrix user id")
    status.set_defaults(run=cmd_e2ee_status)

    groups.add_parser("doctor", help="check the deployment: one OK/WARN/FAIL line per check, "
                      "exit status 1 on any FAIL")
    register = groups.add_parser("register-user", help="create a Matrix account through Synapse's "
                                 "shared-secret registration (/_synapse/admin/v1/register)")
    register.add_argument("name", help="the new user's localpart (sensor01) or user id")
    register.add_argument("--admin", action="store_true", help="a server admin")
    register.add_argument("--password-file", metavar="FILE",
                          help="the password ('-': stdin) [generated and printed once]")
    register.add_argument("--shared-secret-file", metavar="FILE", required=True,
                          help="a file holding Synapse's registration_shared_secret (and nothing else)")
    register.set_defaults(run=cmd_register_user)
    return top


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout, stdin: TextIO = sys.stdin) -> int:
    args = parser().parse_args(argv)
    if args.group == "device" and args.action == "add" and not (args.psk or args.oscore or args.edhoc
                                                                 or args.address):
        print("comatrixctl: device add needs --psk, --oscore, --edhoc and/or --address", file=sys.stderr)
        return 2
    config_path = Path(args.config)
    if args.group == "doctor":
        return doctor.run(config_path, out)
    if args.group == "register-user" and args.password_file == "-" and args.shared_secret_file == "-":
        print("comatrixctl: only one of --password-file and --shared-secret-file can be stdin", file=sys.stderr)
        return 2
    try:
        if args.group == "appservice":
            # Generating the registration needs no config: it comes before the config names it.
            args.run(args, Config(), devices_dir(config_path), out, stdin)
            return 0
        config = build_config(read_config_files(config_path))
        run: Command = args.run
        run(args, config, devices_dir(config_path), out, stdin)
    except (CtlError, ConfigError, AdminError, RegisterError) as exc:
        print(f"comatrixctl: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"comatrixctl: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
