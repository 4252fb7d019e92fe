"""Retention: anonymise, then delete, traffic-log rows; age out the audit log.

Per account (privacy.md 3; columns accounts.retention_days / purge_days):

* rows older than ``retention_days`` are anonymised in place: the
  destination keeps its first ``floor(n / 2)`` digits (``4512345678`` ->
  ``45123``; an odd 11 digits keep 5), source, body and userref become NULL,
  ``anonymised_at`` is set. Country, carrier, parts, status and timestamps
  stay, so statistics and invoices still add up;
* rows (and delivery events) older than ``purge_days`` are deleted; whole
  daily partitions ``traffic_log_YYYYMMDD`` / ``delivery_events_YYYYMMDD``
  older than the longest purge window of any account are dropped;
* audit_log rows older than 2 years are deleted (the table's trigger
  refuses anything younger);
* receipt_routes rows (carrier id -> message, with the addresses of
  standard messages) older than ``ROUTE_KEEP`` (8 days) are deleted: the
  carrier's receipt never came and will not now (SMSCs keep a message at
  most its validity period, 7 days at the longest of the usual maxima).
  Without this, every lost receipt left its row, personal data included,
  for good;
* receipt_handoff rows (receipts for an SMPP customer, with the handset's
  number) past their ``expires_at`` (``smpp.receipt_retention`` after the
  receipt): normally a node takes a row within seconds, but one parked at a
  clean stop for a node that never starts again, with no other node to
  adopt it, would otherwise stay for good.

Rows of an account that no longer exists get the defaults (30 / 395 days).

Work goes partition by partition in batches (``ctid = ANY(ARRAY(SELECT
ctid ... LIMIT n))``), one short transaction each, so the traffic-log
writer's COPY never waits long. A row changed concurrently is skipped by
the batch and taken by the next one or the next run; every statement
re-checks ``anonymised_at IS NULL``, so a run is idempotent. One node runs
it at a time (advisory lock). Time is injected (``now``).

It must never log or return a number, a sender or a text: only counts.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg
import structlog

from ..tasks import Periodic
from .db import holds_session_state

log = structlog.get_logger("router.retention")

DEFAULT_RETENTION_DAYS = 30
DEFAULT_PURGE_DAYS = 395
ROUTE_KEEP = dt.timedelta(days=8)
AUDIT_KEEP = "2 years"  # must match the audit_log_append_only() trigger
# Partition bounds are written as dates in the writer's session time zone
# (UTC-12 .. UTC+14), so a day's real bounds may sit up to 14 h either side
# of its name: allow a whole day of slack.
_TZ_SLACK = dt.timedelta(days=1)
_LOCK_KEY = 0x534D5254  # "SMRT": one retention run at a time across nodes
_DAY_PARTITION = re.compile(r"^(traffic_log|delivery_events)_(\d{8})$")

# SQL that anonymises one row; the same rule as truncate_destination().
ANONYMISE_SET = (
    "destination = left(destination, length(destination) / 2),"
    " source = NULL, body = NULL, userref = NULL, anonymised_at = $1"
)


def truncate_destination(digits: str) -> str:
    """What anonymisation leaves of a destination: its first floor(n/2) digits."""
    return digits[: len(digits) // 2]


@dataclass(slots=True)
class RetentionReport:
    anonymised: int = 0
    purged_messages: int = 0
    purged_events: int = 0
    audit_deleted: int = 0
    receipt_routes_expired: int = 0
    receipt_handoff_expired: int = 0
    dropped_partitions: list[str] = field(default_factory=list)
    skipped: bool = False  # another node held the retention lock

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _partition_day(name: str) -> dt.date | None:
    m = _DAY_PARTITION.match(name)
    if not m:
        return None
    try:
        return dt.datetime.strptime(m.group(2), "%Y%m%d").date()
    except ValueError:
        return None


def _young(name: str, cutoff: dt.datetime) -> bool:
    """True if a day partition holds only rows at or after ``cutoff``."""
    day = _partition_day(name)
    if day is None:
        return False
    start = dt.datetime.combine(day, dt.time(), dt.UTC)
    return start - _TZ_SLACK >= cutoff


async def _partitions(conn: asyncpg.Connection | asyncpg.Pool, parent: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = $1::regclass ORDER BY c.relname",
        parent,
    )
    return [r["relname"] for r in rows]


async def _batched(pool: asyncpg.Pool, sql: str, *args: Any, batch: int) -> int:
    """Run a ``... LIMIT $n`` batch statement until it touches fewer than ``batch`` rows."""
    total = 0
    while True:
        status = await pool.execute(sql, *args, batch)
        n = int(status.rsplit(" ", 1)[-1])
        total += n
        if n < batch:
            return total


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def run_retention(
    pool: asyncpg.Pool, now: dt.datetime, batch: int = 10_000
) -> RetentionReport:
    """One pass of every retention rule as of ``now`` (timezone-aware)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    report = RetentionReport()
    async with pool.acquire() as lock_conn:
        holds_session_state(lock_conn)
        if not await lock_conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
            report.skipped = True
            return report
        try:
            await _run(pool, now, batch, report)
        finally:
            await lock_conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    log.info(
        "retention_done",
        **{k: v for k, v in report.as_dict().items() if k != "dropped_partitions"},
        dropped_partitions=len(report.dropped_partitions),
    )
    return report


async def _run(pool: asyncpg.Pool, now: dt.datetime, batch: int, report: RetentionReport) -> None:
    policy = await pool.fetchrow(
        "SELECT min(retention_days) AS min_ret, min(purge_days) AS min_purge,"
        " max(purge_days) AS max_purge FROM accounts"
    )
    assert policy is not None
    min_ret = min(policy["min_ret"] or DEFAULT_RETENTION_DAYS, DEFAULT_RETENTION_DAYS)
    min_purge = min(policy["min_purge"] or DEFAULT_PURGE_DAYS, DEFAULT_PURGE_DAYS)
    # Whole days go only once every existing account's window has passed
    # (rows of deleted accounts have no one to keep them for).
    max_purge = policy["max_purge"] or DEFAULT_PURGE_DAYS
    drop_before = now - dt.timedelta(days=max_purge)

    # 1. Whole days that every account's purge window has passed.
    for parent in ("traffic_log", "delivery_events"):
        for name in await _partitions(pool, parent):
            day = _partition_day(name)
            if day is None or not name.startswith(parent + "_"):
                continue
            end = dt.datetime.combine(day, dt.time(), dt.UTC) + dt.timedelta(days=1)
            if end + _TZ_SLACK > drop_before:
                continue
            try:
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute("SET LOCAL lock_timeout = '5s'")
                    await conn.execute(f"DROP TABLE IF EXISTS {_ident(name)}")
                report.dropped_partitions.append(name)
            except asyncpg.LockNotAvailableError:
                log.warning("retention_partition_busy", table=name)

    # 2. Row by row where partitions could not go whole. The constant bound
    #    ($2: the shortest window of any account) lets the planner use the
    #    indexes; the per-account bound decides.
    purge_cutoff = now - dt.timedelta(days=min_purge)
    for part in await _partitions(pool, "traffic_log"):
        if _young(part, purge_cutoff):
            continue
        report.purged_messages += await _batched(
            pool,
            f"DELETE FROM {_ident(part)} WHERE ctid = ANY(ARRAY("
            f" SELECT t.ctid FROM {_ident(part)} t LEFT JOIN accounts a ON a.id = t.account_id"
            f" WHERE t.accepted_at < $2 AND t.accepted_at < $1::timestamptz"
            f"  - make_interval(days => coalesce(a.purge_days, {DEFAULT_PURGE_DAYS}))"
            f" LIMIT $3))",
            now,
            purge_cutoff,
            batch=batch,
        )
    for part in await _partitions(pool, "delivery_events"):
        if _young(part, purge_cutoff):
            continue
        report.purged_events += await _batched(
            pool,
            f"DELETE FROM {_ident(part)} WHERE ctid = ANY(ARRAY("
            f" SELECT e.ctid FROM {_ident(part)} e LEFT JOIN accounts a ON a.id = e.account_id"
            f" WHERE e.at < $2 AND e.at < $1::timestamptz"
            f"  - make_interval(days => coalesce(a.purge_days, {DEFAULT_PURGE_DAYS}))"
            f" LIMIT $3))",
            now,
            purge_cutoff,
            batch=batch,
        )

    # 3. Anonymise what is past its account's retention window.
    anon_cutoff = now - dt.timedelta(days=min_ret)
    for part in await _partitions(pool, "traffic_log"):
        if _young(part, anon_cutoff):
            continue
        report.anonymised += await _batched(
            pool,
            f"UPDATE {_ident(part)} SET {ANONYMISE_SET}"
            f" WHERE anonymised_at IS NULL AND ctid = ANY(ARRAY("
            f" SELECT t.ctid FROM {_ident(part)} t LEFT JOIN accounts a ON a.id = t.account_id"
            f" WHERE t.anonymised_at IS NULL AND t.accepted_at < $2"
            f" AND t.accepted_at < $1::timestamptz"
            f"  - make_interval(days => coalesce(a.retention_days, {DEFAULT_RETENTION_DAYS}))"
            f" LIMIT $3))",
            now,
            anon_cutoff,
            batch=batch,
        )

    # 4. The audit log keeps 2 years. The trigger measures from the database's
    #    clock, so never ask it to delete more than that clock allows.
    report.audit_deleted = await _batched(
        pool,
        "DELETE FROM audit_log WHERE id = ANY(ARRAY("
        f" SELECT id FROM audit_log WHERE at <= least($1::timestamptz, now())"
        f" - interval '{AUDIT_KEEP}' ORDER BY id LIMIT $2))",
        now,
        batch=batch,
    )

    # 5. Receipt routes whose receipt never came.
    report.receipt_routes_expired = await _batched(
        pool,
        "DELETE FROM receipt_routes WHERE ctid = ANY(ARRAY("
        " SELECT ctid FROM receipt_routes WHERE created_at < $1::timestamptz - $2::interval"
        " LIMIT $3))",
        now,
        ROUTE_KEEP,
        batch=batch,
    )

    # 6. Receipts for customers that nobody took before they expired.
    report.receipt_handoff_expired = await _batched(
        pool,
        "DELETE FROM receipt_handoff WHERE ctid = ANY(ARRAY("
        " SELECT ctid FROM receipt_handoff WHERE expires_at < $1::timestamptz LIMIT $2))",
        now,
        batch=batch,
    )


class RetentionTask(Periodic):
    """Runs :func:`run_retention` every ``interval`` seconds until stopped."""

    name = "retention"

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        interval: float = 3600.0,
        batch: int = 10_000,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        first_delay: float = 60.0,
    ) -> None:
        super().__init__(interval, first_delay)
        self.pool = pool
        self.batch = batch
        self.clock = clock
        self.last: RetentionReport | None = None

    async def run_once(self) -> RetentionReport:
        self.last = await run_retention(self.pool, self.clock(), self.batch)
        return self.last
