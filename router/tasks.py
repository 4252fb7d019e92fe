"""Small asyncio helpers shared by the background tasks."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import structlog

log = structlog.get_logger("router.tasks")

# What a round of database upkeep may fail with and try again next round.
# InternalClientError: asyncpg on a connection the server ended while it
# was idle (seen: "cannot switch to state 21; another operation (2) is in
# progress" on the next COPY after pg_terminate_backend).
DB_ERRORS = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    TimeoutError,
)


def is_data_error(exc: BaseException) -> bool:
    """PostgreSQL refused a value (SQLSTATE class 22, data exception), or
    asyncpg could not encode one: the rows are at fault, not the database.
    Retrying the same rows can never succeed."""
    if isinstance(exc, asyncpg.DataError):
        return True
    code = getattr(exc, "sqlstate", None)
    return isinstance(exc, asyncpg.PostgresError) and isinstance(code, str) and code[:2] == "22"


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    """Cancel a background task (if any) and wait until it has stopped."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class Periodic:
    """Runs :meth:`run_once` every ``interval`` seconds, the first time after
    ``first_delay`` (default: ``interval``), until :meth:`stop`. A database
    error is logged as ``<name>_failed`` (its type only: no data) and the
    next round tries again."""

    name = "periodic"

    def __init__(self, interval: float, first_delay: float | None = None) -> None:
        self.interval = interval
        self.first_delay = interval if first_delay is None else first_delay
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name=self.name.replace("_", "-")
            )

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _loop(self) -> None:
        await asyncio.sleep(self.first_delay)
        while True:
            try:
                await self.run_once()
            except DB_ERRORS as exc:
                log.warning(f"{self.name}_failed", error=type(exc).__name__)
            await asyncio.sleep(self.interval)

    async def run_once(self) -> object:
        raise NotImplementedError


def resolve(fut: asyncio.Future[None]) -> None:
    """Set ``fut`` done unless it is (a callback that may run twice, or late)."""
    if not fut.done():
        fut.set_result(None)
