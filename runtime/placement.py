"""Demand-driven placement: which nodes load or unload which of the models they may hold.

This module owns one decision per period, made over a snapshot and returned as data (the
controller delivers it to the agents; :mod:`runtime.autoscale` reads what it relieves). A node
may hold further models besides its primary one (a pool's ``may_load``, loaded on demand by the
agent, :mod:`runtime.agent.models`); placement moves copies of those models to where the
demand is, before the autoscaler buys nodes for it:

Load
    A model whose waiting requests (queued in its engines plus waiting for a load) exceed
    ``queue_per_copy`` per ready copy gets one more copy, on a healthy node that may hold it
    and does not yet: one that has the free memory first, else one where idle models (no
    request in flight, queued or waiting; never the primary) can be evicted to make room, as
    the agent's own LRU will do; then the least busy node, the cheapest, the lowest id. One load
    per model per ``load_cooldown_s``, and none while a copy is still loading (its capacity is
    about to arrive; loading takes seconds, a node takes minutes).
Relief
    While a copy of a model is being loaded (asked this period or loading now), the plan lists
    the model in ``relieving``: the autoscaler holds that model's pools' scale-up for the period
    (``FleetSignals.placement``), so memory on existing nodes is used before nodes are added.
    When no node can take a copy, nothing is relieved and the autoscaler decides as before.
Unload
    A ready non-primary copy that has been idle ``idle_unload_s`` (no use since, nothing in
    flight, queued or waiting) is unloaded, unless its model has requests waiting elsewhere.

Everything is deterministic for a given input and memory (the last load per model), which
:meth:`Placer.dump_state` / :meth:`Placer.load_state` carry across controller restarts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from runtime.spec import PlacementSpec

__all__ = [
    "HeldModel",
    "ModelDemand",
    "NodeState",
    "PlacementAction",
    "PlacementPlan",
    "Placer",
]

HeldState = Literal["unloaded", "loading", "ready", "draining"]


@dataclass(frozen=True, slots=True)
class HeldModel:
    """One model a node may hold, as its agent last reported it."""

    name: str
    variant: str
    state: HeldState
    memory_bytes: int | None = None  # footprint; None: unknown
    in_flight: int = 0  # requests holding it
    waiting: int = 0  # requests waiting for it to load
    queued: int = 0  # requests queued in its engine, not yet running
    idle_s: float | None = None  # since its last use (or load); None: never used
    primary: bool = False

    @property
    def holds_memory(self) -> bool:
        return self.state != "unloaded"

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or self.waiting > 0 or self.queued > 0


@dataclass(frozen=True, slots=True)
class NodeState:
    """One node (agent) and the models it may hold."""

    node_id: str
    pool: str
    healthy: bool
    price_usd_per_hour: float
    memory_budget_bytes: int | None
    models: tuple[HeldModel, ...]

    def held(self, model: str) -> HeldModel | None:
        return next((m for m in self.models if m.name == model), None)

    @property
    def free_bytes(self) -> float:
        if self.memory_budget_bytes is None:
            return math.inf
        used = sum(m.memory_bytes or 0 for m in self.models if m.holds_memory)
        return self.memory_budget_bytes - used

    @property
    def evictable_bytes(self) -> int:
        """Memory of the ready models the agent would evict for a load (idle, not primary)."""
        return sum(
            m.memory_bytes or 0
            for m in self.models
            if m.state == "ready" and not m.primary and not m.busy
        )

    @property
    def in_flight(self) -> int:
        return sum(m.in_flight + m.waiting for m in self.models)


@dataclass(frozen=True, slots=True)
class PlacementAction:
    """Load or unload ``model`` on ``node_id``, and why."""

    kind: Literal["load", "unload"]
    node_id: str
    model: str
    variant: str
    reason: str


@dataclass(frozen=True, slots=True)
class ModelDemand:
    """One model over the fleet this period."""

    ready_copies: int
    loading_copies: int
    waiting: int  # queued in its engines + waiting for a load, over every copy

    @property
    def per_copy(self) -> float:
        return self.waiting / max(1, self.ready_copies)


@dataclass(frozen=True)
class PlacementPlan:
    at: float
    actions: tuple[PlacementAction, ...]
    demand: Mapping[str, ModelDemand]
    relieving: Mapping[str, str]  # model -> the placement that relieves it (autoscaler holds)
    notes: tuple[str, ...] = ()  # why a wanted copy could not be placed

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "actions": [
                {
                    "kind": a.kind,
                    "node": a.node_id,
                    "model": a.model,
                    "variant": a.variant,
                    "reason": a.reason,
                }
                for a in self.actions
            ],
            "demand": {
                model: {
                    "ready_copies": d.ready_copies,
                    "loading_copies": d.loading_copies,
                    "waiting": d.waiting,
                }
                for model, d in sorted(self.demand.items())
            },
            "relieving": dict(self.relieving),
            "notes": list(self.notes),
        }


@dataclass
class Placer:
    """Plans placement each period; remembers when it last asked for a load of each model."""

    settings: PlacementSpec = field(default_factory=PlacementSpec)
    last_load_at: dict[str, float] = field(default_factory=dict)

    def plan(self, nodes: Sequence[NodeState], now: float) -> PlacementPlan:
        """The actions for this period (empty when placement is disabled)."""
        healthy = sorted((n for n in nodes if n.healthy), key=lambda n: n.node_id)
        demand = _demand(healthy)
        if not self.settings.enabled:
            return PlacementPlan(at=now, actions=(), demand=demand, relieving={})
        actions: list[PlacementAction] = []
        relieving: dict[str, str] = {}
        notes: list[str] = []
        for model, wanted in sorted(demand.items()):
            loading = [n.node_id for n in healthy if _state(n, model) == "loading"]
            if loading:
                relieving[model] = f"loading {model} on {', '.join(loading)}"
                continue
            if wanted.per_copy <= self.settings.queue_per_copy:
                continue
            since = now - self.last_load_at.get(model, -math.inf)
            if since < self.settings.load_cooldown_s:
                continue
            why = (
                f"{wanted.waiting} request(s) waiting over {wanted.ready_copies} ready "
                f"cop{'y' if wanted.ready_copies == 1 else 'ies'} "
                f"(> {self.settings.queue_per_copy:g} per copy)"
            )
            target = _choose_node(healthy, model)
            if target is None:
                if any(_state(n, model) == "unloaded" for n in healthy):
                    notes.append(f"{model}: {why}, but no node that may hold it has room")
                continue  # (else every node that may hold it does: nodes are the autoscaler's)
            held = target.held(model)
            assert held is not None
            actions.append(PlacementAction("load", target.node_id, model, held.variant, why))
            relieving[model] = f"loading {model} on {target.node_id}: {why}"
            self.last_load_at[model] = now
        actions.extend(self._unloads(healthy, demand))
        return PlacementPlan(
            at=now,
            actions=tuple(actions),
            demand=demand,
            relieving=relieving,
            notes=tuple(notes),
        )

    def _unloads(
        self, nodes: Sequence[NodeState], demand: Mapping[str, ModelDemand]
    ) -> list[PlacementAction]:
        out = []
        limit = self.settings.idle_unload_s
        for node in nodes:
            for held in node.models:
                if held.primary or held.state != "ready" or held.busy:
                    continue
                if held.idle_s is None or held.idle_s < limit:
                    continue
                if demand[held.name].waiting > 0:
                    continue  # wanted elsewhere: the router will send it work
                out.append(
                    PlacementAction(
                        "unload",
                        node.node_id,
                        held.name,
                        held.variant,
                        f"idle {held.idle_s:.0f} s (>= {limit:g} s)",
                    )
                )
        return out

    def dump_state(self) -> dict[str, Any]:
        return {"last_load_at": dict(self.last_load_at)}

    def load_state(self, data: Mapping[str, Any]) -> None:
        loads = data.get("last_load_at", {})
        if not isinstance(loads, Mapping):
            raise ValueError("last_load_at must be an object")
        self.last_load_at = {str(k): float(v) for k, v in loads.items()}


def _state(node: NodeState, model: str) -> HeldState | None:
    held = node.held(model)
    return held.state if held is not None else None


def _demand(nodes: Sequence[NodeState]) -> dict[str, ModelDemand]:
    """Per model some node may hold: its copies and what waits for them."""
    names = sorted({m.name for n in nodes for m in n.models})
    out = {}
    for name in names:
        held = [h for n in nodes if (h := n.held(name)) is not None]
        out[name] = ModelDemand(
            ready_copies=sum(h.state == "ready" for h in held),
            loading_copies=sum(h.state == "loading" for h in held),
            waiting=sum(h.queued + h.waiting for h in held if h.holds_memory),
        )
    return out


def _choose_node(nodes: Sequence[NodeState], model: str) -> NodeState | None:
    """The node to load ``model`` on: see "Load" in the module docstring."""
    known = [h.memory_bytes for n in nodes if (h := n.held(model)) and h.memory_bytes]
    fallback_bytes = max(known) if known else 0
    ranked = []
    for node in nodes:
        held = node.held(model)
        if held is None or held.state != "unloaded":
            continue
        need = held.memory_bytes or fallback_bytes
        fits_free = node.free_bytes >= need
        if not fits_free and node.free_bytes + node.evictable_bytes < need:
            continue
        ranked.append(
            ((not fits_free, node.in_flight, node.price_usd_per_hour, node.node_id), node)
        )
    return min(ranked, key=lambda pair: pair[0])[1] if ranked else None
