#!/usr/bin/env python3
"""Provide a PostgreSQL database for the test suite (used by ``make test``).

Usage::

    python scripts/test_database.py start   # prints ONE line on stdout: the URL
    python scripts/test_database.py stop    # stops the server ``start`` started, if any

``start`` picks the first that works:

1. ``$ROUTER_TEST_DATABASE_URL`` if it is set and non-empty (printed as is);
2. a local server on 127.0.0.1:5432 (user ``postgres``, trust auth, 3 s connect
   timeout): database ``sms_router_test`` is created there if missing and
   ``postgresql://postgres@127.0.0.1:5432/sms_router_test`` is printed;
3. an embedded server (``router.store.embedded``, pgserver wheel) with its data
   in ``.pgdata/test`` at the repository root; its unix-socket URL is printed.
   Only in this case a marker file ``.pgdata/test-server.json`` is written, and
   ``stop`` stops that server and removes the marker.  Without a marker
   ``stop`` does nothing, so it never touches a server it did not start.

Environment:

* ``ROUTER_TEST_DATABASE_URL``  use this URL, start nothing.
* ``ROUTER_TEST_NO_LOCAL_PG=1`` skip the 127.0.0.1:5432 probe and always use the
  embedded server (to exercise that path on a machine that has a local server).

Diagnostics go to stderr; stdout carries nothing but the URL.
Only stdlib, asyncpg and pgserver are needed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PGDATA_ROOT = REPO / ".pgdata"
DATA_DIR = PGDATA_ROOT / "test"
MARKER = PGDATA_ROOT / "test-server.json"

LOCAL_HOST = "127.0.0.1"
LOCAL_PORT = 5432
LOCAL_USER = "postgres"
TEST_DB = "sms_router_test"
PROBE_TIMEOUT_S = 3.0


def say(msg: str) -> None:
    print(f"test_database: {msg}", file=sys.stderr, flush=True)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def load_embedded() -> ModuleType:
    """Import router.store.embedded; fall back to loading the file by path.

    The fallback keeps this script working even when the package is not
    installed or an unrelated ``router/__init__.py`` import is broken: the
    module itself only needs the stdlib, asyncpg and pgserver.
    """
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        from router.store import embedded

        return embedded
    except Exception as exc:  # noqa: BLE001 - any failure: try the direct route
        say(f"importing router.store.embedded failed ({exc!r}); loading it by path")
    path = REPO / "router" / "store" / "embedded.py"
    spec = importlib.util.spec_from_file_location("_router_store_embedded", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def _local_database() -> str | None:
    """URL of sms_router_test on the local server, or None if unusable."""
    import asyncpg

    try:
        conn = await asyncio.wait_for(
            asyncpg.connect(
                host=LOCAL_HOST,
                port=LOCAL_PORT,
                user=LOCAL_USER,
                database="postgres",
                timeout=PROBE_TIMEOUT_S,
            ),
            PROBE_TIMEOUT_S + 1,
        )
    except Exception as exc:  # noqa: BLE001 - unreachable for whatever reason
        say(f"no usable server on {LOCAL_HOST}:{LOCAL_PORT} ({type(exc).__name__}: {exc})")
        return None
    try:
        exists = await conn.fetchval("select 1 from pg_database where datname = $1", TEST_DB)
        if not exists:
            try:
                await conn.execute(f'create database "{TEST_DB}"')
                say(f"created database {TEST_DB} on {LOCAL_HOST}:{LOCAL_PORT}")
            except asyncpg.DuplicateDatabaseError:
                pass
    except Exception as exc:  # noqa: BLE001
        say(f"server on {LOCAL_HOST}:{LOCAL_PORT} answers but cannot provide {TEST_DB}: {exc}")
        return None
    finally:
        await conn.close()
    return f"postgresql://{LOCAL_USER}@{LOCAL_HOST}:{LOCAL_PORT}/{TEST_DB}"


def _embedded_database() -> str:
    embedded = load_embedded()
    DATA_DIR.parent.mkdir(parents=True, exist_ok=True)
    pg = embedded.EmbeddedPostgres(DATA_DIR, database=TEST_DB)
    # Write the marker BEFORE starting: if start fails half-way (server up,
    # database creation failed) `stop` must still clean up.
    _write_marker({"data_dir": str(DATA_DIR), "pid": None, "started_at": time.time()})
    say(f"starting embedded PostgreSQL in {DATA_DIR}")
    url: str = pg.start()
    _write_marker({"data_dir": str(DATA_DIR), "pid": pg.pid, "started_at": time.time()})
    say(f"embedded PostgreSQL running (pid {pg.pid})")
    return url


def _write_marker(data: dict[str, Any]) -> None:
    tmp = MARKER.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(MARKER)


def start() -> str:
    url = os.environ.get("ROUTER_TEST_DATABASE_URL", "").strip()
    if url:
        say("using ROUTER_TEST_DATABASE_URL from the environment")
        return url
    if _truthy("ROUTER_TEST_NO_LOCAL_PG"):
        say("ROUTER_TEST_NO_LOCAL_PG set: not probing the local server")
    else:
        local = asyncio.run(_local_database())
        if local is not None:
            say(f"using local server {LOCAL_HOST}:{LOCAL_PORT}, database {TEST_DB}")
            return local
    return _embedded_database()


def stop() -> int:
    if not MARKER.exists():
        say("no embedded test server was started; nothing to stop")
        return 0
    try:
        data_dir = Path(json.loads(MARKER.read_text())["data_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        data_dir = DATA_DIR
    embedded = load_embedded()
    embedded.EmbeddedPostgres(data_dir).stop()
    MARKER.unlink(missing_ok=True)
    say(f"embedded PostgreSQL in {data_dir} stopped")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in {"start", "stop"}:
        print(__doc__, file=sys.stderr)
        return 2
    if argv[1] == "stop":
        return stop()
    # Keep stdout for the URL alone: anything else (libraries, child
    # processes inheriting fd 1) goes to stderr while we work.  This also
    # guarantees `URL=$(... start)` never waits on a daemon holding the pipe.
    sys.stdout.flush()
    saved_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        url = start()
    finally:
        sys.stdout.flush()
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)
    print(url, flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - one clear line, then the traceback
        say(f"{sys.argv[1:]} failed: {type(exc).__name__}: {exc}")
        raise
