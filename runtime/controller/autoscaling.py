"""The controller's side of autoscaling: signals in, plans out, appliers that carry them out.

This module owns

* :class:`SignalCollector`, which turns what agents push (the fleet state: queues, health, and
  each agent's cumulative per-class counters) into the :class:`runtime.autoscale.FleetSignals`
  of one period: arrival rates and SLO attainment from counter differences, in-flight work by
  spot eligibility, ready replicas per pool, and spot replicas lost (gone without being asked);
* :class:`AutoscaleLoop`, run every ``autoscaling.period_s`` by the controller application:
  collect, plan with :class:`runtime.autoscale.Autoscaler`, record the decisions, hand the plan
  to the applier, persist the autoscaler's memory;
* the :class:`Applier` protocol and :class:`PulumiApplier`, which writes ``fleetform:replicas``
  into the stack config and runs ``up`` through the Pulumi Automation API behind a small
  :class:`StackDriver` protocol, at most once per interval, with exponential backoff after a
  failure, and never for a plan that changes nothing.

The local applier (agent processes on this machine) lives with the processes it manages, in
:mod:`runtime.controller.local_fleet`; it fetches the latest plan from ``GET /v1/autoscale``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from runtime.autoscale import (
    Autoscaler,
    FleetSignals,
    ModelSignals,
    PoolSignals,
    ScalingPlan,
    pools_frozen_by_tenant_budgets,
)
from runtime.controller.statefile import write_json_atomically
from runtime.protocol import ClassCounters
from runtime.spec import HOURS_PER_MONTH, REPLICAS_CONFIG_KEY, FleetSpec

__all__ = [
    "AppliedPlan",
    "Applier",
    "AutomationStackDriver",
    "AutoscaleLoop",
    "PulumiApplier",
    "SignalCollector",
    "StackDriver",
    "budget_left_per_hour",
]

log = logging.getLogger("fleetform.controller.autoscale")


class AgentLike(Protocol):
    """The parts of :class:`runtime.controller.fleet.AgentRecord` the collector reads."""

    agent_id: str
    boot_id: str
    recent_use: Mapping[str, Any]  # tenant -> runtime.leases.Usage

    @property
    def instance(self) -> Any: ...


# --------------------------------------------------------------------------------------------
# Signals


@dataclass
class _Seen:
    boot_id: str
    counters: dict[str, ClassCounters]


class SignalCollector:
    """Builds one period's :class:`FleetSignals` from the agents' pushes.

    Counters are cumulative per agent process, so a period's arrivals are the differences from
    the previous period; an agent seen for the first time only sets the baseline (after a
    controller restart its lifetime counts are not one period's arrivals), while a new boot of
    a known agent counts from zero.
    """

    def __init__(self, spec: FleetSpec) -> None:
        self.spec = spec
        self._pool_model = {p.name: p.serves.model for p in spec.pools}
        self._spot_pools = {p.name for p in spec.pools if p.spot}
        self._must_meet = {c.name for c in spec.slo_classes if not c.sheddable}
        self._seen: dict[str, _Seen] = {}
        # The last period's finished / ttft_met / tpot_met per SLO class (for the dashboard).
        self.class_deltas: dict[str, ClassCounters] = {}
        self._last_at: float | None = None
        self._last_ready: dict[str, int] = {}
        self._last_requested: dict[str, int] = {}

    def collect(
        self,
        now: float,
        agents: Iterable[AgentLike],
        requested: Mapping[str, int],
        *,
        fleet_usd_per_hour_left: float | None = None,
        frozen_pools: Mapping[str, str] | None = None,
    ) -> FleetSignals:
        """``agents``: the fresh agents; ``requested``: replicas last asked of the applier."""
        elapsed = None if self._last_at is None else max(now - self._last_at, 1e-6)
        ready: dict[str, int] = dict.fromkeys(self._pool_model, 0)
        queued_by_pool: dict[str, int] = dict.fromkeys(self._pool_model, 0)
        models: dict[str, dict[str, float]] = {}
        seen_now: dict[str, _Seen] = {}
        class_deltas: dict[str, list[int]] = {}
        by_class: dict[str, dict[str, float]] = {}
        tenants: dict[str, set[str]] = {}
        for agent in agents:
            snapshot = agent.instance
            pool = snapshot.pool
            if pool not in self._pool_model:
                continue  # an agent of a pool no longer declared
            model = self._pool_model[pool]
            queued = sum(snapshot.queued_requests.values())
            queued_by_pool[pool] += queued
            if snapshot.healthy:
                ready[pool] += 1
            totals = models.setdefault(
                model,
                {"in_flight": 0.0, "admitted": 0.0, "queued": 0.0, "finished": 0.0, "met": 0.0},
            )
            per_class = by_class.setdefault(model, {})
            # Tenants with work here recently: each keeps a replica it may use.
            active = tenants.setdefault(model, set())
            active.update(
                name
                for name, use in getattr(agent, "recent_use", {}).items()
                if use.requests_per_minute > 0 or use.concurrency > 0
            )
            totals["queued"] += queued
            previous = self._seen.get(agent.agent_id)
            counters = dict(snapshot.served)
            seen_now[agent.agent_id] = _Seen(agent.boot_id, counters)
            for name, now_counts in counters.items():
                in_flight = max(0, now_counts.admitted - now_counts.finished)
                totals["in_flight"] += in_flight
                per_class[name] = per_class.get(name, 0.0) + in_flight
                if previous is None:
                    continue  # first sight: a baseline, not a period's worth
                before = (
                    previous.counters.get(name, ClassCounters())
                    if previous.boot_id == agent.boot_id
                    else ClassCounters()
                )
                totals["admitted"] += max(0, now_counts.admitted - before.admitted)
                finished = max(0, now_counts.finished - before.finished)
                ttft_met = min(finished, max(0, now_counts.ttft_met - before.ttft_met))
                tpot_met = min(finished, max(0, now_counts.tpot_met - before.tpot_met))
                deltas = class_deltas.setdefault(name, [0, 0, 0])
                deltas[0] += finished
                deltas[1] += ttft_met
                deltas[2] += tpot_met
                if name in self._must_meet:
                    totals["finished"] += finished
                    totals["met"] += min(ttft_met, tpot_met)
        self._seen = seen_now
        self.class_deltas = {
            name: ClassCounters(finished=f, ttft_met=t, tpot_met=p)
            for name, (f, t, p) in class_deltas.items()
        }

        model_signals: dict[str, ModelSignals] = {}
        for model, totals in models.items():
            model_signals[model] = ModelSignals(
                in_flight=totals["in_flight"],
                by_class=by_class[model],
                tenants=frozenset(tenants[model]),
                arrivals_per_s=totals["admitted"] / elapsed if elapsed else 0.0,
                slo_attainment=totals["met"] / totals["finished"] if totals["finished"] else None,
                queued=int(totals["queued"]),
            )

        pools: dict[str, PoolSignals] = {}
        for pool in self._pool_model:
            asked = requested.get(pool, 0)
            lost = 0
            if pool in self._spot_pools and pool in self._last_ready:
                # Replicas that went away without being asked to: preempted or vanished.
                dropped = self._last_ready[pool] - ready[pool]
                released = max(0, self._last_requested.get(pool, asked) - asked)
                lost = max(0, dropped - released)
            pools[pool] = PoolSignals(
                requested=asked, ready=ready[pool], lost=lost, queued=queued_by_pool[pool]
            )
        self._last_at = now
        self._last_ready = ready
        self._last_requested = dict(requested)
        return FleetSignals(
            now=now,
            pools=pools,
            models=model_signals,
            fleet_usd_per_hour_left=fleet_usd_per_hour_left,
            frozen_pools=dict(frozen_pools or {}),
        )


def budget_left_per_hour(spec: FleetSpec, spent_this_month: float, now: float) -> float | None:
    """What the fleet may spend per hour for the rest of the month (None: no budget).

    The month is the calendar month the ledger bills in (UTC); the budget is per 730-hour
    month, so it is prorated to the hours this month actually has left.
    """
    from runtime.controller.ledger import month_bounds

    if spec.budget is None:
        return None
    start, end = month_bounds(now)
    hours_left = max((end - now) / 3600.0, 1.0)
    month_hours = (end - start) / 3600.0
    budget = spec.budget.usd_per_month * month_hours / HOURS_PER_MONTH
    return max(0.0, budget - spent_this_month) / hours_left


# --------------------------------------------------------------------------------------------
# Appliers


@dataclass(frozen=True, slots=True)
class AppliedPlan:
    """What an applier did with a plan."""

    applied: bool
    replicas: Mapping[str, int]
    detail: str = ""
    error: str | None = None


class Applier(Protocol):
    """Carries out plans. ``apply`` is called from a worker thread, once per period."""

    def apply(self, plan: ScalingPlan) -> AppliedPlan: ...


class PublishOnly:
    """The applier of a controller whose plans another process carries out (``fleetform up``
    polls ``GET /v1/autoscale`` and starts or drains local agents)."""

    def apply(self, plan: ScalingPlan) -> AppliedPlan:
        return AppliedPlan(applied=True, replicas=plan.replicas, detail="published")


class StackDriver(Protocol):
    """The two Automation API operations the Pulumi applier needs."""

    def set_replicas(self, replicas: Mapping[str, int]) -> None: ...

    def up(self) -> str:
        """Run ``pulumi up``; returns a one-line summary; raises on failure."""
        ...


class AutomationStackDriver:
    """:class:`StackDriver` over ``pulumi.automation``: select the stack, set the replicas,
    ``up``. ``pulumi_command`` is injectable (tests pass a scripted ``PulumiCommand``)."""

    def __init__(
        self, work_dir: str | os.PathLike[str], stack_name: str, pulumi_command: Any = None
    ) -> None:
        self.work_dir = str(work_dir)
        self.stack_name = stack_name
        self.pulumi_command = pulumi_command
        self._stack: Any = None

    def _select(self) -> Any:
        if self._stack is None:
            from pulumi import automation

            workspace = automation.LocalWorkspace(
                work_dir=self.work_dir, pulumi_command=self.pulumi_command
            )
            self._stack = automation.Stack.select(self.stack_name, workspace)
        return self._stack

    def set_replicas(self, replicas: Mapping[str, int]) -> None:
        from pulumi import automation

        value = json.dumps(dict(sorted(replicas.items())), separators=(",", ":"))
        self._select().set_all_config({REPLICAS_CONFIG_KEY: automation.ConfigValue(value=value)})

    def up(self) -> str:
        result = self._select().up(on_output=lambda line: log.info("pulumi: %s", line.rstrip()))
        summary = result.summary
        changes = summary.resource_changes or {}
        return f"update {summary.result}: " + (
            ", ".join(f"{k} {v}" for k, v in sorted(changes.items())) or "no changes"
        )


@dataclass
class PulumiApplier:
    """Applies plans as stack updates: only ``fleetform:replicas`` changes, at most once per
    ``min_interval_s``, after a failure not before ``backoff_s x 2^(failures-1)`` (capped at
    ``max_backoff_s``). A plan equal to what was last applied is not applied again; a plan
    that arrives inside the interval waits for the next period's plan (plans are recomputed
    every period, so the newest one is always the one to apply)."""

    driver: StackDriver
    clock: Callable[[], float]
    min_interval_s: float = 300.0
    backoff_s: float = 60.0
    max_backoff_s: float = 3600.0
    applied: dict[str, int] | None = None
    failures: int = 0
    next_allowed_at: float = -math.inf
    history: list[AppliedPlan] = field(default_factory=list)

    def apply(self, plan: ScalingPlan) -> AppliedPlan:
        replicas = dict(plan.replicas)
        now = self.clock()
        if replicas == self.applied:
            return self._note(AppliedPlan(False, replicas, "unchanged"))
        if now < self.next_allowed_at:
            wait = self.next_allowed_at - now
            why = "backoff after a failed update" if self.failures else "rate limit"
            return self._note(AppliedPlan(False, replicas, f"deferred {wait:.0f} s ({why})"))
        try:
            self.driver.set_replicas(replicas)
            summary = self.driver.up()
        except Exception as error:  # any failure of the engine: back off, keep serving
            self.failures += 1
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** (self.failures - 1))
            self.next_allowed_at = now + delay
            message = str(error).strip().splitlines()[-1:] or [type(error).__name__]
            log.warning(
                "pulumi up failed (%d in a row), next try in %.0f s: %s",
                self.failures,
                delay,
                message[0],
            )
            return self._note(AppliedPlan(False, replicas, f"retry in {delay:.0f} s", message[0]))
        self.failures = 0
        self.applied = replicas
        self.next_allowed_at = now + self.min_interval_s
        return self._note(AppliedPlan(True, replicas, summary))

    def _note(self, outcome: AppliedPlan) -> AppliedPlan:
        self.history.append(outcome)
        del self.history[:-100]
        return outcome


# --------------------------------------------------------------------------------------------
# The loop


@dataclass
class AutoscaleLoop:
    """One controller's autoscaling: the collector, the autoscaler, the applier, the memory.

    ``step`` is synchronous and does no I/O besides the applier and the state file, so the
    application runs it in a worker thread; tests call it directly with a fake clock.
    """

    spec: FleetSpec
    autoscaler: Autoscaler
    applier: Applier
    state_path: Path | None = None
    collector: SignalCollector = field(init=False)
    requested: dict[str, int] = field(init=False)
    plans: list[tuple[ScalingPlan, AppliedPlan]] = field(default_factory=list)
    plan_id: int = 0

    def __post_init__(self) -> None:
        self.collector = SignalCollector(self.spec)
        self.requested = {p.name: p.replicas for p in self.spec.pools}
        self._load()

    def step(
        self,
        now: float,
        agents: Iterable[AgentLike],
        *,
        month_usd: float = 0.0,
        over_budget_tenants: Iterable[str] = (),
        placement: Mapping[str, str] | None = None,
    ) -> tuple[ScalingPlan, AppliedPlan]:
        """One period. ``placement`` names the models a placement is loading a copy of
        (:meth:`runtime.controller.placement.PlacementLoop.relieving`)."""
        signals = self.collector.collect(
            now,
            agents,
            self.requested,
            fleet_usd_per_hour_left=budget_left_per_hour(self.spec, month_usd, now),
            frozen_pools=pools_frozen_by_tenant_budgets(self.spec, over_budget_tenants),
        )
        if placement:
            signals = dataclasses.replace(signals, placement=dict(placement))
        plan = self.autoscaler.plan(signals)
        outcome = self.applier.apply(plan)
        if outcome.applied:
            self.requested = dict(outcome.replicas)
        self.plan_id += 1
        self.plans.append((plan, outcome))
        del self.plans[:-50]
        for decision in plan.changes():
            log.info(
                "scale %s %d -> %d (%s): %s",
                decision.pool,
                decision.current,
                decision.desired,
                "applied" if outcome.applied else outcome.detail,
                "; ".join(decision.reasons),
            )
        self._save()
        return plan, outcome

    def latest(self) -> dict[str, Any]:
        """The newest plan and what became of it, as ``GET /v1/autoscale`` answers."""
        if not self.plans:
            return {"plan_id": 0, "requested": dict(self.requested), "plan": None}
        plan, outcome = self.plans[-1]
        return {
            "plan_id": self.plan_id,
            "requested": dict(self.requested),
            "plan": plan.to_json(),
            "outcome": {
                "applied": outcome.applied,
                "detail": outcome.detail,
                "error": outcome.error,
            },
        }

    # The autoscaler's memory and the requested counts survive a controller restart.
    def _save(self) -> None:
        if self.state_path is None:
            return
        data = {"requested": self.requested, "autoscaler": self.autoscaler.dump_state()}
        write_json_atomically(self.state_path, data)

    def _load(self) -> None:
        if self.state_path is None or not self.state_path.exists():
            return
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
            self.autoscaler.load_state(data["autoscaler"])
            for pool, count in data.get("requested", {}).items():
                if pool in self.requested and isinstance(count, int):
                    self.requested[pool] = count
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning(
                "autoscaler state %s not restored (%s); starting afresh", self.state_path, error
            )
