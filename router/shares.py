"""Rate limits that are totals, shared by worker processes by demand.

With ``listen.workers = N`` an account's ``tps`` and a carrier's ``tps``
are limits for the whole router, but each worker enforces its own token
bucket. A fixed 1/N split is wrong whenever traffic is uneven: a customer
with one SMPP bind (or one keep-alive HTTP connection) lands on one worker
and would get 1/N of what it pays for, and a carrier fed from one worker
would run at 1/N of its contracted rate while the other shares idle.

So every worker reports, once a second, how much it asked of each limit
(tokens asked for by its ingress or its carrier pump, plus a carrier's
backlog), and the supervisor divides each limit over the live workers by
that demand (:func:`divide`): max-min fair, each worker keeping a small
floor so that traffic arriving on an idle worker passes at once, and the
fractions never summing above 1, so the router as a whole does not exceed
the configured rate. A limit nobody asked of is split evenly. The
supervisor rebalances as soon as it starts a worker, so a worker (re)started
while the others hold most of a limit learns its small share before it
binds a carrier or takes a customer; until then it holds 1/N.

Queue sizes stay divided statically (config.share_config): a queue is a
memory bound and a latency bound, and shrinking an idle worker's queue would
refuse traffic that arrives there before the next rebalance.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

INTERVAL = 1.0  # seconds between demand reports and rebalances
STALE_AFTER = 3.5  # a report older than this counts as no demand
RESERVE = 0.04  # of each limit, spread evenly as every worker's floor
HEADROOM = 1.25  # a worker's want is its demand plus this much room to grow


def divide(demands: Sequence[float], rate: float, reserve: float = RESERVE) -> list[float]:
    """Fractions (summing to 1) of a ``rate`` for members that asked for
    ``demands`` (per second). Every member gets ``reserve / n``; the rest is
    filled max-min fair against each member's want (demand with headroom),
    and what is left once every want is met goes in proportion to demand."""
    n = len(demands)
    if n == 0:
        return []
    total = sum(max(0.0, d) for d in demands)
    if n == 1 or total <= 0 or rate <= 0:
        return [1.0 / n] * n
    floor = reserve / n
    pool = 1.0 - reserve
    wants = [max(0.0, d) * HEADROOM / rate for d in demands]
    if sum(wants) <= pool:
        left = pool - sum(wants)
        return [floor + w + left * max(0.0, d) / total for w, d in zip(wants, demands, strict=True)]
    # Water-filling: the smallest wants are met whole while they are below
    # an even split of what remains; the others share the rest equally.
    got = [0.0] * n
    remaining = pool
    open_ = sorted(range(n), key=lambda i: wants[i])
    while open_:
        level = remaining / len(open_)
        i = open_[0]
        if wants[i] <= level:
            got[i] = wants[i]
            remaining -= wants[i]
            open_.pop(0)
            continue
        for j in open_:
            got[j] = level
        break
    return [floor + g for g in got]


Report = dict[str, list[list[Any]]]  # {"a": [[account, asked/s, tps]], "c": [[carrier, ...]]}


def allocate(
    reports: Mapping[int, Report | None], members: Iterable[int]
) -> dict[int, dict[str, Any]]:
    """The supervisor's rebalance: for each member worker, its fraction of
    every account and carrier limit some member asked of (``reports`` by
    worker, None or missing = no demand). Keys nobody asked of are left out:
    a worker takes ``1 / n`` of those."""
    ids = list(members)
    n = len(ids)
    out: dict[int, dict[str, Any]] = {w: {"n": n, "a": {}, "c": {}} for w in ids}
    if n == 0:
        return out
    for kind in ("a", "c"):
        asked: dict[Any, dict[int, float]] = {}
        rates: dict[Any, float] = {}
        for w in ids:
            report = reports.get(w)
            for key, demand, rate in (report or {}).get(kind, ()):
                asked.setdefault(key, {})[w] = float(demand)
                rates[key] = float(rate)
        for key, by_worker in asked.items():
            fractions = divide([by_worker.get(w, 0.0) for w in ids], rates[key])
            for w, f in zip(ids, fractions, strict=True):
                out[w][kind][str(key)] = math.floor(f * 1e6) / 1e6  # never above 1 in sum
    return out
