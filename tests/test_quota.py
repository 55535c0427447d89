"""runtime.quota: token buckets, concurrency, refunds and leases, on a fake clock."""

from __future__ import annotations

import pytest

from runtime.quota import QuotaBook, QuotaLease, TenantQuota, TokenBucket
from runtime.spec import QuotaSpec


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def quota(clock: FakeClock, **limits: int) -> TenantQuota:
    return TenantQuota("acme", QuotaSpec(**limits), clock)


def test_unlimited_tenant_is_always_admitted(clock: FakeClock) -> None:
    q = quota(clock)
    for _ in range(1000):
        decision = q.admit(10_000)
        assert decision.allowed
    assert q.in_flight == 1000


def test_requests_per_minute_bucket_refills_continuously(clock: FakeClock) -> None:
    q = quota(clock, requests_per_minute=60)  # one per second, burst of 60
    for _ in range(60):
        assert q.admit(0).allowed
    denied = q.admit(0)
    assert not denied.allowed
    assert denied.limit == "requests_per_minute"
    assert denied.retry_after_s == pytest.approx(1.0)
    assert denied.message == "requests_per_minute quota of tenant 'acme' exceeded"
    assert denied.ticket is None
    clock.advance(0.5)
    assert q.admit(0).retry_after_s == pytest.approx(0.5)
    clock.advance(0.5)
    assert q.admit(0).allowed
    assert not q.admit(0).allowed


def test_bucket_never_holds_more_than_a_minute(clock: FakeClock) -> None:
    q = quota(clock, requests_per_minute=2)
    clock.advance(3600)  # an idle hour does not bank 120 requests
    assert q.admit(0).allowed
    assert q.admit(0).allowed
    assert not q.admit(0).allowed


def test_tokens_are_charged_as_estimate_and_refunded_at_finish(clock: FakeClock) -> None:
    q = quota(clock, tokens_per_minute=1000)
    first = q.admit(600)  # prompt + max_tokens
    assert first.allowed and first.ticket is not None
    second = q.admit(600)
    assert not second.allowed
    assert second.limit == "tokens_per_minute"
    # 200 tokens short at 1000/60 per second.
    assert second.retry_after_s == pytest.approx(200 / (1000 / 60))
    q.release(first.ticket, actual_tokens=150)  # it stopped early: 450 come back
    assert q.snapshot()["tokens_available"] == pytest.approx(850)
    assert q.admit(600).allowed


def test_using_more_than_the_estimate_is_charged(clock: FakeClock) -> None:
    q = quota(clock, tokens_per_minute=1000)
    ticket = q.admit(100).ticket
    assert ticket is not None
    q.release(ticket, actual_tokens=300)
    assert q.snapshot()["tokens_available"] == pytest.approx(700)


def test_release_is_idempotent(clock: FakeClock) -> None:
    q = quota(clock, tokens_per_minute=1000, max_concurrency=2)
    ticket = q.admit(500).ticket
    assert ticket is not None
    q.release(ticket, 100)
    q.release(ticket, 100)
    assert q.in_flight == 0
    assert q.snapshot()["tokens_available"] == pytest.approx(900)


def test_request_larger_than_the_bucket_waits_for_a_full_bucket_then_runs_into_debt(
    clock: FakeClock,
) -> None:
    q = quota(clock, tokens_per_minute=600)  # 10 tokens/s
    small = q.admit(100)
    assert small.allowed
    huge = q.admit(5000)
    assert not huge.allowed
    assert huge.retry_after_s == pytest.approx(10.0)  # until the bucket is full again
    clock.advance(10)
    huge = q.admit(5000)
    assert huge.allowed
    assert q.snapshot()["tokens_available"] == pytest.approx(-4400)
    # Everyone waits out the debt: long-run throughput stays at the limit.
    later = q.admit(1)
    assert not later.allowed
    assert later.retry_after_s == pytest.approx(4401 / 10)


def test_concurrency_cap(clock: FakeClock) -> None:
    q = quota(clock, max_concurrency=2)
    a, b = q.admit(1), q.admit(1)
    assert a.allowed and b.allowed
    c = q.admit(1)
    assert (c.allowed, c.limit) == (False, "max_concurrency")
    assert c.retry_after_s > 0
    assert a.ticket is not None
    q.release(a.ticket, 1)
    assert q.admit(1).allowed


def test_a_denied_request_charges_nothing(clock: FakeClock) -> None:
    q = quota(clock, requests_per_minute=10, tokens_per_minute=100, max_concurrency=5)
    assert q.admit(100).allowed  # empties the token bucket
    for _ in range(5):
        assert not q.admit(50).allowed
    snap = q.snapshot()
    assert snap["requests_available"] == pytest.approx(9)
    assert snap["in_flight"] == 1


def test_when_several_limits_are_hit_the_longest_wait_names_the_limit(clock: FakeClock) -> None:
    q = quota(clock, requests_per_minute=1, tokens_per_minute=600)  # 1/min, 10 tokens/s
    assert q.admit(600).allowed
    both = q.admit(300)  # requests: 60 s away; tokens: 30 s away
    assert (both.limit, both.retry_after_s) == ("requests_per_minute", pytest.approx(60))
    q2 = quota(clock, requests_per_minute=60, tokens_per_minute=600)
    assert q2.admit(600).allowed
    tokens_only = q2.admit(600)
    assert (tokens_only.limit, tokens_only.retry_after_s) == (
        "tokens_per_minute",
        pytest.approx(60),
    )


def test_lease_replaces_the_spec_limits_until_it_expires(clock: FakeClock) -> None:
    q = quota(clock, requests_per_minute=100)
    q.apply_lease(QuotaLease("acme", requests_per_minute=2, expires_at=clock() + 30))
    # The bucket keeps its fill fraction (full), now at the lease's size.
    assert q.admit(0).allowed
    assert q.admit(0).allowed
    assert not q.admit(0).allowed
    clock.advance(30)  # expired: back to the spec's 100/min
    assert q.lease.requests_per_minute == 100
    assert q.admit(0).allowed


def test_lease_can_lift_a_limit_and_block_a_tenant(clock: FakeClock) -> None:
    q = quota(clock, tokens_per_minute=10)
    q.apply_lease(QuotaLease("acme", tokens_per_minute=None))
    assert q.admit(1_000_000).allowed
    q.apply_lease(QuotaLease("acme", blocked="usd_per_month"))
    denied = q.admit(1)
    assert (denied.allowed, denied.limit) == (False, "usd_per_month")
    assert "monthly budget" in denied.message
    with pytest.raises(ValueError, match="lease for tenant 'other'"):
        q.apply_lease(QuotaLease("other"))


def test_token_bucket_reconfigure_keeps_debt(clock: FakeClock) -> None:
    bucket = TokenBucket(100, 100 / 60, clock)
    bucket.take(150)
    bucket.reconfigure(200, 200 / 60)
    assert bucket.level == pytest.approx(-50)
    clock.advance(60)
    assert bucket.level == pytest.approx(150)


def test_quota_book_routes_by_tenant(clock: FakeClock) -> None:
    book = QuotaBook.from_specs({"a": QuotaSpec(requests_per_minute=1), "b": QuotaSpec()}, clock)
    assert book.admit("a", 1).allowed
    assert not book.admit("a", 1).allowed
    assert book.admit("b", 1).allowed
    ticket = book.admit("b", 1).ticket
    assert ticket is not None
    book.release(ticket, 1)
    book.apply_lease(QuotaLease("a", requests_per_minute=None))
    assert book.admit("a", 1).allowed
    with pytest.raises(KeyError, match="no quota for tenant 'c'"):
        book.admit("c", 1)


def test_an_expired_lease_falls_back_to_the_fallback_set(clock: FakeClock) -> None:
    q = quota(clock, requests_per_minute=60)
    q.set_fallback(QuotaLease("acme", requests_per_minute=20))
    assert q.lease.requests_per_minute == 20  # the fallback was in force: it takes over at once
    q.apply_lease(QuotaLease("acme", requests_per_minute=30, expires_at=clock.now + 10))
    q.set_fallback(QuotaLease("acme", requests_per_minute=15))
    assert q.lease.requests_per_minute == 30  # a valid lease is not replaced
    clock.advance(10)
    assert q.lease.requests_per_minute == 15 and q.lease.expires_at is None


def test_a_fallback_must_not_expire_nor_be_anothers(clock: FakeClock) -> None:
    q = quota(clock, requests_per_minute=60)
    with pytest.raises(ValueError, match="cannot expire"):
        q.set_fallback(QuotaLease("acme", expires_at=clock.now + 1))
    with pytest.raises(ValueError, match="other"):
        q.set_fallback(QuotaLease("other"))


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        ("usd_per_month", "monthly budget (usd_per_month) of tenant 'acme' is used up"),
        (
            "accelerator_hours_per_month",
            "monthly budget (accelerator_hours_per_month) of tenant 'acme' is used up",
        ),
        ("monthly_budget", "monthly budget of tenant 'acme' is used up"),
    ],
)
def test_a_blocked_tenant_is_told_which_budget(clock: FakeClock, limit: str, message: str) -> None:
    q = quota(clock)
    q.apply_lease(QuotaLease("acme", blocked=limit))  # type: ignore[arg-type]
    decision = q.admit(1)
    assert not decision.allowed and decision.message == message


def test_a_limit_leased_down_to_zero_admits_nothing(clock: FakeClock) -> None:
    q = quota(clock, requests_per_minute=60, tokens_per_minute=600)
    q.apply_lease(QuotaLease("acme", requests_per_minute=0, tokens_per_minute=600))
    for _ in range(3):
        decision = q.admit(10)
        assert (decision.allowed, decision.limit) == (False, "requests_per_minute")
        assert 0 < decision.retry_after_s < 60
        clock.advance(30)
    q.apply_lease(QuotaLease("acme", requests_per_minute=60, tokens_per_minute=0))
    assert q.admit(10).limit == "tokens_per_minute"
