"""Run the router as a real subprocess (for kill -9, SIGTERM and SIGHUP tests)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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


async def start_router(
    cfg: Path, db_url: str, ops_port: int, log: Path, timeout: float = 30
) -> subprocess.Popen[bytes]:
    env = dict(os.environ, ROUTER_DATABASE_URL=db_url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "--config", str(cfg), "run"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
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


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {"name{labels}": value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
