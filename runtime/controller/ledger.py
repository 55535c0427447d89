"""The usage ledger: every agent's reported usage, counted exactly once, in SQLite.

This module owns the durable record of usage (requests, prompt and completion tokens,
accelerator-seconds, USD) per tenant, pool and UTC hour, and the queries budgets and reports
read. It is synchronous and knows nothing of HTTP; the service calls it from one dedicated
thread (see :mod:`runtime.controller.app`).

Schema (``PRAGMA user_version`` 2; a version-1 file is migrated forward on open, keeping its
data: version 2 only adds the three series tables below)

``pushes(agent_id, boot_id, seq)``
    One row per accepted push: when it arrived, from which instance and pool, how many usage
    rows it carried. A push is a duplicate when its ``seq`` is at or below the highest accepted
    ``seq`` of the same agent process (``agent_id`` + ``boot_id``); agents retry only their
    latest unacknowledged push, so this both recognises a retry and ignores a replay of an
    older push, and it keeps working after :meth:`Ledger.prune_pushes` has removed old rows
    (the newest row of each agent process is always kept).
``usage_hourly(tenant, pool, hour)``
    Running totals per tenant, pool and UTC hour (the hour's start, epoch seconds).
``usage_monthly(tenant, month)``
    The same totals per tenant and UTC calendar month (the month's start, epoch seconds), kept
    so that budget checks on every push read a handful of rows instead of a month of hours.
``pool_samples(at, pool)`` (version 2)
    Each pool's replicas (ready), desired replicas, queued and running requests at ``at``
    (epoch seconds), as the controller samples them for the dashboard.
``slo_samples(at, slo_class)`` (version 2)
    Per SLO class, how many requests met their TTFT and TPOT objectives out of how many were
    measured, over the sampling period ending at ``at``.
``scaling_decisions(id)`` (version 2)
    The autoscaler's decisions per pool: current and desired replicas, the reasons, and whether
    the decision was applied or the error that stopped it.

The series tables are pruned by age (:meth:`Ledger.prune_samples`); usage totals never are.

A push's row and all its usage go in one ``BEGIN IMMEDIATE`` transaction, so a push is either
counted whole or not at all, and a retried push is never counted twice. The database runs in
WAL mode with ``synchronous=FULL``: an acknowledged push survives a crash or power loss, since
the agent drops usage once the controller has acknowledged it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from runtime.protocol import UsageDelta

__all__ = [
    "HOUR_S",
    "Ledger",
    "LedgerError",
    "PoolSample",
    "ScalingDecision",
    "SloSample",
    "UsageRow",
    "UsageTotals",
    "hour_start",
    "month_bounds",
]

HOUR_S = 3600
SCHEMA_VERSION = 2
GroupBy = Literal["hour", "pool"]

# Version 1, as first shipped. ``IF NOT EXISTS`` because before version 2 this script ran on
# every open; a file at version 0 is new (or empty).
_SCHEMA_V1 = """
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

# Version 2: the dashboard's series. Keyed by time first, so a window is one range scan and the
# age prune deletes from the front of the tree.
_SCHEMA_V2 = """
CREATE TABLE pool_samples (
    at REAL NOT NULL,
    pool TEXT NOT NULL,
    replicas INTEGER NOT NULL,
    desired INTEGER NOT NULL,
    queued INTEGER NOT NULL,
    running INTEGER NOT NULL,
    PRIMARY KEY (at, pool)
) WITHOUT ROWID;
CREATE TABLE slo_samples (
    at REAL NOT NULL,
    slo_class TEXT NOT NULL,
    ttft_met INTEGER NOT NULL,
    ttft_total INTEGER NOT NULL,
    tpot_met INTEGER NOT NULL,
    tpot_total INTEGER NOT NULL,
    PRIMARY KEY (at, slo_class)
) WITHOUT ROWID;
CREATE TABLE scaling_decisions (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    pool TEXT NOT NULL,
    current INTEGER NOT NULL,
    desired INTEGER NOT NULL,
    reasons TEXT NOT NULL,
    applied INTEGER NOT NULL,
    error TEXT
);
CREATE INDEX scaling_decisions_at ON scaling_decisions (at);
"""

# _MIGRATIONS[n] takes a ledger file from version n to version n + 1.
_MIGRATIONS = (_SCHEMA_V1, _SCHEMA_V2)
assert len(_MIGRATIONS) == SCHEMA_VERSION

_COLUMNS = "requests, prompt_tokens, completion_tokens, accelerator_seconds, usd"
_ADD_ON_CONFLICT = ", ".join(f"{c} = {c} + excluded.{c}" for c in _COLUMNS.split(", "))
_SUMS = ", ".join(f"SUM({c})" for c in _COLUMNS.split(", "))


class LedgerError(RuntimeError):
    """The ledger file cannot be used (not SQLite, a newer schema, unwritable)."""


@dataclass(frozen=True, slots=True)
class UsageTotals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    accelerator_seconds: float = 0.0
    usd: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def accelerator_hours(self) -> float:
        return self.accelerator_seconds / HOUR_S

    def to_json(self) -> dict[str, float | int]:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "accelerator_seconds": self.accelerator_seconds,
            "usd": self.usd,
        }


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Totals of one tenant, optionally for one pool and/or one UTC hour."""

    tenant: str
    totals: UsageTotals
    pool: str | None = None
    hour: int | None = None


@dataclass(frozen=True, slots=True)
class PoolSample:
    """One pool at one instant: replicas ready and desired, requests queued and running."""

    replicas: int
    desired: int
    queued: int
    running: int

    def __post_init__(self) -> None:
        _require_counts(self, ("replicas", "desired", "queued", "running"))


@dataclass(frozen=True, slots=True)
class SloSample:
    """One SLO class over one sampling period: requests that met the TTFT and TPOT objectives
    out of those measured."""

    ttft_met: int
    ttft_total: int
    tpot_met: int
    tpot_total: int

    def __post_init__(self) -> None:
        _require_counts(self, ("ttft_met", "ttft_total", "tpot_met", "tpot_total"))
        if self.ttft_met > self.ttft_total or self.tpot_met > self.tpot_total:
            raise ValueError(f"more requests met the objective than were measured: {self}")


@dataclass(frozen=True, slots=True)
class ScalingDecision:
    """One autoscaler decision for one pool, as recorded."""

    at: float
    pool: str
    current: int
    desired: int
    reasons: tuple[str, ...]
    applied: bool
    error: str | None

    def __post_init__(self) -> None:
        _require_counts(self, ("current", "desired"))
        if not all(isinstance(reason, str) for reason in self.reasons):
            raise TypeError(f"reasons must be strings, got {self.reasons!r}")


def _require_counts(sample: object, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(sample, name)
        # bool is an int, but True replicas is a caller's bug, not a count.
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def hour_start(t: float) -> int:
    """Start of the UTC hour holding ``t`` (epoch seconds)."""
    return int(t // HOUR_S) * HOUR_S


def month_bounds(t: float) -> tuple[int, int]:
    """Start and end (exclusive) of the UTC calendar month holding ``t``, epoch seconds."""
    moment = datetime.fromtimestamp(t, UTC)
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    if moment.month == 12:
        end = datetime(moment.year + 1, 1, 1, tzinfo=UTC)
    else:
        end = datetime(moment.year, moment.month + 1, 1, tzinfo=UTC)
    return int(start.timestamp()), int(end.timestamp())


class Ledger:
    """The SQLite usage ledger. Not thread-safe: use it from one thread at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
            self._db = sqlite3.connect(self.path, isolation_level=None)
        except sqlite3.Error as error:
            raise LedgerError(f"{self.path}: cannot open the ledger: {error}") from None
        try:
            self._db.execute("PRAGMA busy_timeout = 5000")
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise LedgerError(f"{self.path}: cannot switch the ledger to WAL mode ({mode})")
            self._db.execute("PRAGMA synchronous = FULL")
            if self._schema_version() != SCHEMA_VERSION:
                self._migrate()
        except sqlite3.Error as error:
            self._db.close()
            raise LedgerError(f"{self.path}: not a usable ledger: {error}") from None
        except LedgerError:
            self._db.close()
            raise

    def _schema_version(self) -> int:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"{self.path}: ledger schema version {version} is newer than this "
                f"controller's ({SCHEMA_VERSION})"
            )
        return version

    def _migrate(self) -> None:
        """Bring the file to :data:`SCHEMA_VERSION`, one version at a time, in one transaction:
        a failure leaves the file at its old version with its data, never half-migrated."""
        with self._transaction():
            # Read again under the write lock: another process may have migrated meanwhile.
            for version in range(self._schema_version(), SCHEMA_VERSION):
                # Statement by statement: executescript() would commit the transaction first.
                for statement in _MIGRATIONS[version].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back if the body raises."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------
    # Writing

    def record_push(
        self,
        *,
        agent_id: str,
        boot_id: str,
        seq: int,
        instance_id: str,
        pool: str,
        sent_at: float,
        received_at: float,
        usage: Sequence[UsageDelta],
    ) -> bool:
        """Record one push and its usage; False (and nothing written) if it is a duplicate."""
        for delta in usage:
            if delta.hour % HOUR_S:
                raise ValueError(f"usage hour {delta.hour} is not the start of an hour")
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            (latest,) = db.execute(
                "SELECT MAX(seq) FROM pushes WHERE agent_id = ? AND boot_id = ?",
                (agent_id, boot_id),
            ).fetchone()
            if latest is not None and seq <= latest:
                db.execute("ROLLBACK")
                return False
            db.execute(
                "INSERT INTO pushes (agent_id, boot_id, seq, instance_id, pool, sent_at, "
                "received_at, usage_rows) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (agent_id, boot_id, seq, instance_id, pool, sent_at, received_at, len(usage)),
            )
            for delta in usage:
                values = (
                    delta.requests,
                    delta.prompt_tokens,
                    delta.completion_tokens,
                    delta.accelerator_seconds,
                    delta.usd,
                )
                db.execute(
                    f"INSERT INTO usage_hourly (tenant, pool, hour, {_COLUMNS}) "
                    f"VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                    f"ON CONFLICT (tenant, pool, hour) DO UPDATE SET {_ADD_ON_CONFLICT}",
                    (delta.tenant, pool, delta.hour, *values),
                )
                db.execute(
                    f"INSERT INTO usage_monthly (tenant, month, {_COLUMNS}) "
                    f"VALUES (?, ?, ?, ?, ?, ?, ?) "
                    f"ON CONFLICT (month, tenant) DO UPDATE SET {_ADD_ON_CONFLICT}",
                    (delta.tenant, month_bounds(delta.hour)[0], *values),
                )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return True

    def prune_pushes(self, before: float) -> int:
        """Forget pushes received before ``before``, except each agent process's newest one
        (which duplicate detection reads). Usage totals are not touched. Returns rows removed."""
        cursor = self._db.execute(
            "DELETE FROM pushes WHERE received_at < ? AND seq < ("
            "SELECT MAX(p.seq) FROM pushes AS p "
            "WHERE p.agent_id = pushes.agent_id AND p.boot_id = pushes.boot_id)",
            (before,),
        )
        return cursor.rowcount

    def record_pool_samples(self, at: float, samples: Mapping[str, PoolSample]) -> None:
        """Record every pool's sample taken at ``at`` (epoch seconds), all or none. A second
        sample of the same pool at the same instant replaces the first."""
        rows = [
            (at, pool, s.replicas, s.desired, s.queued, s.running)
            for pool, s in sorted(samples.items())
        ]
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO pool_samples (at, pool, replicas, desired, queued, running) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (at, pool) DO UPDATE SET "
                "replicas = excluded.replicas, desired = excluded.desired, "
                "queued = excluded.queued, running = excluded.running",
                rows,
            )

    def record_slo_samples(self, at: float, samples: Mapping[str, SloSample]) -> None:
        """Record every SLO class's counts over the period ending at ``at``, all or none. A
        second sample of the same class at the same instant replaces the first."""
        rows = [
            (at, name, s.ttft_met, s.ttft_total, s.tpot_met, s.tpot_total)
            for name, s in sorted(samples.items())
        ]
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO slo_samples (at, slo_class, ttft_met, ttft_total, tpot_met, "
                "tpot_total) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (at, slo_class) DO UPDATE "
                "SET ttft_met = excluded.ttft_met, ttft_total = excluded.ttft_total, "
                "tpot_met = excluded.tpot_met, tpot_total = excluded.tpot_total",
                rows,
            )

    def record_decision(
        self,
        at: float,
        pool: str,
        current: int,
        desired: int,
        reasons: Sequence[str],
        applied: bool,
        error: str | None,
    ) -> int:
        """Record one scaling decision for ``pool``; returns its id (ids grow with each call)."""
        if isinstance(reasons, str):
            # A bare string is a sequence of characters; storing it so is never what was meant.
            raise TypeError("reasons must be a sequence of strings, not one string")
        decision = ScalingDecision(at, pool, current, desired, tuple(reasons), applied, error)
        cursor = self._db.execute(
            "INSERT INTO scaling_decisions (at, pool, current, desired, reasons, applied, error) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                decision.at,
                decision.pool,
                decision.current,
                decision.desired,
                json.dumps(decision.reasons),
                decision.applied,
                decision.error,
            ),
        )
        return int(cursor.lastrowid or 0)

    def prune_samples(self, before: float) -> int:
        """Forget pool and SLO samples and scaling decisions from before ``before``. Returns the
        number of rows removed."""
        removed = 0
        with self._transaction() as db:
            for table in ("pool_samples", "slo_samples", "scaling_decisions"):
                removed += db.execute(f"DELETE FROM {table} WHERE at < ?", (before,)).rowcount
        return removed

    # ----------------------------------------------------------------------------------------
    # Reading

    def month_totals(self, now: float) -> dict[str, UsageTotals]:
        """Each tenant's usage in the UTC calendar month holding ``now``."""
        month, _ = month_bounds(now)
        rows = self._db.execute(
            f"SELECT tenant, {_COLUMNS} FROM usage_monthly WHERE month = ? ORDER BY tenant",
            (month,),
        ).fetchall()
        return {row[0]: _totals(row[1:]) for row in rows}

    def fleet_month_usd(self, now: float) -> float:
        """USD spent by the whole fleet in the UTC calendar month holding ``now``."""
        month, _ = month_bounds(now)
        (usd,) = self._db.execute(
            "SELECT COALESCE(SUM(usd), 0.0) FROM usage_monthly WHERE month = ?", (month,)
        ).fetchone()
        return float(usd)

    def usage(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        tenants: Iterable[str] | None = None,
        group_by: Iterable[GroupBy] = (),
    ) -> list[UsageRow]:
        """Usage per tenant (and per pool and/or hour when grouped by them) over the hours that
        overlap ``[since, until)``; the resolution is one hour. Rows are sorted by tenant, pool,
        hour. ``tenants`` limits the result to those tenants."""
        keys = ["tenant", *(k for k in ("pool", "hour") if k in set(group_by))]
        where: list[str] = []
        params: list[object] = []
        if since is not None:
            where.append("hour > ?")  # the hour [hour, hour + 1h) ends after `since`
            params.append(since - HOUR_S)
        if until is not None:
            where.append("hour < ?")
            params.append(until)
        if tenants is not None:
            names = sorted(set(tenants))
            if not names:
                return []
            where.append(f"tenant IN ({', '.join('?' for _ in names)})")
            params.extend(names)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        columns = ", ".join(keys)
        rows = self._db.execute(
            f"SELECT {columns}, {_SUMS} FROM usage_hourly {clause} "
            f"GROUP BY {columns} ORDER BY {columns}",
            params,
        ).fetchall()
        out: list[UsageRow] = []
        for row in rows:
            named = dict(zip(keys, row[: len(keys)], strict=True))
            out.append(
                UsageRow(
                    tenant=named["tenant"],
                    pool=named.get("pool"),
                    hour=named.get("hour"),
                    totals=_totals(row[len(keys) :]),
                )
            )
        return out

    def hourly_rows(self, since: float | None = None, until: float | None = None) -> list[UsageRow]:
        """Rows per tenant, pool and hour over the hours overlapping ``[since, until)``."""
        return self.usage(since=since, until=until, group_by=("pool", "hour"))

    def push_count(self) -> int:
        (count,) = self._db.execute("SELECT COUNT(*) FROM pushes").fetchone()
        return int(count)

    def pool_samples(
        self, since: float | None = None, until: float | None = None
    ) -> list[tuple[float, str, PoolSample]]:
        """Pool samples taken in ``[since, until)``, as ``(at, pool, sample)`` in time order
        (then by pool)."""
        clause, params = _time_range(since, until)
        rows = self._db.execute(
            f"SELECT at, pool, replicas, desired, queued, running FROM pool_samples {clause} "
            "ORDER BY at, pool",
            params,
        ).fetchall()
        return [(float(r[0]), str(r[1]), PoolSample(*r[2:])) for r in rows]

    def slo_samples(
        self, since: float | None = None, until: float | None = None
    ) -> list[tuple[float, str, SloSample]]:
        """SLO samples taken in ``[since, until)``, as ``(at, slo_class, sample)`` in time
        order (then by class)."""
        clause, params = _time_range(since, until)
        rows = self._db.execute(
            f"SELECT at, slo_class, ttft_met, ttft_total, tpot_met, tpot_total FROM slo_samples "
            f"{clause} ORDER BY at, slo_class",
            params,
        ).fetchall()
        return [(float(r[0]), str(r[1]), SloSample(*r[2:])) for r in rows]

    def recent_decisions(self, limit: int = 50) -> list[ScalingDecision]:
        """The ``limit`` latest scaling decisions, newest first."""
        if limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        rows = self._db.execute(
            "SELECT at, pool, current, desired, reasons, applied, error FROM scaling_decisions "
            "ORDER BY at DESC, id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [
            ScalingDecision(
                at=float(at),
                pool=str(pool),
                current=int(current),
                desired=int(desired),
                reasons=tuple(json.loads(reasons)),
                applied=bool(applied),
                error=error,
            )
            for at, pool, current, desired, reasons, applied, error in rows
        ]


def _time_range(since: float | None, until: float | None) -> tuple[str, list[float]]:
    """``WHERE`` clause and parameters selecting ``at`` in ``[since, until)``."""
    where: list[str] = []
    params: list[float] = []
    if since is not None:
        where.append("at >= ?")
        params.append(since)
    if until is not None:
        where.append("at < ?")
        params.append(until)
    return (f"WHERE {' AND '.join(where)}" if where else ""), params


def _totals(values: Sequence[object]) -> UsageTotals:
    requests, prompt, completion, seconds, usd = values
    return UsageTotals(
        requests=int(requests or 0),  # type: ignore[call-overload]
        prompt_tokens=int(prompt or 0),  # type: ignore[call-overload]
        completion_tokens=int(completion or 0),  # type: ignore[call-overload]
        accelerator_seconds=float(seconds or 0.0),  # type: ignore[arg-type]
        usd=float(usd or 0.0),  # type: ignore[arg-type]
    )
