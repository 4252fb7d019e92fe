"""Tests for router.text: GSM 03.38 / UCS2 encoding, UDH split/parse, reassembly, decoding."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.text.gsm7 import (
    GSM7_BASIC,
    GSM7_CHARSET,
    GSM7_EXTENSION,
    decode_gsm7,
    encode_gsm7,
    gsm7_septet_len,
    is_gsm7,
    pack_septets,
    unpack_septets,
)
from router.text.segment import (
    Concat,
    Encoded,
    Reassembler,
    decode_payload,
    encode_text,
    parse_udh,
    part_count,
    split,
)

FAST = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
GSM_ALPHABET = "".join(sorted(GSM7_CHARSET))
EXT_CHARS = "".join(GSM7_EXTENSION.values())
gsm_text = st.text(alphabet=GSM_ALPHABET, max_size=1200)
# Weighted towards long texts and astral characters so multipart/surrogate cases are common.
any_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=600) | st.text(
    alphabet=st.sampled_from("a€ü😀👍🏽𝄞中"), min_size=60, max_size=600
)


def _reassemble(parts: list[bytes]) -> bytes:
    if len(parts) == 1:
        return parts[0]
    r = Reassembler()
    out = None
    for i, part in enumerate(parts):
        concat, body = parse_udh(part)
        assert concat is not None
        out = r.add(("acct", "src", "dst", concat.ref), concat.total, concat.seq, body, 0.0)
        assert (out is None) == (i < len(parts) - 1)
    assert len(r) == 0
    assert out is not None
    return out


# --- gsm7 -----------------------------------------------------------------------------


def test_alphabet_tables() -> None:
    assert len(GSM7_BASIC) == 128
    assert len(GSM7_CHARSET) == 127 + 10
    assert "\x1b" not in GSM7_CHARSET
    assert set(EXT_CHARS) == set("\f^{}\\[~]|€")


def test_is_gsm7() -> None:
    assert is_gsm7("")
    assert is_gsm7("Hello @ £5 €10 [ok] {x} ^~\\| ÄÖÑÜ§¿ΔΩ\n\r")
    assert not is_gsm7("café ç")  # é is GSM, ç (lower-case) is not
    assert not is_gsm7("😀")
    assert not is_gsm7("\x1b")


def test_septet_len() -> None:
    assert gsm7_septet_len("") == 0
    assert gsm7_septet_len("abc") == 3
    assert gsm7_septet_len("€") == 2
    assert gsm7_septet_len("a[b]c\f") == 3 + 2 * 3
    assert gsm7_septet_len(EXT_CHARS) == 20


def test_encode_known_values() -> None:
    assert encode_gsm7("@£$") == b"\x00\x01\x02"
    assert encode_gsm7("A€a") == b"\x41\x1b\x65\x61"
    assert encode_gsm7("[]") == b"\x1b\x3c\x1b\x3e"


def test_encode_error_names_position_not_content() -> None:
    with pytest.raises(ValueError) as info:
        encode_gsm7("abcsecret😀")
    msg = str(info.value)
    assert "9" in msg and "secret" not in msg and "😀" not in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_decode_tolerant() -> None:
    assert decode_gsm7(b"\x1b\x41") == "A"  # unknown escape -> basic char
    assert decode_gsm7(b"a\x1b") == "a "  # trailing ESC -> space
    assert decode_gsm7(b"\x1b\x1bb") == " b"  # ESC ESC -> space
    assert decode_gsm7(b"\x80\xffa") == "\ufffd\ufffda"
    assert decode_gsm7(b"\x1b\x65\x1b\x14") == "€^"


@FAST
@given(gsm_text)
def test_gsm7_round_trip(text: str) -> None:
    data = encode_gsm7(text)
    assert len(data) == gsm7_septet_len(text)
    assert max(data, default=0) <= 0x7F
    assert decode_gsm7(data) == text


@FAST
@given(st.binary(max_size=300))
def test_decode_gsm7_never_raises(data: bytes) -> None:
    assert isinstance(decode_gsm7(data), str)


def test_pack_known_vector() -> None:
    # Classic TS 23.038 example: "hellohello" -> E8 32 9B FD 46 97 D9 EC 37
    septets = encode_gsm7("hellohello")
    packed = pack_septets(septets)
    assert packed == bytes.fromhex("E8329BFD4697D9EC37")
    assert unpack_septets(packed, 10) == septets


@FAST
@given(st.binary(max_size=200).map(lambda b: bytes(x & 0x7F for x in b)), st.integers(0, 6))
def test_pack_round_trip(septets: bytes, fill: int) -> None:
    packed = pack_septets(septets, fill_bits=fill)
    assert len(packed) == (7 * len(septets) + fill + 7) // 8
    assert unpack_septets(packed, len(septets), fill_bits=fill) == septets


def test_pack_errors() -> None:
    with pytest.raises(ValueError):
        pack_septets(b"\x80")
    with pytest.raises(ValueError):
        unpack_septets(b"\x00", 2)
    with pytest.raises(ValueError):
        pack_septets(b"a", fill_bits=7)


# --- encode_text / part_count / split -------------------------------------------------


def test_encode_text_choice() -> None:
    e = encode_text("Hello €")
    assert (e.coding, e.data_coding, e.units) == ("gsm7", 0, 8)
    u = encode_text("Hi 😀")
    assert (u.coding, u.data_coding, u.units) == ("ucs2", 8, 5)
    assert u.payload == "Hi 😀".encode("utf-16-be")
    assert encode_text("Hello", prefer="ucs2").coding == "ucs2"
    lat = encode_text("Olá ç", prefer="latin1")
    assert (lat.coding, lat.data_coding, lat.payload) == ("latin1", 3, "Olá ç".encode("latin-1"))
    assert encode_text("€", prefer="latin1").coding == "ucs2"
    with pytest.raises(ValueError):
        encode_text("x", prefer="utf8")
    with pytest.raises(ValueError):
        encode_text("a\ud800b")


def _encode_text_by_charmap(text: str) -> Encoded:
    """encode_text without its plain-ASCII shortcut: the charmap path for every text."""
    if is_gsm7(text):
        payload = encode_gsm7(text)
        return Encoded("gsm7", 0, payload, len(payload))
    payload = text.encode("utf-16-be")
    return Encoded("ucs2", 8, payload, len(payload) // 2)


@pytest.mark.parametrize("code", range(128))
def test_encode_text_ascii_shortcut_matches_charmap(code: int) -> None:
    # Every ASCII character, alone and among letters: '@', '$', '_', the extension
    # characters and the ones outside the alphabet must leave the shortcut.
    for text in (chr(code), f"Code {chr(code)} 42\n", "a" * 159 + chr(code)):
        assert encode_text(text) == _encode_text_by_charmap(text)


@FAST
@given(st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=400))
def test_encode_text_ascii_matches_charmap(text: str) -> None:
    assert encode_text(text) == _encode_text_by_charmap(text)


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("", 1),
        ("a" * 160, 1),
        ("a" * 161, 2),
        ("a" * 306, 2),
        ("a" * 307, 3),
        ("€" * 80, 1),
        ("€" * 81, 2),
        ("ж" * 70, 1),
        ("ж" * 71, 2),
        ("ж" * 134, 2),
        ("ж" * 135, 3),
        ("😀" * 35, 1),
        ("😀" * 36, 2),
    ],
)
def test_part_count(text: str, parts: int) -> None:
    enc = encode_text(text)
    assert part_count(enc) == parts == len(split(enc, ref=1))


def test_part_count_binary_and_ref16() -> None:
    enc = Encoded("binary", 4, bytes(268), 268)
    assert part_count(enc) == 2
    assert part_count(enc, ref16=True) == 3  # 133 bytes per part with a 7-byte UDH
    assert part_count(encode_text("a" * 306), ref16=True) == 3  # 152 septets per part


def test_single_part_has_no_udh() -> None:
    enc = encode_text("hello")
    assert split(enc, ref=7) == [enc.payload]


def test_udh_layout() -> None:
    parts = split(encode_text("a" * 200), ref=0xAB)
    assert [p[:6] for p in parts] == [bytes([5, 0, 3, 0xAB, 2, 1]), bytes([5, 0, 3, 0xAB, 2, 2])]
    parts16 = split(encode_text("a" * 200), ref=0x1234, ref16=True)
    assert parts16[1][:7] == bytes([6, 8, 4, 0x12, 0x34, 2, 2])


def test_split_errors() -> None:
    with pytest.raises(ValueError):
        split(encode_text("a" * 153 * 256), ref=1)
    assert len(split(encode_text("a" * 153 * 255), ref=1)) == 255
    with pytest.raises(ValueError):
        split(encode_text("a" * 200), ref=256)
    with pytest.raises(ValueError):
        split(encode_text("a" * 200), ref=65536, ref16=True)


def test_euro_200_regression() -> None:
    """aiosmpplib defect: 200 x '€' produced a 312-byte part. Each part <= 153 septets."""
    enc = encode_text("€" * 200)
    assert enc.units == 400
    parts = split(enc, ref=9)
    assert len(parts) == part_count(enc) == 3
    for part in parts:
        concat, body = parse_udh(part)
        assert concat is not None
        assert len(body) <= 153 and len(part) <= 159
        assert len(body) % 2 == 0 and body[0] == 0x1B  # escape pairs never cut
        assert decode_gsm7(body) == "€" * (len(body) // 2)
    assert decode_gsm7(_reassemble(parts)) == "€" * 200


def test_escape_pair_not_split_at_boundary() -> None:
    text = "a" * 152 + "€" + "b" * 10  # ESC would land at offset 152 (the 153rd septet)
    parts = split(encode_text(text), ref=3)
    _, first = parse_udh(parts[0])
    assert first == b"a" * 152
    assert decode_gsm7(_reassemble(parts)) == text


@FAST
@given(gsm_text, st.integers(0, 255), st.booleans())
def test_gsm7_split_parse_reassemble(text: str, ref: int, ref16: bool) -> None:
    enc = encode_text(text)
    assert enc.coding == "gsm7"
    parts = split(enc, ref=ref, ref16=ref16)
    assert len(parts) == part_count(enc, ref16=ref16)
    if len(parts) > 1:
        for part in parts:
            concat, body = parse_udh(part)
            assert concat is not None and concat.ref == ref and concat.ref16 is ref16
            assert len(body) <= (152 if ref16 else 153)
            assert not body.endswith(b"\x1b")
    joined = _reassemble(parts)
    assert joined == enc.payload
    assert decode_gsm7(joined) == text


@FAST
@given(any_text, st.booleans())
def test_ucs2_split_keeps_surrogates(text: str, ref16: bool) -> None:
    enc = encode_text(text, prefer="ucs2")
    parts = split(enc, ref=0x0102 if ref16 else 0x42, ref16=ref16)
    for part in parts:
        assert len(part) <= 140
        body = parse_udh(part)[1] if len(parts) > 1 else part
        assert len(body) % 2 == 0
        # strict decode fails on a cut surrogate pair
        body.decode("utf-16-be")
    assert _reassemble(parts) == enc.payload
    assert decode_payload(8, _reassemble(parts)) == text


def test_surrogate_pair_not_split_at_boundary() -> None:
    text = "a" * 66 + "😀" * 5  # the pair would straddle unit 67
    parts = split(encode_text(text), ref=4)
    _, first = parse_udh(parts[0])
    assert first == ("a" * 66).encode("utf-16-be")
    assert decode_payload(8, _reassemble(parts)) == text


# --- parse_udh ------------------------------------------------------------------------


def test_parse_udh_16bit_reference() -> None:
    """aiosmpplib defect: IE 0x08 reference must be read as 16 bits."""
    concat, body = parse_udh(bytes([6, 8, 4, 0x12, 0x34, 3, 2]) + b"xyz")
    assert concat == Concat(ref=0x1234, total=3, seq=2, ref16=True)
    assert body == b"xyz"


def test_parse_udh_skips_other_ies() -> None:
    # port addressing IE 0x05 (4 bytes) then concat IE 0x00
    sm = bytes([11, 0x05, 4, 0x0B, 0x84, 0x23, 0xF0, 0x00, 3, 7, 2, 1]) + b"body"
    assert parse_udh(sm) == (Concat(7, 2, 1, False), b"body")
    assert parse_udh(bytes([4, 0x05, 2, 0, 0]) + b"x") == (None, b"x")
    assert parse_udh(bytes([0])) == (None, b"")


@pytest.mark.parametrize(
    "sm",
    [
        b"",
        bytes([9, 0, 3, 1, 2]),  # UDHL beyond data
        bytes([5, 0, 9, 1, 2, 1]),  # IE length beyond UDH
        bytes([5, 0, 3, 1, 0, 1]),  # zero total
        bytes([5, 0, 3, 1, 2, 3]),  # seq > total
        bytes([5, 0, 3, 1, 2, 0]),  # seq 0
        bytes([4, 0, 2, 1, 2]),  # wrong IE 0x00 length
        bytes([1, 0]),  # truncated IE header
    ],
)
def test_parse_udh_malformed(sm: bytes) -> None:
    with pytest.raises(ValueError):
        parse_udh(sm)


# --- Reassembler ----------------------------------------------------------------------


def test_reassembler_numeric_order_with_many_parts() -> None:
    total = 12
    seqs = list(range(1, total + 1))
    random.Random(5).shuffle(seqs)
    r = Reassembler()
    result = None
    for seq in seqs:
        result = r.add("k", total, seq, f"<{seq}>".encode(), now=1.0)
    assert result == b"".join(f"<{i}>".encode() for i in range(1, total + 1))


def test_reassembler_duplicate_replaces_and_single_part() -> None:
    r = Reassembler()
    assert r.add("k", 2, 1, b"old", 0.0) is None
    assert r.add("k", 2, 1, b"new", 0.0) is None
    assert r.add("k", 2, 2, b"!", 0.0) == b"new!"
    assert r.add("solo", 1, 1, b"x", 0.0) == b"x"
    assert len(r) == 0
    with pytest.raises(ValueError):
        r.add("k", 2, 3, b"", 0.0)


def test_reassembler_expiry() -> None:
    r = Reassembler(timeout=60)
    r.add(("a", 1), 2, 1, b"x", now=0.0)
    r.add(("b", 2), 3, 1, b"y", now=30.0)
    assert r.expire(60.0) == []
    assert r.expire(60.5) == [("a", 1)]
    assert ("a", 1) not in r and ("b", 2) in r
    assert r.expire(1000.0) == [("b", 2)]
    assert len(r) == 0
    # an expired key starts afresh
    assert r.add(("a", 1), 2, 2, b"z", now=1000.0) is None


def test_reassembler_bound() -> None:
    r = Reassembler(max_pending=2)
    r.add(1, 2, 1, b"", 0.0)
    r.add(2, 2, 1, b"", 0.0)
    r.add(2, 2, 1, b"again", 0.0)  # existing key is fine when full
    with pytest.raises(OverflowError):
        r.add(3, 2, 1, b"", 0.0)
    assert r.add(1, 2, 2, b"", 0.0) == b""
    assert r.add(3, 2, 1, b"", 0.0) is None  # room again


# --- decode_payload -------------------------------------------------------------------


def test_decode_payload_codings() -> None:
    assert decode_payload(0, encode_gsm7("Hi €")) == "Hi €"
    assert decode_payload(1, b"abc\xff") == "abc\ufffd"
    assert decode_payload(3, "çé".encode("latin-1")) == "çé"
    assert decode_payload(8, "ж😀".encode("utf-16-be")) == "ж😀"
    assert decode_payload(8, b"\xd8\x00\x00a") == "\ufffda"  # lone surrogate -> U+FFFD
    assert decode_payload(4, b"\x01\xab") == "hex:01ab"
    assert decode_payload(2, b"\xff") == "hex:ff"
    assert decode_payload(0xF0, encode_gsm7("class0")) == "class0"
    assert decode_payload(0xF4, b"\x01") == "hex:01"
    assert decode_payload(0x10, encode_gsm7("flash")) == "flash"
    assert decode_payload(0x18, "ж".encode("utf-16-be")) == "ж"
    assert decode_payload(0xE0, "ж".encode("utf-16-be")) == "ж"


@FAST
@given(st.integers(0, 255), st.binary(max_size=200))
def test_decode_payload_never_raises(data_coding: int, payload: bytes) -> None:
    out = decode_payload(data_coding, payload)
    assert isinstance(out, str)
    out.encode("utf-8")  # always valid Unicode (no lone surrogates)
