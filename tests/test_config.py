"""Configuration: the shipped example parses, env overrides, errors name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from router.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_parses_with_every_option() -> None:
    cfg = load_config(ROOT / "config" / "example.toml", env={})
    assert [c.name for c in cfg.carriers] == ["eu-carrier", "world-carrier"]
    assert cfg.routes.prefixes["4520"][0].carrier == "world-carrier"
    assert cfg.delivery_guarantee == "at-least-once"


def test_env_overrides_and_secret_not_in_repr() -> None:
    cfg = parse_config(
        {"carriers": [{"name": "eu-carrier", "password": "in-file"}]},
        {
            "ROUTER_DATABASE_URL": "postgresql://x@h/db",
            "ROUTER_SMPP_LISTEN": "0.0.0.0:2775",
            "ROUTER_CARRIER_EU_CARRIER_PASSWORD": "from-env",
        },
    )
    assert cfg.database_url == "postgresql://x@h/db"
    assert cfg.smpp_listen == ("0.0.0.0", 2775)
    assert cfg.carriers[0].password == "from-env"
    assert "from-env" not in repr(cfg) and "postgresql://" not in repr(cfg)


@pytest.mark.parametrize(
    "data,key",
    [
        ({"listen": {"smpp": "nohostport"}}, "listen.smpp"),
        ({"listen": {"smtp": "1.2.3.4:1"}}, "listen.smtp"),
        ({"smpp": {"window": "64"}}, "smpp.window"),
        ({"smpp": {"throttle_pause": 2.0, "throttle_pause_max": 1.0}}, "smpp.throttle_pause"),
        ({"smpp": {"throttle_pause": -0.1}}, "smpp.throttle_pause"),
        ({"smpp": {"throttle_pause_max": 11.0}}, "smpp.throttle_pause_max"),
        ({"carriers": [{"name": "a", "bind": "sideways"}]}, r"carriers\[0\].bind"),
        ({"carriers": [{"name": "a"}, {"name": "a"}]}, r"carriers\[1\].name"),
        ({"delivery": {"guarantee": "maybe"}}, "delivery.guarantee"),
        ({"delivery": {"spool_flush_interval": -0.001}}, "delivery.spool_flush_interval"),
        ({"delivery": {"spool_flush_interval": 1.5}}, "delivery.spool_flush_interval"),
        ({"delivery": {"receipt_ack": "later"}}, "delivery.receipt_ack"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_errors_name_the_bad_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        parse_config(data, {})


def test_daemon_refuses_bad_config_and_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[smpp]\nwindow = "lots"\n')
    r = subprocess.run(
        [sys.executable, "-m", "router.cli", "--config", str(bad), "run"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert "smpp.window" in r.stderr


def test_routes_check_cli_explains_the_choice() -> None:
    def check(*args: str) -> str:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "router.cli",
                "--config",
                str(ROOT / "config" / "example.toml"),
                "routes",
                "check",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return r.stdout

    assert "rule prefix +4520; carriers in order: world-carrier" in check("+4520123456")
    assert "country DE" in check("+4930123456")
    assert "account bank: country DK" in check("+4512345678", "--account", "bank")
    assert "no route (blocked country KP)" in check("+850212345678")
