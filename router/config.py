"""The router's configuration: one typed object built from TOML + environment.

Everything is checked before any socket opens; a bad value raises
:class:`ConfigError` naming the key (``carriers[1].port``), never echoing a
secret. Carrier passwords live only here and are never logged or exposed.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .smpp.constants import BindType


class ConfigError(ValueError):
    pass


def _addr(value: Any, key: str) -> tuple[str, int]:
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"{key}: expected 'host:port', got {value!r}")
    host, _, port = value.rpartition(":")
    try:
        p = int(port)
    except ValueError:
        raise ConfigError(f"{key}: port must be a number") from None
    if not 0 <= p <= 65535:
        raise ConfigError(f"{key}: port out of range")
    return host.strip("[]"), p


@dataclass(slots=True)
class CarrierConfig:
    name: str
    host: str = "127.0.0.1"
    port: int = 2776
    system_id: str = "router"
    password: str = field(default="", repr=False)
    system_type: str = ""
    bind: BindType = BindType.TRANSCEIVER
    sessions: int = 1
    window: int = 64
    tps: float = 1000.0
    queue_size: int = 10_000
    response_timeout: float = 30.0
    enquire_interval: float = 30.0
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    max_attempts: int = 5
    failover_error_ratio: float = 0.5  # bench the carrier when this share of recent submits fail
    failover_cooldown: float = 30.0  # seconds benched before it gets traffic again
    tls: bool = False  # SMPP over TLS to this carrier
    tls_ca: str = ""  # PEM CA bundle to verify the carrier ("" = system store)
    tls_verify: bool = True  # check the certificate and host name


@dataclass(slots=True)
class RouteEntry:
    carrier: str
    priority: int = 1
    weight: int = 1


@dataclass(slots=True)
class RoutesConfig:
    default: list[RouteEntry] = field(default_factory=list)
    countries: dict[str, list[RouteEntry]] = field(default_factory=dict)
    prefixes: dict[str, list[RouteEntry]] = field(default_factory=dict)
    blocked: list[str] = field(default_factory=list)  # ISO country codes or "+prefix"
    accounts: dict[str, RoutesConfig] = field(default_factory=dict)  # per-account overrides


@dataclass(slots=True)
class SmppIngressConfig:
    window: int = 64
    max_pdu: int = 64 * 1024
    enquire_interval: float = 30.0
    inactivity_timeout: float = 300.0
    response_timeout: float = 30.0
    receipt_retention: float = 3600.0  # keep receipts for an unbound account this long
    receipt_buffer: int = 100_000
    reassembly_timeout: float = 30.0  # customer-split parts wait this long for the rest
    reassembly_max_parts: int = 100_000  # parts held router-wide (0 = no reassembly)
    # After a throttling answer, read nothing more from that bind for this
    # long, doubling while the answers go on, up to the max (0 = off).
    throttle_pause: float = 0.01
    throttle_pause_max: float = 0.25


@dataclass(slots=True)
class HttpConfig:
    max_batch: int = 10_000
    max_body: int = 8 * 1024 * 1024


@dataclass(slots=True)
class WebhookConfig:
    initial_backoff: float = 30.0  # first retry after this many seconds, doubling
    max_backoff: float = 3600.0
    max_attempts: int = 30
    timeout: float = 10.0  # per attempt
    allow_private_targets: bool = False  # loopback/private callback URLs (on-premise set-ups)
    outbox_write_interval: float = 1.0  # pending webhooks reach the outbox table within this
    outbox_lease: float = 120.0  # a node's claim on an outbox row; others retry after it


@dataclass(slots=True)
class Config:
    smpp_listen: tuple[str, int] = ("127.0.0.1", 2775)
    http_listen: tuple[str, int] = ("127.0.0.1", 8080)
    ops_listen: tuple[str, int] = ("127.0.0.1", 8081)
    workers: int = 1  # router processes sharing the listen ports (router/workers.py)
    database_url: str | None = field(default=None, repr=False)
    traffic_log: bool = True
    log_buffer: int = 200_000
    log_flush_rows: int = 5_000
    log_flush_interval: float = 0.2
    vacuum_dead_rows: int = 20_000  # VACUUM a queue table past this many dead rows (0 = never)
    vacuum_check_interval: float = 10.0  # how often the dead rows are looked at, seconds
    log_format: str = "auto"  # auto | json | console
    delivery_guarantee: str = "at-least-once"  # or "in-memory"
    failover_after: float = 5.0  # seconds a carrier may be down before its queue moves
    spool_max_rows: int = 1_000_000
    spool_flush_interval: float = 0.002
    # "immediate": a carrier's receipt is answered at once; "durable": once
    # the traffic log holds its status (the carrier sends it again after a
    # crash), which holds the carrier's receipt window (README).
    receipt_ack: str = "immediate"
    node: str = ""  # this router's id among those sharing the database ("" = host:smpp port)
    receipt_memory: float = 3600.0  # a submitted message waits in memory this long for its receipt
    # A message whose carrier receipt has not come this long after its
    # validity ended is finished as 'unknown' (at-least-once mode).
    receipt_timeout: float = 3600.0
    node_grace: float = 30.0  # a node not seen this long (and not holding its lock) is dead
    max_memory_mb: int = 0  # refuse new messages above this RSS (0 = no brake)
    max_schedule_ahead: float = 30 * 86400.0  # furthest send_at accepted, seconds
    schedule_poll_interval: float = 0.5  # how often due scheduled messages are released
    smpp: SmppIngressConfig = field(default_factory=SmppIngressConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    webhooks: WebhookConfig = field(default_factory=WebhookConfig)
    carriers: list[CarrierConfig] = field(default_factory=list)
    routes: RoutesConfig = field(default_factory=RoutesConfig)
    demo: bool = False


_BINDS = {
    "transmitter": BindType.TRANSMITTER,
    "receiver": BindType.RECEIVER,
    "transceiver": BindType.TRANSCEIVER,
}


def _take(table: dict[str, Any], key: str, prefix: str, typ: type, default: Any) -> Any:
    if key not in table:
        return default
    value = table.pop(key)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{prefix}{key}: expected {typ.__name__}")
    return value


def _route_list(value: Any, key: str, carriers: set[str]) -> list[RouteEntry]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: expected a non-empty list of carriers")
    out: list[RouteEntry] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            entry = RouteEntry(carrier=item, priority=i + 1)
        elif isinstance(item, dict):
            item = dict(item)
            entry = RouteEntry(
                carrier=_take(item, "carrier", f"{key}[{i}].", str, ""),
                priority=_take(item, "priority", f"{key}[{i}].", int, i + 1),
                weight=_take(item, "weight", f"{key}[{i}].", int, 1),
            )
            if item:
                raise ConfigError(f"{key}[{i}]: unknown key {sorted(item)[0]!r}")
            if entry.weight < 1:
                raise ConfigError(f"{key}[{i}].weight: must be >= 1")
        else:
            raise ConfigError(f"{key}[{i}]: expected a carrier name or a table")
        if entry.carrier not in carriers:
            raise ConfigError(f"{key}[{i}].carrier: unknown carrier {entry.carrier!r}")
        out.append(entry)
    return out


def _routes(routes_t: dict[str, Any], p: str, names: set[str]) -> RoutesConfig:
    r = RoutesConfig()
    if "default" in routes_t:
        r.default = _route_list(routes_t.pop("default"), f"{p}.default", names)
    for cc, v in dict(routes_t.pop("countries", {})).items():
        if len(cc) != 2 or not cc.isalpha():
            raise ConfigError(f"{p}.countries.{cc}: expected an ISO 3166 alpha-2 code")
        r.countries[cc.upper()] = _route_list(v, f"{p}.countries.{cc}", names)
    for prefix, v in dict(routes_t.pop("prefixes", {})).items():
        digits = prefix.lstrip("+")
        if not digits.isdigit():
            raise ConfigError(f"{p}.prefixes.{prefix}: expected digits")
        r.prefixes[digits] = _route_list(v, f"{p}.prefixes.{prefix}", names)
    blocked = routes_t.pop("blocked", [])
    if not isinstance(blocked, list) or not all(isinstance(b, str) for b in blocked):
        raise ConfigError(f"{p}.blocked: expected a list of country codes or +prefixes")
    r.blocked = blocked
    if routes_t:
        raise ConfigError(f"{p}.{sorted(routes_t)[0]}: unknown key")
    return r


MAX_WORKERS = 64


def check_workers(cfg: Config) -> None:
    if not 1 <= cfg.workers <= MAX_WORKERS:
        raise ConfigError(f"listen.workers: 1..{MAX_WORKERS}")
    if cfg.workers > 1 and cfg.delivery_guarantee != "at-least-once":
        # Receipts between workers (a customer's binds on different workers,
        # a carrier receipt ahead of its submit_sm_resp) go through the
        # database tables that only the durable mode has.
        raise ConfigError('listen.workers > 1 needs delivery.guarantee = "at-least-once"')


def share_config(cfg: Config, index: int, count: int) -> Config:
    """Worker ``index`` of ``count`` (router/workers.py): what the config
    gives as a total for the router is this worker's share of it. A
    carrier's ``queue_size`` is divided evenly and its ``sessions`` spread
    over the workers; a worker left with none of a carrier's sessions (it
    allows fewer binds than there are workers) sends through a sibling's
    (router/carriers/relay.py). Rates (carrier and account
    ``tps``) stay totals here: the workers share them by demand
    (router/shares.py). Changes ``cfg`` in place and returns it."""
    if count <= 1:
        return cfg
    for c in cfg.carriers:
        c.queue_size = max(1, -(-c.queue_size // count))
        c.sessions = c.sessions // count + (1 if index < c.sessions % count else 0)
    return cfg


def parse_config(data: dict[str, Any], env: dict[str, str] | None = None) -> Config:
    """Build and check a Config from parsed TOML and the environment."""
    env = dict(os.environ) if env is None else env
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    cfg = Config()

    listen = data.pop("listen", {})
    for key in ("smpp", "http", "ops"):
        env_key = f"ROUTER_{key.upper()}_LISTEN"
        in_file = listen.pop(key, None)
        value = env.get(env_key) or in_file
        if value is not None:
            setattr(cfg, f"{key}_listen", _addr(value, f"listen.{key}"))
    workers = env.get("ROUTER_WORKERS")
    if workers is not None:
        try:
            cfg.workers = int(workers)
        except ValueError:
            raise ConfigError("ROUTER_WORKERS: expected a number") from None
        listen.pop("workers", None)
    else:
        cfg.workers = _take(listen, "workers", "listen.", int, cfg.workers)
    if listen:
        raise ConfigError(f"listen.{sorted(listen)[0]}: unknown key")

    db = data.pop("database", {})
    cfg.database_url = env.get("ROUTER_DATABASE_URL") or db.pop("url", None) or None
    db.pop("url", None)
    cfg.traffic_log = _take(db, "traffic_log", "database.", bool, cfg.traffic_log)
    cfg.log_buffer = _take(db, "log_buffer", "database.", int, cfg.log_buffer)
    cfg.log_flush_rows = _take(db, "log_flush_rows", "database.", int, cfg.log_flush_rows)
    cfg.log_flush_interval = _take(
        db, "log_flush_interval", "database.", float, cfg.log_flush_interval
    )
    cfg.vacuum_dead_rows = _take(db, "vacuum_dead_rows", "database.", int, cfg.vacuum_dead_rows)
    cfg.vacuum_check_interval = _take(
        db, "vacuum_check_interval", "database.", float, cfg.vacuum_check_interval
    )
    if cfg.vacuum_dead_rows < 0:
        raise ConfigError("database.vacuum_dead_rows: must be >= 0 (0 turns it off)")
    if cfg.vacuum_check_interval <= 0:
        raise ConfigError("database.vacuum_check_interval: must be > 0")
    if db:
        raise ConfigError(f"database.{sorted(db)[0]}: unknown key")

    delivery_t = data.pop("delivery", {})
    cfg.delivery_guarantee = _take(
        delivery_t, "guarantee", "delivery.", str, cfg.delivery_guarantee
    )
    if cfg.delivery_guarantee not in ("at-least-once", "in-memory"):
        raise ConfigError("delivery.guarantee: expected 'at-least-once' or 'in-memory'")
    cfg.spool_max_rows = _take(delivery_t, "spool_max_rows", "delivery.", int, cfg.spool_max_rows)
    cfg.spool_flush_interval = _take(
        delivery_t, "spool_flush_interval", "delivery.", float, cfg.spool_flush_interval
    )
    if not 0.0 <= cfg.spool_flush_interval <= 1.0:
        # Every submitter waits up to this for its answer.
        raise ConfigError("delivery.spool_flush_interval: 0 .. 1 seconds")
    cfg.receipt_ack = _take(delivery_t, "receipt_ack", "delivery.", str, cfg.receipt_ack)
    if cfg.receipt_ack not in ("durable", "immediate"):
        raise ConfigError("delivery.receipt_ack: expected 'durable' or 'immediate'")
    cfg.failover_after = _take(delivery_t, "failover_after", "delivery.", float, cfg.failover_after)
    cfg.receipt_memory = _take(delivery_t, "receipt_memory", "delivery.", float, cfg.receipt_memory)
    if not 60.0 <= cfg.receipt_memory <= 7 * 86400.0:
        raise ConfigError("delivery.receipt_memory: 60 s .. 7 days")
    cfg.receipt_timeout = _take(
        delivery_t, "receipt_timeout", "delivery.", float, cfg.receipt_timeout
    )
    # At most 12 h: with the longest validity (7 days) the deadline stays
    # inside the 8 days that retention keeps a receipt route.
    if not 0.0 <= cfg.receipt_timeout <= 12 * 3600.0:
        raise ConfigError("delivery.receipt_timeout: 0 .. 43200 seconds")
    cfg.node = _take(delivery_t, "node", "delivery.", str, cfg.node)
    if len(cfg.node) > 200 or not cfg.node.isprintable():
        raise ConfigError("delivery.node: at most 200 printable characters")
    cfg.node_grace = _take(delivery_t, "node_grace", "delivery.", float, cfg.node_grace)
    if not 3.0 <= cfg.node_grace <= 3600.0:
        raise ConfigError("delivery.node_grace: 3..3600 seconds")
    cfg.max_memory_mb = _take(delivery_t, "max_memory_mb", "delivery.", int, cfg.max_memory_mb)
    if cfg.max_memory_mb < 0:
        raise ConfigError("delivery.max_memory_mb: must be >= 0 (0 = no brake)")
    cfg.max_schedule_ahead = _take(
        delivery_t, "max_schedule_ahead", "delivery.", float, cfg.max_schedule_ahead
    )
    cfg.schedule_poll_interval = _take(
        delivery_t, "schedule_poll_interval", "delivery.", float, cfg.schedule_poll_interval
    )
    if cfg.max_schedule_ahead <= 0 or not 0.05 <= cfg.schedule_poll_interval <= 60:
        raise ConfigError(
            "delivery.max_schedule_ahead must be > 0 and schedule_poll_interval 0.05..60 s"
        )
    if delivery_t:
        raise ConfigError(f"delivery.{sorted(delivery_t)[0]}: unknown key")
    check_workers(cfg)

    logging_t = data.pop("logging", {})
    cfg.log_format = _take(logging_t, "format", "logging.", str, cfg.log_format)
    if cfg.log_format not in ("auto", "json", "console"):
        raise ConfigError("logging.format: expected auto, json or console")

    smpp_t = data.pop("smpp", {})
    for name in SmppIngressConfig.__slots__:
        default = getattr(cfg.smpp, name)
        setattr(cfg.smpp, name, _take(smpp_t, name, "smpp.", type(default), default))
    if smpp_t:
        raise ConfigError(f"smpp.{sorted(smpp_t)[0]}: unknown key")
    if not 0 < cfg.smpp.reassembly_timeout <= 3600:
        raise ConfigError("smpp.reassembly_timeout: must be > 0 and <= 3600 seconds")
    if cfg.smpp.reassembly_max_parts < 0:
        raise ConfigError("smpp.reassembly_max_parts: must be >= 0 (0 = no reassembly)")
    if not 0 <= cfg.smpp.throttle_pause_max <= 10:
        raise ConfigError("smpp.throttle_pause_max: must be >= 0 and <= 10 seconds")
    if not 0 <= cfg.smpp.throttle_pause <= cfg.smpp.throttle_pause_max:
        raise ConfigError("smpp.throttle_pause: must be >= 0 and <= smpp.throttle_pause_max")

    http_t = data.pop("http", {})
    for name in HttpConfig.__slots__:
        default = getattr(cfg.http, name)
        setattr(cfg.http, name, _take(http_t, name, "http.", type(default), default))
    if http_t:
        raise ConfigError(f"http.{sorted(http_t)[0]}: unknown key")

    webhooks_t = data.pop("webhooks", {})
    for name in WebhookConfig.__slots__:
        default = getattr(cfg.webhooks, name)
        setattr(cfg.webhooks, name, _take(webhooks_t, name, "webhooks.", type(default), default))
    if webhooks_t:
        raise ConfigError(f"webhooks.{sorted(webhooks_t)[0]}: unknown key")
    if cfg.webhooks.max_attempts < 1 or cfg.webhooks.initial_backoff <= 0:
        raise ConfigError("webhooks.max_attempts must be >= 1 and initial_backoff > 0")
    if cfg.webhooks.outbox_write_interval <= 0:
        raise ConfigError("webhooks.outbox_write_interval: must be > 0")
    if cfg.webhooks.outbox_lease < cfg.webhooks.timeout + cfg.webhooks.outbox_write_interval + 10:
        raise ConfigError(
            "webhooks.outbox_lease: must exceed timeout + outbox_write_interval + 10 s"
        )

    names: set[str] = set()
    for i, raw in enumerate(data.pop("carriers", [])):
        if not isinstance(raw, dict):
            raise ConfigError(f"carriers[{i}]: expected a table")
        raw = dict(raw)
        p = f"carriers[{i}]."
        name = _take(raw, "name", p, str, "")
        if not name:
            raise ConfigError(f"{p}name: required")
        if name in names:
            raise ConfigError(f"{p}name: duplicate carrier {name!r}")
        names.add(name)
        c = CarrierConfig(name=name)
        bind = _take(raw, "bind", p, str, "transceiver")
        if bind not in _BINDS:
            raise ConfigError(f"{p}bind: expected transmitter, receiver or transceiver")
        c.bind = _BINDS[bind]
        env_pw = env.get(f"ROUTER_CARRIER_{name.upper().replace('-', '_')}_PASSWORD")
        for fname in (
            "host",
            "port",
            "system_id",
            "password",
            "system_type",
            "sessions",
            "window",
            "tps",
            "queue_size",
            "response_timeout",
            "enquire_interval",
            "reconnect_min",
            "reconnect_max",
            "max_attempts",
            "failover_error_ratio",
            "failover_cooldown",
            "tls",
            "tls_ca",
            "tls_verify",
        ):
            default = getattr(c, fname)
            setattr(c, fname, _take(raw, fname, p, type(default), default))
        if env_pw:
            c.password = env_pw
        if raw:
            raise ConfigError(f"{p}{sorted(raw)[0]}: unknown key")
        for fname in ("sessions", "window", "queue_size", "max_attempts"):
            if getattr(c, fname) < 1:
                raise ConfigError(f"{p}{fname}: must be >= 1")
        if c.tps <= 0:
            raise ConfigError(f"{p}tps: must be > 0")
        if not 0 < c.port < 65536:
            raise ConfigError(f"{p}port: out of range")
        cfg.carriers.append(c)

    routes_t = dict(data.pop("routes", {}))
    accounts_t = routes_t.pop("accounts", {})
    cfg.routes = _routes(routes_t, "routes", names)
    if not isinstance(accounts_t, dict):
        raise ConfigError("routes.accounts: expected a table of account names")
    for account, sub in accounts_t.items():
        if not isinstance(sub, dict):
            raise ConfigError(f"routes.accounts.{account}: expected a table")
        cfg.routes.accounts[account] = _routes(dict(sub), f"routes.accounts.{account}", names)

    if data:
        raise ConfigError(f"{sorted(data)[0]}: unknown key")
    return cfg


def load_config(path: str | Path | None, env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ) if env is None else env
    path = path or env.get("ROUTER_CONFIG")
    if not path:
        return parse_config({}, env)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return parse_config(data, env)
