"""Tests for router.smpp.session: framing, bind state machine, windows, timers, sequences.

The session is sans-IO: every test feeds bytes and a fake ``now`` and looks at events.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.smpp.constants import HEADER_LEN, BindType, CommandId, Status
from router.smpp.errors import LocalProtocolError
from router.smpp.pdu import (
    BindReceiver,
    BindReceiverResp,
    BindTransceiver,
    BindTransceiverResp,
    BindTransmitter,
    BindTransmitterResp,
    DataSm,
    DataSmResp,
    DeliverSm,
    DeliverSmResp,
    EnquireLink,
    EnquireLinkResp,
    GenericNack,
    Pdu,
    QuerySm,
    QuerySmResp,
    SubmitSm,
    SubmitSmResp,
    Unbind,
    UnbindResp,
    decode,
    response_for,
)
from router.smpp.session import (
    EnquireLinkDue,
    Idle,
    Reject,
    Request,
    Response,
    Role,
    SmppSession,
    State,
    StrayResponse,
    Timeout,
)

FAST = settings(
    max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
_HEADER = struct.Struct(">IIII")
EVENT_TYPES = (Request, Response, Reject, StrayResponse, Timeout, EnquireLinkDue, Idle)

_BIND_RESP = {
    BindTransmitter: BindTransmitterResp,
    BindReceiver: BindReceiverResp,
    BindTransceiver: BindTransceiverResp,
}


def submit(seq: int = 0, text: bytes = b"hello") -> SubmitSm:
    return SubmitSm(
        sequence=seq,
        source_addr="447700900123",
        destination_addr="447700900456",
        short_message=text,
    )


def deliver(seq: int = 0) -> DeliverSm:
    return DeliverSm(sequence=seq, esm_class=0x04, short_message=b"id:1 stat:DELIVRD")


def smsc(bind: type[Pdu] | None = BindTransceiver, **kw: float) -> SmppSession:
    """An SMSC-side session, bound by a peer ESME with ``bind`` (None: left unbound)."""
    s = SmppSession(Role.SMSC, **kw)  # type: ignore[arg-type]
    if bind is not None:
        (ev,) = s.receive_data(bind(sequence=1, system_id="acct", password="pw").encode(), 0.0)
        assert isinstance(ev, Request)
        s.send(response_for(ev.pdu, system_id="router"), 0.0)
        assert s.bound
    return s


def esme(bind: type[Pdu] | None = BindTransceiver, **kw: float) -> SmppSession:
    """An ESME-side session that has bound out with ``bind`` (None: left unbound)."""
    s = SmppSession(Role.ESME, **kw)  # type: ignore[arg-type]
    if bind is not None:
        req = bind(system_id="acct", password="pw")
        s.send(req, 0.0)
        (ev,) = s.receive_data(_BIND_RESP[bind](sequence=req.sequence).encode(), 0.0)
        assert isinstance(ev, Response)
        assert s.bound
    return s


def one(events: list[object]) -> object:
    assert len(events) == 1, events
    return events[0]


def reject_of(events: list[object]) -> Reject:
    ev = one(events)
    assert isinstance(ev, Reject), ev
    return ev


# ------------------------------------------------------------------ framing

STREAM_PDUS: list[Pdu] = [
    submit(10),
    EnquireLink(sequence=11),
    submit(12, text=b"x" * 254),
    DataSm(sequence=13, tlvs={0x0424: b"payload" * 40}),
    QuerySm(sequence=14, message_id="abc"),
    SubmitSmResp(sequence=99, message_id="stray"),
    Unbind(sequence=15),
]
STREAM = b"".join(p.encode() for p in STREAM_PDUS)


def _decoded(events: list[object]) -> list[Pdu]:
    out: list[Pdu] = []
    for ev in events:
        assert isinstance(ev, Request | StrayResponse), ev
        out.append(ev.pdu)
    return out


def _feed_chunks(chunks: list[bytes]) -> list[object]:
    s = smsc()
    events: list[object] = []
    for i, chunk in enumerate(chunks):
        events += s.receive_data(chunk, float(i))
    # The stream ends with an unbind: from it on, the session is unbinding
    # (requests in flight are still answered, new ones refused).
    assert s.state is State.UNBINDING
    return events


def test_several_pdus_in_one_read() -> None:
    assert _decoded(_feed_chunks([STREAM])) == STREAM_PDUS


def test_stream_split_at_every_byte_boundary() -> None:
    for cut in range(len(STREAM) + 1):
        assert _decoded(_feed_chunks([STREAM[:cut], STREAM[cut:]])) == STREAM_PDUS, cut


def test_stream_one_byte_at_a_time() -> None:
    chunks = [STREAM[i : i + 1] for i in range(len(STREAM))]
    assert _decoded(_feed_chunks(chunks)) == STREAM_PDUS


@FAST
@given(cuts=st.lists(st.integers(0, len(STREAM)), max_size=30))
def test_stream_random_chunking(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(STREAM)]
    chunks = [STREAM[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    assert _decoded(_feed_chunks(chunks)) == STREAM_PDUS


def test_partial_pdu_yields_nothing_until_complete() -> None:
    s = smsc()
    wire = submit(5).encode()
    assert s.receive_data(wire[:3], 1.0) == []
    assert s.receive_data(wire[3:HEADER_LEN], 2.0) == []
    assert s.receive_data(wire[HEADER_LEN:-1], 3.0) == []
    (ev,) = s.receive_data(wire[-1:], 4.0)
    assert isinstance(ev, Request) and ev.pdu == submit(5)


@pytest.mark.parametrize("length", [0, 1, 15])
def test_command_length_below_header_closes(length: int) -> None:
    s = smsc()
    ev = reject_of(s.receive_data(_HEADER.pack(length, CommandId.SUBMIT_SM, 0, 7), 1.0))
    assert ev.close
    assert isinstance(ev.answer, GenericNack)
    assert ev.answer.status == Status.ESME_RINVCMDLEN
    assert s.state is State.CLOSED
    # Nothing more is read or sent once the stream is unusable.
    assert s.receive_data(submit(8).encode(), 2.0) == []
    assert s.poll(10_000.0) == []
    with pytest.raises(LocalProtocolError):
        s.send(ev.answer, 2.0)


def test_command_length_above_max_pdu_closes_without_waiting_for_body() -> None:
    s = smsc(max_pdu=1024)
    # Only the length field has arrived: the session must not wait for 1025 octets.
    ev = reject_of(s.receive_data((1025).to_bytes(4, "big"), 1.0))
    assert ev.close and ev.answer.status == Status.ESME_RINVCMDLEN
    assert s.state is State.CLOSED


def test_command_length_equal_to_max_pdu_is_accepted() -> None:
    s = smsc(max_pdu=300)
    pdu = DataSm(sequence=3, tlvs={0x1400: b""})
    body_len = 300 - len(pdu.encode())
    pdu.tlvs[0x1400] = bytes(body_len)
    wire = pdu.encode()
    assert len(wire) == 300
    ev = one(s.receive_data(wire, 1.0))
    assert isinstance(ev, Request) and ev.pdu == pdu


def test_bad_length_after_good_pdus_in_same_read() -> None:
    s = smsc()
    events = s.receive_data(submit(2).encode() + b"\xff\xff\xff\xff" + submit(3).encode(), 1.0)
    assert isinstance(events[0], Request)
    assert isinstance(events[1], Reject) and events[1].close
    assert len(events) == 2


garbage_chunks = st.lists(st.binary(max_size=80), max_size=12)


@FAST
@given(
    chunks=garbage_chunks,
    role=st.sampled_from(list(Role)),
    bound=st.booleans(),
)
def test_garbage_never_raises(chunks: list[bytes], role: Role, bound: bool) -> None:
    bind = BindTransceiver if bound else None
    s = smsc(bind, max_pdu=512) if role is Role.SMSC else esme(bind, max_pdu=512)
    for i, chunk in enumerate(chunks):
        for ev in s.receive_data(chunk, float(i)):
            assert isinstance(ev, EVENT_TYPES)
            if isinstance(ev, Reject) and not ev.close:
                s.send(ev.answer, float(i))  # answering a reject must always be possible
        for ev in s.poll(float(i)):
            assert isinstance(ev, EVENT_TYPES)


@st.composite
def noisy_streams(draw: st.DrawFn) -> list[bytes]:
    """Well-framed PDUs whose header and body are partly random, chunked randomly."""
    frames = []
    for _ in range(draw(st.integers(1, 6))):
        body = draw(st.binary(max_size=60))
        cid = draw(st.sampled_from([c.value for c in CommandId]) | st.integers(0, 0xFFFFFFFF))
        status = draw(st.sampled_from([0, 0x400]) | st.integers(0, 0xFFFFFFFF))
        seq = draw(st.integers(0, 0xFFFFFFFF))
        frames.append(_HEADER.pack(HEADER_LEN + len(body), cid, status, seq) + body)
    data = b"".join(frames)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@FAST
@given(chunks=noisy_streams(), role=st.sampled_from(list(Role)))
def test_well_framed_random_pdus_never_raise_or_close(chunks: list[bytes], role: Role) -> None:
    s = smsc() if role is Role.SMSC else esme()
    for chunk in chunks:
        for ev in s.receive_data(chunk, 1.0):
            assert isinstance(ev, EVENT_TYPES)
            # A well-framed stream never needs the connection closed.
            assert not (isinstance(ev, Reject) and ev.close)
            if isinstance(ev, Reject):
                assert ev.answer.status != Status.ESME_ROK
                assert ev.answer.is_response
    assert s.state is not State.CLOSED


# ------------------------------------------------------------------ bind state machine


@pytest.mark.parametrize(
    "pdu,answer_cls",
    [
        (submit(7), SubmitSmResp),
        (DataSm(sequence=7), DataSmResp),
        (QuerySm(sequence=7, message_id="m"), QuerySmResp),
    ],
    ids=lambda v: type(v).__name__,
)
def test_request_before_bind_is_rinvbndsts(pdu: Pdu, answer_cls: type[Pdu]) -> None:
    s = smsc(None)
    ev = reject_of(s.receive_data(pdu.encode(), 1.0))
    assert type(ev.answer) is answer_cls
    assert (ev.answer.sequence, ev.answer.status) == (7, Status.ESME_RINVBNDSTS)
    assert not ev.close
    assert s.state is State.OPEN
    # The session can still be bound afterwards.
    ev2 = one(s.receive_data(BindTransmitter(sequence=8, system_id="a").encode(), 2.0))
    assert isinstance(ev2, Request)


def test_enquire_link_before_bind_is_a_request() -> None:
    s = smsc(None)
    ev = one(s.receive_data(EnquireLink(sequence=4).encode(), 1.0))
    assert isinstance(ev, Request)
    assert s.send(response_for(ev.pdu), 1.0) == EnquireLinkResp(sequence=4).encode()


@pytest.mark.parametrize("first", [BindTransmitter, BindReceiver, BindTransceiver])
@pytest.mark.parametrize("second", [BindTransmitter, BindReceiver, BindTransceiver])
def test_second_bind_is_ralybnd(first: type[Pdu], second: type[Pdu]) -> None:
    s = smsc(first)
    state = s.state
    ev = reject_of(s.receive_data(second(sequence=2, system_id="acct").encode(), 1.0))
    assert type(ev.answer) is _BIND_RESP[second]
    assert (ev.answer.sequence, ev.answer.status) == (2, Status.ESME_RALYBND)
    assert s.state is state
    assert s.bind_type is BindType(first.command_id)


def test_pipelined_second_bind_is_ralybnd() -> None:
    s = smsc(None)
    ev1 = one(s.receive_data(BindTransmitter(sequence=1, system_id="a").encode(), 1.0))
    assert isinstance(ev1, Request)
    ev2 = reject_of(s.receive_data(BindReceiver(sequence=2, system_id="a").encode(), 1.0))
    assert ev2.answer.status == Status.ESME_RALYBND


def test_failed_bind_leaves_session_open_and_rebindable() -> None:
    s = smsc(None)
    ev = one(s.receive_data(BindTransceiver(sequence=1, system_id="a").encode(), 1.0))
    s.send(response_for(ev.pdu, Status.ESME_RBINDFAIL), 1.0)
    assert s.state is State.OPEN and not s.bound
    ev = one(s.receive_data(BindTransceiver(sequence=2, system_id="a").encode(), 2.0))
    assert isinstance(ev, Request)
    s.send(response_for(ev.pdu, system_id="r"), 2.0)
    assert s.state is State.BOUND_TRX


@pytest.mark.parametrize(
    "bind,state",
    [
        (BindTransmitter, State.BOUND_TX),
        (BindReceiver, State.BOUND_RX),
        (BindTransceiver, State.BOUND_TRX),
    ],
)
def test_bind_states_both_roles(bind: type[Pdu], state: State) -> None:
    assert smsc(bind).state is state
    assert esme(bind).state is state
    assert smsc(bind).bind_type is esme(bind).bind_type is BindType(bind.command_id)


@pytest.mark.parametrize(
    "pdu",
    [submit(3), DataSm(sequence=3), QuerySm(sequence=3, message_id="m")],
    ids=lambda p: type(p).__name__,
)
def test_submit_on_receiver_bind_is_rinvbndsts(pdu: Pdu) -> None:
    s = smsc(BindReceiver)
    ev = reject_of(s.receive_data(pdu.encode(), 1.0))
    assert ev.answer.status == Status.ESME_RINVBNDSTS
    assert ev.answer.sequence == 3
    assert ev.answer.command_id == pdu.command_id | 0x80000000
    assert s.state is State.BOUND_RX
    assert s.peer_pending == set()


def test_deliver_sm_sent_to_smsc_is_rinvcmdid() -> None:
    ev = reject_of(smsc().receive_data(deliver(4).encode(), 1.0))
    assert isinstance(ev.answer, DeliverSmResp)
    assert ev.answer.status == Status.ESME_RINVCMDID


def test_esme_side_rules() -> None:
    s = esme(BindTransmitter)
    ev = reject_of(s.receive_data(deliver(4).encode(), 1.0))
    assert (type(ev.answer), ev.answer.status) == (DeliverSmResp, Status.ESME_RINVBNDSTS)
    ev = reject_of(s.receive_data(submit(5).encode(), 1.0))
    assert (type(ev.answer), ev.answer.status) == (SubmitSmResp, Status.ESME_RINVCMDID)
    ev = reject_of(s.receive_data(BindTransceiver(sequence=6).encode(), 1.0))
    assert ev.answer.status == Status.ESME_RINVCMDID
    r = esme(BindReceiver)
    ev2 = one(r.receive_data(deliver(7).encode(), 1.0))
    assert isinstance(ev2, Request)
    assert r.send(response_for(ev2.pdu), 1.0) == DeliverSmResp(sequence=7).encode()
    assert r.peer_pending == set()


def test_unknown_command_is_generic_nack_and_session_stays_usable() -> None:
    s = smsc()
    unknown = _HEADER.pack(HEADER_LEN + 3, CommandId.SUBMIT_MULTI, 0, 41) + b"abc"
    vendor = _HEADER.pack(HEADER_LEN, 0x00010200, 0, 42)
    events = s.receive_data(unknown + vendor + submit(43).encode(), 1.0)
    assert len(events) == 3
    for ev, seq in zip(events[:2], (41, 42), strict=True):
        assert isinstance(ev, Reject) and not ev.close
        assert isinstance(ev.answer, GenericNack)
        assert (ev.answer.sequence, ev.answer.status) == (seq, Status.ESME_RINVCMDID)
    assert isinstance(events[2], Request) and events[2].pdu == submit(43)
    assert s.state is State.BOUND_TRX


def test_unknown_response_id_is_stray() -> None:
    ev = one(smsc().receive_data(_HEADER.pack(16, CommandId.SUBMIT_MULTI_RESP, 0, 5), 1.0))
    assert isinstance(ev, StrayResponse)
    assert ev.pdu.sequence == 5


def _submit_body(**parts: bytes) -> bytes:
    p = {
        "service_type": b"\x00",
        "source": b"447700900123\x00",
        "dest": b"447700900456\x00",
        "sm": b"\x01\x00\x00\x00\x02hi",
        "tlvs": b"",
    }
    p.update(parts)
    return (
        p["service_type"]
        + b"\x01\x01"
        + p["source"]
        + b"\x01\x01"
        + p["dest"]
        + b"\x00\x00\x00\x00\x00"
        + p["sm"]
        + p["tlvs"]
    )


MALFORMED_SUBMITS = {
    "source_too_long": (_submit_body(source=b"1" * 30 + b"\x00"), Status.ESME_RINVSRCADR),
    "dest_too_long": (_submit_body(dest=b"2" * 30 + b"\x00"), Status.ESME_RINVDSTADR),
    "sm_length_beyond": (_submit_body(sm=b"\x01\x00\x00\x00\xf0hi"), Status.ESME_RINVMSGLEN),
    "broken_tlv": (_submit_body(tlvs=b"\x04\x24\x00\x09ab"), Status.ESME_RINVOPTPARSTREAM),
    "truncated": (b"\x00\x01", Status.ESME_RINVCMDLEN),
}


@pytest.mark.parametrize("body,status", MALFORMED_SUBMITS.values(), ids=list(MALFORMED_SUBMITS))
def test_malformed_submit_gets_mapped_status_and_session_stays_usable(
    body: bytes, status: int
) -> None:
    s = smsc()
    bad = _HEADER.pack(HEADER_LEN + len(body), CommandId.SUBMIT_SM, 0, 21) + body
    events = s.receive_data(bad + submit(22).encode(), 1.0)
    assert len(events) == 2
    ev = events[0]
    assert isinstance(ev, Reject) and not ev.close
    assert isinstance(ev.answer, SubmitSmResp)
    assert (ev.answer.sequence, ev.answer.status) == (21, status)
    # The answer is sent with no body (SMPP 3.4 4.4.2).
    assert s.send(ev.answer, 1.0) == _HEADER.pack(16, CommandId.SUBMIT_SM_RESP, status, 21)
    assert isinstance(events[1], Request) and events[1].pdu.sequence == 22
    assert s.state is State.BOUND_TRX


def test_unbind_flow_esme_side() -> None:
    s = esme()
    req = Unbind()
    s.send(req, 1.0)
    assert s.state is State.UNBINDING
    with pytest.raises(LocalProtocolError):
        s.send(submit(), 1.0)
    ev = one(s.receive_data(UnbindResp(sequence=req.sequence).encode(), 2.0))
    assert isinstance(ev, Response) and ev.request is req
    assert s.state is State.CLOSED


def test_unbind_flow_smsc_side() -> None:
    s = smsc()
    ev = one(s.receive_data(Unbind(sequence=9).encode(), 1.0))
    assert isinstance(ev, Request)
    s.send(response_for(ev.pdu), 1.0)
    assert s.state is State.UNBINDING
    ev = reject_of(s.receive_data(submit(10).encode(), 2.0))
    assert ev.answer.status == Status.ESME_RINVBNDSTS


def test_local_protocol_errors() -> None:
    with pytest.raises(LocalProtocolError):
        smsc(None).send(BindTransmitter(system_id="x"), 0.0)  # SMSCs do not bind out
    with pytest.raises(LocalProtocolError):
        esme(None).send(submit(), 0.0)  # before bind
    with pytest.raises(LocalProtocolError):
        esme().send(BindTransmitter(system_id="x"), 0.0)  # already bound
    s = esme()
    s.close()
    with pytest.raises(LocalProtocolError):
        s.send(submit(), 0.0)
    assert s.receive_data(submit(1).encode(), 0.0) == []


def test_failed_encode_leaves_no_trace() -> None:
    s = esme(window=2)
    bad = SubmitSm(source_addr="1" * 30)  # longer than source_addr allows
    with pytest.raises(ValueError):
        s.send(bad, 0.0)
    assert bad.sequence == 0
    assert s.in_flight == 0
    good = submit()
    s.send(good, 0.0)
    assert s.in_flight == 1 and list(s.outstanding) == [good.sequence]
    # A response that cannot be encoded does not settle the peer's request either.
    r = smsc()
    one(r.receive_data(submit(5).encode(), 0.0))
    with pytest.raises(ValueError):
        r.send(SubmitSmResp(sequence=5, message_id="x" * 80), 0.0)
    assert r.peer_pending == {5}


# ------------------------------------------------------------------ windows


def test_esme_window() -> None:
    s = esme(window=3)
    sent = []
    for i in range(3):
        assert s.can_send
        p = submit()
        s.send(p, float(i))
        sent.append(p)
    assert not s.can_send
    assert s.in_flight == 3
    with pytest.raises(LocalProtocolError):
        s.send(submit(), 3.0)
    assert s.in_flight == 3  # the refused PDU did not enter the window
    # Keep-alives are never blocked by a full window.
    s.enquire_link(3.0)
    assert s.in_flight == 4
    ev = one(s.receive_data(SubmitSmResp(sequence=sent[1].sequence, message_id="m").encode(), 4.0))
    assert isinstance(ev, Response) and ev.request is sent[1]
    assert s.in_flight == 3
    assert not s.can_send  # enquire_link still occupies a slot until answered
    one(s.receive_data(EnquireLinkResp(sequence=s._enquire_seq or 0).encode(), 4.0))
    assert s.can_send
    s.send(submit(), 5.0)


def test_take_outstanding_empties_window() -> None:
    s = esme(window=2)
    a, b = submit(), submit()
    s.send(a, 0.0)
    s.send(b, 0.0)
    assert s.take_outstanding() == [a, b]
    assert s.can_send and s.in_flight == 0


def test_peer_window_throttles() -> None:
    s = smsc(peer_window=2)
    for seq in (10, 11):
        assert isinstance(one(s.receive_data(submit(seq).encode(), 1.0)), Request)
    ev = reject_of(s.receive_data(submit(12).encode(), 1.0))
    assert isinstance(ev.answer, SubmitSmResp)
    assert (ev.answer.sequence, ev.answer.status) == (12, Status.ESME_RTHROTTLED)
    assert not ev.close
    # Keep-alive and unbind are answered even when the peer window is full.
    assert isinstance(one(s.receive_data(EnquireLink(sequence=13).encode(), 1.0)), Request)
    s.send(EnquireLinkResp(sequence=13), 1.0)
    # Answering one request frees one slot.
    s.send(SubmitSmResp(sequence=10, message_id="a"), 1.0)
    assert isinstance(one(s.receive_data(submit(14).encode(), 1.0)), Request)
    assert reject_of(s.receive_data(submit(15).encode(), 1.0)).answer.status == (
        Status.ESME_RTHROTTLED
    )
    assert s.peer_pending == {11, 14}


def test_peer_window_esme_side_for_deliver_sm() -> None:
    s = esme(peer_window=1)
    assert isinstance(one(s.receive_data(deliver(1).encode(), 1.0)), Request)
    ev = reject_of(s.receive_data(deliver(2).encode(), 1.0))
    assert (type(ev.answer), ev.answer.status) == (DeliverSmResp, Status.ESME_RTHROTTLED)


# ------------------------------------------------------------------ timers


def test_enquire_link_due_after_quiet_period_only_one_outstanding() -> None:
    s = esme(enquire_interval=30.0, response_timeout=10.0, inactivity_timeout=120.0)
    assert s.poll(29.9) == []
    assert s.poll(30.0) == [EnquireLinkDue()]
    wire = s.enquire_link(30.0)
    pdu = decode(wire)
    assert isinstance(pdu, EnquireLink)
    assert s.poll(35.0) == []  # one outstanding: no second one
    ev = one(s.receive_data(EnquireLinkResp(sequence=pdu.sequence).encode(), 36.0))
    assert isinstance(ev, Response) and ev.sent_at == 30.0
    assert s.poll(65.9) == []  # quiet time counts from the last read (36)
    assert s.poll(66.0) == [EnquireLinkDue()]


def test_unanswered_enquire_link_times_out_then_is_due_again() -> None:
    s = esme(enquire_interval=30.0, response_timeout=10.0, inactivity_timeout=120.0)
    s.enquire_link(30.0)
    events = s.poll(40.0)
    assert len(events) == 2
    assert isinstance(events[0], Timeout) and isinstance(events[0].request, EnquireLink)
    assert events[1] == EnquireLinkDue()


def test_unbound_smsc_does_not_enquire() -> None:
    s = smsc(None, enquire_interval=30.0, inactivity_timeout=120.0)
    assert s.poll(60.0) == []
    assert s.poll(120.0) == [Idle()]
    assert smsc(enquire_interval=30.0).poll(30.0) == [EnquireLinkDue()]


def test_response_timeout() -> None:
    s = esme(response_timeout=10.0, enquire_interval=1000.0, inactivity_timeout=1000.0)
    a, b = submit(), submit()
    s.send(a, 0.0)
    s.send(b, 5.0)
    assert s.poll(9.99) == []
    (ev,) = s.poll(10.0)
    assert isinstance(ev, Timeout) and ev.request is a and ev.sent_at == 0.0
    assert s.in_flight == 1
    (ev,) = s.poll(15.0)
    assert isinstance(ev, Timeout) and ev.request is b
    assert s.in_flight == 0 and s.can_send
    # A late answer is now a stray, not a crash.
    late = one(s.receive_data(SubmitSmResp(sequence=a.sequence).encode(), 16.0))
    assert isinstance(late, StrayResponse)


def test_wrong_kind_answer_does_not_delay_timeout() -> None:
    s = esme(response_timeout=10.0, enquire_interval=1000.0, inactivity_timeout=1000.0)
    a, b = submit(), submit()
    s.send(a, 0.0)
    s.send(b, 5.0)
    # A deliver_sm_resp carrying a's sequence does not answer a submit_sm.
    stray = one(s.receive_data(DeliverSmResp(sequence=a.sequence).encode(), 1.0))
    assert isinstance(stray, StrayResponse)
    assert s.in_flight == 2
    events = s.poll(10.0)
    assert [e.request for e in events if isinstance(e, Timeout)] == [a]


def test_idle_after_inactivity_timeout() -> None:
    s = esme(enquire_interval=30.0, inactivity_timeout=120.0, response_timeout=1000.0)
    s.receive_data(EnquireLinkResp(sequence=999).encode(), 50.0)  # any read counts
    assert Idle() not in s.poll(169.9)
    assert s.poll(170.0) == [Idle()]
    s.receive_data(b"\x00\x00", 171.0)  # even a partial PDU is traffic
    assert Idle() not in s.poll(290.9)
    assert Idle() in s.poll(291.0)


def test_injected_start_time() -> None:
    s = SmppSession(Role.ESME, now=1000.0, enquire_interval=30.0, inactivity_timeout=60.0)
    assert s.poll(1029.0) == []
    assert s.poll(1030.0) == [EnquireLinkDue()]
    assert s.poll(1060.0) == [Idle()]


# ------------------------------------------------------------------ sequence numbers


def test_sequence_numbers_start_at_one_and_increase() -> None:
    s = esme(None)
    assert [s.next_sequence() for _ in range(3)] == [1, 2, 3]


def test_sequence_numbers_wrap_to_one() -> None:
    s = esme(window=10)
    s._seq = 0x7FFFFFFE
    seqs = []
    for _ in range(3):
        p = submit()
        wire = s.send(p, 0.0)
        assert _HEADER.unpack_from(wire)[3] == p.sequence
        seqs.append(p.sequence)
    assert seqs == [0x7FFFFFFF, 1, 2]
    assert all(1 <= q <= 0x7FFFFFFF for q in seqs)


def test_explicit_sequence_is_kept() -> None:
    s = esme()
    p = submit(seq=77)
    s.send(p, 0.0)
    assert p.sequence == 77 and 77 in s.outstanding


# ------------------------------------------------------------------ response matching


def test_responses_matched_to_their_requests_out_of_order() -> None:
    s = esme(window=10)
    reqs = [submit(), DataSm(), QuerySm(message_id="q"), submit()]
    for i, r in enumerate(reqs):
        s.send(r, float(i))
    answers = [
        SubmitSmResp(sequence=reqs[3].sequence, message_id="d"),
        QuerySmResp(sequence=reqs[2].sequence, message_id="q", message_state=2),
        SubmitSmResp(sequence=reqs[0].sequence, message_id="a"),
        DataSmResp(sequence=reqs[1].sequence, message_id="b"),
    ]
    events = s.receive_data(b"".join(a.encode() for a in answers), 10.0)
    assert [type(e) for e in events] == [Response] * 4
    got = {id(e.request): (e.pdu, e.sent_at) for e in events}  # type: ignore[union-attr]
    assert got[id(reqs[0])] == (answers[2], 0.0)
    assert got[id(reqs[1])] == (answers[3], 1.0)
    assert got[id(reqs[2])] == (answers[1], 2.0)
    assert got[id(reqs[3])] == (answers[0], 3.0)
    assert s.in_flight == 0


def test_stray_responses_are_reported() -> None:
    s = esme()
    a = submit()
    s.send(a, 0.0)
    # Unknown sequence.
    ev = one(s.receive_data(SubmitSmResp(sequence=a.sequence + 100).encode(), 1.0))
    assert isinstance(ev, StrayResponse)
    # Right sequence, wrong kind: stray, and the request stays outstanding.
    ev = one(s.receive_data(DeliverSmResp(sequence=a.sequence).encode(), 1.0))
    assert isinstance(ev, StrayResponse)
    assert a.sequence in s.outstanding
    # The real answer, then a duplicate of it.
    ev = one(s.receive_data(SubmitSmResp(sequence=a.sequence, message_id="x").encode(), 2.0))
    assert isinstance(ev, Response) and ev.request is a
    ev = one(s.receive_data(SubmitSmResp(sequence=a.sequence, message_id="x").encode(), 3.0))
    assert isinstance(ev, StrayResponse)


def test_generic_nack_answers_a_request() -> None:
    s = esme()
    a = submit()
    s.send(a, 0.0)
    ev = one(s.receive_data(GenericNack(sequence=a.sequence, status=0x400).encode(), 1.0))
    assert isinstance(ev, Response) and ev.request is a
    assert ev.pdu.status == 0x400
    assert s.in_flight == 0


def test_vendor_status_in_response() -> None:
    s = esme()
    a = submit()
    s.send(a, 0.0)
    ev = one(s.receive_data(SubmitSmResp(sequence=a.sequence, status=0x401).encode(), 1.0))
    assert isinstance(ev, Response) and ev.pdu.status == 0x401


def test_malformed_response_settles_its_request() -> None:
    s = esme()
    a = submit()
    s.send(a, 0.0)
    body = b"x" * 70  # message_id never NUL-terminated
    bad = _HEADER.pack(HEADER_LEN + len(body), CommandId.SUBMIT_SM_RESP, 0, a.sequence) + body
    ev = one(s.receive_data(bad, 1.0))
    assert isinstance(ev, Response) and ev.request is a
    assert isinstance(ev.pdu, GenericNack) and ev.pdu.status == Status.ESME_RINVMSGID
    assert s.in_flight == 0


def test_malformed_stray_response_is_reported() -> None:
    s = esme()
    body = b"x" * 70
    bad = _HEADER.pack(HEADER_LEN + len(body), CommandId.SUBMIT_SM_RESP, 0, 12345) + body
    ev = one(s.receive_data(bad, 1.0))
    assert isinstance(ev, StrayResponse)
