"""Connection pool and schema migrations (versioned SQL files in the package)."""

from __future__ import annotations

import importlib.resources
import re

import asyncpg
import structlog

log = structlog.get_logger("router.store")

_LOCK_KEY = 0x534D5352  # "SMSR": one migrator at a time across nodes


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


async def create_pool(url: str, min_size: int = 1, max_size: int = 12) -> asyncpg.Pool:
    """Three connections are held for the router's life (the opt-out/accounts
    listener, the node lock, the receipt hand-off listener); the rest serve
    the spool writers and upkeep, the traffic log, webhooks and lookups."""
    pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, command_timeout=60)
    assert pool is not None
    return pool
