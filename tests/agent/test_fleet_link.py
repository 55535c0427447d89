"""runtime.agent.fleet on fabricated replies and a fake clock: leases and their clock
conversion, fallback, budgets, the routing view, recent use, the snapshot, the policy."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from runtime.agent.admission import ThroughputEstimate, WorkItem
from runtime.agent.backend import BackendStats
from runtime.agent.config import NodeConfig, node_config_from_spec
from runtime.agent.fleet import (
    FleetLink,
    RecentUseMeter,
    budget_limit,
    instance_snapshot,
    routing_policy,
)
from runtime.protocol import InstanceSnapshot, LeaseGrant, PeerInstance, PushReply
from runtime.quota import QuotaBook
from runtime.routing import RoutingPolicy
from runtime.spec import FLEET_CONFIG_KEY, parse_fleet

from .support import node_config_data

SERVER_T0 = 1_741_780_800.0  # the controller's epoch clock; the agent's clock starts at 100
LOCAL_STACK = Path(__file__).resolve().parents[2] / "stacks" / "local.yaml"


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fleet_config(**overrides: Any) -> NodeConfig:
    data = node_config_data(controller_url="http://127.0.0.1:9", **overrides)
    data["tenants"] = [
        *data["tenants"],
        {
            "name": "budgeted",
            "key_sha256": ["a" * 64],
            "default_priority": "standard",
            "quotas": {"requests_per_minute": 10, "usd_per_month": 5.0},
        },
    ]
    return NodeConfig.model_validate(data)


def link(clock: Clock, config: NodeConfig | None = None) -> tuple[FleetLink, QuotaBook]:
    config = config or fleet_config()
    quotas = QuotaBook.from_specs({t.name: t.quotas for t in config.tenants}, clock)
    return FleetLink(config, quotas, clock), quotas


def peer(instance_id: str, last_seen: float, **extra: Any) -> PeerInstance:
    return PeerInstance(
        instance_id=instance_id,
        pool=extra.pop("pool", "local-test"),
        url=f"http://127.0.0.1:9/{instance_id}",
        model="smollm2-135m",
        variant="q4-1",
        price_usd_per_hour=1.0,
        last_seen=last_seen,
        **extra,
    )


def grant(rpm: int | None, ttl: float = 30.0, at: float = SERVER_T0) -> LeaseGrant:
    return LeaseGrant(
        requests_per_minute=rpm,
        tokens_per_minute=None,
        max_concurrency=None,
        issued_at=at,
        expires_at=at + ttl,
    )


def reply(**fields: Any) -> PushReply:
    return PushReply(accepted=True, server_time=fields.pop("server_time", SERVER_T0), **fields)


def local_snapshot(config: NodeConfig, **extra: Any) -> InstanceSnapshot:
    return InstanceSnapshot(
        instance_id=config.node_id,
        pool=config.pool,
        url="http://127.0.0.1:1",
        model=config.model,
        variant=config.variant,
        price_usd_per_hour=config.price_usd_per_hour,
        **extra,
    )


def rpm(quotas: QuotaBook, tenant: str) -> Any:
    return quotas.snapshot(tenant)["requests_per_minute"]


def test_a_lease_counts_its_lifetime_from_when_the_push_was_built() -> None:
    clock = Clock(100.0)
    fleet, quotas = link(clock)
    fleet.push_built()
    clock.now = 100.4  # the reply arrives later; the controller stamped it in between
    fleet.apply_reply(
        reply(
            server_time=SERVER_T0 + 0.2,
            leases={"budgeted": grant(7, ttl=30.0, at=SERVER_T0 + 0.2)},
            fleet=[peer("a", SERVER_T0), peer("b", SERVER_T0)],
        )
    )
    assert rpm(quotas, "budgeted") == 7
    clock.now = 129.9
    assert rpm(quotas, "budgeted") == 7
    clock.now = 130.0  # 30 s after the push was built (from the reply's arrival: 130.4)
    # Expired: the fallback is the even share over the two agents of the last view (10 // 2).
    assert rpm(quotas, "budgeted") == 5
    assert quotas.tenants["budgeted"].lease.expires_at is None


def test_the_fallback_is_the_even_share_of_the_last_view_and_never_zero() -> None:
    clock = Clock()
    fleet, quotas = link(clock)
    three = [peer(name, SERVER_T0) for name in ("a", "b", "c")]
    fleet.push_built()
    fleet.apply_reply(reply(fleet=three, leases={"budgeted": grant(8, ttl=5.0)}))
    assert rpm(quotas, "budgeted") == 8
    clock.now += 5.0
    assert rpm(quotas, "budgeted") == 10 // 3
    assert rpm(quotas, "tiny") == 1  # 2 // 3 would be 0: an agent never falls back to zero
    assert fleet.expected_agents == 3


def test_over_budget_tenants_are_refused_naming_the_budget_until_the_reply_expires() -> None:
    clock = Clock()
    fleet, quotas = link(clock)
    fleet.push_built()
    fleet.apply_reply(
        reply(leases={"budgeted": grant(10, ttl=30.0)}, over_budget_tenants=["budgeted"])
    )
    decision = quotas.admit("budgeted", 10)
    assert not decision.allowed and decision.limit == "usd_per_month"
    assert decision.message == "monthly budget (usd_per_month) of tenant 'budgeted' is used up"
    assert quotas.admit("demo", 10).allowed
    clock.now += 30.0  # the controller went silent: budgets can no longer be judged here
    assert quotas.admit("budgeted", 10).allowed


def test_a_blocked_tenant_without_a_lease_keeps_its_limits() -> None:
    clock = Clock()
    fleet, quotas = link(clock)
    fleet.push_built()
    fleet.apply_reply(reply(over_budget_tenants=["tiny"]))
    assert not quotas.admit("tiny", 1).allowed
    assert rpm(quotas, "tiny") == 2


def test_the_budget_named_is_the_one_the_tenant_has() -> None:
    config = fleet_config()
    tenants = {t.name: t for t in config.tenants}
    assert budget_limit(tenants["budgeted"]) == "usd_per_month"
    tiny = tenants["tiny"]
    hours_quota = tiny.quotas.model_copy(update={"accelerator_hours_per_month": 1.0})
    hours = tiny.model_copy(update={"quotas": hours_quota})
    assert budget_limit(hours) == "accelerator_hours_per_month"
    assert budget_limit(tenants["demo"]) == "monthly_budget"


def test_the_fleet_budget_flag_holds_as_long_as_the_reply() -> None:
    clock = Clock()
    fleet, _ = link(clock)
    assert not fleet.fleet_over_budget
    fleet.push_built()
    fleet.apply_reply(reply(fleet_over_budget=True, leases={"demo": grant(None, ttl=10.0)}))
    assert fleet.fleet_over_budget
    clock.now += 10.0
    assert not fleet.fleet_over_budget


def test_the_view_holds_the_live_local_entry_failed_peers_and_forwards_in_flight() -> None:
    clock = Clock()
    config = fleet_config()
    fleet, _ = link(clock, config)
    local = local_snapshot(config, running=3)
    assert fleet.fleet_view(local) is None  # no reply yet: no routing
    fleet.push_built()
    stale_self = peer(config.node_id, SERVER_T0 - 1.0, running=0)
    fleet.apply_reply(reply(fleet=[stale_self, peer("p1", SERVER_T0 - 0.5), peer("p2", SERVER_T0)]))
    clock.now += 2.0
    view = fleet.fleet_view(local)
    assert view is not None
    assert view.now == pytest.approx(SERVER_T0 + 2.0)
    by_id = {i.instance_id: i for i in view.instances}
    assert set(by_id) == {config.node_id, "p1", "p2"}
    assert by_id[config.node_id].running == 3 and by_id[config.node_id].last_seen == view.now
    assert view.local_instance_id == config.node_id

    # A forward counts against the peer's queue until it ends.
    def p1_in_view() -> Any:
        view = fleet.fleet_view(local)
        assert view is not None
        return next(i for i in view.instances if i.instance_id == "p1")

    key = fleet.forward_started("p1", "smollm2-135m", priority=1, prompt_tokens=40)
    p1 = p1_in_view()
    assert (p1.queued_requests, p1.queued_prompt_tokens) == ({1: 1}, {1: 40})
    fleet.forward_finished(key)
    assert p1_in_view().queued_requests == {}

    # A failed peer is marked until a later view shows it pushed again.
    fleet.mark_failed("p2")  # at controller time T0 + 2

    def p2_in_view() -> Any:
        view = fleet.fleet_view(local)
        assert view is not None
        return next(i for i in view.instances if i.instance_id == "p2")

    assert p2_in_view().failed_at == pytest.approx(SERVER_T0 + 2.0)
    clock.now += 1.0
    fleet.push_built()
    fleet.apply_reply(reply(server_time=SERVER_T0 + 3.0, fleet=[peer("p2", SERVER_T0 + 1.5)]))
    assert p2_in_view().failed_at is not None  # that push was before the failure
    fleet.push_built()
    fleet.apply_reply(reply(server_time=SERVER_T0 + 3.5, fleet=[peer("p2", SERVER_T0 + 3.2)]))
    assert p2_in_view().failed_at is None


def test_forwards_already_in_a_peers_push_are_not_counted_twice() -> None:
    clock = Clock()
    config = fleet_config()
    fleet, _ = link(clock, config)
    fleet.push_built()
    fleet.apply_reply(reply(fleet=[peer("p1", SERVER_T0)]))
    fleet.forward_started(
        "p1", "smollm2-135m", priority=1, prompt_tokens=40
    )  # sent after p1's last push
    clock.now += 1.0
    fleet.push_built()
    # p1 pushed again after the forward arrived: its own queue now shows the request.
    fleet.apply_reply(reply(server_time=SERVER_T0 + 1.0, fleet=[peer("p1", SERVER_T0 + 0.5)]))
    view = fleet.fleet_view(local_snapshot(config))
    assert view is not None
    assert {i.instance_id: i.queued_requests for i in view.instances}["p1"] == {}


def test_recent_use_is_a_per_minute_rate_over_the_window_with_peak_concurrency() -> None:
    clock = Clock(0.0)
    meter = RecentUseMeter(clock, window_s=30.0)
    meter.started("a", 100)
    meter.started("a", 100)
    meter.finished("a", -60)  # used 40 of the 100 charged
    report = meter.report()["a"]
    assert report.requests_per_minute == 4.0  # 2 in 30 s
    assert report.tokens_per_minute == 280.0  # 140 in 30 s
    assert report.concurrency == 2.0  # the peak since the last report
    assert meter.report()["a"].concurrency == 1.0  # one is still in flight
    meter.finished("a", 0)
    clock.now = 31.0
    assert "a" in meter.report()  # the peak of the last interval still shows once
    assert meter.report() == {}


def test_the_snapshot_reads_queues_and_speed_from_the_backend() -> None:
    config = fleet_config(spot=True)
    snapshot = instance_snapshot(
        config,
        "http://127.0.0.1:8001",
        healthy=True,
        stats=BackendStats(1, 2, 3, 10, 100, 1.2, 500.0, 0.05),
        throughput=ThroughputEstimate(0.2, 500.0, 0.05, 2.0),
        items=[
            WorkItem(priority=1, prefill_tokens_left=0, decode_tokens_left=10, running=True),
            WorkItem(priority=1, prefill_tokens_left=5, decode_tokens_left=20, running=True),
            WorkItem(priority=2, prefill_tokens_left=30, decode_tokens_left=16, running=False),
        ],
        max_batch=8,
    )
    assert snapshot.spot and snapshot.healthy and snapshot.max_batch == 8
    assert snapshot.decode_tokens_per_s == pytest.approx(40.0)  # 2 sequences per 0.05 s step
    assert (snapshot.running, snapshot.running_prefill_tokens) == (2, 5)
    assert snapshot.running_remaining_tokens == 30
    assert (snapshot.queued_requests, snapshot.queued_prompt_tokens) == ({2: 1}, {2: 30})
    assert snapshot.kv_usage == 1.0  # clipped
    cold = instance_snapshot(
        config,
        "http://127.0.0.1:8001",
        healthy=False,
        stats=BackendStats(0, 0, 0, None, None, None, None, None),
        throughput=ThroughputEstimate(),
        items=[],
        max_batch=1,
    )
    assert cold.prefill_tokens_per_s is None and cold.decode_tokens_per_s is None


def test_the_policy_from_a_node_config_is_the_specs_own() -> None:
    data = copy.deepcopy(yaml.safe_load(LOCAL_STACK.read_text())["config"][FLEET_CONFIG_KEY])
    data["tenants"][1]["allowed_pools"] = ["local-dear"]
    data["tenants"][1]["min_quality"] = "standard"
    data["routing"] = {
        "slo_headroom": 0.7,
        "hop_limit": 2,
        "peer_stale_after_s": 4,
        "strategy": "least-loaded",
    }
    spec = parse_fleet(data)
    env = {"FLEETFORM_DEMO_KEY": "d", "FLEETFORM_BATCH_KEY": "b"}
    config = node_config_from_spec(spec, "local-cheap", "n1", 0, environ=env)
    mine = routing_policy(config)
    theirs = RoutingPolicy.from_spec(spec)
    for name in (
        "classes",
        "tenant_min_quality",
        "tenant_pools",
        "variant_quality",
        "slo_headroom",
        "prefer_spot",
        "hop_limit",
        "strategy",
    ):
        assert getattr(mine, name) == getattr(theirs, name), name
    assert mine.strategy == "least-loaded"  # not the default: the spec's choice reached the agent
    assert mine.tenant_pools["batch-jobs"] == frozenset({"local-dear"})
    # The agent's view lags the controller's by up to one of its push intervals.
    assert mine.stale_after_s == theirs.stale_after_s + config.push_interval_s
