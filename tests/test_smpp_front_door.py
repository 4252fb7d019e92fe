"""The SMPP front door over real TCP, with SMPP 3.4 semantics.

* interop with smpplib, an independent client: a transmitter + receiver pair
  and a transceiver; GSM text, UCS2 with an emoji, a 3-part UDH message;
* every command_status the front door produces, each provoked by a test that
  sends the offending PDU (raw bytes where our own ESME would refuse to send
  it), and the bind still usable afterwards where SMPP says it should be;
* window overflow, query_sm, registered_delivery, message_payload, the
  secret message class, enquire_link/unbind, receipts kept while no receiver
  is bound.

A UDH-concatenated message submitted as N submit_sm gets N ids and N
receipts; the router reassembles it into one message (tests/test_concat.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import smpplib.client
import smpplib.consts
import smpplib.exceptions
import smpplib.gsm
from prometheus_client import REGISTRY

from router.accounts import create_account
from router.config import SmppIngressConfig
from router.ingress.smpp import throttle_hold
from router.model import Status as MsgStatus
from router.observe import metrics
from router.sim import SimConfig
from router.smpp.constants import CommandId, MessageState, Status, Tag
from router.smpp.pdu import (
    BindReceiver,
    BindTransceiver,
    BindTransmitter,
    DataSm,
    DeliverSmResp,
    EnquireLink,
    EnquireLinkResp,
    Pdu,
    QuerySm,
    SubmitSm,
    Unbind,
    decode,
)
from tests.esme import connect, until
from tests.smpplib_client import Smpplib

DK = "+4512345678"  # routed to sim-eu
US = "+14155552671"  # routed to the default, sim-world
MESSAGE_CLASS_TAG = 0x1400


# ------------------------------------------------------------------ helpers


def sm(dest: str = DK, text: str = "hello", **fields: Any) -> SubmitSm:
    """A valid submit_sm unless ``fields`` break it."""
    fields.setdefault("source_addr_ton", 5)
    fields.setdefault("source_addr", "Acme")
    fields.setdefault("dest_addr_ton", 1)
    fields.setdefault("dest_addr_npi", 1)
    fields.setdefault("registered_delivery", 1)
    fields.setdefault("short_message", text.encode())
    return SubmitSm(destination_addr=dest, **fields)


def header(length: int, command_id: int, sequence: int, status: int = 0) -> bytes:
    return b"".join(v.to_bytes(4, "big") for v in (length, command_id, status, sequence))


class Raw:
    """PDUs as bytes on a socket: for what our own ESME session refuses to send
    (submit before bind, a second bind, unknown ids, broken lengths)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.seq = 0
        self.delivers: list[Pdu] = []

    @classmethod
    async def open(cls, port: int) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def send(self, pdu: Pdu) -> int:
        if pdu.sequence == 0:
            self.seq += 1
            pdu.sequence = self.seq
        self.writer.write(pdu.encode())
        return pdu.sequence

    def send_bytes(self, data: bytes) -> None:
        self.writer.write(data)

    async def read(self, timeout: float = 5.0) -> Pdu | None:
        """The next PDU, or None when the router closed the connection."""
        try:
            head = await asyncio.wait_for(self.reader.readexactly(4), timeout)
            rest = await asyncio.wait_for(
                self.reader.readexactly(int.from_bytes(head, "big") - 4), timeout
            )
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        return decode(head + rest)

    async def response(self, seq: int, timeout: float = 5.0) -> Pdu:
        """The response with sequence ``seq``; receipts met on the way are acked."""
        while True:
            pdu = await self.read(timeout)
            assert pdu is not None, "connection closed while waiting for a response"
            if pdu.command_id == CommandId.DELIVER_SM:
                self.delivers.append(pdu)
                self.send(DeliverSmResp(sequence=pdu.sequence))
                continue
            if pdu.is_response and pdu.sequence == seq:
                return pdu

    async def call(self, pdu: Pdu, timeout: float = 5.0) -> Pdu:
        return await self.response(self.send(pdu), timeout)

    async def wait_receipt(self, message_id: str, timeout: float = 5.0) -> Pdu:
        """Ping with enquire_link (collecting receipts) until ``message_id``'s arrives."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for d in self.delivers:
                if d.tlv_str(Tag.RECEIPTED_MESSAGE_ID) == message_id:  # type: ignore[attr-defined]
                    return d
            assert (await self.call(EnquireLink())).status == Status.ESME_ROK
            await asyncio.sleep(0.05)
        raise AssertionError(f"no receipt for {message_id} within {timeout} s")

    async def closed_by_peer(self, timeout: float = 3.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(self.reader.read(4096), deadline - time.monotonic())
            except TimeoutError:
                return False
            except ConnectionError:
                return True
            if not data:
                return True
        return False

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


async def bound_raw(
    port: int, bind_cls: type = BindTransceiver, system_id: str = "acme", password: str = "acme-pw1"
) -> Raw:
    raw = await Raw.open(port)
    resp = await raw.call(bind_cls(system_id=system_id, password=password))
    assert resp.status == Status.ESME_ROK, hex(resp.status)
    return raw


def status_of(resp: Pdu) -> str:
    try:
        return Status(resp.status).name
    except ValueError:
        return hex(resp.status)


# ------------------------------------------------------------- smpplib interop

GSM_TEXT = "Hello from Acme, your code is 1234"
UCS2_TEXT = "Grüße aus Kopenhagen \U0001f600"
LONG_TEXT = ("Part text " * 40)[:400]  # 400 GSM characters: 3 parts of <= 153


async def _interop(stack: Any, tx: Smpplib, rx: Smpplib) -> None:
    eu = stack.sims["sim-eu"]
    n = 0
    n += await asyncio.to_thread(tx.submit, DK, GSM_TEXT)
    n += await asyncio.to_thread(tx.submit, DK, UCS2_TEXT)
    parts = await asyncio.to_thread(tx.submit, DK, LONG_TEXT)
    assert parts == 3
    n += parts
    await until(lambda: len(tx.sent) == n, what="submit_sm_resp for every submit")
    assert [r.status for r in tx.sent] == [0] * n
    ids = [r.message_id.decode() for r in tx.sent]
    assert len(set(ids)) == n  # every part has its own id (and later its own receipt)

    await until(lambda: eu.received_count() == n, what="carrier got every part")
    got = {m.payload: m for m in eu.received}
    gsm = next(m for m in eu.received if m.data_coding == 0 and m.esm_class == 0)
    assert gsm.payload == GSM_TEXT.encode()
    ucs2 = next(m for m in eu.received if m.data_coding == 8)
    assert ucs2.payload.decode("utf-16-be") == UCS2_TEXT
    udh = sorted((m for m in got.values() if m.esm_class & 0x40), key=lambda m: m.payload[5])
    assert len(udh) == 3
    assert [m.payload[:3] for m in udh] == [b"\x05\x00\x03"] * 3
    assert len({m.payload[3] for m in udh}) == 1  # one concatenation reference
    assert [(m.payload[4], m.payload[5]) for m in udh] == [(3, 1), (3, 2), (3, 3)]
    assert b"".join(m.payload[6:] for m in udh) == LONG_TEXT.encode()

    # One receipt per part, each with the id of its own submit_sm_resp.
    await until(lambda: len(rx.delivers) >= n, what="a receipt for every part")
    await asyncio.sleep(0.2)
    assert len(rx.delivers) == n
    assert sorted(rx.receipted_ids()) == sorted(ids)
    for d in rx.delivers:
        assert d.esm_class & 0x04
        assert b"stat:DELIVRD" in d.short_message


async def test_smpplib_transmitter_and_receiver_pair(stack_factory: Any) -> None:
    stack = await stack_factory()
    tx = Smpplib(stack.smpp_port)
    rx = Smpplib(stack.smpp_port)
    try:
        await asyncio.to_thread(rx.bind, "receiver")
        await asyncio.to_thread(tx.bind, "transmitter")
        await _interop(stack, tx, rx)
        assert tx.delivers == []  # receipts never go to a transmitter bind
    finally:
        await asyncio.to_thread(tx.close)
        await asyncio.to_thread(rx.close)


async def test_smpplib_transceiver(stack_factory: Any) -> None:
    stack = await stack_factory()
    trx = Smpplib(stack.smpp_port)
    try:
        await asyncio.to_thread(trx.bind, "transceiver")
        await _interop(stack, trx, trx)
    finally:
        await asyncio.to_thread(trx.close)


async def test_smpplib_sees_bind_refusal_and_rebinds_on_same_connection(stack_factory: Any) -> None:
    stack = await stack_factory()
    c = Smpplib(stack.smpp_port)
    try:
        await asyncio.to_thread(c.client.connect)
        try:
            await asyncio.to_thread(c.client.bind_transceiver, system_id="acme", password="wrong")
        except smpplib.exceptions.PDUError as exc:
            assert exc.args[1] == Status.ESME_RINVPASWD
        else:
            raise AssertionError("bind with a wrong password succeeded")
        # SMPP 3.4: the connection stays open and unbound; the ESME may retry.
        await asyncio.to_thread(c.client.bind_transceiver, system_id="acme", password="acme-pw1")
    finally:
        await asyncio.to_thread(c.client.disconnect)


# ------------------------------------------------------------- bind statuses


async def test_wrong_password_rinvpaswd_then_bind_on_same_connection(stack_factory: Any) -> None:
    stack = await stack_factory()
    raw = await Raw.open(stack.smpp_port)
    try:
        resp = await raw.call(BindTransceiver(system_id="acme", password="nope-pw1"))
        assert resp.command_id == CommandId.BIND_TRANSCEIVER_RESP
        assert status_of(resp) == "ESME_RINVPASWD"
        resp = await raw.call(BindTransceiver(system_id="acme", password="acme-pw1"))
        assert status_of(resp) == "ESME_ROK"
        assert status_of(await raw.call(sm())) == "ESME_ROK"
    finally:
        await raw.close()


async def test_unknown_system_id_rinvsysid_then_bind_on_same_connection(stack_factory: Any) -> None:
    stack = await stack_factory()
    raw = await Raw.open(stack.smpp_port)
    try:
        resp = await raw.call(BindTransmitter(system_id="nobody", password="acme-pw1"))
        assert resp.command_id == CommandId.BIND_TRANSMITTER_RESP
        assert status_of(resp) == "ESME_RINVSYSID"
        resp = await raw.call(BindTransmitter(system_id="acme", password="acme-pw1"))
        assert status_of(resp) == "ESME_ROK"
        assert status_of(await raw.call(sm())) == "ESME_ROK"
    finally:
        await raw.close()


async def test_second_bind_on_bound_session_ralybnd_and_bind_stays(stack_factory: Any) -> None:
    stack = await stack_factory()
    raw = await bound_raw(stack.smpp_port)
    try:
        resp = await raw.call(BindTransceiver(system_id="acme", password="acme-pw1"))
        assert status_of(resp) == "ESME_RALYBND"
        resp = await raw.call(BindReceiver(system_id="demo", password="demo-pass"))
        assert status_of(resp) == "ESME_RALYBND"
        ok = await raw.call(sm())
        assert status_of(ok) == "ESME_ROK"
        assert ok.message_id  # type: ignore[attr-defined]
        # Still bound as acme: the receipt comes here.
        await raw.wait_receipt(ok.message_id)  # type: ignore[attr-defined]
    finally:
        await raw.close()


async def test_max_binds_exceeded_rbindfail(stack_factory: Any, db: Any) -> None:
    await create_account(db, "solo", system_id="solo", password="solo-pw1", max_binds=1)
    off = await create_account(db, "off", system_id="off", password="off-pw12")
    await db.execute("UPDATE accounts SET enabled = false WHERE id = $1", off)
    stack = await stack_factory()  # accounts are loaded at start
    disabled = await Raw.open(stack.smpp_port)
    resp = await disabled.call(BindTransceiver(system_id="off", password="off-pw12"))
    assert status_of(resp) == "ESME_RBINDFAIL"
    await disabled.close()
    first = await bound_raw(stack.smpp_port, system_id="solo", password="solo-pw1")
    second = await Raw.open(stack.smpp_port)
    try:
        resp = await second.call(BindTransceiver(system_id="solo", password="solo-pw1"))
        assert status_of(resp) == "ESME_RBINDFAIL"
        # The first bind is untouched; another account is not limited by solo's count.
        assert status_of(await first.call(sm())) == "ESME_ROK"
        other = await bound_raw(stack.smpp_port)
        await other.close()
        # Once the first bind goes, the slot is free again (same connection retries).
        assert status_of(await first.call(Unbind())) == "ESME_ROK"
        assert await first.closed_by_peer()
        await until(
            lambda: (
                stack.router.smpp.bind_count(stack.router.accounts.by_system_id["solo"].id) == 0
            ),
            what="bind released",
        )
        resp = await second.call(BindTransceiver(system_id="solo", password="solo-pw1"))
        assert status_of(resp) == "ESME_ROK"
    finally:
        await first.close()
        await second.close()


# --------------------------------------------------------- session statuses


async def test_submit_before_bind_rinvbndsts_then_bind_works(stack_factory: Any) -> None:
    stack = await stack_factory()
    raw = await Raw.open(stack.smpp_port)
    try:
        resp = await raw.call(sm())
        assert resp.command_id == CommandId.SUBMIT_SM_RESP
        assert status_of(resp) == "ESME_RINVBNDSTS"
        resp = await raw.call(QuerySm(message_id="x"))
        assert status_of(resp) == "ESME_RINVBNDSTS"
        assert (
            status_of(await raw.call(BindTransmitter(system_id="acme", password="acme-pw1")))
            == "ESME_ROK"
        )
        assert status_of(await raw.call(sm())) == "ESME_ROK"
    finally:
        await raw.close()


async def test_submit_on_receiver_bind_rinvbndsts_and_bind_stays(stack_factory: Any) -> None:
    stack = await stack_factory()
    rx, resp = await connect(stack.smpp_port, bind_cls=BindReceiver)
    tx, _ = await connect(stack.smpp_port, bind_cls=BindTransmitter)
    try:
        assert resp.status == Status.ESME_ROK
        bad = await rx.submit(DK, "from a receiver")
        assert bad.command_id == CommandId.SUBMIT_SM_RESP
        assert status_of(bad) == "ESME_RINVBNDSTS"
        # The receiver bind stays up and still gets receipts.
        assert (await rx.request(EnquireLink())).status == Status.ESME_ROK
        ok = await tx.submit(DK, "from the transmitter")
        assert ok.status == Status.ESME_ROK
        await until(
            lambda: ok.message_id in rx.receipts,  # type: ignore[attr-defined]
            what="receipt on the receiver",
        )
    finally:
        rx.close()
        tx.close()


async def test_unknown_command_id_generic_nack_rinvcmdid_then_submit_works(
    stack_factory: Any,
) -> None:
    stack = await stack_factory()
    raw = await bound_raw(stack.smpp_port)
    try:
        raw.send_bytes(header(16, 0x00000099, 77))
        nack = await raw.response(77)
        assert nack.command_id == CommandId.GENERIC_NACK
        assert status_of(nack) == "ESME_RINVCMDID"
        # A known but unsupported operation (replace_sm) is refused the same way.
        raw.send_bytes(header(16, CommandId.REPLACE_SM, 78))
        nack = await raw.response(78)
        assert status_of(nack) == "ESME_RINVCMDID"
        assert status_of(await raw.call(sm())) == "ESME_ROK"
    finally:
        await raw.close()


BAD_LENGTHS = (8, 15, 4097, 0x7FFFFFFF)  # with max_pdu 4096


async def test_bad_command_length_closes_only_that_connection(stack_factory: Any) -> None:
    stack = await stack_factory(smpp=SmppIngressConfig(max_pdu=4096))
    port = stack.smpp_port
    bystander = await bound_raw(port)
    try:
        for length in BAD_LENGTHS:
            victim = await bound_raw(port)
            try:
                victim.send_bytes(header(length, CommandId.SUBMIT_SM, 5))
                assert await victim.closed_by_peer(), f"length {length}: framing lost, must close"
            finally:
                await victim.close()
            assert status_of(await bystander.call(sm())) == "ESME_ROK"
        acme = stack.router.accounts.by_system_id["acme"].id
        await until(lambda: stack.router.smpp.bind_count(acme) == 1, what="victims unbound")
        fresh = await bound_raw(port)
        assert status_of(await fresh.call(sm())) == "ESME_ROK"
        await fresh.close()
    finally:
        await bystander.close()


async def test_bad_command_length_gets_generic_nack_rinvcmdlen(stack_factory: Any) -> None:
    stack = await stack_factory(smpp=SmppIngressConfig(max_pdu=4096))
    for length in BAD_LENGTHS:
        victim = await bound_raw(stack.smpp_port)
        try:
            victim.send_bytes(header(length, CommandId.SUBMIT_SM, 5))
            nack = await victim.read()
            assert nack is not None, f"no generic_nack for command_length {length}"
            assert nack.command_id == CommandId.GENERIC_NACK
            assert status_of(nack) == "ESME_RINVCMDLEN"
            assert await victim.closed_by_peer()
        finally:
            await victim.close()


async def test_malformed_body_is_answered_and_bind_stays(stack_factory: Any) -> None:
    stack = await stack_factory()
    raw = await bound_raw(stack.smpp_port)
    try:
        # Framing intact, body cut short: the PDU is answered, the stream goes on.
        raw.send_bytes(header(19, CommandId.SUBMIT_SM, 40) + b"\x00\x05\x00")
        resp = await raw.response(40)
        assert resp.command_id == CommandId.SUBMIT_SM_RESP
        assert status_of(resp) == "ESME_RINVCMDLEN"
        # A TLV header that runs past the end of the PDU.
        body = sm().encode()[16:] + b"\x04\x24\x00"
        raw.send_bytes(header(16 + len(body), CommandId.SUBMIT_SM, 41) + body)
        assert status_of(await raw.response(41)) == "ESME_RINVOPTPARSTREAM"
        # deliver_sm is an SMSC-to-ESME operation.
        body = sm().encode()[16:]
        raw.send_bytes(header(16 + len(body), CommandId.DELIVER_SM, 42) + body)
        resp = await raw.response(42)
        assert resp.command_id == CommandId.DELIVER_SM_RESP
        assert status_of(resp) == "ESME_RINVCMDID"
        assert status_of(await raw.call(sm())) == "ESME_ROK"
    finally:
        await raw.close()


# ------------------------------------------------------- submit_sm statuses


def _future(seconds: float) -> str:
    return time.strftime("%y%m%d%H%M%S", time.gmtime(time.time() + seconds)) + "000+"


SUBMIT_ERRORS: dict[str, tuple[Callable[[], SubmitSm], str]] = {
    "destination with letters": (lambda: sm(dest="12ab"), "ESME_RINVDSTADR"),
    "destination national TON 2": (lambda: sm(dest="12345678", dest_addr_ton=2), "ESME_RINVDSTADR"),
    "alphanumeric sender of 12": (lambda: sm(source_addr="AcmeCorpShop"), "ESME_RINVSRCADR"),
    "no sender": (lambda: sm(source_addr="", source_addr_ton=0), "ESME_RINVSRCADR"),
    "numeric sender of 16 digits": (
        lambda: sm(source_addr="1234567890123456", source_addr_ton=1),
        "ESME_RINVSRCADR",
    ),
    "empty message": (lambda: sm(text=""), "ESME_RINVMSGLEN"),
    "validity not a time": (lambda: sm(validity_period="tomorrow"), "ESME_RINVEXPIRY"),
    "validity month 13": (lambda: sm(validity_period="261301000000000+"), "ESME_RINVEXPIRY"),
    "validity in the past": (lambda: sm(validity_period="000101000000000+"), "ESME_RINVEXPIRY"),
    "schedule beyond the 30-day horizon": (
        lambda: sm(schedule_delivery_time=_future(40 * 86400)),
        "ESME_RINVSCHED",
    ),
    "validity ends before the schedule": (
        lambda: sm(schedule_delivery_time=_future(7200), validity_period="000000010000000R"),
        "ESME_RINVEXPIRY",
    ),
    "schedule garbage": (lambda: sm(schedule_delivery_time="soon"), "ESME_RINVSCHED"),
    "registered_delivery 3": (lambda: sm(registered_delivery=3), "ESME_RINVREGDLVFLG"),
    "message class TLV 7": (lambda: sm(tlvs={MESSAGE_CLASS_TAG: b"\x07"}), "ESME_RINVOPTPARAMVAL"),
    "short_message and message_payload": (
        lambda: sm(text="hi", tlvs={Tag.MESSAGE_PAYLOAD: b"hello"}),
        "ESME_RINVPARLEN",
    ),
}


async def test_every_submit_error_status_and_bind_stays_usable(stack_factory: Any) -> None:
    stack = await stack_factory()
    raw = await bound_raw(stack.smpp_port)
    try:
        seqs = {name: raw.send(make()) for name, (make, _) in SUBMIT_ERRORS.items()}
        got = {name: status_of(await raw.response(seq)) for name, seq in seqs.items()}
        assert got == {name: want for name, (_, want) in SUBMIT_ERRORS.items()}
        # Valid edge cases next to the refused ones are accepted.
        for ok in (
            sm(validity_period="000001000000000R"),
            sm(validity_period=_future(3600)),
            sm(schedule_delivery_time="000101000000000+"),  # in the past: send now
            sm(tlvs={MESSAGE_CLASS_TAG: b"\x00"}),
            sm(registered_delivery=2),
            sm(dest="004512345678", dest_addr_ton=0),
        ):
            resp = await raw.call(ok)
            assert status_of(resp) == "ESME_ROK"
    finally:
        await raw.close()


# -------------------------------------------------------------------- window


async def test_window_overflow_throttles_only_the_flooding_bind(stack_factory: Any) -> None:
    stack = await stack_factory(smpp=SmppIngressConfig(window=4))
    flood, _ = await connect(stack.smpp_port, window=64)
    calm, _ = await connect(stack.smpp_port, window=64)
    try:

        async def calm_submits() -> list[int]:
            out = []
            for i in range(10):
                out.append((await calm.submit(DK, f"calm {i}")).status)
            return out

        burst = [flood.submit(DK, f"flood {i}") for i in range(20)]
        results = await asyncio.gather(calm_submits(), *burst)
        calm_statuses = results[0]
        flood_statuses = [r.status for r in results[1:]]
        assert calm_statuses == [Status.ESME_ROK] * 10
        ok = flood_statuses.count(Status.ESME_ROK)
        throttled = flood_statuses.count(Status.ESME_RTHROTTLED)
        assert ok + throttled == 20, flood_statuses
        assert ok >= 4 and throttled >= 8, flood_statuses
        # Retrying later (as a client should after ESME_RTHROTTLED) works.
        assert (await flood.submit(DK, "retry")).status == Status.ESME_ROK
    finally:
        flood.close()
        calm.close()


async def test_throttled_bind_is_read_again_only_after_a_pause(stack_factory: Any) -> None:
    stack = await stack_factory(
        smpp=SmppIngressConfig(window=4, throttle_pause=1.0, throttle_pause_max=1.0)
    )
    flood, _ = await connect(stack.smpp_port, window=64)
    calm, _ = await connect(stack.smpp_port, window=64)
    holds = REGISTRY.get_sample_value("smsrouter_smpp_read_holds_total") or 0.0
    try:
        # 20 submits leave in one write, so the router reads them in one go:
        # past the window of 4 they are refused, and the bind is held.
        started = time.monotonic()
        burst = await asyncio.gather(*(flood.submit(DK, f"flood {i}") for i in range(20)))
        assert Status.ESME_RTHROTTLED in [r.status for r in burst]
        assert time.monotonic() - started < 0.5  # all answered from that one read

        async def calm_submits() -> float:
            for i in range(5):
                assert (await calm.submit(DK, f"calm {i}")).status == Status.ESME_ROK
            return time.monotonic()

        async def flood_retry() -> float:
            assert (await flood.submit(DK, "retry")).status == Status.ESME_ROK
            return time.monotonic()

        calm_done, retry_done = await asyncio.gather(calm_submits(), flood_retry())
        # The held bind's retry is read only when the hold ends; the other
        # bind is served meanwhile.
        assert retry_done - started >= 0.9, retry_done - started
        assert calm_done < retry_done
        assert (REGISTRY.get_sample_value("smsrouter_smpp_read_holds_total") or 0) > holds
    finally:
        flood.close()
        calm.close()


def test_throttle_holds_double_up_to_the_cap() -> None:
    assert [throttle_hold(n, 0.01, 0.25) for n in range(7)] == [
        0.01,
        0.02,
        0.04,
        0.08,
        0.16,
        0.25,
        0.25,
    ]
    assert throttle_hold(10_000, 0.01, 1.0) == 1.0  # no overflow after a long streak
    assert throttle_hold(3, 0.0, 0.25) == 0.0  # 0 turns holds off


# ------------------------------------------------------------------ query_sm


async def test_query_sm_own_delivered_message_and_other_accounts_id(stack_factory: Any) -> None:
    stack = await stack_factory(
        sims={
            "sim-eu": SimConfig(port=0, dlr_delay=0.05),
            "sim-world": SimConfig(port=0, dlr_delay=30),
        }
    )
    acme, _ = await connect(stack.smpp_port)
    demo, resp = await connect(stack.smpp_port, system_id="demo", password="demo-pass")
    try:
        assert resp.status == Status.ESME_ROK
        sub = await acme.submit(DK, "query me")
        mid = sub.message_id  # type: ignore[attr-defined]
        await until(lambda: mid in acme.receipts, what="receipt")
        q = await acme.request(QuerySm(message_id=mid, source_addr_ton=5, source_addr="Acme"))
        assert q.command_id == CommandId.QUERY_SM_RESP
        assert status_of(q) == "ESME_ROK"
        assert q.message_id == mid  # type: ignore[attr-defined]
        assert q.message_state == MessageState.DELIVERED == 2  # type: ignore[attr-defined]
        assert q.error_code == 0  # type: ignore[attr-defined]
        final = q.final_date  # type: ignore[attr-defined]
        assert len(final) == 16 and final[:12].isdigit() and final[15] in "+-"
        # Another account's id: refused without saying whether it exists.
        other = await demo.request(QuerySm(message_id=mid, source_addr="Acme"))
        assert status_of(other) == "ESME_RQUERYFAIL"
        unknown = await acme.request(QuerySm(message_id="0000000000000000ffff"))
        assert status_of(unknown) == "ESME_RQUERYFAIL"
        # Not final yet (sim-world answers receipts after 30 s): ENROUTE, no final_date.
        slow = (await acme.submit(US, "on its way")).message_id  # type: ignore[attr-defined]
        engine = stack.router.engine
        await until(lambda: engine.lookup(slow).status is MsgStatus.SUBMITTED, what="submitted")
        q = await acme.request(QuerySm(message_id=slow, source_addr_ton=5, source_addr="Acme"))
        assert status_of(q) == "ESME_ROK"
        assert q.message_state == MessageState.ENROUTE  # type: ignore[attr-defined]
        assert q.final_date == ""  # type: ignore[attr-defined]
        # acme's receipt never went to demo's transceiver.
        assert demo.delivers == []
    finally:
        acme.close()
        demo.close()


# -------------------------------------------------------- registered_delivery


async def test_registered_delivery_none_and_failure_only(stack_factory: Any) -> None:
    stack = await stack_factory(
        sims={
            "sim-eu": SimConfig(port=0, reject_ratio=1.0),
            "sim-world": SimConfig(port=0, dlr_delay=0.05),
        }
    )
    engine = stack.router.engine
    esme, _ = await connect(stack.smpp_port)
    try:
        none_ok = (await esme.submit(US, "no receipt", registered_delivery=0)).message_id  # type: ignore[attr-defined]
        fail_ok = (await esme.submit(US, "failure only", registered_delivery=2)).message_id  # type: ignore[attr-defined]
        fail_bad = (await esme.submit(DK, "failure only", registered_delivery=2)).message_id  # type: ignore[attr-defined]
        none_bad = (await esme.submit(DK, "no receipt", registered_delivery=0)).message_id  # type: ignore[attr-defined]
        final = (MsgStatus.DELIVERED, MsgStatus.FAILED)

        def settled() -> bool:
            return all(
                (d := engine.lookup(m)) is not None and d.status in final
                for m in (none_ok, fail_ok, fail_bad, none_bad)
            )

        await until(settled, what="all four final")
        assert engine.lookup(none_ok).status is MsgStatus.DELIVERED
        assert engine.lookup(fail_bad).status is MsgStatus.FAILED
        await until(lambda: fail_bad in esme.receipts, what="failure receipt")
        assert b"stat:UNDELIV" in esme.receipts[fail_bad].short_message
        await asyncio.sleep(0.3)
        assert set(esme.receipts) == {fail_bad}
        assert len(esme.delivers) == 1
    finally:
        esme.close()


# ------------------------------------------------------------ message_payload


async def test_message_payload_300_chars_becomes_two_udh_segments(stack_factory: Any) -> None:
    stack = await stack_factory()
    world = stack.sims["sim-world"]
    text = "".join(chr(ord("a") + i % 26) for i in range(300))
    esme, _ = await connect(stack.smpp_port)
    try:
        resp = await esme.request(
            sm(US, short_message=b"", tlvs={Tag.MESSAGE_PAYLOAD: text.encode()})
        )
        assert status_of(resp) == "ESME_ROK"
        await until(lambda: world.received_count() == 2, what="two segments at the carrier")
        await asyncio.sleep(0.1)
        assert world.received_count() == 2
        segs = sorted(world.received, key=lambda m: m.payload[5])
        assert all(m.esm_class & 0x40 for m in segs)
        heads = [m.payload[:6] for m in segs]
        assert heads[0][:3] == b"\x05\x00\x03" and heads[0][3] == heads[1][3]
        assert [(h[4], h[5]) for h in heads] == [(2, 1), (2, 2)]
        assert b"".join(m.payload[6:] for m in segs) == text.encode()
        assert all(len(m.payload) - 6 <= 153 for m in segs)
        mid = resp.message_id  # type: ignore[attr-defined]
        await until(lambda: mid in esme.receipts, what="one receipt for the whole message")
        assert b"sub:002 dlvrd:002" in esme.receipts[mid].short_message

        # data_sm carries its text in message_payload too.
        dresp = await esme.request(
            DataSm(
                source_addr_ton=5,
                source_addr="Acme",
                dest_addr_ton=1,
                dest_addr_npi=1,
                destination_addr=US,
                registered_delivery=1,
                tlvs={Tag.MESSAGE_PAYLOAD: text.encode()},
            )
        )
        assert dresp.command_id == CommandId.DATA_SM_RESP
        assert status_of(dresp) == "ESME_ROK"
        await until(lambda: world.received_count() == 4, what="data_sm segments")
    finally:
        esme.close()


# ------------------------------------------------------------- secret class


async def test_secret_class_tlv_leaves_no_personal_data_in_traffic_log(
    stack_factory: Any, db: Any
) -> None:
    stack = await stack_factory()
    esme, _ = await connect(stack.smpp_port)
    try:
        secret = await esme.submit(
            DK, "your one-time code 998877", tlvs={MESSAGE_CLASS_TAG: b"\x01"}
        )
        plain = await esme.submit(DK, "ordinary text")
        assert secret.status == plain.status == Status.ESME_ROK
        sid = secret.message_id  # type: ignore[attr-defined]
        pid = plain.message_id  # type: ignore[attr-defined]
        rows: dict[str, Any] = {}
        deadline = time.monotonic() + 5
        while len(rows) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            rows = {
                r["id"]: r
                for r in await db.fetch(
                    "SELECT id, class, source, destination, body, country, parts FROM traffic_log"
                    " WHERE id = ANY($1)",
                    [sid, pid],
                )
            }
        assert set(rows) == {sid, pid}
        s = rows[sid]
        assert s["class"] == "secret"
        assert (s["source"], s["destination"], s["body"]) == (None, None, None)
        assert s["country"] == "DK" and s["parts"] == 1  # routing facts stay
        p = rows[pid]
        assert (p["source"], p["destination"], p["body"]) == ("Acme", "4512345678", "ordinary text")
        # It is still delivered and receipted like any other message.
        await until(lambda: sid in esme.receipts, what="receipt for the secret message")
    finally:
        esme.close()


# ----------------------------------------------------------- enquire/unbind


async def test_enquire_link_and_unbind(stack_factory: Any) -> None:
    stack = await stack_factory()
    raw = await bound_raw(stack.smpp_port)
    try:
        for _ in range(3):
            resp = await raw.call(EnquireLink())
            assert resp.command_id == CommandId.ENQUIRE_LINK_RESP
            assert status_of(resp) == "ESME_ROK"
        resp = await raw.call(Unbind())
        assert resp.command_id == CommandId.UNBIND_RESP
        assert status_of(resp) == "ESME_ROK"
        assert await raw.closed_by_peer(), "the router must close after unbind_resp"
        acme = stack.router.accounts.by_system_id["acme"].id
        await until(lambda: stack.router.smpp.bind_count(acme) == 0, what="bind forgotten")
    finally:
        await raw.close()


# ------------------------------------------------- receipts without receivers


async def test_receipt_kept_until_a_receiver_binds(stack_factory: Any) -> None:
    stack = await stack_factory()
    engine = stack.router.engine
    tx, _ = await connect(stack.smpp_port, bind_cls=BindTransmitter)
    resp = await tx.submit(DK, "receipt later")
    mid = resp.message_id  # type: ignore[attr-defined]
    await until(
        lambda: (d := engine.lookup(mid)) is not None and d.status.final,
        what="delivered at the carrier",
    )
    await asyncio.sleep(0.1)
    assert tx.delivers == []  # never to a transmitter
    await tx.unbind(timeout=2)
    await asyncio.sleep(0.2)  # nobody bound for the account now
    rx, bresp = await connect(stack.smpp_port, bind_cls=BindReceiver)
    try:
        assert bresp.status == Status.ESME_ROK
        await until(lambda: mid in rx.receipts, what="kept receipt after the receiver bound")
        assert b"stat:DELIVRD" in rx.receipts[mid].short_message
    finally:
        rx.close()


async def test_udhi_with_broken_udh_is_refused(stack_factory: Any) -> None:
    stack = await stack_factory()
    raw = await bound_raw(stack.smpp_port)
    try:
        for bad in (b"\x05", b"\x0a\x00\x03\x01\x02\x01hi"):
            resp = await raw.call(sm(short_message=bad, esm_class=0x40))
            assert status_of(resp) in ("ESME_RINVESMCLASS", "ESME_RINVMSGLEN"), bad
    finally:
        await raw.close()


async def test_oversized_short_message_is_split_or_refused(stack_factory: Any) -> None:
    stack = await stack_factory()
    eu = stack.sims["sim-eu"]
    raw = await bound_raw(stack.smpp_port)
    try:
        cases = [(0, ("x" * 200).encode(), 160), (8, ("y" * 100).encode("utf-16-be"), 140)]
        for dc, payload, limit in cases:
            before = eu.received_count()
            resp = await raw.call(sm(short_message=payload, data_coding=dc))
            assert status_of(resp) == "ESME_ROK", "split into UDH segments (README), not refused"
            await until(lambda b=before: eu.received_count() > b, what="carrier submit")
            await asyncio.sleep(0.1)
            for m in eu.received[before:]:
                body = m.payload[1 + m.payload[0] :] if m.esm_class & 0x40 else m.payload
                assert len(body) <= limit, f"data_coding {dc}: {len(body)} > {limit} in one SMS"
    finally:
        await raw.close()


async def test_unbind_answers_in_flight_submits_first(stack_factory: Any) -> None:
    stack = await stack_factory()
    raw = await bound_raw(stack.smpp_port)
    try:
        submit = sm(text="in flight")
        submit.sequence = 10
        raw.send_bytes(submit.encode() + Unbind(sequence=11).encode())
        seen: list[tuple[int, int, int]] = []
        while (pdu := await raw.read(3)) is not None:
            seen.append((pdu.command_id, pdu.sequence, pdu.status))
        await until(
            lambda: stack.sims["sim-eu"].received_count() == 1,
            what="the message went to the carrier",
        )
        assert (CommandId.SUBMIT_SM_RESP, 10, Status.ESME_ROK) in seen, seen
        assert seen[-1] == (CommandId.UNBIND_RESP, 11, Status.ESME_ROK)
    finally:
        await raw.close()


async def test_router_enquires_an_idle_bind_and_closes_dead_ones(stack_factory: Any) -> None:
    stack = await stack_factory(
        smpp=SmppIngressConfig(enquire_interval=0.4, inactivity_timeout=1.5)
    )
    port = stack.smpp_port
    live = await bound_raw(port)
    unbound = await Raw.open(port)
    dead = await bound_raw(port)
    try:
        pdu = await live.read(3)
        assert pdu is not None and pdu.command_id == CommandId.ENQUIRE_LINK
        t0 = time.monotonic()
        # live answers every enquire_link (and keeps the link alive); dead never reads.
        while time.monotonic() - t0 < 2.0:
            assert pdu is not None, "a live bind was closed"
            if pdu.command_id == CommandId.ENQUIRE_LINK:
                live.send(EnquireLinkResp(sequence=pdu.sequence))
            pdu = await live.read(3)
        assert await unbound.closed_by_peer(1.5), "an idle unbound connection must be closed"
        assert await dead.closed_by_peer(1.5), "a bind that never answers must be closed"
        assert status_of(await live.call(sm())) == "ESME_ROK"
    finally:
        for r in (live, unbound, dead):
            await r.close()


async def test_kept_receipts_are_bounded_and_expire(stack_factory: Any, db: asyncpg.Pool) -> None:
    """No receiving bind: receipts are parked in the database up to
    receipt_buffer per node, then kept in memory up to receipt_buffer (the
    oldest dropped); none is sent once older than receipt_retention."""
    stack = await stack_factory(smpp=SmppIngressConfig(receipt_retention=0.5, receipt_buffer=2))
    door = stack.router.smpp
    acme = stack.router.accounts.by_system_id["acme"].id
    tx, _ = await connect(stack.smpp_port, bind_cls=BindTransmitter)
    dropped = metrics.RECEIPTS_OUT.labels("smpp", "dropped")
    dropped_before = dropped.value
    try:
        ids = [(await tx.submit(DK, f"kept {i}")).message_id for i in range(5)]  # type: ignore[attr-defined]
        await until(
            lambda: all(stack.router.engine.lookup(m).status.final for m in ids), what="all final"
        )
        # (_out empties when the writer takes the rows, before they commit.)
        deadline = time.monotonic() + 5
        while await db.fetchval("SELECT count(*) FROM receipt_handoff WHERE parked") < 2:
            assert time.monotonic() < deadline, "parked rows never written"
            await asyncio.sleep(0.02)
        assert await db.fetchval("SELECT count(*) FROM receipt_handoff WHERE parked") == 2
        kept = [p.pdu.tlv_str(Tag.RECEIPTED_MESSAGE_ID) for p in door.pending[acme]]
        assert len(kept) == 2 and set(kept) <= set(ids)
        assert dropped.value == dropped_before + 1  # 5 = 2 parked + 2 kept + 1 dropped
        await asyncio.sleep(0.7)  # older than receipt_retention
        rx, _ = await connect(stack.smpp_port, bind_cls=BindReceiver)
        await asyncio.sleep(0.5)
        assert rx.delivers == []  # expired receipts are not sent
        deadline = time.monotonic() + 5  # taken, dropped: deleted with the next write
        while await db.fetchval("SELECT count(*) FROM receipt_handoff"):
            assert time.monotonic() < deadline, "expired parked rows left"
            await asyncio.sleep(0.05)
        rx.close()
    finally:
        tx.close()
