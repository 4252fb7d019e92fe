"""Receipts across routers sharing one database.

A delivery receipt goes to a receiver or transceiver bind of the account
that submitted the message. With several routers (nodes) behind a load
balancer, that account's receiving binds may all be on another node than
the one that finished the message. This module carries such receipts over:

- each node publishes, per account, how many receiving binds it holds
  (table ``receipt_binds``; NOTIFY ``sms_router_binds`` on change) and keeps
  a cache of the other nodes' binds;
- a receipt with no local bind but a remote one is written to
  ``receipt_handoff`` for one of those nodes (round robin) and that node is
  woken (NOTIFY ``sms_router_receipts``); it claims its rows (SKIP LOCKED,
  marked taken) and sends them as its own, or keeps them pending like any
  receipt of an account that is not bound; a taken row is deleted once the
  customer has answered that receipt (or it was given up, parked again or
  handed on), so a crash of the taking node does not lose it: it is taken
  again when the node starts again under its name or is adopted;
- rows addressed to a node that died are adopted with its spool rows
  (store/spool.py) and sent by the adopter;
- a receipt for an account with no receiving bind anywhere is parked in
  ``receipt_handoff`` for this node itself (``park``, ``parked``), not kept
  in memory, so neither a restart nor a crash loses it: it is taken when
  the account binds here, handed to the node where it binds (both checked
  at each refresh, every 5 s and on every bind change), or adopted with
  this node's backlog if the node dies; at most ``smpp.receipt_buffer``
  per node, beyond that in memory as before;
- a carrier's receipt that reached another node than the one that sent the
  message (carriers send receipts over any bind of the system_id) is handed
  to that node if it is alive (``carrier_receipt_handoff``: carrier, id,
  state and error only), which finishes the message as if it had come there;
  its row is marked taken and deleted once that node's traffic log holds
  the status (Engine.take_forwarded_receipt), so a crash in between has it
  taken again.

Rows hold the encoded deliver_sm: the receipt text carries no message text
(carriers/receipt.py), and for a ``secret`` message the addresses are
blanked before it is written (privacy.md 2). A row lives until a node takes
it and the customer answers (normally milliseconds) or its retention ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import asyncpg
import structlog

from ..carriers.receipt import CarrierReceipt
from ..observe import metrics
from ..smpp.constants import MessageState
from ..smpp.pdu import DeliverSm, decode
from ..store.db import holds_session_state
from ..tasks import DB_ERRORS

log = structlog.get_logger("router.ingress.handoff")

BINDS_CHANNEL = "sms_router_binds"
RECEIPTS_CHANNEL = "sms_router_receipts"
_UTC = dt.UTC

# Called once a receipt handed over or parked is committed (ReceiptSink.deliver).
Written = Callable[[], None] | None
# What a receipt taken here needs: account, PDU, remaining retention (s), and
# what to call once it is safe (answered, given up, parked or handed on).
Deliver = Callable[[int, DeliverSm, float, Written], None]
# A carrier's receipt for a message this node sent: carrier name, receipt,
# and what to call once its status is logged (or it was given up).
TakeCarrierReceipt = Callable[[str, CarrierReceipt, Written], None]


# Receipts for other nodes (SMPP receipts for an account bound there, carrier
# receipts for the node that sent the message) and a NOTIFY per node, at once.
_HAND_OVER_SQL = (
    "WITH r AS (INSERT INTO receipt_handoff (node, account_id, pdu, expires_at, parked)"
    "  SELECT n, a, p, now() + make_interval(secs => s), k"
    "  FROM unnest($1::text[], $2::bigint[], $3::bytea[], $4::float8[], $12::bool[])"
    "  AS u(n, a, p, s, k)),"
    " c AS (INSERT INTO carrier_receipt_handoff (node, carrier, carrier_id, state, error)"
    "  SELECT * FROM unnest($5::text[], $6::text[], $7::text[], $8::int[], $9::text[])),"
    " d AS (DELETE FROM receipt_handoff WHERE id = ANY($13::bigint[])),"
    " e AS (DELETE FROM carrier_receipt_handoff WHERE id = ANY($14::bigint[]))"
    " SELECT pg_notify($10, t) FROM unnest($11::text[]) AS t"
)

# Rows this node takes: marked taken, deleted once safe (_answered).
_TAKE_SQL = (
    "UPDATE receipt_handoff SET taken = true, parked = false WHERE id IN (SELECT id"
    " FROM receipt_handoff WHERE node = $1 AND {which} AND NOT taken"
    " ORDER BY id LIMIT {limit} FOR UPDATE SKIP LOCKED)"
    " RETURNING id, account_id, pdu, extract(epoch FROM expires_at - now())::float8 AS left"
)
_TAKE_HANDED = _TAKE_SQL.format(which="NOT parked", limit=500)
_TAKE_PARKED = _TAKE_SQL.format(which="parked AND account_id = ANY($2::bigint[])", limit=1000)


class ReceiptHandoff:
    def __init__(
        self,
        pool: asyncpg.Pool,
        node: str,
        deliver: Deliver,
        take_carrier_receipt: TakeCarrierReceipt | None = None,
        *,
        node_grace: float = 30.0,
        sync_interval: float = 0.2,
        poll_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        park_limit: int = 100_000,
    ) -> None:
        self.pool = pool
        self.node = node
        self.deliver = deliver
        self.take_carrier_receipt = take_carrier_receipt
        self.node_grace = node_grace
        self.live: set[str] = set()  # other nodes seen within node_grace
        # Carrier receipts for the node that sent their message.
        self._out_carrier: list[tuple[str, str, str, int, str]] = []
        self.sync_interval = sync_interval
        self.receipt_interval = min(sync_interval, 0.01)
        self.poll_interval = poll_interval
        self.clock = clock
        self.local: dict[int, int] = {}  # account id -> receiving binds here
        self._published: dict[int, int] = {}
        self.remote: dict[int, list[str]] = {}  # account id -> other nodes with binds
        self._rr: dict[int, int] = {}
        # node, account, pdu, seconds left, parked (waiting for a bind of the
        # account), called once written
        self._out: list[tuple[str, int, bytes, float, bool, Written]] = []
        self.park_limit = park_limit
        self.parked_rows = 0  # this node's parked rows in the database (counted at each refresh)
        self._parking = 0  # parked receipts queued or being written
        # Taken rows whose receipt is safe now: deleted with the next write.
        self._answered_ids: list[int] = []
        self._logged_ids: list[int] = []  # of carrier_receipt_handoff, likewise
        self._untaken = False  # this node's rows taken in an earlier life released
        self._flushing = asyncio.Lock()  # stop() never cancels a write half done
        self._wake = asyncio.Event()
        self._claim = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._refreshers: set[asyncio.Future[None]] = set()

    # ---------------------------------------------------------- hot side

    def bound(self, account_id: int, receivers: int) -> None:
        """The SMPP front door's count of receiving binds of an account changed."""
        if receivers:
            first = account_id not in self.local
            self.local[account_id] = receivers
            if first and (self.parked_rows or self._parking) and self._tasks:
                self._spawn_refresh()  # its parked receipts: now
        else:
            self.local.pop(account_id, None)
        self._wake.set()

    def can_take(self, account_id: int) -> bool:
        return bool(self.remote.get(account_id))

    def offer(
        self,
        account_id: int,
        pdu: DeliverSm,
        seconds_left: float,
        secret: bool,
        written: Written = None,
    ) -> bool:
        """Hand a receipt to another node holding a bind of the account;
        False if none does (the caller keeps it). ``written`` is called once
        its row is committed."""
        nodes = self.remote.get(account_id)
        if not nodes or seconds_left <= 0:
            return False
        i = self._rr.get(account_id, 0) % len(nodes)
        self._rr[account_id] = i + 1
        self._queue(nodes[i], account_id, pdu, seconds_left, secret, False, written)
        metrics.RECEIPTS_OUT.labels("smpp", "handed_over").inc()
        return True

    def park(
        self,
        account_id: int,
        pdu: DeliverSm,
        seconds_left: float,
        secret: bool,
        written: Written = None,
    ) -> bool:
        """Keep a receipt for an account with no receiving bind anywhere in
        ``receipt_handoff`` (``parked``) for this node instead of memory, so
        that neither a restart nor a crash loses it: it is taken when the
        account binds here, handed to the node where it binds, or, if this
        node dies, adopted with its backlog. False when this node already
        has ``park_limit`` parked (the caller keeps it in memory, bounded).
        ``written`` is called once its row is committed."""
        if seconds_left <= 0 or self.parked_rows + self._parking >= self.park_limit:
            return False
        self._parking += 1
        self._count_parked()
        self._queue(self.node, account_id, pdu, seconds_left, secret, True, written)
        return True

    def _queue(
        self,
        node: str,
        account_id: int,
        pdu: DeliverSm,
        seconds_left: float,
        secret: bool,
        parked: bool,
        written: Written,
    ) -> None:
        """A receipt row for the next write (a secret message's without
        its addresses, privacy.md 2)."""
        if secret:
            pdu = _blank_addresses(pdu)
        pdu.sequence = 0
        self._out.append((node, account_id, pdu.encode(), seconds_left, parked, written))
        self._wake.set()

    def forward_carrier_receipt(self, owner: str, carrier: str, receipt: CarrierReceipt) -> bool:
        """Hand a carrier's receipt to the live node that sent its message;
        False if that node is not known alive (the caller finishes it)."""
        if owner not in self.live:
            return False
        self._out_carrier.append(
            (owner, carrier, receipt.carrier_id, int(receipt.state), receipt.error)
        )
        self._wake.set()
        metrics.CARRIER_RECEIPTS_FORWARDED.inc()
        return True

    # ------------------------------------------------------------ tasks

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._run_writer(), name="receipt-handoff-writer"),
                asyncio.create_task(self._run_listener(), name="receipt-handoff-listener"),
            ]

    async def stop(self, settle: Callable[[], Awaitable[None]] | None = None) -> None:
        """Stop taking receipts, write what is waiting to go (receipts parked
        for this node included: the listener is stopped first, or it would
        take them straight back), stop publishing binds here. ``settle``
        (the traffic log's) is awaited before the last write, so the
        carrier receipts just taken have their status logged and their rows
        go with it, rather than be taken again at the next start."""
        self.local.clear()
        tasks = [*self._tasks, *self._refreshers]
        async with self._flushing:  # the writer's write in progress ends first
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        self._tasks = []
        self._refreshers.clear()
        if settle is not None:
            await settle()
        parked = 0
        try:
            parked = await self._flush()
            if self._answered_ids or self._logged_ids:  # taken rows now safe
                await self._flush()
            await self.pool.execute("DELETE FROM receipt_binds WHERE node = $1", self.node)
            await self.pool.execute(f"NOTIFY {BINDS_CHANNEL}")
        except DB_ERRORS as exc:
            if self._answered_ids or self._logged_ids:
                log.warning(
                    "receipt_handoff_answered_rows_kept",
                    error=type(exc).__name__,
                    rows=len(self._answered_ids) + len(self._logged_ids),
                    consequence="sent again when this node starts again or is adopted",
                )
            if self._out:  # the final write did not happen: say what it loses
                self._parking = 0
                self._count_parked()
                metrics.RECEIPTS_OUT.labels("smpp", "dropped").inc(len(self._out))
                log.error(
                    "receipt_handoff_final_write_failed",
                    error=type(exc).__name__,
                    lost=len(self._out),
                )
                return
        if parked:
            log.info("receipts_parked", receipts=parked)

    async def _run_writer(self) -> None:
        with contextlib.suppress(*DB_ERRORS):
            await self.pool.execute("DELETE FROM receipt_binds WHERE node = $1", self.node)
        while True:
            await self._wake.wait()
            self._wake.clear()
            # A burst of bind changes: one write. Receipts wait less: they
            # are someone's latency (what comes during a write goes in the next).
            receipts = bool(self._out or self._out_carrier)
            await asyncio.sleep(self.receipt_interval if receipts else self.sync_interval)
            try:
                async with self._flushing:
                    await self._flush()
            except DB_ERRORS as exc:
                log.warning("receipt_handoff_write_failed", error=type(exc).__name__)
                await asyncio.sleep(1.0)
                self._wake.set()

    async def _flush(self) -> int:
        """Write what waits; the number of parked receipts written."""
        out, self._out = self._out, []
        out_carrier, self._out_carrier = self._out_carrier, []
        gone, self._answered_ids = self._answered_ids, []
        logged, self._logged_ids = self._logged_ids, []
        changed = {a: n for a, n in self.local.items() if self._published.get(a) != n} | {
            a: 0 for a in self._published if a not in self.local
        }
        if not out and not out_carrier and not gone and not logged and not changed:
            return 0
        parked = sum(1 for o in out if o[4])
        try:
            if out or out_carrier or gone or logged:
                # One statement, one round trip: each await on a busy node's
                # event loop costs a loop iteration, and a receipt's latency
                # is the sum of them. The NOTIFYs go out at its commit.
                await self.pool.execute(
                    _HAND_OVER_SQL,
                    [o[0] for o in out],
                    [o[1] for o in out],
                    [o[2] for o in out],
                    [o[3] for o in out],
                    [o[0] for o in out_carrier],
                    [o[1] for o in out_carrier],
                    [o[2] for o in out_carrier],
                    [o[3] for o in out_carrier],
                    [o[4] for o in out_carrier],
                    RECEIPTS_CHANNEL,
                    # Parked rows wait for a bind: nobody to wake for them.
                    sorted({o[0] for o in out if not o[4]} | {o[0] for o in out_carrier}),
                    [o[4] for o in out],
                    gone,
                    logged,
                )
                written, out, out_carrier, gone, logged = out, [], [], [], []
                for o in written:
                    if o[5] is not None:
                        o[5]()
                if parked:
                    self._parking -= parked
                    self.parked_rows += parked
                    self._count_parked()
                    metrics.RECEIPTS_OUT.labels("smpp", "parked").inc(parked)
                    if self._tasks and any(o[4] and o[1] in self.local for o in written):
                        self._spawn_refresh()  # bound while they were being written
            if changed:
                await self._publish_binds(changed)
        except BaseException:
            self._out[:0] = out  # first in line again
            self._out_carrier[:0] = out_carrier
            self._answered_ids[:0] = gone
            self._logged_ids[:0] = logged
            raise
        for account_id, n in changed.items():
            if n:
                self._published[account_id] = n
            else:
                self._published.pop(account_id, None)
        return parked

    async def _publish_binds(self, changed: dict[int, int]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            for account_id, n in changed.items():
                if n:
                    await conn.execute(
                        "INSERT INTO receipt_binds (node, account_id, binds)"
                        " VALUES ($1, $2, $3)"
                        " ON CONFLICT (node, account_id) DO UPDATE SET binds = $3",
                        self.node,
                        account_id,
                        n,
                    )
                else:
                    await conn.execute(
                        "DELETE FROM receipt_binds WHERE node = $1 AND account_id = $2",
                        self.node,
                        account_id,
                    )
            await conn.execute(f"NOTIFY {BINDS_CHANNEL}")

    async def _run_listener(self) -> None:
        while True:
            try:
                async with self.pool.acquire() as conn:
                    holds_session_state(conn)
                    if not self._untaken:
                        # Taken by this node's earlier life and never answered
                        # (it died, or stopped with them unsettled): again.
                        for table in ("receipt_handoff", "carrier_receipt_handoff"):
                            await conn.execute(
                                f"UPDATE {table} SET taken = false WHERE node = $1 AND taken",
                                self.node,
                            )
                        self._untaken = True
                    await conn.add_listener(BINDS_CHANNEL, self._notified)
                    await conn.add_listener(RECEIPTS_CHANNEL, self._notified)
                    try:
                        refresh_at = 0.0
                        while not conn.is_closed():
                            if self.clock() >= refresh_at:
                                await self._refresh()
                                refresh_at = self.clock() + 5.0
                            await self._take()
                            with contextlib.suppress(TimeoutError):
                                await asyncio.wait_for(self._claim.wait(), self.poll_interval)
                            self._claim.clear()
                    finally:
                        for ch in (BINDS_CHANNEL, RECEIPTS_CHANNEL):
                            with contextlib.suppress(
                                OSError, asyncpg.PostgresError, asyncpg.InterfaceError
                            ):
                                await conn.remove_listener(ch, self._notified)
            except DB_ERRORS as exc:
                log.warning("receipt_handoff_listen_failed", error=type(exc).__name__)
                await asyncio.sleep(1.0)

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if channel == BINDS_CHANNEL:
            self._spawn_refresh()
        elif payload == self.node:
            self._claim.set()

    def _spawn_refresh(self) -> None:
        task = asyncio.ensure_future(self._refresh_quietly())
        self._refreshers.add(task)
        task.add_done_callback(self._refreshers.discard)

    async def _refresh_quietly(self) -> None:
        with contextlib.suppress(*DB_ERRORS):
            await self._refresh()

    async def _refresh(self) -> None:
        rows = await self.pool.fetch(
            "SELECT account_id, node FROM receipt_binds WHERE node <> $1 AND binds > 0"
            " ORDER BY account_id, node",
            self.node,
        )
        remote: dict[int, list[str]] = {}
        for r in rows:
            remote.setdefault(r["account_id"], []).append(r["node"])
        self.remote = remote
        live = await self.pool.fetch(
            "SELECT node FROM router_nodes WHERE node <> $1"
            " AND seen_at > now() - make_interval(secs => $2)",
            self.node,
            self.node_grace,
        )
        self.live = {r["node"] for r in live}
        await self._release_parked()

    async def _release_parked(self) -> None:
        """This node's parked receipts (park) of accounts now bound: here,
        taken and sent; on other nodes, handed there. Also recounts them
        (rows adopted from a dead node count from here on)."""
        async with self._flushing:  # not while a write adds to the count
            self.parked_rows = int(
                await self.pool.fetchval(
                    "SELECT count(*) FROM receipt_handoff WHERE node = $1 AND parked", self.node
                )
            )
        self._count_parked()
        if not self.parked_rows or not self._untaken:
            # (Before the listener's un-take, rows taken now would be
            # released again by it and sent twice.)
            return
        while self.local:
            rows = await self.pool.fetch(_TAKE_PARKED, self.node, list(self.local))
            self.parked_rows -= len(rows)
            self._count_parked()
            self._deliver_rows(rows)
            if len(rows) < 1000:
                break
        elsewhere = {a: nodes[0] for a, nodes in self.remote.items() if a not in self.local}
        if elsewhere:
            moved = await self.pool.fetch(
                "WITH m AS (UPDATE receipt_handoff r SET node = t.node, parked = false"
                " FROM unnest($2::bigint[], $3::text[]) AS t(account_id, node)"
                " WHERE r.node = $1 AND r.parked AND r.account_id = t.account_id"
                " RETURNING t.node)"
                " SELECT node, count(*) AS n, pg_notify($4, node) FROM m GROUP BY node",
                self.node,
                list(elsewhere),
                list(elsewhere.values()),
                RECEIPTS_CHANNEL,
            )
            n = sum(int(r["n"]) for r in moved)
            if n:
                self.parked_rows -= n
                self._count_parked()
                metrics.RECEIPTS_OUT.labels("smpp", "handed_over").inc(n)

    def _count_parked(self) -> None:
        metrics.RECEIPTS_PARKED.set(max(0, self.parked_rows) + self._parking)

    def _deliver_rows(self, rows: list[Any]) -> None:
        """Send the receipts of rows just taken; each row goes once its
        receipt is safe (_answered)."""
        for r in rows:
            if r["left"] <= 0:
                metrics.RECEIPTS_OUT.labels("smpp", "expired").inc()
                self._answered(r["id"])
                continue
            pdu = decode(bytes(r["pdu"]))
            if isinstance(pdu, DeliverSm):
                self.deliver(r["account_id"], pdu, r["left"], partial(self._answered, r["id"]))
            else:
                self._answered(r["id"])

    def _logged(self, row_id: int) -> None:
        """A taken carrier receipt's status is logged: the row goes."""
        self._logged_ids.append(row_id)
        self._wake.set()

    def _answered(self, row_id: int) -> None:
        """A taken row's receipt is safe: the row goes with the next write."""
        self._answered_ids.append(row_id)
        self._wake.set()

    async def _take(self) -> int:
        """Claim and deliver the receipts other nodes left for this one."""
        total = 0
        while self.take_carrier_receipt is not None:
            # Marked taken, deleted once the status it brings is logged
            # (_logged): a crash before leaves it to take again.
            rows = await self.pool.fetch(
                "UPDATE carrier_receipt_handoff SET taken = true WHERE id IN (SELECT id"
                " FROM carrier_receipt_handoff WHERE node = $1 AND NOT taken ORDER BY id"
                " LIMIT 1000 FOR UPDATE SKIP LOCKED)"
                " RETURNING id, carrier, carrier_id, state, error",
                self.node,
            )
            for r in rows:
                receipt = CarrierReceipt(r["carrier_id"], _state(r["state"]), r["error"])
                self.take_carrier_receipt(r["carrier"], receipt, partial(self._logged, r["id"]))
            total += len(rows)
            if len(rows) < 1000:
                break
        while True:
            rows = await self.pool.fetch(_TAKE_HANDED, self.node)
            self._deliver_rows(rows)
            total += len(rows)
            if len(rows) < 500:
                return total


def _state(n: int) -> MessageState:
    try:
        return MessageState(n)
    except ValueError:
        return MessageState.UNKNOWN


def _blank_addresses(pdu: DeliverSm) -> DeliverSm:
    """A copy of a secret message's receipt without the handset's number or
    the sender id, fit to be written down."""
    return DeliverSm.make(
        pdu.source_addr_ton,
        pdu.source_addr_npi,
        "",
        pdu.dest_addr_ton,
        pdu.dest_addr_npi,
        "",
        pdu.esm_class,
        pdu.registered_delivery,
        pdu.data_coding,
        pdu.short_message,
        dict(pdu.tlvs),
    )
