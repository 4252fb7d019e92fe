"""GET /v1/traffic and the admin privacy endpoints over real HTTP (a router
from ``stack_factory``): own rows only, filters, keyset pagination, 401/403,
data-subject export/erasure, the opt-out list, and an audit row for each
read, change and refusal, holding a hash of any number, never the number.

Needs the app wiring (add_admin_routes on the HTTP API, Router.optout)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from router.accounts import add_api_key, create_account
from router.store.audit import msisdn_hash

DEMO = {"Authorization": "Bearer demo-key"}
ACME = {"Authorization": "Bearer acme-key-0001"}
SENDER = {"Authorization": "Bearer sender-only-key"}
NUMBER = "4512345678"
US = "14155552671"
TEST_KEY = "hex:" + "ab" * 32
UTC = dt.UTC


@pytest.fixture(autouse=True)
def audit_key(monkeypatch: pytest.MonkeyPatch) -> bytes:
    monkeypatch.setenv("ROUTER_AUDIT_KEY", TEST_KEY)
    return bytes.fromhex("ab" * 32)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(
    http: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str], **kw: Any
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with http.request(method, url, headers=headers, **kw) as resp:
        raw = await resp.read()
        if resp.content_type in ("application/json", "application/problem+json"):
            return resp.status, json.loads(raw), resp
        return resp.status, raw.decode() if raw else None, resp


async def add_row(
    pool: asyncpg.Pool,
    account_id: int,
    accepted_at: dt.datetime,
    *,
    destination: str | None = NUMBER,
    country: str = "DK",
    cls: str = "standard",
) -> str:
    msg_id = secrets.token_hex(10)
    secret = cls == "secret"
    await pool.execute(
        "INSERT INTO traffic_log (id, account_id, class, ingress, source, destination, country,"
        " carrier, parts, data_coding, body, accepted_at)"
        " VALUES ($1, $2, $3, 'http', $4, $5, $6, 'sim-eu', 1, 0, $7, $8)",
        msg_id,
        account_id,
        cls,
        None if secret else "Shop",
        None if secret else destination,
        country,
        None if secret else "your code is 1234",
        accepted_at,
    )
    return msg_id


async def account_id(pool: asyncpg.Pool, name: str) -> int:
    return int(await pool.fetchval("SELECT id FROM accounts WHERE name = $1", name))


async def audit_since(pool: asyncpg.Pool, before: int) -> list[Any]:
    return await pool.fetch(
        "SELECT id, actor, action, account_id, detail::text AS d"
        " FROM audit_log WHERE id > $1 ORDER BY id",
        before,
    )


async def audit_mark(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT coalesce(max(id), 0) FROM audit_log"))


async def test_traffic_own_rows_filters_pagination_and_audit(
    stack_factory: Any, db: asyncpg.Pool, http: aiohttp.ClientSession, audit_key: bytes
) -> None:
    stack = await stack_factory()
    demo, acme = await account_id(db, "demo"), await account_id(db, "acme")
    t0 = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(hours=1)
    mine = [await add_row(db, demo, t0 + dt.timedelta(minutes=i)) for i in range(5)]
    us = await add_row(db, demo, t0 + dt.timedelta(minutes=10), destination=US, country="US")
    secret = await add_row(db, demo, t0 + dt.timedelta(minutes=11), cls="secret")
    theirs = [await add_row(db, acme, t0 + dt.timedelta(minutes=i)) for i in range(2)]
    await db.execute(
        "INSERT INTO delivery_events (message_id, account_id, status, carrier, at)"
        " VALUES ($1, $2, 'delivered', 'sim-eu', $3)",
        mine[0],
        demo,
        t0 + dt.timedelta(minutes=30),
    )
    url = f"{stack.http_url}/v1/traffic"
    before = await audit_mark(db)

    status, body, resp = await call(http, "GET", url, ACME)
    assert status == 200 and resp.headers["Cache-Control"] == "no-store"
    assert {m["id"] for m in body["messages"]} == set(theirs)  # never demo's rows

    status, body, _ = await call(http, "GET", url, DEMO)
    ids = [m["id"] for m in body["messages"]]
    assert ids == [secret, us, *reversed(mine)]  # newest first
    first = body["messages"][-1]
    assert (first["to"], first["from"], first["text"], first["country"]) == (
        NUMBER,
        "Shop",
        "your code is 1234",
        "DK",
    )
    assert first["status"] == "delivered" and body["messages"][-2]["status"] == "queued"
    assert body["messages"][0]["to"] is None and body["messages"][0]["class"] == "secret"

    async def ids_for(params: dict[str, str]) -> list[str]:
        status, body, _ = await call(http, "GET", url, DEMO, params=params)
        assert status == 200, body
        return [m["id"] for m in body["messages"]]

    assert set(await ids_for({"destination": "+" + NUMBER})) == set(mine)
    assert await ids_for({"country": "us"}) == [us]
    assert await ids_for({"status": "delivered"}) == [mine[0]]
    window = {
        "from": (t0 + dt.timedelta(minutes=1)).isoformat(),
        "to": (t0 + dt.timedelta(minutes=3)).isoformat().replace("+00:00", "Z"),
    }
    assert await ids_for(window) == [mine[2], mine[1]]
    assert await ids_for({"destination": NUMBER, "country": "DK", "status": "queued"}) == [
        mine[4],
        mine[3],
        mine[2],
        mine[1],
    ]

    seen: list[str] = []
    params = {"limit": "3"}
    pages = 0
    while True:
        status, body, _ = await call(http, "GET", url, DEMO, params=params)
        pages += 1
        seen += [m["id"] for m in body["messages"]]
        if body["next_cursor"] is None:
            break
        params = {"limit": "3", "cursor": body["next_cursor"]}
    assert pages == 3 and seen == ids

    reads = [r for r in await audit_since(db, before) if r["action"] == "traffic.read"]
    assert len(reads) == 2 + 5 + 3
    assert reads[0]["account_id"] == acme and reads[1]["account_id"] == demo
    assert reads[0]["actor"].startswith("api-key:")
    hashed = [json.loads(r["d"])["filter"] for r in reads]
    assert {"destination_hash": msisdn_hash(NUMBER, audit_key)}.items() <= hashed[2].items()
    assert all(NUMBER not in r["d"] and US not in r["d"] for r in reads)


async def test_bad_traffic_queries_are_problems(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = await stack_factory()
    url = f"{stack.http_url}/v1/traffic"
    for params, field in (
        ({"from": "yesterday"}, "from"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"cursor": "%%%"}, "cursor"),
        ({"status": "lost"}, "status"),
        ({"destination": "12"}, "destination"),
        ({"account": "demo"}, "account"),
    ):
        status, body, resp = await call(http, "GET", url, DEMO, params=params)
        assert status == 422 and resp.content_type == "application/problem+json", params
        assert body["type"].endswith("/invalid-field") and body["field"] == field
    status, body, _ = await call(http, "GET", url, {})
    assert status == 401 and body["type"].endswith("/unauthorized")


async def test_permissions_are_enforced_and_refusals_audited(
    stack_factory: Any, db: asyncpg.Pool, http: aiohttp.ClientSession
) -> None:
    sender = await create_account(db, "sender")
    await add_api_key(db, sender, "sender-only-key", ("send",))
    stack = await stack_factory()
    acme = await account_id(db, "acme")
    before = await audit_mark(db)
    base = stack.http_url
    refused = [
        ("GET", "/v1/traffic", SENDER, {}),
        ("GET", "/v1/admin/dsr/export", ACME, {"params": {"msisdn": NUMBER}}),
        ("POST", "/v1/admin/dsr/erase", ACME, {"json": {"msisdn": NUMBER}}),
        ("GET", "/v1/admin/opt-out", ACME, {}),
        ("POST", "/v1/admin/opt-out", ACME, {"json": {"msisdn": NUMBER}}),
        ("DELETE", "/v1/admin/opt-out", ACME, {"params": {"msisdn": NUMBER}}),
    ]
    for method, path, headers, kw in refused:
        status, body, _ = await call(http, method, base + path, headers, **kw)
        assert status == 403 and body["type"].endswith("/forbidden"), (method, path)
    denied = [r for r in await audit_since(db, before) if r["action"] == "denied"]
    assert [r["account_id"] for r in denied] == [sender] + [acme] * 5
    assert [json.loads(r["d"])["attempted"] for r in denied] == [
        "traffic.read",
        "dsr.export",
        "dsr.erase",
        "opt_out.list",
        "opt_out.add",
        "opt_out.remove",
    ]
    assert all(NUMBER not in r["d"] for r in denied)
    assert await db.fetchval("SELECT count(*) FROM opt_out") == 0


async def test_dsr_export_and_erase_over_http(
    stack_factory: Any, db: asyncpg.Pool, http: aiohttp.ClientSession, audit_key: bytes
) -> None:
    stack = await stack_factory()
    demo, acme = await account_id(db, "demo"), await account_id(db, "acme")
    now = dt.datetime.now(UTC)
    rows = [await add_row(db, demo, now - dt.timedelta(minutes=i)) for i in (2, 1)]
    other = await add_row(db, demo, now, destination=US, country="US")
    foreign = await add_row(db, acme, now)
    url = f"{stack.http_url}/v1/admin/dsr"
    before = await audit_mark(db)

    status, body, resp = await call(
        http, "GET", url + "/export", DEMO, params={"msisdn": "+" + NUMBER}
    )
    assert status == 200 and resp.headers["Cache-Control"] == "no-store"
    assert [m["id"] for m in body["messages"]] == rows
    status, text, resp = await call(
        http, "POST", url + "/export", DEMO, json={"msisdn": NUMBER, "format": "csv"}
    )
    assert status == 200 and resp.content_type == "text/csv"
    assert [r["id"] for r in csv.DictReader(io.StringIO(text))] == rows

    status, body, _ = await call(http, "POST", url + "/erase", DEMO, json={"msisdn": NUMBER})
    assert status == 200 and body == {"erased": 2}
    left = {
        r["id"]: r["destination"] for r in await db.fetch("SELECT id, destination FROM traffic_log")
    }
    assert [left[i] for i in rows] == ["45123", "45123"]
    assert left[other] == US and left[foreign] == NUMBER  # acme's row is not demo's to erase

    status, body, _ = await call(http, "GET", url + "/export", DEMO, params={"msisdn": NUMBER})
    assert body == {"messages": []}
    for bad in ({"msisdn": "12"}, {"msisdn": NUMBER, "format": "xml"}):
        status, body, _ = await call(http, "GET", url + "/export", DEMO, params=bad)
        assert status == 422 and NUMBER not in json.dumps(body)
    status, body, _ = await call(http, "POST", url + "/erase", DEMO, data="msisdn=1")
    assert status == 415

    audited = [r for r in await audit_since(db, before) if r["action"].startswith("dsr.")]
    assert [r["action"] for r in audited] == ["dsr.export", "dsr.export", "dsr.erase", "dsr.export"]
    assert all(
        json.loads(r["d"])["msisdn_hash"] == msisdn_hash(NUMBER, audit_key)
        and r["account_id"] == demo
        for r in audited
    )
    everything = "\n".join(r["t"] for r in await db.fetch("SELECT a::text AS t FROM audit_log a"))
    assert NUMBER not in everything


async def test_opt_out_list_over_http(
    stack_factory: Any, db: asyncpg.Pool, http: aiohttp.ClientSession
) -> None:
    stack = await stack_factory()
    url = f"{stack.http_url}/v1/admin/opt-out"
    before = await audit_mark(db)
    status, body, _ = await call(http, "POST", url, DEMO, json={"msisdn": "+" + NUMBER})
    assert status == 201 and body["added"] is True
    status, body, _ = await call(http, "POST", url, DEMO, json={"msisdn": NUMBER})
    assert status == 200 and body["added"] is False
    assert stack.router.optout.contains(await account_id(db, "demo"), NUMBER)
    status, body, resp = await call(http, "GET", url, DEMO)
    assert [n["msisdn"] for n in body["numbers"]] == [NUMBER]
    assert resp.headers["Cache-Control"] == "no-store"
    status, body, _ = await call(http, "GET", url, DEMO, params={"msisdn": NUMBER})
    assert body == {"opted_out": True}
    status, body, _ = await call(http, "DELETE", url, DEMO, params={"msisdn": NUMBER})
    assert status == 204
    status, body, _ = await call(http, "DELETE", url, DEMO, json={"msisdn": NUMBER})
    assert status == 404 and body["type"].endswith("/not-found")
    status, body, _ = await call(http, "POST", url, DEMO, json={"msisdn": "hello"})
    assert status == 422 and body["field"] == "msisdn"
    status, body, _ = await call(
        http, "POST", url, {**DEMO, "Content-Type": "application/json"}, data=b"[1]"
    )
    assert status == 400 and body["type"].endswith("/invalid-json")
    actions = [r["action"] for r in await audit_since(db, before)]
    assert actions == [
        "opt_out.add",
        "opt_out.add",
        "opt_out.list",
        "opt_out.check",
        "opt_out.remove",
        "opt_out.remove",
    ]
