"""The carrier SMSC simulator: a real SMPP 3.4 SMSC over TCP.

The demo, the tests and the benchmarks use it as "the carrier": the router binds
to it as an ESME exactly as it would bind to a real operator, submits, and gets
delivery receipts back. Knobs (:class:`SimConfig`) reproduce what real carriers
do: slow answers, permanent and temporary rejections, a rate limit, undelivered
messages, connections cut at intervals, several id formats, and receipts that
arrive before the submit_sm_resp.

What it does, per connection (one :class:`~router.smpp.transport.SmppProtocol`
each, no task per PDU):

* accepts bind_transmitter / bind_receiver / bind_transceiver, checking the
  system_id and password when configured (ESME_RINVSYSID / ESME_RINVPASWD);
* answers submit_sm and data_sm after ``latency`` with a fresh carrier message
  id (or the configured rejection), and records each accepted message;
* when registered_delivery asks for it, sends a deliver_sm receipt after
  ``dlr_delay`` to a receiver or transceiver bind of the same system_id,
  round-robin, inside the session window; receipts that cannot be sent yet
  (nobody bound, window full, connection lost, timeout) are kept, bounded, and
  sent when possible;
* enquire_link and unbind are handled by the base protocol.

Delays are kept on two FIFO "delay lines" (one ``loop.call_at`` handle each,
not one per PDU): the delays are constant, so due times arrive in order.

Privacy: message content and addresses are kept only in memory
(:attr:`CarrierSimulator.received`, pending receipts) for tests and demos, and
are never logged or printed; reprs of the records omit them too.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ..carriers.ratelimit import TokenBucket
from ..smpp.constants import (
    ESM_TYPE_RECEIPT,
    ESM_UDHI,
    RECEIPT_STAT,
    REGDLV_FAILURE,
    SMPP_VERSION_34,
    BindType,
    CommandId,
    MessageState,
    Status,
    Tag,
)
from ..smpp.errors import LocalProtocolError, SmppError
from ..smpp.pdu import DeliverSm, Pdu
from ..smpp.session import Reject, Role, SmppSession
from ..smpp.transport import SmppProtocol

try:  # the colleague's GSM 03.38 codec; a crude fallback keeps the sim usable without it
    from ..text.segment import decode_payload as _decode_payload
    from ..text.segment import parse_udh as _parse_udh
except ImportError:  # pragma: no cover - only while router.text is being written
    _decode_payload = None  # type: ignore[assignment]
    _parse_udh = None  # type: ignore[assignment]

log = logging.getLogger("router.sim")

ID_FORMATS = ("hex", "decimal", "uuid")
MAX_PENDING_RECEIPTS = 100_000  # receipts held while no receiver can take them
RECEIPT_TIMEOUT = 10.0  # seconds to wait for a deliver_sm_resp before requeueing
RECEIPT_RETRY = 1.0  # seconds before retrying receipts the ESME answered with an error
_BIND_IDS = frozenset(int(b) for b in BindType)
_SUBMIT_IDS = frozenset({CommandId.SUBMIT_SM, CommandId.DATA_SM})
_EARLY = 1e-3  # asyncio may fire a timer up to its clock resolution early


# ---------------------------------------------------------------- public data


@dataclass
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 2776  # 0 = pick a free port
    system_id: str | None = None  # None = accept any credentials
    password: str | None = None
    name: str = "sim"  # used as carrier label in its own stats (and bind_resp system_id)
    dlr_delay: float = 0.5  # seconds from submit to the receipt
    deliver_ratio: float = 1.0  # fraction of receipts DELIVRD; the rest UNDELIV err:001
    lose_ratio: float = 0.0  # fraction of accepted messages whose receipt is never sent
    reject_ratio: float = 0.0  # fraction answered ESME_RSUBMITFAIL (permanent)
    throttle_ratio: float = 0.0  # fraction answered ESME_RTHROTTLED (temporary)
    drop_every: float | None = None  # close every connection each N seconds
    latency: float = 0.0  # delay before each submit_sm_resp
    id_format: str = "hex"  # "hex" | "decimal" | "uuid": the carrier message ids
    window: int = 1000  # peer window (ESME_RTHROTTLED beyond)
    # Our outstanding deliver_sm per connection (a carrier's receipt window):
    # receipts per bind are at most this / the ESME's deliver_sm_resp time.
    receipt_window: int = 100
    max_tps: float | None = None  # answer ESME_RTHROTTLED above this rate (token bucket)
    # Binds allowed at once per system_id, like most carriers' accounts;
    # one more is answered ESME_RALYBND (None = any number).
    max_binds: int | None = None
    seed: int | None = None  # for deterministic ratios in tests
    receipt_before_resp: bool = False  # send the DLR before submit_sm_resp (edge case tests)
    tls_cert: str | None = None  # PEM certificate chain: serve SMPP over TLS
    tls_key: str | None = None  # PEM private key for tls_cert
    # Like a real SMSC whose ESME does not drain its receipts: answer submits
    # ESME_RTHROTTLED while this many receipts wait for its system_id
    # (0 = never; receipts are only dropped beyond MAX_PENDING_RECEIPTS).
    receipt_backlog_throttle: int = 20_000
    # Accepted submits kept in ``received`` for tests to inspect; counting
    # goes on beyond. A long-running simulator (the CLI, the demo) keeps
    # none: a million records held ~2 million objects that every full
    # garbage collection walked, pausing the simulator for up to a second
    # (seen as 0.3-0.8 s latency spikes, growing further apart, in the soak).
    keep_received: int = 1_000_000

    def validate(self) -> None:
        for name in ("deliver_ratio", "lose_ratio", "reject_ratio", "throttle_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within 0..1")
        if self.id_format not in ID_FORMATS:
            raise ValueError(f"id_format must be one of {', '.join(ID_FORMATS)}")
        if self.dlr_delay < 0 or self.latency < 0:
            raise ValueError("dlr_delay and latency must be >= 0")
        if self.drop_every is not None and self.drop_every <= 0:
            raise ValueError("drop_every must be > 0")
        if self.max_tps is not None and self.max_tps <= 0:
            raise ValueError("max_tps must be > 0")
        if self.window < 1 or self.receipt_window < 1:
            raise ValueError("window and receipt_window must be >= 1")
        if self.max_binds is not None and self.max_binds < 1:
            raise ValueError("max_binds must be >= 1")
        if self.receipt_backlog_throttle < 0:
            raise ValueError("receipt_backlog_throttle must be >= 0 (0 = off)")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be within 0..65535")


@dataclass
class SimStats:
    """Counters of one simulator (``name`` is its carrier label)."""

    name: str = "sim"
    connections: int = 0  # TCP connections accepted
    binds: int = 0  # successful binds
    bind_failures: int = 0
    submits: int = 0  # submit_sm + data_sm received while bound (incl. window overflow)
    accepted: int = 0  # answered ESME_ROK with a carrier id
    rejected: int = 0  # answered ESME_RSUBMITFAIL
    throttled: int = 0  # answered ESME_RTHROTTLED (ratio, max_tps or peer window)
    receipts_sent: int = 0  # deliver_sm receipts written (retries included)
    receipts_acked: int = 0  # deliver_sm_resp with ESME_ROK
    receipts_requeued: int = 0  # timeouts, lost connections and error answers
    receipts_dropped: int = 0  # pending store full, or unencodable
    receipts_lost: int = 0  # never sent, on purpose (lose_ratio)
    drops: int = 0  # connections closed by drop_every

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True, repr=False)
class ReceivedMessage:
    """One accepted submit_sm / data_sm. Content stays in memory only."""

    carrier_id: str
    source: str
    destination: str
    data_coding: int
    esm_class: int
    payload: bytes
    tlvs: dict[int, bytes]
    at: float  # time.monotonic() when accepted
    system_id: str = ""
    registered_delivery: int = 0
    command: str = "submit_sm"

    def __repr__(self) -> str:  # never show addresses or content
        return (
            f"ReceivedMessage(carrier_id={self.carrier_id!r}, command={self.command}, "
            f"data_coding=0x{self.data_coding:02X}, esm_class=0x{self.esm_class:02X}, "
            f"octets={len(self.payload)})"
        )


# ------------------------------------------------------------------ internals


class _DelayLine:
    """A FIFO of (due, item) with a single timer. Items must be pushed in due order."""

    __slots__ = ("_loop", "_handler", "_queue", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, handler: Callable[[Any], None]) -> None:
        self._loop = loop
        self._handler = handler
        self._queue: deque[tuple[float, Any]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, due: float, item: Any) -> None:
        self._queue.append((due, item))
        if self._timer is None:
            self._timer = self._loop.call_at(due, self._fire)

    def _fire(self) -> None:
        self._timer = None
        queue = self._queue
        limit = self._loop.time() + _EARLY
        try:
            while queue and queue[0][0] <= limit:
                _, item = queue.popleft()
                try:
                    self._handler(item)
                except Exception as exc:  # keep the line running; no content in the log
                    log.error("simulator delay line handler failed: %s", type(exc).__name__)
        finally:
            if queue and self._timer is None:
                self._timer = self._loop.call_at(queue[0][0], self._fire)

    def clear(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()


class _IdMaker:
    """Unique carrier ids: a monotonic counter pushed through a keyed bijection."""

    _MASK = (1 << 62) - 1

    def __init__(self, fmt: str, rng: random.Random) -> None:
        self.fmt = fmt
        self._rng = rng
        self._n = 0
        self._key = rng.getrandbits(62)
        self._mul = rng.getrandbits(62) | 1  # odd: a bijection modulo 2**62

    def _mix(self, x: int) -> int:
        m = self._MASK
        x = (x ^ self._key) & m
        x = (x * self._mul) & m
        x ^= x >> 31
        x = (x * 0x2545F4914F6CDD1D) & m  # odd
        x ^= x >> 29
        return x

    def next(self) -> str:
        self._n += 1
        if self.fmt == "uuid":
            return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        v = self._mix(self._n)
        if self.fmt == "decimal":
            return str(10**18 + v)  # 19 digits, no leading zero, fits a signed 64-bit
        return f"{v:016x}"


_SAFE_TEXT = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 !\"#%&'()*+,-./:;<=>?"
)  # characters with the same code in ASCII and the GSM 03.38 default alphabet


def _receipt_text(pdu: Pdu) -> str:
    """The first 20 characters of the message, reduced to receipt-safe characters."""
    payload: bytes = pdu.payload  # type: ignore[attr-defined]
    esm_class: int = pdu.esm_class  # type: ignore[attr-defined]
    data_coding: int = pdu.data_coding  # type: ignore[attr-defined]
    if esm_class & ESM_UDHI and payload:
        if _parse_udh is not None:
            try:
                payload = _parse_udh(payload)[1]
            except ValueError:
                payload = payload[1 + payload[0] :]
        else:
            payload = payload[1 + payload[0] :]
    text: str
    if _decode_payload is not None:
        try:
            text = _decode_payload(data_coding, payload)[:20]
        except Exception:
            text = payload[:20].decode("latin-1")
    else:
        text = payload[:20].decode("latin-1")
    return "".join(c if c in _SAFE_TEXT else "?" for c in text[:20])


def _stamp(t: float) -> str:
    return time.strftime("%y%m%d%H%M", time.gmtime(t))


class _SimConnection(SmppProtocol):
    """One ESME connection to the simulator."""

    def __init__(self, sim: CarrierSimulator) -> None:
        super().__init__(
            SmppSession(
                Role.SMSC,
                window=sim.config.receipt_window,
                peer_window=sim.config.window,
                response_timeout=RECEIPT_TIMEOUT,
            )
        )
        self.sim = sim
        self.system_id: str | None = None
        self.can_receive = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.sim._conn_made(self)

    def on_request(self, pdu: Pdu) -> None:
        cid = pdu.command_id
        if cid in _SUBMIT_IDS:
            self.sim._on_submit(self, pdu)
        elif cid in _BIND_IDS:
            self.sim._on_bind(self, pdu)
        else:
            raise SmppError("not supported by the simulator", Status.ESME_RINVCMDID)

    def on_reject(self, event: Reject) -> None:
        # The session answers a full peer window with ESME_RTHROTTLED itself.
        if event.answer.status == Status.ESME_RTHROTTLED:
            self.sim.stats.submits += 1
            self.sim.stats.throttled += 1

    def receipt_done(self, resp: Pdu | None, request: Pdu) -> None:
        self.sim._receipt_done(self, resp, request)

    def on_closed(self, exc: Exception | None) -> None:
        self.sim._conn_lost(self)


# ----------------------------------------------------------------- simulator


class CarrierSimulator:
    """One simulated carrier SMSC listening on ``config.host:config.port``."""

    def __init__(self, config: SimConfig) -> None:
        config.validate()
        self.config = config
        self.port: int = config.port
        self.stats = SimStats(name=config.name)
        self.received: list[ReceivedMessage] = []
        seed = config.seed if config.seed is not None else int.from_bytes(os.urandom(8), "big")
        self._rng = random.Random(seed)
        self._ids = _IdMaker(config.id_format, random.Random(self._rng.getrandbits(64)))
        self._server: asyncio.Server | None = None
        self._accepting = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conns: set[_SimConnection] = set()
        self._receivers: dict[str, list[_SimConnection]] = {}
        self._rr: dict[str, int] = {}
        self._pending: dict[str, deque[DeliverSm]] = {}
        self._pending_total = 0
        self._answers: _DelayLine | None = None
        self._receipts: _DelayLine | None = None
        self._drop_timer: asyncio.TimerHandle | None = None
        self._retry_timer: asyncio.TimerHandle | None = None
        self._bucket: TokenBucket | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> int:
        """Listen; return the bound port."""
        if self._server is not None:
            return self.port
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._answers = _DelayLine(loop, self._answer_due)
        self._receipts = _DelayLine(loop, self._receipt_due)
        if self.config.max_tps is not None:
            # A burst of at most one second, like a carrier enforcing its contract.
            self._bucket = TokenBucket(
                self.config.max_tps, loop.time(), burst=max(1.0, self.config.max_tps)
            )
        self._accepting = True
        ssl_ctx = None
        if self.config.tls_cert:
            import ssl

            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_ctx.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        self._server = await loop.create_server(
            lambda: _SimConnection(self),
            self.config.host,
            self.config.port,
            reuse_address=True,
            ssl=ssl_ctx,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        if self.config.drop_every is not None:
            self._drop_timer = loop.call_later(self.config.drop_every, self._drop_all)
        log.info("simulator %s listening on %s:%d", self.config.name, self.config.host, self.port)
        return self.port

    async def stop(self) -> None:
        """Close the listener and every connection; cancel pending timers."""
        server, self._server = self._server, None
        self._accepting = False
        for timer in (self._drop_timer, self._retry_timer):
            if timer is not None:
                timer.cancel()
        self._drop_timer = self._retry_timer = None
        if self._answers is not None:
            self._answers.clear()
        if self._receipts is not None:
            self._receipts.clear()
        if server is not None:
            server.close()
        conns = list(self._conns)
        for conn in conns:
            conn.close()
        waits = [c.closed for c in conns if c.closed is not None and not c.closed.done()]
        if waits:
            _, still = await asyncio.wait(waits, timeout=1.0)
            if still:
                for conn in conns:
                    if conn.transport is not None:
                        conn.transport.abort()
                await asyncio.wait(still, timeout=1.0)
        if server is not None:
            try:
                await asyncio.wait_for(server.wait_closed(), 1.0)
            except TimeoutError:
                pass

    def received_count(self) -> int:
        """Accepted submits so far (``received`` keeps at most ``keep_received`` records)."""
        return self.stats.accepted

    def pending_receipts(self) -> int:
        """Receipts waiting for a receiver bind or window room."""
        return self._pending_total

    def bound_count(self) -> int:
        return sum(1 for c in self._conns if c.session.bound)

    # ----------------------------------------------------------- connections

    def _conn_made(self, conn: _SimConnection) -> None:
        if not self._accepting:  # stopped: refuse late arrivals
            if conn.transport is not None:
                conn.transport.abort()
            return
        self._conns.add(conn)
        self.stats.connections += 1

    def _conn_lost(self, conn: _SimConnection) -> None:
        self._conns.discard(conn)
        if conn.can_receive and conn.system_id is not None:
            conns = self._receivers.get(conn.system_id)
            if conns is not None and conn in conns:
                conns.remove(conn)
                if not conns:
                    del self._receivers[conn.system_id]
        # Receipts requeued by connection_lost go to the remaining receivers.
        if self._accepting and self._loop is not None and self._pending_total:
            self._loop.call_soon(self._pump_all)

    def _drop_all(self) -> None:
        assert self._loop is not None and self.config.drop_every is not None
        for conn in list(self._conns):
            if conn.transport is not None and not conn.transport.is_closing():
                conn.transport.abort()
                self.stats.drops += 1
        self._drop_timer = self._loop.call_later(self.config.drop_every, self._drop_all)

    def _on_bind(self, conn: _SimConnection, pdu: Pdu) -> None:
        cfg = self.config
        system_id: str = pdu.system_id  # type: ignore[attr-defined]
        password: str = pdu.password  # type: ignore[attr-defined]
        status = Status.ESME_ROK
        if cfg.system_id is not None and system_id != cfg.system_id:
            status = Status.ESME_RINVSYSID
        elif cfg.password is not None and password != cfg.password:
            status = Status.ESME_RINVPASWD
        elif cfg.max_binds is not None and cfg.max_binds <= sum(
            1 for c in self._conns if c.system_id == system_id and c.session.bound
        ):
            status = Status.ESME_RALYBND
        if status != Status.ESME_ROK:
            self.stats.bind_failures += 1
            log.info("simulator %s refused a bind: %s", cfg.name, Status(status).name)
            conn.answer(pdu, status)
            conn.close()  # flushes the answer first
            return
        tlvs: dict[int, bytes] = {}
        if pdu.interface_version >= SMPP_VERSION_34:  # type: ignore[attr-defined]
            tlvs[Tag.SC_INTERFACE_VERSION] = bytes((SMPP_VERSION_34,))
        conn.answer(pdu, Status.ESME_ROK, system_id=cfg.name[:15], tlvs=tlvs)
        self.stats.binds += 1
        conn.system_id = system_id
        bind_type = BindType(pdu.command_id)
        log.debug("simulator %s bound %s", cfg.name, bind_type.name.lower())
        if bind_type.can_receive:
            conn.can_receive = True
            self._receivers.setdefault(system_id, []).append(conn)
            self._pump(system_id)

    # ---------------------------------------------------------------- submits

    def _on_submit(self, conn: _SimConnection, pdu: Pdu) -> None:
        cfg = self.config
        stats = self.stats
        stats.submits += 1
        status = Status.ESME_ROK
        rng = self._rng
        if self._bucket is not None and self._bucket.take(self._loop.time()) > 0:  # type: ignore[union-attr]
            status = Status.ESME_RTHROTTLED
        elif cfg.throttle_ratio and rng.random() < cfg.throttle_ratio:
            status = Status.ESME_RTHROTTLED
        elif cfg.receipt_backlog_throttle and (
            len(self._pending.get(conn.system_id or "", ())) >= cfg.receipt_backlog_throttle
        ):
            status = Status.ESME_RTHROTTLED  # it does not take its receipts: slow it down
        elif cfg.reject_ratio and rng.random() < cfg.reject_ratio:
            status = Status.ESME_RSUBMITFAIL
        if status == Status.ESME_RTHROTTLED:
            stats.throttled += 1
        elif status == Status.ESME_RSUBMITFAIL:
            stats.rejected += 1
        if cfg.latency > 0:
            assert self._answers is not None and self._loop is not None
            self._answers.push(self._loop.time() + cfg.latency, (conn, pdu, status))
        else:
            self._respond(conn, pdu, status)

    def _answer_due(self, item: tuple[_SimConnection, Pdu, int]) -> None:
        conn, pdu, status = item
        self._respond(conn, pdu, status)  # writes of one timer run are coalesced

    def _respond(self, conn: _SimConnection, pdu: Pdu, status: int) -> None:
        if status != Status.ESME_ROK:
            conn.answer(pdu, status)
            return
        if not conn.is_open:
            return  # the ESME never learns the id: not accepted, no receipt
        cfg = self.config
        carrier_id = self._ids.next()
        self.stats.accepted += 1
        system_id = conn.system_id or ""
        registered = pdu.registered_delivery  # type: ignore[attr-defined]
        if len(self.received) < cfg.keep_received:
            self.received.append(
                ReceivedMessage(
                    carrier_id=carrier_id,
                    source=pdu.source_addr,  # type: ignore[attr-defined]
                    destination=pdu.destination_addr,  # type: ignore[attr-defined]
                    data_coding=pdu.data_coding,  # type: ignore[attr-defined]
                    esm_class=pdu.esm_class,  # type: ignore[attr-defined]
                    payload=pdu.payload,  # type: ignore[attr-defined]
                    tlvs=dict(pdu.tlvs),  # type: ignore[attr-defined]
                    at=time.monotonic(),
                    system_id=system_id,
                    registered_delivery=registered,
                    command=pdu.name,
                )
            )
        receipt: DeliverSm | None = None
        mode = registered & 0x03
        if cfg.lose_ratio and self._rng.random() < cfg.lose_ratio:
            mode = 0  # a carrier that loses this receipt
            self.stats.receipts_lost += 1
        if mode:
            delivered = cfg.deliver_ratio >= 1.0 or self._rng.random() < cfg.deliver_ratio
            if delivered is False or mode != REGDLV_FAILURE:
                receipt = self._make_receipt(pdu, carrier_id, delivered)
        if receipt is not None and cfg.receipt_before_resp:
            self._enqueue_receipt(system_id, receipt)
            receipt = None
        conn.answer(pdu, Status.ESME_ROK, message_id=carrier_id)
        if receipt is not None:
            assert self._receipts is not None and self._loop is not None
            delay = max(0.0, cfg.dlr_delay - cfg.latency)
            self._receipts.push(self._loop.time() + delay, (system_id, receipt))

    def _make_receipt(self, pdu: Pdu, carrier_id: str, delivered: bool) -> DeliverSm:
        now = time.time()
        state = MessageState.DELIVERED if delivered else MessageState.UNDELIVERABLE
        text = (
            f"id:{carrier_id} sub:001 dlvrd:{'001' if delivered else '000'} "
            f"submit date:{_stamp(now)} done date:{_stamp(now + self.config.dlr_delay)} "
            f"stat:{RECEIPT_STAT[state]} err:{'000' if delivered else '001'} "
            f"text:{_receipt_text(pdu)}"
        )
        tlvs: dict[int, bytes] = {
            Tag.RECEIPTED_MESSAGE_ID: carrier_id.encode("latin-1") + b"\x00",
            Tag.MESSAGE_STATE: bytes((state,)),
        }
        if not delivered:
            tlvs[Tag.NETWORK_ERROR_CODE] = b"\x03\x00\x01"  # GSM error 1
        umr = pdu.tlvs.get(Tag.USER_MESSAGE_REFERENCE)  # type: ignore[attr-defined]
        if umr is not None:
            tlvs[Tag.USER_MESSAGE_REFERENCE] = umr
        return DeliverSm(
            source_addr_ton=pdu.dest_addr_ton,  # type: ignore[attr-defined]
            source_addr_npi=pdu.dest_addr_npi,  # type: ignore[attr-defined]
            source_addr=pdu.destination_addr[:20],  # type: ignore[attr-defined]
            dest_addr_ton=pdu.source_addr_ton,  # type: ignore[attr-defined]
            dest_addr_npi=pdu.source_addr_npi,  # type: ignore[attr-defined]
            destination_addr=pdu.source_addr[:20],  # type: ignore[attr-defined]
            esm_class=ESM_TYPE_RECEIPT,
            data_coding=0,
            short_message=text.encode("ascii"),
            tlvs=tlvs,
        )

    # --------------------------------------------------------------- receipts

    def _receipt_due(self, item: tuple[str, DeliverSm]) -> None:
        system_id, receipt = item
        self._enqueue_receipt(system_id, receipt)

    def _enqueue_receipt(self, system_id: str, receipt: DeliverSm) -> None:
        if self._pending_total >= MAX_PENDING_RECEIPTS:
            self.stats.receipts_dropped += 1
            return
        self._pending.setdefault(system_id, deque()).append(receipt)
        self._pending_total += 1
        self._pump(system_id)

    def _pump_all(self) -> None:
        for system_id in list(self._pending):
            self._pump(system_id)

    def _pump(self, system_id: str) -> None:
        """Send pending receipts of ``system_id`` to its receivers, round-robin."""
        queue = self._pending.get(system_id)
        conns = self._receivers.get(system_id)
        if not queue or not conns:
            return
        rr = self._rr.get(system_id, 0)
        idle = 0
        while queue and idle < len(conns):
            conn = conns[rr % len(conns)]
            rr += 1
            if not (conn.is_open and conn.session.bound and conn.session.can_send):
                idle += 1
                continue
            idle = 0
            receipt = queue.popleft()
            self._pending_total -= 1
            receipt.sequence = 0  # a fresh sequence on this session
            try:
                conn.send_request(receipt, conn.receipt_done)
            except (ConnectionError, LocalProtocolError):
                queue.appendleft(receipt)
                self._pending_total += 1
                idle += 1
                continue
            except ValueError:  # cannot be encoded: nothing will ever take it
                self.stats.receipts_dropped += 1
                continue
            self.stats.receipts_sent += 1
        self._rr[system_id] = rr % len(conns)
        if not queue:
            del self._pending[system_id]

    def _receipt_done(self, conn: _SimConnection, resp: Pdu | None, request: Pdu) -> None:
        system_id = conn.system_id or ""
        if (
            resp is not None
            and resp.status == Status.ESME_ROK
            and resp.command_id == CommandId.DELIVER_SM_RESP
        ):
            self.stats.receipts_acked += 1
            self._pump(system_id)  # window room
            return
        # Timeout, connection lost, or an error answer: keep it and try again.
        self.stats.receipts_requeued += 1
        assert isinstance(request, DeliverSm)
        self._pending.setdefault(system_id, deque()).appendleft(request)
        self._pending_total += 1
        if self._loop is None or not self._accepting:
            return
        if resp is None:
            if conn.is_open:
                self._pump(system_id)
            # else: _conn_lost schedules the pump once the receiver list is updated
        elif self._retry_timer is None:
            self._retry_timer = self._loop.call_later(RECEIPT_RETRY, self._retry)

    def _retry(self) -> None:
        self._retry_timer = None
        self._pump_all()


# -------------------------------------------------------------------- running


async def run_simulators(
    configs: list[SimConfig],
    started: Callable[[list[CarrierSimulator]], None] | None = None,
) -> None:
    """Run simulators until cancelled; ``started`` is called once all listen."""
    sims = [CarrierSimulator(c) for c in configs]
    try:
        for sim in sims:
            await sim.start()
        if started is not None:
            started(sims)
        await asyncio.Future()  # until cancelled
    finally:
        for sim in sims:
            await sim.stop()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sms-router sim",
        description="Run carrier SMSC simulators (SMPP 3.4) until SIGINT/SIGTERM.",
    )
    d = SimConfig()
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port, help="first port (0 = any free port)")
    p.add_argument("--count", type=int, default=1, help="simulators on consecutive ports")
    p.add_argument("--name", default=d.name, help="carrier label (suffixed with -N if --count>1)")
    p.add_argument("--system-id", default=None, help="required system_id (default: any)")
    p.add_argument("--password", default=None, help="required password (default: any)")
    p.add_argument("--dlr-delay", type=float, default=d.dlr_delay)
    p.add_argument("--deliver-ratio", type=float, default=d.deliver_ratio)
    p.add_argument("--lose-ratio", type=float, default=d.lose_ratio, help="receipts never sent")
    p.add_argument("--reject-ratio", type=float, default=d.reject_ratio)
    p.add_argument("--throttle-ratio", type=float, default=d.throttle_ratio)
    p.add_argument("--drop-every", type=float, default=None)
    p.add_argument("--latency", type=float, default=d.latency)
    p.add_argument("--id-format", choices=ID_FORMATS, default=d.id_format)
    p.add_argument("--window", type=int, default=d.window)
    p.add_argument(
        "--receipt-window",
        type=int,
        default=d.receipt_window,
        help="outstanding deliver_sm per connection",
    )
    p.add_argument("--max-tps", type=float, default=None)
    p.add_argument("--max-binds", type=int, default=None, help="binds per system_id at once")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--receipt-before-resp", action="store_true")
    p.add_argument(
        "--receipt-backlog-throttle",
        type=int,
        default=d.receipt_backlog_throttle,
        help="answer ESME_RTHROTTLED while this many receipts wait for the ESME (0 = off)",
    )
    return p


def _configs(args: argparse.Namespace) -> list[SimConfig]:
    if args.count < 1:
        raise ValueError("--count must be >= 1")
    out = []
    for i in range(args.count):
        cfg = SimConfig(
            host=args.host,
            port=args.port + i if args.port else 0,
            system_id=args.system_id,
            password=args.password,
            name=args.name if args.count == 1 else f"{args.name}-{i + 1}",
            dlr_delay=args.dlr_delay,
            deliver_ratio=args.deliver_ratio,
            lose_ratio=args.lose_ratio,
            reject_ratio=args.reject_ratio,
            throttle_ratio=args.throttle_ratio,
            drop_every=args.drop_every,
            latency=args.latency,
            id_format=args.id_format,
            window=args.window,
            receipt_window=args.receipt_window,
            max_tps=args.max_tps,
            max_binds=args.max_binds,
            seed=None if args.seed is None else args.seed + i,
            receipt_before_resp=args.receipt_before_resp,
            receipt_backlog_throttle=args.receipt_backlog_throttle,
            keep_received=0,  # nothing in this process reads them
        )
        cfg.validate()
        out.append(cfg)
    return out


async def _serve(configs: list[SimConfig]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
            pass

    def started(sims: list[CarrierSimulator]) -> None:
        for sim in sims:
            print(
                f"simulator {sim.config.name} listening on {sim.config.host}:{sim.port}",
                flush=True,
            )

    runner = asyncio.create_task(run_simulators(configs, started))
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if runner in done:
        waiter.cancel()
        runner.result()  # a start failure (port in use) propagates
        return
    runner.cancel()
    try:
        await runner
    except asyncio.CancelledError:
        pass


def main(argv: list[str] | None = None) -> int:
    """``sms-router sim ...``: run simulators until SIGINT/SIGTERM; exit 0."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["sim"]:
        args_in = args_in[1:]
    parser = _parser()
    args = parser.parse_args(args_in)
    try:
        configs = _configs(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        asyncio.run(_serve(configs))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"simulator could not listen: {exc.strerror or type(exc).__name__}", file=sys.stderr)
        return 1
    print("simulators stopped", flush=True)
    return 0
