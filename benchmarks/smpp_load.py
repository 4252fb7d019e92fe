"""SMPP load generator: N transceiver binds built on router.smpp, one process, uvloop.

    python -m benchmarks.smpp_load --port P [--binds N] [--window W] [--rate R]
        [--warmup S] [--duration S] [--drain S] --output result.json

Each bind is an :class:`~router.smpp.transport.SmppProtocol` (no task per PDU) with its
own window of outstanding submit_sm. Closed loop (no ``--rate``): every bind keeps its
window full, so the router sets the pace. Open loop (``--rate R``): submits are due at R
per second in total, spread over the binds; when every window is full a due submit waits
in a bounded backlog, and its latency counts from when it was due (no coordinated
omission), so an overloaded router shows up as latency, not as a lower offered rate.

Latency per message, by OUR message id (the id in submit_sm_resp is the
receipted_message_id TLV 0x001E of the receipt):

- submit -> submit_sm_resp: how long the router takes to accept;
- submit -> receipt (deliver_sm): the whole trip through routing, the carrier (a
  simulator with a fixed ``--dlr-delay``) and back.

Counted in the measured window only: submit_sm_resp by command_status (by the time the
answer arrives), receipts (by arrival); latencies of messages submitted in the window.
After the window, no new submits; the generator waits up to ``--drain`` seconds for the
window's receipts, then unbinds and writes the JSON result.

Whole-run bookkeeping (``lifecycle`` in the result), for loss checks: every message id the
router accepted (warm-up and window) is kept until its receipt arrives. After the load
stops the generator waits up to ``--settle`` seconds (default: ``--drain``) until each has
its receipt, then reports ``lost = accepted - receipted`` plus duplicate receipts and
receipts for ids it was never given. ``--interval S`` also records every latency with its
completion time and reports p50/p99/max per S-second interval (the soak scenario).
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

from router.smpp.constants import CommandId, Status, Tag, status_name
from router.smpp.errors import SmppError
from router.smpp.pdu import BindTransceiver, Pdu, SubmitSm
from router.smpp.session import Role, SmppSession
from router.smpp.transport import SmppProtocol

from .stats import Series, Window, counter_delta, measure_window, scrape_counters, summarize

TEXT = b"Bench: your verification code is 424242. It expires in 10 minutes."
TICK = 0.001  # open-loop scheduling granularity (seconds)
STALL = 15.0  # settle: stop waiting when no receipt at all has arrived for this long
ROK = int(Status.ESME_ROK)
DELIVER_SM = int(CommandId.DELIVER_SM)
RECEIPTED_MESSAGE_ID = int(Tag.RECEIPTED_MESSAGE_ID)
clock = time.monotonic


class LoadBind(SmppProtocol):
    """One transceiver bind: submits, answers receipts."""

    def __init__(self, gen: Generator) -> None:
        super().__init__(
            SmppSession(
                Role.ESME,
                window=gen.window,
                peer_window=10_000,
                response_timeout=30.0,
                enquire_interval=30.0,
                inactivity_timeout=300.0,
            )
        )
        self.gen = gen
        self.sent_at: dict[int, float] = {}  # sequence -> submit time (or when it was due)

    def on_request(self, pdu: Pdu) -> None:
        if pdu.command_id != DELIVER_SM:
            raise SmppError("load generator takes deliver_sm only", Status.ESME_RINVCMDID)
        self.answer(pdu)
        self.gen.on_receipt(pdu)

    def on_closed(self, exc: Exception | None) -> None:
        self.gen.on_bind_closed(self, exc)


class Generator:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.window = args.window
        self.rate: float | None = args.rate
        self.binds: list[LoadBind] = []
        self.t0 = clock()
        self.series = Series(self.t0)
        self.win = Window()
        self.submitting = False
        self.statuses: Counter[str] = Counter()  # all answers, whole run
        self.win_statuses: Counter[str] = Counter()  # answers in the window
        self.resp_latency = array("d")
        self.receipt_latency = array("d")
        self.awaiting: dict[str, float] = {}  # our message id -> submit time (window only)
        self.early: dict[str, float] = {}  # receipt before its submit_sm_resp: id -> arrival
        self.receipts_total = 0
        self.receipts_unknown = 0
        self.timeouts = 0
        self.lost_connections = 0
        self.backlog: deque[float] = deque()
        self.backlog_limit = int((self.rate or 0) * 2) + 1000
        self.backlog_dropped = 0
        self.scheduled = 0
        self.started = 0.0
        self._rr = 0
        self._tick: asyncio.TimerHandle | None = None
        self._closing = False
        self.errors: list[str] = []
        # Whole run (lifecycle): accepted ids without a receipt yet; receipted ids; receipts
        # whose id has not (yet) been seen in a submit_sm_resp.
        self.pending: set[str] = set()
        self.matched: set[str] = set()
        self.orphans: set[str] = set()
        self.accepted_total = 0
        self.duplicate_receipts = 0
        self.interval: float | None = args.interval
        self.sent_of: dict[str, float] = {}  # with --interval: id -> submit time
        self.resp_at = array("d")  # with --interval: (completion time, latency) pairs
        self.resp_lat = array("d")
        self.rcpt_at = array("d")
        self.rcpt_lat = array("d")

    # ---------------------------------------------------------------- set-up

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        a = self.args
        for i in range(a.binds):
            # Several routers (nodes behind a load balancer): binds round robin.
            port = a.port[i % len(a.port)]
            _, proto = await loop.create_connection(lambda: LoadBind(self), a.host, port)
            resp = await asyncio.wait_for(
                proto.request(BindTransceiver(system_id=a.system_id, password=a.password)), 10
            )
            if resp.status != ROK:
                raise RuntimeError(f"bind {i + 1} refused: {status_name(resp.status)}")
            self.binds.append(proto)

    # --------------------------------------------------------------- sending

    def _submit(self, bind: LoadBind, due: float) -> None:
        a = self.args
        pdu = SubmitSm(
            source_addr_ton=5,
            source_addr_npi=0,
            source_addr=a.source,
            dest_addr_ton=1,
            dest_addr_npi=1,
            destination_addr=a.to,
            registered_delivery=1,
            short_message=TEXT,
        )
        bind.send_request(pdu, bind_callback(self, bind))
        bind.sent_at[pdu.sequence] = due
        self.series.add("sent", due)
        self.win.count("sent", due)

    def fill(self, bind: LoadBind) -> None:
        """Closed loop: keep this bind's window full while submitting."""
        session = bind.session
        while self.submitting and session.can_send and bind.is_open:
            self._submit(bind, clock())

    def on_tick(self) -> None:
        """Open loop: submit what is due by now, spread over the binds round-robin."""
        now = clock()
        if not self.submitting:
            return
        assert self.rate is not None
        due_total = int((now - self.started) * self.rate)
        n = due_total - self.scheduled
        if n > 0:
            step = 1.0 / self.rate
            first = self.started + (self.scheduled + 1) * step
            for k in range(n):
                due = first + k * step
                self.backlog.append(due)
                self.win.count("due", due)
            self.scheduled = due_total
            while len(self.backlog) > self.backlog_limit:
                self.backlog.popleft()
                self.backlog_dropped += 1
        self.drain_backlog()
        self._tick = asyncio.get_running_loop().call_later(TICK, self.on_tick)

    def drain_backlog(self) -> None:
        binds = self.binds
        n = len(binds)
        idle = 0
        while self.backlog and idle < n:
            bind = binds[self._rr % n]
            self._rr += 1
            if bind.is_open and bind.session.can_send:
                idle = 0
                self._submit(bind, self.backlog.popleft())
            else:
                idle += 1

    # -------------------------------------------------------------- receiving

    def on_resp(self, bind: LoadBind, resp: Pdu | None, request: Pdu) -> None:
        now = clock()
        sent = bind.sent_at.pop(request.sequence, now)
        if resp is None:
            name = "TIMEOUT_OR_LOST"
            self.timeouts += 1
        else:
            name = "ESME_ROK" if resp.status == ROK else status_name(resp.status)
        self.statuses[name] += 1
        if self.win.inside(now):
            self.win_statuses[name] += 1
        if resp is not None and resp.status == ROK:
            self.series.add("accepted", now)
            message_id: str = resp.message_id  # type: ignore[attr-defined]
            self.accepted_total += 1
            if message_id in self.orphans:  # its receipt came first
                self.orphans.discard(message_id)
                self.matched.add(message_id)
            else:
                self.pending.add(message_id)
            if self.interval is not None:
                self.resp_at.append(now)
                self.resp_lat.append(now - sent)
                self.sent_of[message_id] = sent
            if self.win.inside(sent):
                self.resp_latency.append(now - sent)
                early = self.early.pop(message_id, None)
                if early is not None:
                    self.receipt_latency.append(early - sent)
                else:
                    self.awaiting[message_id] = sent
        else:
            self.series.add("errors", now)
        if self.rate is None:
            self.fill(bind)
        elif self.backlog:
            self.drain_backlog()

    def on_receipt(self, pdu: Pdu) -> None:
        now = clock()
        self.receipts_total += 1
        self.series.add("receipts", now)
        self.win.count("receipts", now)
        message_id = pdu.tlv_str(RECEIPTED_MESSAGE_ID)  # type: ignore[attr-defined]
        if not message_id:
            self.receipts_unknown += 1
            return
        if message_id in self.pending:
            self.pending.discard(message_id)
            self.matched.add(message_id)
        elif message_id in self.matched:
            self.duplicate_receipts += 1
        elif message_id in self.orphans:
            self.duplicate_receipts += 1
        else:
            self.orphans.add(message_id)
        if self.interval is not None:
            at = self.sent_of.pop(message_id, None)
            if at is not None:
                self.rcpt_at.append(now)
                self.rcpt_lat.append(now - at)
        sent = self.awaiting.pop(message_id, None)
        if sent is not None:
            self.receipt_latency.append(now - sent)
        elif self.submitting and len(self.early) < 100_000:
            self.early[message_id] = now  # its submit_sm_resp may still be on its way

    def on_bind_closed(self, bind: LoadBind, exc: Exception | None) -> None:
        if not self._closing:
            self.lost_connections += 1
            self.errors.append(f"bind closed by the router: {type(exc).__name__ if exc else 'EOF'}")

    # -------------------------------------------------------------------- run

    async def run(self) -> dict[str, Any]:
        import aiohttp

        async with aiohttp.ClientSession() as probe:
            return await self._run(probe)

    async def _run(self, probe: Any) -> dict[str, Any]:
        a = self.args
        await self.connect()
        self.started = clock()
        self.t0 = self.series.t0 = self.started  # the series starts with the first submit
        self.submitting = True
        before = None
        if a.warmup <= 0:
            self.win.open(self.started, a.duration)
            before = await scrape_counters(probe, a.ops_url)
        if self.rate is None:
            for bind in self.binds:
                self.fill(bind)
        else:
            self.on_tick()
        before, cpu = await measure_window(self.win, a.warmup, a.duration, probe, a.ops_url, before)
        self.submitting = False
        after = await scrape_counters(probe, a.ops_url)
        if self._tick is not None:
            self._tick.cancel()
        window_backlog = len(self.backlog)
        self.backlog.clear()
        # Drain: answers for what is in flight, receipts for what was submitted in the window;
        # then (settle) receipts for everything accepted in the whole run.
        stopped = clock()
        deadline = stopped + a.drain
        settle = a.drain if a.settle is None else max(a.drain, a.settle)
        settle_deadline = stopped + settle
        drained_at = settled_at = stalled_at = None
        last_progress, last_receipts = stopped, self.receipts_total
        for _ in range(int(settle / 0.05) + 2):  # polled: bounded by --settle/--drain
            now = clock()
            busy = any(b.session.in_flight for b in self.binds if b.is_open) or self.awaiting
            if drained_at is None and (not busy or now >= deadline):
                drained_at = now
            if settled_at is None and not busy and not self.pending:
                settled_at = now
            if self.receipts_total != last_receipts:
                last_progress, last_receipts = now, self.receipts_total
            elif drained_at is not None and now - last_progress >= STALL:
                stalled_at = now  # nothing has come for STALL seconds: nothing more will
            if (drained_at is not None and (settled_at is not None or a.settle is None)) \
                    or stalled_at is not None or now >= settle_deadline:
                break
            await asyncio.sleep(0.05)
        settle_end = clock()
        self._closing = True
        await asyncio.gather(*(b.unbind(timeout=2.0) for b in self.binds), return_exceptions=True)
        duration = self.win.end - self.win.start
        accepted = self.win_statuses.get("ESME_ROK", 0)
        errors = {k: v for k, v in self.win_statuses.items() if k != "ESME_ROK"}
        receipts = self.win.counts.get("receipts", 0)
        return {
            "tool": "smpp_load",
            "pid": os.getpid(),
            "config": {
                "binds": a.binds,
                "window": a.window,
                "mode": "closed-loop" if self.rate is None else "open-loop",
                "offered_rate": self.rate,
                "warmup_s": a.warmup,
                "duration_s": a.duration,
                "drain_s": a.drain,
                "destination": a.to,
            },
            "t0": self.t0,
            "measure_start": self.win.start,
            "measure_end": self.win.end,
            "window": {
                "duration_s": duration,
                "submitted": self.win.counts.get("sent", 0),
                "accepted": accepted,
                "errors": errors,
                "receipts": receipts,
                "accepted_per_s": accepted / duration,
                "receipts_per_s": receipts / duration,
                # open loop: what was due in the window; closed loop: what was sent
                "offered_per_s": self.win.counts.get("due" if self.rate else "sent", 0)
                / duration,
                "backlog_at_end": window_backlog,
                "backlog_dropped": self.backlog_dropped,
                "receipts_missing_after_drain": len(self.awaiting),
                "loadgen_cpu_s": cpu,
                "router_counters": counter_delta(before, after),
            },
            "latency": {
                "submit_to_resp": summarize(self.resp_latency),
                "submit_to_receipt": summarize(self.receipt_latency),
            },
            "totals": {
                "answers": dict(self.statuses),
                "receipts": self.receipts_total,
                "receipts_without_id": self.receipts_unknown,
                "timeouts_or_lost": self.timeouts,
                "lost_connections": self.lost_connections,
            },
            "lifecycle": {
                "accepted": self.accepted_total,
                "receipted": len(self.matched),
                "lost": len(self.pending),
                "duplicate_receipts": self.duplicate_receipts,
                "receipts_for_unknown_ids": len(self.orphans),
                "settle_limit_s": settle,
                "settled": not self.pending,
                "settled_after_s": None if settled_at is None
                else round(settled_at - stopped, 3),
                "waited_s": round(settle_end - stopped, 3),
                "stalled": stalled_at is not None,  # gave up: no receipt for STALL s
                "lost_sample": sorted(self.pending)[:20],
            },
            "intervals": self.interval_stats(),
            "series": self.series.as_dict(),
            "problems": self.errors[:20],
        }

    def interval_stats(self) -> dict[str, Any] | None:
        """--interval: latency per interval (by completion time, seconds since t0), and
        over the first and last ``edge`` seconds of the measured window."""
        if self.interval is None:
            return None
        step = self.interval

        def split(at: array[float], lat: array[float]) -> dict[int, list[float]]:
            out: dict[int, list[float]] = {}
            for t, v in zip(at, lat, strict=True):
                out.setdefault(int((t - self.t0) // step), []).append(v)
            return out

        resp, rcpt = split(self.resp_at, self.resp_lat), split(self.rcpt_at, self.rcpt_lat)
        rows = []
        for i in range(max([*resp, *rcpt], default=-1) + 1):
            r, d = summarize(resp.get(i, [])), summarize(rcpt.get(i, []))
            rows.append({"t_s": round((i + 1) * step, 3), "accepted": r["count"],
                         "resp_p50_ms": r["p50_ms"], "resp_p99_ms": r["p99_ms"],
                         "resp_max_ms": r["max_ms"], "receipts": d["count"],
                         "receipt_p50_ms": d["p50_ms"], "receipt_p99_ms": d["p99_ms"],
                         "receipt_max_ms": d["max_ms"]})
        m0, m1 = self.win.start, self.win.end
        edge = min(60.0, (m1 - m0) / 4)

        def between(at: array[float], lat: array[float], a: float, b: float) -> dict[str, Any]:
            return summarize([v for t, v in zip(at, lat, strict=True) if a <= t < b])

        return {
            "interval_s": step,
            "rows": rows,
            "edge_s": edge,
            "first": {"from_s": round(m0 - self.t0, 3),
                      "resp": between(self.resp_at, self.resp_lat, m0, m0 + edge),
                      "receipt": between(self.rcpt_at, self.rcpt_lat, m0, m0 + edge)},
            "last": {"from_s": round(m1 - edge - self.t0, 3),
                     "resp": between(self.resp_at, self.resp_lat, m1 - edge, m1),
                     "receipt": between(self.rcpt_at, self.rcpt_lat, m1 - edge, m1)},
        }


def bind_callback(gen: Generator, bind: LoadBind) -> Any:
    """The per-bind response callback (one closure per bind, not per PDU)."""
    cb = getattr(bind, "_cb", None)
    if cb is None:

        def cb(resp: Pdu | None, request: Pdu) -> None:
            gen.on_resp(bind, resp, request)

        bind._cb = cb  # type: ignore[attr-defined]
    return cb


def _ports(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.smpp_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_ports, required=True,
                   help="router SMPP port, or several separated by commas (binds spread)")
    p.add_argument("--system-id", default="demo")
    p.add_argument("--password", default="demo-pass")
    p.add_argument("--ops-url", default=None, help="http://127.0.0.1:PORT: read /metrics too")
    p.add_argument("--binds", type=int, default=10)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--rate", type=float, default=None, help="open loop: submits/s in total")
    p.add_argument("--warmup", type=float, default=0.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--drain", type=float, default=10.0)
    p.add_argument("--settle", type=float, default=None,
                   help="after the load: wait up to S s for a receipt of every accepted id")
    p.add_argument("--interval", type=float, default=None,
                   help="latency percentiles per S-second interval (soak)")
    p.add_argument("--to", default="4512345678", help="destination (E.164 digits, TON 1)")
    p.add_argument("--source", default="Bench", help="alphanumeric sender id")
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args(argv)
    if args.binds < 1 or args.window < 1 or args.duration <= 0:
        p.error("--binds, --window and --duration must be positive")
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        p.error("loopback only")
    return args


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    return await Generator(args).run()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop

        result = uvloop.run(_main(args))
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        result = asyncio.run(_main(args))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    w = result["window"]
    lc = result["lifecycle"]
    print(f"smpp_load: accepted {w['accepted_per_s']:.0f}/s, receipts {w['receipts_per_s']:.0f}/s,"
          f" errors {w['errors'] or 'none'}; whole run: accepted {lc['accepted']}, receipted"
          f" {lc['receipted']}, lost {lc['lost']}, duplicate receipts"
          f" {lc['duplicate_receipts']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
