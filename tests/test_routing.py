"""Routing decisions over fabricated fleet views: cost, SLO, spot, variants, health, shedding."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.catalog import default_catalog
from runtime.routing import (
    DEFAULT_PRIOR,
    FleetView,
    InstancePrior,
    InstanceView,
    RouteOutcome,
    RouteRequest,
    RoutingPolicy,
    priors_from_costmodel,
    route,
)
from runtime.spec import FleetSpec, parse_fleet

NOW = 1_000.0

# One 8B model in two variants: bf16 (reference) on GPUs, int4 (standard) on GPUs or CPUs.
SPEC_DATA: dict[str, Any] = {
    "name": "routing-test",
    "models": [
        {
            "name": "llama-8b",
            "parameters_b": 8.03,
            "layers": 32,
            "hidden_size": 4096,
            "kv_heads": 8,
            "head_dim": 128,
            "context_length": 8192,
            "variants": [
                {"name": "bf16", "precision": "bf16", "quality": "reference", "runs_on": ["gpu"]},
                {
                    "name": "int4",
                    "precision": "int4",
                    "quality": "standard",
                    "runs_on": ["gpu", "cpu"],
                },
            ],
        }
    ],
    # Planned targets at the default headroom 0.8: critical 0.8 s / 80 ms,
    # standard 1.6 s / 120 ms, batch 24 s / 400 ms.
    "slo_classes": [
        {"name": "critical", "priority": 0, "ttft_ms": 1000, "tpot_ms": 100, "min_quality": "high"},
        {
            "name": "standard",
            "priority": 1,
            "ttft_ms": 2000,
            "tpot_ms": 150,
            "spot_eligible": True,
        },
        {
            "name": "batch",
            "priority": 2,
            "ttft_ms": 30000,
            "tpot_ms": 500,
            "sheddable": True,
            "spot_eligible": True,
            "min_quality": "low",
        },
    ],
    "pools": [
        {
            "name": "gpu",
            "cloud": "aws",
            "region": "us-east-1",
            "instance_type": "g5.xlarge",
            "max_replicas": 4,
            "serves": {"model": "llama-8b", "variant": "bf16"},
        },
        {
            "name": "gpu-spot",
            "cloud": "aws",
            "region": "us-east-1",
            "instance_type": "g5.xlarge",
            "spot": True,
            "fallback_pool": "gpu",
            "max_replicas": 4,
            "serves": {"model": "llama-8b", "variant": "bf16"},
        },
        {
            "name": "cpu",
            "cloud": "aws",
            "region": "us-east-1",
            "instance_type": "m7g.8xlarge",
            "max_replicas": 4,
            "serves": {"model": "llama-8b", "variant": "int4"},
        },
        {
            "name": "laptop",
            "cloud": "local",
            "region": "local",
            "instance_type": "local",
            "priced_as": {"cloud": "aws", "region": "us-east-1", "instance_type": "m7g.8xlarge"},
            "serves": {"model": "llama-8b", "variant": "int4"},
        },
    ],
    "tenants": [
        {
            "name": "acme",
            "api_keys": ["env:ACME_KEY"],
            "default_priority": "standard",
            "max_priority": "critical",
        },
        {
            "name": "picky",
            "api_keys": ["env:PICKY_KEY"],
            "default_priority": "standard",
            "min_quality": "reference",
        },
        {
            "name": "gpu-only",
            "api_keys": ["env:GPU_ONLY_KEY"],
            "default_priority": "standard",
            "allowed_pools": ["gpu"],
        },
    ],
}

POOL_VARIANT = {"gpu": "bf16", "gpu-spot": "bf16", "cpu": "int4", "laptop": "int4"}


@pytest.fixture(scope="module")
def spec() -> FleetSpec:
    return parse_fleet(SPEC_DATA)


@pytest.fixture(scope="module")
def policy(spec: FleetSpec) -> RoutingPolicy:
    return RoutingPolicy.from_spec(spec)


def inst(instance_id: str, pool: str = "gpu", **overrides: Any) -> InstanceView:
    """A healthy, fresh, idle, measured instance: 2000 prompt tok/s, 20 ms decode steps."""
    fields: dict[str, Any] = {
        "instance_id": instance_id,
        "pool": pool,
        "url": f"http://{instance_id}:8080",
        "model": "llama-8b",
        "variant": POOL_VARIANT[pool],
        "price_usd_per_hour": 1.0,
        "spot": pool == "gpu-spot",
        "last_seen": NOW - 1.0,
        "prefill_tokens_per_s": 2000.0,
        "decode_tokens_per_s": 50.0,
        "decode_batch": 1.0,
    }
    fields.update(overrides)
    return InstanceView(**fields)


def req(slo_class: str = "standard", tenant: str = "acme", **overrides: Any) -> RouteRequest:
    fields: dict[str, Any] = {
        "model": "llama-8b",
        "slo_class": slo_class,
        "tenant": tenant,
        "prompt_tokens": 200,
        "max_tokens": 100,
    }
    fields.update(overrides)
    return RouteRequest(**fields)


def view(*instances: InstanceView, **kw: Any) -> FleetView:
    return FleetView(instances=tuple(instances), now=NOW, **kw)


def excluded_reasons(decision) -> dict[str, str]:
    return {e.instance_id: e.reason for e in decision.excluded}


# --------------------------------------------------------------------------------------------
# Cost and SLO


def test_cheapest_instance_meeting_the_slo_is_chosen(policy: RoutingPolicy) -> None:
    decision = route(
        req(),
        view(inst("dear", price_usd_per_hour=2.0), inst("cheap", price_usd_per_hour=1.0)),
        policy,
    )
    assert decision.outcome is RouteOutcome.ROUTED
    assert (decision.instance_id, decision.url, decision.shed) == (
        "cheap",
        "http://cheap:8080",
        False,
    )
    assert [c.instance_id for c in decision.candidates] == ["cheap", "dear"]
    assert all(c.meets_slo for c in decision.candidates)
    cheap, dear = decision.candidates
    # Same speed, so the marginal cost is in proportion to the price.
    assert dear.marginal_usd == pytest.approx(2 * cheap.marginal_usd)
    assert "cheapest of 2" in decision.reason
    assert decision.ttft_target_s == pytest.approx(1.6)
    assert decision.tpot_target_s == pytest.approx(0.12)


def test_spills_over_to_a_dearer_instance_when_the_cheap_queue_breaks_the_slo(
    policy: RoutingPolicy,
) -> None:
    # 10k prompt tokens ahead at the standard priority: 5 s of prefill before this prompt.
    busy = inst("cheap", price_usd_per_hour=1.0, queued_prompt_tokens={1: 10_000})
    decision = route(req(), view(busy, inst("dear", price_usd_per_hour=2.0)), policy)
    assert decision.instance_id == "dear"
    predictions = {c.instance_id: c for c in decision.candidates}
    assert not predictions["cheap"].meets_slo
    assert predictions["cheap"].predicted_ttft_s > 5.0
    assert predictions["cheap"].queue_wait_s == pytest.approx(5.0)


def test_queued_work_of_a_less_important_class_is_not_ahead(policy: RoutingPolicy) -> None:
    # The same backlog queued as batch work (priority 2) does not delay a standard request.
    busy = inst("cheap", price_usd_per_hour=1.0, queued_prompt_tokens={2: 10_000})
    decision = route(req(), view(busy, inst("dear", price_usd_per_hour=2.0)), policy)
    assert decision.instance_id == "cheap"
    assert decision.chosen is not None and decision.chosen.queue_wait_s == 0.0


def test_a_full_batch_adds_a_slot_wait(policy: RoutingPolicy) -> None:
    full = inst(
        "full",
        price_usd_per_hour=1.0,
        running=8,
        max_batch=8,
        decode_batch=8.0,
        decode_tokens_per_s=400.0,
        running_remaining_tokens=8 * 200,
    )
    decision = route(req(), view(full, inst("free", price_usd_per_hour=3.0)), policy)
    predictions = {c.instance_id: c for c in decision.candidates}
    # One slot must free: with remaining lengths spread over (0, 400], about 400 / 8 steps.
    assert predictions["full"].queue_wait_s == pytest.approx(2 * 200 / 8 * 0.02)
    assert predictions["full"].queue_wait_s > 0


def test_saturated_kv_cache_counts_as_a_full_batch(policy: RoutingPolicy) -> None:
    roomy = inst("a", running=4, max_batch=64, decode_batch=4.0, decode_tokens_per_s=200.0)
    tight = replace(roomy, instance_id="b", kv_usage=0.97)
    decision = route(req(), view(roomy, tight), policy)
    waits = {c.instance_id: c.queue_wait_s for c in decision.candidates}
    assert waits["a"] == 0.0
    assert waits["b"] > 0.0


def test_prediction_follows_the_documented_model(spec: FleetSpec) -> None:
    # A flat prior (step time independent of batch) makes every figure easy to check by hand.
    flat = InstancePrior(prefill_tokens_per_s=1000.0, step_fixed_s=0.01, step_per_seq_s=0.0)
    policy = RoutingPolicy.from_spec(spec, default_prior=flat)
    instance = inst(
        "x",
        price_usd_per_hour=3.6,
        running=3,
        decode_batch=4.0,
        decode_tokens_per_s=100.0,  # 40 ms per step at batch 4
        running_prefill_tokens=300,
        queued_requests={0: 1, 1: 1, 2: 2},
        queued_prompt_tokens={0: 500, 1: 200, 2: 4000},
    )
    decision = route(req(prompt_tokens=1000, max_tokens=50), view(instance), policy)
    (c,) = decision.candidates
    prefill = 1000 / 2000.0
    ahead = (300 + 500 + 200) / 2000.0
    assert c.batch == 3 + 4 + 1
    assert c.predicted_tpot_s == pytest.approx(0.04)
    assert c.queue_wait_s == pytest.approx(ahead)
    assert c.predicted_ttft_s == pytest.approx(ahead + prefill + 0.04)
    # $3.6/h is $0.001/s; the request holds the instance for its prefill and 1/8 of 50 steps.
    assert c.marginal_usd == pytest.approx(0.001 * (prefill + 50 * 0.04 / 8))
    assert not c.cold


def test_measured_step_is_carried_along_the_priors_shape(spec: FleetSpec) -> None:
    linear = InstancePrior(prefill_tokens_per_s=1000.0, step_fixed_s=0.01, step_per_seq_s=0.01)
    policy = RoutingPolicy.from_spec(spec, default_prior=linear)
    # Measured 20 ms at batch 1; the prior says batch 4 takes 0.05 / 0.02 = 2.5x as long.
    instance = inst("x", running=3, decode_batch=1.0, decode_tokens_per_s=50.0)
    (c,) = route(req(), view(instance), policy).candidates
    assert c.batch == 4
    assert c.predicted_tpot_s == pytest.approx(0.02 * 2.5)


def test_cold_instances_use_the_prior_slowed_down(spec: FleetSpec) -> None:
    prior = InstancePrior(prefill_tokens_per_s=1000.0, step_fixed_s=0.02, step_per_seq_s=0.0)
    policy = RoutingPolicy.from_spec(spec, priors={"gpu": prior}, cold_slowdown=2.0)
    cold = inst("cold", prefill_tokens_per_s=None, decode_tokens_per_s=None, decode_batch=None)
    (c,) = route(req(prompt_tokens=1000), view(cold), policy).candidates
    assert c.cold
    assert c.predicted_tpot_s == pytest.approx(0.04)
    assert c.predicted_ttft_s == pytest.approx(1000 / 500 + 0.04)
    # A pool without a prior of its own falls back to the (slow) default.
    laptop = replace(cold, instance_id="laptop", pool="laptop", variant="int4")
    (d,) = route(req(prompt_tokens=1000), view(laptop), policy).candidates
    assert d.predicted_tpot_s == pytest.approx(DEFAULT_PRIOR.step_s(1) * 2.0)


def test_priors_from_the_costmodel_cover_cloud_pools_not_local_ones(spec: FleetSpec) -> None:
    priors = priors_from_costmodel(spec, default_catalog())
    assert set(priors) == {"gpu", "gpu-spot", "cpu"}
    gpu, cpu = priors["gpu"], priors["cpu"]
    assert gpu.source == "roofline aws/us-east-1/g5.xlarge"
    # An A10G prefills far faster than 32 Graviton vCPUs, and its step grows less with batch.
    assert gpu.prefill_tokens_per_s > 10 * cpu.prefill_tokens_per_s
    assert gpu.step_per_seq_s < cpu.step_per_seq_s
    policy = RoutingPolicy.from_spec(spec, priors=priors)
    cold = {"prefill_tokens_per_s": None, "decode_tokens_per_s": None, "decode_batch": None}
    decision = route(req(), view(inst("g", **cold), inst("c", "cpu", **cold)), policy)
    assert all(c.cold for c in decision.candidates)
    assert decision.instance_id is not None


# --------------------------------------------------------------------------------------------
# Spot and variants


def test_spot_is_preferred_for_spot_eligible_classes_only(spec: FleetSpec) -> None:
    policy = RoutingPolicy.from_spec(spec)
    fleet = view(
        inst("on-demand", price_usd_per_hour=1.0),
        inst("spot", "gpu-spot", price_usd_per_hour=1.2),
    )
    standard = route(req("standard"), fleet, policy)
    assert standard.instance_id == "spot"
    assert "spot preferred" in standard.reason

    critical = route(req("critical"), fleet, policy)
    assert critical.instance_id == "on-demand"
    assert excluded_reasons(critical) == {"spot": "spot: class 'critical' is not spot-eligible"}


def test_without_prefer_spot_the_cheaper_on_demand_instance_wins() -> None:
    data = {**SPEC_DATA, "routing": {"prefer_spot": False}}
    policy = RoutingPolicy.from_spec(parse_fleet(data))
    fleet = view(
        inst("on-demand", price_usd_per_hour=1.0),
        inst("spot", "gpu-spot", price_usd_per_hour=1.2),
    )
    assert route(req("standard"), fleet, policy).instance_id == "on-demand"


def test_spot_is_not_preferred_when_it_would_break_the_slo(policy: RoutingPolicy) -> None:
    fleet = view(
        inst("on-demand", price_usd_per_hour=1.0),
        inst("spot", "gpu-spot", price_usd_per_hour=0.4, queued_prompt_tokens={0: 20_000}),
    )
    assert route(req("standard"), fleet, policy).instance_id == "on-demand"


def cpu_and_gpu() -> FleetView:
    """A cheap int4 CPU instance that is fast enough for standard work, and a bf16 GPU."""
    cpu = inst(
        "cpu-1",
        "cpu",
        price_usd_per_hour=0.1,
        prefill_tokens_per_s=400.0,
        decode_tokens_per_s=12.5,  # 80 ms per token
    )
    return view(cpu, inst("gpu-1", price_usd_per_hour=1.0))


def test_cheaper_int4_cpu_variant_is_chosen_when_quality_allows(policy: RoutingPolicy) -> None:
    decision = route(req("standard", "acme"), cpu_and_gpu(), policy)
    assert decision.instance_id == "cpu-1"
    chosen = decision.chosen
    assert chosen is not None and (chosen.variant, chosen.quality) == ("int4", "standard")


def test_int4_is_not_chosen_when_the_class_requires_higher_quality(
    policy: RoutingPolicy,
) -> None:
    decision = route(req("critical", "acme"), cpu_and_gpu(), policy)
    assert decision.instance_id == "gpu-1"
    assert excluded_reasons(decision)["cpu-1"] == (
        "quality too low: variant 'int4' is standard, this request needs high"
    )


def test_int4_is_not_chosen_when_the_tenant_requires_higher_quality(
    policy: RoutingPolicy,
) -> None:
    decision = route(req("standard", "picky"), cpu_and_gpu(), policy)
    assert decision.instance_id == "gpu-1"
    assert "needs reference" in excluded_reasons(decision)["cpu-1"]


def test_tenant_allowed_pools_are_respected(policy: RoutingPolicy) -> None:
    fleet = view(
        inst("gpu-1", price_usd_per_hour=1.0),
        inst("spot-1", "gpu-spot", price_usd_per_hour=0.3),
        inst("cpu-1", "cpu", price_usd_per_hour=0.1),
    )
    decision = route(req("standard", "gpu-only"), fleet, policy)
    assert decision.instance_id == "gpu-1"
    reasons = excluded_reasons(decision)
    assert set(reasons) == {"spot-1", "cpu-1"}
    assert reasons["cpu-1"] == "pool not allowed: tenant 'gpu-only' may not use pool 'cpu'"


# --------------------------------------------------------------------------------------------
# Nothing meets the SLO


def overloaded(instance_id: str, backlog: int, **kw: Any) -> InstanceView:
    # Most-important-priority backlog: ahead of every class.
    return inst(instance_id, queued_prompt_tokens={0: backlog}, queued_requests={0: 4}, **kw)


def test_sheddable_class_is_shed_when_nothing_meets_its_slo(policy: RoutingPolicy) -> None:
    fleet = view(overloaded("a", 100_000), overloaded("b", 80_000, price_usd_per_hour=2.0))
    decision = route(req("batch"), fleet, policy)
    assert decision.outcome is RouteOutcome.SHED and decision.shed
    assert decision.instance_id is None and decision.url is None
    assert decision.reason.startswith("shed: class 'batch' is sheddable")
    assert len(decision.candidates) == 2 and not any(c.meets_slo for c in decision.candidates)
    # b's queue takes 40 s to prefill against a 24 s target: retry in about 16 s.
    assert decision.retry_after_s == pytest.approx(17.0)


def test_fastest_instance_is_chosen_for_a_non_sheddable_class(policy: RoutingPolicy) -> None:
    fleet = view(
        overloaded("slow-cheap", 100_000, price_usd_per_hour=0.5),
        overloaded("fast-dear", 20_000, price_usd_per_hour=4.0),
    )
    decision = route(req("standard"), fleet, policy)
    assert decision.outcome is RouteOutcome.FALLBACK and not decision.shed
    assert decision.instance_id == "fast-dear"
    assert decision.candidates[0].instance_id == "fast-dear"
    assert "not sheddable" in decision.reason


# --------------------------------------------------------------------------------------------
# Health, staleness, hops


def test_unhealthy_instances_are_excluded(policy: RoutingPolicy) -> None:
    fleet = view(
        inst("cheap-sick", price_usd_per_hour=0.5, healthy=False),
        inst("ok", price_usd_per_hour=1.0),
    )
    decision = route(req(), fleet, policy)
    assert decision.instance_id == "ok"
    assert excluded_reasons(decision) == {"cheap-sick": "unhealthy: reported not ready"}


def test_failed_forward_excludes_until_the_instance_pushes_again(policy: RoutingPolicy) -> None:
    failed = inst("cheap", price_usd_per_hour=0.5, last_seen=NOW - 3, failed_at=NOW - 1)
    decision = route(req(), view(failed, inst("ok")), policy)
    assert decision.instance_id == "ok"
    assert "has not pushed since" in excluded_reasons(decision)["cheap"]
    pushed_again = replace(failed, last_seen=NOW - 0.5)
    assert route(req(), view(pushed_again, inst("ok")), policy).instance_id == "cheap"


def test_stale_instances_are_excluded(policy: RoutingPolicy) -> None:
    stale = inst("cheap", price_usd_per_hour=0.5, last_seen=NOW - 15.5)
    edge = inst("edge", price_usd_per_hour=0.9, last_seen=NOW - 15.0)  # exactly at the limit
    decision = route(req(), view(stale, edge, inst("ok")), policy)
    assert decision.instance_id == "edge"
    assert excluded_reasons(decision) == {"cheap": "stale: last push 15.5s ago, limit 15s"}


def test_hop_limit_keeps_a_forwarded_request_on_the_local_instance(
    policy: RoutingPolicy,
) -> None:
    fleet = (inst("cheap-peer", price_usd_per_hour=0.5), inst("me", price_usd_per_hour=1.0))
    assert route(req(hops=0), view(*fleet, local_instance_id="me"), policy).instance_id == (
        "cheap-peer"
    )
    forwarded = route(req(hops=1), view(*fleet, local_instance_id="me"), policy)
    assert forwarded.instance_id == "me"
    assert excluded_reasons(forwarded)["cheap-peer"].startswith("hop limit")


def test_instances_already_tried_are_skipped(policy: RoutingPolicy) -> None:
    fleet = view(inst("cheap", price_usd_per_hour=0.5), inst("next", price_usd_per_hour=1.0))
    decision = route(req(exclude=frozenset({"cheap"})), fleet, policy)
    assert decision.instance_id == "next"


# --------------------------------------------------------------------------------------------
# No candidates


def test_no_instance_of_the_model_gives_a_clear_reason(policy: RoutingPolicy) -> None:
    decision = route(req(model="mistral-7b"), view(inst("a")), policy)
    assert decision.outcome is RouteOutcome.UNROUTABLE
    assert (decision.instance_id, decision.shed) == (None, False)
    assert decision.reason == "no instance serves model 'mistral-7b'"
    assert decision.excluded == ()  # instances of other models are not listed


def test_all_instances_excluded_gives_a_summary(policy: RoutingPolicy) -> None:
    fleet = view(
        inst("a", healthy=False),
        inst("b", last_seen=NOW - 60),
        inst("c", last_seen=NOW - 90),
        inst("d", "cpu"),
    )
    decision = route(req("critical"), fleet, policy)
    assert decision.outcome is RouteOutcome.UNROUTABLE
    assert decision.reason == (
        "no instance of model 'llama-8b' can take this request: "
        "1 quality too low, 2 stale, 1 unhealthy"
    )
    assert [e.instance_id for e in decision.excluded] == ["a", "b", "c", "d"]


def test_empty_view_and_unknown_names(policy: RoutingPolicy) -> None:
    assert route(req(), view(), policy).reason == "no instance serves model 'llama-8b'"
    assert route(req("gold"), view(inst("a")), policy).reason == "unknown SLO class 'gold'"
    assert route(req(tenant="nobody"), view(inst("a")), policy).reason == (
        "unknown tenant 'nobody'"
    )


# --------------------------------------------------------------------------------------------
# Determinism and plumbing


def test_ties_break_on_instance_id_whatever_the_view_order(policy: RoutingPolicy) -> None:
    twins = [inst(name) for name in ("node-b", "node-c", "node-a")]
    for order in (twins, twins[::-1], twins[1:] + twins[:1]):
        decision = route(req(), view(*order), policy)
        assert decision.instance_id == "node-a"
        assert [c.instance_id for c in decision.candidates] == ["node-a", "node-b", "node-c"]


def test_route_accepts_the_spec_and_the_decision_serialises(spec: FleetSpec) -> None:
    decision = route(req(), view(inst("a")), spec)
    data = json.loads(json.dumps(decision.to_dict()))
    assert data["outcome"] == "routed" and data["shed"] is False
    assert data["candidates"][0]["instance_id"] == "a"
    assert set(data["candidates"][0]) >= {
        "predicted_ttft_s",
        "predicted_tpot_s",
        "marginal_usd",
        "meets_slo",
    }


def test_invalid_metrics_are_rejected_when_the_view_is_built() -> None:
    with pytest.raises(ValueError, match="kv_usage"):
        inst("a", kv_usage=1.5)
    with pytest.raises(ValueError, match="decode_tokens_per_s"):
        inst("a", decode_tokens_per_s=0.0)
    with pytest.raises(ValueError, match="max_tokens"):
        req(max_tokens=0)


# --------------------------------------------------------------------------------------------
# Properties


@st.composite
def instances(draw: st.DrawFn) -> tuple[InstanceView, ...]:
    count = draw(st.integers(min_value=0, max_value=8))
    out = []
    for index in range(count):
        pool = draw(st.sampled_from(sorted(POOL_VARIANT)))
        max_batch = draw(st.integers(min_value=1, max_value=64))
        running = draw(st.integers(min_value=0, max_value=max_batch))
        measured = draw(st.booleans())
        queue = draw(
            st.dictionaries(st.integers(0, 2), st.integers(0, 20_000), max_size=3),
        )
        out.append(
            inst(
                f"i{index}",
                pool,
                price_usd_per_hour=draw(st.sampled_from([0.1, 0.4, 1.0, 1.0, 2.5])),
                healthy=draw(st.booleans()) or draw(st.booleans()),
                last_seen=NOW - draw(st.sampled_from([0.0, 5.0, 14.0, 20.0])),
                prefill_tokens_per_s=draw(st.floats(50, 10_000)) if measured else None,
                decode_tokens_per_s=draw(st.floats(5, 5_000)) if measured else None,
                decode_batch=draw(st.floats(1, 64)) if measured else None,
                running=running,
                max_batch=max_batch,
                running_remaining_tokens=draw(st.integers(0, 64 * 500)),
                queued_prompt_tokens=queue,
                queued_requests={p: max(1, t // 500) for p, t in queue.items() if t},
                kv_usage=draw(st.floats(0, 1)),
            )
        )
    return tuple(out)


requests = st.builds(
    req,
    slo_class=st.sampled_from(["critical", "standard", "batch"]),
    tenant=st.sampled_from(["acme", "picky", "gpu-only"]),
    prompt_tokens=st.integers(0, 8_000),
    max_tokens=st.integers(1, 2_000),
)


@settings(max_examples=300, deadline=None)
@given(request=requests, fleet=instances(), prefer_spot=st.booleans())
def test_property_chosen_meets_slo_and_nothing_feasible_is_cheaper(
    spec: FleetSpec, request: RouteRequest, fleet: tuple[InstanceView, ...], prefer_spot: bool
) -> None:
    policy = replace(RoutingPolicy.from_spec(spec), prefer_spot=prefer_spot)
    decision = route(request, view(*fleet), policy)
    feasible = [c for c in decision.candidates if c.meets_slo]
    slo = policy.classes[request.slo_class]
    if feasible:
        chosen = decision.chosen
        assert decision.outcome is RouteOutcome.ROUTED
        assert chosen is not None and chosen.meets_slo
        spot_first = prefer_spot and slo.spot_eligible
        if spot_first and any(c.spot for c in feasible):
            assert chosen.spot
            rivals = [c for c in feasible if c.spot]
        else:
            rivals = feasible
        assert all(chosen.marginal_usd <= c.marginal_usd for c in rivals)
    elif decision.candidates:
        expected = RouteOutcome.SHED if slo.sheddable else RouteOutcome.FALLBACK
        assert decision.outcome is expected
        assert (decision.instance_id is None) == slo.sheddable
    else:
        assert decision.outcome is RouteOutcome.UNROUTABLE and decision.instance_id is None
    # Whatever happens, no excluded instance is chosen and spot only serves eligible classes.
    assert decision.instance_id not in {e.instance_id for e in decision.excluded}
    assert all(slo.spot_eligible or not c.spot for c in decision.candidates)


@settings(max_examples=150, deadline=None)
@given(request=requests, fleet=instances(), seed=st.integers(0, 2**32 - 1))
def test_property_decision_does_not_depend_on_view_order(
    spec: FleetSpec, request: RouteRequest, fleet: tuple[InstanceView, ...], seed: int
) -> None:
    policy = RoutingPolicy.from_spec(spec)
    shuffled = list(fleet)
    random.Random(seed).shuffle(shuffled)
    assert route(request, view(*fleet), policy) == route(request, view(*shuffled), policy)


@settings(max_examples=150, deadline=None)
@given(request=requests, fleet=instances(), extra=st.integers(1, 50_000))
def test_property_more_queue_ahead_never_lowers_predicted_ttft(
    spec: FleetSpec, request: RouteRequest, fleet: tuple[InstanceView, ...], extra: int
) -> None:
    policy = RoutingPolicy.from_spec(spec)
    before = {c.instance_id: c for c in route(request, view(*fleet), policy).candidates}
    busier = [replace(i, running_prefill_tokens=i.running_prefill_tokens + extra) for i in fleet]
    after = {c.instance_id: c for c in route(request, view(*busier), policy).candidates}
    assert before.keys() == after.keys()
    for key, candidate in before.items():
        assert after[key].predicted_ttft_s >= candidate.predicted_ttft_s


# --------------------------------------------------------------------------------------------
# Strategies: least-loaded and round-robin


def strategy_policy(strategy: str) -> RoutingPolicy:
    data = {**SPEC_DATA, "routing": {"strategy": strategy}}
    return RoutingPolicy.from_spec(parse_fleet(data))


def test_from_spec_reads_the_strategy(policy: RoutingPolicy) -> None:
    assert policy.strategy == "cost-aware"
    assert strategy_policy("least-loaded").strategy == "least-loaded"
    assert strategy_policy("round-robin").strategy == "round-robin"


def test_least_loaded_ignores_price_and_takes_the_fewest_in_flight() -> None:
    policy = strategy_policy("least-loaded")
    fleet = view(
        inst("cheap", price_usd_per_hour=0.5, running=3),
        inst("dear", price_usd_per_hour=3.0, running=1, queued_requests={2: 1}),
        inst("mid", price_usd_per_hour=1.0, running=2, queued_requests={0: 1}),
    )
    decision = route(req(), fleet, policy)
    assert decision.outcome is RouteOutcome.ROUTED
    assert decision.instance_id == "dear"
    # Preference order is by load, then id: a failed forward falls back to the next least loaded.
    assert [c.instance_id for c in decision.candidates] == ["dear", "cheap", "mid"]
    assert decision.reason.startswith("least-loaded: 2 in flight, dear of 3 candidate(s)")


def test_least_loaded_breaks_ties_on_instance_id() -> None:
    policy = strategy_policy("least-loaded")
    twins = [inst(name, running=1) for name in ("b", "c", "a")]
    for order in (twins, twins[::-1]):
        assert route(req(), view(*order), policy).instance_id == "a"


def test_round_robin_rotates_in_id_order_and_wraps() -> None:
    policy = strategy_policy("round-robin")
    fleet = view(inst("n2", price_usd_per_hour=3.0), inst("n1"), inst("n3", running=9))
    chosen = [route(req(), fleet, policy).instance_id for _ in range(5)]
    assert chosen == ["n1", "n2", "n3", "n1", "n2"]
    decision = route(req(), fleet, policy)
    assert decision.instance_id == "n3"
    assert [c.instance_id for c in decision.candidates] == ["n3", "n1", "n2"]


def test_round_robin_survives_instances_leaving_and_joining() -> None:
    policy = strategy_policy("round-robin")
    assert route(req(), view(inst("a"), inst("b"), inst("c")), policy).instance_id == "a"
    assert route(req(), view(inst("a"), inst("b"), inst("c")), policy).instance_id == "b"
    # b left and d joined: the turn passes to the next id after b, not to a position.
    assert route(req(), view(inst("a"), inst("c"), inst("d")), policy).instance_id == "c"
    assert route(req(), view(inst("a"), inst("c"), inst("d")), policy).instance_id == "d"
    assert route(req(), view(inst("a"), inst("c"), inst("d")), policy).instance_id == "a"


def test_round_robin_turns_are_kept_per_model() -> None:
    policy = strategy_policy("round-robin")
    fleet = view(inst("a"), inst("b"))
    assert route(req(), fleet, policy).instance_id == "a"
    assert policy.cursor.last == {"llama-8b": "a"}
    other = route(req(model="mistral-7b"), fleet, policy)
    assert other.outcome is RouteOutcome.UNROUTABLE
    assert policy.cursor.last == {"llama-8b": "a"}
    assert route(req(), fleet, policy).instance_id == "b"


def test_plain_strategies_choose_a_late_instance_as_fallback() -> None:
    # "a" is first in turn but its backlog breaks a standard request's TTFT; "b" would meet it.
    a = inst("a", queued_requests={0: 8}, queued_prompt_tokens={0: 20_000})
    fleet = view(a, inst("b", running=5))
    rr = route(req(), fleet, strategy_policy("round-robin"))
    assert (rr.outcome, rr.instance_id) == (RouteOutcome.FALLBACK, "a")
    assert "does not meet" in rr.reason and "(1 candidate(s) would)" in rr.reason
    ll = route(req(), fleet, strategy_policy("least-loaded"))
    assert (ll.outcome, ll.instance_id) == (RouteOutcome.ROUTED, "b")


@pytest.mark.parametrize("strategy", ["least-loaded", "round-robin"])
def test_plain_strategies_keep_permissions_and_shedding(strategy: str) -> None:
    policy = strategy_policy(strategy)
    fleet = view(inst("spot", "gpu-spot"), inst("cpu-1", "cpu"), inst("gpu-1", running=4))
    # Critical work may not run on spot and needs high quality: only gpu-1 is a candidate.
    decision = route(req("critical"), fleet, policy)
    assert decision.instance_id == "gpu-1"
    assert set(excluded_reasons(decision)) == {"spot", "cpu-1"}
    # Sheddable work is shed when no candidate meets its SLO, as with cost-aware routing.
    jammed = view(overloaded("a", 100_000), overloaded("b", 80_000))
    shed = route(req("batch"), jammed, policy)
    assert shed.outcome is RouteOutcome.SHED and shed.instance_id is None
    assert shed.retry_after_s == pytest.approx(17.0)
    # Nothing to choose from is still unroutable.
    assert route(req(), view(), policy).outcome is RouteOutcome.UNROUTABLE


def test_the_cursor_does_not_take_part_in_policy_equality(spec: FleetSpec) -> None:
    first, second = RoutingPolicy.from_spec(spec), RoutingPolicy.from_spec(spec)
    first.cursor.next_after("llama-8b", ["x"])
    assert first == second


# --------------------------------------------------------------------------------------------
# Versions: the rollout filter (RouteRequest.version, fallback_version)
# Here int4 (cpu pools) plays the candidate and bf16 (gpu pools) the stable version.


def test_version_keeps_only_instances_serving_it(policy: RoutingPolicy) -> None:
    # Without a version the cheap int4 CPU instance wins (see above); assigned bf16, the GPU does.
    decision = route(req(version="bf16", fallback_version="bf16"), cpu_and_gpu(), policy)
    assert decision.outcome is RouteOutcome.ROUTED
    assert decision.instance_id == "gpu-1"
    assert [c.instance_id for c in decision.candidates] == ["gpu-1"]
    assert excluded_reasons(decision) == {
        "cpu-1": "version: serves 'int4'; the rollout sends this request to 'bf16'"
    }
    assigned = route(req(version="int4", fallback_version="bf16"), cpu_and_gpu(), policy)
    assert assigned.instance_id == "cpu-1"
    assert excluded_reasons(assigned) == {
        "gpu-1": "version: serves 'bf16'; the rollout sends this request to 'int4'"
    }


def test_version_without_a_candidate_falls_back_to_the_stable_one(
    policy: RoutingPolicy,
) -> None:
    sick = view(inst("cpu-1", "cpu", healthy=False), inst("gpu-1"), inst("gpu-2"))
    decision = route(req(version="int4", fallback_version="bf16"), sick, policy)
    assert decision.outcome is RouteOutcome.ROUTED
    assert decision.instance_id == "gpu-1"
    assert excluded_reasons(decision) == {"cpu-1": "unhealthy: reported not ready"}
    # A version no instance serves at all: the same fallback.
    unserved = route(req(version="int8", fallback_version="bf16"), cpu_and_gpu(), policy)
    assert unserved.instance_id == "gpu-1"
    assert excluded_reasons(unserved) == {
        "cpu-1": "version: serves 'int4'; the rollout sends this request to 'bf16' "
        "(no candidate serves its version 'int8')"
    }


def test_version_filter_comes_after_the_permissions(policy: RoutingPolicy) -> None:
    # 'picky' needs reference quality: int4 is no candidate for it, so the rollout's int4
    # assignment falls back to bf16 rather than overriding the tenant's floor.
    decision = route(
        req(tenant="picky", version="int4", fallback_version="bf16"), cpu_and_gpu(), policy
    )
    assert decision.instance_id == "gpu-1"
    assert excluded_reasons(decision)["cpu-1"].startswith("quality too low:")
    # A forwarded request at the hop limit stays local, whatever version it was assigned.
    local = view(inst("cpu-1", "cpu"), inst("gpu-1"), local_instance_id="gpu-1")
    at_limit = route(req(version="int4", fallback_version="bf16", hops=1), local, policy)
    assert at_limit.instance_id == "gpu-1"


def test_no_candidate_for_either_version_routes_as_without_a_rollout(
    policy: RoutingPolicy,
) -> None:
    plain = route(req(), cpu_and_gpu(), policy)
    orphan = route(req(version="int8", fallback_version="fp8"), cpu_and_gpu(), policy)
    assert orphan == plain
    assert orphan.instance_id == "cpu-1"
    # Only a fallback missing: the same.
    assert route(req(version="int8"), cpu_and_gpu(), policy) == plain
    # The stable version's instances all gone: the candidate serves rather than failing.
    only_cpu = view(inst("cpu-1", "cpu"), inst("gpu-1", healthy=False))
    decision = route(req(version="bf16", fallback_version="bf16"), only_cpu, policy)
    assert decision.instance_id == "cpu-1"
    assert decision.outcome is RouteOutcome.ROUTED


def test_no_version_leaves_routing_unchanged(policy: RoutingPolicy) -> None:
    assert route(req(version=None), cpu_and_gpu(), policy) == route(req(), cpu_and_gpu(), policy)


def test_split_through_the_router_serves_the_share_per_version(policy: RoutingPolicy) -> None:
    """choose_version feeding route(): a quarter of the ids reach int4, each id always the same."""
    from runtime.rollout import choose_version

    split = {"int4": 0.25, "bf16": 0.75}
    fleet = cpu_and_gpu()
    n = 2000
    served: dict[str, str] = {}
    for i in range(n):
        rid = f"req-{i}"
        decision = route(
            req(request_id=rid, version=choose_version(rid, split), fallback_version="bf16"),
            fleet,
            policy,
        )
        assert decision.chosen is not None
        served[rid] = decision.chosen.variant
    share = sum(v == "int4" for v in served.values())
    # Binomial(2000, 0.25): sigma = sqrt(2000 x 0.25 x 0.75) = 19.4; 4 sigma = 77.5.
    assert abs(share - 500) <= 77
    again = route(
        req(request_id="req-7", version=choose_version("req-7", split), fallback_version="bf16"),
        fleet,
        policy,
    )
    assert again.chosen is not None and again.chosen.variant == served["req-7"]
