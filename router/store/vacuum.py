"""VACUUM of the router's queue tables when their dead rows pile up.

Every accepted message inserts and deletes a ``spool`` row and, per part, a
``receipt_routes`` row; receipts and webhooks moving between nodes do the
same in their tables. Such queue tables hold a few hundred live rows and
leave a dead one per message: without VACUUM they grow without bound, and
every scan and index probe gets slower.

Measured (benchmark ``soak``, 1,500 msg/s, on a server with
``autovacuum = off`` -- this machine's -- or with autovacuum too slow for the
churn): after 150 s, 219,000 dead rows each in ``spool`` (110 MB) and
``receipt_routes`` (92 MB) for ~300 live ones, PostgreSQL's CPU per message
doubled in four minutes and the latency percentiles drifted up with it.

So each router checks ``pg_stat_user_tables`` every
``database.vacuum_check_interval`` seconds and runs ``VACUUM (SKIP_LOCKED,
ANALYZE)`` on a queue table with more than ``database.vacuum_dead_rows``
dead rows and more dead rows than live ones. Plain VACUUM takes no lock that
blocks inserts or deletes; SKIP_LOCKED makes a node skip a table another node
is vacuuming. It needs the router's database user to own the tables (the
one that ran the migrations); if not, PostgreSQL skips them with a warning
and autovacuum is left to do it. ``vacuum_dead_rows = 0`` turns it off.
Either way the dead rows are exported (``smsrouter_db_queue_dead_rows``;
alert SmsRouterQueueTableBloat when they keep piling up).
"""

from __future__ import annotations

import asyncpg
import structlog

from ..observe import metrics
from ..tasks import Periodic

log = structlog.get_logger("router.vacuum")

QUEUE_TABLES = (
    "spool",
    "receipt_routes",
    "receipt_handoff",
    "carrier_receipt_handoff",
    "webhook_outbox",
)


class QueueVacuum(Periodic):
    name = "queue_vacuum"

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        dead_rows: int = 20_000,
        interval: float = 10.0,
        tables: tuple[str, ...] = QUEUE_TABLES,
    ) -> None:
        super().__init__(interval)
        self.pool = pool
        self.dead_rows = dead_rows
        self.tables = tables

    async def run_once(self) -> list[str]:
        """Export the queue tables' dead rows; vacuum those that need it now
        (unless turned off); their names."""
        rows = await self.pool.fetch(
            "SELECT relname, n_dead_tup, n_live_tup FROM pg_stat_user_tables"
            " WHERE schemaname = current_schema() AND relname = ANY($1::text[])"
            " ORDER BY n_dead_tup DESC",
            list(self.tables),
        )
        done: list[str] = []
        for r in rows:
            table = r["relname"]
            metrics.DB_QUEUE_DEAD_ROWS.labels(table).set(r["n_dead_tup"])
            if not (0 < self.dead_rows < r["n_dead_tup"] and r["n_dead_tup"] > r["n_live_tup"]):
                continue
            assert table in self.tables  # a fixed name: safe to quote into the statement
            async with self.pool.acquire() as conn:
                await conn.execute(f'VACUUM (SKIP_LOCKED, ANALYZE) "{table}"')
            metrics.DB_VACUUMS.labels(table).inc()
            log.debug("queue_vacuumed", table=table, dead_rows=r["n_dead_tup"])
            done.append(table)
        return done
