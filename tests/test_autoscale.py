"""The autoscaler, driven with fabricated signal series (no processes, no clock but ours)."""

from __future__ import annotations

import json
import math

import pytest

from runtime.autoscale import (
    ArrivalForecaster,
    Autoscaler,
    ClassFacts,
    FleetSignals,
    ModelSignals,
    PoolFacts,
    PoolSignals,
    pool_facts_from_spec,
    pools_frozen_by_tenant_budgets,
)
from runtime.spec import AutoscalingSpec, ForecastSpec, load_stack_file

PERIOD = 15.0
CLASSES = [ClassFacts("critical", spot_eligible=False), ClassFacts("batch", spot_eligible=True)]


def settings(**overrides: object) -> AutoscalingSpec:
    base: dict[str, object] = {
        "period_s": PERIOD,
        "target_utilization": 0.5,
        "hysteresis": 0.2,
        "scale_up_cooldown_s": 0.0,
        "scale_down_cooldown_s": 0.0,
        "max_step": 100,
        "forecast": {"method": "none"},
    }
    base.update(overrides)
    return AutoscalingSpec.model_validate(base)


def pool(name: str, **overrides: object) -> PoolFacts:
    fields: dict[str, object] = {
        "name": name,
        "model": "m",
        "min_replicas": 0,
        "max_replicas": 10,
        "usd_per_hour": 1.0,
        "slots_per_replica": 4.0,
        "cold_start_s": 60.0,
    }
    fields.update(overrides)
    return PoolFacts(**fields)  # type: ignore[arg-type]


def signals(
    now: float,
    requested: dict[str, int],
    in_flight: float = 0.0,
    *,
    arrivals: float = 0.0,
    service_s: float | None = None,
    lost: dict[str, int] | None = None,
    on_demand: float = 0.0,
    **extra: object,
) -> FleetSignals:
    lost = lost or {}
    return FleetSignals(
        now=now,
        pools={
            name: PoolSignals(requested=n, ready=n - lost.get(name, 0), lost=lost.get(name, 0))
            for name, n in requested.items()
        },
        models={
            "m": ModelSignals(
                in_flight=in_flight,
                # "critical" may not run on spot (CLASSES); the rest of the work is "batch".
                by_class={"critical": on_demand, "batch": in_flight - on_demand}
                if on_demand
                else {},
                arrivals_per_s=arrivals,
                mean_service_s=service_s,
            )
        },
        **extra,  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------------------------
# Reactive: band, cooldown, step, clamp


def test_inside_the_hysteresis_band_nothing_changes_and_outside_it_scales_to_target() -> None:
    scaler = Autoscaler(settings(), [pool("a")])
    # 2 replicas x 4 slots = 8 slots; at 50 % target the band is 3.2 .. 4.8 in flight.
    for in_flight in (3.3, 4.0, 4.7):
        plan = scaler.plan(signals(0, {"a": 2}, in_flight))
        assert plan.replicas == {"a": 2}
        assert plan.changes() == []
    plan = scaler.plan(signals(PERIOD, {"a": 2}, 10.0))
    # 10 in flight / 0.5 = 20 slots = 5 replicas.
    assert plan.replicas == {"a": 5}
    (decision,) = plan.changes()
    assert decision.current == 2
    assert any("demand 10 in flight" in r for r in decision.reasons)


def test_scale_up_cooldown_holds_the_second_step_and_max_step_limits_each_step() -> None:
    scaler = Autoscaler(settings(scale_up_cooldown_s=60.0, max_step=2), [pool("a")])
    first = scaler.plan(signals(0, {"a": 1}, 20.0))  # wants 10
    assert first.replicas == {"a": 3}
    assert any("step limited to +2 (wanted 10)" in r for r in first.decisions["a"].reasons)
    held = scaler.plan(signals(30, {"a": 3}, 20.0))
    assert held.replicas == {"a": 3}
    later = scaler.plan(signals(61, {"a": 3}, 20.0))
    assert later.replicas == {"a": 5}


def test_min_and_max_replicas_clamp_the_plan() -> None:
    scaler = Autoscaler(settings(), [pool("a", min_replicas=2, max_replicas=3)])
    assert scaler.plan(signals(0, {"a": 2}, 100.0)).replicas == {"a": 3}
    assert scaler.plan(signals(PERIOD, {"a": 3}, 0.0)).replicas == {"a": 2}


def test_scale_down_waits_for_the_stabilisation_window() -> None:
    scaler = Autoscaler(settings(scale_down_cooldown_s=60.0), [pool("a", min_replicas=1)])
    assert scaler.plan(signals(0, {"a": 1}, 16.0)).replicas == {"a": 8}
    # Demand falls to 2 in flight (1 replica); the window still holds the 8 wanted at t=0.
    for t in (15, 30, 45, 60):
        assert scaler.plan(signals(t, {"a": 8}, 2.0)).replicas == {"a": 8}, t
    plan = scaler.plan(signals(75, {"a": 8}, 2.0))
    assert plan.replicas == {"a": 1}
    assert "scale down to 1" in plan.decisions["a"].reasons


def test_a_short_dip_inside_the_window_does_not_drop_capacity() -> None:
    scaler = Autoscaler(settings(scale_down_cooldown_s=60.0), [pool("a", min_replicas=1)])
    scaler.plan(signals(0, {"a": 4}, 8.0))
    assert scaler.plan(signals(15, {"a": 4}, 0.0)).replicas == {"a": 4}
    assert scaler.plan(signals(30, {"a": 4}, 8.0)).replicas == {"a": 4}
    # Only after a whole window of low demand does it go down.
    for t in (45, 60, 75):
        assert scaler.plan(signals(t, {"a": 4}, 2.0)).replicas == {"a": 4}
    assert scaler.plan(signals(105, {"a": 4}, 2.0)).replicas == {"a": 1}


# --------------------------------------------------------------------------------------------
# Cost order, on-demand-only work, SLO floor


def test_demand_goes_to_the_cheapest_capacity_per_slot_first() -> None:
    cheap = pool("cheap", usd_per_hour=1.0, slots_per_replica=8.0, max_replicas=2)
    dear = pool("dear", usd_per_hour=1.0, slots_per_replica=2.0)
    scaler = Autoscaler(settings(), [dear, cheap])
    # 12 in flight -> 24 slots: cheap gives 16 at most, dear the other 8 (4 replicas).
    plan = scaler.plan(signals(0, {"cheap": 0, "dear": 0}, 12.0))
    assert plan.replicas == {"cheap": 2, "dear": 4}
    assert plan.usd_per_hour == pytest.approx(6.0)


def test_work_that_may_not_run_on_spot_lands_on_on_demand_pools() -> None:
    spot = pool("spot", usd_per_hour=0.3, spot=True)
    on_demand = pool("od", usd_per_hour=1.0)
    scaler = Autoscaler(settings(), [spot, on_demand], CLASSES)
    # 8 in flight of which 4 may not use spot: 8 slots on-demand, the other 8 on spot.
    plan = scaler.plan(signals(0, {"spot": 0, "od": 0}, 8.0, on_demand=4.0))
    assert plan.replicas == {"spot": 2, "od": 2}


def test_a_class_goes_only_to_pools_of_its_quality_the_constrained_class_first() -> None:
    # "high" work may use only the dear high-quality pool; "any" work fits anywhere.
    low = pool("low", usd_per_hour=0.5, quality=1)
    high = pool("high", usd_per_hour=2.0, quality=2)
    classes = [ClassFacts("high", min_quality=2), ClassFacts("any", min_quality=0)]
    scaler = Autoscaler(settings(), [low, high], classes)
    plan = scaler.plan(
        FleetSignals(
            now=0,
            pools={"low": PoolSignals(requested=0), "high": PoolSignals(requested=0)},
            models={"m": ModelSignals(in_flight=12.0, by_class={"high": 4.0, "any": 8.0})},
        )
    )
    # high: 4 in flight -> 8 slots -> 2 high replicas; any: 16 slots on the cheap pool -> 4.
    assert plan.replicas == {"low": 4, "high": 2}
    assert "demand 4 in flight of high" in plan.decisions["high"].reasons[0]


def test_a_restricted_tenant_keeps_a_replica_through_a_quiet_spell() -> None:
    shared = pool("shared", usd_per_hour=1.0, min_replicas=1, tenants=frozenset({"web"}))
    only = pool("only", usd_per_hour=5.0, tenants=frozenset({"batch-team"}))
    scaler = Autoscaler(settings(scale_down_cooldown_s=60.0), [shared, only])

    def period(t: float, tenants: frozenset[str], requested: dict[str, int]) -> dict[str, int]:
        return scaler.plan(
            FleetSignals(
                now=t,
                pools={n: PoolSignals(requested=c, ready=c) for n, c in requested.items()},
                models={"m": ModelSignals(in_flight=1.0 if tenants else 0.0, tenants=tenants)},
            )
        ).replicas

    team = frozenset({"batch-team"})
    first = scaler.plan(
        FleetSignals(
            now=0,
            pools={"shared": PoolSignals(1, 1), "only": PoolSignals(0, 0)},
            models={"m": ModelSignals(in_flight=1.0, tenants=team)},
        )
    )
    assert first.replicas == {"shared": 1, "only": 1}
    assert "keeps a replica for tenant batch-team, who may use only only" in (
        first.decisions["only"].reasons
    )
    # Quiet for less than the window: the replica stays. The tenant is forgotten at 60 s, and
    # the stabilisation window then holds the replica one window more (it was wanted at 30 s).
    assert period(30, frozenset(), {"shared": 1, "only": 1}) == {"shared": 1, "only": 1}
    assert period(75, frozenset(), {"shared": 1, "only": 1}) == {"shared": 1, "only": 1}
    assert period(91, frozenset(), {"shared": 1, "only": 1}) == {"shared": 1, "only": 0}


def test_slo_misses_of_an_idle_fleet_add_no_replica() -> None:
    scaler = Autoscaler(settings(), [pool("a")])
    # 2 replicas (8 slots), 1 in flight: far below the band; the misses are not for capacity.
    plan = scaler.plan(
        FleetSignals(
            now=0,
            pools={"a": PoolSignals(requested=2, ready=2)},
            models={"m": ModelSignals(in_flight=1.0, slo_attainment=0.5, queued=1)},
        )
    )
    assert plan.replicas == {"a": 1}


def test_slo_attainment_below_the_floor_with_a_queue_adds_a_replica() -> None:
    scaler = Autoscaler(settings(), [pool("a")])
    base = signals(0, {"a": 2}, 4.0)
    degraded = FleetSignals(
        now=0,
        pools=base.pools,
        models={"m": ModelSignals(in_flight=4.0, slo_attainment=0.9, queued=3)},
    )
    plan = scaler.plan(degraded)
    assert plan.replicas == {"a": 3}
    assert any("SLO attainment 90.0% below 99%" in r for r in plan.decisions["a"].reasons)


# --------------------------------------------------------------------------------------------
# Budgets


def test_the_fleet_budget_trims_the_dearest_capacity_first_never_below_min() -> None:
    cheap = pool("cheap", usd_per_hour=1.0, slots_per_replica=4.0, max_replicas=3)
    dear = pool("dear", usd_per_hour=3.0, slots_per_replica=4.0, min_replicas=1)
    scaler = Autoscaler(settings(), [cheap, dear])
    unlimited = scaler.plan(signals(0, {"cheap": 0, "dear": 1}, 20.0))
    assert unlimited.replicas == {"cheap": 3, "dear": 7}
    capped = Autoscaler(settings(), [cheap, dear]).plan(
        signals(0, {"cheap": 0, "dear": 1}, 20.0, fleet_usd_per_hour_left=10.0)
    )
    # 3 x 1 + 2 x 3 = 9 <= 10; one more dear replica would be 12.
    assert capped.replicas == {"cheap": 3, "dear": 2}
    assert capped.usd_per_hour <= 10.0
    assert any("fleet budget: $10.00/h left" in r for r in capped.decisions["dear"].reasons)
    floor = Autoscaler(settings(), [cheap, dear]).plan(
        signals(0, {"cheap": 0, "dear": 1}, 20.0, fleet_usd_per_hour_left=0.5)
    )
    assert floor.replicas == {"cheap": 0, "dear": 1}


def test_pools_frozen_by_tenant_budgets_do_not_grow_but_may_shrink() -> None:
    scaler = Autoscaler(settings(), [pool("a", min_replicas=1)])
    frozen = {"a": "every tenant allowed on it is over its monthly budget (t)"}
    plan = scaler.plan(signals(0, {"a": 2}, 40.0, frozen_pools=frozen))
    assert plan.replicas == {"a": 2}
    shrink = scaler.plan(signals(PERIOD, {"a": 2}, 0.0, frozen_pools=frozen))
    assert shrink.replicas == {"a": 1}


def test_frozen_pools_come_from_the_spec_tenants() -> None:
    spec = load_stack_file("stacks/Pulumi.prod.yaml")
    # Only batch-enrichment may use the CPU pool; the spot GPU pools are shared with others.
    assert pools_frozen_by_tenant_budgets(spec, ["batch-enrichment"]) == {
        "aws-use1-cpu": "every tenant allowed on it is over its monthly budget (batch-enrichment)"
    }
    everyone = [t.name for t in spec.tenants]
    assert set(pools_frozen_by_tenant_budgets(spec, everyone)) == {p.name for p in spec.pools}
    assert pools_frozen_by_tenant_budgets(spec, []) == {}


# --------------------------------------------------------------------------------------------
# Scale to zero, cold start, forecast


def test_an_idle_pool_scales_to_zero_and_wakes_when_work_arrives() -> None:
    scaler = Autoscaler(settings(scale_down_cooldown_s=30.0), [pool("a", cold_start_s=90.0)])
    assert scaler.plan(signals(0, {"a": 1}, 0.0)).replicas == {"a": 1}
    assert scaler.plan(signals(15, {"a": 1}, 0.0)).replicas == {"a": 1}
    idle = scaler.plan(signals(31, {"a": 1}, 0.0))
    assert idle.replicas == {"a": 0}
    assert "scale to zero; a cold start takes 90 s" in idle.decisions["a"].reasons
    woken = scaler.plan(signals(46, {"a": 0}, 0.5))
    assert woken.replicas == {"a": 1}


def test_a_pool_does_not_scale_to_zero_while_the_forecast_expects_work() -> None:
    forecast = {"method": "holt-winters", "horizon_s": 600.0, "season_s": 86400.0}
    scaler = Autoscaler(
        settings(scale_down_cooldown_s=0.0, forecast=forecast), [pool("a", cold_start_s=120.0)]
    )
    # Steady 1 req/s at 2 s each: 2 in flight; a sudden quiet period of 0 in flight.
    for i in range(10):
        scaler.plan(signals(i * PERIOD, {"a": 1}, 2.0, arrivals=1.0, service_s=2.0))
    plan = scaler.plan(signals(10 * PERIOD, {"a": 1}, 0.0, arrivals=0.5, service_s=2.0))
    assert plan.replicas == {"a": 1}
    assert plan.forecast_arrivals_per_s["m"] > 0.2


def ramp_first_scale_up(method: str) -> float:
    """Arrivals rise 0.07 req/s per period; when does the pool first grow past 1 replica?"""
    forecast = {"method": method, "horizon_s": 600.0, "season_s": 86400.0}
    scaler = Autoscaler(settings(forecast=forecast), [pool("a", cold_start_s=120.0)])
    replicas = 1
    for i in range(200):
        rate = 0.07 * i
        in_flight = rate * 2.0  # 2 s in the system
        plan = scaler.plan(
            signals(i * PERIOD, {"a": replicas}, in_flight, arrivals=rate, service_s=2.0)
        )
        if plan.replicas["a"] > 1:
            return i * PERIOD
        replicas = plan.replicas["a"]
    raise AssertionError("never scaled up")


def test_the_forecast_scales_ahead_of_a_rising_trace() -> None:
    reactive = ramp_first_scale_up("none")
    predictive = ramp_first_scale_up("holt-winters")
    # Reactive waits until 0.14 x i in flight passes 2.4 (the band's top for 4 slots at 50 %),
    # i = 18; the forecast looks one cold start plus a period (9 periods) ahead.
    assert reactive == 18 * PERIOD
    assert predictive <= reactive - 5 * PERIOD


def test_holt_winters_follows_a_trend_and_a_season() -> None:
    trend = ArrivalForecaster(ForecastSpec(method="holt-winters", season_s=1e9), PERIOD)
    for i in range(60):
        trend.observe(2.0 + 0.1 * i)
    # The next value is 8.0; ten periods on, 9.0 (damped trend undershoots a little).
    assert trend.forecast(PERIOD) == pytest.approx(8.0, abs=0.1)
    assert 8.3 < trend.forecast(10 * PERIOD) < 9.0

    season = ArrivalForecaster(ForecastSpec(method="holt-winters", season_s=8 * PERIOD), PERIOD)
    pattern = [1.0, 1.0, 1.0, 1.0, 5.0, 5.0, 1.0, 1.0]
    for _ in range(6):
        for value in pattern:
            season.observe(value)
    # The next period starts a season: 1; four periods on, the peak of 5.
    assert season.forecast(PERIOD) == pytest.approx(1.0, abs=0.3)
    assert season.forecast(5 * PERIOD) == pytest.approx(5.0, abs=0.3)

    naive = ArrivalForecaster(ForecastSpec(method="seasonal-naive", season_s=8 * PERIOD), PERIOD)
    for value in pattern * 2:
        naive.observe(value)
    assert naive.forecast(5 * PERIOD) == 5.0
    assert naive.forecast(PERIOD) == 1.0
    none = ArrivalForecaster(ForecastSpec(method="none"), PERIOD)
    none.observe(3.0)
    assert none.forecast(PERIOD) == 0.0


# --------------------------------------------------------------------------------------------
# Spot


def spot_fleet(**overrides: object) -> Autoscaler:
    spot = pool("spot", usd_per_hour=0.3, spot=True, fallback_pool="od")
    on_demand = pool("od", usd_per_hour=1.0, slots_per_replica=4.0, min_replicas=1)
    return Autoscaler(settings(spot_retry_s=120.0, **overrides), [spot, on_demand])


def test_spot_loss_moves_the_share_to_the_fallback_and_back_after_the_retry_time() -> None:
    scaler = spot_fleet()
    # 8 in flight -> 16 slots: the on-demand minimum holds 4, spot the other 12 (3 replicas).
    steady = scaler.plan(signals(0, {"spot": 3, "od": 1}, 8.0))
    assert steady.replicas == {"spot": 3, "od": 1}
    lost = scaler.plan(signals(15, {"spot": 3, "od": 1}, 8.0, lost={"spot": 2}))
    # One spot replica survived: 4 slots; the fallback takes the other 8 (2 more replicas).
    assert lost.replicas == {"spot": 1, "od": 3}
    assert "spot capacity lost: 2 replica(s)" in lost.decisions["spot"].reasons
    during = scaler.plan(signals(60, {"spot": 1, "od": 3}, 8.0))
    assert during.replicas == {"spot": 1, "od": 3}
    back = scaler.plan(signals(136, {"spot": 1, "od": 3}, 8.0))
    assert back.replicas == {"spot": 3, "od": 1}


def test_spot_overprovision_adds_hedge_replicas_only_while_spot_is_in_use() -> None:
    scaler = spot_fleet(spot_overprovision=1)
    assert scaler.plan(signals(0, {"spot": 0, "od": 1}, 8.0)).replicas == {"spot": 4, "od": 1}
    quiet = spot_fleet(spot_overprovision=1)
    assert quiet.plan(signals(0, {"spot": 0, "od": 1}, 1.0)).replicas == {"spot": 0, "od": 1}


# --------------------------------------------------------------------------------------------
# State and the spec


def test_dumped_state_resumes_the_same_decisions() -> None:
    def run(scaler: Autoscaler, start: int, stop: int) -> list[dict[str, int]]:
        out = []
        replicas = {"spot": 0, "od": 1}
        for i in range(start, stop):
            plan = scaler.plan(
                signals(
                    i * PERIOD,
                    replicas,
                    0.4 * i,
                    arrivals=0.2 * i,
                    service_s=2.0,
                    lost={"spot": 1} if i == 12 else None,
                )
            )
            replicas = plan.replicas
            out.append(replicas)
        return out

    forecast = {"method": "holt-winters", "horizon_s": 300.0, "season_s": 86400.0}
    whole = run(spot_fleet(forecast=forecast, scale_up_cooldown_s=30.0), 0, 30)
    first = spot_fleet(forecast=forecast, scale_up_cooldown_s=30.0)
    head = run(first, 0, 15)
    state = json.loads(json.dumps(first.dump_state()))
    second = spot_fleet(forecast=forecast, scale_up_cooldown_s=30.0)
    second.load_state(state)
    # The tail restarts from the replicas at the end of the head.
    tail = []
    replicas = head[-1]
    for i in range(15, 30):
        plan = second.plan(signals(i * PERIOD, replicas, 0.4 * i, arrivals=0.2 * i, service_s=2.0))
        replicas = plan.replicas
        tail.append(replicas)
    assert head + tail == whole


def test_pool_facts_from_the_prod_stack_use_catalog_prices_and_the_roofline() -> None:
    spec = load_stack_file("stacks/Pulumi.prod.yaml")
    facts = {f.name: f for f in pool_facts_from_spec(spec)}
    spot = facts["aws-use1-a10g-spot"]
    on_demand = facts["aws-use1-a10g"]
    assert spot.spot and spot.fallback_pool == "aws-use1-a10g"
    assert spot.usd_per_hour < on_demand.usd_per_hour
    assert on_demand.min_replicas == 2 and on_demand.max_replicas == 10
    assert all(
        f.slots_per_replica >= 1 and math.isfinite(f.slots_per_replica) for f in facts.values()
    )
    local = {f.name: f for f in pool_facts_from_spec(load_stack_file("stacks/local.yaml"))}
    assert local["local-cheap"].slots_per_replica == 8.0  # no roofline for local: the default
    assert local["local-cheap"].usd_per_hour < local["local-dear"].usd_per_hour
