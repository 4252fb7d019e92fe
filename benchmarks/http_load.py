"""HTTP load generator: POST /v1/messages over raw asyncio Protocols, one process, uvloop.

    python -m benchmarks.http_load --url http://127.0.0.1:P [--batch N] [--concurrency C]
        [--rate R] [--warmup S] [--duration S] [--ops-url URL] --output result.json

``--batch 1`` posts one message per request (``{"to", "from", "text"}``); ``--batch N``
posts ``{"messages": [...]}`` with N messages. Closed loop (no ``--rate``): C workers each
keep one request in flight. Open loop (``--rate R`` messages/s): requests are due at R/N per
second, at most C in flight; a due request that finds no free slot waits (bounded) and its
latency counts from when it was due.

The client is a minimal HTTP/1.1 keep-alive client on asyncio Protocols, in the manner of
wrk: the request bytes are encoded once, each of at most C connections carries one request
at a time, and a response is read by its Content-Length. The load generator shares the
machine with the router it measures, so it must cost little CPU (a general client such as
aiohttp's took 0.4 of a core at 4,000 requests/s). A response it cannot read (chunked,
no Content-Length, malformed), a connection the server closes under a request
(``client:ConnectionClosed``), a connection error or a request unanswered after 30 s counts
as a ``client:<ExceptionName>`` failure, and the next request opens a new connection.

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
from typing import Any, cast
from urllib.parse import urlsplit

import aiohttp  # only for the two /metrics scrapes (stats.scrape_counters)

from .stats import Series, Window, counter_delta, measure_window, scrape_counters, summarize

TEXT = "Bench: your verification code is 424242. It expires in 10 minutes."
TICK = 0.001
REQUEST_TIMEOUT = 30.0  # seconds per request, connecting included
RECEIPTS_SOURCE = "router counter smsrouter_messages_final_total{status=delivered}"
clock = time.monotonic

Answer = tuple[int, bytes]  # HTTP status, body


class ClientError(Exception):
    """A request that got no usable answer (counted as ``client:<class name>``)."""


class ConnectionClosed(ClientError):
    """The server closed the connection before the response was complete."""


class BadResponse(ClientError):
    """A response this client does not read: malformed, chunked or without Content-Length."""


def encode_request(url: str, key: str, body: bytes) -> bytes:
    """The whole POST /v1/messages request, encoded once and sent as is every time."""
    parts = urlsplit(url)
    head = (
        f"POST {parts.path}/v1/messages HTTP/1.1\r\n"
        f"Host: {parts.netloc}\r\n"
        f"Authorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode() + body


def parse_head(head: bytes) -> tuple[int, int, bool]:
    """Status, body length and "the server closes after this response" from the status line
    and header lines of a response (without the blank line that ends them)."""
    lines = head.lower().split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    status = rest[:3]
    if not version.startswith(b"http/1.") or len(status) != 3 or not status.isdigit():
        raise BadResponse(f"status line {lines[0][:80]!r}")
    length: int | None = None
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name == b"content-length":
            if not value.strip().isdigit():
                raise BadResponse(f"Content-Length {value[:40]!r}")
            length = int(value)
        elif name == b"transfer-encoding":
            # The body length would come from the (chunked) encoding, which this client
            # does not decode; the router answers with a Content-Length.
            raise BadResponse(f"Transfer-Encoding {value[:40]!r}")
        elif name == b"connection":
            close = b"close" in value
    code = int(status)
    if length is None:
        if code not in (204, 304):  # other responses without a length end at close
            raise BadResponse("no Content-Length")
        length = 0
    return code, length, close


class Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection carrying one request at a time."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()  # received and not yet consumed
        self.head: tuple[int, int, bool] | None = None  # of the response being read
        self.waiter: asyncio.Future[Answer] | None = None  # answer of the request in flight
        self.closed = False  # set once no further request may be sent

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, request: bytes) -> asyncio.Future[Answer]:
        assert self.transport is not None and self.waiter is None
        self.transport.write(request)
        self.waiter = self.loop.create_future()
        return self.waiter

    def data_received(self, data: bytes) -> None:
        # A response may arrive in any number of pieces, and a piece may hold the end of
        # one response and more bytes after it: take whole responses off the buffer.
        self.buf += data
        try:
            while not self.closed and (answer := self._take_response()) is not None:
                waiter, self.waiter = self.waiter, None
                if waiter is None:
                    raise BadResponse("a response to no request")
                if not waiter.done():  # done: given up on (timeout) a moment ago
                    waiter.set_result(answer)
        except BadResponse as exc:
            self.abort(exc)

    def _take_response(self) -> Answer | None:
        """The response at the front of the buffer, removed from it (None: not all here)."""
        buf = self.buf
        if self.head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return None
            self.head = parse_head(bytes(buf[:end]))
            del buf[: end + 4]
        status, length, close = self.head
        if len(buf) < length:
            return None
        body = bytes(buf[:length])
        del buf[:length]
        self.head = None
        if close:  # Connection: close; the next request opens a new connection
            self.closed = True
            assert self.transport is not None
            self.transport.close()
        return status, body

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionClosed("the server closed the connection"))

    def abort(self, exc: BaseException) -> None:
        """Fail the request in flight, if any, and drop the connection."""
        self._fail(exc)
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: BaseException) -> None:
        self.closed = True
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)


class Pool:
    """Keep-alive connections to the server of ``url``; one per request in flight, so at
    most ``--concurrency``. The last one returned is reused first."""

    def __init__(self, url: str, request: bytes) -> None:
        parts = urlsplit(url)
        assert parts.hostname, url  # parse_args lets loopback URLs only through
        self.host = parts.hostname
        self.port = parts.port or 80
        self.request = request
        self.idle: list[Connection] = []

    async def post(self) -> Answer:
        """Send the request on an idle connection, or a new one, and return the answer."""
        conn: Connection | None = None
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                conn = self._idle() or await self._connect()
                answer = await conn.send(self.request)
        except BaseException:  # error, timeout or cancellation: the connection is unusable
            if conn is not None:
                conn.abort(ConnectionClosed("request abandoned"))
            raise
        if not conn.closed:
            self.idle.append(conn)
        return answer

    def _idle(self) -> Connection | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:  # else the server closed it while idle
                return conn
        return None

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(Connection, self.host, self.port)
        return conn

    def close(self) -> None:
        for conn in self.idle:
            conn.abort(ConnectionClosed("load generator done"))
        self.idle.clear()


class HttpGenerator:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        item = {"to": args.to, "from": args.source, "text": TEXT}
        doc: Any = item if args.batch == 1 else {"messages": [item] * args.batch}
        self.pool = Pool(args.url, encode_request(args.url, args.key, json.dumps(doc).encode()))
        self.t0 = clock()
        self.series = Series(self.t0)
        self.win = Window()
        self.statuses: Counter[str] = Counter()
        self.win_statuses: Counter[str] = Counter()
        self.latency = array("d")
        self.submitting = False
        self.in_flight = 0
        self.failures: Counter[str] = Counter()

    async def one(self, due: float) -> None:
        self.in_flight += 1
        self.win.count("sent", due, self.args.batch)
        accepted = 0
        try:
            code, body = await self.pool.post()
            status = str(code)
            if code == 202:  # a batch answer says how many of its messages were accepted
                accepted = 1 if self.args.batch == 1 else int(json.loads(body)["accepted"])
        except (ClientError, OSError, ValueError, KeyError) as exc:
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

    async def worker(self) -> None:
        while self.submitting:
            await self.one(clock())

    async def open_loop(self) -> None:
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
                t = asyncio.create_task(self.one(backlog.popleft()))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            await asyncio.sleep(TICK)
        if tasks:
            await asyncio.wait(tasks, timeout=self.args.drain)

    async def run(self) -> dict[str, Any]:
        a = self.args
        probe = aiohttp.ClientSession()
        try:
            # One request first, alone: the router verifies the API key (argon2) once
            # and remembers it; concurrent first requests would each pay for it.
            t = clock()
            code, _ = await self.pool.post()
            first = {"status": code, "ms": round((clock() - t) * 1000, 3)}
            self.t0 = self.series.t0 = clock()
            self.submitting = True
            before = None
            if a.warmup <= 0:
                self.win.open(clock(), a.duration)
                before = await scrape_counters(probe, a.ops_url)
            if a.rate is None:
                runners = [asyncio.create_task(self.worker()) for _ in range(a.concurrency)]
            else:
                runners = [asyncio.create_task(self.open_loop())]
            before, cpu = await measure_window(
                self.win, a.warmup, a.duration, probe, a.ops_url, before
            )
            after = await scrape_counters(probe, a.ops_url)
            self.submitting = False
            await asyncio.wait(runners, timeout=a.drain + 30)
        finally:
            self.pool.close()
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
                "loadgen_cpu_s": cpu,
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
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.http_load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    print(
        f"http_load: {w['requests_per_s']:.0f} requests/s, accepted {w['accepted_per_s']:.0f}"
        f" messages/s, answers {w['answers']}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
