"""One carrier: a pool of SMPP ESME sessions fed from one bounded queue."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import random
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import structlog

from ..config import CarrierConfig
from ..model import Delivery
from ..model import Status as MessageStatus
from ..observe import metrics
from ..smpp.constants import TEMPORARY_STATUSES, BindType, CommandId, MessageState, Status, Tag
from ..smpp.errors import SmppError
from ..smpp.pdu import (
    BindReceiver,
    BindTransceiver,
    BindTransmitter,
    DeliverSm,
    Pdu,
    SubmitSm,
)
from ..smpp.session import Role, SmppSession
from ..smpp.transport import ResponseCallback, SmppProtocol
from ..tasks import resolve
from .correlate import Correlator
from .ratelimit import TokenBucket
from .receipt import CarrierReceipt, is_receipt, parse_receipt

log = structlog.get_logger("router.carriers")

_BIND_PDU = {
    BindType.TRANSMITTER: BindTransmitter,
    BindType.RECEIVER: BindReceiver,
    BindType.TRANSCEIVER: BindTransceiver,
}
_THROTTLE = frozenset({Status.ESME_RTHROTTLED, Status.ESME_RMSGQFUL})
_HEALTH_WINDOW = 50  # recent submit outcomes per carrier
_HEALTH_MIN_SAMPLES = 20
# Plain constants for the per-message paths (an enum member read through its
# class costs ~70 ns on Python 3.11).
_DELIVER_SM = int(CommandId.DELIVER_SM)
_DATA_SM = int(CommandId.DATA_SM)
_SUBMIT_SM_RESP = int(CommandId.SUBMIT_SM_RESP)
_ROK = int(Status.ESME_ROK)
_TAG_RECEIPTED_ID = int(Tag.RECEIPTED_MESSAGE_ID)
_NOT_FINAL_STATES = frozenset({MessageState.ENROUTE, MessageState.ACCEPTED})
_FINAL_STATUSES = frozenset(s for s in MessageStatus if s.final)


@dataclass(slots=True)
class Submission:
    """One segment of one message on its way to a carrier."""

    delivery: Delivery
    part: int
    attempts: int = 0
    sent_at: float = 0.0  # when the current attempt left (carrier clock)


class CarrierEvents(Protocol):
    def on_submitted(self, sub: Submission, carrier: str, carrier_id: str) -> None: ...

    def on_submit_failed(self, sub: Submission, carrier: str, status: int, reason: str) -> None: ...

    def on_expired(self, sub: Submission, carrier: str) -> None: ...

    def on_receipt(self, sub: Submission, carrier: str, receipt: CarrierReceipt) -> None: ...

    def on_unknown_receipt(self, carrier: str, receipt: CarrierReceipt) -> None: ...

    def when_logged(self, callback: Callable[[], None]) -> None: ...


class CarrierSession(SmppProtocol):
    """An ESME session to the carrier; receipts arrive here as deliver_sm."""

    def __init__(self, carrier: Carrier) -> None:
        cfg = carrier.cfg
        super().__init__(
            SmppSession(
                Role.ESME,
                window=cfg.window,
                peer_window=1000,
                response_timeout=cfg.response_timeout,
                enquire_interval=cfg.enquire_interval,
                inactivity_timeout=max(cfg.enquire_interval * 3, cfg.response_timeout * 2),
            ),
            clock=carrier.clock,
        )
        self.carrier = carrier

    def on_request(self, pdu: Pdu) -> None:
        cid = pdu.command_id
        if cid == _DELIVER_SM:
            assert isinstance(pdu, DeliverSm)
            # Always acknowledge (a refused receipt is redelivered forever);
            # a matched one once its status is logged (delivery.receipt_ack).
            try:
                matched = self.carrier._on_deliver(pdu)
            except Exception:
                log.exception("carrier_receipt_failed", carrier=self.carrier.name)
                matched = False
            if matched:
                self.carrier.events.when_logged(partial(self.answer, pdu))
            else:
                self.answer(pdu)
            return
        if cid == _DATA_SM:
            self.answer(pdu)
            return
        raise SmppError("not supported from a carrier", Status.ESME_RINVCMDID)

    def on_closed(self, exc: Exception | None) -> None:
        self.carrier._session_closed(self)


class Carrier:
    def __init__(
        self,
        cfg: CarrierConfig,
        events: CarrierEvents,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        share: float = 1.0,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.events = events
        self.clock = clock
        self.wall = wall
        self.rng = rng or random.Random()
        self.queue: deque[Submission] = deque()
        self._retry: list[tuple[float, int, Submission]] = []
        self._retry_seq = itertools.count()
        self.sessions: list[CarrierSession] = []
        # This process's share of cfg.tps (router/shares.py; 1 without workers).
        self.share = share
        self.bucket = TokenBucket(cfg.tps * share, clock())
        self.correlator: Correlator[Submission] = Correlator()
        # submit_sm in flight -> its submission, by id() of the PDU (alive in
        # its session until answered). One shared callback instead of a
        # closure per message: fewer objects for the garbage collector.
        self._sent: dict[int, Submission] = {}
        self._resp_cb: ResponseCallback = self._on_submit_resp
        # Sibling workers' submit_sm for this carrier (router/carriers/relay.py):
        # sent on our binds before our own queue as soon as a window has room
        # (their rate is their own share), unanswered after their deadline.
        self.relay_queue: deque[tuple[Pdu, ResponseCallback, float]] = deque()
        self._relayed: dict[int, ResponseCallback] = {}
        self._relay_resp_cb: ResponseCallback = self._on_relay_resp
        self._rr = 0
        self._pump_handle: asyncio.TimerHandle | None = None
        # Kept from start(): asyncio.get_running_loop() costs a getpid() system
        # call on Python 3.11, and the pump is scheduled once per message.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pump_at = 0.0
        self._pump_soon = False
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.in_flight = 0
        self.reserved = 0  # segments admitted, waiting for the spool to make them durable
        self.down_since: float | None = clock()
        self.benched_until: float | None = None
        self._results: deque[bool] = deque(
            maxlen=_HEALTH_WINDOW
        )  # None while at least one session is bound
        m = metrics
        self._m_queue = m.CARRIER_QUEUE_DEPTH.labels(carrier=self.name)
        m.CARRIER_QUEUE_CAPACITY.labels(carrier=self.name).set(cfg.queue_size)
        bucket = self.bucket  # read at scrape time: no cost per message
        m.CARRIER_RATE.labels(carrier=self.name).set_function(lambda: bucket.rate)
        self._m_up = m.CARRIER_UP.labels(carrier=self.name)
        self._m_binds = m.CARRIER_BINDS.labels(carrier=self.name)
        self._m_inflight = m.CARRIER_IN_FLIGHT.labels(carrier=self.name)
        self._m_throttled = m.CARRIER_THROTTLED.labels(carrier=self.name)
        self._m_reconnects = m.CARRIER_RECONNECTS.labels(carrier=self.name)
        self._m_submit_latency = m.SUBMIT_LATENCY.labels(carrier=self.name)
        self._m_retries = m.CARRIER_RETRIES.labels(carrier=self.name)
        self._m_up.set(0)
        self._m_healthy = m.CARRIER_HEALTHY.labels(carrier=self.name)
        self._m_healthy.set(1)

    # ---------------------------------------------------------------- state

    @property
    def up(self) -> bool:
        return bool(self.sessions)

    @property
    def backlog(self) -> int:
        return len(self.queue) + len(self._retry)

    def set_share(self, share: float) -> None:
        """A new share of the carrier's tps for this worker process."""
        self.share = share
        self.bucket.rescale(self.cfg.tps * share)

    def has_room(self, n: int = 1) -> bool:
        return self.backlog + self.reserved + n <= self.cfg.queue_size

    def enqueue(self, subs: list[Submission], force: bool = False) -> bool:
        """Queue all segments of a message, or none (False = queue full).

        ``force`` is for messages already promised to a submitter (made
        durable after the room check, or replayed from the spool)."""
        if not force and not self.has_room(len(subs)):
            return False
        self.queue.extend(subs)
        self._m_queue.set(self.backlog)
        self._schedule_pump()
        return True

    def relay(self, pdu: Pdu, callback: ResponseCallback, wait: float) -> None:
        """A sibling worker's submit_sm, to send on one of our binds;
        ``callback(resp_or_None, pdu)`` once, None if not sent within ``wait``."""
        self.relay_queue.append((pdu, callback, self.clock() + wait))
        self._schedule_pump()

    def _on_relay_resp(self, resp: Pdu | None, request: Pdu) -> None:
        callback = self._relayed.pop(id(request), None)
        if callback is not None:
            callback(resp, request)
        self._schedule_pump()  # a window slot is free again

    def _fail_relays(self) -> None:
        while self.relay_queue:
            pdu, callback, _ = self.relay_queue.popleft()
            callback(None, pdu)

    def drain(self) -> list[Submission]:
        """Take every queued submission (failover to another carrier)."""
        subs = list(self.queue) + [s for _, _, s in sorted(self._retry)]
        self.queue.clear()
        self._retry.clear()
        self._m_queue.set(0)
        return subs

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        for i in range(self.cfg.sessions):
            self._tasks.append(
                asyncio.create_task(self._maintain(i), name=f"carrier-{self.name}-{i}")
            )

    async def stop(self, timeout: float = 5.0) -> None:
        """Unbind every session after in-flight submits are answered (or timeout)."""
        self._stopping = True
        deadline = self.clock() + timeout
        while self.in_flight and self.clock() < deadline:  # noqa: ASYNC110 (bounded drain)
            await asyncio.sleep(0.05)
        # Receipts held for their traffic-log write (delivery.receipt_ack)
        # are answered before the unbind: those held now are answered once
        # this callback runs (in order), later ones are sent again later.
        held = asyncio.get_running_loop().create_future()
        self.events.when_logged(partial(resolve, held))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(held, max(0.0, deadline - self.clock()))
        await asyncio.gather(
            *(s.unbind(timeout=1.0) for s in list(self.sessions)), return_exceptions=True
        )
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self._fail_relays()
        if self._pump_handle is not None:
            self._pump_handle.cancel()
        self._loop = None

    async def _maintain(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        delay = self.cfg.reconnect_min
        first = True
        while not self._stopping:
            if not first:
                self._m_reconnects.inc()
            first = False
            proto: CarrierSession | None = None
            try:
                _, session = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: CarrierSession(self),
                        self.cfg.host,
                        self.cfg.port,
                        ssl=self._tls_context(),
                    ),
                    timeout=10,
                )
                proto = session
                bind = _BIND_PDU[self.cfg.bind](
                    system_id=self.cfg.system_id,
                    password=self.cfg.password,
                    system_type=self.cfg.system_type,
                )
                resp = await asyncio.wait_for(proto.request(bind), timeout=10)
                if resp.status != Status.ESME_ROK:
                    log.warning(
                        "carrier_bind_refused",
                        carrier=self.name,
                        session=index,
                        status=f"0x{resp.status:08X}",
                    )
                    proto.close()
                else:
                    delay = self.cfg.reconnect_min
                    self.sessions.append(proto)
                    self._health_changed()
                    log.info("carrier_bound", carrier=self.name, session=index)
                    self._schedule_pump()
                    assert proto.closed is not None
                    await proto.closed
            except (OSError, TimeoutError, ConnectionError) as exc:
                log.warning(
                    "carrier_connect_failed",
                    carrier=self.name,
                    session=index,
                    error=type(exc).__name__,
                )
                if proto is not None:
                    proto.close()
            except asyncio.CancelledError:
                if proto is not None:
                    proto.close()
                raise
            if self._stopping:
                break
            # Full jitter keeps a fleet of routers from reconnecting in step.
            await asyncio.sleep(delay * (0.5 + self.rng.random() / 2))
            delay = min(delay * 2, self.cfg.reconnect_max)

    def _tls_context(self) -> ssl.SSLContext | None:
        if not self.cfg.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.cfg.tls_ca or None)
        if not self.cfg.tls_verify:
            # An operator's explicit choice for a carrier with a private
            # certificate; logged at every connect so it is not forgotten.
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            log.warning("carrier_tls_unverified", carrier=self.name)
        return ctx

    def _session_closed(self, session: CarrierSession) -> None:
        if session in self.sessions:
            self.sessions.remove(session)
            if self._stopping:  # our own unbind at shutdown: expected, not an alarm
                log.info("carrier_session_closed", carrier=self.name)
            else:
                log.warning("carrier_session_lost", carrier=self.name)
            self._health_changed()

    def _health_changed(self) -> None:
        if self.sessions:
            self.down_since = None
        elif self.down_since is None:
            self.down_since = self.clock()
        self._m_up.set(1 if self.sessions else 0)
        self._m_binds.set(len(self.sessions))

    # ------------------------------------------------------------- sending

    def _schedule_pump(self, delay: float = 0.0) -> None:
        if delay <= 0:
            if not self._pump_soon:
                self._pump_soon = True
                (self._loop or asyncio.get_running_loop()).call_soon(self._pump)
            return
        loop = self._loop or asyncio.get_running_loop()
        # uvloop's timer handles have no when(): keep the due time ourselves.
        due = loop.time() + delay
        if self._pump_handle is None or self._pump_at > due:
            if self._pump_handle is not None:
                self._pump_handle.cancel()
            self._pump_at = due
            self._pump_handle = loop.call_later(delay, self._timed_pump)

    def _timed_pump(self) -> None:
        self._pump_handle = None
        self._pump()

    def _pick_session(self) -> CarrierSession | None:
        n = len(self.sessions)
        for i in range(n):
            s = self.sessions[(self._rr + i) % n]
            if s.session.can_send and s.is_open:
                self._rr = (self._rr + i + 1) % n
                return s
        return None

    def _pump(self) -> None:
        self._pump_soon = False
        now = self.clock()
        if self.relay_queue:
            self._pump_relays(now)
        retry = self._retry
        while retry and retry[0][0] <= now:
            self.queue.appendleft(heapq.heappop(retry)[2])
        wall = self.wall()
        queue = self.queue
        while queue:
            sess = self._pick_session()
            if sess is None:
                break
            wait = self.bucket.take(now)
            if wait > 0:
                self._schedule_pump(wait)
                break
            sub = queue.popleft()
            if sub.delivery.message.expires_at <= wall:
                self.events.on_expired(sub, self.name)
                continue
            if sub.delivery.status in _FINAL_STATUSES:
                continue  # e.g. another part already failed permanently
            pdu = self._submit_pdu(sub)
            sub.attempts += 1
            self.in_flight += 1
            sub.sent_at = now
            sess.send_request(pdu, self._resp_cb)
            self._sent[id(pdu)] = sub
        if retry:
            self._schedule_pump(max(0.001, retry[0][0] - now))
        self._m_queue.set(self.backlog)
        self._m_inflight.set(self.in_flight)

    def _pump_relays(self, now: float) -> None:
        relayed = self.relay_queue
        while relayed:
            pdu, callback, deadline = relayed[0]
            if deadline < now:
                relayed.popleft()
                callback(None, pdu)  # waited too long: the sibling resends it
                continue
            sess = self._pick_session()
            if sess is None:
                break
            relayed.popleft()
            self._relayed[id(pdu)] = callback
            sess.send_request(pdu, self._relay_resp_cb)
        if relayed:
            self._schedule_pump(max(0.001, relayed[0][2] - now))

    def _on_submit_resp(self, resp: Pdu | None, request: Pdu) -> None:
        sub = self._sent.pop(id(request), None)
        if sub is not None:
            self._on_resp(sub, resp, sub.sent_at)

    def _submit_pdu(self, sub: Submission) -> SubmitSm:
        msg = sub.delivery.message
        return SubmitSm.make(
            msg.source_ton,
            msg.source_npi,
            msg.source,
            1,
            1,
            msg.destination,
            msg.esm_class,
            1,
            msg.data_coding,
            msg.segments[sub.part],
            dict(msg.tlvs) if msg.tlvs else {},
        )

    @property
    def healthy(self) -> bool:
        """Bound, and not benched for failing too often."""
        if not self.sessions:
            return False
        if self.benched_until is not None:
            if self.clock() < self.benched_until:
                return False
            self.benched_until = None  # cool-down over: a fresh chance
            self._results.clear()
            self._m_healthy.set(1)
        return True

    def _record(self, ok: bool, now: float) -> None:
        """Bench the carrier for a cool-down when most recent submits fail
        (permanent refusals or no answer): e.g. a carrier that lost its
        routes answers everything with an error while staying bound."""
        results = self._results
        results.append(ok)
        if ok or len(results) < _HEALTH_MIN_SAMPLES or self.benched_until is not None:
            return
        failed = results.count(False)
        if failed / len(results) >= self.cfg.failover_error_ratio:
            self.benched_until = now + self.cfg.failover_cooldown
            self._m_healthy.set(0)
            log.warning(
                "carrier_benched",
                carrier=self.name,
                failed=failed,
                of=len(results),
                seconds=self.cfg.failover_cooldown,
            )

    def _on_resp(self, sub: Submission, resp: Pdu | None, sent_at: float) -> None:
        self.in_flight -= 1
        now = self.clock()
        if resp is None:
            self._record(False, now)
            # Timeout or link loss: the carrier may or may not have it. Resend
            # (at-least-once); a duplicate is better than a loss.
            self._retry_later(sub, now, reason="no_response")
        elif resp.status == _ROK and resp.command_id == _SUBMIT_SM_RESP:
            self.bucket.speed_up()
            self._record(True, now)
            self._m_submit_latency.observe(now - sent_at)
            carrier_id = getattr(resp, "message_id", "")
            self.events.on_submitted(sub, self.name, carrier_id)
            if carrier_id:
                early = self.correlator.remember(carrier_id, sub, now)
                if early is not None:
                    self._receipt(sub, early)
        elif resp.status in _THROTTLE:
            self._m_throttled.inc()
            self.bucket.slow_down()
            sub.attempts -= 1  # being throttled is not the message's fault
            self._retry_later(sub, now, reason="throttled", delay=1.0)
        elif resp.status in TEMPORARY_STATUSES:
            self._retry_later(sub, now, reason=f"status_0x{resp.status:X}")
        else:
            self._record(False, now)
            self.events.on_submit_failed(sub, self.name, resp.status, "rejected by carrier")
        self._schedule_pump()

    def _retry_later(
        self, sub: Submission, now: float, reason: str, delay: float | None = None
    ) -> None:
        if sub.attempts >= self.cfg.max_attempts:
            self.events.on_submit_failed(
                sub,
                self.name,
                Status.ESME_RSUBMITFAIL,
                f"gave up after {sub.attempts} attempts ({reason})",
            )
            return
        self._m_retries.inc()
        if delay is None:
            delay = min(60.0, 0.5 * 2 ** max(0, sub.attempts - 1))
        delay *= 0.75 + self.rng.random() / 2
        heapq.heappush(self._retry, (now + delay, next(self._retry_seq), sub))

    # ------------------------------------------------------------ receipts

    def _on_deliver(self, pdu: DeliverSm) -> bool:
        """True if the receipt was matched to a submission here and handled."""
        if not is_receipt(pdu) and _TAG_RECEIPTED_ID not in pdu.tlvs:
            return False  # mobile-originated traffic is out of scope; acknowledged
        receipt = parse_receipt(pdu)
        if receipt is None:
            metrics.RECEIPTS_UNMATCHED.labels(carrier=self.name).inc()
            return False
        sub = self.correlator.lookup(receipt.carrier_id)
        if sub is None:
            # Either its submit_sm_resp is still on the way (parked, matched
            # when it comes) or it belongs to a message from before a restart.
            self.correlator.park(receipt, self.clock())
            self.events.on_unknown_receipt(self.name, receipt)
            return False
        self._receipt(sub, receipt)
        return True

    def take_receipt(self, receipt: CarrierReceipt) -> bool:
        """A receipt of this carrier that reached another node (carriers
        send receipts over any bind): handle it as if it came here; False if
        no submission of ours has that id (any more)."""
        sub = self.correlator.lookup(receipt.carrier_id)
        if sub is None:
            return False
        self.correlator.unpark(receipt.carrier_id)
        self._receipt(sub, receipt)
        return True

    def _receipt(self, sub: Submission, receipt: CarrierReceipt) -> None:
        if receipt.state not in _NOT_FINAL_STATES:
            self.correlator.forget(receipt.carrier_id)
        self.events.on_receipt(sub, self.name, receipt)
