"""The admin CLI as an operator runs it: ``python -m router.cli ...`` in a
subprocess against the test database. Secrets are never printed back (an API
key only once, when made), every change is audit-logged as ``cli:<user>``,
and ``dsr`` audits a hash of the number, never the number."""

from __future__ import annotations

import asyncio
import datetime as dt
import getpass
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from argon2 import PasswordHasher

from router.store.audit import msisdn_hash

ROOT = Path(__file__).resolve().parents[1]
AUDIT_KEY = "hex:" + "cd" * 32
NUMBER = "4512345678"
ACTOR = f"cli:{getpass.getuser()}"


async def cli(
    database_url: str, *args: str, stdin: str | None = None, audit_key: str | None = AUDIT_KEY
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ROUTER_CONFIG", "ROUTER_AUDIT_KEY")}
    env["ROUTER_DATABASE_URL"] = database_url
    if audit_key is not None:
        env["ROUTER_AUDIT_KEY"] = audit_key
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "router.cli", *args],
        input=stdin or "",
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )


async def audit_since(pool: asyncpg.Pool, before: int) -> list[Any]:
    return await pool.fetch(
        "SELECT actor, action, account_id, detail::text AS d"
        " FROM audit_log WHERE id > $1 ORDER BY id",
        before,
    )


async def test_account_lifecycle(db: asyncpg.Pool, database_url: str) -> None:
    before = await db.fetchval("SELECT coalesce(max(id), 0) FROM audit_log")
    r = await cli(
        database_url,
        "accounts",
        "add",
        "shop",
        "--system-id",
        "shop",
        "--password-stdin",
        "--class",
        "secret",
        "--max-binds",
        "3",
        stdin="pw-one-1\n",
    )
    assert r.returncode == 0, r.stderr
    acct = await db.fetchrow("SELECT * FROM accounts WHERE name = 'shop'")
    assert PasswordHasher().verify(acct["password_hash"], "pw-one-1")
    assert (acct["default_class"], acct["max_binds"], acct["system_id"]) == ("secret", 3, "shop")

    r = await cli(database_url, "accounts", "add", "shop")
    assert r.returncode == 1 and "already exists" in r.stderr
    r = await cli(
        database_url, "accounts", "add", "other", "--system-id", "o2", "--password", "visible1"
    )
    assert r.returncode == 0 and "ps" in r.stderr  # the warning

    r = await cli(database_url, "accounts", "add-key", "shop", "--perm", "send", "--perm", "read")
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert key.startswith("sk_") and "\n" not in key
    krow = await db.fetchrow("SELECT * FROM api_keys WHERE account_id = $1", acct["id"])
    assert PasswordHasher().verify(krow["key_hash"], key)
    assert krow["permissions"] == ["send", "read"]

    r = await cli(database_url, "accounts", "list", "--json")
    assert r.returncode == 0, r.stderr
    listed = {a["name"]: a for a in json.loads(r.stdout)}
    assert listed["shop"]["keys"] == [{"id": krow["id"], "permissions": ["send", "read"]}]
    assert listed["shop"]["smpp_password"] is True and listed["shop"]["default_class"] == "secret"
    r2 = await cli(database_url, "accounts", "list")
    assert "shop" in r2.stdout and "other" in r2.stdout
    for out in (r.stdout, r2.stdout):  # no secret, no hash, no key prefix
        assert key not in out and key[:6] not in out and "argon2" not in out

    r = await cli(
        database_url, "accounts", "set-password", "shop", "--password-stdin", stdin="pw-two-2\n"
    )
    assert r.returncode == 0, r.stderr
    new_hash = await db.fetchval("SELECT password_hash FROM accounts WHERE name = 'shop'")
    assert PasswordHasher().verify(new_hash, "pw-two-2")
    r = await cli(
        database_url, "accounts", "set-password", "nosuch", "--password-stdin", stdin="x\n"
    )
    assert r.returncode == 1 and "no account" in r.stderr

    r = await cli(database_url, "accounts", "set-class-default", "shop", "standard")
    assert r.returncode == 0
    r = await cli(
        database_url, "accounts", "set-retention", "shop", "--days", "7", "--purge-days", "90"
    )
    assert r.returncode == 0
    acct = await db.fetchrow("SELECT * FROM accounts WHERE name = 'shop'")
    assert (acct["default_class"], acct["retention_days"], acct["purge_days"]) == (
        "standard",
        7,
        90,
    )

    r = await cli(database_url, "accounts", "revoke-key", str(krow["id"]))
    assert r.returncode == 0
    assert await db.fetchval("SELECT revoked_at FROM api_keys WHERE id = $1", krow["id"])
    r = await cli(database_url, "accounts", "revoke-key", str(krow["id"]))
    assert r.returncode == 1

    rows = await audit_since(db, before)
    assert [r["action"] for r in rows] == [
        "account.create",
        "account.create",
        "api_key.create",
        "account.password_set",
        "account.default_class_set",
        "account.retention_set",
        "api_key.revoke",
    ]
    assert all(r["actor"] == ACTOR for r in rows)
    text = "\n".join(r["d"] for r in rows)
    for secret in ("pw-one-1", "pw-two-2", "visible1", key):
        assert secret not in text


async def test_retention_and_dsr_commands(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    r = await cli(database_url, "accounts", "add", "shop")
    assert r.returncode == 0, r.stderr
    shop = await db.fetchval("SELECT id FROM accounts WHERE name = 'shop'")
    now = dt.datetime.now(dt.UTC)
    for i, (age, dest) in enumerate(((40, NUMBER), (1, NUMBER), (1, "4587654321"))):
        await db.execute(
            "INSERT INTO traffic_log (id, account_id, class, ingress, source, destination,"
            " country, parts, data_coding, body, accepted_at) VALUES ($1, $2, 'standard',"
            " 'http', 'Shop', $3, 'DK', 1, 0, 'hi', $4)",
            f"m{i}",
            shop,
            dest,
            now - dt.timedelta(days=age),
        )
    before = await db.fetchval("SELECT coalesce(max(id), 0) FROM audit_log")

    r = await cli(database_url, "retention", "run")
    assert r.returncode == 0, r.stderr
    assert "anonymised messages: 1" in r.stdout

    r = await cli(
        database_url,
        "dsr",
        "export",
        "--account",
        "shop",
        "--msisdn",
        "-",
        stdin="+" + NUMBER + "\n",
    )
    assert r.returncode == 0, r.stderr
    assert [m["id"] for m in json.loads(r.stdout)] == ["m1"]  # m0 is anonymised already
    out = tmp_path / "export.csv"
    r = await cli(
        database_url,
        "dsr",
        "export",
        "--account",
        "shop",
        "--msisdn",
        NUMBER,
        "--format",
        "csv",
        "--output",
        str(out),
    )
    assert r.returncode == 0 and r.stdout == ""
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_text().splitlines()[0].startswith("id,class,")
    r = await cli(database_url, "dsr", "erase", "--account", "shop", "--msisdn", NUMBER)
    assert r.returncode == 0 and "anonymised 1 message" in r.stdout
    assert await db.fetchval("SELECT destination FROM traffic_log WHERE id = 'm1'") == "45123"
    assert await db.fetchval("SELECT destination FROM traffic_log WHERE id = 'm2'") == "4587654321"

    r = await cli(
        database_url, "dsr", "erase", "--account", "shop", "--msisdn", NUMBER, audit_key=None
    )
    assert r.returncode == 2 and "ROUTER_AUDIT_KEY" in r.stderr
    r = await cli(database_url, "dsr", "erase", "--account", "nosuch", "--msisdn", NUMBER)
    assert r.returncode == 1

    rows = await audit_since(db, before)
    assert [r["action"] for r in rows] == ["retention.run", "dsr.export", "dsr.export", "dsr.erase"]
    assert all(r["actor"] == ACTOR for r in rows)
    key = bytes.fromhex("cd" * 32)
    assert all(json.loads(r["d"])["msisdn_hash"] == msisdn_hash(NUMBER, key) for r in rows[1:])
    everything = "\n".join(r["t"] for r in await db.fetch("SELECT a::text AS t FROM audit_log a"))
    assert NUMBER not in everything


async def test_existing_commands_still_work(db: asyncpg.Pool, database_url: str) -> None:
    r = await cli(database_url, "migrate")
    assert r.returncode == 0 and "none (up to date)" in r.stdout
    r = await cli(database_url, "routes", "check", "+4512345678")
    assert r.returncode == 1 and r.stdout.startswith("country DK: no route")
    r = await cli(database_url, "routes", "check", "nope")
    assert r.returncode == 2


async def test_revoking_a_key_reaches_a_running_router_at_once(
    stack_factory: Any, db: asyncpg.Pool, database_url: str
) -> None:
    """Needs the app wiring (accounts reload on NOTIFY accounts_changed)."""
    stack = await stack_factory()
    r = await cli(database_url, "accounts", "add-key", "acme", "--perm", "read")
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    key_id = await db.fetchval("SELECT max(id) FROM api_keys")

    async def status_with_key() -> int:
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"{stack.http_url}/v1/traffic", headers={"Authorization": f"Bearer {key}"}
            ) as resp,
        ):
            return resp.status

    async def settles_to(expected: int) -> None:
        deadline = time.monotonic() + 5
        while await status_with_key() != expected:
            assert time.monotonic() < deadline, f"never answered {expected}"
            await asyncio.sleep(0.05)

    await settles_to(200)  # no SIGHUP needed
    r = await cli(database_url, "accounts", "revoke-key", str(key_id))
    assert r.returncode == 0
    await settles_to(401)
