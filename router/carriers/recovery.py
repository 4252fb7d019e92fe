"""Receipts matched to their message through PostgreSQL, in batches.

A carrier receipt this node holds no submission for in memory is one sent
over this node's bind for a message another node submitted (carriers use
any bind of the system_id), one for a message from before a restart, or one
whose wait was let go (``delivery.receipt_memory``). Its message is found in
``receipt_routes``. The submitting node writes that row a few milliseconds
after the submit_sm_resp, later when the database is busy, so a receipt may
have to be looked up again.

One query answers every receipt waiting (a few hundred at most per query;
one query in flight at a time). A query per receipt, as before, had two
nodes sharing a carrier account spend a pool connection per crossing
receipt: under load the lookups held every connection, the owner's route
writes queued behind them, lookups found nothing, were repeated, and after
the last try (3 s) the receipt was dropped (measured: 10 of 46,912 receipts
lost in 30 s, receipt p99 13 s, 979 msg/s). Now a receipt is looked up
at once, then every 50 ms for 0.5 s, every 100 ms until 1 s, every 250 ms
until 2 s, then 0.5, 1, 2 and 3 s after the previous try (a round costs one
query for all waiting, so trying often is cheap and keeps the receipt's
delay short: measured, the route rows appeared 0.2-0.4 s after the receipt
under load, which the former 0/0.1/0.25/0.5/1 s steps overshot by up to
0.5 s),
then every 5 s until ``ttl`` (the correlator's early_ttl, 120 s); then it is
counted in ``smsrouter_carrier_receipts_unmatched_total``. How long the
found ones waited: ``smsrouter_carrier_receipt_route_wait_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from ..observe import metrics
from ..tasks import DB_ERRORS, cancel_and_wait
from .receipt import CarrierReceipt, alternate_forms, normalise_carrier_id

log = structlog.get_logger("router.receipts")

DELAYS = (0.0,) + (0.05,) * 10 + (0.1,) * 5 + (0.25,) * 4 + (0.5, 1.0, 2.0, 3.0)
THEN_EVERY = 5.0

# (carrier, carrier id forms) per receipt -> its receipt_routes row or None, in order.
FindRoutes = Callable[[Sequence[tuple[str, list[str]]]], Awaitable[list[Any]]]


@dataclass(eq=False)
class Waiting:
    carrier: str
    receipt: CarrierReceipt
    forwarded: bool  # handed here by the node that got it (not parked here)
    since: float
    due: float
    tries: int = 0
    # Called once it is resolved (its status logged) or given up: a
    # forwarded receipt's hand-off row goes then (ReceiptHandoff._logged).
    done: Callable[[], None] | None = None

    def give_up(self) -> None:
        done, self.done = self.done, None
        if done is not None:
            done()


class RouteRecovery:
    """Receipts waiting for their ``receipt_routes`` row.

    ``resolve(waiting, row)`` is awaited for each one found; ``wanted(waiting)``
    says whether it still needs looking up (False once our own submit_sm_resp
    matched it meanwhile)."""

    def __init__(
        self,
        find_routes: FindRoutes,
        resolve: Callable[[Waiting, Any], Awaitable[None]],
        wanted: Callable[[Waiting], bool],
        *,
        ttl: float = 120.0,
        batch: int = 500,
        delays: Sequence[float] = DELAYS,
        then_every: float = THEN_EVERY,
        max_waiting: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.find_routes = find_routes
        self.resolve = resolve
        self.wanted = wanted
        self.ttl = ttl
        self.batch = batch
        self.delays = tuple(delays)
        self.then_every = then_every
        self.max_waiting = max_waiting
        self.clock = clock
        self.waiting: list[Waiting] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def __len__(self) -> int:
        return len(self.waiting)

    def add(
        self,
        carrier: str,
        receipt: CarrierReceipt,
        forwarded: bool = False,
        done: Callable[[], None] | None = None,
    ) -> None:
        now = self.clock()
        if len(self.waiting) >= self.max_waiting:
            # A flood of receipts nobody here sent (a carrier replaying, a
            # wiped database): memory and lookups stay bounded; oldest out.
            dropped = self.waiting.pop(0)
            metrics.RECEIPTS_UNMATCHED.labels(carrier=dropped.carrier).inc()
            dropped.give_up()
        self.waiting.append(Waiting(carrier, receipt, forwarded, now, now, done=done))
        self._wake.set()
        if not self._stopped and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="receipt-route-recovery"
            )

    async def stop(self) -> None:
        self._stopped = True  # a receipt handed over during shutdown starts no task
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            now = self.clock()
            next_due = min((w.due for w in self.waiting), default=None)
            if next_due is None or next_due > now:
                self._wake.clear()
                timeout = None if next_due is None else next_due - now
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                continue
            try:
                await self.run_once()
            except DB_ERRORS as exc:
                log.warning(
                    "receipt_recovery_failed", error=type(exc).__name__, waiting=len(self.waiting)
                )
                await asyncio.sleep(1.0)

    async def run_once(self) -> int:
        """Look up every receipt that is due (in batches); the number found."""
        now = self.clock()
        keep: list[Waiting] = []
        due: list[Waiting] = []
        for w in self.waiting:
            if not w.forwarded and not self.wanted(w):
                continue  # our own submit_sm_resp came and matched it
            if now - w.since > self.ttl:
                metrics.RECEIPTS_UNMATCHED.labels(carrier=w.carrier).inc()
                w.give_up()
                continue
            (due if w.due <= now else keep).append(w)
        # Receipts added while a query runs are kept: self.waiting is swapped first.
        self.waiting = keep
        found = 0
        try:
            while due:
                chunk = due[: self.batch]
                rows = await self.find_routes(
                    [(w.carrier, _forms(w.receipt.carrier_id)) for w in chunk]
                )
                del due[: len(chunk)]
                later = self.clock()
                for w, row in zip(chunk, rows, strict=True):
                    if row is None:
                        w.tries += 1
                        delays = self.delays
                        w.due = later + (
                            delays[w.tries] if w.tries < len(delays) else self.then_every
                        )
                        self.waiting.append(w)
                        continue
                    try:
                        await self.resolve(w, row)
                    except DB_ERRORS as exc:
                        log.warning("receipt_recovery_failed", error=type(exc).__name__)
                        w.due = later + 1.0
                        self.waiting.append(w)
                        continue
                    found += 1
                    metrics.RECEIPT_ROUTE_WAIT.observe(later - w.since)
        finally:
            self.waiting.extend(due)  # not looked up (a failed query): next round
        return found


def _forms(carrier_id: str) -> list[str]:
    return [normalise_carrier_id(carrier_id), *alternate_forms(carrier_id)]
