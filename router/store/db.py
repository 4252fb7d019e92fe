"""Connection pool and schema migrations (versioned SQL files in the package)."""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Sequence
from typing import Any

import asyncpg
import structlog

from ..tasks import DB_ERRORS, is_data_error

log = structlog.get_logger("router.store")

_LOCK_KEY = 0x534D5352  # "SMSR": one migrator at a time across nodes


async def copy_dropping_refused(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
    table: str,
    rows: list[tuple[Any, ...]],
    columns: Sequence[str],
) -> int:
    """COPY ``rows`` after PostgreSQL refused a batch of them for a value it
    cannot hold (``is_data_error``): in halves, each under a savepoint, down
    to the single rows it refuses, which are left out. Run it inside the
    caller's transaction, so that a connection error on the way writes
    nothing and the caller can retry every row. How many were left out.
    (Retrying the whole batch would fail the same way at every attempt.)"""
    refused = 0
    todo = [rows] if rows else []  # a stack: the first rows on top
    while todo:
        part = todo.pop()
        try:
            async with conn.transaction():
                await conn.copy_records_to_table(table, records=part, columns=columns)
        except DB_ERRORS as exc:
            if not is_data_error(exc):
                raise
            if len(part) == 1:
                refused += 1
            else:
                half = len(part) // 2
                todo += [part[half:], part[:half]]
    return refused


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every file in router/store/migrations, in order."""
    out = []
    root = importlib.resources.files("router.store") / "migrations"
    for entry in root.iterdir():
        m = re.match(r"(\d+)_(.+)\.sql$", entry.name)
        if m:
            out.append((int(m.group(1)), m.group(2), entry.read_text()))
    return sorted(out)


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply missing migrations, each in its own transaction. Idempotent."""
    applied: list[int] = []
    holds_session_state(conn)
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in migrations():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
            log.info("migration_applied", version=version, name=name)
            applied.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied


# Backend pids of pooled connections that hold session state: a session
# advisory lock or a LISTEN. Only these get the full reset when released.
_SESSION_STATE: set[int] = set()


def holds_session_state(conn: Any) -> None:
    """Mark a pooled connection (or its proxy) that takes a session advisory
    lock or LISTENs: released, it gets asyncpg's full reset query."""
    _SESSION_STATE.add(conn.get_server_pid())


async def _reset(conn: asyncpg.Connection) -> None:
    """asyncpg resets every connection released to its pool with a query
    (UNLISTEN *, advisory unlock, RESET ALL, CLOSE ALL): one more round trip
    per acquire, several hundred a second under load from the spool writers,
    its upkeep and the traffic log. Those leave no session state (an open
    transaction is rolled back by the pool before this), so only the
    connections marked by ``holds_session_state`` pay for it. Measured on
    the 2-core box (acquire, SELECT 1, release; 3 x 5,000): 98-108 us of
    router CPU and 157-179 us wall against 164-171 us and 299-316 us with
    the reset query."""
    pid = conn.get_server_pid()
    if pid in _SESSION_STATE:
        _SESSION_STATE.discard(pid)
        query = conn.get_reset_query()
        if query:
            await conn.execute(query)


async def create_pool(url: str, min_size: int = 1, max_size: int = 12) -> asyncpg.Pool:
    """Three connections are held for the router's life (the opt-out/accounts
    listener, the node lock, the receipt hand-off listener); the rest serve
    the spool writers and upkeep, the traffic log, webhooks and lookups."""
    pool = await asyncpg.create_pool(
        url, min_size=min_size, max_size=max_size, command_timeout=60, reset=_reset
    )
    assert pool is not None
    return pool
