"""The pure planning of the VM pools' internal load balancers (components.plan, naming): which
pools get one, the `/readyz` health check and its timing against each cloud's limits, drain
delays, endpoint URLs, Azure child IDs and names. No Pulumi involved."""

from __future__ import annotations

import functools
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from components import naming
from components.plan import (
    GCP_HEALTH_CHECK_RANGES,
    PlanError,
    PoolPlan,
    api_endpoint,
    azure_lb_child_id,
    azure_subscription,
    load_balancer_plan,
    load_balancer_reason,
    plan_pool,
)
from runtime.catalog import default_catalog

from .support import load_stack

SUBNET = (
    "/subscriptions/6f1c2d3e-4a5b-4c6d-8e7f-9a0b1c2d3e4f/resourceGroups/acme-network-prod/"
    "providers/Microsoft.Network/virtualNetworks/inference-eus/subnets/nodes"
)


@functools.cache
def _plans() -> dict[str, PoolPlan]:
    spec, _ = load_stack("Pulumi.prod.yaml")
    catalog = default_catalog()
    return {pool.name: plan_pool(spec, pool, catalog) for pool in spec.pools}


def test_every_vm_pool_but_tpu_gets_a_load_balancer() -> None:
    plans = _plans()
    with_lb = sorted(name for name, plan in plans.items() if load_balancer_reason(plan) is None)
    assert with_lb == [
        "aws-use1-a10g",
        "aws-use1-a10g-spot",
        "aws-use1-cpu",
        "aws-usw2-inf2",
        "azure-eus-a100",
        "gcp-usc1-l4",
        "gcp-usc1-l4-spot",
    ]
    assert load_balancer_reason(plans["gcp-usc1-tpu-v5e"]) == (
        "TPU VMs cannot join an instance group or a GCE_VM_IP network endpoint group"
    )
    assert load_balancer_plan(plans["gcp-usc1-tpu-v5e"], 8080, 30) is None
    assert load_balancer_plan(plans["k8s-eks-l4"], 8080, 30) is None
    spec, _ = load_stack("local.yaml")
    for pool in spec.pools:
        plan = plan_pool(spec, pool, default_catalog())
        assert load_balancer_reason(plan) == "local pools run on the machine at hand"


def test_the_plan_checks_readyz_on_the_agent_port() -> None:
    plan = load_balancer_plan(_plans()["aws-use1-a10g"], 9090, 45.5)
    assert plan is not None
    assert plan.port == plan.health.port == 9090
    assert plan.health.path == "/readyz"
    assert (plan.health.interval_s, plan.health.timeout_s) == (5, 3)
    assert (plan.health.healthy_threshold, plan.health.unhealthy_threshold) == (2, 2)
    assert plan.health.out_of_rotation_s == 10
    assert plan.drain_s == 46  # whole seconds, never shorter than the agent's drain


@given(
    port=st.integers(min_value=1, max_value=65535),
    drain=st.floats(min_value=0, max_value=100_000, allow_nan=False),
)
def test_the_plan_stays_within_every_clouds_limits(port: int, drain: float) -> None:
    plan = load_balancer_plan(_plans()["gcp-usc1-l4"], port, drain)
    assert plan is not None
    health = plan.health
    # AWS NLB HTTP checks: interval 5-300, timeout 2-120 and below the interval, thresholds
    # 2-10; GCP: timeout <= interval; Azure: interval >= 5.
    assert 5 <= health.interval_s <= 300
    assert 2 <= health.timeout_s < health.interval_s
    assert 2 <= health.healthy_threshold <= 10 and 2 <= health.unhealthy_threshold <= 10
    # Deregistration delay / connection draining: 0-3600 s.
    assert 0 <= plan.drain_s <= 3600
    assert plan.drain_s >= min(drain, 3600)
    # A draining node leaves rotation well within the agent's default 30 s drain.
    assert health.out_of_rotation_s < 30


def test_bad_ports_and_drains_are_refused() -> None:
    plan = _plans()["azure-eus-a100"]
    with pytest.raises(PlanError, match="70000 is not a port number"):
        load_balancer_plan(plan, 70000, 30)
    with pytest.raises(PlanError, match="negative drain timeout"):
        load_balancer_plan(plan, 8080, -1)


def test_endpoints() -> None:
    assert api_endpoint("10.1.2.3", 8080) == "http://10.1.2.3:8080/v1"
    assert api_endpoint("lb-1.elb.us-east-1.amazonaws.com", 80) == (
        "http://lb-1.elb.us-east-1.amazonaws.com:80/v1"
    )
    assert api_endpoint("fd00::5", 8080) == "http://[fd00::5]:8080/v1"
    assert api_endpoint("[fd00::5]", 8080) == "http://[fd00::5]:8080/v1"


def test_gcp_health_check_ranges_are_googles() -> None:
    assert GCP_HEALTH_CHECK_RANGES == ("35.191.0.0/16", "130.211.0.0/22")


def test_azure_child_ids() -> None:
    assert azure_subscription(SUBNET) == "6f1c2d3e-4a5b-4c6d-8e7f-9a0b1c2d3e4f"
    assert azure_subscription(SUBNET.replace("/subscriptions/", "/SUBSCRIPTIONS/")) == (
        "6f1c2d3e-4a5b-4c6d-8e7f-9a0b1c2d3e4f"
    )
    with pytest.raises(PlanError, match="is not an Azure resource ID"):
        azure_subscription("nodes")
    assert azure_lb_child_id("sub", "rg", "lb", "probes", "readyz") == (
        "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Network/loadBalancers/lb/"
        "probes/readyz"
    )
    with pytest.raises(PlanError, match="unknown load balancer child kind 'rules'"):
        azure_lb_child_id("sub", "rg", "lb", "rules", "agent")


@given(st.text(max_size=200), st.integers(min_value=8, max_value=80))
def test_azure_names_are_valid_and_bounded(text: str, limit: int) -> None:
    name = naming.azure_name(text, limit)
    assert re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9_])?", name), name
    assert len(name) <= limit


def test_azure_names_keep_plain_names() -> None:
    assert naming.azure_name("acme-azure-eus-a100-lb") == "acme-azure-eus-a100-lb"
    # Past the limit: a prefix and a hash of the whole, so names that differ late stay apart.
    long = "acme-" + "x" * 100 + "-lb"
    assert len(naming.azure_name(long)) == 80
    assert naming.azure_name(long) != naming.azure_name(long.replace("-lb", "-lc"))
