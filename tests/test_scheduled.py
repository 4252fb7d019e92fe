"""Scheduled sending (HTTP ``send_at``, SMPP ``schedule_delivery_time``):
the message waits in the durable spool, not in memory, is sent when due and
not before, survives a restart, and can be canceled while it waits
(HTTP DELETE, SMPP cancel_sm). Real router, real PostgreSQL, real sockets.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import pytest

from router.ingress.openapi import PROBLEM_BASE
from router.model import Status as MsgStatus
from router.smpp.constants import MessageState, Status, Tag
from router.smpp.pdu import CancelSm, QuerySm
from tests.esme import connect, until

DEMO = {"Authorization": "Bearer demo-key", "Content-Type": "application/json"}
ACME = {"Authorization": "Bearer acme-key-0001", "Content-Type": "application/json"}
DK = "+4512345678"


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body)
    async with http.request(method, url, data=data, headers=headers or DEMO) as resp:
        raw = await resp.read()
        return resp.status, json.loads(raw) if raw else None


async def due_at(db: asyncpg.Pool, message_id: str) -> datetime | None:
    return await db.fetchval("SELECT due_at FROM spool WHERE id = $1", message_id)  # type: ignore[no-any-return]


async def test_http_send_at_waits_in_the_spool_and_is_sent_when_due(
    stack_factory: Any, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    stack = await stack_factory()
    engine = stack.router.engine
    sim = stack.sims["sim-eu"]
    before = sim.stats.submits
    send_at = time.time() + 2.5
    s, b = await call(
        http,
        "POST",
        stack.http_url + "/v1/messages",
        {"to": DK, "from": "Acme", "text": "later", "send_at": rfc3339(send_at)},
    )
    assert s == 202, b
    assert b["status"] == "scheduled" and b["parts"] == 1
    assert abs(datetime.fromisoformat(b["send_at"]).timestamp() - send_at) < 0.01
    mid = b["id"]
    # Durable, waiting, and not held in memory.
    assert (await due_at(db, mid)) is not None
    assert mid not in engine.active and engine.lookup(mid) is None
    s, g = await call(http, "GET", f"{stack.http_url}/v1/messages/{mid}")
    assert s == 200 and g["status"] == "scheduled" and g["send_at"] == b["send_at"], g
    await asyncio.sleep(1.0)
    assert sim.stats.submits == before, "sent before its time"
    await until(lambda: sim.stats.submits > before, timeout=5, what="released when due")
    assert time.time() >= send_at, "sent early"
    await until(
        lambda: (d := engine.lookup(mid)) is not None and d.status is MsgStatus.DELIVERED,
        what="delivered",
    )
    s, g = await call(http, "GET", f"{stack.http_url}/v1/messages/{mid}")
    assert g["status"] == "delivered" and g["carrier"] == "sim-eu"
    # The spool row is gone once the carrier took it; the traffic log tells the story.
    for _ in range(100):
        if await db.fetchval("SELECT count(*) FROM spool WHERE id = $1", mid) == 0:
            break
        await asyncio.sleep(0.05)
    assert await db.fetchval("SELECT count(*) FROM spool WHERE id = $1", mid) == 0
    for _ in range(100):
        events = [
            r["status"]
            for r in await db.fetch(
                "SELECT status FROM delivery_events WHERE message_id = $1 ORDER BY at", mid
            )
        ]
        if "delivered" in events:
            break
        await asyncio.sleep(0.05)
    assert events[:2] == ["scheduled", "queued"] and events[-1] == "delivered", events
    submitted_at = await db.fetchval(
        "SELECT at FROM delivery_events WHERE message_id = $1 AND status = 'submitted'", mid
    )
    assert submitted_at.timestamp() >= send_at - 0.001


async def test_http_batch_mixes_scheduled_and_immediate_and_past_means_now(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = await stack_factory()
    later = rfc3339(time.time() + 300)
    too_far = rfc3339(time.time() + 40 * 86400)
    s, b = await call(
        http,
        "POST",
        stack.http_url + "/v1/messages",
        {
            "messages": [
                {"to": [DK, "+4512345679"], "from": "Acme", "text": "a", "send_at": later},
                {"to": DK, "from": "Acme", "text": "b", "send_at": rfc3339(time.time() - 60)},
                {
                    "to": DK,
                    "from": "Acme",
                    "text": "c",
                    "send_at": too_far,
                },
                {"to": DK, "from": "Acme", "text": "d", "send_at": "2026-12-01 09:00"},
            ]
        },
    )
    assert s == 202, b
    got = [(m["index"], m["status"], m.get("send_at")) for m in b["messages"]]
    assert got[0][:2] == (0, "scheduled") and got[1][:2] == (0, "scheduled")
    assert got[2] == (1, "accepted", None)
    errors = {e["index"]: e for e in b["errors"]}
    assert errors[2]["type"] == PROBLEM_BASE + "schedule-too-far"
    assert errors[2]["field"] == "send_at"
    assert errors[3]["type"] == PROBLEM_BASE + "invalid-send-at"
    assert errors[3]["field"] == "send_at"


async def test_http_cancel_a_waiting_message(
    stack_factory: Any, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    stack = await stack_factory()
    url = stack.http_url + "/v1/messages"
    body = {"to": DK, "from": "Acme", "text": "never", "send_at": rfc3339(time.time() + 60)}
    s, b = await call(http, "POST", url, body)
    assert s == 202 and b["status"] == "scheduled"
    mid = b["id"]
    # Another account cannot see or cancel it.
    s, p = await call(http, "DELETE", f"{url}/{mid}", headers=ACME)
    assert s == 404 and p["type"] == PROBLEM_BASE + "not-found"
    s, c = await call(http, "DELETE", f"{url}/{mid}")
    assert s == 200 and c["status"] == "canceled" and c["id"] == mid, c
    assert await due_at(db, mid) is None
    assert await db.fetchval("SELECT count(*) FROM spool WHERE id = $1", mid) == 0
    s, g = await call(http, "GET", f"{url}/{mid}")
    assert s == 200 and g["status"] == "canceled"
    s, p = await call(http, "DELETE", f"{url}/{mid}")
    assert s == 409 and p["type"] == PROBLEM_BASE + "not-cancelable", p
    # A message that already left cannot be canceled either.
    s, now = await call(http, "POST", url, {"to": DK, "from": "Acme", "text": "now"})
    assert s == 202 and now["status"] == "accepted"
    s, p = await call(http, "DELETE", f"{url}/{now['id']}")
    assert s == 409 and p["type"] == PROBLEM_BASE + "not-cancelable"
    s, p = await call(http, "DELETE", f"{url}/0000000000000000ffff")
    assert s == 404
    for _ in range(100):
        st = await db.fetchval(
            "SELECT status FROM delivery_events WHERE message_id = $1 AND status = 'canceled'",
            mid,
        )
        if st:
            break
        await asyncio.sleep(0.05)
    assert st == "canceled"


async def test_scheduling_needs_the_durable_spool(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = await stack_factory(delivery_guarantee="in-memory")
    s, p = await call(
        http,
        "POST",
        stack.http_url + "/v1/messages",
        {"to": DK, "from": "Acme", "text": "x", "send_at": rfc3339(time.time() + 60)},
    )
    assert s == 422 and p["type"] == PROBLEM_BASE + "schedule-unavailable", p
    assert p["field"] == "send_at"


async def test_secret_scheduled_message_is_encrypted_in_the_spool(
    stack_factory: Any, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    url_body = {
        "to": DK,
        "from": "Acme",
        "text": "canary-7f3e secret later",
        "class": "secret",
        "send_at": rfc3339(time.time() + 1.5),
    }
    # Without a spool key a secret message cannot wait durably: refused.
    os.environ.pop("ROUTER_SPOOL_KEY", None)
    stack = await stack_factory()
    s, p = await call(http, "POST", stack.http_url + "/v1/messages", url_body)
    assert s == 422 and p["type"] == PROBLEM_BASE + "schedule-unavailable", p
    await stack.router.stop(timeout=3)
    os.environ["ROUTER_SPOOL_KEY"] = secrets.token_hex(32)
    try:
        stack = await stack_factory()
        url_body["send_at"] = rfc3339(time.time() + 1.5)
        s, b = await call(http, "POST", stack.http_url + "/v1/messages", url_body)
        assert s == 202 and b["status"] == "scheduled", b
        row = await db.fetchrow("SELECT encrypted, payload FROM spool WHERE id = $1", b["id"])
        assert row["encrypted"] is True
        assert b"canary-7f3e" not in bytes(row["payload"])
        assert b"4512345678" not in bytes(row["payload"])
        engine = stack.router.engine
        await until(
            lambda: (d := engine.lookup(b["id"])) is not None and d.status is MsgStatus.DELIVERED,
            what="secret scheduled message delivered",
        )
    finally:
        os.environ.pop("ROUTER_SPOOL_KEY", None)


async def test_scheduled_message_survives_a_restart(
    stack_factory: Any, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    stack = await stack_factory()
    send_at = time.time() + 3
    s, b = await call(
        http,
        "POST",
        stack.http_url + "/v1/messages",
        {"to": DK, "from": "Acme", "text": "after restart", "send_at": rfc3339(send_at)},
    )
    assert s == 202
    mid = b["id"]
    await stack.router.stop(timeout=3)
    assert await due_at(db, mid) is not None  # still waiting, in the database only
    stack = await stack_factory()
    engine = stack.router.engine
    assert engine.lookup(mid) is None  # a restart does not pull it into memory early
    await until(
        lambda: (d := engine.lookup(mid)) is not None and d.status is MsgStatus.DELIVERED,
        timeout=10,
        what="delivered by the restarted router",
    )
    assert time.time() >= send_at


async def test_smpp_schedule_query_and_cancel(stack_factory: Any) -> None:
    stack = await stack_factory()
    sim = stack.sims["sim-eu"]
    esme, resp = await connect(stack.smpp_port)
    try:
        assert resp.status == Status.ESME_ROK
        before = sim.stats.submits
        # Relative format: 2 seconds from now.
        t0 = time.time()
        r = await esme.submit(DK, "in two seconds", schedule_delivery_time="000000000002000R")
        assert r.status == Status.ESME_ROK
        soon = r.message_id  # type: ignore[attr-defined]
        q = await esme.request(QuerySm(message_id=soon, source_addr_ton=5, source_addr="Acme"))
        assert q.status == Status.ESME_ROK
        assert q.message_state == MessageState.ENROUTE  # type: ignore[attr-defined]
        assert q.final_date == ""  # type: ignore[attr-defined]
        # Absolute format, an hour ahead: canceled while it waits.
        later = time.strftime("%y%m%d%H%M%S", time.gmtime(time.time() + 3600)) + "000+"
        r = await esme.submit(DK, "in an hour", schedule_delivery_time=later)
        assert r.status == Status.ESME_ROK
        hour = r.message_id  # type: ignore[attr-defined]
        c = await esme.request(CancelSm(message_id=hour, source_addr_ton=5, source_addr="Acme"))
        assert c.status == Status.ESME_ROK
        await until(lambda: hour in esme.receipts, what="receipt of the canceled message")
        receipt = esme.receipts[hour]
        assert receipt.tlv_int(Tag.MESSAGE_STATE) == MessageState.DELETED
        assert b"stat:DELETED" in receipt.short_message
        q = await esme.request(QuerySm(message_id=hour, source_addr_ton=5, source_addr="Acme"))
        assert q.message_state == MessageState.DELETED  # type: ignore[attr-defined]
        # Canceling again, an unknown id, or another account's message: RCANCELFAIL.
        c = await esme.request(CancelSm(message_id=hour))
        assert c.status == Status.ESME_RCANCELFAIL
        c = await esme.request(CancelSm(message_id="0000000000000000ffff"))
        assert c.status == Status.ESME_RCANCELFAIL
        c = await esme.request(CancelSm(message_id=""))
        assert c.status == Status.ESME_RCANCELFAIL
        assert sim.stats.submits == before
        await until(lambda: soon in esme.receipts, timeout=8, what="scheduled receipt")
        assert time.time() - t0 >= 2.0
        assert esme.receipts[soon].tlv_int(Tag.MESSAGE_STATE) == MessageState.DELIVERED
        assert sim.stats.submits == before + 1  # the canceled one never left
        # The bind is still fine.
        assert (await esme.submit(DK, "now")).status == Status.ESME_ROK
    finally:
        esme.close()


async def test_smpp_cancel_of_another_accounts_message_fails(stack_factory: Any) -> None:
    stack = await stack_factory()
    acme, _ = await connect(stack.smpp_port)
    demo, _ = await connect(stack.smpp_port, system_id="demo", password="demo-pass")
    try:
        r = await acme.submit(DK, "mine", schedule_delivery_time="000000010000000R")
        mid = r.message_id  # type: ignore[attr-defined]
        c = await demo.request(CancelSm(message_id=mid))
        assert c.status == Status.ESME_RCANCELFAIL
        q = await demo.request(QuerySm(message_id=mid))
        assert q.status == Status.ESME_RQUERYFAIL
        c = await acme.request(CancelSm(message_id=mid))
        assert c.status == Status.ESME_ROK
    finally:
        acme.close()
        demo.close()


async def test_opt_out_after_scheduling_is_honoured_when_due(
    stack_factory: Any, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    stack = await stack_factory()
    engine = stack.router.engine
    s, b = await call(
        http,
        "POST",
        stack.http_url + "/v1/messages",
        {"to": DK, "from": "Acme", "text": "x", "send_at": rfc3339(time.time() + 1.5)},
    )
    assert s == 202
    mid = b["id"]
    assert engine.optout is not None
    account_id = await db.fetchval("SELECT id FROM accounts WHERE name = 'demo'")
    await engine.optout.add(db, account_id, DK.removeprefix("+"), actor="test")
    await until(
        lambda: (d := engine.lookup(mid)) is not None and d.status.final,
        what="final when due",
    )
    d = engine.lookup(mid)
    assert d is not None and d.status is MsgStatus.FAILED and d.error == "opted_out"
