"""Fixtures: two loaded copies of the bundled model (one per in-process agent)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from runtime.engine.model_files import ModelNotFoundError, resolve_model_path

from .support import KV_CACHE_TOKENS, MAX_MODEL_LEN, MESSAGES


def _load(path: Any) -> Any:
    from runtime.engine.numpy_engine import NumpyEngine

    engine = NumpyEngine(
        path, kv_cache_tokens=KV_CACHE_TOKENS, max_model_len=MAX_MODEL_LEN, max_num_seqs=4, seed=0
    )
    engine.load()
    return engine


@pytest.fixture(scope="session")
def engines() -> list[Any]:
    """Two engines: agents serve concurrently, and each engine's KV cache has one owner."""
    try:
        path = resolve_model_path()
    except ModelNotFoundError as exc:  # `make test` installs it: missing is a broken setup
        pytest.fail(f"default model not installed: {exc}")
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(_load, [path, path]))


@pytest.fixture(scope="session")
def prompt_tokens(engines: list[Any]) -> int:
    return len(engines[0].encode(engines[0].apply_chat_template(MESSAGES)))
