"""Every Prometheus metric of the router, defined once, here.

Labels are bounded sets: ingress, account, country, carrier, status, reason.
Never a phone number, sender id, text or per-message id (privacy.md 6).
"""

from __future__ import annotations

import bisect
import gc
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

# The exposition format of bucket bounds, as prometheus_client writes them
# (the function carries no annotations).
_le: Callable[[float], str] = floatToGoString
S = TypeVar("S")


class _Tally:
    """One labelled series: a plain float. prometheus_client guards each
    value with a lock on every update; the router updates its metrics from
    the event-loop thread only, so the per-message ones skip it (with the
    histograms below: smpp-e2e 8,350 -> 9,574 messages/s on the 2-core
    benchmark box)."""

    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _Family(Collector, Generic[S]):
    """Series by label values, made on first use; registered as a collector."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry | None,
        make: Callable[[], S],
    ) -> None:
        self._name = name
        self._doc = documentation
        self._labelnames = tuple(labelnames)
        self._make = make
        self._series: dict[tuple[str, ...], S] = {}
        if not self._labelnames:
            self._series[()] = make()
        if registry is not None:
            registry.register(self)

    def labels(self, *values: Any, **by_name: Any) -> S:
        key = (
            tuple(str(by_name[n]) for n in self._labelnames)
            if by_name
            else tuple(str(v) for v in values)
        )
        if len(key) != len(self._labelnames):
            raise ValueError(f"{self._name}: expected labels {self._labelnames}")
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = self._make()
        return series


class FastCounter(_Family[_Tally]):
    """A counter for the per-message hot path, exported like prometheus_client's
    (``_total`` and ``_created`` samples). Event-loop thread only."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        if not name.endswith("_total"):
            raise ValueError("a counter's name ends in _total")
        super().__init__(name[: -len("_total")], documentation, labelnames, registry, _Tally)

    def inc(self, amount: float = 1.0) -> None:
        self._series[()].inc(amount)

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._doc, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labelnames)
        for key, tally in list(self._series.items()):
            family.add_metric(key, tally.value, created=tally.created)
        yield family


class _Buckets:
    """One labelled histogram series: counts per bucket, sum, creation time."""

    __slots__ = ("bounds", "counts", "sum", "created")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        self.sum += amount
        # le buckets: the first bound >= amount counts it
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1


class FastHistogram(_Family[_Buckets]):
    """A histogram for the per-message hot path, exported like
    prometheus_client's (cumulative ``le`` buckets, ``_sum``, ``_count``,
    ``_created``). Event-loop thread only."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = (),
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        bounds = tuple(float(b) for b in buckets if not math.isinf(b))
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError("buckets must be increasing")
        self._edges = [_le(b) for b in bounds] + ["+Inf"]
        super().__init__(name, documentation, labelnames, registry, lambda: _Buckets(bounds))

    def observe(self, amount: float) -> None:
        self._series[()].observe(amount)

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)
        for key, series in list(self._series.items()):
            running = 0
            cumulative = []
            for edge, n in zip(self._edges, series.counts, strict=True):
                running += n
                cumulative.append((edge, float(running)))
            family.add_metric(list(key), cumulative, series.sum)
            labels = dict(zip(self._labelnames, key, strict=True))
            family.add_sample(self._name + "_created", labels, series.created)
        yield family


_LAT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DLR_LAT = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 86400)

ACCEPTED = FastCounter(
    "smsrouter_messages_accepted_total",
    "Messages accepted for delivery.",
    ["ingress", "account", "country"],
)
PARTS_ACCEPTED = FastCounter(
    "smsrouter_message_parts_accepted_total",
    "Message parts (segments) accepted for delivery.",
    ["ingress", "account"],
)
REJECTED = Counter(
    "smsrouter_messages_rejected_total",
    "Messages refused at submission, by reason.",
    ["ingress", "account", "reason"],
)
FINAL = FastCounter(
    "smsrouter_messages_final_total",
    "Messages that reached a final status, by carrier and status.",
    ["carrier", "status"],
)
SUBMITTED = FastCounter(
    "smsrouter_carrier_submits_total",
    "Segments accepted by a carrier (positive submit_sm_resp).",
    ["carrier"],
)
SUBMIT_ERRORS = Counter(
    "smsrouter_carrier_submit_errors_total",
    "Segments refused by a carrier for good.",
    ["carrier", "status"],
)
CARRIER_RETRIES = Counter(
    "smsrouter_carrier_retries_total", "Segments scheduled for another attempt.", ["carrier"]
)
CARRIER_THROTTLED = Counter(
    "smsrouter_carrier_throttled_total",
    "ESME_RTHROTTLED/ESME_RMSGQFUL answers received from a carrier.",
    ["carrier"],
)
CARRIER_RECONNECTS = Counter(
    "smsrouter_carrier_reconnects_total", "Carrier session reconnect attempts.", ["carrier"]
)
CARRIER_UP = Gauge("smsrouter_carrier_up", "1 if at least one session is bound.", ["carrier"])
CARRIER_BINDS = Gauge("smsrouter_carrier_binds", "Bound sessions per carrier.", ["carrier"])
CARRIER_QUEUE_DEPTH = Gauge(
    "smsrouter_carrier_queue_depth", "Segments waiting for a carrier.", ["carrier"]
)
CARRIER_QUEUE_CAPACITY = Gauge(
    "smsrouter_carrier_queue_capacity", "Bound of the carrier queue.", ["carrier"]
)
CARRIER_RATE = Gauge(
    "smsrouter_carrier_rate_limit",
    "submit_sm/s this process may send now: its share of the carrier's tps"
    " (listen.workers), lowered while the carrier answers ESME_RTHROTTLED.",
    ["carrier"],
)
CARRIER_IN_FLIGHT = Gauge(
    "smsrouter_carrier_in_flight", "submit_sm awaiting submit_sm_resp.", ["carrier"]
)
SUBMIT_LATENCY = FastHistogram(  # observed once per submit_sm_resp
    "smsrouter_carrier_submit_seconds",
    "submit_sm to submit_sm_resp, per carrier.",
    ["carrier"],
    buckets=_LAT,
)
ACCEPT_TO_SUBMIT = FastHistogram(
    "smsrouter_accept_to_submit_seconds",
    "Acceptance to the carrier's positive submit_sm_resp.",
    buckets=_LAT,
)
DELIVERY_LATENCY = FastHistogram(
    "smsrouter_delivery_seconds",
    "Acceptance to the final receipt.",
    ["carrier"],
    buckets=_DLR_LAT,
)
RECEIPTS_IN = FastCounter(
    "smsrouter_carrier_receipts_total", "Receipts received from carriers.", ["carrier", "status"]
)
RECEIPTS_UNMATCHED = Counter(
    "smsrouter_carrier_receipts_unmatched_total",
    "Receipts from carriers that matched no message.",
    ["carrier"],
)
RECEIPTS_OUT = FastCounter(
    "smsrouter_receipts_sent_total",
    "Receipts delivered to customers, by channel and outcome.",
    ["channel", "outcome"],
)
RECEIPTS_PENDING = Gauge(
    "smsrouter_receipts_pending", "Receipts waiting for a customer bind or webhook, in memory."
)
RECEIPTS_PARKED = Gauge(
    "smsrouter_receipts_parked",
    "Receipts for SMPP customers with no receiving bind, waiting in the database for this node.",
)
BINDS = Gauge("smsrouter_smpp_binds", "Customer SMPP binds.", ["account", "bind_type"])
BIND_FAILURES = Counter(
    "smsrouter_smpp_bind_failures_total", "Refused customer binds, by reason.", ["reason"]
)
THROTTLE_SENT = Counter(
    "smsrouter_throttle_responses_sent_total",
    "Backpressure answers sent to submitters.",
    ["ingress", "reason"],
)
SMPP_READ_HOLDS = Counter(
    "smsrouter_smpp_read_holds_total",
    "Times the router stopped reading a customer bind for a while after "
    "answering it ESME_RTHROTTLED or ESME_RMSGQFUL (smpp.throttle_pause).",
)
PDU_ERRORS = Counter(
    "smsrouter_smpp_pdu_errors_total",
    "Customer PDUs refused by the protocol layer, by command_status.",
    ["status"],
)
HTTP_REQUESTS = FastCounter(
    "smsrouter_http_requests_total", "HTTP API requests.", ["route", "code"]
)
TRAFFIC_LOG_BUFFER = Gauge(
    "smsrouter_traffic_log_buffer_rows", "Traffic-log rows waiting to be written."
)
TRAFFIC_LOG_DROPPED = Counter(
    "smsrouter_traffic_log_dropped_rows_total",
    "Traffic-log rows dropped because the buffer was full (must stay 0).",
)
TRAFFIC_LOG_WRITTEN = Counter(
    "smsrouter_traffic_log_written_rows_total", "Traffic-log rows written.", ["table"]
)
TRAFFIC_LOG_FLUSH = Histogram(
    "smsrouter_traffic_log_flush_seconds", "Duration of one traffic-log flush.", buckets=_LAT
)
TRAFFIC_LOG_ERRORS = Counter(
    "smsrouter_traffic_log_errors_total", "Failed traffic-log flushes (retried)."
)
LOOP_LAG = Gauge("smsrouter_event_loop_lag_seconds", "Event-loop scheduling lag, last sample.")
READY = Gauge("smsrouter_ready", "1 when /readyz answers 200.")
BUILD_INFO = Gauge(
    "smsrouter_build_info",
    "Always 1; version, and whether the per-message modules run compiled "
    "(all, partial or none; router/accel.py).",
    ["version", "compiled"],
)
SPOOL_ROWS = Gauge(
    "smsrouter_spool_rows", "Accepted messages not yet taken by a carrier (durable spool)."
)
RECEIPT_ROUTES_REFUSED = Counter(
    "smsrouter_receipt_routes_refused_total",
    "Receipt routes PostgreSQL refused to store (a value it cannot hold): dropped, so"
    " their receipts match only while the message is in memory.",
)
RECEIPT_ANSWERS_FORCED = Counter(
    "smsrouter_carrier_receipt_answers_forced_total",
    "Carrier receipts held for their traffic-log write (delivery.receipt_ack ="
    ' "durable") and answered after the longest hold (5 s) instead: the write hung, or'
    " the backlog written ahead of it took longer.",
)
RECEIPTS_RESENT = Counter(
    "smsrouter_receipts_resent_total",
    "Messages finished again with the final status the traffic log holds, for receipt"
    " routes a router left when it went down (router/carriers/deadline.py).",
)
RECEIPT_WAITS_RELEASED = Counter(
    "smsrouter_receipt_waits_released_total",
    "Messages at a carrier let go from memory after delivery.receipt_memory without a"
    " receipt (a later receipt is still matched through the database).",
)
RECEIPT_ROUTE_WAIT = FastHistogram(  # once per receipt crossing between nodes
    "smsrouter_carrier_receipt_route_wait_seconds",
    "How long a carrier receipt this node held no submission for waited until its"
    " receipt_routes row was found (router.carriers.recovery).",
    buckets=(0.005, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 15.0, 60.0, 120.0),
)
WORKER_RELAYED = Counter(
    "smsrouter_worker_relayed_total",
    "submit_sm sent through a sibling worker's carrier bind (a carrier with fewer"
    " sessions than listen.workers), by outcome: answered by the carrier, or"
    " no_answer (no sibling bound, timeout; the message is resent).",
    ["outcome"],
)
WORKER_RECEIPTS = Counter(
    "smsrouter_worker_receipts_total",
    "Carrier receipts a worker got for a message it did not send, offered to its"
    " sibling workers (listen.workers): taken by one, or unclaimed (then looked up"
    " in receipt_routes).",
    ["outcome"],
)
CARRIER_RECEIPTS_FORWARDED = Counter(
    "smsrouter_carrier_receipts_forwarded_total",
    "Carrier receipts that reached this node for a message another live node sent,"
    " handed to that node.",
)
DB_VACUUMS = Counter(
    "smsrouter_db_vacuums_total",
    "VACUUMs this node ran on a queue table whose dead rows piled up (router.store.vacuum).",
    ["table"],
)
DB_QUEUE_DEAD_ROWS = Gauge(
    "smsrouter_db_queue_dead_rows",
    "Dead rows in a queue table at the last check (pg_stat_user_tables.n_dead_tup).",
    ["table"],
)
SPOOL_ADOPTED = Counter(
    "smsrouter_spool_adopted_total",
    "Queued messages this node took over from a router sharing the database that died.",
)
FAILOVERS = Counter(
    "smsrouter_carrier_failover_messages_total",
    "Queued messages moved off a carrier that stayed down.",
    ["carrier"],
)
LOOP_LAG_HIST = Histogram(
    "smsrouter_event_loop_lag_seconds_hist",
    "Event-loop scheduling lag, sampled every 0.5 s.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

GC_PAUSE = Histogram(
    "smsrouter_gc_pause_seconds",
    "Time the Python garbage collector held the router, by generation (2 = full collection).",
    ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)

_children: dict[tuple[Any, ...], Any] = {}
_gc_watched = False


def watch_gc() -> None:
    """Time every garbage collection into GC_PAUSE (once per process): a
    full collection over many live objects stops the event loop, which
    shows up as a latency spike with no other cause."""
    global _gc_watched
    if _gc_watched:
        return
    _gc_watched = True
    by_generation = [GC_PAUSE.labels(str(g)) for g in range(3)]
    started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            by_generation[info["generation"]].observe(time.perf_counter() - started[0])

    gc.callbacks.append(on_gc)


def child(metric: Any, *values: str) -> Any:
    """``metric.labels(*values)``, memoised: the hot path pays one dict lookup
    instead of prometheus_client's lock and argument checks. Label sets are
    bounded (accounts x countries x statuses), so the memo is too."""
    key = (metric, *values)
    c = _children.get(key)
    if c is None:
        c = _children[key] = metric.labels(*values)
    return c


CARRIER_HEALTHY = Gauge(
    "smsrouter_carrier_healthy",
    "0 while a carrier is benched for failing most recent submits, else 1.",
    ["carrier"],
)
SCHEDULED_IN = Counter(
    "smsrouter_scheduled_total", "Messages accepted for a later send time (durable spool)."
)
SCHEDULED_OUT = Counter(
    "smsrouter_scheduled_released_total", "Scheduled messages released to carriers when due."
)
SCHEDULED_WAITING = Gauge(
    "smsrouter_scheduled_waiting", "Scheduled messages waiting in the spool (sampled every 10 s)."
)
MEMORY_BRAKE = Gauge(
    "smsrouter_memory_brake",
    "1 while resident memory is above delivery.max_memory_mb and new messages are refused.",
)
CONCAT_HELD = Gauge(
    "smsrouter_concat_parts_held",
    "Parts of customer-split SMPP messages held for their siblings (smpp.reassembly_max_parts).",
)
CONCAT_MESSAGES = Counter(
    "smsrouter_concat_messages_total",
    "Customer-split SMPP messages reassembled and released as one message.",
)
CONCAT_PARTS_ALONE = Counter(
    "smsrouter_concat_parts_alone_total",
    "Parts of customer-split SMPP messages released on their own, by reason"
    " (timeout, buffer_full, duplicate, reused, mismatch, stopping).",
    ["reason"],
)
WEBHOOK_OUTBOX_ROWS = Gauge(
    "smsrouter_webhook_outbox_rows",
    "Webhooks waiting in the durable outbox table, all nodes (sampled every 10 s).",
)
