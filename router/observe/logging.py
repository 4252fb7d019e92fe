"""structlog set-up: JSON in production, console in a terminal, a
processor that refuses personal fields, and one that keeps a failure
repeated by every retry to one line per 10 s (QuietRepeats).

If code passes a key that names personal data (destination, source, text,
password...), the processor raises in tests (``strict=True``) and replaces
the value with ``"[removed]"`` in production, so a mistake fails loudly in
CI instead of leaking (privacy.md 3, 6).
"""

from __future__ import annotations

import logging
import sys
import time
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


class QuietRepeats:
    """At most one line per ``window`` seconds for each warning or error
    event: an outage (database, carrier) repeats the same failure every
    retry, tens of lines a second, burying everything else. The first
    occurrence is logged at once; later ones inside the window are dropped
    and counted, and the next line of it that passes says how many it
    stands for (``repeated``; a burst that ends inside its window leaves its
    count untold -- the failure metrics count every one). A line's identity
    is its event name and its text fields (carrier, node, error, ...), not
    its numbers: a failure of carrier A never hides one of carrier B. Info
    and debug lines are never dropped."""

    LEVELS = frozenset({"warn", "warning", "error", "critical", "fatal", "exception"})

    def __init__(self, window: float = 10.0, clock: Any = time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def __call__(
        self, logger: Any, name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if name not in self.LEVELS:
            return event
        # What the line is about (its text fields: carrier, node, error...)
        # is part of the key; counts and sizes are not.
        key = repr(sorted((k, v) for k, v in event.items() if isinstance(v, str)))
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.window:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            raise structlog.DropEvent
        if len(self._last) > 10_000:  # event names are code constants; a bound all the same
            self._last.clear()
        self._last[key] = now
        dropped = self._dropped.pop(key, 0)
        if dropped:
            event["repeated"] = dropped
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
            QuietRepeats(),
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
