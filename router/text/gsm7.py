"""GSM 03.38 (3GPP TS 23.038) 7-bit default alphabet: test, count, encode, decode, pack.

Pure functions on the per-message hot path: every table is built once at import and the
per-character work is done by C-level codecs (``codecs.charmap_encode`` / ``charmap_decode``),
``frozenset`` and ``str.count``. Nothing here performs I/O or logs anything; error messages
name positions only, never message content.

"Unpacked" means one septet per octet (how SMPP ``data_coding`` 0 normally carries GSM text);
"packed" means the 7-bit air-interface packing of TS 23.038 section 6.1.2.1.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

__all__ = [
    "ESC",
    "GSM7_BASIC",
    "GSM7_CHARSET",
    "GSM7_EXTENSION",
    "decode_gsm7",
    "encode_gsm7",
    "gsm7_septet_len",
    "is_gsm7",
    "pack_septets",
    "unpack_septets",
]

ESC: Final = 0x1B
"""Escape to the extension table (also the code of the placeholder in ``GSM7_BASIC``)."""

# Index == septet value. Position 0x1B is the escape code, not a character; it is kept as
# U+001B only as a placeholder and is NOT part of the alphabet (see GSM7_CHARSET).
GSM7_BASIC: Final[str] = (
    "@£$¥èéùìòÇ\nØø\rÅå"
    "Δ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ"
    " !\"#¤%&'()*+,-./"
    "0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNO"
    "PQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmno"
    "pqrstuvwxyzäöñüà"
)
assert len(GSM7_BASIC) == 128

GSM7_EXTENSION: Final[Mapping[int, str]] = MappingProxyType(
    {
        0x0A: "\f",
        0x14: "^",
        0x28: "{",
        0x29: "}",
        0x2F: "\\",
        0x3C: "[",
        0x3D: "~",
        0x3E: "]",
        0x40: "|",
        0x65: "€",
    }
)
"""Extension table: septet following ESC -> character. Each costs two septets."""

_EXT_CHARS: Final = tuple(GSM7_EXTENSION.values())

GSM7_CHARSET: Final[frozenset[str]] = frozenset(
    c for i, c in enumerate(GSM7_BASIC) if i != ESC
) | frozenset(_EXT_CHARS)
"""Every character representable in the default alphabet (basic + extension)."""

# ord(char) -> septet(s); int for basic, bytes for ESC pairs. Used by charmap_encode (C loop).
_ENCODE_MAP: Final[dict[int, int | bytes]] = {
    ord(c): i for i, c in enumerate(GSM7_BASIC) if i != ESC
}
_ENCODE_MAP.update({ord(c): bytes((ESC, code)) for code, c in GSM7_EXTENSION.items()})

# byte -> char for charmap_decode: 0x00-0x7F per table (0x1B kept as a marker, resolved
# afterwards), 0x80-0xFF are not septets -> U+FFFD.
_DECODE_TABLE: Final[str] = GSM7_BASIC + "\ufffd" * 128

# Basic char that follows ESC -> extension char. Unknown followers decode as the basic char
# itself (TS 23.038 note on the extension table); ESC ESC and a trailing ESC -> space.
_EXT_BY_BASIC: Final[dict[str, str]] = {GSM7_BASIC[code]: c for code, c in GSM7_EXTENSION.items()}
_ESC_RE: Final = re.compile("\x1b(.?)", re.DOTALL)


def _resolve_escape(m: re.Match[str]) -> str:
    follower = m.group(1)
    if not follower or follower == "\x1b":
        return " "
    return _EXT_BY_BASIC.get(follower, follower)


def is_gsm7(text: str) -> bool:
    """True when every character of ``text`` is in the GSM 03.38 alphabet (incl. extension)."""
    return GSM7_CHARSET.issuperset(text)


def gsm7_septet_len(text: str) -> int:
    """Septets needed for ``text``: one per basic character, two per extension character.

    Characters outside the alphabet count as one; call :func:`is_gsm7` first if unsure.
    """
    n = len(text)
    if text.isalnum():  # common fast path: no extension char can be present
        return n
    for c in _EXT_CHARS:
        n += text.count(c)
    return n


def encode_gsm7(text: str) -> bytes:
    """Encode to unpacked septets (one per octet, ESC 0x1B before extension characters).

    Raises ``ValueError`` naming the position (never the character) of the first character
    outside the alphabet.
    """
    try:
        return codecs.charmap_encode(text, "strict", _ENCODE_MAP)[0]
    except UnicodeEncodeError as exc:
        # `from None`: the UnicodeEncodeError carries the whole text; never chain it.
        raise ValueError(
            f"character at position {exc.start} is not in the GSM 03.38 alphabet"
        ) from None


def decode_gsm7(data: bytes) -> str:
    """Decode unpacked septets. Tolerant, never raises.

    ESC + unknown code -> the basic character for that code (TS 23.038); ESC ESC or a
    trailing ESC -> space; octets above 0x7F -> U+FFFD.
    """
    text: str = codecs.charmap_decode(data, "strict", _DECODE_TABLE)[0]
    if "\x1b" in text:
        text = _ESC_RE.sub(_resolve_escape, text)
    return text


def pack_septets(data: bytes, fill_bits: int = 0) -> bytes:
    """Pack septets (values 0..0x7F) into 7-bit packed octets, LSB first.

    ``fill_bits`` (0..6) zero bits are inserted first, as after a UDH so that the text
    starts on a septet boundary. Raises ``ValueError`` for values > 0x7F or bad fill_bits.
    """
    if not 0 <= fill_bits <= 6:
        raise ValueError("fill_bits must be in 0..6")
    if data and max(data) > 0x7F:
        raise ValueError("septet value above 0x7F")
    n = 0
    for septet in reversed(data):
        n = (n << 7) | septet
    nbits = fill_bits + 7 * len(data)
    return (n << fill_bits).to_bytes((nbits + 7) // 8, "little")


def unpack_septets(data: bytes, count: int, fill_bits: int = 0) -> bytes:
    """Unpack ``count`` septets from packed octets, skipping ``fill_bits`` leading bits.

    Raises ``ValueError`` if ``data`` is too short for ``count`` septets.
    """
    if not 0 <= fill_bits <= 6:
        raise ValueError("fill_bits must be in 0..6")
    if count < 0 or fill_bits + 7 * count > 8 * len(data):
        raise ValueError("packed data too short for the septet count")
    n = int.from_bytes(data, "little") >> fill_bits
    return bytes((n >> (7 * i)) & 0x7F for i in range(count))
