"""The controller's picture of the fleet: who is alive, what they report, what they may admit.

This module owns the in-memory state the push handler reads and updates, as plain data over an
injected ``now`` (no I/O, no clock of its own): each agent's latest snapshot and recent use,
the fleet view agents route with, the quota leases granted to each agent, and the budget check
over the ledger's monthly totals.

Freshness
    An agent is *fresh* while its last push is at most ``stale_after_s`` old; only fresh agents
    are in the fleet view.

Lease accounting
    Every push gets the pushing agent new leases. Targets come from
    :func:`runtime.leases.split_leases` over the *lease holders* — the fresh agents plus every
    agent that may still be serving on an unexpired lease (a stale agent stays until its last
    lease has expired, as the note on ``split_leases`` asks) — with each holder's latest
    reported recent use, smoothed against the previous targets. The split is shared by all
    agents and redone when the holders change or it is ``retarget_s`` old (1 s by default), not
    on every push: it costs O(agents x tenants) in exact arithmetic, so redoing it per push
    would cost O(agents² x tenants) per push interval on the event loop.

    A target is then capped so that, per tenant and limit, what this agent is granted plus what
    every other agent may still hold never exceeds the quota. Agents receive leases only in
    replies to their own pushes, so without the cap an agent could be granted its new, larger
    share while another still holds its old, larger one (e.g. when a second agent joins, the
    first keeps the whole quota until its next push). The cap makes the invariant exact at the
    cost of a short delay: a share moves from one agent to another only once the giving agent
    is known to enforce its smaller lease (two of its pushes, see below), so a joining agent
    may get less than its floor, possibly 0, for two or three push intervals.

    "May still hold" counts, per limit, the larger of the lease the agent is known to have
    received and the one last sent to it: a grant is only *confirmed* when the agent pushes a
    later ``seq`` (agents advance ``seq`` only after a reply), so if the reply was lost and
    the agent still enforces its older, larger lease, that is accounted for.

    Not accounted: an agent that lost the controller and outlived its last lease serves on
    :func:`runtime.leases.fallback_lease` (its even share, computed on the agent), outside
    this split.

Budgets
    :func:`over_budget` compares each tenant's month-to-date USD and accelerator-hours with its
    ``QuotaSpec`` and the fleet's USD with ``spec.budget``; reaching a budget counts as spent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from runtime.controller.ledger import UsageTotals
from runtime.leases import Lease, LeasePolicy, Usage, split_leases
from runtime.protocol import InstanceSnapshot, MetricsPush, PeerInstance
from runtime.spec import FleetSpec, QuotaSpec

__all__ = ["AgentRecord", "FleetState", "over_budget"]

_RESERVED = "(expected agent "  # names of the shares kept for agents that have not pushed yet

_LIMITS = ("requests_per_minute", "tokens_per_minute", "max_concurrency")


@dataclass
class AgentRecord:
    """What the controller knows of one agent process."""

    agent_id: str
    boot_id: str
    seq: int
    instance: InstanceSnapshot
    last_seen: float  # controller clock, time of the last push
    recent_use: dict[str, Usage] = field(default_factory=dict)
    confirmed: dict[str, Lease] = field(default_factory=dict)  # known to be received
    sent: dict[str, Lease] = field(default_factory=dict)  # in the latest reply
    reported_stale: bool = False

    def holds(self, tenant: str, limit: str, now: float) -> int | None:
        """The most of ``limit`` this agent may be enforcing for ``tenant`` at ``now``
        (0 when it holds no valid lease; None when its lease is unlimited)."""
        held = 0
        for lease in (self.confirmed.get(tenant), self.sent.get(tenant)):
            if lease is None or not lease.valid_at(now):
                continue
            value = getattr(lease, limit)
            if value is None:
                return None
            held = max(held, value)
        return held

    def lease_expires_at(self) -> float | None:
        """When the last lease this agent may hold expires (None: it holds none)."""
        ends = [
            lease.expires_at
            for leases in (self.confirmed, self.sent)
            for lease in leases.values()
            if lease.expires_at is not None
        ]
        return max(ends, default=None)


class FleetState:
    """The live agents, the fleet view and the leases; every method takes ``now``."""

    def __init__(
        self,
        quotas: Mapping[str, QuotaSpec],
        *,
        stale_after_s: float,
        policy: LeasePolicy | None = None,
        retarget_s: float = 1.0,
        expected_agents: int = 0,
    ) -> None:
        if stale_after_s <= 0:
            raise ValueError("stale_after_s must be positive")
        if retarget_s < 0:
            raise ValueError("retarget_s cannot be negative")
        self.quotas = dict(quotas)
        self.stale_after_s = stale_after_s
        self.policy = policy or LeasePolicy()
        self.retarget_s = retarget_s
        # The fleet the spec plans (its pools' replicas). Until that many agents hold leases,
        # the split keeps a share for each missing one: otherwise the first agent to push would
        # be granted the whole quota and the next ones nothing (the caps above keep a newcomer
        # at zero until the first agent confirms its smaller lease), so a freshly started
        # fleet would refuse its first requests with 429.
        self.expected_agents = max(0, expected_agents)
        self.agents: dict[str, AgentRecord] = {}
        self._targets: dict[str, dict[str, Lease]] = {}
        self._targets_at = -math.inf
        self._targets_for: frozenset[str] = frozenset()

    # ----------------------------------------------------------------------------------------
    # Pushes

    def observe(self, push: MetricsPush, now: float) -> AgentRecord:
        """Take in a push (new or a retried duplicate); returns the agent's record.

        A push from a new ``boot_id`` replaces the record: the old process is gone, and with
        it whatever leases it held. A push older than the latest one seen (a delayed copy) does
        not roll the snapshot back.
        """
        record = self.agents.get(push.agent_id)
        recent_use = {tenant: use.to_usage() for tenant, use in push.recent_use.items()}
        if record is None or record.boot_id != push.boot_id:
            record = AgentRecord(
                agent_id=push.agent_id,
                boot_id=push.boot_id,
                seq=push.seq,
                instance=push.instance,
                last_seen=now,
                recent_use=recent_use,
            )
            self.agents[push.agent_id] = record
            return record
        if push.seq < record.seq:
            return record
        if push.seq > record.seq:
            # Agents advance seq only after a reply: the leases last sent have arrived.
            record.confirmed = record.sent
            record.sent = {}
            record.seq = push.seq
        record.instance = push.instance
        record.last_seen = now
        record.recent_use = recent_use
        record.reported_stale = False
        return record

    def grant(self, agent_id: str, now: float) -> dict[str, Lease]:
        """New leases for ``agent_id`` (which must have pushed), capped as the module says."""
        record = self.agents[agent_id]
        holders = self.lease_holders(now)
        holders.add(agent_id)
        targets = self._split(holders, now)[agent_id]
        others = [self.agents[h] for h in holders if h != agent_id]
        granted: dict[str, Lease] = {}
        for tenant, target in targets.items():
            capped: dict[str, int | None] = {}
            for limit in _LIMITS:
                value = getattr(target, limit)
                quota = getattr(self.quotas[tenant], limit)
                if value is None or quota is None:
                    capped[limit] = value
                    continue
                held = sum(other.holds(tenant, limit, now) or 0 for other in others)
                capped[limit] = min(value, max(0, quota - held))
            granted[tenant] = Lease(
                requests_per_minute=capped["requests_per_minute"],
                tokens_per_minute=capped["tokens_per_minute"],
                max_concurrency=capped["max_concurrency"],
                issued_at=now,
                expires_at=now + self.policy.ttl_s,
            )
        record.sent = granted
        return granted

    def _split(self, holders: set[str], now: float) -> dict[str, dict[str, Lease]]:
        """Every holder's target share, recomputed when the holders change or the last split
        is ``retarget_s`` old (splitting costs O(holders x tenants) with exact fractions, too
        much to redo on every push of a large fleet)."""
        reserved = [f"{_RESERVED}{i})" for i in range(self.expected_agents - len(holders))]
        members = frozenset(holders) | frozenset(reserved)
        if members != self._targets_for or not 0 <= now - self._targets_at < self.retarget_s:
            recent_use = {
                (tenant, holder): use
                for holder in holders
                for tenant, use in self.agents[holder].recent_use.items()
            }
            # Smoothing blends with the previous targets, not with the capped grants: the caps
            # are a transient of who pushed when and would slow convergence to the use.
            self._targets = split_leases(
                self.quotas,
                recent_use,
                members,
                now=now,
                policy=self.policy,
                previous=self._previous_with_newcomers_in_reserved_places(members),
            )
            self._targets_at = now
            self._targets_for = members
        return self._targets

    def _previous_with_newcomers_in_reserved_places(
        self, members: frozenset[str]
    ) -> dict[str, dict[str, Lease]]:
        """The last targets, with each agent that just joined taking over the share that was
        kept for an expected agent (smoothing would otherwise start it from nothing)."""
        previous = dict(self._targets)
        vacated = sorted(m for m in previous if m.startswith(_RESERVED) and m not in members)
        newcomers = sorted(m for m in members if m not in previous)
        for newcomer, place in zip(newcomers, vacated, strict=False):
            previous[newcomer] = previous.pop(place)
        return previous

    # ----------------------------------------------------------------------------------------
    # Views

    def is_fresh(self, record: AgentRecord, now: float) -> bool:
        return now - record.last_seen <= self.stale_after_s

    def fresh_agents(self, now: float) -> list[AgentRecord]:
        return sorted(
            (r for r in self.agents.values() if self.is_fresh(r, now)),
            key=lambda r: (r.instance.instance_id, r.agent_id),
        )

    def view(self, now: float) -> list[PeerInstance]:
        """The fleet view: fresh instances only, sorted by instance id."""
        return [
            PeerInstance(**r.instance.model_dump(), last_seen=r.last_seen)
            for r in self.fresh_agents(now)
        ]

    def lease_holders(self, now: float) -> set[str]:
        """Agents in lease accounting: fresh, or possibly still serving on a valid lease."""
        holders: set[str] = set()
        for agent_id, record in self.agents.items():
            expires = record.lease_expires_at()
            if self.is_fresh(record, now) or (expires is not None and now < expires):
                holders.add(agent_id)
        return holders

    def sweep(self, now: float) -> tuple[list[AgentRecord], list[AgentRecord]]:
        """Housekeeping: ``(newly stale, forgotten)`` agents.

        Newly stale agents are reported once (for a log line); agents neither fresh nor
        holding a valid lease are forgotten, since nothing about them matters any more.
        """
        holders = self.lease_holders(now)
        newly_stale: list[AgentRecord] = []
        forgotten: list[AgentRecord] = []
        for agent_id, record in list(self.agents.items()):
            if self.is_fresh(record, now):
                continue
            if not record.reported_stale:
                record.reported_stale = True
                newly_stale.append(record)
            if agent_id not in holders:
                forgotten.append(self.agents.pop(agent_id))
        return newly_stale, forgotten


def over_budget(
    spec: FleetSpec, month: Mapping[str, UsageTotals], fleet_usd: float
) -> tuple[list[str], bool]:
    """``(tenants over a monthly budget, whether the fleet's monthly budget is spent)``."""
    tenants: list[str] = []
    for tenant in spec.tenants:
        used = month.get(tenant.name)
        if used is None:
            continue
        quotas = tenant.quotas
        if (quotas.usd_per_month is not None and used.usd >= quotas.usd_per_month) or (
            quotas.accelerator_hours_per_month is not None
            and used.accelerator_hours >= quotas.accelerator_hours_per_month
        ):
            tenants.append(tenant.name)
    fleet = spec.budget is not None and fleet_usd >= spec.budget.usd_per_month
    return sorted(tenants), fleet
