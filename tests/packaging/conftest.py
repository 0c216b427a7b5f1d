"""pytest setup for the Debian package tests (tests/packaging/test_deb.py).

Registers the ``packaging`` marker: those tests build and install the .deb as
root, take minutes and change the machine (they purge what they install).
Select or deselect them with ``-m packaging`` / ``-m "not packaging"``.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "packaging: builds/installs the Debian package as root (slow: minutes, changes the machine)")
