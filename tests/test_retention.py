"""Retention against a real PostgreSQL with an injected clock: anonymise after
the account's window, delete after the purge window, drop whole old day
partitions, age out the audit log, and be idempotent and safe under load."""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from typing import Any

import asyncpg

from router.accounts import create_account
from router.store.retention import RetentionTask, run_retention, truncate_destination

UTC = dt.UTC
DAY = dt.timedelta(days=1)


async def add_row(
    pool: asyncpg.Pool,
    account_id: int,
    accepted_at: dt.datetime,
    *,
    destination: str | None = "4512345678",
    source: str | None = "Acme",
    body: str | None = "hello there",
    userref: str | None = "ref-1",
    cls: str = "standard",
    msg_id: str | None = None,
) -> str:
    msg_id = msg_id or secrets.token_hex(10)
    await pool.execute(
        "INSERT INTO traffic_log (id, account_id, class, ingress, source, destination, country,"
        " carrier, parts, data_coding, body, userref, accepted_at)"
        " VALUES ($1, $2, $3, 'http', $4, $5, 'DK', 'sim-eu', 1, 0, $6, $7, $8)",
        msg_id,
        account_id,
        cls,
        source,
        destination,
        body,
        userref,
        accepted_at,
    )
    return msg_id


async def add_event(
    pool: asyncpg.Pool, msg_id: str, account_id: int, at: dt.datetime, status: str = "delivered"
) -> None:
    await pool.execute(
        "INSERT INTO delivery_events (message_id, account_id, status, carrier, at)"
        " VALUES ($1, $2, $3, 'sim-eu', $4)",
        msg_id,
        account_id,
        status,
        at,
    )


async def row(pool: asyncpg.Pool, msg_id: str) -> Any:
    return await pool.fetchrow("SELECT * FROM traffic_log WHERE id = $1", msg_id)


def test_truncation_keeps_the_first_half_of_the_digits() -> None:
    assert truncate_destination("4512345678") == "45123"  # privacy.md 3's example
    assert truncate_destination("14155552671") == "14155"  # odd: floor(11 / 2) = 5
    assert truncate_destination("") == ""


async def test_old_rows_are_anonymised_exactly_and_fresh_rows_untouched(db: asyncpg.Pool) -> None:
    now = dt.datetime.now(UTC).replace(microsecond=0)
    acct = await create_account(db, "shop")
    old = await add_row(db, acct, now - 31 * DAY)
    odd = await add_row(db, acct, now - 31 * DAY, destination="14155552671")
    secret = await add_row(
        db,
        acct,
        now - 31 * DAY,
        destination=None,
        source=None,
        body=None,
        userref=None,
        cls="secret",
    )
    fresh = await add_row(db, acct, now - DAY)
    edge = await add_row(db, acct, now - 30 * DAY + dt.timedelta(hours=2))

    report = await run_retention(db, now)
    assert report.anonymised == 3
    r = await row(db, old)
    assert (r["destination"], r["source"], r["body"], r["userref"]) == ("45123", None, None, None)
    assert r["anonymised_at"] == now
    # What statistics and invoices need stays.
    assert (r["country"], r["carrier"], r["parts"], r["class"]) == ("DK", "sim-eu", 1, "standard")
    assert r["accepted_at"] == now - 31 * DAY
    assert (await row(db, odd))["destination"] == "14155"
    s = await row(db, secret)
    assert s["destination"] is None and s["anonymised_at"] == now
    for untouched in (fresh, edge):
        f = await row(db, untouched)
        assert (f["destination"], f["source"], f["body"], f["userref"]) == (
            "4512345678",
            "Acme",
            "hello there",
            "ref-1",
        )
        assert f["anonymised_at"] is None

    # Idempotent: a second pass (even later) changes nothing already done.
    again = await run_retention(db, now + dt.timedelta(hours=1))
    assert again.anonymised == 0
    r2 = await row(db, old)
    assert r2["destination"] == "45123" and r2["anonymised_at"] == now


async def test_windows_are_per_account_and_orphans_get_defaults(db: asyncpg.Pool) -> None:
    now = dt.datetime.now(UTC)
    short = await create_account(db, "short")
    await db.execute("UPDATE accounts SET retention_days = 7 WHERE id = $1", short)
    normal = await create_account(db, "normal")
    s = await add_row(db, short, now - 8 * DAY)
    n = await add_row(db, normal, now - 8 * DAY)
    orphan_old = await add_row(db, 999_999, now - 31 * DAY)
    orphan_new = await add_row(db, 999_999, now - 8 * DAY)
    await run_retention(db, now)
    assert (await row(db, s))["anonymised_at"] is not None
    assert (await row(db, n))["anonymised_at"] is None
    assert (await row(db, orphan_old))["destination"] == "45123"
    assert (await row(db, orphan_new))["anonymised_at"] is None


async def test_rows_and_events_are_deleted_after_the_purge_window(db: asyncpg.Pool) -> None:
    now = dt.datetime.now(UTC)
    quick = await create_account(db, "quick")
    await db.execute("UPDATE accounts SET purge_days = 60 WHERE id = $1", quick)
    default = await create_account(db, "default")
    gone = await add_row(db, quick, now - 61 * DAY)
    await add_event(db, gone, quick, now - 61 * DAY + dt.timedelta(seconds=3))
    kept = await add_row(db, quick, now - 31 * DAY)
    await add_event(db, kept, quick, now - 31 * DAY)
    long_kept = await add_row(db, default, now - 61 * DAY)

    report = await run_retention(db, now)
    assert report.purged_messages == 1 and report.purged_events == 1
    assert await row(db, gone) is None
    assert not await db.fetchval("SELECT count(*) FROM delivery_events WHERE message_id = $1", gone)
    assert (await row(db, kept))["destination"] == "45123"  # anonymised, not deleted
    assert (await row(db, long_kept))["destination"] == "45123"

    # With the clock past the default 395 days, everything goes.
    later = await run_retention(db, now + 400 * DAY)
    assert later.purged_messages == 2
    assert await db.fetchval("SELECT count(*) FROM traffic_log") == 0
    assert await db.fetchval("SELECT count(*) FROM delivery_events") == 0


async def test_old_day_partitions_are_dropped_young_ones_kept(db: asyncpg.Pool) -> None:
    now = dt.datetime.now(UTC)
    acct = await create_account(db, "parts")
    old_day = (now - 500 * DAY).date()
    young_day = (now - 10 * DAY).date()
    names = []
    for day in (old_day, young_day):
        for table in ("traffic_log", "delivery_events"):
            name = f"{table}_{day:%Y%m%d}"
            names.append(name)
            await db.execute(
                f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} FOR VALUES"
                f" FROM ('{day.isoformat()}') TO ('{(day + DAY).isoformat()}')"
            )
    old_ts = dt.datetime.combine(old_day, dt.time(12), UTC)
    old_id = await add_row(db, acct, old_ts)
    await add_event(db, old_id, acct, old_ts)
    young_id = await add_row(db, acct, dt.datetime.combine(young_day, dt.time(12), UTC))

    report = await run_retention(db, now)
    old_parts = [f"traffic_log_{old_day:%Y%m%d}", f"delivery_events_{old_day:%Y%m%d}"]
    assert sorted(report.dropped_partitions) == sorted(old_parts)
    existing = {
        r["relname"]
        for r in await db.fetch(
            "SELECT relname FROM pg_class WHERE relname = ANY($1::text[])", names
        )
    }
    assert existing == set(names) - set(old_parts)
    assert await row(db, old_id) is None
    assert (await row(db, young_id))["anonymised_at"] is None
    assert (await run_retention(db, now)).dropped_partitions == []


async def test_audit_rows_are_kept_two_years_then_deleted(db: asyncpg.Pool) -> None:
    now = dt.datetime.now(UTC)
    actor = f"test:{secrets.token_hex(4)}"
    for age in (2 * 365 + 10, 2 * 365 - 10, 1):
        await db.execute(
            "INSERT INTO audit_log (at, actor, action) VALUES ($1, $2, $3)",
            now - age * DAY,
            actor,
            f"age-{age}",
        )
    report = await run_retention(db, now)
    assert report.audit_deleted >= 1
    left = {
        r["action"] for r in await db.fetch("SELECT action FROM audit_log WHERE actor = $1", actor)
    }
    assert left == {f"age-{2 * 365 - 10}", "age-1"}
    # A clock running ahead cannot make retention fight the table's trigger.
    await run_retention(db, now + 365 * DAY)
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE actor = $1", actor) == 2


async def test_batches_are_safe_under_concurrent_inserts(db: asyncpg.Pool) -> None:
    now = dt.datetime.now(UTC)
    acct = await create_account(db, "busy")
    await db.executemany(
        "INSERT INTO traffic_log (id, account_id, class, ingress, source, destination, country,"
        " parts, data_coding, body, accepted_at) VALUES ($1, $2, 'standard', 'smpp', 'A',"
        " '4512345678', 'DK', 1, 0, 'x', $3)",
        [(f"old{i:05d}", acct, now - 40 * DAY + dt.timedelta(seconds=i)) for i in range(2000)],
    )

    async def writer() -> None:
        for i in range(20):
            await db.executemany(
                "INSERT INTO traffic_log (id, account_id, class, ingress, destination, country,"
                " parts, data_coding, body, accepted_at) VALUES ($1, $2, 'standard', 'http',"
                " '4512345678', 'DK', 1, 0, 'y', $3)",
                [(f"new{i:02d}{j:03d}", acct, now) for j in range(50)],
            )
            await asyncio.sleep(0)

    report, _ = await asyncio.gather(run_retention(db, now, batch=97), writer())
    assert report.anonymised == 2000
    counts = await db.fetchrow(
        "SELECT count(*) FILTER (WHERE anonymised_at IS NOT NULL AND destination = '45123') AS a,"
        " count(*) FILTER (WHERE anonymised_at IS NULL AND destination = '4512345678') AS f"
        " FROM traffic_log"
    )
    assert (counts["a"], counts["f"]) == (2000, 1000)


async def test_only_one_run_at_a_time(db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", 0x534D5254)
        try:
            report = await run_retention(db, dt.datetime.now(UTC))
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", 0x534D5254)
    assert report.skipped


async def test_retention_task_runs_periodically_with_its_clock(db: asyncpg.Pool) -> None:
    fake_now = dt.datetime.now(UTC) + 40 * DAY
    acct = await create_account(db, "task")
    msg = await add_row(db, acct, dt.datetime.now(UTC))
    task = RetentionTask(db, interval=0.05, first_delay=0, clock=lambda: fake_now)
    task.start()
    try:
        for _ in range(100):
            if task.last is not None:
                break
            await asyncio.sleep(0.02)
    finally:
        await task.stop()
    assert task.last is not None and task.last.anonymised == 1
    assert (await row(db, msg))["anonymised_at"] == fake_now


async def test_receipt_routes_whose_receipt_never_came_are_deleted_after_8_days(
    db: asyncpg.Pool,
) -> None:
    """A lost receipt left its route (standard messages: with both addresses)
    for good; now it goes after ROUTE_KEEP."""
    now = dt.datetime(2026, 6, 15, 12, tzinfo=UTC)
    for carrier_id, age in (
        ("old", 9 * DAY),
        ("edge", 8 * DAY - dt.timedelta(minutes=1)),
        ("fresh", DAY),
    ):
        await db.execute(
            "INSERT INTO receipt_routes (carrier, carrier_id, message_id, part, parts,"
            " account_id, account, origin, class, country, registered_delivery, accepted_at,"
            " info, created_at) VALUES ('sim-eu', $1, $2, 0, 1, 1, 'acme', 'smpp', 'standard',"
            " 'DK', 1, $3, '{\"destination\": \"4512345678\"}', $3)",
            carrier_id,
            f"msg-{carrier_id}",
            now - age,
        )
    report = await run_retention(db, now)
    assert report.receipt_routes_expired == 1
    left = await db.fetch("SELECT carrier_id FROM receipt_routes ORDER BY carrier_id")
    assert [r["carrier_id"] for r in left] == ["edge", "fresh"]
    assert (await run_retention(db, now)).receipt_routes_expired == 0


async def test_receipts_for_customers_nobody_took_are_deleted_once_expired(
    db: asyncpg.Pool,
) -> None:
    """A receipt parked at a clean stop for a node that never came back (and
    no node to adopt it) holds a handset number: it goes once expired."""
    now = dt.datetime(2026, 6, 15, 12, tzinfo=UTC)
    for node, expires in (
        ("gone", now - dt.timedelta(minutes=1)),
        ("gone", now + dt.timedelta(minutes=1)),
        ("live", now - DAY),
    ):
        await db.execute(
            "INSERT INTO receipt_handoff (node, account_id, pdu, expires_at)"
            " VALUES ($1, 1, '\\x00'::bytea, $2)",
            node,
            expires,
        )
    report = await run_retention(db, now)
    assert report.receipt_handoff_expired == 2
    left = await db.fetch("SELECT node, expires_at FROM receipt_handoff")
    assert [(r["node"], r["expires_at"]) for r in left] == [("gone", now + dt.timedelta(minutes=1))]
    assert (await run_retention(db, now)).receipt_handoff_expired == 0


async def test_routers_starting_together_create_each_partition_once_quietly(
    db: asyncpg.Pool,
) -> None:
    """Sibling workers start at the same moment: CREATE TABLE IF NOT EXISTS
    races in the catalog (DuplicateTableError / UniqueViolation); the loser
    must take the partition as made, not warn that it could not make it."""
    from structlog.testing import capture_logs

    from router.store.trafficlog import ensure_partitions

    day = dt.date(2031, 1, 1) + dt.timedelta(days=secrets.randbelow(3000))
    conns = [await db.acquire() for _ in range(4)]
    try:
        with capture_logs() as logs:
            await asyncio.gather(*(ensure_partitions(c, day, days=2) for c in conns))
    finally:
        for c in conns:
            await db.release(c)
    names = {
        f"{t}_{d:%Y%m%d}"
        for t in ("traffic_log", "delivery_events")
        for d in (day, day + dt.timedelta(days=1))
    }
    found = await db.fetchval(
        "SELECT count(*) FROM pg_class WHERE relname = ANY($1::text[])", list(names)
    )
    assert found == len(names)
    assert [e for e in logs if e["event"] == "partition_not_created"] == []
    for name in names:
        await db.execute(f"DROP TABLE {name}")
