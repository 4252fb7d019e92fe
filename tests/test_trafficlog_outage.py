"""The traffic log survives a database outage (privacy.md 1: messaging must
work with the traffic log unreachable).

PostgreSQL is reached through a TCP proxy the test controls
(tests/pgproxy.py); "stopping Postgres" cuts every connection and refuses
new ones for 30 s. The router runs with the in-memory guarantee (the
durable spool needs the database by design: with it, submissions are
refused during an outage rather than accepted unsafely, see
tests/test_database_outage.py). Messaging goes on, log rows wait in the
bounded buffer, and every one is written once the database is back.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg

from router.observe import metrics
from tests.esme import connect
from tests.pgproxy import start_proxy

OUTAGE_SECONDS = 30.0


async def test_log_rows_wait_out_a_30s_outage_and_none_is_lost(
    stack_factory: Any, db: asyncpg.Pool, database_url: str
) -> None:
    proxy, proxied_url = await start_proxy(database_url)
    stack = await stack_factory(database_url=proxied_url, delivery_guarantee="in-memory")
    dropped_before = metrics.TRAFFIC_LOG_DROPPED._value.get()
    esme, _ = await connect(stack.smpp_port)
    ids: list[str] = []
    try:

        async def burst(tag: str, n: int) -> None:
            acks = await asyncio.gather(
                *(esme.submit("+4512345678", f"{tag}{i}") for i in range(n))
            )
            assert all(a.status == 0 for a in acks), "messaging must go on"
            ids.extend(a.message_id for a in acks)  # type: ignore[attr-defined]

        await burst("before", 50)
        # Let the writer reach the database once first, so the outage hits
        # the COPY itself (not only its first partition check).
        deadline = time.monotonic() + 10
        while (
            await db.fetchval("SELECT count(*) FROM traffic_log WHERE id = ANY($1::text[])", ids)
            < 50
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.05)
        proxy.cut()
        t0 = time.monotonic()
        while time.monotonic() - t0 < OUTAGE_SECONDS:
            await burst("during", 20)
            await asyncio.sleep(1.0)
        tlog = stack.router.traffic_log
        assert tlog.depth > 0 and not tlog.healthy
        # Receipts kept flowing during the outage.
        assert len(esme.receipts) >= len(ids) - 40
        proxy.restore()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            n = await db.fetchval(
                "SELECT count(*) FROM traffic_log WHERE id = ANY($1::text[])", ids
            )
            if n == len(ids) and tlog.depth == 0:
                break
            await asyncio.sleep(0.2)
        assert n == len(ids), f"{len(ids) - n} traffic-log rows lost"
        delivered = await db.fetchval(
            "SELECT count(DISTINCT message_id) FROM delivery_events"
            " WHERE status = 'delivered' AND message_id = ANY($1::text[])",
            ids,
        )
        assert delivered == len(ids)
        assert metrics.TRAFFIC_LOG_DROPPED._value.get() == dropped_before
    finally:
        esme.close()
        proxy.restore()
        await asyncio.sleep(0)
    await stack.router.stop(timeout=3)
    await proxy.stop()
