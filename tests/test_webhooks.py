"""Delivery webhooks: end to end through a router (HTTP submit -> simulated
carrier -> receipt -> signed POST to a receiver on 127.0.0.1), and the
sender's retry, give-up, fairness, memory bound and target rules against
aiohttp receivers with fabricated deliveries. The durable outbox (issue #4)
against the real PostgreSQL: a webhook survives a restart, secret messages'
webhooks never reach the table, a first-attempt success writes nothing, two
nodes share the table without sending a job twice, a claim is respected.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
import structlog.testing
from aiohttp import web
from prometheus_client import REGISTRY

from router.accounts import create_account
from router.app import Router
from router.config import WebhookConfig
from router.dlr import WebhookSender, sign, verify_signature, webhook_secret
from router.model import Delivery, MessageClass, Origin, Status
from router.sim import SimConfig
from tests.factories import make_message
from tests.webhook_receiver import Hit, ok, submit

DEMO = {"Authorization": "Bearer demo-key"}
MASTER = "test-master-key"


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def wait_db(cond: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


def outcome(name: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "smsrouter_receipts_sent_total", {"channel": "webhook", "outcome": name}
        )
        or 0.0
    )


@pytest.fixture
async def senders() -> AsyncIterator[Callable[..., WebhookSender]]:
    made: list[WebhookSender] = []

    def make(accounts: Any, **kw: Any) -> WebhookSender:
        kw.setdefault("master_secret", MASTER)
        kw.setdefault("initial_backoff", 0.05)
        kw.setdefault("allow_private_targets", True)
        kw.setdefault("timeout", 2.0)
        s = WebhookSender(accounts, **kw)
        s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        await s.stop(grace=1.0)


def independent_check(secret: str, hit: Hit) -> None:
    """Verify the signature the way a customer would, without our helpers."""
    parts = dict(p.split("=", 1) for p in hit.signature.split(","))
    expected = hmac.new(
        secret.encode(), f"{parts['t']}.".encode() + hit.body, hashlib.sha256
    ).hexdigest()
    assert hmac.compare_digest(parts["v1"], expected)
    assert abs(int(parts["t"]) - time.time()) < 60


# -------------------------------------------------------------- end to end


async def test_webhook_retried_twice_then_delivered_with_valid_signature(
    stack_factory: Any, receivers: Any, senders: Any, db: Any
) -> None:
    stack = await stack_factory()

    async def flaky(hit: Hit) -> web.StreamResponse:
        return web.Response(status=500 if len(receiver.hits) <= 2 else 200)

    receiver = await receivers(flaky)
    sender = senders(stack.router.accounts)
    stack.router.engine.sinks[Origin.HTTP] = sender
    before = {k: outcome(k) for k in ("ok", "retry", "failed")}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            stack.http_url + "/v1/messages",
            headers=DEMO,
            json={
                "to": "+4512345678",
                "from": "Acme",
                "text": "hi",
                "userref": "u-1",
                "callback_url": receiver.url + "/hooks/sms?token=abc",
            },
        ) as resp,
    ):
        assert resp.status == 202
        mid = (await resp.json())["id"]
    await wait_for(lambda: len(receiver.hits) == 3 and sender.pending == 0)
    assert [h.body for h in receiver.hits] == [receiver.hits[0].body] * 3  # same body each time
    assert receiver.hits[0].path == "/hooks/sms" and receiver.hits[0].query == "token=abc"
    body = json.loads(receiver.hits[-1].body)
    assert set(body) == {"id", "userref", "to", "status", "error", "time"}
    assert body["id"] == mid and body["userref"] == "u-1" and body["to"] == "+4512345678"
    assert body["status"] == "delivered" and body["error"] is None
    assert body["time"].endswith("Z")
    demo_id = await db.fetchval("SELECT id FROM accounts WHERE name = 'demo'")
    secret = webhook_secret(MASTER.encode(), demo_id)
    assert sender.secret_for(demo_id) == secret
    for hit in receiver.hits:
        independent_check(secret, hit)
        assert verify_signature(secret, hit.signature, hit.body, time.time())
    assert not verify_signature(secret, receiver.hits[-1].signature, b'{"forged":1}', time.time())
    # Backoff: the second retry waited longer than the first.
    gaps = [b.at - a.at for a, b in zip(receiver.hits, receiver.hits[1:], strict=False)]
    assert gaps[0] >= 0.04 and gaps[1] >= 0.09
    assert outcome("retry") - before["retry"] == 2
    assert outcome("ok") - before["ok"] == 1
    assert outcome("failed") == before["failed"]


async def test_secret_message_webhook_omits_to_and_uses_account_url(
    stack_factory: Any, receivers: Any, senders: Any, db: Any
) -> None:
    stack = await stack_factory(
        sims={
            "sim-eu": SimConfig(port=0, dlr_delay=0.05, deliver_ratio=0.0),
            "sim-world": SimConfig(port=0, dlr_delay=0.05),
        }
    )
    receiver = await receivers(ok())
    await db.execute(
        "UPDATE accounts SET webhook_url = $1 WHERE name = 'demo'", receiver.url + "/account-hook"
    )
    await stack.router.reload()
    sender = senders(stack.router.accounts)
    stack.router.engine.sinks[Origin.HTTP] = sender
    async with aiohttp.ClientSession() as http:
        for cls in ("secret", "standard"):
            async with http.post(
                stack.http_url + "/v1/messages",
                headers=DEMO,
                json={
                    "to": "+4512345678",
                    "from": "Acme",
                    "text": "pin 1234",
                    "class": cls,
                    "userref": f"ref-{cls}",
                },
            ) as resp:
                assert resp.status == 202
    await wait_for(lambda: len(receiver.hits) == 2)
    bodies = {json.loads(h.body)["userref"]: json.loads(h.body) for h in receiver.hits}
    secret, standard = bodies["ref-secret"], bodies["ref-standard"]
    assert "to" not in secret and "4512345678" not in json.dumps(secret)
    assert secret["status"] == "failed" and secret["error"]  # undelivered by the carrier
    assert standard["to"] == "+4512345678"
    assert all(h.path == "/account-hook" for h in receiver.hits)


# ------------------------------------------------------- sender behaviour


_ids = iter(range(10**6))


def delivery(
    account_id: int = 1,
    *,
    url: str | None = None,
    secret: bool = False,
    status: Status = Status.DELIVERED,
    userref: str | None = "r",
) -> Delivery:
    now = time.time()
    msg = make_message(
        f"{next(_ids):020x}",
        account_id=account_id,
        account=f"a{account_id}",
        origin=Origin.HTTP,
        msg_class=MessageClass.SECRET if secret else MessageClass.STANDARD,
        segments=(b"hi",),
        text="hi",
        accepted_at=now,
        expires_at=now + 60,
        userref=userref,
        callback_url=url,
    )
    return Delivery(msg, status=status, carrier="sim", updated_at=now)


def accounts(**urls: str | None) -> Any:
    return SimpleNamespace(
        by_id={int(k[1:]): SimpleNamespace(webhook_url=v) for k, v in urls.items()}
    )


async def test_gives_up_after_max_attempts_and_never_logs_query_or_number(
    receivers: Any, senders: Any
) -> None:
    async def broken(hit: Hit) -> web.StreamResponse:
        return web.Response(status=503)

    receiver = await receivers(broken)
    sender = senders(accounts(), max_attempts=3)
    before = outcome("failed")
    with structlog.testing.capture_logs() as logs:
        sender.deliver(delivery(url=receiver.url + "/h?token=s3cr3t-token"))
        await wait_for(lambda: sender.pending == 0)
        assert len(receiver.hits) == 3
        assert outcome("failed") - before == 1
        await asyncio.sleep(0.2)
    assert len(receiver.hits) == 3
    err = json.dumps(logs)
    assert "webhook_given_up" in err
    for leak in ("s3cr3t-token", "4512345678", '"to"', MASTER):
        assert leak not in err


async def test_timeout_is_retried(receivers: Any, senders: Any) -> None:
    async def slow_once(hit: Hit) -> web.StreamResponse:
        if len(receiver.hits) == 1:
            await asyncio.sleep(1.0)
        return web.Response(status=200)

    receiver = await receivers(slow_once)
    sender = senders(accounts(), timeout=0.2)
    sender.deliver(delivery(url=receiver.url + "/h"))
    await wait_for(lambda: sender.pending == 0 and len(receiver.hits) == 2)


async def test_non_final_and_repeated_statuses_send_one_webhook(
    receivers: Any, senders: Any
) -> None:
    receiver = await receivers(ok())
    sender = senders(accounts())
    d = delivery(url=receiver.url + "/h", status=Status.SUBMITTED)
    sender.deliver(d)  # transient: nothing leaves
    d.status = Status.DELIVERED
    sender.deliver(d)
    d.status = Status.FAILED  # a late, different verdict never overwrites the first
    sender.deliver(d)
    await wait_for(lambda: len(receiver.hits) == 1 and sender.pending == 0)
    await asyncio.sleep(0.1)
    assert len(receiver.hits) == 1
    assert json.loads(receiver.hits[0].body)["status"] == "delivered"
    sender.deliver(delivery(url=None, account_id=9))  # no URL anywhere: nothing to do
    assert sender.pending == 0


async def test_a_slow_customer_does_not_starve_another(receivers: Any, senders: Any) -> None:
    release = asyncio.Event()

    async def stuck(hit: Hit) -> web.StreamResponse:
        await release.wait()
        return web.Response(status=200)

    slow = await receivers(stuck)
    fast = await receivers(ok())
    sender = senders(
        accounts(a1=slow.url + "/slow", a2=fast.url + "/fast"),
        per_account=2,
        max_concurrency=3,
        timeout=5.0,
    )
    for _ in range(20):
        sender.deliver(delivery(account_id=1))
    for _ in range(5):
        sender.deliver(delivery(account_id=2))
    await wait_for(lambda: len(fast.hits) == 5, timeout=3.0)
    assert len(slow.hits) == 2  # at most per_account in flight for the slow one
    release.set()
    await wait_for(lambda: sender.pending == 0)
    assert len(slow.hits) == 20


async def test_pending_is_bounded_and_drops_the_oldest(receivers: Any, senders: Any) -> None:
    release = asyncio.Event()

    async def stuck(hit: Hit) -> web.StreamResponse:
        await release.wait()
        return web.Response(status=200)

    receiver = await receivers(stuck)
    sender = senders(accounts(a1=receiver.url + "/h"), per_account=1, max_pending=3, timeout=5.0)
    before = outcome("dropped")
    refs = [f"r{i}" for i in range(6)]
    sender.deliver(delivery(userref=refs[0]))
    await wait_for(lambda: len(receiver.hits) == 1)  # r0 in flight: never dropped
    for ref in refs[1:]:
        sender.deliver(delivery(userref=ref))
    assert sender.pending == 3
    assert outcome("dropped") - before == 3  # r1, r2, r3 went
    release.set()
    await wait_for(lambda: sender.pending == 0)
    got = [json.loads(h.body)["userref"] for h in receiver.hits]
    assert got == ["r0", "r4", "r5"]


async def test_private_targets_are_refused_unless_allowed(receivers: Any, senders: Any) -> None:
    receiver = await receivers(ok())
    sender = senders(accounts(), allow_private_targets=False)
    before = outcome("failed")
    sender.deliver(delivery(url=receiver.url + "/h"))
    sender.deliver(delivery(url="http://localhost:9/h"))
    sender.deliver(delivery(url="http://169.254.169.254/latest/meta-data"))
    await wait_for(lambda: sender.pending == 0)
    assert receiver.hits == []
    assert outcome("failed") - before == 3


async def test_signing_helpers_and_secret_derivation() -> None:
    body = b'{"id":"x"}'
    header = sign("whsec_abc", 1_700_000_000, body)
    assert header.startswith("t=1700000000,v1=")
    assert verify_signature("whsec_abc", header, body, 1_700_000_100)
    assert not verify_signature("whsec_abc", header, body, 1_700_001_000)  # too old
    assert not verify_signature("whsec_other", header, body, 1_700_000_000)
    assert not verify_signature("whsec_abc", "garbage", body, 1_700_000_000)
    a1, a2 = webhook_secret(b"k", 1), webhook_secret(b"k", 2)
    assert a1 != a2 and a1 == webhook_secret(b"k", 1) and a1 != webhook_secret(b"k2", 1)
    generated = WebhookSender(accounts(), env={})  # no key configured: a random one
    assert generated.secret_for(1) != WebhookSender(accounts(), env={}).secret_for(1)
    from_env = WebhookSender(accounts(), env={"ROUTER_WEBHOOK_SECRET": "k"})
    assert from_env.secret_for(1) == a1


# ------------------------------------------------------------ the outbox


async def outbox(db: Any) -> list[Any]:
    return list(await db.fetch("SELECT * FROM webhook_outbox ORDER BY created_at"))


def signed_at(hit: Hit) -> int:
    return int(dict(p.split("=", 1) for p in hit.signature.split(","))["t"])


async def test_webhook_pending_at_a_restart_is_delivered_after_it(
    stack_factory: Any, receivers: Any, db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTER_WEBHOOK_SECRET", MASTER)  # both routers sign alike
    failing = True

    async def down_until_restart(hit: Hit) -> web.StreamResponse:
        return web.Response(status=500 if failing else 200)

    receiver = await receivers(down_until_restart)
    stack = await stack_factory(
        webhooks=WebhookConfig(initial_backoff=0.2, allow_private_targets=True)
    )
    assert stack.router.webhooks is not None
    stack.router.webhooks.write_interval = 0.1
    before_ok = outcome("ok")
    mid = await submit(stack, userref="u-restart", callback_url=receiver.url + "/h?token=abc")

    async def written_after_a_failure() -> bool:
        rows = await outbox(db)
        return len(rows) == 1 and rows[0]["attempts"] >= 1

    await wait_db(written_after_a_failure)
    await stack.router.stop(timeout=3)
    [row] = await outbox(db)  # a clean stop leaves it for whoever starts next
    assert row["message_id"] == mid and row["destination"] == "4512345678"
    assert bytes(row["body"]) == receiver.hits[0].body
    failed_before = len(receiver.hits)
    assert failed_before >= 1 and outcome("ok") == before_ok

    failing = False
    stack.router = Router(stack.router.cfg)  # the fixture stops this one
    await stack.router.start()

    async def outbox_empty() -> bool:
        return not await outbox(db)

    await wait_db(outbox_empty)
    await wait_for(lambda: outcome("ok") - before_ok == 1)
    await asyncio.sleep(0.3)
    after = receiver.hits[failed_before:]
    assert len(after) == 1  # delivered once after the restart, not again
    hit = after[0]
    assert hit.body == receiver.hits[0].body  # the very bytes of the first attempt
    body = json.loads(hit.body)
    assert body == {
        "id": mid,
        "userref": "u-restart",
        "to": "+4512345678",
        "status": "delivered",
        "error": None,
        "time": body["time"],
    }
    assert hit.path == "/h" and hit.query == "token=abc"
    demo_id = await db.fetchval("SELECT id FROM accounts WHERE name = 'demo'")
    secret = webhook_secret(MASTER.encode(), demo_id)
    independent_check(secret, hit)  # a fresh timestamp over the same body
    assert verify_signature(secret, hit.signature, hit.body, time.time())
    assert signed_at(hit) >= signed_at(receiver.hits[0])


async def test_secret_message_webhooks_never_touch_the_outbox(
    stack_factory: Any, receivers: Any, db: Any
) -> None:
    async def broken(hit: Hit) -> web.StreamResponse:
        return web.Response(status=500)

    receiver = await receivers(broken)
    stack = await stack_factory(
        webhooks=WebhookConfig(initial_backoff=0.05, allow_private_targets=True)
    )
    await db.execute(
        "UPDATE accounts SET webhook_url = $1 WHERE name = 'demo'", receiver.url + "/hook"
    )
    await stack.router.reload()
    sender = stack.router.webhooks
    assert sender is not None
    sender.write_interval = 0.05
    secret_id = await submit(stack, **{"class": "secret", "userref": "ref-secret"})
    standard_id = await submit(stack, userref="ref-standard")

    def hits_of(mid: str) -> int:
        return sum(1 for h in receiver.hits if json.loads(h.body)["id"] == mid)

    async def both_retried() -> bool:
        rows = await outbox(db)
        return hits_of(secret_id) >= 4 and any(r["attempts"] >= 2 for r in rows)

    await wait_db(both_retried)  # the receiver is failing all along
    rows = await outbox(db)
    assert [r["message_id"] for r in rows] == [standard_id]  # the standard one is durable
    everything = await db.fetchval(
        "SELECT coalesce(string_agg(o::text || convert_from(o.body, 'UTF8'), ' '), '')"
        " FROM webhook_outbox o"
    )
    for trace in (secret_id, "ref-secret"):
        assert trace not in everything
    assert sender.rows_inserted == 1
    assert sender.pending >= 1  # the secret one: memory only


async def test_success_on_first_attempt_leaves_no_row(
    stack_factory: Any, receivers: Any, db: Any
) -> None:
    receiver = await receivers(ok())
    stack = await stack_factory(
        webhooks=WebhookConfig(initial_backoff=0.05, allow_private_targets=True)
    )
    sender = stack.router.webhooks
    assert sender is not None
    for i in range(5):
        await submit(stack, userref=f"r{i}", callback_url=receiver.url + "/h")
    await wait_for(lambda: len(receiver.hits) == 5 and sender.pending == 0)
    await asyncio.sleep(sender.write_interval + 0.3)  # a write came and went
    assert await outbox(db) == []


async def test_first_attempt_success_is_never_written(
    receivers: Any, senders: Any, db: Any
) -> None:
    receiver = await receivers(ok())
    acct = await create_account(db, "hooks")
    # The first write runs at start; the next one after 0.5 s finds nothing left.
    sender = senders(accounts(), pool=db, write_interval=0.5)
    for _ in range(20):
        sender.deliver(delivery(acct, url=receiver.url + "/h"))
    await wait_for(lambda: len(receiver.hits) == 20 and sender.pending == 0)
    await asyncio.sleep(0.7)
    assert sender.rows_inserted == 0
    assert await outbox(db) == []


async def test_over_the_memory_bound_durable_jobs_spill_to_the_outbox(
    receivers: Any, senders: Any, db: Any
) -> None:
    release = asyncio.Event()

    async def stuck(hit: Hit) -> web.StreamResponse:
        await release.wait()
        return web.Response(status=200)

    receiver = await receivers(stuck)
    acct = await create_account(db, "hooks")
    sender = senders(
        accounts(),
        pool=db,
        per_account=1,
        max_pending=3,
        timeout=5.0,
        write_interval=0.05,
        poll_interval=0.05,
    )
    before = outcome("dropped")
    sender.deliver(delivery(acct, url=receiver.url + "/h", userref="r0"))
    await wait_for(lambda: len(receiver.hits) == 1)
    for i in range(1, 6):
        sender.deliver(delivery(acct, url=receiver.url + "/h", userref=f"r{i}"))
    assert sender.pending == 3

    async def spilled() -> bool:
        return len(await outbox(db)) >= 3

    await wait_db(spilled)
    release.set()

    async def all_sent() -> bool:
        return len(receiver.hits) == 6 and not await outbox(db)

    await wait_db(all_sent)
    assert sorted(json.loads(h.body)["userref"] for h in receiver.hits) == [
        f"r{i}" for i in range(6)
    ]
    assert outcome("dropped") == before  # nothing lost to the bound


async def add_outbox_row(
    db: Any,
    account_id: int,
    *,
    due_in: float = 0.0,
    age: float = 60.0,
    attempts: int = 1,
    userref: str = "r",
) -> str:
    """A row as a node that crashed (or claimed it) would leave it."""
    mid = f"{next(_ids):020x}"
    body = json.dumps(
        {"id": mid, "userref": userref, "to": "+4512345678", "status": "delivered"},
        separators=(",", ":"),
    ).encode()
    await db.execute(
        "INSERT INTO webhook_outbox (id, account_id, message_id, url, destination, body,"
        " attempts, next_at, created_at) VALUES (gen_random_uuid(), $1, $2, $3, '4512345678',"
        " $4, $5, now() + make_interval(secs => $6), now() - make_interval(secs => $7))",
        account_id,
        mid,
        URL_OF[account_id],
        body,
        attempts,
        due_in,
        age,
    )
    return mid


URL_OF: dict[int, str] = {}


async def test_two_nodes_share_the_outbox_and_send_each_job_once(
    receivers: Any, senders: Any, db: Any
) -> None:
    async def slowish(hit: Hit) -> web.StreamResponse:
        await asyncio.sleep(0.02)
        return web.Response(status=200)

    receiver = await receivers(slowish)
    acct = await create_account(db, "hooks")
    URL_OF[acct] = receiver.url + "/h"
    ids = [await add_outbox_row(db, acct) for _ in range(40)]  # left by a crashed node
    kw: dict[str, Any] = {"pool": db, "claim_batch": 4, "write_interval": 0.02}
    nodes = [senders(accounts(), poll_interval=0.02, **kw) for _ in range(2)]
    sent = [0, 0]
    for n, node in enumerate(nodes):
        post = node._post

        async def counted(job: Any, n: int = n, post: Any = post) -> Any:
            sent[n] += 1
            return await post(job)

        node._post = counted  # type: ignore[method-assign]

    async def drained() -> bool:
        return not await outbox(db)

    await wait_db(drained)
    await asyncio.sleep(0.2)
    got = [json.loads(h.body)["id"] for h in receiver.hits]
    assert sorted(got) == sorted(ids)  # every job once: no double send across nodes
    assert min(sent) > 0 and sum(sent) == 40  # both nodes took a share


async def test_a_claimed_row_waits_for_its_lease_and_stale_rows_are_given_up(
    receivers: Any, senders: Any, db: Any
) -> None:
    receiver = await receivers(ok())
    acct = await create_account(db, "hooks")
    URL_OF[acct] = receiver.url + "/h"
    started = time.monotonic()
    leased = await add_outbox_row(db, acct, due_in=1.0)  # claimed by a node that died
    await add_outbox_row(db, acct, age=25 * 3600.0)  # older than max_age
    await add_outbox_row(db, acct, attempts=5)  # out of attempts
    before = outcome("failed")
    senders(accounts(), pool=db, poll_interval=0.05, write_interval=0.05, max_attempts=5)

    async def drained() -> bool:
        return not await outbox(db)

    await wait_db(drained)
    assert [json.loads(h.body)["id"] for h in receiver.hits] == [leased]
    assert receiver.hits[0].at - started >= 0.9  # not before its lease ran out
    assert outcome("failed") - before == 2


async def test_a_clean_stop_hands_claimed_and_unwritten_jobs_back_at_once(
    receivers: Any, senders: Any, db: Any
) -> None:
    release = asyncio.Event()

    async def stuck(hit: Hit) -> web.StreamResponse:
        await release.wait()
        return web.Response(status=200)

    receiver = await receivers(stuck)
    acct = await create_account(db, "hooks")
    URL_OF[acct] = receiver.url + "/h"
    claimed = await add_outbox_row(db, acct)
    node = senders(
        accounts(), pool=db, per_account=1, timeout=5.0, write_interval=5.0, poll_interval=0.05
    )
    await wait_for(lambda: len(receiver.hits) == 1)  # the claimed row, in flight
    fresh = delivery(acct, url=receiver.url + "/h")
    node.deliver(fresh)  # waits behind it, not written yet
    await node.stop(grace=0.2)
    rows = await db.fetch("SELECT message_id, next_at <= now() AS due FROM webhook_outbox")
    assert sorted((r["message_id"], r["due"]) for r in rows) == sorted(
        [(claimed, True), (fresh.message.id, True)]
    )
    release.set()
    senders(accounts(), pool=db, poll_interval=0.05)  # the next node (or the restart)

    async def drained() -> bool:
        return not await outbox(db)

    await wait_db(drained)
    assert {json.loads(h.body)["id"] for h in receiver.hits[1:]} == {claimed, fresh.message.id}
