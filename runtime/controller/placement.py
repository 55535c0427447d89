"""The controller's side of demand-driven placement: node states in, orders out.

The decisions are :class:`runtime.placement.Placer`'s; this module carries them out. A
:class:`PlacementLoop`

* reads each fresh agent's :class:`runtime.placement.NodeState` from its last push
  (:meth:`runtime.protocol.InstanceSnapshot.to_node_state`: the models it may hold, their
  state, memory, queues and idle time);
* every period (:meth:`PlacementLoop.step`, run by the controller before the autoscaler, which
  reads :meth:`PlacementLoop.relieving`) asks the placer for a plan and queues each action as a
  :class:`runtime.protocol.PlacementOrder` for its agent;
* hands an agent its orders in the reply to its next push (:meth:`PlacementLoop.take_orders`),
  once: an order whose reply is lost is not resent, and the next period sees the model's state
  unchanged and decides again (after ``load_cooldown_s`` for a load);
* answers ``GET /v1/placement`` and the dashboard (:meth:`PlacementLoop.status`: the latest
  plan and the last plans that did something) and keeps the placer's memory in
  ``<ledger>.placement.json``.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from runtime.controller.statefile import write_json_atomically
from runtime.placement import PlacementPlan, Placer
from runtime.protocol import InstanceSnapshot, PlacementOrder
from runtime.spec import FleetSpec

__all__ = ["PlacementLoop"]

log = logging.getLogger("fleetform.controller.placement")

RECENT_PLANS = 50


class AgentLike(Protocol):
    @property
    def instance(self) -> InstanceSnapshot: ...


@dataclass
class PlacementLoop:
    """One controller's placement: the placer, the orders not yet delivered, the history."""

    spec: FleetSpec
    state_path: Path | None = None
    placer: Placer = field(init=False)
    pending: dict[str, list[PlacementOrder]] = field(default_factory=dict)
    latest: PlacementPlan | None = None
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_PLANS))
    _last_notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.placer = Placer(self.spec.autoscaling.placement)
        self._load()

    def step(self, now: float, agents: Iterable[AgentLike]) -> PlacementPlan:
        """Plan this period over the fresh agents and queue the orders."""
        plan = self.placer.plan([agent.instance.to_node_state() for agent in agents], now)
        self.latest = plan
        for action in plan.actions:
            order = PlacementOrder(action=action.kind, model=action.model, reason=action.reason)
            queue = self.pending.setdefault(action.node_id, [])
            # A newer order for the same model replaces one not yet delivered.
            queue[:] = [o for o in queue if o.model != order.model] + [order]
            log.info(
                "placement: %s %s on %s: %s",
                action.kind,
                action.model,
                action.node_id,
                action.reason,
            )
        # Plans that did something, or that could not and say why (a standing shortage is
        # recorded when it starts or changes, not every period).
        if plan.actions or plan.notes != self._last_notes:
            self.recent.appendleft(plan.to_json())
        self._last_notes = plan.notes
        self._save()
        return plan

    def relieving(self) -> dict[str, str]:
        """Models whose pools' scale-up the autoscaler holds this period (see
        :mod:`runtime.placement`)."""
        return dict(self.latest.relieving) if self.latest is not None else {}

    def take_orders(self, agent_id: str) -> list[PlacementOrder]:
        """The orders for ``agent_id`` (handed over once)."""
        return self.pending.pop(agent_id, [])

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.placer.settings.enabled,
            "settings": self.placer.settings.model_dump(exclude={"enabled"}),
            "latest": self.latest.to_json() if self.latest is not None else None,
            "undelivered": {
                agent: [o.model_dump() for o in orders] for agent, orders in self.pending.items()
            },
            # Plans that ordered something or could not, newest first.
            "recent": list(self.recent),
        }

    def _save(self) -> None:
        if self.state_path is not None:
            write_json_atomically(self.state_path, {"placer": self.placer.dump_state()})

    def _load(self) -> None:
        if self.state_path is None or not self.state_path.exists():
            return
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
            self.placer.load_state(data["placer"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning(
                "placement state %s not restored (%s); starting afresh", self.state_path, error
            )
