"""The durable spool's group commit against a real PostgreSQL: several COPY
writers at once, each message answered exactly once, rows put back in line
when a write fails, and refused (never left waiting) after the deadline."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from router.model import Message
from router.observe import metrics
from router.store.spool import PgSpool
from tests.esme import until
from tests.factories import make_message


def message(i: int) -> Message:
    return make_message(f"spooltest{i:08d}")


class Answers:
    """Every durability answer, by message id: each must come exactly once."""

    def __init__(self) -> None:
        self.got: dict[str, list[bool]] = {}

    def callback(self, msg: Message):  # type: ignore[no-untyped-def]
        return lambda ok: self.got.setdefault(msg.id, []).append(ok)

    def count(self) -> int:
        return sum(len(v) for v in self.got.values())

    def add(self, spool: PgSpool, msg: Message) -> None:
        spool.add(msg, self.callback(msg))

    def add_many(self, spool: PgSpool, n: int) -> None:
        for i in range(n):
            self.add(spool, message(i))


@contextlib.asynccontextmanager
async def table_away(db: asyncpg.Pool) -> AsyncIterator[None]:
    """The spool table renamed away (every write fails) inside the block."""
    await db.execute("ALTER TABLE spool RENAME TO spool_away")
    try:
        yield
    finally:
        await db.execute("ALTER TABLE spool_away RENAME TO spool")


def started(db: asyncpg.Pool, **options: Any) -> PgSpool:
    """A spool on ``db`` without a secret key, its writers running."""
    spool = PgSpool(db, key=None, **options)
    spool.start()
    return spool


async def spooled_ids(db: asyncpg.Pool) -> set[str]:
    return {r["id"] for r in await db.fetch("SELECT id FROM spool WHERE id LIKE 'spooltest%'")}


async def test_concurrent_writers_answer_each_message_once(db: asyncpg.Pool) -> None:
    spool = started(db, batch=200, writers=2)
    answers = Answers()
    try:
        n = 3_000
        for i in range(n):
            msg = message(i)
            answers.add(spool, msg)
            if i % 250 == 0:
                await asyncio.sleep(0)  # let writers take batches while adds go on
        await until(lambda: answers.count() == n, timeout=20)
        assert all(v == [True] for v in answers.got.values())
        assert len(answers.got) == n
        assert await spooled_ids(db) == {f"spooltest{i:08d}" for i in range(n)}
        assert spool.size == spool.rows == n  # nothing counted twice or lost in flight
    finally:
        await spool.close()


async def test_failed_write_keeps_messages_in_line_until_the_database_is_back(
    db: asyncpg.Pool,
) -> None:
    spool = started(db, batch=100, writers=2, write_deadline=30.0)
    answers = Answers()
    async with table_away(db):
        answers.add_many(spool, 500)
        await until(lambda: not spool.healthy, timeout=10)
        await asyncio.sleep(0.3)  # several failed attempts by both writers
        assert answers.count() == 0  # nobody answered while nothing is durable
        assert spool.size == 500  # the bound still counts them
    try:
        await until(lambda: answers.count() == 500, timeout=20)
        assert all(v == [True] for v in answers.got.values())
        assert len(await spooled_ids(db)) == 500
        assert spool.healthy
    finally:
        await spool.close()


async def test_messages_are_refused_once_the_write_deadline_passes(db: asyncpg.Pool) -> None:
    spool = started(db, batch=100, writers=2, write_deadline=0.5)
    answers = Answers()
    try:
        async with table_away(db):
            answers.add_many(spool, 300)
            await until(lambda: answers.count() == 300, timeout=10)
            assert all(v == [False] for v in answers.got.values())
            assert spool.size == 0
    finally:
        await spool.close()
    assert await spooled_ids(db) == set()


async def test_an_idle_spool_is_healthy_again_once_it_can_write(db: asyncpg.Pool) -> None:
    """/readyz follows ``healthy``. After failed writes it must come back
    with no message to write (a node that /readyz took out of its load
    balancer gets none), and not while writes would still fail."""
    spool = started(db, batch=100, writers=2, write_deadline=0.3, probe_interval=0.1)
    answers = Answers()
    try:
        async with table_away(db):
            answers.add_many(spool, 10)
            await until(lambda: answers.count() == 10, timeout=10)
            assert all(v == [False] for v in answers.got.values())
            assert not spool.healthy
            await asyncio.sleep(0.5)  # idle, several probes: the table is still away
            assert not spool.healthy
        await until(lambda: spool.healthy, timeout=5)
    finally:
        await spool.close()


async def test_close_answers_what_was_never_written(db: asyncpg.Pool) -> None:
    spool = started(db, batch=100, writers=2, write_deadline=60.0)
    answers = Answers()
    async with table_away(db):
        answers.add_many(spool, 50)
        await until(lambda: not spool.healthy, timeout=10)
        await spool.close(timeout=5)
    assert len(answers.got) == 50
    assert all(v == [False] for v in answers.got.values())


async def copies_in_progress(db: asyncpg.Pool) -> int:
    """Sessions of this database waiting on the lock of the spool table
    (a COPY first reads the table's columns, which waits too)."""
    return int(
        await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE '%spool%'"
        )
    )


async def test_two_writers_copy_at_the_same_time(db: asyncpg.Pool) -> None:
    spool = started(db, batch=50, writers=2)
    answers = Answers()
    try:
        async with db.acquire() as locker, locker.transaction():
            # Both writers block on the lock, each with a batch of its own.
            await locker.execute("LOCK TABLE spool IN ACCESS EXCLUSIVE MODE")
            answers.add_many(spool, 100)
            for _ in range(250):
                if await copies_in_progress(db) == 2:
                    break
                await asyncio.sleep(0.02)
            assert await copies_in_progress(db) == 2
            assert answers.count() == 0
        await until(lambda: answers.count() == 100, timeout=10)
        assert all(v == [True] for v in answers.got.values())
    finally:
        await spool.close()


async def test_close_gives_up_on_stuck_writes_and_answers_each_once(db: asyncpg.Pool) -> None:
    spool = started(db, batch=50, writers=2)
    answers = Answers()
    async with db.acquire() as locker:
        tx = locker.transaction()
        await tx.start()
        await locker.execute("LOCK TABLE spool IN ACCESS EXCLUSIVE MODE")
        try:
            answers.add_many(spool, 120)  # two batches in flight, the rest waiting
            await until(lambda: spool._writing == 100, timeout=5)
            began = time.monotonic()
            await spool.close(timeout=0.3)
            assert time.monotonic() - began < 3
        finally:
            await tx.rollback()
    assert len(answers.got) == 120
    assert all(v == [False] for v in answers.got.values())
    assert spool.size == 0


async def test_deadline_counts_from_each_message_not_from_an_old_failure(
    db: asyncpg.Pool,
) -> None:
    spool = started(db, batch=100, writers=2, write_deadline=1.0)
    answers = Answers()
    early, late = message(1), message(2)
    async with table_away(db):
        answers.add(spool, early)
        await asyncio.sleep(0.7)
        answers.add(spool, late)
        await until(lambda: early.id in answers.got, timeout=5)
        assert answers.got[early.id] == [False]  # waited past the deadline
        assert late.id not in answers.got  # still within its own
    try:
        await until(lambda: late.id in answers.got, timeout=5)
        assert answers.got[late.id] == [True]
        # A short outage long after the last one refuses nothing.
        await asyncio.sleep(1.2)
        again = message(3)
        async with table_away(db):
            answers.add(spool, again)
            await until(lambda: not spool.healthy, timeout=5)
        await until(lambda: again.id in answers.got, timeout=5)
        assert answers.got[again.id] == [True]
    finally:
        await spool.close()


async def test_rows_an_earlier_copy_committed_count_as_durable(db: asyncpg.Pool) -> None:
    # As if a COPY had committed but its writer saw the connection drop:
    # the retry meets the rows already there.
    first = started(db)
    answers = Answers()
    kept = message(1)
    answers.add(first, kept)
    await until(lambda: answers.count() == 1, timeout=5)
    await first.close()

    retry = started(db)
    try:
        new = message(2)
        answers.add(retry, kept)
        answers.add(retry, new)
        await until(lambda: answers.count() == 3, timeout=5)
        assert answers.got == {kept.id: [True, True], new.id: [True]}
        assert await spooled_ids(db) == {kept.id, new.id}
    finally:
        await retry.close()


async def test_writers_go_on_after_the_server_ends_their_connections(
    db: asyncpg.Pool, database_url: str
) -> None:
    """PostgreSQL ends the pool's idle connections (a restart, an
    administrator, a proxy): the writers take fresh connections and go on;
    nothing is lost or answered twice. (Depending on timing asyncpg fails
    the next COPY on such a connection with an InternalClientError, not a
    database error: seen in 3 of 8 runs of a version whose writers held
    their connections between batches, and the writers died of it.)"""
    spool = started(db, batch=20, writers=2)
    answers = Answers()
    admin = await asyncpg.connect(database_url)
    try:
        for i in range(100):
            answers.add(spool, message(i))
        await until(lambda: answers.count() == 100, timeout=10)
        ended = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        assert ended >= 1
        for i in range(100, 300):
            answers.add(spool, message(i))
            if i % 40 == 0:
                await asyncio.sleep(0)
        await until(lambda: answers.count() == 300, timeout=20)
        assert all(v == [True] for v in answers.got.values())
        rows = await admin.fetchval("SELECT count(*) FROM spool WHERE id LIKE 'spooltest%'")
        assert rows == 300
    finally:
        await spool.close()
        await admin.close()


# ------------------------------------------------- receipt-route upkeep


async def route_ids(db: asyncpg.Pool) -> dict[str, str]:
    rows = await db.fetch("SELECT carrier_id, message_id FROM receipt_routes")
    return {r["carrier_id"]: r["message_id"] for r in rows}


async def upkept(spool: PgSpool) -> None:
    """Wait until the upkeep has written everything it was given."""
    await until(lambda: not (spool._routes or spool._route_deletes or spool._deletes), 10, "upkeep")
    await asyncio.sleep(0.05)  # the statement of the last round commits


async def test_a_route_postgresql_refuses_does_not_stop_the_upkeep(db: asyncpg.Pool) -> None:
    """A route holding a value PostgreSQL cannot store (here a NUL in the
    receipt info, which the HTTP API now refuses) failed the upkeep's COPY
    at every round: no spool row was ever deleted again. It alone is
    dropped (counted); the others are written, the spool rows deleted."""
    spool = started(db)
    refused = metrics.RECEIPT_ROUTES_REFUSED._value.get()
    try:
        answers = Answers()
        msgs = [message(0), make_message("spooltest00000001", callback_url="https://h/\x00")]
        msgs.append(message(2))
        for m in msgs:
            answers.add(spool, m)
        await until(lambda: answers.count() == 3, 10, "durable")
        for i, m in enumerate(msgs):
            spool.taken(m.id)
            spool.remember_route("sim-1", f"AB{i}", m, 0)
        await upkept(spool)
        await until(lambda: spool.rows == 0, 5, "spool rows deleted")
        assert await spooled_ids(db) == set()
        assert await route_ids(db) == {"ab0": msgs[0].id, "ab2": msgs[2].id}
        assert metrics.RECEIPT_ROUTES_REFUSED._value.get() == refused + 1
    finally:
        await spool.close()


async def test_upkeep_writes_routes_and_deletes_them_with_the_spool_rows(
    db: asyncpg.Pool,
) -> None:
    """Rows the carrier took leave the spool; their routes appear; a route
    whose receipt came in the same round is never written; a carrier id
    used again points at the newest message."""
    spool = started(db)
    try:
        answers = Answers()
        msgs = [message(i) for i in range(3)]
        for m in msgs:
            answers.add(spool, m)
        await until(lambda: answers.count() == 3, 10, "durable")
        spool._wake.set()
        for i, m in enumerate(msgs):
            spool.taken(m.id)
            spool.remember_route("sim-1", f"AB{i}", m, 0)
        spool.forget_route("sim-1", "AB2")  # its receipt beat the round
        await upkept(spool)
        assert await spooled_ids(db) == set()
        assert await route_ids(db) == {"ab0": msgs[0].id, "ab1": msgs[1].id}
        # The carrier reuses id AB0 for a new message: the newest wins.
        spool.remember_route("sim-1", "AB0", message(9), 0)
        spool.forget_route("sim-1", "ab1")
        await upkept(spool)
        assert await route_ids(db) == {"ab0": message(9).id}
    finally:
        await spool.close(timeout=2)


async def test_a_receipt_delete_waits_for_a_route_beyond_the_round(db: asyncpg.Pool) -> None:
    """More new routes than one round takes (batch 1: 4 per round) and the
    receipt of the last one already came: its delete is applied in the round
    that writes the route, so no stale route is left behind."""
    spool = started(db, batch=1)
    try:
        for i in range(10):
            spool.remember_route("sim-1", f"c{i}", message(i), 0)
        spool.forget_route("sim-1", "c9")
        await upkept(spool)
        assert set(await route_ids(db)) == {f"c{i}" for i in range(9)}
    finally:
        await spool.close(timeout=2)


def test_route_info_is_exactly_json_dumps_of_the_fields() -> None:
    """receipt_routes.info is built by hand for speed; it must stay the
    JSON that json.dumps writes (and json.loads reads back) for any text."""
    import dataclasses
    import json

    from router.store.spool import route_info

    odd = ["plain", 'quo"te', "back\\slash", "tab\tnew\nline", "\x01\x1f", "Ærø ✓ 😀", "\ud800", ""]
    base = make_message("0190aa00000000000042")
    for i, s in enumerate(odd):
        msg = dataclasses.replace(
            base,
            source=s,
            source_ton=i % 7,
            source_npi=i % 3,
            destination=s[::-1],
            userref=None if i % 2 else s,
            callback_url=None if i % 3 else f"https://example.com/{s}",
        )
        want = json.dumps(
            {
                "source": msg.source,
                "source_ton": msg.source_ton,
                "source_npi": msg.source_npi,
                "destination": msg.destination,
                "userref": msg.userref,
                "callback_url": msg.callback_url,
            }
        )
        got = route_info(msg)
        assert got == want
        assert json.loads(got)["source"] == s
    # A message reassembled from customer parts: their ids too.
    parts = dataclasses.replace(base, part_ids=("p-1", "p-2"), part_receipts=(1, 0))
    assert json.loads(route_info(parts))["part_ids"] == ["p-1", "p-2"]
    assert json.loads(route_info(parts))["part_receipts"] == [1, 0]


async def test_pool_resets_only_connections_that_hold_session_state(database_url: str) -> None:
    """router.store.db.create_pool skips asyncpg's reset query (a round
    trip per release) except on connections marked holds_session_state: a
    session advisory lock taken on one is gone once it is released."""
    from router.store.db import create_pool, holds_session_state

    pool = await create_pool(database_url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            pid = conn.get_server_pid()
            await conn.execute("SELECT set_config('application_name', 'left-over', false)")
        async with pool.acquire() as conn:
            assert conn.get_server_pid() == pid  # the same connection, not reset
            assert await conn.fetchval("SHOW application_name") == "left-over"
            holds_session_state(conn)
            assert await conn.fetchval("SELECT pg_try_advisory_lock(7157)")
        async with pool.acquire() as conn:
            assert conn.get_server_pid() == pid
            assert await conn.fetchval("SHOW application_name") != "left-over"
            held = await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1", pid
            )
            assert held == 0
    finally:
        await pool.close()
