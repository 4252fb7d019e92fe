"""The first end-to-end path over real sockets and a real database:

an independent SMPP client (smpplib) binds to the router as a transceiver,
submits to an international number, gets our message id, the router routes
by country to a simulated carrier over its own SMPP client session, and the
carrier's receipt comes back to the client as deliver_sm carrying OUR id.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import smpplib.client
import smpplib.consts
import smpplib.gsm

from router.sim import SimConfig
from tests.smpplib_client import Smpplib


async def wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_smpplib_submit_routes_by_country_and_gets_receipt_with_our_id(
    stack_factory: Any,
) -> None:
    stack = await stack_factory()
    client = Smpplib(stack.smpp_port)
    await asyncio.to_thread(client.bind, "transceiver")
    try:
        await asyncio.to_thread(client.submit, "+4512345678", "Hello Denmark")
        await asyncio.to_thread(client.submit, "+14155552671", "Hello US")
        await wait_for(lambda: len(client.sent) == 2)
        ids = [p.message_id.decode() for p in client.sent]
        assert all(p.status == 0 for p in client.sent)
        assert len(set(ids)) == 2
        # Routed by country: DK to sim-eu, US to the default sim-world.
        await wait_for(
            lambda: (
                stack.sims["sim-eu"].received_count() == 1
                and stack.sims["sim-world"].received_count() == 1
            )
        )
        assert stack.sims["sim-eu"].received[0].destination == "4512345678"
        assert stack.sims["sim-world"].received[0].destination == "14155552671"
        # Receipts come back with OUR ids, not the carrier's.
        await wait_for(lambda: len(client.delivers) == 2)
        receipted = set()
        for r in client.delivers:
            assert r.esm_class & 0x04
            text = r.short_message.decode()
            assert "stat:DELIVRD" in text
            receipted.add(
                r.receipted_message_id.decode()
                if isinstance(r.receipted_message_id, bytes)
                else r.receipted_message_id
            )
        assert receipted == set(ids)
        carrier_ids = {m.carrier_id for s in stack.sims.values() for m in s.received}
        assert not receipted & carrier_ids
    finally:
        await asyncio.to_thread(client.close)


async def test_traffic_log_row_and_final_event_are_written(stack_factory: Any, db: Any) -> None:
    stack = await stack_factory()
    client = Smpplib(stack.smpp_port)
    await asyncio.to_thread(client.bind, "transceiver")
    try:
        await asyncio.to_thread(client.submit, "+4512345678", "logged text")
        await wait_for(lambda: len(client.delivers) == 1)
        msg_id = client.sent[0].message_id.decode()

        async def rows() -> tuple[Any, list[str]]:
            row = await db.fetchrow("SELECT * FROM traffic_log WHERE id = $1", msg_id)
            ev = [
                r["status"]
                for r in await db.fetch(
                    "SELECT status FROM delivery_events WHERE message_id = $1 ORDER BY at", msg_id
                )
            ]
            return row, ev

        deadline = time.monotonic() + 5
        row, events = await rows()
        while (row is None or "delivered" not in events) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            row, events = await rows()
        assert row is not None
        assert row["destination"] == "4512345678"
        assert row["country"] == "DK"
        assert row["carrier"] == "sim-eu"
        assert row["body"] == "logged text"
        assert events[-1] == "delivered"
    finally:
        await asyncio.to_thread(client.close)


async def test_bad_password_is_refused_with_rinvpaswd(stack_factory: Any) -> None:
    stack = await stack_factory()
    client = Smpplib(stack.smpp_port, password="wrong")
    try:
        await asyncio.to_thread(client.client.connect)
        try:
            await asyncio.to_thread(
                client.client.bind_transceiver, system_id="acme", password="wrong"
            )
        except smpplib.exceptions.PDUError as exc:
            assert exc.args[1] == 0x0E  # ESME_RINVPASWD
        else:
            raise AssertionError("bind with a wrong password succeeded")
    finally:
        await asyncio.to_thread(client.client.disconnect)


async def test_carrier_rejection_becomes_failed_receipt(stack_factory: Any) -> None:
    stack = await stack_factory(
        sims={"sim-eu": SimConfig(port=0, reject_ratio=1.0), "sim-world": SimConfig(port=0)}
    )
    client = Smpplib(stack.smpp_port)
    await asyncio.to_thread(client.bind, "transceiver")
    try:
        await asyncio.to_thread(client.submit, "+4512345678", "will fail")
        await wait_for(lambda: len(client.delivers) == 1)
        text = client.delivers[0].short_message.decode()
        assert "stat:UNDELIV" in text
        assert client.sent[0].status == 0  # accepted first, failed later
    finally:
        await asyncio.to_thread(client.close)


async def test_suite_runs_on_uvloop_like_the_daemon() -> None:
    # uvloop differs from asyncio in details (timer handles have no when());
    # the suite must exercise the loop production uses.
    assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")


async def test_a_receipt_wait_is_let_go_from_memory_and_a_late_receipt_still_matches(
    stack_factory: Any, db: Any
) -> None:
    """A message at a carrier whose receipt is slow leaves the router's memory
    after delivery.receipt_memory (carriers lose receipts; memory must not
    grow with them); when the receipt does come, it is matched from the
    database and still reaches the customer."""
    stack = await stack_factory(
        sims={"sim-eu": SimConfig(port=0, dlr_delay=3.0), "sim-world": SimConfig(port=0)}
    )
    engine = stack.router.engine
    client = Smpplib(stack.smpp_port)
    await asyncio.to_thread(client.bind, "transceiver")
    try:
        for i in range(3):
            await asyncio.to_thread(client.submit, "+4512345678", f"slow receipt {i}")
        await wait_for(lambda: len(client.sent) == 3)
        ids = {p.message_id.decode() for p in client.sent}
        await wait_for(lambda: all(engine.lookup(i).status.value == "submitted" for i in ids))
        # Their receipt routes are durable before anything is let go.
        deadline = time.monotonic() + 5
        while await db.fetchval("SELECT count(*) FROM receipt_routes") < 3:
            assert time.monotonic() < deadline, "receipt routes not written"
            await asyncio.sleep(0.05)
        assert engine.release_receipt_waits() == 0  # younger than receipt_memory
        engine.cfg.receipt_memory = 0.0
        assert engine.release_receipt_waits() == 3
        assert not ids & set(engine.active)
        assert all(not c.correlator for c in engine.carriers.values())
        # Still answered from memory meanwhile, as submitted.
        assert {engine.lookup(i).status.value for i in ids} == {"submitted"}
        # The receipts come ~3 s after the submit: matched through the database.
        await wait_for(lambda: len(client.delivers) == 3, timeout=15)
        assert {
            r.receipted_message_id.decode()
            if isinstance(r.receipted_message_id, bytes)
            else r.receipted_message_id
            for r in client.delivers
        } == ids
        assert all(b"stat:DELIVRD" in r.short_message for r in client.delivers)
        assert {engine.lookup(i).status.value for i in ids} == {"delivered"}
    finally:
        client.close()
