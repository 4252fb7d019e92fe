"""The carrier SMSC simulator (router.sim) against an independent client (smpplib)
and against our own SmppProtocol as ESME. Everything on 127.0.0.1, port 0, bounded."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from router.sim import CarrierSimulator, SimConfig
from router.sim import smsc as sim_module
from router.smpp.constants import CommandId, MessageState, Status, Tag
from router.smpp.errors import SmppError
from router.smpp.pdu import (
    BindReceiver,
    BindTransceiver,
    BindTransmitter,
    DataSm,
    DeliverSm,
    EnquireLink,
    Pdu,
    SubmitSm,
)
from router.smpp.session import Role, SmppSession
from router.smpp.transport import SmppProtocol

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
SRC = "4915550001234"
DST = "447700900123"
RECEIPT_RE = re.compile(
    r"^id:(?P<id>\S+) sub:001 dlvrd:(?P<dlvrd>\d{3}) submit date:\d{10} done date:\d{10} "
    r"stat:(?P<stat>[A-Z]{7}) err:(?P<err>\d{3}) text:(?P<text>.*)$"
)


# ----------------------------------------------------------------- helpers


class Esme(SmppProtocol):
    """A minimal ESME: collects deliver_sm and answers them (unless told not to)."""

    def __init__(self, ack: bool = True, ack_status: int = Status.ESME_ROK) -> None:
        super().__init__(SmppSession(Role.ESME, window=500))
        self.ack = ack
        self.ack_status = ack_status
        self.delivered: asyncio.Queue[DeliverSm] = asyncio.Queue()
        self.events: list[tuple[str, str]] = []

    def on_request(self, pdu: Pdu) -> None:
        if pdu.command_id != CommandId.DELIVER_SM:
            raise SmppError("unexpected", Status.ESME_RINVCMDID)
        assert isinstance(pdu, DeliverSm)
        self.events.append(("dlr", pdu.tlv_str(Tag.RECEIPTED_MESSAGE_ID) or ""))
        self.delivered.put_nowait(pdu)
        if self.ack:
            self.answer(pdu, self.ack_status)

    async def next_receipt(self, within: float = 5.0) -> DeliverSm:
        return await asyncio.wait_for(self.delivered.get(), within)


Connect = Callable[..., Awaitable[tuple[Esme, Pdu]]]


@pytest.fixture
async def make_sim() -> AsyncIterator[Callable[..., Awaitable[CarrierSimulator]]]:
    sims: list[CarrierSimulator] = []

    async def factory(**kw: Any) -> CarrierSimulator:
        kw.setdefault("port", 0)
        kw.setdefault("host", HOST)
        kw.setdefault("seed", 1)
        kw.setdefault("dlr_delay", 0.05)
        sim = CarrierSimulator(SimConfig(**kw))
        await sim.start()
        sims.append(sim)
        return sim

    yield factory
    for sim in sims:
        await asyncio.wait_for(sim.stop(), 5)


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    protos: list[Esme] = []

    async def factory(
        port: int,
        bind: type[Pdu] = BindTransceiver,
        system_id: str = "acct",
        password: str = "secret",
        **kw: Any,
    ) -> tuple[Esme, Pdu]:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: Esme(**kw), HOST, port)
        protos.append(proto)
        pdu = bind(system_id=system_id, password=password)  # type: ignore[call-arg]
        resp = await asyncio.wait_for(proto.request(pdu), 5)
        return proto, resp

    yield factory
    for proto in protos:
        proto.close()
    for proto in protos:
        if proto.closed is not None:
            await asyncio.wait_for(asyncio.shield(proto.closed), 5)


def submit(text: bytes = b"Hello world", registered_delivery: int = 1, **kw: Any) -> SubmitSm:
    return SubmitSm(
        source_addr_ton=1,
        source_addr_npi=1,
        source_addr=SRC,
        dest_addr_ton=1,
        dest_addr_npi=1,
        destination_addr=DST,
        registered_delivery=registered_delivery,
        short_message=text,
        **kw,
    )


async def eventually(cond: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def parse_receipt(pdu: DeliverSm) -> re.Match[str]:
    m = RECEIPT_RE.match(pdu.short_message.decode("ascii"))
    assert m is not None, "receipt text does not have the usual layout"
    return m


# ------------------------------------------------------ interop with smpplib


def _smpplib_session(port: int, text: str) -> dict[str, Any]:
    import smpplib.client
    import smpplib.consts
    import smpplib.gsm

    client = smpplib.client.Client(HOST, port, timeout=1, allow_unknown_opt_params=True)
    out: dict[str, Any] = {"sent": [], "received": []}
    client.set_message_sent_handler(lambda pdu: out["sent"].append(pdu))
    client.set_message_received_handler(lambda pdu: out["received"].append(pdu))
    client.connect()
    try:
        out["bind"] = client.bind_transceiver(system_id="acct", password="secret")
        parts, coding, esm_class = smpplib.gsm.make_parts(text)
        assert coding == smpplib.consts.SMPP_ENCODING_DEFAULT and len(parts) == 1
        client.send_message(
            source_addr_ton=1,
            source_addr_npi=1,
            source_addr=SRC,
            dest_addr_ton=1,
            dest_addr_npi=1,
            destination_addr=DST,
            short_message=parts[0],
            data_coding=coding,
            esm_class=esm_class,
            registered_delivery=1,
        )
        deadline = time.monotonic() + 10
        while (not out["sent"] or not out["received"]) and time.monotonic() < deadline:
            client.read_once()
        client.unbind()
    finally:
        client.disconnect()
    return out


def _text(value: Any) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


async def test_smpplib_client_gets_id_and_receipt(make_sim: Any) -> None:
    sim = await make_sim(system_id="acct", password="secret", name="carrier-a", dlr_delay=0.1)
    out = await asyncio.to_thread(_smpplib_session, sim.port, "Hello from smpplib, GSM text")

    assert _text(out["bind"].system_id) == "carrier-a"
    assert len(out["sent"]) == 1 and len(out["received"]) == 1
    resp = out["sent"][0]
    assert resp.status == 0
    carrier_id = _text(resp.message_id)
    assert re.fullmatch(r"[0-9a-f]{16}", carrier_id)

    dlr = out["received"][0]
    assert dlr.esm_class & 0x3C == 0x04
    assert _text(dlr.receipted_message_id) == carrier_id
    assert int(dlr.message_state) == MessageState.DELIVERED
    text = _text(dlr.short_message)
    assert f"id:{carrier_id} " in text and "stat:DELIVRD" in text and "err:000" in text
    assert text.endswith("text:Hello from smpplib, ")  # the first 20 characters

    await eventually(lambda: sim.stats.receipts_acked == 1)
    assert sim.stats.binds == 1 and sim.stats.accepted == 1 and sim.received_count() == 1
    got = sim.received[0]
    assert got.carrier_id == carrier_id and got.source == SRC and got.destination == DST
    assert got.payload == b"Hello from smpplib, GSM text" and got.data_coding == 0


# --------------------------------------------------- our own ESME as client


async def test_bind_and_receipt_with_our_esme(make_sim: Any, connect: Connect) -> None:
    sim = await make_sim(name="carrier-b")
    esme, bind_resp = await connect(sim.port)
    assert bind_resp.status == Status.ESME_ROK
    assert bind_resp.system_id == "carrier-b"  # type: ignore[attr-defined]
    assert bind_resp.tlv_int(Tag.SC_INTERFACE_VERSION) == 0x34  # type: ignore[attr-defined]

    resp = await esme.request(
        submit(b"Hi there", tlvs={Tag.USER_MESSAGE_REFERENCE: (0x1234).to_bytes(2, "big")})
    )
    assert resp.status == Status.ESME_ROK
    carrier_id = resp.message_id  # type: ignore[attr-defined]
    dlr = await esme.next_receipt()
    assert dlr.esm_class == 0x04
    assert dlr.tlv_str(Tag.RECEIPTED_MESSAGE_ID) == carrier_id
    assert dlr.tlv_int(Tag.MESSAGE_STATE) == MessageState.DELIVERED
    assert dlr.source_addr == DST and dlr.destination_addr == SRC
    assert dlr.tlv_int(Tag.USER_MESSAGE_REFERENCE) == 0x1234  # echoed
    m = parse_receipt(dlr)
    assert (m["id"], m["stat"], m["err"], m["dlvrd"], m["text"]) == (
        carrier_id,
        "DELIVRD",
        "000",
        "001",
        "Hi there",
    )
    await eventually(lambda: sim.stats.receipts_acked == 1)
    assert sim.stats.receipts_sent == 1


async def test_reject_ratio_answers_submitfail(make_sim: Any, connect: Connect) -> None:
    sim = await make_sim(reject_ratio=1.0)
    esme, _ = await connect(sim.port)
    for _ in range(5):
        resp = await esme.request(submit())
        assert resp.status == Status.ESME_RSUBMITFAIL
        assert resp.message_id == ""  # type: ignore[attr-defined]
    assert sim.stats.rejected == 5 and sim.stats.accepted == 0 and sim.received == []
    await asyncio.sleep(0.15)
    assert esme.delivered.empty() and sim.stats.receipts_sent == 0


async def test_keep_received_bounds_the_records_not_the_counting(
    make_sim: Any, connect: Connect
) -> None:
    sim = await make_sim(keep_received=2)
    esme, _ = await connect(sim.port)
    for _ in range(5):
        assert (await esme.request(submit())).status == Status.ESME_ROK
    assert sim.stats.accepted == 5 and len(sim.received) == 2
    await eventually(lambda: sim.stats.receipts_sent == 5)


def test_the_cli_simulator_keeps_no_records() -> None:
    (cfg,) = sim_module._configs(sim_module._parser().parse_args(["--port", "0"]))
    assert cfg.keep_received == 0


async def test_throttle_ratio_answers_throttled(make_sim: Any, connect: Connect) -> None:
    sim = await make_sim(throttle_ratio=1.0)
    esme, _ = await connect(sim.port)
    statuses = await asyncio.gather(*(esme.request(submit()) for _ in range(10)))
    assert {r.status for r in statuses} == {Status.ESME_RTHROTTLED}
    assert sim.stats.throttled == 10 and sim.stats.submits == 10 and sim.received_count() == 0


async def test_ratios_are_deterministic_with_a_seed(make_sim: Any, connect: Connect) -> None:
    async def run() -> list[int]:
        sim = await make_sim(reject_ratio=0.3, throttle_ratio=0.2, seed=42)
        esme, _ = await connect(sim.port)
        return [(await esme.request(submit(registered_delivery=0))).status for _ in range(40)]

    first, second = await run(), await run()
    assert first == second
    assert {Status.ESME_ROK, Status.ESME_RSUBMITFAIL, Status.ESME_RTHROTTLED} <= set(first)


@pytest.mark.parametrize(
    ("fmt", "pattern"),
    [("decimal", r"[1-9][0-9]{18}"), ("hex", r"[0-9a-f]{16}"), ("uuid", None)],
)
async def test_id_formats(make_sim: Any, connect: Connect, fmt: str, pattern: str | None) -> None:
    sim = await make_sim(id_format=fmt)
    esme, _ = await connect(sim.port)
    resps = await asyncio.gather(*(esme.request(submit(registered_delivery=0)) for _ in range(200)))
    ids = [r.message_id for r in resps]  # type: ignore[attr-defined]
    assert len(set(ids)) == 200
    for carrier_id in ids:
        if pattern is None:
            assert str(uuid.UUID(carrier_id)) == carrier_id
        else:
            assert re.fullmatch(pattern, carrier_id)
    if fmt == "decimal":
        assert all(int(i) < 2**63 for i in ids)
    assert [m.carrier_id for m in sim.received] == ids


async def test_wrong_credentials_fail_the_bind(make_sim: Any, connect: Connect) -> None:
    sim = await make_sim(system_id="acct", password="secret")
    esme, resp = await connect(sim.port, password="wrong")
    assert resp.status == Status.ESME_RINVPASWD
    assert not esme.session.bound
    assert esme.closed is not None
    await asyncio.wait_for(asyncio.shield(esme.closed), 5)  # the sim hangs up

    _, resp = await connect(sim.port, system_id="other")
    assert resp.status == Status.ESME_RINVSYSID
    _, resp = await connect(sim.port, bind=BindTransmitter)
    assert resp.status == Status.ESME_ROK
    assert sim.stats.bind_failures == 2 and sim.stats.binds == 1


async def test_max_binds_answers_already_bound(make_sim: Any, connect: Connect) -> None:
    # Most carrier accounts allow a fixed number of binds at once.
    sim = await make_sim(max_binds=1)
    first, resp = await connect(sim.port)
    assert resp.status == Status.ESME_ROK
    extra, resp = await connect(sim.port)
    assert resp.status == Status.ESME_RALYBND
    await asyncio.wait_for(asyncio.shield(extra.closed), 5)  # type: ignore[arg-type]
    _, resp = await connect(sim.port, system_id="other")  # counted per system_id
    assert resp.status == Status.ESME_ROK
    first.close()
    await asyncio.wait_for(asyncio.shield(first.closed), 5)  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    _, resp = await connect(sim.port)  # the slot is free again
    assert resp.status == Status.ESME_ROK


async def test_drop_every_closes_connections(make_sim: Any, connect: Connect) -> None:
    sim = await make_sim(drop_every=0.3)
    esme, _ = await connect(sim.port)
    assert esme.closed is not None
    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.shield(esme.closed), 3)
    assert 0.2 <= time.monotonic() - t0 < 2.0
    assert sim.stats.drops >= 1
    # The listener survives the drop: a reconnect binds again.
    esme2, resp = await connect(sim.port)
    assert resp.status == Status.ESME_ROK
    assert esme2.closed is not None
    await asyncio.wait_for(asyncio.shield(esme2.closed), 3)
    assert sim.stats.drops >= 2


async def test_receipt_waits_for_a_receiver(make_sim: Any, connect: Connect) -> None:
    sim = await make_sim(dlr_delay=0.02)
    tx, _ = await connect(sim.port, bind=BindTransmitter)
    resp = await tx.request(submit(b"queued"))
    carrier_id = resp.message_id  # type: ignore[attr-defined]
    await eventually(lambda: sim.pending_receipts() == 1)
    await asyncio.sleep(0.05)
    assert sim.stats.receipts_sent == 0

    # A receiver of another system_id does not get it.
    other, _ = await connect(sim.port, bind=BindReceiver, system_id="someone-else")
    rx, resp = await connect(sim.port, bind=BindReceiver)
    assert resp.status == Status.ESME_ROK
    dlr = await rx.next_receipt()
    assert dlr.tlv_str(Tag.RECEIPTED_MESSAGE_ID) == carrier_id
    await eventually(lambda: sim.stats.receipts_acked == 1)
    assert sim.pending_receipts() == 0 and other.delivered.empty()


async def test_receipt_backlog_throttles_submits(make_sim: Any, connect: Connect) -> None:
    """An ESME that does not take its receipts is slowed down, not robbed:
    receipts wait (up to the store bound) and submits get ESME_RTHROTTLED."""
    sim = await make_sim(dlr_delay=0.0, receipt_backlog_throttle=3)
    tx, _ = await connect(sim.port, bind=BindTransmitter)
    for _ in range(3):
        assert (await tx.request(submit(b"x"))).status == Status.ESME_ROK
    await eventually(lambda: sim.pending_receipts() == 3)
    assert (await tx.request(submit(b"x"))).status == Status.ESME_RTHROTTLED
    assert sim.stats.receipts_dropped == 0
    rx, _ = await connect(sim.port, bind=BindReceiver)
    await eventually(lambda: sim.stats.receipts_acked == 3)
    assert (await tx.request(submit(b"x"))).status == Status.ESME_ROK


async def test_unacked_receipt_is_requeued_on_connection_loss(
    make_sim: Any, connect: Connect
) -> None:
    sim = await make_sim(dlr_delay=0.02)
    tx, _ = await connect(sim.port, bind=BindTransmitter)
    silent, _ = await connect(sim.port, bind=BindReceiver, ack=False)
    resp = await tx.request(submit())
    carrier_id = resp.message_id  # type: ignore[attr-defined]
    first = await silent.next_receipt()
    assert first.tlv_str(Tag.RECEIPTED_MESSAGE_ID) == carrier_id
    silent.close()
    await eventually(lambda: sim.stats.receipts_requeued == 1 and sim.pending_receipts() == 1)

    rx, _ = await connect(sim.port, bind=BindReceiver)
    again = await rx.next_receipt()
    assert again.tlv_str(Tag.RECEIPTED_MESSAGE_ID) == carrier_id
    await eventually(lambda: sim.stats.receipts_acked == 1)
    assert sim.stats.receipts_sent == 2


async def test_receipt_window_bounds_unanswered_receipts(make_sim: Any, connect: Connect) -> None:
    """At most ``receipt_window`` deliver_sm wait for their resp on a bind;
    the rest wait in the simulator and follow as answers come."""
    sim = await make_sim(dlr_delay=0.0, receipt_window=3)
    tx, _ = await connect(sim.port, bind=BindTransmitter)
    silent, _ = await connect(sim.port, bind=BindReceiver, ack=False)
    for _ in range(5):
        assert (await tx.request(submit(b"x"))).status == Status.ESME_ROK
    await eventually(lambda: sim.stats.receipts_sent == 3 and sim.pending_receipts() == 2)
    await asyncio.sleep(0.1)
    assert silent.delivered.qsize() == 3  # no more while those three are unanswered
    got = [silent.delivered.get_nowait() for _ in range(3)]
    silent.answer(got[0])
    await eventually(lambda: sim.stats.receipts_sent == 4)
    assert sim.pending_receipts() == 1


async def test_receipt_answered_with_error_is_retried(make_sim: Any, connect: Connect) -> None:
    sim = await make_sim(dlr_delay=0.0)
    esme, _ = await connect(sim.port, ack_status=Status.ESME_RX_T_APPN)
    await esme.request(submit())
    await esme.next_receipt()
    esme.ack_status = Status.ESME_ROK
    await esme.next_receipt(within=5)  # retried after about a second
    await eventually(lambda: sim.stats.receipts_acked == 1)
    assert sim.stats.receipts_requeued == 1


async def test_receipts_round_robin_over_receivers(make_sim: Any, connect: Connect) -> None:
    sim = await make_sim(dlr_delay=0.02)
    tx, _ = await connect(sim.port, bind=BindTransmitter)
    rx1, _ = await connect(sim.port, bind=BindReceiver)
    rx2, _ = await connect(sim.port, bind=BindReceiver)
    for _ in range(6):
        await tx.request(submit())
    await eventually(lambda: sim.stats.receipts_acked == 6)
    assert rx1.delivered.qsize() == 3 and rx2.delivered.qsize() == 3


async def test_undelivered_fraction_and_failure_only_receipts(
    make_sim: Any, connect: Connect
) -> None:
    sim = await make_sim(deliver_ratio=0.0)
    esme, _ = await connect(sim.port)
    resp = await esme.request(submit(registered_delivery=2))  # on failure only
    dlr = await esme.next_receipt()
    assert dlr.tlv_str(Tag.RECEIPTED_MESSAGE_ID) == resp.message_id  # type: ignore[attr-defined]
    assert dlr.tlv_int(Tag.MESSAGE_STATE) == MessageState.UNDELIVERABLE
    m = parse_receipt(dlr)
    assert (m["stat"], m["err"], m["dlvrd"]) == ("UNDELIV", "001", "000")

    ok = await make_sim(deliver_ratio=1.0)
    esme2, _ = await connect(ok.port)
    await esme2.request(submit(registered_delivery=2))  # delivered: no receipt wanted
    await esme2.request(submit(registered_delivery=0))
    await asyncio.sleep(0.2)
    assert esme2.delivered.empty() and ok.stats.receipts_sent == 0 and ok.stats.accepted == 2


async def test_latency_delays_the_answer(make_sim: Any, connect: Connect) -> None:
    sim = await make_sim(latency=0.2, dlr_delay=0.3)
    esme, _ = await connect(sim.port)
    t0 = time.monotonic()
    resps = await asyncio.gather(*(esme.request(submit()) for _ in range(20)))
    elapsed = time.monotonic() - t0
    assert 0.18 <= elapsed < 1.5
    assert all(r.status == Status.ESME_ROK for r in resps)
    for _ in range(20):
        await esme.next_receipt()
    assert time.monotonic() - t0 >= 0.28


async def test_receipt_before_resp(make_sim: Any, connect: Connect) -> None:
    sim = await make_sim(receipt_before_resp=True, dlr_delay=0.5)
    esme, _ = await connect(sim.port)
    done = asyncio.get_running_loop().create_future()

    def on_resp(resp: Pdu | None, req: Pdu) -> None:
        assert resp is not None
        esme.events.append(("resp", resp.message_id))  # type: ignore[attr-defined]
        done.set_result(None)

    esme.send_request(submit(), on_resp)
    await asyncio.wait_for(done, 5)
    assert [kind for kind, _ in esme.events] == ["dlr", "resp"]
    assert esme.events[0][1] == esme.events[1][1]


async def test_max_tps_token_bucket(make_sim: Any, connect: Connect) -> None:
    sim = await make_sim(max_tps=5)
    esme, _ = await connect(sim.port)
    resps = await asyncio.gather(*(esme.request(submit(registered_delivery=0)) for _ in range(20)))
    ok = sum(r.status == Status.ESME_ROK for r in resps)
    throttled = sum(r.status == Status.ESME_RTHROTTLED for r in resps)
    assert 5 <= ok <= 6 and ok + throttled == 20
    await asyncio.sleep(0.45)  # refills continuously: about two tokens
    resps = [await esme.request(submit(registered_delivery=0)) for _ in range(2)]
    assert [r.status for r in resps] == [Status.ESME_ROK, Status.ESME_ROK]


async def test_peer_window_overflow_is_throttled(make_sim: Any, connect: Connect) -> None:
    sim = await make_sim(window=2, latency=0.2)
    esme, _ = await connect(sim.port)
    resps = await asyncio.gather(*(esme.request(submit(registered_delivery=0)) for _ in range(5)))
    assert sorted(r.status for r in resps) == [0, 0, 0x58, 0x58, 0x58]
    assert sim.stats.throttled == 3 and sim.stats.accepted == 2


async def test_data_sm_and_concatenated_parts(make_sim: Any, connect: Connect) -> None:
    sim = await make_sim()
    esme, _ = await connect(sim.port)
    data = DataSm(
        source_addr=SRC,
        destination_addr=DST,
        registered_delivery=1,
        tlvs={Tag.MESSAGE_PAYLOAD: b"data sm payload"},
    )
    resp = await esme.request(data)
    assert resp.command_id == CommandId.DATA_SM_RESP and resp.status == Status.ESME_ROK
    dlr = await esme.next_receipt()
    assert dlr.tlv_str(Tag.RECEIPTED_MESSAGE_ID) == resp.message_id  # type: ignore[attr-defined]
    assert parse_receipt(dlr)["text"] == "data sm payload"

    udh = bytes((5, 0, 3, 0x2A, 2))
    parts = [udh + b"\x01" + b"first part text here!", udh + b"\x02" + b"second"]
    resps = [await esme.request(submit(p, esm_class=0x40)) for p in parts]
    ids = [r.message_id for r in resps]  # type: ignore[attr-defined]
    assert len(set(ids)) == 2
    texts = {}
    for _ in range(2):
        d = await esme.next_receipt()
        texts[d.tlv_str(Tag.RECEIPTED_MESSAGE_ID)] = parse_receipt(d)["text"]
    assert texts == {ids[0]: "first part text here", ids[1]: "second"}
    assert [m.esm_class for m in sim.received[1:]] == [0x40, 0x40]


async def test_enquire_link_and_stop(make_sim: Any, connect: Connect) -> None:
    sim = await make_sim(dlr_delay=30, latency=0.5)
    esme, _ = await connect(sim.port)
    resp = await esme.request(EnquireLink())
    assert resp.command_id == CommandId.ENQUIRE_LINK_RESP
    esme.send_request(submit(), lambda resp, req: None)  # its answer is still pending
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await sim.stop()
    assert time.monotonic() - t0 < 2.5
    assert esme.closed is not None
    await asyncio.wait_for(asyncio.shield(esme.closed), 3)
    assert sim._answers is not None and len(sim._answers) == 0
    with pytest.raises(OSError):
        await asyncio.get_running_loop().create_connection(asyncio.Protocol, HOST, sim.port)
    await sim.stop()  # idempotent


async def test_nothing_private_is_logged(
    make_sim: Any, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sim = await make_sim(system_id="acct", password="secret", deliver_ratio=0.5)
    await connect(sim.port, password="nope")
    esme, _ = await connect(sim.port)
    for _ in range(4):
        await esme.request(submit(b"TopSecretText"))
    for _ in range(4):
        await esme.next_receipt()
    logged = caplog.text
    for secret in (SRC, DST, "TopSecretText", "secret"):
        assert secret not in logged
    assert "TopSecret" not in repr(sim.received[0]) and SRC not in repr(sim.received[0])


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_binds"):
        SimConfig(max_binds=0).validate()
    for bad in (
        {"reject_ratio": 1.5},
        {"id_format": "base64"},
        {"drop_every": 0},
        {"max_tps": 0},
        {"window": 0},
        {"receipt_window": 0},
        {"latency": -1},
    ):
        with pytest.raises(ValueError):
            CarrierSimulator(SimConfig(**bad))


async def test_run_simulators_until_cancelled(connect: Connect) -> None:
    started: asyncio.Future[list[CarrierSimulator]] = asyncio.get_running_loop().create_future()
    configs = [SimConfig(port=0, name=f"s{i}") for i in range(2)]
    task = asyncio.create_task(sim_module.run_simulators(configs, started.set_result))
    sims = await asyncio.wait_for(started, 5)
    ports = [s.port for s in sims]
    assert len(set(ports)) == 2
    for sim in sims:
        _, resp = await connect(sim.port)
        assert resp.system_id == sim.config.name  # type: ignore[attr-defined]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    with pytest.raises(OSError):
        await asyncio.get_running_loop().create_connection(asyncio.Protocol, HOST, ports[0])


async def test_cli_runs_until_sigterm(connect: Connect) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "router",  # = sms-router; router.sim.smsc may be compiled (no -m for it)
        "sim",
        "--port",
        "0",
        "--count",
        "2",
        "--dlr-delay",
        "0.05",
        "--id-format",
        "decimal",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        lines = [(await asyncio.wait_for(proc.stdout.readline(), 10)).decode() for _ in range(2)]
        ports = [int(re.search(r":(\d+)$", line.strip())[1]) for line in lines]  # type: ignore[index]
        assert "sim-1" in lines[0] and "sim-2" in lines[1]
        esme, _ = await connect(ports[1])
        resp = await esme.request(submit())
        assert resp.message_id.isdigit()  # type: ignore[attr-defined]
        await esme.next_receipt()
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 10)
        assert rc == 0
        rest = (await proc.stdout.read()).decode()
        assert SRC not in rest and DST not in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
