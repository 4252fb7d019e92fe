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
is a lease (``expect_by`` moves 5 minutes ahead); the routes are deleted in
the spool's next upkeep round after the finish. A claim whose finish never
ran (the node died, or lost the claim's answer with its connection) is
claimed again when the lease ends. Once finished, the ``unknown`` receipt
or webhook has the guarantees of any receipt (README, "Not done yet": an
SMPP receipt waiting for a bind lives in memory). Between the claim and the
delete (a fraction of a second) a very late carrier receipt that reaches
another node could still find the route and finish the message there too.

``unknown`` is final: a receipt arriving later finds no route and is counted
in ``smsrouter_carrier_receipts_unmatched_total``. In ``in-memory`` mode
there are no routes; a message is finished as ``unknown`` when it leaves
memory (``delivery.receipt_memory``, see Engine.release_receipt_waits).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Sequence
from typing import Any

import structlog

from ..tasks import Periodic

log = structlog.get_logger("router.carriers.deadline")

Claim = Callable[[Sequence[str], int], Any]  # (live nodes, limit) -> awaitable rows


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
    ) -> None:
        super().__init__(interval)
        self.claim = claim
        self.finish = finish
        self.live_nodes = live_nodes
        self.batch = batch

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
