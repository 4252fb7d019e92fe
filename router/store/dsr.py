"""Data-subject requests (GDPR Art. 15 and 17; privacy.md 4), on the
controller's instruction: export or erase the traffic-log rows (and pending
delivery webhooks) of ONE account for ONE phone number.

A row matches when the number is its destination or its (numeric) sender.
Secret-class rows hold no number, and anonymised rows only half of one, so
neither ever matches: there is nothing personal left in them to give out or
to erase. Rows still in the traffic-log writer's memory buffer (well under
a second's worth) are not seen; an erasure can be repeated safely.

Erasure anonymises exactly as retention does (``retention.ANONYMISE_SET``);
delivery events hold no personal data and stay. It does not touch the
account's opt-out list: that is the subject's wish not to be messaged.

Pending delivery webhooks (``webhook_outbox``, whose body carries the
number as ``to``) are part of both: export lists them under each message as
``pending_webhooks`` (the notification still to be POSTed to the account,
its attempts and next try; a webhook whose message has no matching
traffic-log row gets an entry of its own), and erasure deletes them, so the
account is never notified about that number again. A webhook being
attempted from a router's memory at that moment (or not yet written, under
a second's worth) is not seen; secret messages' webhooks are never in the
table.

Every request writes one audit row with a keyed hash of the number. This
module must never log or audit the number in clear.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from typing import Any

import asyncpg

from .audit import audit, msisdn_hash, normalise_msisdn
from .retention import ANONYMISE_SET

MESSAGE_FIELDS = (
    "id",
    "class",
    "ingress",
    "source",
    "destination",
    "country",
    "carrier",
    "parts",
    "data_coding",
    "body",
    "userref",
    "accepted_at",
    "anonymised_at",
)
CSV_FIELDS = (*MESSAGE_FIELDS, "status", "status_at", "events", "pending_webhooks")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class InvalidRequest(ValueError):
    pass


def _digits(msisdn: str) -> str:
    digits = normalise_msisdn(msisdn)
    if not 7 <= len(digits) <= 15 or digits.startswith("0"):
        raise InvalidRequest("msisdn: expected an international number in E.164 format")
    return digits


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.datetime) else value


async def find_rows(
    conn: asyncpg.Connection | asyncpg.Pool, account_id: int, digits: str
) -> list[dict[str, Any]]:
    """Every row of ``account_id`` whose destination or sender is ``digits``, with events."""
    rows = await conn.fetch(
        f"SELECT {', '.join(MESSAGE_FIELDS)} FROM traffic_log"
        " WHERE account_id = $1 AND (destination = $2 OR source = $2)"
        " ORDER BY accepted_at, id",
        account_id,
        digits,
    )
    out = [{k: _iso(r[k]) for k in MESSAGE_FIELDS} for r in rows]
    if not out:
        return out
    events = await conn.fetch(
        "SELECT message_id, status, carrier, error, at FROM delivery_events"
        " WHERE account_id = $1 AND message_id = ANY($2::text[]) ORDER BY at",
        account_id,
        [m["id"] for m in out],
    )
    by_id: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_id.setdefault(e["message_id"], []).append(
            {
                "status": e["status"],
                "carrier": e["carrier"],
                "error": e["error"],
                "at": _iso(e["at"]),
            }
        )
    for m in out:
        m["events"] = by_id.get(m["id"], [])
    return out


async def find_pending_webhooks(
    conn: asyncpg.Connection | asyncpg.Pool, account_id: int, digits: str
) -> list[dict[str, Any]]:
    """The account's outbox rows notifying about ``digits`` (never the URL:
    it is the account's, and may carry its token)."""
    rows = await conn.fetch(
        "SELECT message_id, body, attempts, next_at, created_at FROM webhook_outbox"
        " WHERE account_id = $1 AND destination = $2 ORDER BY created_at, id",
        account_id,
        digits,
    )
    return [
        {
            "message_id": r["message_id"],
            "notification": json.loads(bytes(r["body"])),
            "attempts": r["attempts"],
            "next_attempt_at": _iso(r["next_at"]),
            "created_at": _iso(r["created_at"]),
        }
        for r in rows
    ]


def _with_webhooks(
    messages: list[dict[str, Any]], webhooks: list[dict[str, Any]], digits: str
) -> list[dict[str, Any]]:
    by_id: dict[str, list[dict[str, Any]]] = {}
    for w in webhooks:
        by_id.setdefault(w["message_id"], []).append(w)
    for m in messages:
        m["pending_webhooks"] = by_id.pop(m["id"], [])
    for message_id, pending in by_id.items():
        # No traffic-log row for it (log off, not yet written): its own entry.
        alone: dict[str, Any] = dict.fromkeys(MESSAGE_FIELDS)
        alone.update(id=message_id, destination=digits, events=[], pending_webhooks=pending)
        messages.append(alone)
    return messages


def _cell(value: Any) -> Any:
    # A spreadsheet would run "=..." as a formula: quote such text cells.
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return "" if value is None else value


def to_csv(rows: list[dict[str, Any]]) -> str:
    """One line per message; ``events`` as JSON, the last event as status/status_at."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_FIELDS)
    for m in rows:
        events = m.get("events", [])
        last = events[-1] if events else {}
        w.writerow(
            [_cell(m[k]) for k in MESSAGE_FIELDS]
            + [
                _cell(last.get("status")),
                _cell(last.get("at")),
                json.dumps(events, separators=(",", ":")),
                json.dumps(m.get("pending_webhooks", []), separators=(",", ":")),
            ]
        )
    return buf.getvalue()


async def export(
    pool: asyncpg.Pool,
    account_id: int,
    msisdn: str,
    *,
    actor: str,
    audit_key: bytes,
    fmt: str = "json",
) -> list[dict[str, Any]] | str:
    """The subject's rows as a list of dicts (``json``) or a CSV string (``csv``)."""
    if fmt not in ("json", "csv"):
        raise InvalidRequest("format: expected 'json' or 'csv'")
    digits = _digits(msisdn)
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        rows = await find_rows(conn, account_id, digits)
        webhooks = await find_pending_webhooks(conn, account_id, digits)
        rows = _with_webhooks(rows, webhooks, digits)
        await audit(
            conn,
            actor,
            "dsr.export",
            account_id,
            msisdn_hash=msisdn_hash(digits, audit_key),
            format=fmt,
            rows=len(rows),
            pending_webhooks=len(webhooks),
        )
    return to_csv(rows) if fmt == "csv" else rows


async def erase(
    pool: asyncpg.Pool,
    account_id: int,
    msisdn: str,
    *,
    actor: str,
    audit_key: bytes,
    now: dt.datetime | None = None,
) -> int:
    """Anonymise the subject's traffic-log rows now and delete the pending
    webhooks about the number; returns how many traffic-log rows changed
    (the webhooks deleted are counted in the audit row)."""
    digits = _digits(msisdn)
    now = now or dt.datetime.now(dt.UTC)
    async with pool.acquire() as conn, conn.transaction():
        status = await conn.execute(
            f"UPDATE traffic_log SET {ANONYMISE_SET}"
            " WHERE account_id = $2 AND (destination = $3 OR source = $3)"
            " AND anonymised_at IS NULL",
            now,
            account_id,
            digits,
        )
        n = int(status.rsplit(" ", 1)[-1])
        status = await conn.execute(
            "DELETE FROM webhook_outbox WHERE account_id = $1 AND destination = $2",
            account_id,
            digits,
        )
        webhooks = int(status.rsplit(" ", 1)[-1])
        await audit(
            conn,
            actor,
            "dsr.erase",
            account_id,
            msisdn_hash=msisdn_hash(digits, audit_key),
            rows=n,
            pending_webhooks=webhooks,
        )
    return n
