"""Several router processes on one host, behind the same ports (``listen.workers``).

Why: one CPython process runs its message path on one core. On a 2-core box
a single router process tops out while the second core idles (the
``smpp-e2e-2nodes`` benchmark: two processes +25-45 %). Operators should not
need a second host, a load balancer and two configs to use the cores they
have; ``sms-router run --workers N`` does it on one.

Shape:

- The process started as ``sms-router run`` becomes the **supervisor**. It
  does no message work: it starts N **worker** processes (``python -m
  router.workers``), serves the ops port, passes signals on, and starts a
  worker again when one dies.
- Each worker is a whole router node (router/app.py) with its own node id,
  ``<node>/w<i>``, on the one database: the multi-node machinery (receipt
  hand-off, spool adoption, route claims) is what makes workers safe. A
  worker started again after a crash has the same id, so it resumes what it
  left in the spool at once.
- The SMPP and HTTP listeners of all workers share their ports
  (``SO_REUSEPORT``): the kernel spreads new connections over the workers.
  The supervisor resolves port 0 once and holds the port (bound, not
  listening) so that every worker and every restart gets the same one.
- Totals stay totals: a carrier's ``queue_size`` and ``sessions`` are
  divided over the workers (``config.share_config``); a worker left with no
  session of a carrier (it allows fewer binds than there are workers) sends
  through a sibling's bind (router/carriers/relay.py); carrier and account
  ``tps`` are shared by demand, rebalanced every second by the supervisor
  from what each worker asked of them (router/shares.py); ``max_binds`` is
  counted across the workers by the supervisor, which every worker asks
  before it answers a bind.
- The ops port is the supervisor's: ``/metrics`` is every worker's
  exposition with a ``worker`` label (plus the supervisor's own
  ``smsrouter_workers`` and ``smsrouter_worker_restarts_total``),
  ``/readyz`` is ready when every worker is, ``/healthz`` when every worker
  answers its own. Each worker's own ops listener is on loopback, port 0.

Supervisor and worker talk over a socketpair (one JSON object per line):
``ready`` (worker up, with its ops port), ``bind``/``unbind`` with a token
per bind (``unbind`` of an unknown token is ignored, so a worker may give
back a bind it timed out on), ``receipts`` offered to the siblings,
``demand`` reports and ``shares`` answers for the rates, ``bound`` (the
carriers a worker holds a bind of) and ``relays`` (those it may send
through a sibling), ``relay`` requests and ``relay_result`` answers. A worker whose
supervisor goes away drains and exits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from . import shares
from .carriers.receipt import CarrierReceipt
from .carriers.relay import RelaySession
from .config import Config, share_config
from .observe import metrics
from .smpp.constants import MessageState
from .smpp.pdu import Pdu, decode

if TYPE_CHECKING:
    from .app import Router
    from .engine import Engine

log = structlog.get_logger("router.workers")

ENV_WORKER = "ROUTER_WORKER"  # "<index>/<count>/<control fd>/<node>" (set by the supervisor)
ADMIT_TIMEOUT = 5.0  # a bind the supervisor does not answer in time is refused
OFFER_TIMEOUT = 5.0  # a receipt offer unanswered this long takes the database path
READY_TIMEOUT = 120.0  # a worker not ready this long after its start is a failed start
RESTART_MIN, RESTART_MAX = 1.0, 30.0  # back-off between restarts of a crashing worker
STABLE_AFTER = 60.0  # a worker up this long resets its back-off
STOP_GRACE = 30.0  # SIGTERM -> SIGKILL for a worker that does not finish draining
PROBE_TIMEOUT = 2.0  # supervisor -> worker ops requests
# Control link lines: batches are cut at BATCH items (a relayed submit_sm is
# up to ~400 bytes of base64), and a line may be this long (the default
# 64 KiB of asyncio's StreamReader was exceeded by one loop turn's batch).
BATCH = 256
LINE_LIMIT = 8 * 1024 * 1024
RELAY_WAIT = 5.0  # a relayed submit_sm may wait this long for room in the sibling's window


# ---------------------------------------------------------------- worker side


class SupervisorLink:
    """A worker's end of the control socket: bind admission and readiness."""

    def __init__(self, fd: int) -> None:
        self._sock = socket.socket(fileno=fd)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._seq = 0
        self._waiting: dict[int, asyncio.Future[bool]] = {}
        self._task: asyncio.Task[None] | None = None
        self.engine: Engine | None = None
        # Receipts offered to the siblings: rid -> (carrier, receipt, offered at).
        self._offered: dict[int, tuple[str, CarrierReceipt, float]] = {}
        # Items for the supervisor, one line per (op, fields) and loop turn.
        self._batches: dict[tuple[str, tuple[tuple[str, int], ...]], list[list[Any]]] = {}
        self._rid = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self._taking = True  # answers siblings' offers (False once draining)
        self._lost = False
        self.router: Router | None = None
        self._reporter: asyncio.TimerHandle | None = None
        self._reported_at = 0.0
        self._shares: dict[str, Any] | None = None  # the supervisor's plan before attach
        # Carriers bound by a sibling only (router/carriers/relay.py).
        self._relays: dict[str, RelaySession] = {}
        self._relay_avail: set[str] = set()
        self._bound_told: list[str] | None = None

    def attach(self, engine: Engine, router: Router | None = None) -> None:
        """Carrier receipts this worker did not send go to the siblings
        first; the router's rate demand goes to the supervisor every second."""
        self.engine = engine
        engine.offer_receipt = self.offer_receipt
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(1.0, self._sweep)
        if router is not None:
            self.router = router
            if self._shares is not None:  # sent while the router was starting
                self._apply_shares(self._shares)
            router.rate_demand(1.0)  # starts the counts from here
            self._reported_at = time.monotonic()
            self._reporter = loop.call_later(shares.INTERVAL, self._report)
        self.refresh_relays()

    def _report(self) -> None:
        now = time.monotonic()
        try:
            if self.router is not None and not self._lost:
                demand = self.router.rate_demand(now - self._reported_at)
                self._send({"op": "demand", **demand})
        except Exception as exc:  # the next report comes all the same
            log.error("rate_demand_failed", error=type(exc).__name__)
        try:
            self._report_bound()
        except Exception as exc:
            log.error("bound_report_failed", error=type(exc).__name__)
        self._reported_at = now
        self._reporter = asyncio.get_running_loop().call_later(shares.INTERVAL, self._report)

    async def open(self, on_lost: Callable[[], None]) -> None:
        self._reader, self._writer = await asyncio.open_unix_connection(
            sock=self._sock, limit=LINE_LIMIT
        )
        self._task = asyncio.get_running_loop().create_task(self._read(on_lost))

    def _send(self, msg: dict[str, Any]) -> None:
        _write(self._writer, msg)

    def ready(self, ops_port: int) -> None:
        self._send({"op": "ready", "ops": ops_port, "pid": os.getpid()})

    def draining(self) -> None:
        """Before the router stops: its customer receipt sinks stop with it,
        so it takes no more receipts from its siblings (they go the
        database way), and the supervisor offers it none."""
        self._taking = False
        self._send({"op": "draining"})

    async def admit(self, account_id: int, max_binds: int) -> int | None:
        self._seq += 1
        token = self._seq
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting[token] = fut
        self._send({"op": "bind", "token": token, "account": account_id, "max": max_binds})
        try:
            ok = await asyncio.wait_for(fut, ADMIT_TIMEOUT)
        except TimeoutError:
            log.warning("bind_admission_timeout")
            self.release(account_id, token)  # in case it was counted after all
            return None
        finally:
            self._waiting.pop(token, None)
        return token if ok else None

    def release(self, account_id: int, token: int) -> None:
        self._send({"op": "unbind", "token": token, "account": account_id})

    # Receipts: the carrier sends a receipt over any of its binds, so with
    # one carrier account (system_id) shared by the workers about (N-1)/N of
    # them reach a worker that did not send the message. Asking the siblings
    # in memory (through the supervisor, batched per loop turn) costs a few
    # microseconds; the database path (receipt_routes lookup, hand-off table,
    # NOTIFY) that remains for receipts nobody claims costs far more.

    def offer_receipt(self, carrier: str, receipt: CarrierReceipt) -> None:
        if self._lost:
            if self.engine is not None:
                metrics.child(metrics.WORKER_RECEIPTS, "unclaimed").inc()
                self.engine.sibling_receipt_result(carrier, receipt, False)
            return
        self._rid += 1
        rid = self._rid
        self._offered[rid] = (carrier, receipt, time.monotonic())
        self._batch(
            ("receipts", ()), [rid, carrier, receipt.carrier_id, int(receipt.state), receipt.error]
        )

    def _batch(self, key: tuple[str, tuple[tuple[str, int], ...]], item: list[Any]) -> None:
        """Queue an item for the supervisor: one line per loop turn for each
        op and fields (``key``), cut at BATCH items."""
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = []
            asyncio.get_running_loop().call_soon(self._flush_batch, key)
        batch.append(item)

    def _flush_batch(self, key: tuple[str, tuple[tuple[str, int], ...]]) -> None:
        op, fields = key
        for chunk in _chunks(self._batches.pop(key, [])):
            self._send({"op": op, **dict(fields), "items": chunk})

    def _results(self, items: list[list[Any]]) -> None:
        engine = self.engine
        for rid, taken in items:
            entry = self._offered.pop(int(rid), None)
            if entry is None or engine is None:
                continue
            metrics.child(metrics.WORKER_RECEIPTS, "taken" if taken else "unclaimed").inc()
            engine.sibling_receipt_result(entry[0], entry[1], bool(taken))

    def _take(self, origin: int, gen: int, items: list[list[Any]]) -> None:
        """Receipts a sibling got: which of them this worker sent. Every
        item is answered, whatever happens to another."""
        engine = self.engine if self._taking else None
        answers = []
        for item in items:
            taken = False
            try:
                rid, carrier, carrier_id, state, error = item
                if engine is not None:
                    receipt = CarrierReceipt(str(carrier_id), MessageState(state), str(error))
                    taken = engine.take_sibling_receipt(str(carrier), receipt)
            except Exception as exc:  # the sibling falls back to the database path
                log.error("sibling_receipt_failed", error=type(exc).__name__)
                rid = item[0] if isinstance(item, list) and item else None
            answers.append([rid, taken])
        self._send({"op": "receipts_taken", "to": origin, "gen": gen, "items": answers})

    def _sweep(self) -> None:
        """Offers the supervisor never answered (it went away): the database
        path. Relayed submits never answered (the sibling died): resent."""
        now = time.monotonic()
        limit = now - OFFER_TIMEOUT
        stale = [rid for rid, (_, _, at) in self._offered.items() if at < limit]
        if stale:
            self._results([[rid, False] for rid in stale])
        for name, relay in list(self._relays.items()):
            c = self.engine.carriers.get(name) if self.engine is not None else None
            timeout = c.cfg.response_timeout if c is not None else 10.0
            relay.expire(now - timeout - 2 * RELAY_WAIT)
        self._sweeper = asyncio.get_running_loop().call_later(1.0, self._sweep)

    async def _read(self, on_lost: Callable[[], None]) -> None:
        assert self._reader is not None
        try:
            while line := await self._reader.readline():
                try:
                    msg = json.loads(line)
                    op = msg.get("op")
                    if op == "receipts":
                        self._take(int(msg["from"]), int(msg["gen"]), msg["items"])
                    elif op == "receipts_result":
                        self._results(msg["items"])
                    elif op == "shares":
                        self._apply_shares(msg)
                    elif op == "relay":
                        self._serve_relays(int(msg["from"]), int(msg["gen"]), msg["items"])
                    elif op == "relay_result":
                        self._relay_results(msg["items"])
                    elif op == "relays":
                        self._relay_avail = {str(c) for c in msg["carriers"]}
                        self.refresh_relays()
                    else:
                        fut = self._waiting.get(int(msg["token"]))
                        if fut is not None and not fut.done():
                            fut.set_result(bool(msg.get("ok")))
                except Exception as exc:  # one bad line must not end the link
                    log.error("supervisor_message_failed", error=type(exc).__name__)
        except (ConnectionError, OSError):
            pass
        except ValueError as exc:  # a line beyond LINE_LIMIT: the link is unusable
            log.error("supervisor_link_failed", error=type(exc).__name__)
        self._lost = True
        self._relay_avail = set()
        self.refresh_relays()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_result(False)
        self._results([[rid, False] for rid in list(self._offered)])
        on_lost()

    # Carriers that allow fewer binds than there are workers: a worker with
    # no session of its own sends through a sibling that has one.

    def _report_bound(self) -> None:
        """Tell the supervisor which carriers this worker holds a bind of."""
        if self.engine is None:
            return
        own = sorted(name for name, c in self.engine.carriers.items() if _bound_here(c))
        if own != self._bound_told:
            self._bound_told = own
            self._send({"op": "bound", "carriers": own})

    def refresh_relays(self) -> None:
        """Relay sessions for the carriers this worker has no session of and
        a sibling has a bind of; none for the others (also after a reload)."""
        engine = self.engine
        if engine is None:
            return
        # A carrier started with sessions of its own keeps them; one started
        # with none relays (a reload changes sessions at the next restart).
        for name in list(self._relays):
            c = engine.carriers.get(name)
            if c is None or c._tasks or name not in self._relay_avail:
                self._drop_relay(name)
        for name, c in engine.carriers.items():
            if c._tasks or name not in self._relay_avail:
                continue
            sessions: list[Any] = c.sessions  # a RelaySession stands in for a CarrierSession
            relay = self._relays.get(name)
            if relay is not None and relay in sessions:
                continue
            relay = RelaySession(name, c.cfg.window, self._relay_send, time.monotonic)
            self._relays[name] = relay
            sessions.append(relay)
            c._health_changed()
            c._schedule_pump()
            log.info("carrier_relayed", carrier=name)

    def _drop_relay(self, name: str) -> None:
        relay = self._relays.pop(name)
        c = self.engine.carriers.get(name) if self.engine is not None else None
        sessions: list[Any] = c.sessions if c is not None else []
        if c is not None and relay in sessions:
            c._session_closed(relay)  # type: ignore[arg-type]
        relay.close()  # in flight: resent once a sibling binds again, or failed over

    def _relay_send(self, rid: int, carrier: str, data: bytes) -> None:
        self._batch(("relay", ()), [rid, carrier, base64.b64encode(data).decode()])

    def _relay_results(self, items: list[list[Any]]) -> None:
        for rid, carrier, data in items:
            relay = self._relays.get(str(carrier))
            if relay is not None:
                relay.answered(int(rid), base64.b64decode(data) if data else None)

    def _serve_relays(self, origin: int, gen: int, items: list[list[Any]]) -> None:
        """Siblings' submit_sm for carriers this worker has a bind of: queued
        on the carrier ahead of its own traffic (Carrier.relay), each
        submit_sm_resp sent back; None when it cannot be sent (the sibling
        resends it)."""
        engine = self.engine
        for item in items:
            try:
                rid, carrier, data = item
                c = engine.carriers.get(str(carrier)) if engine is not None else None
                if c is None or not _bound_here(c):
                    raise ConnectionError("no bind here")
                pdu = decode(base64.b64decode(data))
                pdu.sequence = 0  # numbered by our session
                c.relay(pdu, self._relay_callback(origin, gen, rid, carrier), RELAY_WAIT)
            except Exception:
                if isinstance(item, list) and len(item) == 3:
                    self._relay_answer(origin, gen, item[0], item[1], None)

    def _relay_callback(
        self, origin: int, gen: int, rid: int, carrier: str
    ) -> Callable[[Pdu | None, Pdu], None]:
        return lambda resp, _req: self._relay_answer(origin, gen, rid, carrier, resp)

    def _relay_answer(
        self, origin: int, gen: int, rid: int, carrier: str, resp: Pdu | None
    ) -> None:
        answer = None if resp is None else base64.b64encode(resp.encode()).decode()
        self._batch(("relay_result", (("to", origin), ("gen", gen))), [rid, carrier, answer])

    def _apply_shares(self, msg: dict[str, Any]) -> None:
        self._shares = msg
        if self.router is not None:
            self.router.apply_shares(int(msg["n"]), msg["a"], msg["c"])

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._reporter is not None:
            self._reporter.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()


def parse_worker_env(value: str) -> tuple[int, int, int, str]:
    index, count, fd, node = value.split("/", 3)
    return int(index), int(count), int(fd), node


async def _work(cfg: Config, *, demo: bool, config_path: str | None) -> int:
    from .app import Router, demo_config, tune_gc

    index, count, fd, node = parse_worker_env(os.environ[ENV_WORKER])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # A reload asked for while starting is done once started (the file is
    # read again then anyway); SIGHUP's default action would end the process.
    hup: list[Router] = []
    reload_pending = asyncio.Event()
    reload_path = config_path if not (demo and not config_path) else None

    def on_hup() -> None:
        if hup:
            asyncio.ensure_future(hup[0].reload(reload_path))
        else:
            reload_pending.set()

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    link = SupervisorLink(fd)

    def lost() -> None:
        if not stop.is_set():
            log.error("supervisor_lost", consequence="draining")
            stop.set()

    await link.open(lost)
    if demo:
        cfg.demo = True
        if not cfg.carriers:
            cfg = demo_config(cfg)
    cfg.node = f"{node}/w{index}"
    cfg.ops_listen = ("127.0.0.1", 0)  # the supervisor serves the configured one
    share_config(cfg, index, count)
    router = Router(cfg, worker=(index, count), supervisor=link)
    try:
        await router.start()
        tune_gc()
        hup.append(router)
        if reload_pending.is_set():
            await router.reload(reload_path)
        link.ready(router.ports["ops"])
        log.info("worker_ready", node=cfg.node)
        await stop.wait()
        log.info("draining")
        return 0
    finally:
        link.draining()
        await router.stop()
        await link.close()
        log.info("stopped")


def worker_main(argv: list[str] | None = None) -> int:
    """``python -m router.workers [--config PATH] [--demo]``: started by the supervisor only."""
    import argparse

    from .app import event_loop_runner
    from .config import load_config
    from .observe import malloc
    from .observe.logging import configure_logging

    parser = argparse.ArgumentParser(prog="router.workers")
    parser.add_argument("--config")
    parser.add_argument("--demo", action="store_true")
    args = parser.parse_args(argv)
    if ENV_WORKER not in os.environ:
        print("router.workers: started by `sms-router run` only", file=sys.stderr)
        return 2
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until _work takes it over
    configure_logging()
    index = os.environ[ENV_WORKER].split("/", 1)[0]
    structlog.contextvars.bind_contextvars(worker=int(index))
    cfg = load_config(args.config)
    malloc.tune()
    return int(event_loop_runner()(_work(cfg, demo=args.demo, config_path=args.config)))


# ------------------------------------------------------------ supervisor side


def hold_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Bind (without listening) a SO_REUSEPORT socket on host:port and return
    it with the port: port 0 becomes a fixed one for every worker, and a port
    some other program holds fails here, once, with a clear error."""
    family, _, _, _, addr = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    if port:
        # Without SO_REUSEPORT first: a program already on the port with
        # SO_REUSEPORT (another router started by hand) would otherwise let
        # our workers join its listeners and share its customers.
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(addr)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock, int(sock.getsockname()[1])


@dataclass
class WorkerState:
    index: int
    proc: asyncio.subprocess.Process | None = None
    ops_port: int | None = None
    binds: dict[int, set[int]] = field(default_factory=dict)  # account -> tokens
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = RESTART_MIN
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    writer: asyncio.StreamWriter | None = None
    demand: shares.Report | None = None  # its last rate demand report
    demand_at: float = 0.0
    told: dict[str, Any] | None = None  # the shares it was last told
    bound: set[str] = field(default_factory=set)  # carriers it holds a bind of
    relays_told: list[str] | None = None  # carriers it was told to relay


class Supervisor:
    """Starts, watches and stops the workers; serves the ops port."""

    def __init__(
        self,
        cfg: Config,
        count: int,
        *,
        config_path: str | None,
        demo: bool,
        env: dict[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.count = count
        self.config_path = config_path
        self.demo = demo
        self.env = dict(os.environ if env is None else env)
        self.workers = [WorkerState(i) for i in range(count)]
        self.node = ""
        self.ports: dict[str, int] = {}
        self._held: list[socket.socket] = []
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        # Receipt offers in flight: (origin worker, rid) -> siblings yet to answer.
        self._offers: dict[tuple[int, int, int], set[int]] = {}
        self._relay_rr = 0
        # Relayed submits in flight, by the worker sending them to the
        # carrier: (origin, its generation, rid) -> carrier.
        self._relaying: dict[int, dict[tuple[int, int, int], str]] = {}
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.m_workers = Gauge(
            "smsrouter_workers",
            "Worker processes by state (listen.workers)",
            ["state"],
            registry=self.registry,
        )
        self.m_restarts = Counter(
            "smsrouter_worker_restarts",
            "Workers started again after they exited unasked",
            registry=self.registry,
        )

    # ----------------------------------------------------------- lifecycle

    def _shared_keys(self) -> None:
        """Keys each router makes up when unset (with a warning) must be one
        for all the workers: webhooks of one account signed alike, audit
        hashes comparable. Made here once, for this run of the supervisor."""
        from .dlr.webhooks import SECRET_ENV
        from .store.audit import AUDIT_KEY_ENV

        if not self.env.get(SECRET_ENV):
            self.env[SECRET_ENV] = secrets.token_hex(32)
            log.warning(
                "webhook_signing_key_generated",
                hint=f"set {SECRET_ENV} so signatures survive restarts and agree across nodes",
            )
        if not self.env.get(AUDIT_KEY_ENV) and not self.demo:
            self.env[AUDIT_KEY_ENV] = "hex:" + secrets.token_hex(32)
            log.warning(
                "audit_key_missing",
                consequence="number hashes in audit_log are not comparable across restarts",
            )

    async def start(self) -> None:
        from .app import node_id

        self._shared_keys()

        for name in ("smpp", "http"):
            host, port = getattr(self.cfg, f"{name}_listen")
            sock, self.ports[name] = hold_port(host, port)
            self._held.append(sock)
        self.cfg.smpp_listen = (self.cfg.smpp_listen[0], self.ports["smpp"])
        self.cfg.http_listen = (self.cfg.http_listen[0], self.ports["http"])
        self.node = node_id(self.cfg)  # may hold a slash: parse_worker_env splits 3 times
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT))
        await self._serve_ops()
        for w in self.workers:
            await self._spawn(w)
        self._task(self._rebalancing())
        waits = [asyncio.ensure_future(self._first_ready(w)) for w in self.workers]
        try:
            await asyncio.gather(*waits)
        except BaseException:
            for t in waits:
                t.cancel()
            raise

    async def _first_ready(self, w: WorkerState) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not w.ready.is_set():
            if w.proc is not None and w.proc.returncode is not None:
                raise RuntimeError(f"worker {w.index} exited ({w.proc.returncode}) while starting")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {w.index} not ready in {READY_TIMEOUT:.0f} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(w.ready.wait(), 0.2)

    async def _spawn(self, w: WorkerState) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(self.env)
        env[ENV_WORKER] = f"{w.index}/{self.count}/{child.fileno()}/{self.node}"
        env["ROUTER_WORKERS"] = str(self.count)  # what a worker's reload reads back
        env["ROUTER_SMPP_LISTEN"] = _addr(self.cfg.smpp_listen)
        env["ROUTER_HTTP_LISTEN"] = _addr(self.cfg.http_listen)
        if self.cfg.database_url:
            env["ROUTER_DATABASE_URL"] = self.cfg.database_url
        argv = [sys.executable, "-m", "router.workers"]
        if self.config_path:
            argv += ["--config", self.config_path]
        if self.demo:
            argv.append("--demo")
        try:
            w.proc = await asyncio.create_subprocess_exec(
                *argv, env=env, pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL
            )
        finally:
            child.close()
        w.started_at = time.monotonic()
        w.ready.clear()
        w.ops_port = None
        w.binds.clear()
        w.demand, w.told = None, None
        w.bound, w.relays_told = set(), None
        try:
            reader, w.writer = await asyncio.open_unix_connection(sock=parent, limit=LINE_LIMIT)
        except BaseException:
            w.proc.kill()  # no link: it would wait for nothing; _retry starts another
            await w.proc.wait()
            parent.close()
            raise
        log.info("worker_started", worker=w.index, pid=w.proc.pid)
        self._task(self._control(w, reader, w.writer))
        self._task(self._watch(w, w.proc))
        self._publish()
        self.rebalance()  # its share (and the others' smaller ones) at once

    def _task(self, coro: Awaitable[Any]) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _control(
        self, w: WorkerState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while line := await reader.readline():
                try:
                    msg = json.loads(line)
                    op = msg["op"]
                except (ValueError, KeyError, TypeError):
                    log.warning("worker_message_invalid", worker=w.index)
                    continue
                if op == "ready":
                    w.ops_port = int(msg["ops"])
                    w.ready.set()
                    self._publish()
                    self._relays_changed()
                elif op == "bind":
                    ok = self._admit(w, int(msg["account"]), int(msg["max"]), int(msg["token"]))
                    _write(writer, {"token": msg["token"], "ok": ok})
                elif op == "receipts":
                    self._fan_out(w, msg["items"])
                elif op == "receipts_taken":
                    self._collect(w, int(msg["to"]), int(msg["gen"]), msg["items"])
                elif op == "relay":
                    self._route_relays(w, msg["items"])
                elif op == "relay_result":
                    self._relay_answered(w, int(msg["to"]), int(msg["gen"]), msg["items"])
                elif op == "bound":
                    w.bound = {str(c) for c in msg["carriers"]}
                    self._relays_changed()
                elif op == "demand":
                    w.demand = {"a": msg.get("a") or [], "c": msg.get("c") or []}
                    w.demand_at = time.monotonic()
                elif op == "draining":
                    w.ready.clear()
                    self._publish()
                    self._relays_changed()
                elif op == "unbind":
                    tokens = w.binds.get(int(msg["account"]))
                    if tokens is not None:
                        tokens.discard(int(msg["token"]))
                        if not tokens:
                            del w.binds[int(msg["account"])]
        except (ConnectionError, OSError):
            pass
        except Exception as exc:  # a defect here must not leave the worker unserved
            log.error("worker_link_failed", worker=w.index, error=type(exc).__name__)
            if w.proc is not None and w.proc.returncode is None:
                w.proc.kill()  # started again by _watch, with a fresh link
        finally:
            writer.close()

    def _fan_out(self, w: WorkerState, items: list[list[Any]]) -> None:
        """A worker's unknown receipts, to every other ready worker."""
        targets = [x for x in self.workers if x is not w and x.ready.is_set() and x.writer]
        if not targets:
            _write(w.writer, {"op": "receipts_result", "items": [[i[0], False] for i in items]})
            return
        line = {"op": "receipts", "from": w.index, "gen": w.restarts, "items": items}
        for x in targets:
            _write(x.writer, line)
        indexes = {x.index for x in targets}
        for item in items:
            self._offers[(w.index, w.restarts, int(item[0]))] = set(indexes)

    def _collect(self, x: WorkerState, origin: int, gen: int, items: list[list[Any]]) -> None:
        """Worker x's answers to ``origin``'s offers: the first taker, or
        'unclaimed' once every sibling said no. ``gen`` is the origin's
        generation (restarts), so answers meant for a worker that has died
        since never match the offers of the one started in its place."""
        done = []
        for rid, taken in items:
            if rid is None:
                continue
            key = (origin, gen, int(rid))
            waiting = self._offers.get(key)
            if waiting is None:
                continue
            waiting.discard(x.index)
            if taken or not waiting:
                del self._offers[key]
                done.append([rid, bool(taken)])
        if done:
            _write(self.workers[origin].writer, {"op": "receipts_result", "items": done})

    def _forget_offers(self, gone: WorkerState) -> None:
        """A worker exited: its own offers go, and it answers no to the others'."""
        results: dict[int, list[list[Any]]] = {}
        for key in list(self._offers):
            origin, _, rid = key
            waiting = self._offers[key]
            if origin == gone.index:
                del self._offers[key]
            elif gone.index in waiting:
                waiting.discard(gone.index)
                if not waiting:
                    del self._offers[key]
                    results.setdefault(origin, []).append([rid, False])
        for origin, done in results.items():
            _write(self.workers[origin].writer, {"op": "receipts_result", "items": done})

    def rebalance(self) -> None:
        """Share every rate some worker asked of over the running workers,
        by demand (router/shares.py); tell each worker what changed. Never
        raises: on a defect the shares stay as they were until next round."""
        try:
            live = [w for w in self.workers if w.writer is not None and _running(w)]
            fresh = time.monotonic() - shares.STALE_AFTER
            reports = {w.index: w.demand for w in live if w.demand_at >= fresh}
            plan = shares.allocate(reports, [w.index for w in live])
            for w in live:
                mine = plan[w.index]
                if mine != w.told:
                    w.told = mine
                    _write(w.writer, {"op": "shares", **mine})
        except Exception as exc:
            log.error("rebalance_failed", error=type(exc).__name__)

    async def _rebalancing(self) -> None:
        while True:
            await asyncio.sleep(shares.INTERVAL)
            self.rebalance()

    def _relays_changed(self) -> None:
        """Tell each running worker which carriers a ready sibling holds a
        bind of (it relays those it has no session of)."""
        for w in self.workers:
            if w.writer is None or not _running(w):
                continue
            avail = sorted(
                set().union(*(x.bound for x in self.workers if x is not w and x.ready.is_set()))
            )
            if avail != w.relays_told:
                w.relays_told = avail
                _write(w.writer, {"op": "relays", "carriers": avail})

    def _route_relays(self, w: WorkerState, items: list[list[Any]]) -> None:
        """A worker's relayed submits, each to a ready sibling bound to the
        carrier (round robin); None at once when there is none."""
        groups: dict[int, list[list[Any]]] = {}
        nobody: list[list[Any]] = []
        for item in items:
            carrier = str(item[1])
            targets = [
                x
                for x in self.workers
                if x is not w and x.ready.is_set() and carrier in x.bound and x.writer
            ]
            if not targets:
                nobody.append([item[0], carrier, None])
                continue
            self._relay_rr += 1
            target = targets[self._relay_rr % len(targets)]
            groups.setdefault(target.index, []).append(item)
            self._relaying.setdefault(target.index, {})[w.index, w.restarts, int(item[0])] = carrier
        for index, group in groups.items():
            line = {"op": "relay", "from": w.index, "gen": w.restarts, "items": group}
            _write(self.workers[index].writer, line)
        if nobody:
            _write(w.writer, {"op": "relay_result", "items": nobody})

    def _relay_answered(self, x: WorkerState, to: int, gen: int, items: list[list[Any]]) -> None:
        """Worker x's answers to relayed submits, to the worker that sent
        them (unless it has died since: its replacement resends them)."""
        in_flight = self._relaying.get(x.index, {})
        for item in items:
            in_flight.pop((to, gen, int(item[0])), None)
        origin = self.workers[to]
        if origin.restarts == gen:
            _write(origin.writer, {"op": "relay_result", "items": items})

    def _forget_relays(self, gone: WorkerState) -> None:
        """A worker exited with relayed submits in flight: each sender hears
        'no answer' now (and resends), not after its timeout."""
        answers: dict[tuple[int, int], list[list[Any]]] = {}
        for (origin, gen, rid), carrier in self._relaying.pop(gone.index, {}).items():
            answers.setdefault((origin, gen), []).append([rid, carrier, None])
        for (origin, gen), items in answers.items():
            w = self.workers[origin]
            if w.restarts == gen:
                for chunk in _chunks(items):
                    _write(w.writer, {"op": "relay_result", "items": chunk})

    def _admit(self, w: WorkerState, account: int, max_binds: int, token: int) -> bool:
        held = sum(len(x.binds.get(account, ())) for x in self.workers)
        if held >= max_binds:
            return False
        w.binds.setdefault(account, set()).add(token)
        return True

    async def _watch(self, w: WorkerState, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        w.binds.clear()  # its binds died with it
        w.ready.clear()
        w.demand, w.told = None, None
        w.bound = set()
        self.rebalance()  # its shares go to the others now
        self._relays_changed()
        self._forget_offers(w)
        self._forget_relays(w)
        w.ops_port = None
        self._publish()
        if self._stopping:
            return
        log.error("worker_exited", worker=w.index, pid=proc.pid, code=code)
        if time.monotonic() - w.started_at > STABLE_AFTER:
            w.backoff = RESTART_MIN
        restarted = False
        while True:
            delay = w.backoff  # 1 s, doubling to 30 s while it keeps failing
            w.backoff = min(RESTART_MAX, w.backoff * 2)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            if not restarted:
                restarted = True
                w.restarts += 1
                self.m_restarts.inc()
            try:
                await self._spawn(w)
                return
            except Exception as exc:  # fork/exec or the link failed: again, later
                log.error("worker_start_failed", worker=w.index, error=type(exc).__name__)

    def _publish(self) -> None:
        alive = sum(1 for w in self.workers if _running(w))
        ready = sum(1 for w in self.workers if w.ready.is_set())
        self.m_workers.labels("configured").set(self.count)
        self.m_workers.labels("running").set(alive)
        self.m_workers.labels("ready").set(ready)

    def signal_all(self, sig: int, *, ready_only: bool = False) -> None:
        for w in self.workers:
            if ready_only and not w.ready.is_set():
                continue  # a starting worker reads the config file when it is ready
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Drain every worker (SIGTERM), SIGKILL what is left after ``grace``."""
        self._stopping = True
        self.signal_all(signal.SIGTERM)
        procs = [w.proc for w in self.workers if w.proc is not None]
        if procs:
            done, pending = await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in procs], timeout=grace
            )
            if pending:
                log.error("workers_killed", count=len(pending), after_s=grace)
                self.signal_all(signal.SIGKILL)
                await asyncio.wait(pending, timeout=5.0)
        for t in list(self._tasks):
            t.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        for sock in self._held:
            sock.close()
        self._held.clear()

    # ----------------------------------------------------------------- ops

    async def _serve_ops(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        host, port = self.cfg.ops_listen
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        server = site._server
        assert server is not None
        self.ports["ops"] = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def _get(self, w: WorkerState, path: str) -> tuple[int, str] | None:
        if w.ops_port is None or self._session is None:
            return None
        try:
            async with self._session.get(f"http://127.0.0.1:{w.ops_port}{path}") as resp:
                return resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    async def _each(self, path: str) -> list[tuple[int, str] | None]:
        return list(await asyncio.gather(*(self._get(w, path) for w in self.workers)))

    async def _readyz(self, request: web.Request) -> web.Response:
        """Ready while at least one worker is: a dead worker's listeners are
        closed, so the kernel gives its share of connections to the others,
        and one worker restarting must not take the whole host out of a
        load balancer. Each worker's detail is in the body;
        SmsRouterWorkersNotReady alerts on a worker missing."""
        return await self._quorum("/readyz", "ready", "not ready")

    async def _healthz(self, request: web.Request) -> web.Response:
        """Healthy while at least one worker's loop answers (see _readyz)."""
        return await self._quorum("/healthz", "status", "unhealthy")

    async def _quorum(self, path: str, key: str, bad: str) -> web.Response:
        answers = await self._each(path)
        detail: dict[str, Any] = {}
        good = 0
        for w, ans in zip(self.workers, answers, strict=True):
            if ans is None:
                detail[str(w.index)] = {key: False if key == "ready" else "not answering"}
                continue
            good += ans[0] == 200
            try:
                detail[str(w.index)] = json.loads(ans[1])
            except ValueError:
                detail[str(w.index)] = {key: False if key == "ready" else "bad answer"}
        ok = good > 0 and not self._stopping
        head: dict[str, Any] = (
            {"ready": ok, "draining": self._stopping}
            if key == "ready"
            else {"status": "ok" if ok else bad}
        )
        return web.json_response(
            {**head, "workers_ok": good, "workers_configured": self.count, "workers": detail},
            status=200 if ok else 503,
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        answers = await self._each("/metrics")
        texts = {}
        for w, a in zip(self.workers, answers, strict=True):
            if a is not None and a[0] == 200:
                texts[str(w.index)] = a[1]
            elif a is not None:
                log.warning("worker_metrics_failed", worker=w.index, status=a[0])
        texts["supervisor"] = generate_latest(self.registry).decode()
        return web.Response(
            body=merge_expositions(texts), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


def merge_expositions(texts: dict[str, str]) -> bytes:
    """Prometheus text expositions (prometheus_client's: each family a HELP
    line, a TYPE line, its samples), one per worker, as one: every sample
    gets a ``worker`` label, and each family's samples from every worker are
    put together under one HELP/TYPE (the format wants a family in one
    group). Line by line, without parsing values: a scrape of several
    workers with thousands of series each stays in the milliseconds on the
    supervisor's loop, which also answers bind admissions and receipt offers."""
    heads: dict[str, list[str]] = {}  # family -> its HELP and TYPE lines (the first seen)
    samples: dict[str, list[str]] = {}
    for worker, text in texts.items():
        label = f'worker="{worker}"'
        family: list[str] | None = None
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                name = line[7:].split(" ", 1)[0]
                head = heads.setdefault(name, [])
                if not any(h.startswith(line[:7]) for h in head):
                    head.append(line)
                family = samples.setdefault(name, [])
            elif not line or line[0] == "#" or family is None:
                continue
            else:
                brace, space = line.find("{"), line.find(" ")
                if brace >= 0 and (space < 0 or brace < space):
                    family.append(f"{line[: brace + 1]}{label},{line[brace + 1 :]}")
                elif space > 0:
                    family.append(f"{line[:space]}{{{label}}}{line[space:]}")
    out = []
    for name, head in heads.items():
        out.extend(head)
        out.extend(samples[name])
    out.append("")
    return "\n".join(out).encode()


def _bound_here(c: Any) -> bool:
    """The carrier has a bind of this worker's own (not a relay)."""
    return any(not getattr(s, "relayed", False) for s in c.sessions)


def _chunks(items: list[list[Any]], size: int = BATCH) -> list[list[list[Any]]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _running(w: WorkerState) -> bool:
    return w.proc is not None and w.proc.returncode is None


def _write(writer: asyncio.StreamWriter | None, msg: dict[str, Any]) -> None:
    if writer is not None and not writer.is_closing():
        writer.write(json.dumps(msg).encode() + b"\n")


def _addr(hp: tuple[str, int]) -> str:
    host, port = hp
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def supervise(
    cfg: Config, *, demo: bool, data_dir: Path, config_path: str | None = None
) -> int:
    """``sms-router run`` with ``listen.workers`` > 1 (see the module docstring)."""
    from .app import DemoBacking, banner_lines

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    backing = DemoBacking()
    sup: Supervisor | None = None
    try:
        if demo:
            cfg = await backing.start(cfg, data_dir, prepare_db=True)
        sup = Supervisor(cfg, cfg.workers, config_path=config_path, demo=demo)
        loop.add_signal_handler(
            signal.SIGHUP, lambda: sup.signal_all(signal.SIGHUP, ready_only=True)
        )
        await sup.start()
        lines = banner_lines(cfg, sup.ports, demo, backing.embedded is not None)
        lines.insert(1, f"  workers   {cfg.workers} processes, node ids {sup.node}/w0..")
        print("\n".join(lines), file=sys.stdout, flush=True)
        await stop.wait()
        log.info("draining")
        return 0
    finally:
        if sup is not None:
            await sup.stop()
        await backing.stop()
        log.info("stopped")


if __name__ == "__main__":
    raise SystemExit(worker_main())
