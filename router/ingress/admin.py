"""HTTP API over the traffic log and the privacy tools (privacy.md 4, 5).

* ``GET /v1/traffic``: the caller's own traffic-log rows ('read' permission);
* ``GET|POST /v1/admin/dsr/export``, ``POST /v1/admin/dsr/erase``: data-subject
  requests ('admin');
* ``GET|POST|DELETE /v1/admin/opt-out``: the account's opt-out list ('admin').

The account always comes from the API key, never from the request, so one
account cannot name another's data. Every read, export, erasure, change and
every refused ('403') attempt is audit-logged; numbers only as keyed hashes.
Responses carrying personal data are ``Cache-Control: no-store``. This module
never logs a number, a sender or a text, and error bodies never echo them.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiohttp import web

from ..accounts import Account, AccountStore, ApiKey
from ..model import Status
from ..routing import normalise_e164
from ..store import dsr
from ..store.audit import audit, msisdn_hash
from ..store.optout import InvalidNumber, OptOutList
from ..tasks import DB_ERRORS
from . import openapi as api
from .http import ACCOUNTS, _authenticate, problem
from .http import BadRequest as Refused

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
NO_STORE = {"Cache-Control": "no-store"}
_TRAFFIC_PARAMS = {"from", "to", "status", "country", "destination", "cursor", "limit"}
_STATUSES = {s.value for s in Status}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PoolGetter = Callable[[], "asyncpg.Pool | None"]


@dataclass(slots=True)
class AdminState:
    pool_getter: PoolGetter
    accounts: AccountStore
    optout: OptOutList
    audit_key: bytes


ADMIN: web.AppKey[AdminState] = web.AppKey("admin", AdminState)


class Invalid(Exception):
    """A request this module refuses; the detail never holds the value."""

    def __init__(self, slug: str, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.slug = slug
        self.detail = detail
        self.field = field


def _actor(key: ApiKey) -> str:
    return f"api-key:{key.id}"


def _pool(request: web.Request) -> asyncpg.Pool:
    pool = request.app[ADMIN].pool_getter()
    if pool is None:
        raise web.HTTPServiceUnavailable()
    return pool


def _guarded(handler: Handler) -> Handler:
    """Refused auth and bad input as their problem, database trouble as 503."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except Refused as exc:
            return exc.response
        except Invalid as exc:
            status = api.PROBLEM_TYPES.get(exc.slug, (422, ""))[0]
            return problem(status, exc.slug, exc.detail, field=exc.field)
        except (web.HTTPServiceUnavailable, *DB_ERRORS):
            return problem(
                503,
                "database-unavailable",
                "the database cannot be reached now",
                headers={"Retry-After": "5"},
                title="Database unavailable",
            )

    return wrapper


async def _require(request: web.Request, permission: str, action: str) -> tuple[Account, ApiKey]:
    """The caller's account and key, or Refused (a refused valid key is audited)."""
    try:
        return await _authenticate(request, permission)
    except Refused as exc:
        if exc.response.status == 403:
            token = request.headers.get("Authorization", "").partition(" ")[2].strip()
            found = await request.app[ACCOUNTS].authenticate_key(token)
            pool = request.app[ADMIN].pool_getter()
            if found is not None and pool is not None:
                await audit(
                    pool,
                    _actor(found[1]),
                    "denied",
                    found[0].id,
                    attempted=action,
                    permission=permission,
                    path=request.path,
                )
        raise


async def _json_object(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise Invalid("unsupported-media-type", "Content-Type must be application/json")
    try:
        doc = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise Invalid("invalid-json", "request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise Invalid("invalid-json", "the body must be a JSON object")
    return doc


def _msisdn(value: Any) -> str:
    digits = normalise_e164(value) if isinstance(value, str) else None
    if digits is None:
        raise Invalid("invalid-field", "msisdn: an international number in E.164 format", "msisdn")
    return digits


# ---------------------------------------------------------------- traffic


def _time(value: str, name: str) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        raise Invalid("invalid-field", f"{name}: an ISO 8601 timestamp", name) from None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def _encode_cursor(at: dt.datetime, message_id: str) -> str:
    raw = json.dumps([at.isoformat(), message_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(value: str) -> tuple[dt.datetime, str]:
    try:
        at, message_id = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
        return dt.datetime.fromisoformat(at), str(message_id)
    except (ValueError, TypeError, binascii.Error):
        raise Invalid(
            "invalid-field", "cursor: not a cursor from a previous page", "cursor"
        ) from None


@dataclass(slots=True)
class TrafficQuery:
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    status: str | None = None
    country: str | None = None
    destination: str | None = None
    after: tuple[dt.datetime, str] | None = None
    limit: int = DEFAULT_LIMIT

    @classmethod
    def parse(cls, q: Any) -> TrafficQuery:
        unknown = set(q) - _TRAFFIC_PARAMS
        if unknown:
            name = sorted(unknown)[0]
            raise Invalid("invalid-field", f"unknown parameter '{name}'", name)
        out = cls()
        if "from" in q:
            out.start = _time(q["from"], "from")
        if "to" in q:
            out.end = _time(q["to"], "to")
        if "status" in q:
            if q["status"] not in _STATUSES:
                raise Invalid(
                    "invalid-field", "status: one of " + ", ".join(sorted(_STATUSES)), "status"
                )
            out.status = q["status"]
        if "country" in q:
            cc = q["country"].upper()
            if len(cc) != 2 or not cc.isalpha():
                raise Invalid("invalid-field", "country: an ISO 3166 alpha-2 code", "country")
            out.country = cc
        if "destination" in q:
            out.destination = normalise_e164(q["destination"])
            if out.destination is None:
                raise Invalid("invalid-field", "destination: an E.164 number", "destination")
        if "cursor" in q:
            out.after = _decode_cursor(q["cursor"])
        if "limit" in q:
            try:
                out.limit = int(q["limit"])
            except ValueError:
                out.limit = 0
            if not 1 <= out.limit <= MAX_LIMIT:
                raise Invalid("invalid-field", f"limit: an integer from 1 to {MAX_LIMIT}", "limit")
        return out

    def sql(self, account_id: int) -> tuple[str, list[Any]]:
        """Newest first, keyset-paginated on (accepted_at, id)."""
        args: list[Any] = [account_id]
        where = ["t.account_id = $1"]

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if self.start is not None:
            where.append(f"t.accepted_at >= {arg(self.start)}")
        if self.end is not None:
            where.append(f"t.accepted_at < {arg(self.end)}")
        if self.country is not None:
            where.append(f"t.country = {arg(self.country)}")
        if self.destination is not None:
            where.append(f"t.destination = {arg(self.destination)}")
        if self.status is not None:
            where.append(f"coalesce(e.status, 'queued') = {arg(self.status)}")
        if self.after is not None:
            where.append(f"(t.accepted_at, t.id) < ({arg(self.after[0])}, {arg(self.after[1])})")
        sql = (
            "SELECT t.id, t.class, t.ingress, t.source, t.destination, t.country, t.carrier,"
            " t.parts, t.data_coding, t.body, t.userref, t.accepted_at, t.anonymised_at,"
            " coalesce(e.status, 'queued') AS status, e.error, e.at AS status_at"
            " FROM traffic_log t LEFT JOIN LATERAL ("
            "  SELECT d.status, d.error, d.at FROM delivery_events d"
            "  WHERE d.message_id = t.id AND d.account_id = t.account_id"
            "  ORDER BY d.at DESC LIMIT 1) e ON true"
            f" WHERE {' AND '.join(where)}"
            f" ORDER BY t.accepted_at DESC, t.id DESC LIMIT {arg(self.limit + 1)}"
        )
        return sql, args

    def audit_filter(self, key: bytes) -> dict[str, Any]:
        f: dict[str, Any] = {"limit": self.limit, "page": self.after is not None}
        if self.start is not None:
            f["from"] = self.start.isoformat()
        if self.end is not None:
            f["to"] = self.end.isoformat()
        if self.status is not None:
            f["status"] = self.status
        if self.country is not None:
            f["country"] = self.country
        if self.destination is not None:
            f["destination_hash"] = msisdn_hash(self.destination, key)
        return f


def _traffic_row(r: asyncpg.Record) -> dict[str, Any]:
    def iso(v: dt.datetime | None) -> str | None:
        return v.isoformat() if v is not None else None

    return {
        "id": r["id"],
        "class": r["class"],
        "ingress": r["ingress"],
        "from": r["source"],
        "to": r["destination"],
        "country": r["country"],
        "carrier": r["carrier"],
        "parts": r["parts"],
        "data_coding": r["data_coding"],
        "text": r["body"],
        "userref": r["userref"],
        "accepted_at": iso(r["accepted_at"]),
        "anonymised_at": iso(r["anonymised_at"]),
        "status": r["status"],
        "status_at": iso(r["status_at"]),
        "error": r["error"],
    }


@_guarded
async def get_traffic(request: web.Request) -> web.StreamResponse:
    account, key = await _require(request, "read", "traffic.read")
    state = request.app[ADMIN]
    query = TrafficQuery.parse(request.query)
    pool = _pool(request)
    sql, args = query.sql(account.id)
    rows = await pool.fetch(sql, *args)
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    await audit(
        pool,
        _actor(key),
        "traffic.read",
        account.id,
        filter=query.audit_filter(state.audit_key),
        rows=len(rows),
    )
    cursor = _encode_cursor(rows[-1]["accepted_at"], rows[-1]["id"]) if more else None
    return web.json_response(
        {"messages": [_traffic_row(r) for r in rows], "next_cursor": cursor}, headers=NO_STORE
    )


# ---------------------------------------------------------------- DSR


@_guarded
async def dsr_export(request: web.Request) -> web.StreamResponse:
    account, key = await _require(request, "admin", "dsr.export")
    params: dict[str, Any] = dict(request.query)
    if request.method == "POST":
        params.update(await _json_object(request))
    digits = _msisdn(params.get("msisdn"))
    fmt = params.get("format", "json")
    if fmt not in ("json", "csv"):
        raise Invalid("invalid-field", "format: 'json' or 'csv'", "format")
    result = await dsr.export(
        _pool(request),
        account.id,
        digits,
        actor=_actor(key),
        audit_key=request.app[ADMIN].audit_key,
        fmt=fmt,
    )
    if isinstance(result, str):
        return web.Response(
            text=result,
            content_type="text/csv",
            charset="utf-8",
            headers={**NO_STORE, "Content-Disposition": 'attachment; filename="export.csv"'},
        )
    return web.json_response({"messages": result}, headers=NO_STORE)


@_guarded
async def dsr_erase(request: web.Request) -> web.StreamResponse:
    account, key = await _require(request, "admin", "dsr.erase")
    digits = _msisdn((await _json_object(request)).get("msisdn"))
    n = await dsr.erase(
        _pool(request),
        account.id,
        digits,
        actor=_actor(key),
        audit_key=request.app[ADMIN].audit_key,
    )
    return web.json_response({"erased": n})


# ---------------------------------------------------------------- opt-out


@_guarded
async def optout_list(request: web.Request) -> web.StreamResponse:
    account, key = await _require(request, "admin", "opt_out.list")
    pool = _pool(request)
    state = request.app[ADMIN]
    if "msisdn" in request.query:
        digits = _msisdn(request.query["msisdn"])
        found = await pool.fetchval(
            "SELECT true FROM opt_out WHERE account_id = $1 AND msisdn = $2", account.id, digits
        )
        await audit(
            pool,
            _actor(key),
            "opt_out.check",
            account.id,
            msisdn_hash=msisdn_hash(digits, state.audit_key),
        )
        return web.json_response({"opted_out": bool(found)})
    rows = await pool.fetch(
        "SELECT msisdn, created_at FROM opt_out WHERE account_id = $1 ORDER BY created_at, msisdn",
        account.id,
    )
    await audit(pool, _actor(key), "opt_out.list", account.id, rows=len(rows))
    return web.json_response(
        {
            "numbers": [
                {"msisdn": r["msisdn"], "created_at": r["created_at"].isoformat()} for r in rows
            ]
        },
        headers=NO_STORE,
    )


@_guarded
async def optout_add(request: web.Request) -> web.StreamResponse:
    account, key = await _require(request, "admin", "opt_out.add")
    digits = _msisdn((await _json_object(request)).get("msisdn"))
    added = await request.app[ADMIN].optout.add(_pool(request), account.id, digits, _actor(key))
    return web.json_response({"opted_out": True, "added": added}, status=201 if added else 200)


@_guarded
async def optout_remove(request: web.Request) -> web.StreamResponse:
    account, key = await _require(request, "admin", "opt_out.remove")
    raw = request.query.get("msisdn")
    if raw is None and request.can_read_body:
        raw = (await _json_object(request)).get("msisdn")
    digits = _msisdn(raw)
    try:
        removed = await request.app[ADMIN].optout.remove(
            _pool(request), account.id, digits, _actor(key)
        )
    except InvalidNumber as exc:
        raise Invalid("invalid-field", str(exc), "msisdn") from None
    if not removed:
        return problem(404, "not-found", "that number is not on this account's opt-out list")
    return web.Response(status=204)


def add_admin_routes(
    app: web.Application,
    pool_getter: PoolGetter,
    accounts: AccountStore,
    optout: OptOutList,
    audit_key: bytes,
) -> None:
    """Mount the traffic and privacy endpoints on the public API app.

    ``app`` must be the one from ``make_api`` (``_authenticate`` reads its
    account store); ``pool_getter`` returns the pool, or None while there is none.
    """
    app[ADMIN] = AdminState(pool_getter, accounts, optout, audit_key)
    app.router.add_get("/v1/traffic", get_traffic)
    app.router.add_get("/v1/admin/dsr/export", dsr_export)
    app.router.add_post("/v1/admin/dsr/export", dsr_export)
    app.router.add_post("/v1/admin/dsr/erase", dsr_erase)
    app.router.add_get("/v1/admin/opt-out", optout_list)
    app.router.add_post("/v1/admin/opt-out", optout_add)
    app.router.add_delete("/v1/admin/opt-out", optout_remove)
