"""The agent's side of the fleet: what it reports to the controller and what it does with the reply.

This module owns what one agent knows about the rest of the fleet, as plain data over an
injected clock (no I/O: the HTTP legs are :mod:`runtime.agent.push` and
:mod:`runtime.agent.forward`, wired together in :mod:`runtime.agent.app`):

* what each metrics push says about this node: :func:`instance_snapshot`, built from the
  serving backend's live stats, and :class:`RecentUseMeter`, each tenant's recent admissions
  here, which the controller splits the tenant's fleet quota by;
* what a :class:`runtime.protocol.PushReply` changes (:meth:`FleetLink.apply_reply`): each
  tenant's quota lease, monthly-budget blocks, the fleet-wide budget flag, the fleet view, and
  the model rollouts (:meth:`FleetLink.rollout`: the split the agent routes each model by);
* what the router decides over: :func:`routing_policy` (the spec's routing policy, as the node
  config carries it) and :meth:`FleetLink.fleet_view`.

Clocks
    The controller stamps leases, ``last_seen`` and ``server_time`` with its own epoch clock; the
    agent runs on a monotonic one, and the two are never synchronised. A lease lasts
    ``expires_at - server_time`` more seconds, counted on the agent from the moment the push was
    *built* (:meth:`FleetLink.push_built`), which precedes the controller's stamp: the agent's copy
    of a lease therefore ends slightly early, never late, whatever the clocks' offset. The
    controller's "now" is estimated as ``server_time`` plus the agent-clock time since the reply
    arrived, and the fleet view is judged on that estimate: a peer is stale here one push
    interval after the controller would call it stale (the view is up to that old), and an
    agent that lost the controller sees every peer go stale and serves alone.

Leases and their fallback
    Every reply re-applies each tenant's granted lease and sets its fallback to
    :func:`runtime.leases.fallback_lease` over the size of the fleet view in that reply. When
    the controller goes silent the agent keeps serving on its last lease until it expires, then
    on that fallback (its even share of the fleet quota, never below one unit per limit). Before
    the first reply the tenant's spec limits apply, as for an agent without a controller.

Budgets
    A tenant the reply lists as over its monthly budget gets a lease with ``blocked`` set (429
    naming the budget). ``fleet_over_budget`` refuses every client request (429, see
    :mod:`runtime.agent.app`). Both last as long as the reply's leases, so an agent that lost the
    controller stops enforcing budgets it can no longer judge when it falls back.

The fleet view the router sees
    The controller's last view, with this node's entry replaced by its live snapshot (stamped
    "now"), peers that failed a forward marked with ``failed_at`` (the router skips them until
    they push again, i.e. until a later view shows a newer ``last_seen``), and forwards this
    agent sent to a peer after that peer's last push added to its queue: the view is up to a push
    interval old, and without this a burst would be sent whole to whichever peer looked idle.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from runtime.agent.admission import ThroughputEstimate, WorkItem
from runtime.agent.backend import BackendStats
from runtime.agent.config import NodeConfig, TenantConfig
from runtime.agent.metrics import ServedTally
from runtime.leases import fallback_lease
from runtime.protocol import (
    ClassCounters,
    InstanceSnapshot,
    PushReply,
    RolloutDirective,
    ServingLoad,
    TenantRecentUse,
)
from runtime.quota import QuotaBook, QuotaLease, QuotaLimitName
from runtime.routing import ClassPolicy, FleetView, InstanceView, RoutingPolicy
from runtime.spec import Quality

__all__ = [
    "FleetLink",
    "RecentUseMeter",
    "budget_limit",
    "instance_snapshot",
    "routing_policy",
    "serving_load",
]

Clock = Callable[[], float]
SECONDS_PER_MINUTE = 60.0


# --------------------------------------------------------------------------------------------
# What a push reports


def instance_snapshot(
    config: NodeConfig,
    url: str,
    *,
    healthy: bool,
    stats: BackendStats,
    throughput: ThroughputEstimate,
    items: Sequence[WorkItem],
    max_batch: int,
    served: ServedTally | None = None,
) -> InstanceSnapshot:
    """This node as the router sees it, from the primary model's backend's live state."""
    return InstanceSnapshot(
        instance_id=config.node_id,
        pool=config.pool,
        url=url,
        model=config.model,
        variant=config.variant,
        price_usd_per_hour=config.price_usd_per_hour,
        spot=config.spot,
        healthy=healthy,
        served={
            name: ClassCounters(**dataclasses.asdict(tally))
            for name, tally in (served.classes.items() if served else ())
        },
        memory_budget_bytes=config.memory_budget_bytes,
        **serving_load(stats, throughput, items, max_batch).model_dump(),
    )


def serving_load(
    stats: BackendStats,
    throughput: ThroughputEstimate,
    items: Sequence[WorkItem],
    max_batch: int,
) -> ServingLoad:
    """One engine's load and speed, from its backend's live state.

    Queues come from the unfinished work items: those not yet scheduled are queued (by
    priority, with their prompt tokens); the others are running, with the prompt tokens they
    have left to prefill and the output tokens they may still generate.
    """
    running = [item for item in items if item.running]
    waiting = [item for item in items if not item.running]
    queued_requests = Counter(item.priority for item in waiting)
    queued_prompt_tokens: Counter[int] = Counter()
    for item in waiting:
        queued_prompt_tokens[item.priority] += item.prefill_tokens_left
    decode_tokens_per_s = None
    if throughput.decode_step_s and throughput.decode_batch:
        decode_tokens_per_s = throughput.decode_batch / throughput.decode_step_s
    return ServingLoad(
        prefill_tokens_per_s=throughput.prefill_tokens_per_s or None,
        decode_tokens_per_s=decode_tokens_per_s,
        decode_batch=throughput.decode_batch or None,
        running=len(running),
        max_batch=max(1, max_batch),
        running_prefill_tokens=sum(item.prefill_tokens_left for item in running),
        running_remaining_tokens=sum(item.decode_tokens_left for item in running),
        queued_requests=dict(queued_requests),
        queued_prompt_tokens=dict(queued_prompt_tokens),
        kv_usage=min(1.0, max(0.0, stats.kv_usage or 0.0)),
    )


class RecentUseMeter:
    """Each tenant's admissions on this agent over the last ``window_s``, as per-minute rates.

    Tokens are counted as charged at admission and corrected when the request ends (as the quota
    does), so the rates follow what the tenant actually used. Concurrency is the peak number in
    flight since the previous report, so a short burst between two pushes still shows.
    """

    def __init__(self, clock: Clock, window_s: float = SECONDS_PER_MINUTE) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self._clock = clock
        self.window_s = window_s
        self._events: dict[str, deque[tuple[float, int, float]]] = {}
        self._in_flight: Counter[str] = Counter()
        self._peak: Counter[str] = Counter()

    def started(self, tenant: str, estimated_tokens: int) -> None:
        self._events.setdefault(tenant, deque()).append((self._clock(), 1, estimated_tokens))
        self._in_flight[tenant] += 1
        self._peak[tenant] = max(self._peak[tenant], self._in_flight[tenant])

    def finished(self, tenant: str, token_correction: int) -> None:
        """The request ended; ``token_correction`` is actual minus estimated tokens."""
        if token_correction:
            self._events.setdefault(tenant, deque()).append((self._clock(), 0, token_correction))
        self._in_flight[tenant] = max(0, self._in_flight[tenant] - 1)

    def report(self) -> dict[str, TenantRecentUse]:
        """Rates of every tenant active in the window (the peaks restart from now)."""
        horizon = self._clock() - self.window_s
        scale = SECONDS_PER_MINUTE / self.window_s
        out: dict[str, TenantRecentUse] = {}
        for tenant in sorted(set(self._events) | set(self._peak)):
            events = self._events.get(tenant, deque())
            while events and events[0][0] < horizon:
                events.popleft()
            requests = sum(e[1] for e in events)
            tokens = max(0.0, float(sum(e[2] for e in events)))
            peak = self._peak.get(tenant, 0)
            if requests or tokens or peak:
                out[tenant] = TenantRecentUse(
                    requests_per_minute=requests * scale,
                    tokens_per_minute=tokens * scale,
                    concurrency=float(peak),
                )
            if not events:
                self._events.pop(tenant, None)
        self._peak = Counter({t: n for t, n in self._in_flight.items() if n > 0})
        return out


# --------------------------------------------------------------------------------------------
# What the router decides over


def routing_policy(config: NodeConfig) -> RoutingPolicy:
    """The :class:`RoutingPolicy` that ``RoutingPolicy.from_spec`` gives for this node's spec,
    restricted to the pools that may serve this node's models (all the router may choose
    among), with
    staleness judged as the module docstring says."""
    settings = config.routing
    pools = {config.pool, *settings.pools}
    qualities = {config.variant: "standard", **settings.variant_quality}
    return RoutingPolicy(
        classes={c.name: ClassPolicy.from_spec(c) for c in config.slo_classes},
        tenant_min_quality={t.name: Quality[t.min_quality] for t in config.tenants},
        # Tenants not allowed this node's model are refused before routing, so only pools count.
        tenant_pools={
            t.name: frozenset(p for p in pools if t.may_use_pool(p)) for t in config.tenants
        },
        variant_quality={
            **{(config.model, v): Quality[q] for v, q in qualities.items()},
            **{
                (slot.name, variant): Quality[quality]
                for slot in config.models
                for variant, quality in {
                    slot.variant: "standard",
                    **settings.other_models.get(slot.name, {}),
                }.items()
            },
        },
        slo_headroom=settings.slo_headroom,
        prefer_spot=settings.prefer_spot,
        # The agent sees a peer's last push through its own last reply, up to one push interval
        # later than the controller does: without the allowance, a peer pushing as often as
        # this agent would look stale here for part of every interval.
        stale_after_s=settings.peer_stale_after_s + config.push_interval_s,
        hop_limit=settings.hop_limit,
        strategy=settings.strategy,
    )


def budget_limit(tenant: TenantConfig) -> QuotaLimitName:
    """The monthly limit to name when the controller says ``tenant`` is over budget (the reply
    does not say which, so it is only named when the tenant has just one)."""
    quotas = tenant.quotas
    has_usd = quotas.usd_per_month is not None
    has_hours = quotas.accelerator_hours_per_month is not None
    if has_usd and not has_hours:
        return "usd_per_month"
    if has_hours and not has_usd:
        return "accelerator_hours_per_month"
    return "monthly_budget"


@dataclass(frozen=True)
class _PendingForward:
    instance_id: str
    model: str
    priority: int
    prompt_tokens: int
    sent_at: float  # estimated controller time


class FleetLink:
    """What the agent knows of the fleet through the controller; see the module docstring."""

    def __init__(self, config: NodeConfig, quotas: QuotaBook, clock: Clock) -> None:
        self.config = config
        self.quotas = quotas
        self.clock = clock
        self.reply: PushReply | None = None
        # Per model under a rollout: the split the controller last published (kept while the
        # controller is away, like the fleet view it goes with).
        self.rollouts: dict[str, RolloutDirective] = {}
        self._received_at = 0.0  # agent clock
        self._push_built_at: float | None = None
        self._valid_until = -math.inf  # agent clock: end of the last reply's budget verdicts
        self._fleet_over_budget = False
        self._failed_at: dict[str, float] = {}  # instance id -> controller time
        self._pending: dict[int, _PendingForward] = {}
        self._next_pending = 0

    # -- the controller's reply ------------------------------------------------------------------

    def push_built(self) -> None:
        """Note when the push being sent was built (lease lifetimes count from here)."""
        self._push_built_at = self.clock()

    def apply_reply(self, reply: PushReply) -> None:
        """Apply leases, budgets and the fleet view of ``reply``."""
        now = self.clock()
        built_at = self._push_built_at if self._push_built_at is not None else now

        def agent_time(controller_time: float) -> float:
            return built_at + (controller_time - reply.server_time)

        self.reply = reply
        self._received_at = now
        self.rollouts = dict(reply.rollouts)
        agents = self.expected_agents
        over = set(reply.over_budget_tenants)
        default_expiry = built_at + self.config.routing.peer_stale_after_s
        expiries: list[float] = []
        for tenant in self.config.tenants:
            share = fallback_lease(tenant.quotas, agents)
            self.quotas.set_fallback(
                QuotaLease(
                    tenant.name,
                    requests_per_minute=share.requests_per_minute,
                    tokens_per_minute=share.tokens_per_minute,
                    max_concurrency=share.max_concurrency,
                )
            )
            grant = reply.leases.get(tenant.name)
            blocked = budget_limit(tenant) if tenant.name in over else None
            if grant is not None:
                expires_at = None if grant.expires_at is None else agent_time(grant.expires_at)
                lease = QuotaLease(
                    tenant.name,
                    requests_per_minute=grant.requests_per_minute,
                    tokens_per_minute=grant.tokens_per_minute,
                    max_concurrency=grant.max_concurrency,
                    expires_at=expires_at,
                    blocked=blocked,
                )
            elif blocked is not None:
                current = self.quotas.tenants[tenant.name].lease
                lease = dataclasses.replace(current, expires_at=default_expiry, blocked=blocked)
            else:
                continue
            if lease.expires_at is not None:
                expiries.append(lease.expires_at)
            self.quotas.apply_lease(lease)
        self._valid_until = max(expiries, default=default_expiry)
        self._fleet_over_budget = reply.fleet_over_budget
        seen = {peer.instance_id: peer.last_seen for peer in reply.fleet}
        self._failed_at = {
            instance: failed
            for instance, failed in self._failed_at.items()
            if failed >= seen.get(instance, -math.inf)
        }

    def rollout(self, model: str) -> RolloutDirective | None:
        """The rollout directive for ``model`` from the last reply, if it is under one."""
        return self.rollouts.get(model)

    @property
    def fleet_over_budget(self) -> bool:
        """The fleet's monthly budget is spent, as of a reply that still holds."""
        return self._fleet_over_budget and self.clock() < self._valid_until

    @property
    def expected_agents(self) -> int:
        """Agents in the last fleet view (at least 1)."""
        return max(1, len(self.reply.fleet)) if self.reply is not None else 1

    def controller_time(self) -> float:
        """The controller's clock now, estimated from the last reply."""
        if self.reply is None:
            raise RuntimeError("no reply from the controller yet")
        return self.reply.server_time + (self.clock() - self._received_at)

    # -- routing inputs --------------------------------------------------------------------------

    def fleet_view(self, local: InstanceSnapshot) -> FleetView | None:
        """The view to route over, or None before the controller first answered."""
        if self.reply is None:
            return None
        now = self.controller_time()
        pending: dict[str, list[_PendingForward]] = {}
        for forward in self._pending.values():
            pending.setdefault(forward.instance_id, []).append(forward)
        instances = local.to_views(last_seen=now)
        for peer in self.reply.fleet:
            if peer.instance_id == local.instance_id:
                continue
            unseen = [f for f in pending.get(peer.instance_id, ()) if f.sent_at > peer.last_seen]
            for view in peer.to_views(peer.last_seen, self._failed_at.get(peer.instance_id)):
                mine = [f for f in unseen if f.model == view.model]
                instances.append(_with_queued(view, mine) if mine else view)
        return FleetView(tuple(instances), now=now, local_instance_id=local.instance_id)

    def mark_failed(self, instance_id: str) -> None:
        """A forward to ``instance_id`` failed: skip it until it pushes again."""
        if self.reply is not None:
            self._failed_at[instance_id] = self.controller_time()

    def forward_started(
        self, instance_id: str, model: str, priority: int, prompt_tokens: int
    ) -> int:
        """Count a forward against the peer's queue for ``model`` until
        :meth:`forward_finished`."""
        key = self._next_pending
        self._next_pending += 1
        sent_at = self.controller_time() if self.reply is not None else -math.inf
        self._pending[key] = _PendingForward(instance_id, model, priority, prompt_tokens, sent_at)
        return key

    def forward_finished(self, key: int) -> None:
        self._pending.pop(key, None)


def _with_queued(view: InstanceView, forwards: Sequence[_PendingForward]) -> InstanceView:
    requests: Counter[int] = Counter(view.queued_requests)
    tokens: Counter[int] = Counter(view.queued_prompt_tokens)
    for forward in forwards:
        requests[forward.priority] += 1
        tokens[forward.priority] += forward.prompt_tokens
    return dataclasses.replace(
        view, queued_requests=dict(requests), queued_prompt_tokens=dict(tokens)
    )
