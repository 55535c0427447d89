"""Session fixtures: the SmolLM2 engine and the transformers reference, each loaded once."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

from runtime.engine.model_files import ModelNotFoundError, resolve_model_path


@pytest.fixture(scope="session")
def model_path() -> Path:
    # `make test` installs the model wheel; without it the engine tests must fail, not skip.
    try:
        return resolve_model_path()
    except ModelNotFoundError as exc:
        pytest.fail(f"default model not installed: {exc}")


@pytest.fixture(scope="session")
def engine(model_path: Path) -> Any:
    from runtime.engine.numpy_engine import NumpyEngine

    eng = NumpyEngine(model_path, kv_cache_tokens=8192, max_model_len=2048, max_num_seqs=32, seed=0)
    eng.load()
    return eng


@pytest.fixture
def core(engine: Any) -> Any:
    """A fresh driver over the shared engine (the scheduler state is per test)."""
    from runtime.engine.core import EngineCore

    c = EngineCore(engine)
    yield c
    # Leave the shared KV pool empty for the next test.
    while c.has_unfinished():
        c.step()


@pytest.fixture(scope="session")
def reference(model_path: Path) -> Any:
    """transformers' independent implementation loading the same GGUF (float32)."""
    # `make test` installs these; a missing one is a broken install, not a reason to skip.
    import accelerate  # noqa: F401
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
        )
    model.eval()
    return model


@pytest.fixture(scope="session")
def reference_tokenizer(model_path: Path) -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoTokenizer.from_pretrained(
            str(model_path.parent), gguf_file=model_path.name
        )
