"""A lower bound on what serving a trace within SLO costs on a fleet's instance options.

This module owns the bound the benchmark compares every policy with: with perfect knowledge of
each minute's demand and no cold starts, the cheapest integer mix of instances that serves it
within SLO. One small mixed-integer program per minute (``scipy.optimize.milp``):

    minimise    sum_u price_u x_u                       (USD/hour of the minute's instances)
    subject to  sum_p y_gp = D_g                        every group's output tokens/s is served
                sum_g y_gp / T_gp <= sum_{u of p} x_u   no pool is busier than its instances
                lo_u <= x_u <= hi_u, x integer, y >= 0

Groups ``g`` are (SLO class, tenant, model) with ``D_g`` the output tokens/s of that minute's
arrivals; ``T_gp`` is what one instance of pool ``p`` serves of the group's workload within the
class's SLO (:class:`runtime.sim.demand.Capacity`: the cost model's busiest operating point
within the SLO, prefill included), and ``y_gp`` may be positive only where routing would allow
it (tenant pools and models, quality, spot eligibility). A spot pool's ``on_demand_base`` is a
separate unit at the on-demand price. ``hi_u`` is the pool's ``max_replicas``; ``lo_u`` is 0
for the bound as the issue defines it, or ``min_replicas`` for the floor any policy running
the stack pays (both are reported).

What it is and is not: a fluid bound (demand is served in the minute it arrives, at the mean
request shape of its group) on the cost model's numbers, so it bounds policies that run at the
cost model's speed, which is what the simulator does. Demand no allowed option can serve within
SLO at all (e.g. critical prompts too long for any on-demand instance) is left out and counted.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from runtime.catalog import Catalog
from runtime.costmodel import PerformanceModel
from runtime.sim.demand import MINUTE_S, Capacity, GroupDemand, minute_demand, pool_may_serve
from runtime.sim.trace import MixedRequest
from runtime.spec import FleetSpec

__all__ = ["LowerBound", "lower_bound"]


@dataclass
class LowerBound:
    """The bound over a horizon, with what it left out."""

    usd: float  # without min_replicas (the definition)
    usd_with_min_replicas: float  # with the stack's min_replicas as a floor
    minutes: int
    per_minute_usd_per_hour: list[float] = field(default_factory=list)
    instances: list[dict[str, float]] = field(default_factory=list)  # per minute, per pool
    unservable_output_tokens: int = 0  # demand no allowed option serves within SLO
    over_capacity_minutes: int = 0  # minutes whose demand exceeds every pool at max_replicas


@dataclass(frozen=True)
class _Unit:
    pool: str
    price: float
    low: int
    high: int


def lower_bound(
    spec: FleetSpec,
    requests: Sequence[MixedRequest],
    *,
    catalog: Catalog,
    perf: PerformanceModel,
    horizon_s: float,
) -> LowerBound:
    """The bound for ``requests`` served by ``spec``'s pools over ``[0, horizon_s)``."""
    capacity = Capacity(spec, catalog, perf)
    units_free, units_floor = _units(spec, capacity)
    by_minute: dict[int, list[GroupDemand]] = defaultdict(list)
    for demand in minute_demand(requests):
        by_minute[demand.minute].append(demand)
    minutes = max(1, math.ceil(horizon_s / MINUTE_S))
    result = LowerBound(usd=0.0, usd_with_min_replicas=0.0, minutes=minutes)
    for minute in range(minutes):
        # The last minute counts for the part of it inside the horizon.
        share = min(MINUTE_S, horizon_s - minute * MINUTE_S) / 3600.0
        groups = by_minute.get(minute, [])
        free, counts, dropped, over = _solve(spec, capacity, groups, units_free)
        floor, _, _, over_floor = _solve(spec, capacity, groups, units_floor)
        result.usd += free * share
        result.usd_with_min_replicas += floor * share
        result.per_minute_usd_per_hour.append(free)
        result.instances.append(counts)
        result.unservable_output_tokens += dropped
        result.over_capacity_minutes += int(over or over_floor)
    return result


def _units(spec: FleetSpec, capacity: Capacity) -> tuple[list[_Unit], list[_Unit]]:
    free: list[_Unit] = []
    floor: list[_Unit] = []
    for pool in spec.pools:
        record = capacity.record(pool)
        on_demand = record.on_demand_usd_per_hour or 0.0
        if pool.spot:
            base = min(pool.on_demand_base, pool.max_replicas)
            spot = record.spot_usd_per_hour or 0.0
            parts = [(on_demand, base, min(pool.min_replicas, base))]
            rest_low = max(0, pool.min_replicas - base)
            parts.append((spot, pool.max_replicas - base, rest_low))
        else:
            parts = [(on_demand, pool.max_replicas, pool.min_replicas)]
        for price, high, low in parts:
            if high <= 0:
                continue
            free.append(_Unit(pool.name, price, 0, high))
            floor.append(_Unit(pool.name, price, low, high))
    return free, floor


def _solve(
    spec: FleetSpec, capacity: Capacity, groups: Sequence[GroupDemand], units: Sequence[_Unit]
) -> tuple[float, dict[str, float], int, bool]:
    """(USD/hour, instances per pool, output tokens left out, over capacity) for one minute."""
    floor_cost = sum(u.price * u.low for u in units)
    floor_counts: dict[str, float] = defaultdict(float)
    for u in units:
        floor_counts[u.pool] += u.low
    pools = {p.name: p for p in spec.pools}
    pool_names = sorted({u.pool for u in units})
    arcs: list[tuple[int, str, float]] = []  # (group index, pool, tokens/s per instance)
    served: list[GroupDemand] = []
    dropped = 0
    for demand in groups:
        options = []
        for name in pool_names:
            pool = pools[name]
            if pool.serves.model != demand.model:
                continue
            if not pool_may_serve(spec, pool, demand.slo_class, demand.tenant):
                continue
            rate = capacity.tokens_per_s(pool, demand.slo_class, demand.workload)
            if rate:
                options.append((name, rate))
        if not options:
            dropped += demand.output_tokens
            continue
        for name, rate in options:
            arcs.append((len(served), name, rate))
        served.append(demand)
    if not served:
        return floor_cost, dict(floor_counts), dropped, False

    n_units, n_arcs = len(units), len(arcs)
    cost = np.concatenate([[u.price for u in units], np.zeros(n_arcs)])
    integrality = np.concatenate([np.ones(n_units), np.zeros(n_arcs)])
    rows: list[np.ndarray] = []
    lows: list[float] = []
    highs: list[float] = []
    for g, demand in enumerate(served):  # every group served
        row = np.zeros(n_units + n_arcs)
        for a, (group, _, _) in enumerate(arcs):
            if group == g:
                row[n_units + a] = 1.0
        rows.append(row)
        lows.append(demand.output_tokens_per_s)
        highs.append(demand.output_tokens_per_s)
    for name in pool_names:  # busy time within the pool's instances
        row = np.zeros(n_units + n_arcs)
        for a, (_, pool, rate) in enumerate(arcs):
            if pool == name:
                row[n_units + a] = 1.0 / rate
        for k, u in enumerate(units):
            if u.pool == name:
                row[k] = -1.0
        rows.append(row)
        lows.append(-np.inf)
        highs.append(0.0)
    constraints = LinearConstraint(np.array(rows), np.array(lows), np.array(highs))
    low = np.concatenate([[u.low for u in units], np.zeros(n_arcs)])
    for over in (False, True):
        high = np.concatenate(
            [[np.inf if over else u.high for u in units], np.full(n_arcs, np.inf)]
        )
        solution = milp(
            cost,
            integrality=integrality,
            bounds=Bounds(low, high),
            constraints=constraints,
        )
        if solution.success:
            counts: dict[str, float] = defaultdict(float)
            for k, u in enumerate(units):
                counts[u.pool] += float(round(solution.x[k]))
            return float(solution.fun), dict(counts), dropped, over
    raise RuntimeError("lower bound: the integer program has no solution even without maxima")
