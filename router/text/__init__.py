"""Text handling for SMS: GSM 03.38 (7-bit default alphabet) and UCS2.

Encoding choice, septet counting, unpacked/packed GSM 7-bit, concatenation UDH build and
parse, reassembly of multipart messages, and decoding of any SMPP data_coding to text.

Everything here is pure and on the per-message hot path: tables are precomputed at import,
per-character work is left to C-level codecs, there is no I/O, time is passed in rather than
read from a clock, and this package never logs anything (errors carry positions, never
message content).
"""

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

__all__ = [
    "GSM7_BASIC",
    "GSM7_CHARSET",
    "GSM7_EXTENSION",
    "Concat",
    "Encoded",
    "Reassembler",
    "decode_gsm7",
    "decode_payload",
    "encode_gsm7",
    "encode_text",
    "gsm7_septet_len",
    "is_gsm7",
    "pack_septets",
    "parse_udh",
    "part_count",
    "split",
    "unpack_septets",
]
