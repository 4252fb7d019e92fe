"""Rows the traffic log writes carry what customers and carriers send:
PostgreSQL refuses NUL (U+0000) in text, and one such row used to fail
its whole batch again and again, so the log stopped for good."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg

from router.store.trafficlog import MESSAGE_COLUMNS, TrafficLog
from tests.esme import connect
from tests.factories import make_message


async def test_a_nul_in_a_customers_text_does_not_stop_the_traffic_log(
    stack_factory: Any, db: asyncpg.Pool
) -> None:
    stack = await stack_factory()
    esme, _ = await connect(stack.smpp_port)
    try:
        odd = await esme.submit(
            "4512345678",
            "A\x00B".encode("utf-16-be"),
            data_coding=8,  # UCS2: "A", U+0000, "B"
            registered_delivery=0,
        )
        assert odd.status == 0
        plain = await esme.submit("4512345678", "after it")
        assert plain.status == 0
        ids = [odd.message_id, plain.message_id]  # type: ignore[attr-defined]
        rows: list[asyncpg.Record] = []
        deadline = time.monotonic() + 10
        while len(rows) < 2 and time.monotonic() < deadline:
            rows = await db.fetch(
                "SELECT id, body FROM traffic_log WHERE id = ANY($1::text[])", ids
            )
            await asyncio.sleep(0.05)
        bodies = {r["id"]: r["body"] for r in rows}
        assert bodies == {ids[0]: "A\ufffdB", ids[1]: "after it"}
        assert stack.router.traffic_log.healthy
    finally:
        esme.close()


async def test_rows_postgresql_refuses_are_dropped_and_the_rest_written(
    db: asyncpg.Pool,
) -> None:
    """Whatever value PostgreSQL refuses next (NUL is only the one known),
    the rows of its batch around it are written and it alone is dropped
    and counted, rather than the batch failing at every flush."""
    tlog = TrafficLog(db)
    for i in range(9):
        tlog.record_message(make_message(f"refusetest{i}", text=f"text {i}"), "sim-1")
    body = MESSAGE_COLUMNS.index("body")
    for bad in (2, 6):
        row = list(tlog.messages[bad])
        row[body] = "A\x00B"  # as a row would be without _text
        tlog.messages[bad] = tuple(row)
    tlog.record_event(make_message("refusetest0"), "submitted", "sim-1", None, time.time())
    await tlog.flush_once()
    got = await db.fetch("SELECT id, body FROM traffic_log WHERE id LIKE 'refusetest%'")
    assert {r["id"]: r["body"] for r in got} == {
        f"refusetest{i}": f"text {i}" for i in range(9) if i not in (2, 6)
    }
    events = await db.fetchval(
        "SELECT count(*) FROM delivery_events WHERE message_id = 'refusetest0'"
    )
    assert events == 1
    assert tlog.dropped == 2 and tlog.depth == 0
