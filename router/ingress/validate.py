"""Checks shared by both front doors: addresses and SMPP times.

Errors name the field and the rule, never the value (it may be a number).
"""

from __future__ import annotations

import calendar
import re

from ..routing import normalise_e164

_ALNUM_SENDER = re.compile(r"^[A-Za-z0-9 .\-_&'+!#()@:/]{1,11}$")
TON_INTERNATIONAL = 1
TON_NATIONAL = 2
TON_ALPHANUMERIC = 5


class InvalidField(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def check_sender(source: str, ton: int | None = None) -> tuple[str, int, int]:
    """(source, ton, npi) for a sender id: alphanumeric <= 11 or numeric <= 15."""
    if not source:
        raise InvalidField("from", "a sender id is required")
    digits = source[1:] if source.startswith("+") else source
    if digits.isdigit() and ton != TON_ALPHANUMERIC:
        if len(digits) > 15:
            raise InvalidField("from", "numeric sender ids have at most 15 digits")
        if ton in (None, TON_INTERNATIONAL) and len(digits) >= 7:
            return digits, TON_INTERNATIONAL, 1
        return digits, ton if ton is not None else 3, 1 if ton != 3 else 0
    if not _ALNUM_SENDER.match(source):
        raise InvalidField("from", "alphanumeric sender ids have 1-11 characters of A-Z, a-z, 0-9")
    return source, TON_ALPHANUMERIC, 0


def check_destination(raw: str, ton: int = TON_INTERNATIONAL) -> str:
    """E.164 digits of a destination, or InvalidField."""
    if ton not in (0, TON_INTERNATIONAL):
        raise InvalidField("to", "only international numbers (TON 1) are accepted")
    digits = normalise_e164(raw)
    if digits is None:
        raise InvalidField("to", "expected an international number in E.164 format")
    return digits


def parse_smpp_time(value: str, now: float) -> float | None:
    """SMPP 3.4 7.1.1 time: absolute 'YYMMDDhhmmsstnnp' or relative '...R'."""
    if not value:
        return None
    if len(value) != 16 or not value[:15].isdigit() or value[15] not in "+-R":
        raise ValueError("time must be 16 characters: YYMMDDhhmmsstnn[+-R]")
    yy, mo, dd, hh, mi, ss = (int(value[i : i + 2]) for i in range(0, 12, 2))
    tenths = int(value[12])
    if value[15] == "R":
        seconds = ((((yy * 365 + mo * 30 + dd) * 24 + hh) * 60 + mi) * 60) + ss
        return now + seconds
    nn = int(value[13:15])
    if not (1 <= mo <= 12 and 1 <= dd <= 31 and hh < 24 and mi < 60 and ss < 60 and nn <= 48):
        raise ValueError("time fields out of range")
    try:
        base = calendar.timegm((2000 + yy, mo, dd, hh, mi, ss, 0, 0, 0))
    except (ValueError, OverflowError):
        raise ValueError("time fields out of range") from None
    offset = nn * 15 * 60
    # The time is local to UTC+offset (p='+'): UTC = local - offset.
    return base + tenths / 10 - (offset if value[15] == "+" else -offset)
