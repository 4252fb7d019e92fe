"""Several routers sharing one database: each spool row belongs to the node
that accepted it. A restarted node resends only its own rows; a running
node's rows are never taken; a dead node's rows are adopted by a live one
(real PostgreSQL, real advisory locks)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from router.model import Message
from router.store.spool import NodeInUse, PgSpool
from tests.esme import until
from tests.factories import make_message


def message(node: str, i: int) -> Message:
    return make_message(f"nodetest-{node}-{i:05d}")


async def durable(spool: PgSpool, msgs: list[Message]) -> None:
    """Add the messages and wait until each is answered durable."""
    answers: list[bool] = []
    for m in msgs:
        spool.add(m, answers.append)
    await until(lambda: len(answers) == len(msgs), timeout=10)
    assert all(answers)


def crash(spool: PgSpool) -> None:
    """What kill -9 does to a node: its tasks stop and its connections drop
    without a word (PostgreSQL frees its advisory lock); nothing is cleaned."""
    for task in (*spool._writer_tasks, spool._upkeep, spool._nodes_task):
        if task is not None:
            task.cancel()
    assert spool._node_conn is not None
    spool._node_conn._con.terminate()  # the raw connection under the pool's proxy


@pytest.fixture
async def nodes(db: asyncpg.Pool) -> AsyncIterator[list[PgSpool]]:
    """Spools made by a test; each is closed at the end (crashed ones too)."""
    await db.execute("TRUNCATE router_nodes")
    made: list[PgSpool] = []
    yield made
    for s in made:
        s._closing = True
        await s.close(timeout=2)


async def node(
    db: asyncpg.Pool, made: list[PgSpool], name: str, grace: float = 30.0, wait: float = 2.0
) -> tuple[PgSpool, list[Message]]:
    spool = PgSpool(db, key=None, node=name, node_grace=grace, node_wait=wait)
    made.append(spool)
    replay = await spool.load()
    spool.start()
    return spool, replay


async def owners(db: asyncpg.Pool) -> dict[str, int]:
    rows = await db.fetch("SELECT node, count(*) AS n FROM spool GROUP BY node")
    return {r["node"]: r["n"] for r in rows}


async def test_a_restarted_node_resends_its_own_rows_only(
    db: asyncpg.Pool, nodes: list[PgSpool]
) -> None:
    a, _ = await node(db, nodes, "a")
    b, _ = await node(db, nodes, "b")
    await durable(a, [message("a", i) for i in range(30)])
    await durable(b, [message("b", i) for i in range(20)])
    assert await owners(db) == {"a": 30, "b": 20}

    crash(a)
    a2, replay = await node(db, nodes, "a", wait=5.0)
    assert sorted(m.id for m in replay) == [f"nodetest-a-{i:05d}" for i in range(30)]
    # b is alive: its rows are neither replayed nor adopted.
    assert await a2.adopt_orphans() == 0
    assert await owners(db) == {"a": 30, "b": 20}


async def test_a_second_router_with_a_running_nodes_id_is_refused(
    db: asyncpg.Pool, nodes: list[PgSpool]
) -> None:
    a, _ = await node(db, nodes, "a")
    await durable(a, [message("a", i) for i in range(5)])
    with pytest.raises(NodeInUse, match="delivery.node"):
        await node(db, nodes, "a", wait=0.5)
    # The refused one took nothing and the running one keeps its lock.
    assert await owners(db) == {"a": 5}
    assert a._node_conn is not None and not a._node_conn.is_closed()


async def test_a_dead_nodes_rows_are_adopted_after_the_grace_only(
    db: asyncpg.Pool, nodes: list[PgSpool]
) -> None:
    adopted: list[Message] = []
    a, _ = await node(db, nodes, "a", grace=3.0)
    b, _ = await node(db, nodes, "b", grace=3.0)
    b.on_adopt = adopted.extend
    await durable(a, [message("a", i) for i in range(40)])
    crash(a)
    # Just dead: not yet (a database blip must not hand a live node's rows over).
    assert await b.adopt_orphans() == 0
    # b's own upkeep (every grace/3) adopts them once a has not been seen for 3 s.
    await until(lambda: len(adopted) == 40, timeout=10)
    assert [m.id for m in adopted] == [f"nodetest-a-{i:05d}" for i in range(40)]
    assert await owners(db) == {"b": 40}
    assert await db.fetchval("SELECT count(*) FROM router_nodes WHERE node = 'a'") == 0


async def test_a_live_node_is_never_adopted_even_when_its_heartbeat_is_old(
    db: asyncpg.Pool, nodes: list[PgSpool]
) -> None:
    a, _ = await node(db, nodes, "a", grace=3.0)
    b, _ = await node(db, nodes, "b", grace=3.0)
    await durable(a, [message("a", i) for i in range(10)])
    # As if a's heartbeats had stalled for an hour: its lock still says alive.
    await db.execute("UPDATE router_nodes SET seen_at = now() - interval '1 hour' WHERE node = 'a'")
    assert await b.adopt_orphans() == 0
    assert await owners(db) == {"a": 10}


async def lock_holder(db: asyncpg.Pool, name: str) -> int | None:
    """The server pid holding node ``name``'s advisory lock, or None."""
    pid = await db.fetchval(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND ((classid::bigint << 32) | objid::bigint)"
        "  = hashtextextended('sms-router-node:' || $1, 0)",
        name,
    )
    return None if pid is None else int(pid)


async def test_a_node_takes_its_lock_again_after_its_connection_drops(
    db: asyncpg.Pool, nodes: list[PgSpool]
) -> None:
    """A database restart or outage drops the connection that holds a
    node's lock (asyncpg then gives it back to the pool by itself). The
    node must take its lock again: else, once node_grace passed, a peer
    adopts a live node's rows (sent twice), and the node never adopts a
    dead peer's again."""
    adopted: list[Message] = []
    a, _ = await node(db, nodes, "a", grace=3.0)
    b, _ = await node(db, nodes, "b", grace=3.0)
    b.on_adopt = adopted.extend
    await durable(a, [message("a", i) for i in range(10)])
    await durable(b, [message("b", i) for i in range(5)])
    first = await lock_holder(db, "a")
    assert first is not None
    await db.execute("SELECT pg_terminate_backend($1)", first)
    deadline = time.monotonic() + 5
    while (holder := await lock_holder(db, "a")) in (None, first):
        assert time.monotonic() < deadline, "node a never took its lock again"
        await asyncio.sleep(0.1)
    await asyncio.sleep(4.0)  # beyond node_grace: b's upkeep ran meanwhile
    assert adopted == []
    assert await owners(db) == {"a": 10, "b": 5}
    assert await lock_holder(db, "a") == holder
    # And a still adopts a dead peer's rows.
    a.on_adopt = adopted.extend
    crash(b)
    await until(lambda: len(adopted) == 5, timeout=10)
    assert await owners(db) == {"a": 15}


async def test_a_clean_stop_hands_what_is_left_to_the_others_at_once(
    db: asyncpg.Pool, nodes: list[PgSpool]
) -> None:
    adopted: list[Message] = []
    a, _ = await node(db, nodes, "a")
    b, _ = await node(db, nodes, "b")  # a grace of 30 s: no waiting for it here
    b.on_adopt = adopted.extend
    await durable(a, [message("a", i) for i in range(7)])  # say, queued for a carrier that is down
    await a.close()
    assert await b.adopt_orphans() == 7
    assert len(adopted) == 7
    # And the id is free again for a router that starts with it.
    a2, replay = await node(db, nodes, "a", wait=0.5)
    assert replay == []


async def test_rows_of_an_older_version_are_taken_by_the_first_node_to_start(
    db: asyncpg.Pool, nodes: list[PgSpool]
) -> None:
    a, _ = await node(db, nodes, "a")
    await durable(a, [message("a", i) for i in range(3)])
    await db.execute("UPDATE spool SET node = NULL")  # as a version before nodes wrote them
    crash(a)
    b, replay = await node(db, nodes, "b")
    assert len(replay) == 3
    assert await owners(db) == {"b": 3}


async def test_a_released_scheduled_message_belongs_to_the_node_that_released_it(
    db: asyncpg.Pool, nodes: list[PgSpool]
) -> None:
    a, _ = await node(db, nodes, "a")
    b, _ = await node(db, nodes, "b")
    due = dataclasses.replace(make_message("nodetest-sched-00001"), send_at=time.time() - 1)
    await durable(a, [due])
    assert await owners(db) == {"a": 1}
    released = await b.release_due(time.time(), 10)
    assert [m.id for m in released] == ["nodetest-sched-00001"]
    assert await owners(db) == {"b": 1}
