"""Run the router as a real subprocess (for kill -9, SIGTERM and SIGHUP tests)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports() -> dict[str, int]:
    return {k: free_port() for k in ("smpp", "http", "ops")}


def listen_toml(ports: dict[str, int]) -> str:
    return (
        f'[listen]\nsmpp = "127.0.0.1:{ports["smpp"]}"\n'
        f'http = "127.0.0.1:{ports["http"]}"\nops = "127.0.0.1:{ports["ops"]}"\n'
    )


def carrier_toml(name: str, port: int, **extra: object) -> str:
    lines = [
        f'[[carriers]]\nname = "{name}"\nport = {port}\nreconnect_min = 0.1\nreconnect_max = 0.5'
    ]
    lines += [f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v!r}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def spawn_router(cfg: Path, db_url: str, log: Path) -> subprocess.Popen[bytes]:
    """``sms-router --config CFG run`` on the database, output to ``log``."""
    env = dict(os.environ, ROUTER_DATABASE_URL=db_url)
    return subprocess.Popen(
        [sys.executable, "-m", "router.cli", "--config", str(cfg), "run"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


async def start_router(
    cfg: Path, db_url: str, ops_port: int, log: Path, timeout: float = 30
) -> subprocess.Popen[bytes]:
    proc = spawn_router(cfg, db_url, log)
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"router exited early: {log.read_text()[-2000:]}")
            try:
                async with http.get(f"http://127.0.0.1:{ops_port}/readyz") as r:
                    if r.status == 200:
                        return proc
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    proc.kill()
    proc.wait()
    raise AssertionError("router did not become ready")


def stop_router(proc: subprocess.Popen[bytes], timeout: float = 15) -> int:
    """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


async def carrier_got_all(
    sim: Any, want: set[str], acked: int, received_before: int, timeout: float = 60
) -> tuple[set[str], int]:
    """Wait until the simulator has received every text in ``want`` (bounded);
    print and return what is missing and how many duplicates came."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if want <= {m.payload.decode() for m in sim.received}:
            break
        await asyncio.sleep(0.2)
    seen = Counter(m.payload.decode() for m in sim.received)
    missing = want - set(seen)
    duplicates = sum(n - 1 for t, n in seen.items() if t in want and n > 1)
    print(
        f"\nacknowledged={acked} delivered_before_kill={received_before} "
        f"missing={len(missing)} duplicates={duplicates}"
    )
    return missing, duplicates


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {"name{labels}": value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
