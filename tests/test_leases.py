"""Quota leases: fleet-wide limits split among agents by use, with a floor and a fallback."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.leases import Lease, LeasePolicy, Usage, fallback_lease, lease_in_force, split_leases
from runtime.spec import QuotaSpec

NOW = 500.0
LIMITS = ("requests_per_minute", "tokens_per_minute", "max_concurrency")


def rpm(leases: dict[str, dict[str, Lease]], tenant: str) -> dict[str, int | None]:
    return {agent: by_tenant[tenant].requests_per_minute for agent, by_tenant in leases.items()}


def test_split_follows_recent_use_above_the_floor() -> None:
    leases = split_leases(
        {"acme": QuotaSpec(requests_per_minute=1000)},
        {("acme", "a"): Usage(requests_per_minute=300), ("acme", "b"): Usage(100)},
        ["a", "b"],
        now=NOW,
    )
    # Floor: 10% of an even share (50 each); the other 900 split 3:1.
    assert rpm(leases, "acme") == {"a": 50 + 675, "b": 50 + 225}


def test_an_idle_agent_keeps_a_floor_so_the_tenant_is_not_locked_out() -> None:
    leases = split_leases(
        {"acme": QuotaSpec(requests_per_minute=900, max_concurrency=30)},
        {("acme", "busy"): Usage(requests_per_minute=500, concurrency=12)},
        ["busy", "idle"],
        now=NOW,
    )
    assert leases["idle"]["acme"].requests_per_minute == 45  # 10% of 450
    assert leases["idle"]["acme"].max_concurrency == 1  # 10% of 15 rounds down; min_units is 1
    assert leases["busy"]["acme"].requests_per_minute == 900 - 45
    assert leases["busy"]["acme"].max_concurrency == 29


def test_each_limit_follows_its_own_use() -> None:
    use = {
        ("acme", "chatty"): Usage(requests_per_minute=90, tokens_per_minute=1_000),
        ("acme", "bulky"): Usage(requests_per_minute=10, tokens_per_minute=9_000),
    }
    quota = QuotaSpec(requests_per_minute=100, tokens_per_minute=100_000)
    policy = LeasePolicy(floor_share=0.0, min_units=0)
    leases = split_leases({"acme": quota}, use, ["chatty", "bulky"], now=NOW, policy=policy)
    assert leases["chatty"]["acme"].requests_per_minute == 90
    assert leases["chatty"]["acme"].tokens_per_minute == 10_000
    assert leases["bulky"]["acme"].requests_per_minute == 10
    assert leases["bulky"]["acme"].tokens_per_minute == 90_000


def test_without_use_the_quota_is_split_evenly_and_rounding_is_deterministic() -> None:
    leases = split_leases(
        {"acme": QuotaSpec(requests_per_minute=1000)}, {}, ["c", "b", "a"], now=NOW
    )
    # 1000 / 3: the one unit left over goes to the first agent by name.
    assert rpm(leases, "acme") == {"a": 334, "b": 333, "c": 333}
    assert list(leases) == ["a", "b", "c"]


def test_unlimited_quotas_stay_unlimited() -> None:
    leases = split_leases(
        {"free": QuotaSpec(), "part": QuotaSpec(tokens_per_minute=10)},
        {("free", "a"): Usage(5, 500, 2)},
        ["a", "b"],
        now=NOW,
    )
    for agent in ("a", "b"):
        free = leases[agent]["free"]
        assert (free.requests_per_minute, free.tokens_per_minute, free.max_concurrency) == (
            None,
            None,
            None,
        )
        part = leases[agent]["part"]
        assert part.requests_per_minute is None and part.tokens_per_minute == 5


def test_a_quota_smaller_than_the_fleet_goes_to_the_agents_that_use_it() -> None:
    leases = split_leases(
        {"tiny": QuotaSpec(requests_per_minute=2)},
        {("tiny", "c"): Usage(requests_per_minute=5), ("tiny", "a"): Usage(requests_per_minute=1)},
        ["a", "b", "c"],
        now=NOW,
    )
    assert rpm(leases, "tiny") == {"a": 0, "b": 0, "c": 2}


def test_smoothing_blends_the_previous_split_with_the_latest_use() -> None:
    quota = {"acme": QuotaSpec(requests_per_minute=1000)}
    policy = LeasePolicy(floor_share=0.0, smoothing=0.5)
    first = split_leases(quota, {("acme", "a"): Usage(100)}, ["a", "b"], now=0, policy=policy)
    assert rpm(first, "acme") == {"a": 999, "b": 1}  # min_units keeps b at 1
    # All traffic moves to b: b gets half its use share (998 / 2) plus half its old share.
    second = split_leases(
        quota, {("acme", "b"): Usage(100)}, ["a", "b"], now=30, policy=policy, previous=first
    )
    assert rpm(second, "acme") == {"a": 1 + 499, "b": 1 + 499}
    third = split_leases(
        quota, {("acme", "b"): Usage(100)}, ["a", "b"], now=60, policy=policy, previous=second
    )
    # b: 0.5 x 1 + 0.5 x 0.5 of 998 is 748.5; the half-unit tie goes to a by name.
    assert rpm(third, "acme") == {"a": 1 + 250, "b": 1 + 748}


def test_only_live_agents_get_leases_and_dead_agents_use_is_ignored() -> None:
    leases = split_leases(
        {"acme": QuotaSpec(requests_per_minute=100)},
        {("acme", "gone"): Usage(1_000), ("acme", "a"): Usage(10), ("ghost", "a"): Usage(5)},
        ["a"],
        now=NOW,
    )
    assert list(leases) == ["a"] and list(leases["a"]) == ["acme"]
    assert leases["a"]["acme"].requests_per_minute == 100
    assert split_leases({"acme": QuotaSpec(requests_per_minute=100)}, {}, [], now=NOW) == {}


def test_leases_expire_after_the_ttl() -> None:
    leases = split_leases(
        {"acme": QuotaSpec(requests_per_minute=60)},
        {},
        ["a"],
        now=NOW,
        policy=LeasePolicy(ttl_s=20),
    )
    lease = leases["a"]["acme"]
    assert (lease.issued_at, lease.expires_at, lease.ttl_s) == (NOW, NOW + 20, 20)
    assert lease.valid_at(NOW + 19.9) and not lease.valid_at(NOW + 20)


def test_fallback_lease_divides_the_quota_by_the_agents_last_seen() -> None:
    quota = QuotaSpec(requests_per_minute=100, tokens_per_minute=10_000, max_concurrency=3)
    lease = fallback_lease(quota, 4, now=NOW)
    assert (lease.requests_per_minute, lease.tokens_per_minute, lease.max_concurrency) == (
        25,
        2_500,
        1,  # 3 // 4 is 0; an agent never falls back to refusing everything
    )
    assert lease.expires_at is None and lease.valid_at(NOW + 1e9)
    alone = fallback_lease(quota, 0)
    assert alone.requests_per_minute == 100  # no agents known: itself
    assert fallback_lease(QuotaSpec(), 3).tokens_per_minute is None


def test_an_agent_serves_on_its_last_lease_then_on_the_fallback() -> None:
    quota = QuotaSpec(requests_per_minute=90)
    last = split_leases({"acme": quota}, {("acme", "a"): Usage(50)}, ["a", "b", "c"], now=NOW)["a"][
        "acme"
    ]
    assert last.requests_per_minute > 30
    assert lease_in_force(last, quota, 3, now=NOW + 10) is last
    fallback = lease_in_force(last, quota, 3, now=NOW + 31)
    assert fallback.requests_per_minute == 30 and fallback.expires_at is None
    assert lease_in_force(None, quota, 3, now=NOW).requests_per_minute == 30


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="smoothing"):
        LeasePolicy(smoothing=1.0)
    with pytest.raises(ValueError, match="floor_share"):
        LeasePolicy(floor_share=1.5)
    with pytest.raises(ValueError, match="usage"):
        Usage(requests_per_minute=-1)


# --------------------------------------------------------------------------------------------
# Properties

limits = st.one_of(st.none(), st.integers(1, 10**7))
quotas = st.builds(
    QuotaSpec, requests_per_minute=limits, tokens_per_minute=limits, max_concurrency=limits
)
usage = st.builds(
    Usage,
    requests_per_minute=st.floats(0, 1e6),
    tokens_per_minute=st.floats(0, 1e9),
    concurrency=st.floats(0, 1e4),
)
agent_names = st.lists(st.sampled_from([f"agent-{i}" for i in range(12)]), unique=True)
tenant_names = st.sampled_from(["t1", "t2", "t3"])
policies = st.builds(
    LeasePolicy,
    floor_share=st.floats(0, 1),
    min_units=st.integers(0, 5),
    smoothing=st.floats(0, 0.99),
)


@settings(max_examples=300, deadline=None)
@given(
    quota_map=st.dictionaries(tenant_names, quotas, max_size=3),
    agents=agent_names,
    use=st.dictionaries(st.tuples(tenant_names, st.sampled_from(["agent-0", "agent-3"])), usage),
    next_use=st.dictionaries(st.tuples(tenant_names, st.sampled_from(["agent-1"])), usage),
    policy=policies,
)
def test_property_sums_never_exceed_quotas(
    quota_map: dict[str, QuotaSpec],
    agents: list[str],
    use: dict[tuple[str, str], Usage],
    next_use: dict[tuple[str, str], Usage],
    policy: LeasePolicy,
) -> None:
    first = split_leases(quota_map, use, agents, now=0, policy=policy)
    # A second round smoothed against the first, after traffic moved.
    second = split_leases(quota_map, next_use, agents, now=30, policy=policy, previous=first)
    for leases in (first, second):
        assert sorted(leases) == sorted(agents)
        for tenant, quota in quota_map.items():
            for name in LIMITS:
                limit = getattr(quota, name)
                parts = [getattr(leases[agent][tenant], name) for agent in agents]
                if limit is None:
                    assert all(part is None for part in parts)
                else:
                    assert all(part is not None and part >= 0 for part in parts)
                    assert sum(parts) <= limit  # in fact == limit when any agent is live


@settings(max_examples=300, deadline=None)
@given(
    quota_rpm=st.integers(1, 10_000),
    agents=agent_names.filter(bool),
    use=st.dictionaries(st.sampled_from([f"agent-{i}" for i in range(12)]), usage),
    policy=policies,
)
def test_property_every_agent_gets_a_request_when_the_quota_allows(
    quota_rpm: int, agents: list[str], use: dict[str, Usage], policy: LeasePolicy
) -> None:
    policy = LeasePolicy(
        floor_share=policy.floor_share, min_units=max(1, policy.min_units), smoothing=0.5
    )
    recent = {("t", agent): u for agent, u in use.items()}
    leases = split_leases(
        {"t": QuotaSpec(requests_per_minute=quota_rpm)}, recent, agents, now=0, policy=policy
    )
    if quota_rpm >= len(agents):
        assert all(leases[agent]["t"].requests_per_minute >= 1 for agent in agents)
    assert sum(leases[agent]["t"].requests_per_minute for agent in agents) == quota_rpm


@settings(max_examples=200, deadline=None)
@given(quota_rpm=st.integers(1, 10_000), use=st.dictionaries(st.sampled_from("abcd"), usage))
def test_property_more_use_never_means_a_smaller_lease(
    quota_rpm: int, use: dict[str, Usage]
) -> None:
    agents = ["a", "b", "c", "d"]
    recent = {("t", agent): u for agent, u in use.items()}
    leases = split_leases({"t": QuotaSpec(requests_per_minute=quota_rpm)}, recent, agents, now=0)
    got = {agent: leases[agent]["t"].requests_per_minute for agent in agents}
    used = {agent: use.get(agent, Usage()).requests_per_minute for agent in agents}
    for x in agents:
        for y in agents:
            if used[x] > used[y]:
                assert got[x] >= got[y]


@settings(max_examples=200, deadline=None)
@given(quota=quotas, expected=st.integers(0, 100))
def test_property_fallbacks_together_stay_within_the_quota(quota: QuotaSpec, expected: int) -> None:
    lease = fallback_lease(quota, expected)
    for name in LIMITS:
        limit, part = getattr(quota, name), getattr(lease, name)
        if limit is None:
            assert part is None
        elif limit >= max(expected, 1):
            assert part >= 1 and part * max(expected, 1) <= limit
        else:
            assert part == 1
