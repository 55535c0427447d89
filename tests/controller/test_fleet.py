"""The controller's fleet state: freshness, lease accounting (exact per-limit caps, stale
agents kept until their leases expire) and budget flags."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.controller.fleet import FleetState, over_budget
from runtime.controller.ledger import UsageTotals
from runtime.leases import Lease, LeasePolicy
from runtime.protocol import MetricsPush
from runtime.spec import QuotaSpec

from .support import T0, fleet_spec, push_body

LIMITS = ("requests_per_minute", "tokens_per_minute", "max_concurrency")
QUOTA = QuotaSpec(requests_per_minute=100, tokens_per_minute=10_000, max_concurrency=10)
STALE_S = 15.0
TTL_S = 30.0


def state() -> FleetState:
    return FleetState({"alpha": QUOTA}, stale_after_s=STALE_S, policy=LeasePolicy(ttl_s=TTL_S))


def push(agent: str, seq: int, rpm: float = 0.0, boot: str = "boot-1") -> MetricsPush:
    return MetricsPush.model_validate(
        push_body(agent, seq, boot_id=boot, recent_use={"alpha": {"requests_per_minute": rpm}})
    )


def exchange(fleet: FleetState, agent: str, seq: int, now: float, rpm: float = 0.0) -> Lease:
    fleet.observe(push(agent, seq, rpm), now)
    return fleet.grant(agent, now)["alpha"]


def test_only_fresh_agents_are_in_the_view() -> None:
    fleet = state()
    exchange(fleet, "a", 0, T0)
    exchange(fleet, "b", 0, T0 + 10)
    assert [p.instance_id for p in fleet.view(T0 + 10)] == ["a-instance", "b-instance"]
    assert fleet.view(T0 + 10)[0].last_seen == T0
    assert [p.instance_id for p in fleet.view(T0 + STALE_S + 0.5)] == ["b-instance"]
    assert fleet.view(T0 + 10 + STALE_S + 0.5) == []


def test_a_stale_agent_stays_in_lease_accounting_until_its_lease_expires() -> None:
    fleet = state()
    a = exchange(fleet, "a", 0, T0, rpm=50)
    assert a.requests_per_minute == 100 and a.expires_at == T0 + TTL_S
    now = T0 + STALE_S + 1  # a is stale, but may still be serving on its lease
    assert fleet.lease_holders(now) == {"a"}
    b = exchange(fleet, "b", 0, now, rpm=50)
    assert b.requests_per_minute == 0  # a may still admit all 100 per minute
    assert fleet.sweep(now) == ([fleet.agents["a"]], [])  # reported stale once, kept
    assert fleet.sweep(now)[0] == []

    after = T0 + TTL_S  # a's lease has expired
    assert fleet.lease_holders(after) == {"b"}
    b = exchange(fleet, "b", 1, after, rpm=50)
    assert b.requests_per_minute == 100
    _, forgotten = fleet.sweep(after)
    assert [r.agent_id for r in forgotten] == ["a"] and set(fleet.agents) == {"b"}


def test_a_joining_agent_gets_its_share_once_the_other_has_renewed() -> None:
    fleet = state()
    assert exchange(fleet, "a", 0, T0, rpm=30).requests_per_minute == 100
    # b joins: a still holds the whole quota until it is known to have a smaller lease, that
    # is, until it pushes again after receiving one (two pushes of a).
    assert exchange(fleet, "b", 0, T0 + 1, rpm=10).requests_per_minute == 0
    a = exchange(fleet, "a", 1, T0 + 2, rpm=30)
    assert exchange(fleet, "b", 1, T0 + 3, rpm=10).requests_per_minute == 0
    now = T0 + 3
    for seq in range(2, 8):
        now += 1
        a = exchange(fleet, "a", seq, now, rpm=30)
        now += 1
        b = exchange(fleet, "b", seq, now, rpm=10)
        assert a.requests_per_minute + b.requests_per_minute <= 100
    assert a.requests_per_minute + b.requests_per_minute == 100
    assert a.requests_per_minute > b.requests_per_minute > 0  # a has more of the traffic


def test_a_lost_reply_keeps_the_older_larger_lease_accounted() -> None:
    fleet = state()
    exchange(fleet, "a", 0, T0, rpm=90)  # a: 100, received (confirmed by seq 1 below)
    exchange(fleet, "b", 0, T0 + 1, rpm=10)  # b: 0, a still holds 100
    exchange(fleet, "a", 1, T0 + 2, rpm=10)  # a is sent a smaller lease; say the reply is lost
    # a retries seq 1; until it pushes seq 2, it may still be enforcing 100.
    b = exchange(fleet, "b", 1, T0 + 3, rpm=90)
    assert b.requests_per_minute == 0
    exchange(fleet, "a", 1, T0 + 4, rpm=10)  # the retry
    a = exchange(fleet, "a", 2, T0 + 5, rpm=10)  # proves the retry's reply arrived
    b = exchange(fleet, "b", 2, T0 + 6, rpm=90)
    assert b.requests_per_minute > 0
    assert a.requests_per_minute + b.requests_per_minute <= 100


def test_a_new_boot_replaces_the_agent_and_what_it_held() -> None:
    fleet = state()
    exchange(fleet, "a", 5, T0, rpm=50)
    assert exchange(fleet, "b", 0, T0, rpm=50).requests_per_minute == 0  # a holds 100
    fleet.observe(push("a", 0, boot="boot-2"), T0 + 1)
    assert fleet.agents["a"].boot_id == "boot-2" and fleet.agents["a"].seq == 0
    # The old process's lease went with it: nothing caps b any more, and the new a gets the
    # rest of the quota.
    b = fleet.grant("b", T0 + 1)["alpha"].requests_per_minute
    a = fleet.grant("a", T0 + 1)["alpha"].requests_per_minute
    assert b is not None and a is not None
    assert b > 50 and a + b == 100


def test_a_delayed_older_push_does_not_roll_the_snapshot_back() -> None:
    fleet = state()
    fleet.observe(push("a", 3), T0 + 5)
    fleet.observe(push("a", 2), T0 + 6)
    assert fleet.agents["a"].seq == 3 and fleet.agents["a"].last_seen == T0 + 5


def test_unlimited_quotas_stay_unlimited() -> None:
    fleet = FleetState({"free": QuotaSpec()}, stale_after_s=STALE_S)
    fleet.observe(push("a", 0), T0)
    lease = fleet.grant("a", T0)["free"]
    assert (lease.requests_per_minute, lease.tokens_per_minute, lease.max_concurrency) == (
        None,
        None,
        None,
    )


# One agent's turn: push (reply delivered or lost), or the clock moving on.
Step = tuple[int, str, float, float]
steps = st.lists(
    st.tuples(
        st.integers(0, 2),
        st.sampled_from(["delivered", "delivered", "lost", "wait"]),
        st.floats(0, 500),  # recent requests per minute on that agent
        st.floats(0, 20),  # seconds that pass
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(steps)
def test_what_agents_enforce_never_sums_past_the_quota(script: list[Step]) -> None:
    fleet = state()
    agents = ["a", "b", "c"]
    enforced: dict[str, Lease | None] = dict.fromkeys(agents)
    seq = dict.fromkeys(agents, 0)
    now = T0
    for index, action, rpm, wait in script:
        agent = agents[index]
        now += wait
        if action != "wait":
            fleet.observe(
                MetricsPush.model_validate(
                    push_body(
                        agent,
                        seq[agent],
                        recent_use={"alpha": {"requests_per_minute": rpm, "concurrency": rpm}},
                    )
                ),
                now,
            )
            lease = fleet.grant(agent, now)["alpha"]
            if action == "delivered":
                enforced[agent] = lease
                seq[agent] += 1  # the agent moves on only after a reply
        for limit in LIMITS:
            total = sum(
                getattr(lease, limit)
                for lease in enforced.values()
                if lease is not None and lease.valid_at(now)
            )
            assert total <= getattr(QUOTA, limit), (limit, total, enforced)
            accounted = sum(r.holds("alpha", limit, now) or 0 for r in fleet.agents.values())
            assert accounted <= getattr(QUOTA, limit)


def test_budgets_are_spent_when_reached() -> None:
    spec = fleet_spec()  # alpha: 5 USD/month; beta: 1 accelerator-hour/month; fleet: 20 USD
    assert over_budget(spec, {}, 0.0) == ([], False)
    month = {
        "alpha": UsageTotals(usd=4.99),
        "beta": UsageTotals(accelerator_seconds=3599.0, usd=100.0),
        "gamma": UsageTotals(usd=1000.0),  # no monthly limits
    }
    assert over_budget(spec, month, 19.99) == ([], False)
    month["alpha"] = UsageTotals(usd=5.0)
    month["beta"] = UsageTotals(accelerator_seconds=3600.0)
    assert over_budget(spec, month, 20.0) == (["alpha", "beta"], True)


def test_a_planned_fleet_starts_with_every_agent_able_to_serve() -> None:
    # Without a plan the first agent to push is granted the whole quota and a second agent
    # that joins a moment later gets nothing until the first confirms a smaller lease.
    unplanned = state()
    assert exchange(unplanned, "a", 0, T0).requests_per_minute == 100
    assert exchange(unplanned, "b", 0, T0 + 1).requests_per_minute == 0

    # With the spec's planned size, a share is kept for each agent that has not pushed yet.
    planned = FleetState(
        {"alpha": QUOTA}, stale_after_s=STALE_S, policy=LeasePolicy(ttl_s=TTL_S), expected_agents=2
    )
    first = exchange(planned, "a", 0, T0)
    second = exchange(planned, "b", 0, T0 + 1)
    assert first.requests_per_minute == second.requests_per_minute == 50
    assert first.max_concurrency == second.max_concurrency == 5
    # A busy first agent still gets most of it, but the newcomer is never locked out.
    busy = FleetState(
        {"alpha": QUOTA}, stale_after_s=STALE_S, policy=LeasePolicy(ttl_s=TTL_S), expected_agents=2
    )
    assert 50 < exchange(busy, "a", 0, T0, rpm=80).requests_per_minute < 100
    assert exchange(busy, "b", 0, T0 + 1).requests_per_minute >= 1
