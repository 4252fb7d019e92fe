"""The embedded PostgreSQL (demo/test only) really starts, serves and stops."""

from __future__ import annotations

import asyncio
import os
import warnings
from pathlib import Path

import asyncpg
import pytest

# The only legitimate reason to skip: the pgserver wheel is not installed.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    pytest.importorskip("pgserver", reason="pgserver (the embedded/test extra) is not installed")

from router.store.embedded import (  # noqa: E402
    EmbeddedPostgres,
    EmbeddedPostgresError,
    url_with_database,
)

pytestmark = pytest.mark.timeout(120)


def _alive(pid: int) -> bool:
    """pid exists and is not a zombie (an unreaped zombie serves nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


async def _query(url: str) -> tuple[int, str]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        one = await conn.fetchval("select 1")
        db = await conn.fetchval("select current_database()")
        return one, db
    finally:
        await conn.close()


async def test_start_query_stop(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg")
    with pytest.raises(EmbeddedPostgresError):
        _ = pg.url  # not started yet

    url = await asyncio.to_thread(pg.start)
    try:
        assert url == pg.url
        assert await _query(url) == (1, "sms_router")
        pid = pg.pid
        assert pid is not None and _alive(pid)
        # start() again is a no-op returning the same URL
        assert await asyncio.to_thread(pg.start) == url
    finally:
        await asyncio.to_thread(pg.stop)

    assert not _alive(pid), f"postmaster {pid} still running after stop()"
    assert not pg.running
    assert not (tmp_path / "pg" / "postmaster.pid").exists()
    with pytest.raises((OSError, asyncpg.PostgresError, asyncio.TimeoutError)):
        await asyncpg.connect(url, timeout=5)
    with pytest.raises(EmbeddedPostgresError):
        _ = pg.url

    pg.stop()  # second stop is harmless


def test_context_manager_restart_and_ensure_database(tmp_path: Path) -> None:
    data_dir = tmp_path / "pg"
    with EmbeddedPostgres(data_dir, database="other_db") as pg:
        first_pid = pg.pid
        assert first_pid is not None
        assert asyncio.run(_query(pg.url)) == (1, "other_db")

        async def mark() -> None:
            conn = await asyncpg.connect(pg.url, timeout=10)
            try:
                await conn.execute("create table kept (x int)")
            finally:
                await conn.close()

        asyncio.run(mark())
    assert not _alive(first_pid)

    # same data dir: data survives a restart, and start() also works while a
    # loop is running in the calling thread (ensure_database uses a worker)
    async def restart() -> None:
        pg2 = EmbeddedPostgres(data_dir, database="other_db")
        try:
            url = pg2.start()
            assert pg2.pid is not None and pg2.pid != first_pid
            conn = await asyncpg.connect(url, timeout=10)
            try:
                assert await conn.fetchval("select to_regclass('kept') is not null")
            finally:
                await conn.close()
            assert await _query(url_with_database(url, "postgres")) == (1, "postgres")
        finally:
            pg2.stop()
            pg2.stop()
        assert pg2.pid is not None and not _alive(pg2.pid)

    asyncio.run(restart())


def test_stop_from_fresh_instance(tmp_path: Path) -> None:
    """stop() on an instance that never started stops the server on the data dir
    (this is how `scripts/test_database.py stop` works across processes)."""
    data_dir = tmp_path / "pg"
    owner = EmbeddedPostgres(data_dir)
    owner.start()
    pid = owner.pid
    assert pid is not None
    try:
        EmbeddedPostgres(data_dir).stop()
        assert not _alive(pid)
    finally:
        owner.stop()
    assert not _alive(pid)
