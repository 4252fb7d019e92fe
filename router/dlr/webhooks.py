"""Delivery webhooks: the final status of HTTP-originated messages, POSTed
to the message's ``callback_url`` (else the account's ``webhook_url``).

:class:`WebhookSender` is the :class:`~router.engine.ReceiptSink` for
``Origin.HTTP``. ``deliver`` is called by the engine, once per final status,
and never awaits: it snapshots what the webhook needs (the engine redacts a
secret message right after) and queues it in memory.

Delivery: one queue per account, served round-robin under a global limit
and a per-account and per-host limit, so one slow customer cannot starve
the others. Non-2xx answers, timeouts and connection errors are retried with
exponential backoff (``initial_backoff`` doubling up to ``max_backoff``)
until ``max_attempts`` or ``max_age``. At most ``max_pending`` webhooks wait
in memory.

Durability (with a database pool; issue #4): the ``webhook_outbox`` table
(migration 008) holds one row per pending webhook of a ``standard``
message, with the exact body to POST (the signature is recomputed over the
same bytes with a fresh timestamp). The write is deferred and batched, never
on the engine's path: every ``write_interval`` one transaction inserts the
jobs queued since the last write that are still pending, updates the rows
of failed attempts and deletes the rows of finished jobs. A job delivered
before that write (the common case: the first attempt starts at once) is
never written. A job whose attempt fails leaves memory: its row carries
``attempts`` and ``next_at`` (the retry time), and whichever node claims
it when due sends it (``FOR UPDATE SKIP LOCKED``, and ``next_at`` set to
now + ``lease`` as the claim, so two nodes never hold it at once; a claim
too close to its end is not attempted but left to lapse). After a crash,
rows come back when their lease lapses; a clean ``stop`` hands everything
still in memory back to the table at once. Over the memory bound, the
oldest waiting job is spilled to the table rather than dropped.

Guarantee: a webhook of a ``standard`` message that reached a final status
is POSTed until a 2xx, ``max_attempts`` or ``max_age`` (at least once),
across restarts, crashes and nodes, unless the process dies before the
writer cycle that follows the final status has committed its row (at most
``write_interval``, 1 s, plus one transaction; longer while the database
is unreachable, as the jobs then wait in memory) without a 2xx by then. A
clean ``stop`` loses none (its last write hands every job over), unless
that write fails. Duplicates are possible: a crash between a 2xx and the
row's delete, or a claim that lapses while its holder cannot write.

``secret`` messages never reach the table (their body carries a userref
and a status, which privacy.md 2 does not allow to outlive delivery): their
webhooks live in memory only, as do all webhooks without a pool, and are
lost on restart (counted as dropped).

Signature: ``X-SMSRouter-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret,
"<t>.<body>")>``. Each account's secret is derived from one router-wide key
(env ``ROUTER_WEBHOOK_SECRET``; a random one, lost on restart, when unset) by
:func:`webhook_secret`, so no secret is stored anywhere and rotating the
router key rotates every account's secret.

Never logs a URL beyond its host, a number, a body or a secret. Targets on
loopback, private and link-local addresses are refused unless
``allow_private_targets`` (tests, on-premise set-ups).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import hmac
import ipaddress
import itertools
import json
import os
import secrets
import socket
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
import asyncpg
import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from ..model import Delivery
from ..observe import metrics
from ..tasks import DB_ERRORS

log = structlog.get_logger("router.dlr.webhooks")

SIGNATURE_HEADER = "X-SMSRouter-Signature"
SECRET_ENV = "ROUTER_WEBHOOK_SECRET"
PER_ACCOUNT = 4  # deliveries in flight per account (one slow customer cannot take them all)
PER_HOST = 8  # connections per callback host


# ------------------------------------------------------------------ signing


def webhook_secret(master: bytes, account_id: int) -> str:
    """The webhook signing secret of one account, derived from the router key."""
    digest = hmac.new(master, f"sms-router/webhook/v1/{account_id}".encode(), hashlib.sha256)
    return "whsec_" + digest.hexdigest()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-SMSRouter-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify_signature(
    secret: str, header: str, body: bytes, now: float, tolerance: float = 300.0
) -> bool:
    """What a receiver does: check the MAC and that ``t`` is recent."""
    fields = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        t = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - t) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, t, body), f"t={t},v1={fields.get('v1', '')}")


# ---------------------------------------------------------------- targets


def _private(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host.lower() == "localhost" or host.lower().endswith(".localhost")
    return not addr.is_global


class _PublicResolver(AbstractResolver):
    """DNS answers minus non-public addresses (no webhook into the operator's LAN)."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        public = [r for r in found if not _private(r["host"])]
        if not public:
            raise OSError("webhook host resolves to no public address")
        return public

    async def close(self) -> None:
        await self._inner.close()


class AccountLookup(Protocol):
    @property
    def by_id(self) -> Mapping[int, Any]: ...


# ------------------------------------------------------------------- sender


@dataclass(slots=True, repr=False)
class _Job:
    seq: int
    message_id: str
    account_id: int
    url: str
    host: str
    body: bytes  # holds the number of a standard message
    created: float  # monotonic
    attempts: int = 0
    in_flight: bool = False
    done: bool = False  # left memory: finished, dropped, or handed to the outbox
    # The outbox (standard messages, with a pool); see the module docstring.
    durable: bool = False
    destination: str | None = None  # the body's "to" (digits), for erasure
    created_wall: float = 0.0
    key: uuid.UUID | None = None  # the row's id, chosen when first written
    row: bool = False  # its row is committed and claimed by us (we hold the job)
    lease_end: float | None = None  # monotonic end of our claim on the row
    handed: bool = False  # left memory for the outbox; its write is pending
    finished: bool = False  # delivered or given up: its row (if any) goes
    next_wall: float = 0.0  # retry time of a handed job
    # Called once it no longer rests on this process's memory: sent, given
    # up, dropped, or its outbox row committed (ReceiptSink.deliver).
    settled: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"_Job(id={self.message_id!r}, attempts={self.attempts})"

    def settle(self) -> None:
        done = self.settled
        if done is not None:
            self.settled = None
            done()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ts(wall: float) -> datetime:
    return datetime.fromtimestamp(wall, UTC)


# A job's row, whether the job is still attempted from memory (next_at NULL:
# leased to this node) or handed over (next_at: its retry time). A row for
# an account deleted meanwhile is skipped rather than failing the batch.
_INSERT = """
INSERT INTO webhook_outbox
    (id, account_id, message_id, url, destination, body, attempts, next_at, created_at)
SELECT u.id, u.account_id, u.message_id, u.url, u.destination, u.body, u.attempts,
       COALESCE(u.next_at, now() + make_interval(secs => $10)), u.created_at
FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::bytea[],
            $7::integer[], $8::timestamptz[], $9::timestamptz[])
     AS u(id, account_id, message_id, url, destination, body, attempts, next_at, created_at)
WHERE EXISTS (SELECT 1 FROM accounts a WHERE a.id = u.account_id)
ON CONFLICT (id) DO NOTHING
"""
_UPDATE = """
UPDATE webhook_outbox o SET attempts = u.attempts, next_at = u.next_at
FROM unnest($1::uuid[], $2::integer[], $3::timestamptz[]) AS u(id, attempts, next_at)
WHERE o.id = u.id
"""
_DELETE = "DELETE FROM webhook_outbox WHERE id = ANY($1::uuid[])"
# Due rows, oldest retry first; the lease is the claim (other nodes skip
# locked rows now and see next_at in the future afterwards).
_CLAIM = """
UPDATE webhook_outbox o SET next_at = now() + make_interval(secs => $2)
FROM (SELECT id FROM webhook_outbox WHERE next_at <= now()
      ORDER BY next_at LIMIT $1 FOR UPDATE SKIP LOCKED) due
WHERE o.id = due.id
RETURNING o.id, o.account_id, o.message_id, o.url, o.body, o.attempts,
          extract(epoch FROM now() - o.created_at)::float8 AS age
"""


class WebhookSender:
    """The ReceiptSink of HTTP-originated messages."""

    def __init__(
        self,
        accounts: AccountLookup,
        *,
        master_secret: str | bytes | None = None,
        env: Mapping[str, str] | None = None,
        initial_backoff: float = 30.0,
        max_backoff: float = 3600.0,
        max_attempts: int = 30,
        max_age: float = 24 * 3600.0,
        timeout: float = 10.0,
        max_pending: int = 100_000,
        max_concurrency: int = 64,
        per_account: int = PER_ACCOUNT,
        per_host: int = PER_HOST,
        allow_private_targets: bool = False,
        pool: asyncpg.Pool | None = None,
        write_interval: float = 1.0,
        poll_interval: float = 1.0,
        lease: float = 120.0,
        claim_batch: int = 256,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if min(max_attempts, max_pending, max_concurrency, per_account, per_host, claim_batch) < 1:
            raise ValueError("limits must be >= 1")
        if min(write_interval, poll_interval) <= 0:
            raise ValueError("write_interval and poll_interval must be > 0")
        self.accounts = accounts
        env = os.environ if env is None else env
        if master_secret is None:
            master_secret = env.get(SECRET_ENV) or None
        if master_secret is None:
            master_secret = secrets.token_hex(32)
            log.warning(
                "webhook_signing_key_generated",
                hint=f"set {SECRET_ENV} so signatures survive restarts and agree across nodes",
            )
        self._master = master_secret.encode() if isinstance(master_secret, str) else master_secret
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.max_attempts = max_attempts
        self.max_age = max_age
        self.timeout = timeout
        self.max_pending = max_pending
        self.max_concurrency = max_concurrency
        self.per_account = per_account
        self.per_host = per_host
        self.allow_private_targets = allow_private_targets
        self.pool = pool
        self.write_interval = write_interval
        self.poll_interval = poll_interval
        self.lease = lease
        self.claim_batch = claim_batch
        if pool is not None and lease <= self._lease_margin:
            raise ValueError("lease must exceed timeout + write_interval + 5 s")
        self.clock = clock
        self.wall = wall
        self._seq = itertools.count()
        self._pending: OrderedDict[int, _Job] = OrderedDict()  # seq order == age order
        self._ready: dict[int, deque[_Job]] = {}  # account -> jobs due now
        self._retry: list[tuple[float, int, _Job]] = []  # (due, seq, job): memory-only jobs
        self._active_account: dict[int, int] = {}
        self._active_host: dict[str, int] = {}
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._seen: OrderedDict[str, None] = OrderedDict()  # ids already given a webhook
        self._seen_limit = 200_000
        self._wake: asyncio.Event | None = None
        self._runner: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        # The outbox: what the next write does, and the rows held in memory.
        self._unwritten: list[_Job] = []  # durable jobs without a row yet
        self._updates: dict[uuid.UUID, tuple[uuid.UUID, int, datetime]] = {}
        self._deletes: list[uuid.UUID] = []
        self._held: dict[uuid.UUID, _Job] = {}  # rows whose job is in memory
        self._spilled = 0  # handed jobs whose insert is pending (bounded)
        self._store_task: asyncio.Task[None] | None = None
        self._store_wake: asyncio.Event | None = None
        self._poll_at = 0.0
        self._closing = False
        self.healthy = True  # the last outbox write/claim succeeded
        self.rows_inserted = 0  # outbox rows this sender wrote (tests, diagnostics)

    @property
    def _lease_margin(self) -> float:
        # An attempt, then the write that records its outcome, must end
        # inside the claim, or another node could take the row meanwhile.
        return self.timeout + self.write_interval + 5.0

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start sending (call inside the running loop)."""
        self._wake = asyncio.Event()
        connector = aiohttp.TCPConnector(
            limit=self.max_concurrency,
            limit_per_host=self.per_host,
            resolver=None if self.allow_private_targets else _PublicResolver(),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": "sms-router-webhooks/1"},
            timeout=aiohttp.ClientTimeout(total=self.timeout),
        )
        loop = asyncio.get_running_loop()
        self._runner = loop.create_task(self._run())
        if self.pool is not None:
            self._closing = False
            self._store_wake = asyncio.Event()
            self._poll_at = self.clock()  # resume what the table holds at once
            self._store_task = loop.create_task(self._store(), name="webhook-outbox")
        if self._ready or self._retry:
            self._wake.set()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop: let requests in flight finish for ``grace`` seconds; hand
        every durable job still in memory back to the outbox (due now); forget
        the rest."""
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=grace)
            for t in late:
                t.cancel()
            if late:
                await asyncio.wait(late)
        if self._store_task is not None:
            self._closing = True
            assert self._store_wake is not None
            self._store_wake.set()
            try:
                await asyncio.wait_for(self._store_task, grace)
            except TimeoutError:
                pass  # cancelled by wait_for; _flush restored its batch
            self._store_task = None
            now = self.wall()
            for job in [j for j in self._pending.values() if j.durable]:
                self._hand_over(job, now)
            try:
                await asyncio.wait_for(self._flush(), grace)
            except DB_ERRORS as exc:  # TimeoutError included
                lost = sum(1 for j in self._unwritten if j.handed)
                log.error("webhook_outbox_final_write_failed", error=type(exc).__name__, lost=lost)
                if lost:
                    metrics.RECEIPTS_OUT.labels("webhook", "dropped").inc(lost)
            self._unwritten.clear()
            self._updates.clear()
            self._deletes.clear()
            self._held.clear()
            self._spilled = 0
        lost = len(self._pending)
        if lost:
            log.warning("webhooks_abandoned_on_stop", count=lost)
            metrics.RECEIPTS_PENDING.dec(lost)
            metrics.RECEIPTS_OUT.labels("webhook", "dropped").inc(lost)
        self._pending.clear()
        self._ready.clear()
        self._retry.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------ the sink

    def secret_for(self, account_id: int) -> str:
        return webhook_secret(self._master, account_id)

    @property
    def pending(self) -> int:
        """Webhooks held in memory (outbox rows not claimed by us excluded)."""
        return len(self._pending)

    def deliver(self, delivery: Delivery, done: Callable[[], None] | None = None) -> None:
        """Queue the webhook of a final status. Never awaits, never raises.
        ``done``: once it is sent, given up, or its outbox row (a standard
        message's) is committed; at once if there is none to send
        (ReceiptSink.deliver)."""
        msg = delivery.message
        url = msg.callback_url
        if url is None:
            account = self.accounts.by_id.get(msg.account_id)
            url = getattr(account, "webhook_url", None)
        if (
            not url
            # Only final statuses leave; a transient one never follows a final one.
            or not delivery.status.final
            # One webhook per message: a final state is never overwritten.
            or msg.id in self._seen
        ):
            if done is not None:
                done()
            return
        try:
            host = URL(url).host or ""
        except ValueError:
            host = ""
        self._seen[msg.id] = None
        if len(self._seen) > self._seen_limit:
            self._seen.popitem(last=False)
        payload: dict[str, Any] = {"id": msg.id, "userref": msg.userref}
        if not msg.secret:
            payload["to"] = "+" + msg.destination
        payload.update(
            status=delivery.status.value,
            error=delivery.error,
            time=_iso(delivery.updated_at or self.wall()),
        )
        durable = self.pool is not None and not msg.secret
        job = _Job(
            seq=next(self._seq),
            message_id=msg.id,
            account_id=msg.account_id,
            url=url,
            host=host,
            body=json.dumps(payload, separators=(",", ":")).encode(),
            created=self.clock(),
            durable=durable,
            destination=msg.destination if durable else None,
            created_wall=self.wall() if durable else 0.0,
            settled=done,
        )
        if len(self._pending) >= self.max_pending and not self._drop_oldest():
            self._count("dropped")
            job.settle()
            return
        self._add(job)
        if durable:
            self._unwritten.append(job)
        if self._wake is not None:
            self._wake.set()

    # ---------------------------------------------------------- internals

    def _count(self, outcome: str) -> None:
        metrics.RECEIPTS_OUT.labels("webhook", outcome).inc()

    def _add(self, job: _Job) -> None:
        self._pending[job.seq] = job
        metrics.RECEIPTS_PENDING.inc()
        self._ready.setdefault(job.account_id, deque()).append(job)

    def _leave(self, job: _Job) -> None:
        """Out of memory (lazily skipped in _ready / _retry)."""
        job.done = True
        if self._pending.pop(job.seq, None) is not None:
            metrics.RECEIPTS_PENDING.dec()
        if job.key is not None:
            self._held.pop(job.key, None)

    def _drop_oldest(self) -> bool:
        for job in self._pending.values():
            if job.in_flight:
                continue
            if job.durable:
                # Spilled to the outbox, not lost: it comes back when claimed.
                self._hand_over(job, self.wall())
            else:
                self._leave(job)
                self._count("dropped")
                job.settle()
            return True
        return False

    def _finish(self, job: _Job, outcome: str) -> None:
        self._leave(job)
        job.settle()
        job.finished = True
        if job.row:
            assert job.key is not None
            self._deletes.append(job.key)
        self._count(outcome)

    def _hand_over(self, job: _Job, due: float, *, soon: bool = False) -> None:
        """A durable job leaves memory; its row (written next) says when it
        is due. ``soon``: a retry, so claim it back on time."""
        self._leave(job)
        if job.row:
            assert job.key is not None
            self._updates[job.key] = (job.key, job.attempts, _ts(due))
        elif self._spilled >= self.max_pending:
            # The database has not taken the last max_pending of these.
            log.warning("webhook_outbox_backlog_full", id=job.message_id)
            self._count("dropped")
            job.settle()
            return
        else:
            job.handed = True
            job.next_wall = due
            self._spilled += 1
        if not soon:
            return
        # Claim it back in time (the write comes first in the same cycle).
        due_mono = self.clock() + max(0.0, due - self.wall())
        if due_mono < self._poll_at and self._store_wake is not None:
            self._poll_at = due_mono
            self._store_wake.set()

    def _lapsed(self, job: _Job) -> bool:
        """A job whose claim ends too soon for one more attempt is left to
        lapse (whoever claims the row next sends it), never sent late."""
        if job.lease_end is None or self.clock() + self._lease_margin <= job.lease_end:
            return False
        self._leave(job)
        return True

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            now = self.clock()
            while self._retry and self._retry[0][0] <= now:
                _, _, job = heapq.heappop(self._retry)
                if not job.done:
                    self._ready.setdefault(job.account_id, deque()).append(job)
            self._dispatch()
            delay = max(0.0, self._retry[0][0] - now) if self._retry else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def _dispatch(self) -> None:
        """Start due jobs round-robin across accounts within every limit."""
        progress = True
        while progress and self._in_flight < self.max_concurrency:
            progress = False
            for account_id in list(self._ready):
                if self._in_flight >= self.max_concurrency:
                    return
                q = self._ready[account_id]
                while q and (q[0].done or self._lapsed(q[0])):
                    q.popleft()
                if not q:
                    del self._ready[account_id]
                    continue
                if self._active_account.get(account_id, 0) >= self.per_account:
                    continue
                job = q[0]
                if self._active_host.get(job.host, 0) >= self.per_host:
                    continue
                q.popleft()
                # Rotate: this account goes behind the others.
                del self._ready[account_id]
                if q:
                    self._ready[account_id] = q
                self._launch(job)
                progress = True

    def _launch(self, job: _Job) -> None:
        job.in_flight = True
        self._in_flight += 1
        self._active_account[job.account_id] = self._active_account.get(job.account_id, 0) + 1
        self._active_host[job.host] = self._active_host.get(job.host, 0) + 1
        task = asyncio.get_running_loop().create_task(self._attempt(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _attempt(self, job: _Job) -> None:
        status: int | None = None
        retry_after: float | None = None
        try:
            if not self.allow_private_targets and _private(job.host):
                log.warning("webhook_target_refused", host=job.host, id=job.message_id)
                self._finish(job, "failed")
                return
            status, retry_after = await self._post(job)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.info(
                "webhook_attempt_failed",
                host=job.host,
                id=job.message_id,
                error=type(exc).__name__,
                attempt=job.attempts + 1,
            )
        finally:
            job.in_flight = False
            self._in_flight -= 1
            self._active_account[job.account_id] -= 1
            if not self._active_account[job.account_id]:
                del self._active_account[job.account_id]
            self._active_host[job.host] -= 1
            if not self._active_host[job.host]:
                del self._active_host[job.host]
            if self._wake is not None:
                self._wake.set()
        if job.done:
            return
        if status is not None and 200 <= status < 300:
            self._finish(job, "ok")
            return
        job.attempts += 1
        delay = min(self.initial_backoff * 2 ** (job.attempts - 1), self.max_backoff)
        if retry_after is not None:
            delay = min(max(delay, retry_after), self.max_backoff)
        if job.attempts >= self.max_attempts or self.clock() + delay - job.created > self.max_age:
            log.warning(
                "webhook_given_up",
                host=job.host,
                id=job.message_id,
                attempts=job.attempts,
                status=status,
            )
            self._finish(job, "failed")
            return
        self._count("retry")
        if job.durable:
            self._hand_over(job, self.wall() + delay, soon=True)
            return
        heapq.heappush(self._retry, (self.clock() + delay, job.seq, job))

    async def _post(self, job: _Job) -> tuple[int, float | None]:
        assert self._session is not None
        t = int(self.wall())
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.secret_for(job.account_id), t, job.body),
        }
        async with self._session.post(
            job.url, data=job.body, headers=headers, allow_redirects=False
        ) as resp:
            with contextlib.suppress(aiohttp.ClientError):
                await resp.content.readany()  # a token read; the body is not needed
            retry_after: float | None = None
            raw = resp.headers.get("Retry-After", "")
            if raw.isdigit():
                retry_after = float(raw)
            return resp.status, retry_after

    # ----------------------------------------------------------- the outbox

    async def _store(self) -> None:
        """Write the outbox every ``write_interval``; claim due rows every
        ``poll_interval`` (sooner when a handed job is due sooner). One task,
        so a claim always sees the writes queued before it."""
        assert self._store_wake is not None
        flush_at = self.clock() + self.write_interval
        count_at = self.clock()
        failures = 0
        while not self._closing:
            wait = min(flush_at, self._poll_at) - self.clock()
            if wait > 0:
                self._store_wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._store_wake.wait(), wait)
                continue
            try:
                # New jobs are written on the interval only; a claim that
                # comes first writes just what it must see (retries, deletes).
                fresh = self.clock() >= flush_at
                await self._flush(fresh=fresh)
                if fresh:
                    flush_at = self.clock() + self.write_interval
                if self.clock() >= self._poll_at and not self._closing:
                    await self._claim()
                    self._poll_at = self.clock() + self.poll_interval
                if self.clock() >= count_at:
                    rows = await self._pool().fetchval("SELECT count(*) FROM webhook_outbox")
                    metrics.WEBHOOK_OUTBOX_ROWS.set(rows)
                    count_at = self.clock() + 10.0
                self.healthy = True
                failures = 0
            except Exception as exc:  # the database, mostly; the loop must outlive it
                self.healthy = False
                failures += 1
                log.warning("webhook_outbox_unavailable", error=type(exc).__name__)
                flush_at = self.clock() + min(self.write_interval * 2**failures, 30.0)
                self._poll_at = max(self._poll_at, flush_at)

    def _pool(self) -> asyncpg.Pool:
        assert self.pool is not None
        return self.pool

    async def _flush(self, *, fresh: bool = True) -> None:
        """One transaction: new rows, then retries' updates, then deletes.
        On any failure (or cancellation) the batch goes back to be retried:
        every statement is idempotent, so a commit whose answer was lost
        does no harm. ``row`` is set only once the insert is committed.
        ``fresh=False`` leaves jobs still in memory for the next interval."""
        if not (self._unwritten or self._updates or self._deletes):
            return
        start = self.clock()
        inserts = [j for j in self._unwritten if j.handed or (fresh and not j.done)]
        keep = [] if fresh else [j for j in self._unwritten if not (j.done or j.handed)]
        self._unwritten = keep
        if not (inserts or self._updates or self._deletes):
            return
        handed = [j.handed for j in inserts]  # as written: its due, else leased to us
        updates, deletes = self._updates, self._deletes
        self._updates, self._deletes = {}, []
        for j in inserts:
            if j.key is None:
                j.key = uuid.uuid4()
        try:
            async with self._pool().acquire() as conn, conn.transaction():
                if inserts:
                    status = await conn.execute(
                        _INSERT,
                        [j.key for j in inserts],
                        [j.account_id for j in inserts],
                        [j.message_id for j in inserts],
                        [j.url for j in inserts],
                        [j.destination for j in inserts],
                        [j.body for j in inserts],
                        [j.attempts for j in inserts],
                        [
                            _ts(j.next_wall) if h else None
                            for j, h in zip(inserts, handed, strict=True)
                        ],
                        [_ts(j.created_wall) for j in inserts],
                        self.lease,
                    )
                    self.rows_inserted += int(status.rsplit(" ", 1)[-1])
                if updates:
                    rows = list(updates.values())
                    await conn.execute(
                        _UPDATE, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
                    )
                if deletes:
                    await conn.execute(_DELETE, deletes)
        except BaseException:
            self._unwritten[:0] = inserts  # order is not needed, only membership
            for k, v in updates.items():
                self._updates.setdefault(k, v)  # one queued meanwhile is newer
            self._deletes[:0] = deletes
            raise
        for j, was_handed in zip(inserts, handed, strict=True):
            assert j.key is not None
            j.settle()
            if was_handed:
                self._spilled -= 1
            elif not j.done:
                j.row = True
                j.lease_end = start + self.lease
                self._held[j.key] = j
            elif j.handed:  # failed while its row was being written: record the retry
                self._spilled -= 1
                self._updates[j.key] = (j.key, j.attempts, _ts(j.next_wall))
            elif j.finished:  # delivered (or given up) meanwhile
                self._deletes.append(j.key)

    async def _claim(self) -> None:
        """Take due rows into memory, within the memory bound and no more
        than can be sent soon (a claim must not lapse while queued)."""
        queued = sum(len(q) for q in self._ready.values())
        room = min(self.claim_batch - queued, self.max_pending - len(self._pending))
        if room <= 0:
            return
        start = self.clock()
        rows = await self._pool().fetch(_CLAIM, room, self.lease)
        for r in rows:
            key: uuid.UUID = r["id"]
            held = self._held.get(key)
            if held is not None:  # its claim had lapsed here and we took it again
                held.lease_end = start + self.lease
                continue
            try:
                host = URL(r["url"]).host or ""
            except ValueError:
                host = ""
            job = _Job(
                seq=next(self._seq),
                message_id=r["message_id"],
                account_id=r["account_id"],
                url=r["url"],
                host=host,
                body=bytes(r["body"]),
                created=start - r["age"],
                attempts=r["attempts"],
                durable=True,
                key=key,
                row=True,
                lease_end=start + self.lease,
            )
            if job.attempts >= self.max_attempts or r["age"] > self.max_age:
                log.warning("webhook_given_up", host=host, id=job.message_id, attempts=job.attempts)
                self._deletes.append(key)
                self._count("failed")
                continue
            self._held[key] = job
            self._add(job)
        if rows and self._wake is not None:
            self._wake.set()
