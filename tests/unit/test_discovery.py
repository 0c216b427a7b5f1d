"""Plugin discovery (built-ins, drop-in directories, disabling) and site construction."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import task
from zope.interface.verify import verifyObject

from comatrix.coap.resource import CoapResource
from comatrix.config import build_config
from comatrix.credentials import Credentials
from comatrix.discovery import PluginError, build_site, builtin_plugins, check_plugins, discover, dropin_plugins
from comatrix.compact.codec import PATHS
from comatrix.errors import error_response
from comatrix.interfaces import IResourcePlugin, PluginContext
from comatrix.plugins import accounts, clock, msc3079, rooms
from comatrix.plugins.operations import METHOD_OPERATIONS
from comatrix.resources import ResourcePlugin
from comatrix.matrix.client import MatrixClient
from comatrix.matrix.testing import FakeHomeserver, stub_transport

REPO = Path(__file__).resolve().parents[2]
ORIGINAL = {"register", "login", "logout", "join", "getmsg", "send", "time"}
COMPACT = {f"compact-{op}" for op in PATHS}  # one plugin per compact operation
CLEAN = {name for name, _method in METHOD_OPERATIONS}  # issue 13's clean form, one plugin per resource
BUILTIN_NAMES = ORIGINAL | COMPACT | CLEAN | {"msc3079"}


def make_context() -> PluginContext:
    config = build_config()
    clock = task.Clock()
    transport, _ = stub_transport(FakeHomeserver(), reactor=clock)
    matrix = MatrixClient(transport, reactor=clock)
    return PluginContext(config=config, matrix=matrix, credentials=Credentials((), matrix), state={},
                         reactor=clock)


def test_builtins_are_found_and_honour_the_interface() -> None:
    plugins = builtin_plugins()
    assert {plugin.name for plugin in plugins} == BUILTIN_NAMES
    for plugin in plugins:
        assert verifyObject(IResourcePlugin, plugin)


def test_site_from_an_explicit_list() -> None:
    plugins = [rooms.send, clock.time]
    site = build_site(plugins, make_context(), error_response)
    served = dict(site.resources())
    assert set(served) >= {("send",), ("time",)} and ("login",) not in served
    assert all(isinstance(resource, CoapResource) for resource in served.values())


def test_disabled_plugins_are_not_served() -> None:
    names = {plugin.name for plugin in discover(disabled=["register", "msc3079", "nonexistent"])}
    assert names == BUILTIN_NAMES - {"register", "msc3079"}


def test_multi_path_plugin_serves_all_its_paths() -> None:
    site = build_site([msc3079.msc3079], make_context(), error_response)
    served = {path for path, _ in site.resources()}
    assert served == set(msc3079.msc3079.paths)
    assert {("_matrix",), ("9",), ("7",), ("_matrix", "client", "v3", "sync")} <= served
    assert len(served) > 50


def test_multi_path_clash_is_refused() -> None:
    with pytest.raises(PluginError, match="both serve /9"):
        check_plugins([msc3079.msc3079, ResourcePlugin("nine", ("9",), clock.TimeResource)])


def test_dropin_directory(tmp_path: Path) -> None:
    (tmp_path / "sensor.py").write_text((REPO / "examples" / "plugins" / "sensor.py").read_text())
    (tmp_path / "broken.py").write_text("raise RuntimeError('broken plugin file')\n")
    (tmp_path / "notes.txt").write_text("not python")
    found = dropin_plugins(str(tmp_path))
    assert [plugin.name for plugin in found] == ["sensor"]
    verifyObject(IResourcePlugin, found[0])
    assert "sensor" in {plugin.name for plugin in discover([str(tmp_path)])}


def test_missing_dropin_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match="does not exist"):
        dropin_plugins(str(tmp_path / "nope"))


def test_clashing_names_and_paths_are_refused() -> None:
    with pytest.raises(PluginError, match="two plugins are named"):
        check_plugins([rooms.send, ResourcePlugin("send", ("other",), rooms.SendResource)])
    with pytest.raises(PluginError, match="both serve /login"):
        check_plugins([accounts.login, ResourcePlugin("login2", ("login",), accounts.LoginResource)])
    with pytest.raises(PluginError, match="reserved"):
        check_plugins([ResourcePlugin("core", (".well-known", "core"), clock.TimeResource)])
