"""``comatrix-device`` as a newcomer meets it (issue 17, finding 5): a silent gateway is named
within ``--wait`` seconds, and ``--help`` is plain text with a line per command."""

from __future__ import annotations

import socket

import pytest

from comatrix import client


def test_a_gateway_that_never_answers_is_named_after_the_wait(capsys: pytest.CaptureFixture[str]) -> None:
    # A bound UDP socket that reads nothing: the datagrams arrive, no answer ever comes.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        gateway = f"coap://127.0.0.1:{silent.getsockname()[1]}"
        status = client.main(["--gateway", gateway, "--wait", "0.3", "time"])
    assert status == 3
    assert capsys.readouterr().err == (
        f"comatrix-device: no answer from {gateway} after 0.3 s — is the gateway running?\n")


def test_the_default_wait_is_a_few_seconds_not_the_whole_retransmission_window() -> None:
    args = client._parser().parse_args(["time"])
    assert args.wait == client.DEFAULT_WAIT == 5


def test_help_is_plain_text_with_a_line_per_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        client.main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":ref:" not in text and "`" not in text.replace("'", "")
    for command, line in client.COMMANDS.items():
        assert f"    {command} " in text and line.split()[0] in text
    for command in client.COMMANDS:
        with pytest.raises(SystemExit):
            client.main([command, "--help"])
        assert client.COMMANDS[command] in " ".join(capsys.readouterr().out.split())
