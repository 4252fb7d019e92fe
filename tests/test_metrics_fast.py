"""The lock-free per-message metrics export exactly what prometheus_client's
Counter and Histogram would (names, types, help, labels, values, buckets),
so dashboards, alerts and scrapers cannot tell them apart."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from router.observe.metrics import FastCounter, FastHistogram

BUCKETS = (0.001, 0.0025, 0.01, 0.1, 0.5, 1, 2.5, 60, 86400)
AMOUNTS = (0.0, 0.0005, 0.001, 0.001, 0.0011, 0.0025, 0.3, 1.0, 1.0000001, 59.99, 60, 86400, 1e9)


def exposition(registry: CollectorRegistry) -> str:
    """The text format with every _created value masked (they are clock times)."""
    text = generate_latest(registry).decode()
    return re.sub(r"(_created(\{[^}]*\})?) \S+", r"\1 T", text)


def test_counters_export_like_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = FastCounter("x_things_total", "Things.", ["ingress", "account"], registry=ours)
    slow = Counter("x_things_total", "Things.", ["ingress", "account"], registry=theirs)
    plain_fast = FastCounter("x_plain_total", "Plain.", registry=ours)
    plain_slow = Counter("x_plain_total", "Plain.", registry=theirs)
    for ingress, account, amount in (
        ("smpp", "acme", 1),
        ("http", "acme", 3),
        ("smpp", "acme", 2.5),
        ("smpp", "b", 1),
    ):
        fast.labels(ingress, account).inc(amount)
        slow.labels(ingress, account).inc(amount)
    fast.labels(ingress="http", account="c").inc()
    slow.labels(ingress="http", account="c").inc()
    plain_fast.inc(7)
    plain_slow.inc(7)
    assert exposition(ours) == exposition(theirs)


def test_histograms_export_like_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = FastHistogram("x_seconds", "Seconds.", ["carrier"], buckets=BUCKETS, registry=ours)
    slow = Histogram("x_seconds", "Seconds.", ["carrier"], buckets=BUCKETS, registry=theirs)
    plain_fast = FastHistogram("x_plain_seconds", "Plain.", buckets=BUCKETS, registry=ours)
    plain_slow = Histogram("x_plain_seconds", "Plain.", buckets=BUCKETS, registry=theirs)
    for i, amount in enumerate(AMOUNTS):
        carrier = "sim-1" if i % 3 else "sim-2"
        fast.labels(carrier).observe(amount)
        slow.labels(carrier).observe(amount)
        plain_fast.observe(amount)
        plain_slow.observe(amount)
    assert exposition(ours) == exposition(theirs)


def test_wrong_label_counts_and_names_are_refused() -> None:
    registry = CollectorRegistry()
    counter = FastCounter("x_total", "X.", ["a", "b"], registry=registry)
    with pytest.raises(ValueError):
        counter.labels("only-one")
    with pytest.raises(KeyError):
        counter.labels(a="1", c="2")
    with pytest.raises(ValueError):
        FastCounter("x_no_suffix", "X.", registry=registry)
    with pytest.raises(ValueError):
        FastHistogram("x_h", "X.", buckets=(1.0, 0.5), registry=registry)
