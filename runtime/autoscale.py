"""The autoscaler: how many replicas each pool should run, as a plan with reasons.

This module owns the scaling *decision* and nothing else. Every period the caller (the
controller's loop, or the simulator) builds a :class:`FleetSignals` snapshot and calls
:meth:`Autoscaler.plan`; the answer is a :class:`ScalingPlan` (desired replicas per pool, each
with the reasons that produced it). Appliers in the controller carry plans out; nothing here
starts a process or calls a cloud. Time comes in with the signals, so the same code runs on the
wall clock and on the simulator's virtual clock.

How one period is decided, per model (pools serving the same model share its demand):

1. **Demand**, in concurrent requests: the larger of what is in flight now (running plus
   queued, the reactive signal) and the forecast arrival rate at ``now + lead`` times the mean
   time a request stays in the system (Little's law), where ``lead`` is the slowest cold start
   among the model's pools plus one period: capacity ordered now is ready when that demand
   arrives. It is split over the SLO classes in proportion to what each has in flight.
2. **Hysteresis**: demand is compared with the capacity the model has (slots of the replicas
   already requested) at ``target_utilization``; inside the band ``target x (1 +- hysteresis)``
   the model keeps its replicas. SLO attainment below ``slo_floor`` with work queued and the
   pools busy forces a replica more on the cheapest pool the most constrained class may use
   (misses of an idle fleet are not a capacity problem).
3. **Allocation**, cheapest capacity first: every pool keeps its ``min_replicas``; each class's
   share goes to the pools it may use (on-demand unless ``spot_eligible``, a variant of at
   least its ``min_quality``) by USD per slot, the most constrained class first, so flexible
   work does not take the only slots constrained work could use. A tenant that had work within
   the scale-down window keeps at least one replica on a pool it is allowed on. A spot pool
   that lost capacity recently gets no new replicas until ``spot_retry_s`` has passed: its
   share goes to its ``fallback_pool``, and moves back when the retry comes. Spot pools in use
   get ``spot_overprovision`` extra replicas as a hedge against the next preemption.
4. **Per pool damping**: scale-ups wait ``scale_up_cooldown_s`` after the previous one and add
   at most ``max_step``; scale-downs follow the largest desired count seen over the last
   ``scale_down_cooldown_s`` (a stabilisation window, so a dip does not drop capacity that the
   next minute needs), and a pool only goes to zero when the forecast over its cold start is
   zero too.
5. **Budgets**: pools whose every allowed tenant is over its monthly USD budget may not grow;
   if the plan's hourly cost exceeds what the fleet budget leaves for the rest of the month,
   the most expensive capacity is trimmed first, never below ``min_replicas``.
6. **Clamping** to ``min_replicas .. max_replicas`` is the last step, always.

The autoscaler's memory (cooldown times, the stabilisation window, spot back-off, forecaster
state) is a plain dict via :meth:`Autoscaler.dump_state` / :meth:`Autoscaler.load_state`, so a
restarted controller resumes where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from runtime.spec import AutoscalingSpec, FleetSpec, ForecastSpec, PoolSpec, Quality

__all__ = [
    "ArrivalForecaster",
    "Autoscaler",
    "ClassFacts",
    "FleetSignals",
    "ModelSignals",
    "PoolDecision",
    "PoolFacts",
    "PoolSignals",
    "ScalingPlan",
    "pool_facts_from_spec",
    "pools_frozen_by_tenant_budgets",
]

# A pool's desired count below this much demand (in concurrent requests) is zero demand: the
# forecast of an idle series decays towards zero but never reaches it.
IDLE_DEMAND = 0.05


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True, slots=True)
class PoolFacts:
    """What the autoscaler needs to know of a pool that does not change between periods."""

    name: str
    model: str
    min_replicas: int
    max_replicas: int
    usd_per_hour: float  # what one more replica costs (spot price for a spot pool)
    slots_per_replica: float  # concurrent requests one replica serves within its SLO
    cold_start_s: float
    spot: bool = False
    fallback_pool: str | None = None
    quality: int = 0  # the served variant's Quality (a class's min_quality must not exceed it)
    tenants: frozenset[str] | None = None  # tenants allowed on the pool; None: every tenant

    @property
    def usd_per_slot_hour(self) -> float:
        return self.usd_per_hour / max(self.slots_per_replica, 1e-9)


@dataclass(frozen=True, slots=True)
class ClassFacts:
    """What an SLO class allows of the pools that serve it."""

    name: str
    spot_eligible: bool = True
    min_quality: int = 0


@dataclass(frozen=True, slots=True)
class PoolSignals:
    """One pool's state at the start of a period."""

    requested: int  # replicas the applier was last asked for (the plan's "current")
    ready: int = 0  # replicas serving now
    lost: int = 0  # replicas lost since the last period (spot notices, agents that vanished)
    queued: int = 0
    slots_per_replica: float | None = None  # measured, overrides the facts' estimate


@dataclass(frozen=True, slots=True)
class ModelSignals:
    """Demand for one model, summed over its pools, over the last period."""

    in_flight: float = 0.0  # running + queued requests now
    by_class: Mapping[str, float] = field(default_factory=dict)  # in flight per SLO class
    tenants: frozenset[str] = frozenset()  # tenants with work in flight or arriving
    arrivals_per_s: float = 0.0
    mean_service_s: float | None = None  # mean time in system; None: estimated from Little's law
    slo_attainment: float | None = None  # non-sheddable classes, fraction of requests in SLO
    queued: int = 0


@dataclass(frozen=True, slots=True)
class FleetSignals:
    """Everything one planning period looks at."""

    now: float
    pools: Mapping[str, PoolSignals]
    models: Mapping[str, ModelSignals]
    fleet_usd_per_hour_left: float | None = None  # budget left / hours left in the month
    frozen_pools: Mapping[str, str] = field(default_factory=dict)  # pool -> why it may not grow
    # model -> the placement (runtime.placement) loading a copy of it on an existing node: its
    # pools' scale-up waits for that capacity this period.
    placement: Mapping[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Output


@dataclass(frozen=True, slots=True)
class PoolDecision:
    pool: str
    current: int
    desired: int
    reasons: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return self.desired != self.current


@dataclass(frozen=True, slots=True)
class ScalingPlan:
    """Desired replicas per pool, with the reasons, for one period."""

    at: float
    decisions: Mapping[str, PoolDecision]
    demand: Mapping[str, float]  # per model, concurrent requests planned for
    forecast_arrivals_per_s: Mapping[str, float]  # per model, at now + lead
    usd_per_hour: float

    @property
    def replicas(self) -> dict[str, int]:
        return {name: d.desired for name, d in self.decisions.items()}

    def changes(self) -> list[PoolDecision]:
        return [d for d in self.decisions.values() if d.changed]

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "usd_per_hour": round(self.usd_per_hour, 6),
            "demand": {m: round(v, 4) for m, v in self.demand.items()},
            "forecast_arrivals_per_s": {
                m: round(v, 4) for m, v in self.forecast_arrivals_per_s.items()
            },
            "pools": {
                name: {"current": d.current, "desired": d.desired, "reasons": list(d.reasons)}
                for name, d in self.decisions.items()
            },
        }


# --------------------------------------------------------------------------------------------
# Forecast


class ArrivalForecaster:
    """Additive Holt-Winters over one arrival-rate series sampled once per period.

    Written out rather than taken from statsmodels because the controller needs an *online*
    update (one observation per period, O(1)) whose state is a few floats it can persist;
    statsmodels' ExponentialSmoothing refits the whole history on every call. With less than
    two seasons of history the seasonal term is left out (damped Holt linear trend).
    ``seasonal-naive`` predicts the value one season before the target time (the last value
    until a season has passed); ``none`` predicts nothing, leaving the autoscaler reactive.
    """

    def __init__(
        self,
        spec: ForecastSpec,
        period_s: float,
        *,
        alpha: float = 0.5,
        beta: float = 0.3,
        gamma: float = 0.1,
        damping: float = 0.95,
    ) -> None:
        self.method = spec.method
        self.period_s = period_s
        self.season = max(2, round(spec.season_s / period_s))
        self.alpha, self.beta, self.gamma, self.damping = alpha, beta, gamma, damping
        self.level: float | None = None
        self.trend = 0.0
        self.seasonal: list[float] = [0.0] * self.season
        self.count = 0
        self.history: list[float] = []  # the last `season` observations (seasonal-naive)

    def observe(self, rate: float) -> None:
        rate = max(0.0, rate)
        slot = self.count % self.season
        self.history.append(rate)
        if len(self.history) > self.season:
            del self.history[0]
        if self.level is None:
            self.level = rate
        else:
            seasonal = self.seasonal[slot] if self.count >= self.season else 0.0
            previous = self.level
            self.level = self.alpha * (rate - seasonal) + (1 - self.alpha) * (
                previous + self.damping * self.trend
            )
            self.trend = (
                self.beta * (self.level - previous) + (1 - self.beta) * self.damping * self.trend
            )
            if self.count >= self.season:
                self.seasonal[slot] = self.gamma * (rate - self.level) + (1 - self.gamma) * seasonal
        self.count += 1
        if self.count == self.season:
            # The classic initialisation: after one whole season the level is its mean and each
            # slot's seasonal term its deviation from that mean.
            mean = sum(self.history) / len(self.history)
            self.level = mean
            self.seasonal = [value - mean for value in self.history]

    def forecast(self, horizon_s: float) -> float:
        """Predicted arrival rate ``horizon_s`` after the last observation."""
        if self.method == "none" or self.level is None:
            return 0.0
        steps = max(1, round(horizon_s / self.period_s))
        if self.method == "seasonal-naive":
            if self.count < self.season:
                return self.history[-1]
            return self.history[(steps - 1) % self.season]
        # Sum of damping^1..damping^steps: how much of the trend survives `steps` periods.
        if self.damping == 1.0:
            trend_weight = float(steps)
        else:
            trend_weight = self.damping * (1 - self.damping**steps) / (1 - self.damping)
        value = self.level + trend_weight * self.trend
        if self.count >= 2 * self.season:
            value += self.seasonal[(self.count - 1 + steps) % self.season]
        return max(0.0, value)

    def dump(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "trend": self.trend,
            "seasonal": list(self.seasonal),
            "count": self.count,
            "history": list(self.history),
        }

    def load(self, state: Mapping[str, Any]) -> None:
        self.level = state["level"]
        self.trend = float(state["trend"])
        seasonal = [float(v) for v in state["seasonal"]]
        if len(seasonal) == self.season:  # a changed season length starts the seasons afresh
            self.seasonal = seasonal
        self.count = int(state["count"])
        self.history = [float(v) for v in state["history"]][-self.season :]


# --------------------------------------------------------------------------------------------
# The autoscaler


@dataclass(slots=True)
class _PoolMemory:
    last_up_at: float = -math.inf
    last_change_at: float = -math.inf
    window: list[tuple[float, int]] = field(default_factory=list)  # (time, raw desired)
    watched_since: float | None = None  # first period this autoscaler planned the pool
    spot_lost_at: float = -math.inf
    displaced: bool = False  # lost spot capacity whose share sits on the fallback


@dataclass(slots=True)
class _ModelMemory:
    forecaster: ArrivalForecaster
    service_s: float | None = None  # smoothed Little's-law estimate


class Autoscaler:
    """Plans replica counts; holds only the memory that damping and forecasting need."""

    def __init__(
        self,
        settings: AutoscalingSpec,
        pools: Sequence[PoolFacts],
        classes: Sequence[ClassFacts] = (),
    ) -> None:
        self.settings = settings
        self.pools = {p.name: p for p in pools}
        self.classes = {c.name: c for c in classes}
        self._tenant_seen: dict[tuple[str, str], float] = {}  # (model, tenant) -> last seen
        self._pool_memory = {p.name: _PoolMemory() for p in pools}
        self._model_memory: dict[str, _ModelMemory] = {}
        for pool in pools:
            if pool.model not in self._model_memory:
                forecaster = ArrivalForecaster(settings.forecast, settings.period_s)
                self._model_memory[pool.model] = _ModelMemory(forecaster)

    @classmethod
    def from_spec(
        cls, spec: FleetSpec, slots: Mapping[str, float] | None = None, catalog: Any = None
    ) -> Autoscaler:
        classes = [
            ClassFacts(c.name, c.spot_eligible, int(Quality[c.min_quality]))
            for c in spec.slo_classes
        ]
        return cls(
            spec.autoscaling, pool_facts_from_spec(spec, slots=slots, catalog=catalog), classes
        )

    # -- planning ------------------------------------------------------------------------------

    def plan(self, signals: FleetSignals) -> ScalingPlan:
        """The plan for this period. Updates the forecasters and the damping memory."""
        now = signals.now
        reasons: dict[str, list[str]] = {name: [] for name in self.pools}
        current = {
            name: (signals.pools[name].requested if name in signals.pools else facts.min_replicas)
            for name, facts in self.pools.items()
        }
        ready = {
            name: (signals.pools[name].ready if name in signals.pools else 0) for name in self.pools
        }
        self._note_spot_losses(signals, reasons)
        slots = {
            name: self._slots(facts, signals.pools.get(name)) for name, facts in self.pools.items()
        }

        raw: dict[str, int] = {}
        demand_by_model: dict[str, float] = {}
        forecast_by_model: dict[str, float] = {}
        for model, pool_names in self._pools_by_model().items():
            model_signals = signals.models.get(model, ModelSignals())
            demand, forecast, why = self._demand(model, pool_names, model_signals)
            demand_by_model[model] = demand
            forecast_by_model[model] = forecast
            allocation = self._allocate(
                pool_names, demand, model, model_signals, current, ready, slots, now, reasons
            )
            for name in pool_names:
                if why and allocation[name] != current[name]:
                    reasons[name].extend(why)
            raw.update(allocation)

        desired = {
            name: self._damp(self.pools[name], current[name], raw[name], now, reasons[name])
            for name in self.pools
        }
        self._apply_budgets(desired, current, slots, signals, reasons)
        held: set[str] = set()
        for name, facts in self.pools.items():
            relief = signals.placement.get(facts.model)
            if relief is not None and desired[name] > current[name]:
                reasons[name].append(f"scale-up {current[name]} -> {desired[name]} held: {relief}")
                desired[name] = current[name]
                held.add(name)
        for name, facts in self.pools.items():
            clamped = min(max(desired[name], facts.min_replicas), facts.max_replicas)
            if clamped != desired[name]:
                bound = "min_replicas" if clamped > desired[name] else "max_replicas"
                reasons[name].append(f"clamped {desired[name]} to {bound} {clamped}")
            desired[name] = clamped
            memory = self._pool_memory[name]
            if clamped > current[name]:
                memory.last_up_at = now
            if clamped != current[name]:
                memory.last_change_at = now

        decisions = {
            name: PoolDecision(
                pool=name,
                current=current[name],
                desired=desired[name],
                reasons=(
                    tuple(reasons[name]) if desired[name] != current[name] or name in held else ()
                ),
            )
            for name in self.pools
        }
        cost = sum(desired[n] * f.usd_per_hour for n, f in self.pools.items())
        return ScalingPlan(
            at=now,
            decisions=decisions,
            demand=demand_by_model,
            forecast_arrivals_per_s=forecast_by_model,
            usd_per_hour=cost,
        )

    def _pools_by_model(self) -> dict[str, list[str]]:
        by_model: dict[str, list[str]] = {}
        for facts in self.pools.values():
            by_model.setdefault(facts.model, []).append(facts.name)
        return by_model

    @staticmethod
    def _slots(facts: PoolFacts, signals: PoolSignals | None) -> float:
        if signals is not None and signals.slots_per_replica:
            return signals.slots_per_replica
        return facts.slots_per_replica

    def _note_spot_losses(self, signals: FleetSignals, reasons: dict[str, list[str]]) -> None:
        for name, pool_signals in signals.pools.items():
            facts = self.pools.get(name)
            if facts is not None and facts.spot and pool_signals.lost > 0:
                self._pool_memory[name].spot_lost_at = signals.now
                self._pool_memory[name].displaced = True
                reasons[name].append(f"spot capacity lost: {pool_signals.lost} replica(s)")

    def _spot_unavailable(self, name: str, now: float) -> bool:
        facts = self.pools[name]
        lost_at = self._pool_memory[name].spot_lost_at
        return facts.spot and now - lost_at < self.settings.spot_retry_s

    def _demand(
        self, model: str, pool_names: Sequence[str], signals: ModelSignals
    ) -> tuple[float, float, list[str]]:
        """Concurrent requests to plan for, the forecast arrival rate, and why."""
        memory = self._model_memory[model]
        memory.forecaster.observe(signals.arrivals_per_s)
        service_s = signals.mean_service_s
        if service_s is None and signals.arrivals_per_s > 0 and signals.in_flight > 0:
            # Little's law: in flight = arrival rate x time in system.
            observed = signals.in_flight / signals.arrivals_per_s
            previous = memory.service_s
            service_s = observed if previous is None else 0.7 * previous + 0.3 * observed
        elif service_s is None:
            service_s = memory.service_s
        memory.service_s = service_s

        # Capacity ordered now serves demand one cold start (and one period) from now; the
        # spec's forecast horizon caps how far ahead the forecast is trusted.
        lead = max(self.pools[n].cold_start_s for n in pool_names) + self.settings.period_s
        lead = min(lead, self.settings.forecast.horizon_s)
        forecast = memory.forecaster.forecast(lead)
        predicted = forecast * service_s if service_s is not None and lead > 0 else 0.0
        demand = max(signals.in_flight, predicted)
        why: list[str] = []
        if predicted > signals.in_flight + 1e-9 and predicted > IDLE_DEMAND:
            why.append(
                f"forecast {forecast:.3g} req/s in {lead:.0f} s x {service_s:.3g} s in system "
                f"= {predicted:.3g} in flight (now {signals.in_flight:.3g})"
            )
        return demand, forecast, why

    def _eligible(self, class_name: str | None, order: Sequence[str]) -> list[str]:
        """Pools (in cost order) that may serve ``class_name``: on-demand unless the class is
        spot-eligible, and a variant of at least the class's quality. All pools when none is."""
        facts = self.classes.get(class_name) if class_name is not None else None
        if facts is None:
            return list(order)
        eligible = [
            n
            for n in order
            if (facts.spot_eligible or not self.pools[n].spot)
            and self.pools[n].quality >= facts.min_quality
        ]
        return eligible or list(order)  # never drop demand because no pool fits

    def _allocate(
        self,
        pool_names: Sequence[str],
        demand: float,
        model: str,
        signals: ModelSignals,
        current: Mapping[str, int],
        ready: Mapping[str, int],
        slots: Mapping[str, float],
        now: float,
        reasons: dict[str, list[str]],
    ) -> dict[str, int]:
        settings = self.settings
        target = settings.target_utilization
        capacity = sum(current[n] * slots[n] for n in pool_names)
        needed = demand / target  # slots
        # More replicas help only when the pools are busy: misses of an idle fleet (a prompt
        # too long for any instance to prefill in time) are not a capacity problem.
        slo_short = (
            signals.slo_attainment is not None
            and signals.slo_attainment < settings.slo_floor
            and signals.queued > 0
            and needed >= capacity * (1 - settings.hysteresis)
        )
        # A spot loss, or the end of its back-off, re-plans the model even inside the band:
        # the share moves to the fallback and back regardless of total demand.
        spot_trouble = any(
            self._pool_memory[n].displaced or (self._spot_unavailable(n, now) and current[n] > 0)
            for n in pool_names
        )
        tenants = self._recent_tenants(model, signals.tenants, now)
        stranded = any(
            not any(current[n] > 0 for n in self._tenant_pools(t, pool_names)) for t in tenants
        )
        within_band = (
            capacity * (1 - settings.hysteresis) <= needed <= capacity * (1 + settings.hysteresis)
        )
        if within_band and capacity > 0 and not (slo_short or spot_trouble or stranded):
            return {n: current[n] for n in pool_names}

        order = sorted(pool_names, key=lambda n: (self.pools[n].usd_per_slot_hour, n))
        alloc = {n: self.pools[n].min_replicas for n in pool_names}
        for name in pool_names:
            if self._spot_unavailable(name, now):
                # Keep the replicas that survived (they are the cheapest capacity there is),
                # add none on a market that just took ours away.
                alloc[name] = min(ready[name], self.pools[name].max_replicas)

        def room(name: str) -> int:
            if self._spot_unavailable(name, now):
                return 0
            return self.pools[name].max_replicas - alloc[name]

        # Demand per class, in proportion to what is in flight per class now; the most
        # constrained classes (fewest pools may serve them) are placed first, each on the
        # cheapest capacity it may use, so that flexible work does not take the only slots
        # the constrained work could have used.
        counted = {c: v for c, v in signals.by_class.items() if v > 0}
        total = sum(counted.values())
        shares: dict[str | None, float] = (
            {c: demand * v / total for c, v in counted.items()} if total else {None: demand}
        )
        eligible = {c: self._eligible(c, order) for c in shares}
        free = {n: alloc[n] * slots[n] for n in pool_names}  # slots not yet spoken for
        shortfall = 0.0
        for class_name in sorted(shares, key=lambda c: (len(eligible[c]), c or "")):
            need = shares[class_name] / target
            for name in eligible[class_name]:
                used = min(free[name], need)
                free[name] -= used
                need -= used
            label = f" of {class_name}" if class_name is not None else ""
            why = (
                f"demand {shares[class_name]:.3g} in flight{label} at {target:.0%} target "
                f"utilisation (capacity now {capacity:.3g} slots)"
            )
            for name in self._with_fallbacks(eligible[class_name], now):
                if need <= 1e-9:
                    break
                take = min(room(name), math.ceil(need / slots[name] - 1e-9))
                if take > 0:
                    alloc[name] += take
                    free[name] += take * slots[name]
                    used = min(free[name], need)
                    free[name] -= used
                    need -= used
                    reasons[name].append(why)
            shortfall += max(0.0, need)

        if slo_short:
            first = min(shares, key=lambda c: (len(eligible[c]), c or ""))
            target_pool = next((n for n in eligible[first] if room(n) > 0), None)
            if target_pool is not None and alloc[target_pool] <= current[target_pool]:
                alloc[target_pool] = current[target_pool] + 1
                reasons[target_pool].append(
                    f"SLO attainment {signals.slo_attainment:.1%} below "
                    f"{settings.slo_floor:.0%} with {signals.queued} queued"
                )
        for tenant in sorted(tenants):
            allowed = self._tenant_pools(tenant, order)
            if allowed and not any(alloc[n] > 0 for n in allowed):
                keep = next((n for n in allowed if room(n) > 0), None)
                if keep is not None:
                    alloc[keep] += 1
                    reasons[keep].append(
                        f"keeps a replica for tenant {tenant}, who may use only "
                        f"{', '.join(allowed)}"
                    )
        if shortfall > 1e-9:
            for name in pool_names:
                reasons[name].append(f"{shortfall:.3g} slots short: every pool at max_replicas")
        for name in pool_names:
            if self._pool_memory[name].displaced and not self._spot_unavailable(name, now):
                self._pool_memory[name].displaced = False
                reasons[name].append("spot retry: its share moves back from the fallback")
        for name in pool_names:
            facts = self.pools[name]
            extra = settings.spot_overprovision
            if facts.spot and extra and alloc[name] > 0 and not self._spot_unavailable(name, now):
                alloc[name] += extra
                reasons[name].append(f"+{extra} spot over-provision against preemption")
        return alloc

    def _tenant_pools(self, tenant: str, names: Sequence[str]) -> list[str]:
        return [
            n for n in names if self.pools[n].tenants is None or tenant in self.pools[n].tenants
        ]

    def _recent_tenants(self, model: str, now_active: frozenset[str], now: float) -> set[str]:
        """Tenants with work for ``model`` within the scale-down window: each keeps at least
        one replica it may use, so a quiet minute never strands a tenant restricted to pools
        that would otherwise scale to zero (and make it wait a cold start)."""
        for tenant in now_active:
            self._tenant_seen[(model, tenant)] = now
        horizon = now - self.settings.scale_down_cooldown_s
        return {t for (m, t), seen in self._tenant_seen.items() if m == model and seen >= horizon}

    def _with_fallbacks(self, order: Sequence[str], now: float) -> list[str]:
        """Cost order, except that an unavailable spot pool's named fallback takes its place."""
        result: list[str] = []
        for name in order:
            fallback = self.pools[name].fallback_pool
            unavailable = self._spot_unavailable(name, now)
            if unavailable and fallback in self.pools and fallback not in result:
                result.append(fallback)
            if name not in result:
                result.append(name)
        return result

    def _damp(self, facts: PoolFacts, current: int, raw: int, now: float, why: list[str]) -> int:
        settings = self.settings
        memory = self._pool_memory[facts.name]
        memory.window.append((now, raw))
        if memory.watched_since is None:
            memory.watched_since = now
        horizon = now - settings.scale_down_cooldown_s
        memory.window = [(t, n) for t, n in memory.window if t >= horizon]
        if raw > current:
            since = now - memory.last_up_at
            if since < settings.scale_up_cooldown_s:
                why.append(
                    f"scale-up to {raw} held: cooldown ({since:.0f} of "
                    f"{settings.scale_up_cooldown_s:.0f} s)"
                )
                return current
            if raw - current > settings.max_step:
                why.append(f"step limited to +{settings.max_step} (wanted {raw})")
                return current + settings.max_step
            return raw
        if raw < current:
            # The stabilisation window: scale down only to the most that any period in the
            # last scale_down_cooldown_s wanted (the period just planned included).
            floor = max(n for _, n in memory.window)
            # A window not yet watched in full (a restarted controller) knows too little.
            watched = now - memory.watched_since >= settings.scale_down_cooldown_s
            if floor >= current or not watched:
                return current
            held = f" (wanted {raw}; the most wanted in the last " if floor > raw else ""
            if held:
                held += f"{settings.scale_down_cooldown_s:.0f} s)"
            why.append(f"scale down to {floor}{held}")
            if floor == 0:
                why.append(f"scale to zero; a cold start takes {facts.cold_start_s:.0f} s")
            return floor
        return current

    def _apply_budgets(
        self,
        desired: dict[str, int],
        current: Mapping[str, int],
        slots: Mapping[str, float],
        signals: FleetSignals,
        reasons: dict[str, list[str]],
    ) -> None:
        for name, why in signals.frozen_pools.items():
            if name in desired and desired[name] > current[name]:
                reasons[name].append(f"held at {current[name]}: {why}")
                desired[name] = current[name]
        limit = signals.fleet_usd_per_hour_left
        if limit is None:
            return
        cost = sum(desired[n] * f.usd_per_hour for n, f in self.pools.items())
        if cost <= limit + 1e-9:
            return
        dearest_first = sorted(self.pools, key=lambda n: -self.pools[n].usd_per_slot_hour)
        trimmed: list[str] = []
        for name in dearest_first:
            facts = self.pools[name]
            while cost > limit + 1e-9 and desired[name] > facts.min_replicas:
                desired[name] -= 1
                cost -= facts.usd_per_hour
                if name not in trimmed:
                    trimmed.append(name)
        note = f"fleet budget: ${limit:.2f}/h left for the rest of the month, plan ${cost:.2f}/h"
        for name in trimmed:
            reasons[name].append(f"{note} (dearest capacity trimmed first)")
        if cost > limit + 1e-9:
            for name in self.pools:
                reasons[name].append(f"{note}: min_replicas alone exceed it")

    # -- state -----------------------------------------------------------------------------

    def dump_state(self) -> dict[str, Any]:
        """The memory as JSON-able data (persist it; :meth:`load_state` restores it)."""

        def finite(value: float) -> float | None:
            return value if math.isfinite(value) else None

        return {
            "pools": {
                name: {
                    "last_up_at": finite(m.last_up_at),
                    "last_change_at": finite(m.last_change_at),
                    "window": [list(entry) for entry in m.window],
                    "spot_lost_at": finite(m.spot_lost_at),
                    "watched_since": m.watched_since,
                    "displaced": m.displaced,
                }
                for name, m in self._pool_memory.items()
            },
            "models": {
                model: {"service_s": m.service_s, "forecaster": m.forecaster.dump()}
                for model, m in self._model_memory.items()
            },
            "tenants_seen": [[m, t, seen] for (m, t), seen in self._tenant_seen.items()],
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`dump_state` output; pools and models no longer declared are ignored."""

        def time_or_never(value: float | None) -> float:
            return -math.inf if value is None else float(value)

        for name, saved in state.get("pools", {}).items():
            memory = self._pool_memory.get(name)
            if memory is None:
                continue
            memory.last_up_at = time_or_never(saved.get("last_up_at"))
            memory.last_change_at = time_or_never(saved.get("last_change_at"))
            memory.window = [(float(t), int(n)) for t, n in saved.get("window", [])]
            memory.spot_lost_at = time_or_never(saved.get("spot_lost_at"))
            memory.watched_since = saved.get("watched_since")
            memory.displaced = bool(saved.get("displaced", False))
        for model, tenant, seen in state.get("tenants_seen", []):
            self._tenant_seen[(str(model), str(tenant))] = float(seen)
        for model, saved in state.get("models", {}).items():
            model_memory = self._model_memory.get(model)
            if model_memory is None:
                continue
            model_memory.service_s = saved.get("service_s")
            model_memory.forecaster.load(saved["forecaster"])


# --------------------------------------------------------------------------------------------
# From the spec


def pool_facts_from_spec(
    spec: FleetSpec,
    *,
    slots: Mapping[str, float] | None = None,
    catalog: Any = None,
    default_slots: float = 8.0,
) -> list[PoolFacts]:
    """Facts for every pool: marginal price from the catalog, slots from ``slots`` or the
    cost model (the batch the roofline says meets the strictest SLO class the pool can serve),
    else ``default_slots``."""
    from runtime.catalog import default_catalog
    from runtime.costmodel import Slo, Workload, evaluate
    from runtime.plan import tenant_may_use

    catalog = catalog if catalog is not None else default_catalog()
    given = dict(slots or {})
    facts: list[PoolFacts] = []
    for pool in spec.pools:
        ref = pool.price_ref
        record = catalog.get(ref.cloud, ref.region, ref.instance_type)
        price = _marginal_price(pool, record)
        model, variant = spec.pool_variant(pool)
        pool_slots = given.get(pool.name)
        if pool_slots is None and pool.cloud != "local":
            classes = [c for c in spec.slo_classes if not pool.spot or c.spot_eligible]
            strictest = min(classes or spec.slo_classes, key=lambda c: c.tpot_ms)
            option = evaluate(
                model,
                variant,
                record,
                workload=Workload(),
                slo=Slo(ttft_s=strictest.ttft_ms / 1000, tpot_s=strictest.tpot_ms / 1000),
                spot=pool.spot,
                planning_margin=spec.routing.slo_headroom,
            )
            if option is not None:
                pool_slots = float(option.batch * option.replicas_per_instance)
        facts.append(
            PoolFacts(
                name=pool.name,
                model=model.name,
                min_replicas=pool.min_replicas,
                max_replicas=pool.max_replicas,
                usd_per_hour=price,
                slots_per_replica=pool_slots if pool_slots else default_slots,
                cold_start_s=pool.cold_start_s,
                spot=pool.spot,
                fallback_pool=pool.fallback_pool,
                quality=int(Quality[variant.quality]),
                tenants=frozenset(
                    t.name for t in spec.tenants if tenant_may_use(spec, t.name, pool)
                )
                if spec.tenants
                else None,
            )
        )
    return facts


def _marginal_price(pool: PoolSpec, record: Any) -> float:
    if pool.spot and record.spot_usd_per_hour is not None:
        return float(record.spot_usd_per_hour)
    return float(record.on_demand_usd_per_hour or 0.0)


def pools_frozen_by_tenant_budgets(spec: FleetSpec, over_budget: Iterable[str]) -> dict[str, str]:
    """Pools every one of whose allowed tenants is over its monthly budget: they may not grow.

    A pool nobody is allowed on, or one a within-budget tenant may use, is not frozen.
    """
    from runtime.plan import tenant_may_use

    spent = set(over_budget)
    frozen: dict[str, str] = {}
    for pool in spec.pools:
        users = [t.name for t in spec.tenants if tenant_may_use(spec, t.name, pool)]
        if users and all(u in spent for u in users):
            frozen[pool.name] = "every tenant allowed on it is over its monthly budget (" + (
                ", ".join(sorted(users)) + ")"
            )
    return frozen
