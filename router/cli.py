"""``sms-router`` command line: run | sim | migrate | routes check | accounts |
retention run | dsr export|erase.

Administrative commands talk to PostgreSQL directly (ROUTER_DATABASE_URL or
``database.url`` in --config) and write an audit row for every change, with
the actor ``cli:<os user>``. They never print a stored secret: an API key is
shown once, when it is made. Passwords are best given on stdin
(``--password-stdin``): ``--password`` shows in ``ps`` and shell history.
A phone number given to ``dsr`` is audited only as a keyed hash.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from .config import ConfigError

PERMISSIONS = ("send", "read", "admin")
CLASSES = ("standard", "secret")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="sms-router", description="An SMS router.")
    parser.add_argument("--config", help="TOML config file (or env ROUTER_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the daemon")
    p_run.add_argument(
        "--demo",
        action="store_true",
        help="embedded PostgreSQL if ROUTER_DATABASE_URL is unset, simulated "
        "carriers, a demo account (not for production)",
    )
    p_run.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="router processes sharing the listen ports (overrides listen.workers)",
    )
    sub.add_parser("sim", help="run carrier SMSC simulators", add_help=False)
    sub.add_parser("migrate", help="apply database migrations")
    p_build = sub.add_parser("build-info", help="which per-message modules run compiled (JSON)")
    p_build.add_argument(
        "--require-compiled",
        action="store_true",
        help="exit 1 unless all of them run compiled and fresh",
    )
    p_routes = sub.add_parser("routes", help="inspect routing")
    p_routes_sub = p_routes.add_subparsers(dest="routes_command", required=True)
    p_check = p_routes_sub.add_parser("check", help="which carrier would take NUMBER")
    p_check.add_argument("--account", help="apply this account's route overrides")
    p_check.add_argument("number")
    _add_admin_parsers(sub)
    if argv and argv[0] == "sim":
        from .sim import main as sim_main

        return sim_main(argv[1:])
    args = parser.parse_args(argv)
    from .observe.logging import configure_logging

    try:
        if args.command == "run":
            from .app import run

            configure_logging()
            return run(args.config, demo=args.demo, workers=args.workers)
        if args.command == "migrate":
            from .app import migrate_only

            configure_logging()
            return asyncio.run(migrate_only(args.config))
        if args.command == "build-info":
            from .accel import report

            return report(require_compiled=args.require_compiled)
        if args.command == "routes":
            return _routes_check(args.config, args.number, args.account)
        if args.command in ("accounts", "retention", "dsr"):
            configure_logging(fmt="json", level="WARNING")
            return _admin(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    return 1


def _routes_check(config_path: str | None, number: str, account: str | None = None) -> int:
    import random

    from .config import load_config
    from .routing import CountryLookup, NoRoute, RouteTable, normalise_e164

    cfg = load_config(config_path)
    digits = normalise_e164(number)
    if digits is None:
        print("not an international E.164 number", file=sys.stderr)
        return 2
    country = CountryLookup().country(digits)
    try:
        decision = RouteTable.from_config(cfg.routes).resolve(
            digits, country, random.Random(0), account
        )
    except NoRoute as exc:
        print(f"country {country or 'unknown'}: no route ({exc.reason})")
        return 1
    print(
        f"country {country or 'unknown'}: rule {decision.rule}; carriers in order: "
        + ", ".join(decision.carriers)
    )
    return 0


# ------------------------------------------------------------------ admin


def _add_password_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the SMPP password from the first line of stdin (preferred)",
    )
    g.add_argument("--password", help="the SMPP password (visible in ps and shell history)")


def _add_admin_parsers(sub: Any) -> None:
    p_acc = sub.add_parser("accounts", help="manage accounts and their credentials")
    acc = p_acc.add_subparsers(dest="accounts_command", required=True)
    p = acc.add_parser("add", help="create an account")
    p.add_argument("name")
    p.add_argument("--system-id", help="SMPP system_id (default: no SMPP access)")
    _add_password_args(p)
    p.add_argument(
        "--class",
        dest="default_class",
        choices=CLASSES,
        default="standard",
        help="default message class",
    )
    p.add_argument("--max-binds", type=int, default=10)
    p = acc.add_parser("list", help="list accounts and key ids (never secrets)")
    p.add_argument("--json", action="store_true", help="JSON output")
    p = acc.add_parser("set-password", help="set or replace the SMPP password")
    p.add_argument("name")
    _add_password_args(p)
    p = acc.add_parser("add-key", help="make an HTTP API key; it is printed once")
    p.add_argument("name")
    p.add_argument(
        "--perm",
        action="append",
        choices=PERMISSIONS,
        help="a permission (repeatable; default: send)",
    )
    p = acc.add_parser("revoke-key", help="revoke an API key at once")
    p.add_argument("key_id", type=int)
    p = acc.add_parser("set-class-default", help="default message class of an account")
    p.add_argument("name")
    p.add_argument("message_class", choices=CLASSES)
    p = acc.add_parser("set-retention", help="traffic-log retention of an account")
    p.add_argument("name")
    p.add_argument("--days", type=int, required=True, help="anonymise rows after N days")
    p.add_argument("--purge-days", type=int, help="delete rows after M days")

    p_ret = sub.add_parser("retention", help="traffic-log retention")
    ret = p_ret.add_subparsers(dest="retention_command", required=True)
    p = ret.add_parser("run", help="one retention pass now; prints what it did")
    p.add_argument("--batch", type=int, default=10_000)

    p_dsr = sub.add_parser("dsr", help="data-subject requests for one account and number")
    dsr = p_dsr.add_subparsers(dest="dsr_command", required=True)
    for name, text in (
        ("export", "print the number's traffic-log rows"),
        ("erase", "anonymise the number's traffic-log rows now"),
    ):
        p = dsr.add_parser(name, help=text)
        p.add_argument("--account", required=True, help="account name")
        p.add_argument(
            "--msisdn",
            required=True,
            help="the number; '-' reads it from stdin (keeps it out of ps)",
        )
        if name == "export":
            p.add_argument("--format", choices=("json", "csv"), default="json")
            p.add_argument("--output", help="write to this file (mode 0600) instead of stdout")


class CliError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _admin(args: argparse.Namespace) -> int:
    import asyncpg

    from .config import load_config

    cfg = load_config(args.config)
    if cfg.database_url is None:
        print("error: set ROUTER_DATABASE_URL or database.url", file=sys.stderr)
        return 2
    handler: Callable[[Any, argparse.Namespace], Awaitable[int]]
    if args.command == "accounts":
        handler = _ACCOUNTS[args.accounts_command]
    elif args.command == "retention":
        handler = _retention_run
    else:
        handler = _dsr

    async def go() -> int:
        pool = await asyncpg.create_pool(cfg.database_url, min_size=1, max_size=2)
        assert pool is not None
        try:
            return await handler(pool, args)
        finally:
            await pool.close()

    try:
        return asyncio.run(go())
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except asyncpg.UniqueViolationError:
        print("error: an account with that name or system_id already exists", file=sys.stderr)
        return 1
    except asyncpg.UndefinedTableError:
        print("error: the database has no schema yet: run `sms-router migrate`", file=sys.stderr)
        return 1
    except asyncpg.CheckViolationError as exc:
        print(f"error: value out of range ({exc.constraint_name})", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"error: database: {type(exc).__name__}", file=sys.stderr)
        return 1


def _password(args: argparse.Namespace, required: bool) -> str | None:
    if args.password is not None:
        print(
            "warning: --password is visible in ps and shell history; prefer --password-stdin",
            file=sys.stderr,
        )
        pw: str | None = args.password
    elif args.password_stdin:
        pw = sys.stdin.readline().rstrip("\r\n")
    elif required:
        if sys.stdin.isatty():
            import getpass

            pw = getpass.getpass("SMPP password: ")
            if getpass.getpass("again: ") != pw:
                raise CliError("the passwords differ", 2)
        else:
            pw = sys.stdin.readline().rstrip("\r\n")
    else:
        return None
    if not pw:
        raise CliError("empty password", 2)
    if len(pw.encode()) > 8:
        print(
            "note: SMPP 3.4 allows 8 octets; some clients refuse longer passwords", file=sys.stderr
        )
    return pw


async def _account_id(pool: Any, name: str) -> int:
    account_id = await pool.fetchval("SELECT id FROM accounts WHERE name = $1", name)
    if account_id is None:
        raise CliError(f"no account named {name!r}")
    return int(account_id)


def _reload_hint() -> None:
    print("running routers apply this on their next account reload (SIGHUP)", file=sys.stderr)


async def _accounts_add(pool: Any, args: argparse.Namespace) -> int:
    from .accounts import create_account
    from .store.audit import audit, cli_actor

    if args.max_binds < 0:
        raise CliError("--max-binds must be >= 0", 2)
    password = _password(args, required=False)
    if password is not None and not args.system_id:
        raise CliError("a password needs --system-id (it is the SMPP login)", 2)
    async with pool.acquire() as conn, conn.transaction():
        account_id = await create_account(
            conn,
            args.name,
            system_id=args.system_id,
            password=password,
            default_class=args.default_class,
            max_binds=args.max_binds,
        )
        await audit(
            conn,
            cli_actor(),
            "account.create",
            account_id,
            name=args.name,
            system_id=args.system_id,
            default_class=args.default_class,
            max_binds=args.max_binds,
            smpp_password=password is not None,
        )
    print(f"account {args.name!r} created (id {account_id})")
    if args.system_id and password is None:
        print(
            "no SMPP password yet: binds are refused until `accounts set-password`", file=sys.stderr
        )
    _reload_hint()
    return 0


async def _accounts_list(pool: Any, args: argparse.Namespace) -> int:
    rows = await pool.fetch(
        "SELECT a.id, a.name, a.system_id, a.password_hash IS NOT NULL AS smpp_password,"
        " a.default_class, a.max_binds, a.retention_days, a.purge_days, a.enabled,"
        " coalesce(json_agg(json_build_object('id', k.id, 'permissions', k.permissions)"
        "   ORDER BY k.id) FILTER (WHERE k.id IS NOT NULL), '[]') AS keys"
        " FROM accounts a LEFT JOIN api_keys k ON k.account_id = a.id AND k.revoked_at IS NULL"
        " GROUP BY a.id ORDER BY a.name"
    )
    out = [
        {**{k: r[k] for k in r.keys() if k != "keys"}, "keys": json.loads(r["keys"])} for r in rows
    ]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"{'ID':>4}  {'NAME':<20} {'SYSTEM_ID':<16} {'CLASS':<8} {'BINDS':>5} "
        f"{'RETAIN':>6} {'PURGE':>5}  KEYS (id:permissions)"
    )
    for a in out:
        keys = " ".join(f"{k['id']}:{','.join(k['permissions'])}" for k in a["keys"]) or "-"
        flag = "" if a["enabled"] else " (disabled)"
        print(
            f"{a['id']:>4}  {a['name']:<20} {a['system_id'] or '-':<16} "
            f"{a['default_class']:<8} {a['max_binds']:>5} {a['retention_days']:>6} "
            f"{a['purge_days']:>5}  {keys}{flag}"
        )
    return 0


async def _accounts_set_password(pool: Any, args: argparse.Namespace) -> int:
    from .accounts import hash_secret
    from .store.audit import audit, cli_actor

    account_id = await _account_id(pool, args.name)
    password = _password(args, required=True)
    assert password is not None
    pw_hash = await asyncio.to_thread(hash_secret, password)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "UPDATE accounts SET password_hash = $2 WHERE id = $1", account_id, pw_hash
        )
        await audit(conn, cli_actor(), "account.password_set", account_id)
    print(f"SMPP password of {args.name!r} set")
    _reload_hint()
    return 0


async def _accounts_add_key(pool: Any, args: argparse.Namespace) -> int:
    from .accounts import add_api_key
    from .store.audit import audit, cli_actor

    account_id = await _account_id(pool, args.name)
    perms = tuple(dict.fromkeys(args.perm or ["send"]))
    async with pool.acquire() as conn, conn.transaction():
        key_id, key = await add_api_key(conn, account_id, permissions=perms)
        await audit(
            conn, cli_actor(), "api_key.create", account_id, key_id=key_id, permissions=list(perms)
        )
    print(
        f"API key {key_id} for {args.name!r} ({', '.join(perms)}); it is shown only now:",
        file=sys.stderr,
    )
    print(key)
    _reload_hint()
    return 0


async def _accounts_revoke_key(pool: Any, args: argparse.Namespace) -> int:
    from .store.audit import audit, cli_actor

    async with pool.acquire() as conn, conn.transaction():
        account_id = await conn.fetchval(
            "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL"
            " RETURNING account_id",
            args.key_id,
        )
        if account_id is None:
            raise CliError(f"no active API key with id {args.key_id}")
        await audit(conn, cli_actor(), "api_key.revoke", account_id, key_id=args.key_id)
    print(f"API key {args.key_id} revoked")
    _reload_hint()
    return 0


async def _accounts_set_class(pool: Any, args: argparse.Namespace) -> int:
    from .store.audit import audit, cli_actor

    account_id = await _account_id(pool, args.name)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "UPDATE accounts SET default_class = $2 WHERE id = $1", account_id, args.message_class
        )
        await audit(
            conn,
            cli_actor(),
            "account.default_class_set",
            account_id,
            default_class=args.message_class,
        )
    print(f"default class of {args.name!r} is now {args.message_class}")
    _reload_hint()
    return 0


async def _accounts_set_retention(pool: Any, args: argparse.Namespace) -> int:
    from .store.audit import audit, cli_actor

    if args.days < 1 or (args.purge_days is not None and args.purge_days < 1):
        raise CliError("--days and --purge-days must be at least 1", 2)
    account_id = await _account_id(pool, args.name)
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "UPDATE accounts SET retention_days = $2, purge_days = coalesce($3, purge_days)"
            " WHERE id = $1 RETURNING retention_days, purge_days",
            account_id,
            args.days,
            args.purge_days,
        )
        await audit(
            conn,
            cli_actor(),
            "account.retention_set",
            account_id,
            retention_days=row["retention_days"],
            purge_days=row["purge_days"],
        )
    if row["purge_days"] < row["retention_days"]:
        print("note: rows are deleted before they would be anonymised", file=sys.stderr)
    print(
        f"{args.name!r}: anonymise after {row['retention_days']} days, "
        f"delete after {row['purge_days']} days"
    )
    return 0


_ACCOUNTS: dict[str, Callable[[Any, argparse.Namespace], Awaitable[int]]] = {
    "add": _accounts_add,
    "list": _accounts_list,
    "set-password": _accounts_set_password,
    "add-key": _accounts_add_key,
    "revoke-key": _accounts_revoke_key,
    "set-class-default": _accounts_set_class,
    "set-retention": _accounts_set_retention,
}


async def _retention_run(pool: Any, args: argparse.Namespace) -> int:
    import datetime as dt

    from .store.audit import audit, cli_actor
    from .store.retention import run_retention

    if args.batch < 1:
        raise CliError("--batch must be at least 1", 2)
    report = await run_retention(pool, dt.datetime.now(dt.UTC), batch=args.batch)
    if report.skipped:
        raise CliError("another retention run holds the lock; nothing done")
    await audit(pool, cli_actor(), "retention.run", None, **report.as_dict())
    print(f"anonymised messages: {report.anonymised}")
    print(f"deleted messages:    {report.purged_messages}")
    print(f"deleted events:      {report.purged_events}")
    print(f"deleted audit rows:  {report.audit_deleted}")
    print(
        f"dropped partitions:  {len(report.dropped_partitions)}"
        + (f" ({', '.join(report.dropped_partitions)})" if report.dropped_partitions else "")
    )
    return 0


async def _dsr(pool: Any, args: argparse.Namespace) -> int:
    from .store import dsr
    from .store.audit import AuditKeyError, cli_actor, load_audit_key

    try:
        key = load_audit_key(required=True)
    except AuditKeyError as exc:
        raise CliError(str(exc), 2) from None
    msisdn = sys.stdin.readline().strip() if args.msisdn == "-" else args.msisdn
    account_id = await _account_id(pool, args.account)
    try:
        if args.dsr_command == "erase":
            n = await dsr.erase(pool, account_id, msisdn, actor=cli_actor(), audit_key=key)
            print(f"anonymised {n} message(s)")
            return 0
        result = await dsr.export(
            pool, account_id, msisdn, actor=cli_actor(), audit_key=key, fmt=args.format
        )
    except dsr.InvalidRequest as exc:
        raise CliError(str(exc), 2) from None
    text = result if isinstance(result, str) else json.dumps(result, indent=2) + "\n"
    if args.output:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
