"""The README's Performance and codec tables, generated from result files.

    python -m benchmarks readme [--results benchmarks/results]

prints the markdown tables for the scenarios found there (in the default
set's order), so the figures in README.md are copied from a run, not typed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ORDER = (
    "smpp-e2e",
    "smpp-e2e-workers",
    "smpp-1bind",
    "smpp-e2e-memory",
    "overload",
    "carrier-flap",
    "http-single",
    "http-single-workers",
    "http-batch",
    "http-batch-workers",
    "soak",
)


def _ms(stats: dict[str, Any] | None, key: str) -> str:
    if not stats or stats.get(key) is None:
        return "-"
    v = float(stats[key])
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def load_table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| scenario | mode | offered/s | accepted/s | receipts/s "
        "| submit->resp p50 / p99 ms | submit->receipt p50 / p99 ms "
        "| router CPU | peak RSS | lost |",
        "|---|---|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in results:
        lat = r["latency_ms"]
        resp, dlr = lat.get("submit_to_resp"), lat.get("submit_to_receipt")
        cpu = r["router"]["cpu_pct_of_core"]
        lost = (r.get("lifecycle") or {}).get("lost")
        rows.append(
            f"| {r['scenario']} | {r['mode']} | {_num(r['offered_per_s'])} "
            f"| {_num(r['accepted_per_s'])} | {_num(r['delivered_per_s'])} "
            f"| {_ms(resp, 'p50_ms')} / {_ms(resp, 'p99_ms')} "
            f"| {_ms(dlr, 'p50_ms')} / {_ms(dlr, 'p99_ms')} "
            f"| {'-' if cpu is None else f'{cpu:.0f}%'} "
            f"| {r['router']['peak_rss_mb']:.0f} MB | {'-' if lost is None else f'{lost:,}'} |"
        )
    return "\n".join(rows)


def codec_table(result: dict[str, Any]) -> str:
    rows = ["| operation | ours/s | aiosmpplib/s | ratio |", "|---|---:|---:|---:|"]
    for x in result["results"]:
        rows.append(
            f"| {x['operation']} | {x['ours_per_s']:,} | {x['aiosmpplib_per_s']:,} "
            f"| {x['ratio']:.2f}x |"
        )
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    results_dir = Path("benchmarks/results")
    if argv[:1] == ["--results"] and len(argv) > 1:
        results_dir = Path(argv[1])
    found = []
    for name in ORDER:
        path = results_dir / f"{name}.json"
        if path.exists():
            found.append(json.loads(path.read_text()))
    if found:
        dates = sorted({r["date"][:10] for r in found})
        commits = sorted({(r.get("git") or {}).get("commit", "?")[:10] for r in found})
        builds = sorted({
            ((r.get("machine") or {}).get("router_build") or {"compiled": "not recorded"})[
                "compiled"
            ]
            for r in found
        })
        print(
            "<!-- python -m benchmarks readme: runs of "
            f"{', '.join(dates)}, commits {', '.join(commits)}, "
            f"compiled modules: {', '.join(builds)} -->"
        )
        print(load_table(found))
    codec = results_dir / "codec.json"
    if codec.exists():
        print()
        print(codec_table(json.loads(codec.read_text())))
    return 0 if found else 1
