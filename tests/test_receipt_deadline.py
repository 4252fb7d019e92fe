"""Messages whose carrier receipt never comes end as ``unknown``
(router.carriers.deadline): over real SMPP and HTTP, with a simulator that
loses every receipt, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from typing import Any

import aiohttp
import asyncpg
import pytest

from router.accounts import add_api_key, create_account
from router.config import ConfigError, WebhookConfig, load_config
from router.model import MessageClass, Status
from router.observe import metrics
from router.sim.smsc import SimConfig
from router.smpp.constants import MessageState, Tag
from router.smpp.constants import Status as SmppStatus
from router.smpp.pdu import BindReceiver, BindTransmitter, QuerySm
from router.store.spool import PgSpool
from tests.esme import TestEsme as Esme
from tests.esme import connect, until
from tests.factories import make_message
from tests.webhook_receiver import DEMO, ok, submit

LOSING = {
    "sim-eu": SimConfig(port=0, lose_ratio=1.0),  # +45: every receipt lost
    "sim-world": SimConfig(port=0, dlr_delay=0.05),
}
ONE_SECOND = "000000000001000R"  # SMPP relative validity_period


async def routes(db: asyncpg.Pool) -> int:
    return int(await db.fetchval("SELECT count(*) FROM receipt_routes"))


async def wait_routes(db: asyncpg.Pool, n: int) -> None:
    deadline = time.monotonic() + 10
    while await routes(db) < n:
        assert time.monotonic() < deadline, f"{n} receipt routes not written"
        await asyncio.sleep(0.05)


async def wait_routes_down_to(db: asyncpg.Pool, n: int) -> None:
    """Claimed routes are deleted by the spool's next upkeep round."""
    deadline = time.monotonic() + 10
    while await routes(db) > n:
        assert time.monotonic() < deadline, f"receipt routes not deleted down to {n}"
        await asyncio.sleep(0.05)


async def three_parts(esme: Esme, **fields: Any) -> Any:
    """A 400-character GSM text to +45 in message_payload (3 parts, one
    route each), receipt requested; its accepted submit_sm_resp."""
    r = await esme.submit("+4512345678", b"", tlvs={Tag.MESSAGE_PAYLOAD: b"x" * 400}, **fields)
    assert r.status == 0
    return r


async def losing_stack(stack_factory: Any, **cfg_kw: Any) -> tuple[Any, Esme]:
    """A router whose sim-eu (+45) loses every receipt, receipt_timeout 0,
    and a transceiver of the customer."""
    stack = await stack_factory(sims=LOSING, receipt_timeout=0.0, **cfg_kw)
    esme, resp = await connect(stack.smpp_port)
    assert resp.status == 0
    return stack, esme


async def test_smpp_message_without_receipt_ends_unknown_with_a_receipt_once(
    stack_factory: Any, db: asyncpg.Pool
) -> None:
    stack, esme = await losing_stack(stack_factory)
    router = stack.router
    try:
        lost = []
        for i in range(5):
            r = await esme.submit("+4512345678", f"lost {i}", validity_period=ONE_SECOND)
            assert r.status == 0
            lost.append(r.message_id)
        kept = await esme.submit("+4512345678", "kept", validity_period="000001000000000R")
        fine = await esme.submit("+12025550123", "answered", validity_period=ONE_SECOND)
        await until(lambda: fine.message_id in esme.receipts, 10, "the answered receipt")
        await wait_routes(db, 6)
        # Before the validity has ended nothing is overdue.
        assert await router.deadlines.run_once() == 0
        await asyncio.sleep(1.2)
        assert await router.deadlines.run_once() == 5
        await until(lambda: len(esme.receipts) == 6, 10, "5 unknown receipts")
        for mid in lost:
            pdu = esme.receipts[mid]
            assert pdu.tlvs[Tag.MESSAGE_STATE] == bytes((MessageState.UNKNOWN,))
            assert b"stat:UNKNOWN err:001" in pdu.short_message
            assert router.engine.lookup(mid).status.value == "unknown"
            assert router.engine.lookup(mid).error == "no_receipt"
        assert router.engine.lookup(kept.message_id).status.value == "submitted"
        assert router.engine.lookup(fine.message_id).status.value == "delivered"
        # Claimed once: a second pass finds nothing (leased), then the
        # routes are deleted after the finish.
        assert await router.deadlines.run_once() == 0
        await wait_routes_down_to(db, 1)
        await asyncio.sleep(0.2)
        assert len(esme.delivers) == 6

        # The traffic log has the final status.
        async def logged() -> bool:
            n = await db.fetchval(
                "SELECT count(*) FROM delivery_events WHERE message_id = ANY($1::text[])"
                " AND status = 'unknown' AND error = 'no_receipt'",
                lost,
            )
            return int(n) == 5

        deadline = time.monotonic() + 10
        while not await logged():
            assert time.monotonic() < deadline, "traffic log not updated"
            await asyncio.sleep(0.05)
        # query_sm answers UNKNOWN too.
        q = await esme.request(QuerySm(message_id=lost[0], source_addr_ton=5, source_addr="Acme"))
        assert q.status == 0 and q.message_state == MessageState.UNKNOWN
    finally:
        esme.close()


async def test_a_multipart_message_is_finished_once_for_all_its_parts(
    stack_factory: Any, db: asyncpg.Pool
) -> None:
    stack, esme = await losing_stack(stack_factory)
    try:
        r = await three_parts(esme, validity_period=ONE_SECOND)
        await wait_routes(db, 3)
        await asyncio.sleep(1.2)
        # A small batch: the message's other parts come with its first one.
        stack.router.deadlines.batch = 1
        assert await stack.router.deadlines.run_once() == 1
        await wait_routes_down_to(db, 0)
        await until(lambda: r.message_id in esme.receipts, 10, "one receipt")
        await asyncio.sleep(0.2)
        assert len(esme.delivers) == 1
        assert b"sub:003" in esme.receipts[r.message_id].short_message
    finally:
        esme.close()


async def test_http_message_without_receipt_gets_an_unknown_webhook(
    stack_factory: Any, receivers: Any, db: asyncpg.Pool
) -> None:
    receiver = await receivers(ok())
    stack = await stack_factory(
        sims=LOSING, receipt_timeout=0.0, webhooks=WebhookConfig(allow_private_targets=True)
    )
    mid = await submit(
        stack, userref="u-1", validity_seconds=1, callback_url=receiver.url + "/hook"
    )
    await wait_routes(db, 1)
    await asyncio.sleep(1.2)
    assert await stack.router.deadlines.run_once() == 1
    await until(lambda: receiver.hits, 10, "the webhook")
    body = json.loads(receiver.hits[0].body)
    assert body["id"] == mid and body["userref"] == "u-1"
    assert body["status"] == "unknown" and body["error"] == "no_receipt"
    async with (
        aiohttp.ClientSession() as http,
        http.get(stack.http_url + f"/v1/messages/{mid}", headers=DEMO) as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["status"] == "unknown"


async def _acme(db: asyncpg.Pool) -> int:
    """The account stack_factory would make, made first: its id is needed."""
    acme = await create_account(db, "acme", system_id="acme", password="acme-pw1")
    await add_api_key(db, acme, "acme-key-0001", ("send", "read"))
    return int(acme)


async def left_behind(
    db: asyncpg.Pool,
    account_id: int,
    node: str,
    message_id: str,
    carrier_id: str,
    *,
    overdue: bool = False,
    final: tuple[str, str | None, dt.datetime] | None = None,
) -> None:
    """A receipt route a router wrote before it went down (a minute ago),
    and, with ``final``, the (status, error, time) the traffic log recorded
    for its message before the route could be deleted."""
    info = {"source": "Acme", "source_ton": 5, "source_npi": 0, "destination": "4512345678"}
    await db.execute(
        "INSERT INTO receipt_routes (carrier, carrier_id, message_id, part, parts, account_id,"
        " account, origin, class, country, registered_delivery, accepted_at, info, node,"
        " expect_by, created_at)"
        " VALUES ('sim-eu', $1, $2, 0, 1, $3, 'acme', 'smpp', 'standard', 'DK', 1,"
        " now() - interval '10 minutes', $4, $5, now() + make_interval(secs => $6),"
        " now() - interval '1 minute')",
        carrier_id,
        message_id,
        account_id,
        json.dumps({**info, "userref": None, "callback_url": None}),
        node,
        -60.0 if overdue else 3600.0,
    )
    if final is not None:
        status, error, at = final
        await db.execute(
            "INSERT INTO delivery_events (message_id, account_id, status, carrier, error, at)"
            " VALUES ($1, $2, 'submitted', 'sim-eu', NULL, $4::timestamptz - interval '5 seconds'),"
            " ($1, $2, $3, 'sim-eu', $5, $4)",
            message_id,
            account_id,
            status,
            at,
            error,
        )


async def events_of(db: asyncpg.Pool, message_id: str) -> list[str]:
    rows = await db.fetch(
        "SELECT status FROM delivery_events WHERE message_id = $1 ORDER BY at", message_id
    )
    return [r["status"] for r in rows]


async def test_a_restart_resends_a_final_receipt_the_crash_left_behind(
    stack_factory: Any, db: asyncpg.Pool
) -> None:
    """Node n1 went down after its traffic log recorded a message's final
    status but before it deleted the message's receipt route (and perhaps
    before its customer had the receipt). On restart the receipt is sent
    again with the logged status and time, within seconds; routes still
    waiting for a receipt, and other nodes' routes, are left alone."""
    acme = await _acme(db)
    at = dt.datetime(2026, 12, 7, 9, 41, 0, tzinfo=dt.UTC)
    done, waiting, other = "0190aa00000000000d01", "0190aa00000000000d02", "0190aa00000000000d03"
    await left_behind(db, acme, "n1", done, "c1", final=("delivered", None, at))
    await left_behind(db, acme, "n1", waiting, "c2")
    await left_behind(db, acme, "n2", other, "c3", final=("delivered", None, at))
    resent = metrics.RECEIPTS_RESENT._value.get()
    stack = await stack_factory(node="n1")
    esme, resp = await connect(stack.smpp_port)
    assert resp.status == 0
    try:
        await until(lambda: done in esme.receipts, 15, "the receipt the crash left unsent")
        pdu = esme.receipts[done]
        assert pdu.tlvs[Tag.MESSAGE_STATE] == bytes((MessageState.DELIVERED,))
        assert b"stat:DELIVRD" in pdu.short_message
        assert b"done date:2612070941" in pdu.short_message
        assert stack.router.engine.lookup(done).status.value == "delivered"

        async def left() -> set[str]:
            return {
                r["message_id"] for r in await db.fetch("SELECT message_id FROM receipt_routes")
            }

        deadline = time.monotonic() + 10
        while await left() != {waiting, other}:
            assert time.monotonic() < deadline, "the finished message's route was not deleted"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # traffic log flushes every 0.05 s here
        assert len(esme.delivers) == 1  # nothing for the waiting message, nor n2's
        assert await events_of(db, done) == ["submitted", "delivered"]  # not logged twice
        assert await stack.router.deadlines.resend_finished() == 0  # once
        assert metrics.RECEIPTS_RESENT._value.get() == resent + 1
    finally:
        esme.close()


async def test_an_overdue_route_with_a_logged_final_status_ends_with_it_not_unknown(
    stack_factory: Any, db: asyncpg.Pool
) -> None:
    """A dead node's route whose message the traffic log has as failed:
    at the deadline its submitter gets that status again, not 'unknown'."""
    acme = await _acme(db)
    at = dt.datetime(2026, 12, 7, 9, 42, 0, tzinfo=dt.UTC)
    failed, lost = "0190aa00000000000e01", "0190aa00000000000e02"
    await left_behind(db, acme, "n-gone", failed, "c1", overdue=True, final=("failed", "005", at))
    await left_behind(db, acme, "n-gone", lost, "c2", overdue=True)
    stack, esme = await losing_stack(stack_factory)
    try:
        assert await stack.router.deadlines.run_once() == 2
        await until(lambda: len(esme.receipts) == 2, 10, "two receipts")
        pdu = esme.receipts[failed]
        assert pdu.tlvs[Tag.MESSAGE_STATE] == bytes((MessageState.UNDELIVERABLE,))
        assert b"stat:UNDELIV err:001" in pdu.short_message  # our err for any failure
        assert b"done date:2612070942" in pdu.short_message
        assert stack.router.engine.lookup(failed).status.value == "failed"
        assert stack.router.engine.lookup(failed).error == "005"
        assert b"stat:UNKNOWN" in esme.receipts[lost].short_message
        await wait_routes_down_to(db, 0)
        await asyncio.sleep(0.3)
        assert await events_of(db, failed) == ["submitted", "failed"]
        assert await events_of(db, lost) == ["unknown"]
    finally:
        esme.close()


async def test_a_part_route_goes_with_its_receipt_after_its_message_ended(
    stack_factory: Any, db: asyncpg.Pool
) -> None:
    """A message that one part ended (as when a carrier refuses a part)
    while its other parts wait for receipts: those receipts still delete
    their routes. Left behind, they would outlive the message, and a restart
    would take them for routes a crash left and send its status again."""
    sims = {
        "sim-eu": SimConfig(port=0, dlr_delay=1.0),
        "sim-world": SimConfig(port=0, dlr_delay=0.05),
    }
    stack = await stack_factory(sims=sims)
    esme, resp = await connect(stack.smpp_port)
    assert resp.status == 0
    try:
        r = await three_parts(esme)
        await wait_routes(db, 3)
        engine = stack.router.engine
        d = engine.lookup(r.message_id)
        assert d is not None and d.status.value == "submitted"
        engine._finish(d, Status.FAILED, "carrier:ESME_RSUBMITFAIL", "sim-eu")
        await until(lambda: r.message_id in esme.receipts, 10, "the failed receipt")
        # The three parts' receipts come a second after their submit.
        await wait_routes_down_to(db, 0)
        await asyncio.sleep(0.2)
        assert len(esme.delivers) == 1
        assert b"stat:UNDELIV" in esme.receipts[r.message_id].short_message
        assert engine.lookup(r.message_id).status.value == "failed"
    finally:
        esme.close()


async def test_a_route_stays_until_the_customer_answers_every_part_receipt(
    stack_factory: Any, db: asyncpg.Pool
) -> None:
    """A message reassembled from three customer parts has a receipt per
    part id. The route of the carrier receipt that ended it stays until
    the customer has answered all three (tests/test_crash_recovery.py
    shows what it is kept for: a restart sends the receipts again)."""
    stack = await stack_factory()
    tx, _ = await connect(stack.smpp_port, bind_cls=BindTransmitter)
    rx, _ = await connect(stack.smpp_port, bind_cls=BindReceiver)
    rx.answer_delivers = False
    try:
        ids = []
        for seq in (1, 2, 3):
            udh = bytes((5, 0, 3, 0x17, 3, seq))
            r = await tx.submit("+4512345678", udh + b"part", esm_class=0x40)
            assert r.status == 0
            ids.append(r.message_id)
        await until(lambda: set(rx.receipts) == set(ids), 10, "a receipt per part")
        logged = "SELECT count(*) FROM delivery_events WHERE status = 'delivered'"
        deadline = time.monotonic() + 10
        while not await db.fetchval(logged):
            assert time.monotonic() < deadline, "the final status was not logged"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # route upkeep runs every few ms
        assert await routes(db) == 1
        for pdu in rx.delivers[:2]:
            rx.answer(pdu)
        await asyncio.sleep(0.5)
        assert await routes(db) == 1, "deleted before the last receipt was answered"
        rx.answer(rx.delivers[2])
        await wait_routes_down_to(db, 0)
    finally:
        tx.close()
        rx.close()


async def test_a_resend_or_claim_leaves_a_route_whose_receipt_still_waits(
    stack_factory: Any, db: asyncpg.Pool
) -> None:
    """A message finished here whose receipt the customer has not answered
    yet: its route, offered again to finish_overdue (a deadline claim, or
    an adopter's re-send of a dead node's routes), is left to that wait,
    not deleted (a crash would then lose the receipt); it goes once the
    customer answers."""
    stack = await stack_factory()
    esme, _ = await connect(stack.smpp_port)
    esme.answer_delivers = False
    try:
        r = await esme.submit("+4512345678", "still waiting")
        assert r.status == 0
        await until(lambda: r.message_id in esme.receipts, 10, "the receipt")
        await asyncio.sleep(0.5)  # the status logged
        spool = stack.router.spool
        later = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
        rows = await spool.finished_routes(later, "", 10)
        assert [row["message_id"] for row in rows] == [r.message_id]
        assert rows[0]["final_status"] == "delivered"
        assert stack.router.engine.finish_overdue(rows) == 0  # finished here already
        await asyncio.sleep(0.5)
        assert await routes(db) == 1, "deleted while its receipt waits for the customer"
        assert len(esme.delivers) == 1  # and not sent again
        esme.answer(esme.delivers[0])
        await wait_routes_down_to(db, 0)
    finally:
        esme.close()


async def test_without_the_traffic_log_a_route_does_not_wait_for_the_customer(
    stack_factory: Any, db: asyncpg.Pool
) -> None:
    """With the traffic log off, no final status is logged for a route a
    crash left: the deadline would finish it as unknown, a wrong receipt
    for a delivered message. So the route goes with the carrier's receipt,
    as before, whether or not the customer answers."""
    sims = {
        "sim-eu": SimConfig(port=0, dlr_delay=1.0),
        "sim-world": SimConfig(port=0, dlr_delay=0.05),
    }
    stack = await stack_factory(sims=sims, traffic_log=False)
    esme, _ = await connect(stack.smpp_port)
    esme.answer_delivers = False
    try:
        r = await esme.submit("+4512345678", "no log")
        assert r.status == 0
        await wait_routes(db, 1)  # before the receipt (1 s)
        await until(lambda: r.message_id in esme.receipts, 10, "the receipt")
        await wait_routes_down_to(db, 0)
    finally:
        esme.close()


async def test_a_route_goes_when_the_customer_refuses_its_receipt(
    stack_factory: Any, db: asyncpg.Pool
) -> None:
    """A receipt the customer refuses three times is given up (counted
    refused): nothing is left to keep its route for."""
    stack = await stack_factory()
    esme, _ = await connect(stack.smpp_port)
    esme.answer_delivers = False
    try:
        r = await esme.submit("+4512345678", "refused receipt")
        assert r.status == 0
        refused = metrics.RECEIPTS_OUT.labels("smpp", "refused")
        before = refused.value
        for n in range(1, 4):
            await until(lambda n=n: len(esme.delivers) >= n, 15, f"receipt try {n}")
            esme.answer(esme.delivers[n - 1], SmppStatus.ESME_RSYSERR)
        await wait_routes_down_to(db, 0)
        assert refused.value == before + 1
    finally:
        esme.close()


@pytest.fixture
async def spool(db: asyncpg.Pool) -> Any:
    spools = []

    def make(node: str) -> PgSpool:
        s = PgSpool(db, key=None, node=node, receipt_timeout=0.0)
        s.start()
        spools.append(s)
        return s

    yield make
    for s in spools:
        s._closing = True
        await s.close(timeout=2)


async def test_a_live_node_keeps_its_own_overdue_routes(db: asyncpg.Pool, spool: Any) -> None:
    """Node a claims its own overdue routes and those of a dead node, never
    those of a live one (that node may hold the message in memory)."""
    a, b = spool("node-a"), spool("node-b")
    past = time.time() - 60
    for s, carrier_id, mid in ((a, "a1", "m-a"), (b, "b1", "m-b")):
        s.remember_route("sim-1", carrier_id, make_message(mid, expires_at=past), 0)
    future = make_message("m-future", expires_at=time.time() + 3600)
    a.remember_route("sim-1", "a2", future, 0)
    await wait_routes(db, 3)
    claimed = await a.claim_overdue_routes(["node-b"])
    assert [r["message_id"] for r in claimed] == ["m-a"]
    claimed = await a.claim_overdue_routes([])  # b is dead now
    assert [r["message_id"] for r in claimed] == ["m-b"]
    # Claimed routes are leased, not gone: nobody claims them again now.
    assert await a.claim_overdue_routes([]) == []
    assert await b.claim_overdue_routes([]) == []
    assert await routes(db) == 3
    for r in claimed:
        a.forget_route(r["carrier"], r["carrier_id"])
    await wait_routes_down_to(db, 2)


async def test_a_claim_whose_finish_never_came_is_claimed_again(
    db: asyncpg.Pool, spool: Any
) -> None:
    """A node that dies between the claim and the finish (nothing forgets
    the routes) leaves them leased: when the lease ends they are overdue
    again and another node, or the restarted one, finishes the message."""
    a, b = spool("node-a"), spool("node-b")
    msg = make_message("m-crash", expires_at=time.time() - 60)
    for part, carrier_id in enumerate(("c1", "c2")):
        a.remember_route("sim-1", carrier_id, msg, part)
    await wait_routes(db, 2)
    first = await a.claim_overdue_routes([], lease=0.5)
    assert sorted(r["carrier_id"] for r in first) == ["c1", "c2"]
    assert await b.claim_overdue_routes(["node-a"]) == []  # a is alive: its own
    assert await b.claim_overdue_routes([]) == []  # a is dead, but its lease runs
    await asyncio.sleep(0.7)
    again = await b.claim_overdue_routes([])
    assert sorted(r["carrier_id"] for r in again) == ["c1", "c2"]
    assert all(r["message_id"] == "m-crash" for r in again)


async def test_concurrent_claims_never_share_a_message(db: asyncpg.Pool, spool: Any) -> None:
    """Nodes sweeping at the same moment split the overdue messages: each
    message (all its routes) goes to exactly one of them."""
    a, b = spool("node-a"), spool("node-b")
    past = time.time() - 60
    for i in range(200):
        msg = make_message(f"m-{i}", expires_at=past)
        for part in range(2):
            a.remember_route("sim-1", f"id{i}p{part}", msg, part)
    await wait_routes(db, 400)
    got: list[list[Any]] = [[], []]

    async def sweep(s: PgSpool, out: list[Any]) -> None:
        while rows := await s.claim_overdue_routes([], limit=7):
            out.extend(rows)

    await asyncio.gather(sweep(a, got[0]), sweep(b, got[1]))
    ids = [{r["message_id"] for r in g} for g in got]
    assert not ids[0] & ids[1]
    assert len(ids[0] | ids[1]) == 200
    assert len(got[0]) + len(got[1]) == 400  # both parts, each once


async def test_secret_message_route_has_no_addresses_and_still_ends_unknown(
    stack_factory: Any, db: asyncpg.Pool
) -> None:
    stack, esme = await losing_stack(stack_factory)
    try:
        r = await esme.submit(
            "+4512345678",
            "one-time code 1234",
            validity_period=ONE_SECOND,
            tlvs={0x1400: b"\x01"},  # message class: secret
        )
        assert r.status == 0
        assert stack.router.engine.lookup(r.message_id).message.msg_class is MessageClass.SECRET
        await wait_routes(db, 1)
        assert await db.fetchval("SELECT info FROM receipt_routes") is None
        await asyncio.sleep(1.2)
        assert await stack.router.deadlines.run_once() == 1
        await until(lambda: r.message_id in esme.receipts, 10, "the unknown receipt")
        assert esme.receipts[r.message_id].tlvs[Tag.MESSAGE_STATE] == bytes((MessageState.UNKNOWN,))
    finally:
        esme.close()


async def test_in_memory_mode_ends_unknown_when_the_wait_is_released(
    stack_factory: Any,
) -> None:
    stack = await stack_factory(sims=LOSING, delivery_guarantee="in-memory")
    assert stack.router.deadlines is None  # no routes in this mode
    esme, resp = await connect(stack.smpp_port)
    assert resp.status == 0
    try:
        r = await esme.submit("+4512345678", "lost in memory")
        assert r.status == 0
        engine = stack.router.engine
        await until(lambda: engine.lookup(r.message_id).status.value == "submitted", 5, "sent")
        engine.cfg.receipt_memory = 0.0
        await asyncio.sleep(0.01)
        assert engine.release_receipt_waits() == 1
        assert engine.lookup(r.message_id).status.value == "unknown"
        await until(lambda: r.message_id in esme.receipts, 10, "the unknown receipt")
    finally:
        esme.close()


def test_receipt_timeout_config(tmp_path: Any) -> None:
    p = tmp_path / "r.toml"
    p.write_text("[delivery]\nreceipt_timeout = 7200\n")
    assert load_config(p, env={}).receipt_timeout == 7200.0
    assert load_config(None, env={}).receipt_timeout == 3600.0
    for bad in ("-1", "43201"):
        p.write_text(f"[delivery]\nreceipt_timeout = {bad}\n")
        with pytest.raises(ConfigError, match="delivery.receipt_timeout"):
            load_config(p, env={})
