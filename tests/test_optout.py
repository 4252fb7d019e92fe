"""The opt-out list: in-memory per account, audited with a hash, followed
across nodes; submissions to an opted-out number are refused over HTTP (422
opted-out) and SMPP (ESME_ROPTEDOUT).

The last two tests need the Engine/app wiring (Router.optout, the opt-out
check in Engine, add_admin_routes on the HTTP API)."""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import aiohttp
import asyncpg
import pytest

from router.accounts import create_account
from router.smpp import pdu as P
from router.smpp.constants import Status
from router.store.audit import msisdn_hash
from router.store.optout import ACCOUNTS_CHANNEL, InvalidNumber, OptOutList

KEY = b"o" * 32
NUMBER = "4512345678"


async def test_add_contains_remove_and_accounts_are_separate(db: asyncpg.Pool) -> None:
    a = await create_account(db, "a")
    b = await create_account(db, "b")
    optout = OptOutList(KEY)
    await optout.load(db)
    assert not optout.contains(a, NUMBER)
    assert await optout.add(db, a, "+" + NUMBER, "test") is True
    assert await optout.add(db, a, NUMBER, "test") is False  # already there
    assert optout.contains(a, NUMBER) and not optout.contains(b, NUMBER)
    assert await db.fetchval("SELECT count(*) FROM opt_out WHERE account_id = $1", a) == 1

    fresh = OptOutList(KEY)
    await fresh.load(db)
    assert fresh.contains(a, NUMBER) and fresh.numbers(a) == [NUMBER]

    assert await optout.remove(db, a, NUMBER, "test") is True
    assert await optout.remove(db, a, NUMBER, "test") is False
    assert not optout.contains(a, NUMBER)
    with pytest.raises(InvalidNumber):
        await optout.add(db, a, "12", "test")


async def test_changes_are_audited_with_a_hash(db: asyncpg.Pool) -> None:
    a = await create_account(db, "a")
    before = await db.fetchval("SELECT coalesce(max(id), 0) FROM audit_log")
    optout = OptOutList(KEY)
    await optout.add(db, a, NUMBER, "api-key:7")
    await optout.remove(db, a, NUMBER, "api-key:7")
    rows = await db.fetch(
        "SELECT actor, action, account_id, detail::text AS d FROM audit_log"
        " WHERE id > $1 ORDER BY id",
        before,
    )
    assert [r["action"] for r in rows] == ["opt_out.add", "opt_out.remove"]
    for r in rows:
        assert r["actor"] == "api-key:7" and r["account_id"] == a
        assert json.loads(r["d"])["msisdn_hash"] == msisdn_hash(NUMBER, KEY)
        assert NUMBER not in r["d"]


async def test_another_nodes_change_arrives_by_notify(db: asyncpg.Pool) -> None:
    a = await create_account(db, "a")
    follower = OptOutList(KEY, refresh=60)
    follower.start(db)
    try:
        await asyncio.sleep(0.2)  # listening
        await OptOutList(KEY).add(db, a, NUMBER, "node-2")
        for _ in range(100):
            if follower.contains(a, NUMBER):
                break
            await asyncio.sleep(0.02)
        assert follower.contains(a, NUMBER)
        await db.execute("DELETE FROM opt_out")  # e.g. by hand, or the CLI
        for _ in range(100):
            if not follower.contains(a, NUMBER):
                break
            await asyncio.sleep(0.02)
        assert not follower.contains(a, NUMBER)
    finally:
        await follower.stop()


async def test_account_and_key_changes_are_announced_too(db: asyncpg.Pool) -> None:
    reloads: list[int] = []

    async def reload_accounts() -> None:
        reloads.append(1)

    follower = OptOutList(KEY, refresh=60)
    follower.start(db, also={ACCOUNTS_CHANNEL: reload_accounts})
    try:
        for _ in range(100):  # one reload right after (re)connecting
            if reloads:
                break
            await asyncio.sleep(0.02)
        assert reloads == [1]
        a = await create_account(db, "new")
        await db.execute("UPDATE api_keys SET revoked_at = now() WHERE account_id = $1", a)
        for _ in range(100):
            if len(reloads) >= 2:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert 2 <= len(reloads) <= 3  # a burst is coalesced
    finally:
        await follower.stop()


# ------------------------------------------------- end to end (needs wiring)


async def _opt_out_over_api(stack: Any, number: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{stack.http_url}/v1/admin/opt-out",
            json={"msisdn": number},
            headers={"Authorization": "Bearer demo-key"},
        ) as resp:
            assert resp.status == 201, await resp.text()


async def test_http_submission_to_an_opted_out_number_is_refused(stack_factory: Any) -> None:
    stack = await stack_factory()
    await _opt_out_over_api(stack, "+" + NUMBER)
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer demo-key"}) as http:
        async with http.post(
            f"{stack.http_url}/v1/messages", json={"to": "+" + NUMBER, "from": "Demo", "text": "hi"}
        ) as resp:
            assert resp.status == 422
            body = await resp.json()
            assert body["type"].endswith("/opted-out")
            assert NUMBER not in json.dumps(body)
        async with http.post(
            f"{stack.http_url}/v1/messages",
            json={"to": "+4587654321", "from": "Demo", "text": "hi"},
        ) as resp:
            assert resp.status == 202  # other numbers still go
    # Another account may still message that number.
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer acme-key-0001"}) as http:
        async with http.post(
            f"{stack.http_url}/v1/messages", json={"to": "+" + NUMBER, "from": "Acme", "text": "hi"}
        ) as resp:
            assert resp.status == 202


class RawSmpp:
    """A minimal ESME over the router's own codec: bind, submit, read the resp."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.seq = 0

    async def request(self, p: Any) -> Any:
        self.seq += 1
        p.sequence = self.seq
        self.writer.write(p.encode())
        while True:
            head = await asyncio.wait_for(self.reader.readexactly(4), 5)
            (length,) = struct.unpack(">I", head)
            frame = head + await self.reader.readexactly(length - 4)
            resp = P.decode(frame)
            if resp.is_response and resp.sequence == self.seq:
                return resp
            if not resp.is_response:  # deliver_sm, enquire_link: acknowledge
                self.writer.write(P.response_for(resp).encode())


async def test_smpp_submission_to_an_opted_out_number_gets_roptedout(stack_factory: Any) -> None:
    stack = await stack_factory()
    await _opt_out_over_api(stack, NUMBER)
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.smpp_port)
    client = RawSmpp(reader, writer)
    try:
        bound = await client.request(P.BindTransceiver(system_id="demo", password="demo-pass"))
        assert bound.status == Status.ESME_ROK

        def submit(dest: str) -> Any:
            return P.SubmitSm(
                source_addr_ton=5,
                source_addr="Demo",
                dest_addr_ton=1,
                dest_addr_npi=1,
                destination_addr=dest,
                short_message=b"hi",
            )

        refused = await client.request(submit(NUMBER))
        assert refused.status == Status.ESME_ROPTEDOUT == 0x401
        taken = await client.request(submit("4587654321"))
        assert taken.status == Status.ESME_ROK
    finally:
        writer.close()
