"""Accept -> route -> carrier queue, and the single correlation point that
turns carrier results into message statuses and hands them to the origin.

Both front doors call :meth:`Engine.accept`; neither knows carriers. The
carrier layer reports through the ``CarrierEvents`` methods here; receipts
leave through the ``ReceiptSink`` registered for the message's origin.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import structlog

from .carriers import Carrier, Submission
from .carriers.receipt import CarrierReceipt
from .config import Config
from .model import Delivery, Message, Origin, Status
from .observe import metrics
from .routing import CountryLookup, NoRoute, RouteTable
from .smpp.constants import MessageState, Status as SmppStatus, status_name
from .store.trafficlog import TrafficLog

log = structlog.get_logger("router.engine")


class Rejected(Exception):
    """A message the router will not take, with the answer for each front door."""

    def __init__(self, reason: str, detail: str, smpp_status: int, http_status: int,
                 retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.reason = reason  # stable, also the metric label and problem type
        self.detail = detail  # human text; never contains personal data
        self.smpp_status = smpp_status
        self.http_status = http_status
        self.retry_after = retry_after


class ReceiptSink(Protocol):
    def deliver(self, delivery: Delivery) -> None: ...


def _redact(msg: Message) -> Message:
    """What may stay in memory of a secret message once its fate is final."""
    return dataclasses.replace(msg, source="", destination="", segments=(), text=None,
                               userref=None, tlvs=())


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
    ) -> None:
        self.cfg = cfg
        self.traffic_log = traffic_log
        self.clock = clock
        self.wall = wall
        self.rng = rng or random.Random()
        self.countries = CountryLookup()
        self.table = RouteTable.from_config(cfg.routes)
        self.carriers: dict[str, Carrier] = {
            c.name: Carrier(c, self, clock=clock, wall=wall, rng=self.rng) for c in cfg.carriers
        }
        self.active: dict[str, Delivery] = {}
        self.recent: OrderedDict[str, Delivery] = OrderedDict()
        self.recent_limit = recent_limit
        self.sinks: dict[Origin, ReceiptSink] = {}
        self.accepting = True

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        for c in self.carriers.values():
            c.start()

    async def stop(self, timeout: float = 5.0) -> None:
        self.accepting = False
        for c in self.carriers.values():
            await c.stop(timeout)

    # ------------------------------------------------------------- accept

    def route(self, destination: str, country: str) -> list[str]:
        try:
            return self.table.resolve(destination, country, self.rng).carriers
        except NoRoute as exc:
            raise Rejected("no_route", str(exc), SmppStatus.ESME_RINVDSTADR, 422) from None

    def accept(self, msg: Message) -> Delivery:
        """Take a message or raise Rejected. Returns at once; never awaits."""
        if not self.accepting:
            raise Rejected("draining", "router is shutting down; retry on another node",
                           SmppStatus.ESME_RTHROTTLED, 503, retry_after=5)
        names = self.route(msg.destination, msg.country)
        chosen: Carrier | None = None
        fallback: Carrier | None = None
        for name in names:
            carrier = self.carriers[name]
            if not carrier.has_room(msg.parts):
                continue
            if carrier.up:
                chosen = carrier
                break
            fallback = fallback or carrier
        chosen = chosen or fallback
        if chosen is None:
            raise Rejected("queue_full", "all carriers for this destination are full",
                           SmppStatus.ESME_RMSGQFUL, 429, retry_after=1)
        delivery = Delivery(msg, status=Status.QUEUED, carrier=chosen.name,
                            updated_at=msg.accepted_at)
        chosen.enqueue([Submission(delivery, i) for i in range(msg.parts)])
        self.active[msg.id] = delivery
        self.traffic_log.record_message(msg, chosen.name)
        metrics.ACCEPTED.labels(msg.origin.value, msg.account, msg.country or "ZZ").inc()
        metrics.PARTS_ACCEPTED.labels(msg.origin.value, msg.account).inc(msg.parts)
        return delivery

    def lookup(self, message_id: str) -> Delivery | None:
        return self.active.get(message_id) or self.recent.get(message_id)

    # ------------------------------------------------- carrier events

    def on_submitted(self, sub: Submission, carrier: str, carrier_id: str) -> None:
        d = sub.delivery
        d.carrier = carrier
        if carrier_id:
            d.carrier_ids.append(carrier_id)
        metrics.SUBMITTED.labels(carrier).inc()
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
        metrics.RECEIPTS_IN.labels(carrier, receipt.state.name.lower()).inc()
        d = sub.delivery
        if d.status.final:
            return  # late or duplicate receipt: a final state is never overwritten
        state = receipt.state
        if state in (MessageState.ENROUTE, MessageState.ACCEPTED):
            return
        if state is MessageState.DELIVERED:
            d.parts_done += 1
        else:
            d.parts_failed += 1
            d.error = f"{state.name.lower()}:{receipt.error}"
        if d.parts_done + d.parts_failed < d.message.parts:
            return
        if d.parts_failed == 0:
            self._finish(d, Status.DELIVERED, None, carrier)
        elif state is MessageState.EXPIRED:
            self._finish(d, Status.EXPIRED, d.error, carrier)
        else:
            self._finish(d, Status.FAILED, d.error, carrier)

    def _finish(self, d: Delivery, status: Status, error: str | None, carrier: str) -> None:
        if d.status.final:
            return
        now = self.wall()
        d.status = status
        d.error = error
        d.updated_at = now
        d.carrier = carrier
        msg = d.message
        metrics.FINAL.labels(carrier, status.value).inc()
        metrics.DELIVERY_LATENCY.labels(carrier).observe(max(0.0, now - msg.accepted_at))
        self.traffic_log.record_event(msg, status.value, carrier, error, now)
        sink = self.sinks.get(msg.origin)
        if sink is not None:
            sink.deliver(d)
        self.active.pop(msg.id, None)
        if msg.secret:
            d.message = _redact(msg)
        self.recent[msg.id] = d
        if len(self.recent) > self.recent_limit:
            self.recent.popitem(last=False)

    # ---------------------------------------------------------- health

    def carrier_health(self) -> dict[str, dict[str, object]]:
        return {
            name: {"up": c.up, "binds": len(c.sessions), "queue": c.backlog,
                   "capacity": c.cfg.queue_size, "in_flight": c.in_flight}
            for name, c in self.carriers.items()
        }
