"""The SMPP front door: an SMSC for customer ESMEs.

Binds authenticate against the account store; submit_sm/data_sm become
Messages handed to Engine.accept, answered at once with our message id or a
specific command_status; receipts go back as deliver_sm to a receiver or
transceiver bind of the submitting account (round-robin, retried on another
bind, kept for ``receipt_retention`` seconds when none is bound).

Logs carry account names, bind types and statuses, never addresses or text.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

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
from ..smpp.pdu import DataSm, DeliverSm, Pdu, QuerySm, SubmitSm, _Bind
from ..smpp.session import Reject, Role, SmppSession
from ..smpp.transport import ResponseCallback, SmppProtocol
from ..text.segment import Encoded, decode_payload, parse_udh, split
from .validate import InvalidField, check_destination, check_sender, parse_smpp_time

log = structlog.get_logger("router.ingress.smpp")

MESSAGE_CLASS_TAG = 0x1400  # vendor TLV: 0 standard, 1 secret (configurable later)
DEFAULT_VALIDITY = 48 * 3600.0
MAX_VALIDITY = 7 * 24 * 3600.0
_MAX_STATE_FOR_STATUS = {
    Status.ACCEPTED: MessageState.ACCEPTED,
    Status.QUEUED: MessageState.ENROUTE,
    Status.SUBMITTED: MessageState.ENROUTE,
    Status.DELIVERED: MessageState.DELIVERED,
    Status.FAILED: MessageState.UNDELIVERABLE,
    Status.EXPIRED: MessageState.EXPIRED,
    Status.REJECTED: MessageState.REJECTED,
}
_CODING_UNITS = {0x00: "gsm7", 0x08: "ucs2", 0x03: "latin1"}


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
        self._binding = False

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
            if self.door.bind_count(account.id) >= account.max_binds:
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
            return
        self.account = account
        self.bind_type = bind_type
        self.answer(pdu, Smpp.ESME_ROK, system_id="sms-router")
        self.door.add_bind(self)
        log.info("bound", account=account.name, bind_type=bind_type.name.lower())

    def on_reject(self, event: Reject) -> None:
        metrics.PDU_ERRORS.labels(status_name(event.answer.status)).inc()
        if event.answer.status == Smpp.ESME_RTHROTTLED:
            metrics.THROTTLE_SENT.labels("smpp", "window").inc()

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


class PendingReceipt:
    __slots__ = ("pdu", "expires", "tries")

    def __init__(self, pdu: DeliverSm, expires: float) -> None:
        self.pdu = pdu
        self.expires = expires
        self.tries = 0


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

    async def start(self) -> int:
        host, port = self.cfg.smpp_listen
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: CustomerBind(self), host, port, backlog=2048, reuse_address=True
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

    # ---------------------------------------------------------------- binds

    def bind_count(self, account_id: int) -> int:
        return len(self.binds.get(account_id, ()))

    def add_bind(self, b: CustomerBind) -> None:
        assert b.account is not None and b.bind_type is not None
        self.binds.setdefault(b.account.id, []).append(b)
        metrics.BINDS.labels(b.account.name, b.bind_type.name.lower()).inc()
        if b.bind_type.can_receive:
            self.receivers.setdefault(b.account.id, []).append(b)
            self._flush_pending(b.account.id)

    def remove_bind(self, b: CustomerBind) -> None:
        assert b.account is not None and b.bind_type is not None
        lst = self.binds.get(b.account.id)
        if lst and b in lst:
            lst.remove(b)
            metrics.BINDS.labels(b.account.name, b.bind_type.name.lower()).dec()
        rl = self.receivers.get(b.account.id)
        if rl and b in rl:
            rl.remove(b)

    # --------------------------------------------------------------- submit

    def submit(self, bind: CustomerBind, pdu: SubmitSm | DataSm) -> None:
        account = bind.account
        assert account is not None
        try:
            msg = self._build(account, pdu)
        except InvalidField as exc:
            status = Smpp.ESME_RINVDSTADR if exc.field == "to" else Smpp.ESME_RINVSRCADR
            metrics.REJECTED.labels("smpp", account.name, f"invalid_{exc.field}").inc()
            bind.answer(pdu, status)
            return
        except SmppError as exc:
            metrics.REJECTED.labels("smpp", account.name, status_name(exc.status).lower()).inc()
            bind.answer(pdu, exc.status)
            return

        def done(result: Delivery | Rejected) -> None:
            # The answer goes out only now: after the message is durable.
            if isinstance(result, Rejected):
                metrics.REJECTED.labels("smpp", account.name, result.reason).inc()
                if result.smpp_status in (Smpp.ESME_RTHROTTLED, Smpp.ESME_RMSGQFUL):
                    metrics.THROTTLE_SENT.labels("smpp", result.reason).inc()
                bind.answer(pdu, result.smpp_status)
            else:
                bind.answer(pdu, Smpp.ESME_ROK, message_id=result.message.id)

        self.engine.submit(msg, done)

    def _build(self, account: Account, pdu: SubmitSm | DataSm) -> Message:
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
            if scheduled is not None and scheduled > now + 1:
                # Scheduled sending needs the durable spool; refuse clearly
                # rather than send early.
                raise SmppError("scheduled delivery not supported", Smpp.ESME_RINVSCHED)
            try:
                expires = parse_smpp_time(pdu.validity_period, now)
            except ValueError:
                raise SmppError("bad validity_period", Smpp.ESME_RINVEXPIRY) from None
            if expires is not None and expires <= now:
                raise SmppError("validity_period in the past", Smpp.ESME_RINVEXPIRY)
        else:
            expires = None
        expires = min(expires or now + DEFAULT_VALIDITY, now + MAX_VALIDITY)
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
        if esm:
            # The customer split it: one segment, which must be a valid UDH
            # plus a body that fits one SMS.
            try:
                _, body = parse_udh(payload)
            except ValueError:
                raise SmppError("malformed UDH", Smpp.ESME_RINVESMCLASS) from None
            udh_len = len(payload) - len(body)
            if coding == "gsm7":
                fits = (udh_len * 8 + 6) // 7 + len(body) <= 160
            else:
                fits = len(payload) <= 140
            if not fits:
                raise SmppError("segment longer than one SMS", Smpp.ESME_RINVMSGLEN)
            segments: tuple[bytes, ...] = (payload,)
        else:
            # Whatever does not fit one SMS (short_message up to 254 octets or
            # message_payload) is split here into UDH segments.
            if coding == "ucs2" and len(payload) % 2:
                raise SmppError("UCS2 text has an odd number of octets", Smpp.ESME_RINVMSGLEN)
            units = len(payload) // 2 if coding == "ucs2" else len(payload)
            enc = Encoded(coding=coding, data_coding=dc, payload=payload, units=units)
            try:
                segments = tuple(split(enc, ref=self.engine.rng.randrange(256)))
            except ValueError:
                raise SmppError("message too long", Smpp.ESME_RINVMSGLEN) from None
            if len(segments) > 1:
                esm = ESM_UDHI
            body = payload
        tlvs = tuple(
            (t, v)
            for t, v in pdu.tlvs.items()
            if t in (Tag.SAR_MSG_REF_NUM, Tag.SAR_TOTAL_SEGMENTS, Tag.SAR_SEGMENT_SEQNUM)
        )
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
        )

    def query(self, bind: CustomerBind, pdu: QuerySm) -> None:
        assert bind.account is not None
        d = self.engine.lookup(pdu.message_id)
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
            message_id=d.message.id,
            final_date=final,
            message_state=int(_MAX_STATE_FOR_STATUS[d.status]),
            error_code=0 if d.status is Status.DELIVERED or not d.status.final else 1,
        )

    # ------------------------------------------------------------- receipts

    def deliver(self, d: Delivery) -> None:
        """ReceiptSink: a message of an SMPP customer reached a final status."""
        msg = d.message
        want = msg.registered_delivery & 0x03
        if want == 0 or (want == REGDLV_FAILURE and d.status is Status.DELIVERED):
            return
        assert want in (REGDLV_FINAL, REGDLV_FAILURE)
        pdu = build_receipt(
            message_id=msg.id,
            state=_MAX_STATE_FOR_STATUS[d.status],
            error="000" if d.status is Status.DELIVERED else "001",
            submitted_at=msg.accepted_at,
            done_at=d.updated_at,
            source=msg.source,
            destination=msg.destination,
            source_ton=msg.source_ton,
            source_npi=msg.source_npi,
            parts=msg.parts,
        )
        self._send_receipt(
            msg.account_id, PendingReceipt(pdu, self.clock() + self.cfg.smpp.receipt_retention)
        )

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
        q = self.pending.setdefault(account_id, deque())
        if len(q) >= self.cfg.smpp.receipt_buffer:
            q.popleft()
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
            self._flush_pending(account_id)
            return
        if resp is not None and pr.tries >= 3:
            # The customer refuses it repeatedly: stop, or it would loop forever.
            metrics.RECEIPTS_OUT.labels("smpp", "refused").inc()
            return
        metrics.RECEIPTS_OUT.labels("smpp", "retry").inc()
        q = self.pending.setdefault(account_id, deque())
        q.append(pr)
        metrics.RECEIPTS_PENDING.inc()

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
                continue
            self._send_receipt(account_id, pr)

    def _sweep(self) -> None:
        for account_id in list(self.pending):
            self._flush_pending(account_id)
            q = self.pending.get(account_id)
            now = self.clock()
            while q and q[0].expires < now:
                q.popleft()
                metrics.RECEIPTS_PENDING.dec()
                metrics.RECEIPTS_OUT.labels("smpp", "expired").inc()
        self._sweeper = asyncio.get_running_loop().call_later(5, self._sweep)
