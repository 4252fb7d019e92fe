"""The HTTP front door (aiohttp): submit messages, read their status.

Handlers parse and validate, hand messages to Engine.submit, and answer 202
only once every accepted message is durable (the engine's spool). Errors
are application/problem+json with a stable ``type``; bodies never echo a
number or text back, and no stack trace ever leaves. The contract (limits,
patterns, problem types, the OpenAPI document) lives in :mod:`.openapi`.

Never logs a request body, a number, a sender, a text, a label or a key.
Labels are kept in memory only, bounded, and never written anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog
from aiohttp import web
from yarl import URL

from ..accounts import Account, AccountStore, ApiKey
from ..config import Config
from ..engine import Engine, Rejected
from ..model import Delivery, Message, MessageClass, Origin, Status, new_message_id
from ..observe import metrics
from ..tasks import DB_ERRORS
from ..text.segment import Encoded, encode_text, part_count, split
from ..value import value
from . import openapi as api
from .validate import InvalidField, check_sender

log = structlog.get_logger("router.ingress.http")

PROBLEM = "application/problem+json"

_E164 = re.compile(api.E164_PATTERN[1:-1])
_SENDER_ALNUM = re.compile(api.SENDER_ALNUM_PATTERN[1:-1])
_SENDER_NUMERIC = re.compile(api.SENDER_NUMERIC_PATTERN[1:-1])
_CALLBACK = re.compile(api.CALLBACK_URL_PATTERN[1:-1])
_IDEMPOTENCY_KEY = re.compile(api.IDEMPOTENCY_KEY_PATTERN[1:-1])
_MESSAGE_ID = re.compile(api.MESSAGE_ID_PATTERN[1:-1])
_FIELDS = frozenset(
    {
        "to",
        "from",
        "text",
        "class",
        "userref",
        "callback_url",
        "validity_seconds",
        "send_at",
        "max_parts",
        "labels",
    }
)
_ENCODINGS = {0x00: "gsm7", 0x08: "ucs2"}
# A dictionary rather than MessageClass(value): the Enum call costs more than
# the rest of a field check.
_CLASSES = {"standard": MessageClass.STANDARD, "secret": MessageClass.SECRET}
# The field at fault for engine refusals that are not about the recipient.
_REFUSAL_FIELD = {
    "schedule_too_far": "send_at",
    "schedule_unavailable": "send_at",
    "expires_before_send": "validity_seconds",
}
_MAX_KEY_LEN = 512  # longer bearer tokens are refused before any hashing
_YIELD_EVERY = 1000  # accepts between event-loop yields in a large batch


# ------------------------------------------------------------------ problems


def problem(
    status: int,
    slug: str,
    detail: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    field: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    title: str | None = None,
) -> web.Response:
    body: dict[str, Any] = {
        "type": api.PROBLEM_BASE + slug,
        "title": title or api.PROBLEM_TYPES.get(slug, (status, "Request refused"))[1],
        "status": status,
    }
    if detail:
        body["detail"] = detail
    if field is not None:
        body["field"] = field
    if errors is not None:
        body["errors"] = errors
    return web.Response(status=status, text=json.dumps(body), content_type=PROBLEM, headers=headers)


def _slug(reason: str) -> str:
    return reason.replace("_", "-")


class BadItem(Exception):
    """One message item (or one recipient of it) refused; never holds a value."""

    def __init__(self, slug: str, field: str, detail: str) -> None:
        super().__init__(detail)
        self.slug = slug
        self.field = field
        self.detail = detail


class BadRequest(Exception):
    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


# -------------------------------------------------------------- idempotency


class IdempotencyUnavailable(Exception):
    pass


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    request_hash: str
    status: int  # 0: the first request is still being handled
    body: Any
    created_at: float  # wall clock


class IdempotencyStore:
    """Answers to POSTs carrying an Idempotency-Key, kept ``ttl`` seconds.

    PostgreSQL (table ``idempotency_keys``) is the shared truth, so every
    node of a deployment sees the same keys; final answers are also kept in
    memory as a fast path. Without a pool the store is memory-only (one
    node). ``claim`` takes the key before anything is sent, so two nodes
    handling the same retry cannot both send; ``put`` records the answer;
    ``release`` gives the key back when the answer must not be kept.
    """

    def __init__(
        self,
        pool: asyncpg.Pool | None = None,
        *,
        ttl: float = api.IDEMPOTENCY_TTL,
        claim_timeout: float = 30.0,
        memory_limit: int = 100_000,
        wall: Callable[[], float] = time.time,
        query_timeout: float = 2.0,
    ) -> None:
        self.pool = pool
        self.ttl = ttl
        self.claim_timeout = claim_timeout
        self.memory_limit = memory_limit
        self.wall = wall
        self.query_timeout = query_timeout
        self._memory: OrderedDict[tuple[int, str], StoredAnswer] = OrderedDict()

    def _remember(self, k: tuple[int, str], answer: StoredAnswer) -> None:
        self._memory[k] = answer
        self._memory.move_to_end(k)
        while len(self._memory) > self.memory_limit:
            self._memory.popitem(last=False)

    def _fresh(self, answer: StoredAnswer | None, now: float) -> StoredAnswer | None:
        if answer is None:
            return None
        limit = self.claim_timeout if answer.status == 0 else self.ttl
        return answer if now - answer.created_at < limit else None

    async def claim(self, account_id: int, key: str, request_hash: str) -> StoredAnswer | None:
        """None if the key is now ours; else what is stored (status 0: in progress)."""
        k = (account_id, key)
        now = self.wall()
        known = self._fresh(self._memory.get(k), now)
        if known is not None and known.status != 0:
            return known
        if self.pool is None:
            if known is not None:
                return known
            self._remember(k, StoredAnswer(request_hash, 0, None, now))
            return None
        try:
            for _ in range(3):
                row = await self.pool.fetchrow(
                    "INSERT INTO idempotency_keys AS i (account_id, key, request_hash, status)"
                    " VALUES ($1, $2, $3, 0)"
                    " ON CONFLICT (account_id, key) DO UPDATE"
                    "  SET request_hash = EXCLUDED.request_hash, status = 0, body = NULL,"
                    "      created_at = now()"
                    "  WHERE i.created_at < now() - make_interval(secs => $4)"
                    "     OR (i.status = 0 AND i.created_at < now() - make_interval(secs => $5))"
                    " RETURNING 1",
                    account_id,
                    key,
                    request_hash,
                    float(self.ttl),
                    float(self.claim_timeout),
                    timeout=self.query_timeout,
                )
                if row is not None:
                    return None
                row = await self.pool.fetchrow(
                    "SELECT request_hash, status, body::text AS body,"
                    " extract(epoch FROM created_at)::float8 AS created"
                    " FROM idempotency_keys WHERE account_id = $1 AND key = $2",
                    account_id,
                    key,
                    timeout=self.query_timeout,
                )
                if row is not None:
                    answer = StoredAnswer(
                        row["request_hash"],
                        row["status"],
                        json.loads(row["body"]) if row["body"] else None,
                        row["created"],
                    )
                    if answer.status != 0:
                        self._remember(k, answer)
                    return answer
        except DB_ERRORS as exc:
            log.warning("idempotency_store_error", error=type(exc).__name__)
            raise IdempotencyUnavailable from None
        raise IdempotencyUnavailable

    async def put(
        self, account_id: int, key: str, request_hash: str, status: int, body: Any
    ) -> None:
        self._remember((account_id, key), StoredAnswer(request_hash, status, body, self.wall()))
        if self.pool is None:
            return
        try:
            await self.pool.execute(
                "UPDATE idempotency_keys SET status = $4, body = $5::jsonb"
                " WHERE account_id = $1 AND key = $2 AND request_hash = $3",
                account_id,
                key,
                request_hash,
                status,
                json.dumps(body),
                timeout=self.query_timeout,
            )
        except DB_ERRORS as exc:
            # The answer is sent anyway; the in-memory copy still protects
            # retries reaching this node.
            log.warning("idempotency_store_error", error=type(exc).__name__)

    async def release(self, account_id: int, key: str) -> None:
        self._memory.pop((account_id, key), None)
        if self.pool is None:
            return
        try:
            await self.pool.execute(
                "DELETE FROM idempotency_keys WHERE account_id = $1 AND key = $2 AND status = 0",
                account_id,
                key,
                timeout=self.query_timeout,
            )
        except DB_ERRORS as exc:
            log.warning("idempotency_store_error", error=type(exc).__name__)

    async def purge(self) -> int:
        """Forget answers older than the TTL; returns how many rows went."""
        cutoff = self.wall() - self.ttl
        while self._memory:
            first = next(iter(self._memory.values()))
            if first.created_at >= cutoff:
                break
            self._memory.popitem(last=False)
        if self.pool is None:
            return 0
        result = await self.pool.execute(
            "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)",
            float(self.ttl),
        )
        return int(result.split()[-1])


def request_hash(account_id: int, key: str, doc: Any) -> str:
    """A digest of the request, salted by account and key (never the request itself)."""
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(f"{account_id}\0{key}\0{canonical}".encode()).hexdigest()


# ------------------------------------------------------------ labels memory


@value()  # immutable; see router/value.py
class _Extra:
    parts: int
    labels: dict[str, str] | None


class MessageExtras:
    """What the HTTP door remembers beside the engine: labels, and the part
    count of secret messages (the engine drops their segments when final).
    Memory only, bounded, oldest forgotten first."""

    def __init__(self, limit: int = 200_000) -> None:
        self.limit = limit
        self._items: OrderedDict[str, _Extra] = OrderedDict()

    def put(self, message_id: str, extra: _Extra) -> None:
        self._items[message_id] = extra
        if len(self._items) > self.limit:
            self._items.popitem(last=False)

    def get(self, message_id: str) -> _Extra | None:
        return self._items.get(message_id)


# ------------------------------------------------------------------ app keys

ENGINE: web.AppKey[Engine] = web.AppKey("engine", Engine)
ACCOUNTS: web.AppKey[AccountStore] = web.AppKey("accounts", AccountStore)
CONFIG: web.AppKey[Config] = web.AppKey("config", Config)
IDEMPOTENCY: web.AppKey[IdempotencyStore] = web.AppKey("idempotency", IdempotencyStore)
EXTRAS: web.AppKey[MessageExtras] = web.AppKey("extras", MessageExtras)
OPENAPI: web.AppKey[bytes] = web.AppKey("openapi", bytes)


# ---------------------------------------------------------------- middleware


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    try:
        resp = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        slug = {404: "not-found", 405: "method-not-allowed", 413: "body-too-large"}.get(
            exc.status, "invalid-json" if exc.status == 400 else "internal-error"
        )
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        resp = problem(exc.status, slug, headers=headers, title=exc.reason)
    except Exception as exc:  # never a stack trace to the client, never the payload to the log
        log.error("http_internal_error", route=route, error=type(exc).__name__)
        resp = problem(500, "internal-error")
    metrics.child(metrics.HTTP_REQUESTS, route, str(resp.status)).inc()
    return resp


# ---------------------------------------------------------------------- auth


_CHALLENGE = 'Bearer realm="sms-router"'


async def _authenticate(request: web.Request, *permissions: str) -> tuple[Account, ApiKey]:
    """The caller's account and key, holding one of ``permissions``, or BadRequest."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > _MAX_KEY_LEN:
        raise BadRequest(
            problem(
                401,
                "unauthorized",
                "send 'Authorization: Bearer <API key>'",
                headers={"WWW-Authenticate": _CHALLENGE},
            )
        )
    accounts = request.app[ACCOUNTS]
    found = accounts.cached_key(token) or await accounts.authenticate_key(token)
    if found is None:
        challenge = _CHALLENGE + ', error="invalid_token"'
        raise BadRequest(
            problem(
                401,
                "unauthorized",
                "the API key is not valid",
                headers={"WWW-Authenticate": challenge},
            )
        )
    if not permissions or found[1].permissions.isdisjoint(permissions):
        raise BadRequest(
            problem(
                403,
                "forbidden",
                "this key lacks the " + " or ".join(f"'{p}'" for p in permissions) + " permission",
            )
        )
    return found


# ------------------------------------------------------------------ parsing


def _reject_constant(value: str) -> Any:
    raise ValueError("NaN and Infinity are not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError("duplicate key in a JSON object")
        out[k] = v
    return out


# One strict decoder for every request: json.loads(..., hooks) would build a new
# JSONDecoder and C scanner per call.
_STRICT_JSON = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)


def _too_large(limit: int) -> web.Response:
    return problem(413, "body-too-large", f"the body exceeds {limit} bytes")


async def _read_json(request: web.Request) -> Any:
    cfg = request.app[CONFIG].http
    if request.content_type != "application/json" or (
        request.charset is not None and request.charset.lower() not in ("utf-8", "utf8")
    ):
        raise BadRequest(
            problem(415, "unsupported-media-type", "send Content-Type: application/json (UTF-8)")
        )
    if request.content_length is not None and request.content_length > cfg.max_body:
        raise BadRequest(_too_large(cfg.max_body))
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BadRequest(_too_large(cfg.max_body)) from None
    return _parse_json(raw)


def _parse_json(raw: bytes) -> Any:
    """A request body as strict JSON (UTF-8; no NaN/Infinity, no duplicate
    keys), or BadRequest 400 invalid-json naming the fault, never the content."""
    try:
        text = raw.decode("utf-8")
        if text.startswith("\ufeff"):  # refused as json.loads refuses it
            raise json.JSONDecodeError("Unexpected UTF-8 BOM", text, 0)
        return _STRICT_JSON.decode(text)
    except UnicodeDecodeError:
        detail = "the body is not UTF-8"
    except json.JSONDecodeError as exc:
        detail = f"syntax error at line {exc.lineno} column {exc.colno}"
    except ValueError as exc:  # our hooks: duplicates, NaN; messages hold no content
        detail = str(exc)
    except RecursionError:
        detail = "JSON nested too deeply"
    raise BadRequest(problem(400, "invalid-json", detail))


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _clean_string(v: str) -> bool:
    """No NUL (PostgreSQL refuses it) and no unpaired surrogate (not UTF-8)."""
    if "\x00" in v:
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(slots=True)
class Draft:
    """One validated message item, before it fans out to its recipients."""

    index: int
    recipients: list[str]  # E.164 digits
    source: str
    ton: int
    npi: int
    msg_class: MessageClass
    enc: Encoded
    segments: tuple[bytes, ...]
    text: str
    validity: int
    send_at: float | None
    userref: str | None
    callback_url: str | None
    labels: dict[str, str] | None


def _check_item(engine: Engine, account: Account, index: int, item: Any) -> Draft:
    if not isinstance(item, dict):
        raise BadItem("invalid-field", "", "a message must be a JSON object")
    if not _FIELDS.issuperset(item):
        name = sorted(set(item) - _FIELDS)[0]
        raise BadItem("invalid-field", name, f"unknown field '{name}'")
    send_at = _send_at(item.get("send_at")) if "send_at" in item else None
    to = item.get("to")
    if isinstance(to, str):
        to = [to]
    if not isinstance(to, list) or not to:
        raise BadItem(
            "invalid-destination", "to", "a number or a non-empty list of numbers is required"
        )
    recipients: list[str] = []
    for r in to:
        if not isinstance(r, str) or not _E164.fullmatch(r):
            raise BadItem(
                "invalid-destination",
                "to",
                "expected international numbers in E.164 format (+ and 7-15 digits)",
            )
        recipients.append(r.removeprefix("+"))
    sender = item.get("from")
    if not isinstance(sender, str) or not (
        _SENDER_NUMERIC.fullmatch(sender) or _SENDER_ALNUM.fullmatch(sender)
    ):
        raise BadItem(
            "invalid-sender", "from", "a sender id: 1-11 letters/digits, or up to 15 digits"
        )
    try:
        source, ton, npi = check_sender(sender)
    except InvalidField as exc:
        raise BadItem("invalid-sender", "from", str(exc)) from None
    text = item.get("text")
    if not isinstance(text, str) or not text:
        raise BadItem("invalid-text", "text", "a non-empty string is required")
    if not _clean_string(text):
        raise BadItem("invalid-text", "text", "text holds NUL or an unpaired surrogate")
    if "class" in item:
        cls = item["class"]
        msg_class = _CLASSES.get(cls) if isinstance(cls, str) else None
        if msg_class is None:
            raise BadItem("invalid-field", "class", "expected 'standard' or 'secret'")
    else:
        msg_class = account.default_class
    validity = item.get("validity_seconds", api.VALIDITY_DEFAULT)
    if not _is_int(validity, 1, api.VALIDITY_MAX):
        raise BadItem(
            "invalid-field", "validity_seconds", f"an integer from 1 to {api.VALIDITY_MAX}"
        )
    userref = item.get("userref")
    if userref is not None and (
        not isinstance(userref, str) or len(userref) > api.USERREF_MAX or not _clean_string(userref)
    ):
        raise BadItem(
            "invalid-field", "userref", f"a string of at most {api.USERREF_MAX} characters"
        )
    callback = item.get("callback_url")
    if callback is not None:
        if (
            not isinstance(callback, str)
            or len(callback) > api.CALLBACK_URL_MAX
            or not _CALLBACK.fullmatch(callback)
            or not _clean_string(callback)  # stored (receipt route, outbox): no NUL
        ):
            raise BadItem("invalid-field", "callback_url", "an http(s) URL")
        try:
            if not URL(callback).host:
                raise ValueError
        except ValueError:
            raise BadItem("invalid-field", "callback_url", "an http(s) URL") from None
    max_parts = item.get("max_parts", api.MAX_PARTS_DEFAULT)
    if not _is_int(max_parts, 1, api.MAX_PARTS_LIMIT):
        raise BadItem("invalid-field", "max_parts", f"an integer from 1 to {api.MAX_PARTS_LIMIT}")
    labels = item.get("labels")
    if labels is not None:
        if (
            not isinstance(labels, dict)
            or len(labels) > api.LABELS_MAX
            or not all(
                isinstance(v, str)
                and len(v) <= api.LABEL_VALUE_MAX
                and 1 <= len(k) <= api.LABEL_KEY_MAX
                and _clean_string(k)
                and _clean_string(v)
                for k, v in labels.items()
            )
        ):
            raise BadItem(
                "invalid-field",
                "labels",
                f"at most {api.LABELS_MAX} pairs of strings (keys 1-"
                f"{api.LABEL_KEY_MAX}, values up to {api.LABEL_VALUE_MAX} characters)",
            )
    try:
        enc = encode_text(text)
        parts = part_count(enc)
    except ValueError:
        raise BadItem("invalid-text", "text", "text cannot be encoded") from None
    if parts > max_parts:
        raise BadItem(
            "too-many-parts", "text", f"text needs {parts} parts, more than max_parts={max_parts}"
        )
    segments = tuple(split(enc, ref=engine.rng.randrange(256)))
    return Draft(
        index=index,
        recipients=recipients,
        source=source,
        ton=ton,
        npi=npi,
        msg_class=msg_class,
        enc=enc,
        segments=segments,
        text=text,
        validity=validity,
        send_at=send_at,
        userref=userref,
        callback_url=callback,
        labels=dict(labels) if labels else None,
    )


def _send_at(value: Any) -> float:
    """RFC 3339 date-time with an explicit offset -> epoch seconds."""
    if not isinstance(value, str) or len(value) > 40:
        raise BadItem("invalid-send-at", "send_at", "an RFC 3339 date-time with an offset")
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None or "T" not in value.upper():
        raise BadItem(
            "invalid-send-at",
            "send_at",
            "an RFC 3339 date-time with an offset, e.g. 2026-12-01T09:00:00Z",
        )
    return when.timestamp()


def _error(
    index: int, slug: str, field: str | None, detail: str, recipient: int | None = None
) -> dict[str, Any]:
    e: dict[str, Any] = {"index": index}
    if recipient is not None:
        e["recipient"] = recipient
    e["type"] = api.PROBLEM_BASE + slug
    if field:
        e["field"] = field
    e["detail"] = detail
    return e


# ----------------------------------------------------------------- handlers


async def post_messages(request: web.Request) -> web.Response:
    try:
        account, _ = await _authenticate(request, "send")
        key = request.headers.get("Idempotency-Key")
        if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
            raise BadRequest(
                problem(
                    400,
                    "invalid-idempotency-key",
                    f"1-{api.IDEMPOTENCY_KEY_MAX} visible ASCII characters",
                    field="Idempotency-Key",
                )
            )
        doc = await _read_json(request)
    except BadRequest as exc:
        return exc.response
    if key is None:
        status, body, headers = await _submit(request, account, doc)
        return _answer(status, body, headers)
    store = request.app[IDEMPOTENCY]
    digest = request_hash(account.id, key, doc)
    try:
        stored = await store.claim(account.id, key, digest)
    except IdempotencyUnavailable:
        return problem(503, "idempotency-unavailable", "retry later", headers={"Retry-After": "5"})
    if stored is not None:
        if stored.request_hash != digest:
            return problem(
                422,
                "idempotency-key-reused",
                "this Idempotency-Key was used with a different request",
                field="Idempotency-Key",
            )
        if stored.status == 0:
            return problem(
                409,
                "idempotency-key-in-progress",
                "the first request with this key is still being handled",
                headers={"Retry-After": "1"},
                field="Idempotency-Key",
            )
        return _answer(stored.status, stored.body, {"Idempotent-Replayed": "true"})
    # Shielded: once messages are handed over, the answer must be recorded
    # even if the client goes away, or a retry would send them again.
    return await asyncio.shield(_submit_once(request, account, doc, key, digest))


async def _submit_once(
    request: web.Request, account: Account, doc: Any, key: str, digest: str
) -> web.Response:
    store = request.app[IDEMPOTENCY]
    kept = False
    try:
        status, body, headers = await _submit(request, account, doc)
        if status == 202:
            await store.put(account.id, key, digest, status, body)
            kept = True
        return _answer(status, body, headers)
    finally:
        if not kept:
            await store.release(account.id, key)


def _answer(status: int, body: dict[str, Any], headers: dict[str, str] | None) -> web.Response:
    content_type = "application/json" if status < 400 else PROBLEM
    return web.Response(
        status=status, text=_dumps_answer(body), content_type=content_type, headers=headers
    )


_ACCEPTED_KEYS = ("id", "status", "parts", "encoding")


def _plain(v: Any) -> bool:
    """A str that json.dumps writes as is between quotes (ASCII letters/digits)."""
    return type(v) is str and v.isascii() and v.isalnum()


def _dumps_answer(body: dict[str, Any]) -> str:
    """json.dumps(body), character for character. The answer to a single
    message ({"id", "status", "parts", "encoding"}: an id, two words and a
    count) is written out directly: json.dumps spends more on that small
    dict than the rest of building the response."""
    if tuple(body) == _ACCEPTED_KEYS:
        mid, status, parts, encoding = body.values()
        if type(parts) is int and _plain(mid) and _plain(status) and _plain(encoding):
            return (
                f'{{"id": "{mid}", "status": "{status}", "parts": {parts},'
                f' "encoding": "{encoding}"}}'
            )
    return json.dumps(body)


def _problem_body(status: int, slug: str, detail: str, **extra: Any) -> dict[str, Any]:
    body = {
        "type": api.PROBLEM_BASE + slug,
        "title": api.PROBLEM_TYPES.get(slug, (status, "Request refused"))[1],
        "status": status,
        "detail": detail,
    }
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


async def _submit(
    request: web.Request, account: Account, doc: Any
) -> tuple[int, dict[str, Any], dict[str, str] | None]:
    """Validate, accept, and shape the answer: (status, body, headers).

    The body holds ids, part counts, encodings and refusal reasons only, so
    it may be kept by the idempotency store."""
    engine = request.app[ENGINE]
    cfg = request.app[CONFIG].http
    if not isinstance(doc, dict):
        return 422, _problem_body(422, "invalid-field", "the body must be a JSON object"), None
    batch = "messages" in doc
    if batch:
        extra = set(doc) - {"messages"}
        if extra:
            name = sorted(extra)[0]
            return (
                422,
                _problem_body(422, "invalid-field", f"unknown field '{name}'", field=name),
                None,
            )
        items = doc["messages"]
        if not isinstance(items, list) or not items:
            return (
                422,
                _problem_body(
                    422, "invalid-field", "messages must be a non-empty list", field="messages"
                ),
                None,
            )
    else:
        items = [doc]
    recipients = sum(
        len(i["to"]) if isinstance(i, dict) and isinstance(i.get("to"), list) else 1 for i in items
    )
    if recipients > cfg.max_batch or len(items) > cfg.max_batch:
        return (
            413,
            _problem_body(
                413,
                "batch-too-large",
                f"at most {cfg.max_batch} recipients per request",
                field="messages" if batch else "to",
            ),
            None,
        )
    if not engine.accepting:
        return (
            503,
            _problem_body(
                503, "draining", "the router is shutting down; retry later or on another node"
            ),
            {"Retry-After": "5"},
        )
    single = not batch and isinstance(doc.get("to"), str)
    drafts: list[Draft] = []
    errors: list[dict[str, Any]] = []
    refused = 0
    for index, item in enumerate(items):
        try:
            drafts.append(_check_item(engine, account, index, item))
        except BadItem as exc:
            metrics.child(metrics.REJECTED, "http", account.name, exc.slug).inc()
            errors.append(_error(index, exc.slug, exc.field, exc.detail))
            to = item.get("to") if isinstance(item, dict) else None
            refused += len(to) if isinstance(to, list) and to else 1
    # Hand every recipient to the engine first (each reserves its room at
    # once), then wait for all of them to be durable together: a batch costs
    # one spool commit, not one per recipient.
    outcomes = _Outcomes(engine.loop)
    submitted: list[tuple[Draft, int, Message]] = []
    now = engine.wall()
    count = 0
    for d in drafts:
        for r, destination in enumerate(d.recipients):
            count += 1
            if count % _YIELD_EVERY == 0:
                await asyncio.sleep(0)  # a 10,000-recipient batch must not stall the loop
            secret = d.msg_class is MessageClass.SECRET
            msg = Message(
                id=new_message_id(),
                account_id=account.id,
                account=account.name,
                origin=Origin.HTTP,
                msg_class=d.msg_class,
                source=d.source,
                source_ton=d.ton,
                source_npi=d.npi,
                destination=destination,
                country=engine.countries.country(destination),
                data_coding=d.enc.data_coding,
                esm_class=0x40 if len(d.segments) > 1 else 0,
                segments=d.segments,
                text=None if secret else d.text,
                registered_delivery=1,
                accepted_at=now,
                expires_at=max(now, d.send_at or now) + d.validity,
                userref=d.userref,
                callback_url=d.callback_url,
                send_at=d.send_at if d.send_at is not None and d.send_at > now else None,
            )
            engine.submit(msg, outcomes.slot())
            submitted.append((d, r, msg))
    await outcomes.wait()
    accepted: list[dict[str, Any]] = []
    throttled: Rejected | None = None
    extras = request.app[EXTRAS]
    for (d, r, msg), result in zip(submitted, outcomes.results, strict=True):
        assert result is not None  # wait() returns once every slot is settled
        if isinstance(result, Rejected):
            metrics.child(metrics.REJECTED, "http", account.name, result.reason).inc()
            if result.http_status in (429, 503):
                metrics.child(metrics.THROTTLE_SENT, "http", result.reason).inc()
                if throttled is None or result.http_status == 503:
                    throttled = result
            errors.append(
                _error(
                    d.index,
                    _slug(result.reason),
                    _REFUSAL_FIELD.get(result.reason, "to"),
                    result.detail,
                    None if single else r,
                )
            )
            refused += 1
            continue
        if d.labels or msg.secret:
            extras.put(msg.id, _Extra(msg.parts, d.labels))
        item = {
            "index": d.index,
            "recipient": r,
            "id": msg.id,
            "status": "accepted" if result.status is not Status.SCHEDULED else "scheduled",
            "parts": msg.parts,
            "encoding": _ENCODINGS.get(d.enc.data_coding, "other"),
        }
        if msg.send_at is not None:
            item["send_at"] = _iso(msg.send_at)
        accepted.append(item)
    errors.sort(key=lambda e: (e["index"], e.get("recipient", -1)))
    retry_headers = (
        {"Retry-After": str(max(1, int(throttled.retry_after or 1)))}
        if throttled is not None
        else None
    )
    if not accepted:
        if throttled is not None:
            status = throttled.http_status
            return (
                status,
                _problem_body(
                    status,
                    _slug(throttled.reason),
                    throttled.detail,
                    errors=None if single else errors,
                ),
                retry_headers,
            )
        if single or (not batch and len(errors) == 1 and "recipient" not in errors[0]):
            e = errors[0]
            return (
                422,
                _problem_body(
                    422, e["type"].removeprefix(api.PROBLEM_BASE), e["detail"], field=e.get("field")
                ),
                None,
            )
        return (
            422,
            _problem_body(422, "batch-rejected", "no message was accepted", errors=errors),
            None,
        )
    if single:
        a = accepted[0]
        return (
            202,
            {k: v for k, v in a.items() if k not in ("index", "recipient")},
            None,
        )
    return (
        202,
        {"accepted": len(accepted), "rejected": refused, "messages": accepted, "errors": errors},
        retry_headers,
    )


class _Outcomes:
    """What the engine answered for each message of one request, and one
    future for all of them (not a future per recipient and a gather: a
    10,000-recipient batch allocated 10,000 futures)."""

    __slots__ = ("results", "_pending", "_all")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.results: list[Delivery | Rejected | None] = []
        # The request's own hold, released by wait(): answers that come while
        # messages are still being handed over must not complete it early.
        self._pending = 1
        self._all: asyncio.Future[None] = loop.create_future()

    def slot(self) -> Callable[[Delivery | Rejected], None]:
        """The callback for the next message; the engine calls it once."""
        i = len(self.results)
        self.results.append(None)
        self._pending += 1

        def settle(result: Delivery | Rejected) -> None:
            if self.results[i] is None:
                self.results[i] = result
                self._release()

        return settle

    def _release(self) -> None:
        self._pending -= 1
        if self._pending == 0 and not self._all.done():
            self._all.set_result(None)

    async def wait(self) -> None:
        """Return once every slot has its answer."""
        self._release()
        if not self._all.done():
            await self._all


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def get_message(request: web.Request) -> web.Response:
    try:
        account, _ = await _authenticate(request, "send", "read")
    except BadRequest as exc:
        return exc.response
    message_id = request.match_info["id"]
    engine = request.app[ENGINE]
    try:
        d = await engine.lookup_async(message_id) if _MESSAGE_ID.fullmatch(message_id) else None
    except DB_ERRORS:
        return problem(503, "database-unavailable", "retry later", headers={"Retry-After": "5"})
    if d is None or d.message.account_id != account.id:
        # The same answer whether the id exists for another account or not at all.
        return problem(404, "not-found", "no such message for this account")
    return web.json_response(_status_body(request, d))


async def cancel_message(request: web.Request) -> web.Response:
    """DELETE /v1/messages/{id}: withdraw a scheduled message still waiting."""
    try:
        account, _ = await _authenticate(request, "send")
    except BadRequest as exc:
        return exc.response
    message_id = request.match_info["id"]
    if not _MESSAGE_ID.fullmatch(message_id):
        return problem(404, "not-found", "no such message for this account")
    engine = request.app[ENGINE]
    try:
        d = await engine.cancel(message_id, account.id)
        if d is None:
            d = await engine.lookup_async(message_id)
            if d is None or d.message.account_id != account.id:
                return problem(404, "not-found", "no such message for this account")
            return problem(
                409,
                "not-cancelable",
                f"the message is {d.status.value}; only a scheduled message can be canceled",
            )
    except DB_ERRORS:
        return problem(503, "database-unavailable", "retry later", headers={"Retry-After": "5"})
    return web.json_response(_status_body(request, d))


def _status_body(request: web.Request, d: Delivery) -> dict[str, Any]:
    m = d.message
    extra = request.app[EXTRAS].get(m.id)
    body = {
        "id": m.id,
        "status": d.status.value,
        "class": m.msg_class.value,
        "parts": m.parts or (extra.parts if extra else 0),
        "encoding": _ENCODINGS.get(m.data_coding, "other"),
        "country": m.country,
        "carrier": d.carrier,
        "error": d.error,
        "userref": None if m.secret and d.status.final else m.userref,
        "labels": extra.labels if extra else None,
        "accepted_at": _iso(m.accepted_at),
        "updated_at": _iso(d.updated_at or m.accepted_at),
        "expires_at": _iso(m.expires_at),
    }
    if m.send_at is not None:
        body["send_at"] = _iso(m.send_at)
    return body


async def get_openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


# ---------------------------------------------------------------------- app


def _idempotency_context(
    pool: asyncpg.Pool | None, database_url: str | None, purge_every: float
) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    # An explicit context manager: aiohttp then uses it as is (a bare async
    # generator function it probes by calling it once, which a compiled build
    # of this module answers with a coroutine that is never awaited).
    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        own: asyncpg.Pool | None = None
        store = app[IDEMPOTENCY]
        if store.pool is None and pool is None and database_url is not None:
            # Not handed a pool: keep a small one of our own so the store is
            # still shared between nodes.
            own = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
            store.pool = own

        async def purge_loop() -> None:
            while True:
                await asyncio.sleep(purge_every)
                try:
                    gone = await store.purge()
                    if gone:
                        log.info("idempotency_keys_purged", rows=gone)
                except DB_ERRORS as exc:
                    log.warning("idempotency_store_error", error=type(exc).__name__)

        task = asyncio.create_task(purge_loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if own is not None:
                store.pool = None
                await own.close()

    return ctx


def make_api(
    cfg: Config,
    engine: Engine,
    accounts: AccountStore,
    *,
    pool: asyncpg.Pool | None = None,
    idempotency: IdempotencyStore | None = None,
    purge_every: float = 3600.0,
) -> web.Application:
    """The HTTP API application. Pass the router's ``pool`` so idempotency
    keys are shared through PostgreSQL; without one (and without a store),
    the app opens a small pool of its own from ``cfg.database_url``."""
    app = web.Application(client_max_size=cfg.http.max_body, middlewares=[errors_middleware])
    app[ENGINE] = engine
    app[ACCOUNTS] = accounts
    app[CONFIG] = cfg
    app[IDEMPOTENCY] = idempotency or IdempotencyStore(pool)
    app[EXTRAS] = MessageExtras()
    app[OPENAPI] = json.dumps(api.openapi_document(cfg.http)).encode()
    app.cleanup_ctx.append(_idempotency_context(pool, cfg.database_url, purge_every))
    app.router.add_post("/v1/messages", post_messages)
    app.router.add_get("/v1/messages/{id}", get_message, allow_head=False)
    app.router.add_delete("/v1/messages/{id}", cancel_message)
    app.router.add_get("/v1/openapi.json", get_openapi, allow_head=False)
    return app
