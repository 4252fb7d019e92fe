"""Delivery receipts: parse a carrier's deliver_sm, build ours.

Carriers disagree on receipts: 10- or 12-digit dates, letters in ``err``,
an empty text with only TLVs, ids in hex in one place and decimal in
another. Parsing here never raises on such input (aiosmpplib defects 2, 3).
"""

from __future__ import annotations

import re
import time

from ..smpp.constants import (
    ESM_TYPE_RECEIPT,
    RECEIPT_STAT,
    STAT_TO_STATE,
    MessageState,
    Tag,
)
from ..smpp.pdu import DeliverSm
from ..value import value

_FIELD = re.compile(
    rb"(id|sub|dlvrd|submit date|done date|stat|err|text):\s*"
    rb"(.*?)(?=\s+(?:id|sub|dlvrd|submit date|done date|stat|err|text):|\s*$)",
    re.IGNORECASE | re.DOTALL,
)
# The text almost every carrier sends, fields in the standard order, each
# value one non-empty word. When it matches, the fields are exactly those
# _FIELD would find (its first id/stat/err), in one match instead of eight;
# anything else (other order, empty values, blanks after a colon) goes to _FIELD.
_STANDARD = re.compile(
    rb"id:(\S+)\s+sub:\S+\s+dlvrd:\S+\s+submit date:\S+\s+done date:\S+\s+"
    rb"stat:(\S+)\s+err:(\S+)(?:\s+text:|\s*$)",
    re.IGNORECASE,
)


@value()  # immutable; see router/value.py
class CarrierReceipt:
    carrier_id: str
    state: MessageState
    error: str  # carrier's err code as text ("000" when none)


_STATE_OF = {int(s): s for s in MessageState}  # MessageState(n) costs ~0.3 us a call
_RECEIPT_TYPES = frozenset({ESM_TYPE_RECEIPT, 0x08, 0x10, 0x20})
_TAG_RECEIPTED_ID = int(Tag.RECEIPTED_MESSAGE_ID)
_TAG_STATE = int(Tag.MESSAGE_STATE)
_TAG_PAYLOAD = int(Tag.MESSAGE_PAYLOAD)
_TAG_NETWORK_ERROR = int(Tag.NETWORK_ERROR_CODE)
_UNKNOWN = MessageState.UNKNOWN
_DELIVERED = MessageState.DELIVERED


def is_receipt(pdu: DeliverSm) -> bool:
    return (pdu.esm_class & 0x3C) in _RECEIPT_TYPES


def _text_fields(text: bytes) -> dict[str, str]:
    """id, stat, err, ... of a receipt text (first occurrence wins; never the message text)."""
    m = _STANDARD.match(text)
    if m is not None:
        return {
            "id": m.group(1).decode("latin-1"),
            "stat": m.group(2).decode("latin-1"),
            "err": m.group(3).decode("latin-1"),
        }
    fields: dict[str, str] = {}
    for m in _FIELD.finditer(text):
        key = m.group(1).decode("latin-1").lower()
        if key == "text":
            continue  # never keep the message text from a receipt
        fields.setdefault(key, m.group(2).decode("latin-1").strip())
    return fields


def parse_receipt(pdu: DeliverSm) -> CarrierReceipt | None:
    """The receipt carried by a deliver_sm, TLVs preferred over text; None if none."""
    tlvs = pdu.tlvs
    text = tlvs.get(_TAG_PAYLOAD)
    if text is None:
        text = pdu.short_message
    raw = tlvs.get(_TAG_RECEIPTED_ID)
    # A C-octet string: what follows a NUL is padding (and PostgreSQL text,
    # where ids are looked up, refuses NUL).
    tlv_id = None if raw is None else raw.split(b"\x00", 1)[0].decode("latin-1")
    raw = tlvs.get(_TAG_STATE)
    state = _STATE_OF.get(int.from_bytes(raw, "big")) if raw else None
    if tlv_id and state is not None and text:
        # The common case: the TLVs say it all; only err comes from the text.
        at = text.find(b"err:")
        if at >= 0:
            code = text[at + 4 : at + 20].split(b" ", 1)[0].split(b"\x00", 1)[0]
            return CarrierReceipt(tlv_id, state, code.decode("latin-1") or "000")
    fields = _text_fields(text) if text else {}
    carrier_id = tlv_id or fields.get("id", "").split("\x00", 1)[0]
    if not carrier_id:
        return None
    if state is None:
        state = STAT_TO_STATE.get(fields.get("stat", "").upper()[:7], _UNKNOWN)
    err = fields.get("err", "").split("\x00", 1)[0]
    if not err:
        nec = tlvs.get(_TAG_NETWORK_ERROR)
        err = nec.hex() if nec else "000"
    return CarrierReceipt(carrier_id, state, err[:16])


def normalise_carrier_id(carrier_id: str) -> str:
    """Case-folded, leading zeros stripped: '00AbC1' and 'abc1' are one id.
    Read as a C-octet string: nothing from a NUL on (PostgreSQL text, where
    ids are kept and looked up, refuses NUL)."""
    s = carrier_id.split("\x00", 1)[0].strip().lower().lstrip("0")
    return s or "0"


def alternate_forms(carrier_id: str) -> list[str]:
    """The same id read the other way (hex <-> decimal), for carriers that mix them."""
    s = normalise_carrier_id(carrier_id)
    out: list[str] = []
    if s.isascii() and s.isdigit() and len(s) <= 20:  # not '²', which int() refuses
        out.append(normalise_carrier_id(format(int(s), "x")))
    try:
        if len(s) <= 16:
            out.append(str(int(s, 16)))
    except ValueError:
        pass
    return [o for o in out if o != s]


_DATES: dict[int, str] = {}  # minute -> "YYMMDDhhmm"; receipts come in bursts of a few minutes
_COUNTS = {n: f"{n:03d}" for n in range(256)}
_STATE_OCTET = {s: bytes((int(s),)) for s in MessageState}


def _smpp_date(ts: float) -> str:
    minute = int(ts // 60)
    text = _DATES.get(minute)
    if text is None:
        if len(_DATES) >= 1024:
            _DATES.clear()
        text = _DATES[minute] = time.strftime("%y%m%d%H%M", time.gmtime(minute * 60))
    return text


def build_receipt(
    *,
    message_id: str,
    state: MessageState,
    error: str,
    submitted_at: float,
    done_at: float,
    source: str,
    destination: str,
    source_ton: int = 1,
    source_npi: int = 1,
    dest_ton: int = 1,
    dest_npi: int = 1,
    parts: int = 1,
) -> DeliverSm:
    """Our receipt to a customer: standard text + receipted_message_id/message_state.

    Receipts travel from the handset's side, so source and destination are
    swapped relative to the original submit. The text field is left empty:
    echoing message text into receipts would copy personal data.
    """
    sub = _COUNTS.get(parts) or f"{parts:03d}"
    dlvrd = sub if state is _DELIVERED else "000"
    err = error[:3]
    if len(err) < 3:
        err = err.rjust(3, "0")
    body = (
        f"id:{message_id} sub:{sub} dlvrd:{dlvrd} "
        f"submit date:{_smpp_date(submitted_at)} done date:{_smpp_date(done_at)} "
        f"stat:{RECEIPT_STAT[state]} err:{err} text:"
    ).encode("ascii", "replace")
    return DeliverSm.make(
        dest_ton,
        dest_npi,
        destination,
        source_ton,
        source_npi,
        source,
        ESM_TYPE_RECEIPT,
        0,
        0,
        body,
        {
            _TAG_RECEIPTED_ID: message_id.encode("latin-1") + b"\x00",
            _TAG_STATE: _STATE_OCTET[state],
        },
    )
