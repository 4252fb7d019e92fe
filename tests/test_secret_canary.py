"""The secret canary (privacy.md 2): secret messages with unique markers,
over SMPP and over HTTP with a webhook, go through the router the hard way
(throttling and retries, a carrier that rejects, receipts, a restart with
messages still in the spool), and then
nothing that outlives delivery may contain a marker or a destination:
every table of the database (every row as text), the PostgreSQL data
directory files (WAL included), the router's log output, /metrics, the
HTTP answers and the webhook bodies.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import asyncpg
from aiohttp import web

from router.accounts import add_api_key, create_account
from router.sim import CarrierSimulator, SimConfig
from tests.esme import connect
from tests.routerproc import carrier_toml, free_ports, listen_toml, start_router, stop_router

SECRET_TLV = {0x1400: b"\x01"}


async def all_table_text(db: asyncpg.Pool) -> str:
    tables = await db.fetch("SELECT schemaname, relname FROM pg_stat_user_tables ORDER BY 1, 2")
    chunks = []
    for t in tables:
        rows = await db.fetch(f'SELECT x::text AS t FROM "{t["schemaname"]}"."{t["relname"]}" x')
        chunks.extend(r["t"] for r in rows)
    return "\n".join(chunks)


def grep_dir(path: Path, needles: list[bytes], since: float) -> list[str]:
    """Files under ``path`` written since ``since`` (epoch seconds) that
    hold a needle. Older files cannot hold this run's data; they hold other
    databases' of the same server (benchmarks write millions of digits),
    where a random number once matched by chance (2026-12-07: an 8-digit
    needle in a WAL segment last written before the test began)."""
    r = subprocess.run(
        ["grep", "-rlaF", *sum((["-e", n.decode()] for n in needles), []), str(path)],
        capture_output=True,
        timeout=120,
    )
    return [f for f in r.stdout.decode().split() if os.stat(f).st_mtime >= since]


async def test_secret_messages_leave_no_trace(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    started = time.time() - 1.0  # file times have 1 s granularity on some filesystems
    acme = await create_account(db, "acme", system_id="acme", password="acme-pw1")
    await add_api_key(db, acme, "acme-key-0001", ("send", "read"))
    # A customer webhook receiver: every body it gets is searched too.
    hooks: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        hooks.append(await request.text())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hook_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    run = secrets.token_hex(4)
    markers = [f"CANARY{run}{i:02d}" for i in range(12)]
    # 8 random digits per number: long enough never to match by chance
    # (timestamps in the table text have 6-digit fractions).
    numbers = [f"45{secrets.randbelow(10**8):08d}" for _ in range(12)]
    http_markers = [f"HTTPCANARY{run}{i:02d}" for i in range(4)]
    http_numbers = [f"45{secrets.randbelow(10**8):08d}" for _ in range(4)]
    # A throttling carrier for most, a rejecting one for DE numbers.
    flaky = CarrierSimulator(
        SimConfig(port=0, name="flaky", throttle_ratio=0.3, seed=3, dlr_delay=0.3)
    )
    rejecting = CarrierSimulator(SimConfig(port=0, name="rejecting", reject_ratio=1.0))
    pf, pr = await flaky.start(), await rejecting.start()
    ports = free_ports()
    cfg = tmp_path / "router.toml"
    cfg.write_text(
        listen_toml(ports)
        + carrier_toml("flaky", pf, tps=20.0)
        + carrier_toml("rejecting", pr)
        + "[webhooks]\ninitial_backoff = 0.2\nallow_private_targets = true\n"
        + '[routes]\ndefault = ["flaky"]\n[routes.countries]\nDE = ["rejecting"]\n'
    )
    log = tmp_path / "router.log"
    os.environ["ROUTER_SPOOL_KEY"] = secrets.token_hex(32)
    proc = await start_router(cfg, database_url, ports["ops"], log)
    try:
        esme, _ = await connect(ports["smpp"])
        acked = []
        for i, (marker, number) in enumerate(zip(markers, numbers, strict=True)):
            dest = f"+4930{number[2:]}" if i % 4 == 0 else f"+{number}"
            r = await esme.submit(
                dest, f"{marker} one-time code", source_addr=f"S{run}", tlvs=dict(SECRET_TLV)
            )
            assert r.status == 0
            acked.append(r.message_id)  # type: ignore[attr-defined]
        # The same over HTTP, with a webhook for the receipt.
        async with aiohttp.ClientSession() as http:
            for marker, number in zip(http_markers, http_numbers, strict=True):
                body = {
                    "to": f"+{number}",
                    "from": f"H{run}",
                    "text": f"{marker} code",
                    "class": "secret",
                    "callback_url": f"http://127.0.0.1:{hook_port}/hook",
                }
                async with http.post(
                    f"http://127.0.0.1:{ports['http']}/v1/messages",
                    json=body,
                    headers={"Authorization": "Bearer acme-key-0001"},
                ) as r:
                    answer = await r.text()
                    assert r.status == 202, answer
                    assert marker not in answer and number not in answer
        # Restart while the slow carrier still has some of them queued.
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        esme.close()
        proc = await start_router(cfg, database_url, ports["ops"], log)
        esme, _ = await connect(ports["smpp"])
        # The rejecting carrier refuses the DE ones (it keeps no record of
        # them); every other one must reach the throttling carrier.
        want = {m for i, m in enumerate(markers) if i % 4} | set(http_markers)
        got = lambda: {m.payload.decode().split()[0] for m in flaky.received}  # noqa: E731
        deadline = time.monotonic() + 60
        while not (want <= got() and rejecting.stats.rejected >= 3) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert want <= got(), "not every secret message reached its carrier"
        assert rejecting.stats.rejected >= 3
        # Receipts (delivered and failed) still flow for secret messages.
        deadline = time.monotonic() + 20
        while len(esme.receipts) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert esme.receipts
        deadline = time.monotonic() + 20
        while len(hooks) < len(http_markers) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert len(hooks) >= len(http_markers), "webhooks for secret messages did not arrive"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{ports['ops']}/metrics") as r:
                metrics_body = await r.text()
        esme.close()
    finally:
        assert stop_router(proc) == 0
        os.environ.pop("ROUTER_SPOOL_KEY", None)
        await flaky.stop()
        await rejecting.stop()
        await runner.cleanup()

    numbers += http_numbers
    markers += http_markers
    needles = markers + numbers + [n[2:] for n in numbers] + [f"S{run}", f"H{run}"]
    assert '"status"' in hooks[0]  # the webhook bodies are real receipts ...
    assert not [n for n in needles if any(n in h for h in hooks)], "secret data in a webhook"
    tables = await all_table_text(db)
    assert acked[0] in tables  # the search does see the rows (id is allowed)
    found = [n for n in needles if n in tables]
    assert not found, f"secret data in the database: {found}"
    logs = log.read_text()
    assert "sms-router is running" in logs
    assert not [n for n in needles if n in logs], "secret data in the application log"
    assert not [n for n in needles if n in metrics_body], "secret data in /metrics"
    await db.execute("CHECKPOINT")
    data_dir = Path(await db.fetchval("SHOW data_directory"))
    assert data_dir.is_dir(), "the test database's data directory is not on this machine"
    hits = grep_dir(
        data_dir, [m.encode() for m in markers] + [n[2:].encode() for n in numbers], started
    )
    assert not hits, f"secret data in PostgreSQL files: {hits}"
