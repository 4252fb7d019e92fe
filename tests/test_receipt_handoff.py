"""Receipts across two routers sharing one database: the customer's
transmitter bind is on one node, its receiver bind on the other (what a
load balancer in front of several nodes does). Real routers, real sockets,
real PostgreSQL (LISTEN/NOTIFY, SKIP LOCKED)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import asyncpg
import structlog
from prometheus_client import REGISTRY, generate_latest

from router.carriers.receipt import build_receipt
from router.sim.smsc import SimConfig
from router.smpp.constants import MessageState, Tag
from router.smpp.pdu import BindReceiver, BindTransmitter
from tests.esme import connect, until
from tests.pgproxy import start_proxy
from tests.routerproc import parse_metrics

SECRET_TLV = {0x1400: b"\x01"}
PARKED = 'smsrouter_receipts_sent_total{channel="smpp",outcome="parked"}'
DROPPED = 'smsrouter_receipts_sent_total{channel="smpp",outcome="dropped"}'


async def two_nodes(stack_factory: Any) -> tuple[Any, Any]:
    a = await stack_factory()
    b = await stack_factory()
    assert a.router.spool.node != b.router.spool.node
    return a, b


async def parked(db: asyncpg.Pool, node: str) -> int:
    return int(
        await db.fetchval("SELECT count(*) FROM receipt_handoff WHERE node = $1 AND parked", node)
    )


async def wait_parked(db: asyncpg.Pool, node: str, n: int) -> None:
    deadline = time.monotonic() + 10
    while (got := await parked(db, node)) != n:
        assert time.monotonic() < deadline, f"{got} receipts parked for {node}, not {n}"
        await asyncio.sleep(0.05)


async def rows_gone(db: asyncpg.Pool) -> None:
    """A taken receipt's row goes once the customer answered it (with the
    hand-off's next write)."""
    deadline = time.monotonic() + 5
    while (got := await db.fetchval("SELECT count(*) FROM receipt_handoff")) != 0:
        assert time.monotonic() < deadline, f"{got} receipt_handoff rows left"
        await asyncio.sleep(0.05)


async def receiver_on(stack: Any) -> Any:
    esme, resp = await connect(stack.smpp_port, bind_cls=BindReceiver)
    assert resp.status == 0
    return esme


async def test_a_receipt_reaches_the_accounts_receiver_on_another_node(
    stack_factory: Any, db: asyncpg.Pool
) -> None:
    a, b = await two_nodes(stack_factory)
    rx = await receiver_on(b)
    tx, resp = await connect(a.smpp_port, bind_cls=BindTransmitter)
    assert resp.status == 0
    try:
        # a learns that acme's receiving bind is on b.
        acme = await db.fetchval("SELECT id FROM accounts WHERE name = 'acme'")
        await until(lambda: a.router.handoff.can_take(acme), 5, "a sees b's receiver")
        ids = []
        for i in range(5):
            r = await tx.submit("+4512345678", f"handed over {i}")
            assert r.status == 0
            ids.append(r.message_id)
        r = await tx.submit("+4512345679", "secret one", tlvs=dict(SECRET_TLV))
        assert r.status == 0
        secret_id = r.message_id
        await until(lambda: len(rx.receipts) == 6, 15, "6 receipts on b's receiver")
        assert set(rx.receipts) == {*ids, secret_id}
        for mid in ids:
            pdu = rx.receipts[mid]
            assert b"stat:DELIVRD" in pdu.short_message
            assert pdu.source_addr == "4512345678"  # the handset, as in any receipt
            assert pdu.tlv_str(Tag.RECEIPTED_MESSAGE_ID) == mid
        secret = rx.receipts[secret_id]
        assert b"stat:DELIVRD" in secret.short_message
        # Written down on its way between nodes: so without its addresses.
        assert (secret.source_addr, secret.destination_addr) == ("", "")
        await rows_gone(db)
        assert not tx.delivers  # a transmitter bind is never sent a receipt
    finally:
        tx.close()
        rx.close()


async def test_receipts_waiting_for_a_bind_move_to_the_node_where_it_appears(
    stack_factory: Any, db: asyncpg.Pool
) -> None:
    a, b = await two_nodes(stack_factory)
    tx, _ = await connect(a.smpp_port, bind_cls=BindTransmitter)
    try:
        ids = []
        for i in range(3):
            r = await tx.submit("+4512345678", f"waiting {i}")
            assert r.status == 0
            ids.append(r.message_id)
        acme = await db.fetchval("SELECT id FROM accounts WHERE name = 'acme'")
        # No receiving bind anywhere: they wait parked in the database, a's.
        await wait_parked(db, a.router.spool.node, 3)
        assert not a.router.smpp.pending.get(acme)
        rx = await receiver_on(b)
        try:
            # a sees b's bind (NOTIFY, or its 5 s refresh) and hands them there.
            await until(lambda: len(rx.receipts) == 3, 15, "receipts moved to b")
            assert set(rx.receipts) == set(ids)
            await rows_gone(db)
        finally:
            rx.close()
    finally:
        tx.close()


async def test_receipts_left_for_a_node_that_died_are_sent_by_the_adopter(
    stack_factory: Any, db: asyncpg.Pool
) -> None:
    b = await stack_factory()
    rx = await receiver_on(b)
    try:
        acme = await db.fetchval("SELECT id FROM accounts WHERE name = 'acme'")
        now = time.time()
        # A node that died with a receipt handed to it still unsent, and one
        # it had taken and sent, never answered by the customer.
        await db.execute(
            "INSERT INTO router_nodes (node, seen_at) VALUES ('ghost', now() - interval '1 hour')"
        )
        for mid, taken in (("ghostmsg0001", False), ("ghostmsg0002", True)):
            pdu = build_receipt(
                message_id=mid,
                state=MessageState.DELIVERED,
                error="000",
                submitted_at=now - 2,
                done_at=now,
                source="Acme",
                destination="4512345678",
            )
            await db.execute(
                "INSERT INTO receipt_handoff (node, account_id, pdu, expires_at, taken)"
                " VALUES ('ghost', $1, $2, now() + interval '1 hour', $3)",
                acme,
                pdu.encode(),
                taken,
            )
        await b.router.spool.adopt_orphans()
        await until(lambda: len(rx.receipts) == 2, 10, "the adopted receipts")
        assert set(rx.receipts) == {"ghostmsg0001", "ghostmsg0002"}
        await rows_gone(db)
    finally:
        rx.close()


async def test_a_carrier_receipt_on_another_nodes_bind_is_finished_by_the_sender(
    stack_factory: Any, db: asyncpg.Pool
) -> None:
    """Both nodes bind to the same carriers; the carrier sends each receipt
    over any bind of the system_id (round robin, as SMSCs do), so about
    half reach the node that did not send the message. That node hands
    them to the sender, which finishes each message: every receipt reaches
    the customer and nothing stays waiting in the sender's memory."""
    a, b, esme = await nodes_on_one_carrier_account(stack_factory)
    try:
        ids = await submit_many(esme, 40, "round robin")
        await until(lambda: len(esme.receipts) == 40, 20, "40 receipts at the customer")
        assert set(esme.receipts) == set(ids)
        # The sender finished every one of them itself.
        await until(lambda: not set(ids) & set(a.router.engine.active), 5, "a holds none")
        assert {a.router.engine.lookup(i).status.value for i in ids} == {"delivered"}
        forwarded = (await _metrics(b)).get("smsrouter_carrier_receipts_forwarded_total", 0)
        assert forwarded > 0, "no receipt reached b: the test did not exercise the hand-off"
        # Each row goes once the sender's traffic log holds its status.
        deadline = time.monotonic() + 5
        while await db.fetchval("SELECT count(*) FROM carrier_receipt_handoff"):
            assert time.monotonic() < deadline, "carrier_receipt_handoff rows left"
            await asyncio.sleep(0.05)
    finally:
        esme.close()


async def nodes_on_one_carrier_account(stack_factory: Any, **a_kw: Any) -> tuple[Any, Any, Any]:
    """Nodes a and b bound to the same simulators with one system_id (the
    simulator spreads receipts over every bind of it), each seeing the other
    alive, and a transceiver of the customer on a."""
    a = await stack_factory(**a_kw)
    shared = {name: {"port": sim.port} for name, sim in a.sims.items()}
    b = await stack_factory(carrier_kw=shared)
    assert all(c.cfg.port == a.sims[name].port for name, c in b.router.engine.carriers.items())
    esme, resp = await connect(a.smpp_port)
    assert resp.status == 0
    await until(lambda: b.router.handoff.live, 10, "b sees a alive")
    await until(lambda: a.router.handoff.live, 10, "a sees b alive")
    # Both nodes' carrier binds must be up, or every receipt comes to one node
    # and the hand-off is not exercised.
    carriers = [*a.router.engine.carriers.values(), *b.router.engine.carriers.values()]
    await until(lambda: all(len(c.sessions) == c.cfg.sessions for c in carriers), 10, "binds up")
    return a, b, esme


async def submit_many(esme: Any, n: int, text: str) -> list[str]:
    ids = []
    for i in range(n):
        r = await esme.submit("+4512345678", f"{text} {i}")
        assert r.status == 0
        ids.append(r.message_id)
    return ids


async def _metrics_of_registry() -> dict[str, float]:
    """This test process's metrics, without a router's ops port."""
    return parse_metrics(generate_latest(REGISTRY).decode())


async def _metrics(stack: Any) -> dict[str, float]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{stack.router.ports['ops']}/metrics") as r:
            return parse_metrics(await r.text())


async def test_a_crossing_receipt_for_a_wait_the_sender_let_go_is_still_finished(
    stack_factory: Any, db: asyncpg.Pool
) -> None:
    """As above, but the sender has let its receipt waits go from memory
    (delivery.receipt_memory) before the receipts come: those reaching the
    other node are handed to the sender, which rebuilds the message from
    receipt_routes and finishes it; those reaching the sender are matched the
    same way. Every receipt still reaches the customer."""
    a, b, esme = await nodes_on_one_carrier_account(
        stack_factory,
        sims={"sim-eu": SimConfig(port=0, dlr_delay=3.0), "sim-world": SimConfig(port=0)},
    )
    try:
        ids = await submit_many(esme, 20, "let go")
        engine = a.router.engine
        await until(
            lambda: all(engine.lookup(i).status.value == "submitted" for i in ids), 5, "submitted"
        )
        deadline = time.monotonic() + 5
        while await db.fetchval("SELECT count(*) FROM receipt_routes") < 20:
            assert time.monotonic() < deadline, "receipt routes not written"
            await asyncio.sleep(0.05)
        engine.cfg.receipt_memory = 0.0
        assert engine.release_receipt_waits() == 20
        assert not set(ids) & set(engine.active)
        # The receipts come ~3 s after the submits, over both nodes' binds.
        await until(lambda: len(esme.receipts) == 20, 20, "20 receipts at the customer")
        assert set(esme.receipts) == set(ids)
        assert {engine.lookup(i).status.value for i in ids} == {"delivered"}
        forwarded = (await _metrics(b)).get("smsrouter_carrier_receipts_forwarded_total", 0)
        assert forwarded > 0, "no receipt reached b: the test did not exercise the hand-off"
        # Routes whose receipt came go in the spool upkeep's next round.
        deadline = time.monotonic() + 5
        while (
            await db.fetchval("SELECT count(*) FROM receipt_routes") and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.05)
        assert await db.fetchval("SELECT count(*) FROM receipt_routes") == 0
    finally:
        esme.close()


async def test_receipts_waiting_for_a_bind_survive_a_restart(
    stack_factory: Any, db: asyncpg.Pool
) -> None:
    """A customer with no receiving bind while the router restarts (an
    upgrade) still gets its receipts when it binds to the restarted node:
    they wait parked in the database, not in memory (the kill -9 case:
    tests/test_crash_recovery.py)."""
    first = await stack_factory(node="node-restarted")
    tx, _ = await connect(first.smpp_port, bind_cls=BindTransmitter)
    ids = []
    try:
        for i in range(3):
            r = await tx.submit("+4512345678", f"before the restart {i}")
            assert r.status == 0
            ids.append(r.message_id)
        r = await tx.submit("+4512345679", "secret one", tlvs=dict(SECRET_TLV))
        assert r.status == 0
        ids.append(r.message_id)
        await wait_parked(db, "node-restarted", 4)
        assert (await _metrics(first)).get("smsrouter_receipts_parked") == 4
        assert not first.router.smpp.pending  # nothing of them in memory
    finally:
        tx.close()
    await first.router.stop(timeout=3)
    rows = await db.fetch("SELECT node, pdu FROM receipt_handoff")
    assert [r["node"] for r in rows] == ["node-restarted"] * 4
    # The secret message's receipt was written down without its addresses.
    assert sum(b"4512345679" in bytes(r["pdu"]) for r in rows) == 0

    again = await stack_factory(node="node-restarted")
    rx = await receiver_on(again)
    try:
        await until(lambda: len(rx.receipts) == 4, 15, "the parked receipts")
        assert set(rx.receipts) == set(ids)
        for mid in ids[:3]:
            assert b"stat:DELIVRD" in rx.receipts[mid].short_message
        await rows_gone(db)
    finally:
        rx.close()


async def test_receipts_that_cannot_be_parked_at_stop_are_counted_lost(
    stack_factory: Any, db: asyncpg.Pool, database_url: str
) -> None:
    """The database goes before the receipts come and is still gone at the
    stop: they cannot be parked; that is said (an error and the `dropped`
    count), never reported as parked."""
    proxy, proxied = await start_proxy(database_url)
    try:
        slow = {
            "sim-eu": SimConfig(port=0, dlr_delay=1.0),
            "sim-world": SimConfig(port=0, dlr_delay=1.0),
        }
        first = await stack_factory(sims=slow, database_url=proxied)
        tx, _ = await connect(first.smpp_port, bind_cls=BindTransmitter)
        try:
            for i in range(2):
                assert (await tx.submit("+4512345678", f"stranded {i}")).status == 0
            before = await _metrics(first)
            proxy.cut()
            handoff = first.router.handoff
            await until(lambda: len(handoff._out) == 2, 10, "2 receipts waiting to be parked")
        finally:
            tx.close()
        with structlog.testing.capture_logs() as logs:
            await first.router.stop(timeout=3)
        after = await _metrics_of_registry()
        assert after.get(PARKED, 0.0) == before.get(PARKED, 0.0)
        assert after.get(DROPPED, 0.0) - before.get(DROPPED, 0.0) == 2
        failed = [e for e in logs if e["event"] == "receipt_handoff_final_write_failed"]
        assert [e["lost"] for e in failed] == [2]
        assert not [e for e in logs if e["event"] == "receipts_parked"]
    finally:
        proxy.restore()
        await proxy.stop()
    assert await db.fetchval("SELECT count(*) FROM receipt_handoff") == 0


async def test_a_clean_stop_deletes_the_carrier_receipts_it_took(db: asyncpg.Pool) -> None:
    """A carrier receipt taken just before a clean stop: its row is marked
    taken until the status it brings is logged. The stop awaits the
    traffic log's settle before its last write, so the row goes with it
    and is not taken again (a second receipt) at the next start."""
    from router.carriers.receipt import CarrierReceipt
    from router.ingress.handoff import ReceiptHandoff

    taken: list[tuple[CarrierReceipt, Any]] = []
    handoff = ReceiptHandoff(
        db,
        "node-stop",
        lambda *a: None,
        lambda carrier, receipt, done: taken.append((receipt, done)),
        poll_interval=0.1,
    )
    await db.execute(
        "INSERT INTO carrier_receipt_handoff (node, carrier, carrier_id, state, error)"
        " VALUES ('node-stop', 'sim', 'c-1', 2, '000')"
    )
    handoff.start()
    try:
        await until(lambda: taken, 5, "the carrier receipt taken")
        assert taken[0][0].carrier_id == "c-1"
        assert await db.fetchval("SELECT taken FROM carrier_receipt_handoff") is True
    finally:

        async def settle() -> None:  # the traffic log's write of its status
            for _, done in taken:
                done()

        await handoff.stop(settle)
    assert await db.fetchval("SELECT count(*) FROM carrier_receipt_handoff") == 0
