"""Quota leases: how each tenant's fleet-wide limits are split among the agents.

This module owns the split, not the enforcement. A tenant's requests-per-minute,
tokens-per-minute and concurrency limits (`QuotaSpec`) hold for the whole fleet, yet each agent
admits requests on its own. So the controller periodically gives every live agent a `Lease` per
tenant: that agent's part of each limit, in proportion to where the tenant's traffic has
recently been landing. Agents enforce their leases (`runtime.quota`); an agent that loses the
controller keeps serving on its last lease until it expires, then on `fallback_lease`.

The split, per tenant and per limit L over n live agents (`split_leases`):

1. Floor. Every agent gets `floor = min(max(min_units, floor(floor_share x L / n)), L // n)`,
   so an agent the tenant has not used lately is never locked out (a tenant that moves its
   traffic there is served at once, and the next renewal follows the traffic). With the
   defaults that is 10% of an even share and at least 1 unit; when L < n x min_units the
   floor is L // n and the few units left go by use.
2. Use. The rest, L - n x floor, is split in proportion to each agent's recent use of that
   limit (requests, tokens or concurrency), smoothed against the previous split:
   `share = (1 - smoothing) x use share + smoothing x previous share`, so noisy windows do not
   make leases swing. With no use anywhere (and no previous split) the rest is split evenly.
3. Rounding. Shares are turned into whole units by the largest-remainder method in exact
   rational arithmetic, remainders tied broken by agent name, so the agents' units sum to
   exactly L: the fleet-wide limit is never exceeded and none of it is left idle.

Unlimited (None) limits stay None on every lease. Budgets per month (USD, accelerator-hours)
are not leased: they are checked against the controller's usage ledger.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from runtime.spec import QuotaSpec

__all__ = [
    "Lease",
    "LeasePolicy",
    "Usage",
    "fallback_lease",
    "lease_in_force",
    "split_leases",
]

# Each leased limit, with the `Usage` field its split follows.
_LIMITS: dict[str, str] = {
    "requests_per_minute": "requests_per_minute",
    "tokens_per_minute": "tokens_per_minute",
    "max_concurrency": "concurrency",
}


@dataclass(frozen=True, slots=True)
class Usage:
    """A tenant's recent use on one agent, as rates over the controller's window."""

    requests_per_minute: float = 0.0
    tokens_per_minute: float = 0.0
    concurrency: float = 0.0  # mean (or peak) requests in flight over the window

    def __post_init__(self) -> None:
        values = (self.requests_per_minute, self.tokens_per_minute, self.concurrency)
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError(f"usage must be finite and not negative (got {values})")


@dataclass(frozen=True, slots=True)
class Lease:
    """An agent's part of one tenant's limits. None means unlimited."""

    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_concurrency: int | None
    issued_at: float
    expires_at: float | None  # None: in force until replaced (a fallback lease)

    @property
    def ttl_s(self) -> float | None:
        return None if self.expires_at is None else self.expires_at - self.issued_at

    def valid_at(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at


@dataclass(frozen=True, slots=True)
class LeasePolicy:
    """How leases are split; see the module docstring."""

    ttl_s: float = 30.0  # a few controller periods, so one missed renewal changes nothing
    floor_share: float = 0.1  # of an even share, guaranteed to every live agent
    min_units: int = 1  # the least any agent gets of a limit, when the limit allows it
    smoothing: float = 0.5  # weight of the previous split against the latest use

    def __post_init__(self) -> None:
        if self.ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        if not 0.0 <= self.floor_share <= 1.0:
            raise ValueError("floor_share must be within 0..1")
        if self.min_units < 0:
            raise ValueError("min_units cannot be negative")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError("smoothing must be within 0..1 (1 excluded: use must count)")


def split_leases(
    quotas: Mapping[str, QuotaSpec],
    recent_use: Mapping[tuple[str, str], Usage],
    live_agents: Iterable[str],
    *,
    now: float,
    policy: LeasePolicy | None = None,
    previous: Mapping[str, Mapping[str, Lease]] | None = None,
) -> dict[str, dict[str, Lease]]:
    """Leases for every live agent and every tenant: `result[agent][tenant]`.

    `quotas` maps tenant names to their quotas (`{t.name: t.quotas for t in spec.tenants}`);
    `recent_use` maps (tenant, agent) to that tenant's recent use on that agent (missing:
    none); `previous` is the last split, `previous[agent][tenant]`, for smoothing. Use by
    agents that are not live is ignored: their share goes to the live ones.

    Keep an agent in `live_agents` for as long as it may still be serving on a lease: an agent
    dropped while it serves on its last or fallback lease is outside the split, and the fleet
    can then exceed a limit by what that agent holds.
    """
    policy = policy or LeasePolicy()
    agents = sorted(set(live_agents))
    leases: dict[str, dict[str, Lease]] = {agent: {} for agent in agents}
    if not agents:
        return leases
    expires_at = now + policy.ttl_s
    for tenant in sorted(quotas):
        quota = quotas[tenant]
        parts: dict[str, dict[str, int | None]] = {agent: {} for agent in agents}
        for limit_name, use_name in _LIMITS.items():
            limit: int | None = getattr(quota, limit_name)
            if limit is None:
                for agent in agents:
                    parts[agent][limit_name] = None
                continue
            use = {
                agent: float(getattr(recent_use.get((tenant, agent), _NO_USE), use_name))
                for agent in agents
            }
            prior = _previous_limits(previous, tenant, limit_name, agents)
            split = _split(limit, agents, use, prior, policy)
            for agent in agents:
                parts[agent][limit_name] = split[agent]
        for agent in agents:
            leases[agent][tenant] = Lease(
                requests_per_minute=parts[agent]["requests_per_minute"],
                tokens_per_minute=parts[agent]["tokens_per_minute"],
                max_concurrency=parts[agent]["max_concurrency"],
                issued_at=now,
                expires_at=expires_at,
            )
    return leases


_NO_USE = Usage()


def fallback_lease(quota: QuotaSpec, expected_agents: int, *, now: float = 0.0) -> Lease:
    """The lease an agent serves on once its last lease has expired without contact.

    Each limit is divided evenly by `expected_agents` (the number of agents the agent last
    knew of; at least 1), rounded down, so that if every agent falls back at once the fleet
    stays within the quota. An agent never falls back to zero: each limit is at least 1, which
    can exceed a limit smaller than the number of agents; the alternative, refusing the tenant
    outright while the controller is away, was judged worse. It never expires on its own: the
    controller's next lease replaces it.
    """
    agents = max(expected_agents, 1)

    def even(limit: int | None) -> int | None:
        return None if limit is None else max(1, limit // agents)

    return Lease(
        requests_per_minute=even(quota.requests_per_minute),
        tokens_per_minute=even(quota.tokens_per_minute),
        max_concurrency=even(quota.max_concurrency),
        issued_at=now,
        expires_at=None,
    )


def lease_in_force(
    last: Lease | None, quota: QuotaSpec, expected_agents: int, *, now: float
) -> Lease:
    """What an agent enforces at `now`: its last lease while valid, else the fallback."""
    if last is not None and last.valid_at(now):
        return last
    return fallback_lease(quota, expected_agents, now=now)


# --------------------------------------------------------------------------------------------
# The split of one limit


def _previous_limits(
    previous: Mapping[str, Mapping[str, Lease]] | None,
    tenant: str,
    limit_name: str,
    agents: Sequence[str],
) -> dict[str, float]:
    if previous is None:
        return {}
    out: dict[str, float] = {}
    for agent in agents:
        lease = previous.get(agent, {}).get(tenant)
        value = None if lease is None else getattr(lease, limit_name)
        if value is not None:
            out[agent] = float(value)
    return out


def _shares(values: Mapping[str, float], agents: Sequence[str]) -> dict[str, Fraction] | None:
    """Each agent's exact fraction of the total, or None when the total is zero."""
    exact = {agent: Fraction(values.get(agent, 0.0)) for agent in agents}
    total = sum(exact.values())
    if total <= 0:
        return None
    return {agent: value / total for agent, value in exact.items()}


def _split(
    limit: int,
    agents: Sequence[str],
    use: Mapping[str, float],
    previous: Mapping[str, float],
    policy: LeasePolicy,
) -> dict[str, int]:
    n = len(agents)
    floor = min(max(policy.min_units, int(policy.floor_share * limit / n)), limit // n)
    rest = limit - n * floor

    use_share = _shares(use, agents)
    previous_share = _shares(previous, agents)
    even = {agent: Fraction(1, n) for agent in agents}
    if use_share is None:
        # No use lately: keep the previous split if there is one, else split evenly.
        share = previous_share or even
    elif previous_share is None or policy.smoothing == 0:
        share = use_share
    else:
        weight = Fraction(policy.smoothing)
        share = {
            agent: (1 - weight) * use_share[agent] + weight * previous_share[agent]
            for agent in agents
        }

    # Largest remainder: whole units first, then one each to the largest fractions.
    exact = {agent: rest * share[agent] for agent in agents}
    units = {agent: math.floor(exact[agent]) for agent in agents}
    leftover = rest - sum(units.values())
    by_remainder = sorted(agents, key=lambda agent: (-(exact[agent] - units[agent]), agent))
    for agent in by_remainder[:leftover]:
        units[agent] += 1
    return {agent: floor + units[agent] for agent in agents}
