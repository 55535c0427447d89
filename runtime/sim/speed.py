"""How fast a simulated instance runs: the cost model's roofline, per engine step.

This module owns the translation from :mod:`runtime.costmodel` to what the simulator needs per
pool: how many model replicas one instance holds, each replica's KV capacity in tokens, and the
duration of one continuous-batching step given what the scheduler put in it. It holds no
numbers of its own: every figure comes from ``ReplicaPerformance`` (so a CPU calibration from
``fleetform bench engine --calibration-out``, given through ``PerformanceModel``, applies here
as it does in ``fleetform plan``).

A step's time is the decode part plus the prefill part, as the cost model's ``at_batch`` adds
them: ``decode_step_s(decodes, mean context)`` for the sequences sampling one token, plus, for
each prefill chunk covering prompt positions ``[a, b)``, ``prefill_s(b) - prefill_s(a)`` (with
``prefill_s(0)`` taken as 0), so that the chunks of one prompt add up to exactly
``prefill_s(prompt)`` however the scheduler splits it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

from runtime.catalog import Catalog, InstanceRecord
from runtime.costmodel import PerformanceModel, ReplicaPerformance, fit, hardware_for
from runtime.scheduler import ScheduledSeq
from runtime.spec import FleetSpec, PoolSpec

__all__ = ["PoolSpeed", "PoolStepCost", "pool_speed"]

KV_BLOCK_TOKENS = 16  # the scheduler's block size in the simulator (vLLM's default)


@dataclass(frozen=True)
class PoolSpeed:
    """One pool's serving figures: per model replica, and how many replicas an instance holds."""

    pool: str
    replica: ReplicaPerformance
    replicas_per_instance: int
    kv_tokens: int  # per replica: usable memory after the weights, in KV tokens
    max_model_len: int

    def __post_init__(self) -> None:
        # Memoised per pool: prompt lengths repeat, and the simulator asks for every chunk.
        object.__setattr__(self, "_prefill", lru_cache(maxsize=65536)(self.replica.prefill_s))

    def prefill_s(self, tokens: int) -> float:
        return 0.0 if tokens <= 0 else self._prefill(tokens)  # type: ignore[attr-defined]

    def step_s(self, scheduled: Sequence[ScheduledSeq]) -> tuple[float, int, int]:
        """Duration of a step, with its prefill tokens and decode tokens (for the measurement).

        A sequence scheduled for one token that completes it (``sample``) decodes; anything
        else is a prefill chunk (a resumed sequence's recompute included).
        """
        decodes = 0
        context = 0
        prefill_tokens = 0
        prefill_time = 0.0
        for item in scheduled:
            n = len(item.token_ids)
            start = item.num_computed_tokens
            if n == 1 and item.sample and start > 0:
                decodes += 1
                context += start + 1
            else:
                prefill_tokens += n
                prefill_time += self.prefill_s(start + n) - self.prefill_s(start)
        decode_time = self.replica.decode_step_s(decodes, context / decodes) if decodes else 0.0
        return decode_time + prefill_time, prefill_tokens, decodes

    def step_cost(self) -> PoolStepCost:
        """This speed as the scheduler's :class:`~runtime.scheduler.StepCost`."""
        return PoolStepCost(self)

    def decode_run_s(self, batch: int, context_sum: int, steps: int) -> float:
        """Total time of ``steps`` pure-decode steps of ``batch`` sequences whose contexts sum to
        ``context_sum`` at the first one (each step adds one token to every context)."""
        mean = context_sum / batch + (steps - 1) / 2.0
        return steps * self.replica.decode_step_s(batch, mean)


@dataclass(frozen=True)
class PoolStepCost:
    """A :class:`PoolSpeed` seen as :class:`runtime.scheduler.StepCost`: the same step time
    :meth:`PoolSpeed.step_s` charges, split into its decode and prefill parts."""

    speed: PoolSpeed

    def decode_s(self, num_decodes: int, context_tokens: int) -> float:
        return self.speed.replica.decode_step_s(num_decodes, context_tokens / num_decodes)

    def prefill_s(self, start: int, end: int) -> float:
        return self.speed.prefill_s(end) - self.speed.prefill_s(start)


def pool_speed(
    spec: FleetSpec, pool: PoolSpec, catalog: Catalog, perf: PerformanceModel
) -> PoolSpeed:
    """The serving figures of ``pool`` from the cost model; raises ValueError when the variant
    does not fit the pool's hardware or the catalog has no figures for it."""
    model, variant = spec.pool_variant(pool)
    record = _hardware_record(pool, catalog)
    hw = hardware_for(record, perf)
    if hw is None:
        raise ValueError(f"pool {pool.name!r}: no hardware figures for {record.instance_type}")
    context = min(model.context_length, 4096)
    placement = fit(model, variant, record, context_tokens=context, batch=1, perf=perf)
    if not placement.fits:
        raise ValueError(f"pool {pool.name!r}: {placement.reason}")
    replica = ReplicaPerformance(model, variant, hw, placement.tensor_parallel)
    kv_tokens = int((replica.memory_bytes - replica.weight_bytes) // replica.kv_per_token)
    kv_tokens -= kv_tokens % KV_BLOCK_TOKENS
    return PoolSpeed(
        pool=pool.name,
        replica=replica,
        replicas_per_instance=placement.replicas_per_instance,
        kv_tokens=kv_tokens,
        max_model_len=min(model.context_length, kv_tokens),
    )


def _hardware_record(pool: PoolSpec, catalog: Catalog) -> InstanceRecord:
    ref = pool.price_ref
    record = catalog.get(ref.cloud, ref.region, ref.instance_type)
    if pool.cloud == "local" and record.accelerator_kind != "cpu":
        # A local pool runs on this machine's CPUs whatever it is priced as: size it as the
        # priced-as host's CPUs (an assumption, stated in the run's notes).
        record = replace(record, accelerator_kind="cpu", accelerator=None, accelerator_count=0)
    return record
