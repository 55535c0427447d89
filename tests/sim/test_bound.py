"""The lower bound on tiny traces whose optimal cost is known by hand, and the baselines."""

from __future__ import annotations

import math

import pytest

from runtime.catalog import Catalog
from runtime.costmodel import PerformanceModel, Workload
from runtime.sim.baselines import homogeneous_fleet, policy_fleet
from runtime.sim.bound import lower_bound
from runtime.sim.demand import Capacity
from runtime.sim.trace import MixedRequest
from runtime.spec import FleetSpec, parse_fleet

from .support import ON_DEMAND_USD, SPOT_USD, fleet_data, mixed, pool_data, synthetic

MINUTE_H = 1 / 60


def requests(n: int, cls: str, *, prompt: int = 500, output: int = 100, minute: int = 0) -> list:
    tenant = "jobs" if cls == "batch" else "acme"
    return [
        MixedRequest(i, minute * 60 + i * 50 / max(n, 1), prompt, output, tenant, "llama-8b", cls)
        for i in range(n)
    ]


def bound(spec: FleetSpec, reqs: list, catalog: Catalog, perf: PerformanceModel, horizon: float):
    return lower_bound(spec, reqs, catalog=catalog, perf=perf, horizon_s=horizon)


def test_light_spot_eligible_demand_needs_one_spot_instance(
    spec: FleetSpec, catalog: Catalog, perf: PerformanceModel
) -> None:
    lb = bound(spec, requests(3, "standard"), catalog, perf, 60.0)
    assert lb.usd == pytest.approx(SPOT_USD * MINUTE_H)
    assert lb.instances == [{"gpu": 0.0, "gpu-spot": 1.0}]
    # With the stack's floor, the on-demand replica it must run anyway serves it.
    assert lb.usd_with_min_replicas == pytest.approx(ON_DEMAND_USD * MINUTE_H)
    assert (lb.unservable_output_tokens, lb.over_capacity_minutes) == (0, 0)


def test_work_that_may_not_run_on_spot_pays_on_demand(
    spec: FleetSpec, catalog: Catalog, perf: PerformanceModel
) -> None:
    lb = bound(spec, requests(3, "critical"), catalog, perf, 60.0)
    assert lb.usd == pytest.approx(ON_DEMAND_USD * MINUTE_H)
    assert lb.instances == [{"gpu": 1.0, "gpu-spot": 0.0}]


def test_idle_minutes_cost_nothing_but_the_floor_and_the_horizon_is_prorated(
    spec: FleetSpec, catalog: Catalog, perf: PerformanceModel
) -> None:
    lb = bound(spec, requests(3, "batch"), catalog, perf, 90.0)
    assert lb.minutes == 2
    assert lb.usd == pytest.approx(SPOT_USD * MINUTE_H)
    # The floor's on-demand replica cannot take it: tenant jobs may only use the spot pool.
    assert lb.usd_with_min_replicas == pytest.approx((ON_DEMAND_USD * 1.5 + SPOT_USD) * MINUTE_H)


def identical_requests_for(
    load: float, spec: FleetSpec, catalog: Catalog, perf: PerformanceModel
) -> list:
    """Standard requests of one shape whose output tokens/s are ``load`` x what one spot
    instance serves within the SLO."""
    capacity = Capacity(spec, catalog, perf)
    rate = capacity.tokens_per_s(spec.pool("gpu-spot"), "standard", Workload(500, 100))
    assert rate is not None
    n = math.ceil(load * rate * 60 / 100)
    return requests(n, "standard")


def test_demand_beyond_one_instance_takes_two(
    spec: FleetSpec, catalog: Catalog, perf: PerformanceModel
) -> None:
    lb = bound(spec, identical_requests_for(1.5, spec, catalog, perf), catalog, perf, 60.0)
    assert lb.instances == [{"gpu": 0.0, "gpu-spot": 2.0}]
    assert lb.usd == pytest.approx(2 * SPOT_USD * MINUTE_H)


def test_max_replicas_push_the_rest_to_dearer_capacity(
    catalog: Catalog, perf: PerformanceModel
) -> None:
    data = fleet_data()
    pool_data(data, "gpu-spot").update(max_replicas=1, desired_replicas=1)
    spec = parse_fleet(data, catalog=catalog)
    lb = bound(spec, identical_requests_for(1.5, spec, catalog, perf), catalog, perf, 60.0)
    assert lb.instances == [{"gpu": 1.0, "gpu-spot": 1.0}]
    assert lb.usd == pytest.approx((SPOT_USD + ON_DEMAND_USD) * MINUTE_H)


def test_demand_no_allowed_option_can_serve_is_left_out_and_counted(
    spec: FleetSpec, catalog: Catalog, perf: PerformanceModel
) -> None:
    # An 8000-token prompt takes ~3.7 s to prefill on an A10G: no critical TTFT of 2 s.
    too_long = requests(1, "critical", prompt=8000, output=7)
    lb = bound(spec, too_long + requests(2, "batch"), catalog, perf, 60.0)
    assert lb.unservable_output_tokens == 7
    assert lb.usd == pytest.approx(SPOT_USD * MINUTE_H)


# --------------------------------------------------------------------------------------------
# Baselines


def test_homogeneous_is_the_cheapest_single_type_sized_for_the_peak(
    catalog: Catalog, perf: PerformanceModel
) -> None:
    data = fleet_data()
    # A second instance type: an L4 (g6.xlarge, cheaper and slower) serving the same variant.
    l4 = {**pool_data(data, "gpu"), "name": "l4", "instance_type": "g6.xlarge"}
    data["pools"].append(l4)
    spec = parse_fleet(data, catalog=catalog)
    trace = mixed(spec, synthetic(600, rate=5.0, prompt=800, output=150))
    fleet, choice = homogeneous_fleet(spec, trace, catalog=catalog, perf=perf)
    considered = {pool: usd for pool, _, usd in choice.considered}
    assert set(considered) == {"gpu", "l4"}  # the spot pool is the same type as gpu
    feasible = {p: usd for p, usd in considered.items() if usd is not None}
    assert choice.source_pool == min(feasible, key=lambda p: feasible[p])
    (pool,) = fleet.pools
    assert pool.name == f"homogeneous-{choice.source_pool}"
    assert (pool.spot, pool.min_replicas, pool.max_replicas, pool.replicas) == (
        False,
        1,
        2 * choice.peak_instances,
        choice.peak_instances,
    )
    assert fleet.routing.strategy == "least-loaded"
    assert fleet.autoscaling.forecast.method == "none"
    assert fleet.autoscaling.spot_overprovision == 0
    assert all(t.allowed_pools is None for t in fleet.tenants)
    assert [t.quotas for t in fleet.tenants] == [t.quotas for t in spec.tenants]


def test_homogeneous_needs_a_variant_good_enough_for_every_class(
    catalog: Catalog, perf: PerformanceModel
) -> None:
    data = fleet_data()
    data["slo_classes"][0]["min_quality"] = "reference"
    data["models"][0]["variants"][0]["quality"] = "high"
    spec = parse_fleet(data, catalog=catalog)
    trace = mixed(spec, synthetic(50, rate=1.0))
    with pytest.raises(ValueError, match="meets every class's SLO"):
        homogeneous_fleet(spec, trace, catalog=catalog, perf=perf)


def test_round_robin_changes_only_the_strategy(
    spec: FleetSpec, catalog: Catalog, perf: PerformanceModel
) -> None:
    fleet, choice = policy_fleet("round-robin", spec, [], catalog=catalog, perf=perf)
    assert choice is None and fleet.routing.strategy == "round-robin"
    assert fleet.model_copy(update={"routing": spec.routing}) == spec
    assert policy_fleet("fleetform", spec, [], catalog=catalog, perf=perf) == (spec, None)
    with pytest.raises(ValueError, match="unknown policy"):
        policy_fleet("random", spec, [], catalog=catalog, perf=perf)


def test_homogeneous_of_the_prod_stack_drops_its_rollout(
    catalog: Catalog, perf: PerformanceModel
) -> None:
    from runtime.spec import load_stack_file

    spec = load_stack_file("stacks/Pulumi.prod.yaml", catalog=catalog)
    assert spec.model("llama-3-1-8b").rollout is not None
    trace = mixed(spec, synthetic(120, rate=2.0, prompt=800, output=150))
    fleet, choice = homogeneous_fleet(spec, trace, catalog=catalog, perf=perf)
    assert [m.rollout for m in fleet.models] == [None] * len(fleet.models)
    assert [p.name for p in fleet.pools] == [f"homogeneous-{choice.source_pool}"]
