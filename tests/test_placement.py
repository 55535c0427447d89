"""Demand-driven placement: the pure policy, its relief of the autoscaler, the wire view.

The placer is driven with fabricated node states; the autoscaler test runs the real
:class:`runtime.autoscale.Autoscaler` built from a spec with a pool that may load a second
model.
"""

from __future__ import annotations

import dataclasses

import pytest

from runtime.agent.config import node_config_from_spec
from runtime.agent.fleet import routing_policy
from runtime.autoscale import Autoscaler, FleetSignals, ModelSignals, PoolSignals
from runtime.controller.placement import PlacementLoop
from runtime.placement import HeldModel, NodeState, Placer
from runtime.protocol import InstanceSnapshot, LoadedModel, PushReply
from runtime.routing import FleetView, RouteRequest, RoutingPolicy, route
from runtime.spec import FleetSpec, PlacementSpec, Quality

GIB = 1 << 30


def node(
    node_id: str,
    *models: HeldModel,
    budget: int | None = 4 * GIB,
    price: float = 1.0,
    healthy: bool = True,
) -> NodeState:
    return NodeState(
        node_id=node_id,
        pool="p",
        healthy=healthy,
        price_usd_per_hour=price,
        memory_budget_bytes=budget,
        models=models,
    )


def primary(name: str = "a", **kw: object) -> HeldModel:
    return HeldModel(name, "v", "ready", memory_bytes=GIB, primary=True, **kw)  # type: ignore[arg-type]


def other(state: str = "unloaded", name: str = "b", **kw: object) -> HeldModel:
    return HeldModel(name, "q8", state, memory_bytes=GIB, **kw)  # type: ignore[arg-type]


SETTINGS = PlacementSpec(queue_per_copy=4, idle_unload_s=60, load_cooldown_s=30)


def test_a_growing_queue_loads_one_more_copy_on_the_node_with_room_and_relieves_the_model() -> None:
    nodes = [
        node("n1", primary(), other("ready", queued=9, in_flight=11)),
        node("n2", primary(in_flight=3), other()),
        node("n3", primary(), other()),
    ]
    plan = Placer(SETTINGS).plan(nodes, now=100.0)
    assert [(a.kind, a.node_id, a.model, a.variant) for a in plan.actions] == [
        ("load", "n3", "b", "q8")  # n2 is busier
    ]
    assert "9 request(s) waiting over 1 ready copy" in plan.actions[0].reason
    assert plan.relieving == {"b": f"loading b on n3: {plan.actions[0].reason}"}
    assert plan.demand["b"].ready_copies == 1 and plan.demand["b"].waiting == 9


def test_at_or_below_the_threshold_nothing_is_loaded() -> None:
    nodes = [node("n1", primary(), other("ready", queued=4)), node("n2", primary(), other())]
    plan = Placer(SETTINGS).plan(nodes, now=0.0)
    assert plan.actions == () and plan.relieving == {}


def test_requests_waiting_for_a_load_count_as_demand() -> None:
    nodes = [node("n1", primary(), other("ready", waiting=6)), node("n2", primary(), other())]
    plan = Placer(SETTINGS).plan(nodes, now=0.0)
    assert [(a.kind, a.node_id) for a in plan.actions] == [("load", "n2")]


def test_free_memory_is_preferred_to_evicting_and_a_node_without_room_is_never_chosen() -> None:
    idle_c = HeldModel("c", "v", "ready", memory_bytes=2 * GIB, idle_s=5.0)
    busy_c = HeldModel("c", "v", "ready", memory_bytes=2 * GIB, in_flight=1)
    hot = other("ready", queued=20)
    # n2 fits only by evicting c; n3 has the room free but is pricier; n4 cannot make room.
    nodes = [
        node("n1", primary(), hot),
        node("n2", primary(), other(), idle_c, budget=3 * GIB, price=0.1),
        node("n3", primary(), other(), price=5.0),
        node("n4", primary(), other(), busy_c, budget=3 * GIB, price=0.1),
    ]
    plan = Placer(SETTINGS).plan(nodes, now=0.0)
    assert [a.node_id for a in plan.actions if a.kind == "load"] == ["n3"]
    # Without n3, eviction on n2 is the only way; n4's c is busy and cannot be evicted.
    plan = Placer(SETTINGS).plan([n for n in nodes if n.node_id != "n3"], now=0.0)
    assert [a.node_id for a in plan.actions if a.kind == "load"] == ["n2"]
    plan = Placer(SETTINGS).plan([nodes[0], nodes[3]], now=0.0)
    assert plan.actions == () and plan.relieving == {}
    assert plan.notes == (
        "b: 20 request(s) waiting over 1 ready copy (> 4 per copy), "
        "but no node that may hold it has room",
    )


def test_one_load_per_cooldown_and_none_while_a_copy_is_loading() -> None:
    placer = Placer(SETTINGS)
    hot = [node("n1", primary(), other("ready", queued=30)), node("n2", primary(), other())]
    hot.append(node("n3", primary(), other()))
    assert len(placer.plan(hot, now=0.0).actions) == 1
    # The agent has not reported the load yet: within the cooldown nothing more is asked.
    assert placer.plan(hot, now=10.0).actions == ()
    # It is loading now: no second copy, and the autoscaler is still held.
    loading = [hot[0], node("n2", primary(), other("loading")), hot[2]]
    plan = placer.plan(loading, now=40.0)
    assert plan.actions == () and plan.relieving == {"b": "loading b on n2"}
    # Past the cooldown with the queue still long and nothing loading: one more.
    assert [a.node_id for a in placer.plan(hot, now=31.0).actions] == ["n2"]


def test_idle_copies_are_unloaded_but_never_the_primary_a_busy_one_or_one_wanted_elsewhere() -> (
    None
):
    nodes = [
        node("n1", primary(idle_s=999.0), other("ready", idle_s=61.0)),
        node("n2", primary(), other("ready", idle_s=59.0)),
        node("n3", primary(), other("ready", idle_s=500.0, in_flight=1)),
        node("n4", primary(), other("ready", name="c", idle_s=None)),
    ]
    plan = Placer(SETTINGS).plan(nodes, now=0.0)
    assert [(a.kind, a.node_id, a.model) for a in plan.actions] == [("unload", "n1", "b")]
    assert plan.actions[0].reason == "idle 61 s (>= 60 s)"
    # While b has requests queued somewhere, its idle copy stays for the router to use.
    queued = [node("n0", primary(), other("ready", queued=2)), *nodes]
    assert Placer(SETTINGS).plan(queued, now=0.0).actions == ()


def test_unhealthy_nodes_are_ignored_and_disabled_placement_does_nothing() -> None:
    nodes = [
        node("n1", primary(), other("ready", queued=30)),
        node("n2", primary(), other(), healthy=False),
    ]
    assert Placer(SETTINGS).plan(nodes, now=0.0).actions == ()
    nodes[1] = dataclasses.replace(nodes[1], healthy=True)
    off = Placer(SETTINGS.model_copy(update={"enabled": False}))
    assert off.plan(nodes, now=0.0).actions == ()
    assert len(Placer(SETTINGS).plan(nodes, now=0.0).actions) == 1


def test_the_placer_memory_survives_a_dump_and_reload() -> None:
    placer = Placer(SETTINGS)
    nodes = [node("n1", primary(), other("ready", queued=30)), node("n2", primary(), other())]
    assert placer.plan(nodes, now=0.0).actions
    restored = Placer(SETTINGS)
    restored.load_state(placer.dump_state())
    assert restored.plan(nodes, now=10.0).actions == ()  # still within the cooldown
    with pytest.raises(ValueError):
        restored.load_state({"last_load_at": [1, 2]})


# --------------------------------------------------------------------------------------------
# The autoscaler waits for what placement is loading


SPEC = {
    "name": "t",
    "models": [
        {
            "name": m,
            "parameters_b": 0.135,
            "layers": 30,
            "hidden_size": 576,
            "kv_heads": 3,
            "head_dim": 64,
            "context_length": 2048,
            "variants": [
                {"name": "q", "precision": "int4", "quality": "standard", "runs_on": ["cpu"]}
            ],
        }
        for m in ("a", "b")
    ],
    "slo_classes": [{"name": "standard", "priority": 1, "ttft_ms": 2000, "tpot_ms": 200}],
    "pools": [
        {
            "name": f"pool-{m}",
            "cloud": "local",
            "region": "local",
            "instance_type": "local",
            "priced_as": {"cloud": "aws", "region": "us-east-1", "instance_type": "m7g.large"},
            "min_replicas": 1,
            "max_replicas": 5,
            "serves": {"model": m, "variant": "q"},
            "may_load": [{"model": "b", "variant": "q"}] if m == "a" else [],
            "memory_budget_bytes": 2 * GIB,
            "cold_start_s": 10,
        }
        for m in ("a", "b")
    ],
    "tenants": [{"name": "t1", "api_keys": ["sha256:" + "0" * 64], "default_priority": "standard"}],
    "autoscaling": {"period_s": 5, "scale_up_cooldown_s": 0, "forecast": {"method": "none"}},
}


def test_the_autoscaler_holds_scale_up_of_a_model_placement_is_relieving() -> None:
    spec = FleetSpec.model_validate(SPEC)
    busy = ModelSignals(in_flight=40.0, by_class={"standard": 40.0}, queued=30, arrivals_per_s=4)
    signals = FleetSignals(
        now=100.0,
        pools={"pool-a": PoolSignals(requested=1, ready=1), "pool-b": PoolSignals(1, ready=1)},
        models={"a": busy, "b": busy},
    )
    free = Autoscaler.from_spec(spec).plan(signals)
    assert free.decisions["pool-b"].desired > 1 and free.decisions["pool-a"].desired > 1
    held_signals = dataclasses.replace(signals, placement={"b": "loading b on n7"})
    held = Autoscaler.from_spec(spec).plan(held_signals)
    assert held.decisions["pool-b"].desired == 1
    assert any("held: loading b on n7" in r for r in held.decisions["pool-b"].reasons)
    assert held.decisions["pool-a"].desired == free.decisions["pool-a"].desired


def test_a_pool_may_load_only_known_other_models_it_can_run() -> None:
    bad = dict(SPEC)
    pools = [dict(p) for p in SPEC["pools"]]  # type: ignore[union-attr]
    pools[0]["may_load"] = [{"model": "a", "variant": "q"}, {"model": "zz", "variant": "q"}]
    bad["pools"] = pools
    with pytest.raises(ValueError) as caught:
        FleetSpec.model_validate(bad)
    text = str(caught.value)
    assert "pools[0].may_load[0].model" in text and "the pool's own model" in text
    assert "pools[0].may_load[1].model" in text and "zz" in text


# --------------------------------------------------------------------------------------------
# What agents report, what the controller makes of it, what routing sees


def snapshot(**extra: object) -> InstanceSnapshot:
    base: dict[str, object] = {
        "instance_id": "n1",
        "pool": "pool-a",
        "url": "http://127.0.0.1:9",
        "model": "a",
        "variant": "q",
        "price_usd_per_hour": 0.1,
        "queued_requests": {1: 2},
        "memory_budget_bytes": 2 * GIB,
    }
    base.update(extra)
    return InstanceSnapshot.model_validate(base)


def test_a_node_is_routed_to_for_each_ready_model_with_that_models_own_load() -> None:
    held = [
        LoadedModel(name="a", variant="q", state="ready", primary=True, queued_requests={1: 2}),
        LoadedModel(
            name="b", variant="q", state="ready", running=3, queued_requests={1: 7}, idle_s=1.0
        ),
        LoadedModel(name="c", variant="q", state="loading"),
    ]
    views = snapshot(models=held).to_views(last_seen=5.0)
    assert [(v.model, v.instance_id, v.running, dict(v.queued_requests)) for v in views] == [
        ("a", "n1", 0, {1: 2}),
        ("b", "n1", 3, {1: 7}),
    ]
    spec = FleetSpec.model_validate(SPEC)
    policy = RoutingPolicy.from_spec(spec)
    request = RouteRequest(
        model="b", slo_class="standard", tenant="t1", prompt_tokens=10, max_tokens=5
    )
    decision = route(request, FleetView(tuple(views), now=5.0), policy)
    assert decision.instance_id == "n1" and decision.chosen is not None
    assert decision.chosen.variant == "q"
    # A node where b is not ready is not a candidate for it.
    views = snapshot(models=held[:1] + held[2:]).to_views(last_seen=5.0)
    assert route(request, FleetView(tuple(views), now=5.0), policy).instance_id is None


def test_the_controller_reads_node_states_and_hands_each_order_over_once() -> None:
    spec = FleetSpec.model_validate(SPEC)
    loop = PlacementLoop(spec)
    hot = snapshot(
        models=[
            LoadedModel(name="a", variant="q", state="ready", primary=True, memory_bytes=GIB // 2),
            LoadedModel(
                name="b", variant="q", state="ready", queued_requests={1: 9}, memory_bytes=GIB // 2
            ),
        ]
    )
    cold = snapshot(
        instance_id="n2",
        models=[
            LoadedModel(name="a", variant="q", state="ready", primary=True, memory_bytes=GIB // 2),
            LoadedModel(name="b", variant="q", state="unloaded", memory_bytes=GIB // 2),
        ],
    )
    state = hot.to_node_state()
    assert state.held("b") == HeldModel("b", "q", "ready", GIB // 2, queued=9)
    assert state.free_bytes == GIB
    single = snapshot(models=[], running=2).to_node_state()
    assert single.models == (HeldModel("a", "q", "ready", in_flight=4, queued=2, primary=True),)

    @dataclasses.dataclass
    class Agent:
        instance: InstanceSnapshot

    plan = loop.step(1000.0, [Agent(hot), Agent(cold)])
    assert [(a.kind, a.node_id) for a in plan.actions] == [("load", "n2")]
    assert loop.relieving() == {"b": plan.relieving["b"]}
    orders = loop.take_orders("n2")
    assert [(o.action, o.model) for o in orders] == [("load", "b")]
    assert loop.take_orders("n2") == [] and loop.take_orders("n1") == []
    reply = PushReply(accepted=True, server_time=0.0, placement=orders)
    assert PushReply.model_validate_json(reply.model_dump_json()).placement == orders
    status = loop.status()
    assert status["latest"]["actions"][0]["node"] == "n2" and status["recent"]


def test_a_pool_that_may_load_a_model_gives_its_nodes_the_slot_the_budget_and_its_peers() -> None:
    spec = FleetSpec.model_validate(SPEC)
    config = node_config_from_spec(spec, "pool-a", "n1", 0, environ={})
    assert [(s.name, s.variant, s.preload) for s in config.models] == [("b", "q", False)]
    assert config.memory_budget_bytes == 2 * GIB
    # Peers of both pools may serve b, which this node may hold.
    assert sorted(config.routing.pools) == ["pool-a", "pool-b"]
    assert routing_policy(config).variant_quality[("b", "q")] == Quality.standard
    plain = node_config_from_spec(spec, "pool-b", "n2", 0, environ={})
    assert plain.models == [] and sorted(plain.routing.pools) == ["pool-a", "pool-b"]
