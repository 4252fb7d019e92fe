"""Reassembly of messages a customer split itself (issue #3), over real TCP,
a real PostgreSQL and the carrier simulator; plus the sans-IO buffer.

Each part is answered at once with its own id; the parts of one message are
routed once, go to ONE carrier, make ONE traffic-log row (parts = N) and
bring back one receipt per part id. Parts whose siblings do not come in
time go on their own; a late part too. Invalid concatenation fields get a
clear command_status and the bind stays usable.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import pytest
import smpplib.consts
import smpplib.gsm
from prometheus_client import REGISTRY

from router.config import RouteEntry, RoutesConfig, SmppIngressConfig
from router.ingress.concat import (
    SAR,
    ConcatBuffer,
    HeldPart,
    PartRef,
    combine,
    locate,
    sar_fields,
)
from router.model import Message, MessageClass, Origin
from router.model import Status as MsgStatus
from router.sim import SimConfig
from router.smpp.constants import MessageState, Status, Tag
from router.smpp.errors import SmppError
from router.smpp.pdu import DataSm, Pdu, QuerySm, SubmitSm
from router.text.segment import encode_text, split
from tests.esme import connect, until
from tests.smpplib_client import Smpplib

if TYPE_CHECKING:  # imported by name, pytest would try to collect it
    from tests.esme import TestEsme

DK = "+4512345678"  # routed to sim-eu by the default stack
US = "+14155552671"  # routed to sim-world
LONG = ("Reassemble me, please. " * 20)[:400]  # 400 GSM characters: 3 UDH parts
OTHER = ("Another long text here. " * 20)[:380]


# ------------------------------------------------------------------ helpers


def udh_parts(text: str, ref: int, ref16: bool = False) -> list[bytes]:
    return split(encode_text(text), ref=ref, ref16=ref16)


def sar_tlvs(ref: int, total: int, seq: int) -> dict[int, bytes]:
    return {
        Tag.SAR_MSG_REF_NUM: ref.to_bytes(2, "big"),
        Tag.SAR_TOTAL_SEGMENTS: bytes((total,)),
        Tag.SAR_SEGMENT_SEQNUM: bytes((seq,)),
    }


def chunks(text: str, size: int) -> list[bytes]:
    raw = encode_text(text).payload
    return [raw[i : i + size] for i in range(0, len(raw), size)]


async def send(
    esme: TestEsme,
    payload: bytes,
    dest: str = DK,
    *,
    esm_class: int = 0,
    tlvs: dict[int, bytes] | None = None,
    **fields: Any,
) -> Pdu:
    fields.setdefault("registered_delivery", 1)
    return await esme.request(
        SubmitSm(
            source_addr_ton=5,
            source_addr="Acme",
            dest_addr_ton=1,
            dest_addr_npi=1,
            destination_addr=dest,
            esm_class=esm_class,
            short_message=payload,
            tlvs=dict(tlvs or {}),
            **fields,
        )
    )


async def send_ok(esme: TestEsme, payload: bytes, dest: str = DK, **kw: Any) -> str:
    resp = await send(esme, payload, dest, **kw)
    assert resp.status == Status.ESME_ROK, hex(resp.status)
    mid: str = resp.message_id  # type: ignore[attr-defined]
    assert mid
    return mid


async def traffic_rows(db: Any, ids: list[str], want: int, timeout: float = 5.0) -> list[Any]:
    """traffic_log rows among ``ids`` once there are ``want`` (writer flushes)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await db.fetch(
            "SELECT id, parts, body, carrier FROM traffic_log WHERE id = ANY($1::text[])", ids
        )
        if len(rows) >= want or time.monotonic() > deadline:
            return list(rows)
        await asyncio.sleep(0.05)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def receipt_text(esme: TestEsme, mid: str) -> bytes:
    return esme.receipts[mid].short_message


# ------------------------------------------------------------ UDH, 8-bit


async def test_udh8_three_parts_are_one_message_on_one_carrier(stack_factory: Any, db: Any) -> None:
    # Two carriers of equal weight: parts that travelled as separate messages
    # would be spread over both; a reassembled message goes to one.
    stack = await stack_factory(
        sims={
            "sim-a": SimConfig(port=0, dlr_delay=0.05),
            "sim-b": SimConfig(port=0, dlr_delay=0.05),
        },
        routes=RoutesConfig(
            default=[RouteEntry("sim-a", priority=1), RouteEntry("sim-b", priority=1)]
        ),
    )
    combined_before = sample("smsrouter_concat_messages_total")
    esme, _ = await connect(stack.smpp_port)
    try:
        groups: list[tuple[list[bytes], list[str]]] = []
        for ref, text in ((0x42, LONG), (0x43, OTHER)):
            parts = udh_parts(text, ref)
            assert len(parts) == 3
            ids = [await send_ok(esme, p, esm_class=0x40) for p in parts]
            groups.append((parts, ids))
        all_ids = [i for _, ids in groups for i in ids]
        assert len(set(all_ids)) == 6  # every part its own id

        sims = list(stack.sims.values())
        await until(lambda: sum(s.received_count() for s in sims) == 6, what="6 segments")
        for parts, _ in groups:
            holders = [s for s in sims if any(m.payload == parts[0] for m in s.received)]
            assert len(holders) == 1
            got = sorted(
                (m for m in holders[0].received if m.payload in parts),
                key=lambda m: m.payload[5],
            )
            assert [m.payload for m in got] == parts  # exactly as the customer built them
            assert all(m.esm_class & 0x40 for m in got)

        # One receipt per part id, each one SMS, with the message's final state.
        await until(lambda: set(all_ids) <= set(esme.receipts), what="6 receipts")
        await asyncio.sleep(0.2)
        assert len(esme.delivers) == 6
        for mid in all_ids:
            text = receipt_text(esme, mid)
            assert text.startswith(f"id:{mid} sub:001 dlvrd:001".encode())
            assert b"stat:DELIVRD" in text
            assert esme.receipts[mid].tlv_int(Tag.MESSAGE_STATE) == MessageState.DELIVERED

        # One traffic-log row per message, under the id of part 1.
        rows = await traffic_rows(db, all_ids, 2)
        await asyncio.sleep(0.3)
        rows = await traffic_rows(db, all_ids, 2)
        assert sorted(r["id"] for r in rows) == sorted(ids[0] for _, ids in groups)
        by_id = {r["id"]: r for r in rows}
        for (_, ids), text in zip(groups, (LONG, OTHER), strict=True):
            assert by_id[ids[0]]["parts"] == 3
            assert by_id[ids[0]]["body"] == text
        assert await db.fetchval("SELECT count(*) FROM traffic_log") == 2
        assert sample("smsrouter_concat_messages_total") - combined_before == 2
    finally:
        esme.close()


async def test_udh16_reference(stack_factory: Any, db: Any) -> None:
    stack = await stack_factory()
    eu = stack.sims["sim-eu"]
    esme, _ = await connect(stack.smpp_port)
    try:
        parts = udh_parts(LONG, 0x1234, ref16=True)
        assert len(parts) == 3 and parts[0][:5] == b"\x06\x08\x04\x12\x34"
        ids = [await send_ok(esme, p, esm_class=0x40) for p in parts]
        await until(lambda: eu.received_count() == 3, what="3 segments")
        assert sorted(m.payload for m in eu.received) == sorted(parts)
        await until(lambda: set(ids) <= set(esme.receipts), what="3 receipts")
        rows = await traffic_rows(db, ids, 1)
        assert [(r["id"], r["parts"], r["body"]) for r in rows] == [(ids[0], 3, LONG)]
    finally:
        esme.close()


# --------------------------------------------------------------------- SAR


async def test_sar_parts_reach_the_carrier_as_udh_segments(stack_factory: Any, db: Any) -> None:
    stack = await stack_factory()
    eu = stack.sims["sim-eu"]
    esme, _ = await connect(stack.smpp_port)
    try:
        # ref < 256: 8-bit IE. ref >= 256 with 152-septet parts: 16-bit IE.
        # ref >= 256 with 153-septet parts (sized for the 8-bit UDH): the
        # 16-bit UDH would not fit, so 8-bit with the reference's low octet.
        cases = [
            (7, 153, b"\x05\x00\x03\x07"),
            (300, 152, b"\x06\x08\x04\x01\x2c"),
            (0x0203, 153, b"\x05\x00\x03\x03"),
        ]
        all_ids: list[str] = []
        for ref, size, head in cases:
            before = eu.received_count()
            bodies = chunks(LONG, size)
            total = len(bodies)
            ids = [
                await send_ok(esme, b, tlvs=sar_tlvs(ref, total, i))
                for i, b in enumerate(bodies, 1)
            ]
            all_ids += ids
            await until(lambda b=before, t=total: eu.received_count() == b + t, what="segments")
            got = sorted(eu.received[before:], key=lambda m: m.payload[len(head) + 1])
            for i, m in enumerate(got, 1):
                assert m.esm_class & 0x40
                assert m.payload[: len(head)] == head
                assert m.payload[len(head) : len(head) + 2] == bytes((total, i))
                assert not {Tag.SAR_MSG_REF_NUM, Tag.SAR_SEGMENT_SEQNUM} & set(m.tlvs)
                udh = m.payload[0] + 1
                assert (udh * 8 + 6) // 7 + len(m.payload) - udh <= 160  # one SMS
            assert b"".join(m.payload[len(head) + 2 :] for m in got) == LONG.encode()
            rows = await traffic_rows(db, ids, 1)
            assert [(r["id"], r["parts"], r["body"]) for r in rows] == [(ids[0], total, LONG)]
        await until(lambda: set(all_ids) <= set(esme.receipts), what="a receipt per part")
    finally:
        esme.close()


async def test_sar_in_message_payload_and_data_sm_are_reassembled(
    stack_factory: Any, db: Any
) -> None:
    stack = await stack_factory()
    eu = stack.sims["sim-eu"]
    esme, _ = await connect(stack.smpp_port)
    try:
        bodies = chunks(OTHER, 153)
        ids = [
            await send_ok(esme, b"", tlvs={Tag.MESSAGE_PAYLOAD: b, **sar_tlvs(9, len(bodies), i)})
            for i, b in enumerate(bodies, 1)
        ]
        await until(lambda: eu.received_count() == len(bodies), what="segments")
        assert all(m.payload[:4] == b"\x05\x00\x03\x09" for m in eu.received)
        rows = await traffic_rows(db, ids, 1)
        assert [(r["id"], r["parts"], r["body"]) for r in rows] == [(ids[0], len(bodies), OTHER)]
        await until(lambda: set(ids) <= set(esme.receipts), what="receipts")

        # data_sm carries its text only in message_payload: the same rules.
        before = eu.received_count()
        dids = []
        for i, b in enumerate(chunks(LONG, 153), 1):
            resp = await esme.request(
                DataSm(
                    source_addr_ton=5,
                    source_addr="Acme",
                    dest_addr_ton=1,
                    destination_addr=DK,
                    registered_delivery=1,
                    tlvs={Tag.MESSAGE_PAYLOAD: b, **sar_tlvs(10, 3, i)},
                )
            )
            assert resp.status == Status.ESME_ROK
            dids.append(resp.message_id)  # type: ignore[attr-defined]
        await until(lambda: eu.received_count() == before + 3, what="data_sm segments")
        assert all(m.payload[:4] == b"\x05\x00\x03\x0a" for m in eu.received[before:])
        rows = await traffic_rows(db, dids, 1)
        assert [(r["id"], r["parts"], r["body"]) for r in rows] == [(dids[0], 3, LONG)]
        await until(lambda: set(dids) <= set(esme.receipts), what="data_sm receipts")
    finally:
        esme.close()


# ------------------------------------------------------ order, interleaving


async def test_out_of_order_and_interleaved_groups(stack_factory: Any, db: Any) -> None:
    stack = await stack_factory()
    eu = stack.sims["sim-eu"]
    esme, _ = await connect(stack.smpp_port)
    try:
        a = udh_parts(LONG, 1)
        b = udh_parts(OTHER, 2)
        order = [("a", 2), ("b", 3), ("a", 1), ("b", 1), ("a", 3), ("b", 2)]
        ids: dict[tuple[str, int], str] = {}
        for name, seq in order:
            parts = a if name == "a" else b
            ids[(name, seq)] = await send_ok(esme, parts[seq - 1], esm_class=0x40)
        await until(lambda: eu.received_count() == 6, what="6 segments")
        # Each message went out as one (segments of a group are submitted
        # together, in order), whatever the arrival order.
        payloads = [m.payload for m in eu.received]
        assert sorted(payloads[:3]) == sorted(a) and payloads[:3] == a
        assert payloads[3:] == b
        heads = [ids[("a", 1)], ids[("b", 1)]]
        rows = await traffic_rows(db, list(ids.values()), 2)
        assert sorted((r["id"], r["parts"], r["body"]) for r in rows) == sorted(
            [(heads[0], 3, LONG), (heads[1], 3, OTHER)]
        )
        await until(lambda: set(ids.values()) <= set(esme.receipts), what="6 receipts")
    finally:
        esme.close()


# ------------------------------------------------------------------- timeout


async def test_timeout_releases_parts_alone_and_a_late_part_too(
    stack_factory: Any, db: Any
) -> None:
    stack = await stack_factory(smpp=SmppIngressConfig(reassembly_timeout=1.0))
    eu = stack.sims["sim-eu"]
    alone_before = sample("smsrouter_concat_parts_alone_total", reason="timeout")
    esme, _ = await connect(stack.smpp_port)
    try:
        parts = udh_parts(LONG, 0x77)
        # Both answered (once durable) while they are still held for part 3.
        first = [await send_ok(esme, p, esm_class=0x40) for p in parts[:2]]
        assert stack.router.smpp.concat.held == 2
        await asyncio.sleep(0.3)
        assert eu.received_count() == 0
        await until(lambda: eu.received_count() == 2, what="both parts alone after the timeout")
        assert sorted(m.payload for m in eu.received) == sorted(parts[:2])
        await until(lambda: set(first) <= set(esme.receipts), what="receipts for both")
        for mid in first:
            assert b"sub:001 dlvrd:001" in receipt_text(esme, mid)

        late = await send_ok(esme, parts[2], esm_class=0x40)
        await until(lambda: eu.received_count() == 3, what="the late part goes too")
        assert eu.received[2].payload == parts[2]
        await until(lambda: late in esme.receipts, what="receipt for the late part")

        rows = await traffic_rows(db, [*first, late], 3)
        assert sorted((r["id"], r["parts"]) for r in rows) == sorted((m, 1) for m in [*first, late])
        assert sample("smsrouter_concat_parts_alone_total", reason="timeout") - alone_before == 3
    finally:
        esme.close()


# ------------------------------------------------------------------- query_sm


async def test_query_sm_by_a_part_id(stack_factory: Any) -> None:
    stack = await stack_factory(
        sims={
            "sim-eu": SimConfig(port=0, dlr_delay=0.05),
            "sim-world": SimConfig(port=0, dlr_delay=30),
        }
    )
    esme, _ = await connect(stack.smpp_port)
    demo, resp = await connect(stack.smpp_port, system_id="demo", password="demo-pass")
    try:
        assert resp.status == Status.ESME_ROK
        parts = udh_parts(LONG, 5)
        ids = [await send_ok(esme, p, esm_class=0x40) for p in parts[:2]]

        async def query(who: TestEsme, mid: str) -> Pdu:
            return await who.request(QuerySm(message_id=mid, source_addr_ton=5, source_addr="Acme"))

        # Held, waiting for part 3: on its way.
        q = await query(esme, ids[1])
        assert q.status == Status.ESME_ROK
        assert q.message_id == ids[1]  # type: ignore[attr-defined]
        assert q.message_state == MessageState.ENROUTE  # type: ignore[attr-defined]
        assert q.final_date == ""  # type: ignore[attr-defined]
        assert (await query(demo, ids[1])).status == Status.ESME_RQUERYFAIL

        ids.append(await send_ok(esme, parts[2], esm_class=0x40))
        await until(lambda: set(ids) <= set(esme.receipts), what="receipts")
        for mid in ids[1:]:
            q = await query(esme, mid)
            assert q.status == Status.ESME_ROK
            assert q.message_id == mid  # type: ignore[attr-defined]
            assert q.message_state == MessageState.DELIVERED  # type: ignore[attr-defined]
            assert q.final_date  # type: ignore[attr-defined]

        # At the carrier, not final (sim-world receipts take 30 s): by part 3's id.
        slow = [await send_ok(esme, p, US, esm_class=0x40) for p in udh_parts(OTHER, 6)]
        engine = stack.router.engine
        await until(
            lambda: (d := engine.lookup(slow[2])) is not None and d.status is MsgStatus.SUBMITTED,
            what="submitted",
        )
        q = await query(esme, slow[2])
        assert q.status == Status.ESME_ROK
        assert q.message_id == slow[2]  # type: ignore[attr-defined]
        assert q.message_state == MessageState.ENROUTE  # type: ignore[attr-defined]
    finally:
        esme.close()
        demo.close()


# ----------------------------------------------------------------- bad PDUs


async def test_bad_concatenation_fields_are_refused_and_the_bind_stays_usable(
    stack_factory: Any,
) -> None:
    stack = await stack_factory()
    esme, _ = await connect(stack.smpp_port)
    try:
        ok = b"hello"
        incomplete = sar_tlvs(1, 3, 1)
        del incomplete[Tag.SAR_SEGMENT_SEQNUM]
        cases: list[tuple[str, dict[str, Any], Status]] = [
            ("SAR without seqnum", {"tlvs": incomplete}, Status.ESME_RMISSINGOPTPARAM),
            ("SAR seqnum 0", {"tlvs": sar_tlvs(1, 3, 0)}, Status.ESME_RINVOPTPARAMVAL),
            ("SAR seqnum > total", {"tlvs": sar_tlvs(1, 3, 4)}, Status.ESME_RINVOPTPARAMVAL),
            ("SAR total 0", {"tlvs": sar_tlvs(1, 0, 1)}, Status.ESME_RINVOPTPARAMVAL),
            (
                "SAR ref of 1 octet",
                {"tlvs": {**sar_tlvs(1, 3, 1), Tag.SAR_MSG_REF_NUM: b"\x01"}},
                Status.ESME_RINVOPTPARAMVAL,
            ),
            (
                "UDH seqnum 0",
                {"payload": b"\x05\x00\x03\x01\x03\x00hi", "esm_class": 0x40},
                Status.ESME_RINVESMCLASS,
            ),
            (
                "UDH seqnum > total",
                {"payload": b"\x05\x00\x03\x01\x03\x04hi", "esm_class": 0x40},
                Status.ESME_RINVESMCLASS,
            ),
            (
                "SAR part of 160 septets (no room for the UDH)",
                {"payload": b"x" * 160, "tlvs": sar_tlvs(1, 3, 1)},
                Status.ESME_RINVMSGLEN,
            ),
            (
                "SAR part in a 300-octet message_payload",
                {"payload": b"", "tlvs": {Tag.MESSAGE_PAYLOAD: b"y" * 300, **sar_tlvs(1, 2, 1)}},
                Status.ESME_RINVMSGLEN,
            ),
        ]
        for what, kw, want in cases:
            payload = kw.pop("payload", ok)
            resp = await send(esme, payload, **kw)
            assert resp.status == want, f"{what}: {hex(resp.status)}"
        # The same bind goes on: a whole message and a 2-part one.
        whole = await send_ok(esme, b"still here")
        parts = udh_parts(("Two parts. " * 20)[:200], 3)
        assert len(parts) == 2
        ids = [await send_ok(esme, p, esm_class=0x40) for p in parts]
        await until(lambda: {whole, *ids} <= set(esme.receipts), what="receipts")
        assert stack.sims["sim-eu"].received_count() == 3
    finally:
        esme.close()


# ------------------------------------------------------------ full, stopping


async def test_full_buffer_passes_parts_through(stack_factory: Any, db: Any) -> None:
    stack = await stack_factory(smpp=SmppIngressConfig(reassembly_max_parts=2))
    eu = stack.sims["sim-eu"]
    full_before = sample("smsrouter_concat_parts_alone_total", reason="buffer_full")
    esme, _ = await connect(stack.smpp_port)
    try:
        a = udh_parts(LONG, 1)
        b = udh_parts(OTHER, 2)
        held = [await send_ok(esme, p, esm_class=0x40) for p in a[:2]]  # the buffer is full
        passed = await send_ok(esme, b[0], esm_class=0x40)
        await until(lambda: passed in esme.receipts, what="the part beyond the bound went at once")
        assert [m.payload for m in eu.received] == [b[0]]
        assert not set(held) & set(esme.receipts)
        assert sample("smsrouter_concat_parts_alone_total", reason="buffer_full") - full_before == 1
        # A part that completes its group is taken even when full: it frees room.
        last = await send_ok(esme, a[2], esm_class=0x40)
        await until(lambda: {*held, last} <= set(esme.receipts), what="message a completes")
        assert [m.payload for m in eu.received[1:]] == a
        rows = await traffic_rows(db, [*held, last, passed], 2)
        assert sorted((r["id"], r["parts"]) for r in rows) == sorted([(held[0], 3), (passed, 1)])
    finally:
        esme.close()


async def test_stop_releases_held_parts(stack_factory: Any) -> None:
    stack = await stack_factory()
    eu = stack.sims["sim-eu"]
    engine = stack.router.engine
    esme, _ = await connect(stack.smpp_port)
    parts = udh_parts(LONG, 9)
    ids = [await send_ok(esme, p, esm_class=0x40) for p in parts[:2]]
    assert stack.router.smpp.concat.held == 2
    await stack.router.smpp.stop(timeout=1)  # the front door only: carriers still run
    assert stack.router.smpp.concat.held == 0
    await until(lambda: eu.received_count() == 2, what="held parts went to the carrier")
    await until(
        lambda: all(engine.lookup(m).status is MsgStatus.DELIVERED for m in ids),
        what="delivered",
    )


# ------------------------------------------------------------ smpplib interop


async def test_smpplib_make_parts_and_sar_end_to_end(stack_factory: Any, db: Any) -> None:
    stack = await stack_factory()
    eu = stack.sims["sim-eu"]
    client = Smpplib(stack.smpp_port)
    await asyncio.to_thread(client.bind, "transceiver")
    try:
        # smpplib's own UDH split (make_parts, 8-bit reference).
        assert await asyncio.to_thread(client.submit, DK, LONG) == 3
        await until(lambda: len(client.sent) == 3, what="3 submit_sm_resp")
        udh_ids = [r.message_id.decode() for r in client.sent]
        assert [r.status for r in client.sent] == [0, 0, 0] and len(set(udh_ids)) == 3

        # smpplib without UDHI: plain parts with the SAR TLVs.
        parts, coding, esm = smpplib.gsm.make_parts(OTHER, use_udhi=False)
        assert len(parts) == 3 and esm == 0

        def send_sar() -> None:
            for i, part in enumerate(parts, 1):
                client.client.send_message(
                    source_addr_ton=smpplib.consts.SMPP_TON_ALNUM,
                    source_addr="Acme",
                    dest_addr_ton=smpplib.consts.SMPP_TON_INTL,
                    dest_addr_npi=smpplib.consts.SMPP_NPI_ISDN,
                    destination_addr=DK,
                    short_message=part,
                    data_coding=coding,
                    esm_class=esm,
                    registered_delivery=True,
                    sar_msg_ref_num=0x77,
                    sar_total_segments=len(parts),
                    sar_segment_seqnum=i,
                )

        await asyncio.to_thread(send_sar)
        await until(lambda: len(client.sent) == 6, what="6 submit_sm_resp")
        sar_ids = [r.message_id.decode() for r in client.sent[3:]]
        assert all(r.status == 0 for r in client.sent)

        await until(lambda: eu.received_count() == 6, what="6 segments")
        assert all(m.esm_class & 0x40 for m in eu.received)
        sar_segs = [m for m in eu.received if m.payload[6:] in parts]
        assert [m.payload[:6] for m in sar_segs] == [
            bytes((5, 0, 3, 0x77, 3, i)) for i in (1, 2, 3)
        ]
        rows = await traffic_rows(db, udh_ids + sar_ids, 2)
        assert sorted((r["id"], r["parts"], r["body"]) for r in rows) == sorted(
            [(udh_ids[0], 3, LONG), (sar_ids[0], 3, OTHER)]
        )
        await until(lambda: len(client.delivers) >= 6, what="a receipt per part")
        await asyncio.sleep(0.2)
        assert sorted(client.receipted_ids()) == sorted(udh_ids + sar_ids)
        assert all(b"stat:DELIVRD" in d.short_message for d in client.delivers)
    finally:
        await asyncio.to_thread(client.close)


# ------------------------------------------------------- the buffer, sans-IO


def _part(
    mid: str, seq: int, payload: bytes, *, total: int = 3, ref: int = 1, dc: int = 0, **kw: Any
) -> HeldPart:
    msg = Message(
        id=mid,
        account_id=1,
        account="acme",
        origin=Origin.SMPP,
        msg_class=kw.pop("msg_class", MessageClass.STANDARD),
        source="Acme",
        source_ton=5,
        source_npi=0,
        destination="4512345678",
        country="DK",
        data_coding=dc,
        esm_class=0,
        segments=(payload,),
        text=None,
        registered_delivery=kw.pop("registered_delivery", 1),
        accepted_at=kw.pop("accepted_at", 100.0),
        expires_at=kw.pop("expires_at", 1000.0),
        tlvs=tuple(sar_tlvs(ref, total, seq).items()),
    )
    return HeldPart(msg, PartRef(SAR, ref, total, seq, 0, dc == 0))


def test_buffer_completes_in_segment_order_with_part_1s_fields() -> None:
    buf = ConcatBuffer(timeout=30, max_parts=10)
    assert buf.add(_part("c", 3, b"!!", registered_delivery=0), 0.0).combined is None
    assert buf.add(_part("a", 1, b"hello ", accepted_at=90.0), 0.0).combined is None
    out = buf.add(_part("b", 2, b"world", expires_at=500.0), 0.0)
    assert out.combined is not None and not out.alone and buf.held == 0
    msg = combine(out.combined)
    assert (msg.id, msg.part_ids, msg.parts) == ("a", ("a", "b", "c"), 3)
    assert msg.text == "hello world!!"
    assert msg.registered_delivery == 1  # a part asks for a final receipt
    assert msg.part_receipts == (1, 1, 0)  # each part's own wish, in part order
    assert (msg.accepted_at, msg.expires_at) == (90.0, 500.0)  # earliest of each
    assert msg.esm_class & 0x40 and msg.tlvs == ()
    assert [s[:6] for s in msg.segments] == [bytes((5, 0, 3, 1, 3, i)) for i in (1, 2, 3)]


@pytest.mark.parametrize(
    ("asks", "carrier"),
    [((1, 0, 0), 1), ((0, 0, 1), 1), ((0, 2, 0), 2), ((2, 1, 0), 1), ((0, 0, 0), 0)],
)
def test_the_carrier_is_asked_for_a_receipt_if_any_part_wants_one(
    asks: tuple[int, int, int], carrier: int
) -> None:
    """Kannel asks on part 1 only, others on the last part: either way the
    carrier's receipt is requested, and each part id keeps its own wish."""
    parts = [_part(f"p{i}", i + 1, b"x", registered_delivery=a | 0x10) for i, a in enumerate(asks)]
    msg = combine(parts)
    assert msg.registered_delivery == carrier | 0x10  # other bits: part 1's
    assert msg.part_receipts == tuple(a | 0x10 for a in asks)


def test_buffer_duplicate_reuse_mismatch_and_full() -> None:
    buf = ConcatBuffer(timeout=30, max_parts=3)
    assert buf.add(_part("a1", 1, b"one"), 0.0).alone == []
    # The same part again (a resend): alone; the group goes on.
    out = buf.add(_part("a1b", 1, b"one"), 0.0)
    assert [(hp.msg.id, why) for hp, why in out.alone] == [("a1b", "duplicate")]
    # Another data_coding in the group: alone.
    out = buf.add(_part("a2x", 2, b"\x00t", dc=8), 0.0)
    assert [(hp.msg.id, why) for hp, why in out.alone] == [("a2x", "mismatch")]
    assert buf.add(_part("a2", 2, b"two"), 0.0).alone == []
    # Seq 1 again with other octets: the reference was reused for a new
    # message; the old group's parts go alone, a new group starts.
    out = buf.add(_part("n1", 1, b"new"), 1.0)
    assert [(hp.msg.id, why) for hp, why in out.alone] == [("a1", "reused"), ("a2", "reused")]
    assert buf.held == 1 and buf.find("n1") is not None and buf.find("a1") is None
    # Bounded: beyond max_parts a part goes alone at once.
    buf.add(_part("x1", 1, b"x", ref=2), 2.0)
    buf.add(_part("y1", 1, b"y", ref=3), 3.0)
    out = buf.add(_part("z1", 1, b"z", ref=4), 3.0)
    assert [(hp.msg.id, why) for hp, why in out.alone] == [("z1", "buffer_full")]
    # Expiry: oldest first, by first part + timeout.
    assert buf.next_deadline() == 31.0
    assert [g.in_order()[0].msg.id for g in buf.expire(32.5)] == ["n1", "x1"]
    assert [g.in_order()[0].msg.id for g in buf.drain()] == ["y1"]
    assert buf.held == 0 and buf.next_deadline() is None


def test_sar_udh_is_16_bit_only_when_every_segment_fits() -> None:
    fits = [_part(f"p{i}", i, b"x" * 152, ref=300, total=2) for i in (1, 2)]
    assert [s[:7] for s in combine(fits).segments] == [
        bytes((6, 8, 4, 1, 44, 2, i)) for i in (1, 2)
    ]
    tight = [_part(f"p{i}", i, b"x" * (153 if i == 1 else 10), ref=300, total=2) for i in (1, 2)]
    assert [s[:6] for s in combine(tight).segments] == [bytes((5, 0, 3, 44, 2, i)) for i in (1, 2)]


def test_locate_and_sar_fields() -> None:
    assert sar_fields({}) is None
    assert sar_fields(sar_tlvs(513, 4, 2)) == (513, 4, 2)
    assert locate(b"x" * 10, None, 0, sar_tlvs(1, 1, 1), True) is None  # "1 of 1"
    part = locate(b"x" * 153, None, 0, sar_tlvs(1, 2, 2), True)
    assert part is not None and (part.scheme, part.ref, part.total, part.seq) == (SAR, 1, 2, 2)
    with pytest.raises(SmppError) as exc:
        locate(b"x" * 154, None, 0, sar_tlvs(1, 2, 2), True)
    assert exc.value.status == Status.ESME_RINVMSGLEN
    # Octet codings: 134 octets plus the 6-octet UDH make 140.
    assert locate(b"x" * 134, None, 0, sar_tlvs(1, 2, 1), False) is not None
    with pytest.raises(SmppError):
        locate(b"x" * 135, None, 0, sar_tlvs(1, 2, 1), False)
