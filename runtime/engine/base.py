"""The engine interface: what a scheduler-driven model runner must provide.

This module owns the contract between :mod:`runtime.scheduler` (which decides *what* runs each
iteration) and an engine (which runs it). It is deliberately about sequences and steps, not arrays,
so the same driver can sit on the embedded numpy engine or on an adapter that forwards to an
OpenAI-compatible upstream (vLLM, TGI). Inputs and outputs are plain dataclasses, in the spirit of
vLLM's v1 ``SchedulerOutput``/``ModelRunnerOutput`` but much smaller.

One *step* processes, for each scheduled sequence, the token ids not yet in the engine's KV cache:
a prefill chunk, the rest of a prompt, or the single token sampled last step. Sequences whose known
tokens are all processed after the step (``SeqInput.sample``) get one newly sampled token back.

Lifecycle of a sequence, as seen by the engine::

    kv.reserve(seq_id, n)        # the scheduler makes room (KVCapacity protocol)
    step(... SeqInput(seq_id, token_ids, num_computed_tokens, sample, params) ...)  # repeated
    free(seq_id)                 # finished, aborted or preempted: drop KV and any per-seq state

A preempted sequence is later re-sent from ``num_computed_tokens == 0`` with its prompt plus the
tokens generated so far (resume by recomputation).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from runtime.scheduler import KVCapacity

__all__ = [
    "Engine",
    "EngineCapacity",
    "SamplingParams",
    "SeqInput",
    "StepInput",
    "StepOutput",
]

_MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop, per request (OpenAI-style semantics).

    ``temperature == 0`` is greedy (deterministic). ``top_k == 0`` and ``top_p == 1`` disable those
    filters. ``seed`` makes sampling reproducible per request regardless of batching. ``stop``
    strings end generation when they appear in the decoded text (excluded from the result).
    ``max_tokens`` bounds generated tokens; ``ignore_eos`` keeps going past end-of-sequence tokens.
    ``logit_bias`` maps token id -> additive bias in [-100, 100] applied before sampling.

    Construction validates every field and raises ``ValueError`` naming the offending one.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logit_bias: Mapping[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name}: {why} (got {getattr(self, name)!r})")

        if (
            isinstance(self.max_tokens, bool)
            or not isinstance(self.max_tokens, int)
            or self.max_tokens < 1
        ):
            raise bad("max_tokens", "must be an integer >= 1")
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, int | float)
            or not math.isfinite(self.temperature)
            or not 0.0 <= self.temperature <= 100.0
        ):
            raise bad("temperature", "must be a number in [0, 100]")
        if (
            isinstance(self.top_p, bool)
            or not isinstance(self.top_p, int | float)
            or not math.isfinite(self.top_p)
            or not 0.0 < self.top_p <= 1.0
        ):
            raise bad("top_p", "must be a number in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 disables)")
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed <= _MAX_SEED
        ):
            raise bad("seed", f"must be an integer in [0, {_MAX_SEED}] or None")
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", "must be a string or a sequence of non-empty strings")
        object.__setattr__(self, "stop", tuple(stop))
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be a bool")
        if not isinstance(self.logit_bias, Mapping):
            raise bad("logit_bias", "must be a mapping of token id to bias")
        bias: dict[int, float] = {}
        for key, value in self.logit_bias.items():
            try:
                token = int(key)
            except (TypeError, ValueError):
                raise bad("logit_bias", f"key {key!r} is not a token id") from None
            if token < 0 or (isinstance(key, float) and not key.is_integer()):
                raise bad("logit_bias", f"key {key!r} is not a token id")
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not -100.0 <= value <= 100.0
            ):
                raise bad("logit_bias", f"bias for token {token} must be a number in [-100, 100]")
            bias[token] = float(value)
        object.__setattr__(self, "logit_bias", bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class EngineCapacity:
    """Static limits of an engine, used to configure the scheduler.

    ``max_num_batched_tokens``: most token rows one :meth:`Engine.step` accepts.
    ``max_num_seqs``: most sequences in one step. ``kv_capacity_tokens``: tokens the KV pool holds
    over all sequences (``None`` if unbounded/unknown, e.g. an upstream). ``max_model_len``: longest
    sequence (prompt + output). ``kv_block_size``: allocation granularity of the KV pool.
    """

    max_num_batched_tokens: int
    max_num_seqs: int
    kv_capacity_tokens: int | None
    max_model_len: int
    kv_block_size: int = 16


@dataclass(frozen=True)
class SeqInput:
    """One sequence's share of a step.

    ``token_ids`` are the tokens to append, starting at position ``num_computed_tokens`` (the
    number already in the engine's KV cache for ``seq_id``). ``sample`` asks for one new token after
    them (true when they reach the end of the known sequence). ``num_generated`` is how many output
    tokens the request already has; it keys seeded sampling.
    """

    seq_id: str
    token_ids: Sequence[int]
    num_computed_tokens: int
    sample: bool
    params: SamplingParams
    num_generated: int = 0


@dataclass(frozen=True)
class StepInput:
    """Everything to run in one iteration; at most one entry per sequence."""

    seqs: Sequence[SeqInput]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


@dataclass
class StepOutput:
    """Result of a step: ``sampled[seq_id]`` for every input with ``sample=True``."""

    sampled: dict[str, int]
    num_tokens: int = 0
    seconds: float = 0.0


class Engine(ABC):
    """A model runner driven step by step by the scheduler.

    Implementations need not be thread-safe: one driver thread calls :meth:`step` and
    :meth:`free`. Tokenizer methods are pure and may be called from any thread once loaded.
    """

    @abstractmethod
    def load(self) -> None:
        """Load weights/tokenizer or connect. Idempotent; everything else requires it."""

    @property
    @abstractmethod
    def capacity(self) -> EngineCapacity:
        """Static limits (valid after :meth:`load`)."""

    @property
    @abstractmethod
    def kv(self) -> KVCapacity:
        """The KV allocator the scheduler reserves space through before each step."""

    @abstractmethod
    def step(self, batch: StepInput) -> StepOutput:
        """Process ``batch`` and sample one token for each sequence with ``sample=True``.

        Preconditions: every ``SeqInput.num_computed_tokens`` equals the tokens the engine holds
        for that sequence (0 for a new or preempted one) and ``kv.reserve`` has already covered
        ``num_computed_tokens + len(token_ids)``. Violations raise ``ValueError``.
        """

    @abstractmethod
    def free(self, seq_id: str) -> None:
        """Forget ``seq_id``: release its KV space and per-sequence state. Idempotent."""

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for ``text`` (BOS only if the model's tokenizer config asks for it)."""

    @abstractmethod
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text for ``token_ids``."""

    @abstractmethod
    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render chat ``messages`` (``{"role", "content"}`` dicts) into a prompt string."""

    @property
    @abstractmethod
    def eos_token_ids(self) -> frozenset[int]:
        """Token ids that end generation unless ``ignore_eos``."""

    @property
    def vocab_size(self) -> int | None:
        """Size of the output vocabulary, if known (used to validate ``logit_bias``)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook with a no-op default
        """Release resources (connections, large arrays)."""
