"""At-least-once: kill -9 the router under load, restart it, and check that
every message that got a positive submit_sm_resp reaches the carrier.

The router runs as a real subprocess (so kill -9 is real); the carrier
simulators run in the test's loop so they outlive the crash. Messages are
matched by a unique text per message; duplicates are counted and reported.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from router.accounts import add_api_key, create_account
from router.sim import CarrierSimulator, SimConfig
from router.smpp.constants import Status
from router.smpp.pdu import BindReceiver, BindTransmitter, SubmitSm
from tests.esme import TestEsme as Esme
from tests.esme import connect, until
from tests.routerproc import (
    carrier_got_all,
    carrier_toml,
    free_ports,
    listen_toml,
    parse_metrics,
    start_router,
    stop_router,
)
from tests.webhook_receiver import Hit, Receiver


def texts(sim: CarrierSimulator) -> set[str]:
    """What the carrier received, UDH removed."""
    out = set()
    for m in sim.received:
        p = m.payload
        if m.esm_class & 0x40 and p:
            p = p[p[0] + 1 :]
        out.add(p.decode())
    return out


def write_config(
    path: Path, ports: dict[str, int], sim_port: int, tps: float, receipt_ack: str = "immediate"
) -> None:
    path.write_text(
        listen_toml(ports)
        + f'[delivery]\nguarantee = "at-least-once"\nreceipt_ack = "{receipt_ack}"\n'
        + carrier_toml("sim", sim_port, tps=float(tps), window=32)
        + '[routes]\ndefault = ["sim"]\n'
    )


async def sim_and_config(
    tmp_path: Path, sim_cfg: SimConfig, tps: float, receipt_ack: str = "immediate", extra: str = ""
) -> tuple[CarrierSimulator, dict[str, int], Path]:
    """A carrier simulator, started, and a router config on it
    (``tmp_path``/router.toml, ``extra`` TOML appended): the simulator, the
    router's ports and the config's path."""
    sim = CarrierSimulator(sim_cfg)
    sim_port = await sim.start()
    ports = free_ports()
    cfg = tmp_path / "router.toml"
    write_config(cfg, ports, sim_port, tps=tps, receipt_ack=receipt_ack)
    if extra:
        cfg.write_text(cfg.read_text() + extra)
    return sim, ports, cfg


async def test_kill_9_under_load_loses_no_acknowledged_message(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    await create_account(db, "acme", system_id="acme", password="acme-pw1")
    # The carrier is slower than the submitter, so a backlog is queued in
    # the router (and in its spool) when it dies.
    sim, ports, cfg = await sim_and_config(
        tmp_path, SimConfig(port=0, name="sim", dlr_delay=0.2, latency=0.01), tps=300
    )
    log = tmp_path / "router.log"
    proc = await start_router(cfg, database_url, ports["ops"], log)
    acked: dict[str, str] = {}  # text -> our id
    total = 1500
    try:
        esme, resp = await connect(ports["smpp"])
        assert resp.status == 0

        async def one(i: int) -> None:
            text = f"crash-test-{i:05d}"
            try:
                r = await esme.submit("+4512345678", text)
            except (ConnectionError, TimeoutError):
                return
            if r.status == Status.ESME_ROK:
                acked[text] = r.message_id  # type: ignore[attr-defined]

        tasks = [asyncio.create_task(one(i)) for i in range(total)]
        # Kill once a good share is acknowledged but the carrier lags behind.
        deadline = time.monotonic() + 30
        while len(acked) < 600 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        received_before = sim.received_count()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        await asyncio.gather(*tasks, return_exceptions=True)
        esme.close()
        assert len(acked) >= 600, "load did not reach the kill point"
        assert received_before < len(acked), "nothing was in flight at the kill"

        proc = await start_router(cfg, database_url, ports["ops"], log)
        missing, _ = await carrier_got_all(sim, set(acked), len(acked), received_before)
        assert not missing, f"{len(missing)} acknowledged messages never reached the carrier"
        # The spool is empty once the carrier has taken everything.
        deadline = time.monotonic() + 10
        while await db.fetchval("SELECT count(*) FROM spool") and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert await db.fetchval("SELECT count(*) FROM spool") == 0
    finally:
        stop_router(proc)
        await sim.stop()


async def test_receipt_after_restart_still_reaches_the_submitter(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    await create_account(db, "acme", system_id="acme", password="acme-pw1")
    # Receipts come 2 s after the submit: the router dies in between.
    sim, ports, cfg = await sim_and_config(
        tmp_path, SimConfig(port=0, name="sim", dlr_delay=2.0, id_format="decimal"), tps=100
    )
    log = tmp_path / "router.log"
    proc = await start_router(cfg, database_url, ports["ops"], log)
    try:
        esme, _ = await connect(ports["smpp"])
        ids = []
        for i in range(5):
            r = await esme.submit("+4512345678", f"late-receipt-{i}")
            assert r.status == 0
            ids.append(r.message_id)  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while sim.received_count() < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        deadline = time.monotonic() + 5
        while (
            await db.fetchval("SELECT count(*) FROM receipt_routes") < 5
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.05)
        # Else the restart would resend from the spool and get new receipts:
        # the path under test (matched through receipt_routes) would not run.
        assert sim.received_count() == 5
        assert await db.fetchval("SELECT count(*) FROM receipt_routes") == 5
        assert not esme.receipts, "the receipts came before the kill"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        esme.close()

        proc = await start_router(cfg, database_url, ports["ops"], log)
        esme, _ = await connect(ports["smpp"])
        deadline = time.monotonic() + 20
        while len(esme.receipts) < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert set(esme.receipts) == set(ids)
        for pdu in esme.receipts.values():
            assert b"stat:DELIVRD" in pdu.short_message
        assert sim.received_count() == 5, "resent to the carrier instead of matched"
        esme.close()
        deadline = time.monotonic() + 5
        while (
            await db.fetchval("SELECT count(*) FROM receipt_routes") and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.05)
        assert await db.fetchval("SELECT count(*) FROM receipt_routes") == 0
    finally:
        stop_router(proc)
        await sim.stop()


@pytest.mark.parametrize("ack", ["durable", "immediate"])
async def test_a_receipt_the_router_died_with_before_logging_it_is_not_lost(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, ack: str
) -> None:
    """A carrier's receipt route is deleted, and with delivery.receipt_ack
    = "durable" the receipt answered, only once the traffic log holds the
    status. The router is killed while that write is held (a
    lock on delivery_events).

    durable: the carrier never had its answer and sends the receipt again
    to the restarted router, which matches it through the route still
    there: the message ends delivered and the submitter has its receipt
    (again). immediate: the receipt is answered and gone, but the route
    stays for the deadline to finish the message ('unknown',
    tests/test_receipt_deadline.py). Before, the route went first and the
    message stayed 'submitted' for good."""
    await create_account(db, "acme", system_id="acme", password="acme-pw1")
    sim, ports, cfg = await sim_and_config(
        tmp_path, SimConfig(port=0, name="sim", dlr_delay=1.0), tps=100, receipt_ack=ack
    )
    log = tmp_path / "router.log"
    proc = await start_router(cfg, database_url, ports["ops"], log)
    lock: asyncpg.pool.PoolConnectionProxy | None = None

    async def count(sql: str, *args: object) -> int:
        return int(await db.fetchval(sql, *args))

    async def until_count(n: int, sql: str, *args: object, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while (got := await count(sql, *args)) != n:
            assert time.monotonic() < deadline, f"{got} != {n}: {sql}"
            await asyncio.sleep(0.05)

    events = "SELECT count(*) FROM delivery_events WHERE status = $1 AND message_id = ANY($2)"
    routes = "SELECT count(*) FROM receipt_routes"
    esme, _ = await connect(ports["smpp"])
    try:
        ids = []
        for i in range(5):
            r = await esme.submit("+4512345678", f"held-receipt-{i}")
            assert r.status == 0
            ids.append(r.message_id)  # type: ignore[attr-defined]
        # Logged as submitted, routes written, before the receipts come (1 s).
        await until_count(5, events, "submitted", ids, timeout=0.9)
        await until_count(5, routes, timeout=0.9)
        lock = await db.acquire()
        await lock.execute("BEGIN; LOCK TABLE delivery_events IN ACCESS EXCLUSIVE MODE")
        deadline = time.monotonic() + 10
        while len(esme.receipts) < 5:  # the submitter has them before the log
            assert time.monotonic() < deadline, "receipts never came"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert sim.stats.receipts_sent == 5
        if ack == "durable":
            assert sim.stats.receipts_acked == 0, "answered before the status was logged"
        else:
            assert sim.stats.receipts_acked == 5
        assert await count(routes) == 5, "routes deleted before the status was logged"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        await lock.execute("ROLLBACK")
        await db.release(lock)
        lock = None
        esme.close()
        assert await count(events, "delivered", ids) == 0

        proc = await start_router(cfg, database_url, ports["ops"], log)
        esme, _ = await connect(ports["smpp"])
        if ack == "immediate":
            await asyncio.sleep(3.0)  # past the restart's re-send of logged finals (2 s)
            assert await count(routes) == 5, "the deadline has nothing left to finish by"
            assert sim.stats.receipts_sent == 5
            return
        await until_count(5, events, "delivered", ids)
        deadline = time.monotonic() + 10
        while set(esme.receipts) != set(ids):
            assert time.monotonic() < deadline, "the restarted router sent no receipt"
            await asyncio.sleep(0.05)
        assert all(b"stat:DELIVRD" in p.short_message for p in esme.receipts.values())
        await until_count(0, routes)
        assert sim.stats.receipts_acked == 5
        assert await count(events, "unknown", ids) == 0
    finally:
        esme.close()
        if lock is not None:
            await lock.execute("ROLLBACK")
            await db.release(lock)
        stop_router(proc)
        await sim.stop()


async def until_count(
    db: asyncpg.Pool, n: int, sql: str, *args: object, timeout: float = 15.0
) -> None:
    deadline = time.monotonic() + timeout
    while (got := int(await db.fetchval(sql, *args))) != n:
        assert time.monotonic() < deadline, f"{got} != {n}: {sql}"
        await asyncio.sleep(0.05)


ROUTES = "SELECT count(*) FROM receipt_routes"
LOGGED = "SELECT count(*) FROM delivery_events WHERE status = $1 AND message_id = ANY($2)"


async def receipts_after_restart(port: int, ids: list[str]) -> Esme:
    """A receiver bound to the restarted router, once it has a DELIVRD
    receipt for each of ``ids``."""
    rx, _ = await connect(port, bind_cls=BindReceiver)
    await until(lambda: set(rx.receipts) == set(ids), 15, "the receipts after the restart")
    assert all(b"stat:DELIVRD" in p.short_message for p in rx.receipts.values())
    return rx


@pytest.mark.parametrize(("parts", "renamed"), [(False, False), (True, False), (False, True)])
async def test_a_receipt_the_customer_never_answered_is_sent_again_after_kill_9(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, parts: bool, renamed: bool
) -> None:
    """The customer's receiver takes its receipts and never answers them
    (deliver_sm_resp) when the router dies, after the traffic log has the
    final status. The receipt routes stay until the customer answers, so
    the restarted router finishes those messages again with their logged
    status and the customer's new receiver gets the receipts. Before, the
    routes went with the log's write and the receipts were lost.

    ``parts``: one message the customer split in three (UDH), reassembled
    here: a receipt for each part id, before and after the restart (the
    route keeps the part ids). ``renamed``: the router comes back under
    another delivery.node (a container's new host name): it adopts the
    dead node's rows once that is not seen for node_grace (3 s), and sends
    the receipts its crash left unsent then."""
    await create_account(db, "acme", system_id="acme", password="acme-pw1")
    sim, ports, cfg = await sim_and_config(
        tmp_path, SimConfig(port=0, name="sim", dlr_delay=0.1), tps=100
    )
    base = cfg.read_text()

    def name_node(node: str) -> None:
        named = f'[delivery]\nnode = "{node}"\nnode_grace = 3.0\n'
        cfg.write_text(base.replace("[delivery]\n", named))

    if renamed:
        name_node("before")
    log = tmp_path / "router.log"
    proc = await start_router(cfg, database_url, ports["ops"], log)
    tx, _ = await connect(ports["smpp"], bind_cls=BindTransmitter)
    rx, _ = await connect(ports["smpp"], bind_cls=BindReceiver)
    rx.answer_delivers = False
    try:
        ids = []
        for i in range(3):
            if parts:
                udh = bytes((5, 0, 3, 0x33, 3, i + 1))
                r = await tx.submit("+4512345678", udh + b"unanswered part", esm_class=0x40)
            else:
                r = await tx.submit("+4512345678", f"unanswered-receipt-{i}")
            assert r.status == 0
            ids.append(r.message_id)  # type: ignore[attr-defined]
        await until(lambda: set(rx.receipts) == set(ids), 10, "the receipts")
        delivered = "SELECT count(*) FROM delivery_events WHERE status = 'delivered'"
        await until_count(db, 1 if parts else 3, delivered)
        await asyncio.sleep(1.0)  # several traffic-log writes and route upkeeps later
        # (Parts: the carrier's receipts for the first two parts did not end
        # the message; their routes went with the log's write.)
        held = 1 if parts else 3
        assert await db.fetchval(ROUTES) == held, "routes deleted before the customer answered"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        tx.close()
        rx.close()

        if renamed:
            name_node("after")
        proc = await start_router(cfg, database_url, ports["ops"], log)
        rx = await receipts_after_restart(ports["smpp"], ids)
        if renamed:  # sent by the adopter of 'before'
            assert not await db.fetchval("SELECT count(*) FROM router_nodes WHERE node = 'before'")
        await until_count(db, 0, ROUTES)  # answered this time
        assert sim.received_count() == 3, "resent to the carrier"
        unknown = "SELECT count(*) FROM delivery_events WHERE status = 'unknown'"
        assert await db.fetchval(unknown) == 0
    finally:
        tx.close()
        rx.close()
        stop_router(proc)
        await sim.stop()


async def test_a_webhook_not_yet_in_its_outbox_is_sent_again_after_kill_9(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    """An HTTP message's webhook fails once (HTTP 500) and its retry is to
    be written to the outbox, but that write is held (a lock on
    webhook_outbox) when the router dies, after the traffic log has the
    final status. The route stays until the outbox holds the webhook, so
    the restarted router sends it again. Before, the route went with the
    log's write (every 0.2 s, the outbox every 1 s) and the webhook was
    lost."""
    acme = await create_account(db, "acme", system_id="acme", password="acme-pw1")
    _, key = await add_api_key(db, acme)
    answers = [500]

    async def behave(hit: Hit) -> web.StreamResponse:
        return web.Response(status=answers.pop(0) if answers else 204)

    receiver = await Receiver(behave).start()
    sim, ports, cfg = await sim_and_config(
        tmp_path,
        SimConfig(port=0, name="sim", dlr_delay=0.1),
        tps=100,
        extra="[webhooks]\nallow_private_targets = true\n",
    )
    log = tmp_path / "router.log"
    proc = await start_router(cfg, database_url, ports["ops"], log)
    lock: asyncpg.pool.PoolConnectionProxy | None = None
    try:
        lock = await db.acquire()
        await lock.execute("BEGIN; LOCK TABLE webhook_outbox IN ACCESS EXCLUSIVE MODE")
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"http://127.0.0.1:{ports['http']}/v1/messages",
                headers={"Authorization": f"Bearer {key}"},
                json={
                    "to": "+4512345678",
                    "from": "Acme",
                    "text": "hook",
                    "callback_url": receiver.url + "/h",
                },
            ) as resp,
        ):
            assert resp.status == 202, await resp.text()
            mid = (await resp.json())["id"]
        await until(lambda: receiver.hits, 10, "the first webhook")
        await until_count(db, 1, LOGGED, "delivered", [mid])
        await asyncio.sleep(1.5)  # past the outbox's write interval (1 s)
        assert await db.fetchval(ROUTES) == 1, "route deleted before the webhook was kept"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        await lock.execute("ROLLBACK")
        await db.release(lock)
        lock = None
        assert await db.fetchval("SELECT count(*) FROM webhook_outbox") == 0
        assert len(receiver.hits) == 1

        proc = await start_router(cfg, database_url, ports["ops"], log)
        await until(lambda: len(receiver.hits) == 2, 15, "the webhook after the restart")
        body = json.loads(receiver.hits[1].body)
        assert body["id"] == mid and body["status"] == "delivered"
        await until_count(db, 0, ROUTES)
    finally:
        if lock is not None:
            await lock.execute("ROLLBACK")
            await db.release(lock)
        stop_router(proc)
        await sim.stop()
        await receiver.stop()


async def test_receipts_for_an_unbound_customer_survive_kill_9(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    """The customer has only a transmitter bind (its receiver is down) when
    the router dies: the receipts that came meanwhile were parked in the
    database, and reach the receiver it binds after the restart."""
    await create_account(db, "acme", system_id="acme", password="acme-pw1")
    sim, ports, cfg = await sim_and_config(
        tmp_path, SimConfig(port=0, name="sim", dlr_delay=0.1), tps=100
    )
    log = tmp_path / "router.log"
    proc = await start_router(cfg, database_url, ports["ops"], log)
    try:
        tx, _ = await connect(ports["smpp"], bind_cls=BindTransmitter)
        ids = []
        for i in range(3):
            r = await tx.submit("+4512345678", f"unbound-receipt-{i}")
            assert r.status == 0
            ids.append(r.message_id)  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while (
            await db.fetchval("SELECT count(*) FROM receipt_handoff WHERE parked") < 3
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.05)
        assert await db.fetchval("SELECT count(*) FROM receipt_handoff WHERE parked") == 3
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        tx.close()

        proc = await start_router(cfg, database_url, ports["ops"], log)
        rx = await receipts_after_restart(ports["smpp"], ids)
        await until_count(db, 0, "SELECT count(*) FROM receipt_handoff")  # answered
        rx.close()
    finally:
        stop_router(proc)
        await sim.stop()


async def test_a_parked_receipt_taken_and_never_answered_survives_kill_9(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    """Receipts parked for an unbound customer are taken when its receiver
    binds, and sent; the customer never answers, and the router dies. The
    rows stay (marked taken) until an answer, so the restarted router
    (the same node name) takes them again and the customer's new receiver
    gets them. Before, they were deleted as taken and lost."""
    await create_account(db, "acme", system_id="acme", password="acme-pw1")
    sim, ports, cfg = await sim_and_config(
        tmp_path, SimConfig(port=0, name="sim", dlr_delay=0.1), tps=100
    )
    log = tmp_path / "router.log"
    proc = await start_router(cfg, database_url, ports["ops"], log)
    tx, _ = await connect(ports["smpp"], bind_cls=BindTransmitter)
    rx: Esme | None = None
    try:
        ids = []
        for i in range(3):
            r = await tx.submit("+4512345678", f"taken-receipt-{i}")
            assert r.status == 0
            ids.append(r.message_id)  # type: ignore[attr-defined]
        parked = "SELECT count(*) FROM receipt_handoff WHERE parked"
        await until_count(db, 3, parked)
        rx, _ = await connect(ports["smpp"], bind_cls=BindReceiver)
        rx.answer_delivers = False
        await until(lambda: set(rx.receipts) == set(ids), 15, "the parked receipts")
        await asyncio.sleep(0.5)  # the hand-off's writes go on meanwhile
        taken = "SELECT count(*) FROM receipt_handoff WHERE taken AND NOT parked"
        assert await db.fetchval(taken) == 3, "taken rows deleted before the customer answered"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        tx.close()
        rx.close()

        proc = await start_router(cfg, database_url, ports["ops"], log)
        rx = await receipts_after_restart(ports["smpp"], ids)
        await until_count(db, 0, "SELECT count(*) FROM receipt_handoff")  # answered
    finally:
        tx.close()
        if rx is not None:
            rx.close()
        stop_router(proc)
        await sim.stop()


async def test_kill_9_with_held_parts_and_a_scheduled_message(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    """Two of three customer parts are held for reassembly and a message
    waits for its send time when the router dies: after the restart the
    parts go out on their own (and are logged), the scheduled one at its
    time. Nothing acknowledged is lost."""
    await create_account(db, "acme", system_id="acme", password="acme-pw1")
    sim, ports, cfg = await sim_and_config(
        tmp_path,
        SimConfig(port=0, name="sim", dlr_delay=0.1),
        tps=100,
        extra="[smpp]\nreassembly_timeout = 600.0\n",
    )
    log = tmp_path / "router.log"
    proc = await start_router(cfg, database_url, ports["ops"], log)
    try:
        esme, _ = await connect(ports["smpp"])
        part_ids = []
        for seq in (1, 2):
            udh = bytes((5, 0, 3, 0x42, 3, seq))
            r = await esme.request(
                SubmitSm(
                    source_addr_ton=5,
                    source_addr="Acme",
                    dest_addr_ton=1,
                    dest_addr_npi=1,
                    destination_addr="+4512345678",
                    esm_class=0x40,
                    registered_delivery=1,
                    short_message=udh + f"held-part-{seq}".encode(),
                )
            )
            assert r.status == Status.ESME_ROK
            part_ids.append(r.message_id)  # type: ignore[attr-defined]
        submitted_at = time.monotonic()
        r = await esme.submit(
            "+4512345678", "scheduled-crash", schedule_delivery_time="000000000004000R"
        )
        assert r.status == Status.ESME_ROK
        await asyncio.sleep(0.3)
        assert sim.received_count() == 0  # held and waiting, nothing sent yet
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        esme.close()

        proc = await start_router(cfg, database_url, ports["ops"], log)
        esme, _ = await connect(ports["smpp"])
        deadline = time.monotonic() + 20
        want = {"held-part-1", "held-part-2", "scheduled-crash"}
        while time.monotonic() < deadline:
            got = texts(sim)
            if want <= got:
                break
            await asyncio.sleep(0.1)
        got = texts(sim)
        assert want <= got, f"missing after restart: {want - got}"
        sent_at = next(m.at for m in sim.received if m.payload == b"scheduled-crash")
        # Not before its time (the router's clock has whole-second SMPP times).
        assert sent_at >= submitted_at + 3.0, f"sent {sent_at - submitted_at:.1f} s after submit"
        # The replayed parts were logged (each on its own) and get receipts.
        deadline = time.monotonic() + 10
        while len(set(part_ids) & set(esme.receipts)) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert set(part_ids) <= set(esme.receipts)
        rows = await db.fetch("SELECT id, parts FROM traffic_log WHERE id = ANY($1)", part_ids)
        assert sorted(r["id"] for r in rows) == sorted(part_ids)
        esme.close()
    finally:
        stop_router(proc)
        await sim.stop()


async def test_a_carrier_receipt_forwarded_by_another_node_survives_kill_9(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    """Two routers bound to one carrier account: the carrier sends the
    receipts over both binds (round robin), so about half of node a's
    receipts reach node b, which answers them and hands them to a through
    carrier_receipt_handoff. a takes them, and dies before its traffic log
    has the statuses (a lock on delivery_events holds the write). The
    taken rows stay until that write, so the restarted a takes them again
    and every message ends delivered. (a answers its own receipts only
    once logged, receipt_ack = "durable", so the carrier resends those.)
    Before, the rows were deleted as taken: those messages had no status
    and would have ended unknown."""
    await create_account(db, "acme", system_id="acme", password="acme-pw1")
    sim = CarrierSimulator(SimConfig(port=0, name="sim", dlr_delay=1.0))
    sim_port = await sim.start()
    routers = {}
    for name, ack in (("a", "durable"), ("b", "immediate")):
        ports = free_ports()
        cfg = tmp_path / f"router-{name}.toml"
        cfg.write_text(
            listen_toml(ports)
            + f'[delivery]\nguarantee = "at-least-once"\nreceipt_ack = "{ack}"\n'
            + f'node = "node-{name}"\n'
            + carrier_toml("sim", sim_port, tps=100.0, window=32)
            + '[routes]\ndefault = ["sim"]\n'
        )
        routers[name] = (cfg, ports, tmp_path / f"router-{name}.log")
    procs = {
        n: await start_router(c, database_url, p["ops"], log) for n, (c, p, log) in routers.items()
    }
    lock: asyncpg.pool.PoolConnectionProxy | None = None
    esme: Esme | None = None
    try:
        esme, _ = await connect(routers["a"][1]["smpp"])
        ids = []
        for i in range(10):
            r = await esme.submit("+4512345678", f"crossing-{i}")
            assert r.status == 0
            ids.append(r.message_id)  # type: ignore[attr-defined]
        # Logged as submitted, routes written, before the receipts (1 s).
        await until_count(db, 10, LOGGED, "submitted", ids, timeout=0.9)
        await until_count(db, 10, ROUTES, timeout=0.9)
        lock = await db.acquire()
        await lock.execute("BEGIN; LOCK TABLE delivery_events IN ACCESS EXCLUSIVE MODE")
        await until(lambda: sim.stats.receipts_sent >= 10, 10, "the receipts")
        # b answers at once what it forwards; a holds its own answers (for
        # at most 5 s, RECEIPT_HOLD_MAX: this must be done before). Every
        # receipt b forwarded has been taken by a (no row left untaken).
        untaken = "SELECT count(*) FROM carrier_receipt_handoff WHERE NOT taken"
        b_ops = routers["b"][1]["ops"]
        deadline = time.monotonic() + 4
        async with aiohttp.ClientSession() as http:
            while True:
                assert time.monotonic() < deadline, "no receipt crossed to a and was taken there"
                async with http.get(f"http://127.0.0.1:{b_ops}/metrics") as resp:
                    text = await resp.text()
                forwarded = parse_metrics(text).get("smsrouter_carrier_receipts_forwarded_total", 0)
                crossed = sim.stats.receipts_acked
                if crossed and forwarded == crossed and not await db.fetchval(untaken):
                    break
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # (b counts a forward before its row is written)
        assert not await db.fetchval(untaken)
        assert 0 < sim.stats.receipts_acked == crossed < 10
        os.kill(procs["a"].pid, signal.SIGKILL)
        procs["a"].wait(timeout=10)
        esme.close()
        await lock.execute("ROLLBACK")
        await db.release(lock)
        lock = None
        assert await db.fetchval(LOGGED, "delivered", ids) == 0

        cfg, ports, log = routers["a"]
        procs["a"] = await start_router(cfg, database_url, ports["ops"], log)
        await until_count(db, 10, LOGGED, "delivered", ids, timeout=20)
        assert await db.fetchval(LOGGED, "unknown", ids) == 0
        await until_count(db, 0, "SELECT count(*) FROM carrier_receipt_handoff")
    finally:
        if esme is not None:
            esme.close()
        if lock is not None:
            await lock.execute("ROLLBACK")
            await db.release(lock)
        for p in procs.values():
            stop_router(p)
        await sim.stop()


async def test_two_nodes_share_the_database_without_taking_each_others_messages(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    """Two routers on one database. Restarting one after kill -9 resends
    only its own backlog (the other's messages reach the carrier once);
    when it dies for good, the live one adopts its backlog and delivers it."""
    await create_account(db, "acme", system_id="acme", password="acme-pw1")
    sim = CarrierSimulator(SimConfig(port=0, name="sim", dlr_delay=0.1))
    sim_port = await sim.start()
    routers = {}
    for name in ("a", "b"):
        ports = free_ports()
        cfg = tmp_path / f"router-{name}.toml"
        # A slow carrier, so each router holds a backlog in its spool.
        cfg.write_text(
            listen_toml(ports)
            + f'[delivery]\nguarantee = "at-least-once"\nnode = "node-{name}"\nnode_grace = 3.0\n'
            + carrier_toml("sim", sim_port, tps=60.0, window=8)
            + '[routes]\ndefault = ["sim"]\n'
        )
        routers[name] = (cfg, ports, tmp_path / f"router-{name}.log")
    procs = {
        n: await start_router(c, database_url, p["ops"], log) for n, (c, p, log) in routers.items()
    }
    acked: dict[str, set[str]] = {"a": set(), "b": set()}
    try:
        for n in ("a", "b"):
            esme, resp = await connect(routers[n][1]["smpp"])
            assert resp.status == 0

            async def one(i: int, n: str = n, esme=esme) -> None:  # type: ignore[no-untyped-def]
                text = f"two-nodes-{n}-{i:04d}"
                r = await esme.submit("+4512345678", text)
                if r.status == Status.ESME_ROK:
                    acked[n].add(text)

            await asyncio.gather(*(one(i) for i in range(300)))
            esme.close()
        assert len(acked["a"]) == len(acked["b"]) == 300
        rows = {
            r["node"]: r["n"]
            for r in await db.fetch("SELECT node, count(*) AS n FROM spool GROUP BY node")
        }
        assert rows.get("node-a", 0) > 100 and rows.get("node-b", 0) > 100, rows

        # a dies and comes back at once: it resends its own backlog only.
        os.kill(procs["a"].pid, signal.SIGKILL)
        procs["a"].wait(timeout=10)
        cfg, ports, log = routers["a"]
        procs["a"] = await start_router(cfg, database_url, ports["ops"], log)
        # a dies for good: b adopts what a still held once a is not seen for 3 s.
        await asyncio.sleep(0.5)
        os.kill(procs["a"].pid, signal.SIGKILL)
        procs["a"].wait(timeout=10)

        want = acked["a"] | acked["b"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not want <= texts(sim):
            await asyncio.sleep(0.2)
        seen = Counter(m.payload.decode() for m in sim.received)
        missing = want - set(seen)
        assert not missing, f"{len(missing)} acknowledged messages never reached the carrier"
        # b never crashed and nobody else sent its messages: each exactly once.
        twice = [t for t in acked["b"] if seen[t] != 1]
        assert not twice, f"{len(twice)} of b's messages reached the carrier more than once"
        deadline = time.monotonic() + 10
        while await db.fetchval("SELECT count(*) FROM spool") and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert await db.fetchval("SELECT count(*) FROM spool") == 0
        b_log = routers["b"][2].read_text()
        assert '"spool_adopted"' in b_log and '"dead_node": "node-a"' in b_log
    finally:
        for p in procs.values():
            stop_router(p)
        await sim.stop()
