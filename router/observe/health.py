"""The ops listener: /metrics, /healthz, /readyz (aiohttp)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import metrics

ReadyCheck = Callable[[], tuple[bool, dict[str, Any]]]
READY_CHECK: web.AppKey[ReadyCheck] = web.AppKey("ready_check", object)  # type: ignore[arg-type]
LOOP_LAG_KEY: web.AppKey[list[float]] = web.AppKey("loop_lag", list)


async def metrics_handler(request: web.Request) -> web.Response:
    body = generate_latest()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    lag = request.app[LOOP_LAG_KEY][0]
    ok = lag < 5.0
    return web.json_response(
        {"status": "ok" if ok else "stalled", "loop_lag_seconds": lag}, status=200 if ok else 503
    )


async def readyz(request: web.Request) -> web.Response:
    ok, detail = request.app[READY_CHECK]()
    metrics.READY.set(1 if ok else 0)
    return web.json_response({"ready": ok, **detail}, status=200 if ok else 503)


async def _lag_probe(app: web.Application) -> Any:
    lag = app[LOOP_LAG_KEY]

    async def probe() -> None:
        while True:
            start = time.monotonic()
            await asyncio.sleep(0.5)
            lag[0] = max(0.0, time.monotonic() - start - 0.5)
            metrics.LOOP_LAG.set(lag[0])
            metrics.LOOP_LAG_HIST.observe(lag[0])
            # Keep smsrouter_ready current even when nobody polls /readyz.
            metrics.READY.set(1 if app[READY_CHECK]()[0] else 0)

    task = asyncio.create_task(probe())
    yield
    task.cancel()


def make_ops(ready: ReadyCheck) -> web.Application:
    app = web.Application()
    app[READY_CHECK] = ready
    app[LOOP_LAG_KEY] = [0.0]
    app.cleanup_ctx.append(_lag_probe)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
