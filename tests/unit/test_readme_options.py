"""README's option table names every option of ``twistd comatrix`` (issue 17: ``--log-level`` was missing)."""

from __future__ import annotations

from pathlib import Path

from comatrix.tap import Options

README = Path(__file__).resolve().parents[2] / "README.rst"


def option_table() -> str:
    text = README.read_text()
    start = text.index("command line                 config key")
    return text[start:text.index("\n\n", start)]


def test_every_twistd_option_is_in_the_readme_table() -> None:
    table = option_table()
    names = [entry[0] for entry in Options.optParameters + Options.optFlags if entry[0] != "version"]
    assert "log-level" in names
    missing = [name for name in names if f"``--{name}``" not in table]
    assert missing == []
