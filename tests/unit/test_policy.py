"""comatrix.policy: the operation table covers every path served, the config that feeds it,
and the two rules (registration switch, least privilege for shared credentials) on the
original resources through the real CoAP layer against the in-memory homeserver."""

from __future__ import annotations

import ast
from typing import Any

import cbor2
import pytest
from twisted.logger import globalLogPublisher

from comatrix.coap.message import Request
from comatrix.coap.numbers import Code, ContentFormat, OptionNumber
from comatrix.coap.testing import Harness
from comatrix.codec.msc3079 import PATH_CODES
from comatrix.config import ConfigError, build_config, load_toml
from comatrix.discovery import build_site, builtin_plugins
from comatrix.errors import error_response
from comatrix.msc3079.service import operation_of
from comatrix.msc3079.translate import map_path
from comatrix.plugins import accounts, rooms
from comatrix.plugins.msc3079 import Msc3079Plugin
from comatrix.policy import (CATEGORIES, CODE_OPERATIONS, DEVICE, FULL_PATHS, OPERATIONS, PLUGIN,
                             REGISTRATION, expand_allow, operation_for)
from comatrix.resources import MatrixResource
from comatrix.tap import Options, log_policy
from support import REPO_ROOT
from support.world import World

SENSOR = ("2001:db8::5", 5683)


def sample(template: tuple[str, ...]) -> tuple[str, ...]:
    """The path parameters of ``template`` filled with plausible values."""
    return tuple("!room" if s == "{roomId}" else "x1" for s in template if s.startswith("{"))


def coap_request(method: str, path: tuple[str, ...]) -> Request:
    return Request(method=Code[method], path=path)


# -- the table ---------------------------------------------------------------------------------

def test_every_path_code_is_classified_and_every_name_is_in_the_table() -> None:
    assert set(CODE_OPERATIONS) == set(PATH_CODES)  # a new path code needs a line in the policy
    named = {op for pair in CODE_OPERATIONS.values() for op in pair}
    named |= {op for _prefix, get, write in FULL_PATHS for op in (get, write)}
    assert named <= set(OPERATIONS)
    assert {DEVICE, REGISTRATION, "other"} <= CATEGORIES


def test_a_name_that_is_both_a_category_and_an_operation_means_the_same() -> None:
    for name in CATEGORIES & set(OPERATIONS):
        assert [op for op, category in OPERATIONS.items() if category == name] == [name]


@pytest.mark.parametrize("route", Msc3079Plugin.paths)
@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_every_msc3079_route_and_its_full_paths_are_classified_alike(route: tuple[str, ...], method: str) -> None:
    """Each route the gateway serves maps to the code's operation, by code and by r0/v3 full path."""
    if route == ("_matrix",):
        return  # the subtree of full paths: each code's full paths are checked below
    full_sync = route[:2] == ("_matrix", "client")
    code = "7" if full_sync else route[0]
    template = PATH_CODES[code]
    expected = CODE_OPERATIONS[code][0 if method == "GET" else 1]
    forms = [route if full_sync else (code,) + sample(template)]
    if code != "0":
        forms += [("_matrix", "client", version) + _filled(template) for version in ("r0", "v3")]
    for path in forms:
        target = map_path(path)
        assert operation_of(coap_request(method, path), target) == expected, path


def _filled(template: tuple[str, ...]) -> tuple[str, ...]:
    params = iter(sample(template))
    return tuple(next(params) if s.startswith("{") else s for s in template)


@pytest.mark.parametrize("path, method, expected", [
    (("4",), "POST", "register"),
    (("_matrix", "client", "r0", "register"), "POST", "register"),
    (("_matrix", "client", "v3", "register"), "POST", "register"),
    (("_matrix", "client", "unstable", "register"), "POST", "register"),
    (("_matrix", "client", "v3", "register", "available"), "GET", "register"),
    (("_matrix", "client", "v1", "register", "m.login.registration_token", "validity"), "GET", "register"),
    (("_matrix", "client", "v3", "logout", "all"), "POST", "logout/all"),
    (("_matrix", "client", "r0", "logout", "all"), "POST", "logout/all"),
    (("l",), "POST", "pushers/set"),
    (("_matrix", "client", "v3", "pushers", "set"), "POST", "pushers/set"),
    (("_matrix", "client", "v3", "user", "@d:hs", "openid", "request_token"), "POST", "openid"),
    (("_matrix", "client", "v3", "account", "password"), "POST", "password"),
    (("_matrix", "client", "v3", "account", "3pid", "add"), "POST", "3pid"),
    (("_matrix", "client", "v3", "account", "whoami"), "GET", "whoami"),
    (("_matrix", "client", "v3", "rooms", "!r", "upgrade"), "POST", "room_upgrade"),
    (("_matrix", "client", "v3", "rooms", "!r", "state", "m.room.name"), "GET", "state"),
    (("_matrix", "client", "v3", "rooms", "!r", "state", "m.room.name"), "PUT", "state/set"),
    (("_matrix", "client", "v3", "keys", "device_signing", "upload"), "POST", "cross_signing"),
    (("_matrix", "client", "v3", "pushrules", "global", "override", "x"), "PUT", "pushrules/set"),
    (("_matrix", "client", "v3", "admin", "whois", "@d:hs"), "GET", "admin"),
    (("_matrix", "client", "v1", "rooms", "!r", "hierarchy"), "GET", "other"),
    (("9", "!r", "m.room.message", "t1"), "PUT", "send"),
    (("8", "!r", "m.room.topic", "k"), "GET", "state"),
    (("8", "!r", "m.room.topic", "k"), "PUT", "state/set"),
    (("H", "#a:hs"), "GET", "alias"),
    (("H", "#a:hs"), "DELETE", "alias/set"),
    (("7",), "GET", "sync"),
    (("0",), "GET", "versions"),
])
def test_paths_map_to_their_operation(path: tuple[str, ...], method: str, expected: str) -> None:
    assert operation_of(coap_request(method, path), map_path(path)) == expected


def test_unknown_full_paths_are_other_and_not_a_device_operation() -> None:
    assert operation_for("GET", None, ("something", "new")) == "other"
    assert OPERATIONS["other"] != DEVICE


def test_built_in_resources_name_their_operation() -> None:
    builtin_plugins()  # imports every built-in resource module

    def subclasses(cls: type) -> list[type]:
        return [sub for direct in cls.__subclasses__() for sub in [direct] + subclasses(direct)]

    built_in = [cls for cls in subclasses(MatrixResource) if cls.__module__.startswith("comatrix.")]
    assert len(built_in) >= 10
    for cls in built_in:
        assert cls.operation in OPERATIONS and cls.operation != PLUGIN, cls  # type: ignore[attr-defined]


def test_allow_names_expand_to_operations() -> None:
    assert expand_allow(["push"]) == {"pushers", "pushers/set", "pushrules", "pushrules/set", "notifications"}
    assert expand_allow(["logout/all", "openid"]) == {"logout/all", "openid"}
    assert expand_allow([]) == frozenset()
    for bad, words in (("pushers/sett", "unknown operation or category 'pushers/sett'"),
                       ("register", "allow_registration"), ("registration", "allow_registration")):
        with pytest.raises(ValueError, match=words):
            expand_allow([bad])


# -- config ------------------------------------------------------------------------------------

def test_registration_is_closed_unless_switched_on() -> None:
    assert build_config().allow_registration is False
    assert build_config({"allow_registration": True}).allow_registration is True
    with pytest.raises(ConfigError, match="allow_registration must be true or false"):
        build_config({"allow_registration": "yes"})
    options = Options()
    options.parseOptions(["--allow-registration"])
    assert build_config({}, options.cli_values()).allow_registration is True
    options = Options()
    options.parseOptions([])
    assert build_config({"allow_registration": True}, options.cli_values()).allow_registration is True


def test_the_packaged_config_keeps_registration_closed() -> None:
    values = load_toml(REPO_ROOT / "packaging" / "etc" / "comatrix" / "comatrix.toml")
    assert values["allow_registration"] is False
    values.pop("credentials_file")  # an /etc path; the file is checked by the package tests
    assert build_config(values).allow_registration is False


def _entry(**extra: Any) -> dict[str, Any]:
    return {"devices": [{"address": "2001:db8::/64", "user": "u", "password": "p", **extra}]}


def test_device_entries_take_an_allow_list() -> None:
    assert build_config(_entry()).devices[0].allow == frozenset()
    entry = build_config(_entry(allow=["sessions", "pushers/set"])).devices[0]
    assert entry.allow == {"logout", "logout/all", "devices", "devices/set", "delete_devices", "pushers/set"}


@pytest.mark.parametrize("allow, words", [
    (["pushers", "nope"], "devices[0]: allow: unknown operation or category 'nope'"),
    ("push", "allow must be a list"),
    ([7], "allow must be a list"),
    (["register"], "governed by allow_registration"),
])
def test_bad_allow_lists_are_refused(allow: Any, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        build_config(_entry(allow=allow))


def test_start_says_whether_registration_is_open() -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        log_policy(build_config(_entry(allow=["openid"])))
        log_policy(build_config({"allow_registration": True}))
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [(e["log_level"].name, e["log_format"]) for e in events if e.get("log_namespace") == "comatrix"]
    assert lines[0][0] == "info" and "closed" in lines[0][1]
    assert lines[1][0] == "info" and "may also use" in lines[1][1]
    assert lines[2][0] == "warn" and "OPEN" in lines[2][1]


# -- the rules on the original resources ---------------------------------------------------------

class Gateway:
    """The original resources over the real CoAP layer; ``SENSOR`` acts through a [[devices]] entry."""

    def __init__(self, *, allow: list[str] | None = None, allow_registration: bool = False) -> None:
        self.world = World()
        entry = {"address": "2001:db8::/64", "access_token": self.world.token, "allow": allow or []}
        context = self.world.context([entry], allow_registration=allow_registration)
        plugins = [accounts.register, accounts.logout, rooms.send]
        self.harness = Harness(build_site(plugins, context, error_response))

    def post(self, path: str, body: dict[str, Any], token: str | None = None) -> tuple[str, bytes]:
        options = [(int(OptionNumber.CONTENT_FORMAT), bytes([ContentFormat.CBOR]))]
        if token is not None:
            options.append((256, token.encode()))
        [reply] = self.harness.send(Code.POST, (path,), options=options, payload=cbor2.dumps(body), peer=SENSOR)
        return Code(reply.code).dotted(), reply.payload


def test_register_is_refused_before_the_homeserver_while_closed() -> None:
    gw = Gateway()
    assert gw.post("register", {"username": "newdev", "password": "pw2"}) == ("4.03", b"registration closed")
    assert gw.world.homeserver.requests == []
    opened = Gateway(allow_registration=True)
    code, _ = opened.post("register", {"username": "newdev", "password": "pw2"})
    assert code == "2.04" and opened.world.paths()[-1] == ("register",)


def test_shared_credentials_may_send_but_not_log_out_unless_allowed() -> None:
    gw = Gateway()
    code, _ = gw.post("send", {"room_id": gw.world.room, "txn_id": "t1", "body": "21.5 C"})
    assert code == "2.04"
    before = len(gw.world.homeserver.requests)
    assert gw.post("logout", {}) == ("4.03", b"not allowed for shared credentials")
    assert len(gw.world.homeserver.requests) == before
    # Its own token: the full API, from the same address.
    own, _ = gw.world.homeserver.issue_token(gw.world.user_id)
    assert gw.post("logout", {}, token=own)[0] == "2.04"
    allowed = Gateway(allow=["sessions"])
    assert allowed.post("logout", {})[0] == "2.04"
    assert allowed.world.paths()[-1] == ("logout",)


def test_the_readme_allow_examples_parse() -> None:
    lines = [line.strip() for line in (REPO_ROOT / "README.rst").read_text().splitlines()]
    examples = [line for line in lines if line.startswith("allow = [")]
    assert len(examples) >= 2
    for line in examples:
        names = ast.literal_eval(line.split("=", 1)[1].split("#", 1)[0].strip())
        assert build_config(_entry(allow=names)).devices[0].allow
