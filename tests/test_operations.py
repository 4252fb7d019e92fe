"""Operations on a real router process: SIGHUP reload keeps binds up and
changes routing; SIGTERM under load drains, exits 0 and loses nothing;
/metrics moves with real traffic and never carries a number or text."""

from __future__ import annotations

import asyncio
import gc
import re
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from prometheus_client import REGISTRY

from router.accounts import create_account
from router.config import RouteEntry, RoutesConfig
from router.observe import metrics
from router.sim import CarrierSimulator, SimConfig
from router.smpp.constants import Status
from tests.esme import connect
from tests.routerproc import (
    carrier_toml,
    free_ports,
    listen_toml,
    parse_metrics,
    start_router,
    stop_router,
)


async def wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_sighup_reload_changes_routing_while_the_bind_stays_up(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    await create_account(db, "acme", system_id="acme", password="acme-pw1")
    a = CarrierSimulator(SimConfig(port=0, name="a"))
    b = CarrierSimulator(SimConfig(port=0, name="b"))
    pa, pb = await a.start(), await b.start()
    ports = free_ports()
    cfg = tmp_path / "router.toml"
    base = listen_toml(ports) + carrier_toml("a", pa) + carrier_toml("b", pb)
    cfg.write_text(base + '[routes]\ndefault = ["a"]\n')
    proc = await start_router(cfg, database_url, ports["ops"], tmp_path / "log")
    esme = None
    try:
        esme, _ = await connect(ports["smpp"])
        assert (await esme.submit("+14155552671", "before")).status == 0
        await wait_for(lambda: a.received_count() == 1)
        # New routes, and a bad edit first: the bad one is refused whole.
        cfg.write_text(base + '[routes]\ndefault = ["nonexistent"]\n')
        proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        assert (await esme.submit("+14155552671", "still-a")).status == 0
        await wait_for(lambda: a.received_count() == 2)
        cfg.write_text(base + '[routes]\ndefault = ["b"]\n')
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        sent = 0
        while b.received_count() == 0 and time.monotonic() < deadline:
            r = await esme.submit("+14155552671", f"after-{sent}")
            assert r.status == 0
            sent += 1
            await asyncio.sleep(0.2)
        assert b.received_count() >= 1
        assert esme.is_open  # the same customer bind carried traffic through both reloads
        assert "reload_refused" in (tmp_path / "log").read_text()
    finally:
        if esme is not None:
            esme.close()
        assert stop_router(proc) == 0
        await a.stop()
        await b.stop()


async def test_sigterm_under_load_drains_exits_0_and_loses_nothing(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    await create_account(db, "acme", system_id="acme", password="acme-pw1")
    sim = CarrierSimulator(SimConfig(port=0, name="sim", latency=0.01))
    sp = await sim.start()
    ports = free_ports()
    cfg = tmp_path / "router.toml"
    cfg.write_text(
        listen_toml(ports) + carrier_toml("sim", sp, tps=300.0) + '[routes]\ndefault = ["sim"]\n'
    )
    log = tmp_path / "log"
    proc = await start_router(cfg, database_url, ports["ops"], log)
    acked: dict[str, str] = {}
    try:
        esme, _ = await connect(ports["smpp"])

        async def one(i: int) -> None:
            try:
                r = await esme.submit("+4512345678", f"drain-{i:04d}")
            except (ConnectionError, TimeoutError):
                return
            if r.status == Status.ESME_ROK:
                acked[f"drain-{i:04d}"] = r.message_id  # type: ignore[attr-defined]

        tasks = [asyncio.create_task(one(i)) for i in range(800)]
        await wait_for(lambda: len(acked) >= 300, timeout=30)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
        drain_seconds = time.monotonic() - started
        await asyncio.gather(*tasks, return_exceptions=True)
        assert code == 0
        assert drain_seconds < 15, f"drain took {drain_seconds:.1f}s"
        # What the carrier has not taken yet waits in the spool for the next start.
        proc = await start_router(cfg, database_url, ports["ops"], log)
        await wait_for(lambda: set(acked) <= {m.payload.decode() for m in sim.received}, 60)
        seen = Counter(m.payload.decode() for m in sim.received)
        dups = sum(n - 1 for t, n in seen.items() if t in acked and n > 1)
        print(
            f"\nacknowledged={len(acked)} duplicates_after_graceful_drain={dups} "
            f"drain_seconds={drain_seconds:.2f}"
        )
        assert dups == 0, "a graceful drain records every carrier's answer (README)"
    finally:
        stop_router(proc)
        await sim.stop()


async def test_metrics_move_with_traffic_and_carry_no_personal_data(stack_factory: Any) -> None:
    sims = {"good": SimConfig(port=0, dlr_delay=0.05), "bad": SimConfig(port=0, reject_ratio=1.0)}
    routes = RoutesConfig(default=[RouteEntry("good")], countries={"DK": [RouteEntry("bad")]})
    stack = await stack_factory(sims=sims, routes=routes)
    async with aiohttp.ClientSession() as http:

        async def scrape() -> dict[str, float]:
            async with http.get(stack.ops_url + "/metrics") as r:
                assert r.status == 200
                return parse_metrics(await r.text())

        before = await scrape()
        esme, _ = await connect(stack.smpp_port)
        try:
            ok = [await esme.submit("+14155552671", "secret-text-xyz") for _ in range(3)]
            failed = await esme.submit("+4512345678", "secret-text-xyz")
            bad = await esme.submit("12ab", "secret-text-xyz")
            assert all(r.status == 0 for r in ok) and failed.status == 0
            assert bad.status == Status.ESME_RINVDSTADR
            await wait_for(lambda: len(esme.receipts) == 4)
        finally:
            esme.close()
        async with http.get(stack.ops_url + "/metrics") as r:
            body = await r.text()
        after = parse_metrics(body)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert (
        delta('smsrouter_messages_accepted_total{account="acme",country="US",ingress="smpp"}') == 3
    )
    assert (
        delta('smsrouter_messages_accepted_total{account="acme",country="DK",ingress="smpp"}') == 1
    )
    assert (
        delta(
            'smsrouter_messages_rejected_total{account="acme",ingress="smpp",reason="invalid_to"}'
        )
        == 1
    )
    assert delta('smsrouter_messages_final_total{carrier="good",status="delivered"}') == 3
    assert delta('smsrouter_messages_final_total{carrier="bad",status="failed"}') == 1
    assert (
        delta('smsrouter_carrier_submit_errors_total{carrier="bad",status="ESME_RSUBMITFAIL"}') == 1
    )
    assert after['smsrouter_carrier_up{carrier="good"}'] == 1
    assert after['smsrouter_carrier_queue_capacity{carrier="good"}'] == 10_000
    good = stack.router.engine.carriers["good"]
    assert after['smsrouter_carrier_rate_limit{carrier="good"}'] == good.cfg.tps  # one process
    assert (
        delta("smsrouter_accept_to_submit_seconds_count") == 3
    )  # the rejected one never got there
    # No label value anywhere looks like a phone number or carries the text.
    labels = re.findall(r'="([^"]*)"', body)
    assert not [v for v in labels if re.search(r"\d{6,}", v)]
    assert "secret-text" not in body and "14155552671" not in body and "Acme" not in body


async def test_reload_applies_smpp_settings_to_new_binds(
    stack_factory: Any, tmp_path: Path
) -> None:
    """[smpp] settings from a reloaded file apply to binds made afterwards
    (here a window of 1); the bind already up keeps its own."""
    stack = await stack_factory()
    old, _ = await connect(stack.smpp_port)
    cfg = tmp_path / "router.toml"
    carriers = "".join(carrier_toml(name, sim.port) for name, sim in stack.sims.items())
    cfg.write_text(
        carriers
        + '[routes]\ndefault = ["sim-world"]\n'
        + "[smpp]\nwindow = 1\nreassembly_timeout = 5.0\n"
    )
    try:
        assert await stack.router.reload(str(cfg))
        assert stack.router.smpp.concat.timeout == 5.0
        new, _ = await connect(stack.smpp_port)
        try:
            burst = await asyncio.gather(*(new.submit("+14155552671", "w") for _ in range(4)))
            statuses = Counter(r.status for r in burst)
            assert statuses[Status.ESME_RTHROTTLED] >= 1, statuses
            burst = await asyncio.gather(*(old.submit("+14155552671", "w") for _ in range(4)))
            assert [r.status for r in burst] == [Status.ESME_ROK] * 4
        finally:
            new.close()
    finally:
        old.close()


def test_gc_pauses_are_timed_once_per_collection() -> None:
    def full_collections() -> float:
        labels = {"generation": "2"}
        return REGISTRY.get_sample_value("smsrouter_gc_pause_seconds_count", labels) or 0.0

    metrics.watch_gc()
    metrics.watch_gc()  # a second call must not time each collection twice
    before = full_collections()
    gc.collect()
    gc.collect()
    assert full_collections() == before + 2
