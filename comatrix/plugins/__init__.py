"""Built-in CoMatrix resources, each a plugin found by ``twisted.plugin.getPlugins``.

Nothing outside this package imports these modules: the gateway discovers them.
"""
