"""Finding resource plugins and building the CoAP site from an explicit list of them.

Discovery (``getPlugins`` over ``comatrix.plugins`` and each drop-in directory)
is kept apart from construction (`build_site`), so tests can build a site from
exactly the plugins they name.
"""

from __future__ import annotations

import hashlib
import os
import sys
import types
from typing import Iterable, Sequence

from twisted.logger import Logger
from twisted.plugin import getPlugins
from zope.interface.verify import verifyObject

import comatrix.plugins
from comatrix.coap.errors import ErrorAdapter
from comatrix.coap.server import Site
from comatrix.interfaces import IResourcePlugin, PluginContext

log = Logger()


class PluginError(ValueError):
    """Two plugins claim one name or path, or a plugin does not honour the interface."""


def builtin_plugins() -> list[IResourcePlugin]:
    return list(getPlugins(IResourcePlugin, comatrix.plugins))


def dropin_plugins(directory: str) -> list[IResourcePlugin]:
    """Plugins in the ``*.py`` files of ``directory``, found by getPlugins like the built-ins.

    The directory is exposed as a package of its own (named after a hash of its
    path) so that its modules cannot shadow any installed module.
    """
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise PluginError(f"plugin directory {directory} does not exist")
    name = "comatrix_dropin_" + hashlib.sha256(directory.encode()).hexdigest()[:12]
    package = sys.modules.get(name)
    if package is None:
        package = types.ModuleType(name, f"CoMatrix drop-in plugins from {directory}")
        package.__path__ = [directory]
        sys.modules[name] = package
    return list(getPlugins(IResourcePlugin, package))


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


def check_plugins(plugins: Sequence[IResourcePlugin]) -> None:
    names: dict[str, IResourcePlugin] = {}
    paths: dict[tuple[str, ...], IResourcePlugin] = {}
    for plugin in plugins:
        verifyObject(IResourcePlugin, plugin)
        if not isinstance(plugin.name, str) or not plugin.name:
            raise PluginError(f"plugin {plugin!r} has no name")
        path = tuple(plugin.path)
        if not path or not all(isinstance(segment, str) and segment for segment in path):
            raise PluginError(f"plugin {plugin.name}: path must be non-empty text segments")
        if path[0] == ".well-known":
            raise PluginError(f"plugin {plugin.name}: /.well-known is reserved")
        if plugin.name in names:
            raise PluginError(f"two plugins are named {plugin.name}")
        if path in paths:
            raise PluginError(f"plugins {paths[path].name} and {plugin.name} both serve /{'/'.join(path)}")
        names[plugin.name] = plugin
        paths[path] = plugin


def build_site(plugins: Sequence[IResourcePlugin], context: PluginContext,
               error_adapter: ErrorAdapter) -> Site:
    """A site serving each plugin's resource at its path (plus /.well-known/core)."""
    check_plugins(plugins)
    site = Site(error_adapter)
    for plugin in plugins:
        site.put(tuple(plugin.path), plugin.build(context))
    return site
