"""The simulator: conservation, determinism, cost by hand, and that it runs the live policies."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

import pytest

from runtime import autoscale, quota, routing, scheduler
from runtime.agent import admission
from runtime.catalog import Catalog
from runtime.costmodel import PerformanceModel
from runtime.sim.simulator import SimSettings, Simulation, Simulator
from runtime.sim.trace import MixedRequest, TraceRequest
from runtime.spec import FleetSpec, parse_fleet

from .support import ON_DEMAND_USD, fleet_data, mixed, pool_data, synthetic


def simulate(
    catalog: Catalog,
    spec: FleetSpec,
    requests: list[MixedRequest],
    **settings: Any,
) -> tuple[Simulator, Simulation]:
    sim = Simulator(
        spec, requests, catalog=catalog, settings=SimSettings(perf=PerformanceModel(), **settings)
    )
    return sim, sim.run()


def one_replica_fleet(catalog: Catalog, *, autoscaling: bool = False) -> FleetSpec:
    """Only the on-demand pool, one replica, autoscaling off unless asked."""
    data = fleet_data()
    gpu = pool_data(data, "gpu")
    gpu.update(min_replicas=1, max_replicas=1)
    data["pools"] = [gpu]
    data["tenants"] = [t for t in data["tenants"] if t["name"] == "acme"]
    data["autoscaling"] = {**data["autoscaling"], "enabled": autoscaling}
    return parse_fleet(data, catalog=catalog)


def test_a_lone_request_costs_what_the_clock_says(catalog: Catalog) -> None:
    spec = one_replica_fleet(catalog)
    request = MixedRequest(0, 1.0, 100, 10, "acme", "llama-8b", "standard")
    _, result = simulate(catalog, spec, [request])
    (record,) = result.records
    assert (record.status, record.output_tokens, record.reason) == (
        "completed",
        10,
        "finished: stop",
    )
    # The run ends at the first planning period after the last request (15 s); one on-demand
    # g5.xlarge was up all along: 1.006 USD/h x 15 s.
    assert result.end_s == 15.0
    assert result.pool_cost_usd == {"gpu": pytest.approx(ON_DEMAND_USD * 15 / 3600, rel=1e-12)}
    assert result.replica_hours == {"gpu": pytest.approx(15 / 3600, rel=1e-12)}
    # TTFT is the prefill of 100 tokens plus nothing else; TPOT one decode step per token.
    assert record.ttft_s is not None and record.tpot_s is not None
    assert 0.04 < record.ttft_s < 0.1 and 0.03 < record.tpot_s < 0.05
    assert record.ttft_ok and record.tpot_ok


def busy_trace(spec: FleetSpec) -> list[MixedRequest]:
    trace = synthetic(300, rate=4.0, prompt=600, output=80)
    # Too long for the model (8192 tokens): the scheduler refuses it.
    trace.append(TraceRequest(300, 20.0, 9000, 10))
    return mixed(spec, trace, seed=1)


def test_conservation_every_request_ends_once_with_a_reason(
    catalog: Catalog, spec: FleetSpec
) -> None:
    data = fleet_data()
    # A tight request quota for the batch tenant, so some of its requests get 429s.
    jobs = next(t for t in data["tenants"] if t["name"] == "jobs")
    jobs["quotas"] = {"requests_per_minute": 6}
    fleet = parse_fleet(data, catalog=catalog)
    requests = busy_trace(fleet)
    _, result = simulate(
        catalog,
        fleet,
        requests,
        spot_preemptions=(("gpu-spot", 30.0), (None, 50.0)),
        spot_notice_s=0.5,  # too short to drain: what the replica holds is routed again
    )
    # One record per request, in arrival order.
    assert sorted(r.index for r in result.records) == sorted(m.index for m in requests)
    assert [r.arrival_s for r in result.records] == sorted(m.arrival_s for m in requests)
    status = Counter(r.status for r in result.records)
    assert set(status) <= {"completed", "shed", "failed"}
    assert sum(status.values()) == len(requests)
    assert all(r.reason for r in result.records)
    assert status["completed"] > 200
    reasons = Counter(r.reason.split(":", 1)[0] for r in result.records if r.status != "completed")
    assert reasons["rejected by the scheduler"] == 1
    assert reasons["quota_requests_per_minute"] > 0
    # Completed requests produced exactly their trace length.
    lengths = {m.index: m.output_tokens for m in requests}
    assert all(
        r.output_tokens == lengths[r.index] for r in result.records if r.status == "completed"
    )
    assert all(r.output_tokens == 0 for r in result.records if r.status != "completed")
    # Spot preemptions were retried, and each request was still recorded once.
    assert result.spot_preemptions == 2
    assert result.retries > 0
    assert max(r.attempts for r in result.records) >= 2


def test_the_same_seed_gives_the_same_run(catalog: Catalog, spec: FleetSpec) -> None:
    requests = busy_trace(spec)
    kwargs: dict[str, Any] = {"spot_preemption_rate": 20.0, "seed": 3}
    _, first = simulate(catalog, spec, requests, **kwargs)
    _, second = simulate(catalog, spec, requests, **kwargs)
    assert first.records == second.records
    assert first.pool_cost_usd == second.pool_cost_usd
    assert first.timeline == second.timeline
    assert first.spot_preemptions > 0
    _, other = simulate(catalog, spec, requests, spot_preemption_rate=20.0, seed=4)
    assert other.timeline != first.timeline


def test_the_simulator_runs_the_live_policy_code(
    catalog: Catalog, spec: FleetSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: Counter[str] = Counter()

    def counting(name: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(routing, "route", counting("route", routing.route))
    monkeypatch.setattr(admission, "decide_shedding", counting("shed", admission.decide_shedding))
    for cls, method in (
        (scheduler.Scheduler, "schedule"),
        (scheduler.Scheduler, "update"),
        (scheduler.Scheduler, "add_request"),
        (autoscale.Autoscaler, "plan"),
        (quota.QuotaBook, "admit"),
        (quota.QuotaBook, "release"),
        (admission.ThroughputEstimate, "observe"),
    ):
        monkeypatch.setattr(cls, method, counting(method, getattr(cls, method)))
    requests = busy_trace(spec)
    sim, result = simulate(catalog, spec, requests)
    # The objects are the live classes, not look-alikes.
    assert type(sim.policy) is routing.RoutingPolicy
    assert type(sim.autoscaler) is autoscale.Autoscaler
    assert type(sim.quotas) is quota.QuotaBook
    servers = list(sim.servers.values())
    assert servers and all(type(s.sched) is scheduler.Scheduler for s in servers)
    assert all(type(s.kv) is scheduler.BlockKVCapacity for s in servers)
    # Every request was routed by route(), once per attempt.
    assert calls["route"] == len(requests) + result.retries
    assert calls["plan"] == result.plans > 0
    assert calls["schedule"] > 0 and calls["update"] >= result.steps
    assert calls["admit"] > 0 and calls["release"] == calls["admit"] - sum(
        1 for r in result.records if r.reason.startswith("quota_")
    )
    assert calls["shed"] > 0 and calls["observe"] > 0
    # Every completed request reached a scheduler, and so did the too-long prompt it refused.
    completed = sum(r.status == "completed" for r in result.records)
    assert completed + 1 <= calls["add_request"] <= completed + 1 + result.retries


def test_routing_decisions_are_obeyed(
    catalog: Catalog, spec: FleetSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    live_route = routing.route

    def shed_batch_else_live(request: Any, view: Any, policy: Any) -> Any:
        if request.slo_class == "batch":
            return routing.RouteDecision(routing.RouteOutcome.SHED, None, None, "told to")
        return live_route(request, view, policy)

    monkeypatch.setattr(routing, "route", shed_batch_else_live)
    requests = busy_trace(spec)
    _, result = simulate(catalog, spec, requests)
    batch = [r for r in result.records if r.slo_class == "batch"]
    assert batch and all((r.status, r.reason) == ("shed", "route: told to") for r in batch)


def test_scaling_plans_are_applied_with_cold_starts(
    catalog: Catalog, spec: FleetSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    def three_on_demand(self: autoscale.Autoscaler, signals: autoscale.FleetSignals) -> Any:
        decisions = {
            name: autoscale.PoolDecision(name, signals.pools[name].requested, want, ("test",))
            for name, want in (("gpu", 3), ("gpu-spot", 0))
        }
        return autoscale.ScalingPlan(signals.now, decisions, {}, {}, 0.0)

    monkeypatch.setattr(autoscale.Autoscaler, "plan", three_on_demand)
    requests = mixed(spec, synthetic(200, rate=2.0, prompt=300, output=40))
    _, result = simulate(catalog, spec, requests)
    by_time = {row["t"]: row for row in result.timeline}
    # The first plan (t=15) asks for 3 on-demand replicas: two launch and boot for 60 s, billed.
    assert by_time[15.0]["replicas"]["gpu"] == 3 and by_time[15.0]["ready"]["gpu"] == 1
    assert by_time[60.0]["ready"]["gpu"] == 1
    assert by_time[75.0]["ready"]["gpu"] == 3
    # The spot replica drains (it had work or not) and is gone soon after.
    assert by_time[30.0]["replicas"]["gpu-spot"] == 0
    end = result.end_s
    expected = ON_DEMAND_USD * (1 * end + 2 * (end - 15.0)) / 3600
    assert result.pool_cost_usd["gpu"] == pytest.approx(expected, rel=1e-9)


def test_preempted_work_is_retried_and_the_loss_reported(
    catalog: Catalog, spec: FleetSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[autoscale.FleetSignals] = []
    live_plan = autoscale.Autoscaler.plan

    def recording(self: autoscale.Autoscaler, signals: autoscale.FleetSignals) -> Any:
        seen.append(signals)
        return live_plan(self, signals)

    monkeypatch.setattr(autoscale.Autoscaler, "plan", recording)
    data = fleet_data()
    pool_data(data, "gpu-spot")["max_replicas"] = 1  # the one spot replica is the one reclaimed
    fleet = parse_fleet(data, catalog=catalog)
    # Standard work prefers spot, so the spot replica is busy when it is reclaimed at 35 s.
    requests = mixed(
        fleet, synthetic(120, rate=3.0, prompt=500, output=300), class_mix={"standard": 1.0}
    )
    _, result = simulate(
        catalog, fleet, requests, spot_preemptions=(("gpu-spot", 33.0),), spot_notice_s=2.0
    )
    assert result.spot_preemptions == 1 and result.retries > 0
    retried = [r for r in result.records if r.attempts == 2]
    assert len(retried) == result.retries
    assert all(r.status == "completed" and r.pool == "gpu" for r in retried)
    lost = [s.pools["gpu-spot"].lost for s in seen]
    assert lost[:4] == [0, 0, 1, 0]  # reported in the plan after the notice (t=45), once


@pytest.mark.parametrize(("tpot_budget", "saving"), [(False, 0.7), (True, 0.85)])
def test_batched_decode_runs_match_step_by_step(
    catalog: Catalog, tpot_budget: bool, saving: float
) -> None:
    # With the TPOT budget prompts are cut into more, smaller chunks beside decodes, which
    # leaves fewer runs of pure decode steps to batch; the runs must stay exact either way.
    spec = one_replica_fleet(catalog)
    requests = mixed(spec, synthetic(150, rate=3.0, prompt=500, output=120), seed=2)
    _, batched = simulate(catalog, spec, requests, tpot_budget=tpot_budget)
    _, stepped = simulate(catalog, spec, requests, macro_steps=False, tpot_budget=tpot_budget)
    assert batched.steps == stepped.steps
    assert batched.events < saving * stepped.events
    for a, b in zip(batched.records, stepped.records, strict=True):
        assert replace(a, ttft_s=None, tpot_s=None) == replace(b, ttft_s=None, tpot_s=None)
        assert a.ttft_s == pytest.approx(b.ttft_s, rel=1e-9, abs=1e-9)
        assert a.tpot_s == pytest.approx(b.tpot_s, rel=1e-9, abs=1e-9)
    assert batched.end_s == stepped.end_s


def test_tpot_budget_keeps_decodes_within_tpot_beside_long_prompts(catalog: Catalog) -> None:
    # Long prompts arriving while 30-token streams decode: with the token budget alone, their
    # prefill chunks stretch the streams' steps past the objective; with the pool's step cost
    # the scheduler cuts them to what the streams' next-token deadlines leave.
    spec = one_replica_fleet(catalog)
    requests = mixed(
        spec,
        synthetic(150, rate=0.8, prompt=1500, output=30),
        class_mix={"standard": 0.5, "batch": 0.5},
    )
    sim, on = simulate(catalog, spec, requests)
    _, off = simulate(catalog, spec, requests, tpot_budget=False)
    [server] = sim.servers.values()
    assert server.sched.step_cost == server.speed.step_cost()

    def share(records: list[Any], field: str) -> float:
        return sum(getattr(r, field) for r in records) / len(records)

    assert share(off.records, "tpot_ok") < 0.95
    assert share(on.records, "tpot_ok") == 1.0
    assert share(on.records, "ttft_ok") >= share(off.records, "ttft_ok")
