"""Fleetform's embedded inference engine.

Modules:

* :mod:`~runtime.engine.base` - the :class:`Engine` interface, :class:`SamplingParams`, step I/O.
* :mod:`~runtime.engine.numpy_engine` - :class:`NumpyEngine`, a Llama forward pass in numpy.
* :mod:`~runtime.engine.core` - :class:`EngineCore`, the driver joining scheduler and engine.
* :mod:`~runtime.engine.gguf_model`, :mod:`~runtime.engine.tokenizer` - GGUF weights and tokenizer.
* :mod:`~runtime.engine.kv_cache`, :mod:`~runtime.engine.sampling` - KV pool, token sampling.
* :mod:`~runtime.engine.model_files` - locating the default model (:class:`ModelNotFoundError`).
* :mod:`~runtime.engine.commands`, :mod:`~runtime.engine.bench` - CLI entry points, benchmark.

Names are imported lazily so that ``import runtime.engine`` stays cheap (no numpy/gguf load)::

    from runtime.engine import EngineCore, NumpyEngine, SamplingParams
    core = EngineCore(NumpyEngine())
    [out] = core.generate(["Hello"], SamplingParams(temperature=0, max_tokens=16))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime.engine.base import (
        Engine,
        EngineCapacity,
        SamplingParams,
        SeqInput,
        StepInput,
        StepOutput,
    )
    from runtime.engine.core import CompletionOutput, EngineCore, RequestOutput
    from runtime.engine.model_files import ModelNotFoundError
    from runtime.engine.numpy_engine import NumpyEngine

_EXPORTS = {
    "Engine": "runtime.engine.base",
    "EngineCapacity": "runtime.engine.base",
    "SamplingParams": "runtime.engine.base",
    "SeqInput": "runtime.engine.base",
    "StepInput": "runtime.engine.base",
    "StepOutput": "runtime.engine.base",
    "CompletionOutput": "runtime.engine.core",
    "EngineCore": "runtime.engine.core",
    "RequestOutput": "runtime.engine.core",
    "ModelNotFoundError": "runtime.engine.model_files",
    "NumpyEngine": "runtime.engine.numpy_engine",
}

__all__ = [
    "CompletionOutput",
    "Engine",
    "EngineCapacity",
    "EngineCore",
    "ModelNotFoundError",
    "NumpyEngine",
    "RequestOutput",
    "SamplingParams",
    "SeqInput",
    "StepInput",
    "StepOutput",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'runtime.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
