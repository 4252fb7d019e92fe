"""Smoke check of ``python -m benchmarks run``: the quick smpp-e2e scenario, 2 seconds, plus
checks of the scenario table and of the load generator's loss bookkeeping that start no
process (soak and jasmin-compare are never run here).

It starts carrier simulators, the router and the SMPP load generator as subprocesses on
loopback, in a fresh database on the server of ROUTER_TEST_DATABASE_URL (``make test``
sets it; ROUTER_BENCH_DATABASE_URL wins when set). No thresholds: it checks that the
pipeline works end to end (messages accepted, receipts back), that the result file is
complete, and that every process the runner started is gone afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 95.0  # the runner itself; pytest's own timeout is 120 s per test


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    return raw[raw.rindex(b")") + 2 :].split()[0] not in (b"Z", b"X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_quick_smpp_e2e_benchmark_runs_and_stops_everything(tmp_path: Path) -> None:
    if not (
        os.environ.get("ROUTER_BENCH_DATABASE_URL") or os.environ.get("ROUTER_TEST_DATABASE_URL")
    ):
        pytest.skip("ROUTER_TEST_DATABASE_URL is not set: run the suite with `make test`")
    argv = [
        sys.executable,
        "-m",
        "benchmarks",
        "run",
        "smpp-e2e",
        "--quick",
        "--duration",
        "2",
        "--output-dir",
        str(tmp_path),
    ]
    proc = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the runner stops its children on SIGTERM
        try:
            output, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"benchmark run took more than {RUN_TIMEOUT:.0f} s:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]

    path = tmp_path / "smpp-e2e.json"
    assert path.exists(), output[-3000:]
    result = json.loads(path.read_text(encoding="utf-8"))
    assert result["scenario"] == "smpp-e2e"
    assert result["window"]["accepted"] > 0
    assert result["accepted_per_s"] > 0
    assert result["window"]["receipts"] > 0
    assert result["delivered_per_s"] > 0
    assert result["latency_ms"]["submit_to_resp"]["count"] > 0
    assert result["latency_ms"]["submit_to_receipt"]["count"] > 0
    assert result["router"]["cpu_s"] is not None and result["router"]["peak_rss_mb"] > 0
    assert result["machine"]["cores"] and result["machine"]["python"]
    assert result["database"]["dropped"] is True
    # The server settings that move the figures, read from the server itself.
    settings = result["database"]["settings"]
    assert settings["autovacuum"] in ("on", "off") and settings["server_version"]
    lifecycle = result["lifecycle"]  # every accepted id receipted after the load stopped
    assert lifecycle["accepted"] > 0 and lifecycle["lost"] == 0, lifecycle
    assert lifecycle["receipted"] == lifecycle["accepted"]
    assert "smpp-e2e" in output  # the table was printed

    pids = result["pids"]
    assert {"router", "simulators", "loadgen"} <= set(pids)
    assert result["processes_left"] == []
    still = {name: pid for name, pid in pids.items() if _alive(pid)}
    assert not still, f"processes left running: {still}"


def _runner():  # type: ignore[no-untyped-def]
    import importlib

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module("benchmarks.runner")


def test_scenario_table_default_set_and_configs() -> None:
    r = _runner()
    # soak (10 min) and jasmin-compare (external services) run only when named
    assert "soak" not in r.DEFAULT_SET and "jasmin-compare" not in r.DEFAULT_SET
    for name in ("smpp-e2e-memory", "overload", "carrier-flap"):
        assert name in r.DEFAULT_SET
    for name in ("smpp-e2e-workers", "http-single-workers"):
        assert name in r.DEFAULT_SET
        toml = r.router_toml(r.SCENARIOS[name], [1, 2])
        assert "[listen]" in toml and "workers = 2" in toml
        assert toml.count("sessions = 2") == 2  # a bind per worker: nothing relayed
    relay = r.router_toml(r.SCENARIOS["smpp-e2e-workers-relay"], [1, 2])
    assert "workers = 2" in relay and relay.count("sessions = 1") == 2
    assert "smpp-e2e-workers-relay" not in r.DEFAULT_SET
    memory = r.router_toml(r.SCENARIOS["smpp-e2e-memory"], [1, 2])
    assert 'guarantee = "in-memory"' in memory
    over = r.SCENARIOS["overload"]
    toml = r.router_toml(over, [1, 2])
    assert f"tps = {r.OVERLOAD_CARRIER_TPS!r}" in toml and "queue_size = 1000" in toml
    assert over.rate == r.OVERLOAD_FACTOR * 2 * r.OVERLOAD_CARRIER_TPS  # 5x the carriers
    args = r.parse_args(["overload", "--quick", "--rate", "10"])
    assert r.scenario_rate(over, args) == over.rate  # --rate does not change overload
    assert r.scenario_timing(over, args).duration == 5.0
    flap = r.SCENARIOS["carrier-flap"]
    assert r.scenario_rate(flap, args) == 10.0
    assert flap.quick_sim_args == ("--drop-every", "2")
    assert "--drop-every" in flap.sim_args and "10" in flap.sim_args
    soak = r.scenario_timing(r.SCENARIOS["soak"], r.parse_args(["soak"]))
    assert soak.duration == 600.0


def test_loadgen_lifecycle_counts_lost_duplicate_and_early_receipts() -> None:
    from types import SimpleNamespace

    _runner()
    from benchmarks.smpp_load import Generator, parse_args

    gen = Generator(parse_args(["--port", "1", "--output", "/dev/null", "--rate", "1"]))

    class Bind:
        sent_at: dict[int, float] = {}
        is_open = False

    def resp(mid: str) -> None:
        gen.on_resp(
            Bind(),
            SimpleNamespace(status=0, message_id=mid),  # type: ignore[arg-type]
            SimpleNamespace(sequence=1),
        )  # type: ignore[arg-type]

    def receipt(mid: str) -> None:
        gen.on_receipt(SimpleNamespace(tlv_str=lambda tag: mid))  # type: ignore[arg-type]

    resp("a")
    resp("b")
    resp("c")
    receipt("a")
    receipt("a")  # duplicate
    receipt("d")  # before its submit_sm_resp
    resp("d")
    receipt("x")  # never accepted
    assert gen.accepted_total == 4
    assert gen.matched == {"a", "d"}
    assert gen.pending == {"b", "c"}  # lost if no receipt comes
    assert gen.duplicate_receipts == 1
    assert gen.orphans == {"x"}


def test_readme_tables_are_the_generated_ones() -> None:
    """The README's Performance and codec tables are exactly what
    ``python -m benchmarks readme`` prints from benchmarks/results: figures
    are copied from a run, never typed."""
    import contextlib
    import io

    from benchmarks.readme import main as readme_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert readme_main(["--results", str(REPO / "benchmarks" / "results")]) == 0
    generated = out.getvalue().strip()
    readme = (REPO / "README.md").read_text()
    start, end = "<!-- perf-tables:start -->", "<!-- perf-tables:end -->"
    assert start in readme and end in readme
    block = readme.split(start, 1)[1].split(end, 1)[0].strip()
    assert block == generated


def test_soak_settled_tells_a_filling_cache_from_a_leak() -> None:
    """The soak's RSS verdict: growth that stops early (bounded caches
    filling) settles early with ~0 growth after; steady growth never
    settles before the last samples."""
    settled = _runner().settled

    def rows(values: list[float]) -> list[dict[str, float]]:
        return [{"t_s": 10.0 * (i + 1), "rss_mb": v} for i, v in enumerate(values)]

    filling = rows([80, 100, 120, 140, 150, 150.5, 150.4, 151, 150.8, 151.2, 151.5, 151])
    assert settled(filling) == (50.0, 1.0)
    leak = rows([100 + 3 * i for i in range(12)])
    assert settled(leak) == (120.0, 0.0)
    steps = rows([100, 100, 115, 115, 115, 130, 130, 130, 145, 145, 145, 145])
    assert settled(steps) == (90.0, 0.0)  # settles only at the last step: late, not early
    assert settled(rows([100])) == (None, None)


def test_process_tree_sample_sums_the_children() -> None:
    """A router with listen.workers is a supervisor and its workers: CPU and
    memory of the benchmark's "router" are the whole tree's."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks.process import children, sample, sample_tree

    code = (
        "import subprocess, sys, time\n"
        "kids = [subprocess.Popen([sys.executable, '-c', "
        "'x = bytearray(40_000_000); import time; time.sleep(30)']) for _ in range(2)]\n"
        "print('up', flush=True); time.sleep(30)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "up"
        kids = children(parent.pid)
        assert len(kids) == 2
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until both children hold their 40 MB
            rss = [s.rss_kb for s in map(sample, kids) if s is not None]
            if len(rss) == 2 and min(rss) > 40_000:
                break
            time.sleep(0.05)
        own, tree = sample(parent.pid), sample_tree(parent.pid)
        assert own is not None and tree is not None
        assert tree.rss_kb > own.rss_kb + 80_000  # both children's 40 MB
        assert tree.cpu_s >= own.cpu_s
    finally:
        for pid in children(parent.pid):
            os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()
