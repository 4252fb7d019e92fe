"""Receipts this node holds no submission for, matched to their message
through receipt_routes (router.carriers.recovery) on a real PostgreSQL:
one query for every receipt waiting, looked up again until the route row
appears, given up (and counted) only after the ttl."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from router.carriers.receipt import CarrierReceipt
from router.carriers.recovery import RouteRecovery, Waiting
from router.smpp.constants import MessageState
from router.store.spool import PgSpool
from tests.esme import until
from tests.factories import make_message


@pytest.fixture
async def spool(db: asyncpg.Pool) -> AsyncIterator[PgSpool]:
    s = PgSpool(db, key=None, node="recovery-test")
    s.start()
    yield s
    s._closing = True
    await s.close(timeout=2)


async def write_routes(db: asyncpg.Pool, spool: PgSpool, routes: list[tuple[str, str]]) -> None:
    """Carrier id -> message for each (carrier id, message id), written as
    the router writes them, and waited for."""
    for carrier_id, message_id in routes:
        spool.remember_route("sim-1", carrier_id, make_message(message_id), 0)
    want = len(routes)

    async def written() -> bool:
        return int(await db.fetchval("SELECT count(*) FROM receipt_routes")) >= want

    for _ in range(200):
        if await written():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("routes not written")


def delivered(carrier_id: str) -> CarrierReceipt:
    return CarrierReceipt(carrier_id, MessageState.DELIVERED, "000")


class Counting:
    """PgSpool.find_routes, counting the queries."""

    def __init__(self, spool: PgSpool) -> None:
        self.spool = spool
        self.calls = 0
        self.asked = 0

    async def __call__(self, wanted: Sequence[tuple[str, list[str]]]) -> list[Any]:
        self.calls += 1
        self.asked += len(wanted)
        return await self.spool.find_routes(wanted)


def unmatched(carrier: str) -> float:
    value = REGISTRY.get_sample_value(
        "smsrouter_carrier_receipts_unmatched_total", {"carrier": carrier}
    )
    return value or 0.0


async def test_every_waiting_receipt_is_found_with_one_query(
    db: asyncpg.Pool, spool: PgSpool
) -> None:
    routes = [(format(0x1000 + i, "x"), f"msg-{i:04d}") for i in range(300)]
    await write_routes(db, spool, routes)
    found: dict[str, str] = {}

    async def resolve(w: Waiting, row: Any) -> None:
        found[w.receipt.carrier_id] = row["message_id"]

    find = Counting(spool)
    recovery = RouteRecovery(find, resolve, lambda w: True)
    try:
        # As carriers send them: upper-case hex, leading zeros, and one in decimal.
        for carrier_id, _ in routes[:-1]:
            recovery.add("sim-1", delivered("00" + carrier_id.upper()))
        last_id = str(int(routes[-1][0], 16))
        recovery.add("sim-1", delivered(last_id))
        await until(lambda: len(found) == 300, timeout=10)
    finally:
        await recovery.stop()
    assert find.calls == 1 and find.asked == 300
    assert found["00" + routes[0][0].upper()] == "msg-0000"
    assert found[last_id] == "msg-0299"
    assert len(recovery) == 0


async def test_a_receipt_whose_route_is_written_late_is_still_matched(
    db: asyncpg.Pool, spool: PgSpool
) -> None:
    """The submitting node writes the route a moment after its
    submit_sm_resp, much later when the database is busy: the receipt keeps
    being looked up (here: well after its third try)."""
    found: list[tuple[Waiting, Any]] = []

    async def resolve(w: Waiting, row: Any) -> None:
        found.append((w, row))

    find = Counting(spool)
    recovery = RouteRecovery(
        find, resolve, lambda w: True, delays=(0.0, 0.1, 0.2), then_every=0.3, ttl=30
    )
    try:
        recovery.add("sim-1", delivered("abc123"))
        await until(lambda: find.calls >= 4, timeout=5)
        assert not found
        await write_routes(db, spool, [("abc123", "late-route")])
        await until(lambda: bool(found), timeout=5)
    finally:
        await recovery.stop()
    w, row = found[0]
    assert row["message_id"] == "late-route" and row["node"] == "recovery-test"
    assert w.tries >= 4


async def test_a_receipt_no_route_ever_matches_is_given_up_after_the_ttl_and_counted(
    spool: PgSpool,
) -> None:
    before = unmatched("sim-ttl")
    find = Counting(spool)

    async def resolve(w: Waiting, row: Any) -> None:
        raise AssertionError("no route exists")

    recovery = RouteRecovery(find, resolve, lambda w: True, delays=(0.0,), then_every=0.1, ttl=0.5)
    try:
        recovery.add("sim-ttl", delivered("feed"))
        await until(lambda: unmatched("sim-ttl") == before + 1, timeout=5)
    finally:
        await recovery.stop()
    assert find.calls >= 3
    assert len(recovery) == 0


async def test_a_receipt_matched_meanwhile_by_its_submit_sm_resp_is_not_looked_up(
    spool: PgSpool,
) -> None:
    find = Counting(spool)
    parked = {"a1": False, "b2": True}

    async def resolve(w: Waiting, row: Any) -> None:
        raise AssertionError("no route exists")

    recovery = RouteRecovery(
        find,
        resolve,
        lambda w: parked[w.receipt.carrier_id],
        delays=(0.0,),
        then_every=0.1,
        ttl=30,
    )
    try:
        recovery.add("sim-1", delivered("a1"))  # its submit_sm_resp came: not parked
        recovery.add("sim-1", delivered("b2"))
        await until(lambda: find.calls >= 1, timeout=5)
        assert find.asked == 1  # only b2
        # A forwarded receipt is never parked here: looked up regardless.
        recovery.add("sim-1", delivered("a1"), forwarded=True)
        await until(lambda: find.asked >= 3, timeout=5)
    finally:
        await recovery.stop()
    assert sorted(w.receipt.carrier_id for w in recovery.waiting) == ["a1", "b2"]


async def test_waiting_receipts_are_bounded_oldest_dropped_and_counted(spool: PgSpool) -> None:
    before = unmatched("sim-flood")

    async def resolve(w: Waiting, row: Any) -> None:
        raise AssertionError("no route exists")

    recovery = RouteRecovery(Counting(spool), resolve, lambda w: True, max_waiting=100)
    try:
        for i in range(250):
            recovery.add("sim-flood", delivered(format(i, "x")))
        assert len(recovery) == 100
        assert recovery.waiting[0].receipt.carrier_id == format(150, "x")
        assert unmatched("sim-flood") == before + 150
    finally:
        await recovery.stop()
