"""Accounts, their credentials and limits.

Passwords and API keys are stored as argon2id hashes and verified off the
event loop. A successful verification is remembered in memory (keyed by a
SHA-256 of hash+secret, never the secret itself) so that 1,000 binds or an
HTTP request per key do not each cost an argon2 run; revoking a key or
changing a password clears that memory at once. Never logs a secret.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass, field

import asyncpg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from ..model import MessageClass
from ..smpp.constants import Status

# argon2id at OWASP's recommended cost (19 MiB, 2 passes, 1 lane): a 64 MiB
# default let a burst of bad-password binds (6 verifications at once on the
# default thread pool) push RSS up by ~400 MB. Older hashes keep verifying
# with the parameters they carry. At most VERIFY_SLOTS run at once.
_HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)
VERIFY_SLOTS = 2
# A hash to verify against when the system_id is unknown, so that "no such
# account" and "wrong password" take the same time.
_DUMMY_HASH = _HASHER.hash(secrets.token_hex(16))
API_KEY_PREFIX_LEN = 6


def hash_secret(secret: str) -> str:
    return _HASHER.hash(secret)


def new_api_key() -> str:
    return "sk_" + secrets.token_urlsafe(32)


@dataclass(slots=True)
class Account:
    id: int
    name: str
    system_id: str | None
    password_hash: str | None = field(repr=False)
    default_class: MessageClass = MessageClass.STANDARD
    max_binds: int = 10
    allowed_ips: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None
    tps: float | None = None
    retention_days: int = 30
    purge_days: int = 395
    webhook_url: str | None = None
    enabled: bool = True

    def ip_allowed(self, ip: str | None) -> bool:
        if self.allowed_ips is None:
            return True
        if ip is None:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.allowed_ips)


@dataclass(slots=True)
class ApiKey:
    id: int
    account_id: int
    prefix: str
    key_hash: str = field(repr=False)
    permissions: frozenset[str] = frozenset({"send"})


class AuthError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class AccountStore:
    """All accounts in memory, loaded from PostgreSQL; reloaded on SIGHUP."""

    def __init__(self) -> None:
        self.by_id: dict[int, Account] = {}
        self.by_system_id: dict[str, Account] = {}
        self.keys_by_prefix: dict[str, list[ApiKey]] = {}
        # Proven (stored hash, secret) pairs, by fingerprint. Kept across
        # reloads: a fingerprint covers the stored hash, so a new password or
        # key hash is a new fingerprint, and a revoked key or disabled account
        # is refused by the lookups below before its fingerprint is consulted.
        # Clearing it on each reload would make every customer pay an argon2
        # run at once after any account change anywhere (a CPU stampede).
        self._verified: dict[bytes, int] = {}
        # Keys are found by their first API_KEY_PREFIX_LEN characters ("sk_"
        # and 3 random ones), so two keys may share a prefix. For a valid key
        # whose prefix another key has, the other key's mismatch is
        # remembered here, or every request would pay a failing argon2 run
        # (~tens of ms of CPU) first. Only mismatches of keys that then
        # proved valid: an invalid key never gets a faster answer, so timing
        # tells nothing about which prefixes exist.
        self._mismatch: dict[bytes, int] = {}
        self._verifying: dict[bytes, asyncio.Future[bool]] = {}
        self._slots: asyncio.Semaphore | None = None  # created in the running loop

    async def load(self, pool: asyncpg.Pool) -> None:
        rows = await pool.fetch("SELECT * FROM accounts")
        keys = await pool.fetch(
            "SELECT id, account_id, prefix, key_hash, permissions FROM api_keys"
            " WHERE revoked_at IS NULL"
        )
        by_id: dict[int, Account] = {}
        for r in rows:
            by_id[r["id"]] = Account(
                id=r["id"],
                name=r["name"],
                system_id=r["system_id"],
                password_hash=r["password_hash"],
                default_class=MessageClass(r["default_class"]),
                max_binds=r["max_binds"],
                allowed_ips=tuple(r["allowed_ips"]) if r["allowed_ips"] is not None else None,
                tps=r["tps"],
                retention_days=r["retention_days"],
                purge_days=r["purge_days"],
                webhook_url=r["webhook_url"],
                enabled=r["enabled"],
            )
        by_prefix: dict[str, list[ApiKey]] = {}
        for k in keys:
            by_prefix.setdefault(k["prefix"], []).append(
                ApiKey(
                    k["id"],
                    k["account_id"],
                    k["prefix"],
                    k["key_hash"],
                    frozenset(k["permissions"]),
                )
            )
        self.by_id = by_id
        self.by_system_id = {a.system_id: a for a in by_id.values() if a.system_id}
        self.keys_by_prefix = by_prefix

    def _fingerprint(self, stored_hash: str, secret: str) -> bytes:
        return hashlib.sha256(stored_hash.encode() + b"\0" + secret.encode()).digest()

    async def _verify(self, stored_hash: str | None, secret: str) -> bool:
        if stored_hash is None:
            await self._slot_verify(_DUMMY_HASH, secret)
            return False
        fp = self._fingerprint(stored_hash, secret)
        if fp in self._verified:
            return True
        # Binds with the same credentials arriving together (a customer's
        # pool reconnecting after a restart) share one argon2 run.
        running = self._verifying.get(fp)
        if running is None:
            running = asyncio.ensure_future(self._slot_verify(stored_hash, secret))
            self._verifying[fp] = running
            running.add_done_callback(lambda _f: self._verifying.pop(fp, None))
        ok = await asyncio.shield(running)
        if ok:
            if len(self._verified) > 100_000:
                self._verified.clear()
            self._verified[fp] = 1
        return ok

    async def _slot_verify(self, stored_hash: str, secret: str) -> bool:
        if self._slots is None:
            self._slots = asyncio.Semaphore(VERIFY_SLOTS)
        async with self._slots:
            return await asyncio.to_thread(_safe_verify, stored_hash, secret)

    async def authenticate_bind(self, system_id: str, password: str, ip: str | None) -> Account:
        """The account for an SMPP bind, or AuthError with the SMPP status."""
        account = self.by_system_id.get(system_id)
        ok = await self._verify(account.password_hash if account else None, password)
        if account is None:
            raise AuthError(Status.ESME_RINVSYSID, "unknown_system_id")
        if not ok:
            raise AuthError(Status.ESME_RINVPASWD, "bad_password")
        if not account.enabled:
            raise AuthError(Status.ESME_RBINDFAIL, "account_disabled")
        if not account.ip_allowed(ip):
            raise AuthError(Status.ESME_RBINDFAIL, "ip_not_allowed")
        return account

    def cached_key(self, key: str) -> tuple[Account, ApiKey] | None:
        """What :meth:`authenticate_key` answers when that takes no argon2 run,
        without a coroutine: the candidates in the same order and the same
        checks, but None as soon as one was not verified before (the caller
        then awaits authenticate_key). A revoked key is gone from
        ``keys_by_prefix`` after ``load`` and a disabled account is checked
        here, so this answers no sooner or later than authenticate_key would."""
        for cand in self.keys_by_prefix.get(key[:API_KEY_PREFIX_LEN], ()):
            fp = self._fingerprint(cand.key_hash, key)
            if fp in self._mismatch:
                continue
            if fp not in self._verified:
                return None
            account = self.by_id.get(cand.account_id)
            if account is not None and account.enabled:
                return account, cand
        return None

    async def authenticate_key(self, key: str) -> tuple[Account, ApiKey] | None:
        candidates = self.keys_by_prefix.get(key[:API_KEY_PREFIX_LEN], [])
        missed: list[bytes] = []
        for cand in candidates:
            fp = self._fingerprint(cand.key_hash, key)
            if fp in self._mismatch:
                continue
            if await self._verify(cand.key_hash, key):
                if missed:
                    if len(self._mismatch) > 100_000:
                        self._mismatch.clear()
                    self._mismatch.update(dict.fromkeys(missed, 1))
                account = self.by_id.get(cand.account_id)
                if account is not None and account.enabled:
                    return account, cand
            else:
                missed.append(fp)
        if not candidates:
            await self._verify(None, key)
        return None


def _safe_verify(stored_hash: str, secret: str) -> bool:
    try:
        return _HASHER.verify(stored_hash, secret)
    except (VerificationError, InvalidHashError):
        return False


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


async def create_account(
    conn: asyncpg.Connection | asyncpg.Pool,
    name: str,
    *,
    system_id: str | None = None,
    password: str | None = None,
    default_class: str = "standard",
    max_binds: int = 10,
) -> int:
    pw_hash = hash_secret(password) if password is not None else None
    row = await conn.fetchrow(
        "INSERT INTO accounts (name, system_id, password_hash, default_class, max_binds)"
        " VALUES ($1, $2, $3, $4, $5) RETURNING id",
        name,
        system_id,
        pw_hash,
        default_class,
        max_binds,
    )
    assert row is not None
    return int(row["id"])


async def add_api_key(
    conn: asyncpg.Connection | asyncpg.Pool,
    account_id: int,
    key: str | None = None,
    permissions: tuple[str, ...] = ("send", "read"),
) -> tuple[int, str]:
    key = key or new_api_key()
    row = await conn.fetchrow(
        "INSERT INTO api_keys (account_id, prefix, key_hash, permissions)"
        " VALUES ($1, $2, $3, $4) RETURNING id",
        account_id,
        key[:API_KEY_PREFIX_LEN],
        hash_secret(key),
        list(permissions),
    )
    assert row is not None
    return int(row["id"]), key


async def ensure_demo_account(pool: asyncpg.Pool) -> None:
    """The demo account (system_id demo / demo-pass, API key demo-key)."""
    async with pool.acquire() as conn, conn.transaction():
        exists = await conn.fetchval("SELECT id FROM accounts WHERE name = 'demo'")
        if exists:
            return
        account_id = await create_account(conn, "demo", system_id="demo", password="demo-pass")
        await add_api_key(conn, account_id, "demo-key", ("send", "read", "admin"))
        await conn.execute(
            "INSERT INTO audit_log (actor, action, account_id)"
            " VALUES ('system', 'demo_account_created', $1)",
            account_id,
        )
