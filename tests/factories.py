"""Test data: a plain standard message that tests change with keywords."""

from __future__ import annotations

import time
from typing import Any

from router.model import Message, MessageClass, Origin


def make_message(message_id: str, **fields: Any) -> Message:
    """A one-part GSM text message of account 1 to a Danish number, accepted
    now, valid an hour; any field can be given instead."""
    now = fields.pop("accepted_at", None) or time.time()
    values: dict[str, Any] = {
        "account_id": 1,
        "account": "acme",
        "origin": Origin.SMPP,
        "msg_class": MessageClass.STANDARD,
        "source": "Acme",
        "source_ton": 5,
        "source_npi": 0,
        "destination": "4512345678",
        "country": "DK",
        "data_coding": 0,
        "esm_class": 0,
        "segments": (b"hello",),
        "text": "hello",
        "registered_delivery": 1,
        "accepted_at": now,
        "expires_at": now + 3600,
    }
    values.update(fields)
    return Message(id=message_id, **values)
