"""structlog set-up: JSON in production, console in a terminal, and a
processor that refuses personal fields.

If code passes a key that names personal data (destination, source, text,
password...), the processor raises in tests (``strict=True``) and replaces
the value with ``"[removed]"`` in production, so a mistake fails loudly in
CI instead of leaking (privacy.md 3, 6).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

PERSONAL_KEYS = frozenset(
    {
        "destination",
        "destination_addr",
        "dest",
        "to",
        "msisdn",
        "number",
        "recipient",
        "source",
        "source_addr",
        "sender",
        "from",
        "from_",
        "text",
        "body",
        "short_message",
        "message_payload",
        "payload",
        "password",
        "secret",
        "api_key",
        "key",
    }
)


class PersonalDataInLog(AssertionError):
    pass


class RefusePersonalData:
    def __init__(self, strict: bool) -> None:
        self.strict = strict

    def __call__(
        self, logger: Any, name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        bad = PERSONAL_KEYS.intersection(event)
        if bad:
            if self.strict:
                raise PersonalDataInLog(f"log event {event.get('event')!r} carries {sorted(bad)}")
            for k in bad:
                event[k] = "[removed]"
        return event


def configure_logging(fmt: str = "auto", level: str = "INFO", strict: bool = False) -> None:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            RefusePersonalData(strict),
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
