"""``python -m benchmarks run [SCENARIO ...] [--quick] [--duration S] [--rate R]``.

See benchmarks/README.md; ``python -m benchmarks run --help`` lists the options.
"""

from __future__ import annotations

import sys

USAGE = """usage: python -m benchmarks run [SCENARIO ...] [--quick] [--duration S] [--rate R]
       python -m benchmarks list
       python -m benchmarks readme [--results DIR]

commands:
  run    start simulators, router and load generator as subprocesses, measure, stop
  list   the scenarios
  readme the README's Performance and codec tables from the result files
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "run":
        from .runner import main as run_main

        return run_main(rest)
    if command == "list":
        from .runner import FULL, QUICK, SCENARIOS

        for sc in SCENARIOS.values():
            print(f"{sc.name:<16}{'' if sc.default else '(only when named) '}{sc.summary}")
        print(f"\nfull: {FULL.warmup:g} s warm-up + {FULL.duration:g} s measured per scenario"
              f" unless the scenario says otherwise; --quick: {QUICK.duration:g} s, no warm-up")
        return 0
    if command == "readme":
        from .readme import main as readme_main

        return readme_main(rest)
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
