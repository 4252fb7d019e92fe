"""Delivery webhooks: end to end through a router (HTTP submit -> simulated
carrier -> receipt -> signed POST to a receiver on 127.0.0.1), and the
sender's retry, give-up, fairness, memory bound and target rules against
aiohttp receivers with fabricated deliveries.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
import structlog.testing
from aiohttp import web
from prometheus_client import REGISTRY

from router.dlr import WebhookSender, sign, verify_signature, webhook_secret
from router.model import Delivery, Message, MessageClass, Origin, Status
from router.sim import SimConfig

DEMO = {"Authorization": "Bearer demo-key"}
MASTER = "test-master-key"


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


def outcome(name: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "smsrouter_receipts_sent_total", {"channel": "webhook", "outcome": name}
        )
        or 0.0
    )


@dataclass
class Hit:
    path: str
    query: str
    body: bytes
    signature: str
    at: float


@dataclass
class Receiver:
    """An aiohttp server on 127.0.0.1:0 answering with a scripted behaviour."""

    behave: Callable[[Hit], Awaitable[web.StreamResponse]]
    hits: list[Hit] = field(default_factory=list)
    url: str = ""
    runner: web.AppRunner | None = None

    async def start(self) -> Receiver:
        async def handle(request: web.Request) -> web.StreamResponse:
            hit = Hit(
                request.path,
                request.query_string,
                await request.read(),
                request.headers.get("X-SMSRouter-Signature", ""),
                time.monotonic(),
            )
            self.hits.append(hit)
            return await self.behave(hit)

        app = web.Application()
        app.router.add_post("/{tail:.*}", handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[..., Awaitable[Receiver]]]:
    made: list[Receiver] = []

    async def make(behave: Callable[[Hit], Awaitable[web.StreamResponse]]) -> Receiver:
        r = await Receiver(behave).start()
        made.append(r)
        return r

    yield make
    for r in made:
        await r.stop()


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


def ok() -> Callable[[Hit], Awaitable[web.StreamResponse]]:
    async def behave(hit: Hit) -> web.StreamResponse:
        return web.Response(status=204)

    return behave


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
    msg = Message(
        id=f"{next(_ids):020x}",
        account_id=account_id,
        account=f"a{account_id}",
        origin=Origin.HTTP,
        msg_class=MessageClass.SECRET if secret else MessageClass.STANDARD,
        source="Acme",
        source_ton=5,
        source_npi=0,
        destination="4512345678",
        country="DK",
        data_coding=0,
        esm_class=0,
        segments=(b"hi",),
        text="hi",
        registered_delivery=1,
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
