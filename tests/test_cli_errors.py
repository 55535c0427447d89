"""Every sub-command reports user errors the same way: one stderr line, exit status 2."""

from __future__ import annotations

import pytest

from runtime.cli_errors import EXIT_USAGE, usage_error


def test_a_multi_line_message_becomes_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert usage_error("agent", "config.json: bad\n  port: not a number\n") == EXIT_USAGE == 2
    assert (
        capsys.readouterr().err == "fleetform agent: error: config.json: bad; port: not a number\n"
    )


def test_an_exception_is_printed_by_its_message(capsys: pytest.CaptureFixture[str]) -> None:
    usage_error("bench engine", ValueError("--requests must be >= 1"))
    assert capsys.readouterr().err == "fleetform bench engine: error: --requests must be >= 1\n"
