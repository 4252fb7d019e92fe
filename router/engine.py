"""Accept -> route -> carrier queue, and the single correlation point that
turns carrier results into message statuses and hands them to the origin.

Both front doors call :meth:`Engine.accept`; neither knows carriers. The
carrier layer reports through the ``CarrierEvents`` methods here; receipts
leave through the ``ReceiptSink`` registered for the message's origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol

import structlog

from .carriers import Carrier, Submission
from .carriers.ratelimit import TokenBucket
from .carriers.receipt import CarrierReceipt
from .carriers.recovery import RouteRecovery, Waiting
from .config import Config
from .model import Delivery, Message, MessageClass, Origin, Status
from .observe import metrics
from .routing import CountryLookup, NoRoute, RouteTable
from .smpp.constants import MessageState, status_name
from .smpp.constants import Status as SmppStatus
from .store.optout import OptOutList
from .store.spool import MemorySpool, PgSpool
from .store.trafficlog import TrafficLog
from .tasks import DB_ERRORS

log = structlog.get_logger("router.engine")

# A carrier's receipt held for its traffic-log write (delivery.receipt_ack =
# "durable") is answered after this many seconds whatever the write does:
# below the 10-60 s carriers wait for a deliver_sm_resp before resending.
RECEIPT_HOLD_MAX = 5.0


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_mb() -> float | None:
    """This process's resident set size in MiB (Linux), None elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE / 1048576
    except (OSError, ValueError, IndexError):
        return None


class Rejected(Exception):
    """A message the router will not take, with the answer for each front door."""

    def __init__(
        self,
        reason: str,
        detail: str,
        smpp_status: int,
        http_status: int,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(detail)
        self.reason = reason  # stable, also the metric label and problem type
        self.detail = detail  # human text; never contains personal data
        self.smpp_status = smpp_status
        self.http_status = http_status
        self.retry_after = retry_after


SubmitCallback = Callable[["Delivery | Rejected"], None]


def _not_durable() -> Rejected:
    return Rejected(
        "not_durable",
        "the message could not be stored; retry",
        SmppStatus.ESME_RSYSERR,
        503,
        retry_after=1,
    )


class ReceiptSink(Protocol):
    def deliver(self, delivery: Delivery, done: Callable[[], None] | None = None) -> None:
        """Send the submitter what became of ``delivery``. ``done`` (if
        given) is called once, when that no longer rests on this process's
        memory: the customer answered it, it is written to the database
        (parked, handed to another node, in the webhook outbox), or it was
        given up (refused, expired, dropped for room); at once if nothing
        is to be sent. Not called if the process stops with it in memory
        only: the message's receipt route then outlives the stop, and the
        next start sends it again (Engine.finish_overdue)."""
        ...


Summary = tuple[Any, ...]


def _summary(d: Delivery) -> Summary:
    """What query_sm and GET /v1/messages/{id} need of a finished message;
    no addresses or text (and no userref for secret messages)."""
    m = d.message
    return (
        m.account_id,
        m.account,
        m.origin.value,
        m.msg_class.value,
        m.country,
        m.data_coding,
        m.parts,
        None if m.secret else m.userref,
        m.accepted_at,
        m.expires_at,
        d.status.value,
        d.carrier,
        d.error,
        d.updated_at,
    )


def _from_summary(message_id: str, s: Summary) -> Delivery:
    (
        account_id,
        account,
        origin,
        cls,
        country,
        data_coding,
        parts,
        userref,
        accepted_at,
        expires_at,
        status,
        carrier,
        error,
        updated_at,
    ) = s
    msg = Message(
        id=message_id,
        account_id=account_id,
        account=account,
        origin=Origin(origin),
        msg_class=MessageClass(cls),
        source="",
        source_ton=0,
        source_npi=0,
        destination="",
        country=country,
        data_coding=data_coding,
        esm_class=0,
        segments=(b"",) * parts,
        text=None,
        registered_delivery=0,
        accepted_at=accepted_at,
        expires_at=expires_at,
        userref=userref,
    )
    return Delivery(
        msg,
        status=Status(status),
        carrier=carrier,
        error=error,
        updated_at=updated_at,
        parts_taken=parts,
        spooled=False,
    )


class Engine:
    def __init__(
        self,
        cfg: Config,
        traffic_log: TrafficLog,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        recent_limit: int = 200_000,
        spool: MemorySpool | PgSpool | None = None,
        optout: OptOutList | None = None,
        share: float = 1.0,
    ) -> None:
        self.cfg = cfg
        self.traffic_log = traffic_log
        self.spool = spool or MemorySpool()
        self.optout = optout
        self.clock = clock
        self.wall = wall
        self.rng = rng or random.Random()
        self.countries = CountryLookup()
        self.table = RouteTable.from_config(cfg.routes)
        # A worker process's share of each carrier's tps (router/shares.py).
        self.carrier_share_default = share
        self.carrier_shares: dict[str, float] = {}
        self._asked: dict[object, tuple[TokenBucket, int]] = {}
        self.carriers: dict[str, Carrier] = {
            c.name: Carrier(c, self, clock=clock, wall=wall, rng=self.rng, share=share)
            for c in cfg.carriers
        }
        self.active: dict[str, Delivery] = {}
        # Finished messages, as flat tuples of atoms: the garbage collector
        # untracks those, so 200k of them cost no GC time (objects did: full
        # passes of 300-500 ms in a 10-minute soak).
        self.recent: OrderedDict[str, Summary] = OrderedDict()
        self.recent_limit = recent_limit
        # Messages finished here whose routes wait for the submitter's
        # receipt to be safe (_finish): a deadline claim or an adopter's
        # re-send must leave those routes to that wait.
        self._unsafe: set[str] = set()
        self._ticks = 0
        # Hands a carrier receipt to the live node that owns its message
        # (set by the app; False when that node is not known alive).
        self.forward_receipt: Callable[[str, str, CarrierReceipt], bool] | None = None
        # Worker processes (router/workers.py): a receipt this worker did not
        # send is first offered to its siblings in memory, then looked up.
        self.offer_receipt: Callable[[str, CarrierReceipt], None] | None = None
        self.sinks: dict[Origin, ReceiptSink] = {}
        # Receipts matched through receipt_routes (durable spool only).
        self.recovery: RouteRecovery | None = None
        if isinstance(self.spool, PgSpool):
            self.recovery = RouteRecovery(
                self.spool.find_routes, self._recovered, self._still_parked
            )
        # Receipt routes are deleted, and carriers' receipts answered (if
        # delivery.receipt_ack = "durable"), once the traffic log holds what
        # the receipt changed (when_logged, _forget_route).
        self._routes_durable = isinstance(self.spool, PgSpool)
        # (Only with the durable spool: a receipt sent again after a crash
        # is matched through its receipt route.)
        self._ack_logged = self._routes_durable and cfg.receipt_ack == "durable"
        self.accepting = True
        self._tick: asyncio.TimerHandle | None = None
        self.account_limits: dict[int, TokenBucket] = {}
        # Part id -> message id for messages reassembled from customer parts.
        self.alias: dict[str, str] = {}
        self.memory_high = False  # RSS above delivery.max_memory_mb: refuse new work
        self._scheduler: asyncio.Task[None] | None = None
        # Kept by start(): asyncio.get_running_loop() is a getpid() system call
        # on Python 3.11 (~5 us on this VM), too much for once per message.
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, without a system call once started."""
        return self._loop or asyncio.get_running_loop()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        for c in self.carriers.values():
            c.start()
        self._tick = loop.call_later(1.0, self._health_tick)
        if isinstance(self.spool, PgSpool) and self._scheduler is None:
            self._scheduler = loop.create_task(self._release_scheduled(), name="scheduler")

    async def stop(self, timeout: float = 5.0) -> None:
        self.accepting = False
        if self._tick is not None:
            self._tick.cancel()
        if self.memory_high:
            self.memory_high = False
            metrics.MEMORY_BRAKE.set(0)
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
            self._scheduler = None
        # At once, under one deadline (each waits for its window and its
        # held receipt answers).
        await asyncio.gather(*(c.stop(timeout) for c in self.carriers.values()))
        if self.recovery is not None:
            await self.recovery.stop()

    # ------------------------------------------------------------- accept

    def route(self, destination: str, country: str, account: str | None = None) -> list[str]:
        try:
            return self.table.resolve(destination, country, self.rng, account).carriers
        except NoRoute as exc:
            raise Rejected("no_route", str(exc), SmppStatus.ESME_RINVDSTADR, 422) from None

    def _check(self, msg: Message) -> list[str]:
        """What every new message must pass, now or scheduled: the router
        accepts, memory, opt-out, the account's rate, a route. Returns the
        route's carriers; raises Rejected."""
        if not self.accepting:
            raise Rejected(
                "draining",
                "router is shutting down; retry on another node",
                SmppStatus.ESME_RTHROTTLED,
                503,
                retry_after=5,
            )
        if self.memory_high:
            raise Rejected(
                "memory_high",
                "the router is at its configured memory limit",
                SmppStatus.ESME_RMSGQFUL,
                503,
                retry_after=1,
            )
        if self.optout is not None and self.optout.contains(msg.account_id, msg.destination):
            raise Rejected(
                "opted_out",
                "the recipient opted out of this account's messages",
                SmppStatus.ESME_ROPTEDOUT,
                422,
            )
        limit = self.account_limits.get(msg.account_id)
        if limit is not None and limit.take(self.clock()) > 0:
            raise Rejected(
                "account_rate",
                "the account's messages-per-second limit is reached",
                SmppStatus.ESME_RTHROTTLED,
                429,
                retry_after=1,
            )
        return self.route(msg.destination, msg.country, msg.account)

    def _admit(self, msg: Message) -> Carrier:
        """Route and check room; raise Rejected when the router cannot keep it."""
        names = self._check(msg)
        chosen: Carrier | None = None
        fallback: Carrier | None = None
        for name in names:
            carrier = self.carriers[name]
            if not carrier.has_room(msg.parts):
                continue
            if carrier.healthy:
                chosen = carrier
                break
            fallback = fallback or carrier
        chosen = chosen or fallback
        if chosen is None:
            raise Rejected(
                "queue_full",
                "all carriers for this destination are full",
                SmppStatus.ESME_RMSGQFUL,
                429,
                retry_after=1,
            )
        self._check_spool_room()
        return chosen

    def _check_spool_room(self) -> None:
        if isinstance(self.spool, PgSpool) and not self.spool.has_room(1):
            raise Rejected(
                "spool_full",
                "the durable spool is full",
                SmppStatus.ESME_RMSGQFUL,
                429,
                retry_after=1,
            )

    def submit(self, msg: Message, done: SubmitCallback, *, hold: bool = False) -> None:
        """Take a message: ``done`` gets the Delivery once the message is
        durable (at-least-once) or at once (in-memory), or a Rejected.

        A message with a future ``send_at`` waits in the durable spool
        (status ``scheduled``) until the scheduler releases it. ``hold``
        makes it durable without queueing it: the caller releases it later
        with :meth:`release` (the reassembly of customer-split parts)."""
        if msg.send_at is not None and msg.send_at > self.wall():
            self._schedule(msg, done)
            return
        try:
            carrier = self._admit(msg)
        except Rejected as exc:
            done(exc)
            return
        # Hold the room until the spool answers, so a burst cannot overfill.
        carrier.reserved += msg.parts
        if hold:
            msg = dataclasses.replace(msg, held=True)

            def held(ok: bool) -> None:
                carrier.reserved -= msg.parts
                done(
                    Delivery(msg, status=Status.ACCEPTED, updated_at=msg.accepted_at)
                    if ok
                    else _not_durable()
                )

            self.spool.add(msg, held)
            return

        def durable(ok: bool) -> None:
            carrier.reserved -= msg.parts
            if not ok:
                done(_not_durable())
                return
            delivery = self._enqueue(msg, carrier)
            self._log_accepted(msg, carrier.name)
            done(delivery)

        self.spool.add(msg, durable)

    def accept(self, msg: Message) -> Delivery:
        """Synchronous take, for the in-memory guarantee only (tests, tools)."""
        result: list[Delivery | Rejected] = []
        self.submit(msg, result.append)
        if not result:
            raise RuntimeError("accept() needs an in-memory spool; use submit/accept_async")
        if isinstance(result[0], Rejected):
            raise result[0]
        return result[0]

    async def accept_async(self, msg: Message) -> Delivery:
        """Take a message; returns once it is durable. Raises Rejected."""
        fut: asyncio.Future[Delivery | Rejected] = self.loop.create_future()

        def done(r: Delivery | Rejected) -> None:
            if not fut.done():
                fut.set_result(r)

        self.submit(msg, done)
        r = await fut
        if isinstance(r, Rejected):
            raise r
        return r

    # ------------------------------------------------------- scheduled

    def _schedule(self, msg: Message, done: SubmitCallback) -> None:
        """A message for later: checked now, kept only in the durable spool."""
        try:
            if not isinstance(self.spool, PgSpool):
                raise Rejected(
                    "schedule_unavailable",
                    "scheduled sending needs delivery.guarantee = at-least-once",
                    SmppStatus.ESME_RINVSCHED,
                    422,
                )
            if msg.secret and self.spool.aead is None:
                raise Rejected(
                    "schedule_unavailable",
                    "scheduled secret messages need a spool key (ROUTER_SPOOL_KEY)",
                    SmppStatus.ESME_RINVSCHED,
                    422,
                )
            assert msg.send_at is not None
            if msg.send_at - self.wall() > self.cfg.max_schedule_ahead:
                raise Rejected(
                    "schedule_too_far",
                    "the send time is further ahead than this router keeps messages",
                    SmppStatus.ESME_RINVSCHED,
                    422,
                )
            if msg.expires_at <= msg.send_at:
                raise Rejected(
                    "expires_before_send",
                    "the message would expire before its send time",
                    SmppStatus.ESME_RINVEXPIRY,
                    422,
                )
            # Same checks as a message for now, except room in a carrier
            # queue: that is taken when it falls due.
            self._check(msg)
            self._check_spool_room()
        except Rejected as exc:
            done(exc)
            return

        def durable(ok: bool) -> None:
            if not ok:
                done(_not_durable())
                return
            self._log_accepted(msg, None)
            self.traffic_log.record_event(msg, "scheduled", None, None, msg.accepted_at)
            metrics.SCHEDULED_IN.inc()
            done(Delivery(msg, status=Status.SCHEDULED, updated_at=msg.accepted_at))

        self.spool.add(msg, durable)

    async def _release_scheduled(self) -> None:
        """Move scheduled messages that fell due from the spool to carriers.
        A batch at a time, and none while carrier queues are full, so a
        million messages due at 09:00 cannot blow the memory bound."""
        assert isinstance(self.spool, PgSpool)
        interval = self.cfg.schedule_poll_interval
        counted = 0.0
        while True:
            await asyncio.sleep(interval)
            if not self.accepting:
                continue
            room = sum(max(0, c.cfg.queue_size - c.backlog) for c in self.carriers.values())
            if room <= 0 or self.memory_high:
                continue
            try:
                due = await self.spool.release_due(self.wall(), min(room, 1_000))
                now = self.clock()
                if now - counted >= 10.0:
                    counted = now
                    metrics.SCHEDULED_WAITING.set(await self.spool.scheduled_count())
            except DB_ERRORS as exc:
                log.warning("scheduler_failed", error=type(exc).__name__)
                continue
            for msg in due:
                self.release(msg)
            if due:
                metrics.SCHEDULED_OUT.inc(len(due))

    def release(self, msg: Message) -> Delivery:
        """Queue a durable message that was held (reassembly) or scheduled:
        route it now, honour an opt-out made since, fail it if it expired."""
        if msg.id in self.active:
            return self.active[msg.id]
        now = self.wall()
        names: list[str] = []
        error: str | None = None
        status = Status.FAILED
        try:
            names = self.route(msg.destination, msg.country, msg.account)
        except Rejected as exc:
            error = exc.reason
        if error is None and self.optout is not None:
            if self.optout.contains(msg.account_id, msg.destination):
                error = "opted_out"
        if error is None and msg.expires_at <= now:
            error, status = "validity_period_passed", Status.EXPIRED
        if error is not None:
            if msg.send_at is None:
                self._log_accepted(msg, None)
            d = Delivery(msg, status=Status.ACCEPTED, updated_at=now)
            self._index(msg)
            self.active[msg.id] = d
            self._finish(d, status, error, names[0] if names else "none")
            return d
        carriers = [self.carriers[n] for n in names]
        carrier = (
            next((c for c in carriers if c.healthy and c.has_room(msg.parts)), None)
            or next((c for c in carriers if c.healthy), None)
            or carriers[0]
        )
        delivery = self._enqueue(msg, carrier)
        if msg.send_at is None:
            # Held parts are logged once, as the message they make up.
            self._log_accepted(msg, carrier.name)
        else:
            self.traffic_log.record_event(msg, "queued", carrier.name, None, now)
        return delivery

    def _log_accepted(self, msg: Message, carrier: str | None) -> None:
        self.traffic_log.record_message(msg, carrier)
        metrics.child(metrics.ACCEPTED, msg.origin.value, msg.account, msg.country or "ZZ").inc()
        metrics.child(metrics.PARTS_ACCEPTED, msg.origin.value, msg.account).inc(msg.parts)

    async def cancel(self, message_id: str, account_id: int) -> Delivery | None:
        """Withdraw a scheduled message of this account that is not yet due.
        None when there is no such message (or it already left)."""
        if not isinstance(self.spool, PgSpool):
            return None
        msg = await self.spool.cancel(message_id, account_id)
        if msg is None:
            return None
        d = Delivery(msg, status=Status.SCHEDULED, updated_at=msg.accepted_at, spooled=False)
        self.active[msg.id] = d
        self._finish(d, Status.CANCELED, None, "none")
        return d

    async def lookup_async(self, message_id: str) -> Delivery | None:
        """:meth:`lookup`; failing that a scheduled message in the spool;
        failing that the traffic log (after a restart, or once the message
        left the in-memory cache). No personal field is read."""
        d = self.lookup(message_id)
        if d is not None:
            return d
        if isinstance(self.spool, PgSpool):
            msg = await self.spool.scheduled(message_id)
            if msg is not None:
                return Delivery(
                    msg, status=Status.SCHEDULED, updated_at=msg.accepted_at, spooled=False
                )
        row = await self.traffic_log.find(message_id)
        if row is None:
            return None
        accepted = row["accepted_at"].timestamp()
        expires = row["expires_at"].timestamp() if row["expires_at"] else accepted
        status = Status(row["status"]) if row["status"] else Status.ACCEPTED
        return _from_summary(
            message_id,
            (
                row["account_id"],
                "",
                row["ingress"],
                row["class"],
                row["country"],
                row["data_coding"],
                row["parts"],
                row["userref"],
                accepted,
                expires,
                status.value,
                row["event_carrier"] or row["carrier"],
                row["error"],
                row["at"].timestamp() if row["at"] else accepted,
            ),
        )

    def _index(self, msg: Message) -> None:
        for pid in msg.part_ids:
            if pid != msg.id:
                self.alias[pid] = msg.id

    def _enqueue(self, msg: Message, carrier: Carrier, status: Status = Status.QUEUED) -> Delivery:
        delivery = Delivery(
            msg,
            status=status,
            carrier=carrier.name,
            updated_at=msg.accepted_at,
            spooled=self.spool.durable,
        )
        carrier.enqueue([Submission(delivery, i) for i in range(msg.parts)], force=True)
        self.active[msg.id] = delivery
        if msg.part_ids:
            self._index(msg)
        return delivery

    def resume(self, messages: list[Message]) -> int:
        """Queue messages replayed from the spool after a restart."""
        n = 0
        for msg in messages:
            if msg.id in self.active:
                continue
            try:
                names = self.route(msg.destination, msg.country, msg.account)
            except Rejected:
                names = list(self.carriers)[:1]
            carrier = next(
                (self.carriers[c] for c in names if self.carriers[c].healthy),
                self.carriers[names[0]],
            )
            self._enqueue(msg, carrier)
            if msg.held:
                # A held part was not logged before the crash: it goes alone now.
                self._log_accepted(msg, carrier.name)
            n += 1
        return n

    def lookup(self, message_id: str) -> Delivery | None:
        message_id = self.alias.get(message_id, message_id)
        d = self.active.get(message_id)
        if d is not None:
            return d
        summary = self.recent.get(message_id)
        return None if summary is None else _from_summary(message_id, summary)

    # ------------------------------------------------- carrier events

    def on_submitted(self, sub: Submission, carrier: str, carrier_id: str) -> None:
        d = sub.delivery
        d.carrier = carrier
        if carrier_id:
            d.carrier_ids.append(carrier_id)
        metrics.child(metrics.SUBMITTED, carrier).inc()
        if carrier_id and not d.status.final:
            # (A part taken after its message ended needs no route: no
            # receipt can change a final status.)
            self.spool.remember_route(carrier, carrier_id, d.message, sub.part)
        d.parts_taken += 1
        if d.parts_taken == d.message.parts and d.spooled:
            d.spooled = False
            self._taken(d.message)
        if d.status is Status.QUEUED:
            d.status = Status.SUBMITTED
            now = self.wall()
            d.updated_at = now
            metrics.ACCEPT_TO_SUBMIT.observe(max(0.0, now - d.message.accepted_at))
            self.traffic_log.record_event(d.message, "submitted", carrier, None, now)

    def on_submit_failed(self, sub: Submission, carrier: str, status: int, reason: str) -> None:
        metrics.SUBMIT_ERRORS.labels(carrier, status_name(status)).inc()
        self._finish(sub.delivery, Status.FAILED, f"carrier:{status_name(status)}", carrier)

    def on_expired(self, sub: Submission, carrier: str) -> None:
        self._finish(sub.delivery, Status.EXPIRED, "validity_period_passed", carrier)

    def on_receipt(self, sub: Submission, carrier: str, receipt: CarrierReceipt) -> None:
        metrics.child(metrics.RECEIPTS_IN, carrier, receipt.state.name.lower()).inc()
        d = sub.delivery
        state = receipt.state
        if state in (MessageState.ENROUTE, MessageState.ACCEPTED):
            return
        # A final state is never overwritten by a late or duplicate receipt.
        if not d.status.final:
            if state is MessageState.DELIVERED:
                d.parts_done += 1
            else:
                d.parts_failed += 1
                d.error = f"{state.name.lower()}:{receipt.error}"
            if d.parts_done + d.parts_failed >= d.message.parts:
                # This receipt ends the message: its route also waits for
                # the submitter's receipt to be safe (_finish).
                route = ((carrier, receipt.carrier_id),)
                if d.parts_failed == 0:
                    self._finish(d, Status.DELIVERED, None, carrier, routes=route)
                elif state is MessageState.EXPIRED:
                    self._finish(d, Status.EXPIRED, d.error, carrier, routes=route)
                else:
                    self._finish(d, Status.FAILED, d.error, carrier, routes=route)
                return
        # Its part's route goes even when the message is final already (an
        # other part failed first): left, it would outlive the message and
        # be taken after a restart for one a crash left (finish_overdue).
        self._forget_route(carrier, receipt.carrier_id, d.message.id)

    def _forget_route(self, carrier: str, carrier_id: str, message_id: str) -> None:
        """Delete a receipt route once the traffic log holds what its
        receipt changed. Before, a crash could leave the message with
        neither its final status nor a route to finish it by (it stayed
        ``submitted``); the route now outlives any status not yet logged,
        so the deadline finishes it, or (delivery.receipt_ack = "durable")
        a restart takes the carrier's receipt again. While the log is full
        (its rows dropped) the route stays for the deadline."""
        if not self._routes_durable:
            return
        if self.traffic_log.dropping:
            return
        self.traffic_log.after_write(
            partial(self._forget_route_now, carrier, carrier_id, message_id)
        )

    def _receipt_safe(self, routes: Sequence[tuple[str, str]], message_id: str) -> None:
        self._unsafe.discard(message_id)
        self._forget_routes(routes, message_id)

    def _forget_routes(self, routes: Sequence[tuple[str, str]], message_id: str) -> None:
        for carrier, carrier_id in routes:
            self._forget_route(carrier, carrier_id, message_id)

    def _forget_route_now(self, carrier: str, carrier_id: str, message_id: str) -> None:
        if not self._id_reused(carrier, carrier_id, message_id):
            self.spool.forget_route(carrier, carrier_id)

    def _id_reused(self, carrier: str, carrier_id: str, message_id: str) -> bool:
        """The carrier has used this id again, for a message of ours now
        waiting: its route (same key) is that message's, not to be deleted."""
        c = self.carriers.get(carrier)
        held = c.correlator.lookup(carrier_id) if c is not None else None
        return held is not None and held.delivery.message.id != message_id

    def when_logged(self, callback: Callable[[], None]) -> None:
        """Answer a carrier's receipt (``callback``) once the traffic log
        holds what it changed (``delivery.receipt_ack = "durable"``): if the
        router dies first, the carrier sends the receipt again after the
        restart; answered at once, its status would be lost. Not held
        while the log is down (receipts keep flowing then), nor longer
        than RECEIPT_HOLD_MAX (a write that hangs without failing, or a
        backlog ahead of it written too slowly)."""
        if not self._ack_logged:
            callback()
            return
        done = False

        def once(forced: bool = False) -> None:
            nonlocal done
            if not done:
                done = True
                if forced:
                    metrics.RECEIPT_ANSWERS_FORCED.inc()
                callback()

        self.traffic_log.after_write(once, outlast_outage=False, soon=True)
        if not done:
            asyncio.get_running_loop().call_later(RECEIPT_HOLD_MAX, once, True)

    def take_forwarded_receipt(
        self, carrier: str, receipt: CarrierReceipt, done: Callable[[], None] | None = None
    ) -> None:
        """A carrier receipt another node got for a message this node sent.
        ``done`` (its hand-off row goes) once the traffic log holds what it
        changed, or it is given up: a crash before, and the row is taken
        again after the restart."""
        if self.take_sibling_receipt(carrier, receipt):
            if done is not None:
                self._once_logged(done)
        elif self.recovery is not None:
            # Let go from memory meanwhile (receipt_memory) or never ours: from the route.
            self.recovery.add(carrier, receipt, forwarded=True, done=done)
        elif done is not None:
            done()

    def on_unknown_receipt(self, carrier: str, receipt: CarrierReceipt) -> None:
        if self.offer_receipt is not None:
            self.offer_receipt(carrier, receipt)  # answered by sibling_receipt_result
        elif self.recovery is not None:
            self.recovery.add(carrier, receipt)

    def take_sibling_receipt(self, carrier: str, receipt: CarrierReceipt) -> bool:
        """A receipt a sibling worker got: True if this worker sent its
        message (and has now handled it)."""
        c = self.carriers.get(carrier)
        return c is not None and c.take_receipt(receipt)

    def sibling_receipt_result(self, carrier: str, receipt: CarrierReceipt, taken: bool) -> None:
        """What became of a receipt offered to the sibling workers: taken by
        one, or looked up in receipt_routes as any other unknown receipt
        (unless this worker's own submit_sm_resp matched it meanwhile)."""
        c = self.carriers.get(carrier)
        if taken:
            if c is not None:
                c.correlator.unpark(receipt.carrier_id)
        elif self.recovery is not None and (c is None or c.correlator.is_parked(receipt)):
            self.recovery.add(carrier, receipt)

    def _still_parked(self, w: Waiting) -> bool:
        c = self.carriers.get(w.carrier)
        return c is not None and c.correlator.is_parked(w.receipt)

    async def _recovered(self, w: Waiting, row: Any) -> None:
        """A receipt whose submission this node does not hold, with its
        receipt_routes row (see router.carriers.recovery). A live owning
        node is handed it (it finishes the message); otherwise what the
        origin needs is rebuilt from the row and it is finished here."""
        carrier, receipt = w.carrier, w.receipt
        owner = row["node"]
        c = self.carriers.get(carrier)
        if (
            not w.forwarded
            and owner
            and owner != getattr(self.spool, "node", None)
            and self.forward_receipt is not None
            and self.forward_receipt(owner, carrier, receipt)
        ):
            if c is not None:
                c.correlator.unpark(receipt.carrier_id)
            return
        d = self.active.get(row["message_id"])
        if d is None:
            assert isinstance(self.spool, PgSpool)
            remaining = await self.spool.remaining_parts(row["message_id"])
            d = self.active.get(row["message_id"])  # it may have come meanwhile
            # Not if it was finished meanwhile (its deadline passed as the receipt came).
            if d is None and not self._finished_here(row["message_id"]):
                d = self._rebuild_delivery(row, carrier, remaining)
        if c is not None:
            c.correlator.unpark(receipt.carrier_id)
        if d is not None:
            self.on_receipt(Submission(d, row["part"]), carrier, receipt)
        if w.done is not None:
            done, w.done = w.done, None
            self._once_logged(done)

    def _once_logged(self, done: Callable[[], None]) -> None:
        """``done`` once the traffic log holds what a forwarded carrier
        receipt changed. Not while the log is full: its rows are dropped
        then, so the hand-off row stays taken, and the next start takes
        it again (its route stays too, _forget_route)."""
        if not self.traffic_log.dropping:
            self.traffic_log.after_write(done)

    def finish_overdue(self, rows: Sequence[Any]) -> int:
        """Messages whose receipt never came (router/carriers/deadline.py):
        the receipt_routes rows just claimed (leased), all of each
        message's. Each message is finished as ``unknown`` (a receipt with
        stat UNKNOWN / a webhook to its submitter) unless it already has a
        final status; then its routes are forgotten like those of a message
        whose receipt came (deleted once the traffic log holds the finish,
        see _forget_route). The number finished.

        A route whose row carries the final status the traffic log holds
        for its message (``final_status``, see PgSpool._with_final)
        outlived its final receipt: the router went down after logging the
        status and before deleting the route, perhaps before the submitter
        had its receipt. That message is finished again with its logged
        status (at least once: the submitter may now have it twice), not
        as ``unknown``, and not logged a second time."""
        by_message: dict[str, list[Any]] = {}
        for row in rows:
            by_message.setdefault(row["message_id"], []).append(row)
        finished = 0
        for message_id, routes in by_message.items():
            gone: list[tuple[str, str]] = []
            for row in routes:
                if self._id_reused(row["carrier"], row["carrier_id"], message_id):
                    continue
                c = self.carriers.get(row["carrier"])
                if c is not None:
                    c.correlator.forget(row["carrier_id"])
                gone.append((row["carrier"], row["carrier_id"]))
            first = routes[0]
            d = self.active.get(message_id)
            if d is None and not self._finished_here(message_id):
                d = self._rebuild_delivery(first, first["carrier"], len(routes))
            # (None: its last receipt came as the route was claimed.)
            if d is None:
                if message_id not in self._unsafe:
                    self._forget_routes(gone, message_id)
                continue
            # The routes go after the finish, and after the submitter's
            # receipt is safe (_finish, _forget_route).
            logged = first.get("final_status")
            if logged is None:
                self._finish(
                    d, Status.UNKNOWN, "no_receipt", d.carrier or first["carrier"], routes=gone
                )
            else:
                carrier = first.get("final_carrier") or d.carrier or first["carrier"]
                at = first["final_at"].timestamp()
                self._finish(d, Status(logged), first.get("final_error"), carrier, at, gone)
                metrics.RECEIPTS_RESENT.inc()
            finished += 1
        return finished

    def _finished_here(self, message_id: str) -> bool:
        summary = self.recent.get(message_id)
        return summary is not None and _from_summary(message_id, summary).status.final

    def _rebuild_delivery(self, row: Any, carrier: str, remaining: int) -> Delivery:
        info = json.loads(row["info"]) if row["info"] else {}
        accepted = row["accepted_at"].timestamp()
        msg = Message(
            id=row["message_id"],
            account_id=row["account_id"],
            account=row["account"],
            origin=Origin(row["origin"]),
            msg_class=MessageClass(row["class"]),
            source=info.get("source", ""),
            source_ton=info.get("source_ton", 0),
            source_npi=info.get("source_npi", 0),
            destination=info.get("destination", ""),
            country=row["country"],
            data_coding=0,
            esm_class=0,
            segments=(b"",) * row["parts"],
            text=None,
            registered_delivery=row["registered_delivery"],
            accepted_at=accepted,
            expires_at=accepted + 7 * 86400,
            userref=info.get("userref"),
            callback_url=info.get("callback_url"),
            part_ids=tuple(info.get("part_ids", ())),
            part_receipts=tuple(info.get("part_receipts", ())),
        )
        d = Delivery(
            msg,
            status=Status.SUBMITTED,
            carrier=carrier,
            updated_at=accepted,
            parts_done=row["parts"] - remaining,
            parts_taken=row["parts"],
            spooled=False,
        )
        self.active[msg.id] = d
        return d

    def _finish(
        self,
        d: Delivery,
        status: Status,
        error: str | None,
        carrier: str,
        logged_at: float | None = None,
        routes: Sequence[tuple[str, str]] = (),
    ) -> None:
        """``logged_at``: when the traffic log recorded this status, which it
        holds already (finish_overdue). ``routes``: the receipt routes
        (carrier, carrier id) that brought the finish, deleted once the
        traffic log holds it and the submitter's receipt no longer rests on
        this process's memory (ReceiptSink.deliver): a crash before either
        leaves a route, and the next start finishes the message again with
        its logged status, so the receipt is sent again (finish_overdue).
        Before, a receipt waiting for the customer's deliver_sm_resp, or a
        webhook not yet in its outbox (written every second), was lost."""
        if d.status.final:
            self._forget_routes(routes, d.message.id)
            return
        now = self.wall() if logged_at is None else logged_at
        d.status = status
        d.error = error
        d.updated_at = now
        d.carrier = carrier
        msg = d.message
        if d.spooled:
            d.spooled = False
            self._taken(msg)
        if logged_at is None:  # else counted in the life that logged it
            metrics.child(metrics.FINAL, carrier, status.value).inc()
            latency = max(0.0, now - msg.accepted_at)
            metrics.child(metrics.DELIVERY_LATENCY, carrier).observe(latency)
            self.traffic_log.record_event(msg, status.value, carrier, error, now)
        sink = self.sinks.get(msg.origin)
        if sink is not None and routes and self._routes_durable and self.traffic_log.pool:
            # (Without the traffic log a route left by a crash would be
            # finished as unknown, not with the status it brought.)
            self._unsafe.add(msg.id)
            sink.deliver(d, partial(self._receipt_safe, routes, msg.id))
        else:
            if sink is not None:
                sink.deliver(d)
            self._forget_routes(routes, msg.id)
        self._retire(d)

    def _retire(self, d: Delivery) -> None:
        """Out of the active set; its summary answers status lookups."""
        msg = d.message
        self.active.pop(msg.id, None)
        summary = _summary(d)
        self.recent[msg.id] = summary
        for pid in msg.part_ids:
            # Each part id answers query_sm on its own once the alias is gone.
            self.alias.pop(pid, None)
            self.recent[pid] = summary
        while len(self.recent) > self.recent_limit:
            self.recent.popitem(last=False)

    def release_receipt_waits(self, scan_limit: int = 50_000) -> int:
        """Let go from memory of messages at a carrier whose receipt has not
        come within ``delivery.receipt_memory`` (carriers lose some receipts;
        kept forever they would grow memory without bound). A receipt that
        comes later is still matched through receipt_routes, as after a
        restart (at-least-once mode; router/carriers/deadline.py finishes
        those whose receipt never comes). In in-memory mode nothing could
        match a later receipt: the message is finished as ``unknown`` now.
        Messages are in acceptance order, so the scan stops at the first one
        too young."""
        cutoff = self.wall() - self.cfg.receipt_memory
        old: list[Delivery] = []
        for scanned, d in enumerate(self.active.values()):
            if d.message.accepted_at >= cutoff or scanned >= scan_limit:
                break
            if d.status is Status.SUBMITTED and d.updated_at < cutoff:
                old.append(d)
        for d in old:
            for carrier_id in d.carrier_ids:
                for carrier in self.carriers.values():
                    carrier.correlator.forget(carrier_id)
            if self.recovery is None:
                self._finish(d, Status.UNKNOWN, "no_receipt", d.carrier or "")
            else:
                self._retire(d)
        if old:
            metrics.RECEIPT_WAITS_RELEASED.inc(len(old))
            log.info("receipt_waits_released", messages=len(old))
        return len(old)

    def _taken(self, msg: Message) -> None:
        """The spool rows of a message may go: its own, or its parts'."""
        if msg.part_ids:
            for pid in msg.part_ids:
                self.spool.taken(pid)
        else:
            self.spool.taken(msg.id)

    # ---------------------------------------------------------- reload

    def set_account_rates(self, rates: dict[int, float | None]) -> None:
        """Per-account messages/s limits (None = unlimited); kept across reloads."""
        now = self.clock()
        for account_id, tps in rates.items():
            bucket = self.account_limits.get(account_id)
            if tps is None or tps <= 0:
                self.account_limits.pop(account_id, None)
            elif bucket is None:
                self.account_limits[account_id] = TokenBucket(tps, now)
            elif bucket.max_rate != tps:
                bucket.set_rate(tps)

    def set_carrier_shares(self, shares: dict[str, float], default: float) -> None:
        """This worker's fraction of each carrier's tps (``default`` for the
        carriers not named), from the supervisor's rebalance."""
        self.carrier_shares = shares
        self.carrier_share_default = default
        for name, carrier in self.carriers.items():
            carrier.set_share(shares.get(name, default))

    def demand(self) -> tuple[dict[int, int], dict[str, int]]:
        """Tokens asked of each account limit and each carrier's limit since
        the last call, a carrier's backlog added: what a worker reports for
        the rebalance of the shares (router/shares.py). Only non-zero ones."""
        seen = self._asked
        now: dict[object, tuple[TokenBucket, int]] = {}

        def since(key: object, bucket: TokenBucket) -> int:
            # Counted per bucket: one made anew (a limit set again) starts at 0.
            last = seen.get(key)
            now[key] = (bucket, bucket.asked)
            return bucket.asked - (last[1] if last is not None and last[0] is bucket else 0)

        accounts: dict[int, int] = {}
        for account_id, bucket in self.account_limits.items():
            asked = since(account_id, bucket)
            if asked > 0:
                accounts[account_id] = asked
        carriers: dict[str, int] = {}
        for name, carrier in self.carriers.items():
            asked = since(name, carrier.bucket) + carrier.backlog
            if asked > 0:
                carriers[name] = asked
        self._asked = now  # limits that are gone are forgotten
        return accounts, carriers

    def reconfigure(self, cfg: Config) -> dict[str, list[str]]:
        """Apply a new config's routes and carriers without touching customer
        binds: new carriers start, removed ones hand their queue to the
        routes' remaining carriers and stop, changed limits apply at once.
        Connection settings of an existing carrier (host, port, credentials)
        take effect at its next reconnect."""
        changes: dict[str, list[str]] = {"added": [], "removed": [], "updated": []}
        new = {c.name: c for c in cfg.carriers}
        for name, ccfg in new.items():
            carrier = self.carriers.get(name)
            if carrier is None:
                share = self.carrier_shares.get(name, self.carrier_share_default)
                carrier = Carrier(
                    ccfg, self, clock=self.clock, wall=self.wall, rng=self.rng, share=share
                )
                self.carriers[name] = carrier
                carrier.start()
                changes["added"].append(name)
            elif ccfg != carrier.cfg:
                if ccfg.tps != carrier.cfg.tps:
                    carrier.bucket.set_rate(ccfg.tps * carrier.share)
                carrier.cfg = ccfg
                metrics.CARRIER_QUEUE_CAPACITY.labels(carrier=name).set(ccfg.queue_size)
                changes["updated"].append(name)
        self.cfg = cfg
        self._ack_logged = self._routes_durable and cfg.receipt_ack == "durable"
        self.table = RouteTable.from_config(cfg.routes)
        for name in [n for n in self.carriers if n not in new]:
            gone = self.carriers.pop(name)
            changes["removed"].append(name)
            with contextlib.suppress(KeyError):
                metrics.CARRIER_RATE.remove(name)
            for session in list(gone.sessions):
                if getattr(session, "relayed", False):
                    # Its requests in flight come back unanswered into the
                    # retry list now, so they move on with the queue below.
                    session.close()
            subs = gone.drain()
            for sub in subs:
                msg = sub.delivery.message
                try:
                    names = self.route(msg.destination, msg.country, msg.account)
                except Rejected:
                    names = list(self.carriers)[:1]
                target = self.carriers[names[0]] if names else None
                if target is None:
                    self.on_submit_failed(sub, name, SmppStatus.ESME_RSUBMITFAIL, "carrier removed")
                else:
                    sub.delivery.carrier = target.name
                    target.enqueue([sub], force=True)
            asyncio.get_running_loop().create_task(gone.stop(timeout=5.0))
        return changes

    # ---------------------------------------------------------- health

    def _health_tick(self) -> None:
        try:
            self.failover()
            self.check_memory()
            self._ticks += 1
            if self._ticks % 30 == 0:
                self.release_receipt_waits()
        finally:
            self._tick = asyncio.get_running_loop().call_later(1.0, self._health_tick)

    def check_memory(self) -> None:
        """delivery.max_memory_mb: above it, new messages are refused
        (ESME_RMSGQFUL / 503) until RSS falls below 90% of it."""
        limit = self.cfg.max_memory_mb
        if limit <= 0:
            if self.memory_high:  # switched off by a reload
                self.memory_high = False
                metrics.MEMORY_BRAKE.set(0)
            return
        rss = resident_mb()
        if rss is None:
            return
        was = self.memory_high
        self.memory_high = rss > limit or (was and rss > 0.9 * limit)
        if self.memory_high != was:
            log.warning("memory_brake", engaged=self.memory_high, rss_mb=round(rss), limit_mb=limit)
            metrics.MEMORY_BRAKE.set(1 if self.memory_high else 0)

    def failover(self) -> int:
        """Move queued messages off carriers down for longer than failover_after
        to the next carrier of their route that is up and has room."""
        now = self.clock()
        moved = 0
        for carrier in self.carriers.values():
            if not carrier.backlog:
                continue
            down_long = (
                carrier.down_since is not None
                and now - carrier.down_since >= self.cfg.failover_after
            )
            if not down_long and carrier.benched_until is None:
                continue
            subs = carrier.drain()
            by_message: dict[str, list[Submission]] = {}
            for sub in subs:
                by_message.setdefault(sub.delivery.message.id, []).append(sub)
            for group in by_message.values():
                msg = group[0].delivery.message
                try:
                    names = self.route(msg.destination, msg.country, msg.account)
                except Rejected:
                    names = []
                target = next(
                    (
                        self.carriers[n]
                        for n in names
                        if n != carrier.name
                        and self.carriers[n].healthy
                        and self.carriers[n].has_room(len(group))
                    ),
                    None,
                )
                if target is None:
                    carrier.enqueue(group, force=True)  # nowhere better: wait here
                    continue
                for sub in group:
                    sub.delivery.carrier = target.name
                target.enqueue(group, force=True)
                moved += 1
            if moved:
                log.warning("carrier_failover", carrier=carrier.name, messages=moved)
                metrics.FAILOVERS.labels(carrier.name).inc(moved)
        return moved

    def carrier_health(self) -> dict[str, dict[str, object]]:
        return {
            name: {
                "up": c.up,
                "healthy": c.healthy,
                "binds": len(c.sessions),
                "queue": c.backlog,
                "capacity": c.cfg.queue_size,
                "in_flight": c.in_flight,
            }
            for name, c in self.carriers.items()
        }
