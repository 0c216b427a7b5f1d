"""The test tree itself: modules that one pytest run can collect together.

pytest imports test modules by their base name (rootdir-relative, no packages), so two
``test_x.py`` in different folders stop the whole run at collection ("import file
mismatch") even though each folder passes on its own.
"""

from __future__ import annotations

import collections
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_no_two_test_modules_share_a_base_name() -> None:
    places = collections.defaultdict(list)
    for module in TESTS.rglob("test_*.py"):
        places[module.name].append(str(module.relative_to(TESTS)))
    assert {name: paths for name, paths in places.items() if len(paths) > 1} == {}
