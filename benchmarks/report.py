"""Result files and the summary table: ``<scenario>.json``, ``<scenario>.png``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write(result: dict[str, Any], out_dir: Path, plot: bool = True) -> dict[str, str]:
    """Write the JSON (and the PNG); return their paths, also recorded in the JSON."""
    name = result["scenario"]
    json_path = out_dir / f"{name}.json"
    files = {"json": str(json_path)}
    png_path = out_dir / f"{name}.png"
    if plot:
        try:
            if name == "codec":
                _plot_codec(result, png_path)
            elif name == "jasmin-compare":
                _plot_compare(result, png_path)
            else:
                _plot_load(result, png_path)
            files["png"] = str(png_path)
        except ImportError:
            result.setdefault("notes", []).append("matplotlib is not installed: no plot")
    result["files"] = files
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, json_path)
    return files


# --------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)


def _plot_load(r: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    soak = r.get("soak")
    if soak:
        fig, (ax1, ax2, ax3, ax4) = plt.subplots(4, 1, figsize=(10, 14),
                                                 gridspec_kw={"height_ratios": [3, 2, 3, 3]})
    else:
        fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(10, 11),
                                            gridspec_kw={"height_ratios": [3, 2, 3]})
    series = r["series"]
    per_s = series["per_second"]
    m0, m1 = series["measure_start_s"], series["measure_end_s"]
    unit = "messages/s"
    for key, label in (("accepted", "accepted"), ("receipts", "receipts (deliver_sm)"),
                       ("errors", "error answers")):
        values = per_s.get(key)
        if values:
            ax1.plot([i + 0.5 for i in range(len(values))], values, marker=".", label=label)
    ax1.axvspan(m0, m1, color="tab:green", alpha=0.08, label="measured window")
    ax1.set_title(f"{r['scenario']} ({r['mode']}): throughput per second")
    ax1.set_xlabel("seconds since the load generator started")
    ax1.set_ylabel(unit)
    ax1.grid(alpha=0.3)
    ax1.legend(loc="lower center", fontsize=8)

    for name, pts in series["cpu_pct"].items():
        if pts:
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
    ax2.axvspan(m0, m1, color="tab:green", alpha=0.08)
    ax2.set_ylabel("CPU % of one core")
    ax2.set_xlabel("seconds since the load generator started")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="lower center", fontsize=8)

    keys = [("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"), ("p99_9_ms", "p99.9"),
            ("max_ms", "max")]
    lat = r["latency_ms"]
    kinds = [(k, v) for k, v in (("submit -> response", lat.get("submit_to_resp")),
                                 ("submit -> receipt", lat.get("submit_to_receipt")))
             if isinstance(v, dict) and v.get("count")]
    width = 0.8 / max(1, len(kinds))
    for j, (label, stats) in enumerate(kinds):
        xs = [i + j * width for i in range(len(keys))]
        ys = [stats.get(k) or 0.0 for k, _ in keys]
        bars = ax3.bar(xs, ys, width=width, label=f"{label} (n={stats['count']:,})")
        for b, y in zip(bars, ys, strict=False):
            ax3.annotate(f"{y:.1f}", (b.get_x() + b.get_width() / 2, y), ha="center",
                         va="bottom", fontsize=7)
    ax3.set_xticks([i + width * (len(kinds) - 1) / 2 for i in range(len(keys))])
    ax3.set_xticklabels([lbl for _, lbl in keys])
    ax3.set_yscale("log")
    ax3.set_ylabel("latency, ms (log)")
    what = "per request" if r["scenario"].startswith("http") else "per message"
    ax3.set_title(f"latency percentiles in the measured window ({what})")
    ax3.grid(alpha=0.3, axis="y")
    if kinds:
        ax3.legend(fontsize=8)
    if soak:
        rows = soak["rows"]
        xs = [row["t_s"] for row in rows]
        ax4.plot(xs, [row["rss_mb"] for row in rows], color="tab:purple", marker=".",
                 label="router RSS (MB)")
        ax4.set_ylabel("router RSS, MB")
        ax4.set_xlabel("seconds since the load generator started")
        ax4.grid(alpha=0.3)
        ax4b = ax4.twinx()
        ax4b.plot(xs, [row["resp_p99_ms"] for row in rows], color="tab:orange", marker=".",
                  label="submit -> response p99 (ms)")
        ax4b.plot(xs, [row["receipt_p99_ms"] for row in rows], color="tab:red", marker=".",
                  label="submit -> receipt p99 (ms)")
        ax4b.set_ylabel("p99 per interval, ms")
        ax4.set_title(f"soak: every {soak['interval_s']:g} s (RSS first/last "
                      f"{soak['edge_s']:.0f} s: {soak['rss_mb_first']} / {soak['rss_mb_last']} MB)")
        h1, l1 = ax4.get_legend_handles_labels()
        h2, l2 = ax4b.get_legend_handles_labels()
        ax4.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower center")
    m = r["machine"]
    fig.text(0.01, 0.005, f"{r['date']}  {m['cores']} cores  Python {m['python']}  "
             f"router CPU {r['router']['cpu_pct_of_core']}% of a core  "
             f"peak RSS {r['router']['peak_rss_mb']} MB", fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    _save(fig, path)
    plt.close(fig)


def _plot_compare(r: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 9), gridspec_kw={"height_ratios": [2, 3]})
    sides = [("Jasmin", r["jasmin"]), ("sms-router", r["router"])]
    keys = [("accepted_per_s", "accepted/s"), ("receipts_per_s", "receipts/s")]
    width = 0.38
    for j, (label, side) in enumerate(sides):
        ys = [side.get(k) or 0.0 for k, _ in keys]
        bars = ax1.bar([i + j * width for i in range(len(keys))], ys, width=width, label=label)
        for b, y in zip(bars, ys, strict=False):
            ax1.annotate(f"{y:,.0f}", (b.get_x() + b.get_width() / 2, y), ha="center",
                         va="bottom", fontsize=8)
    ax1.set_xticks([i + width / 2 for i in range(len(keys))])
    ax1.set_xticklabels([lbl for _, lbl in keys])
    ratio = r["ratio_router_over_jasmin"]
    ax1.set_title(f"same SMPP load ({r['mode']}): router/Jasmin accepted x"
                  f"{ratio['accepted_per_s']}, receipts x{ratio['receipts_per_s']}")
    ax1.grid(alpha=0.3, axis="y")
    ax1.legend(fontsize=8)
    for label, key in (("Jasmin", "jasmin"), ("sms-router", "router")):
        per_s = r["series"][key]["per_second"]
        for what, style in (("accepted", "-"), ("receipts", "--")):
            values = per_s.get(what)
            if values:
                ax2.plot([i + 0.5 for i in range(len(values))], values, style,
                         label=f"{label} {what}")
    ax2.set_xlabel("seconds since the load generator started")
    ax2.set_ylabel("messages/s")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _plot_codec(r: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    rows = r["results"]
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(rows) + 1.5))
    names = [row["operation"] for row in rows]
    ys = range(len(rows))
    ours = [row["ours_per_s"] for row in rows]
    theirs = [row["aiosmpplib_per_s"] or 0 for row in rows]
    ax.barh([y + 0.2 for y in ys], ours, height=0.4, label="router.smpp")
    ax.barh([y - 0.2 for y in ys], theirs, height=0.4, label="aiosmpplib")
    ax.set_yticks(list(ys))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("operations per second (best of runs)")
    ax.set_title("SMPP codec: router.smpp vs aiosmpplib")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------- table


def _ms(stats: dict[str, Any] | None, key: str) -> str:
    if not stats or stats.get(key) is None:
        return "-"
    v = stats[key]
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def table(results: list[dict[str, Any]]) -> str:
    load = [r for r in results if r["scenario"] not in ("codec", "jasmin-compare")]
    out: list[str] = []
    if load:
        head = (f"{'scenario':<15} {'mode':<11} {'offered/s':>9} {'accepted/s':>10} "
                f"{'receipts/s':>10} {'resp p50/p90/p99/max ms':>25} "
                f"{'receipt p50/p90/p99/max ms':>27} {'errors':>7} {'router CPU':>10} "
                f"{'peak RSS':>8} {'lost':>5}")
        out += [head, "-" * len(head)]
        for r in load:
            lat = r["latency_ms"]
            resp = "/".join(_ms(lat.get("submit_to_resp"), k)
                            for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms"))
            dlr = "/".join(_ms(lat.get("submit_to_receipt"), k)
                           for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms"))
            errors = sum(r["errors"]["counts"].values())
            cpu = r["router"]["cpu_pct_of_core"]
            lost = (r.get("lifecycle") or {}).get("lost")
            out.append(
                f"{r['scenario']:<15} {r['mode']:<11} {_num(r['offered_per_s']):>9} "
                f"{_num(r['accepted_per_s']):>10} {_num(r['delivered_per_s']):>10} "
                f"{resp:>25} {dlr:>27} {errors:>7,} "
                f"{'-' if cpu is None else f'{cpu:.0f}%':>10} "
                f"{r['router']['peak_rss_mb']:>6.0f}MB {'-' if lost is None else lost:>5}"
            )
        first = load[0]
        m = first["machine"]
        out.append(
            f"window {first['timing']['duration_s']:.0f} s after {first['timing']['warmup_s']:g} s"
            f" warm-up; simulator receipt delay {first['simulators']['dlr_delay_s'] * 1000:.0f}"
            f" ms (in 'receipt' latency); HTTP latency is per request; router CPU in % of one "
            f"core; {m['cores']} cores, Python {m['python']}"
        )
        out += [line for r in load for line in _findings(r)]
    for r in results:
        if r["scenario"] == "jasmin-compare":
            out += [""] + compare_lines(r)
    codec = [r for r in results if r["scenario"] == "codec"]
    if codec:
        from .codec import format_table

        if out:
            out.append("")
        out.append("codec:")
        out.append(format_table(codec[0]))
    return "\n".join(out)


def _findings(r: dict[str, Any]) -> list[str]:
    """One line per scenario that is about more than throughput and latency."""
    lc = r.get("lifecycle") or {}
    whole = (f"whole run: accepted {lc.get('accepted', 0):,}, receipted "
             f"{lc.get('receipted', 0):,}, lost {lc.get('lost', 0):,}, duplicate receipts "
             f"{lc.get('duplicate_receipts', 0):,}") if lc else ""
    if "overload" in r:
        o = r["overload"]
        t = o["throttle_answers_run"]
        return [f"overload: {o['offered_per_s']:,.0f}/s offered to carriers taking "
                f"{o['carrier_capacity_per_s']:,.0f}/s: accepted {o['accepted_per_s']:,.0f}/s, "
                f"answered ESME_RMSGQFUL {t['ESME_RMSGQFUL']:,} / ESME_RTHROTTLED "
                f"{t['ESME_RTHROTTLED']:,}, peak RSS {o['router_peak_rss_mb']:.0f} MB; {whole}"
                f" (all receipted {o['drained_after_s']} s after the load stopped)"]
    if "carrier_flap" in r:
        f = r["carrier_flap"]
        return [f"carrier-flap: connections dropped every {f['drop_every_s']:g} s, "
                f"{_num(f['reconnects'])} carrier reconnects; {whole}"]
    if "soak" in r:
        s = r["soak"]
        return [f"soak: {r['timing']['duration_s']:.0f} s at {_num(s['rate'])}/s: router RSS "
                f"{s['rss_mb_first']} -> {s['rss_mb_last']} MB (first/last {s['edge_s']:.0f} s; "
                f"slope {s['rss_mb_slope_per_min']} MB/min{_settled(s)}), receipt p99 "
                f"{s['receipt_p99_ms_first']} -> {s['receipt_p99_ms_last']} ms, response p99 "
                f"{s['resp_p99_ms_first']} -> {s['resp_p99_ms_last']} ms; {whole}"]
    if lc.get("lost") or lc.get("duplicate_receipts"):
        return [f"{r['scenario']}: {whole}"]
    return []


def _settled(s: dict[str, Any]) -> str:
    at = s.get("rss_settled_at_s")  # absent from results written before it existed
    if at is None:
        return ""
    return f"; settled at {at:.0f} s, then +{s['rss_mb_growth_after_settled']} MB"


def compare_lines(r: dict[str, Any]) -> list[str]:
    j, o, ratio = r["jasmin"], r["router"], r["ratio_router_over_jasmin"]
    out = [f"jasmin-compare ({r['mode']}, {r['timing']['duration_s']:.0f} s window, same load "
           f"and simulators):",
           f"  {'':<11} {'accepted/s':>10} {'receipts/s':>10} {'resp p50/p99 ms':>16} "
           f"{'receipt p50/p99 ms':>19} {'CPU':>5} {'peak RSS':>8} {'no receipt':>10}"]
    for label, side in (("Jasmin", j), ("sms-router", o)):
        lat = side["latency_ms"]
        resp = "/".join(_ms(lat.get("submit_to_resp"), k) for k in ("p50_ms", "p99_ms"))
        dlr = "/".join(_ms(lat.get("submit_to_receipt"), k) for k in ("p50_ms", "p99_ms"))
        cpu = side["cpu_pct_of_core"]
        out.append(f"  {label:<11} {_num(side['accepted_per_s']):>10} "
                   f"{_num(side['receipts_per_s']):>10} {resp:>16} {dlr:>19} "
                   f"{'-' if cpu is None else f'{cpu:.0f}%':>5} {side['peak_rss_mb']:>6.0f}MB "
                   f"{(side.get('lifecycle') or {}).get('lost', '-'):>10}")

    def x(v: float | None) -> str:
        return "n/a (Jasmin: 0/s)" if v is None else f"x{v}"

    out.append(f"  router / Jasmin: accepted/s {x(ratio['accepted_per_s'])}, receipts/s "
               f"{x(ratio['receipts_per_s'])}; 'no receipt' = accepted ids without a receipt "
               "when the bounded wait after the load ended (still queued, not necessarily "
               "dropped)")
    return out
