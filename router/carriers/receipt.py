"""Delivery receipts: parse a carrier's deliver_sm, build ours.

Carriers disagree on receipts: 10- or 12-digit dates, letters in ``err``,
an empty text with only TLVs, ids in hex in one place and decimal in
another. Parsing here never raises on such input (aiosmpplib defects 2, 3).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from ..smpp.constants import (
    ESM_TYPE_RECEIPT,
    RECEIPT_STAT,
    STAT_TO_STATE,
    MessageState,
    Tag,
)
from ..smpp.pdu import DeliverSm

_FIELD = re.compile(
    rb"(id|sub|dlvrd|submit date|done date|stat|err|text):\s*"
    rb"(.*?)(?=\s+(?:id|sub|dlvrd|submit date|done date|stat|err|text):|\s*$)",
    re.IGNORECASE | re.DOTALL,
)


@dataclass(slots=True, frozen=True)
class CarrierReceipt:
    carrier_id: str
    state: MessageState
    error: str  # carrier's err code as text ("000" when none)


_STATES = frozenset(int(s) for s in MessageState)


def is_receipt(pdu: DeliverSm) -> bool:
    return (pdu.esm_class & 0x3C) in (ESM_TYPE_RECEIPT, 0x08, 0x10, 0x20)


def parse_receipt(pdu: DeliverSm) -> CarrierReceipt | None:
    """The receipt carried by a deliver_sm, TLVs preferred over text; None if none."""
    fields: dict[str, str] = {}
    text = pdu.payload
    tlv_id = pdu.tlv_str(Tag.RECEIPTED_MESSAGE_ID)
    tlv_state = pdu.tlv_int(Tag.MESSAGE_STATE)
    if tlv_id and tlv_state in _STATES and text:
        # The common case: the TLVs say it all; only err comes from the text.
        at = text.find(b"err:")
        if at >= 0:
            err = text[at + 4 : at + 20].split(b" ", 1)[0].decode("latin-1")
            return CarrierReceipt(tlv_id, MessageState(tlv_state), err or "000")
    if text:
        for m in _FIELD.finditer(text):
            key = m.group(1).decode("latin-1").lower()
            if key == "text":
                continue  # never keep the message text from a receipt
            fields.setdefault(key, m.group(2).decode("latin-1").strip())
    carrier_id = pdu.tlv_str(Tag.RECEIPTED_MESSAGE_ID) or fields.get("id", "")
    if not carrier_id:
        return None
    state_val = pdu.tlv_int(Tag.MESSAGE_STATE)
    state: MessageState | None = None
    if state_val is not None:
        try:
            state = MessageState(state_val)
        except ValueError:
            state = None
    if state is None:
        state = STAT_TO_STATE.get(fields.get("stat", "").upper()[:7], MessageState.UNKNOWN)
    err = fields.get("err", "")
    if not err:
        nec = pdu.tlvs.get(Tag.NETWORK_ERROR_CODE)
        err = nec.hex() if nec else "000"
    return CarrierReceipt(carrier_id=carrier_id, state=state, error=err[:16])


def normalise_carrier_id(carrier_id: str) -> str:
    """Case-folded, leading zeros stripped: '00AbC1' and 'abc1' are one id."""
    s = carrier_id.strip().lower().lstrip("0")
    return s or "0"


def alternate_forms(carrier_id: str) -> list[str]:
    """The same id read the other way (hex <-> decimal), for carriers that mix them."""
    s = normalise_carrier_id(carrier_id)
    out: list[str] = []
    if s.isdigit() and len(s) <= 20:
        out.append(normalise_carrier_id(format(int(s), "x")))
    try:
        if len(s) <= 16:
            out.append(str(int(s, 16)))
    except ValueError:
        pass
    return [o for o in out if o != s]


def _smpp_date(ts: float) -> str:
    return time.strftime("%y%m%d%H%M", time.gmtime(ts))


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
    delivered = parts if state is MessageState.DELIVERED else 0
    body = (
        f"id:{message_id} sub:{parts:03d} dlvrd:{delivered:03d} "
        f"submit date:{_smpp_date(submitted_at)} done date:{_smpp_date(done_at)} "
        f"stat:{RECEIPT_STAT[state]} err:{error[:3]:0>3} text:"
    ).encode("ascii", "replace")
    pdu = DeliverSm(
        source_addr_ton=dest_ton,
        source_addr_npi=dest_npi,
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
