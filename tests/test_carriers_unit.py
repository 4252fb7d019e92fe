"""Carrier-layer pieces without sockets: token bucket, receipt parsing,
carrier-id correlation (hex vs decimal, case, early receipts); and the spool
payload codec (carried messages, kept here with the other per-message codecs)."""

from __future__ import annotations

import dataclasses
import re
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.carriers import receipt as receipt_module
from router.carriers.correlate import Correlator
from router.carriers.ratelimit import TokenBucket
from router.carriers.receipt import (
    CarrierReceipt,
    alternate_forms,
    build_receipt,
    normalise_carrier_id,
    parse_receipt,
)
from router.model import Message, MessageClass, Origin
from router.smpp.constants import ESM_TYPE_RECEIPT, RECEIPT_STAT, MessageState, Tag
from router.smpp.pdu import DeliverSm, decode
from router.store.spool import decode_message, encode_message

FAST = settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)


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


def test_a_rate_below_one_per_second_is_never_raised_by_throttling() -> None:
    # A carrier at 0.5/s (or a worker's share of a 1/s carrier): a throttling
    # answer must not lift it to the 1/s floor.
    reloaded = TokenBucket(8.0, now=0.0)
    reloaded.set_rate(0.5)
    for b in (TokenBucket(0.5, now=0.0), reloaded):
        for _ in range(5):
            b.slow_down()
            assert b.rate <= 0.5
        b.speed_up()
        assert b.rate <= 0.5


def test_a_new_share_of_the_rate_keeps_the_slow_down_and_counts_demand() -> None:
    # A worker's share moves with demand (router/shares.py): a carrier that
    # throttled us stays slowed down by the same factor at its new share.
    b = TokenBucket(100.0, now=0.0)
    b.slow_down()
    b.rescale(40.0)
    assert (b.max_rate, b.rate, b.burst) == (40.0, 20.0, 4.0)
    b.rescale(40.0)  # unchanged: nothing reset
    assert b.rate == 20.0
    b.rescale(0.5)
    assert b.rate <= 0.5 and b.max_rate == 0.5
    # A share that passed through the floor gives the slow-down back intact.
    b.rescale(40.0)
    assert b.rate == 20.0
    for _ in range(6):
        b.slow_down()
    b.rescale(1.2)
    b.rescale(58.8)
    assert b.factor == 1 / 64 and b.rate == b.floor == 1.0  # 58.8/64 is below the floor
    for _ in range(10):
        b.speed_up()
    assert b.rate == pytest.approx(58.8 * (1 / 64 + 0.1))
    b.set_rate(58.8)  # a new configured rate starts afresh
    assert b.rate == 58.8
    asked = b.asked
    b.take(1.0)
    b.take(1.0)  # refused ones count too: that is demand
    assert b.asked == asked + 2


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
    assert normalise_carrier_id("00Ab\x00C1") == "ab"  # a C-octet string ends at NUL
    assert "255" in alternate_forms("ff")
    assert "ff" in alternate_forms("255")
    # Digits int() refuses (a latin-1 id byte 0xB2 is '²'): no other form, no error.
    assert alternate_forms("1\u00b2") == []


def test_receipt_fields_carry_no_nul() -> None:
    """Ids and error codes are looked up and logged in PostgreSQL text,
    which refuses NUL (one such value used to fail every batch it was in)."""
    r = parse_receipt(receipt_pdu(b"err:0\x0012", **{"001e": b"ab\x00cd", "0427": b"\x02"}))
    assert r == CarrierReceipt("ab", MessageState.DELIVERED, "0")
    r = parse_receipt(receipt_pdu(b"id:77\x0088 stat:UNDELIV err:\x00"))
    assert r == CarrierReceipt("77", MessageState.UNDELIVERABLE, "000")


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


# ------------------------------------------- receipt text: fast path vs reference

# The general parser as it was before the one-match fast path: the oracle.
_REFERENCE_FIELD = re.compile(
    rb"(id|sub|dlvrd|submit date|done date|stat|err|text):\s*"
    rb"(.*?)(?=\s+(?:id|sub|dlvrd|submit date|done date|stat|err|text):|\s*$)",
    re.IGNORECASE | re.DOTALL,
)


def reference_fields(text: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for m in _REFERENCE_FIELD.finditer(text):
        key = m.group(1).decode("latin-1").lower()
        if key != "text":
            fields.setdefault(key, m.group(2).decode("latin-1").strip())
    return fields


KEYS = ["id", "sub", "dlvrd", "submit date", "done date", "stat", "err", "text"]
_case = st.sampled_from([str.lower, str.upper, str.title])
# Mostly what carriers send, with every kind of deviation drawn often enough
# to reach the edges of the fast path (which must then agree or step aside).
_word = st.sampled_from(
    ["001", "000", "DELIVRD", "UNDELIV", "X1B", "2511251200", "251125120000", "a:b", "id:5", "0"]
)
_odd = st.one_of(
    st.just(""),
    st.text(st.sampled_from("0aZ:-_ .id\t"), min_size=1, max_size=8),
    st.sampled_from(["sub:1", "err:2", " ", "x text:y"]),
)
_value = st.one_of(_word, _word, _word, _word, _odd)
_blank = st.sampled_from([" ", " ", " ", " ", " ", "  ", "\t", "\n", " \r\n", ""])
_colon_gap = st.sampled_from(["", "", "", "", "", "", " "])
_tail = st.sampled_from(
    [
        "",
        "",
        " text:",
        " text:hello",
        " Text:id:1 stat:X",
        "\ttext:",
        " foo",
        " text",
        "\n",
        " id:7",
        " err:9",
        "  ",
        " foo:1",
    ]
)


@st.composite
def receipt_texts(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 4)) == 0:  # free form: any order, repeats, missing keys
        keys = draw(st.lists(st.sampled_from(KEYS), max_size=9))
        text = ""
        for k in keys:
            text += draw(_case)(k) + ":" + draw(_colon_gap) + draw(_value) + draw(_blank)
        return (text + draw(_tail)).encode("latin-1", "replace")
    # The standard layout with at most two deviations, then any tail.
    keys = [draw(_case)(k) for k in KEYS[:-1]]
    gaps = [""] * 7
    values = [draw(_word) for _ in keys]
    blanks = [" "] * 6
    for _ in range(draw(st.integers(0, 2))):
        i = draw(st.integers(0, 6))
        kind = draw(st.sampled_from(["value", "gap", "blank"]))
        if kind == "value":
            values[i] = draw(_odd)
        elif kind == "gap":
            gaps[i] = " "
        else:
            blanks[min(i, 5)] = draw(_blank)
    text = "".join(
        k + ":" + g + v + (blanks[i] if i < 6 else "")
        for i, (k, g, v) in enumerate(zip(keys, gaps, values, strict=True))
    )
    return (text + draw(_tail)).encode("latin-1", "replace")


@settings(FAST, max_examples=1000)
@given(text=receipt_texts())
def test_fast_receipt_text_parse_equals_reference(text: bytes) -> None:
    want = reference_fields(text)
    got = receipt_module._text_fields(text)
    for key in ("id", "stat", "err"):  # what parse_receipt reads
        assert got.get(key) == want.get(key)


@pytest.mark.parametrize(
    "text",
    [
        b"id:1A2B sub:001 dlvrd:001 submit date:2511251200 done date:2511251201 "
        b"stat:DELIVRD err:000 text:hello id:zzz stat:UNDELIV",
        b"ID:1a2b SUB:001 DLVRD:001 SUBMIT DATE:251125120000 DONE DATE:251125120100 "
        b"STAT:undeliv ERR:X1B Text:",
        b"id:1 sub:001 dlvrd:001 submit date:2511251200 done date:2511251201 stat:DELIVRD err:000",
        b"id:1 sub:001 dlvrd:001 submit date:2511251200 done date:2511251201 stat: err:000",
        b"id: 1 sub:001 dlvrd:001 submit date:x done date:y stat:DELIVRD err:000 text:",
        b"stat:DELIVRD id:9 err:5",
        b"id: sub:001 dlvrd:001 submit date:2511251200 done date:2511251201 stat:DELIVRD err:000",
        b"id:1 sub:001 dlvrd:001 submit date:2511251200 done date:2511251201 stat:DELIVRD "
        b"err:000 foo:1",
        b"id:1 sub:001 dlvrd:001 submit date:2511251200 done date:2511251201 stat:DELIVRD "
        b"err:000 text",
        b"id:1 sub:001 dlvrd:001 submit date:2511251200 done date:2511251201 stat:DELIVRD err:",
        b"id:9\tsub:1\ndlvrd:1  submit date:1 done date:2 stat:EXPIRED err:\n",
    ],
)
def test_receipt_text_known_cases_equal_reference(text: bytes) -> None:
    want = reference_fields(text)
    got = receipt_module._text_fields(text)
    for key in ("id", "stat", "err"):
        assert got.get(key) == want.get(key)


def test_parse_receipt_more_tolerances() -> None:
    # Receipt text in message_payload instead of short_message.
    r = parse_receipt(
        receipt_pdu(
            b"",
            **{
                "0424": b"id:00ff sub:001 dlvrd:001 submit date:2511251200 "
                b"done date:2511251201 stat:DELIVRD err:000 text:"
            },
        )
    )
    assert r == CarrierReceipt("00ff", MessageState.DELIVERED, "000")
    # A message_state TLV out of range: the text's stat decides.
    r = parse_receipt(receipt_pdu(b"id:5 stat:EXPIRED err:003", **{"0427": b"\x09"}))
    assert r == CarrierReceipt("5", MessageState.EXPIRED, "003")
    # No err anywhere: network_error_code TLV in hex, else "000".
    r = parse_receipt(receipt_pdu(b"id:5 stat:UNDELIV", **{"0423": b"\x03\x00\x01"}))
    assert r == CarrierReceipt("5", MessageState.UNDELIVERABLE, "030001")
    r = parse_receipt(receipt_pdu(b"", **{"001e": b"77\x00", "0427": b"\x05"}))
    assert r == CarrierReceipt("77", MessageState.UNDELIVERABLE, "000")
    # Unknown stat word.
    r = parse_receipt(receipt_pdu(b"id:5 stat:WHATEVER err:000"))
    assert r is not None and r.state is MessageState.UNKNOWN
    # TLVs plus text with err: the common fast case keeps the text's err.
    r = parse_receipt(
        receipt_pdu(b"id:x stat:DELIVRD err:0A1 text:", **{"001e": b"AbC\x00", "0427": b"\x02"})
    )
    assert r == CarrierReceipt("AbC", MessageState.DELIVERED, "0A1")


# ------------------------------------------- receipts we build: same PDU as before


def reference_build_receipt(
    message_id: str,
    state: MessageState,
    error: str,
    submitted_at: float,
    done_at: float,
    source: str,
    destination: str,
    source_ton: int,
    source_npi: int,
    parts: int,
) -> DeliverSm:
    def date(ts: float) -> str:
        return time.strftime("%y%m%d%H%M", time.gmtime(ts))

    delivered = parts if state is MessageState.DELIVERED else 0
    body = (
        f"id:{message_id} sub:{parts:03d} dlvrd:{delivered:03d} "
        f"submit date:{date(submitted_at)} done date:{date(done_at)} "
        f"stat:{RECEIPT_STAT[state]} err:{error[:3]:0>3} text:"
    ).encode("ascii", "replace")
    pdu = DeliverSm(
        source_addr_ton=1,
        source_addr_npi=1,
        source_addr=destination,
        dest_addr_ton=source_ton,
        dest_addr_npi=source_npi,
        destination_addr=source,
        esm_class=ESM_TYPE_RECEIPT,
        short_message=body,
    )
    pdu.set_tlv_str(Tag.RECEIPTED_MESSAGE_ID, message_id)
    pdu.set_tlv_int(Tag.MESSAGE_STATE, int(state), 1)
    return pdu


_ts = st.floats(min_value=-4e9, max_value=4e9, allow_nan=False)


@FAST
@given(
    message_id=st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=64),
    state=st.sampled_from(list(MessageState)),
    error=st.text(st.sampled_from("0123456789ABX"), max_size=5),
    submitted_at=_ts,
    done_at=_ts,
    source=st.text(st.sampled_from("Acme0123456789"), max_size=20),
    destination=st.text(st.sampled_from("0123456789"), max_size=20),
    source_ton=st.integers(0, 255),
    source_npi=st.integers(0, 255),
    parts=st.integers(0, 1200),
)
def test_build_receipt_equals_reference(
    message_id: str,
    state: MessageState,
    error: str,
    submitted_at: float,
    done_at: float,
    source: str,
    destination: str,
    source_ton: int,
    source_npi: int,
    parts: int,
) -> None:
    args = (message_id, state, error, submitted_at, done_at, source, destination)
    got = build_receipt(
        message_id=message_id,
        state=state,
        error=error,
        submitted_at=submitted_at,
        done_at=done_at,
        source=source,
        destination=destination,
        source_ton=source_ton,
        source_npi=source_npi,
        parts=parts,
    )
    want = reference_build_receipt(*args, source_ton, source_npi, parts)
    assert got == want
    assert got.encode() == want.encode()


def test_smpp_date_cache_is_exact_and_bounded() -> None:
    base = 1764072000.0
    for ts in (base - 0.001, base, base + 59.999, base + 60, -0.5, -60.0, 0.0, 4e9):
        assert receipt_module._smpp_date(ts) == time.strftime("%y%m%d%H%M", time.gmtime(ts))
    for minute in range(3000):
        receipt_module._smpp_date(base + 60 * minute)
    assert len(receipt_module._DATES) <= 1024


def test_correlator_key_memo_never_mixes_ids() -> None:
    c: Correlator[int] = Correlator()
    c.remember("00AB", 1, now=0)
    c.remember("cd", 2, now=0)
    same = "".join(["a", "b"])  # equal content, another object
    assert c.lookup(same) == 1 and c.lookup("CD") == 2 and c.lookup(same) == 1
    c.forget(same)
    assert c.lookup("ab") is None and c.lookup("cd") == 2
    x = "ff"
    c.remember(x, 3, now=0)
    assert c.lookup(x) == 3 and c.lookup("255") == 3
    c.forget("255")
    assert c.lookup(x) is None


# ------------------------------------------- spool payload: format 2 and format 1 rows

BASE_MESSAGE = Message(
    id="0196a3f1c2d4e5b6a7c8",
    account_id=7,
    account="acme",
    origin=Origin.HTTP,
    msg_class=MessageClass.STANDARD,
    source="Acme",
    source_ton=5,
    source_npi=0,
    destination="4512345678",
    country="DK",
    data_coding=8,
    esm_class=0x40,
    segments=(b"\x05\x00\x03\x2a\x02\x01\x00H\x00i", b"\x05\x00\x03\x2a\x02\x02\x00!"),
    text="Hi! \u00e6\U0001f600",
    registered_delivery=1,
    accepted_at=1764072000.25,
    expires_at=1764244800.25,
    userref="42",
    callback_url="https://example.com/dlr",
    tlvs=((0x1400, b"\x00"),),
    send_at=1764075600.0,
    part_ids=("p1", "p2"),
    held=True,
)

# Written by the JSON encoder this router used before format 2 (an upgrade
# finds such rows in the spool); with and without the later optional keys.
JSON_ROW = (
    b'{"id":"0196a3f1c2d4e5b6a7c8","account_id":7,"account":"acme","origin":"http",'
    b'"class":"standard","source":"Acme","source_ton":5,"source_npi":0,'
    b'"destination":"4512345678","country":"DK","data_coding":8,"esm_class":64,'
    b'"segments":["BQADKgIBAEgAaQ==","BQADKgICACE="],"text":"Hi! \\u00e6\\ud83d\\ude00",'
    b'"registered_delivery":1,"accepted_at":1764072000.25,"expires_at":1764244800.25,'
    b'"userref":"42","callback_url":"https://example.com/dlr","tlvs":[[5120,"AA=="]],'
    b'"send_at":1764075600.0,"part_ids":["p1","p2"],"held":true}'
)
JSON_ROW_OLDEST = (
    b'{"id":"m1","account_id":1,"account":"demo","origin":"smpp","class":"secret",'
    b'"source":"Bench","source_ton":5,"source_npi":0,"destination":"4512345678",'
    b'"country":"DK","data_coding":0,"esm_class":0,"segments":["aGk="],"text":null,'
    b'"registered_delivery":1,"accepted_at":1.5,"expires_at":2.5,"userref":null,'
    b'"callback_url":null,"tlvs":[]}'
)
# Format 2 of BASE_MESSAGE, pinned: changing the layout needs a new version octet.
BINARY_ROW = bytes.fromhex(
    "021f070000000000000005000000000000000000000000000000080000000000000040000000"
    "000000000100000000000000000010906649da41000010500f4ada41000000146a49da410200"
    "0100020014000000040000000400000008000000040000000a000000020000000a0000000200"
    "0000170000000a00000008000000001400000100000002000000020000003031393661336631"
    "63326434653562366137633861636d65687474707374616e6461726441636d65343531323334"
    "35363738444b48692120c3a6f09f9880343268747470733a2f2f6578616d706c652e636f6d2f"
    "646c720500032a0201004800690500032a020200210070317032"
)


def test_spool_payload_is_format_2_and_round_trips() -> None:
    raw = encode_message(BASE_MESSAGE)
    assert raw[:1] == b"\x02"
    assert decode_message(raw) == BASE_MESSAGE
    assert len(raw) < len(JSON_ROW) / 1.5


def test_spool_format_2_layout_is_pinned() -> None:
    assert encode_message(BASE_MESSAGE).hex() == BINARY_ROW.hex()
    assert decode_message(BINARY_ROW) == BASE_MESSAGE


def test_spool_reads_format_1_json_rows() -> None:
    assert decode_message(JSON_ROW) == BASE_MESSAGE
    old = decode_message(JSON_ROW_OLDEST)
    assert old.msg_class is MessageClass.SECRET and old.origin is Origin.SMPP
    assert old.segments == (b"hi",) and old.text is None and old.tlvs == ()
    assert (old.send_at, old.part_ids, old.held) == (None, (), False)


@pytest.mark.parametrize(
    "changes",
    [
        {"account_id": 1 << 70},  # beyond 64 bits
        {"text": "lone \udc80 surrogate"},  # not UTF-8 encodable
        {"tlvs": ((-1, b"x"),)},
    ],
    ids=["big-int", "surrogate", "negative-tag"],
)
def test_spool_falls_back_to_json_for_what_format_2_cannot_hold(
    changes: dict[str, object],
) -> None:
    msg = dataclasses.replace(BASE_MESSAGE, **changes)  # type: ignore[arg-type]
    raw = encode_message(msg)
    assert raw[:1] == b"{"
    assert decode_message(raw) == msg


def test_spool_refuses_damaged_format_2_rows() -> None:
    raw = encode_message(BASE_MESSAGE)
    for bad in (raw[:-1], raw + b"x", raw[:30], raw[:-40]):
        with pytest.raises((ValueError, struct.error)):
            decode_message(bad)


_utf8 = st.text(st.characters(exclude_categories=["Cs"]), max_size=30)


@FAST
@given(
    id=_utf8,
    account_id=st.integers(-(2**63), 2**63 - 1),
    account=_utf8,
    origin=st.sampled_from(list(Origin)),
    msg_class=st.sampled_from(list(MessageClass)),
    source=_utf8,
    ints=st.tuples(*[st.integers(-(2**63), 2**63 - 1)] * 5),
    destination=_utf8,
    country=_utf8,
    segments=st.lists(st.binary(max_size=160), max_size=4).map(tuple),
    text=st.none() | _utf8,
    times=st.tuples(*[st.floats(allow_nan=False)] * 2),
    userref=st.none() | _utf8,
    callback_url=st.none() | _utf8,
    tlvs=st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=40)), max_size=3).map(tuple),
    send_at=st.none() | st.floats(allow_nan=False),
    part_ids=st.lists(_utf8, max_size=3).map(tuple),
    held=st.booleans(),
)
def test_spool_format_2_round_trips_any_message(
    id: str,
    account_id: int,
    account: str,
    origin: Origin,
    msg_class: MessageClass,
    source: str,
    ints: tuple[int, int, int, int, int],
    destination: str,
    country: str,
    segments: tuple[bytes, ...],
    text: str | None,
    times: tuple[float, float],
    userref: str | None,
    callback_url: str | None,
    tlvs: tuple[tuple[int, bytes], ...],
    send_at: float | None,
    part_ids: tuple[str, ...],
    held: bool,
) -> None:
    msg = Message(
        id=id,
        account_id=account_id,
        account=account,
        origin=origin,
        msg_class=msg_class,
        source=source,
        source_ton=ints[0],
        source_npi=ints[1],
        destination=destination,
        country=country,
        data_coding=ints[2],
        esm_class=ints[3],
        segments=segments,
        text=text,
        registered_delivery=ints[4],
        accepted_at=times[0],
        expires_at=times[1],
        userref=userref,
        callback_url=callback_url,
        tlvs=tlvs,
        send_at=send_at,
        part_ids=part_ids,
        held=held,
    )
    raw = encode_message(msg)
    assert raw[:1] == b"\x02"
    back = decode_message(raw)
    assert back == msg
    assert type(back.held) is bool and type(back.account_id) is int
