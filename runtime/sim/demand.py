"""Per-minute demand of a mixed trace, and what each pool can serve of it within SLO.

This module owns the one sizing computation the baselines and the lower bound share, so that
both size with the same numbers: demand grouped by minute and by (SLO class, tenant), and a
pool's capacity for a group from :func:`runtime.costmodel.evaluate` (the roofline's busiest
operating point within the class's SLO, for the group's mean prompt and output that minute).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from runtime.catalog import Catalog, InstanceRecord
from runtime.costmodel import PerformanceModel, Slo, Workload, evaluate
from runtime.plan import tenant_may_use
from runtime.sim.trace import MixedRequest
from runtime.spec import FleetSpec, PoolSpec, Quality

__all__ = ["Capacity", "GroupDemand", "minute_demand", "pool_may_serve"]

MINUTE_S = 60.0


@dataclass(frozen=True, slots=True)
class GroupDemand:
    """Requests of one (class, tenant, model) arriving in one minute."""

    minute: int
    slo_class: str
    tenant: str
    model: str
    requests: int
    prompt_tokens: int
    output_tokens: int

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / MINUTE_S

    @property
    def workload(self) -> Workload:
        return Workload(
            prompt_tokens=max(1.0, self.prompt_tokens / self.requests),
            output_tokens=max(1.0, self.output_tokens / self.requests),
        )


def minute_demand(requests: Sequence[MixedRequest]) -> list[GroupDemand]:
    """Demand per minute of arrival and (class, tenant, model), in a stable order."""
    sums: dict[tuple[int, str, str, str], list[int]] = {}
    for r in requests:
        key = (int(r.arrival_s // MINUTE_S), r.slo_class, r.tenant, r.model)
        acc = sums.setdefault(key, [0, 0, 0])
        acc[0] += 1
        acc[1] += r.prompt_tokens
        acc[2] += max(1, r.output_tokens)
    return [
        GroupDemand(minute, cls, tenant, model, n, prompt, output)
        for (minute, cls, tenant, model), (n, prompt, output) in sorted(sums.items())
    ]


def pool_may_serve(spec: FleetSpec, pool: PoolSpec, slo_class: str, tenant: str) -> bool:
    """The permissions routing applies: tenant pools and models, quality, spot eligibility."""
    cls = spec.slo_class(slo_class)
    if pool.spot and not cls.spot_eligible:
        return False
    if not tenant_may_use(spec, tenant, pool):
        return False
    _, variant = spec.pool_variant(pool)
    needed = max(Quality[cls.min_quality], Quality[spec.tenant(tenant).min_quality])
    return Quality[variant.quality] >= needed


class Capacity:
    """Output tokens/s one instance of a pool serves of a group's workload within its SLO."""

    def __init__(
        self, spec: FleetSpec, catalog: Catalog, perf: PerformanceModel, margin: float = 1.0
    ) -> None:
        self.spec = spec
        self.perf = perf
        self.margin = margin
        self._records: dict[str, InstanceRecord] = {}
        for pool in spec.pools:
            ref = pool.price_ref
            self._records[pool.name] = catalog.get(ref.cloud, ref.region, ref.instance_type)
        self._cached = lru_cache(maxsize=200_000)(self._compute)

    def record(self, pool: PoolSpec) -> InstanceRecord:
        return self._records[pool.name]

    def tokens_per_s(
        self, pool: PoolSpec, slo_class: str, workload: Workload, *, spot: bool | None = None
    ) -> float | None:
        """None if no operating point meets the SLO (or the market has no price)."""
        # Rounded workloads share cache entries; the rounding is far below the model's accuracy.
        prompt = round(workload.prompt_tokens, -1) or 1.0
        output = round(workload.output_tokens) or 1.0
        market = pool.spot if spot is None else spot
        return self._cached(pool.name, slo_class, prompt, output, market)

    def _compute(
        self, pool_name: str, slo_class: str, prompt: float, output: float, spot: bool
    ) -> float | None:
        pool = self.spec.pool(pool_name)
        model, variant = self.spec.pool_variant(pool)
        cls = self.spec.slo_class(slo_class)
        option = evaluate(
            model,
            variant,
            self._records[pool_name],
            workload=Workload(prompt_tokens=prompt, output_tokens=output),
            slo=Slo(ttft_s=cls.ttft_ms / 1000.0, tpot_s=cls.tpot_ms / 1000.0),
            spot=spot,
            perf=self.perf,
            planning_margin=self.margin,
        )
        if option is None or not math.isfinite(option.output_tokens_per_s):
            return None
        return option.output_tokens_per_s
