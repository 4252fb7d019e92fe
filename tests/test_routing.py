"""Routing: country detection, prefix overrides, weights, blocked
destinations, and failover/recovery with real simulated carriers."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

import pytest

from router.config import ConfigError, RouteEntry, RoutesConfig, parse_config
from router.routing import CountryLookup, NoRoute, RouteTable, normalise_e164
from router.sim import CarrierSimulator, SimConfig
from tests.esme import connect


def table(**kw: Any) -> RouteTable:
    return RouteTable.from_config(RoutesConfig(**kw))


def test_country_lookup_and_cache() -> None:
    c = CountryLookup()
    assert c.country("4512345678") == "DK"
    assert c.country("14155552671") == "US"
    assert c.country("447700900123") == "GB"
    assert c.country("16135550123") == "CA"  # +1 shared code resolved by area code
    assert c.country("4512345699") == "DK"  # served from the prefix cache
    assert len(c._cache) == 4


@pytest.mark.parametrize(
    "raw,want",
    [
        ("+4512345678", "4512345678"),
        ("004512345678", "4512345678"),
        ("4512345678", "4512345678"),
        ("+45 1234", None),
        ("12ab", None),
        ("0123456789", None),
        ("+1234567890123456", None),
    ],
)
def test_normalise_e164(raw: str, want: str | None) -> None:
    assert normalise_e164(raw) == want


def test_country_prefix_default_and_blocked() -> None:
    t = table(
        default=[RouteEntry("world")],
        countries={"DK": [RouteEntry("eu")]},
        prefixes={"4520": [RouteEntry("dk-mobile")], "452": [RouteEntry("dk-2")]},
        blocked=["KP", "+4599"],
    )
    rng = random.Random(1)
    assert t.resolve("4512345678", "DK", rng).carriers == ["eu"]
    assert t.resolve("4520123456", "DK", rng).carriers == ["dk-mobile"]  # longest prefix wins
    assert t.resolve("4521123456", "DK", rng).carriers == ["dk-2"]
    assert t.resolve("14155552671", "US", rng).rule == "default"
    with pytest.raises(NoRoute):
        t.resolve("850212345678", "KP", rng)
    with pytest.raises(NoRoute):
        t.resolve("4599123456", "DK", rng)
    with pytest.raises(NoRoute):
        table().resolve("4512345678", "DK", rng)


def test_priority_then_weight_distribution_over_10k() -> None:
    t = table(
        countries={"DK": [RouteEntry("a", 1, 3), RouteEntry("b", 1, 1), RouteEntry("backup", 2, 1)]}
    )
    rng = random.Random(42)
    firsts = Counter(t.resolve("4512345678", "DK", rng).carriers[0] for _ in range(10_000))
    assert firsts["backup"] == 0  # lower priority never first
    assert abs(firsts["a"] / 10_000 - 0.75) < 0.02
    assert abs(firsts["b"] / 10_000 - 0.25) < 0.02
    assert t.resolve("4512345678", "DK", rng).carriers[-1] == "backup"


def test_route_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"routes.countries.DK\[0\].carrier"):
        parse_config({"carriers": [{"name": "a"}], "routes": {"countries": {"DK": ["nope"]}}}, {})
    with pytest.raises(ConfigError, match="routes.countries.DNK"):
        parse_config({"carriers": [{"name": "a"}], "routes": {"countries": {"DNK": ["a"]}}}, {})
    with pytest.raises(ConfigError, match=r"carriers\[0\].tps"):
        parse_config({"carriers": [{"name": "a", "tps": 0}]}, {})


async def _wait(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_failover_moves_queue_and_traffic_returns_on_recovery(stack_factory: Any) -> None:
    sims = {"primary": SimConfig(port=0, latency=0.05), "backup": SimConfig(port=0)}
    routes = RoutesConfig(countries={"DK": [RouteEntry("primary", 1), RouteEntry("backup", 2)]})
    stack = await stack_factory(sims=sims, routes=routes, failover_after=0.5)
    engine = stack.router.engine
    primary_port = stack.sims["primary"].port
    primary = engine.carriers["primary"]
    primary.bucket.set_rate(20.0)  # slow primary: a backlog builds up in its queue
    esme, _ = await connect(stack.smpp_port)
    try:
        acks = await asyncio.gather(*(esme.submit("+4512345678", f"m{i}") for i in range(60)))
        assert all(a.status == 0 for a in acks)
        assert primary.backlog > 20
        await stack.sims["primary"].stop()  # the carrier dies with messages queued
        await _wait(lambda: not primary.up)
        # After failover_after, the queue moves to the backup carrier.
        await _wait(lambda: primary.backlog == 0, timeout=5)
        got = lambda: {m.payload.decode() for s in stack.sims.values() for m in s.received}  # noqa: E731
        await _wait(lambda: got() >= {f"m{i}" for i in range(60)}, timeout=10)
        assert stack.sims["backup"].received_count() > 0
        ready = stack.router.ready()[1]["carriers"]
        assert ready["primary"]["up"] is False and ready["backup"]["up"] is True
        # New traffic goes to the backup while the primary is down ...
        r = await esme.submit("+4512345678", "during-outage")
        assert r.status == 0
        await _wait(
            lambda: "during-outage" in {m.payload.decode() for m in stack.sims["backup"].received}
        )
        # ... and returns to the primary once it is back on the same port.
        revived = CarrierSimulator(SimConfig(port=primary_port, name="primary"))
        await revived.start()
        stack.sims["primary-revived"] = revived
        await _wait(lambda: primary.up, timeout=10)
        primary.bucket.set_rate(1000.0)
        r = await esme.submit("+4512345678", "after-recovery")
        assert r.status == 0
        await _wait(lambda: revived.received_count() == 1)
    finally:
        esme.close()


async def test_all_carriers_full_answers_rmsgqful(stack_factory: Any) -> None:
    sims = {"only": SimConfig(port=0, latency=5.0)}
    routes = RoutesConfig(default=[RouteEntry("only")])
    stack = await stack_factory(sims=sims, routes=routes)
    carrier = stack.router.engine.carriers["only"]
    carrier.cfg.queue_size = 10
    carrier.bucket.set_rate(1.0)
    esme, _ = await connect(stack.smpp_port)
    try:
        acks = await asyncio.gather(*(esme.submit("+14155552671", f"x{i}") for i in range(30)))
        statuses = Counter(a.status for a in acks)
        assert statuses[0] >= 10
        assert statuses[0x14] > 0  # ESME_RMSGQFUL, answered at once
        assert set(statuses) <= {0, 0x14}
    finally:
        esme.close()


async def test_throttled_carrier_gets_everything_without_head_of_line_blocking(
    stack_factory: Any,
) -> None:
    from router.observe import metrics

    sims = {"flaky": SimConfig(port=0, throttle_ratio=0.2, seed=7)}
    stack = await stack_factory(sims=sims, routes=RoutesConfig(default=[RouteEntry("flaky")]))
    carrier = stack.router.engine.carriers["flaky"]
    before = metrics.CARRIER_THROTTLED.labels(carrier="flaky")._value.get()
    esme, _ = await connect(stack.smpp_port)
    try:
        n = 300
        acks = await asyncio.gather(*(esme.submit("+14155552671", f"t{i:03d}") for i in range(n)))
        assert all(a.status == 0 for a in acks)
        sim = stack.sims["flaky"]
        await _wait(
            lambda: {m.payload.decode() for m in sim.received} == {f"t{i:03d}" for i in range(n)},
            timeout=30,
        )
        throttled = metrics.CARRIER_THROTTLED.labels(carrier="flaky")._value.get() - before
        assert throttled > 20  # about 20% of the first attempts
        order = [int(m.payload.decode()[1:]) for m in sim.received]
        # Throttled messages were retried later while the ones behind them
        # went on: the carrier saw them out of submission order.
        assert order != sorted(order)
        assert carrier.bucket.rate <= carrier.bucket.max_rate
        await _wait(lambda: len(esme.receipts) == n, timeout=30)
    finally:
        esme.close()


async def test_account_rate_limit_answers_throttled(stack_factory: Any, db: Any) -> None:
    stack = await stack_factory()
    # The limit is set after start: a reload (SIGHUP in production) applies it.
    await db.execute("UPDATE accounts SET tps = 5 WHERE name = 'acme'")
    await stack.router.reload()
    esme, _ = await connect(stack.smpp_port)
    try:
        acks = await asyncio.gather(*(esme.submit("+14155552671", f"r{i}") for i in range(20)))
        statuses = Counter(a.status for a in acks)
        assert 0 < statuses[0] < 20
        assert statuses[0x58] == 20 - statuses[0]  # ESME_RTHROTTLED for the excess
    finally:
        esme.close()


def test_account_overrides_come_first_and_fall_back_to_global() -> None:
    cfg = parse_config(
        {
            "carriers": [{"name": "a"}, {"name": "b"}, {"name": "c"}],
            "routes": {
                "default": ["a"],
                "countries": {"DK": ["a"]},
                "accounts": {
                    "bank": {"countries": {"DK": ["b"]}, "blocked": ["+4599"]},
                    "shop": {"default": ["c"]},
                },
            },
        },
        {},
    )
    t = RouteTable.from_config(cfg.routes)
    rng = random.Random(0)
    assert t.resolve("4512345678", "DK", rng, "bank").carriers == ["b"]
    assert t.resolve("4512345678", "DK", rng, "bank").rule == "account bank: country DK"
    assert t.resolve("14155552671", "US", rng, "bank").carriers == ["a"]  # global default
    assert t.resolve("4512345678", "DK", rng, "shop").carriers == ["c"]  # its own default
    assert t.resolve("4512345678", "DK", rng, "other").carriers == ["a"]
    with pytest.raises(NoRoute):
        t.resolve("4599123456", "DK", rng, "bank")
    assert t.resolve("4599123456", "DK", rng, "shop").carriers == ["c"]
    with pytest.raises(ConfigError, match=r"routes.accounts.bank.countries.DK\[0\].carrier"):
        parse_config(
            {
                "carriers": [{"name": "a"}],
                "routes": {"accounts": {"bank": {"countries": {"DK": ["zz"]}}}},
            },
            {},
        )


async def test_carrier_failing_most_submits_is_benched_and_traffic_moves(
    stack_factory: Any,
) -> None:
    sims = {"broken": SimConfig(port=0, reject_ratio=1.0), "backup": SimConfig(port=0)}
    routes = RoutesConfig(countries={"DK": [RouteEntry("broken", 1), RouteEntry("backup", 2)]})
    stack = await stack_factory(sims=sims, routes=routes)
    broken = stack.router.engine.carriers["broken"]
    esme, _ = await connect(stack.smpp_port)
    try:
        for i in range(60):
            r = await esme.submit("+4512345678", f"h{i}")
            assert r.status == 0
            await _wait(lambda: broken.in_flight == 0 and not broken.backlog, timeout=5)
        # It stays bound (its SMPP link is fine) but is out of rotation.
        assert broken.up and not broken.healthy
        assert stack.router.ready()[1]["carriers"]["broken"]["healthy"] is False
        rejected = stack.sims["broken"].stats.rejected
        assert 20 <= rejected <= 30  # benched once half of >= 20 recent submits failed
        backup = stack.sims["backup"]
        await _wait(lambda: backup.received_count() == 60 - rejected, timeout=5)
    finally:
        esme.close()
