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
    cpu_seconds,
    memory_kb,
    pid_alive,
    pids_with_cmdline,
    sample,
    system_cpu,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
LOCAL_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
DLR_DELAY = 0.1  # simulator: seconds from submit to receipt (a constant, subtract it)
SAMPLE_EVERY = 0.25
PACKAGES = ("sms-router", "uvloop", "aiohttp", "asyncpg", "aiosmpplib", "structlog",
            "prometheus-client", "matplotlib")


# ------------------------------------------------------------------ scenarios


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "smpp" | "http" | "codec"
    summary: str
    binds: int = 0
    window: int = 0
    batch: int = 1
    concurrency: int = 0
    traffic_log: bool = True


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("smpp-e2e", "smpp",
                 "10 transceiver binds, window 64 each, closed loop, traffic log on: "
                 "submit -> route -> carrier simulator -> receipt back to the bind",
                 binds=10, window=64),
        Scenario("smpp-1bind", "smpp",
                 "1 transceiver bind, window 64, closed loop: what one customer "
                 "connection can push", binds=1, window=64),
        Scenario("http-single", "http",
                 "POST /v1/messages, one message per request, 32 requests in flight",
                 concurrency=32),
        Scenario("http-batch", "http",
                 "POST /v1/messages with {\"messages\": [...]} of 100, 8 requests in flight",
                 batch=100, concurrency=8),
        Scenario("codec", "codec",
                 "SMPP codec micro-benchmark (benchmarks/codec.py): ours vs aiosmpplib"),
    )
}


@dataclass(frozen=True)
class Timing:
    warmup: float
    duration: float
    drain: float


FULL = Timing(warmup=5.0, duration=60.0, drain=15.0)
QUICK = Timing(warmup=0.0, duration=3.0, drain=5.0)


# ------------------------------------------------------------------- database


class DatabaseServer:
    """Where the per-scenario databases live; see the module docstring for the order."""

    def __init__(self, admin_url: str, kind: str, embedded: Any = None) -> None:
        self.admin_url = admin_url
        self.kind = kind
        self.embedded = embedded  # an EmbeddedPostgres this run started, or None
        self.embedded_pid: int | None = embedded.pid if embedded is not None else None

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

    from router.accounts import ensure_demo_account
    from router.store.db import migrate

    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    # `sms-router run --demo` creates the demo account only when it also brings its own
    # simulators (cfg.demo is set by demo_config); with carriers from a config file it
    # does not, so the runner migrates and creates the account itself.
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as c:
            await migrate(c)
        await ensure_demo_account(pool)
    finally:
        await pool.close()


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

    changed = [line[3:] for line in git("status", "--porcelain").splitlines()]
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
        "loadavg_at_start": list(os.getloadavg()),
    }


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
                overrides: dict[str, dict[str, Any]] | None = None) -> str:
    tables: dict[str, dict[str, Any]] = {
        "listen": {"smpp": "127.0.0.1:0", "http": "127.0.0.1:0", "ops": "127.0.0.1:0"},
        "database": {"traffic_log": sc.traffic_log},
        "logging": {"format": "json"},
    }
    for section, values in (overrides or {}).items():
        if section in ("carriers", "routes", "listen"):
            raise ValueError(f"--set {section}.*: the runner owns that part of the config")
        tables.setdefault(section, {}).update(values)
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
            'system_id = "router"',
            'password = "sim"',
            "window = 256",
            "tps = 1000000.0  # no carrier rate limit: measure the router, not a limit",
            "queue_size = 50000",
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

    def __init__(self, pids: dict[str, int], groups: dict[str, bytes] | None = None) -> None:
        self.pids = pids
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
            s = sample(pid)
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


def run_load_scenario(sc: Scenario, timing: Timing, rate: float | None, db: DatabaseServer,
                      out_dir: Path, quick: bool,
                      overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    logs = out_dir / "logs" / sc.name
    logs.mkdir(parents=True, exist_ok=True)
    started_at = dt.datetime.now(dt.UTC)
    machine = machine_info()
    db_name, db_url = db.create()
    pids: dict[str, int] = {}
    load_json = logs / "loadgen.json"
    load_json.unlink(missing_ok=True)
    timeout = timing.warmup + timing.duration + timing.drain + 60.0
    exit_status: dict[str, int | None] = {}
    readyz: dict[str, Any] = {}
    config_text = ""
    sampler: Sampler | None = None
    router_hwm_kb = router_rss_kb = 0
    try:
        with stack() as st:
            sim = Child("simulators", cli() + [
                "sim", "--host", "127.0.0.1", "--port", "0", "--count", "2", "--name", "sim",
                "--system-id", "router", "--password", "sim", "--dlr-delay", str(DLR_DELAY),
                "--window", "1000",
            ], log_path=logs / "simulators.log", env=child_env(), cwd=REPO)
            st.children.append(sim)
            pids["simulators"] = sim.pid
            found = sim.wait_for(r"simulator (\S+) listening on [\d.]+:(\d+)", 30, count=2)
            sim_ports = [int(m.group(2)) for m in found[:2]]

            config_text = router_toml(sc, sim_ports, overrides)
            config_path = logs / "router.toml"
            config_path.write_text(config_text, encoding="utf-8")
            router = Child("router", cli() + ["--config", str(config_path), "run"],
                           log_path=logs / "router.log", env=child_env(db_url), cwd=REPO)
            st.children.append(router)
            pids["router"] = router.pid
            smpp_port = int(router.wait_for(r"SMPP\s+[\d.]+:(\d+)", 60)[0].group(1))
            http_url = router.wait_for(r"HTTP API\s+(http://[\d.]+:\d+)", 5)[0].group(1)
            ops_url = router.wait_for(r"ops\s+(http://[\d.]+:\d+)", 5)[0].group(1)
            readyz = wait_ready(ops_url, router)

            common = ["--warmup", str(timing.warmup), "--duration", str(timing.duration),
                      "--drain", str(timing.drain), "--ops-url", ops_url,
                      "--output", str(load_json)]
            if rate is not None:
                common += ["--rate", str(rate)]
            if sc.kind == "smpp":
                argv = [sys.executable, "-m", "benchmarks.smpp_load", "--port", str(smpp_port),
                        "--binds", str(sc.binds), "--window", str(sc.window), *common]
            else:
                argv = [sys.executable, "-m", "benchmarks.http_load", "--url", http_url,
                        "--batch", str(sc.batch), "--concurrency", str(sc.concurrency), *common]
            load = Child("loadgen", argv, log_path=logs / "loadgen.log", env=child_env(),
                         cwd=REPO)
            st.children.append(load)
            pids["loadgen"] = load.pid

            # PostgreSQL backends name their database in their process title: their CPU is
            # the database work of this run (server-wide processes such as the WAL writer
            # are not included). Found only when the server runs on this machine.
            sampler = Sampler({"router": router.pid, "simulators": sim.pid,
                               "loadgen": load.pid},
                              groups={"postgres": f" {db_name} ".encode()})
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
            mem = memory_kb(router.pid)
            if mem is not None:
                router_rss_kb, router_hwm_kb = mem
        exit_status = dict(st.exit_status)
    finally:
        try:
            db.drop(db_name)
        except Exception as exc:  # report, but let the original error win
            print(f"warning: could not drop database {db_name}: {exc}", file=sys.stderr)

    load_result = json.loads(load_json.read_text(encoding="utf-8"))
    assert sampler is not None
    return build_result(sc, timing, rate, quick, started_at, machine, load_result, sampler, pids,
                        exit_status, readyz, config_text, router_rss_kb, router_hwm_kb, db,
                        db_name, logs)


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
    router_cpu = cpu.get("router")
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
            "cpu_s": None if router_cpu is None else round(router_cpu, 3),
            "cpu_pct_of_core": None if router_cpu is None
            else round(100.0 * router_cpu / duration, 1),
            "peak_rss_mb": round(hwm_kb / 1024, 1),
            "rss_at_end_mb": round(rss_kb / 1024, 1),
            "readyz": readyz,
            "config_toml": config_text,
        },
        "simulators": {"pid": pids.get("simulators"), "dlr_delay_s": DLR_DELAY,
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
        "database": {"server": db.kind, "name": db_name, "dropped": True},
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
                   help=f"default: all of {', '.join(SCENARIOS)}")
    p.add_argument("--quick", action="store_true",
                   help=f"CI smoke run: no warm-up, {QUICK.duration:g} s per scenario")
    p.add_argument("--duration", type=float, default=None, help="seconds measured per scenario")
    p.add_argument("--warmup", type=float, default=None, help="seconds before measuring")
    p.add_argument("--rate", type=float, default=None,
                   help="open loop at this many messages/s (default: closed loop, max rate)")
    p.add_argument("--output-dir", type=Path, default=RESULTS,
                   help="where <scenario>.json/.png go (default benchmarks/results)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
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
    return args


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
    names = args.scenarios or list(SCENARIOS)
    _quiet_router_logs()
    timing = QUICK if args.quick else FULL
    if args.duration is not None:
        timing = replace(timing, duration=args.duration)
    if args.warmup is not None:
        timing = replace(timing, warmup=max(0.0, args.warmup))
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
            print(f"== {name}: {sc.summary}", flush=True)
            t = time.monotonic()
            try:
                if sc.kind == "codec":
                    result = run_codec(args.quick, out_dir)
                else:
                    if db is None:
                        db = DatabaseServer.open()
                        print(f"   database server: {db.kind}", flush=True)
                    result = run_load_scenario(sc, timing, args.rate, db, out_dir, args.quick,
                                               args.overrides)
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
