"""The SQLite usage ledger: exactly-once pushes, aggregates by tenant/pool/hour and month,
durability across reopening."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from runtime.controller.ledger import Ledger, LedgerError, hour_start, month_bounds
from runtime.protocol import UsageDelta

from .support import HOUR, T0

H0 = hour_start(T0)


def delta(tenant: str, hour: int = H0, **amounts: Any) -> UsageDelta:
    return UsageDelta(tenant=tenant, hour=hour, **amounts)


def record(
    ledger: Ledger,
    seq: int,
    usage: list[UsageDelta],
    *,
    agent_id: str = "a1",
    boot_id: str = "b1",
    pool: str = "cheap",
) -> bool:
    return ledger.record_push(
        agent_id=agent_id,
        boot_id=boot_id,
        seq=seq,
        instance_id=f"{agent_id}-i",
        pool=pool,
        sent_at=T0,
        received_at=T0,
        usage=usage,
    )


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    with Ledger(tmp_path / "ledger.db") as opened:
        yield opened


def test_a_retried_push_is_counted_once(ledger: Ledger) -> None:
    usage = [delta("alpha", requests=2, prompt_tokens=30, completion_tokens=7, usd=0.5)]
    assert record(ledger, 0, usage) is True
    assert record(ledger, 0, usage) is False  # the retry
    assert record(ledger, 1, [delta("alpha", requests=1, usd=0.25)]) is True
    assert record(ledger, 0, usage) is False  # a late copy of an older push
    totals = ledger.month_totals(T0)["alpha"]
    assert (totals.requests, totals.prompt_tokens, totals.completion_tokens) == (3, 30, 7)
    assert totals.usd == 0.75
    assert ledger.push_count() == 2


def test_seq_is_per_agent_process(ledger: Ledger) -> None:
    one = [delta("alpha", requests=1)]
    assert record(ledger, 0, one, agent_id="a1", boot_id="b1")
    assert record(ledger, 0, one, agent_id="a2", boot_id="b1")  # another agent
    assert record(ledger, 0, one, agent_id="a1", boot_id="b2")  # a1 restarted
    assert ledger.month_totals(T0)["alpha"].requests == 3


def test_usage_aggregates_by_tenant_pool_and_hour(ledger: Ledger) -> None:
    record(
        ledger,
        0,
        [
            delta("alpha", H0, requests=1, prompt_tokens=10, accelerator_seconds=1.5, usd=0.25),
            delta("alpha", H0 + HOUR, requests=2, prompt_tokens=20, usd=0.5),
            delta("beta", H0, requests=4, completion_tokens=40, accelerator_seconds=3.0),
        ],
        agent_id="a1",
        pool="cheap",
    )
    record(
        ledger,
        0,
        [delta("alpha", H0, requests=8, prompt_tokens=80, accelerator_seconds=0.5, usd=1.0)],
        agent_id="a2",
        pool="dear",
    )
    record(ledger, 1, [delta("alpha", H0, requests=16, usd=2.0)], agent_id="a1", pool="cheap")

    rows = [
        (r.tenant, r.pool, r.hour, r.totals.requests, r.totals.usd)
        for r in ledger.hourly_rows(since=H0, until=H0 + 2 * HOUR)
    ]
    assert rows == [
        ("alpha", "cheap", H0, 17, 2.25),
        ("alpha", "cheap", H0 + HOUR, 2, 0.5),
        ("alpha", "dear", H0, 8, 1.0),
        ("beta", "cheap", H0, 4, 0.0),
    ]
    by_pool = {(r.tenant, r.pool): r.totals.requests for r in ledger.usage(group_by=["pool"])}
    assert by_pool == {("alpha", "cheap"): 19, ("alpha", "dear"): 8, ("beta", "cheap"): 4}
    by_hour = {(r.tenant, r.hour): r.totals.requests for r in ledger.usage(group_by=["hour"])}
    assert by_hour == {("alpha", H0): 25, ("alpha", H0 + HOUR): 2, ("beta", H0): 4}
    alpha = ledger.usage(tenants=["alpha"])
    assert [(r.tenant, r.pool, r.hour) for r in alpha] == [("alpha", None, None)]
    assert alpha[0].totals.prompt_tokens == 110
    assert alpha[0].totals.accelerator_seconds == 2.0
    assert alpha[0].totals.total_tokens == 110


def test_time_range_selects_the_hours_that_overlap_it(ledger: Ledger) -> None:
    record(ledger, 0, [delta("alpha", H0 + i * HOUR, requests=10**i) for i in range(4)])

    def requests(**window: float) -> int:
        return sum(r.totals.requests for r in ledger.usage(**window))

    assert requests() == 1111
    assert requests(since=H0 + HOUR) == 1110
    assert requests(since=H0 + HOUR - 1) == 1111  # the first hour ends after `since`
    assert requests(since=H0 + HOUR + 1800) == 1110  # mid-hour: that hour is included
    assert requests(until=H0 + 2 * HOUR) == 11  # hours starting before `until`
    assert requests(since=H0 + HOUR, until=H0 + HOUR + 1) == 10
    assert ledger.usage(tenants=[]) == []


def test_month_totals_follow_the_utc_calendar_month(ledger: Ledger) -> None:
    this_month, next_month = month_bounds(T0)
    last_hour_of_previous_month = this_month - HOUR
    record(
        ledger,
        0,
        [
            delta("alpha", last_hour_of_previous_month, requests=1, usd=100.0),
            delta("alpha", this_month, requests=2, usd=1.5, accelerator_seconds=7200.0),
            delta("beta", H0, requests=3, usd=0.25),
            delta("alpha", next_month, requests=4, usd=50.0),
        ],
    )
    month = ledger.month_totals(T0)
    assert month["alpha"].requests == 2 and month["alpha"].usd == 1.5
    assert month["alpha"].accelerator_hours == 2.0
    assert month["beta"].usd == 0.25
    assert ledger.fleet_month_usd(T0) == 1.75
    assert ledger.fleet_month_usd(this_month - 1) == 100.0
    assert ledger.fleet_month_usd(next_month) == 50.0
    assert ledger.fleet_month_usd(next_month + 40 * 86400) == 0.0


def test_month_bounds_roll_over_the_year() -> None:
    from datetime import UTC, datetime

    december = datetime(2024, 12, 31, 23, 59, tzinfo=UTC).timestamp()
    start, end = month_bounds(december)
    assert start == datetime(2024, 12, 1, tzinfo=UTC).timestamp()
    assert end == datetime(2025, 1, 1, tzinfo=UTC).timestamp()
    assert month_bounds(end) == (end, datetime(2025, 2, 1, tzinfo=UTC).timestamp())


def test_reopening_the_file_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with Ledger(path) as first:
        record(first, 0, [delta("alpha", requests=5, usd=1.25)])
        record(first, 1, [delta("beta", requests=1, accelerator_seconds=9.0)])
    with Ledger(path) as second:
        month = second.month_totals(T0)
        assert month["alpha"].requests == 5 and month["alpha"].usd == 1.25
        assert month["beta"].accelerator_seconds == 9.0
        assert record(second, 1, [delta("beta", requests=1)]) is False  # still a duplicate
        assert second.month_totals(T0)["beta"].requests == 1
        (mode,) = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()
        assert mode == "wal"


def test_a_push_is_recorded_whole_or_not_at_all(ledger: Ledger) -> None:
    good = delta("alpha", requests=1, usd=1.0)
    # A value SQLite cannot bind makes the second row fail after the first was written.
    broken = UsageDelta.model_construct(tenant="alpha", hour=H0, requests=object())
    with pytest.raises(sqlite3.Error):
        record(ledger, 0, [good, broken])
    assert ledger.push_count() == 0
    assert ledger.month_totals(T0) == {}
    assert record(ledger, 0, [good]) is True  # the same seq is still free


def test_an_hour_that_is_not_aligned_is_refused(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="start of an hour"):
        record(ledger, 0, [delta("alpha", H0 + 1, requests=1)])
    assert ledger.push_count() == 0


def test_pruning_keeps_the_newest_push_of_each_process(ledger: Ledger) -> None:
    for seq in range(5):
        record(ledger, seq, [delta("alpha", requests=1)])
    record(ledger, 0, [delta("alpha", requests=1)], agent_id="a2")
    assert ledger.prune_pushes(before=T0 + 1) == 4  # a1's seq 0..3
    assert ledger.push_count() == 2
    assert record(ledger, 4, [delta("alpha", requests=1)]) is False
    assert record(ledger, 2, [delta("alpha", requests=1)]) is False  # older than the newest
    assert record(ledger, 5, [delta("alpha", requests=1)]) is True
    assert ledger.month_totals(T0)["alpha"].requests == 7  # totals are never pruned


def test_a_file_that_is_not_a_ledger_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "not-sqlite.db"
    path.write_bytes(b"this is not a database, just some bytes" * 100)
    with pytest.raises(LedgerError, match="not a usable ledger"):
        Ledger(path)
    with pytest.raises(LedgerError, match="cannot open"):
        Ledger(tmp_path / "missing-dir" / "ledger.db")
