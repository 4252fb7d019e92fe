"""Carrier-layer pieces without sockets: token bucket, receipt parsing,
carrier-id correlation (hex vs decimal, case, early receipts)."""

from __future__ import annotations

from router.carriers.correlate import Correlator
from router.carriers.ratelimit import TokenBucket
from router.carriers.receipt import (
    CarrierReceipt,
    alternate_forms,
    build_receipt,
    normalise_carrier_id,
    parse_receipt,
)
from router.smpp.constants import MessageState, Tag
from router.smpp.pdu import DeliverSm, decode


def test_token_bucket_rate_and_adaptation() -> None:
    b = TokenBucket(100.0, now=0.0, burst=1.0)
    assert b.take(0.0) == 0.0
    wait = b.take(0.0)
    assert 0.009 < wait <= 0.0101
    assert b.take(0.01) == 0.0
    b.slow_down()
    assert b.rate == 50.0
    for _ in range(200):
        b.speed_up()
    assert b.rate == 100.0
    for _ in range(20):
        b.slow_down()
    assert b.rate == b.floor >= 1.0


def receipt_pdu(text: bytes, **tlvs: bytes) -> DeliverSm:
    pdu = DeliverSm(esm_class=0x04, short_message=text)
    for k, v in tlvs.items():
        pdu.tlvs[int(k, 16)] = v
    return decode(pdu.encode())  # type: ignore[return-value]


def test_parse_standard_and_odd_receipts() -> None:
    r = parse_receipt(
        receipt_pdu(
            b"id:1A2B sub:001 dlvrd:001 submit date:2511251200 done date:2511251201 "
            b"stat:DELIVRD err:000 text:hello"
        )
    )
    assert r == CarrierReceipt("1A2B", MessageState.DELIVERED, "000")
    # 12-digit dates and a letter in err (aiosmpplib defect 2): no exception.
    r = parse_receipt(
        receipt_pdu(
            b"id:77 sub:001 dlvrd:000 submit date:251125120000 done date:251125120100 "
            b"stat:UNDELIV err:X1B text:"
        )
    )
    assert r is not None and r.state is MessageState.UNDELIVERABLE and r.error == "X1B"
    # Empty text, TLVs only (defect 3).
    r = parse_receipt(receipt_pdu(b"", **{"001e": b"abc\x00", "0427": b"\x02"}))
    assert r == CarrierReceipt("abc", MessageState.DELIVERED, "000")
    # TLVs win over the text.
    r = parse_receipt(receipt_pdu(b"id:zzz stat:UNDELIV", **{"001e": b"abc\x00", "0427": b"\x02"}))
    assert r is not None and r.carrier_id == "abc" and r.state is MessageState.DELIVERED
    assert parse_receipt(receipt_pdu(b"no receipt here")) is None


def test_receipt_we_build_round_trips_and_carries_no_text() -> None:
    pdu = build_receipt(
        message_id="abc123",
        state=MessageState.DELIVERED,
        error="000",
        submitted_at=0,
        done_at=60,
        source="Acme",
        destination="4512345678",
    )
    back = decode(pdu.encode())
    assert isinstance(back, DeliverSm)
    assert back.tlv_str(Tag.RECEIPTED_MESSAGE_ID) == "abc123"
    assert back.tlv_int(Tag.MESSAGE_STATE) == 2
    assert back.short_message.endswith(b"text:")
    assert back.source_addr == "4512345678" and back.destination_addr == "Acme"


def test_carrier_id_forms() -> None:
    assert normalise_carrier_id("00AbC1") == "abc1"
    assert "255" in alternate_forms("ff")
    assert "ff" in alternate_forms("255")


def test_correlator_hex_decimal_case_and_early_receipts() -> None:
    c: Correlator[str] = Correlator()
    assert c.remember("0000FF", "ours-1", now=0) is None
    assert c.lookup("ff") == "ours-1"
    assert c.lookup("FF") == "ours-1"
    assert c.lookup("255") == "ours-1"  # receipt in decimal, resp in hex
    c.remember("4096", "ours-2", now=0)
    assert c.lookup("1000") == "ours-2"  # receipt in hex, resp in decimal
    # A receipt that arrives before its submit_sm_resp is parked, then matched.
    early = CarrierReceipt("ABCD", MessageState.DELIVERED, "000")
    c.park(early, now=1)
    assert c.remember("abcd", "ours-3", now=2) == early
    # Parked receipts expire.
    c.park(CarrierReceipt("dead", MessageState.DELIVERED, "000"), now=0)
    assert c.remember("dead", "ours-4", now=1000) is None
    c.forget("255")
    assert c.lookup("ff") is None


def test_correlator_is_bounded() -> None:
    c: Correlator[int] = Correlator(max_entries=100)
    for i in range(1000):
        c.remember(f"id{i}", i, now=0)
    assert len(c) == 100
    assert c.lookup("id999") == 999 and c.lookup("id0") is None
