"""SMS encoding choice, concatenation (UDH) split/parse, reassembly and payload decoding.

Pure functions and one in-memory state holder (:class:`Reassembler`); no I/O, no clock
(time is passed in), and nothing here logs anything. Error messages never contain message
content.

Payload conventions follow SMPP: GSM 03.38 text is carried unpacked (one septet per octet,
data_coding 0); UCS2 is UTF-16-BE (data_coding 8). Concatenated parts carry a UDH with
IE 0x00 (8-bit reference, 6 bytes) or IE 0x08 (16-bit reference, 7 bytes); the caller sets
esm_class UDHI (0x40) on every part returned by :func:`split` when there is more than one.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Final

from router.text.gsm7 import ESC, GSM7_BASIC, decode_gsm7, encode_gsm7, is_gsm7
from router.value import value

__all__ = [
    "Concat",
    "Encoded",
    "Reassembler",
    "decode_payload",
    "encode_text",
    "parse_udh",
    "part_count",
    "split",
]

DC_GSM7: Final = 0x00
DC_IA5: Final = 0x01
DC_BINARY2: Final = 0x02
DC_LATIN1: Final = 0x03
DC_BINARY: Final = 0x04
DC_UCS2: Final = 0x08

MAX_PARTS: Final = 255

# coding -> (single-part limit, per-part limit with 6-byte UDH, with 7-byte UDH), in
# payload BYTES (gsm7 unpacked: 1 byte == 1 septet; ucs2: 2 bytes per unit).
_LIMITS: Final[dict[str, tuple[int, int, int]]] = {
    "gsm7": (160, 153, 152),  # 140 octets = 160 septets; UDH 6 -> 7 septets, 7 -> 8
    "ucs2": (140, 134, 132),  # 70 / 67 / 66 UTF-16 code units
    "latin1": (140, 134, 133),
    "binary": (140, 134, 133),
}
# ASCII characters whose GSM 03.38 septet is their own ASCII code: letters, digits,
# space, CR, LF and most punctuation (not @ $ _ ` [ \ ] ^ { | } ~ or DEL). A text made
# only of these encodes to its ASCII bytes; checking that with bytes.translate is one C
# pass instead of a charmap lookup per character (the common HTTP text).
_GSM7_AS_ASCII: Final[bytes] = bytes(c for c in range(128) if c != ESC and GSM7_BASIC[c] == chr(c))
_DATA_CODING: Final[dict[str, int]] = {
    "gsm7": DC_GSM7,
    "ucs2": DC_UCS2,
    "latin1": DC_LATIN1,
    "binary": DC_BINARY,
}


@value()  # immutable; see router/value.py
class Encoded:
    """An encoded message body, ready to be split into short_message values."""

    coding: str  # "gsm7" | "ucs2" | "latin1" | "binary"
    data_coding: int  # SMPP data_coding value 0x00 / 0x08 / 0x03 / 0x04
    payload: bytes
    units: int  # septets for gsm7, UTF-16 code units for ucs2, bytes otherwise


@dataclass(frozen=True, slots=True)
class Concat:
    """Concatenation info from a UDH (IE 0x00 or 0x08)."""

    ref: int
    total: int
    seq: int
    ref16: bool


def _ucs2(text: str) -> Encoded:
    try:
        payload = text.encode("utf-16-be")
    except UnicodeEncodeError as exc:  # lone surrogate in the str
        raise ValueError(f"character at position {exc.start} cannot be encoded as UTF-16") from None
    return Encoded("ucs2", DC_UCS2, payload, len(payload) // 2)


def encode_text(text: str, *, prefer: str | None = None) -> Encoded:
    """Choose the encoding for ``text``.

    ``prefer`` None or "gsm7": GSM 03.38 (data_coding 0) when every character fits, else
    UCS2. "ucs2": always UCS2. "latin1": ISO-8859-1 (data_coding 3) when every character
    fits, else UCS2. UCS2 is UTF-16-BE, so characters beyond the BMP (emoji) become
    surrogate pairs (2 units). Raises ``ValueError`` for an unknown ``prefer`` or a str
    holding a lone surrogate.
    """
    if prefer is None or prefer == "gsm7":
        if text.isascii():
            raw = text.encode("ascii")
            if not raw.translate(None, _GSM7_AS_ASCII):  # nothing outside the shared set
                return Encoded("gsm7", DC_GSM7, raw, len(raw))
        if is_gsm7(text):
            payload = encode_gsm7(text)
            return Encoded("gsm7", DC_GSM7, payload, len(payload))
        return _ucs2(text)
    if prefer == "ucs2":
        return _ucs2(text)
    if prefer == "latin1":
        try:
            payload = text.encode("latin-1")
        except UnicodeEncodeError:
            return _ucs2(text)
        return Encoded("latin1", DC_LATIN1, payload, len(payload))
    raise ValueError("prefer must be None, 'gsm7', 'ucs2' or 'latin1'")


def _cuts(enc: Encoded, ref16: bool) -> list[int]:
    """End offsets of each part in ``enc.payload`` (len == number of parts)."""
    payload = enc.payload
    size = len(payload)
    try:
        single, per8, per16 = _LIMITS[enc.coding]
    except KeyError:
        raise ValueError("unknown coding") from None
    if size <= single:
        return [size]
    per = per16 if ref16 else per8
    gsm7 = enc.coding == "gsm7"
    ucs2 = enc.coding == "ucs2"
    cuts: list[int] = []
    start = 0
    while size - start > per:
        end = start + per
        if gsm7 and payload[end - 1] == ESC:
            # Never split ESC + char. A run of ESCs starts on a character boundary
            # (ESC ESC is itself a pair), so an odd run ends with a lead ESC.
            k = end - 1
            while k >= start and payload[k] == ESC:
                k -= 1
            if (end - 1 - k) % 2:
                end -= 1
        elif ucs2 and 0xD8 <= payload[end - 2] <= 0xDB:
            # Never split a surrogate pair: a part must not end on a high surrogate.
            end -= 2
        cuts.append(end)
        start = end
    cuts.append(size)
    return cuts


def part_count(enc: Encoded, *, ref16: bool = False) -> int:
    """Number of short messages :func:`split` produces for ``enc``.

    Single part up to 160 septets / 70 UCS2 units / 140 bytes; otherwise 153 / 67 / 134
    per part with the 6-byte UDH (152 / 66 / 133 with ``ref16``), never cutting an escape
    pair or a surrogate pair (so it can exceed the naive ceiling division).
    """
    return len(_cuts(enc, ref16))


def split(enc: Encoded, *, ref: int, ref16: bool = False) -> list[bytes]:
    """Split into complete short_message values.

    One part -> ``[payload]`` without UDH. Several -> each starts with
    ``05 00 03 ref total seq`` (or ``06 08 04 refhi reflo total seq`` with ``ref16``).
    Raises ``ValueError`` for more than 255 parts or a reference out of range.
    """
    cuts = _cuts(enc, ref16)
    payload = enc.payload
    total = len(cuts)
    if total == 1:
        return [payload]
    if total > MAX_PARTS:
        raise ValueError(f"message needs {total} parts, more than {MAX_PARTS}")
    if ref16:
        if not 0 <= ref <= 0xFFFF:
            raise ValueError("16-bit concatenation reference out of range")
        head = bytes((6, 0x08, 4, ref >> 8, ref & 0xFF, total))
    else:
        if not 0 <= ref <= 0xFF:
            raise ValueError("8-bit concatenation reference out of range")
        head = bytes((5, 0x00, 3, ref, total))
    parts: list[bytes] = []
    start = 0
    for seq, end in enumerate(cuts, 1):
        parts.append(head + bytes((seq,)) + payload[start:end])
        start = end
    return parts


def parse_udh(short_message: bytes) -> tuple[Concat | None, bytes]:
    """Parse the UDH at the start of ``short_message`` (caller saw esm_class UDHI 0x40).

    Returns the concatenation info (IE 0x00 8-bit ref or IE 0x08 16-bit ref; the last one
    wins if repeated, other IEs are skipped) or None, and the payload after the UDH.
    Raises ``ValueError`` for a malformed UDH.
    """
    if not short_message:
        raise ValueError("UDH indicated but short_message is empty")
    udhl = short_message[0]
    end = 1 + udhl
    if end > len(short_message):
        raise ValueError(f"UDH length {udhl} exceeds short_message length")
    concat: Concat | None = None
    pos = 1
    while pos < end:
        if pos + 2 > end:
            raise ValueError(f"truncated information element at UDH offset {pos}")
        iei = short_message[pos]
        iel = short_message[pos + 1]
        data_start = pos + 2
        pos = data_start + iel
        if pos > end:
            raise ValueError(f"information element 0x{iei:02X} length {iel} exceeds UDH")
        if iei == 0x00:
            if iel != 3:
                raise ValueError(f"concatenation IE 0x00 has length {iel}, expected 3")
            ref = short_message[data_start]
            total, seq = short_message[data_start + 1], short_message[data_start + 2]
            ref16 = False
        elif iei == 0x08:
            if iel != 4:
                raise ValueError(f"concatenation IE 0x08 has length {iel}, expected 4")
            ref = (short_message[data_start] << 8) | short_message[data_start + 1]
            total, seq = short_message[data_start + 2], short_message[data_start + 3]
            ref16 = True
        else:
            continue
        if total == 0:
            raise ValueError("concatenation total is zero")
        if seq == 0 or seq > total:
            raise ValueError(f"concatenation sequence {seq} outside 1..{total}")
        concat = Concat(ref, total, seq, ref16)
    return concat, short_message[end:]


@dataclass(slots=True)
class _Pending:
    first_seen: float
    total: int
    parts: dict[int, bytes] = field(default_factory=dict)


class Reassembler:
    """Collects concatenated parts until complete.

    Keys are opaque hashables chosen by the caller, typically
    ``(account, source, destination, ref)``. Time is passed in (use a monotonic clock);
    a set expires ``timeout`` seconds after its first part. At most ``max_pending``
    incomplete sets are held; beyond that :meth:`add` raises ``OverflowError``.
    """

    __slots__ = ("timeout", "max_pending", "_pending")

    def __init__(self, timeout: float = 60.0, max_pending: int = 10000) -> None:
        if timeout <= 0 or max_pending < 1:
            raise ValueError("timeout must be > 0 and max_pending >= 1")
        self.timeout = timeout
        self.max_pending = max_pending
        # Insertion order == first-seen order (keys are re-inserted when restarted).
        self._pending: dict[Hashable, _Pending] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._pending

    def add(self, key: Hashable, total: int, seq: int, payload: bytes, now: float) -> bytes | None:
        """Store one part; return the joined payload (in numeric seq order) when complete.

        A duplicate seq replaces the earlier part. A part whose ``total`` differs from the
        pending set's restarts the set (the reference was reused). Raises ``ValueError``
        for seq outside 1..total and ``OverflowError`` when a new set would exceed
        ``max_pending``.
        """
        if not 1 <= seq <= total:
            raise ValueError(f"sequence {seq} outside 1..{total}")
        if total == 1:
            self._pending.pop(key, None)
            return payload
        pending = self._pending.get(key)
        if pending is not None and pending.total != total:
            del self._pending[key]
            pending = None
        if pending is None:
            if len(self._pending) >= self.max_pending:
                raise OverflowError(
                    f"reassembly buffer full ({self.max_pending} incomplete messages)"
                )
            pending = _Pending(now, total)
            self._pending[key] = pending
        parts = pending.parts
        parts[seq] = payload
        if len(parts) < total:
            return None
        del self._pending[key]
        return b"".join([parts[i] for i in range(1, total + 1)])

    def expire(self, now: float) -> list[Hashable]:
        """Drop incomplete sets whose first part is more than ``timeout`` seconds old."""
        cutoff = now - self.timeout
        expired: list[Hashable] = []
        for key, pending in self._pending.items():
            if pending.first_seen >= cutoff:
                break  # first-seen order: everything after is newer
            expired.append(key)
        for key in expired:
            del self._pending[key]
        return expired


_TEXT_CODECS: Final[dict[int, str]] = {
    # SMPP 3.4 data_coding values that are not GSM 03.38 DCS groups.
    0x01: "ascii",  # IA5
    0x03: "latin-1",
    0x05: "shift_jis",  # JIS; SMSCs send Shift-JIS in practice
    0x06: "iso8859_5",  # Cyrillic
    0x07: "iso8859_8",  # Latin/Hebrew
    0x0A: "iso2022_jp",  # music codes
    0x0E: "euc_kr",  # KS C 5601
}
_BINARY_CODINGS: Final = frozenset((0x02, 0x04, 0x09, 0x0D))  # octets, pictogram, JIS X 0212


def _hex(payload: bytes) -> str:
    return "hex:" + payload.hex()


def _ucs2_decode(payload: bytes) -> str:
    # 'replace' turns lone surrogates / an odd trailing byte into U+FFFD, so the result is
    # always valid Unicode (storable in PostgreSQL, encodable as UTF-8).
    return payload.decode("utf-16-be", "replace")


def decode_payload(data_coding: int, payload: bytes) -> str:
    """Decode a short_message / message_payload body to text. Never raises.

    0 GSM 03.38 unpacked, 1 IA5 (ASCII), 3 Latin-1, 8 UCS2 (UTF-16-BE), 2/4 binary ->
    ``"hex:..."``; other SMPP codings (5, 6, 7, 10, 14) via their Python codecs. Anything
    else is read as a GSM 03.38 data coding scheme: general/auto-deletion groups
    (0x00-0x7F) by alphabet bits 3..2 (compressed -> hex), reserved groups (0x80-0xBF) as
    GSM 7-bit, MWI groups (0xC0-0xDF) GSM 7-bit, 0xE0-0xEF UCS2, 0xF0-0xFF by bit 2
    (GSM 7-bit or 8-bit data -> hex).
    """
    dc = data_coding & 0xFF
    if dc == DC_GSM7:
        return decode_gsm7(payload)
    if dc == DC_UCS2:
        return _ucs2_decode(payload)
    codec = _TEXT_CODECS.get(dc)
    if codec is not None:
        return payload.decode(codec, "replace")
    if dc in _BINARY_CODINGS:
        return _hex(payload)
    group = dc >> 4
    if group <= 0x7:  # 00xx / 01xx general data coding (incl. SMPP-reserved 0x0B/0x0C/0x0F)
        if dc & 0x20:  # compressed text: not decodable here
            return _hex(payload)
        alphabet = (dc >> 2) & 0x3
        if alphabet == 1:
            return _hex(payload)
        if alphabet == 2:
            return _ucs2_decode(payload)
        return decode_gsm7(payload)  # 0 = GSM 7-bit, 3 = reserved -> assume GSM 7-bit
    if group == 0xE:
        return _ucs2_decode(payload)
    if group == 0xF:
        return _hex(payload) if dc & 0x04 else decode_gsm7(payload)
    return decode_gsm7(payload)  # 0x8-0xB reserved, 0xC/0xD MWI: GSM 7-bit
