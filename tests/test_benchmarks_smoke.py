"""Smoke check of ``python -m benchmarks run``: the quick smpp-e2e scenario, 2 seconds.

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
    if not (os.environ.get("ROUTER_BENCH_DATABASE_URL")
            or os.environ.get("ROUTER_TEST_DATABASE_URL")):
        pytest.skip("ROUTER_TEST_DATABASE_URL is not set: run the suite with `make test`")
    argv = [sys.executable, "-m", "benchmarks", "run", "smpp-e2e", "--quick",
            "--duration", "2", "--output-dir", str(tmp_path)]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
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
    assert "smpp-e2e" in output  # the table was printed

    pids = result["pids"]
    assert {"router", "simulators", "loadgen"} <= set(pids)
    assert result["processes_left"] == []
    still = {name: pid for name, pid in pids.items() if _alive(pid)}
    assert not still, f"processes left running: {still}"
