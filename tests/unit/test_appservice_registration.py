"""The application-service registration (`comatrix.appservice.registration`): made, written, read back.

What Synapse loads and what the gateway reads are the same file: fresh 256-bit
tokens, one exclusive users namespace ``@<escaped prefix>.*``, no rate limit.
A file others may read, a missing key or a namespace of another shape is
refused with a `ConfigError` that names no token.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from comatrix.appservice.registration import (DEFAULT_ID, DEFAULT_PREFIX, Registration, generate,
                                              load_registration)
from comatrix.config import ConfigError


def write(path: Path, document: Any, mode: int = 0o640) -> Path:
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
    path.chmod(mode)
    return path


def token_bytes(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def test_generate_gives_fresh_256_bit_tokens_and_the_exclusive_namespace() -> None:
    first, second = generate("http://127.0.0.1:8010/"), generate("http://127.0.0.1:8010")
    for registration in (first, second):
        assert len(token_bytes(registration.as_token)) == 32 and len(token_bytes(registration.hs_token)) == 32
        assert registration.as_token != registration.hs_token
    assert len({first.as_token, first.hs_token, second.as_token, second.hs_token}) == 4
    assert (first.id, first.prefix, first.sender_localpart) == (DEFAULT_ID, DEFAULT_PREFIX, DEFAULT_ID)
    assert first.url == "http://127.0.0.1:8010"  # the homeserver appends /_matrix/app/v1/...
    assert first.user_regex == "@comatrix_.*"
    assert first.as_token not in repr(first) and first.hs_token not in repr(first)

    document = yaml.safe_load(first.to_yaml())
    assert document == {
        "id": "comatrix", "url": "http://127.0.0.1:8010", "as_token": first.as_token,
        "hs_token": first.hs_token, "sender_localpart": "comatrix",
        "namespaces": {"users": [{"exclusive": True, "regex": "@comatrix_.*"}], "aliases": [], "rooms": []},
        "rate_limited": False,
    }


def test_a_prefix_with_regex_characters_is_escaped_in_the_namespace() -> None:
    registration = generate("https://gw.example", id="pan-7", prefix="pan.7+")
    assert registration.user_regex == r"@pan\.7\+.*" and registration.sender_localpart == "pan-7"
    assert registration.owns("@pan.7+sensor:example.org")
    assert not registration.owns("@panx7+sensor:example.org")  # "." is not a wildcard
    assert not registration.owns("@pan.77sensor:example.org")  # "+" is not a repetition


def test_generate_refuses_what_would_make_a_bad_registration() -> None:
    with pytest.raises(ValueError, match="--url"):
        generate("127.0.0.1:8010")
    for prefix in ("", "Comatrix_", "co matrix", "a" * 33, "comatrix:"):
        with pytest.raises(ValueError, match="--prefix"):
            generate("http://x", prefix=prefix)
    with pytest.raises(ValueError, match="--id"):
        generate("http://x", id="Co Matrix")


def test_to_yaml_round_trips_through_load_registration(tmp_path: Path) -> None:
    registration = generate("http://127.0.0.1:8010", id="gw2", prefix="gw2.dev_")
    loaded = load_registration(write(tmp_path / "as.yaml", registration.to_yaml()))
    assert loaded == registration
    assert (loaded.as_token, loaded.hs_token) == (registration.as_token, registration.hs_token)
    assert loaded.prefix == "gw2.dev_" and loaded.localpart("S1") == "gw2.dev_s1"


def test_owns_and_localpart() -> None:
    registration = Registration(id="comatrix", url="http://x", as_token="a", hs_token="h",
                                sender_localpart="comatrix", prefix="comatrix_")
    assert registration.owns("@comatrix_sensor01:example.org")
    assert registration.owns("@comatrix_:example.org:8448")
    for other in ("@comatrix:example.org", "@alice:example.org", "@comatrix_sensor01", "comatrix_x:example.org",
                  "@xcomatrix_sensor01:example.org"):
        assert not registration.owns(other), other
    assert registration.localpart("Sensor01") == "comatrix_sensor01"  # Matrix localparts are lower case
    for bad in ("with space", "tab\t", "ümlaut", "a:b", "@x"):
        with pytest.raises(ValueError, match="valid Matrix user name"):
            registration.localpart(bad)


def test_a_registration_others_may_read_is_refused(tmp_path: Path) -> None:
    text = generate("http://127.0.0.1:8010").to_yaml()
    for mode in (0o644, 0o642, 0o601):
        path = write(tmp_path / f"as-{mode:o}.yaml", text, mode)
        with pytest.raises(ConfigError, match="open to others") as refused:
            load_registration(path)
        assert "token: " not in str(refused.value) and str(yaml.safe_load(text)["as_token"]) not in str(refused.value)
    assert load_registration(write(tmp_path / "ok.yaml", text, 0o600)).id == "comatrix"


def test_a_missing_or_empty_key_is_refused(tmp_path: Path) -> None:
    good = yaml.safe_load(generate("http://127.0.0.1:8010").to_yaml())
    for key in ("id", "url", "as_token", "hs_token", "sender_localpart"):
        for value in (None, "", 42):
            document = dict(good)
            if value is None:
                del document[key]
            else:
                document[key] = value
            with pytest.raises(ConfigError, match=f"{key} must be a non-empty string"):
                load_registration(write(tmp_path / "as.yaml", document))
    for not_a_mapping in ("- a\n- b\n", "just text\n", ""):
        with pytest.raises(ConfigError, match="not a registration"):
            load_registration(write(tmp_path / "as.yaml", not_a_mapping))
    with pytest.raises(ConfigError, match="invalid YAML") as invalid:
        load_registration(write(tmp_path / "as.yaml", f"as_token: {good['as_token']}\nhs_token: [x\n"))
    assert good["as_token"] not in str(invalid.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_registration(tmp_path / "missing.yaml")


@pytest.mark.parametrize("users", [
    [],
    None,
    [{"exclusive": True, "regex": ".*"}],
    [{"exclusive": True, "regex": "@comatrix_.*:example.org"}],
    [{"exclusive": True, "regex": "@comatrix_[a-z]+"}],
    [{"exclusive": True, "regex": "@comatrix_"}],
    [{"exclusive": True, "regex": "@.*"}],
    [{"exclusive": True, "regex": "@Comatrix_.*"}],
    [{"exclusive": True, "regex": r"@comatrix_\d.*"}],  # an escape that is a class, not a character
    [{"exclusive": True, "regex": r"@comatrix\:.*"}],  # unescaped, not a valid prefix
    [{"exclusive": True, "regex": "@a_.*"}, {"exclusive": True, "regex": "@b_.*"}],
    "@comatrix_.*",
])
def test_a_namespace_not_of_the_prefix_form_is_refused(tmp_path: Path, users: Any) -> None:
    document = yaml.safe_load(generate("http://127.0.0.1:8010").to_yaml())
    document["namespaces"]["users"] = users
    with pytest.raises(ConfigError, match="namespaces.users must hold one regex of the form @<prefix>.*"):
        load_registration(write(tmp_path / "as.yaml", document))


def test_a_namespace_written_by_another_escaper_is_understood(tmp_path: Path) -> None:
    document = yaml.safe_load(generate("http://127.0.0.1:8010").to_yaml())
    document["namespaces"]["users"] = [{"exclusive": True, "regex": r"@comatrix\_.*"}]
    assert load_registration(write(tmp_path / "as.yaml", document)).prefix == "comatrix_"
    document["namespaces"]["users"] = [{"exclusive": True, "regex": r"@pan\.7\-.*"}]
    registration = load_registration(write(tmp_path / "as.yaml", document))
    assert registration.prefix == "pan.7-" and re.fullmatch(registration.user_regex, "@pan.7-x")
    document["namespaces"] = {}
    with pytest.raises(ConfigError, match="namespaces.users"):
        load_registration(write(tmp_path / "as.yaml", document))


@pytest.mark.parametrize("prefix", ["comatrix_", "a.b_c=d/e+f-g9", "x", "gw-2.", "0" * 32])
def test_every_prefix_generate_accepts_round_trips(tmp_path: Path, prefix: str) -> None:
    registration = generate("http://127.0.0.1:8010", prefix=prefix)
    loaded = load_registration(write(tmp_path / "as.yaml", registration.to_yaml()))
    assert loaded.prefix == prefix and loaded.user_regex == registration.user_regex
    assert loaded.owns(f"@{prefix}dev:example.org") and not loaded.owns(f"@{prefix[:-1]}:example.org")
