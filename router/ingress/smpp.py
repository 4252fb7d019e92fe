"""The SMPP front door: an SMSC for customer ESMEs.

Binds authenticate against the account store; submit_sm/data_sm become
Messages handed to Engine.submit, answered once durable with our message id
or a specific command_status; receipts go back as deliver_sm to a receiver or
transceiver bind of the submitting account (round-robin, retried on another
bind, kept for ``receipt_retention`` seconds when none is bound).

Parts of a message the customer split itself (UDH concatenation or SAR
TLVs) are answered one by one with their own ids, held by the engine and
reassembled here (``concat.py``): the whole message is routed once and
sent to one carrier; each part id gets its own receipt with the message's
final state. Reassembly is best-effort across a crash (held parts are
replayed from the spool each on its own); delivery is not.

Logs carry account names, bind types and statuses, never addresses or text.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import structlog

from ..accounts import Account, AccountStore, AuthError
from ..carriers.receipt import build_receipt
from ..config import Config
from ..engine import Engine, Rejected
from ..model import Delivery, Message, MessageClass, Origin, Status, new_message_id
from ..observe import metrics
from ..smpp.constants import (
    ESM_UDHI,
    REGDLV_FAILURE,
    REGDLV_FINAL,
    BindType,
    CommandId,
    MessageState,
    Tag,
    status_name,
)
from ..smpp.constants import (
    Status as Smpp,
)
from ..smpp.errors import SmppError
from ..smpp.pdu import CancelSm, DataSm, DeliverSm, Pdu, QuerySm, SubmitSm, _Bind
from ..smpp.session import Reject, Role, SmppSession
from ..smpp.transport import ResponseCallback, SmppProtocol
from ..text.segment import Concat, Encoded, decode_payload, parse_udh, split
from .concat import ConcatBuffer, HeldPart, PartRef, combine, fits_one_sms, locate
from .handoff import ReceiptHandoff
from .validate import InvalidField, check_destination, check_sender, parse_smpp_time

log = structlog.get_logger("router.ingress.smpp")

MESSAGE_CLASS_TAG = 0x1400  # vendor TLV: 0 standard, 1 secret (configurable later)
DEFAULT_VALIDITY = 48 * 3600.0
MAX_VALIDITY = 7 * 24 * 3600.0
_MAX_STATE_FOR_STATUS = {
    Status.ACCEPTED: MessageState.ACCEPTED,
    Status.SCHEDULED: MessageState.ENROUTE,
    Status.QUEUED: MessageState.ENROUTE,
    Status.SUBMITTED: MessageState.ENROUTE,
    Status.DELIVERED: MessageState.DELIVERED,
    Status.FAILED: MessageState.UNDELIVERABLE,
    Status.EXPIRED: MessageState.EXPIRED,
    Status.REJECTED: MessageState.REJECTED,
    Status.CANCELED: MessageState.DELETED,
    Status.UNKNOWN: MessageState.UNKNOWN,
}
_CODING_UNITS = {0x00: "gsm7", 0x08: "ucs2", 0x03: "latin1"}
_SAR_TAGS = frozenset((Tag.SAR_MSG_REF_NUM, Tag.SAR_TOTAL_SEGMENTS, Tag.SAR_SEGMENT_SEQNUM))
_THROTTLING = frozenset((Smpp.ESME_RTHROTTLED, Smpp.ESME_RMSGQFUL))
_SUBMIT_RESPONSES = frozenset((CommandId.SUBMIT_SM_RESP, CommandId.DATA_SM_RESP))


class BindAdmission(Protocol):
    """Who counts binds across processes (router/workers.py's supervisor link)."""

    async def admit(self, account_id: int, max_binds: int) -> int | None: ...

    def release(self, account_id: int, token: int) -> None: ...


class CustomerBind(SmppProtocol):
    """One customer connection."""

    def __init__(self, door: SmppFrontDoor) -> None:
        c = door.cfg.smpp
        super().__init__(
            SmppSession(
                Role.SMSC,
                window=c.window,
                peer_window=c.window,
                max_pdu=c.max_pdu,
                response_timeout=c.response_timeout,
                enquire_interval=c.enquire_interval,
                inactivity_timeout=c.inactivity_timeout,
            ),
            clock=door.clock,
        )
        self.door = door
        self.account: Account | None = None
        self.bind_type: BindType | None = None
        self.admission = 0  # the supervisor's token for this bind (router/workers.py); 0 = none
        self._binding = False
        self._throttle_streak = 0  # read holds since the last accepted submit

    @property
    def peer_ip(self) -> str | None:
        return self.peer[0] if self.peer else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.door.connections.add(self)
        if not self.door.accepting:
            # Draining: a clear retry signal instead of a silent refusal.
            self.close()

    def on_request(self, pdu: Pdu) -> None:
        cid = pdu.command_id
        if cid in (CommandId.BIND_TRANSMITTER, CommandId.BIND_RECEIVER, CommandId.BIND_TRANSCEIVER):
            assert isinstance(pdu, _Bind)
            if self._binding:
                raise SmppError("bind already in progress", Smpp.ESME_RALYBND)
            self._binding = True
            asyncio.get_running_loop().create_task(self._bind(pdu))
        elif cid == CommandId.SUBMIT_SM:
            assert isinstance(pdu, SubmitSm)
            self.door.submit(self, pdu)
        elif cid == CommandId.DATA_SM:
            assert isinstance(pdu, DataSm)
            self.door.submit(self, pdu)
        elif cid == CommandId.QUERY_SM:
            assert isinstance(pdu, QuerySm)
            self.door.query(self, pdu)
        elif cid == CommandId.CANCEL_SM:
            assert isinstance(pdu, CancelSm)
            self.door.cancel(self, pdu)
        else:
            raise SmppError("operation not supported", Smpp.ESME_RINVCMDID)

    async def _bind(self, pdu: _Bind) -> None:
        bind_type = BindType(pdu.command_id)
        try:
            if not self.door.accepting:
                raise AuthError(Smpp.ESME_RBINDFAIL, "draining")
            account = await self.door.accounts.authenticate_bind(
                pdu.system_id, pdu.password, self.peer_ip
            )
            token = await self.door.admit(account)
            if token is None:
                raise AuthError(Smpp.ESME_RBINDFAIL, "max_binds")
        except AuthError as exc:
            metrics.BIND_FAILURES.labels(exc.reason).inc()
            log.warning(
                "bind_refused",
                reason=exc.reason,
                status=status_name(exc.status),
                bind_type=bind_type.name.lower(),
            )
            self._binding = False
            if self.is_open:
                self.answer(pdu, exc.status, system_id="sms-router")
            return
        if not self.is_open:
            self.door.unadmit(account.id, token)
            return
        self.account = account
        self.bind_type = bind_type
        self.admission = token
        self.answer(pdu, Smpp.ESME_ROK, system_id="sms-router")
        self.door.add_bind(self)
        log.info("bound", account=account.name, bind_type=bind_type.name.lower())

    def send(self, pdu: Pdu) -> None:
        super().send(pdu)
        status = pdu.status
        if status:
            if status in _THROTTLING:
                self._throttled()
        elif self._throttle_streak and pdu.command_id in _SUBMIT_RESPONSES:
            self._throttle_streak = 0  # taking again: the next hold starts short

    def _throttled(self) -> None:
        """A client told to slow down often resends at once, and answering
        that storm costs the router what accepting would. So after a
        throttling answer the bind is not read for throttle_pause seconds,
        doubling per hold while the answers go on (up to throttle_pause_max):
        what it sends meanwhile waits in the socket, and TCP slows it.

        A hold holds the whole bind (one read, of up to the transport's
        buffer, is answered per hold). When only the bind's window overflows,
        its in-window submits are accepted and reset the streak, so those
        holds stay at throttle_pause."""
        c = self.door.cfg.smpp
        pause = throttle_hold(self._throttle_streak, c.throttle_pause, c.throttle_pause_max)
        if self.hold_reading(pause):
            self._throttle_streak += 1
            metrics.SMPP_READ_HOLDS.inc()

    def on_reject(self, event: Reject) -> None:
        metrics.child(metrics.PDU_ERRORS, status_name(event.answer.status)).inc()
        if event.answer.status == Smpp.ESME_RTHROTTLED:
            metrics.child(metrics.THROTTLE_SENT, "smpp", "window").inc()

    def on_internal_error(self, pdu: Pdu, exc: Exception) -> None:
        # Type only: an exception message may quote a field of the PDU.
        log.error("internal_error", command=pdu.name, error=type(exc).__name__)
        metrics.REJECTED.labels("smpp", self.account.name if self.account else "", "internal").inc()

    def on_idle(self) -> None:
        log.info("bind_idle_closed", account=self.account.name if self.account else None)
        self.close()

    def on_closed(self, exc: Exception | None) -> None:
        self.door.connections.discard(self)
        if self.account is not None:
            self.door.remove_bind(self)


def throttle_hold(streak: int, first: float, cap: float) -> float:
    """Seconds to hold a bind after ``streak`` holds in a row: ``first``,
    doubling, at most ``cap``."""
    return min(first * 2.0 ** min(streak, 16), cap)


class PendingReceipt:
    __slots__ = ("pdu", "expires", "tries", "secret", "handed", "done")

    def __init__(
        self, pdu: DeliverSm, expires: float, secret: bool = False, handed: bool = False
    ) -> None:
        self.pdu = pdu
        self.expires = expires
        self.tries = 0
        self.secret = secret  # a secret message's: never written down with its addresses
        self.handed = handed  # came from another node: not handed on again
        # Called once it no longer rests on this process's memory (see
        # ReceiptSink.deliver): answered, written down, or given up.
        self.done: Callable[[], None] | None = None

    def settle(self) -> None:
        done = self.done
        if done is not None:
            self.done = None
            done()


class _AllOf:
    """Calls ``then`` at the last of ``left`` calls: a message reassembled
    from customer parts has a receipt per part."""

    __slots__ = ("left", "then")

    def __init__(self, left: int, then: Callable[[], None]) -> None:
        self.left = left
        self.then = then

    def __call__(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.then()


class SmppFrontDoor:
    """The listener, the bind registry and the receipt sender."""

    def __init__(
        self,
        cfg: Config,
        engine: Engine,
        accounts: AccountStore,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.accounts = accounts
        self.clock = clock
        self.wall = wall
        self.server: asyncio.base_events.Server | None = None
        self.connections: set[CustomerBind] = set()
        self.binds: dict[int, list[CustomerBind]] = {}
        self.receivers: dict[int, list[CustomerBind]] = {}
        self.pending: dict[int, deque[PendingReceipt]] = {}
        self._rr: dict[int, int] = {}
        self.accepting = True
        engine.sinks[Origin.SMPP] = self
        self._sweeper: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Customer-split parts waiting for their siblings (held by the engine).
        self.concat = ConcatBuffer(cfg.smpp.reassembly_timeout, cfg.smpp.reassembly_max_parts)
        self._concat_timer: asyncio.TimerHandle | None = None
        self._concat_stopped = False
        # Receipts for accounts bound only to other routers sharing the
        # database (set by the app when the spool is durable).
        self.handoff: ReceiptHandoff | None = None
        # With several worker processes (router/workers.py), max_binds is
        # counted across them by the supervisor: it admits each bind.
        self.admission: BindAdmission | None = None
        self.reuse_port = False  # share the port with sibling workers (SO_REUSEPORT)

    def reconfigure(self, cfg: Config) -> None:
        """SIGHUP: [smpp] settings apply to binds made from now on (window,
        timers, max_pdu) and at once to receipts, reassembly and throttle
        holds (from a bind's next hold); binds already up keep their session
        settings. Listen addresses need a restart."""
        if cfg.smpp_listen != self.cfg.smpp_listen:
            log.warning("reload_listen_ignored", section="listen", hint="restart to change")
        self.cfg = cfg
        self.concat.timeout = cfg.smpp.reassembly_timeout
        self.concat.max_parts = cfg.smpp.reassembly_max_parts

    async def start(self) -> int:
        host, port = self.cfg.smpp_listen
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: CustomerBind(self),
            host,
            port,
            backlog=2048,
            reuse_address=True,
            reuse_port=self.reuse_port or None,
        )
        self._sweeper = loop.call_later(5, self._sweep)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, unbind every customer politely, close."""
        self.accepting = False
        if self.server is not None:
            self.server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        conns = list(self.connections)
        if conns:
            await asyncio.wait(
                [asyncio.ensure_future(c.unbind(timeout=min(timeout, 2.0))) for c in conns],
                timeout=timeout,
            )
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.abort()
        # Nothing durable stays only in memory: held parts go to the engine
        # now, before it stops (each on its own: their groups are incomplete).
        self._concat_stopped = True
        if self._concat_timer is not None:
            self._concat_timer.cancel()
            self._concat_timer = None
        for group in self.concat.drain():
            for hp in group.in_order():
                self._release_alone(hp, "stopping")
        metrics.CONCAT_HELD.set(0)

    # ---------------------------------------------------------------- binds

    def bind_count(self, account_id: int) -> int:
        return len(self.binds.get(account_id, ()))

    async def admit(self, account: Account) -> int | None:
        """None if the account is at max_binds, else a token to give back
        when the bind ends (0 when this process counts alone)."""
        if self.bind_count(account.id) >= account.max_binds:
            return None
        if self.admission is None:
            return 0
        return await self.admission.admit(account.id, account.max_binds)

    def unadmit(self, account_id: int, token: int) -> None:
        if token and self.admission is not None:
            self.admission.release(account_id, token)

    def add_bind(self, b: CustomerBind) -> None:
        assert b.account is not None and b.bind_type is not None
        self.binds.setdefault(b.account.id, []).append(b)
        metrics.BINDS.labels(b.account.name, b.bind_type.name.lower()).inc()
        if b.bind_type.can_receive:
            rl = self.receivers.setdefault(b.account.id, [])
            rl.append(b)
            if self.handoff is not None:
                self.handoff.bound(b.account.id, len(rl))
            self._flush_pending(b.account.id)

    def remove_bind(self, b: CustomerBind) -> None:
        assert b.account is not None and b.bind_type is not None
        lst = self.binds.get(b.account.id)
        if lst and b in lst:
            lst.remove(b)
            self.unadmit(b.account.id, b.admission)
            metrics.BINDS.labels(b.account.name, b.bind_type.name.lower()).dec()
        rl = self.receivers.get(b.account.id)
        if rl and b in rl:
            rl.remove(b)
            if self.handoff is not None:
                self.handoff.bound(b.account.id, len(rl))

    # --------------------------------------------------------------- submit

    def submit(self, bind: CustomerBind, pdu: SubmitSm | DataSm) -> None:
        account = bind.account
        assert account is not None
        try:
            msg, part = self._build(account, pdu)
        except InvalidField as exc:
            status = Smpp.ESME_RINVDSTADR if exc.field == "to" else Smpp.ESME_RINVSRCADR
            metrics.child(metrics.REJECTED, "smpp", account.name, f"invalid_{exc.field}").inc()
            bind.answer(pdu, status)
            return
        except SmppError as exc:
            metrics.child(
                metrics.REJECTED, "smpp", account.name, status_name(exc.status).lower()
            ).inc()
            bind.answer(pdu, exc.status)
            return

        # A part is answered as soon as it is durable, never kept waiting for
        # its siblings (many clients send with a window of 1). Scheduled
        # parts are not reassembled: each waits for its time on its own.
        hold = part is not None and msg.send_at is None and self.cfg.smpp.reassembly_max_parts > 0

        def done(result: Delivery | Rejected) -> None:
            # The answer goes out only now: after the message is durable.
            if isinstance(result, Rejected):
                metrics.child(metrics.REJECTED, "smpp", account.name, result.reason).inc()
                if result.smpp_status in (Smpp.ESME_RTHROTTLED, Smpp.ESME_RMSGQFUL):
                    metrics.child(metrics.THROTTLE_SENT, "smpp", result.reason).inc()
                bind.answer(pdu, result.smpp_status)
            else:
                bind.answer(pdu, Smpp.ESME_ROK, message_id=result.message.id)
                if hold:
                    assert part is not None
                    self._held(HeldPart(msg, part))

        self.engine.submit(msg, done, hold=hold)

    # ----------------------------------------------------------- reassembly

    def _held(self, hp: HeldPart) -> None:
        """A part is durable and held by the engine: group it, and release
        what is complete or cannot wait."""
        if self._concat_stopped:
            self._release_alone(hp, "stopping")
            return
        out = self.concat.add(hp, self.clock())
        for alone, reason in out.alone:
            self._release_alone(alone, reason)
        if out.combined is not None:
            self._release(combine(out.combined))
            metrics.CONCAT_MESSAGES.inc()
        metrics.CONCAT_HELD.set(self.concat.held)
        self._arm_concat_timer()

    def _arm_concat_timer(self) -> None:
        # Deadlines grow with arrival order, so one timer for the oldest
        # group is enough; it re-arms itself for the next one.
        if self._concat_timer is not None or self._concat_stopped:
            return
        deadline = self.concat.next_deadline()
        if deadline is None:
            return
        self._concat_timer = asyncio.get_running_loop().call_later(
            max(0.0, deadline - self.clock()), self._concat_expire
        )

    def _concat_expire(self) -> None:
        self._concat_timer = None
        for group in self.concat.expire(self.clock()):
            for hp in group.in_order():
                self._release_alone(hp, "timeout")
        metrics.CONCAT_HELD.set(self.concat.held)
        self._arm_concat_timer()

    def _release_alone(self, hp: HeldPart, reason: str) -> None:
        metrics.CONCAT_PARTS_ALONE.labels(reason).inc()
        self._release(hp.msg)

    def _release(self, msg: Message) -> None:
        try:
            self.engine.release(msg)
        except Exception as exc:  # it stays in the spool: sent after a restart
            log.error("release_failed", error=type(exc).__name__)

    # ---------------------------------------------------------------- build

    def _build(self, account: Account, pdu: SubmitSm | DataSm) -> tuple[Message, PartRef | None]:
        """The Message for one submit, and where it sits in a message the
        customer split itself (None for a whole message)."""
        now = self.wall()
        destination = check_destination(pdu.destination_addr, pdu.dest_addr_ton or 1)
        source, ton, npi = check_sender(pdu.source_addr, pdu.source_addr_ton or None)
        if isinstance(pdu, SubmitSm):
            if pdu.short_message and Tag.MESSAGE_PAYLOAD in pdu.tlvs:
                raise SmppError("both short_message and message_payload", Smpp.ESME_RINVPARLEN)
            try:
                scheduled = parse_smpp_time(pdu.schedule_delivery_time, now)
            except ValueError:
                raise SmppError("bad schedule_delivery_time", Smpp.ESME_RINVSCHED) from None
            # A time in the past (or now) means "send now"; a future one
            # waits in the durable spool (the engine checks the horizon).
            send_at = scheduled if scheduled is not None and scheduled > now else None
            try:
                expires = parse_smpp_time(pdu.validity_period, now)
            except ValueError:
                raise SmppError("bad validity_period", Smpp.ESME_RINVEXPIRY) from None
            if expires is not None and expires <= now:
                raise SmppError("validity_period in the past", Smpp.ESME_RINVEXPIRY)
        else:
            expires = None
            send_at = None
        start = send_at or now
        expires = min(expires or start + DEFAULT_VALIDITY, start + MAX_VALIDITY)
        payload = pdu.payload
        if not payload:
            raise SmppError("empty message", Smpp.ESME_RINVMSGLEN)
        regdlv = pdu.registered_delivery
        if regdlv & 0x03 == 0x03:
            raise SmppError("registered_delivery bits 0-1 = 3 is reserved", Smpp.ESME_RINVREGDLVFLG)
        msg_class = account.default_class
        cls_raw = pdu.tlv_int(MESSAGE_CLASS_TAG)
        if cls_raw is not None:
            if cls_raw not in (0, 1):
                raise SmppError("message class TLV must be 0 or 1", Smpp.ESME_RINVOPTPARAMVAL)
            msg_class = MessageClass.SECRET if cls_raw == 1 else MessageClass.STANDARD
        dc = pdu.data_coding
        esm = pdu.esm_class & ESM_UDHI
        coding = _CODING_UNITS.get(dc, "binary")
        concat: Concat | None = None
        body_at = 0
        if esm:
            # The customer built the UDH: one segment, which must be a valid
            # UDH plus a body that fits one SMS.
            try:
                concat, body = parse_udh(payload)
            except ValueError:
                raise SmppError("malformed UDH", Smpp.ESME_RINVESMCLASS) from None
            body_at = len(payload) - len(body)
            if not fits_one_sms(coding == "gsm7", body_at, len(body)):
                raise SmppError("segment longer than one SMS", Smpp.ESME_RINVMSGLEN)
        # A part of a message the customer split (UDH IE or SAR TLVs)?
        part = locate(payload, concat, body_at, pdu.tlvs, coding == "gsm7")
        if esm or part is not None:
            segments: tuple[bytes, ...] = (payload,)
            body = payload[body_at:]
        else:
            # Whatever does not fit one SMS (short_message up to 254 octets or
            # message_payload) is split here into UDH segments.
            if coding == "ucs2" and len(payload) % 2:
                raise SmppError("UCS2 text has an odd number of octets", Smpp.ESME_RINVMSGLEN)
            if len(payload) <= 140 or (coding == "gsm7" and len(payload) <= 160):
                segments = (payload,)  # fits one SMS: the common case, no split needed
            else:
                units = len(payload) // 2 if coding == "ucs2" else len(payload)
                enc = Encoded(coding=coding, data_coding=dc, payload=payload, units=units)
                try:
                    segments = tuple(split(enc, ref=self.engine.rng.randrange(256)))
                except ValueError:
                    raise SmppError("message too long", Smpp.ESME_RINVMSGLEN) from None
                if len(segments) > 1:
                    esm = ESM_UDHI
            body = payload
        tlvs = tuple((t, v) for t, v in pdu.tlvs.items() if t in _SAR_TAGS) if pdu.tlvs else ()
        return Message(
            id=new_message_id(),
            account_id=account.id,
            account=account.name,
            origin=Origin.SMPP,
            msg_class=msg_class,
            source=source,
            source_ton=ton,
            source_npi=npi,
            destination=destination,
            country=self.engine.countries.country(destination),
            data_coding=dc,
            esm_class=esm,
            segments=segments,
            text=None if msg_class is MessageClass.SECRET else decode_payload(dc, body),
            registered_delivery=regdlv,
            accepted_at=now,
            expires_at=expires,
            userref=str(pdu.tlv_int(Tag.USER_MESSAGE_REFERENCE))
            if Tag.USER_MESSAGE_REFERENCE in pdu.tlvs
            else None,
            tlvs=tlvs,
            send_at=send_at,
        ), part

    def query(self, bind: CustomerBind, pdu: QuerySm) -> None:
        hp = self.concat.find(pdu.message_id)
        if hp is not None:
            # Held for its siblings: on its way (ENROUTE), not yet at a carrier.
            held = Delivery(hp.msg, status=Status.QUEUED, updated_at=hp.msg.accepted_at)
            self._answer_query(bind, pdu, held)
            return
        d = self.engine.lookup(pdu.message_id)
        if d is None:
            # A scheduled message (only in the spool), or one the router no
            # longer holds in memory (the traffic log knows its state).
            self._spawn(self._query_database(bind, pdu))
            return
        self._answer_query(bind, pdu, d)

    async def _query_database(self, bind: CustomerBind, pdu: QuerySm) -> None:
        try:
            d = await self.engine.lookup_async(pdu.message_id)
        except Exception as exc:  # database trouble: a clear failure, not a hang
            log.warning("query_failed", error=type(exc).__name__)
            d = None
        if bind.is_open:
            self._answer_query(bind, pdu, d)

    def cancel(self, bind: CustomerBind, pdu: CancelSm) -> None:
        """cancel_sm: withdraws a scheduled message of this account that is
        not yet due (by message_id; cancelling by address is not offered,
        as SMPP allows). Anything else -> ESME_RCANCELFAIL."""
        if not pdu.message_id:
            bind.answer(pdu, Smpp.ESME_RCANCELFAIL)
            return
        self._spawn(self._cancel(bind, pdu))

    async def _cancel(self, bind: CustomerBind, pdu: CancelSm) -> None:
        assert bind.account is not None
        try:
            d = await self.engine.cancel(pdu.message_id, bind.account.id)
        except Exception as exc:
            log.warning("cancel_failed", error=type(exc).__name__)
            d = None
        if bind.is_open:
            bind.answer(pdu, Smpp.ESME_ROK if d is not None else Smpp.ESME_RCANCELFAIL)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _answer_query(self, bind: CustomerBind, pdu: QuerySm, d: Delivery | None) -> None:
        assert bind.account is not None
        if d is None or d.message.account_id != bind.account.id:
            bind.answer(pdu, Smpp.ESME_RQUERYFAIL)
            return
        final = (
            time.strftime("%y%m%d%H%M%S", time.gmtime(d.updated_at)) + "000+"
            if d.status.final
            else ""
        )
        bind.answer(
            pdu,
            Smpp.ESME_ROK,
            # The id asked about: a part's, when its message was reassembled.
            message_id=pdu.message_id,
            final_date=final,
            message_state=int(_MAX_STATE_FOR_STATUS[d.status]),
            error_code=0 if d.status is Status.DELIVERED or not d.status.final else 1,
        )

    # ------------------------------------------------------------- receipts

    def deliver(self, d: Delivery, done: Callable[[], None] | None = None) -> None:
        """ReceiptSink: a message of an SMPP customer reached a final status.

        A message reassembled from customer parts gets one receipt per part
        id (each one SMS: sub:001), all with the message's final state, for
        each part whose own registered_delivery asks for it. ``done``: once
        every one of them is answered by the customer, parked or handed over
        (written), or given up (ReceiptSink.deliver)."""
        msg = d.message
        delivered = d.status is Status.DELIVERED
        ids = msg.part_ids or (msg.id,)
        asks = msg.part_receipts if len(msg.part_receipts) == len(ids) else None
        expires = 0.0
        out: list[PendingReceipt] = []
        for i, message_id in enumerate(ids):
            want = (asks[i] if asks is not None else msg.registered_delivery) & 0x03
            if want == 0 or (want == REGDLV_FAILURE and delivered):
                continue
            assert want in (REGDLV_FINAL, REGDLV_FAILURE)
            if not expires:
                expires = self.clock() + self.cfg.smpp.receipt_retention
            pdu = build_receipt(
                message_id=message_id,
                state=_MAX_STATE_FOR_STATUS[d.status],
                error="000" if delivered else "001",
                submitted_at=msg.accepted_at,
                done_at=d.updated_at,
                source=msg.source,
                destination=msg.destination,
                source_ton=msg.source_ton,
                source_npi=msg.source_npi,
                parts=1 if msg.part_ids else msg.parts,
            )
            out.append(PendingReceipt(pdu, expires, msg.secret))
        if done is not None:
            if not out:
                done()
            elif len(out) == 1:
                out[0].done = done
            else:
                each = _AllOf(len(out), done)
                for pr in out:
                    pr.done = each
        for pr in out:
            self._send_receipt(msg.account_id, pr)

    def take_handed_over(
        self,
        account_id: int,
        pdu: DeliverSm,
        seconds_left: float,
        done: Callable[[], None] | None = None,
    ) -> None:
        """A receipt taken from the database (ReceiptHandoff): handed over by
        another node, or parked and its account now bound. ``done`` deletes
        its row once it is safe (as for ReceiptSink.deliver)."""
        pr = PendingReceipt(pdu, self.clock() + seconds_left, handed=True)
        pr.done = done
        self._send_receipt(account_id, pr)

    def _hand_over(self, account_id: int, pr: PendingReceipt, again: bool = False) -> bool:
        """No bind of the account here: give the receipt to a node that has
        one. One that came from another node waits here for the sweep
        (``again``) rather than bounce straight back."""
        if (
            self.handoff is not None
            and (again or not pr.handed)
            and self.handoff.offer(
                account_id, pr.pdu, pr.expires - self.clock(), pr.secret, pr.done
            )
        ):
            pr.done = None  # the hand-off calls it once written
            return True
        return False

    def _park(self, account_id: int, pr: PendingReceipt, seconds_left: float) -> bool:
        """Park it in the database for this node (ReceiptHandoff.park)."""
        if self.handoff is not None and self.handoff.park(
            account_id, pr.pdu, seconds_left, pr.secret, pr.done
        ):
            pr.done = None  # the hand-off calls it once written
            return True
        return False

    def _send_receipt(self, account_id: int, pr: PendingReceipt) -> None:
        binds = self.receivers.get(account_id)
        if binds:
            n = len(binds)
            start = self._rr.get(account_id, 0)
            for i in range(n):
                b = binds[(start + i) % n]
                if b.is_open and b.session.can_send:
                    self._rr[account_id] = (start + i + 1) % n
                    pr.tries += 1
                    pr.pdu.sequence = 0  # a resend gets the new bind's next sequence
                    b.send_request(pr.pdu, self._receipt_callback(account_id, pr))
                    return
        elif self._hand_over(account_id, pr) or self._park(
            account_id, pr, pr.expires - self.clock()
        ):
            return  # bound elsewhere, or no bind anywhere: parked in the database
        q = self.pending.setdefault(account_id, deque())
        if len(q) >= self.cfg.smpp.receipt_buffer:
            q.popleft().settle()
            metrics.RECEIPTS_OUT.labels("smpp", "dropped").inc()
        q.append(pr)
        metrics.RECEIPTS_PENDING.inc()

    def _receipt_callback(self, account_id: int, pr: PendingReceipt) -> ResponseCallback:
        def done(resp: Pdu | None, request: Pdu) -> None:
            self._receipt_done(account_id, pr, resp)

        return done

    def _receipt_done(self, account_id: int, pr: PendingReceipt, resp: Pdu | None) -> None:
        if resp is not None and resp.status == Smpp.ESME_ROK:
            metrics.child(metrics.RECEIPTS_OUT, "smpp", "ok").inc()
            pr.settle()
            self._flush_pending(account_id)
            return
        if resp is not None and pr.tries >= 3:
            # The customer refuses it repeatedly: stop, or it would loop forever.
            metrics.RECEIPTS_OUT.labels("smpp", "refused").inc()
            pr.settle()
            return
        metrics.RECEIPTS_OUT.labels("smpp", "retry").inc()
        q = self.pending.setdefault(account_id, deque())
        q.append(pr)
        metrics.RECEIPTS_PENDING.inc()

    def park_pending(self) -> int:
        """At a clean stop, after the engine has stopped (so no receipt
        comes after): hand every receipt still waiting for a bind to a node
        where the account is bound, else park it in the database for this
        node (ReceiptHandoff.park), so a restart does not lose it. How many
        were kept. Without a database (in-memory mode) they are lost, as
        that mode says. One that cannot be kept stays unsettled: its route
        outlives the stop and the next start sends it again."""
        kept = 0
        now = self.clock()
        for account_id, q in self.pending.items():
            while q:
                pr = q.popleft()
                metrics.RECEIPTS_PENDING.dec()
                left = pr.expires - now
                if left <= 0:
                    metrics.RECEIPTS_OUT.labels("smpp", "expired").inc()
                    pr.settle()
                elif self._hand_over(account_id, pr, again=True) or self._park(
                    account_id, pr, left
                ):
                    kept += 1  # counted by the hand-off once written
                else:
                    metrics.RECEIPTS_OUT.labels("smpp", "dropped").inc()
        self.pending.clear()
        return kept

    def _flush_pending(self, account_id: int) -> None:
        q = self.pending.get(account_id)
        if not q:
            return
        binds = self.receivers.get(account_id)
        now = self.clock()
        while q and binds and any(b.session.can_send and b.is_open for b in binds):
            pr = q.popleft()
            metrics.RECEIPTS_PENDING.dec()
            if pr.expires < now:
                metrics.RECEIPTS_OUT.labels("smpp", "expired").inc()
                pr.settle()
                continue
            self._send_receipt(account_id, pr)

    def _sweep(self) -> None:
        for account_id in list(self.pending):
            self._flush_pending(account_id)
            q = self.pending.get(account_id)
            if q and not self.receivers.get(account_id):
                # Bound elsewhere since: hand what waits here over.
                for _ in range(len(q)):
                    pr = q.popleft()
                    if self._hand_over(account_id, pr, again=True):
                        metrics.RECEIPTS_PENDING.dec()
                    else:
                        q.append(pr)
            q = self.pending.get(account_id)
            now = self.clock()
            while q and q[0].expires < now:
                q.popleft().settle()
                metrics.RECEIPTS_PENDING.dec()
                metrics.RECEIPTS_OUT.labels("smpp", "expired").inc()
        self._sweeper = asyncio.get_running_loop().call_later(5, self._sweep)
