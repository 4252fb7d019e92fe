"""The opt-out list: numbers an account must not send to (privacy.md 4).

``contains`` is on the hot path of every accepted message: a dict lookup
then a set lookup, no I/O. The sets are loaded from ``opt_out`` at start,
updated at once by ``add``/``remove`` on this node, and kept in step with
other nodes (and the CLI) by LISTEN ``opt_out_changed`` (a trigger sends the
account id, never the number) plus a periodic full reload as a safety net.
The same LISTEN connection can carry other reload signals (``start(also=)``),
e.g. ``accounts_changed``, so a key revoked by the CLI stops working at once.

Numbers are kept as E.164 digits without '+', the form of
``Message.destination``. Every change is audit-logged with a keyed hash of
the number. This module must never log or audit a number in clear.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncpg
import structlog

from ..routing import normalise_e164
from ..tasks import DB_ERRORS
from .audit import audit, msisdn_hash
from .db import holds_session_state

log = structlog.get_logger("router.optout")

CHANNEL = "opt_out_changed"
ACCOUNTS_CHANNEL = "accounts_changed"  # sent by 003_privacy.sql on account/key changes


class InvalidNumber(ValueError):
    """The value is not an international E.164 number (the message never names it)."""


def opt_out_number(raw: str) -> str:
    digits = normalise_e164(raw)
    if digits is None:
        raise InvalidNumber("expected an international number in E.164 format")
    return digits


class OptOutList:
    def __init__(self, audit_key: bytes, *, refresh: float = 300.0) -> None:
        self.audit_key = audit_key
        self.refresh = refresh
        self._by_account: dict[int, set[str]] = {}
        self._pool: asyncpg.Pool | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Future[None]] = set()
        self._also: dict[str, Callable[[], Awaitable[None]]] = {}
        self._queued: set[str] = set()

    # ------------------------------------------------------- hot path

    def contains(self, account_id: int, msisdn: str) -> bool:
        """Is ``msisdn`` (E.164 digits, as in Message.destination) opted out?"""
        numbers = self._by_account.get(account_id)
        return numbers is not None and msisdn in numbers

    # ------------------------------------------------------- loading

    async def load(self, pool: asyncpg.Pool) -> None:
        rows = await pool.fetch("SELECT account_id, msisdn FROM opt_out")
        by_account: dict[int, set[str]] = {}
        for r in rows:
            by_account.setdefault(r["account_id"], set()).add(r["msisdn"])
        self._by_account = by_account

    async def load_account(self, pool: asyncpg.Pool, account_id: int) -> None:
        rows = await pool.fetch("SELECT msisdn FROM opt_out WHERE account_id = $1", account_id)
        numbers = {r["msisdn"] for r in rows}
        if numbers:
            self._by_account[account_id] = numbers
        else:
            self._by_account.pop(account_id, None)

    def numbers(self, account_id: int) -> list[str]:
        return sorted(self._by_account.get(account_id, ()))

    # ------------------------------------------------------- changes

    async def add(self, pool: asyncpg.Pool, account_id: int, msisdn: str, actor: str) -> bool:
        """Opt ``msisdn`` out of ``account_id``'s traffic; False if it already was."""
        digits = opt_out_number(msisdn)
        async with pool.acquire() as conn, conn.transaction():
            added = await conn.fetchval(
                "INSERT INTO opt_out (account_id, msisdn) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING RETURNING true",
                account_id,
                digits,
            )
            added = bool(added)
            await audit(
                conn,
                actor,
                "opt_out.add",
                account_id,
                msisdn_hash=msisdn_hash(digits, self.audit_key),
                changed=added,
            )
        numbers = set(self._by_account.get(account_id, ()))
        numbers.add(digits)
        self._by_account[account_id] = numbers
        return added

    async def remove(self, pool: asyncpg.Pool, account_id: int, msisdn: str, actor: str) -> bool:
        """Allow ``msisdn`` again; False if it was not on the list."""
        digits = opt_out_number(msisdn)
        async with pool.acquire() as conn, conn.transaction():
            status = await conn.execute(
                "DELETE FROM opt_out WHERE account_id = $1 AND msisdn = $2", account_id, digits
            )
            removed: bool = status != "DELETE 0"
            await audit(
                conn,
                actor,
                "opt_out.remove",
                account_id,
                msisdn_hash=msisdn_hash(digits, self.audit_key),
                changed=removed,
            )
        numbers = set(self._by_account.get(account_id, ()))
        numbers.discard(digits)
        if numbers:
            self._by_account[account_id] = numbers
        else:
            self._by_account.pop(account_id, None)
        return removed

    # ------------------------------------------------------- other nodes

    def start(
        self, pool: asyncpg.Pool, also: Mapping[str, Callable[[], Awaitable[None]]] | None = None
    ) -> None:
        """Follow changes made elsewhere (other nodes, the CLI) until ``stop``.

        ``also`` maps further NOTIFY channels to a reload to run (coalesced)
        when they fire and after each reconnect, so one connection serves
        e.g. ``{ACCOUNTS_CHANNEL: router.accounts reload}`` too."""
        self._pool = pool
        self._also = dict(also or {})
        if self._task is None:
            self._task = asyncio.create_task(self._follow(pool), name="opt-out-follow")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._pending) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._task = None
        self._pending.clear()

    async def _follow(self, pool: asyncpg.Pool) -> None:
        channels = [CHANNEL, *self._also]
        while True:
            try:
                async with pool.acquire() as conn:
                    holds_session_state(conn)
                    for ch in channels:
                        await conn.add_listener(ch, self._notified)
                    try:
                        # Whatever changed while we were not listening.
                        await self.load(pool)
                        for reload in self._also.values():
                            await reload()
                        while not conn.is_closed():
                            await asyncio.sleep(self.refresh)
                            await self.load(pool)
                    finally:
                        for ch in channels:
                            with contextlib.suppress(
                                asyncpg.InterfaceError, OSError, asyncpg.PostgresError
                            ):
                                await conn.remove_listener(ch, self._notified)
            except DB_ERRORS as exc:
                log.warning("opt_out_follow_failed", error=type(exc).__name__)
                await asyncio.sleep(5.0)

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if self._pool is None:
            return
        if channel == CHANNEL:
            if payload.isdigit():
                self._spawn(self._reload(self._pool, int(payload)))
        elif channel in self._also and channel not in self._queued:
            self._queued.add(channel)
            self._spawn(self._run_also(channel))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _run_also(self, channel: str) -> None:
        await asyncio.sleep(0.05)  # a burst of changes costs one reload
        self._queued.discard(channel)
        try:
            await self._also[channel]()
        except DB_ERRORS as exc:
            log.warning("reload_failed", channel=channel, error=type(exc).__name__)

    async def _reload(self, pool: asyncpg.Pool, account_id: int) -> None:
        try:
            await self.load_account(pool, account_id)
        except DB_ERRORS as exc:
            log.warning("opt_out_reload_failed", error=type(exc).__name__)
