"""Child processes for the benchmark runner, and what ``/proc`` says about them.

Every process the runner starts is a :class:`Child`: its pid is recorded the moment it
exists, its output is drained by a thread into a log file (so a chatty child never blocks
on a full pipe), and :meth:`Child.stop` ends it by pid: SIGTERM (the router drains and the
simulator unbinds on it), then SIGKILL after a grace period, then ``wait`` so no zombie is
left. Children run in their own session so a Ctrl-C in the terminal reaches the runner
only; the runner then stops them in order. Linux only (``/proc``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


class ChildFailed(RuntimeError):
    pass


class Child:
    """One subprocess with a drained, logged stdout+stderr."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._lines: list[str] = []
        self._cond = threading.Condition()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "w", encoding="utf-8", errors="replace")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            text=True,
            errors="replace",
        )
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._drain, name=f"drain-{name}", daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.write(line)
            self._log.flush()
            with self._cond:
                if len(self._lines) < 10_000:  # only start-up lines are ever searched
                    self._lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_for(self, pattern: str, timeout: float, count: int = 1) -> list[re.Match[str]]:
        """Wait until ``count`` lines matching ``pattern`` appeared; return all matches.

        Raises ChildFailed if the process exits first or the timeout passes.
        """
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for line in self._lines if (m := rx.search(line))]
                if len(found) >= count:
                    return found
                if not self.running and not self._reader.is_alive():
                    raise ChildFailed(
                        f"{self.name} exited with status {self.proc.returncode} before "
                        f"printing /{pattern}/; see {self.log_path}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ChildFailed(f"{self.name}: no /{pattern}/ in {timeout:.0f} s; "
                                      f"see {self.log_path}")
                self._cond.wait(min(left, 0.2))

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``grace`` s, then SIGKILL; always reaps. Returns the status."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if self.wait(grace) is None:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.wait(5.0)
        self._reader.join(timeout=2.0)
        try:
            self._log.close()
        except OSError:
            pass
        return self.proc.returncode


# ------------------------------------------------------------------ /proc readers


@dataclass(slots=True)
class ProcSample:
    at: float  # time.monotonic() of the reading (CLOCK_MONOTONIC: same in every process)
    cpu_s: float  # utime + stime, seconds
    rss_kb: int  # VmRSS
    hwm_kb: int  # VmHWM (peak RSS)


def cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLK_TCK


def memory_kb(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in kB."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        return None
    return rss, hwm


def sample(pid: int) -> ProcSample | None:
    at = time.monotonic()
    cpu = cpu_seconds(pid)
    mem = memory_kb(pid)
    if cpu is None or mem is None:
        return None
    return ProcSample(at, cpu, mem[0], mem[1])


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux: /proc/PID/task/PID/children)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def sample_tree(pid: int) -> ProcSample | None:
    """``pid`` and its children as one (CPU, VmRSS and VmHWM summed): a router
    running with ``listen.workers`` is a supervisor and its worker processes."""
    own = sample(pid)
    if own is None:
        return None
    cpu, rss, hwm = own.cpu_s, own.rss_kb, own.hwm_kb
    for child in children(pid):
        s = sample(child)
        if s is not None:
            cpu, rss, hwm = cpu + s.cpu_s, rss + s.rss_kb, hwm + s.hwm_kb
    return ProcSample(own.at, cpu, rss, hwm)


def system_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat, in seconds."""
    with open("/proc/stat", encoding="ascii") as f:
        parts = f.readline().split()[1:]
    values = [int(v) for v in parts[:8]]  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    total = sum(values)
    return (total - idle) / CLK_TCK, total / CLK_TCK


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    state = raw[raw.rindex(b")") + 2 :].split()[0]
    return state not in (b"Z", b"X")


def pids_with_cmdline(needle: bytes) -> list[int]:
    """Pids whose command line contains ``needle`` (e.g. PostgreSQL backends, whose
    process title names their database)."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                if needle in f.read():
                    out.append(int(entry.name))
        except OSError:
            continue
    return out
