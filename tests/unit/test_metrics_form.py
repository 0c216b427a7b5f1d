"""The ``form`` and ``resource`` labels: one small derivation each, bounded whatever the path."""

from __future__ import annotations

import pytest

from comatrix.codec.msc3079 import PATH_CODES
from comatrix.compact.codec import PATHS as COMPACT_PATHS
from comatrix.metrics import UNROUTED, Routes, request_form


@pytest.mark.parametrize("path, proxy_uri, form", [
    (("send",), True, "original"),            # the original CoMatrix form: Proxy-Uri set
    (("rooms", "!r:hs", "send"), False, "clean"),
    (("time",), False, "clean"),
    ((".well-known", "core"), False, "clean"),
    ((), False, "clean"),
    (("w",), False, "compact"),
    (("+",), False, "compact"),
    (("9", "!r:hs", "m.room.message", "t1"), False, "msc3079"),
    (("_matrix", "client", "v3", "sync"), False, "msc3079"),
    (("0",), False, "msc3079"),
])
def test_the_form_follows_the_path_and_the_proxy_uri(path: tuple[str, ...], proxy_uri: bool, form: str) -> None:
    assert request_form(path, proxy_uri) == form


def test_every_compact_path_and_every_path_code_has_its_form() -> None:
    assert {request_form((segment,), False) for segment in COMPACT_PATHS.values()} == {"compact"}
    assert {request_form((code,), False) for code in PATH_CODES
            if code not in COMPACT_PATHS.values()} == {"msc3079"}


class _Subtree:
    subtree = True


def test_resource_labels_are_the_served_paths_never_the_raw_ones() -> None:
    routes = Routes([(("_matrix",), _Subtree()), (("9",), _Subtree()), (("send",), object()),
                     (("_matrix", "client", "v3", "sync"), object())])
    assert routes.template(("send",)) == "/send"
    assert routes.template(("9", "!room:hs", "m.room.message", "txn")) == "/9"
    assert routes.template(("_matrix", "client", "v3", "rooms", "!r:hs", "messages")) == "/_matrix"
    assert routes.template(("_matrix", "client", "v3", "sync")) == "/_matrix/client/v3/sync"
    assert routes.template((".well-known", "core")) == "/.well-known/core"
    # Not a subtree: a longer path is no resource of it; an unknown path is no label value.
    assert routes.template(("send", "extra")) == UNROUTED
    assert routes.template(("!room:hs",)) == UNROUTED
