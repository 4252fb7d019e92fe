"""Traffic-log writer throughput: rows per second into PostgreSQL.

``python -m benchmarks.trafficlog [--rows N]`` creates a fresh database on
the benchmark server (ROUTER_BENCH_DATABASE_URL, ROUTER_TEST_DATABASE_URL,
else 127.0.0.1:5432), migrates it, feeds the real ``TrafficLog`` writer N
accepted messages plus two status events each (what a delivered message
costs), and measures from the first record to the moment the buffer is
empty and every row is committed. Prints a table, writes
``benchmarks/results/trafficlog.json``, drops the database.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

from benchmarks.codec import machine_info
from router.model import Message, MessageClass, Origin
from router.store.db import migrate
from router.store.embedded import url_with_database
from router.store.trafficlog import TrafficLog

OUT = Path(__file__).resolve().parent / "results" / "trafficlog.json"


def _server_url() -> str:
    return (
        os.environ.get("ROUTER_BENCH_DATABASE_URL")
        or os.environ.get("ROUTER_TEST_DATABASE_URL")
        or "postgresql://postgres@127.0.0.1:5432/postgres"
    )


def _message(i: int, now: float) -> Message:
    return Message(
        id=f"{i:020x}",
        account_id=1,
        account="bench",
        origin=Origin.SMPP,
        msg_class=MessageClass.STANDARD,
        source="Bench",
        source_ton=5,
        source_npi=0,
        destination=f"45{20000000 + i % 10_000_000}",
        country="DK",
        data_coding=0,
        esm_class=0,
        segments=(b"x" * 60,),
        text="benchmark text " * 4,
        registered_delivery=1,
        accepted_at=now,
        expires_at=now + 3600,
    )


async def run(rows: int, flush_rows: int) -> dict[str, Any]:
    base = _server_url()
    name = f"smsr_tlog_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(base)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = url_with_database(base, name)
    try:
        conn = await asyncpg.connect(url)
        await migrate(conn)
        await conn.close()
        pool = await asyncpg.create_pool(url, min_size=2, max_size=4)
        assert pool is not None
        tlog = TrafficLog(pool, limit=rows * 3 + 1, flush_rows=flush_rows, flush_interval=0.05)
        tlog.start()
        now = time.time()
        messages = [_message(i, now) for i in range(rows)]
        started = time.perf_counter()
        for msg in messages:
            tlog.record_message(msg, "sim")
            tlog.record_event(msg, "submitted", "sim", None, now)
            tlog.record_event(msg, "delivered", "sim", None, now)
            if tlog.depth > flush_rows * 4:
                await asyncio.sleep(0)  # let the writer run, as the event loop would
        while tlog.depth:
            await asyncio.sleep(0.005)
        await tlog.close()
        elapsed = time.perf_counter() - started
        written = await pool.fetchval("SELECT count(*) FROM traffic_log") + await pool.fetchval(
            "SELECT count(*) FROM delivery_events"
        )
        await pool.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    total = rows * 3
    return {
        "scenario": "trafficlog",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "messages": rows,
        "rows": total,
        "rows_written": int(written),
        "dropped": tlog.dropped,
        "flush_rows": flush_rows,
        "seconds": round(elapsed, 3),
        "rows_per_s": round(total / elapsed),
        "messages_per_s": round(rows / elapsed),
        "machine": machine_info(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.trafficlog")
    ap.add_argument("--rows", type=int, default=100_000, help="messages (x3 rows)")
    ap.add_argument("--flush-rows", type=int, default=5_000)
    ap.add_argument("--output", type=Path, default=OUT)
    args = ap.parse_args(argv)
    result = asyncio.run(run(args.rows, args.flush_rows))
    print(f"{'rows':>10} {'seconds':>8} {'rows/s':>10} {'messages/s':>11} {'lost':>5}")
    print(
        f"{result['rows']:>10,} {result['seconds']:>8} {result['rows_per_s']:>10,} "
        f"{result['messages_per_s']:>11,} {result['rows'] - result['rows_written']:>5}"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {args.output}")
    return 0 if result["rows_written"] == result["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
