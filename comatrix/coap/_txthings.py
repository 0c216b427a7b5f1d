"""The one place that imports txThings, with its import-time noise silenced.

txThings 0.3.0 compares with ``is`` against literals, which Python 3.8+
reports as ``SyntaxWarning`` whenever the module is compiled (facts §7.15).
Importing it here, under a warnings filter, keeps that noise (and a
``-W error`` interpreter) away from CoMatrix.  Everything else in
``comatrix.coap`` imports txThings through this module.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", SyntaxWarning)
    import txthings.coap as txcoap
    import txthings.resource as txresource

__all__ = ["txcoap", "txresource"]
