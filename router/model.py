"""The message as a value, and its status lifecycle.

A :class:`Message` is built once at acceptance and never changed; what moves
is its :class:`Delivery` (status, carrier, attempts), owned by the carrier
layer and reported through the receipt path. ``__repr__`` of both never shows
addresses or text, so a stray log line or traceback cannot leak them.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from enum import Enum

from .value import value


class MessageClass(str, Enum):
    STANDARD = "standard"
    SECRET = "secret"


class Status(str, Enum):
    ACCEPTED = "accepted"
    SCHEDULED = "scheduled"  # waiting in the durable spool for its send time
    QUEUED = "queued"
    SUBMITTED = "submitted"
    DELIVERED = "delivered"
    FAILED = "failed"
    EXPIRED = "expired"
    REJECTED = "rejected"
    CANCELED = "canceled"  # a scheduled message its sender withdrew
    UNKNOWN = "unknown"  # the carrier took it; its receipt never came (delivery.receipt_timeout)

    @property
    def final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset(
    {
        Status.DELIVERED,
        Status.FAILED,
        Status.EXPIRED,
        Status.REJECTED,
        Status.CANCELED,
        Status.UNKNOWN,
    }
)


class Origin(str, Enum):
    SMPP = "smpp"
    HTTP = "http"


# Seeded once from the OS: os.urandom per id was a getrandom() system call
# per message (~3% of router CPU). Ids need to be unique, not secret (every
# lookup is scoped to the submitting account).
_ID_RNG = random.Random(os.urandom(16))


def new_message_id() -> str:
    """Time-ordered, unique, 20 lowercase hex chars (fits SMPP's 64-octet id):
    milliseconds (11 hex) and 36 random bits (9 hex)."""
    return f"{time.time_ns() // 1_000_000:011x}{_ID_RNG.getrandbits(36):09x}"


@value(repr=False)  # immutable; see router/value.py
class Message:
    id: str
    account_id: int
    account: str
    origin: Origin
    msg_class: MessageClass
    source: str
    source_ton: int
    source_npi: int
    destination: str  # E.164 digits without '+'
    country: str  # ISO 3166 alpha-2, "" if unknown
    data_coding: int
    esm_class: int
    segments: tuple[bytes, ...]  # each a complete short_message (UDH included)
    text: str | None  # decoded text for the traffic log; None for binary
    registered_delivery: int
    accepted_at: float  # wall clock, seconds
    expires_at: float  # wall clock, seconds
    userref: str | None = None
    callback_url: str | None = None
    tlvs: tuple[tuple[int, bytes], ...] = field(default=())
    send_at: float | None = None  # wall clock; None = send now
    # Ids the customer was given for the parts of a message it split itself
    # (SMPP concatenation, reassembled here); () for everything else.
    part_ids: tuple[str, ...] = field(default=())
    # registered_delivery of each of those parts, in the same order: each part
    # id gets a receipt only if its own submit_sm asked for one (Kannel asks
    # on part 1 only, others on every part or the last). () = all as above.
    part_receipts: tuple[int, ...] = field(default=())
    # A part held for reassembly: logged only when released (see Engine.resume).
    held: bool = False

    @property
    def parts(self) -> int:
        return len(self.segments)

    @property
    def secret(self) -> bool:
        return self.msg_class is MessageClass.SECRET

    def __repr__(self) -> str:
        return (
            f"Message(id={self.id!r}, account={self.account!r}, class={self.msg_class.value}, "
            f"country={self.country!r}, parts={self.parts})"
        )


@dataclass(slots=True, repr=False)
class Delivery:
    """What the router knows about one message's progress."""

    message: Message
    status: Status = Status.ACCEPTED
    carrier: str | None = None
    error: str | None = None
    updated_at: float = 0.0
    parts_done: int = 0
    parts_failed: int = 0
    parts_taken: int = 0  # segments a carrier acknowledged (spool row goes then)
    spooled: bool = True
    attempts: int = 0
    carrier_ids: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return (
            f"Delivery(id={self.message.id!r}, status={self.status.value}, "
            f"carrier={self.carrier!r})"
        )
