"""Embedded PostgreSQL for demos and tests.

This module starts a private, throw-away PostgreSQL server from the binaries
bundled in the ``pgserver`` wheel (the ``embedded`` / ``test`` extras).  It
exists so that ``sms-router run --demo`` and the test suite work on a machine
with no PostgreSQL installed.  It is **never used in production**: production
deployments always set ``ROUTER_DATABASE_URL`` to a managed server.

Facts about ``pgserver`` (0.1.x) this module relies on:

* ``pgserver.get_server(pgdata, cleanup_mode=...)`` runs ``initdb`` (trust
  auth, superuser ``postgres``) if needed, then ``pg_ctl start``.  With
  ``cleanup_mode=None`` pgserver never stops the server itself (not even at
  interpreter exit), so :meth:`EmbeddedPostgres.stop` does it explicitly.
* The server listens on a **unix socket only** (``-h ""``): no TCP port is
  opened.  The socket directory is the data directory itself, or a short
  directory under the user runtime dir when the data directory path is too
  long for ``AF_UNIX``; ``postmaster.pid`` records the one really used.
* PostgreSQL refuses to run as root.  When the process is root, pgserver
  creates (``useradd``) a system user ``pgserver``, chowns the data directory to
  it, makes every parent directory of the data directory world-traversable
  (``o+rx``), and runs ``initdb``/``pg_ctl`` as that user.

The URL returned is asyncpg-compatible, e.g.
``postgresql://postgres@/sms_router?host=/path/to/socket_dir&port=5432``.

Privacy: this module only ever logs paths, process ids and database names,
never message content, phone numbers or any other personal data.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import subprocess
import time
import warnings
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

__all__ = [
    "DEFAULT_DATABASE",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "ensure_database",
    "ensure_database_async",
    "url_with_database",
]

log = logging.getLogger(__name__)

DEFAULT_DATABASE = "sms_router"
SUPERUSER = "postgres"

_STOP_TIMEOUT_S = 30.0
_T = TypeVar("_T")


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be started, reached or stopped."""


# --------------------------------------------------------------------------- helpers


def url_with_database(url: str, name: str) -> str:
    """Return ``url`` with its database (the URL path) replaced by ``name``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(name, safe="")))


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def ensure_database_async(url: str, name: str, *, connect_timeout: float = 10.0) -> str:
    """Create database ``name`` on the server at ``url`` if it is missing.

    ``url`` must point at an existing database (e.g. ``postgres``) and a role
    allowed to ``CREATE DATABASE``.  Returns the URL of database ``name``.
    """
    import asyncpg

    conn = await asyncpg.connect(url, timeout=connect_timeout)
    try:
        exists = await conn.fetchval("select 1 from pg_database where datname = $1", name)
        if not exists:
            try:
                await conn.execute(f"create database {_quote_ident(name)}")
                log.info("embedded_pg.database_created name=%s", name)
            except asyncpg.DuplicateDatabaseError:
                pass  # created concurrently by someone else: fine
    finally:
        await conn.close()
    return url_with_database(url, name)


def _run_coroutine_blocking(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` to completion from synchronous code.

    Works whether or not an event loop is already running in this thread (in
    which case the coroutine runs on a private loop in a worker thread; the
    caller's loop is blocked for that time, which is acceptable for one-off
    start-up work).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def ensure_database(url: str, name: str) -> str:
    """Synchronous :func:`ensure_database_async`: returns the URL of ``name``."""
    return _run_coroutine_blocking(ensure_database_async(url, name))


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    # the state field follows the parenthesised command name
    state = stat.rpartition(")")[2].split()[:1]
    return state != ["Z"]


def _read_postmaster_pid(data_dir: Path) -> int | None:
    try:
        first = (data_dir / "postmaster.pid").read_text().splitlines()[0]
        return int(first.strip())
    except (OSError, IndexError, ValueError):
        return None


def _bin_dir() -> Path:
    pgserver = _import_pgserver()
    return Path(pgserver.__file__).resolve().parent / "pginstall" / "bin"


def _owner_if_root(path: Path) -> str | None:
    """The user to run pg_ctl as: the data dir owner when we are root."""
    if os.name != "posix" or os.geteuid() != 0:
        return None
    import pwd

    try:
        uid = path.stat().st_uid
        if uid == 0:
            return None
        return pwd.getpwuid(uid).pw_name
    except (OSError, KeyError):
        return None


def _import_pgserver() -> Any:
    try:
        with warnings.catch_warnings():
            # platformdirs warns at pgserver import time when XDG_RUNTIME_DIR is
            # unset (CI, root) and falls back to /tmp/runtime-<uid>: harmless.
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            import pgserver
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise EmbeddedPostgresError(
            "the embedded PostgreSQL needs the 'pgserver' package: "
            "pip install 'sms-router[embedded]' or set ROUTER_DATABASE_URL"
        ) from exc
    return pgserver


# --------------------------------------------------------------------------- server


class EmbeddedPostgres:
    """A private PostgreSQL server whose data lives in ``data_dir``.

    Usage::

        with EmbeddedPostgres(Path(".pgdata/demo")) as pg:
            pool = await asyncpg.create_pool(pg.url)

    :meth:`start` is idempotent (a server already running on ``data_dir``,
    even one started by another process, is reused) and :meth:`stop` is safe
    to call any number of times, including on an instance that never called
    :meth:`start` (it then stops whatever server runs on ``data_dir``).
    """

    def __init__(self, data_dir: Path, *, database: str = DEFAULT_DATABASE) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.database = database
        self._server: Any = None
        self._url: str | None = None
        self._pid: int | None = None

    # -- properties ---------------------------------------------------------

    @property
    def url(self) -> str:
        """asyncpg-compatible URL of :attr:`database`; only valid once started."""
        if self._url is None:
            raise EmbeddedPostgresError("embedded PostgreSQL is not started")
        return self._url

    @property
    def pid(self) -> int | None:
        """Process id of the postmaster, if started by/attached to this object."""
        return self._pid

    @property
    def running(self) -> bool:
        pid = _read_postmaster_pid(self.data_dir)
        return pid is not None and _pid_alive(pid)

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> str:
        """Start (or attach to) the server and return the URL of :attr:`database`."""
        if self._url is not None and self.running:
            return self._url
        pgserver = _import_pgserver()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log.info("embedded_pg.starting data_dir=%s", self.data_dir)
        try:
            server = pgserver.get_server(self.data_dir, cleanup_mode=None)
            info = server.get_postmaster_info()
        except (subprocess.SubprocessError, OSError, AssertionError) as exc:
            raise EmbeddedPostgresError(
                f"could not start embedded PostgreSQL in {self.data_dir} "
                f"(server log: {self.data_dir / 'log'})"
            ) from exc
        self._server = server
        self._pid = int(info.pid)
        if info.socket_dir is not None:
            host = quote(str(info.socket_dir), safe="/")
            port = info.port or 5432
            admin_url = f"postgresql://{SUPERUSER}@/postgres?host={host}&port={port}"
        else:  # Windows: pgserver listens on TCP there
            admin_url = f"postgresql://{SUPERUSER}@{info.hostname}:{info.port}/postgres"
        try:
            self._url = ensure_database(admin_url, self.database)
        except Exception as exc:
            raise EmbeddedPostgresError(
                f"embedded PostgreSQL in {self.data_dir} started (pid {self._pid}) "
                f"but is not usable"
            ) from exc
        log.info(
            "embedded_pg.started pid=%s socket_dir=%s database=%s",
            self._pid,
            info.socket_dir,
            self.database,
        )
        return self._url

    def stop(self) -> None:
        """Stop the server running on ``data_dir`` (fast shutdown); idempotent."""
        pid = _read_postmaster_pid(self.data_dir)
        if pid is not None and _pid_alive(pid):
            log.info("embedded_pg.stopping pid=%s data_dir=%s", pid, self.data_dir)
            self._pg_ctl_stop()
            if not self._wait_gone(pid, 5.0):
                self._kill(pid)
            if _pid_alive(pid):
                raise EmbeddedPostgresError(f"embedded PostgreSQL (pid {pid}) did not stop")
            log.info("embedded_pg.stopped pid=%s", pid)
        self._forget()

    def _pg_ctl_stop(self) -> None:
        try:
            subprocess.run(
                [
                    str(_bin_dir() / "pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    str(int(_STOP_TIMEOUT_S)),
                    "stop",
                ],
                user=_owner_if_root(self.data_dir),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=_STOP_TIMEOUT_S + 10,
                check=True,
            )
        except (subprocess.SubprocessError, OSError, EmbeddedPostgresError) as exc:
            log.warning("embedded_pg.pg_ctl_stop_failed error=%s", type(exc).__name__)

    @staticmethod
    def _wait_gone(pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while _pid_alive(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _kill(self, pid: int) -> None:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
            log.warning("embedded_pg.signalling pid=%s signal=%s", pid, sig.name)
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            if self._wait_gone(pid, wait):
                return

    def _forget(self) -> None:
        """Drop pgserver's per-process bookkeeping so a later start() is fresh."""
        server, self._server = self._server, None
        self._url = None
        if server is None:
            return
        try:
            import atexit

            # cleanup_mode=None: this only deregisters our pid, it stops nothing
            server.cleanup()
            atexit.unregister(server._cleanup)
            type(server)._instances.pop(self.data_dir, None)
        except Exception as exc:  # bookkeeping only; never fail a stop on it
            log.debug("embedded_pg.forget_failed error=%s", type(exc).__name__)

    # -- context manager ----------------------------------------------------

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedPostgres(data_dir={str(self.data_dir)!r}, database={self.database!r})"
