"""The ledger's series for the dashboard: pool and SLO samples, scaling decisions, their age
prune, and the forward migration of a version-1 ledger file that keeps its usage."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.controller.ledger import (
    SCHEMA_VERSION,
    Ledger,
    LedgerError,
    PoolSample,
    ScalingDecision,
    SloSample,
    hour_start,
    month_bounds,
)
from runtime.protocol import UsageDelta

from .support import T0

H0 = hour_start(T0)

# The schema of version 1 exactly as it shipped: files written by that controller look like this.
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS pushes (
    agent_id TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    instance_id TEXT NOT NULL,
    pool TEXT NOT NULL,
    sent_at REAL NOT NULL,
    received_at REAL NOT NULL,
    usage_rows INTEGER NOT NULL,
    PRIMARY KEY (agent_id, boot_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pushes_received_at ON pushes (received_at);
CREATE TABLE IF NOT EXISTS usage_hourly (
    tenant TEXT NOT NULL,
    pool TEXT NOT NULL,
    hour INTEGER NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    accelerator_seconds REAL NOT NULL DEFAULT 0,
    usd REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, pool, hour)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_hourly_hour ON usage_hourly (hour);
CREATE TABLE IF NOT EXISTS usage_monthly (
    tenant TEXT NOT NULL,
    month INTEGER NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    accelerator_seconds REAL NOT NULL DEFAULT 0,
    usd REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (month, tenant)
) WITHOUT ROWID;
"""


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger(tmp_path / "ledger.db") as opened:
        yield opened


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def version_1_file(path: Path) -> None:
    """A ledger as the version-1 controller left it: one push of alpha's usage on pool cheap."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.executescript(SCHEMA_V1)
        db.execute("PRAGMA user_version = 1")
        db.execute("INSERT INTO pushes VALUES ('a1', 'b1', 7, 'a1-i', 'cheap', ?, ?, 1)", (T0, T0))
        db.execute(
            "INSERT INTO usage_hourly VALUES ('alpha', 'cheap', ?, 3, 30, 12, 4.5, 0.75)", (H0,)
        )
        db.execute(
            "INSERT INTO usage_monthly VALUES ('alpha', ?, 3, 30, 12, 4.5, 0.75)",
            (month_bounds(T0)[0],),
        )
    finally:
        db.close()


def test_pool_samples_come_back_in_time_order_within_the_window(ledger: Ledger) -> None:
    ledger.record_pool_samples(
        T0, {"dear": PoolSample(1, 2, 5, 3), "cheap": PoolSample(2, 2, 0, 7)}
    )
    ledger.record_pool_samples(T0 - 60, {"cheap": PoolSample(1, 2, 4, 1)})
    ledger.record_pool_samples(T0 + 60, {"cheap": PoolSample(2, 3, 9, 8)})
    assert ledger.pool_samples(T0 - 60, T0 + 61) == [
        (T0 - 60, "cheap", PoolSample(1, 2, 4, 1)),
        (T0, "cheap", PoolSample(2, 2, 0, 7)),
        (T0, "dear", PoolSample(1, 2, 5, 3)),
        (T0 + 60, "cheap", PoolSample(2, 3, 9, 8)),
    ]
    # [since, until): the start is in, the end is out.
    assert [(at, pool) for at, pool, _ in ledger.pool_samples(T0, T0 + 60)] == [
        (T0, "cheap"),
        (T0, "dear"),
    ]
    assert len(ledger.pool_samples()) == 4
    assert ledger.pool_samples(T0 + 61, T0 + 3600) == []

    # The same pool at the same instant: the later sample replaces the earlier one.
    ledger.record_pool_samples(T0, {"cheap": PoolSample(0, 1, 2, 3)})
    assert ledger.pool_samples(T0, T0 + 1)[0] == (T0, "cheap", PoolSample(0, 1, 2, 3))
    assert len(ledger.pool_samples()) == 4


def test_samples_of_one_instant_are_recorded_all_or_none(ledger: Ledger) -> None:
    broken = PoolSample(1, 1, 1, 1)
    # A value SQLite cannot bind, past the dataclass's checks: the second row fails.
    object.__setattr__(broken, "queued", object())
    with pytest.raises(sqlite3.Error):
        ledger.record_pool_samples(T0, {"a-good": PoolSample(1, 1, 0, 0), "b-broken": broken})
    assert ledger.pool_samples() == []
    ledger.record_pool_samples(T0, {})  # nothing to record is fine
    assert ledger.pool_samples() == []


@pytest.mark.parametrize(
    "make",
    [
        lambda: PoolSample(-1, 0, 0, 0),
        lambda: PoolSample(1, 1, 0.5, 0),  # type: ignore[arg-type]
        lambda: PoolSample(True, 1, 0, 0),
        lambda: SloSample(3, 2, 0, 0),
        lambda: SloSample(0, 0, 5, 4),
        lambda: SloSample(0, -1, 0, 0),
    ],
)
def test_impossible_samples_are_refused(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]


def test_slo_samples_round_trip(ledger: Ledger) -> None:
    ledger.record_slo_samples(
        T0, {"standard": SloSample(9, 10, 7, 10), "batch": SloSample(0, 0, 0, 0)}
    )
    ledger.record_slo_samples(T0 + 30, {"standard": SloSample(4, 4, 3, 4)})
    assert ledger.slo_samples(T0, T0 + 31) == [
        (T0, "batch", SloSample(0, 0, 0, 0)),
        (T0, "standard", SloSample(9, 10, 7, 10)),
        (T0 + 30, "standard", SloSample(4, 4, 3, 4)),
    ]
    assert ledger.slo_samples(T0 + 1) == [(T0 + 30, "standard", SloSample(4, 4, 3, 4))]
    assert ledger.slo_samples(until=T0 + 30) == ledger.slo_samples(T0, T0 + 1)


def test_recent_decisions_are_newest_first_with_their_reasons(ledger: Ledger) -> None:
    first = ledger.record_decision(T0, "cheap", 1, 2, ["queue 12 > 8"], True, None)
    second = ledger.record_decision(
        T0 + 30, "dear", 2, 1, ("idle", "<script>alert(1)</script>", "é ☃"), False, "quota"
    )
    third = ledger.record_decision(T0 + 30, "cheap", 2, 2, [], False, None)
    assert first < second < third
    decisions = ledger.recent_decisions()
    assert decisions == [
        ScalingDecision(T0 + 30, "cheap", 2, 2, (), False, None),  # same instant: later id first
        ScalingDecision(
            T0 + 30, "dear", 2, 1, ("idle", "<script>alert(1)</script>", "é ☃"), False, "quota"
        ),
        ScalingDecision(T0, "cheap", 1, 2, ("queue 12 > 8",), True, None),
    ]
    assert ledger.recent_decisions(limit=1) == decisions[:1]
    assert ledger.recent_decisions(limit=0) == []
    with pytest.raises(ValueError):
        ledger.recent_decisions(limit=-1)


def test_a_malformed_decision_is_refused(ledger: Ledger) -> None:
    with pytest.raises(TypeError, match="not one string"):
        ledger.record_decision(T0, "cheap", 1, 2, "scale up", True, None)
    with pytest.raises(TypeError):
        ledger.record_decision(T0, "cheap", 1, 2, ["ok", 3], True, None)  # type: ignore[list-item]
    with pytest.raises(ValueError):
        ledger.record_decision(T0, "cheap", -1, 2, [], True, None)
    assert ledger.recent_decisions() == []


def test_pruning_samples_removes_only_old_series_rows(ledger: Ledger) -> None:
    day = 86_400.0
    for at in (T0 - 10 * day, T0 - 2 * day, T0):
        ledger.record_pool_samples(at, {"cheap": PoolSample(1, 1, 0, 0)})
        ledger.record_slo_samples(at, {"standard": SloSample(1, 1, 1, 1)})
        ledger.record_decision(at, "cheap", 1, 1, [], True, None)
    ledger.record_push(
        agent_id="a1",
        boot_id="b1",
        seq=0,
        instance_id="i",
        pool="cheap",
        sent_at=T0 - 10 * day,
        received_at=T0 - 10 * day,
        usage=[UsageDelta(tenant="alpha", hour=hour_start(T0 - 10 * day), usd=0.5)],
    )
    assert ledger.prune_samples(before=T0 - 7 * day) == 3
    assert [at for at, _, _ in ledger.pool_samples()] == [T0 - 2 * day, T0]
    assert [at for at, _, _ in ledger.slo_samples()] == [T0 - 2 * day, T0]
    assert [d.at for d in ledger.recent_decisions()] == [T0, T0 - 2 * day]
    assert ledger.prune_samples(before=T0 - 7 * day) == 0
    # Usage is never pruned with the samples.
    assert ledger.usage()[0].totals.usd == 0.5
    assert ledger.push_count() == 1


def test_a_version_1_file_is_migrated_and_keeps_its_usage(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    version_1_file(path)
    assert user_version(path) == 1
    with Ledger(path) as ledger:
        assert user_version(path) == SCHEMA_VERSION == 2
        alpha = ledger.month_totals(T0)["alpha"]
        assert (alpha.requests, alpha.prompt_tokens, alpha.completion_tokens) == (3, 30, 12)
        assert (alpha.accelerator_seconds, alpha.usd) == (4.5, 0.75)
        [row] = ledger.hourly_rows()
        assert (row.tenant, row.pool, row.hour, row.totals.usd) == ("alpha", "cheap", H0, 0.75)
        # Duplicate detection still knows the version-1 push.
        push = {
            "agent_id": "a1",
            "boot_id": "b1",
            "instance_id": "a1-i",
            "pool": "cheap",
            "sent_at": T0,
            "received_at": T0,
            "usage": [UsageDelta(tenant="alpha", hour=H0, requests=1)],
        }
        assert ledger.record_push(seq=7, **push) is False
        assert ledger.record_push(seq=8, **push) is True
        # The new tables work.
        ledger.record_pool_samples(T0, {"cheap": PoolSample(1, 2, 3, 4)})
        ledger.record_slo_samples(T0, {"standard": SloSample(1, 2, 1, 2)})
        ledger.record_decision(T0, "cheap", 1, 2, ["up"], True, None)
    # Opening a migrated file again migrates nothing and loses nothing.
    with Ledger(path) as again:
        assert again.month_totals(T0)["alpha"].requests == 4
        assert again.pool_samples() == [(T0, "cheap", PoolSample(1, 2, 3, 4))]
        assert again.slo_samples() == [(T0, "standard", SloSample(1, 2, 1, 2))]
        assert [d.reasons for d in again.recent_decisions()] == [("up",)]
    assert user_version(path) == 2


def test_a_failed_migration_leaves_the_version_1_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    version_1_file(path)
    with sqlite3.connect(path) as db:
        # A stray table in the way makes the migration's CREATE TABLE fail half-way.
        db.execute("CREATE TABLE scaling_decisions (x)")
    with pytest.raises(LedgerError, match="not a usable ledger"):
        Ledger(path)
    assert user_version(path) == 1
    with sqlite3.connect(path) as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        assert "pool_samples" not in tables  # created before the failure, rolled back
        assert db.execute("SELECT usd FROM usage_hourly").fetchall() == [(0.75,)]


def test_a_newer_ledger_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(LedgerError, match="newer than this controller"):
        Ledger(path)
    assert user_version(path) == SCHEMA_VERSION + 1


def test_a_new_file_starts_at_the_current_version(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    Ledger(path).close()
    assert user_version(path) == SCHEMA_VERSION
    with sqlite3.connect(path) as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
    assert {"pushes", "usage_hourly", "usage_monthly"} <= tables
    assert {"pool_samples", "slo_samples", "scaling_decisions"} <= tables
