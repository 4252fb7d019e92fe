"""Shared fixtures: a real PostgreSQL database per test session, a running
router with simulated carriers on loopback ports chosen by the kernel.

The database comes from ROUTER_TEST_DATABASE_URL (``make test`` sets it:
the local server on 127.0.0.1:5432 or an embedded one). Each session gets a
fresh database that is dropped at the end.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from router.accounts import add_api_key, create_account
from router.app import Router
from router.config import CarrierConfig, Config, RouteEntry, RoutesConfig
from router.observe.logging import configure_logging
from router.sim import CarrierSimulator, SimConfig
from router.store.db import migrate
from router.store.embedded import url_with_database
from tests.webhook_receiver import Hit, Receiver

configure_logging(fmt="json", level="INFO", strict=True)


def _base_url() -> str:
    url = os.environ.get("ROUTER_TEST_DATABASE_URL")
    if not url:
        pytest.exit("ROUTER_TEST_DATABASE_URL is not set: run the suite with `make test`", 2)
    return url


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    base = _base_url()
    name = f"smsr_{secrets.token_hex(4)}"

    async def create() -> None:
        conn = await asyncpg.connect(base)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        conn = await asyncpg.connect(url_with_database(base, name))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    async def drop() -> None:
        conn = await asyncpg.connect(base)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(create())
    try:
        yield url_with_database(base, name)
    finally:
        asyncio.run(drop())


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the session database, emptied before each test."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    assert pool is not None
    await pool.execute(
        "TRUNCATE accounts, api_keys, traffic_log, delivery_events, opt_out, spool, router_nodes,"
        " receipt_binds, receipt_handoff, carrier_receipt_handoff,"
        " receipt_routes RESTART IDENTITY CASCADE"
    )
    try:
        yield pool
    finally:
        await pool.close()


@dataclass
class Stack:
    router: Router
    sims: dict[str, CarrierSimulator] = field(default_factory=dict)

    @property
    def smpp_port(self) -> int:
        return self.router.ports["smpp"]

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.router.ports['http']}"

    @property
    def ops_url(self) -> str:
        return f"http://127.0.0.1:{self.router.ports['ops']}"


@pytest.fixture
async def stack_factory(db: asyncpg.Pool, database_url: str) -> AsyncIterator[Any]:
    """Start simulators + a router; everything stops at the end of the test."""
    started: list[Stack] = []

    async def make(
        sims: dict[str, SimConfig] | None = None,
        routes: RoutesConfig | None = None,
        demo: bool = True,
        carrier_kw: dict[str, dict[str, Any]] | None = None,
        bound: bool = True,  # False: a test whose carriers may stay unbound
        **cfg_kw: Any,
    ) -> Stack:
        sims = sims or {
            "sim-eu": SimConfig(port=0, dlr_delay=0.05),
            "sim-world": SimConfig(port=0, dlr_delay=0.05),
        }
        running: dict[str, CarrierSimulator] = {}
        carriers = []
        for name, sc in sims.items():
            sc.name = name
            sim = CarrierSimulator(sc)
            port = await sim.start()
            running[name] = sim
            carriers.append(
                CarrierConfig(
                    **{
                        "name": name,
                        "port": port,
                        "reconnect_min": 0.1,
                        "reconnect_max": 0.5,
                        "response_timeout": 5.0,
                        **(carrier_kw or {}).get(name, {}),
                    }
                )
            )
        cfg = Config(
            smpp_listen=("127.0.0.1", 0),
            http_listen=("127.0.0.1", 0),
            ops_listen=("127.0.0.1", 0),
            carriers=carriers,
            demo=demo,
            **{"database_url": database_url, "log_flush_interval": 0.05, **cfg_kw},
        )
        names = list(sims)
        cfg.routes = routes or RoutesConfig(
            default=[RouteEntry(names[-1])],
            countries={"DK": [RouteEntry(names[0])]},
        )
        # SMPP 3.4 passwords are at most 8 octets and smpplib enforces that
        # (the demo's 9-character "demo-pass" needs a lenient client), so
        # interop tests use this account.
        if not await db.fetchval("SELECT 1 FROM accounts WHERE name = 'acme'"):
            acme = await create_account(db, "acme", system_id="acme", password="acme-pw1")
            await add_api_key(db, acme, "acme-key-0001", ("send", "read"))
        router = Router(cfg)
        stack = Stack(router, running)
        started.append(stack)
        await router.start()
        # Wait until every carrier is bound, so tests start from a known state.
        assert router.engine is not None
        for _ in range(200):
            if all(c.up for c in router.engine.carriers.values()):
                break
            await asyncio.sleep(0.02)
        else:
            if bound:
                down = [n for n, c in router.engine.carriers.items() if not c.up]
                raise AssertionError(f"carriers not bound after 4 s: {down}")
        return stack

    yield make
    for stack in started:
        await stack.router.stop(timeout=3)
        for sim in stack.sims.values():
            await sim.stop()


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
    """Run the tests on uvloop, the loop the daemon uses in production."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[..., Awaitable[Receiver]]]:
    """Start webhook receivers answering with a behaviour; stopped at the end."""
    made: list[Receiver] = []

    async def make(behave: Callable[[Hit], Awaitable[web.StreamResponse]]) -> Receiver:
        r = await Receiver(behave).start()
        made.append(r)
        return r

    yield make
    for r in made:
        await r.stop()
