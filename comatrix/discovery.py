"""Finding resource plugins and building the CoAP site from an explicit list of them.

Discovery (``getPlugins`` over ``comatrix.plugins`` and each drop-in directory)
is kept apart from construction (`build_site`), so tests can build a site from
exactly the plugins they name.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import types
from typing import Iterable, Sequence


from twisted.plugin import IPlugin, getPlugins
from zope.interface.verify import verifyObject

import comatrix.plugins
from comatrix.logs import get_logger
from comatrix.coap.errors import ErrorAdapter
from comatrix.coap.server import Site
from comatrix.interfaces import IMultiPathPlugin, IResourcePlugin, PluginContext

log = get_logger(__name__)


class PluginError(ValueError):
    """Two plugins claim one name or path, or a plugin does not honour the interface."""


def builtin_plugins() -> list[IResourcePlugin]:
    return list(getPlugins(IResourcePlugin, comatrix.plugins))


def dropin_plugins(directory: str) -> list[IResourcePlugin]:
    """Plugins in the ``*.py`` files of ``directory``, by the rule ``getPlugins`` applies.

    A module-level object counts when it provides both ``IPlugin`` and
    `IResourcePlugin`, exactly as for the built-ins.  The files are imported
    directly (as ``comatrix_dropin_<hash>.<name>``, so they cannot shadow an
    installed module) instead of through ``getPlugins`` because that one wants to
    write a ``dropin.cache`` beside them, and a drop-in directory such as
    ``/etc/comatrix/plugins`` is read-only to the service.  A file that fails to
    import is logged and skipped, as getPlugins does.
    """
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise PluginError(f"plugin directory {directory} does not exist")
    prefix = "comatrix_dropin_" + hashlib.sha256(directory.encode()).hexdigest()[:12]
    found: list[IResourcePlugin] = []
    for filename in sorted(os.listdir(directory)):
        stem, extension = os.path.splitext(filename)
        if extension != ".py" or not stem.isidentifier() or stem.startswith("_"):
            continue
        module_name = f"{prefix}.{stem}"
        module = sys.modules.get(module_name)
        if module is None:
            try:
                module = _import_file(module_name, os.path.join(directory, filename))
            except Exception:
                log.failure("Cannot load plugin file {path}", path=os.path.join(directory, filename))
                continue
        found.extend(obj for obj in vars(module).values()
                     if IPlugin.providedBy(obj) and IResourcePlugin.providedBy(obj))
    return found


def _import_file(module_name: str, path: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def discover(plugin_dirs: Iterable[str] = (), disabled: Iterable[str] = ()) -> list[IResourcePlugin]:
    """Built-ins then drop-ins, minus the disabled names, checked for clashes."""
    found = builtin_plugins()
    for directory in plugin_dirs:
        found.extend(dropin_plugins(directory))
    disabled_names = set(disabled)
    selected = [plugin for plugin in found if plugin.name not in disabled_names]
    for name in sorted(disabled_names - {plugin.name for plugin in found}):
        log.warn("disabled_plugins names an unknown plugin: {name}", name=name)
    check_plugins(selected)
    return selected


def plugin_paths(plugin: IResourcePlugin) -> list[tuple[str, ...]]:
    """Every path a plugin serves: ``path``, or ``paths`` for multi-path plugins."""
    if IMultiPathPlugin.providedBy(plugin):
        return [tuple(path) for path in plugin.paths]
    return [tuple(plugin.path)]


def check_plugins(plugins: Sequence[IResourcePlugin]) -> None:
    names: dict[str, IResourcePlugin] = {}
    paths: dict[tuple[str, ...], IResourcePlugin] = {}
    for plugin in plugins:
        verifyObject(IMultiPathPlugin if IMultiPathPlugin.providedBy(plugin) else IResourcePlugin, plugin)
        if not isinstance(plugin.name, str) or not plugin.name:
            raise PluginError(f"plugin {plugin!r} has no name")
        if plugin.name in names:
            raise PluginError(f"two plugins are named {plugin.name}")
        names[plugin.name] = plugin
        for path in plugin_paths(plugin):
            if not path or not all(isinstance(segment, str) and segment for segment in path):
                raise PluginError(f"plugin {plugin.name}: path must be non-empty text segments")
            if path[0] == ".well-known":
                raise PluginError(f"plugin {plugin.name}: /.well-known is reserved")
            if path in paths:
                raise PluginError(f"plugins {paths[path].name} and {plugin.name} both serve /{'/'.join(path)}")
            paths[path] = plugin


def build_site(plugins: Sequence[IResourcePlugin], context: PluginContext,
               error_adapter: ErrorAdapter) -> Site:
    """A site serving each plugin's resource at its path (plus /.well-known/core)."""
    check_plugins(plugins)
    site = Site(error_adapter)
    for plugin in plugins:
        if IMultiPathPlugin.providedBy(plugin):
            routes = dict((tuple(path), resource) for path, resource in plugin.build_routes(context))
            if set(routes) != set(plugin_paths(plugin)):
                raise PluginError(f"plugin {plugin.name}: build_routes does not match its paths")
            for path, resource in routes.items():
                site.put(path, resource)
        else:
            site.put(tuple(plugin.path), plugin.build(context))
    return site
