"""``jasmin-compare``: the smpp-e2e load against Jasmin SMS Gateway, then against the router.

Both gateways get the same treatment, one after the other in one run:

- two fresh carrier simulators (``sms-router sim --count 2``, receipts after 100 ms);
- the gateway with an SMPP server user for the load generator, an SMPP client connector
  (transceiver, no throughput limit) to each simulator and a default MT route over both;
- ``benchmarks.smpp_load`` with the smpp-e2e settings (10 transceiver binds, window 64,
  closed loop unless ``--rate``), the same warm-up, window and settle time.

Jasmin runs from its own venv (``$JASMIN_VENV``, else ``benchmarks/.jasmin-venv``, created
with ``pip install jasmin==JASMIN_VERSION`` when missing) as ONE process: ``jasmind.py
--disable-http-api --enable-dlr-lookup --enable-dlr-thrower`` (DLR lookup and DLR thrower
in-process; without the thrower no receipt reaches an SMPP user: the lookup publishes to
``dlr_thrower.smpps``, which only the thrower consumes), so no ``dlrlookupd`` / ``dlrd`` /
``interceptord`` / ``deliversmd`` is started. Per-message INFO logging of the SMPP server
and the sm-listener is set to WARNING (the router does not log per message either).
Its files live in a temporary ``ROOT_PATH`` (config, store, logs; the logs are copied to
``results/logs/jasmin-compare``).
It needs the RabbitMQ (127.0.0.1:5672, guest/guest) and Redis (127.0.0.1:6379) of this
machine: the run creates its own RabbitMQ vhost (``rabbitmqctl add_vhost``) and deletes it
at the end; Jasmin ignores ``redis-client.dbid`` (it always uses db 0), so the run deletes
the keys Jasmin wrote there (``dlr:*``, ``queue-msgid:*``, ``longDeliverSm:*`` that were not
there before). jasmind is stopped by pid like every other child.

Jasmin is configured through jCli (its telnet console), exactly as an operator would.

Why 0.11.0 and not 0.11.1: 0.11.1 (the latest on PyPI) fails every submit_sm_resp from a
connector with ``AttributeError: 'SubmitSM' object has no attribute 'response'``
(managers/listeners.py), so it never stores the DLR map and no receipt ever reaches an
SMPP user (``DLRMapNotFound`` for each receipt); upstream issue jookies/jasmin#1236.
0.11.0 does not have that bug.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .process import Child, ChildFailed, memory_kb, pid_alive, pids_with_cmdline
from .runner import (
    REPO,
    SAMPLE_EVERY,
    SCENARIOS,
    DatabaseServer,
    Sampler,
    Scenario,
    Timing,
    add_smpp_findings,
    build_result,
    child_env,
    machine_info,
    run_load_scenario,
    scenario_rate,
    stack,
    start_simulators,
)

JASMIN_VERSION = "0.11.0"
DEFAULT_VENV = Path(__file__).resolve().parent / ".jasmin-venv"
AMQP = ("127.0.0.1", 5672)
REDIS = ("127.0.0.1", 6379)
JASMIN_USER, JASMIN_PASSWORD = "bench", "benchpw"  # SMPP password: 8 characters at most
REDIS_PATTERNS = ("dlr:*", "queue-msgid:*", "longDeliverSm:*")
COMPARE_TIMING = Timing(warmup=5.0, duration=30.0, drain=15.0)


class JasminUnavailable(ChildFailed):
    """Jasmin cannot be run here; the message says exactly why."""


# ------------------------------------------------------------------ helpers


def _port_open(addr: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(addr, timeout=2):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def jasmin_venv(log: list[str]) -> Path:
    """The venv with jasmind.py; created (pip install jasmin==JASMIN_VERSION) if missing."""
    venv = Path(os.environ.get("JASMIN_VENV") or DEFAULT_VENV)
    jasmind = venv / "bin" / "jasmind.py"
    if jasmind.exists():
        return venv
    py = shutil.which("python3.11") or sys.executable
    steps = [[py, "-m", "venv", str(venv)],
             [str(venv / "bin" / "pip"), "install", "--quiet", f"jasmin=={JASMIN_VERSION}"]]
    for argv in steps:
        print(f"   jasmin: {' '.join(argv)}", flush=True)
        try:
            proc = _run(argv, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise JasminUnavailable(f"`{' '.join(argv)}` failed: {exc}") from None
        log.append(f"$ {' '.join(argv)}\n{proc.stdout}{proc.stderr}")
        if proc.returncode != 0:
            raise JasminUnavailable(f"`{' '.join(argv)}` exited {proc.returncode}: "
                                    f"{(proc.stderr or proc.stdout).strip()[-1500:]}")
    if not jasmind.exists():
        raise JasminUnavailable(f"{jasmind} missing after pip install jasmin=={JASMIN_VERSION}")
    return venv


def amqp_spec(venv: Path) -> Path:
    """The AMQP 0-9-1 spec file Jasmin needs (the wheel does not ship Jasmin's own
    resource/amqp0-9-1.xml; txAMQP3's stripped copy of the same spec works)."""
    found = glob.glob(str(venv / "lib" / "python*" / "site-packages" / "txamqp" / "specs" /
                          "standard" / "amqp0-9-1.stripped.xml"))
    if not found:
        raise JasminUnavailable(f"no txamqp/specs/standard/amqp0-9-1.stripped.xml in {venv}")
    return Path(found[0])


class Rabbit:
    """A RabbitMQ vhost of this run (created, then deleted) on the local broker."""

    def __init__(self) -> None:
        self.vhost = f"smsr_bench_{secrets.token_hex(4)}"
        self.ctl = shutil.which("rabbitmqctl")
        self.created = False

    def create(self) -> None:
        if not _port_open(AMQP):
            raise JasminUnavailable(f"RabbitMQ does not answer on {AMQP[0]}:{AMQP[1]}")
        if self.ctl is None:
            raise JasminUnavailable("rabbitmqctl not found: cannot create a vhost for the run")
        for argv in ([self.ctl, "add_vhost", self.vhost],
                     [self.ctl, "set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*"]):
            proc = _run(argv, timeout=60)
            if proc.returncode != 0:
                raise JasminUnavailable(f"`{' '.join(argv)}` exited {proc.returncode}: "
                                        f"{(proc.stderr or proc.stdout).strip()[-500:]}")
            self.created = True

    def delete(self) -> None:
        if self.created and self.ctl is not None:
            try:
                _run([self.ctl, "delete_vhost", self.vhost], timeout=60)
            except (OSError, subprocess.TimeoutExpired) as exc:
                print(f"warning: could not delete RabbitMQ vhost {self.vhost}: {exc}",
                      file=sys.stderr)
            self.created = False


class Redis:
    """Just enough RESP to snapshot and delete Jasmin's keys in db 0."""

    def __init__(self) -> None:
        if not _port_open(REDIS):
            raise JasminUnavailable(f"Redis does not answer on {REDIS[0]}:{REDIS[1]}")
        self.before: set[str] = set()

    @staticmethod
    def _cmd(sock: socket.socket, f: Any, *args: str) -> Any:
        out = f"*{len(args)}\r\n".encode()
        for a in args:
            b = a.encode()
            out += f"${len(b)}\r\n".encode() + b + b"\r\n"
        sock.sendall(out)
        return Redis._read(f)

    @staticmethod
    def _read(f: Any) -> Any:
        line = f.readline().rstrip(b"\r\n")
        kind, rest = line[:1], line[1:]
        if kind in (b"+", b"-"):
            return rest.decode()
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = f.read(n + 2)[:-2]
            return data.decode(errors="replace")
        if kind == b"*":
            return [Redis._read(f) for _ in range(int(rest))]
        raise OSError(f"unexpected Redis answer {line[:50]!r}")

    def keys(self) -> set[str]:
        found: set[str] = set()
        with socket.create_connection(REDIS, timeout=10) as sock:
            f = sock.makefile("rb")
            self._cmd(sock, f, "SELECT", "0")
            for pattern in REDIS_PATTERNS:
                cursor = "0"
                while True:
                    cursor, batch = self._cmd(sock, f, "SCAN", cursor, "MATCH", pattern,
                                              "COUNT", "1000")
                    found.update(batch)
                    if cursor == "0":
                        break
        return found

    def snapshot(self) -> None:
        self.before = self.keys()

    def clean(self) -> int:
        new = sorted(self.keys() - self.before)
        with socket.create_connection(REDIS, timeout=10) as sock:
            f = sock.makefile("rb")
            self._cmd(sock, f, "SELECT", "0")
            for i in range(0, len(new), 500):
                self._cmd(sock, f, "DEL", *new[i:i + 500])
        return len(new)


class JCli:
    """Jasmin's telnet console: send a line, read up to the next prompt."""

    PROMPT = re.compile(rb"(jcli : |> )$")
    IAC = re.compile(rb"\xff[\xfb-\xfe].|\xff[\xf0-\xfa]")

    def __init__(self, port: int, transcript: list[str]) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.transcript = transcript
        self.read()

    def read(self, timeout: float = 15.0) -> str:
        buf = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.PROMPT.search(buf):
                break
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            buf += self.IAC.sub(b"", chunk)
        return buf.decode("utf-8", "replace")

    def send(self, line: str, expect: str | None = None) -> str:
        self.sock.sendall(line.encode() + b"\r\n")
        out = self.read()
        self.transcript.append(f">>> {line}\n{out}")
        if expect is not None and expect not in out:
            raise JasminUnavailable(f"jcli `{line}` answered {out.strip()[-400:]!r}, "
                                    f"expected {expect!r}")
        return out

    def add(self, command: str, pairs: list[tuple[str, str]], expect: str) -> None:
        self.send(command)
        for key, value in pairs:
            out = self.send(f"{key} {value}")
            if "Unknown" in out or "Error" in out or "error" in out:
                raise JasminUnavailable(f"jcli `{command}`: `{key} {value}` -> {out.strip()!r}")
        self.send("ok", expect=expect)

    def close(self) -> None:
        try:
            self.sock.sendall(b"quit\r\n")
        except OSError:
            pass
        self.sock.close()


def jasmin_cfg(ports: dict[str, int], spec: Path, vhost: str) -> str:
    return f"""# generated by benchmarks/jasmin.py
[smpp-server]
id = smpps_bench
bind = 127.0.0.1
port = {ports['smpp']}
log_level = WARNING

[smpp-server-pb]
bind = 127.0.0.1
port = {ports['smpps_pb']}

[client-management]
bind = 127.0.0.1
port = {ports['cm']}

[router]
bind = 127.0.0.1
port = {ports['router']}

[jcli]
bind = 127.0.0.1
port = {ports['jcli']}
authentication = False

[amqp-broker]
host = {AMQP[0]}
port = {AMQP[1]}
username = guest
password = guest
vhost = {vhost}
spec = {spec}

[redis-client]
host = {REDIS[0]}
port = {REDIS[1]}
dbid = 0

[sm-listener]
log_level = WARNING

[dlr]
log_level = WARNING
"""


def configure(jcli: JCli, sim_ports: list[int]) -> None:
    jcli.add("group -a", [("gid", "bench")], "Successfully added Group")
    jcli.add("user -a", [("username", JASMIN_USER), ("password", JASMIN_PASSWORD),
                         ("gid", "bench"), ("uid", "bench")], "Successfully added User")
    cids = []
    for i, port in enumerate(sim_ports, 1):
        cid = f"sim{i}"
        cids.append(cid)
        jcli.add("smppccm -a", [("cid", cid), ("host", "127.0.0.1"), ("port", str(port)),
                                ("username", "router"), ("password", "sim"),
                                ("bind", "transceiver"), ("submit_throughput", "0"),
                                ("loglevel", "30")],
                 "Successfully added connector")
        jcli.send(f"smppccm -1 {cid}", expect="Successfully started connector")
    jcli.add("filter -a", [("type", "transparentfilter"), ("fid", "all")],
             "Successfully added Filter")
    connectors = ";".join(f"smppc({c})" for c in cids)
    jcli.add("mtrouter -a", [("type", "randomroundrobinmtroute"), ("order", "10"),
                             ("filters", "all"), ("connectors", connectors), ("rate", "0")],
             "Successfully added MTRoute")
    jcli.add("mtrouter -a", [("type", "defaultroute"), ("connector", f"smppc({cids[0]})"),
                             ("rate", "0")], "Successfully added MTRoute")
    deadline = time.monotonic() + 30
    while True:
        out = jcli.send("smppccm -l")
        if out.count("BOUND_TRX") >= len(cids):
            return
        if time.monotonic() > deadline:
            raise JasminUnavailable(f"Jasmin connectors not bound in 30 s: {out.strip()!r}")
        time.sleep(0.5)


# ------------------------------------------------------------------- one side


def run_jasmin_side(sc: Scenario, timing: Timing, rate: float | None, out_dir: Path,
                    quick: bool, db: DatabaseServer) -> dict[str, Any]:
    logs = out_dir / "logs" / "jasmin-compare" / "jasmin"
    logs.mkdir(parents=True, exist_ok=True)
    prep_log: list[str] = []
    venv = jasmin_venv(prep_log)
    spec = amqp_spec(venv)
    version = _run([str(venv / "bin" / "python"), "-c",
                    "import importlib.metadata as m; print(m.version('jasmin'))"], 60)
    rabbit = Rabbit()
    redis = Redis()
    redis.snapshot()
    root = Path(tempfile.mkdtemp(prefix="smsr-jasmin-"))
    (root / "etc" / "jasmin" / "store").mkdir(parents=True)
    (root / "var" / "log" / "jasmin").mkdir(parents=True)
    ports = {k: _free_port() for k in ("smpp", "smpps_pb", "cm", "router", "jcli")}
    cfg_text = jasmin_cfg(ports, spec, rabbit.vhost)
    cfg = root / "etc" / "jasmin" / "jasmin.cfg"
    cfg.write_text(cfg_text, encoding="utf-8")
    (logs / "jasmin.cfg").write_text(cfg_text, encoding="utf-8")
    started_at = dt.datetime.now(dt.UTC)
    machine = machine_info()
    load_json = logs / "loadgen.json"
    load_json.unlink(missing_ok=True)
    pids: dict[str, int] = {}
    transcript: list[str] = []
    sampler: Sampler | None = None
    rss_kb = hwm_kb = 0
    exit_status: dict[str, int | None] = {}
    left_after: list[int] = []
    redis_deleted = 0
    timeout = timing.warmup + timing.duration + max(timing.drain, sc.settle) + 60.0
    try:
        rabbit.create()
        with stack() as st:
            sim, sim_ports = start_simulators(st, logs)
            pids["simulators"] = sim.pid
            env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
            env.update({"ROOT_PATH": str(root), "PYTHONUNBUFFERED": "1"})
            jasmind = Child("jasmind", [str(venv / "bin" / "python"),
                                        str(venv / "bin" / "jasmind.py"), "-c", str(cfg),
                                        "--disable-http-api", "--enable-dlr-lookup",
                                        "--enable-dlr-thrower"],
                            log_path=logs / "jasmind.log", env=env, cwd=root)
            st.children.append(jasmind)
            pids["jasmind"] = jasmind.pid
            try:
                jasmind.wait_for(r"jCli Started", 60)
            except ChildFailed as exc:
                raise JasminUnavailable(f"jasmind did not start: {exc}") from None
            jcli = JCli(ports["jcli"], transcript)
            try:
                configure(jcli, sim_ports)
            finally:
                jcli.close()
                (logs / "jcli-transcript.txt").write_text("\n".join(transcript),
                                                          encoding="utf-8")
            argv = [sys.executable, "-m", "benchmarks.smpp_load", "--port", str(ports["smpp"]),
                    "--system-id", JASMIN_USER, "--password", JASMIN_PASSWORD,
                    "--binds", str(sc.binds), "--window", str(sc.window),
                    "--warmup", str(timing.warmup), "--duration", str(timing.duration),
                    "--drain", str(timing.drain), "--settle", str(sc.settle),
                    "--output", str(load_json)]
            if rate is not None:
                argv += ["--rate", str(rate)]
            load = Child("loadgen", argv, log_path=logs / "loadgen.log", env=child_env(),
                         cwd=REPO)
            st.children.append(load)
            pids["loadgen"] = load.pid
            sampler = Sampler({"router": jasmind.pid, "simulators": sim.pid,
                               "loadgen": load.pid})
            deadline = time.monotonic() + timeout
            while load.running:
                sampler.take()
                if time.monotonic() > deadline:
                    raise ChildFailed(f"load generator still running after {timeout:.0f} s")
                if not jasmind.running:
                    raise ChildFailed(f"jasmind exited ({jasmind.proc.returncode}) during the "
                                      f"load; see {jasmind.log_path}")
                time.sleep(SAMPLE_EVERY)
            sampler.take()
            if load.proc.returncode != 0 or not load_json.exists():
                raise ChildFailed(f"load generator failed ({load.proc.returncode}); "
                                  f"see {load.log_path}")
            mem = memory_kb(jasmind.pid)
            if mem is not None:
                rss_kb, hwm_kb = mem
        exit_status = dict(st.exit_status)
    finally:
        rabbit.delete()
        try:
            redis_deleted = redis.clean()
        except OSError as exc:
            print(f"warning: could not delete Jasmin's Redis keys: {exc}", file=sys.stderr)
        # Jasmin's own logs next to ours, then the temporary ROOT_PATH goes.
        for f in (root / "var" / "log" / "jasmin").glob("*.log"):
            shutil.copy2(f, logs / f"jasmin-{f.name}")
        left_after = pids_with_cmdline(str(root).encode())
        shutil.rmtree(root, ignore_errors=True)
    if left_after:
        raise ChildFailed(f"processes left with {root} in their command line: {left_after}")
    load_result = json.loads(load_json.read_text(encoding="utf-8"))
    assert sampler is not None
    smpp_sc = replace(sc, kind="smpp")
    result = build_result(smpp_sc, timing, rate, quick, started_at, machine, load_result,
                          sampler, pids, exit_status, {}, cfg_text, rss_kb, hwm_kb, db, "-",
                          logs)
    add_smpp_findings(smpp_sc, result, load_result, None, sampler, None)
    gw = result.pop("router")
    gw.pop("readyz", None)
    gw.pop("config_toml", None)
    gw["pid"] = pids.get("jasmind")
    gw["jasmin_cfg"] = cfg_text
    gw["version"] = version.stdout.strip() or None
    gw["venv"] = str(venv)
    gw["rabbitmq_vhost"] = rabbit.vhost
    gw["redis_keys_deleted"] = redis_deleted
    result["gateway"] = "jasmin"
    result["jasmind"] = gw
    result["database"] = None
    result["processes_left"] = [f"{n}:{p}" for n, p in pids.items() if pid_alive(p)]
    return result


def _side(r: dict[str, Any], proc_key: str) -> dict[str, Any]:
    return {
        "accepted_per_s": r["accepted_per_s"],
        "receipts_per_s": r["delivered_per_s"],
        "offered_per_s": r["offered_per_s"],
        "errors": r["errors"]["counts"],
        "latency_ms": r["latency_ms"],
        "cpu_pct_of_core": r[proc_key]["cpu_pct_of_core"],
        "peak_rss_mb": r[proc_key]["peak_rss_mb"],
        "lifecycle": r.get("lifecycle"),
        "notes": r["notes"],
        "processes_left": r["processes_left"],
    }


def run_jasmin_compare(sc: Scenario, timing: Timing, args: argparse.Namespace,
                       db: DatabaseServer, out_dir: Path) -> dict[str, Any]:
    if args.duration is None:
        timing = Timing(warmup=0.0, duration=5.0, drain=5.0) if args.quick else COMPARE_TIMING
        if args.warmup is not None:
            timing = Timing(warmup=args.warmup, duration=timing.duration, drain=timing.drain)
    rate = scenario_rate(sc, args)
    started = dt.datetime.now(dt.UTC)
    print(f"   jasmin-compare: Jasmin first ({timing.duration:g} s window)", flush=True)
    jas = run_jasmin_side(sc, timing, rate, out_dir, args.quick, db)
    print(f"   jasmin: accepted {jas['accepted_per_s']:,.0f}/s, receipts "
          f"{jas['delivered_per_s']:,.0f}/s; now the router", flush=True)
    ours_sc = replace(SCENARIOS["smpp-e2e"], name="jasmin-compare", summary=sc.summary,
                      default=False)
    ours = run_load_scenario(ours_sc, timing, rate, db, out_dir, args.quick, args.overrides,
                             logs_name="jasmin-compare/router")

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if not a or b is None else round(b / a, 2)

    j, o = _side(jas, "jasmind"), _side(ours, "router")
    return {
        "scenario": "jasmin-compare",
        "description": sc.summary,
        "date": started.isoformat(timespec="seconds"),
        "quick": args.quick,
        "mode": ours["mode"],
        "offered_rate": rate,
        "timing": ours["timing"],
        "jasmin": j,
        "router": o,
        "ratio_router_over_jasmin": {
            "accepted_per_s": ratio(j["accepted_per_s"], o["accepted_per_s"]),
            "receipts_per_s": ratio(j["receipts_per_s"], o["receipts_per_s"]),
        },
        "jasmin_setup": {k: jas["jasmind"][k] for k in ("version", "venv", "jasmin_cfg",
                                                        "rabbitmq_vhost",
                                                        "redis_keys_deleted")},
        "router_config_toml": ours["router"]["config_toml"],
        "router_readyz": ours["router"]["readyz"],
        "machine": ours["machine"],
        "git": ours["git"],
        "pids": {"jasmin": jas["pids"], "router": ours["pids"]},
        "processes_left": jas["processes_left"] + ours["processes_left"],
        "series": {"jasmin": jas["series"], "router": ours["series"]},
        "notes": [f"jasmin: {n}" for n in j["notes"]] + [f"router: {n}" for n in o["notes"]],
        "logs": str(out_dir / "logs" / "jasmin-compare"),
    }
