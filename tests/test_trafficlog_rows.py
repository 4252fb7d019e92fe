"""Rows the traffic log writes carry what customers and carriers send:
PostgreSQL refuses NUL (U+0000) in text, and one such row used to fail
its whole batch again and again, so the log stopped for good."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from router.engine import RECEIPT_HOLD_MAX
from router.observe import metrics
from router.sim import SimConfig
from router.store.trafficlog import MESSAGE_COLUMNS, TrafficLog
from tests.esme import connect
from tests.factories import make_message
from tests.pgproxy import start_proxy


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


@contextlib.asynccontextmanager
async def proxied_log(
    database_url: str, flush_interval: float
) -> AsyncIterator[tuple[Any, TrafficLog]]:
    """A running TrafficLog whose database sits behind a proxy the test can
    cut (tests/pgproxy.py); everything stops at the end."""
    proxy, proxied_url = await start_proxy(database_url)
    pool = await asyncpg.create_pool(proxied_url, min_size=1, max_size=2)
    tlog = TrafficLog(pool, flush_interval=flush_interval, barrier_delay=0.002)
    tlog.start()
    try:
        yield proxy, tlog
    finally:
        proxy.restore()
        await tlog.close()
        await pool.close()
        await proxy.stop()


async def _events_of(db: asyncpg.Pool, message_id: str) -> int:
    return int(
        await db.fetchval("SELECT count(*) FROM delivery_events WHERE message_id = $1", message_id)
    )


async def _wait_for(flag: list[str], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while what not in flag:
        assert time.monotonic() < deadline, f"{what} never ran"
        await asyncio.sleep(0.01)


async def test_after_write_waits_for_the_commit_of_every_row_recorded_before_it(
    db: asyncpg.Pool,
) -> None:
    """A carrier's receipt is answered and its route deleted through
    after_write: the callback must not run while the row is unwritten
    (here held by a lock on the table), and runs soon after it is, well
    before the 0.2 s flush interval would come round again."""
    tlog = TrafficLog(db, flush_interval=30.0, barrier_delay=0.002)
    tlog.start()
    ran: list[str] = []
    try:
        tlog.after_write(lambda: ran.append("empty"))
        assert ran == ["empty"], "nothing recorded: at once"
        lock = await db.acquire()
        tr = lock.transaction()
        await tr.start()
        await lock.execute("LOCK TABLE delivery_events IN ACCESS EXCLUSIVE MODE")
        msg = make_message("barrier-1")
        tlog.record_event(msg, "delivered", "sim-1", None, time.time())
        tlog.after_write(lambda: ran.append("first"), soon=True)
        tlog.record_event(make_message("barrier-2"), "delivered", "sim-1", None, time.time())
        tlog.after_write(lambda: ran.append("second"), soon=True)
        await asyncio.sleep(0.5)
        assert ran == ["empty"], "ran before its row was written"
        assert tlog.waiting == 2
        await tr.rollback()
        await db.release(lock)
        await _wait_for(ran, "second", timeout=5.0)  # not the 30 s flush interval
        assert ran == ["empty", "first", "second"]
        assert await _events_of(db, "barrier-1") == 1
        assert await _events_of(db, "barrier-2") == 1
        assert tlog.waiting == 0
    finally:
        await tlog.close()


async def test_a_callback_not_asked_soon_waits_for_the_flush_interval(
    db: asyncpg.Pool,
) -> None:
    """Route deletes wait for the log without bringing its write forward:
    with receipts trickling in, each one would otherwise cost a write of
    its own instead of one per flush interval."""
    tlog = TrafficLog(db, flush_interval=1.0, barrier_delay=0.002)
    tlog.start()
    ran: list[str] = []
    try:
        await asyncio.sleep(0.05)
        tlog.record_event(make_message("not-soon"), "delivered", "sim-1", None, time.time())
        started = time.monotonic()
        tlog.after_write(lambda: ran.append("route"))
        await asyncio.sleep(0.4)
        assert ran == [], "written early for a callback that did not ask"
        await _wait_for(ran, "route", timeout=3.0)
        assert time.monotonic() - started < 2.0
    finally:
        await tlog.close()


async def test_after_write_through_an_outage_waits_or_gives_up_as_asked(
    db: asyncpg.Pool, database_url: str
) -> None:
    """Route deletes wait out a database outage with their rows; receipt
    answers (outlast_outage=False) do not hold a carrier for it: they run
    when the write fails, and at once while the log is down."""
    ran: list[str] = []
    async with proxied_log(database_url, flush_interval=0.5) as (proxy, tlog):
        proxy.cut()
        tlog.record_event(make_message("outage-1"), "delivered", "sim-1", None, time.time())
        tlog.after_write(lambda: ran.append("route"))
        tlog.after_write(lambda: ran.append("answer"), outlast_outage=False, soon=True)
        await _wait_for(ran, "answer")
        assert not tlog.healthy
        tlog.after_write(lambda: ran.append("answer-while-down"), outlast_outage=False)
        assert ran == ["answer", "answer-while-down"]
        await asyncio.sleep(0.3)
        assert "route" not in ran
        proxy.restore()
        await _wait_for(ran, "route", timeout=15.0)  # the writer's backoff is at most 5 s
        assert await _events_of(db, "outage-1") == 1


async def test_a_receipt_held_for_a_write_that_hangs_is_answered_after_5_s(
    stack_factory: Any, db: asyncpg.Pool
) -> None:
    """delivery.receipt_ack = "durable": a carrier's receipt waits for its
    traffic-log write, but a write that hangs without failing (a lock, a
    server that never answers) must not hold the carrier's receipt window
    until the carrier gives up: it is answered after RECEIPT_HOLD_MAX."""
    stack = await stack_factory(
        sims={"sim-eu": SimConfig(port=0, dlr_delay=0.3), "sim-world": SimConfig(port=0)},
        receipt_ack="durable",
    )
    sim = stack.sims["sim-eu"]
    forced = metrics.RECEIPT_ANSWERS_FORCED._value.get()
    esme, _ = await connect(stack.smpp_port)
    lock = await db.acquire()
    try:
        await lock.execute("BEGIN; LOCK TABLE delivery_events IN ACCESS EXCLUSIVE MODE")
        for i in range(3):
            assert (await esme.submit("+4512345678", f"hang {i}")).status == 0
        deadline = time.monotonic() + 5
        while sim.stats.receipts_sent < 3:
            assert time.monotonic() < deadline, "receipts never sent"
            await asyncio.sleep(0.02)
        sent_at = time.monotonic()
        await asyncio.sleep(1.0)
        assert sim.stats.receipts_acked == 0, "answered before the write"
        while sim.stats.receipts_acked < 3:
            assert time.monotonic() - sent_at < RECEIPT_HOLD_MAX + 3, "held past the limit"
            await asyncio.sleep(0.05)
        assert time.monotonic() - sent_at >= RECEIPT_HOLD_MAX - 0.5
        assert metrics.RECEIPT_ANSWERS_FORCED._value.get() == forced + 3
    finally:
        await lock.execute("ROLLBACK")
        await db.release(lock)
        esme.close()


async def test_settle_after_an_outage_does_not_wait_out_the_backoff(
    db: asyncpg.Pool, database_url: str
) -> None:
    """At shutdown the router lets the log settle (route deletes wait for
    it) before closing the spool. Right after an outage the writer may be
    in a backoff of seconds; settle cuts it short and retries at once."""
    errors = metrics.TRAFFIC_LOG_ERRORS._value
    async with proxied_log(database_url, flush_interval=0.05) as (proxy, tlog):
        proxy.cut()
        before = errors.get()
        tlog.record_event(make_message("settle-1"), "delivered", "sim-1", None, time.time())
        deadline = time.monotonic() + 10
        while errors.get() < before + 6:  # backoffs 0.1, 0.2 .. 1.6 s, now 3.2 s
            assert time.monotonic() < deadline, "the writes did not fail"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert not tlog.healthy
        proxy.restore()
        started = time.monotonic()
        await tlog.settle(timeout=3.0)
        assert time.monotonic() - started < 1.5, "settle waited out the backoff"
        assert await _events_of(db, "settle-1") == 1
