"""Queue tables are vacuumed by the router when their dead rows pile up
(router.store.vacuum), on a real PostgreSQL: this machine's server runs
with autovacuum off, where the spool and receipt_routes grew without bound."""

from __future__ import annotations

import asyncio

import asyncpg
from prometheus_client import REGISTRY

from router.config import ConfigError, parse_config
from router.store.vacuum import QueueVacuum


async def churn(db: asyncpg.Pool, rows: int, keep: int = 0) -> None:
    """Insert and delete receipt_routes rows as the router does (keep some)."""
    async with db.acquire() as conn:
        await conn.execute(
            "INSERT INTO receipt_routes (carrier, carrier_id, message_id, part, parts,"
            " account_id, account, origin, class, country, registered_delivery, accepted_at)"
            " SELECT 'vac', g::text, 'm' || g, 0, 1, 1, 'acme', 'smpp', 'standard', 'DK', 1,"
            " now() FROM generate_series(1, $1) g",
            rows,
        )
        await conn.execute(
            "DELETE FROM receipt_routes WHERE carrier = 'vac' AND carrier_id::int > $1", keep
        )
        try:  # PostgreSQL 15+: report these deletes now rather than within seconds
            await conn.execute("SELECT pg_stat_force_next_flush()")
        except asyncpg.UndefinedFunctionError:
            pass


async def stat(db: asyncpg.Pool, column: str) -> int:
    value = await db.fetchval(
        f"SELECT {column} FROM pg_stat_user_tables WHERE relname = 'receipt_routes'"
        " AND schemaname = current_schema()"
    )
    return int(value or 0)


def gauge(table: str) -> float:
    value = REGISTRY.get_sample_value("smsrouter_db_queue_dead_rows", {"table": table})
    assert value is not None, f"no smsrouter_db_queue_dead_rows for {table}"
    return value


async def stat_reaches(db: asyncpg.Pool, column: str, n: int) -> None:
    """Wait (15 s at most) until the statistics show it: they are reported
    by the writing session a moment after its transaction."""
    for _ in range(150):
        if await stat(db, column) >= n:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"pg_stat_user_tables.{column} never reached {n}")


async def test_a_queue_table_with_many_dead_rows_is_vacuumed(db: asyncpg.Pool) -> None:
    await churn(db, 3_000, keep=10)
    await stat_reaches(db, "n_dead_tup", 2_990)
    before = await stat(db, "vacuum_count")
    # Turned off: nothing vacuumed, the dead rows still exported.
    assert await QueueVacuum(db, dead_rows=0).run_once() == []
    assert gauge("receipt_routes") >= 2_990
    assert await stat(db, "vacuum_count") == before
    assert await QueueVacuum(db, dead_rows=1_000).run_once() == ["receipt_routes"]
    assert await stat(db, "vacuum_count") == before + 1
    assert await stat(db, "n_dead_tup") < 100
    assert await db.fetchval("SELECT count(*) FROM receipt_routes") == 10  # live rows kept


async def test_tables_under_the_threshold_or_mostly_live_are_left_alone(
    db: asyncpg.Pool,
) -> None:
    await churn(db, 1_500, keep=0)
    await stat_reaches(db, "n_dead_tup", 1_500)
    before = await stat(db, "vacuum_count")
    assert await QueueVacuum(db, dead_rows=5_000).run_once() == []  # under the threshold
    # More live rows than dead ones: a table in use, not a pile of dead rows.
    await churn(db, 3_000, keep=3_000)
    await stat_reaches(db, "n_live_tup", 3_000)
    assert await QueueVacuum(db, dead_rows=1_000).run_once() == []
    assert await stat(db, "vacuum_count") == before


def test_config_keys() -> None:
    cfg = parse_config({"database": {"vacuum_dead_rows": 0, "vacuum_check_interval": 2.5}}, {})
    assert cfg.vacuum_dead_rows == 0 and cfg.vacuum_check_interval == 2.5
    for key, bad in (("vacuum_dead_rows", -1), ("vacuum_check_interval", 0)):
        try:
            parse_config({"database": {key: bad}}, {})
        except ConfigError as exc:
            assert key in str(exc)
        else:
            raise AssertionError(f"{bad} accepted")
