"""``python -m benchmarks run``: start what a scenario needs, measure, stop it, report.

Per scenario, all on loopback with ports chosen by the kernel:

1. a fresh database ``smsr_bench_<random>`` on a PostgreSQL server (first that works:
   ``$ROUTER_BENCH_DATABASE_URL``, ``$ROUTER_TEST_DATABASE_URL``, the local server on
   127.0.0.1:5432, an embedded server in ``.pgdata/bench``), migrated, with the demo
   account (``demo`` / ``demo-pass``, API key ``demo-key``);
2. two carrier simulators in one process (``sms-router sim --count 2``);
3. the router (``sms-router --config <generated TOML> run``) pointed at them, waited
   for until ``/readyz`` says ready;
4. the load generator (``benchmarks.smpp_load`` or ``benchmarks.http_load``) in its own
   process, so the router's CPU is its own; while it runs, ``/proc`` of the router, the
   simulators and the load generator is sampled every 0.25 s;
5. everything stopped by pid (SIGTERM, then SIGKILL), always, even on an error or
   Ctrl-C; the database dropped; the embedded server (if this run started it) stopped.

Then ``<results>/<scenario>.json`` and ``<scenario>.png`` are written and a table printed.
Every figure comes from the run; nothing is assumed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from .process import (
    Child,
    ChildFailed,
    ProcSample,
    children,
    cpu_seconds,
    memory_kb,
    pid_alive,
    pids_with_cmdline,
    sample,
    sample_tree,
    system_cpu,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
LOCAL_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
DLR_DELAY = 0.1  # simulator: seconds from submit to receipt (a constant, subtract it)
# Simulator deliver_sm window per bind, as wide as its submit window (1000):
# the benchmarks measure the router, and a carrier's receipts per bind are at
# most its window / the router's deliver_sm_resp time (a loop turn, 10-25 ms
# under load). With the simulator's default, 100, two carrier binds took
# receipts at ~6-7.4k/s while the router accepted 8.4-9k msg/s (smpp-e2e,
# 2026-12-07): the simulator's receipt backlog grew and it throttled submits.
SIM_RECEIPT_WINDOW = 1000
SAMPLE_EVERY = 0.25
PACKAGES = ("sms-router", "uvloop", "aiohttp", "asyncpg", "aiosmpplib", "structlog",
            "prometheus-client", "matplotlib")


# ------------------------------------------------------------------ scenarios


@dataclass(frozen=True)
class Timing:
    warmup: float
    duration: float
    drain: float


FULL = Timing(warmup=5.0, duration=60.0, drain=15.0)
QUICK = Timing(warmup=0.0, duration=3.0, drain=5.0)
SETTLE = 30.0  # SMPP: after the load, seconds to wait for a receipt of every accepted id


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "smpp" | "http" | "codec" | "jasmin"
    summary: str
    binds: int = 0
    window: int = 0
    batch: int = 1
    concurrency: int = 0
    traffic_log: bool = True
    default: bool = True  # in `python -m benchmarks run` without scenario names
    config: tuple[tuple[str, str, Any], ...] = ()  # router config (section, key, value)
    rate: float | None = None  # open loop at this rate unless --rate says otherwise
    fixed_rate: bool = False  # --rate does not change `rate` (overload: 5x the carriers)
    carrier_tps: float = 1_000_000.0  # router -> each carrier, messages/s
    carrier_queue: int = 50_000  # router queue per carrier, segments
    sim_args: tuple[str, ...] = ()  # extra `sms-router sim` arguments
    quick_sim_args: tuple[str, ...] | None = None  # ... with --quick (default: sim_args)
    full: Timing | None = None  # this scenario's timing (default FULL / QUICK)
    quick: Timing | None = None
    settle: float = SETTLE
    interval: float | None = None  # latency/RSS series every N s (soak)
    quick_interval: float | None = None
    # Router processes (nodes) on one database, binds spread over them; each
    # binds to the carriers with its own system_id, so receipts come back to
    # the node that sent the message (as with one carrier account per node).
    routers: int = 1
    # ... unless shared_account: all nodes bind with one system_id (one carrier
    # account, as when the carrier allows a single account with several
    # binds); the simulator spreads receipts over every bind of it, so about
    # half of them reach the other node and cross over through PostgreSQL.
    shared_account: bool = False
    # Worker processes of one router (listen.workers): one supervisor, N
    # workers on the same ports; CPU and memory are the whole process tree's.
    workers: int = 1
    # SMPP sessions per carrier for the whole router (None: one per worker,
    # so no worker relays through another's bind, router/carriers/relay.py).
    carrier_sessions: int | None = None


OVERLOAD_CARRIER_TPS = 250.0  # per simulated carrier: 500/s in total
OVERLOAD_QUEUE = 1_000  # router queue per carrier: 4 s of the carriers' 500/s in total
OVERLOAD_FACTOR = 5.0

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("smpp-e2e", "smpp",
                 "10 transceiver binds, window 64 each, closed loop, traffic log on: "
                 "submit -> route -> carrier simulator -> receipt back to the bind",
                 binds=10, window=64),
        Scenario("smpp-e2e-2nodes", "smpp",
                 "as smpp-e2e with two router processes on the one database, 5 binds "
                 "each (what a load balancer does); each node binds to the carriers with "
                 "its own system_id, so a receipt comes back to the node that sent it",
                 binds=10, window=64, routers=2),
        Scenario("smpp-e2e-2nodes-shared", "smpp",
                 "as smpp-e2e-2nodes but both nodes bind to the carriers with one "
                 "system_id: receipts come back over either node's bind, so half of them "
                 "are handed to the sending node through PostgreSQL",
                 binds=10, window=64, routers=2, shared_account=True, default=False),
        Scenario("smpp-e2e-workers", "smpp",
                 "as smpp-e2e with listen.workers = 2: one router, two worker processes "
                 "on the same SMPP port (the kernel spreads the 10 binds), one carrier "
                 "system_id, so half the carrier receipts cross between the workers "
                 "(offered to the sibling in memory)", binds=10, window=64, workers=2),
        Scenario("smpp-e2e-workers-relay", "smpp",
                 "as smpp-e2e-workers with one session per carrier (a carrier that allows "
                 "one bind): worker 0 binds, worker 1 sends its half through that bind "
                 "over the control links", binds=10, window=64, workers=2,
                 carrier_sessions=1, default=False),
        Scenario("smpp-1bind", "smpp",
                 "1 transceiver bind, window 64, closed loop: what one customer "
                 "connection can push", binds=1, window=64),
        Scenario("smpp-e2e-memory", "smpp",
                 "as smpp-e2e with delivery.guarantee = in-memory: the submit answer does "
                 "not wait for the durable spool", binds=10, window=64,
                 config=(("delivery", "guarantee", "in-memory"),), settle=120.0),
        Scenario("overload", "smpp",
                 f"open loop at {OVERLOAD_FACTOR:g}x what the carriers accept: carriers "
                 f"limited to {OVERLOAD_CARRIER_TPS:g}/s each (2 carriers, router tps and "
                 f"simulator --max-tps), queue {OVERLOAD_QUEUE} each, "
                 f"{OVERLOAD_FACTOR * 2 * OVERLOAD_CARRIER_TPS:g}/s offered; throttling "
                 "answers, accepted/s, peak RSS, and every accepted message receipted",
                 binds=10, window=64, rate=OVERLOAD_FACTOR * 2 * OVERLOAD_CARRIER_TPS,
                 fixed_rate=True, carrier_tps=OVERLOAD_CARRIER_TPS,
                 carrier_queue=OVERLOAD_QUEUE,
                 sim_args=("--max-tps", f"{OVERLOAD_CARRIER_TPS:g}"),
                 quick=Timing(warmup=0.0, duration=5.0, drain=5.0), settle=120.0),
        Scenario("carrier-flap", "smpp",
                 "both carrier simulators drop every connection every 10 s (quick: 2 s), "
                 "open loop at 1,000/s: accepted, receipts, lost, carrier reconnects",
                 binds=10, window=64, rate=1000.0,
                 sim_args=("--drop-every", "10"), quick_sim_args=("--drop-every", "2"),
                 quick=Timing(warmup=0.0, duration=5.0, drain=5.0), settle=120.0),
        Scenario("soak", "smpp",
                 "10 min open loop at 50% of the smpp-e2e maximum (same run, or --rate): "
                 "router RSS and p99 latency every 10 s, first vs last minute",
                 binds=10, window=64, default=False,
                 full=Timing(warmup=5.0, duration=600.0, drain=15.0),
                 quick=Timing(warmup=0.0, duration=20.0, drain=5.0),
                 interval=10.0, quick_interval=2.0, settle=60.0),
        Scenario("jasmin-compare", "jasmin",
                 "the smpp-e2e load (10 binds, window 64, closed loop unless --rate) against "
                 "Jasmin SMS Gateway 0.11.0 (jasmind with in-process DLR lookup and thrower, "
                 "RabbitMQ, Redis), then against the router, each with two fresh carrier "
                 "simulators: ratio of accepted/s and receipts/s", binds=10, window=64,
                 default=False, settle=30.0),
        Scenario("http-single", "http",
                 "POST /v1/messages, one message per request, 128 keep-alive connections "
                 "with one request in flight each", concurrency=128),
        Scenario("http-batch", "http",
                 "POST /v1/messages with {\"messages\": [...]} of 100, 8 requests in flight",
                 batch=100, concurrency=8),
        Scenario("http-single-workers", "http",
                 "as http-single with listen.workers = 2 (the 128 connections spread over "
                 "two worker processes on one port)", concurrency=128, workers=2),
        Scenario("http-batch-workers", "http",
                 "as http-batch with listen.workers = 2", batch=100, concurrency=8,
                 workers=2, default=False),
        Scenario("codec", "codec",
                 "SMPP codec micro-benchmark (benchmarks/codec.py): ours vs aiosmpplib"),
    )
}


# ------------------------------------------------------------------- database


class DatabaseServer:
    """Where the per-scenario databases live; see the module docstring for the order."""

    def __init__(self, admin_url: str, kind: str, embedded: Any = None) -> None:
        self.admin_url = admin_url
        self.kind = kind
        self.embedded = embedded  # an EmbeddedPostgres this run started, or None
        self.embedded_pid: int | None = embedded.pid if embedded is not None else None
        self._settings: dict[str, str] | None = None

    @classmethod
    def open(cls) -> DatabaseServer:
        for var in ("ROUTER_BENCH_DATABASE_URL", "ROUTER_TEST_DATABASE_URL"):
            url = os.environ.get(var, "").strip()
            if url:
                return cls(url, f"${var}")
        no_local = os.environ.get("ROUTER_BENCH_NO_LOCAL_PG", "").strip().lower() in (
            "1", "true", "yes", "on")
        if not no_local and asyncio.run(_answers(LOCAL_PG)):
            return cls(LOCAL_PG, "local 127.0.0.1:5432")
        from router.store.embedded import EmbeddedPostgres, url_with_database

        server = EmbeddedPostgres(REPO / ".pgdata" / "bench")
        if server.running:  # someone else's server on that directory: use, never stop it
            return cls(url_with_database(server.start(), "postgres"), "embedded (reused)")
        url = server.start()
        return cls(url_with_database(url, "postgres"), "embedded", server)

    def create(self) -> tuple[str, str]:
        """A fresh, migrated database with the demo account: (name, url)."""
        from router.store.embedded import url_with_database

        name = f"smsr_bench_{secrets.token_hex(4)}"
        url = url_with_database(self.admin_url, name)
        asyncio.run(_create(self.admin_url, name, url))
        return name, url

    def drop(self, name: str) -> None:
        asyncio.run(_drop(self.admin_url, name))

    def settings(self) -> dict[str, str]:
        """The server settings that move the figures (read once): a server
        with autovacuum off, say, is one the router must vacuum itself."""
        if self._settings is None:
            try:
                self._settings = asyncio.run(_settings(self.admin_url))
            except Exception as exc:  # noqa: BLE001 - recorded, never fatal to a run
                self._settings = {"error": type(exc).__name__}
        return self._settings

    def close(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None


async def _answers(url: str) -> bool:
    import asyncpg

    try:
        conn = await asyncpg.connect(url, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


async def _create(admin_url: str, name: str, url: str) -> None:
    import asyncpg

    from router.app import prepare_demo_database

    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    # `sms-router run --demo` creates the demo account only when it also brings its own
    # simulators (cfg.demo is set by demo_config); with carriers from a config file it
    # does not, so the runner migrates and creates the account itself.
    await prepare_demo_database(url)


SERVER_SETTINGS = ("server_version", "autovacuum", "synchronous_commit", "fsync",
                   "shared_buffers", "max_wal_size", "checkpoint_timeout")


async def _settings(admin_url: str) -> dict[str, str]:
    import asyncpg

    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        rows = await conn.fetch("SELECT name, current_setting(name) AS value FROM pg_settings"
                                " WHERE name = ANY($1::text[])", list(SERVER_SETTINGS))
    finally:
        await conn.close()
    return {r["name"]: r["value"] for r in rows}


async def _drop(admin_url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


# ------------------------------------------------------------------- machine


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    # Porcelain lines are "XY path"; strip() above may have eaten the first X.
    changed = [line[2:].lstrip() for line in git("status", "--porcelain").splitlines()]
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(changed),
            "changed_files": changed[:50]}


def machine_info() -> dict[str, Any]:
    u = platform.uname()
    model = None
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            mem_kb = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory_mb": mem_kb // 1024,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "uname": {"system": u.system, "release": u.release, "version": u.version,
                  "machine": u.machine},
        "packages": {p: _version(p) for p in PACKAGES},
        "router_build": router_build(),
        "loadavg_at_start": list(os.getloadavg()),
    }


def router_build() -> dict[str, Any] | None:
    """Whether the router this run starts has its per-message modules compiled
    (``sms-router build-info``, in this environment: SMS_ROUTER_NO_EXTENSIONS
    included); None if it cannot tell."""
    try:
        out = subprocess.run([*cli(), "build-info"], capture_output=True, text=True,
                             timeout=60, env=child_env())
        st = json.loads(out.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    return {"compiled": st["kind"], "interpreted": st["interpreted"], "stale": st["stale"]}


# ---------------------------------------------------------------- the stack


def cli() -> list[str]:
    """``sms-router`` next to this interpreter, else ``python -m router.cli``."""
    script = Path(sys.executable).parent / "sms-router"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "router.cli"]


def child_env(database_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("ROUTER_") and (k.endswith("_LISTEN") or k in (
               "ROUTER_CONFIG", "ROUTER_DATABASE_URL")))}
    if database_url is not None:
        env["ROUTER_DATABASE_URL"] = database_url
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``--set section.key=value`` -> {section: {key: value}}; value is a bool, number or
    string (as written)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name or "." in name:
            raise ValueError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        value: Any = raw.strip()
        if value in ("true", "false"):
            value = value == "true"
        else:
            for cast in (int, float):
                try:
                    value = cast(value)
                    break
                except ValueError:
                    continue
        out.setdefault(section, {})[name] = value
    return out


def router_toml(sc: Scenario, sim_ports: list[int],
                overrides: dict[str, dict[str, Any]] | None = None,
                node: int | None = None) -> str:
    tables: dict[str, dict[str, Any]] = {
        "listen": {"smpp": "127.0.0.1:0", "http": "127.0.0.1:0", "ops": "127.0.0.1:0"},
        "database": {"traffic_log": sc.traffic_log},
        "logging": {"format": "json"},
    }
    for section, key, value in sc.config:
        tables.setdefault(section, {})[key] = value
    for section, values in (overrides or {}).items():
        if section in ("carriers", "routes", "listen"):
            raise ValueError(f"--set {section}.*: the runner owns that part of the config")
        tables.setdefault(section, {}).update(values)
    if sc.workers > 1:
        tables["listen"]["workers"] = sc.workers
    if node is not None:
        tables.setdefault("delivery", {})["node"] = f"bench-{node}"
    system_id = "router" if node is None or sc.shared_account else f"router-{node}"
    lines = ["# generated by benchmarks/runner.py"]
    for section, values in tables.items():
        lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    for i, port in enumerate(sim_ports, 1):
        lines += [
            "",
            "[[carriers]]",
            f'name = "sim-{i}"',
            'host = "127.0.0.1"',
            f"port = {port}",
            f'system_id = "{system_id}"',
            'password = "sim"',
            "window = 256",
            f"sessions = {sc.carrier_sessions or sc.workers}",
            f"tps = {sc.carrier_tps!r}" + ("  # no carrier rate limit: measure the router"
                                            if sc.carrier_tps >= 1_000_000 else ""),
            f"queue_size = {sc.carrier_queue}",
        ]
    routes = ", ".join(f'{{carrier = "sim-{i}", priority = 1}}'
                       for i in range(1, len(sim_ports) + 1))
    lines += ["", "[routes]", f"default = [{routes}]", ""]
    return "\n".join(lines)


def _get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def wait_ready(ops_url: str, router: Child, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not router.running:
            raise ChildFailed(f"router exited ({router.proc.returncode}); see {router.log_path}")
        try:
            status, body = _get(f"{ops_url}/readyz")
            last = body
            if status == 200:
                try:
                    return dict(json.loads(body))
                except ValueError:
                    return {"raw": body}
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    raise ChildFailed(f"router not ready in {timeout:.0f} s: {last[:300]}")


@dataclass
class Stack:
    """What one scenario started, so it can all be stopped (last started, first stopped)."""

    children: list[Child] = field(default_factory=list)
    exit_status: dict[str, int | None] = field(default_factory=dict)

    def stop_all(self) -> None:
        for child in reversed(self.children):
            self.exit_status[child.name] = child.stop(
                grace=20.0 if child.name == "router" else 10.0
            )


@contextmanager
def stack() -> Iterator[Stack]:
    s = Stack()
    try:
        yield s
    finally:
        s.stop_all()


# ------------------------------------------------------------------ sampling


class Sampler:
    """/proc samples of some pids plus whole-machine CPU, every SAMPLE_EVERY seconds."""

    def __init__(self, pids: dict[str, int], groups: dict[str, bytes] | None = None,
                 trees: tuple[str, ...] = ()) -> None:
        self.pids = pids
        self.trees = trees  # names whose pid is read with its children (sample_tree)
        self.groups = groups or {}  # name -> command-line substring of its processes
        names = list(pids) + list(self.groups)
        self.samples: dict[str, list[ProcSample]] = {k: [] for k in names}
        self.system: list[tuple[float, float, float]] = []  # (at, busy_s, total_s)
        self._group_cpu: dict[str, dict[int, float]] = {k: {} for k in self.groups}

    @property
    def names(self) -> list[str]:
        return list(self.samples)

    def take(self) -> None:
        for name, pid in self.pids.items():
            s = sample_tree(pid) if name in self.trees else sample(pid)
            if s is not None:
                self.samples[name].append(s)
        for name, needle in self.groups.items():
            # Cumulative CPU of every process seen so far (a process that ended keeps its
            # last reading), so the series is monotone like a single process's.
            seen = self._group_cpu[name]
            for pid in pids_with_cmdline(needle):
                cpu = cpu_seconds(pid)
                if cpu is not None:
                    seen[pid] = cpu
            if seen:
                self.samples[name].append(ProcSample(time.monotonic(), sum(seen.values()), 0, 0))
        busy, total = system_cpu()
        self.system.append((time.monotonic(), busy, total))

    def cpu_between(self, name: str, t0: float, t1: float) -> float | None:
        pts = [(s.at, s.cpu_s) for s in self.samples.get(name, [])]
        a, b = _interp(pts, t0), _interp(pts, t1)
        return None if a is None or b is None else max(0.0, b - a)

    def system_between(self, t0: float, t1: float) -> tuple[float, float] | None:
        busy = [(at, b) for at, b, _ in self.system]
        total = [(at, t) for at, _, t in self.system]
        b0, b1, s0, s1 = (_interp(busy, t0), _interp(busy, t1), _interp(total, t0),
                          _interp(total, t1))
        if None in (b0, b1, s0, s1):
            return None
        return b1 - b0, s1 - s0  # type: ignore[operator]

    def cpu_series(self, name: str, t0: float) -> list[tuple[float, float]]:
        """(seconds since t0, CPU % of one core) per sample interval."""
        out = []
        pts = self.samples.get(name, [])
        for a, b in zip(pts, pts[1:], strict=False):
            dt_ = b.at - a.at
            if dt_ > 0:
                out.append((round(b.at - t0, 3), round(100.0 * (b.cpu_s - a.cpu_s) / dt_, 1)))
        return out


def _interp(points: list[tuple[float, float]], t: float) -> float | None:
    """Linear interpolation of a monotone series at t (clamped to its ends)."""
    if not points:
        return None
    if t <= points[0][0]:
        return points[0][1]
    for (ta, va), (tb, vb) in zip(points, points[1:], strict=False):
        if ta <= t <= tb:
            return va if tb == ta else va + (vb - va) * (t - ta) / (tb - ta)
    return points[-1][1]


# -------------------------------------------------------------- one scenario


def start_simulators(st: Stack, logs: Path, sim_args: tuple[str, ...] = (),
                     count: int = 2, any_system_id: bool = False) -> tuple[Child, list[int]]:
    """``sms-router sim --count N`` on free ports; (child, ports). With
    ``any_system_id`` any system_id binds (one per router node)."""
    credentials = [] if any_system_id else ["--system-id", "router", "--password", "sim"]
    sim = Child("simulators", cli() + [
        "sim", "--host", "127.0.0.1", "--port", "0", "--count", str(count), "--name", "sim",
        *credentials, "--dlr-delay", str(DLR_DELAY),
        "--window", "1000", "--receipt-window", str(SIM_RECEIPT_WINDOW), *sim_args,
    ], log_path=logs / "simulators.log", env=child_env(), cwd=REPO)
    st.children.append(sim)
    found = sim.wait_for(r"simulator (\S+) listening on [\d.]+:(\d+)", 30, count=count)
    return sim, [int(m.group(2)) for m in found[:count]]


@dataclass
class RouterHandle:
    child: Child
    smpp_port: int
    http_url: str
    ops_url: str
    readyz: dict[str, Any]
    config_text: str


def start_router(st: Stack, sc: Scenario, sim_ports: list[int], logs: Path, db_url: str,
                 overrides: dict[str, dict[str, Any]] | None = None,
                 node: int | None = None) -> RouterHandle:
    name = "router" if node is None else f"router-{node}"
    config_text = router_toml(sc, sim_ports, overrides, node)
    config_path = logs / f"{name}.toml"
    config_path.write_text(config_text, encoding="utf-8")
    router = Child(name, cli() + ["--config", str(config_path), "run"],
                   log_path=logs / f"{name}.log", env=child_env(db_url), cwd=REPO)
    st.children.append(router)
    smpp_port = int(router.wait_for(r"SMPP\s+[\d.]+:(\d+)", 60)[0].group(1))
    http_url = router.wait_for(r"HTTP API\s+(http://[\d.]+:\d+)", 5)[0].group(1)
    ops_url = router.wait_for(r"ops\s+(http://[\d.]+:\d+)", 5)[0].group(1)
    readyz = wait_ready(ops_url, router)
    return RouterHandle(router, smpp_port, http_url, ops_url, readyz, config_text)


# Router metrics read at the end of a run (summed over labels; `final` by status).
END_METRICS = (
    "smsrouter_messages_accepted_total",
    "smsrouter_messages_rejected_total",
    "smsrouter_carrier_submits_total",
    "smsrouter_carrier_submit_errors_total",
    "smsrouter_carrier_retries_total",
    "smsrouter_carrier_throttled_total",
    "smsrouter_carrier_reconnects_total",
    "smsrouter_carrier_receipts_total",
    "smsrouter_carrier_receipts_unmatched_total",
    "smsrouter_receipts_sent_total",
    "smsrouter_receipts_pending",
    "smsrouter_carrier_queue_depth",
    "smsrouter_carrier_in_flight",
    "smsrouter_throttle_responses_sent_total",
    "smsrouter_traffic_log_dropped_rows_total",
    "smsrouter_traffic_log_flush_seconds_count",  # flushes (more while receipt answers wait)
    "smsrouter_traffic_log_flush_seconds_sum",
)


def router_metrics(ops_url: str) -> dict[str, float] | None:
    """Sums of END_METRICS, plus ``smsrouter_messages_final_total`` by status."""
    try:
        _, text = _get(f"{ops_url}/metrics", timeout=5.0)
    except (OSError, urllib.error.URLError):
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("smsrouter_"):
            continue
        name, _, rest = line.partition("{")
        if not rest:
            name, _, value = line.partition(" ")
            labels = ""
        else:
            labels, _, value = rest.rpartition("} ")
        key = name
        if name == "smsrouter_messages_final_total" and 'status="' in labels:
            key = name + ":" + labels.split('status="', 1)[1].split('"', 1)[0]
        elif name not in END_METRICS:
            continue
        try:
            out[key] = out.get(key, 0.0) + float(value)
        except ValueError:
            continue
    return out


def run_load_scenario(sc: Scenario, timing: Timing, rate: float | None, db: DatabaseServer,
                      out_dir: Path, quick: bool,
                      overrides: dict[str, dict[str, Any]] | None = None,
                      logs_name: str | None = None) -> dict[str, Any]:
    logs = out_dir / "logs" / (logs_name or sc.name)
    logs.mkdir(parents=True, exist_ok=True)
    started_at = dt.datetime.now(dt.UTC)
    machine = machine_info()
    db_name, db_url = db.create()
    pids: dict[str, int] = {}
    load_json = logs / "loadgen.json"
    load_json.unlink(missing_ok=True)
    sim_args = sc.quick_sim_args if quick and sc.quick_sim_args is not None else sc.sim_args
    interval = sc.quick_interval if quick and sc.quick_interval is not None else sc.interval
    settle = sc.settle if sc.kind == "smpp" else 0.0
    timeout = timing.warmup + timing.duration + max(timing.drain, settle) + 60.0
    exit_status: dict[str, int | None] = {}
    readyz: dict[str, Any] = {}
    config_text = ""
    sampler: Sampler | None = None
    metrics_end: dict[str, float] | None = None
    router_hwm_kb = router_rss_kb = 0
    worker_pids: list[int] = []
    try:
        with stack() as st:
            sim, sim_ports = start_simulators(st, logs, sim_args,
                                              any_system_id=sc.routers > 1)
            pids["simulators"] = sim.pid
            nodes = [start_router(st, sc, sim_ports, logs, db_url, overrides,
                                  node=n if sc.routers > 1 else None)
                     for n in range(1, sc.routers + 1)]
            rh = nodes[0]
            router, ops_url, readyz, config_text = rh.child, rh.ops_url, rh.readyz, rh.config_text
            pids["router"] = router.pid
            worker_pids = children(router.pid) if sc.workers > 1 else []
            for n, other in enumerate(nodes[1:], 2):
                pids[f"router-{n}"] = other.child.pid

            common = ["--warmup", str(timing.warmup), "--duration", str(timing.duration),
                      "--drain", str(timing.drain), "--ops-url", ops_url,
                      "--output", str(load_json)]
            if rate is not None:
                common += ["--rate", str(rate)]
            if sc.kind == "smpp":
                argv = [sys.executable, "-m", "benchmarks.smpp_load", "--port",
                        ",".join(str(n.smpp_port) for n in nodes), "--binds", str(sc.binds),
                        "--window",
                        str(sc.window), "--settle", str(settle), *common]
                if interval:
                    argv += ["--interval", str(interval)]
            else:
                argv = [sys.executable, "-m", "benchmarks.http_load", "--url", rh.http_url,
                        "--batch", str(sc.batch), "--concurrency", str(sc.concurrency), *common]
            load = Child("loadgen", argv, log_path=logs / "loadgen.log", env=child_env(),
                         cwd=REPO)
            st.children.append(load)
            pids["loadgen"] = load.pid

            # PostgreSQL backends name their database in their process title: their CPU is
            # the database work of this run (server-wide processes such as the WAL writer
            # are not included). Found only when the server runs on this machine.
            sampler = Sampler({**{k: v for k, v in pids.items() if k.startswith("router")},
                               "simulators": sim.pid, "loadgen": load.pid},
                              groups={"postgres": f" {db_name} ".encode()},
                              trees=("router",) if sc.workers > 1 else ())
            deadline = time.monotonic() + timeout
            while load.running:
                sampler.take()
                if time.monotonic() > deadline:
                    raise ChildFailed(f"load generator still running after {timeout:.0f} s")
                time.sleep(SAMPLE_EVERY)
            sampler.take()
            if load.proc.returncode != 0 or not load_json.exists():
                raise ChildFailed(f"load generator failed ({load.proc.returncode}); "
                                  f"see {load.log_path}")
            try:
                _, body = _get(f"{ops_url}/readyz")
                readyz = json.loads(body)
            except (OSError, ValueError, urllib.error.URLError):
                pass
            metrics_end = router_metrics(ops_url)
            for other in nodes[1:]:  # summed over the nodes
                more = router_metrics(other.ops_url) or {}
                if metrics_end is not None:
                    for k, v in more.items():
                        metrics_end[k] = metrics_end.get(k, 0.0) + v
            tree = [router.pid] + (children(router.pid) if sc.workers > 1 else [])
            for mem in filter(None, map(memory_kb, tree)):
                router_rss_kb, router_hwm_kb = router_rss_kb + mem[0], router_hwm_kb + mem[1]
        exit_status = dict(st.exit_status)
    finally:
        try:
            db.drop(db_name)
        except Exception as exc:  # report, but let the original error win
            print(f"warning: could not drop database {db_name}: {exc}", file=sys.stderr)

    load_result = json.loads(load_json.read_text(encoding="utf-8"))
    assert sampler is not None
    result = build_result(sc, timing, rate, quick, started_at, machine, load_result, sampler,
                          pids, exit_status, readyz, config_text, router_rss_kb, router_hwm_kb,
                          db, db_name, logs)
    result["router"]["metrics_at_end"] = metrics_end
    result["router"]["worker_pids"] = worker_pids
    result["processes_left"] += [f"router-worker:{p}" for p in worker_pids if pid_alive(p)]
    result["router"].update(rss_profile(sampler, load_result))
    result["simulators"]["args"] = list(sim_args)
    if sc.kind == "smpp":
        add_smpp_findings(sc, result, load_result, metrics_end, sampler, interval)
    return result


THROTTLE_STATUSES = ("ESME_RMSGQFUL", "ESME_RTHROTTLED")
SIM_PENDING_RECEIPTS = 100_000  # router/sim/smsc.py MAX_PENDING_RECEIPTS, per simulator


def rss_profile(sampler: Sampler, load: dict[str, Any]) -> dict[str, Any]:
    """Router VmRSS from the 0.25 s samples: at the window's start and end, and the largest
    seen while the load generator ran (VmHWM alone includes start-up)."""
    pts = [(s.at, s.rss_kb) for s in sampler.samples.get("router", [])]
    if not pts:
        return {}
    m0, m1 = load["measure_start"], load["measure_end"]

    def at(t: float) -> float:
        return round(min(pts, key=lambda p: abs(p[0] - t))[1] / 1024, 1)

    return {"rss_mb_window_start": at(m0), "rss_mb_window_end": at(m1),
            "rss_mb_max_sampled": round(max(v for _, v in pts) / 1024, 1)}


def add_smpp_findings(sc: Scenario, result: dict[str, Any], load: dict[str, Any],
                      metrics: dict[str, float] | None, sampler: Sampler,
                      interval: float | None) -> None:
    """Whole-run loss check for every SMPP scenario, plus what overload, carrier-flap and
    soak are about."""
    lc = load.get("lifecycle") or {}
    result["lifecycle"] = lc
    notes = result["notes"]
    # Accepted but not yet receipted, per second: where the backlog peaked. The simulators
    # keep at most SIM_PENDING_RECEIPTS receipts each that the router has not taken yet and
    # DROP the rest (router/sim/smsc.py MAX_PENDING_RECEIPTS), so a larger backlog can
    # lose receipts in the simulators, not in the router.
    per_s = load.get("series", {})
    backlog = peak = 0
    for acc, rc in zip(per_s.get("accepted", []), per_s.get("receipts", []), strict=False):
        backlog += acc - rc
        peak = max(peak, backlog)
    lc["peak_unreceipted"] = peak
    if lc.get("lost"):
        notes.append(f"LOST: {lc['lost']} of {lc['accepted']} accepted messages had no receipt "
                     f"{lc['waited_s']:.0f} s after the load stopped (sample ids: "
                     f"{', '.join(lc.get('lost_sample', [])[:5])})")
        sim_cap = SIM_PENDING_RECEIPTS * 2
        if peak > sim_cap:
            notes.append(f"up to {peak:,} accepted messages were waiting for their receipt at "
                         f"once, more than the simulators hold ({sim_cap:,}: beyond it they "
                         "drop receipts), so some of the lost receipts may have been dropped "
                         "by the simulators; receipts still arriving when the wait ended "
                         "(see series.per_second.receipts) were not lost, only late")
    if lc.get("duplicate_receipts"):
        notes.append(f"{lc['duplicate_receipts']} duplicate receipts (same message id twice)")
    if lc.get("receipts_for_unknown_ids"):
        notes.append(f"{lc['receipts_for_unknown_ids']} receipts for ids never seen in a "
                     "submit_sm_resp")
    totals = load.get("totals") or {}
    answers = totals.get("answers", {})
    if totals.get("lost_connections"):
        notes.append(f"{totals['lost_connections']} customer binds were closed by the router")
    m = metrics or {}
    if sc.name == "overload":
        w = result["window"]
        result["overload"] = {
            "offered_per_s": result["offered_per_s"],
            "carrier_capacity_per_s": sc.carrier_tps * 2,
            "accepted_per_s": result["accepted_per_s"],
            "receipts_per_s": result["delivered_per_s"],
            "throttle_answers_window": {k: w["errors"].get(k, 0) for k in THROTTLE_STATUSES},
            "throttle_answers_run": {k: answers.get(k, 0) for k in THROTTLE_STATUSES},
            "other_error_answers_run": {k: v for k, v in answers.items()
                                        if k != "ESME_ROK" and k not in THROTTLE_STATUSES},
            "router_peak_rss_mb": result["router"]["peak_rss_mb"],
            "carrier_throttled_answers": m.get("smsrouter_carrier_throttled_total"),
            "accepted": lc.get("accepted"),
            "receipted": lc.get("receipted"),
            "lost": lc.get("lost"),
            "drained_after_s": lc.get("settled_after_s"),
        }
        cap = sc.carrier_tps * 2
        if result["accepted_per_s"] > 1.1 * cap:
            notes.append(f"accepted {result['accepted_per_s']:.0f}/s in the window, more than "
                         f"the carriers' {cap:g}/s: the router queue was still filling")
    if sc.name == "carrier-flap":
        result["carrier_flap"] = {
            "drop_every_s": float(result["simulators"]["args"][1])
            if result["simulators"].get("args") else None,
            "accepted": lc.get("accepted"),
            "receipted": lc.get("receipted"),
            "lost": lc.get("lost"),
            "duplicate_receipts": lc.get("duplicate_receipts"),
            "reconnects": m.get("smsrouter_carrier_reconnects_total"),
            "carrier_retries": m.get("smsrouter_carrier_retries_total"),
            "error_answers_run": {k: v for k, v in answers.items() if k != "ESME_ROK"},
            "drained_after_s": lc.get("settled_after_s"),
        }
    if interval:
        result["soak"] = soak_summary(result, load, sampler, interval)


def soak_summary(result: dict[str, Any], load: dict[str, Any], sampler: Sampler,
                 interval: float) -> dict[str, Any]:
    """RSS of the router and p99 latency every ``interval`` s; first vs last minute."""
    t0, m0, m1 = load["t0"], load["measure_start"], load["measure_end"]
    rss = [(s.at, s.rss_kb / 1024) for s in sampler.samples.get("router", [])]
    iv = load.get("intervals") or {}
    rows = []
    for row in iv.get("rows", []):
        at = t0 + row["t_s"]
        near = min(rss, key=lambda p: abs(p[0] - at)) if rss else None
        rows.append({**row, "rss_mb": None if near is None else round(near[1], 1)})
    edge = iv.get("edge_s") or min(60.0, (m1 - m0) / 4)

    def mean_rss(a: float, b: float) -> float | None:
        vals = [v for at, v in rss if a <= at < b]
        return round(sum(vals) / len(vals), 1) if vals else None

    def slope_between(a: float, b: float) -> float | None:
        """Least-squares RSS slope in MB per minute over [a, b]."""
        pts = [(at - a, v) for at, v in rss if a <= at <= b]
        if len(pts) < 2:
            return None
        n = len(pts)
        mx = sum(x for x, _ in pts) / n
        my = sum(y for _, y in pts) / n
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        if sxx <= 0:
            return None
        return sum((x - mx) * (y - my) for x, y in pts) / sxx * 60.0

    slope = slope_between(m0, m1)
    # The router fills bounded caches first (Engine.recent: the last 200,000 deliveries), so
    # the second half of the window says more about "flat" than the whole.
    slope_half = slope_between(m0 + (m1 - m0) / 2, m1)
    settled_at, growth_after = settled(rows)
    first, last = iv.get("first") or {}, iv.get("last") or {}
    out = {
        "interval_s": interval,
        "edge_s": edge,
        "rate": result.get("offered_rate"),
        "rows": rows,
        "rss_mb_first": mean_rss(m0, m0 + edge),
        "rss_mb_last": mean_rss(m1 - edge, m1),
        "rss_mb_slope_per_min": None if slope is None else round(slope, 3),
        "rss_mb_slope_per_min_second_half": None if slope_half is None else round(slope_half, 3),
        "rss_settled_at_s": settled_at,
        "rss_mb_growth_after_settled": growth_after,
        "resp_p99_ms_first": (first.get("resp") or {}).get("p99_ms"),
        "resp_p99_ms_last": (last.get("resp") or {}).get("p99_ms"),
        "receipt_p99_ms_first": (first.get("receipt") or {}).get("p99_ms"),
        "receipt_p99_ms_last": (last.get("receipt") or {}).get("p99_ms"),
    }
    a, b = out["rss_mb_first"], out["rss_mb_last"]
    span = rows[-1]["t_s"] if rows else 0.0
    if a and b and b > a * 1.10 and b - a > 10:
        if settled_at is not None and settled_at <= span / 3 and growth_after is not None \
                and growth_after <= SETTLED_MB:
            result["notes"].append(
                f"router RSS grew from {a:.0f} MB (first {edge:.0f} s) to {b:.0f} MB (last "
                f"{edge:.0f} s): all of it in the first {settled_at:.0f} s (bounded caches "
                f"filling, e.g. the last 200,000 deliveries), then +{growth_after} MB to the end")
        else:
            result["notes"].append(f"router RSS grew from {a:.0f} MB (first {edge:.0f} s) to "
                                   f"{b:.0f} MB (last {edge:.0f} s) at a steady load")
    pa, pb = out["receipt_p99_ms_first"], out["receipt_p99_ms_last"]
    if pa and pb and pb > 2 * pa and pb - pa > 20:
        result["notes"].append(f"receipt p99 rose from {pa:.0f} ms to {pb:.0f} ms over the soak")
    return out


SETTLED_MB = 2.0  # RSS within this of the run's last sample counts as settled


def settled(rows: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """When the router's RSS reached its final level (the first interval
    from which every later sample is within SETTLED_MB of the last one),
    and how much it grew from there to the end: a router whose bounded
    caches fill in the first minutes settles early and grows ~0 after; a
    leak never settles (or settles only at the end)."""
    rss = [(r["t_s"], r["rss_mb"]) for r in rows if r.get("rss_mb") is not None]
    if len(rss) < 2:
        return None, None
    final = rss[-1][1]
    at_i = len(rss) - 1
    for i in range(len(rss) - 1, -1, -1):
        if abs(rss[i][1] - final) > SETTLED_MB:
            break
        at_i = i
    return rss[at_i][0], round(final - rss[at_i][1], 1)


def build_result(sc: Scenario, timing: Timing, rate: float | None, quick: bool,
                 started_at: dt.datetime, machine: dict[str, Any], load: dict[str, Any],
                 sampler: Sampler, pids: dict[str, int], exit_status: dict[str, Any],
                 readyz: dict[str, Any], config_text: str, rss_kb: int, hwm_kb: int,
                 db: DatabaseServer, db_name: str, logs: Path) -> dict[str, Any]:
    w = load["window"]
    t0, m0, m1 = load["t0"], load["measure_start"], load["measure_end"]
    duration = m1 - m0
    cpu = {name: sampler.cpu_between(name, m0, m1) for name in sampler.names}
    sysw = sampler.system_between(m0, m1)
    machine["loadavg_at_end"] = list(os.getloadavg())
    ours = sum(v for v in cpu.values() if v is not None)
    notes: list[str] = []
    system: dict[str, Any] = {}
    if sysw is not None:
        busy, total = sysw
        cores = machine["cores"] or 1
        other = max(0.0, busy - ours)
        system = {
            "busy_cores": round(busy / duration, 2),
            "busy_pct_of_machine": round(100.0 * busy / total, 1) if total else None,
            "other_processes_cores": round(other / duration, 2),
            "this_run_cores": {k: None if v is None else round(v / duration, 2)
                               for k, v in cpu.items()},
        }
        if busy / duration > 0.9 * cores:
            notes.append(f"the machine was saturated ({busy / duration:.2f} of {cores} cores "
                         "busy): router, load generator, simulators and PostgreSQL compete "
                         "for CPU, so figures are lower bounds of the router alone")
        if other / duration > 0.25:
            notes.append(f"processes other than this run's router, simulators, load generator "
                         f"and database backends used {other / duration:.2f} cores during "
                         "the window (other work on the machine, PostgreSQL's own "
                         "background processes): numbers may be noisy")
    loadgen_pct = (cpu.get("loadgen") or 0.0) / duration * 100.0
    if loadgen_pct > 85.0:
        notes.append(f"the load generator used {loadgen_pct:.0f}% of a core: it may be the "
                     "bottleneck, not the router")
    if w.get("errors"):
        notes.append(f"errors in the window: {w['errors']}")
    if sc.kind == "smpp" and w.get("receipts_missing_after_drain"):
        notes.append(f"{w['receipts_missing_after_drain']} receipts of window messages did "
                     f"not arrive within the {timing.drain:.0f} s drain")

    if sc.kind == "smpp":
        latency = {"submit_to_resp": load["latency"]["submit_to_resp"],
                   "submit_to_receipt": load["latency"]["submit_to_receipt"]}
        errors_by = "command_status"
    else:
        latency = {"submit_to_resp": load["latency"]["request"],
                   "submit_to_receipt": None,
                   "messages_per_request": load["latency"]["messages_per_request"]}
        errors_by = "http_status"
    left = [f"{name}:{pid}" for name, pid in pids.items() if pid_alive(pid)]
    if db.embedded_pid is not None:
        pids["postgres_embedded"] = db.embedded_pid
    # Every router node's CPU (one process unless the scenario runs several).
    node_cpu = [v for k, v in cpu.items() if k == "router" or k.startswith("router-")]
    router_cpu = None if None in node_cpu or not node_cpu else sum(node_cpu)
    return {
        "scenario": sc.name,
        "description": sc.summary,
        "date": started_at.isoformat(timespec="seconds"),
        "quick": quick,
        "mode": load["config"]["mode"],
        "offered_rate": rate,
        "timing": {"warmup_s": timing.warmup, "duration_s": duration, "drain_s": timing.drain},
        "offered_per_s": round(w["offered_per_s"], 1),
        "accepted_per_s": round(w["accepted_per_s"], 1),
        "delivered_per_s": None if w.get("receipts_per_s") is None
        else round(w["receipts_per_s"], 1),
        "delivered_source": "deliver_sm receipts at the client" if sc.kind == "smpp"
        else w.get("receipts_source"),
        "latency_ms": latency,
        "errors": {"by": errors_by, "counts": w.get("errors", {})},
        "window": w,
        "router": {
            "pid": pids.get("router"),
            "nodes": sc.routers,
            "workers": sc.workers,
            "cpu_s": None if router_cpu is None else round(router_cpu, 3),
            "cpu_pct_of_core": None if router_cpu is None
            else round(100.0 * router_cpu / duration, 1),
            "peak_rss_mb": round(hwm_kb / 1024, 1),
            "rss_at_end_mb": round(rss_kb / 1024, 1),
            "readyz": readyz,
            "config_toml": config_text,
        },
        "simulators": {"pid": pids.get("simulators"), "dlr_delay_s": DLR_DELAY,
                       "receipt_window": SIM_RECEIPT_WINDOW,
                       "cpu_s": _r(cpu.get("simulators"))},
        "postgres": {"cpu_s": _r(cpu.get("postgres")),
                     "measured": "backends of this run's database (process title), "
                                 "not server-wide processes; none if the server is remote"},
        "loadgen": {"pid": pids.get("loadgen"), "config": load["config"],
                    "cpu_s": _r(cpu.get("loadgen")),
                    "first_request": load.get("first_request")},
        "system": system,
        "machine": machine,
        "git": _git(),
        "database": {"server": db.kind, "name": db_name, "dropped": True,
                     "settings": db.settings()},
        "pids": pids,
        "exit_status": exit_status,
        "processes_left": left,
        "series": {
            "t0_monotonic": t0,
            "measure_start_s": round(m0 - t0, 3),
            "measure_end_s": round(m1 - t0, 3),
            "per_second": load["series"],
            "cpu_pct": {name: sampler.cpu_series(name, t0) for name in sampler.names},
        },
        "totals": load.get("totals"),
        "notes": notes,
        "logs": str(logs),
    }


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def run_codec(quick: bool, out_dir: Path) -> dict[str, Any]:
    logs = out_dir / "logs" / "codec"
    out = logs / "codec-raw.json"
    out.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "benchmarks.codec", "--output", str(out)]
    if quick:
        argv.append("--quick")
    started_at = dt.datetime.now(dt.UTC)
    machine = machine_info()
    with stack() as st:
        child = Child("codec", argv, log_path=logs / "codec.log", env=child_env(), cwd=REPO)
        st.children.append(child)
        if child.wait(600) is None or child.proc.returncode != 0 or not out.exists():
            raise ChildFailed(f"codec benchmark failed; see {child.log_path}")
    result: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    machine["loadavg_at_end"] = list(os.getloadavg())
    result.update({
        "scenario": "codec",
        "description": SCENARIOS["codec"].summary,
        "date": started_at.isoformat(timespec="seconds"),
        "machine_full": machine,
        "git": _git(),
        "pids": {"codec": child.pid},
        "processes_left": [f"codec:{child.pid}"] if pid_alive(child.pid) else [],
    })
    return result


# ------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                   help=f"default: {', '.join(DEFAULT_SET)} ("
                        f"{', '.join(n for n in SCENARIOS if n not in DEFAULT_SET)} "
                        "run only when named)")
    p.add_argument("--quick", action="store_true",
                   help=f"CI smoke run: no warm-up, {QUICK.duration:g} s per scenario")
    p.add_argument("--duration", type=float, default=None, help="seconds measured per scenario")
    p.add_argument("--warmup", type=float, default=None, help="seconds before measuring")
    p.add_argument("--rate", type=float, default=None,
                   help="open loop at this many messages/s (default: closed loop, max rate)")
    p.add_argument("--output-dir", type=Path, default=RESULTS,
                   help="where <scenario>.json/.png go (default benchmarks/results)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="run each router with listen.workers = N (recorded as router.workers)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra router config, e.g. --set database.traffic_log=false "
                        "(repeatable; recorded in the result)")
    args = p.parse_args(argv)
    try:
        args.overrides = parse_overrides(args.set)
        router_toml(SCENARIOS["smpp-e2e"], [1], args.overrides)
    except ValueError as exc:
        p.error(str(exc))
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}")
    if args.duration is not None and args.duration <= 0:
        p.error("--duration must be > 0")
    if args.rate is not None and args.rate <= 0:
        p.error("--rate must be > 0")
    if args.workers is not None and not 1 <= args.workers <= 64:
        p.error("--workers: 1..64")
    return args


DEFAULT_SET = tuple(name for name, sc in SCENARIOS.items() if sc.default)
CALIBRATION = Timing(warmup=3.0, duration=15.0, drain=5.0)  # soak without smpp-e2e or --rate
QUICK_CALIBRATION = Timing(warmup=0.0, duration=3.0, drain=3.0)


def scenario_timing(sc: Scenario, args: argparse.Namespace) -> Timing:
    timing = (sc.quick or QUICK) if args.quick else (sc.full or FULL)
    if args.duration is not None:
        timing = replace(timing, duration=args.duration)
    if args.warmup is not None:
        timing = replace(timing, warmup=max(0.0, args.warmup))
    return timing


def scenario_rate(sc: Scenario, args: argparse.Namespace) -> float | None:
    if sc.fixed_rate:
        return sc.rate
    return args.rate if args.rate is not None else sc.rate


def soak_rate(args: argparse.Namespace, results: list[dict[str, Any]], db: DatabaseServer,
              out_dir: Path) -> tuple[float, dict[str, Any]]:
    """50% of the smpp-e2e maximum: --rate, else this run's smpp-e2e (closed loop), else a
    short smpp-e2e calibration run."""
    if args.rate is not None:
        return args.rate, {"source": "--rate"}
    for r in results:
        if r["scenario"] == "smpp-e2e" and r["mode"] == "closed-loop":
            return round(0.5 * r["accepted_per_s"], 1), {
                "source": "smpp-e2e of this run", "smpp_e2e_accepted_per_s": r["accepted_per_s"]}
    timing = QUICK_CALIBRATION if args.quick else CALIBRATION
    print(f"   soak: no smpp-e2e result in this run and no --rate: measuring smpp-e2e for "
          f"{timing.duration:g} s first", flush=True)
    cal = run_load_scenario(SCENARIOS["smpp-e2e"], timing, None, db, out_dir, args.quick,
                            args.overrides, logs_name="soak-calibration")
    return round(0.5 * cal["accepted_per_s"], 1), {
        "source": f"smpp-e2e calibration run of {timing.duration:g} s",
        "smpp_e2e_accepted_per_s": cal["accepted_per_s"],
        "calibration_notes": cal["notes"], "calibration_lifecycle": cal.get("lifecycle")}


def _quiet_router_logs() -> None:
    """The runner migrates databases in-process: keep router info logs off the table."""
    try:
        from router.observe.logging import configure_logging

        configure_logging(fmt="console", level="WARNING")
    except Exception:  # cosmetic only
        pass


def _terminate(signum: int, frame: Any) -> None:
    # Once: further signals must not interrupt the clean-up that this one starts.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    from . import report

    args = parse_args(argv)
    # In the table's order (smpp-e2e before soak, whose rate may come from it), once each.
    names = [n for n in SCENARIOS if n in args.scenarios] if args.scenarios else list(DEFAULT_SET)
    _quiet_router_logs()
    out_dir: Path = args.output_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Ctrl-C and `kill <runner>` both stop every child by pid and drop the database. SIGINT
    # is set explicitly: a shell may start a background job with SIGINT ignored.
    signal.signal(signal.SIGINT, _terminate)
    signal.signal(signal.SIGTERM, _terminate)

    results: list[dict[str, Any]] = []
    failures: list[str] = []
    db: DatabaseServer | None = None
    try:
        for name in names:
            sc = SCENARIOS[name]
            if args.workers is not None and sc.kind in ("smpp", "http"):
                sc = replace(sc, workers=args.workers)
            print(f"== {name}: {sc.summary}" + (f" [listen.workers = {sc.workers}]"
                                                 if args.workers else ""), flush=True)
            t = time.monotonic()
            timing = scenario_timing(sc, args)
            try:
                if sc.kind == "codec":
                    result = run_codec(args.quick, out_dir)
                else:
                    if db is None:
                        db = DatabaseServer.open()
                        print(f"   database server: {db.kind}", flush=True)
                    if sc.kind == "jasmin":
                        from .jasmin import run_jasmin_compare

                        result = run_jasmin_compare(sc, timing, args, db, out_dir)
                    elif sc.name == "soak":
                        rate, source = soak_rate(args, results, db, out_dir)
                        print(f"   soak: open loop at {rate:,.0f}/s ({source['source']}) for "
                              f"{timing.duration:g} s", flush=True)
                        result = run_load_scenario(sc, timing, rate, db, out_dir, args.quick,
                                                   args.overrides)
                        result["soak"]["rate_source"] = source
                    else:
                        result = run_load_scenario(sc, timing, scenario_rate(sc, args), db,
                                                   out_dir, args.quick, args.overrides)
            except ChildFailed as exc:
                print(f"   FAILED: {exc}", file=sys.stderr, flush=True)
                failures.append(name)
                continue
            files = report.write(result, out_dir, plot=not args.no_plot)
            results.append(result)
            print(f"   done in {time.monotonic() - t:.0f} s: " + ", ".join(files.values()),
                  flush=True)
            for note in result.get("notes", []):
                print(f"   note: {note}", flush=True)
    except KeyboardInterrupt:
        print("interrupted: every process this run started has been stopped", file=sys.stderr)
        return 130
    finally:
        if db is not None:
            db.close()
    if results:
        print()
        print(report.table(results))
    if failures:
        print(f"failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0
