"""Overload (issue #5): offer 5x what the carriers accept for 60 s; the
router's RSS stays under its configured bound (``[delivery] max_memory_mb``),
submitters get throttled answers, and nothing accepted is lost.

The router is a real subprocess (its RSS is its own, read from /proc); the two
carrier simulators run in the test's event loop so that the test can see
every message they received. The load is benchmarks/smpp_load.py's open-loop
generator (the one the ``overload`` benchmark scenario uses), with a unique
text per submit so that each accepted message can be found at a carrier.

The second test is the memory brake alone: with ``max_memory_mb = 1`` the
first health tick engages it, and both front doors refuse new messages.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from benchmarks.smpp_load import Generator, LoadBind, bind_callback, parse_args
from router.accounts import create_account
from router.ingress.openapi import PROBLEM_BASE
from router.observe import metrics as router_metrics
from router.sim import CarrierSimulator, SimConfig
from router.smpp.constants import Status
from router.smpp.pdu import Pdu, SubmitSm
from tests.esme import connect
from tests.routerproc import (
    carrier_toml,
    free_ports,
    listen_toml,
    parse_metrics,
    start_router,
    stop_router,
)

CARRIER_TPS = 100.0  # per carrier (router tps and simulator max_tps)
CARRIERS = ("sim-1", "sim-2")
CAPACITY = CARRIER_TPS * len(CARRIERS)  # messages/s the carriers take: 200
OFFERED = 5 * CAPACITY  # 1,000/s
QUEUE = 500  # router queue per carrier, segments
DURATION = 60.0  # seconds of offered load
BINDS = 4
MAX_MEMORY_MB = 350  # router: ~60 MB idle, ~70 MB under this load, VmHWM ~125 MB (start-up)
MAX_GROWTH_MB = 100  # RSS growth allowed from idle to the peak of the run
SETTLE = 30.0  # after the load: bounded wait for the last receipts
THROTTLE = ("ESME_RMSGQFUL", "ESME_RTHROTTLED")


def proc_status_kb(pid: int, field: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM), None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def metric_sum(m: dict[str, float], name: str, **labels: str) -> float:
    """Sum of a metric over the series whose labels include ``labels``."""
    total = 0.0
    for key, value in m.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


async def get_metrics(http: aiohttp.ClientSession, ops_url: str) -> dict[str, float]:
    async with http.get(f"{ops_url}/metrics") as r:
        assert r.status == 200
        return parse_metrics(await r.text())


class UniqueTextLoad(Generator):
    """smpp_load's generator, but every submit carries its own text, so that an
    accepted message id can be matched with what a carrier simulator received."""

    def __init__(self, args: Any) -> None:
        super().__init__(args)
        self.seq = 0
        self.accepted_ids: dict[bytes, str] = {}  # text -> our message id (ESME_ROK)

    def _submit(self, bind: LoadBind, due: float) -> None:
        self.seq += 1
        pdu = SubmitSm(
            source_addr_ton=5,
            source_addr_npi=0,
            source_addr=self.args.source,
            dest_addr_ton=1,
            dest_addr_npi=1,
            destination_addr=self.args.to,
            registered_delivery=1,
            short_message=f"overload {self.seq:07d}".encode(),
        )
        bind.send_request(pdu, bind_callback(self, bind))
        bind.sent_at[pdu.sequence] = due
        self.series.add("sent", due)
        self.win.count("sent", due)

    def on_resp(self, bind: LoadBind, resp: Pdu | None, request: Pdu) -> None:
        if resp is not None and resp.status == Status.ESME_ROK:
            self.accepted_ids[request.short_message] = resp.message_id  # type: ignore[attr-defined]
        super().on_resp(bind, resp, request)


async def sample_rss(pid: int, samples: list[tuple[float, int]], stop: asyncio.Event) -> None:
    """VmRSS (kB) of ``pid`` every 0.5 s until ``stop``."""
    t0 = time.monotonic()
    while not stop.is_set():
        kb = proc_status_kb(pid, "VmRSS")
        if kb is not None:
            samples.append((time.monotonic() - t0, kb))
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass


@pytest.mark.timeout(180)
async def test_overload_5x_capacity_bounded_memory_throttled_nothing_lost(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    t_start = time.monotonic()
    await create_account(db, "acme", system_id="acme", password="acme-pw1")
    sims = {
        name: CarrierSimulator(SimConfig(port=0, name=name, dlr_delay=0.1, max_tps=CARRIER_TPS))
        for name in CARRIERS
    }
    ports = free_ports()
    carriers = ""
    for name, sim in sims.items():
        port = await sim.start()
        carriers += carrier_toml(name, port, tps=CARRIER_TPS, queue_size=QUEUE, window=64)
    cfg = tmp_path / "router.toml"
    cfg.write_text(
        listen_toml(ports)
        + f'[delivery]\nguarantee = "at-least-once"\nmax_memory_mb = {MAX_MEMORY_MB}\n'
        + carriers
        + "[routes]\ndefault = ["
        + ", ".join(f'{{carrier = "{n}", priority = 1}}' for n in CARRIERS)
        + "]\n"
    )
    log = tmp_path / "router.log"
    ops_url = f"http://127.0.0.1:{ports['ops']}"
    proc = await start_router(cfg, database_url, ports["ops"], log)
    samples: list[tuple[float, int]] = []
    stop = asyncio.Event()
    sampler: asyncio.Task[None] | None = None
    try:
        async with aiohttp.ClientSession() as http:
            # Both carriers bound before the load starts.
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                m = await get_metrics(http, ops_url)
                if all(m.get(f'smsrouter_carrier_up{{carrier="{n}"}}') == 1 for n in CARRIERS):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("carriers did not bind")
            await asyncio.sleep(1.0)
            idle_kb = proc_status_kb(proc.pid, "VmRSS") or 0

            gen = UniqueTextLoad(
                parse_args(
                    [
                        "--port", str(ports["smpp"]),
                        "--system-id", "acme",
                        "--password", "acme-pw1",
                        "--binds", str(BINDS),
                        "--window", "64",
                        "--rate", str(OFFERED),
                        "--duration", str(DURATION),
                        "--drain", "10",
                        "--settle", str(SETTLE),
                        "--ops-url", ops_url,
                        "--output", str(tmp_path / "load.json"),
                    ]
                )
            )  # fmt: skip
            sampler = asyncio.create_task(sample_rss(proc.pid, samples, stop))
            result = await gen.run()
            stop.set()
            await sampler
            hwm_kb = proc_status_kb(proc.pid, "VmHWM") or 0
            end = await get_metrics(http, ops_url)
    finally:
        stop.set()
        if sampler is not None and not sampler.done():
            sampler.cancel()
        code = stop_router(proc)
        for sim in sims.values():
            await sim.stop()
    (tmp_path / "load.json").write_text(json.dumps(result, indent=1))

    w, lc, totals = result["window"], result["lifecycle"], result["totals"]
    answers: dict[str, int] = totals["answers"]
    throttled = {k: answers.get(k, 0) for k in THROTTLE}
    others = {k: v for k, v in answers.items() if k != "ESME_ROK" and k not in THROTTLE}
    accepted_per_s = w["accepted_per_s"]
    # Steady state: per whole second of the last 40 s of the load, after the
    # router queues filled.
    per_s = result["series"].get("accepted", [])[int(DURATION) - 40 : int(DURATION) - 1]
    steady = sum(per_s) / max(1, len(per_s))
    peak_kb = max(kb for _, kb in samples)
    received: Counter[bytes] = Counter(m.payload for s in sims.values() for m in s.received)
    not_at_carrier = [t for t in gen.accepted_ids if t not in received]
    carrier_dups = sum(n - 1 for n in received.values() if n > 1)
    brake_events = log.read_text(errors="replace").count('"memory_brake"')
    report = (
        f"offered {w['offered_per_s']:.0f}/s (sent {w['submitted']} in {w['duration_s']:.0f} s,"
        f" backlog dropped {w['backlog_dropped']}), capacity {CAPACITY:.0f}/s;"
        f" accepted {accepted_per_s:.1f}/s (steady {steady:.1f}/s),"
        f" receipts {w['receipts_per_s']:.1f}/s; throttled {throttled}, other answers {others};"
        f" router RSS idle {idle_kb / 1024:.0f} MB, peak sampled {peak_kb / 1024:.0f} MB,"
        f" VmHWM {hwm_kb / 1024:.0f} MB, bound {MAX_MEMORY_MB} MB, brake log events"
        f" {brake_events}; accepted {lc['accepted']}, receipted {lc['receipted']},"
        f" lost {lc['lost']} (sample {lc['lost_sample'][:5]}), not at a carrier"
        f" {len(not_at_carrier)}, settled after {lc['settled_after_s']} s,"
        f" duplicate receipts {lc['duplicate_receipts']}, duplicates at carriers {carrier_dups},"
        f" receipts for unknown ids {lc['receipts_for_unknown_ids']};"
        f" carrier throttled answers {metric_sum(end, 'smsrouter_carrier_throttled_total'):.0f};"
        f" router exit {code}; test {time.monotonic() - t_start:.0f} s"
    )
    print("\n" + report)

    # The offer really was 5x the capacity for the whole minute.
    assert w["submitted"] >= 0.9 * OFFERED * DURATION, report
    # Memory: under the bound all along (sampled every 0.5 s, and the kernel's
    # own high-water mark, which includes start-up), and the brake never had
    # to engage.
    assert len(samples) >= DURATION, report
    assert peak_kb / 1024 < MAX_MEMORY_MB, report
    assert hwm_kb / 1024 < MAX_MEMORY_MB, report
    # ... and well below it: the excess is refused, not buffered (the router
    # queues are bounded; 13k finished deliveries in its cache are ~15 MB).
    assert (peak_kb - idle_kb) / 1024 < MAX_GROWTH_MB, report
    assert end.get("smsrouter_memory_brake") == 0 and brake_events == 0, report
    # Submitters are throttled, nothing else goes wrong for them.
    assert sum(throttled.values()) > 0.5 * (OFFERED - CAPACITY) * DURATION, report
    assert not others and totals["lost_connections"] == 0, report
    # Acceptance is pinned near the carriers' capacity.
    assert 0.75 * CAPACITY <= accepted_per_s <= 1.35 * CAPACITY, report
    assert 0.75 * CAPACITY <= steady <= 1.15 * CAPACITY, report
    # Nothing accepted is lost: each accepted message reached a carrier and
    # its receipt came back to the submitter.
    assert lc["accepted"] == len(gen.accepted_ids) > 0, report
    assert not not_at_carrier, report
    assert lc["lost"] == 0 and lc["receipted"] == lc["accepted"], report
    assert lc["receipts_for_unknown_ids"] == 0, report
    assert code == 0, report


async def test_memory_brake_refuses_smpp_and_http(stack_factory: Any) -> None:
    """max_memory_mb = 1: the first health tick (1 s after start) engages the
    brake; submit_sm gets ESME_RMSGQFUL, POST /v1/messages 503 + Retry-After."""
    stack = await stack_factory(max_memory_mb=1)
    started = time.monotonic()  # the engine's first health tick is 1 s after its start
    try:
        async with aiohttp.ClientSession() as http:
            m: dict[str, float] = {}
            while time.monotonic() - started < 5:
                m = await get_metrics(http, stack.ops_url)
                if m.get("smsrouter_memory_brake") == 1:
                    break
                await asyncio.sleep(0.05)
            engaged_after = time.monotonic() - started
            assert m.get("smsrouter_memory_brake") == 1, "the brake did not engage in 5 s"
            assert engaged_after < 2.0, f"the brake engaged only after {engaged_after:.1f} s"

            esme, bound = await connect(stack.smpp_port)
            try:
                assert bound.status == Status.ESME_ROK
                r = await esme.submit("+4512345678", "brake")
                assert r.status == Status.ESME_RMSGQFUL, Status(r.status).name
            finally:
                esme.close()

            async with http.post(
                stack.http_url + "/v1/messages",
                json={"to": "+4512345678", "from": "Acme", "text": "brake"},
                headers={"Authorization": "Bearer demo-key"},
            ) as resp:
                body = await resp.json(content_type=None)
                assert resp.status == 503, body
                assert resp.content_type == "application/problem+json"
                assert int(resp.headers["Retry-After"]) >= 1
                assert body["type"] == PROBLEM_BASE + "memory-high", body
                assert body["status"] == 503 and body["title"], body

            m = await get_metrics(http, stack.ops_url)
            assert m["smsrouter_memory_brake"] == 1
            assert metric_sum(m, "smsrouter_messages_rejected_total", reason="memory_high") == 2
        assert all(s.received_count() == 0 for s in stack.sims.values())
        print(f"\nmemory brake seen on /metrics {engaged_after:.2f} s after the router started")
    finally:
        # The gauge is process-wide and the engine does not reset it on stop:
        # do not leave it at 1 for the in-process tests that follow.
        router_metrics.MEMORY_BRAKE.set(0)
