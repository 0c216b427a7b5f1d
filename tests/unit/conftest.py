"""Fixtures of the unit tests."""

from __future__ import annotations

from typing import Any, Iterator

import pytest


@pytest.fixture
def made_stores(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every `Store` that `comatrix.tap.makeService` makes during the test, closed afterwards
    (each owns a database thread that would outlive the test)."""
    from comatrix import tap

    stores: list[Any] = []
    for_state_dir = tap.Store.for_state_dir

    def recorded(state_dir: str | None, reactor: Any = None, shared: bool = False) -> Any:
        stores.append(for_state_dir(state_dir, reactor, shared))
        return stores[-1]

    monkeypatch.setattr(tap.Store, "for_state_dir", recorded)
    yield stores
    for store in stores:
        store.close()
