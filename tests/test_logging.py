"""router.observe.logging: personal fields refused, repeated failures
kept to one line per window (an outage must not bury the log)."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import structlog

from router.observe.logging import PersonalDataInLog, QuietRepeats, RefusePersonalData


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def logger(*processors: Any) -> tuple[Any, io.StringIO]:
    out = io.StringIO()
    log = structlog.wrap_logger(
        structlog.PrintLogger(file=out),
        processors=[
            *processors,
            structlog.processors.add_log_level,
            structlog.processors.JSONRenderer(),
        ],
    )
    return log, out


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_repeated_failure_is_one_line_per_window_with_the_count() -> None:
    clock = Clock()
    log, out = logger(QuietRepeats(window=10.0, clock=clock))
    for _ in range(50):  # a writer retrying every 20 ms for a second
        log.warning("spool_write_failed", error="ConnectionRefusedError")
        clock.now += 0.02
    log.error("receipt_handoff_write_failed", error="OSError")  # another event: not hidden
    log.info("bound", account="acme")
    log.info("bound", account="acme")  # info lines are never dropped
    clock.now += 10.0
    log.warning("spool_write_failed", error="ConnectionRefusedError")
    got = [(e["event"], e.get("repeated")) for e in lines(out)]
    assert got == [
        ("spool_write_failed", None),
        ("receipt_handoff_write_failed", None),
        ("bound", None),
        ("bound", None),
        ("spool_write_failed", 49),
    ]


def test_the_same_event_about_different_things_is_not_hidden() -> None:
    clock = Clock()
    log, out = logger(QuietRepeats(window=10.0, clock=clock))
    log.warning("carrier_session_lost", carrier="sim-eu")
    log.warning("carrier_session_lost", carrier="sim-world")
    log.warning("carrier_session_lost", carrier="sim-eu", reconnects=2)  # a repeat of the first
    log.warning("spool_write_failed", error="ConnectionResetError", waiting=7)
    log.warning("spool_write_failed", error="ConnectionResetError", waiting=1)  # a repeat
    log.warning("spool_write_failed", error="TimeoutError", waiting=1)
    got = [(e["event"], e.get("carrier") or e.get("error")) for e in lines(out)]
    assert got == [
        ("carrier_session_lost", "sim-eu"),
        ("carrier_session_lost", "sim-world"),
        ("spool_write_failed", "ConnectionResetError"),
        ("spool_write_failed", "TimeoutError"),
    ]


def test_quiet_after_the_window_logs_at_once_without_a_count() -> None:
    clock = Clock()
    log, out = logger(QuietRepeats(window=10.0, clock=clock))
    log.warning("carrier_bind_failed", carrier="sim-eu")
    clock.now += 30.0
    log.warning("carrier_bind_failed", carrier="sim-eu")
    assert [e.get("repeated") for e in lines(out)] == [None, None]


def test_personal_fields_fail_in_strict_mode_and_are_removed_otherwise() -> None:
    log, _ = logger(RefusePersonalData(strict=True))
    with pytest.raises(PersonalDataInLog):
        log.info("submitted", destination="4512345678")
    log, out = logger(RefusePersonalData(strict=False))
    log.info("submitted", destination="4512345678", account="acme")
    (event,) = lines(out)
    assert event["destination"] == "[removed]" and event["account"] == "acme"
