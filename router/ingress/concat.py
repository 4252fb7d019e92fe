"""Reassembly of messages a customer split itself (SMPP concatenation).

A customer may send one long text as N submit_sm, each carrying a UDH
concatenation IE (0x00, 8-bit reference; 0x08, 16-bit) or the SAR TLVs
(sar_msg_ref_num / sar_total_segments / sar_segment_seqnum). Each part is
answered at once with its own id, as soon as the engine holds it durably;
this room keeps the held parts, grouped by (account, source, destination,
scheme, reference, total), until

* the group is complete: the front door releases ONE combined Message
  (id of part 1, ``part_ids`` of every part in segment order), so the
  message is routed once, goes to one carrier and has one traffic-log row;
* its time is up (``smpp.reassembly_timeout`` after its first part), the
  buffer is full, or the front door stops: each part goes on its own.

A part is never dropped. Sans-IO: time comes in as an argument; nothing here
logs, and nothing keeps content beyond the held Messages themselves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Final

from ..model import Message
from ..smpp.constants import ESM_UDHI, Tag
from ..smpp.constants import Status as Smpp
from ..smpp.errors import SmppError
from ..text.segment import Concat, decode_payload

UDH8: Final = "udh8"  # UDH IE 0x00, the customer's own segments go out as sent
UDH16: Final = "udh16"  # UDH IE 0x08
SAR: Final = "sar"  # SAR TLVs; the combined message gets a UDH of ours
SAR_TAGS: Final = frozenset((Tag.SAR_MSG_REF_NUM, Tag.SAR_TOTAL_SEGMENTS, Tag.SAR_SEGMENT_SEQNUM))
_SAR_SIZES: Final = {Tag.SAR_MSG_REF_NUM: 2, Tag.SAR_TOTAL_SEGMENTS: 1, Tag.SAR_SEGMENT_SEQNUM: 1}
_UDH8_LEN: Final = 6  # UDHL + IE 0x00 (5)


def fits_one_sms(gsm7: bool, udh_len: int, body_len: int) -> bool:
    """Does a UDH of ``udh_len`` octets (UDHL included) plus a body fit one
    SMS? GSM 7-bit counts septets: the UDH is padded to a septet boundary."""
    if gsm7:
        return (udh_len * 8 + 6) // 7 + body_len <= 160
    return udh_len + body_len <= 140


def sar_fields(tlvs: dict[int, bytes]) -> tuple[int, int, int] | None:
    """(reference, total, seqnum) from the SAR TLVs, None when there are none.

    All three or none (ESME_RMISSINGOPTPARAM); each of its SMPP 3.4 size,
    total >= 1 and seqnum in 1..total (ESME_RINVOPTPARAMVAL)."""
    if not tlvs:
        return None
    present = [t for t in _SAR_SIZES if t in tlvs]
    if not present:
        return None
    if len(present) != len(_SAR_SIZES):
        raise SmppError("incomplete SAR TLVs", Smpp.ESME_RMISSINGOPTPARAM)
    for tag, size in _SAR_SIZES.items():
        if len(tlvs[tag]) != size:
            raise SmppError("SAR TLV of the wrong size", Smpp.ESME_RINVOPTPARAMVAL)
    ref = int.from_bytes(tlvs[Tag.SAR_MSG_REF_NUM], "big")
    total = tlvs[Tag.SAR_TOTAL_SEGMENTS][0]
    seq = tlvs[Tag.SAR_SEGMENT_SEQNUM][0]
    if total == 0 or not 1 <= seq <= total:
        raise SmppError("SAR segment number outside 1..total", Smpp.ESME_RINVOPTPARAMVAL)
    return ref, total, seq


@dataclass(frozen=True, slots=True)
class PartRef:
    """Where one submit sits in a message its customer split."""

    scheme: str  # UDH8 | UDH16 | SAR
    ref: int
    total: int  # 2..255
    seq: int  # 1..total
    body_at: int  # the text starts here in the part's only segment (after any UDH)
    gsm7: bool  # data_coding 0: lengths count septets


def locate(
    payload: bytes,
    concat: Concat | None,
    body_at: int,
    tlvs: dict[int, bytes],
    gsm7: bool,
) -> PartRef | None:
    """The part a submit is, or None for a whole message.

    ``concat`` and ``body_at`` come from the UDH when esm_class has UDHI
    (body_at 0 otherwise); the caller has checked that such a segment fits.
    A concatenation IE wins over SAR TLVs sent beside it (those are still
    checked: an invalid TLV is an invalid PDU). A SAR part must fit one SMS
    with our 8-bit concatenation UDH in front (plus any UDH of its own),
    whether it came as short_message or message_payload: ESME_RINVMSGLEN
    otherwise. Total 1 (a "1 of 1" part) is a whole message."""
    sar = sar_fields(tlvs)
    if concat is not None:
        if concat.total == 1:
            return None
        return PartRef(
            UDH16 if concat.ref16 else UDH8, concat.ref, concat.total, concat.seq, body_at, gsm7
        )
    if sar is None:
        return None
    ref, total, seq = sar
    if total == 1:
        return None
    # body_at > 0: UDHI with other IEs (e.g. ports); they stay, after ours.
    if not fits_one_sms(gsm7, _UDH8_LEN + max(0, body_at - 1), len(payload) - body_at):
        raise SmppError("SAR segment longer than one SMS", Smpp.ESME_RINVMSGLEN)
    return PartRef(SAR, ref, total, seq, body_at, gsm7)


@dataclass(frozen=True, slots=True)
class HeldPart:
    """A durable part the engine holds, waiting for its siblings."""

    msg: Message  # one segment, its own id
    part: PartRef

    @property
    def body(self) -> bytes:
        return self.msg.segments[0][self.part.body_at :]


GroupKey = tuple[Hashable, ...]


@dataclass(slots=True)
class Group:
    key: GroupKey
    deadline: float
    parts: dict[int, HeldPart]

    def in_order(self) -> list[HeldPart]:
        return [self.parts[s] for s in sorted(self.parts)]


@dataclass(slots=True)
class Outcome:
    """What :meth:`ConcatBuffer.add` decided; the caller releases it."""

    combined: list[HeldPart] | None = None  # a complete group, in segment order
    alone: list[tuple[HeldPart, str]] = dataclasses.field(default_factory=list)  # (part, why)


def group_key(hp: HeldPart) -> GroupKey:
    m, p = hp.msg, hp.part
    return (m.account_id, m.source, m.destination, p.scheme, p.ref, p.total)


class ConcatBuffer:
    """Held parts by group, at most ``max_parts`` of them router-wide.

    Decisions on odd input (none of them drops a part):

    * a seqnum already held, same octets: a resend; the new part goes on its
      own (``duplicate``) and the group goes on;
    * a seqnum already held, other octets: the customer reused the reference
      for a new message; the old group's parts go on their own (``reused``)
      and a new group starts with this part;
    * a part whose data_coding or message class differs from its group's:
      on its own (``mismatch``);
    * a different total: another key, so another group (it times out alone);
    * the buffer full: on its own (``buffer_full``), unless it completes
      its group (that frees room rather than taking it).
    """

    def __init__(self, timeout: float, max_parts: int) -> None:
        self.timeout = timeout
        self.max_parts = max_parts
        # Insertion order == first-part order == deadline order (one timeout).
        self.groups: dict[GroupKey, Group] = {}
        self.by_id: dict[str, HeldPart] = {}

    @property
    def held(self) -> int:
        return len(self.by_id)

    def find(self, message_id: str) -> HeldPart | None:
        return self.by_id.get(message_id)

    def add(self, hp: HeldPart, now: float) -> Outcome:
        out = Outcome()
        key = group_key(hp)
        group = self.groups.get(key)
        if group is not None:
            same = group.parts.get(hp.part.seq)
            if same is not None:
                if same.msg.segments == hp.msg.segments:
                    out.alone.append((hp, "duplicate"))
                    return out
                self._remove(group)
                out.alone.extend((p, "reused") for p in group.in_order())
                group = None
            else:
                first = next(iter(group.parts.values())).msg
                if (first.data_coding, first.msg_class) != (hp.msg.data_coding, hp.msg.msg_class):
                    out.alone.append((hp, "mismatch"))
                    return out
        completes = group is not None and len(group.parts) + 1 == hp.part.total
        if self.held >= self.max_parts and not completes:  # a completing part frees room
            out.alone.append((hp, "buffer_full"))
            return out
        if group is None:
            group = self.groups[key] = Group(key, now + self.timeout, {})
        group.parts[hp.part.seq] = hp
        self.by_id[hp.msg.id] = hp
        if len(group.parts) == hp.part.total:
            self._remove(group)
            out.combined = group.in_order()
        return out

    def next_deadline(self) -> float | None:
        for group in self.groups.values():
            return group.deadline
        return None

    def expire(self, now: float) -> list[Group]:
        """Groups whose time is up, oldest first, taken out of the buffer."""
        out: list[Group] = []
        for group in self.groups.values():
            if group.deadline > now:
                break
            out.append(group)
        for group in out:
            self._remove(group)
        return out

    def drain(self) -> list[Group]:
        """Every group, taken out (the front door is stopping)."""
        out = list(self.groups.values())
        for group in out:
            self._remove(group)
        return out

    def _remove(self, group: Group) -> None:
        del self.groups[group.key]
        for hp in group.parts.values():
            self.by_id.pop(hp.msg.id, None)


def combine(parts: list[HeldPart]) -> Message:
    """One Message from a complete group, for ``Engine.release``.

    Id and every per-message field (userref, source TON/NPI) from part 1;
    receipts as each part's registered_delivery asks (the carrier is asked
    for one if any part wants it); accepted_at the earliest, expires_at the earliest
    of the parts. UDH parts go out as the customer built them; SAR parts get
    a concatenation UDH of ours (8-bit if the reference is below 256, else
    16-bit, unless a segment does not fit with the longer UDH: then 8-bit
    with the reference's low octet) and esm_class UDHI; the SAR TLVs are not
    forwarded."""
    head = parts[0].msg
    if parts[0].part.scheme == SAR:
        segments = _sar_segments(parts)
    else:
        segments = tuple(hp.msg.segments[0] for hp in parts)
    body = b"".join(hp.body for hp in parts)
    asks = {hp.msg.registered_delivery & 0x03 for hp in parts}
    # The carrier's receipt is needed if any part wants one: final wins over
    # failure-only (the per-part wishes are applied on the way back).
    low = 1 if 1 in asks else (2 if 2 in asks else 0)
    return dataclasses.replace(
        head,
        segments=segments,
        part_ids=tuple(hp.msg.id for hp in parts),
        part_receipts=tuple(hp.msg.registered_delivery for hp in parts),
        registered_delivery=(head.registered_delivery & ~0x03) | low,
        esm_class=head.esm_class | ESM_UDHI,
        text=None if head.secret else decode_payload(head.data_coding, body),
        tlvs=tuple((t, v) for t, v in head.tlvs if t not in SAR_TAGS),
        accepted_at=min(hp.msg.accepted_at for hp in parts),
        expires_at=min(hp.msg.expires_at for hp in parts),
    )


def _sar_segments(parts: list[HeldPart]) -> tuple[bytes, ...]:
    ref, total = parts[0].part.ref, len(parts)

    def build(ref16: bool) -> tuple[bytes, ...] | None:
        out: list[bytes] = []
        for hp in parts:
            seq = hp.part.seq
            if ref16:
                ie = bytes((0x08, 4, ref >> 8, ref & 0xFF, total, seq))
            else:
                ie = bytes((0x00, 3, ref & 0xFF, total, seq))
            segment = hp.msg.segments[0]
            own = segment[1 : hp.part.body_at]  # IEs of a UDH the customer sent
            udh = bytes((len(ie) + len(own),)) + ie + own
            body = segment[hp.part.body_at :]
            if not fits_one_sms(hp.part.gsm7, len(udh), len(body)):
                return None
            out.append(udh + body)
        return tuple(out)

    segments = build(True) if ref > 0xFF else None
    segments = segments or build(False)
    # Every SAR part was checked to fit with the 8-bit UDH when it came in.
    assert segments is not None
    return segments
