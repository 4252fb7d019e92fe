"""A customer's webhook receiver for tests (an aiohttp server on
127.0.0.1:0 with a scripted answer) and an HTTP submission helper."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

DEMO = {"Authorization": "Bearer demo-key"}


@dataclass
class Hit:
    path: str
    query: str
    body: bytes
    signature: str
    at: float


@dataclass
class Receiver:
    """An aiohttp server on 127.0.0.1:0 answering with a scripted behaviour."""

    behave: Callable[[Hit], Awaitable[web.StreamResponse]]
    hits: list[Hit] = field(default_factory=list)
    url: str = ""
    runner: web.AppRunner | None = None

    async def start(self) -> Receiver:
        async def handle(request: web.Request) -> web.StreamResponse:
            hit = Hit(
                request.path,
                request.query_string,
                await request.read(),
                request.headers.get("X-SMSRouter-Signature", ""),
                time.monotonic(),
            )
            self.hits.append(hit)
            return await self.behave(hit)

        app = web.Application()
        app.router.add_post("/{tail:.*}", handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def ok() -> Callable[[Hit], Awaitable[web.StreamResponse]]:
    async def behave(hit: Hit) -> web.StreamResponse:
        return web.Response(status=204)

    return behave


async def submit(stack: Any, **fields: Any) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            stack.http_url + "/v1/messages",
            headers=DEMO,
            json={"to": "+4512345678", "from": "Acme", "text": "hi", **fields},
        ) as resp,
    ):
        assert resp.status == 202
        return str((await resp.json())["id"])
