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
until ``max_attempts`` or ``max_age``. At most ``max_pending`` webhooks wait;
beyond that the oldest waiting one is dropped (metric outcome=dropped).
Pending webhooks live in memory only and are lost on restart.

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
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from ..model import Delivery
from ..observe import metrics

log = structlog.get_logger("router.dlr.webhooks")

SIGNATURE_HEADER = "X-SMSRouter-Signature"
SECRET_ENV = "ROUTER_WEBHOOK_SECRET"


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
    body: bytes  # holds the number of a standard message: memory only
    created: float  # monotonic
    attempts: int = 0
    in_flight: bool = False
    done: bool = False

    def __repr__(self) -> str:
        return f"_Job(id={self.message_id!r}, attempts={self.attempts})"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
        per_account: int = 4,
        per_host: int = 8,
        allow_private_targets: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if min(max_attempts, max_pending, max_concurrency, per_account, per_host) < 1:
            raise ValueError("limits must be >= 1")
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
        self.clock = clock
        self.wall = wall
        self._seq = itertools.count()
        self._pending: OrderedDict[int, _Job] = OrderedDict()  # seq order == age order
        self._ready: dict[int, deque[_Job]] = {}  # account -> jobs due now
        self._retry: list[tuple[float, int, _Job]] = []  # (due, seq, job)
        self._active_account: dict[int, int] = {}
        self._active_host: dict[str, int] = {}
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._seen: OrderedDict[str, None] = OrderedDict()  # ids already given a webhook
        self._seen_limit = 200_000
        self._wake: asyncio.Event | None = None
        self._runner: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

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
        self._runner = asyncio.get_running_loop().create_task(self._run())
        if self._ready or self._retry:
            self._wake.set()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop: let requests in flight finish for ``grace`` seconds; forget the rest."""
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
        return len(self._pending)

    def deliver(self, delivery: Delivery) -> None:
        """Queue the webhook of a final status. Never awaits, never raises."""
        if not delivery.status.final:
            return  # only final statuses leave; a transient one never follows a final one
        msg = delivery.message
        if msg.id in self._seen:
            return  # one webhook per message: a final state is never overwritten
        url = msg.callback_url
        if url is None:
            account = self.accounts.by_id.get(msg.account_id)
            url = getattr(account, "webhook_url", None)
        if not url:
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
        job = _Job(
            seq=next(self._seq),
            message_id=msg.id,
            account_id=msg.account_id,
            url=url,
            host=host,
            body=json.dumps(payload, separators=(",", ":")).encode(),
            created=self.clock(),
        )
        if len(self._pending) >= self.max_pending and not self._drop_oldest():
            self._count("dropped")
            return
        self._pending[job.seq] = job
        metrics.RECEIPTS_PENDING.inc()
        self._ready.setdefault(job.account_id, deque()).append(job)
        if self._wake is not None:
            self._wake.set()

    # ---------------------------------------------------------- internals

    def _count(self, outcome: str) -> None:
        metrics.RECEIPTS_OUT.labels("webhook", outcome).inc()

    def _drop_oldest(self) -> bool:
        for seq, job in self._pending.items():
            if not job.in_flight:
                del self._pending[seq]
                job.done = True  # lazily skipped in _ready / _retry
                metrics.RECEIPTS_PENDING.dec()
                self._count("dropped")
                return True
        return False

    def _finish(self, job: _Job, outcome: str) -> None:
        job.done = True
        if self._pending.pop(job.seq, None) is not None:
            metrics.RECEIPTS_PENDING.dec()
        self._count(outcome)

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
                while q and q[0].done:
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
