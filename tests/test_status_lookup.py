"""Status lookups outlive the router's memory: after a restart, GET
/v1/messages/{id} and query_sm answer from the traffic log (no personal
field read), for the same account only."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import asyncpg

from router.model import Status as MsgStatus
from router.smpp.constants import MessageState, Status
from router.smpp.pdu import QuerySm
from tests.esme import connect, until

DEMO = {"Authorization": "Bearer demo-key", "Content-Type": "application/json"}
ACME = {"Authorization": "Bearer acme-key-0001", "Content-Type": "application/json"}


async def logged(db: asyncpg.Pool, message_id: str, status: str) -> None:
    for _ in range(200):
        if await db.fetchval(
            "SELECT 1 FROM delivery_events WHERE message_id = $1 AND status = $2",
            message_id,
            status,
        ):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{status} event not logged")


async def test_status_after_restart_from_the_traffic_log(
    stack_factory: Any, db: asyncpg.Pool
) -> None:
    stack = await stack_factory()
    engine = stack.router.engine
    async with aiohttp.ClientSession() as http:
        body = {"to": "+4512345678", "from": "Acme", "text": "hello", "userref": "r-1"}
        async with http.post(
            stack.http_url + "/v1/messages", data=json.dumps(body), headers=DEMO
        ) as r:
            assert r.status == 202
            mid = (await r.json())["id"]
        await until(
            lambda: (d := engine.lookup(mid)) is not None and d.status is MsgStatus.DELIVERED,
            what="delivered",
        )
        esme, _ = await connect(stack.smpp_port)
        try:
            sub = await esme.submit("+4512345678", "over smpp")
            smpp_id = sub.message_id  # type: ignore[attr-defined]
            await until(lambda: smpp_id in esme.receipts, what="smpp receipt")
        finally:
            esme.close()
        await logged(db, mid, "delivered")
        await logged(db, smpp_id, "delivered")
        await stack.router.stop(timeout=3)

        stack = await stack_factory()
        assert stack.router.engine.lookup(mid) is None  # not in memory any more
        async with http.get(f"{stack.http_url}/v1/messages/{mid}", headers=DEMO) as r:
            assert r.status == 200
            g = await r.json()
        assert g["status"] == "delivered" and g["carrier"] == "sim-eu", g
        assert g["userref"] == "r-1" and g["parts"] == 1 and g["country"] == "DK"
        assert g["encoding"] == "gsm7"
        assert g["expires_at"] > g["accepted_at"]
        async with http.get(f"{stack.http_url}/v1/messages/{mid}", headers=ACME) as r:
            assert r.status == 404  # another account's message: as if it did not exist

    esme, _ = await connect(stack.smpp_port)
    try:
        q = await esme.request(QuerySm(message_id=smpp_id, source_addr_ton=5, source_addr="Acme"))
        assert q.status == Status.ESME_ROK
        assert q.message_state == MessageState.DELIVERED  # type: ignore[attr-defined]
        assert q.final_date != ""  # type: ignore[attr-defined]
        q = await esme.request(QuerySm(message_id=mid))  # demo's message, asked by acme
        assert q.status == Status.ESME_RQUERYFAIL
    finally:
        esme.close()
