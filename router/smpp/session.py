"""The SMPP session as a sans-IO state machine, in the style of h11.

``SmppSession`` takes bytes (``receive_data``) and returns events; it turns
PDUs into bytes (``send``); it keeps the bind state, sequence numbers, the
window of our outstanding requests, the count of the peer's unanswered
requests, and the timers (enquire_link, response timeout, inactivity) as
plain deadlines that ``poll(now)`` checks. It never touches a socket, never
reads a clock, never logs. Both the customer-facing SMSC side and the
carrier-facing ESME side are this one class with a different ``role``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

from .constants import (
    DEFAULT_MAX_PDU,
    HEADER_LEN,
    RESPONSE_BIT,
    BindType,
    CommandId,
    Status,
)
from .errors import FramingError, LocalProtocolError
from .pdu import (
    BodyError,
    EnquireLink,
    GenericNack,
    Pdu,
    UnknownCommand,
    decode,
    response_for_command,
)


class Role(Enum):
    SMSC = "smsc"  # we accept binds (customer front door, simulator)
    ESME = "esme"  # we bind out (carrier sessions, test and load clients)


class State(Enum):
    OPEN = "open"  # connected, not bound
    BOUND_TX = "bound_tx"
    BOUND_RX = "bound_rx"
    BOUND_TRX = "bound_trx"
    UNBINDING = "unbinding"
    CLOSED = "closed"


_OPEN = State.OPEN
_CLOSED = State.CLOSED
_BOUND_TX = State.BOUND_TX
_BOUND_RX = State.BOUND_RX
_BOUND_TRX = State.BOUND_TRX
_SMSC = Role.SMSC

_BOUND_STATE = {
    BindType.TRANSMITTER: State.BOUND_TX,
    BindType.RECEIVER: State.BOUND_RX,
    BindType.TRANSCEIVER: State.BOUND_TRX,
}
_BIND_IDS = frozenset(int(b) for b in BindType)
_BIND_RESP_IDS = frozenset(int(b) | RESPONSE_BIT for b in BindType)
# Requests that each side may send only when bound in a given direction.
_SUBMIT_IDS = frozenset(
    {CommandId.SUBMIT_SM, CommandId.QUERY_SM, CommandId.DATA_SM, CommandId.CANCEL_SM}
)
_DELIVER_IDS = frozenset({CommandId.DELIVER_SM})
_ESME_SUBMIT_IDS = frozenset({CommandId.SUBMIT_SM, CommandId.QUERY_SM, CommandId.CANCEL_SM})
# Enum members read through their class cost ~70 ns each on Python 3.11; the
# per-PDU paths below use these plain module constants instead.
_ENQUIRE_LINK = int(CommandId.ENQUIRE_LINK)
_UNBIND = int(CommandId.UNBIND)
_UNBIND_RESP = int(CommandId.UNBIND_RESP)
_GENERIC_NACK = int(CommandId.GENERIC_NACK)
_RESPONSE_BIT = int(RESPONSE_BIT)
_ROK = int(Status.ESME_ROK)
_U32 = struct.Struct(">I")


# ------------------------------------------------------------------- events


@dataclass(slots=True)
class Request:
    """The peer sent a request that the application must answer."""

    pdu: Pdu


@dataclass(slots=True)
class Response:
    """The peer answered one of our requests. ``request`` is what we sent."""

    pdu: Pdu
    request: Pdu
    sent_at: float


@dataclass(slots=True)
class Reject:
    """The peer sent a request that the session itself answers with an error.

    ``answer`` is already encoded by ``send`` when the transport sends it;
    ``close`` says the byte stream cannot continue (framing broken).
    """

    answer: Pdu
    reason: str
    close: bool = False


@dataclass(slots=True)
class StrayResponse:
    """A response that matches no outstanding request (late or bogus)."""

    pdu: Pdu


@dataclass(slots=True)
class Timeout:
    """One of our requests got no answer within ``response_timeout``."""

    request: Pdu
    sent_at: float


@dataclass(slots=True)
class EnquireLinkDue:
    """The link has been quiet for ``enquire_interval``: send an enquire_link."""


@dataclass(slots=True)
class Idle:
    """Nothing received for ``inactivity_timeout``: close the session."""


Event = Request | Response | Reject | StrayResponse | Timeout | EnquireLinkDue | Idle


# ------------------------------------------------------------------ session


class SmppSession:
    """One SMPP connection, either side.

    window          our outstanding requests allowed at once (``can_send``)
    peer_window     the peer's unanswered requests allowed at once; beyond it
                    the session itself answers ESME_RTHROTTLED
    """

    def __init__(
        self,
        role: Role,
        *,
        window: int = 64,
        peer_window: int = 64,
        max_pdu: int = DEFAULT_MAX_PDU,
        response_timeout: float = 30.0,
        enquire_interval: float = 30.0,
        inactivity_timeout: float = 120.0,
        now: float = 0.0,
    ) -> None:
        self.role = role
        self.state = State.OPEN
        self.window = window
        self.peer_window = peer_window
        self.max_pdu = max_pdu
        self.response_timeout = response_timeout
        self.enquire_interval = enquire_interval
        self.inactivity_timeout = inactivity_timeout
        self.bind_type: BindType | None = None
        self._buf = bytearray()
        self._seq = 0
        # seq -> (request, sent_at); dicts keep insertion order = send order,
        # so the oldest request is first and the timeout scan stops early.
        self.outstanding: dict[int, tuple[Pdu, float]] = {}
        self.peer_pending: set[int] = set()
        self.last_rx = now
        self._enquire_seq: int | None = None
        self._bind_seq: int | None = None  # a peer's bind awaiting our answer

    # ------------------------------------------------------------ properties

    @property
    def bound(self) -> bool:
        s = self.state
        return s is _BOUND_TRX or s is _BOUND_TX or s is _BOUND_RX

    @property
    def can_send(self) -> bool:
        return len(self.outstanding) < self.window

    @property
    def in_flight(self) -> int:
        return len(self.outstanding)

    def next_sequence(self) -> int:
        # 0x00000001..0x7FFFFFFF (SMPP 3.4 section 3.2: sequence numbers wrap).
        self._seq = self._seq % 0x7FFFFFFF + 1
        return self._seq

    # --------------------------------------------------------------- inbound

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Feed bytes read from the socket; get events for complete PDUs."""
        if self.state is _CLOSED:
            return []
        self.last_rx = now
        buf = self._buf
        if buf:
            buf += data
            data = bytes(buf)
            buf.clear()
        elif type(data) is not bytes:
            data = bytes(data)
        # Frames are sliced from one bytes object: a single copy each (none
        # when a read is exactly one PDU); only an incomplete tail is kept.
        events: list[Event] = []
        pos = 0
        end = len(data)
        max_pdu = self.max_pdu
        unpack = _U32.unpack_from
        on_frame = self._on_frame
        try:
            while end - pos >= 4:
                length = unpack(data, pos)[0]
                if length < HEADER_LEN or length > max_pdu:
                    self.state = _CLOSED
                    events.append(
                        Reject(
                            GenericNack(sequence=0, status=Status.ESME_RINVCMDLEN),
                            f"command_length {length} outside {HEADER_LEN}..{max_pdu}",
                            close=True,
                        )
                    )
                    break
                if end - pos < length:
                    break
                frame = data[pos : pos + length]
                pos += length
                event = on_frame(frame)
                if event is not None:
                    events.append(event)
                if self.state is _CLOSED:
                    break
        finally:
            if pos < end:
                buf += memoryview(data)[pos:]
        return events

    def _on_frame(self, frame: bytes) -> Event | None:
        try:
            pdu = decode(frame)
        except UnknownCommand as exc:
            cid, seq = exc.command_id, exc.sequence  # type: ignore[attr-defined]
            if cid & RESPONSE_BIT:
                return StrayResponse(GenericNack(sequence=seq, status=Status.ESME_RINVCMDID))
            return Reject(GenericNack(sequence=seq, status=Status.ESME_RINVCMDID), str(exc))
        except BodyError as exc:
            if exc.command_id & RESPONSE_BIT:
                # A malformed answer still settles the request it answers.
                entry = self.outstanding.pop(exc.sequence, None)
                if entry is None:
                    return StrayResponse(GenericNack(sequence=exc.sequence, status=exc.status))
                nack = GenericNack(sequence=exc.sequence, status=exc.status)
                return Response(nack, entry[0], entry[1])
            return Reject(response_for_command(exc.command_id, exc.sequence, exc.status), str(exc))
        except FramingError as exc:
            self.state = State.CLOSED
            return Reject(GenericNack(status=exc.status), str(exc), close=True)
        if pdu.command_id & _RESPONSE_BIT:
            return self._on_response(pdu)
        return self._on_request(pdu)

    def _on_response(self, pdu: Pdu) -> Event:
        entry = self.outstanding.get(pdu.sequence)
        if entry is None:
            return StrayResponse(pdu)
        request, sent_at = entry
        cid = pdu.command_id
        if cid == request.command_id | _RESPONSE_BIT or cid == _GENERIC_NACK:
            del self.outstanding[pdu.sequence]
            if cid in _BIND_RESP_IDS and pdu.status == _ROK:
                self.bind_type = BindType(request.command_id)
                self.state = _BOUND_STATE[self.bind_type]
            elif cid == _UNBIND_RESP:
                self.state = State.CLOSED
            if request.sequence == self._enquire_seq:
                self._enquire_seq = None
            return Response(pdu, request, sent_at)
        # Right sequence, wrong kind of answer: the request stays outstanding.
        return StrayResponse(pdu)

    def _on_request(self, pdu: Pdu) -> Event:
        cid = pdu.command_id
        seq = pdu.sequence
        if cid == _ENQUIRE_LINK:
            self.peer_pending.add(seq)
            return Request(pdu)
        if cid == _UNBIND:
            # Honoured in any state; from now on new requests are refused
            # (RINVBNDSTS) while the ones in flight are answered.
            self.peer_pending.add(seq)
            if self.bound:
                self.state = State.UNBINDING
            return Request(pdu)
        if cid in _BIND_IDS:
            if self.role is not Role.SMSC:
                return self._reject(cid, seq, Status.ESME_RINVCMDID, "bind sent to an ESME")
            if self.state is not State.OPEN or self._bind_seq is not None:
                return self._reject(cid, seq, Status.ESME_RALYBND, "bind on a bound session")
            self._bind_seq = seq
            self.peer_pending.add(seq)
            return Request(pdu)
        state = self.state
        if not (state is _BOUND_TRX or state is _BOUND_TX or state is _BOUND_RX):
            return self._reject(cid, seq, Status.ESME_RINVBNDSTS, "request before bind")
        assert self.bind_type is not None
        if self.role is _SMSC:
            if cid in _SUBMIT_IDS and not self.bind_type.can_submit:
                return self._reject(cid, seq, Status.ESME_RINVBNDSTS, "submit on a receiver bind")
            if cid in _DELIVER_IDS:
                return self._reject(cid, seq, Status.ESME_RINVCMDID, "deliver_sm sent to an SMSC")
        else:
            if cid in _DELIVER_IDS and not self.bind_type.can_receive:
                return self._reject(cid, seq, Status.ESME_RINVBNDSTS, "deliver on a transmitter")
            if cid in _ESME_SUBMIT_IDS:
                return self._reject(cid, seq, Status.ESME_RINVCMDID, "submit sent to an ESME")
        if len(self.peer_pending) >= self.peer_window:
            return self._reject(cid, seq, Status.ESME_RTHROTTLED, "peer window full")
        self.peer_pending.add(seq)
        return Request(pdu)

    @staticmethod
    def _reject(cid: int, seq: int, status: int, reason: str) -> Reject:
        return Reject(response_for_command(cid, seq, status), reason)

    # -------------------------------------------------------------- outbound

    def send(self, pdu: Pdu, now: float) -> bytes:
        """Encode a PDU to send. Requests get a sequence number if they have none
        and enter the window; responses settle the peer's request."""
        state = self.state
        if state is _CLOSED:
            raise LocalProtocolError("session is closed")
        cid = pdu.command_id
        if cid & _RESPONSE_BIT:
            data = pdu.encode()  # encode first: a failure must leave no trace
            self.peer_pending.discard(pdu.sequence)
            if cid in _BIND_RESP_IDS:
                self._bind_seq = None
                if pdu.status == _ROK:
                    self.bind_type = BindType(cid & ~RESPONSE_BIT)
                    self.state = _BOUND_STATE[self.bind_type]
            elif cid == _UNBIND_RESP:
                self.state = State.UNBINDING
            return data
        if cid in _BIND_IDS:
            if self.role is not Role.ESME or state is not _OPEN:
                raise LocalProtocolError("bind is only sent by an unbound ESME")
        elif (
            cid != _ENQUIRE_LINK
            and cid != _UNBIND
            and not (state is _BOUND_TRX or state is _BOUND_TX or state is _BOUND_RX)
        ):
            raise LocalProtocolError(f"{CommandId(cid).name} before bind")
        if len(self.outstanding) >= self.window and cid != _ENQUIRE_LINK:
            raise LocalProtocolError("window full")
        assigned = pdu.sequence == 0
        if assigned:
            pdu.sequence = self.next_sequence()
        try:
            data = pdu.encode()
        except Exception:
            if assigned:
                pdu.sequence = 0
            raise
        if cid == _UNBIND:
            self.state = State.UNBINDING
        self.outstanding[pdu.sequence] = (pdu, now)
        return data

    def close(self) -> None:
        self.state = State.CLOSED

    def take_outstanding(self) -> list[Pdu]:
        """Our requests still unanswered, removed (e.g. when the link drops)."""
        pending = [req for req, _ in self.outstanding.values()]
        self.outstanding.clear()
        return pending

    # ---------------------------------------------------------------- timers

    def poll(self, now: float) -> list[Event]:
        """Check every timer against ``now``. Call it about once a second."""
        events: list[Event] = []
        if self.state is State.CLOSED:
            return events
        limit = now - self.response_timeout
        while self.outstanding:
            seq, (req, sent_at) = next(iter(self.outstanding.items()))
            if sent_at > limit:
                break
            del self.outstanding[seq]
            if seq == self._enquire_seq:
                self._enquire_seq = None
            events.append(Timeout(req, sent_at))
        quiet = now - self.last_rx
        if quiet >= self.inactivity_timeout:
            events.append(Idle())
        elif (
            quiet >= self.enquire_interval
            and self._enquire_seq is None
            and (self.bound or self.role is Role.ESME)
        ):
            events.append(EnquireLinkDue())
        return events

    def enquire_link(self, now: float) -> bytes:
        """Encode an enquire_link and remember it so only one is outstanding."""
        pdu = EnquireLink()
        data = self.send(pdu, now)
        self._enquire_seq = pdu.sequence
        return data
