"""The audit log: who read, exported, erased or changed what (privacy.md 3, 7).

Rows are append-only (a trigger refuses UPDATE, TRUNCATE and any DELETE of a
row younger than 2 years; retention deletes older ones). A phone number is
never written here in clear: callers pass ``msisdn_hash`` (HMAC-SHA256 under
a key that is never stored in the database). ``audit`` refuses detail keys
that name personal data, so a mistake fails loudly instead of leaking.

The key comes from ``ROUTER_AUDIT_KEY``:

* ``hex:<hex digits>``   - the bytes those digits spell,
* ``base64:<base64>``    - the bytes that base64 (standard or url-safe) decodes to,
* anything else          - the UTF-8 bytes of the string itself.

At least 16 bytes. Keep it stable: the same number must hash to the same
value across restarts and nodes, or an auditor cannot link an erasure to a
later question about that number.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping
from typing import Any

import asyncpg
import structlog

from ..observe.logging import PERSONAL_KEYS

log = structlog.get_logger("router.audit")

AUDIT_KEY_ENV = "ROUTER_AUDIT_KEY"
MIN_KEY_BYTES = 16
# Used only by `run --demo` when ROUTER_AUDIT_KEY is unset: demo data is fake.
DEMO_AUDIT_KEY = b"sms-router-demo-audit-key-not-for-production"

# Detail keys that would put personal data in the audit log.
FORBIDDEN_DETAIL_KEYS = PERSONAL_KEYS


class AuditKeyError(ValueError):
    pass


def parse_audit_key(raw: str) -> bytes:
    """Bytes of a ROUTER_AUDIT_KEY value (format in the module docstring)."""
    if raw.startswith("hex:"):
        try:
            key = bytes.fromhex(raw[4:])
        except ValueError:
            raise AuditKeyError(f"{AUDIT_KEY_ENV}: 'hex:' is not followed by hex digits") from None
    elif raw.startswith("base64:"):
        body = raw[7:]
        try:
            key = base64.b64decode(
                body.replace("-", "+").replace("_", "/") + "=" * (-len(body) % 4), validate=True
            )
        except (binascii.Error, ValueError):
            raise AuditKeyError(f"{AUDIT_KEY_ENV}: 'base64:' is not followed by base64") from None
    else:
        key = raw.encode()
    if len(key) < MIN_KEY_BYTES:
        raise AuditKeyError(f"{AUDIT_KEY_ENV}: the key must be at least {MIN_KEY_BYTES} bytes")
    return key


def load_audit_key(
    env: Mapping[str, str] | None = None, *, demo: bool = False, required: bool = False
) -> bytes:
    """The audit key from the environment.

    Unset: the fixed demo key in demo mode; AuditKeyError if ``required``;
    otherwise a random key for this process only, with a warning (hashes
    will not match across restarts, but no number is ever stored in clear).
    """
    env = os.environ if env is None else env
    raw = env.get(AUDIT_KEY_ENV)
    if raw:
        return parse_audit_key(raw)
    if demo:
        return DEMO_AUDIT_KEY
    if required:
        raise AuditKeyError(f"{AUDIT_KEY_ENV} is not set (e.g. hex:<64 hex digits>)")
    log.warning(
        "audit_key_missing",
        consequence="number hashes in audit_log are not comparable across restarts",
    )
    return secrets.token_bytes(32)


def normalise_msisdn(msisdn: str) -> str:
    """The digits of a phone number, as the router stores them ('+45 12' -> '4512')."""
    s = msisdn.strip()
    if s.startswith("00"):
        s = s[2:]
    return "".join(ch for ch in s if ch.isdigit())


def msisdn_hash(msisdn: str, key: bytes) -> str:
    """HMAC-SHA256 (hex) of the number's digits: the only form audit_log holds."""
    return hmac.new(key, normalise_msisdn(msisdn).encode(), hashlib.sha256).hexdigest()


def cli_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return f"cli:{user}"


async def audit(
    conn_or_pool: asyncpg.Connection | asyncpg.Pool,
    actor: str,
    action: str,
    account_id: int | None,
    **detail: Any,
) -> None:
    """Append one audit row. ``detail`` must be JSON-able and free of personal data."""
    bad = FORBIDDEN_DETAIL_KEYS.intersection(detail)
    if bad:
        raise ValueError(f"audit detail must not carry personal data: {sorted(bad)}")
    await conn_or_pool.execute(
        "INSERT INTO audit_log (actor, action, account_id, detail) VALUES ($1, $2, $3, $4::jsonb)",
        actor,
        action,
        account_id,
        json.dumps(detail, default=str, separators=(",", ":")),
    )
