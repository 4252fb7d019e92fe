"""PostgreSQL goes away for a while and comes back, in the default durable
mode (delivery.guarantee = "at-least-once", the PostgreSQL spool).

What an operator can expect, phase by phase (asserted below):

1. before: SMPP and HTTP submissions are accepted and receipted;
2. during the outage (every database connection cut, new ones refused, for
   9 s): a new message cannot be made durable, so it is refused, never
   acknowledged: submit_sm_resp ESME_RSYSERR (0x08) once the spool's write
   deadline (5 s after its arrival) has passed; HTTP 503 ``not-durable``
   with ``Retry-After: 1`` and a problem+json body, after the same 5 s (with
   an Idempotency-Key: 503 ``idempotency-unavailable``, ``Retry-After: 5``,
   at once). The customer's bind stays up (enquire_link answered), status
   lookups of messages in memory are answered, /healthz stays 200 (the
   process is fine) and /readyz answers 503 with ``spool.healthy: false``
   once a spool write has failed (it does not look at the database
   otherwise: with no traffic, an outage does not show there);
3. messages accepted just before the cut, whose carrier receipts come during
   the outage, get their receipts (deliver_sm, webhook) at once: finishing
   a message needs no database on the node that sent it (the spool deletes
   and receipt-route writes wait in memory for the database);
4. after: the router recovers on its own (no restart): a message that
   arrived during the outage less than 5 s before the restore is accepted
   (late); new submissions are accepted and receipted; /readyz is 200 again
   within a few seconds even with no traffic at all; the node holds its
   advisory lock again and its heartbeat is fresh (its peers do not take it
   for dead); every spool row and receipt route is cleaned up; every message
   that got a positive answer gets exactly one final receipt, and nothing a
   refusal answered reaches a carrier.

PostgreSQL is reached through a TCP proxy the test controls
(tests/pgproxy.py); the test's own pool (``db``) goes to the server directly.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg

from router.sim import SimConfig
from router.smpp.constants import Status as Smpp
from router.smpp.constants import Tag
from router.smpp.pdu import EnquireLink
from tests.esme import TestEsme, connect, until
from tests.pgproxy import CuttableProxy, start_proxy
from tests.webhook_receiver import Receiver, ok

OUTAGE_SECONDS = 9.0
STRADDLE_AT = 6.5  # s into the outage: these wait for the spool across the restore
DLR_DELAY = (
    1.5  # the carriers' receipt delay: receipts of the last messages before the cut come during it
)
WRITE_DEADLINE = 5.0  # PgSpool.write_deadline: refused once not durable this long after arrival
RECOVERY_BOUND = 30.0  # the router must take messages again within this of the restore
READY_BOUND = 5.0  # /readyz back to 200 within this of the restore, with no traffic
# Lock and heartbeat back within this: a failed heartbeat is retried every
# second (its period is otherwise node_grace / 3 = 10 s).
NODE_RECOVERY_BOUND = 5.0
KEY = {"Authorization": "Bearer acme-key-0001"}
DEST = "+4512345678"


@dataclass
class Rig:
    """A router whose database is behind ``proxy``, one transceiver bind,
    an HTTP client and a webhook receiver; what was accepted and refused."""

    stack: Any  # tests.conftest.Stack
    proxy: CuttableProxy
    db: asyncpg.Pool
    esme: TestEsme
    http: aiohttp.ClientSession
    receiver: Receiver
    smpp_ok: list[str] = field(default_factory=list)  # ids of every positive submit_sm_resp
    http_ok: list[str] = field(default_factory=list)  # ids of every 202
    refused: list[str] = field(default_factory=list)  # texts refused: must never reach a carrier

    @property
    def hook(self) -> str:
        return self.receiver.url + "/hooks"

    def webhook_ids(self) -> Counter[str]:
        return Counter(json.loads(h.body)["id"] for h in self.receiver.hits)

    def receipt_ids(self) -> Counter[str]:
        return Counter(d.tlv_str(Tag.RECEIPTED_MESSAGE_ID) or "" for d in self.esme.delivers)

    def receipted(self, smpp_ids: list[str], http_ids: list[str]) -> bool:
        return set(smpp_ids) <= set(self.receipt_ids()) and set(http_ids) <= set(self.webhook_ids())

    async def smpp(self, tag: str, n: int) -> list[tuple[int, str, float]]:
        """n concurrent submit_sm: (command_status, message_id, seconds to answer) each."""

        async def one(i: int) -> tuple[int, str, float]:
            t0 = time.monotonic()
            resp = await self.esme.submit(DEST, f"{tag}-{i}")
            return resp.status, getattr(resp, "message_id", ""), time.monotonic() - t0

        return list(await asyncio.gather(*(one(i) for i in range(n))))

    async def post(
        self, text: str, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], Any, float]:
        """POST one message: (status, headers, JSON body, seconds to answer)."""
        t0 = time.monotonic()
        async with self.http.post(
            self.stack.http_url + "/v1/messages",
            headers={**KEY, **(headers or {})},
            json={"to": DEST, "from": "Acme", "text": text, "callback_url": self.hook},
        ) as resp:
            body = await resp.json(content_type=None)
            return resp.status, dict(resp.headers), body, time.monotonic() - t0

    async def posts(self, tag: str, n: int) -> list[tuple[int, dict[str, str], Any, float]]:
        return list(await asyncio.gather(*(self.post(f"{tag}-h{i}") for i in range(n))))

    def took_smpp(self, tag: str, answers: list[tuple[int, str, float]]) -> None:
        """Record who got what: ids of positive answers, texts of refusals."""
        for i, (status, mid, _) in enumerate(answers):
            if status == Smpp.ESME_ROK:
                self.smpp_ok.append(mid)
            else:
                self.refused.append(f"{tag}-{i}")

    def took_http(self, tag: str, answers: list[tuple[int, dict[str, str], Any, float]]) -> None:
        for i, (status, _, body, _) in enumerate(answers):
            if status == 202:
                self.http_ok.append(body["id"])
            else:
                self.refused.append(f"{tag}-h{i}")

    async def accepted_wave(
        self, tag: str, n_smpp: int, n_http: int
    ) -> tuple[list[str], list[str]]:
        """Submissions that must all be accepted; their ids."""
        answers = await self.smpp(tag, n_smpp)
        assert [s for s, _, _ in answers] == [Smpp.ESME_ROK] * n_smpp, answers
        posted = await self.posts(tag, n_http)
        assert [p[0] for p in posted] == [202] * n_http, posted
        self.took_smpp(tag, answers)
        self.took_http(tag, posted)
        return [m for _, m, _ in answers], [p[2]["id"] for p in posted]

    async def ready(self) -> tuple[int, dict[str, Any]]:
        async with self.http.get(self.stack.ops_url + "/readyz") as resp:
            return resp.status, await resp.json()

    async def ready_ok(self) -> bool:
        return (await self.ready())[0] == 200

    async def node_alive(self, since: Any) -> bool:
        """What another node checks before adopting this one's backlog
        (PgSpool.adopt_orphans): its advisory lock is held, and it was seen
        (heartbeat) at or after ``since``."""
        node = self.stack.router.spool.node
        held = await self.db.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND ((classid::bigint << 32) | objid::bigint)"
            "  = hashtextextended('sms-router-node:' || $1, 0)",
            node,
        )
        seen = await self.db.fetchval("SELECT seen_at FROM router_nodes WHERE node = $1", node)
        return bool(held) and seen is not None and seen >= since


async def until_true(
    cond: Callable[[], Awaitable[bool]], timeout: float, what: str, every: float = 0.1
) -> None:
    """Poll an async ``cond`` until it is true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not met within {timeout} s")
        await asyncio.sleep(every)


@asynccontextmanager
async def rig(
    stack_factory: Any, db: asyncpg.Pool, database_url: str, receivers: Any
) -> AsyncIterator[Rig]:
    """Everything it starts stops at the end (the router before the proxy,
    so that its clean stop reaches the database)."""
    proxy, proxied_url = await start_proxy(database_url)
    stack: Any = None
    esme: TestEsme | None = None
    http: aiohttp.ClientSession | None = None
    try:
        sims = {
            "sim-eu": SimConfig(port=0, dlr_delay=DLR_DELAY),
            "sim-world": SimConfig(port=0, dlr_delay=DLR_DELAY),
        }
        stack = await stack_factory(sims=sims, database_url=proxied_url)  # default guarantee
        assert stack.router.cfg.delivery_guarantee == "at-least-once"
        assert stack.router.spool is not None and stack.router.spool.durable
        receiver = await receivers(ok())
        esme, bound = await connect(stack.smpp_port)
        assert bound.status == Smpp.ESME_ROK
        http = aiohttp.ClientSession()
        yield Rig(stack, proxy, db, esme, http, receiver)
    finally:
        if esme is not None:
            esme.close()
        if http is not None:
            await http.close()
        proxy.restore()
        if stack is not None:
            await stack.router.stop(timeout=3)  # the fixture stops the simulators
        await proxy.stop()


async def test_durable_router_refuses_during_a_database_outage_and_recovers(
    stack_factory: Any, db: asyncpg.Pool, database_url: str, receivers: Any
) -> None:
    async with rig(stack_factory, db, database_url, receivers) as r:
        # ---- 1. before the outage: accepted and receipted.
        s_ids, h_ids = await r.accepted_wave("before", 10, 3)
        await until(lambda: r.receipted(s_ids, h_ids), timeout=10, what="receipts before")
        assert await r.ready_ok()
        assert await r.node_alive(await db.fetchval("SELECT now() - interval '15 seconds'"))

        # ---- 2./3. messages accepted right before the cut; their carrier
        # receipts come DLR_DELAY s later, inside the outage.
        edge_s, edge_h = await r.accepted_wave("edge", 10, 3)
        r.proxy.cut()
        cut_at = time.monotonic()
        assert not (set(edge_s) & set(r.receipt_ids())), "receipts came before the cut"

        # New work during the outage: refused with a clear answer, never acknowledged.
        refused_smpp = asyncio.ensure_future(r.smpp("during", 5))
        refused_http = asyncio.ensure_future(r.posts("during", 2))
        status, headers, body, took = await r.post("keyed", {"Idempotency-Key": "k-outage-1"})
        assert status == 503, body
        assert headers.get("Retry-After") == "5"
        assert headers["Content-Type"].startswith("application/problem+json")
        assert body["type"].endswith("/idempotency-unavailable") and body["status"] == 503
        assert took < 2.0, "the idempotency store answers at once"
        r.refused.append("keyed")
        # The bind stays usable meanwhile.
        el = await asyncio.wait_for(r.esme.request(EnquireLink()), 2)
        assert el.status == Smpp.ESME_ROK
        # Receipts of messages accepted before the cut arrive in the outage.
        await until(
            lambda: r.receipted(edge_s, edge_h),
            timeout=DLR_DELAY + 3,
            what="receipts of messages accepted before the cut, during the outage",
        )
        # Status lookups of messages the router holds need no database.
        async with r.http.get(f"{r.stack.http_url}/v1/messages/{edge_h[0]}", headers=KEY) as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "delivered"

        answers = await asyncio.wait_for(refused_smpp, 10)
        for status, mid, took in answers:
            assert status == Smpp.ESME_RSYSERR, answers
            assert mid == ""
            assert WRITE_DEADLINE - 0.5 <= took < WRITE_DEADLINE + 3, answers
        r.took_smpp("during", answers)
        posted = await asyncio.wait_for(refused_http, 10)
        for status, headers, body, took in posted:
            assert status == 503, body
            assert headers.get("Retry-After") == "1"
            assert headers["Content-Type"].startswith("application/problem+json")
            assert body["status"] == 503 and body["type"].endswith("/not-durable")
            assert "id" not in body
            assert WRITE_DEADLINE - 0.5 <= took < WRITE_DEADLINE + 3
        r.took_http("during", posted)

        # Not a crash: the process is healthy, the node is not ready.
        async with r.http.get(r.stack.ops_url + "/healthz") as resp:
            assert resp.status == 200
        status, detail = await r.ready()
        assert status == 503 and detail["ready"] is False, detail
        assert detail["spool"] == {
            "durable": True,
            "rows": detail["spool"]["rows"],
            "healthy": False,
        }
        assert r.esme.is_open
        el = await asyncio.wait_for(r.esme.request(EnquireLink()), 2)
        assert el.status == Smpp.ESME_ROK

        # Messages that arrive late in the outage wait for the spool across the restore.
        assert time.monotonic() - cut_at < STRADDLE_AT, "the outage phase overran"
        await asyncio.sleep(STRADDLE_AT - (time.monotonic() - cut_at))
        straddle_smpp = asyncio.ensure_future(r.smpp("straddle", 5))
        straddle_http = asyncio.ensure_future(r.posts("straddle", 2))
        await asyncio.sleep(OUTAGE_SECONDS - (time.monotonic() - cut_at))

        # ---- 4. the database is back: the router recovers on its own.
        r.proxy.restore()
        restored_at = time.monotonic()
        restored_wall = await db.fetchval("SELECT now()")
        answers = await asyncio.wait_for(straddle_smpp, WRITE_DEADLINE + 3)
        assert [s for s, _, _ in answers] == [Smpp.ESME_ROK] * 5, answers
        assert all(took < WRITE_DEADLINE for _, _, took in answers), answers
        r.took_smpp("straddle", answers)
        posted = await asyncio.wait_for(straddle_http, WRITE_DEADLINE + 3)
        assert [p[0] for p in posted] == [202] * 2, posted
        r.took_http("straddle", posted)
        recovered_in = time.monotonic() - restored_at
        assert recovered_in < RECOVERY_BOUND
        await r.accepted_wave("after", 10, 3)
        await until(lambda: r.receipted(r.smpp_ok, r.http_ok), timeout=10, what="receipts after")
        assert await r.ready_ok()

        # The node is alive again to its peers: it holds its advisory lock
        # and its heartbeat is fresh. Otherwise, once node_grace passed,
        # another router would take it for dead and adopt its backlog
        # (duplicates), and it would never again adopt a dead peer's.
        await until_true(
            lambda: r.node_alive(restored_wall),
            timeout=NODE_RECOVERY_BOUND,
            what="the node's lock and heartbeat back after the outage",
        )

        # Nothing is left behind in the database: every spool row was taken
        # by a carrier and deleted, every receipt route written during the
        # outage was deleted with its receipt (one left over would finish
        # its message again, 'unknown', when it fell due), every message's
        # traffic log shows it delivered.
        accepted = r.smpp_ok + r.http_ok
        deadline = time.monotonic() + 10
        while True:
            spool_rows = await db.fetchval("SELECT count(*) FROM spool")
            routes = await db.fetchval(
                "SELECT count(*) FROM receipt_routes WHERE message_id = ANY($1::text[])", accepted
            )
            logged = await db.fetchval(
                "SELECT count(DISTINCT message_id) FROM delivery_events"
                " WHERE status = 'delivered' AND message_id = ANY($1::text[])",
                accepted,
            )
            done = spool_rows == 0 and routes == 0 and logged == len(accepted)
            if done or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert spool_rows == 0, f"{spool_rows} spool rows left"
        assert routes == 0, f"{routes} receipt routes left"
        assert logged == len(accepted), "traffic log: delivered events missing"

        # Exactly one final receipt per acknowledged message, and no other.
        await asyncio.sleep(0.5)  # room for a duplicate to show up
        receipts = r.receipt_ids()
        assert sorted(receipts) == sorted(r.smpp_ok)
        assert set(receipts.values()) == {1}, receipts
        hooks = r.webhook_ids()
        assert sorted(hooks) == sorted(r.http_ok)
        assert set(hooks.values()) == {1}, hooks
        assert all(json.loads(h.body)["status"] == "delivered" for h in r.receiver.hits)
        # Each accepted message reached a carrier once; no refused one did.
        sent = Counter(m.payload.decode() for sim in r.stack.sims.values() for m in sim.received)
        assert not set(r.refused) & set(sent)
        assert sum(sent.values()) == len(sent) == len(accepted)
        assert (len(r.smpp_ok), len(r.http_ok), len(r.refused)) == (35, 11, 8)
        print(f"accepting again {recovered_in:.2f} s after the restore")


async def test_ready_again_after_an_outage_without_any_traffic(
    stack_factory: Any, db: asyncpg.Pool, database_url: str, receivers: Any
) -> None:
    """/readyz: 503 once a spool write failed in the outage, 200 again soon
    after the database is back even if no message comes. A node that
    /readyz took out of its load balancer gets no message whose write could
    show it the way back."""
    async with rig(stack_factory, db, database_url, receivers) as r:
        assert await r.ready_ok()
        r.proxy.cut()
        [(status, _, took)] = await r.smpp("during", 1)
        assert status == Smpp.ESME_RSYSERR and took >= WRITE_DEADLINE - 0.5
        r.took_smpp("during", [(status, "", took)])
        status, detail = await r.ready()
        assert status == 503 and detail["spool"]["healthy"] is False, detail
        r.proxy.restore()
        restored_at = time.monotonic()
        await until_true(r.ready_ok, timeout=READY_BOUND, what="/readyz 200 again without traffic")
        status, detail = await r.ready()
        assert detail["spool"]["healthy"] is True, detail
        print(f"ready again {time.monotonic() - restored_at:.2f} s after the restore")
        # And it takes messages.
        s_ids, h_ids = await r.accepted_wave("after", 2, 1)
        await until(lambda: r.receipted(s_ids, h_ids), timeout=10, what="receipts after")
        assert not any(
            p.payload.decode() == "during-0" for sim in r.stack.sims.values() for p in sim.received
        )
