"""The traffic log writer: batched COPY from a bounded in-memory buffer.

One writer task. ``record_*`` only appends a tuple to a deque (no await, no
I/O) so messaging never waits for PostgreSQL. If the database is slow or
down, rows wait (up to ``limit``; beyond it new rows are dropped and
counted in ``smsrouter_traffic_log_dropped_rows_total``) and are written
when it returns. Secret-class messages never put source, destination or
text into a row (privacy.md 2).

``after_write(callback)`` is the one way to wait for the log: the callback
runs once every row recorded before it is committed. A receipt route is
deleted only then (router.engine), so that a crash never leaves a message
with neither its final status nor a route to finish it by; with
delivery.receipt_ack = "durable" the carrier's receipt is answered only
then too, so the carrier sends it again after a crash.
While such a callback waits with ``soon`` (a receipt answer), the writer
flushes within ``barrier_delay`` instead of ``flush_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import asyncpg
import structlog

from ..model import Message, Status
from ..observe import metrics
from ..tasks import DB_ERRORS, is_data_error, resolve
from .db import copy_dropping_refused

log = structlog.get_logger("router.trafficlog")

MESSAGE_COLUMNS = (
    "id",
    "account_id",
    "class",
    "ingress",
    "source",
    "destination",
    "country",
    "carrier",
    "parts",
    "data_coding",
    "body",
    "userref",
    "accepted_at",
    "expires_at",
)
EVENT_COLUMNS = ("message_id", "account_id", "status", "carrier", "error", "at")
FINAL_STATUSES = [s.value for s in Status if s.final]
_UTC = dt.UTC


def _ts(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, _UTC)


def _text(value: str | None) -> str | None:
    """PostgreSQL text holds no NUL; a customer's UCS2 or Latin-1 text, or
    a carrier's receipt, may. Kept as U+FFFD (a row PostgreSQL refuses
    fails its whole batch)."""
    if value is None or "\x00" not in value:
        return value
    return value.replace("\x00", "\ufffd")


async def ensure_partitions(conn: asyncpg.Connection, today: dt.date, days: int = 3) -> None:
    """Daily partitions from ``today`` for ``days`` days (idempotent)."""
    for table in ("traffic_log", "delivery_events"):
        for i in range(days):
            day = today + dt.timedelta(days=i)
            name = f"{table}_{day:%Y%m%d}"
            try:
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table}"
                    f" FOR VALUES FROM ('{day.isoformat()}')"
                    f" TO ('{(day + dt.timedelta(days=1)).isoformat()}')"
                )
            except (asyncpg.DuplicateTableError, asyncpg.UniqueViolationError):
                # Another router (a sibling worker starting with this one) made
                # it between IF NOT EXISTS and the catalog insert: it exists.
                continue
            except asyncpg.PostgresError as exc:
                # Rows for that day already sit in the default partition.
                log.warning("partition_not_created", table=name, error=type(exc).__name__)


class TrafficLog:
    def __init__(
        self,
        pool: asyncpg.Pool | None,
        *,
        limit: int = 200_000,
        flush_rows: int = 5_000,
        flush_interval: float = 0.2,
        barrier_delay: float = 0.002,
    ) -> None:
        self.pool = pool
        self.limit = limit
        self.flush_rows = flush_rows
        self.flush_interval = flush_interval
        self.barrier_delay = barrier_delay
        self.messages: deque[tuple[Any, ...]] = deque()
        self.events: deque[tuple[Any, ...]] = deque()
        # Rows of each kind ever recorded and ever written (or refused):
        # rows leave in the order they came, so a callback waits for counts.
        self._added_msgs = self._added_evts = 0
        self._written_msgs = self._written_evts = 0
        self._barriers: deque[tuple[int, int, Callable[[], None], bool, bool]] = deque()
        self._soon = 0  # callbacks waiting with soon=True
        # One flush at a time: the counts above assume batches commit in order.
        self._flushing = asyncio.Lock()
        self._wake = asyncio.Event()
        # Set at shutdown (settle, close): retry a failed write after 0.1 s,
        # not after the backoff (up to 5 s) an outage has grown to.
        self._hurry = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.healthy = True
        self.dropped = 0

    @property
    def depth(self) -> int:
        return len(self.messages) + len(self.events)

    @property
    def dropping(self) -> bool:
        """Full: what is recorded now is dropped, never written (so an
        after_write callback does not mean it is logged)."""
        return self.pool is not None and self.depth >= self.limit

    # ------------------------------------------------ hot path: append only

    def record_message(self, msg: Message, carrier: str | None) -> None:
        if self.pool is None:
            return
        if self.depth >= self.limit:
            self._drop()
            return
        secret = msg.secret
        self.messages.append(
            (
                msg.id,
                msg.account_id,
                msg.msg_class.value,
                msg.origin.value,
                None if secret else msg.source,
                None if secret else msg.destination,
                msg.country,
                carrier,
                msg.parts,
                msg.data_coding,
                None if secret else _text(msg.text),
                None if secret else _text(msg.userref),
                _ts(msg.accepted_at),
                _ts(msg.expires_at),
            )
        )
        self._added_msgs += 1
        if len(self.messages) >= self.flush_rows:
            self._wake.set()

    def record_event(
        self, msg: Message, status: str, carrier: str | None, error: str | None, at: float
    ) -> None:
        if self.pool is None:
            return
        if self.depth >= self.limit:
            self._drop()
            return
        self.events.append((msg.id, msg.account_id, status, carrier, _text(error), _ts(at)))
        self._added_evts += 1
        if len(self.events) >= self.flush_rows:
            self._wake.set()

    def after_write(
        self, callback: Callable[[], None], *, outlast_outage: bool = True, soon: bool = False
    ) -> None:
        """Call ``callback`` once every row recorded so far is committed:
        at once when none waits or there is no database. Rows dropped at the
        buffer's limit were never recorded and are not waited for. While
        PostgreSQL is down the callback waits with the rows, unless
        ``outlast_outage`` is False: then it runs as the write fails (and at
        once while the log is down), for callers that must not stall on the
        log (privacy.md 1: messaging goes on without it). ``soon`` brings
        the write forward to ``barrier_delay`` (else it comes at the flush
        interval, as for a route delete: no one waits on those)."""
        if (
            self.pool is None
            or (self._written_msgs >= self._added_msgs and self._written_evts >= self._added_evts)
            or (not outlast_outage and not self.healthy)
        ):
            callback()
            return
        if soon:
            if not self._soon:
                asyncio.get_running_loop().call_later(self.barrier_delay, self._wake.set)
            self._soon += 1
        self._barriers.append((self._added_msgs, self._added_evts, callback, outlast_outage, soon))

    async def settle(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until what is recorded now is written
        and the callbacks waiting for it have run: at shutdown, before the
        spool takes its last route deletes."""
        if self.pool is None or self._task is None:
            return
        written = asyncio.get_running_loop().create_future()
        self._hurry.set()
        self.after_write(partial(resolve, written), soon=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(written, timeout)

    @property
    def waiting(self) -> int:
        """Callbacks waiting for a write (``after_write``)."""
        return len(self._barriers)

    def _release(self) -> None:
        barriers = self._barriers
        while barriers:
            msgs, evts, callback, _, soon = barriers[0]
            if msgs > self._written_msgs or evts > self._written_evts:
                break
            barriers.popleft()
            self._soon -= soon
            self._call(callback)

    def _give_up_waits(self) -> None:
        """A write failed: run the callbacks that must not wait out an outage."""
        if any(not b[3] for b in self._barriers):
            waiting, self._barriers = self._barriers, deque(b for b in self._barriers if b[3])
            for b in waiting:
                if not b[3]:
                    self._soon -= b[4]
                    self._call(b[2])

    @staticmethod
    def _call(callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:  # noqa: BLE001  (one caller's bug must not stop the writer)
            log.exception("traffic_log_callback_failed")

    async def find(self, message_id: str) -> asyncpg.Record | None:
        """A message's row and its latest status (a final one wins over any
        later transient event), for status lookups the router can no longer
        answer from memory. No personal field is read."""
        if self.pool is None:
            return None
        return await self.pool.fetchrow(
            "SELECT t.account_id, t.class, t.ingress, t.country, t.carrier, t.parts,"
            " t.data_coding, t.userref, t.accepted_at, t.expires_at,"
            " e.status, e.carrier AS event_carrier, e.error, e.at"
            " FROM traffic_log t LEFT JOIN LATERAL ("
            "  SELECT status, carrier, error, at FROM delivery_events"
            "  WHERE message_id = t.id"
            "  ORDER BY status = ANY($2::text[]) DESC, at DESC LIMIT 1) e ON true"
            " WHERE t.id = $1 LIMIT 1",
            message_id,
            FINAL_STATUSES,
        )

    def _drop(self, n: int = 1) -> None:
        self.dropped += n
        metrics.TRAFFIC_LOG_DROPPED.inc(n)

    # ------------------------------------------------------------- writer

    def start(self) -> None:
        if self.pool is not None and self._task is None:
            self._task = asyncio.create_task(self._run(), name="traffic-log-writer")

    async def close(self, timeout: float = 10.0) -> None:
        """Flush what is buffered (bounded by ``timeout``) and stop."""
        self._closing = True
        self._hurry.set()
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout)
            except TimeoutError:
                log.error("traffic_log_close_timeout", rows_left=self.depth)
            self._task = None

    async def _run(self) -> None:
        backoff = 0.1
        last_partition_day: dt.date | None = None
        while True:
            if not self._closing and self.depth < self.flush_rows:
                wait = self.barrier_delay if self._soon else self.flush_interval
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except TimeoutError:
                    pass
            self._wake.clear()
            metrics.TRAFFIC_LOG_BUFFER.set(self.depth)
            if not self.depth:
                if self._closing:
                    return
                continue
            try:
                today = dt.datetime.now(_UTC).date()
                if last_partition_day != today:
                    assert self.pool is not None
                    async with self.pool.acquire() as conn:
                        await ensure_partitions(conn, today - dt.timedelta(days=1))
                    last_partition_day = today
                await self.flush_once()
                backoff = 0.1
                self.healthy = True
            except DB_ERRORS as exc:
                self.healthy = False
                self._give_up_waits()
                metrics.TRAFFIC_LOG_ERRORS.inc()
                log.warning(
                    "traffic_log_flush_failed", error=type(exc).__name__, rows_waiting=self.depth
                )
                if self._closing:
                    return
                if self._hurry.is_set():
                    await asyncio.sleep(0.1)
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._hurry.wait(), backoff)
                backoff = min(backoff * 2, 5.0)

    async def flush_once(self) -> None:
        """Write up to ``flush_rows`` of each kind; rows go back on failure,
        except rows PostgreSQL refuses (``is_data_error``): those are found
        and dropped (counted), or one of them would fail every later flush."""
        async with self._flushing:
            await self._flush_once()

    async def _flush_once(self) -> None:
        assert self.pool is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        msgs = [self.messages.popleft() for _ in range(min(len(self.messages), self.flush_rows))]
        evts = [self.events.popleft() for _ in range(min(len(self.events), self.flush_rows))]
        bad_msgs = bad_evts = 0
        try:
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    if msgs:
                        await conn.copy_records_to_table(
                            "traffic_log", records=msgs, columns=MESSAGE_COLUMNS
                        )
                    if evts:
                        await conn.copy_records_to_table(
                            "delivery_events", records=evts, columns=EVENT_COLUMNS
                        )
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                async with self.pool.acquire() as conn, conn.transaction():
                    bad_msgs = await copy_dropping_refused(
                        conn, "traffic_log", msgs, MESSAGE_COLUMNS
                    )
                    bad_evts = await copy_dropping_refused(
                        conn, "delivery_events", evts, EVENT_COLUMNS
                    )
                log.warning("traffic_log_rows_refused", rows=bad_msgs + bad_evts)
                self._drop(bad_msgs + bad_evts)
        except BaseException:
            self.messages.extendleft(reversed(msgs))
            self.events.extendleft(reversed(evts))
            raise
        self._written_msgs += len(msgs)
        self._written_evts += len(evts)
        if self._barriers:
            self._release()
        metrics.TRAFFIC_LOG_WRITTEN.labels(table="traffic_log").inc(len(msgs) - bad_msgs)
        metrics.TRAFFIC_LOG_WRITTEN.labels(table="delivery_events").inc(len(evts) - bad_evts)
        metrics.TRAFFIC_LOG_FLUSH.observe(loop.time() - started)
