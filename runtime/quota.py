"""Tenant quotas: whether a tenant may start one more request now. Pure policy, clock injected.

This module owns the per-tenant rate and concurrency limits that an agent enforces at admission:

* ``requests_per_minute`` and ``tokens_per_minute`` are token buckets. A bucket holds at most one
  minute's allowance (so a tenant idle for a minute may burst that much) and refills continuously
  at ``limit / 60`` per second.
* ``max_concurrency`` caps the tenant's requests in flight on this agent.

Tokens are charged at admission as an estimate (prompt tokens + ``max_tokens``, the most the
request can use) and corrected when it finishes (:meth:`QuotaBook.release` with the actual prompt +
completion tokens), so a request that stops early gives back what it did not use.

A request larger than a whole minute's token allowance could never fit in the bucket; instead of
refusing it forever it is admitted once the bucket is full, and it drives the bucket into debt that
later requests wait out. Long-run throughput still equals the limit.

Limits come from the tenant's :class:`runtime.spec.QuotaSpec`. The controller can replace them
with fleet-wide values by handing each agent a :class:`QuotaLease` (a tenant's share of its fleet
quota for this node, renewed periodically); enforcement stays here. An expired lease falls back to
the tenant's *fallback* limits: the spec's by default, or what :meth:`QuotaBook.set_fallback`
installs (an agent in a fleet sets its even share, so that agents that lost the controller do not
each admit the whole fleet quota). Monthly budgets (``usd_per_month``,
``accelerator_hours_per_month``) need the fleet-wide usage ledger, so only the controller can
judge them: it says so through ``QuotaLease.blocked`` and this module refuses the tenant's
requests while that is set.

Decisions are data (:class:`QuotaDecision`), never exceptions, so the simulator can replay the
same code with a virtual clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from runtime.spec import QuotaSpec

__all__ = [
    "QuotaBook",
    "QuotaDecision",
    "QuotaLease",
    "QuotaLimitName",
    "QuotaTicket",
    "TenantQuota",
    "TokenBucket",
]

Clock = Callable[[], float]
QuotaLimitName = Literal[
    "requests_per_minute",
    "tokens_per_minute",
    "max_concurrency",
    "usd_per_month",
    "accelerator_hours_per_month",
    "monthly_budget",  # a monthly budget is spent, which one is not known
]
_BUDGET_LIMITS = ("usd_per_month", "accelerator_hours_per_month", "monthly_budget")

SECONDS_PER_MINUTE = 60.0
# A concurrency slot frees when some request finishes; we cannot know when, so suggest a short wait.
CONCURRENCY_RETRY_AFTER_S = 1.0
# A blocked (budget-exhausted) tenant is re-judged when the controller renews leases.
BLOCKED_RETRY_AFTER_S = 60.0
# A limit leased down to zero on this agent changes with the next lease (or another agent has
# the share), so suggest a short wait rather than "never".
ZERO_LIMIT_RETRY_AFTER_S = 5.0


class TokenBucket:
    """A bucket of ``capacity`` units refilled at ``rate_per_s``; ``None`` capacity: unlimited.

    The level may go negative (debt) when :meth:`take` is forced; see the module docstring.
    """

    def __init__(self, capacity: float | None, rate_per_s: float | None, clock: Clock) -> None:
        self._clock = clock
        self._capacity = capacity
        self._rate = rate_per_s
        self._level = capacity if capacity is not None else 0.0
        self._updated = clock()

    @property
    def unlimited(self) -> bool:
        return self._capacity is None or self._rate is None

    @property
    def capacity(self) -> float | None:
        return self._capacity

    @property
    def level(self) -> float:
        """Units available now (``inf`` when unlimited)."""
        if self.unlimited:
            return math.inf
        self._refill()
        return self._level

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._updated)
        self._updated = now
        if self._capacity is not None and self._rate is not None:
            self._level = min(self._capacity, self._level + elapsed * self._rate)

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` (at most the capacity) is available; 0 if it is now.

        A zero limit (a lease that gives this agent no share) never refills: ``inf``.
        """
        if self.unlimited:
            return 0.0
        assert self._capacity is not None and self._rate is not None
        self._refill()
        if amount > 0 and self._capacity <= 0:
            return math.inf
        needed = min(amount, self._capacity)
        if self._level >= needed:
            return 0.0
        return (needed - self._level) / self._rate

    def take(self, amount: float) -> None:
        """Remove ``amount`` unconditionally (check :meth:`wait_for` first)."""
        if self.unlimited:
            return
        self._refill()
        self._level -= amount

    def give_back(self, amount: float) -> None:
        """Return ``amount`` (never above capacity)."""
        if self.unlimited:
            return
        assert self._capacity is not None
        self._refill()
        self._level = min(self._capacity, self._level + amount)

    def reconfigure(self, capacity: float | None, rate_per_s: float | None) -> None:
        """Change the limit, keeping the same *fraction* of the bucket filled (debt kept as is)."""
        self._refill()
        if capacity is None or rate_per_s is None:
            self._capacity, self._rate, self._level = capacity, rate_per_s, 0.0
            return
        if self._capacity is None or self._rate is None:
            level = capacity  # was unlimited: start full
        elif self._level < 0:
            level = self._level
        else:
            level = capacity * (self._level / self._capacity) if self._capacity else capacity
        self._capacity, self._rate, self._level = capacity, rate_per_s, level


@dataclass(frozen=True)
class QuotaLease:
    """Limits the controller grants one tenant on one agent until ``expires_at`` (agent clock).

    ``None`` for a limit means unlimited. ``blocked`` names a monthly limit the tenant has used up
    fleet-wide (e.g. ``"usd_per_month"``): while set, every request is refused.
    """

    tenant: str
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_concurrency: int | None = None
    expires_at: float | None = None
    blocked: QuotaLimitName | None = None

    @classmethod
    def from_spec(cls, tenant: str, spec: QuotaSpec) -> QuotaLease:
        """The never-expiring lease that a tenant's own spec limits amount to."""
        return cls(
            tenant=tenant,
            requests_per_minute=spec.requests_per_minute,
            tokens_per_minute=spec.tokens_per_minute,
            max_concurrency=spec.max_concurrency,
        )


@dataclass(frozen=True)
class QuotaDecision:
    """Whether a request may start. When denied: the limit hit and when to retry."""

    allowed: bool
    tenant: str
    limit: QuotaLimitName | None = None
    retry_after_s: float = 0.0
    ticket: QuotaTicket | None = None

    @property
    def message(self) -> str:
        if self.allowed:
            return f"within the quotas of tenant {self.tenant!r}"
        if self.limit == "monthly_budget":
            return f"monthly budget of tenant {self.tenant!r} is used up"
        if self.limit in _BUDGET_LIMITS:
            return f"monthly budget ({self.limit}) of tenant {self.tenant!r} is used up"
        return f"{self.limit} quota of tenant {self.tenant!r} exceeded"


@dataclass
class QuotaTicket:
    """What an admitted request holds: one concurrency slot and ``charged_tokens``."""

    tenant: str
    charged_tokens: int
    released: bool = False


@dataclass
class _TenantState:
    requests: TokenBucket
    tokens: TokenBucket
    max_concurrency: int | None
    in_flight: int = 0


class TenantQuota:
    """One tenant's buckets and concurrency count."""

    def __init__(self, tenant: str, spec: QuotaSpec, clock: Clock) -> None:
        self.tenant = tenant
        self._clock = clock
        self._base = QuotaLease.from_spec(tenant, spec)
        self._lease = self._base
        self._state = _TenantState(
            requests=TokenBucket(*_bucket_shape(self._base.requests_per_minute), clock),
            tokens=TokenBucket(*_bucket_shape(self._base.tokens_per_minute), clock),
            max_concurrency=self._base.max_concurrency,
        )

    @property
    def lease(self) -> QuotaLease:
        """The limits in force now (the spec's once a controller lease has expired)."""
        self._expire_lease()
        return self._lease

    @property
    def in_flight(self) -> int:
        return self._state.in_flight

    def apply_lease(self, lease: QuotaLease) -> None:
        """Enforce ``lease`` from now on (until it expires); buckets keep their fill fraction."""
        self._check_tenant(lease)
        self._install(lease)

    def set_fallback(self, lease: QuotaLease) -> None:
        """What an expired lease falls back to from now on (initially the spec's limits).

        ``lease`` must not expire. If the fallback is what is in force now, the new one takes
        over at once.
        """
        self._check_tenant(lease)
        if lease.expires_at is not None:
            raise ValueError("a fallback lease cannot expire")
        self._expire_lease()
        in_force = self._lease is self._base
        self._base = lease
        if in_force:
            self._install(lease)

    def _check_tenant(self, lease: QuotaLease) -> None:
        if lease.tenant != self.tenant:
            raise ValueError(f"lease for tenant {lease.tenant!r} applied to {self.tenant!r}")

    def _install(self, lease: QuotaLease) -> None:
        self._lease = lease
        self._state.requests.reconfigure(*_bucket_shape(lease.requests_per_minute))
        self._state.tokens.reconfigure(*_bucket_shape(lease.tokens_per_minute))
        self._state.max_concurrency = lease.max_concurrency

    def _expire_lease(self) -> None:
        expires = self._lease.expires_at
        if expires is not None and self._clock() >= expires:
            self._install(self._base)

    def admit(self, estimated_tokens: int) -> QuotaDecision:
        """Charge one request and ``estimated_tokens`` if every limit allows it, else nothing."""
        self._expire_lease()
        state = self._state
        if self._lease.blocked is not None:
            return QuotaDecision(
                False, self.tenant, self._lease.blocked, retry_after_s=BLOCKED_RETRY_AFTER_S
            )
        waits: list[tuple[float, QuotaLimitName]] = []
        if state.max_concurrency is not None and state.in_flight >= state.max_concurrency:
            waits.append((CONCURRENCY_RETRY_AFTER_S, "max_concurrency"))
        request_wait = state.requests.wait_for(1)
        if request_wait > 0:
            waits.append((request_wait, "requests_per_minute"))
        token_wait = state.tokens.wait_for(estimated_tokens)
        if token_wait > 0:
            waits.append((token_wait, "tokens_per_minute"))
        if waits:
            # Name the limit that keeps the tenant waiting longest: retrying after that long
            # clears every limit hit now.
            wait, limit = max(waits, key=lambda w: w[0])
            if math.isinf(wait):
                wait = ZERO_LIMIT_RETRY_AFTER_S
            return QuotaDecision(False, self.tenant, limit, retry_after_s=wait)
        state.requests.take(1)
        state.tokens.take(estimated_tokens)
        state.in_flight += 1
        ticket = QuotaTicket(self.tenant, estimated_tokens)
        return QuotaDecision(True, self.tenant, ticket=ticket)

    def release(self, ticket: QuotaTicket, actual_tokens: int) -> None:
        """End an admitted request: free its slot, refund (or charge) the token difference."""
        if ticket.released:
            return
        ticket.released = True
        self._state.in_flight = max(0, self._state.in_flight - 1)
        difference = ticket.charged_tokens - actual_tokens
        if difference > 0:
            self._state.tokens.give_back(difference)
        elif difference < 0:
            self._state.tokens.take(-difference)

    def snapshot(self) -> dict[str, float | int | None]:
        """Limits and what is left now, for usage reports."""
        lease = self.lease
        requests_left = self._state.requests.level
        tokens_left = self._state.tokens.level
        return {
            "requests_per_minute": lease.requests_per_minute,
            "tokens_per_minute": lease.tokens_per_minute,
            "max_concurrency": lease.max_concurrency,
            "requests_available": None if math.isinf(requests_left) else requests_left,
            "tokens_available": None if math.isinf(tokens_left) else tokens_left,
            "in_flight": self._state.in_flight,
        }


def _bucket_shape(per_minute: float | None) -> tuple[float | None, float | None]:
    if per_minute is None:
        return None, None
    return float(per_minute), per_minute / SECONDS_PER_MINUTE


@dataclass
class QuotaBook:
    """Every tenant's quota on this agent."""

    clock: Clock
    tenants: dict[str, TenantQuota] = field(default_factory=dict)

    @classmethod
    def from_specs(cls, specs: Mapping[str, QuotaSpec], clock: Clock) -> QuotaBook:
        book = cls(clock)
        for tenant, spec in specs.items():
            book.tenants[tenant] = TenantQuota(tenant, spec, clock)
        return book

    def _tenant(self, tenant: str) -> TenantQuota:
        try:
            return self.tenants[tenant]
        except KeyError:
            raise KeyError(f"no quota for tenant {tenant!r}") from None

    def admit(self, tenant: str, estimated_tokens: int) -> QuotaDecision:
        return self._tenant(tenant).admit(estimated_tokens)

    def release(self, ticket: QuotaTicket, actual_tokens: int) -> None:
        self._tenant(ticket.tenant).release(ticket, actual_tokens)

    def apply_lease(self, lease: QuotaLease) -> None:
        self._tenant(lease.tenant).apply_lease(lease)

    def set_fallback(self, lease: QuotaLease) -> None:
        self._tenant(lease.tenant).set_fallback(lease)

    def snapshot(self, tenant: str) -> dict[str, float | int | None]:
        return self._tenant(tenant).snapshot()
