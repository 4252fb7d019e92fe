"""Counting and latency bookkeeping shared by the load generators.

A run has a warm-up (counted in the per-second series only) and a measured window
``[measure_start, measure_end)``; figures in a result come from the window alone. Latencies
are kept as raw samples (a float each; a few hundred thousand per run at most) so the
percentiles are exact, not histogram estimates.
"""

from __future__ import annotations

import asyncio
import math
import time
from array import array
from collections import Counter
from typing import Any

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def percentile(sorted_values: array[float] | list[float], p: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None when empty)."""
    n = len(sorted_values)
    if n == 0:
        return None
    rank = max(1, math.ceil(p / 100.0 * n))
    return float(sorted_values[rank - 1])


def summarize(samples: array[float] | list[float]) -> dict[str, Any]:
    """count, mean, p50/p90/p99/p99.9 and max, in milliseconds."""
    values = sorted(samples)
    out: dict[str, Any] = {"count": len(values)}
    if not values:
        out.update({"mean_ms": None, "max_ms": None})
        out.update({_key(p): None for p in PERCENTILES})
        return out
    out["mean_ms"] = round(sum(values) / len(values) * 1000.0, 3)
    for p in PERCENTILES:
        v = percentile(values, p)
        out[_key(p)] = None if v is None else round(v * 1000.0, 3)
    out["max_ms"] = round(values[-1] * 1000.0, 3)
    return out


def _key(p: float) -> str:
    return f"p{p:g}_ms".replace(".", "_")


class Series:
    """Events per whole second since ``t0``, by name."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.buckets: dict[str, list[int]] = {}

    def add(self, name: str, now: float, n: int = 1) -> None:
        i = int(now - self.t0)
        if i < 0:
            i = 0
        b = self.buckets.get(name)
        if b is None:
            b = self.buckets[name] = []
        if i >= len(b):
            b.extend([0] * (i + 1 - len(b)))
        b[i] += n

    def as_dict(self) -> dict[str, list[int]]:
        width = max((len(b) for b in self.buckets.values()), default=0)
        return {k: b + [0] * (width - len(b)) for k, b in self.buckets.items()}


class Window:
    """The measured window and what fell into it."""

    def __init__(self) -> None:
        self.start = math.inf
        self.end = math.inf
        self.counts: Counter[str] = Counter()

    def open(self, now: float, duration: float) -> None:
        self.start = now
        self.end = now + duration

    def inside(self, t: float) -> bool:
        return self.start <= t < self.end

    def count(self, name: str, t: float, n: int = 1) -> None:
        if self.start <= t < self.end:
            self.counts[name] += n


# ------------------------------------------------------------ the router's own counters

ROUTER_COUNTERS = {
    "accepted": "smsrouter_messages_accepted_total",
    "rejected": "smsrouter_messages_rejected_total",
    "final": "smsrouter_messages_final_total",
}


def parse_counters(text: str) -> dict[str, float]:
    """Sum the router counters in a Prometheus text page: accepted, rejected, final:<status>."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("smsrouter_messages_"):
            continue
        name, _, rest = line.partition("{")
        labels, _, value = rest.rpartition("} ")
        for key, metric in ROUTER_COUNTERS.items():
            if name != metric:
                continue
            if key == "final":
                status = "?"
                if 'status="' in labels:
                    status = labels.split('status="', 1)[1].split('"', 1)[0]
                key = f"final:{status}"
            out[key] = out.get(key, 0.0) + float(value)
    return out


async def scrape_counters(session: object, ops_url: str | None) -> dict[str, float] | None:
    """The router's message counters from ``ops_url``/metrics (None if unavailable)."""
    if not ops_url:
        return None
    try:
        async with session.get(f"{ops_url}/metrics") as resp:  # type: ignore[attr-defined]
            return parse_counters(await resp.text())
    except Exception:  # a missing cross-check must not fail the run
        return None


def counter_delta(
    before: dict[str, float] | None, after: dict[str, float] | None
) -> dict[str, float] | None:
    if before is None or after is None:
        return None
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in sorted(set(before) | set(after))}


async def measure_window(
    win: Window,
    warmup: float,
    duration: float,
    probe: object,
    ops_url: str | None,
    before: dict[str, float] | None,
) -> tuple[dict[str, float] | None, float]:
    """With the load running: let the warm-up pass, then read the router's
    counters and open the window (with no warm-up the caller opened it, and
    read ``before``, before the load started); sleep to the window's end.
    Returns the counters at the window's start and the CPU seconds this
    process used inside the window."""
    if warmup > 0:
        await asyncio.sleep(warmup)
        before = await scrape_counters(probe, ops_url)
        win.open(time.monotonic(), duration)
    cpu0 = time.process_time()
    await asyncio.sleep(max(0.0, win.end - time.monotonic()))
    return before, time.process_time() - cpu0
