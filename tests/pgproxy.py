"""A TCP proxy in front of PostgreSQL that a test can cut, for outage tests.

The router is pointed at the proxy (``via``); ``cut()`` aborts every
connection through it and refuses new ones (accepted, then closed at once,
like a server that is down) until ``restore()``. The test's own pool talks
to PostgreSQL directly and is not affected.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit


class CuttableProxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server: asyncio.base_events.Server | None = None
        self.links: set[asyncio.StreamWriter] = set()
        self.up = True
        self.refused = 0  # connections refused while cut

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if not self.up:
            self.refused += 1
            w.transport.abort()
            return
        try:
            ur, uw = await asyncio.open_connection(*self.target)
        except OSError:
            w.close()
            return
        if not self.up:  # cut while the upstream connection was being opened
            self.refused += 1
            uw.transport.abort()
            w.transport.abort()
            return
        self.links |= {w, uw}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(r, uw), pipe(ur, w))
        self.links -= {w, uw}

    def cut(self) -> None:
        self.up = False
        for w in list(self.links):
            w.transport.abort()
        self.links.clear()

    def restore(self) -> None:
        self.up = True

    async def stop(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 1.0)


def via(url: str, port: int) -> str:
    """``url`` (a PostgreSQL URL without a password) pointed at the proxy's port."""
    parts = urlsplit(url)
    user = parts.username or "postgres"
    return urlunsplit((parts.scheme, f"{user}@127.0.0.1:{port}", parts.path, parts.query, ""))


async def start_proxy(url: str) -> tuple[CuttableProxy, str]:
    """A proxy in front of the server of ``url``, and the URL through it."""
    parts = urlsplit(url)
    proxy = CuttableProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    port = await proxy.start()
    return proxy, via(url, port)
