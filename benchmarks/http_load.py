"""HTTP load generator: POST /v1/messages with aiohttp, one process, uvloop.

    python -m benchmarks.http_load --url http://127.0.0.1:P [--batch N] [--concurrency C]
        [--rate R] [--warmup S] [--duration S] [--ops-url URL] --output result.json

``--batch 1`` posts one message per request (``{"to", "from", "text"}``); ``--batch N``
posts ``{"messages": [...]}`` with N messages. Closed loop (no ``--rate``): C workers each
keep one request in flight. Open loop (``--rate R`` messages/s): requests are due at R/N per
second, at most C in flight; a due request that finds no free slot waits (bounded) and its
latency counts from when it was due.

Counted in the measured window: answers by HTTP status (202 accepted, 429 throttled,
anything else), messages accepted (the ``accepted`` field of a batch answer), request
latency of requests started in the window. The router has no receipt channel over HTTP
yet, so delivered/s comes from the router's own counter
``smsrouter_messages_final_total{status="delivered"}`` (``--ops-url``), read at the start
and end of the window.

Before the load starts, one request is sent alone (``first_request`` in the result): the
router verifies an API key with argon2 once and caches it, and N concurrent first requests
would all miss the cache and verify at once. The load then measures the steady state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from array import array
from collections import Counter, deque
from pathlib import Path
from typing import Any

import aiohttp

from .stats import Series, Window, counter_delta, scrape_counters, summarize

TEXT = "Bench: your verification code is 424242. It expires in 10 minutes."
TICK = 0.001
RECEIPTS_SOURCE = "router counter smsrouter_messages_final_total{status=delivered}"
clock = time.monotonic


class HttpGenerator:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        item = {"to": args.to, "from": args.source, "text": TEXT}
        doc: Any = item if args.batch == 1 else {"messages": [item] * args.batch}
        self.body = json.dumps(doc).encode()
        self.headers = {"Authorization": f"Bearer {args.key}", "Content-Type": "application/json"}
        self.endpoint = f"{args.url}/v1/messages"
        self.t0 = clock()
        self.series = Series(self.t0)
        self.win = Window()
        self.statuses: Counter[str] = Counter()
        self.win_statuses: Counter[str] = Counter()
        self.latency = array("d")
        self.submitting = False
        self.in_flight = 0
        self.failures: Counter[str] = Counter()

    async def one(self, session: aiohttp.ClientSession, due: float) -> None:
        self.in_flight += 1
        self.win.count("sent", due, self.args.batch)
        accepted = 0
        try:
            async with session.post(self.endpoint, data=self.body, headers=self.headers) as resp:
                raw = await resp.read()
                status = str(resp.status)
                if resp.status == 202:
                    accepted = 1 if self.args.batch == 1 else int(json.loads(raw)["accepted"])
        except (aiohttp.ClientError, OSError, ValueError, KeyError) as exc:
            status = f"client:{type(exc).__name__}"
            self.failures[status] += 1
        finally:
            self.in_flight -= 1
        now = clock()
        self.statuses[status] += 1
        self.series.add("requests", now)
        if accepted:
            self.series.add("accepted", now, accepted)
        if status != "202":
            self.series.add("errors", now)
        if self.win.inside(now):
            self.win_statuses[status] += 1
            self.win.count("accepted", now, accepted)
        if self.win.inside(due):
            self.latency.append(now - due)

    async def worker(self, session: aiohttp.ClientSession) -> None:
        while self.submitting:
            await self.one(session, clock())

    async def open_loop(self, session: aiohttp.ClientSession) -> None:
        rate = self.args.rate / self.args.batch  # requests per second
        start = clock()
        scheduled = 0
        backlog: deque[float] = deque()
        tasks: set[asyncio.Task[None]] = set()
        while self.submitting:
            now = clock()
            due_total = int((now - start) * rate)
            for k in range(scheduled, due_total):
                due = start + (k + 1) / rate
                backlog.append(due)
                self.win.count("due", due, self.args.batch)
            scheduled = due_total
            while len(backlog) > rate * 2 + 100:
                backlog.popleft()
                self.failures["backlog_dropped"] += 1
            while backlog and self.in_flight < self.args.concurrency:
                t = asyncio.create_task(self.one(session, backlog.popleft()))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            await asyncio.sleep(TICK)
        if tasks:
            await asyncio.wait(tasks, timeout=self.args.drain)

    async def run(self) -> dict[str, Any]:
        a = self.args
        connector = aiohttp.TCPConnector(limit=a.concurrency, force_close=False)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            probe = aiohttp.ClientSession()
            try:
                # One request first, alone: the router verifies the API key (argon2) once
                # and remembers it; concurrent first requests would each pay for it.
                t = clock()
                async with session.post(self.endpoint, data=self.body,
                                        headers=self.headers) as resp:
                    await resp.read()
                    first = {"status": resp.status, "ms": round((clock() - t) * 1000, 3)}
                self.t0 = self.series.t0 = clock()
                self.submitting = True
                if a.warmup <= 0:
                    self.win.open(clock(), a.duration)
                    before = await scrape_counters(probe, a.ops_url)
                if a.rate is None:
                    runners = [asyncio.create_task(self.worker(session))
                               for _ in range(a.concurrency)]
                else:
                    runners = [asyncio.create_task(self.open_loop(session))]
                if a.warmup > 0:
                    await asyncio.sleep(a.warmup)
                    before = await scrape_counters(probe, a.ops_url)
                    self.win.open(clock(), a.duration)
                cpu0 = time.process_time()
                await asyncio.sleep(max(0.0, self.win.end - clock()))
                cpu1 = time.process_time()
                after = await scrape_counters(probe, a.ops_url)
                self.submitting = False
                await asyncio.wait(runners, timeout=a.drain + 30)
            finally:
                await probe.close()
        duration = self.win.end - self.win.start
        router = counter_delta(before, after)
        accepted = self.win.counts.get("accepted", 0)
        delivered = router.get("final:delivered") if router else None
        return {
            "tool": "http_load",
            "pid": os.getpid(),
            "config": {
                "batch": a.batch,
                "concurrency": a.concurrency,
                "mode": "closed-loop" if a.rate is None else "open-loop",
                "offered_rate": a.rate,
                "warmup_s": a.warmup,
                "duration_s": a.duration,
                "destination": a.to,
            },
            "t0": self.t0,
            "measure_start": self.win.start,
            "measure_end": self.win.end,
            "window": {
                "duration_s": duration,
                "submitted": self.win.counts.get("sent", 0),
                "requests": sum(self.win_statuses.values()),
                "requests_per_s": sum(self.win_statuses.values()) / duration,
                "answers": dict(self.win_statuses),
                "errors": {k: v for k, v in self.win_statuses.items() if k != "202"},
                "accepted": accepted,
                "accepted_per_s": accepted / duration,
                # open loop: what was due in the window; closed loop: what was sent
                "offered_per_s": self.win.counts.get("due" if a.rate else "sent", 0) / duration,
                "receipts": delivered,
                "receipts_per_s": None if delivered is None else delivered / duration,
                "receipts_source": RECEIPTS_SOURCE,
                "router_counters": router,
                "loadgen_cpu_s": cpu1 - cpu0,
            },
            "latency": {
                "request": summarize(self.latency),
                "messages_per_request": a.batch,
            },
            "first_request": first,
            "totals": {"answers": dict(self.statuses), "client_failures": dict(self.failures)},
            "series": self.series.as_dict(),
            "problems": [],
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.http_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="http://127.0.0.1:PORT of the HTTP API")
    p.add_argument("--ops-url", default=None, help="http://127.0.0.1:PORT of /metrics")
    p.add_argument("--key", default="demo-key")
    p.add_argument("--batch", type=int, default=1, help="messages per request (1 = single)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at most")
    p.add_argument("--rate", type=float, default=None, help="open loop: messages/s offered")
    p.add_argument("--warmup", type=float, default=0.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--drain", type=float, default=10.0)
    p.add_argument("--to", default="+4512345678")
    p.add_argument("--source", default="Bench")
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args(argv)
    if args.batch < 1 or args.concurrency < 1 or args.duration <= 0:
        p.error("--batch, --concurrency and --duration must be positive")
    for url in (args.url, args.ops_url):
        if url and not url.startswith(("http://127.0.0.1:", "http://[::1]:", "http://localhost:")):
            p.error("loopback only")
    return args


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    return await HttpGenerator(args).run()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop

        result = uvloop.run(_main(args))
    except ImportError:  # pragma: no cover
        result = asyncio.run(_main(args))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    w = result["window"]
    print(f"http_load: {w['requests_per_s']:.0f} requests/s, accepted {w['accepted_per_s']:.0f}"
          f" messages/s, answers {w['answers']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
