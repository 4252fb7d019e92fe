"""Messages whose carrier receipt never comes are finished as ``unknown``.

Carriers lose receipts, and some never send them for some destinations.
Without an end, such a message would stay ``submitted`` for ever: its
submitter never learns that no news will come, and its receipt route would
sit in ``receipt_routes`` until retention deletes it after 8 days.

Each route row carries ``expect_by`` = the end of its message's validity
(a carrier takes a message only before that) + ``delivery.receipt_timeout``
(1 h by default): a carrier gives up on a message at its validity end and
its EXPIRED receipt should follow soon after. Every ``interval`` seconds each
node claims overdue routes -- ``UPDATE ... RETURNING``, all routes of each
message at once, so a message is finished by one node, once -- and the
engine finishes the message as ``unknown`` with error ``no_receipt``: a
deliver_sm receipt with stat:UNKNOWN (message_state 7) to an SMPP submitter
that asked for receipts, a webhook with status ``unknown`` to an HTTP one,
the traffic log's status. A node claims only its own routes, those of no
node and those of nodes not alive (router.ingress.handoff): a live node may
still hold the message in memory and must finish it itself.

They are counted in ``smsrouter_messages_final_total{status="unknown"}``
(per carrier: a carrier that stops sending receipts shows there). The claim
is a lease (``expect_by`` moves 5 minutes ahead); the routes are deleted
once the traffic log holds the finish (Engine._forget_route). A claim
whose finish never ran (the node died, or lost the claim's answer with its connection) is
claimed again when the lease ends. Once finished, the ``unknown`` receipt
or webhook has the guarantees of any receipt (its routes stay until it is
safe, Engine._finish). Between the claim and the
delete (a fraction of a second) a very late carrier receipt that reaches
another node could still find the route and finish the message there too.

A route can also outlive its message's final receipt: the route that
ended the message is deleted only once the traffic log holds the final
status and the submitter's receipt is safe (answered by the customer,
parked, in the webhook outbox: Engine._finish); a router that goes down
in between leaves the route, and may not have sent the submitter its
receipt. Such a message is not
finished as ``unknown``: the claim brings the newest final status the
traffic log holds for it, and the message is finished again with that
status, time and error (the submitter may get the receipt twice: at least
once), without logging it again. And not only at the deadline: ``resend_finished``
runs once, ``resend_delay`` after a start, over the routes the node wrote
in its previous life, so that those receipts follow the restart within
seconds, and over all the routes of a dead node when it is adopted
(``resend_for``: it may never come back, or under another name). Both
need the traffic log (``database.traffic_log``); without it a route left
so ends as ``unknown`` at its deadline.

``unknown`` is final: a receipt arriving later finds no route and is counted
in ``smsrouter_carrier_receipts_unmatched_total``. In ``in-memory`` mode
there are no routes; a message is finished as ``unknown`` when it leaves
memory (``delivery.receipt_memory``, see Engine.release_receipt_waits).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Collection, Sequence
from typing import Any

import structlog

from ..tasks import DB_ERRORS, Periodic, cancel_and_wait

log = structlog.get_logger("router.carriers.deadline")

Claim = Callable[[Sequence[str], int], Any]  # (live nodes, limit) -> awaitable rows
# (after message id, limit, node and the time it was adopted: None for this
# node's previous life) -> awaitable route rows with their messages' logged
# final status (PgSpool.finished_routes)
Finished = Callable[[str, int, tuple[str, dt.datetime] | None], Any]


class ReceiptDeadlines(Periodic):
    name = "receipt_deadlines"

    def __init__(
        self,
        claim: Claim,
        finish: Callable[[Sequence[Any]], int],
        live_nodes: Callable[[], Collection[str]],
        *,
        interval: float = 30.0,
        batch: int = 1000,
        finished: Finished | None = None,
        resend_delay: float = 2.0,
    ) -> None:
        super().__init__(interval)
        self.claim = claim
        self.finish = finish
        self.live_nodes = live_nodes
        self.batch = batch
        self.finished = finished
        self.resend_delay = resend_delay
        self._resend: asyncio.Task[None] | None = None
        self._adopted: set[asyncio.Task[None]] = set()
        self._stopped = False

    def start(self) -> None:
        super().start()
        if self.finished is not None and self._resend is None:
            self._resend = asyncio.get_running_loop().create_task(
                self._resend_after_restart(), name="receipts-resend"
            )

    async def stop(self) -> None:
        self._stopped = True  # a node adopted from now on waits for its deadlines
        await cancel_and_wait(self._resend)
        self._resend = None
        for task in list(self._adopted):
            await cancel_and_wait(task)
        await super().stop()

    def resend_for(self, node: str, adopted_at: dt.datetime) -> None:
        """A dead node was adopted (PgSpool.adopt_orphans) at ``adopted_at``:
        send again the receipts its crash left unsent in the routes it wrote
        before, as its own restart would have (it may never restart, or come
        back under another name)."""
        if self.finished is None or self._stopped:
            return
        task = asyncio.get_running_loop().create_task(
            self._resend_after_restart((node, adopted_at)), name="receipts-resend-adopted"
        )
        self._adopted.add(task)
        task.add_done_callback(self._adopted.discard)

    async def _resend_after_restart(self, node: tuple[str, dt.datetime] | None = None) -> None:
        """Once, ``resend_delay`` after start (customers rebind meanwhile;
        a receipt for one not bound is parked as always), until done."""
        await asyncio.sleep(self.resend_delay)
        while True:
            try:
                await self.resend_finished(node)
                return
            except DB_ERRORS as exc:
                log.warning("receipts_resend_failed", error=type(exc).__name__)
                await asyncio.sleep(self.interval)

    async def resend_finished(self, node: tuple[str, dt.datetime] | None = None) -> int:
        """The routes this node left behind when it went down whose message
        has a final status in the traffic log: the router stopped between
        logging that status and deleting the routes (within a fraction of a
        second), perhaps before the submitter had its receipt. Each such
        message is finished again with its logged status (a receipt or
        webhook, at least once) and its routes deleted, now rather than as
        ``unknown`` at its deadline. Pages of ``batch`` messages, in id
        order; how many were finished. ``node``: a dead node's routes
        written before it was adopted (node, time), rather than this node's
        previous life's."""
        assert self.finished is not None
        after, total = "", 0
        while True:
            rows = await self.finished(after, self.batch, node)
            if not rows:
                break
            after = rows[-1]["message_id"]
            done = [r for r in rows if r["final_status"] is not None]
            if done:
                total += self.finish(done)
            if len({r["message_id"] for r in rows}) < self.batch:
                break
            await asyncio.sleep(0)  # a large backlog must not hold the loop
        if total:
            log.info("final_receipts_resent", messages=total)
        return total

    async def run_once(self) -> int:
        """Finish every message now overdue; how many were finished. On a
        database error the claim did not commit: the next round takes them."""
        total = 0
        while True:
            rows = await self.claim(list(self.live_nodes()), self.batch)
            if not rows:
                break
            finished = self.finish(rows)
            total += finished
            if len(rows) < self.batch:
                break
            await asyncio.sleep(0)  # a large backlog must not hold the loop
        if total:
            log.info("receipts_never_came", messages=total)
        return total
