"""Admission decisions of the agent: priority class of a request and overload shedding.

Pure functions over plain data (no aiohttp, no engine, no clock), so they are unit-tested on
fabricated state and the simulator can reuse them.

Priority: a request names its class in ``X-Priority`` or gets its tenant's default. Asking for a
class more important than the tenant's ``max_priority`` is *capped* to that maximum rather than
refused: the request is still worth serving, and the response says which class it got (the agent
sets ``X-Fleetform-Priority``). Unknown class names are an error (400), since a typo would
otherwise silently change latency targets.

Shedding: the agent predicts a new request's time to first token from measured engine speed and
the work queued ahead of it, and refuses a *sheddable* request early (503 + Retry-After) when the
prediction exceeds its class's ``ttft_ms``: the client can retry elsewhere or later instead of
waiting for an answer that will miss its objective anyway. Non-sheddable (critical) work is never
refused by the prediction. The only other refusal is a hard cap on waiting requests (memory
protection); at the cap a non-sheddable request is still admitted when anything less important is
waiting, since the scheduler serves it first.

The TTFT model, with ``S`` the measured tokens/s of steps that prefill (an EWMA, mixed
prefill+decode steps included, so the cost of interleaved decodes is in the rate)::

    prefill_ahead = prompt tokens not yet prefilled of running requests (they go first)
                  + those of waiting requests at the same or a more important priority
                  + the new prompt
    slot_wait     = when the batch is full: time until enough running requests finish their
                    remaining decode tokens (at the measured seconds per decode step)
    ttft         ~= max(prefill_ahead / S, slot_wait + new_prompt / S)

Before anything was measured the prediction is unknown and nothing is shed (unless the node
config gives a prior rate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from runtime.spec import SloClassSpec

__all__ = [
    "LoadState",
    "MeasuredStepCost",
    "PriorityResolution",
    "ShedDecision",
    "ThroughputEstimate",
    "UnknownPriorityClassError",
    "WorkItem",
    "decide_shedding",
    "predict_ttft",
    "resolve_priority",
]

MIN_RETRY_AFTER_S = 1
MAX_RETRY_AFTER_S = 120


class UnknownPriorityClassError(ValueError):
    """The requested priority class does not exist on this node."""


@dataclass(frozen=True)
class PriorityResolution:
    """The class a request runs in, and whether the tenant's ceiling lowered what it asked for."""

    slo_class: SloClassSpec
    requested: str | None
    capped: bool


def resolve_priority(
    requested: str | None,
    default_class: str,
    max_class: str | None,
    classes: Mapping[str, SloClassSpec],
) -> PriorityResolution:
    """The SLO class of a request: ``requested`` (or the default), capped at ``max_class``.

    ``max_class`` ``None`` means the default is also the ceiling (as in :class:`TenantSpec`).
    Raises :class:`UnknownPriorityClassError` for a name that is not a class.
    """
    name = requested.strip() if requested is not None else ""
    if not name:
        name = default_class
    wanted = classes.get(name)
    if wanted is None:
        known = ", ".join(sorted(classes))
        raise UnknownPriorityClassError(f"no priority class {name!r} (known: {known})")
    ceiling = classes[max_class if max_class is not None else default_class]
    if wanted.priority < ceiling.priority:  # lower number = more important
        return PriorityResolution(ceiling, requested, capped=True)
    return PriorityResolution(wanted, requested, capped=False)


@dataclass
class ThroughputEstimate:
    """Engine speed as exponentially weighted moving averages of observed steps.

    ``prefill_tokens_per_s``: token rows per second of steps that contain prefill work.
    ``decode_step_s``: seconds of a step that only decodes (one token per running sequence).
    ``decode_batch``: sequences in such a step, so that ``decode_batch / decode_step_s`` is the
    decode speed in tokens/s at that batch (what the router's fleet view carries).
    """

    alpha: float = 0.2
    prefill_tokens_per_s: float | None = None
    decode_step_s: float | None = None
    decode_batch: float | None = None

    def observe(self, prefill_tokens: int, decode_tokens: int, seconds: float) -> None:
        if seconds <= 0 or prefill_tokens + decode_tokens <= 0:
            return
        if prefill_tokens > 0:
            rate = (prefill_tokens + decode_tokens) / seconds
            self.prefill_tokens_per_s = _ewma(self.prefill_tokens_per_s, rate, self.alpha)
        else:
            self.decode_step_s = _ewma(self.decode_step_s, seconds, self.alpha)
            self.decode_batch = _ewma(self.decode_batch, decode_tokens, self.alpha)


@dataclass(frozen=True)
class MeasuredStepCost:
    """A :class:`ThroughputEstimate` read as the scheduler's ``StepCost``: a decode part of the
    measured pure-decode step time, and prefill at the measured rate of steps that prefill
    (interleaved decodes included, so it errs towards smaller chunks). Both are 0 until
    measured, which leaves the token budget alone. ``estimate`` is the live object the engine
    thread updates, read on that same thread when the scheduler plans a step.
    """

    estimate: ThroughputEstimate

    def decode_s(self, num_decodes: int, context_tokens: int) -> float:
        return self.estimate.decode_step_s or 0.0

    def prefill_s(self, start: int, end: int) -> float:
        rate = self.estimate.prefill_tokens_per_s
        return (end - start) / rate if rate else 0.0


def _ewma(old: float | None, sample: float, alpha: float) -> float:
    return sample if old is None else (1 - alpha) * old + alpha * sample


@dataclass(frozen=True)
class WorkItem:
    """One unfinished request as the predictor sees it."""

    priority: int
    prefill_tokens_left: int
    decode_tokens_left: int
    running: bool


@dataclass(frozen=True)
class LoadState:
    """A snapshot of the node: engine speed, unfinished work, batch limits."""

    prefill_tokens_per_s: float | None
    decode_step_s: float | None
    items: Sequence[WorkItem]
    max_num_seqs: int
    max_waiting: int

    @property
    def num_waiting(self) -> int:
        return sum(1 for item in self.items if not item.running)


def predict_ttft(state: LoadState, prompt_tokens: int, priority: int) -> float | None:
    """Predicted seconds to the first token of a new request; ``None`` if speed is unknown."""
    rate = state.prefill_tokens_per_s
    if rate is None or rate <= 0:
        return None
    running = [item for item in state.items if item.running]
    waiting_ahead = [item for item in state.items if not item.running and item.priority <= priority]
    prefill_ahead = (
        sum(item.prefill_tokens_left for item in running)
        + sum(item.prefill_tokens_left for item in waiting_ahead)
        + prompt_tokens
    )
    prefill_time = prefill_ahead / rate
    # Sequences admitted ahead of us need batch slots too; we need one more after them.
    slots_needed = len(running) + len(waiting_ahead) + 1 - state.max_num_seqs
    slot_wait = 0.0
    if slots_needed > 0:
        step_s = state.decode_step_s
        if step_s is None:
            return prefill_time  # cannot judge the slot wait yet; the prefill part still holds
        remaining = sorted(item.decode_tokens_left for item in running)
        if slots_needed > len(remaining):
            # More waiting ahead than the batch holds: they run in waves of max_num_seqs.
            waves = math.ceil(slots_needed / max(1, state.max_num_seqs))
            longest = remaining[-1] if remaining else 0
            slot_wait = waves * max(1, longest) * step_s
        else:
            slot_wait = remaining[slots_needed - 1] * step_s
    return max(prefill_time, slot_wait + prompt_tokens / rate)


@dataclass(frozen=True)
class ShedDecision:
    """Admit, or refuse with ``reason`` (``overload``/``queue_full``) and a Retry-After."""

    shed: bool
    predicted_ttft_s: float | None
    reason: str | None = None
    retry_after_s: int = 0

    @property
    def message(self) -> str:
        if not self.shed:
            return "admitted"
        if self.reason == "queue_full":
            return "the node's request queue is full; retry later or on another node"
        assert self.predicted_ttft_s is not None
        return (
            f"the node is overloaded: predicted time to first token {self.predicted_ttft_s:.2f}s "
            "exceeds the objective of this priority class; retry later or on another node"
        )


def decide_shedding(state: LoadState, prompt_tokens: int, slo: SloClassSpec) -> ShedDecision:
    """Whether to refuse a new request of class ``slo`` with ``prompt_tokens`` now."""
    predicted = predict_ttft(state, prompt_tokens, slo.priority)
    if state.num_waiting >= state.max_waiting:
        less_important_waiting = any(
            not item.running and item.priority > slo.priority for item in state.items
        )
        if slo.sheddable or not less_important_waiting:
            retry = _retry_after(predicted, 0.0) if predicted is not None else MIN_RETRY_AFTER_S
            return ShedDecision(True, predicted, "queue_full", retry)
        return ShedDecision(False, predicted)
    if not slo.sheddable or predicted is None:
        return ShedDecision(False, predicted)
    objective = slo.ttft_ms / 1000.0
    if predicted > objective:
        return ShedDecision(True, predicted, "overload", _retry_after(predicted, objective))
    return ShedDecision(False, predicted)


def _retry_after(predicted: float, objective: float) -> int:
    """Whole seconds until the backlog should have shrunk enough (clamped to a sane range)."""
    wait = math.ceil(max(0.0, predicted - objective))
    return int(min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, wait)))
