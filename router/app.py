"""Wiring: build every room from the Config, start them in order, stop them
in reverse. Also the demo mode (embedded PostgreSQL + carrier simulators).
"""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from aiohttp import web

from . import __version__, accel
from .accounts import AccountStore, ensure_demo_account
from .carriers.deadline import ReceiptDeadlines
from .config import (
    MAX_WORKERS,
    CarrierConfig,
    Config,
    ConfigError,
    RouteEntry,
    RoutesConfig,
    check_workers,
    load_config,
    share_config,
)
from .dlr.webhooks import PER_ACCOUNT, PER_HOST, WebhookSender
from .engine import Engine
from .ingress.admin import add_admin_routes
from .ingress.handoff import ReceiptHandoff
from .ingress.http import make_api
from .ingress.smpp import SmppFrontDoor
from .model import Origin
from .observe import malloc, metrics
from .observe.health import make_ops
from .store.audit import load_audit_key
from .store.db import create_pool, migrate
from .store.optout import ACCOUNTS_CHANNEL, OptOutList
from .store.retention import RetentionTask
from .store.spool import MemorySpool, PgSpool, load_key
from .store.trafficlog import TrafficLog
from .store.vacuum import QueueVacuum

log = structlog.get_logger("router.app")

DEMO_SIM_PORTS = (2776, 2777)
EUROPE = (
    "AT BE BG CH CY CZ DE DK EE ES FI FR GB GR HR HU IE IS IT LI LT LU LV MT NL NO "
    "PL PT RO SE SI SK"
).split()


def demo_config(base: Config, sim_ports: tuple[int, int] = DEMO_SIM_PORTS) -> Config:
    """Two simulated carriers: one for Europe, one for the rest of the world."""
    base.carriers = [
        CarrierConfig(
            name="sim-eu",
            port=sim_ports[0],
            system_id="router",
            password="sim",
            tps=5000.0,
            window=256,
        ),
        CarrierConfig(
            name="sim-world",
            port=sim_ports[1],
            system_id="router",
            password="sim",
            tps=5000.0,
            window=256,
        ),
    ]
    base.routes = RoutesConfig(
        default=[RouteEntry("sim-world")],
        countries={cc: [RouteEntry("sim-eu", 1), RouteEntry("sim-world", 2)] for cc in EUROPE},
    )
    base.demo = True
    return base


def node_id(cfg: Config) -> str:
    """This router's id among the routers sharing its database: the
    configured ``delivery.node``, else host name and SMPP port (stable across
    restarts, so a restarted router resends what it left queued at once).
    With an ephemeral port (0) there is nothing stable to name it by: the
    process id and a random suffix stand in (several routers may run in one
    process, as in tests), and what it leaves after a crash is adopted by a
    live node (itself, restarted) after node_grace seconds."""
    if cfg.node:
        return cfg.node
    port = cfg.smpp_listen[1] or cfg.http_listen[1]
    if port:
        return f"{socket.gethostname()}:{port}"
    return f"{socket.gethostname()}:pid{os.getpid()}-{secrets.token_hex(4)}"


def _log_build() -> None:
    """Say whether the per-message modules run compiled (router/accel.py)."""
    st = accel.status()
    metrics.BUILD_INFO.labels(version=__version__, compiled=str(st["kind"])).set(1)
    fields: dict[str, object] = {"version": __version__, "compiled": st["kind"]}
    if st["interpreted"]:
        fields["interpreted"] = st["interpreted"]
    if st["stale"]:
        fields["stale"] = st["stale"]
        fields["fix"] = "rebuild: make build (or pip install .)"
        log.warning("build", **fields)
    else:
        log.info("build", **fields)


@dataclass
class Router:
    """A running router: what ``start`` built, so ``stop`` can undo it."""

    cfg: Config
    pool: asyncpg.Pool | None = None
    accounts: AccountStore = field(default_factory=AccountStore)
    traffic_log: TrafficLog | None = None
    engine: Engine | None = None
    spool: MemorySpool | PgSpool | None = None
    webhooks: WebhookSender | None = None
    smpp: SmppFrontDoor | None = None
    handoff: ReceiptHandoff | None = None
    optout: OptOutList | None = None
    retention: RetentionTask | None = None
    vacuum: QueueVacuum | None = None
    deadlines: ReceiptDeadlines | None = None
    runners: list[web.AppRunner] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    draining: bool = False
    # Worker ``index`` of ``count`` processes sharing the listen ports
    # (router/workers.py): listeners with SO_REUSEPORT, totals divided.
    worker: tuple[int, int] | None = None
    supervisor: Any = None  # a worker's link to its supervisor (workers.SupervisorLink)
    # This worker's fraction of each account's tps, from the supervisor's
    # rebalance (router/shares.py); accounts not in it get ``share_default``.
    account_shares: dict[int, float] = field(default_factory=dict)
    share_default: float | None = None

    @property
    def worker_count(self) -> int:
        return self.worker[1] if self.worker else 1

    def _set_account_rates(self) -> None:
        if self.engine is not None:
            default = self.share_default or 1.0 / self.worker_count
            shares = self.account_shares
            self.engine.set_account_rates(
                {
                    a.id: a.tps * shares.get(a.id, default) if a.tps else a.tps
                    for a in self.accounts.by_id.values()
                }
            )

    def rate_demand(self, elapsed: float) -> dict[str, list[list[Any]]]:
        """What this worker asked of each rate limit in the last ``elapsed``
        seconds, per second, with the limit's total (router/shares.py)."""
        if self.engine is None or elapsed <= 0:
            return {"a": [], "c": []}
        asked_a, asked_c = self.engine.demand()
        by_id = self.accounts.by_id
        accounts = [
            [aid, round(n / elapsed, 3), by_id[aid].tps]
            for aid, n in asked_a.items()
            if aid in by_id and by_id[aid].tps
        ]
        carriers = self.engine.carriers
        return {
            "a": accounts,
            "c": [
                [name, round(n / elapsed, 3), carriers[name].cfg.tps] for name, n in asked_c.items()
            ],
        }

    def apply_shares(self, n: int, accounts: dict[str, float], carriers: dict[str, float]) -> None:
        """The supervisor's rebalance: fractions of the account and carrier
        rates for this worker, 1/n of those not named."""
        self.share_default = 1.0 / max(1, n)
        self.account_shares = {int(k): float(v) for k, v in accounts.items()}
        self._set_account_rates()
        if self.engine is not None:
            self.engine.set_carrier_shares(
                {str(k): float(v) for k, v in carriers.items()}, self.share_default
            )

    async def start(self, *, migrate_schema: bool = False) -> None:
        cfg = self.cfg
        _log_build()
        if cfg.database_url is None:
            raise RuntimeError("no database: set ROUTER_DATABASE_URL or database.url")
        self.pool = await create_pool(cfg.database_url)
        if migrate_schema:
            async with self.pool.acquire() as conn:
                await migrate(conn)
        if cfg.demo:
            await ensure_demo_account(self.pool)
        await self.accounts.load(self.pool)
        audit_key = load_audit_key(demo=cfg.demo)
        self.optout = OptOutList(audit_key)
        await self.optout.load(self.pool)
        self.optout.start(self.pool, also={ACCOUNTS_CHANNEL: self._reload_accounts})
        self.retention = RetentionTask(self.pool)
        self.retention.start()
        self.vacuum = QueueVacuum(
            self.pool, dead_rows=cfg.vacuum_dead_rows, interval=cfg.vacuum_check_interval
        )
        self.vacuum.start()
        self.traffic_log = TrafficLog(
            self.pool if cfg.traffic_log else None,
            limit=cfg.log_buffer,
            flush_rows=cfg.log_flush_rows,
            flush_interval=cfg.log_flush_interval,
            barrier_delay=cfg.spool_flush_interval,
        )
        self.traffic_log.start()
        if cfg.delivery_guarantee == "at-least-once":
            key = load_key(os.environ.get("ROUTER_SPOOL_KEY"))
            if key is None:
                log.warning(
                    "spool_key_missing",
                    consequence="secret messages are held in memory only (at-most-once)",
                )
            self.spool = PgSpool(
                self.pool,
                key=key,
                max_rows=cfg.spool_max_rows,
                flush_interval=cfg.spool_flush_interval,
                node=node_id(cfg),
                node_grace=cfg.node_grace,
                receipt_timeout=cfg.receipt_timeout,
            )
        else:
            log.warning(
                "delivery_guarantee_in_memory",
                consequence="accepted messages are lost if the process dies",
            )
            self.spool = MemorySpool()
        self.engine = Engine(
            cfg,
            self.traffic_log,
            spool=self.spool,
            optout=self.optout,
            share=1.0 / self.worker_count,
        )
        self._set_account_rates()
        # Demo mode is all on loopback, so its webhooks may target it too.
        w = cfg.webhooks
        shares = webhook_shares(self.worker_count)
        self.webhooks = WebhookSender(
            self.accounts,
            initial_backoff=w.initial_backoff,
            max_backoff=w.max_backoff,
            max_attempts=w.max_attempts,
            timeout=w.timeout,
            allow_private_targets=w.allow_private_targets or cfg.demo,
            pool=self.pool,  # the durable outbox (migration 008); secret messages stay in memory
            per_account=shares[0],
            per_host=shares[1],
            write_interval=w.outbox_write_interval,
            lease=w.outbox_lease,
        )
        self.engine.sinks[Origin.HTTP] = self.webhooks
        self.webhooks.start()
        replay = await self.spool.load()
        if isinstance(self.spool, PgSpool):
            log.info("spool_node", node=self.spool.node)
            self.spool.on_adopt = self.engine.resume
        self.spool.start()
        self.engine.start()
        if replay:
            log.info("spool_replayed", messages=self.engine.resume(replay))
        self.smpp = SmppFrontDoor(cfg, self.engine, self.accounts)
        if self.supervisor is not None:
            self.smpp.admission = self.supervisor  # max_binds across the workers
            self.supervisor.attach(self.engine, self)  # receipts, rate shares
        self.smpp.reuse_port = self.worker is not None
        if isinstance(self.spool, PgSpool):
            self.handoff = ReceiptHandoff(
                self.pool,
                self.spool.node,
                self.smpp.take_handed_over,
                self.engine.take_forwarded_receipt,
                node_grace=cfg.node_grace,
                park_limit=cfg.smpp.receipt_buffer,
            )
            self.smpp.handoff = self.handoff
            self.engine.forward_receipt = self.handoff.forward_carrier_receipt
            self.handoff.start()
            handoff = self.handoff
            spool = self.spool
            finished = None
            if cfg.traffic_log:  # only it knows a final status the routes outlived
                # The database's clock: routes carry its created_at.
                started = await spool.pool.fetchval("SELECT now()")

                def finished(after: str, limit: int, node: tuple[str, Any] | None) -> Any:
                    if node is None:  # this node's previous life
                        return spool.finished_routes(started, after, limit)
                    return spool.finished_routes(node[1], after, limit, node[0])

            self.deadlines = ReceiptDeadlines(
                spool.claim_overdue_routes,
                self.engine.finish_overdue,
                lambda: handoff.live,
                finished=finished,
            )
            self.deadlines.start()
            spool.on_adopt_node = self.deadlines.resend_for
            for node, adopted_at in spool.adopted_nodes:  # adopted before this was wired
                self.deadlines.resend_for(node, adopted_at)
            spool.adopted_nodes.clear()
        self.ports["smpp"] = await self.smpp.start()
        api = make_api(cfg, self.engine, self.accounts, pool=self.pool)
        add_admin_routes(api, lambda: self.pool, self.accounts, self.optout, audit_key)
        for name, app, (host, port) in (
            ("http", api, cfg.http_listen),
            ("ops", make_ops(self.ready), cfg.ops_listen),
        ):
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(
                runner,
                host,
                port,
                reuse_address=True,
                reuse_port=(self.worker is not None and name == "http") or None,
            )
            await site.start()
            self.runners.append(runner)
            server = site._server
            assert server is not None
            self.ports[name] = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    def ready(self) -> tuple[bool, dict[str, Any]]:
        if self.engine is None or self.traffic_log is None:
            return False, {"reason": "starting"}
        carriers = self.engine.carrier_health()
        log_ok = self.traffic_log.healthy or self.traffic_log.depth < self.traffic_log.limit * 0.9
        routes_ok = any(c["up"] for c in carriers.values())
        spool_ok = not isinstance(self.spool, PgSpool) or self.spool.healthy
        ok = routes_ok and log_ok and spool_ok and not self.draining
        return ok, {
            "draining": self.draining,
            "carriers": carriers,
            "traffic_log": {
                "healthy": self.traffic_log.healthy,
                "buffered": self.traffic_log.depth,
            },
            "spool": {
                "durable": bool(self.spool and self.spool.durable),
                "rows": self.spool.size if self.spool else 0,
                "healthy": spool_ok,
            },
        }

    async def _reload_accounts(self) -> None:
        if self.pool is not None:
            await self.accounts.load(self.pool)

    async def reload(self, config_path: str | None = None) -> bool:
        """SIGHUP: routes, carriers and [smpp] settings (session settings for
        new binds; receipts, reassembly and throttle holds at once) from
        the config file, accounts and keys from the database; customer binds
        stay up. A config that does not
        check out is refused whole and the running one stays."""
        if config_path:
            try:
                new = load_config(config_path)
            except ConfigError as exc:
                log.error("reload_refused", error=str(exc))
                return False
            new.database_url = self.cfg.database_url
            new.demo = self.cfg.demo
            if self.worker is not None:
                if new.workers != self.worker[1]:
                    log.warning("reload_workers_ignored", hint="restart to change")
                new.workers = self.worker[1]
                new.node = self.cfg.node
                new.smpp_listen, new.http_listen = self.cfg.smpp_listen, self.cfg.http_listen
                new.ops_listen = self.cfg.ops_listen
                if self.cfg.demo and not new.carriers:
                    new = demo_config(new)
                share_config(new, *self.worker)
            if self.engine is not None:
                changes = self.engine.reconfigure(new)
                log.info("carriers_reloaded", **changes)
                if self.supervisor is not None:
                    self.supervisor.refresh_relays()  # carriers added with no session here
            if self.smpp is not None:
                self.smpp.reconfigure(new)
            self.cfg = new
        if self.pool is not None:
            await self.accounts.load(self.pool)
        self._set_account_rates()
        log.info("reloaded", accounts=len(self.accounts.by_id))
        return True

    async def stop(self, timeout: float = 10.0) -> None:
        """Drain: refuse new work, unbind customers, finish carrier windows, flush the log."""
        self.draining = True
        if self.engine is not None:
            self.engine.accepting = False
        if self.smpp is not None:
            await self.smpp.stop(timeout=min(3.0, timeout))
        for runner in self.runners:
            await runner.cleanup()
        self.runners.clear()
        if self.deadlines is not None:
            await self.deadlines.stop()
        if self.engine is not None:
            await self.engine.stop(timeout=min(5.0, timeout))
        if self.webhooks is not None:
            await self.webhooks.stop(grace=min(3.0, timeout))
        if self.handoff is not None:
            if self.smpp is not None:
                self.smpp.park_pending()  # written (and counted) by handoff.stop()
            tlog = self.traffic_log
            await self.handoff.stop(
                None if tlog is None else partial(tlog.settle, timeout=min(3.0, timeout))
            )
        if self.spool is not None:
            if self.traffic_log is not None:
                # Route deletes wait for the log's write (Engine._forget_route).
                await self.traffic_log.settle(timeout=min(3.0, timeout))
            await self.spool.close(timeout=min(5.0, timeout))
        if self.traffic_log is not None:
            await self.traffic_log.close(timeout=min(5.0, timeout))
        if self.retention is not None:
            await self.retention.stop()
        if self.vacuum is not None:
            await self.vacuum.stop()
        if self.optout is not None:
            await self.optout.stop()
        if self.pool is not None:
            await self.pool.close()


def webhook_shares(workers: int) -> tuple[int, int]:
    """Webhook concurrency (per account, per callback host) is a total for
    the router: each of ``workers`` processes gets its share (at least one)."""
    return max(1, PER_ACCOUNT // workers), max(1, PER_HOST // workers)


def tune_gc() -> None:
    """For the daemon process (not for a Router embedded in a larger one):
    start-up objects (modules, config, accounts, route tables) live as long
    as the process, so move them out of the collector's way, and collect the
    young generation less often. On smpp-e2e, GC went from ~17% to under 8%
    of router CPU (full passes 44 -> 4 ms). A young collection walks only
    what is alive at that moment (messages in flight), so collecting every
    100,000 allocations instead of 10,000 walks it a tenth as often: +2.5 %
    msg/s on smpp-e2e in interleaved runs (8.8k/8.8k -> 9.0k/9.0k), peak
    RSS unchanged (161 MB) (2026-12-07)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 20, 20)
    metrics.watch_gc()


async def prepare_demo_database(url: str) -> None:
    """Schema migrated and the demo account made, on the database at ``url``
    (demo mode before its workers start; the benchmarks' fresh databases)."""
    pool = await create_pool(url)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
        await ensure_demo_account(pool)
    finally:
        await pool.close()


@dataclass
class DemoBacking:
    """What ``run --demo`` starts beside the router: the embedded PostgreSQL
    (when no ROUTER_DATABASE_URL is given) and the carrier simulators (when
    the config names no carriers), started once by the process that owns
    them (the router, or the supervisor of its workers)."""

    embedded: Any = None
    sims: list[Any] = field(default_factory=list)

    async def start(self, cfg: Config, data_dir: Path, *, prepare_db: bool = False) -> Config:
        """Starts them and returns the config the router runs with. With
        ``prepare_db``, migrates the database and makes the demo account
        first (the supervisor's job: its workers start at once)."""
        from .sim import CarrierSimulator, SimConfig

        cfg.demo = True  # the demo account, even with carriers from a config file
        if cfg.database_url is None:
            from .store.embedded import EmbeddedPostgres

            self.embedded = EmbeddedPostgres(data_dir / "demo")
            cfg.database_url = await asyncio.to_thread(self.embedded.start)
        if prepare_db and cfg.database_url is not None:
            await prepare_demo_database(cfg.database_url)
        if not cfg.carriers:
            cfg = demo_config(cfg)  # fixed simulator ports: what every worker makes of it too
            for c in cfg.carriers:
                sim = CarrierSimulator(
                    SimConfig(
                        port=c.port,
                        name=c.name,
                        system_id=c.system_id,
                        password=c.password,
                        dlr_delay=0.5,
                        keep_received=0,  # a demo may run for days
                    )
                )
                await sim.start()
                self.sims.append(sim)
        return cfg

    async def stop(self) -> None:
        for sim in self.sims:
            await sim.stop()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)


async def _serve(cfg: Config, *, demo: bool, data_dir: Path, config_path: str | None = None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    backing = DemoBacking()
    router: Router | None = None
    try:
        if demo:
            cfg = await backing.start(cfg, data_dir)
        router = Router(cfg)
        await router.start(migrate_schema=demo)
        tune_gc()
        reload_path = config_path if not (demo and not config_path) else None
        loop.add_signal_handler(
            signal.SIGHUP, lambda: asyncio.ensure_future(router.reload(reload_path))
        )
        lines = banner_lines(router.cfg, router.ports, demo, backing.embedded is not None)
        print("\n".join(lines), file=sys.stdout, flush=True)
        await stop.wait()
        log.info("draining")
        return 0
    finally:
        if router is not None:
            await router.stop()
        await backing.stop()
        log.info("stopped")


def banner_lines(cfg: Config, ports: dict[str, int], demo: bool, embedded: bool) -> list[str]:
    lines = [
        "sms-router is running",
        f"  SMPP      {cfg.smpp_listen[0]}:{ports['smpp']}",
        f"  HTTP API  http://{cfg.http_listen[0]}:{ports['http']}/v1/messages",
        f"  ops       http://{cfg.ops_listen[0]}:{ports['ops']}/metrics  /healthz  /readyz",
    ]
    if demo:
        lines += [
            "",
            "  DEMO MODE - not for production: demo credentials, simulated carriers"
            + (", embedded PostgreSQL" if embedded else ""),
            "  SMPP bind:   system_id=demo  password=demo-pass",
            "  HTTP:        Authorization: Bearer demo-key",
            "  carriers:    "
            + ", ".join(f"{c.name} -> 127.0.0.1:{c.port} (simulator)" for c in cfg.carriers),
            "  try:  curl -s -H 'Authorization: Bearer demo-key' "
            "-H 'Content-Type: application/json' \\",
            f'         -d \'{{"to":"+4512345678","from":"Demo","text":"Hello"}}\' '
            f"http://{cfg.http_listen[0]}:{ports['http']}/v1/messages",
        ]
    return lines


def event_loop_runner() -> Any:
    try:
        import uvloop  # the faster loop, where available

        return uvloop.run
    except ImportError:
        return asyncio.run


def run(config_path: str | None, *, demo: bool, workers: int | None = None) -> int:
    # A reload (SIGHUP) before the handler is installed would end the process
    # (its default action); the config is read at start anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    config_path = config_path or os.environ.get("ROUTER_CONFIG")
    cfg = load_config(config_path)
    if workers is not None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ConfigError(f"--workers: 1..{MAX_WORKERS}")
        cfg.workers = workers
        check_workers(cfg)
    data_dir = Path(os.environ.get("ROUTER_DATA_DIR", ".pgdata"))
    runner = event_loop_runner()
    if cfg.workers > 1:
        from .workers import supervise

        return int(runner(supervise(cfg, demo=demo, data_dir=data_dir, config_path=config_path)))
    log.info("malloc", tuned=malloc.tune())  # before the big dicts exist
    return int(runner(_serve(cfg, demo=demo, data_dir=data_dir, config_path=config_path)))


async def migrate_only(config_path: str | None) -> int:
    cfg = load_config(config_path)
    if cfg.database_url is None:
        print("error: set ROUTER_DATABASE_URL or database.url", file=sys.stderr)
        return 2
    conn = await asyncpg.connect(cfg.database_url)
    try:
        applied = await migrate(conn)
    finally:
        await conn.close()
    print(f"applied migrations: {applied or 'none (up to date)'}")
    return 0


def now() -> float:
    return time.time()
