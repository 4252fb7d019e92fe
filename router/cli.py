"""``sms-router`` command line: run | sim | migrate | routes check."""

from __future__ import annotations

import argparse
import asyncio
import sys

from .config import ConfigError


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="sms-router", description="An SMS router.")
    parser.add_argument("--config", help="TOML config file (or env ROUTER_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the daemon")
    p_run.add_argument("--demo", action="store_true",
                       help="embedded PostgreSQL if ROUTER_DATABASE_URL is unset, simulated "
                            "carriers, a demo account (not for production)")
    sub.add_parser("sim", help="run carrier SMSC simulators", add_help=False)
    sub.add_parser("migrate", help="apply database migrations")
    p_routes = sub.add_parser("routes", help="inspect routing")
    p_routes_sub = p_routes.add_subparsers(dest="routes_command", required=True)
    p_check = p_routes_sub.add_parser("check", help="which carrier would take NUMBER")
    p_check.add_argument("number")
    if argv and argv[0] == "sim":
        from .sim import main as sim_main

        return sim_main(argv[1:])
    args = parser.parse_args(argv)
    from .observe.logging import configure_logging

    try:
        if args.command == "run":
            from .app import run

            configure_logging()
            return run(args.config, demo=args.demo)
        if args.command == "migrate":
            from .app import migrate_only

            configure_logging()
            return asyncio.run(migrate_only(args.config))
        if args.command == "routes":
            return _routes_check(args.config, args.number)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    return 1


def _routes_check(config_path: str | None, number: str) -> int:
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
        decision = RouteTable.from_config(cfg.routes).resolve(digits, country, random.Random(0))
    except NoRoute as exc:
        print(f"country {country or 'unknown'}: no route ({exc.reason})")
        return 1
    print(f"country {country or 'unknown'}: rule {decision.rule}; carriers in order: "
          + ", ".join(decision.carriers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
