"""The fleets and policies Fleetform's own is compared with, built as ordinary fleet specs.

This module owns how each benchmark policy turns the stack under test into the spec the
simulator runs, so that every policy is the same code with different settings (never a
different implementation):

* ``fleetform``: the stack as declared.
* ``round-robin``: the same heterogeneous fleet and autoscaler, with ``routing.strategy:
  round-robin`` (no cost awareness when choosing an instance).
* ``homogeneous``: what a team gets from one node pool plus a horizontal autoscaler. The pool is
  the single cheapest instance type that meets every class's SLO at the trace's peak: among the
  stack's (instance type, model variant) pairs serving the trace's model, on-demand, with a
  variant good enough for every class and tenant in the mix, whose operating point meets each
  (class, tenant) group's SLO for the group's mean request over the trace, the one whose
  instance count for the busiest minute costs least (sized with :mod:`runtime.sim.demand` at
  ``routing.slo_headroom``, as the plan command sizes; a group's per-minute mean is too noisy
  to decide feasibility on: a minute holds a handful of critical requests). It scales reactively (``forecast: none``, no spot
  over-provision) on in-flight requests and routes ``least-loaded``; its ``max_replicas`` is
  twice the peak count and it starts at the peak count. Tenants keep their quotas and quality
  needs; pool restrictions go, since there is only one pool.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from runtime.catalog import Catalog
from runtime.costmodel import PerformanceModel, Workload
from runtime.sim.demand import Capacity, minute_demand
from runtime.sim.trace import MixedRequest
from runtime.spec import FleetSpec, Quality, parse_fleet

__all__ = ["POLICIES", "HomogeneousChoice", "homogeneous_fleet", "policy_fleet"]

POLICIES = ("fleetform", "homogeneous", "round-robin")


@dataclass(frozen=True)
class HomogeneousChoice:
    """The pool the homogeneous baseline runs, and why."""

    source_pool: str  # the stack's pool whose instance type and variant it uses
    instance_type: str
    variant: str
    usd_per_hour: float
    peak_instances: int
    peak_minute: int
    considered: tuple[tuple[str, int | None, float | None], ...]  # (pool, peak count, USD/h)


def policy_fleet(
    policy: str,
    spec: FleetSpec,
    requests: Sequence[MixedRequest],
    *,
    catalog: Catalog,
    perf: PerformanceModel,
) -> tuple[FleetSpec, HomogeneousChoice | None]:
    """The spec the simulator runs for ``policy`` on the stack ``spec``."""
    if policy == "fleetform":
        return spec, None
    if policy == "round-robin":
        routing = spec.routing.model_copy(update={"strategy": "round-robin"})
        return spec.model_copy(update={"routing": routing}), None
    if policy == "homogeneous":
        return homogeneous_fleet(spec, requests, catalog=catalog, perf=perf)
    raise ValueError(f"unknown policy {policy!r} (known: {', '.join(POLICIES)})")


def homogeneous_fleet(
    spec: FleetSpec,
    requests: Sequence[MixedRequest],
    *,
    catalog: Catalog,
    perf: PerformanceModel,
) -> tuple[FleetSpec, HomogeneousChoice]:
    """The homogeneous baseline's spec (see the module docstring)."""
    if not requests:
        raise ValueError("the homogeneous baseline is sized from the trace, which is empty")
    models = {r.model for r in requests}
    if len(models) != 1:
        raise ValueError("the homogeneous baseline serves one model; the trace asks for several")
    (model_name,) = models
    capacity = Capacity(spec, catalog, perf, margin=spec.routing.slo_headroom)
    demand = minute_demand(requests)
    totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for d in demand:
        acc = totals[(d.slo_class, d.tenant)]
        acc[0] += d.requests
        acc[1] += d.prompt_tokens
        acc[2] += d.output_tokens
    workloads = {
        key: Workload(prompt_tokens=max(1.0, p / n), output_tokens=max(1.0, o / n))
        for key, (n, p, o) in totals.items()
    }
    needed = Quality.low
    for d in demand:
        cls = spec.slo_class(d.slo_class)
        tenant = spec.tenant(d.tenant)
        needed = max(needed, Quality[cls.min_quality], Quality[tenant.min_quality])

    considered: list[tuple[str, int | None, float | None]] = []
    best: tuple[float, int, int, str] | None = None  # (USD/h, count, minute, pool)
    seen: set[tuple[str, str, str, str]] = set()
    for pool in spec.pools:
        if pool.serves.model != model_name:
            continue
        _, variant = spec.pool_variant(pool)
        ref = pool.price_ref
        key = (ref.cloud, ref.region, ref.instance_type, variant.name)
        if key in seen or Quality[variant.quality] < needed:
            continue
        seen.add(key)
        record = capacity.record(pool)
        price = record.on_demand_usd_per_hour
        if price is None:
            considered.append((pool.name, None, None))
            continue
        rates = {
            key: capacity.tokens_per_s(pool, key[0], workload, spot=False)
            for key, workload in workloads.items()
        }
        if any(rate is None for rate in rates.values()):
            considered.append((pool.name, None, None))
            continue
        load: dict[int, float] = defaultdict(float)  # instances busy, per minute
        for d in demand:
            load[d.minute] += d.output_tokens_per_s / rates[(d.slo_class, d.tenant)]  # type: ignore[operator]
        minute, busiest = max(load.items(), key=lambda item: (item[1], -item[0]))
        count = max(1, math.ceil(busiest - 1e-9))
        considered.append((pool.name, count, count * price))
        candidate = (count * price, count, minute, pool.name)
        if best is None or candidate < best:
            best = candidate
    if best is None:
        raise ValueError(
            f"no instance type of the stack serving {model_name!r} meets every class's SLO "
            "on-demand, so there is no homogeneous baseline"
        )
    _, count, minute, source = best
    pool = spec.pool(source)
    data = spec.model_dump(mode="json", exclude_none=True)
    single = {
        k: v
        for k, v in pool.model_dump(mode="json", exclude_none=True).items()
        if k not in ("on_demand_base", "fallback_pool")
    }
    single.update(
        name=f"homogeneous-{pool.name}"[:40].rstrip("-"),
        spot=False,
        min_replicas=1,
        max_replicas=2 * count,
        desired_replicas=count,
    )
    data["pools"] = [single]
    for model in data["models"]:
        # One pool serves one version: a rollout between versions has nothing to run on.
        model.pop("rollout", None)
    for tenant in data.get("tenants", []):
        tenant.pop("allowed_pools", None)
    data["routing"] = {**data.get("routing", {}), "strategy": "least-loaded"}
    autoscaling = dict(data.get("autoscaling", {}))
    autoscaling["forecast"] = {**autoscaling.get("forecast", {}), "method": "none"}
    autoscaling["spot_overprovision"] = 0
    data["autoscaling"] = autoscaling
    data["name"] = f"{spec.name}-homogeneous"[:40].rstrip("-")
    fleet = parse_fleet(data, source="homogeneous baseline", catalog=catalog)
    record = capacity.record(pool)
    choice = HomogeneousChoice(
        source_pool=pool.name,
        instance_type=pool.instance_type,
        variant=pool.serves.variant,
        usd_per_hour=record.on_demand_usd_per_hour or 0.0,
        peak_instances=count,
        peak_minute=minute,
        considered=tuple(considered),
    )
    return fleet, choice
