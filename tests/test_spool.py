"""The durable spool's group commit against a real PostgreSQL: several COPY
writers at once, each message answered exactly once, rows put back in line
when a write fails, and refused (never left waiting) after the deadline."""

from __future__ import annotations

import asyncio

import asyncpg

from router.model import Message
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


async def spooled_ids(db: asyncpg.Pool) -> set[str]:
    return {r["id"] for r in await db.fetch("SELECT id FROM spool WHERE id LIKE 'spooltest%'")}


async def test_concurrent_writers_answer_each_message_once(db: asyncpg.Pool) -> None:
    spool = PgSpool(db, key=None, batch=200, writers=2)
    spool.start()
    answers = Answers()
    try:
        n = 3_000
        for i in range(n):
            msg = message(i)
            spool.add(msg, answers.callback(msg))
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
    spool = PgSpool(db, key=None, batch=100, writers=2, write_deadline=30.0)
    spool.start()
    answers = Answers()
    await db.execute("ALTER TABLE spool RENAME TO spool_away")
    try:
        for i in range(500):
            msg = message(i)
            spool.add(msg, answers.callback(msg))
        await until(lambda: not spool.healthy, timeout=10)
        await asyncio.sleep(0.3)  # several failed attempts by both writers
        assert answers.count() == 0  # nobody answered while nothing is durable
        assert spool.size == 500  # the bound still counts them
    finally:
        await db.execute("ALTER TABLE spool_away RENAME TO spool")
    try:
        await until(lambda: answers.count() == 500, timeout=20)
        assert all(v == [True] for v in answers.got.values())
        assert len(await spooled_ids(db)) == 500
        assert spool.healthy
    finally:
        await spool.close()


async def test_messages_are_refused_once_the_write_deadline_passes(db: asyncpg.Pool) -> None:
    spool = PgSpool(db, key=None, batch=100, writers=2, write_deadline=0.5)
    spool.start()
    answers = Answers()
    await db.execute("ALTER TABLE spool RENAME TO spool_away")
    try:
        for i in range(300):
            msg = message(i)
            spool.add(msg, answers.callback(msg))
        await until(lambda: answers.count() == 300, timeout=10)
        assert all(v == [False] for v in answers.got.values())
        assert spool.size == 0
    finally:
        await db.execute("ALTER TABLE spool_away RENAME TO spool")
        await spool.close()
    assert await spooled_ids(db) == set()


async def test_close_answers_what_was_never_written(db: asyncpg.Pool) -> None:
    spool = PgSpool(db, key=None, batch=100, writers=2, write_deadline=60.0)
    spool.start()
    answers = Answers()
    await db.execute("ALTER TABLE spool RENAME TO spool_away")
    try:
        msgs = [message(i) for i in range(50)]
        for msg in msgs:
            spool.add(msg, answers.callback(msg))
        await until(lambda: not spool.healthy, timeout=10)
        await spool.close(timeout=5)
    finally:
        await db.execute("ALTER TABLE spool_away RENAME TO spool")
    assert len(answers.got) == 50
    assert all(v == [False] for v in answers.got.values())
