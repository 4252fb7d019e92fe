"""Data-subject export (JSON, CSV) and erasure for one account and one number;
the audit log holds a keyed hash of the number, never the number."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import secrets
from typing import Any

import asyncpg
import pytest

from router.accounts import create_account
from router.store import dsr
from router.store.audit import (
    AuditKeyError,
    audit,
    load_audit_key,
    msisdn_hash,
    parse_audit_key,
)

KEY = b"k" * 32
NUMBER = "4512345678"
OTHER = "4587654321"
UTC = dt.UTC


async def add_row(
    pool: asyncpg.Pool,
    account_id: int,
    accepted_at: dt.datetime,
    *,
    destination: str | None = NUMBER,
    source: str | None = "Acme",
    body: str | None = "hello there",
    cls: str = "standard",
) -> str:
    msg_id = secrets.token_hex(10)
    await pool.execute(
        "INSERT INTO traffic_log (id, account_id, class, ingress, source, destination, country,"
        " carrier, parts, data_coding, body, userref, accepted_at)"
        " VALUES ($1, $2, $3, 'http', $4, $5, 'DK', 'sim-eu', 1, 0, $6, 'ref-1', $7)",
        msg_id,
        account_id,
        cls,
        source,
        destination,
        body,
        accepted_at,
    )
    return msg_id


async def add_event(
    pool: asyncpg.Pool, msg_id: str, account_id: int, at: dt.datetime, status: str
) -> None:
    await pool.execute(
        "INSERT INTO delivery_events (message_id, account_id, status, carrier, at)"
        " VALUES ($1, $2, $3, 'sim-eu', $4)",
        msg_id,
        account_id,
        status,
        at,
    )


async def row(pool: asyncpg.Pool, msg_id: str) -> Any:
    return await pool.fetchrow("SELECT * FROM traffic_log WHERE id = $1", msg_id)


async def audit_text(pool: asyncpg.Pool) -> str:
    return "\n".join(r["t"] for r in await pool.fetch("SELECT a::text AS t FROM audit_log a"))


@pytest.fixture
async def subjects(db: asyncpg.Pool) -> dict[str, object]:
    now = dt.datetime.now(UTC).replace(microsecond=0)
    a = await create_account(db, "controller")
    b = await create_account(db, "someone-else")
    first = await add_row(db, a, now - dt.timedelta(hours=2), body="=HYPERLINK(1)")
    await add_event(db, first, a, now - dt.timedelta(hours=2), "submitted")
    await add_event(db, first, a, now - dt.timedelta(hours=1), "delivered")
    second = await add_row(
        db,
        a,
        now - dt.timedelta(hours=1),
        source=NUMBER,
        destination=OTHER,
        body="from the subject",
    )
    other = await add_row(db, a, now, destination=OTHER)
    foreign = await add_row(db, b, now)
    secret = await add_row(db, a, now, destination=None, source=None, body=None, cls="secret")
    return {
        "a": a,
        "b": b,
        "first": first,
        "second": second,
        "other": other,
        "foreign": foreign,
        "secret": secret,
        "now": now,
    }


async def test_export_json_has_only_this_accounts_rows_for_this_number(
    db: asyncpg.Pool, subjects: dict[str, object]
) -> None:
    rows = await dsr.export(db, subjects["a"], "+" + NUMBER, actor="test", audit_key=KEY)
    assert isinstance(rows, list)
    assert [r["id"] for r in rows] == [subjects["first"], subjects["second"]]
    assert rows[0]["destination"] == NUMBER and rows[0]["body"] == "=HYPERLINK(1)"
    assert rows[1]["source"] == NUMBER  # the subject as (numeric) sender counts too
    assert [e["status"] for e in rows[0]["events"]] == ["submitted", "delivered"]
    assert rows[1]["events"] == []
    json.dumps(rows)  # plain JSON types only
    assert rows[0]["accepted_at"].endswith("+00:00")


async def test_export_csv(db: asyncpg.Pool, subjects: dict[str, object]) -> None:
    text = await dsr.export(db, subjects["a"], NUMBER, actor="test", audit_key=KEY, fmt="csv")
    assert isinstance(text, str)
    lines = list(csv.DictReader(io.StringIO(text)))
    assert [r["id"] for r in lines] == [subjects["first"], subjects["second"]]
    assert lines[0]["destination"] == NUMBER
    assert lines[0]["status"] == "delivered"
    assert [e["status"] for e in json.loads(lines[0]["events"])] == ["submitted", "delivered"]
    assert lines[0]["body"] == "'=HYPERLINK(1)"  # no formula runs in a spreadsheet
    assert lines[1]["anonymised_at"] == ""


async def test_erase_anonymises_now_and_only_the_subjects_rows(
    db: asyncpg.Pool, subjects: dict[str, object]
) -> None:
    n = await dsr.erase(db, subjects["a"], "00" + NUMBER, actor="test", audit_key=KEY)
    assert n == 2
    first = await row(db, subjects["first"])
    assert (first["destination"], first["source"], first["body"], first["userref"]) == (
        "45123",
        None,
        None,
        None,
    )
    assert first["anonymised_at"] is not None
    second = await row(db, subjects["second"])
    assert second["source"] is None and second["destination"] == OTHER[:5]
    for untouched in ("other", "foreign"):
        r = await row(db, subjects[untouched])
        assert r["anonymised_at"] is None and r["body"] == "hello there"
    # Events hold no personal data and stay; a second erasure finds nothing.
    assert await db.fetchval("SELECT count(*) FROM delivery_events") == 2
    assert await dsr.erase(db, subjects["a"], NUMBER, actor="test", audit_key=KEY) == 0
    assert await dsr.export(db, subjects["a"], NUMBER, actor="test", audit_key=KEY) == []


async def test_requests_are_audited_with_the_hash_never_the_number(
    db: asyncpg.Pool, subjects: dict[str, object]
) -> None:
    before = await db.fetchval("SELECT coalesce(max(id), 0) FROM audit_log")
    await dsr.export(db, subjects["a"], NUMBER, actor="dpo", audit_key=KEY, fmt="csv")
    await dsr.erase(db, subjects["a"], NUMBER, actor="dpo", audit_key=KEY)
    rows = await db.fetch("SELECT * FROM audit_log WHERE id > $1 ORDER BY id", before)
    assert [r["action"] for r in rows] == ["dsr.export", "dsr.erase"]
    for r in rows:
        detail = json.loads(r["detail"])
        assert detail["msisdn_hash"] == msisdn_hash(NUMBER, KEY)
        assert r["actor"] == "dpo" and r["account_id"] == subjects["a"]
    assert json.loads(rows[0]["detail"])["rows"] == 2
    assert json.loads(rows[1]["detail"])["rows"] == 2
    text = await audit_text(db)
    assert NUMBER not in text and NUMBER[-5:] not in text


async def test_bad_numbers_and_formats_are_refused(db: asyncpg.Pool) -> None:
    a = await create_account(db, "x")
    for bad in ("", "12", "not a number", "0451234567"):
        with pytest.raises(dsr.InvalidRequest):
            await dsr.export(db, a, bad, actor="t", audit_key=KEY)
    with pytest.raises(dsr.InvalidRequest):
        await dsr.export(db, a, NUMBER, actor="t", audit_key=KEY, fmt="xml")


def test_msisdn_hash_is_keyed_stable_and_format_blind() -> None:
    h = msisdn_hash(NUMBER, KEY)
    assert len(h) == 64 and int(h, 16) >= 0
    assert msisdn_hash("+45 12 34 56 78", KEY) == h == msisdn_hash("0045" + NUMBER[2:], KEY)
    assert msisdn_hash(NUMBER, b"z" * 32) != h
    assert NUMBER not in h


def test_audit_key_formats() -> None:
    raw = bytes(range(32))
    assert parse_audit_key("hex:" + raw.hex()) == raw
    import base64

    assert parse_audit_key("base64:" + base64.b64encode(raw).decode()) == raw
    assert parse_audit_key("base64:" + base64.urlsafe_b64encode(raw).decode().rstrip("=")) == raw
    assert parse_audit_key("a long passphrase here") == b"a long passphrase here"
    for bad in ("short", "hex:zz", "hex:0011", "base64:!!!"):
        with pytest.raises(AuditKeyError):
            parse_audit_key(bad)
    assert load_audit_key({"ROUTER_AUDIT_KEY": "hex:" + raw.hex()}) == raw
    assert load_audit_key({}, demo=True) == load_audit_key({}, demo=True)
    with pytest.raises(AuditKeyError):
        load_audit_key({}, required=True)
    assert len(load_audit_key({})) == 32  # ephemeral, with a warning


async def test_audit_refuses_personal_detail_keys(db: asyncpg.Pool) -> None:
    with pytest.raises(ValueError, match="personal data"):
        await audit(db, "t", "oops", None, msisdn=NUMBER)
    with pytest.raises(ValueError):
        await audit(db, "t", "oops", None, destination=NUMBER)
    assert NUMBER not in await audit_text(db)


async def add_webhook(
    pool: asyncpg.Pool, account_id: int, message_id: str, destination: str
) -> bytes:
    """A pending delivery webhook, as the webhook outbox holds it."""
    body = json.dumps(
        {"id": message_id, "userref": None, "to": "+" + destination, "status": "delivered"},
        separators=(",", ":"),
    ).encode()
    await pool.execute(
        "INSERT INTO webhook_outbox (id, account_id, message_id, url, destination, body,"
        " attempts, next_at, created_at)"
        " VALUES (gen_random_uuid(), $1, $2, 'https://hooks.example/x?token=t0k3n', $3, $4,"
        " 2, now() + interval '1 minute', now())",
        account_id,
        message_id,
        destination,
        body,
    )
    return body


async def test_pending_webhooks_are_exported_and_erased(
    db: asyncpg.Pool, subjects: dict[str, object]
) -> None:
    a, b = subjects["a"], subjects["b"]
    assert isinstance(a, int) and isinstance(b, int)
    first = str(subjects["first"])
    body = await add_webhook(db, a, first, NUMBER)
    orphan = secrets.token_hex(10)  # its traffic-log row is not (or no longer) there
    await add_webhook(db, a, orphan, NUMBER)
    await add_webhook(db, a, str(subjects["other"]), OTHER)
    await add_webhook(db, b, str(subjects["foreign"]), NUMBER)

    rows = await dsr.export(db, a, NUMBER, actor="test", audit_key=KEY)
    assert isinstance(rows, list)
    assert [r["id"] for r in rows] == [first, subjects["second"], orphan]
    [pending] = rows[0]["pending_webhooks"]
    assert pending["notification"] == json.loads(body) and pending["attempts"] == 2
    assert "url" not in pending and "t0k3n" not in json.dumps(rows)  # the account's, not theirs
    assert rows[1]["pending_webhooks"] == []
    assert rows[2]["destination"] == NUMBER and rows[2]["body"] is None
    assert [w["message_id"] for w in rows[2]["pending_webhooks"]] == [orphan]
    text = await dsr.export(db, a, NUMBER, actor="test", audit_key=KEY, fmt="csv")
    assert isinstance(text, str)
    lines = list(csv.DictReader(io.StringIO(text)))
    assert [r["id"] for r in lines] == [first, subjects["second"], orphan]
    assert json.loads(lines[0]["pending_webhooks"])[0]["notification"]["to"] == "+" + NUMBER

    before = await db.fetchval("SELECT coalesce(max(id), 0) FROM audit_log")
    assert await dsr.erase(db, a, NUMBER, actor="test", audit_key=KEY) == 2
    left = await db.fetch("SELECT account_id, destination FROM webhook_outbox ORDER BY account_id")
    assert [(r["account_id"], r["destination"]) for r in left] == [(a, OTHER), (b, NUMBER)]
    detail = json.loads(
        await db.fetchval("SELECT detail FROM audit_log WHERE id > $1 ORDER BY id", before)
    )
    assert detail["pending_webhooks"] == 2 and detail["rows"] == 2
    assert await dsr.export(db, a, NUMBER, actor="test", audit_key=KEY) == []
